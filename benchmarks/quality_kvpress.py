"""NVIDIA kvpress's side of the quality benchmark: its presses, its own virtualenv (kvpress 0.5.5 needs
transformers < 5.3), and the subprocess that runs the same cases there (`python -m benchmarks.kvpress_runner`)."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

from benchmarks.common import ROOT
from benchmarks.quality_cases import answer_found
from benchmarks.quality_runners import distractor_hit, log

KVPRESS_VENV = ROOT / ".venv-kvpress"
KVPRESS_REQUIREMENTS = ROOT / "benchmarks" / "requirements-kvpress.txt"
# ObservedAttentionPress needs attn_implementation="eager" (it reads the attention weights), which makes every
# kvpress prefill about 2.5x slower on CPU; add it with --presses (the runner then switches to eager for all presses).
# Every kvpress 0.5.5 press that prunes the prompt's KV to a compression ratio on sdpa without downloading anything:
# the scorer presses, KVzip (its own multi-pass path), and kvpress's wrappers around the strongest scorers. Left out
# (docs say why): ObservedAttention/KVCompose (eager), QFilter/KVzap/FastKVzip/DuoAttention/LUKV/RestoreKV/
# ExpectedAttentionStats (downloads), DMS (a DMS-trained model), Finch (a delimiter token added to the prompt),
# ThinK (compresses key channels, not tokens), SimLayerKV (no ratio: a lazy-layer threshold),
# Decoding/CAM/CompressionRatioDecoding/PrefillDecoding (compress while decoding),
# PerLayerCompression/Composed (need per-layer ratios or several presses).
PRESSES = ["SnapKVPress", "StreamingLLMPress", "KnormPress", "TOVAPress", "ExpectedAttentionPress", "RandomPress",
           "PyramidKVPress", "KeyDiffPress", "LagKVPress", "CURPress", "LeverageScorePress", "CompactorPress",
           "CapPress", "NonCausalAttnPress", "KVzipPress", "KVgradPress",
           "AdaKVPress(ExpectedAttentionPress)", "AdaKVPress(SnapKVPress)", "AdaKVPress(TOVAPress)",
           "CriticalKVPress(SnapKVPress)", "CriticalKVPress(TOVAPress)", "CriticalAdaKVPress(ExpectedAttentionPress)",
           "CriticalAdaKVPress(SnapKVPress)", "ChunkKVPress(SnapKVPress)", "ChunkPress(SnapKVPress)",
           "BlockPress(KeyDiffPress)", "KeyRerotationPress(SnapKVPress)", "MergingPress(SnapKVPress)"]
VERIFY_PRESSES = ("SnapKVPress", "KnormPress", "AdaKVPress(TOVAPress)", "KeyRerotationPress(SnapKVPress)",
                  "KVzipPress")  # one of each path: plain, head-wise masks, re-rotated positions, KVzip's own


# --- kvpress ---------------------------------------------------------------------------------------------------------
def kvpress_python(args) -> Path:
    py = Path(args.kvpress_python) if args.kvpress_python else KVPRESS_VENV / "bin" / "python"
    if py.exists():
        return py
    if not args.setup_kvpress:
        raise SystemExit(f"kvpress's virtualenv is missing ({py}); expected it created by `make bench-quality` or "
                         f"by this script with --setup-kvpress (python3 -m venv {KVPRESS_VENV.name} && pip install -r "
                         f"{KVPRESS_REQUIREMENTS.relative_to(ROOT)}); or run with --no-kvpress")
    log(f"creating {KVPRESS_VENV} (kvpress 0.5.5, transformers 5.2.0, torch 2.13.0 CPU)")
    subprocess.run(["python3", "-m", "venv", str(KVPRESS_VENV)], check=True)
    pip = [str(KVPRESS_VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["-r", str(KVPRESS_REQUIREMENTS)], check=True)
    (KVPRESS_VENV / ".kvpress-installed").touch()
    return KVPRESS_VENV / "bin" / "python"


def run_kvpress(args, tok, cases, ppl_ids, fractions, model_dir: Path) -> dict:
    py = kvpress_python(args)
    verify_case = next((c for c in cases if c.target_length == 2048), cases[0])
    job = {"model_dir": str(model_dir), "cases": [c.to_json() for c in cases], "presses": args.presses,
           "fractions": fractions, "max_new_tokens": args.max_new_tokens, "modes": args.kvpress_modes,
           "pipeline_lengths": args.pipeline_lengths, "eos_token_ids": [tok.eos_token_id], "threads": args.threads,
           "verify": not args.no_verify, "verify_case": verify_case.to_json(),
           "verify_presses": [p for p in VERIFY_PRESSES if p in args.presses] or args.presses[:1],
           "verify_fraction": 0.25, "ppl_ids": ppl_ids}
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "job.json", Path(tmp) / "result.json"
        src.write_text(json.dumps(job))
        env = dict(os.environ, PYTHONWARNINGS="ignore", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
        proc = subprocess.run([str(py), "-m", "benchmarks.kvpress_runner", str(src), str(dst)], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=None, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"kvpress runner failed with exit code {proc.returncode} (its messages are above)")
        result = json.loads(dst.read_text())
    by_id = {c.case_id: c for c in cases}
    rows = []
    for r in result["passkey"]:
        case = by_id[r["case_id"]]
        text = tok.decode(r["generated_ids"], skip_special_tokens=True)
        rows.append({"tool": "kvpress", "policy": r["press"], "mode": r["mode"], "chunk": None, "kv_dtype": None,
                     "fraction": r["fraction"], "budget_tokens": r["kept_tokens"], "case_id": case.case_id,
                     "length": case.length, "target_length": case.target_length, "depth": case.depth, "key": case.key,
                     "answer": text, "found": answer_found(text, case.key), "seconds": r["decode_s"]}
                    | distractor_hit(case, text)
                    | ({"prefill_s": r["prefill_s"]} if "prefill_s" in r else {}))
    result["passkey_rows"] = rows
    result["ppl_rows"] = [{"tool": "kvpress", "policy": r["press"], "measure": "prefix", "fraction": r["fraction"],
                           "budget_tokens": r["kept_tokens"], "nll_sum": r["nll_sum"], "tokens": r["tokens"]}
                          for r in result["ppl"]]
    return result
