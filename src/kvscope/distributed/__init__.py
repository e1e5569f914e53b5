"""Past one GPU: tensor parallel on torch.distributed with transformers' own tensor-parallel plan.

`check_tp` validates a degree against the model and the machine before anything starts; `launch` starts the ranks
through torch.distributed's elastic launcher (what `torchrun` runs), in-process, and brings every rank's result or
failure back; `ranks` holds what runs inside a rank (the process group, the sharded model, kvscope's jobs).
"""

from kvscope.distributed.launch import RankFailure, check_tp, launch
from kvscope.distributed.merge import merge_ranks

__all__ = ["RankFailure", "check_tp", "launch", "merge_ranks"]
