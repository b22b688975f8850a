"""DeepSpeed's compiled ops that a training rank must not build: the CPU shared-memory all-reduce.

Under DS_ACCELERATOR=cpu every rank's `deepspeed.comm` start (TorchBackend.__init__) JIT-builds and loads the
`deepspeed_shm_comm` op with torch.utils.cpp_extension, in the folder every job of the user shares
(~/.cache/torch_extensions/py311_cpu/deepspeed_shm_comm, or TORCH_EXTENSIONS_DIR). Training never uses it:
its all-reduce serves `inference_all_reduce` (DeepSpeed inference's tensor parallelism) only, and is set up
only when LOCAL_SIZE equals the world size, which `accelerate launch` never sets. Building it in the ranks
costs ~30 s on a cold cache and ties every launch to that shared folder:
- torch's build lock is a plain file (FileBaton); a builder killed while holding it (SIGTERM from torchrun
  when a peer rank fails, SIGKILL from a job limit or the OOM killer) leaves it behind, and every later rank
  of every job then waits in `FileBaton.wait()` forever, silently;
- a job whose build.ninja differs (another checkout or virtualenv) rebuilds the op over the other's, and the
  ranks of every job wait behind each rebuild in turn (launches measured at 25-68 s instead of 5 s).
So ranks skip the op before DeepSpeed starts its communication backend; DeepSpeed then reduces with
torch.distributed (its own fallback when the op is absent), which is what training used anyway.
"""
from __future__ import annotations

import logging

from cxrdist.train import distributed

log = logging.getLogger(__name__)

SHM_COMM_BUILDER = "ShareMemCommBuilder"


def skip_shm_comm_op() -> bool:
    """Keep DeepSpeed from building and loading its shared-memory all-reduce op in this process.

    Call in every rank before the Accelerator is built (`deepspeed.comm` starts inside it). Acts only in a
    DeepSpeed launch whose accelerator has the op (the CPU one; CUDA has none); True when it took effect.

    The switch is DeepSpeed's own: `build_shm_op()` returns None for an op marked incompatible in
    `deepspeed.ops.__compatible_ops__` (a per-process dict DeepSpeed probes once and keeps), and
    `inference_all_reduce` then falls back to torch.distributed.all_reduce.
    """
    if not distributed.launched_with_deepspeed():
        return False
    try:
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator
    except ImportError:
        return False
    builder = get_accelerator().create_op_builder(SHM_COMM_BUILDER)
    if builder is None:
        return False
    deepspeed.ops.__compatible_ops__[builder.NAME] = False
    log.debug("DeepSpeed's %s op is not built: training reduces through torch.distributed", builder.NAME)
    return True
