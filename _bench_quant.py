import sys, time, torch
sys.path.insert(0, "src")
from kvscope import _compat
from kvscope.cache import BudgetedCache
from kvscope.runtime import generate
CFG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 576, "intermediate_size": 1536,
       "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
       "max_position_embeddings": 16384, "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
       "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
model = _compat.build_random_model(CFG, torch.bfloat16, "cuda")
ctx = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
new = 96
for batch in (1, 8):
    ids = torch.randint(3, 49152, (batch, ctx), device="cuda")
    for policy, budget in (("full", ctx + new), ("lru", ctx)):
        res = {}
        for dt in ["bf16", "int8", "fp8", "int4", "bf16", "int8", "fp8", "int4"]:
            cache = BudgetedCache(model, policy, budget_tokens=budget, kv_dtype=dt)
            out = generate(model, ids, cache, max_new_tokens=new)
            res.setdefault(dt, []).append(1000 / out.decode_tokens_per_second)
            del cache
            torch.cuda.empty_cache()
        base = min(res["bf16"])
        print(f"B={batch} ctx={ctx} {policy}: " + ", ".join(
            f"{k} {min(v):.2f} ms/step ({100 * (min(v) / base - 1):+.0f}%)" for k, v in res.items()), flush=True)
