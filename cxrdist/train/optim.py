"""Optimizers (a lookup table) over the trained parameters only, and the lr schedule.

Two parameter groups, the denoiser's (its adapters, or all its weights under train.method=full) and the text
encoder's adapters, each with its own lr and weight decay.
The schedule is stepped once per optimizer step by the trainer (never with the loss).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from cxrdist.config import OptimConfig
from cxrdist.errors import ConfigError
from cxrdist.models.trained import trained_parameters

GROUP_NAMES = ("unet", "text")


def param_groups(model, cfg: OptimConfig) -> list[dict]:
    """Trained parameters of the joint model; the frozen base never reaches the optimizer."""
    groups = [{"name": "unet", "params": trained_parameters(model.unet), "lr": cfg.lr_unet,
               "weight_decay": cfg.weight_decay_unet}]
    text = trained_parameters(model.text_encoder) if model.train_text_encoder else []
    if text:
        groups.append({"name": "text", "params": text, "lr": cfg.lr_text, "weight_decay": cfg.weight_decay_text})
    if not groups[0]["params"]:
        raise ConfigError("nothing of the denoiser trains: attach LoRA or unfreeze it (cxrdist.models.trained) before "
                          "building the optimizer")
    return groups


def _adamw(groups: list[dict], cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def _adamw8bit(groups: list[dict], cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW8bit, after one real 8-bit step on `device`: building the optimizer runs no kernel, so a
    library without a binary for this GPU would otherwise fail at the first training step, after the model loaded."""
    try:
        from cxrdist.env_info import adamw8bit_step

        adamw8bit_step(device)
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(groups, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    except Exception as exc:  # ImportError, or a library that loads but has no kernel for this device
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"optim.name=adamw8bit needs bitsandbytes, which cannot run on {device} here ({reason}): "
                          "`pip install bitsandbytes` (a build for this device), or set optim.name=adamw") from None
    return optimizer


OPTIMIZERS: dict[str, Callable[[list[dict], OptimConfig, torch.device], torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "adamw8bit": _adamw8bit,
}


def build_optimizer(model, cfg: OptimConfig, device: torch.device | str) -> torch.optim.Optimizer:
    """The optimizer over the adapter parameters; `device` is where training runs (the 8-bit one is tried there)."""
    return OPTIMIZERS[cfg.name](param_groups(model, cfg), cfg, torch.device(device))


def _warmup(step: int, warmup: int) -> float:
    return (step + 1) / (warmup + 1) if step < warmup else 1.0


def _progress(step: int, warmup: int, total: int) -> float:
    return min(1.0, (step - warmup) / max(1, total - warmup))


def _cosine_decay(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _stable_then_decay(step: int, warmup: int, total: int, decay: int) -> float:
    """Warm-up, the peak lr held, then a cosine decay to 0 over the last `decay` steps (warmup-stable-decay, as
    transformers' get_wsd_schedule): most of the run learns at the full rate, and the end is still annealed."""
    if step < warmup:
        return _warmup(step, warmup)
    decay_start = total - decay
    return 1.0 if step < decay_start else _cosine_decay(min(1.0, (step - decay_start) / max(1, decay)))


# Multiplier of the base lr after `step` optimizer steps (step 0 = the first update); `decay` is the wsd
# schedule's decay length in steps (the others ignore it).
SCHEDULES: dict[str, Callable[[int, int, int, int], float]] = {
    "constant": lambda step, warmup, total, decay: _warmup(step, warmup),
    "linear": lambda step, warmup, total, decay: (_warmup(step, warmup) if step < warmup
                                                  else 1.0 - _progress(step, warmup, total)),
    "cosine": lambda step, warmup, total, decay: (_warmup(step, warmup) if step < warmup
                                                  else _cosine_decay(_progress(step, warmup, total))),
    "wsd": _stable_then_decay,
}


def decay_steps(cfg: OptimConfig, total_steps: int) -> int:
    """The wsd schedule's decay length: optim.decay_fraction of the steps after warm-up (at least one)."""
    return max(1, round(cfg.decay_fraction * max(0, total_steps - cfg.warmup_steps)))


def lr_multiplier(name: str, step: int, warmup: int, total: int, decay: int = 0) -> float:
    return SCHEDULES[name](step, warmup, total, decay)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int,
                       multiplier: Callable[[int], float] | None = None):
    """LambdaLR over all groups (each keeps its own base lr); `total_steps` counts optimizer steps. `multiplier`
    replaces the step-sized schedule (a time budget's, cxrdist.train.time_budget, which decides its decay while
    training)."""
    if cfg.warmup_steps >= total_steps > 0:
        raise ConfigError(f"optim.warmup_steps={cfg.warmup_steps} is not below the {total_steps} training steps: "
                          "lower it or train longer")
    if multiplier is None:
        decay = decay_steps(cfg, total_steps)

        def multiplier(step: int) -> float:
            return lr_multiplier(cfg.scheduler, step, cfg.warmup_steps, total_steps, decay)
    # a plain function: LambdaLR's state_dict keeps no copy of it, and a resume rebuilds it from the config
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: multiplier(step))
