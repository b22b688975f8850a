"""The optimizer step at the end of an accumulation window: clip, step, schedule, and whether the step happened.

Three things can skip a step, and each says so in the outcome:
- DeepSpeed's engine skips a step whose fp16 gradients overflowed (it lowers its loss scale);
- accelerate's GradScaler (fp16 without DeepSpeed) does the same;
- with neither (fp32, bf16 autocast), nothing below us would notice inf/NaN gradients, so the policy checks the
  gradient norm itself -- reduced over the ranks, so every rank takes the same decision.
A skipped step does not move the learning-rate schedule: the schedule counts steps that happened.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

from cxrdist.train import distributed
from cxrdist.train.accel import describe
from cxrdist.train.ranks import all_ranks

log = logging.getLogger(__name__)

OVERFLOW_DEEPSPEED = "inf/NaN gradients (DeepSpeed's overflow check)"
OVERFLOW_SCALER = "inf/NaN gradients (the fp16 gradient scaler's check)"
NONFINITE_NORM = "inf/NaN gradients (their norm)"


@dataclass
class StepOutcome:
    """What the last micro-batch's optimizer call did."""

    synced: bool  # an accumulation window ended: a step was due
    stepped: bool  # ... and the optimizer really stepped
    grad_norm: float  # the pre-clip global gradient norm of a due step (NaN otherwise or when unknown)
    skipped_because: str = ""  # why a due step did not happen


class OptimizerStep:
    """Called after each micro-batch's backward, inside `accelerator.accumulate`: a no-op for the optimizer until
    the window ends (accelerate's optimizer wrapper steps only then); at the window's end clips to
    `max_grad_norm` (0 = measure only), steps unless a policy above skips, and schedules."""

    def __init__(self, accelerator, model, optimizer, lr_scheduler, max_grad_norm: float):
        self.accelerator, self.model = accelerator, model
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.max_grad_norm = max_grad_norm
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.step_lrs = lr_scheduler.get_last_lr()  # the rates the latest step used (lr/* logs them at that step)
        self._warned_missing_norm = False

    @property
    def deepspeed(self) -> bool:
        return distributed.deepspeed_plugin(self.accelerator) is not None

    @property
    def skips_overflow_itself(self) -> bool:
        """True when something below us skips overflowing steps (DeepSpeed's engine, accelerate's GradScaler)."""
        return self.deepspeed or self.accelerator.scaler is not None

    @all_ranks
    def __call__(self) -> StepOutcome:
        acc = self.accelerator
        grad_norm, why = None, ""
        if acc.sync_gradients:
            # Under DeepSpeed the engine already clipped inside backward() (at optim.max_grad_norm, written into its
            # config); this call then only reports the engine's pre-clip global norm.
            grad_norm = acc.clip_grad_norm_(self.params, self.max_grad_norm or float("inf"))
            if grad_norm is None:
                grad_norm = self._engine_grad_norm()
            if not self.skips_overflow_itself and not _finite(grad_norm):
                why = NONFINITE_NORM
        if not why:
            self.optimizer.step()
        if acc.sync_gradients and not why and acc.optimizer_step_was_skipped:
            why = OVERFLOW_DEEPSPEED if self.deepspeed else OVERFLOW_SCALER
        if acc.sync_gradients and not why:
            self.step_lrs = self.lr_scheduler.get_last_lr()  # before the schedule moves on to the next step
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutcome(synced=acc.sync_gradients, stepped=acc.sync_gradients and not why,
                           grad_norm=float(grad_norm) if grad_norm is not None else float("nan"), skipped_because=why)

    def loss_scale(self) -> Optional[float]:
        """The fp16 loss scale (accelerate's GradScaler or DeepSpeed's dynamic scale); None without one."""
        if self.accelerator.scaler is not None:
            return float(self.accelerator.scaler.get_scale())
        engine_fp16 = getattr(self.model, "fp16_enabled", None)
        if callable(engine_fp16) and engine_fp16():
            return float(self.model.optimizer.loss_scale)
        return None

    def _engine_grad_norm(self):
        """DeepSpeed's global gradient norm of the step just taken; None (logged once) when it has none."""
        getter = getattr(self.model, "get_global_grad_norm", None)
        norm = getter() if getter is not None else None
        if norm is None and not self._warned_missing_norm:
            log.warning("the gradient norm is not available from %s: train/grad_norm is logged as NaN",
                        describe(self.accelerator))
            self._warned_missing_norm = True
        return norm


def _finite(value) -> bool:
    return value is not None and math.isfinite(float(value))
