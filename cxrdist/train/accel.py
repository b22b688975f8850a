"""The one place an `Accelerator` is built for training: DDP, DeepSpeed ZeRO-2/3, one process, GPU or CPU.

CPU facts this encodes (cxrdist.train.distributed has the DeepSpeed ones): `accelerate launch --cpu --num_processes 2` starts
one process; `--multi_gpu --num_processes 2` with `Accelerator(cpu=True)` gives two gloo ranks; but under a
DeepSpeed launch `cpu=True` silently drops the DeepSpeed plugin (the run becomes plain DDP), so the flag comes
from `distributed.wants_cpu_flag()`, and the gloo backend from `distributed.process_group_backend()` (a backend named in
a process that was not launched makes accelerate wait for a process group that never starts).
"""
from __future__ import annotations

import logging
import os
from datetime import timedelta
from pathlib import Path

import torch

from cxrdist.config import Config
from cxrdist.train import deepspeed_ops, distributed
from cxrdist.train.devices import check_training_device
from cxrdist.train.tracking import log_with

log = logging.getLogger(__name__)


def build_accelerator(cfg: Config, project_dir: str | Path):
    """Accelerator for one training run: mixed precision, accumulation, the trackers of `train.report_to`
    (TensorBoard under `project_dir` by default; a chosen tracker whose package is missing is a ConfigError here,
    before any model loads).

    Checkpoint folders are named and rotated by `cxrdist.train.checkpoint` (by optimizer step, complete
    ones only), not by accelerate's automatic naming, so no `total_limit` is set here. Under DeepSpeed the
    batch, accumulation and clipping of our config are written into the DeepSpeed config (and an optimizer
    that offload would silently replace is refused) before anything is prepared.
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    check_training_device()  # a GPU launch without a usable GPU stops here, before anything heavy
    distributed.refuse_fsdp()
    trackers = log_with(cfg.train.report_to, project_dir)
    check_precision_supported(cfg.train.mixed_precision)
    if cfg.train.deterministic:
        make_deterministic()
    # The timeout reaches torch.distributed and deepspeed.comm alike, and the groups DeepSpeed creates later:
    # a rank waiting on a dead or silent peer fails after this long instead of hanging.
    distributed.default_collective_timeout(cfg.train.collective_timeout_s)
    pg_kwargs = InitProcessGroupKwargs(backend=distributed.process_group_backend(),
                                       timeout=timedelta(seconds=cfg.train.collective_timeout_s))
    project = ProjectConfiguration(project_dir=str(project_dir), logging_dir=str(project_dir))
    # DeepSpeed on the CPU would JIT-build, in every rank, a comm op training never uses (cxrdist.train.deepspeed_ops).
    deepspeed_ops.skip_shm_comm_op()
    accelerator = Accelerator(
        cpu=distributed.wants_cpu_flag(),
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum,
        log_with=trackers,
        project_config=project,
        kwargs_handlers=[pg_kwargs],
        # The trainer steps the lr schedule once per optimizer step itself; accelerate's default would step
        # it num_processes times per call.
        step_scheduler_with_optimizer=False,
    )
    _end_process_group_at_exit()
    distributed.check_deepspeed_kept(accelerator)
    distributed.configure_deepspeed(accelerator, cfg.train.batch_size, cfg.train.grad_accum, cfg.optim.max_grad_norm,
                              cfg.optim.name)
    if torch.cuda.is_available():
        # TF32 matmuls on Ampere+ (no effect elsewhere); fp32 accuracy is not needed for LoRA updates.
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.allow_tf32
        torch.backends.cudnn.allow_tf32 = cfg.train.allow_tf32
    return accelerator


def make_deterministic() -> None:
    """Deterministic kernels everywhere (raising for an op that has none), so GPU runs repeat bit for bit.

    cuBLAS needs a fixed workspace for that, read when its first handle is made: this runs before the Accelerator
    and any model exist. TF32 stays as configured: it is deterministic, only less exact.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def check_precision_supported(mixed_precision: str) -> None:
    """Refuse fp16 without CUDA, before any model loads.

    On CPU accelerate builds neither fp16 autocast nor a GradScaler (it silently trains with fp16 weights and
    no loss scaling), and DeepSpeed's CPU backend has no fp16 either; bf16 autocast does run on CPU.
    """
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        from cxrdist.errors import ConfigError

        raise ConfigError("train.mixed_precision=fp16 needs a CUDA GPU (on CPU neither accelerate nor DeepSpeed "
                          "runs fp16 with loss scaling): use train.mixed_precision=bf16 or no")


_EXIT_HOOK: list = []


def _end_process_group_at_exit() -> None:
    """Destroy the process group when the process ends, on every rank, whatever ended it.

    DeepSpeed-on-CPU processes that exit with the group alive abort at interpreter shutdown about one time
    in five (SIGABRT after all work was done, and the launcher reports the run as failed). A finished
    trainer's close() ends training (`end_training()` destroys the group); this covers every other way out:
    an error while the trainer is built (a refused DeepSpeed config, bad data) or during training.
    """
    if _EXIT_HOOK:
        return
    import atexit

    def _destroy() -> None:
        from accelerate.state import PartialState

        PartialState().destroy_process_group()

    atexit.register(_destroy)
    _EXIT_HOOK.append(_destroy)


def describe(accelerator) -> str:
    """'DDP', 'DeepSpeed ZeRO-2', ... for the start-up log line."""
    stage = distributed.zero_stage(accelerator)
    if distributed.deepspeed_plugin(accelerator) is not None:
        return f"DeepSpeed ZeRO-{stage}"
    return "DDP" if accelerator.num_processes > 1 else "one process"


def weight_dtype(accelerator) -> torch.dtype:
    """dtype for the frozen base weights: half precision under fp16/bf16 autocast, fp32 otherwise."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(str(accelerator.mixed_precision), torch.float32)
