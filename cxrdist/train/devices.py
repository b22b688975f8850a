"""Refuse a GPU launch that would quietly train on the CPU.

A CPU-only torch wheel on a GPU machine, a driver too old for the wheel, or a CUDA_VISIBLE_DEVICES that hides every
GPU leave torch with no CUDA device, and accelerate then trains the whole run on the CPU without a word (an
860M-parameter UNet at a few images per minute). Before anything heavy happens, a process with no usable CUDA device
may train only where the CPU was asked for:
- ACCELERATE_USE_CPU set true (`--cpu`, `use_cpu: true` under the one-process launcher, or by hand);
- CUDA_VISIBLE_DEVICES naming no device ("" or "-1"; configs/accelerate/cpu_2ranks.yaml sets `gpu_ids: -1,-1`,
  because accelerate's multi-process launcher passes `use_cpu` on to nobody);
- DS_ACCELERATOR=cpu for a DeepSpeed launch (DeepSpeed's own switch);
and otherwise only as one plain process on a machine with no NVIDIA GPU (`python launch/train.py` on a laptop).
Several ranks, a DeepSpeed launch, CUDA_VISIBLE_DEVICES naming GPUs, or GPUs the NVIDIA driver lists all ask for a
GPU, and are refused in one line naming the cause.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

from cxrdist.env_info import cuda_unusable_reason, driver_gpu_count, visible_devices_hidden
from cxrdist.errors import ConfigError
from cxrdist.train.distributed import cpu_forced, launched_with_deepspeed

CUDA_INSTALL = 'TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" make install'


def cpu_asked_for(env: Mapping[str, str] = os.environ) -> Optional[str]:
    """What says this process is meant to train on the CPU, or None."""
    if launched_with_deepspeed(env):
        return "DS_ACCELERATOR=cpu" if env.get("DS_ACCELERATOR", "").lower() == "cpu" else None
    if cpu_forced(env):
        return "ACCELERATE_USE_CPU"
    if visible_devices_hidden(env.get("CUDA_VISIBLE_DEVICES")):
        return "CUDA_VISIBLE_DEVICES"
    return None


def gpu_asked_for(env: Mapping[str, str] = os.environ) -> Optional[str]:
    """What says this process is meant to train on a GPU, or None."""
    if launched_with_deepspeed(env):
        return "a DeepSpeed launch without DS_ACCELERATOR=cpu"
    if int(env.get("WORLD_SIZE", "1")) > 1:
        return f"a launch of {env['WORLD_SIZE']} ranks (e.g. configs/accelerate/multi_gpu.yaml)"
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and not visible_devices_hidden(visible):
        return f"CUDA_VISIBLE_DEVICES={visible}"
    listed = driver_gpu_count()
    if listed:
        return f"the {listed} NVIDIA GPU(s) in this machine"
    return None


def check_training_device(env: Mapping[str, str] = os.environ) -> None:
    """Raise ConfigError when this process would train on the CPU although its launch asks for a GPU."""
    import torch

    if torch.cuda.is_available() or cpu_asked_for(env):
        return
    wanted = gpu_asked_for(env)
    if wanted is None:
        return
    reason = cuda_unusable_reason()
    fix = (f"install a CUDA build ({CUDA_INSTALL})" if torch.version.cuda is None else
           "check `nvidia-smi` and CUDA_VISIBLE_DEVICES")
    on_cpu = ("DS_ACCELERATOR=cpu" if launched_with_deepspeed(env) else
              "configs/accelerate/cpu_2ranks.yaml, or ACCELERATE_USE_CPU=1")
    raise ConfigError(f"this run asks for a GPU ({wanted}), but {reason}: {fix}; to train on the CPU on purpose, "
                      f"use {on_cpu}")
