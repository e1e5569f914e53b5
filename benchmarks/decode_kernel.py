"""Microbenchmark of one decode step's attention for one layer, per KV format: kvscope's fused kernel (several
tunings) against the unfused path (dense read + mask + sdpa) and against sdpa on a plain dense bf16 cache with no mask
(what PyTorch does for an unbudgeted cache: the floor to compare with).

    python -m benchmarks.decode_kernel --out out/decode_kernel.json     # needs CUDA; writes section "decode-kernel"
    python -m benchmarks.decode_kernel --render docs/data/decode-kernel.json

`llama-3-8b` attention shape (32 query heads, 8 KV heads, head_dim 128), 8192 + 64 stored slots, 90% of them valid.
Times are medians over 200 calls (after 20 warm-up calls) of the CUDA-event time around one call
(`benchmarks.common.median_us`): where the kernels are shorter than their launch on the host, that includes the host's
gaps. GB/s counts the bytes of the stored slots read once (codes and scales).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.common import median_us, render_command, run_meta, save_json, section_head, table, write_section

TUNINGS = [{"SPLIT": 64, "BLOCK_N": 64, "NUM_WARPS": 4}, {"SPLIT": 128, "BLOCK_N": 64, "NUM_WARPS": 4},
           {"SPLIT": 256, "BLOCK_N": 64, "NUM_WARPS": 4}, {"SPLIT": 64, "BLOCK_N": 64, "NUM_WARPS": 2},
           {"SPLIT": 32, "BLOCK_N": 32, "NUM_WARPS": 2}, {"SPLIT": 128, "BLOCK_N": 128, "NUM_WARPS": 8}]
TITLE = "Decode attention kernel, one layer, `llama-3-8b` attention shape"


def case(batch: int, kv_dtype, tunings: bool, slots: int = 8256, hq: int = 32, h: int = 8, d: int = 128) -> list[dict]:
    from kvscope.cache import attention_triton as at  # needs Triton: imported only to measure, not to render
    from kvscope.cache.attention import grouped_attention
    from kvscope.cache.store import make_store

    g = torch.Generator(device="cuda").manual_seed(0)
    store = make_store(kv_dtype, batch, h, slots, d, torch.bfloat16, "cuda")
    k = torch.randn(batch, h, slots, d, device="cuda", dtype=torch.bfloat16, generator=g)
    store.write_range(0, k, k)
    query = torch.randn(batch, 1, hq, d, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    valid = torch.rand(batch, h, slots, device="cuda", generator=g) < 0.9
    own = torch.full((batch, h), slots - 1, device="cuda")

    def unfused():
        kk, vv = store.read(slots, query.dtype)
        mask = valid.scatter(-1, own[..., None], True)[:, :, None, :]
        return grouped_attention(query, kk, vv, mask, 0.088)

    def fused(tuning: dict):
        return at.decode_attention(store, query, valid, own, slots, 0.088, tuning=tuning)

    ref = unfused()
    rows = [{"path": "unfused (read + mask + sdpa)", "us": median_us(unfused)}]
    default = dict(at.TUNING[store.KERNEL])
    for t in [default] + ([t for t in TUNINGS if t != default] if tunings else []):
        err = (fused(t).float() - ref.float()).abs().max().item()
        tag = " (default)" if t is default else ""
        rows.append({"path": "fused " + " ".join(f"{k}={v}" for k, v in t.items()) + tag,
                     "us": median_us(lambda t=t: fused(t)), "max_err": err})
    if kv_dtype is None:
        kk, vv = store.read(slots, query.dtype)
        kr, vr = kk.repeat_interleave(hq // h, 1), vv.repeat_interleave(hq // h, 1)
        rows.append({"path": "sdpa, dense bf16, no mask (floor)", "us": median_us(
            lambda: torch.nn.functional.scaled_dot_product_attention(query, kr, vr, scale=0.088))})
    for r in rows:
        r.update(batch=batch, kv=kv_dtype or "bf16", us=round(r["us"], 1),
                 gbps=round(store.nbytes / (r["us"] * 1e-6) / 1e9, 1))
        print(r, flush=True)
    return rows


def render(data: dict) -> str:
    section = data["meta"].get("section", "decode-kernel")
    path, rebuild = render_command("decode_kernel", section)
    return (section_head(data["meta"].get("title", TITLE), data["meta"], path, rebuild, section) +
            "8192 + 64 slots per row, 90% valid; median over 200 calls of the CUDA-event time around one call (host "
            "launch gaps included where kernels are shorter than their launch); GB/s = the store's bytes / time. "
            "`max_err`: largest difference from the unfused output (bf16).\n\n" +
            table(data["rows"], [("batch", "batch"), ("kv", "KV"), ("path", "path"), ("us", "us / call"),
                                 ("gbps", "GB/s"), ("max_err", "max_err")]))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="out/decode_kernel.json")
    ap.add_argument("--kv", default="bf16,fp8,int8,int4", help="KV formats (comma list)")
    ap.add_argument("--section", default="decode-kernel", help="section of docs/benchmarks.md to write")
    ap.add_argument("--render", metavar="JSON", help="only rewrite the section from a saved run")
    args = ap.parse_args(argv)
    if args.render:
        data = json.loads(Path(args.render).read_text())
        write_section(data["meta"].get("section", "decode-kernel"), render(data))
        return
    data = {"meta": {**run_meta(), "section": args.section}, "rows": []}
    for batch in (1, 2, 4, 8):
        for kv in [None if k == "bf16" else k for k in args.kv.split(",")]:
            data["rows"] += case(batch, kv, tunings=batch in (1, 8))  # other tunings at batch 1 and 8 only
            save_json(data, args.out)
    write_section(args.section, render(data))


if __name__ == "__main__":
    main()
