"""The two totals of a GPU the engines read: what CUDA reports (`torch.cuda.mem_get_info()`, which vLLM multiplies by
--gpu-memory-utilization and SGLang profiles free memory against) and what nvidia-smi reports (the MiB SGLang picks
its defaults from). They differ by the memory the driver keeps for itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvscope.planner.gpus import GPU
from kvscope.planner.plan import capacity_of

MIB = 1024**2
GIB = 1024**3

# CUDA's total, where it was seen: (bytes, source).
TORCH_TOTAL = {
    "H100-80GB": (85_017_493_504, "measured on this project's H100 80GB HBM3 (planner/gpus.py)"),
    "H200": (150_109_880_320, "measured on this project's H200 (shared FACTS.md, 2026-12-01)"),
    "A100-40GB": (round(39.39 * GIB), "'39.39 GiB total capacity' in PyTorch OOM messages on A100-SXM4-40GB"),
}
# nvidia-smi's total where the catalogue holds CUDA's instead.
SMI_MIB = {"H100-80GB": 81_559}  # 'NVIDIA H100 80GB HBM3 ... 0MiB / 81559MiB' (nvidia-smi)
# Where only nvidia-smi's total is known, CUDA's is estimated this much lower: the H100, H200 and A100-40GB above
# differ by 480, 615 and 625 MiB.
DRIVER_RESERVE_MIB = 560


@dataclass(frozen=True)
class Device:
    name: str
    torch_total_bytes: int
    smi_total_mib: float
    source: str
    estimated: bool  # torch_total_bytes derived from nvidia-smi's figure, not seen

    @property
    def is_a100(self) -> bool:
        return "a100" in self.name.lower()

    def to_dict(self) -> dict:
        return {"name": self.name, "torch_total_bytes": self.torch_total_bytes, "smi_total_mib": self.smi_total_mib,
                "source": self.source, "estimated": self.estimated}


def from_catalogue(g: GPU) -> Device:
    if g.name in TORCH_TOTAL:
        total, source = TORCH_TOTAL[g.name]
        smi = SMI_MIB.get(g.name, g.memory_bytes / MIB)
        return Device(g.name, total, smi, source, False)
    smi = g.memory_bytes / MIB
    return Device(g.name, g.memory_bytes - DRIVER_RESERVE_MIB * MIB, smi,
                  f"nvidia-smi total {smi:,.0f} MiB less an estimated {DRIVER_RESERVE_MIB} MiB driver reserve", True)


def device(gpu: str | None = None, gpu_memory: str | int | None = None) -> Device:
    """A catalogue GPU (--gpu) or an explicit size (--gpu-memory, taken as CUDA's total)."""
    label, size = capacity_of(gpu, gpu_memory)
    if gpu_memory is not None:
        return Device(label, size, size / MIB, "--gpu-memory, taken as CUDA's total", False)
    from kvscope.planner.gpus import gpu as lookup

    return from_catalogue(lookup(label))
