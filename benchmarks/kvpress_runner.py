"""Run the quality benchmark's cases through NVIDIA kvpress presses (inside `.venv-kvpress`, not kvscope's venv).

    .venv-kvpress/bin/python -m benchmarks.kvpress_runner IN.json OUT.json    # from the repository root

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

import copy
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.quality_cases import parse_spec  # pure Python: shared with kvscope's side


def _press(spec: str, ratio: float):
    """A press from its class name, or `Wrapper(Inner)` for kvpress's wrappers around a scorer press (AdaKVPress,
    CriticalKVPress, CriticalAdaKVPress, ChunkKVPress, BlockPress, KeyRerotationPress): default knobs, the ratio set
    on the inner press (the wrappers forward `compression_ratio` to it)."""
    import kvpress

    if spec.endswith(")") and "(" in spec:
        outer, inner = spec[:-1].split("(", 1)
        scorer = _press(inner, ratio)
        if outer.startswith("Critical") and isinstance(scorer, kvpress.ExpectedAttentionPress):
            scorer.use_vnorm = False  # CriticalKV weighs by the values itself; kvpress warns to turn vnorm off
        return getattr(kvpress, outer)(press=scorer)
    name, knobs = parse_spec(spec)  # `SnapKVPress[window_size=32;kernel_size=7]`: knobs other than the defaults
    if name == "RandomPress":
        knobs.setdefault("seed", 0)
    return getattr(kvpress, name)(compression_ratio=ratio, **knobs)


def _rerotates(press) -> bool:
    """KeyRerotationPress moves the kept keys to positions 0..kept-1: decoding then continues from `kept`, as the
    kvpress pipeline does."""
    import kvpress

    return isinstance(press, kvpress.KeyRerotationPress)


def _language_model(model):
    return model.model.language_model if hasattr(model.model, "language_model") else model.model


class SharedPrefill:
    """Forward hooks that call every press's `compress` on each layer during one prefill and keep the results.

    Head-wise presses (AdaKVPress, CriticalAdaKVPress) keep every key and set `module.masked_key_indices`, which
    kvpress's attention patch applies while decoding; the hook takes each press's masks off the module (so the next
    press starts clean) and `masks(key)` puts them back on every layer for that press's decoding."""

    def __init__(self, model, configs: dict):
        self.model, self.configs = model, configs
        self.kept: dict[str, list] = {key: [] for key in configs}
        self.masked: dict[str, list] = {key: [] for key in configs}

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
            module.masked_key_indices = None
            if press is None:
                k, v = keys, values
            else:
                k, v = press.compress(module, kwargs["hidden_states"], keys, values, output[1], kwargs)
            self.kept[key].append((k, v))
            self.masked[key].append(getattr(module, "masked_key_indices", None))
        module.masked_key_indices = None
        return output

    def set_masks(self, key: str | None) -> int:
        """Put press `key`'s head-wise masks on every layer (None: clear them); returns the masked (batch, head,
        position) entries of all layers together."""
        lm = _language_model(self.model)
        for i, layer in enumerate(lm.layers):
            layer.self_attn.masked_key_indices = None if key is None else self.masked[key][i]
        return 0 if key is None else sum(0 if m is None else int(m[0].numel()) for m in self.masked[key])

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


# Presses with their own multi-pass `__call__` (not a per-layer `compress()`): run through that path, once per case.
OWN_PATH = ("KVzipPress", "KVgradPress")


@torch.inference_mode()
def run_case(model, case: dict, presses, fractions, mode: str, max_new: int, eos: set[int]) -> list[dict]:
    ids = torch.tensor([case["input_ids"]])
    split = case["haystack_end"] if mode == "pipeline" else ids.shape[1]
    context, question = ids[:, :split], ids[:, split:]
    configs = configs_for([p for p in presses if p not in OWN_PATH], fractions)
    t0 = time.perf_counter()
    with SharedPrefill(model, configs) as shared:
        out = model(input_ids=context, past_key_values=_fresh_cache(), logits_to_keep=1)
    prefill_s = time.perf_counter() - t0
    rows = []
    for key, press_obj in configs.items():
        name, f = key.rsplit("@", 1)
        masked = shared.set_masks(key)
        rerotated = press_obj is not None and _rerotates(press_obj)
        rows.append(_decode_row(model, shared.cache(key), masked, out.logits[0, -1], question, split, rerotated,
                                max_new, eos) | {"press": name, "fraction": float(f), "mode": mode,
                                                 "case_id": case["case_id"]})
        shared.set_masks(None)
    rows[0]["prefill_s"] = round(prefill_s, 3)
    for name in presses:
        if name in OWN_PATH:
            rows += own_path_rows(name, model, case, context, question, split, fractions, mode, max_new, eos)
    return rows


def _decode_row(model, cache, masked: int, logits, question, split: int, rerotated: bool, max_new: int,
                eos: set[int]) -> dict:
    """Decode from a compressed cache (question first, in pipeline mode). `masked`: (batch, head, position) entries
    that head-wise presses mask in all layers together; kept tokens are reported as the mean per layer and KV head."""
    stored = cache.get_seq_length()
    heads, layers = cache.layers[0].keys.shape[1], len(cache.layers)
    kept = stored - masked / (heads * layers)
    start = stored if rerotated else split
    if question.shape[1]:
        q = model(input_ids=question, past_key_values=cache,
                  position_ids=torch.arange(start, start + question.shape[1])[None], logits_to_keep=1)
        logits, start = q.logits[0, -1], start + question.shape[1]
    t = time.perf_counter()
    gen = greedy(model, cache, logits, start, max_new, eos)
    return {"tool": "kvpress", "generated_ids": gen, "kept_tokens": round(kept, 1),
            "decode_s": round(time.perf_counter() - t, 3)}


