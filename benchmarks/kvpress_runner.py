"""Run the quality benchmark's cases through NVIDIA kvpress presses (inside `.venv-kvpress`, not kvscope's venv).

    .venv-kvpress/bin/python benchmarks/kvpress_runner.py IN.json OUT.json

kvpress 0.5.5 needs transformers < 5.3, which kvscope does not support, so it lives in its own virtualenv (created by
`make bench-quality` from benchmarks/requirements-kvpress.txt) and `benchmarks/quality.py` calls this script as a
subprocess. The input holds the model directory (kvscope's cached safetensors conversion of the embedded SmolLM2) and
the cases as token ids, so both tools see exactly the same tokens; the output holds generated token ids (scored by
quality.py with the same tokenizer) and negative log-likelihoods.

How a press is applied. kvpress compresses a layer's KV cache in a forward hook after that layer's attention, during
the prefill forward only; the prefill's own output is therefore the same for every press and ratio. This runner runs
the prefill once per case and, in each layer's hook, calls every press's own `compress()` on that layer's keys and
values (exactly what `BasePress.forward_hook` does, once per press), keeping each press's compressed KV. Each press
then decodes from a `DynamicCache` holding its compressed KV. A check on one case (a 2k one, from quality.py)
compares this with kvpress's own paths (`with press(model): model(...)`, and the pipeline's `_forward`) and records
whether the answers agree.

Modes:
- `together`: the whole prompt (context, question, answer prefix) is prefilled and compressed, then decoding starts;
  the same information kvscope's one-chunk runs get (its eviction also runs after the whole prompt's prefill).
- `pipeline`: what the `kv-press-text-generation` pipeline does: only the context (template head, instruction, story)
  is prefilled and compressed; the question and answer prefix are then run uncompressed on top, and decoding starts.
  The press cannot see the question, but the question's tokens are kept beyond the budget.

Perplexity (`ppl`): the first half of the text is prefilled and compressed to the budget fraction of its length, then
the second half is scored teacher-forced in one forward on top of the compressed cache (its own tokens uncompressed).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch


def _press(name: str, ratio: float):
    import kvpress

    cls = getattr(kvpress, name)
    return cls(compression_ratio=ratio, seed=0) if name == "RandomPress" else cls(compression_ratio=ratio)


def _language_model(model):
    return model.model.language_model if hasattr(model.model, "language_model") else model.model


class SharedPrefill:
    """Forward hooks that call every press's `compress` on each layer during one prefill and keep the results."""

    def __init__(self, model, configs: dict):
        self.model, self.configs = model, configs
        self.kept: dict[str, list] = {key: [] for key in configs}

    def __enter__(self):
        lm = _language_model(self.model)
        for press in self.configs.values():
            if press is not None:
                press.post_init_from_model(self.model)
        self.hooks = []
        for layer in lm.layers:
            layer.self_attn.rotary_emb = lm.rotary_emb  # as BasePress.__call__ does
            self.hooks.append(layer.self_attn.register_forward_hook(self.hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()

    def hook(self, module, args, kwargs, output):
        from kvpress.utils import extract_keys_and_values

        cache = kwargs["past_key_values"]
        keys, values = extract_keys_and_values(cache, module.layer_idx)
        for key, press in self.configs.items():
            if press is None:
                k, v = keys, values
            else:
                k, v = press.compress(module, kwargs["hidden_states"], keys, values, output[1], kwargs)
            self.kept[key].append((k, v))
        return output

    def cache(self, key: str):
        from transformers import DynamicCache

        cache = DynamicCache()
        for i, (k, v) in enumerate(self.kept[key]):
            cache.update(k, v, i)
        return cache


@torch.inference_mode()
def greedy(model, cache, first_logits, start: int, max_new: int, eos: set[int]) -> list[int]:
    """Greedy decoding from the prefill's last logits, positions counted from `start` (kvpress's pipeline way)."""
    tokens = [int(first_logits.argmax())]
    for i in range(max_new - 1):
        if tokens[-1] in eos:
            break
        out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache,
                    position_ids=torch.tensor([[start + i]]), logits_to_keep=1)
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def configs_for(presses: list[str], fractions: list[float]) -> dict:
    configs = {"none@1.0": None}
    for name in presses:
        for f in fractions:
            configs[f"{name}@{f}"] = _press(name, 1.0 - f)
    return configs


@torch.inference_mode()
def run_case(model, case: dict, presses, fractions, mode: str, max_new: int, eos: set[int]) -> list[dict]:
    ids = torch.tensor([case["input_ids"]])
    split = case["haystack_end"] if mode == "pipeline" else ids.shape[1]
    context, question = ids[:, :split], ids[:, split:]
    configs = configs_for(presses, fractions)
    t0 = time.perf_counter()
    with SharedPrefill(model, configs) as shared:
        out = model(input_ids=context, past_key_values=_fresh_cache(), logits_to_keep=1)
    prefill_s = time.perf_counter() - t0
    rows = []
    for key, _press_obj in configs.items():
        name, f = key.split("@")
        cache = shared.cache(key)
        kept = cache.get_seq_length()
        start = split
        logits = out.logits[0, -1]
        if question.shape[1]:
            q = model(input_ids=question, past_key_values=cache,
                      position_ids=torch.arange(split, ids.shape[1])[None], logits_to_keep=1)
            logits, start = q.logits[0, -1], ids.shape[1]
        t = time.perf_counter()
        gen = greedy(model, cache, logits, start, max_new, eos)
        rows.append({"tool": "kvpress", "press": name, "fraction": float(f), "mode": mode, "case_id": case["case_id"],
                     "generated_ids": gen, "kept_tokens": kept, "decode_s": round(time.perf_counter() - t, 3)})
    rows[0]["prefill_s"] = round(prefill_s, 3)
    return rows


def _fresh_cache():
    from transformers import DynamicCache

    return DynamicCache()


@torch.inference_mode()
def run_ppl(model, ids: list[int], presses, fractions) -> list[dict]:
    ids_t = torch.tensor([ids])
    half = len(ids) // 2
    configs = configs_for(presses, fractions)
    with SharedPrefill(model, configs) as shared:
        model(input_ids=ids_t[:, :half], past_key_values=_fresh_cache(), logits_to_keep=1)
    rows = []
    for key in configs:
        name, f = key.split("@")
        cache = shared.cache(key)
        kept = cache.get_seq_length()
        # the last prefix token's prediction of token `half` is not scored: scored tokens are half+1 .. end
        out = model(input_ids=ids_t[:, half:], past_key_values=cache, position_ids=torch.arange(half, len(ids))[None])
        logp = torch.log_softmax(out.logits[0, :-1].float(), -1)
        nll = -logp.gather(-1, ids_t[0, half + 1:, None]).squeeze(-1)
        rows.append({"tool": "kvpress", "press": name, "fraction": float(f), "kept_tokens": kept,
                     "nll_sum": float(nll.sum()), "tokens": int(nll.numel())})
    return rows


@torch.inference_mode()
def verify(model, tok, case: dict, presses: list[str], fraction: float, max_new: int, eos: set[int]) -> list[dict]:
    """Compare the shared-prefill results with kvpress's own code paths on one case."""
    from transformers import DynamicCache, pipeline

    out = []
    ids = torch.tensor([case["input_ids"]])
    shared = {r["press"]: r["generated_ids"] for r in run_case(model, case, presses, [fraction], "together", max_new,
                                                               eos)}
    for name in presses:
        press = _press(name, 1.0 - fraction)
        cache = DynamicCache()
        with press(model):
            o = model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
        gen = greedy(model, cache, o.logits[0, -1], ids.shape[1], max_new, eos)
        out.append({"mode": "together", "press": name, "fraction": fraction, "agrees": gen == shared[name],
                    "official_ids": gen, "shared_ids": shared[name]})
    # the pipeline's own _forward on the same ids (context = up to the end of the story)
    shared_p = {r["press"]: r["generated_ids"] for r in run_case(model, case, presses, [fraction], "pipeline",
                                                                 max_new, eos)}
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok, device="cpu")
    split = case["haystack_end"]
    for name in presses:
        answers = pipe._forward({"context_ids": ids[:, :split], "questions_ids": [ids[:, split:]]},
                                max_new_tokens=max_new, press=_press(name, 1.0 - fraction))
        mine = tok.decode(shared_p[name], skip_special_tokens=True)
        out.append({"mode": "pipeline", "press": name, "fraction": fraction, "agrees": answers[0] == mine,
                    "official_text": answers[0], "shared_text": mine})
    return out


