"""Training to a wall-clock budget (`train.time_budget`) with the warm-up / stable / decay schedule.

A schedule sized in steps either stops before its decay or leaves a job's allocation unused when the host is
slower or faster than planned. With a budget the run measures its own pace (seconds per optimizer step, the
periodic validations and checkpoints included), holds the peak lr while time allows, and starts the decay at
the step where the steps it can still afford equal the decay's share of the run (`optim.decay_fraction`): the
decay ends at the budget, less a reserve for what follows the last step (final checkpoint, validation and the
test split, measured when they first run). `train.max_steps` (or the epochs) stays an upper bound.

The decision is taken once, on the main process, from its clock, and shared with every rank (`share`), so all
ranks follow one schedule. It is part of the trainer state: a resumed run keeps the budget it has left and a
decay already begun.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from cxrdist.fileio import write_json_atomic
from cxrdist.train.ranks import all_ranks

log = logging.getLogger(__name__)

MIN_PACE_STEPS = 5  # steps measured before the pace is trusted (the first ones include compile and caching)
DEFAULT_RESERVE_FRACTION = 0.05  # the reserve before the end-of-run work has been timed once
RESERVE_MARGIN = 1.25  # measured end-of-run work can vary: keep a quarter more than it took

@dataclass
class DecayDecision:
    """When the decay began and why: written to the run folder and TensorBoard."""
    step: int  # optimizer steps done when the decay began (its first step)
    decay_steps: int  # its length; the run ends at step + decay_steps
    elapsed_s: float  # budget used by then
    seconds_per_step: float
    reserve_s: float
    reason: str

    @property
    def end_step(self) -> int:
        return self.step + self.decay_steps


class TimeBudget:
    """The budget's bookkeeping. `decide(step)` is called after every optimizer step on the main process;
    `multiplier(step)` is the lr schedule (warm-up, peak, cosine decay to 0) that every rank follows."""

    def __init__(self, budget_s: float, *, warmup: int, decay_fraction: float, max_steps: int,
                 clock: Callable[[], float] = time.monotonic):
        if budget_s <= 0:
            raise ValueError("a time budget must be positive")
        self.budget_s, self.warmup, self.decay_fraction, self.max_steps = budget_s, warmup, decay_fraction, max_steps
        self.clock = clock
        self.used_before_s = 0.0  # budget spent by earlier starts of this run (resume)
        self.started_at: Optional[float] = None
        self.pace_from: Optional[tuple[int, float]] = None  # (step, time) the pace is measured from
        self.end_work_s: Optional[float] = None  # measured cost of the end-of-run work
        self.decision: Optional[DecayDecision] = None
        self._last_work_s = {"validation": 0.0, "checkpoint": 0.0}  # as last timed (`timed`)

    # ---- the clock -------------------------------------------------------------------------------------------
    def start(self, step: int) -> None:
        """Training (re)starts at `step`: the budget counts from here (plus what earlier starts used)."""
        self.started_at = self.clock()
        self.pace_from = None
        self._first_step = step

    def elapsed_s(self) -> float:
        return self.used_before_s + (0.0 if self.started_at is None else self.clock() - self.started_at)

    def note_end_work(self, seconds: float) -> None:
        """The duration of a validation plus checkpoint, as the last step will also need (the largest seen)."""
        self.end_work_s = max(seconds, self.end_work_s or 0.0)

    @contextlib.contextmanager
    def timed(self, work: str) -> Iterator[None]:
        """Time a periodic `validation` or `checkpoint`: once both were timed, what follows the last step (a
        validation, the test split, about as long, and a checkpoint) is known, and the reserve follows it."""
        started = self.clock()
        yield
        self._last_work_s[work] = self.clock() - started
        if all(self._last_work_s.values()):
            self.note_end_work(2 * self._last_work_s["validation"] + self._last_work_s["checkpoint"])

    def reserve_s(self) -> float:
        if self.end_work_s is None:
            return DEFAULT_RESERVE_FRACTION * self.budget_s
        return RESERVE_MARGIN * self.end_work_s

    # ---- the decision ----------------------------------------------------------------------------------------
    def step_based_decay_start(self) -> int:
        """Where the decay starts when the budget allows every step up to max_steps (the plain wsd schedule)."""
        decay = max(1, round(self.decay_fraction * max(0, self.max_steps - self.warmup)))
        return self.max_steps - decay

    def decide(self, step: int) -> Optional[DecayDecision]:
        """The decay decision once it is due after `step` optimizer steps (None before, and after it was taken)."""
        if self.decision is not None or self.started_at is None or step < self.warmup:
            return None
        if step >= self.step_based_decay_start():
            return None  # the step limit comes first: the plain schedule already decays
        now = self.clock()
        if self.pace_from is None:
            self.pace_from = (step, now)  # the pace counts from the first step seen after (re)starting
            return None
        measured = step - self.pace_from[0]
        if measured < MIN_PACE_STEPS:
            return None
        pace = (now - self.pace_from[1]) / measured
        reserve = self.reserve_s()
        remaining = self.budget_s - self.elapsed_s() - reserve
        affordable = max(0, math.floor(remaining / pace)) if pace > 0 else self.max_steps
        affordable = min(affordable, self.max_steps - step)
        # the decay's share of the whole run: affordable = f * (step + affordable - warmup)
        due = affordable * (1.0 - self.decay_fraction) <= self.decay_fraction * (step - self.warmup)
        if not due and affordable > 1:
            return None
        self.decision = DecayDecision(
            step=step, decay_steps=max(1, affordable), elapsed_s=round(self.elapsed_s(), 3),
            seconds_per_step=round(pace, 6), reserve_s=round(reserve, 3),
            reason=(f"{affordable} more steps fit in the {self.budget_s / 60:.1f}-minute budget at "
                    f"{pace:.3f} s/step after keeping {reserve:.0f} s for the end of the run: the last "
                    f"{self.decay_fraction:.0%} of the run decays"))
        return self.decision

    def adopt(self, decision: Optional[DecayDecision]) -> None:
        """Follow the main process's decision (every rank, after `share`)."""
        if decision is not None and self.decision is None:
            self.decision = decision

    @all_ranks
    def follow_all_ranks(self, accelerator, step: int) -> Optional[DecayDecision]:
        """Every rank, after each optimizer step: the main process decides from its clock whether the decay starts
        now, and every rank adopts that decision (one broadcast), so all end at the same step. Returns the
        decision when it was taken at this step."""
        decision = self.decide(step) if accelerator.is_main_process else None
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast

            decision = share(decision, broadcast)
        self.adopt(decision)
        return decision

    def record(self, decision: DecayDecision, logger, run_dir: Path) -> None:
        """When and why the decay began: the log, TensorBoard (`logger`) and <run>/time_budget.json (main process)."""
        log.info("time budget: the lr decay begins after step %d and the run ends at step %d: %s", decision.step,
                 decision.end_step, decision.reason)
        logger.scalars({"train/decay_start_step": decision.step, "train/planned_steps": decision.end_step},
                       decision.step)
        logger.text("train/time_budget", decision.reason, decision.step)
        write_json_atomic(Path(run_dir) / "time_budget.json", {
            "budget_s": self.budget_s, "max_steps": self.max_steps, **asdict(decision), "end_step": decision.end_step})

    def total_steps(self) -> int:
        return self.decision.end_step if self.decision is not None else self.max_steps

    # ---- the schedule ----------------------------------------------------------------------------------------
    def multiplier(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.decision is not None:
            start, length = self.decision.step, self.decision.decay_steps
        else:
            start = self.step_based_decay_start()
            length = self.max_steps - start
        if step < start:
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - start) / max(1, length))))

    # ---- resume ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"budget_s": self.budget_s, "used_s": round(self.elapsed_s(), 3), "end_work_s": self.end_work_s,
                "decision": asdict(self.decision) if self.decision is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.used_before_s = float(state.get("used_s", 0.0))
        self.end_work_s = state.get("end_work_s")
        decision = state.get("decision")
        self.decision = DecayDecision(**decision) if decision else None


def share(decision: Optional[DecayDecision], broadcast: Callable[[Any], Any]) -> Optional[DecayDecision]:
    """The main process's decision on every rank: (step, decay_steps) as one small tensor through `broadcast`
    (accelerate.utils.broadcast: rank 0's tensor on every rank), called by every rank at the same step. The other
    ranks need only those two numbers to follow the schedule; the main process keeps the full record."""
    import torch

    local = torch.tensor([decision.step, decision.decay_steps] if decision else [-1, -1], dtype=torch.int64)
    step, decay_steps = (int(v) for v in broadcast(local).tolist())
    if step < 0:
        return None
    if decision is not None:
        return decision
    return DecayDecision(step=step, decay_steps=decay_steps, elapsed_s=0.0, seconds_per_step=0.0, reserve_s=0.0,
                         reason="taken on the main process")
