"""Per-rank results of a tensor-parallel run, merged into one report: each rank's figures and the total.

A rank holds `kv_heads / tp` of every layer's KV heads, so KV bytes add up across ranks; tokens stored per row and
evicted tokens are counts per (sequence, head) row, the same on every rank when eviction agrees (`agree`)."""

from __future__ import annotations


def merge_ranks(results: list[dict]) -> dict:
    """{"ranks": [...], "total": {...}, "agree": bool} from `ranks.run_job` results in rank order."""
    rows = []
    for r in results:
        res = r["result"]
        rows.append({"rank": r["rank"], "device": r["device"], "kv_heads": r["kv_heads"],
                     "query_heads": r["query_heads"], "kv_bytes": res["kv_bytes_total"],
                     "evicted_tokens": res["evicted_tokens_total"], "weights_bytes": r["weights_bytes"],
                     "peak_bytes": r.get("peak_bytes"), "decode_tokens_per_second": res["decode_tokens_per_second"]})
    layers = [[(x["stored_tokens"], x["evicted_tokens"]) for x in r["result"]["layers"]] for r in results]
    tokens = [r["tokens"] for r in results]
    agree = all(x == layers[0] for x in layers) and all(t == tokens[0] for t in tokens)
    peaks = [row["peak_bytes"] for row in rows]
    total = {"kv_bytes": sum(row["kv_bytes"] for row in rows), "kv_heads": sum(row["kv_heads"] for row in rows),
             "weights_bytes": sum(row["weights_bytes"] for row in rows),
             "peak_bytes": sum(peaks) if all(p is not None for p in peaks) else None,
             "max_peak_bytes": max(peaks) if all(p is not None for p in peaks) else None}
    return {"ranks": rows, "total": total, "agree": agree}
