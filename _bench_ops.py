import sys
import time

import torch

sys.path.insert(0, "src")
from kvscope.cache.store import make_store  # noqa: E402


def bench(fn, n=300):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


x = torch.zeros(8, device="cuda")
print(f"eager add_: {bench(lambda: x.add_(1)):.1f} us")
print(f"eager getitem 3d: {bench(lambda: x[None, None][:, :, 2:5]):.1f} us")
try:
    import triton
    import triton.language as tl

    @triton.jit
    def _k(p, n, B: tl.constexpr):
        o = tl.arange(0, B)
        tl.store(p + o, tl.load(p + o, mask=o < n) + 1, mask=o < n)

    print(f"triton launch: {bench(lambda: _k[(1,)](x, 8, B=8)):.1f} us", triton.__version__)
except Exception as e:
    print("triton", e)
B, H, S, D = 1, 3, 8704, 64
for name in ["bf16", "int8", "fp8", "int4"]:
    st = make_store(name, B, H, S, D, torch.bfloat16, "cuda")
    k = torch.randn(B, H, 8192, D, device="cuda", dtype=torch.bfloat16)
    st.write_range(0, k, k)
    k1 = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16)
    pos = [8192]

    def step():
        st.write_range(pos[0] % 8704, k1, k1)
        pos[0] = 8192 + (pos[0] + 1) % 500
        return st.read(8704, torch.bfloat16)
    w = bench(lambda: st.write_range(8200, k1, k1))
    r = bench(lambda: st.read(8704, torch.bfloat16))
    print(f"{name}: write_range(1) {w:.1f} us, read(8704) {r:.1f} us, step {bench(step):.1f} us")