def _multi_ratio(name: str, ratios: list[float]):
    """KVzipPress (or KVgradPress, which scores differently but inherits KVzip's ending) whose final step
    (`compress_post`, which turns the scores into head-wise masks) runs once per ratio: the context reconstruction,
    the expensive part, does not depend on the ratio, so one pass serves every budget. Checked against the plain
    press in `verify`."""
    import kvpress

    class MultiRatio(getattr(kvpress, name)):
        def compress_post(self, model):
            self.masks = {}
            for r in ratios:
                self.compression_ratio = r
                super().compress_post(model)
                self.masks[r] = [layer.self_attn.masked_key_indices for layer in model.model.layers]

    return MultiRatio(compression_ratio=max(ratios))


@torch.inference_mode()
def own_path_rows(name, model, case, context, question, split, fractions, mode, max_new, eos) -> list[dict]:
    """KVzip (Kim et al. 2025, arXiv:2505.23416) and KVgrad through their own `__call__`: prefill, then context
    reconstruction passes that score every KV pair (KVgrad: with a backward pass, outside inference mode, as its
    `__call__` arranges), then head-wise masks; one reconstruction for all budgets."""
    press = _multi_ratio(name, [1.0 - f for f in fractions])
    cache = _fresh_cache()
    t0 = time.perf_counter()
    with press(model):
        out = model(input_ids=context, past_key_values=cache, logits_to_keep=1)
    prefill_s = time.perf_counter() - t0
    rows = []
    layers = _language_model(model).layers
    for f in fractions:
        masks = press.masks[1.0 - f]
        for layer, m in zip(layers, masks):
            layer.self_attn.masked_key_indices = m
        masked = sum(0 if m is None else int(m[0].numel()) for m in masks)
        rows.append(_decode_row(model, copy.deepcopy(cache), masked, out.logits[0, -1], question, split, False,
                                max_new, eos) | {"press": name, "fraction": float(f), "mode": mode,
                                                 "case_id": case["case_id"], "prefill_s": round(prefill_s, 3)})
        for layer in layers:
            layer.self_attn.masked_key_indices = None
    return rows


def _fresh_cache():
    from transformers import DynamicCache

    return DynamicCache()


@torch.inference_mode()
def run_ppl(model, ids: list[int], presses, fractions) -> list[dict]:
    ids_t = torch.tensor([ids])
    half = len(ids) // 2
    configs = configs_for([p for p in presses if p not in OWN_PATH], fractions)
    with SharedPrefill(model, configs) as shared:
        model(input_ids=ids_t[:, :half], past_key_values=_fresh_cache(), logits_to_keep=1)
    rows = []
    for name in presses:
        if name in OWN_PATH:
            rows += own_path_ppl(name, model, ids_t, half, fractions)
    for key, press_obj in configs.items():
        name, f = key.rsplit("@", 1)
        cache = shared.cache(key)
        stored = cache.get_seq_length()
        kept = stored - shared.set_masks(key) / (cache.layers[0].keys.shape[1] * len(cache.layers))
        start = stored if press_obj is not None and _rerotates(press_obj) else half
        # the last prefix token's prediction of token `half` is not scored: scored tokens are half+1 .. end
        out = model(input_ids=ids_t[:, half:], past_key_values=cache,
                    position_ids=torch.arange(start, start + len(ids) - half)[None])
        shared.set_masks(None)
        rows.append(_ppl_row(out, ids_t, half) | {"press": name, "fraction": float(f), "kept_tokens": kept})
    return rows


def _ppl_row(out, ids_t, half: int) -> dict:
    logp = torch.log_softmax(out.logits[0, :-1].float(), -1)
    nll = -logp.gather(-1, ids_t[0, half + 1:, None]).squeeze(-1)
    return {"tool": "kvpress", "nll_sum": float(nll.sum()), "tokens": int(nll.numel())}


@torch.inference_mode()
def own_path_ppl(name, model, ids_t, half: int, fractions) -> list[dict]:
    press = _multi_ratio(name, [1.0 - f for f in fractions])
    cache = _fresh_cache()
    with press(model):
        model(input_ids=ids_t[:, :half], past_key_values=cache, logits_to_keep=1)
    layers = _language_model(model).layers
    rows = []
    for f in fractions:
        masks = press.masks[1.0 - f]
        for layer, m in zip(layers, masks):
            layer.self_attn.masked_key_indices = m
        masked = sum(0 if m is None else int(m[0].numel()) for m in masks)
        c = copy.deepcopy(cache)
        kept = c.get_seq_length() - masked / (c.layers[0].keys.shape[1] * len(c.layers))
        out = model(input_ids=ids_t[:, half:], past_key_values=c, position_ids=torch.arange(half, ids_t.shape[1])[None])
        for layer in layers:
            layer.self_attn.masked_key_indices = None
        rows.append(_ppl_row(out, ids_t, half) | {"press": name, "fraction": float(f), "kept_tokens": kept})
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
        start = cache.get_seq_length() if _rerotates(press) else ids.shape[1]
        gen = greedy(model, cache, o.logits[0, -1], start, max_new, eos)  # head-wise masks stay on the modules
        for layer in _language_model(model).layers:
            layer.self_attn.masked_key_indices = None
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
        for layer in _language_model(model).layers:
            layer.self_attn.masked_key_indices = None
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
    # ObservedAttention needs the attention weights
    impl = "eager" if any("ObservedAttentionPress" in p for p in presses) else "sdpa"
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
