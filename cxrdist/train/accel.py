"""The one place an `Accelerator` is built for training (the scale-out work extends this module).

CPU facts this encodes (see DESIGN.md): `accelerate launch --cpu --num_processes 2` starts one process;
`--multi_gpu --num_processes 2` with `Accelerator(cpu=True)` gives two gloo ranks. So the accelerator is
always built with `cpu=not torch.cuda.is_available()` and a gloo process group on CPU.
"""
from __future__ import annotations

import logging
import os
from datetime import timedelta
from pathlib import Path

import torch

from cxrdist.config import Config

log = logging.getLogger(__name__)


def build_accelerator(cfg: Config, project_dir: str | Path):
    """Accelerator for one training run: mixed precision, accumulation, TensorBoard under `project_dir`.

    Checkpoint folders are named and rotated by `cxrdist.train.checkpoint` (by optimizer step, complete
    ones only), not by accelerate's automatic naming, so no `total_limit` is set here.
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    on_cpu = not torch.cuda.is_available()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    # gloo on CPU (DeepSpeed on CPU needs it named); a backend given to a single process would make
    # accelerate expect a process group that was never started.
    pg_kwargs = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.collective_timeout_s),
                                       **({"backend": "gloo"} if on_cpu and distributed else {}))
    project = ProjectConfiguration(project_dir=str(project_dir), logging_dir=str(project_dir))
    accelerator = Accelerator(
        cpu=on_cpu,
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum,
        log_with="tensorboard",
        project_config=project,
        kwargs_handlers=[pg_kwargs],
        # The trainer steps the lr schedule once per optimizer step itself; accelerate's default would step
        # it num_processes times per call.
        step_scheduler_with_optimizer=False,
    )
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        # WebDataset loaders are not prepared by accelerate, so DeepSpeed cannot infer the micro batch.
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
    if torch.cuda.is_available():
        # TF32 matmuls on Ampere+ (no effect elsewhere); fp32 accuracy is not needed for LoRA updates.
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.allow_tf32
        torch.backends.cudnn.allow_tf32 = cfg.train.allow_tf32
    return accelerator


def weight_dtype(accelerator) -> torch.dtype:
    """dtype for the frozen base weights: half precision under fp16/bf16 autocast, fp32 otherwise."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(str(accelerator.mixed_precision), torch.float32)