def main(argv: list[str]) -> int:
    src, dst = Path(argv[0]), Path(argv[1])
    job = json.loads(src.read_text())
    torch.set_num_threads(job.get("threads", 2))
    import kvpress
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    presses, fractions, max_new = job["presses"], job["fractions"], job["max_new_tokens"]
    impl = "eager" if "ObservedAttentionPress" in presses else "sdpa"  # ObservedAttention needs the weights
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32, attn_implementation=impl)
    model.eval()
    eos = set(job["eos_token_ids"])
    versions = {"kvpress": getattr(kvpress, "__version__", "0.5.5"), "transformers": transformers.__version__,
                "torch": torch.__version__}
    result = {"versions": versions, "attn_implementation": impl, "passkey": [], "ppl": [], "verify": []}
    started = time.perf_counter()
    if job.get("verify") and job["cases"]:
        case = job["verify_case"] if job.get("verify_case") else job["cases"][0]
        tok = AutoTokenizer.from_pretrained(job["model_dir"])
        result["verify"] = verify(model, tok, case, job.get("verify_presses", ["SnapKVPress", "KnormPress"]),
                                  job.get("verify_fraction", 0.25), max_new, eos)
    for i, case in enumerate(job["cases"]):
        for mode in job["modes"]:
            if mode == "pipeline" and case["target_length"] not in job.get("pipeline_lengths", []):
                continue
            result["passkey"] += run_case(model, case, presses, fractions, mode, max_new, eos)
        print(f"kvpress: case {i + 1}/{len(job['cases'])} {case['case_id']} done at "
              f"{time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    if job.get("ppl_ids"):
        result["ppl"] = run_ppl(model, job["ppl_ids"], presses, fractions)
    result["seconds"] = round(time.perf_counter() - started, 1)
    dst.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
