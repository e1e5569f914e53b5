"""A catalogue of GPUs: memory that PyTorch sees, and memory bandwidth for speed ceilings.

`memory_bytes` is the total a process can see (`torch.cuda.get_device_properties(0).total_memory`). The H100 and H200
values were measured on this project's GPU machines; the others are the totals `nvidia-smi` lists for each card
(MiB), which can run a few hundred MiB above what torch reports. `source` says which.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvscope.errors import usage

MIB = 1024**2


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: int
    bandwidth_gbs: float  # peak memory bandwidth, GB/s (datasheet)
    source: str
    aliases: tuple[str, ...] = ()


GPUS: dict[str, GPU] = {
    g.name: g
    for g in [
        GPU("H100-80GB", 85_017_493_504, 3350, "measured: torch total_memory on an H100 80GB HBM3 (2026-11-22)",
            ("h100", "h100-sxm", "h100-80g")),
        GPU("H200", 150_109_880_320, 4800, "measured: torch total_memory on this workplace's H200 (2026-12-01; "
            "nvidia-smi lists 143771 MiB)", ("h200-141gb",)),
        GPU("A100-80GB", 81_920 * MIB, 2039, "nvidia-smi total, 81920 MiB (A100-SXM4-80GB)", ("a100-80g",)),
        GPU("A100-40GB", 40_960 * MIB, 1555, "nvidia-smi total, 40960 MiB (A100-SXM4-40GB)", ("a100", "a100-40g")),
        GPU("L40S", 46_068 * MIB, 864, "nvidia-smi total, 46068 MiB", ("l40s-48gb",)),
        GPU("L4", 23_034 * MIB, 300, "nvidia-smi total, 23034 MiB", ("l4-24gb",)),
        GPU("A10G", 23_028 * MIB, 600, "nvidia-smi total, 23028 MiB", ("a10g-24gb",)),
        GPU("RTX-4090", 24_564 * MIB, 1008, "nvidia-smi total, 24564 MiB", ("4090", "rtx4090")),
        GPU("RTX-3090", 24_576 * MIB, 936, "nvidia-smi total, 24576 MiB", ("3090", "rtx3090")),
        GPU("T4", 15_360 * MIB, 320, "nvidia-smi total, 15360 MiB", ("t4-16gb",)),
    ]
}


def gpu(name: str) -> GPU:
    """Look a GPU up by name or alias, case-insensitively; a `UsageError` lists the known ones."""
    key = name.strip().lower().replace(" ", "-").replace("_", "-")
    for g in GPUS.values():
        if key == g.name.lower() or key in g.aliases:
            return g
    raise usage(f"unknown GPU {name!r}", expected="one of " + ", ".join(GPUS) + " (or --gpu-memory SIZE)",
                fix="--gpu")


def by_memory() -> list[GPU]:
    return sorted(GPUS.values(), key=lambda g: g.memory_bytes)
