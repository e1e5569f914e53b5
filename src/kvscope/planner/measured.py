"""What a weight format was measured to cost, read from the data files `python -m benchmarks.weights` writes
(docs/data/weights-cpu.json: perplexity on the embedded model; docs/data/weights-cuda.json and the further runs
weights-cuda.<name>.json: decode speed on the H200). Nothing here is a number of its own: a format without a
measurement says "not measured".

The files are found in the source checkout kvscope runs from (an editable install); an installed wheel has none, and
says "not measured" too.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

DATA = Path(__file__).resolve().parents[3] / "docs" / "data"
NOT_MEASURED = "not measured"


@lru_cache(maxsize=4)
def _read(name: str) -> dict:
    path = DATA / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _cuda_run_names() -> list[str]:
    """The GPU runs of benchmarks.weights, the main one first."""
    return ["weights-cuda.json"] + sorted(p.name for p in DATA.glob("weights-cuda.*.json"))


def _cuda_run(fmt: str) -> dict:
    """The GPU run that measured `fmt`'s decode: weights-cuda.json, else a further run (weights-cuda.<name>.json,
    each with its own dense row); {} where none did."""
    for name in _cuda_run_names():
        data = _read(name)
        if (data.get("decode") or {}).get(fmt):
            return data
    return {}


def _decode_rows(data: dict, fmt: str) -> tuple[dict, dict]:
    """Decode tokens/s per batch ("1", "32", ...) of the dense weights and of `fmt` in one run's `data` ({} where
    none)."""
    rows = data.get("decode") or {}
    return rows.get("bf16") or {}, rows.get(fmt) or {}


def decode_change(fmt: str) -> str:
    """Decode tokens/s of `fmt` against the dense weights measured in the same run, per batch, or "not measured"."""
    data = _cuda_run(fmt)
    base, mine = _decode_rows(data, fmt)
    parts = []
    for batch in sorted(mine, key=int):
        if base.get(batch) and mine[batch]:
            a, b = base[batch], mine[batch]
            parts.append(f"{a:.0f} -> {b:.0f} tok/s at batch {batch} ({(b - a) / a:+.0%})")
    if not parts:
        return f"decode speed {NOT_MEASURED}"
    return f"decode {', '.join(parts)} ({data.get('model', '?')} on {data.get('device', '?')})"


def decode_ratio(fmt: str, batch: int) -> float | None:
    """`fmt`'s measured decode tokens/s over the dense weights' at the measured batch nearest `batch`, or None."""
    base, mine = _decode_rows(_cuda_run(fmt), fmt)
    both = [b for b in mine if mine[b] and base.get(b)]
    if not both:
        return None
    nearest = min(both, key=lambda b: (abs(int(b) - batch), int(b)))
    return mine[nearest] / base[nearest]


def prefill_change(fmt: str) -> str:
    """Prefill tokens/s of `fmt` against the dense weights measured in the same run (benchmarks.weights times a batch
    of 4k prompts), or "not measured"."""
    for name in _cuda_run_names():
        data = _read(name)
        rows = data.get("formats") or {}
        mine, base = (rows.get(fmt) or {}).get("prefill") or {}, (rows.get("bf16") or {}).get("prefill") or {}
        if mine.get("tps") and base.get("tps"):
            a, b = base["tps"], mine["tps"]
            return (f"prefill {a:,.0f} -> {b:,.0f} tok/s for {mine['batch']} x {mine['context']} tokens "
                    f"({(b - a) / a:+.0%}; {data.get('model', '?')} on {data.get('device', '?')})")
    return f"prefill speed {NOT_MEASURED}"


def perplexity_change(fmt: str) -> str:
    """Perplexity of `fmt` against the dense weights on the same text, or "not measured"."""
    data = _read("weights-cpu.json")
    rows = {r["weights"]: r for r in data.get("rows", []) if r.get("perplexity")}
    if fmt not in rows or "dense" not in rows:
        return f"perplexity {NOT_MEASURED}"
    a, b = rows["dense"]["perplexity"], rows[fmt]["perplexity"]
    return f"perplexity {a:.3f} -> {b:.3f} ({(b - a) / a:+.2%}; {data.get('model', '?')} on {data.get('device', '?')})"
