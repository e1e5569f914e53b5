"""Start `tp` ranks with torch.distributed's elastic launcher (the machinery behind `torchrun`), in-process.

Every rank runs `fn(ctx, payload)` (a module-level function, so spawned processes can import it) and leaves its result
in a shared temporary directory. A rank that raises writes what it raised there and exits non-zero; the launcher then
stops the other ranks at once (they may be blocked in a collective), so one rank's OOM or error never hangs the group,
and the parent re-raises the first failure, naming its rank: a kvscope error keeps its kind (usage error, does not
fit), anything else is a `RankFailure`.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
import tempfile
import uuid
from pathlib import Path

from kvscope.errors import DoesNotFit, KvscopeError, UsageError, does_not_fit, usage

GLOO_SWITCH = "KVSCOPE_ALLOW_GLOO"  # =1: allow --tp on the CPU with the gloo backend (kvscope's own tests)
DEFAULT_TIMEOUT_S = 600  # a collective that waits longer than this fails (the process group's timeout)


class RankFailure(KvscopeError, RuntimeError):
    """A rank failed with an error that is not a kvscope usage or fit error."""


def check_tp(tp: int, spec, device: str) -> str | None:
    """The backend `tp` ranks run on here ("nccl" on CUDA, "gloo" on the CPU when the test switch is set), or None for
    tp 1. Usage errors, before anything loads: a degree that does not split the attention or KV heads, more ranks
    than GPUs, or the CPU without the test switch."""
    from kvscope.errors import require_positive

    if isinstance(tp, bool) or not isinstance(tp, int):
        raise usage(f"--tp must be a whole number, got {tp!r}", fix="--tp")
    require_positive("--tp", tp, option="--tp")
    if tp == 1 or spec is None:
        return None
    if spec.num_heads % tp:
        divisors = [d for d in range(1, spec.num_heads + 1) if spec.num_heads % d == 0 and spec.num_kv_heads % d == 0]
        raise usage(f"--tp {tp} does not divide the {spec.num_heads} attention heads of {spec.name}",
                    expected=f"one of {', '.join(map(str, divisors))}", fix="--tp")
    if spec.num_kv_heads % tp:
        raise usage(f"--tp {tp} does not split the {spec.num_kv_heads} KV heads of {spec.name} into whole heads: "
                    "transformers' Llama plan shards k_proj and v_proj colwise and does not replicate KV heads "
                    "(with fewer KV heads than ranks its attention cannot run)",
                    expected=f"a divisor of {spec.num_kv_heads} (the planner prices replicated KV heads for engines "
                    "that replicate them: kvscope plan --tp)", fix="--tp")
    import torch

    if device.startswith("cuda"):
        have = torch.cuda.device_count()
        if tp > have:
            raise usage(f"--tp {tp} needs {tp} GPUs, but this machine has {have}", expected=f"--tp {have} or less",
                        fix="--tp")
        if ":" in device:
            raise usage(f"--device {device} names one GPU, but --tp {tp} runs one rank on each of cuda:0 to "
                        f"cuda:{tp - 1}", expected="--device cuda or auto with --tp", fix="--device")
        return "nccl"
    if os.environ.get(GLOO_SWITCH) != "1":
        raise usage(f"--tp {tp} needs {tp} CUDA GPUs (NCCL), and this run is on the CPU"
                    + ("" if torch.cuda.is_available() else " (no CUDA here)")
                    + f": tensor parallel over gloo on the CPU is for kvscope's own tests only ({GLOO_SWITCH}=1)",
                    expected="a machine with CUDA GPUs, or --tp 1", fix="--tp or --device")
    return "gloo"


def launch(fn, payload, tp: int, *, backend: str, timeout_s: int = DEFAULT_TIMEOUT_S) -> list:
    """Run `fn(ctx, payload)` on `tp` ranks; their results in rank order. Raises the first rank's failure."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    quiet = logging.getLogger("torch.distributed.elastic")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # its per-rank failure log: the parent reports the failure itself, in one line
    with tempfile.TemporaryDirectory(prefix="kvscope-tp-") as tmp:
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=tp, run_id=f"kvscope-{uuid.uuid4().hex[:8]}",
                              rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.1,
                              start_method="spawn")
        try:
            elastic_launch(config, _rank_main)(fn, payload, backend, timeout_s, tmp)
        except ChildFailedError:
            raise _first_failure(Path(tmp), tp) from None
        finally:
            quiet.setLevel(level)
        return [_read(Path(tmp) / f"result-{r}.pkl") for r in range(tp)]


def _rank_main(fn, payload, backend: str, timeout_s: int, tmp: str):
    """Inside one rank: join the group, run `fn`, leave the result (or the failure) in `tmp`."""
    from kvscope.distributed import ranks

    rank = int(os.environ.get("RANK", "0"))
    try:
        ctx = ranks.setup(backend, timeout_s)
        result = fn(ctx, payload)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which stops the other ranks
        _write(Path(tmp) / f"failure-{rank}.pkl", _describe(exc))
        if os.environ.get("KVSCOPE_DEBUG"):
            import traceback

            traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # at once: the other ranks may be waiting in a collective for this one
    _write(Path(tmp) / f"result-{rank}.pkl", result)
    ranks.teardown()


def _describe(exc: BaseException) -> dict:
    import torch

    from kvscope.cache.layer import CacheFullError

    kind = ("usage" if isinstance(exc, UsageError) else
            "does_not_fit" if isinstance(exc, (DoesNotFit, CacheFullError, torch.OutOfMemoryError)) else "error")
    text = (exc.cli_text if isinstance(exc, (UsageError, DoesNotFit)) else str(exc) if isinstance(exc, KvscopeError)
            else f"{type(exc).__name__}: {exc}")
    return {"kind": kind, "text": str(text).splitlines()[0] if text else type(exc).__name__,
            "oom": isinstance(exc, torch.OutOfMemoryError)}


def _first_failure(tmp: Path, tp: int) -> KvscopeError:
    records = [(r, _read(tmp / f"failure-{r}.pkl")) for r in range(tp) if (tmp / f"failure-{r}.pkl").exists()]
    if not records:
        return RankFailure(f"a rank of the {tp}-rank group died without reporting why (killed, or out of host "
                           "memory); the others were stopped")
    rank, record = records[0]
    where = f"rank {rank} of {tp}: "
    others = "; the other ranks were stopped"
    if record["kind"] == "usage":
        return usage(where + record["text"])
    if record["kind"] == "does_not_fit":
        if record["oom"]:
            return does_not_fit(where + "out of GPU memory (" + record["text"] + ")" + others,
                                fix="--batch, --context, --budget or --kv-dtype, or a larger --tp")
        return does_not_fit(where + record["text"] + others)
    return RankFailure(where + record["text"] + others)


def _write(path: Path, value) -> None:
    part = path.with_suffix(".part")
    part.write_bytes(pickle.dumps(value))
    part.replace(path)


def _read(path: Path):
    return pickle.loads(path.read_bytes())
