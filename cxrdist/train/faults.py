"""Fault injection for the multi-process tests, and the only place production code reads it.

The tests launch real ranks with `accelerate launch`, so there is no in-process seam to patch: a rank learns
its fault from the environment. Nothing here acts unless one of these variables is set.

    CXRDIST_FAULT_KILL_AT_STEP=N           the process signals itself right after optimizer step N
    CXRDIST_FAULT_SIGNAL=SIGSTOP           ... with this signal (SIGKILL by default; SIGSTOP makes a silent rank,
                                           SIGTERM / SIGUSR1 a preemption)
    CXRDIST_FAULT_SIGNAL_TARGET=launcher   ... signals its parent process instead: the `accelerate launch` that
                                           started it, as a scheduler signals a job's launcher
    CXRDIST_FAULT_SIGNAL_TARGET=PID        ... signals that process (a batch script, as SLURM's --signal=B: does)
    CXRDIST_FAULT_INF_LOSS_AT_MICRO_STEP=M the loss of micro-step M becomes inf (as an fp16 overflow or a
                                           diverged run would make it)
    CXRDIST_FAULT_KILL_RANK=R              only rank R is affected (every rank when unset)
    CXRDIST_FAULT_SECONDS_PER_STEP=S       train.time_budget's clock reads S seconds per optimizer step taken, so
                                           where the decay starts does not depend on the machine's speed
"""
from __future__ import annotations

import os
import signal
from typing import Callable, Optional

import torch

KILL_ENV = "CXRDIST_FAULT_KILL_AT_STEP"
KILL_SIGNAL_ENV = "CXRDIST_FAULT_SIGNAL"
SIGNAL_TARGET_ENV = "CXRDIST_FAULT_SIGNAL_TARGET"
INF_LOSS_ENV = "CXRDIST_FAULT_INF_LOSS_AT_MICRO_STEP"
RANK_ENV = "CXRDIST_FAULT_KILL_RANK"
STEP_SECONDS_ENV = "CXRDIST_FAULT_SECONDS_PER_STEP"


def _this_rank(rank: int) -> bool:
    return os.environ.get(RANK_ENV, str(rank)) == str(rank)


def maybe_inf_loss(loss: torch.Tensor, micro_step: int, rank: int) -> torch.Tensor:
    if os.environ.get(INF_LOSS_ENV) == str(micro_step) and _this_rank(rank):
        return loss * float("inf")
    return loss


def maybe_die_after_step(step: int, rank: int) -> None:
    if os.environ.get(KILL_ENV) == str(step) and _this_rank(rank):
        target = os.environ.get(SIGNAL_TARGET_ENV, "")
        pid = os.getppid() if target == "launcher" else int(target) if target.isdigit() else os.getpid()
        os.kill(pid, getattr(signal, os.environ.get(KILL_SIGNAL_ENV, "SIGKILL")))


def budget_clock(steps_taken: Callable[[], int]) -> Optional[Callable[[], float]]:
    """A clock for train.time_budget that advances a fixed time per optimizer step; None when not asked for."""
    seconds = os.environ.get(STEP_SECONDS_ENV)
    if not seconds:
        return None
    per_step = float(seconds)
    return lambda: per_step * steps_taken()
