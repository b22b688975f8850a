"""train.time_budget: the decay starts where the arithmetic says on a fake clock, ends at the budget, agrees
across ranks, and a resume continues it."""
from __future__ import annotations

import json
import math

import pytest
import torch

from cxrdist.config import load_config, parse_duration
from cxrdist.errors import ConfigError
from cxrdist.train.time_budget import (DEFAULT_RESERVE_FRACTION, MIN_PACE_STEPS, RESERVE_MARGIN, DecayDecision,
                                       TimeBudget, share)


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("text,seconds", [("90", 5400), ("0", 0), ("", 0), ("10:30", 630), ("01:30:00", 5400),
                                          ("2-00", 172800), ("1-02:03", 93780), ("1-00:00:05", 86405)])
def test_budgets_are_read_as_slurm_writes_times(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["abc", "1h", "-5", "1:2:3:4", "1.5"])
def test_other_budget_text_is_refused(text):
    with pytest.raises(ValueError, match="not a time"):
        parse_duration(text)
    with pytest.raises(ConfigError, match="'train.time_budget' must be a time"):
        load_config(None, [f"train.time_budget={text}", "optim.scheduler=wsd"])


def test_a_budget_needs_the_wsd_schedule_and_a_yaml_clock_time_stays_a_time(tmp_path):
    with pytest.raises(ConfigError, match="'train.time_budget' needs optim.scheduler=wsd"):
        load_config(None, ["train.time_budget=30"])
    # YAML 1.1 reads 10:00 as the base-60 integer 600: the config's loader keeps it the text it is
    (tmp_path / "c.yaml").write_text("optim:\n  scheduler: wsd\ntrain:\n  time_budget: 10:00\n")
    assert parse_duration(load_config(str(tmp_path / "c.yaml"), []).train.time_budget) == 600.0


def _run(budget_s, pace_s, *, max_steps=100_000, warmup=10, fraction=0.2, clock=None, budget=None, start=0,
         stop_at=None):
    """Steps at `pace_s` seconds each until the schedule ends (or `stop_at`); returns the budget."""
    clock = clock or FakeClock()
    budget = budget or TimeBudget(budget_s, warmup=warmup, decay_fraction=fraction, max_steps=max_steps,
                                  clock=clock)
    budget.start(start)
    step = start
    while step < budget.total_steps() and step != stop_at:
        clock.now += pace_s
        step += 1
        budget.decide(step)
    return budget, step, clock


def test_the_decay_starts_where_the_arithmetic_says_and_ends_at_the_budget():
    budget, last, clock = _run(600.0, 0.5)  # 10 minutes at 2 steps/s, nothing measured at the end yet
    decision = budget.decision
    reserve = DEFAULT_RESERVE_FRACTION * 600
    affordable_total = (600 - reserve) / 0.5  # steps the budget holds: 1140
    # the decay is the last 20% of the steps after warm-up; it begins once the rest of the budget holds no more
    expected_start = math.ceil(10 + (1 - 0.2) * (affordable_total - 10))
    assert abs(decision.step - expected_start) <= 1
    assert decision.end_step == last and abs(last - affordable_total) <= 1
    assert clock.now - 1000.0 <= 600 - reserve + 0.5
    assert budget.multiplier(decision.step - 1) == 1.0 and budget.multiplier(decision.step) == 1.0
    assert budget.multiplier(last - 1) < 0.01
    assert "budget" in decision.reason and f"{0.5:.3f} s/step" in decision.reason


def test_a_slower_host_decays_sooner_and_still_ends_on_time():
    fast, fast_last, _ = _run(600.0, 0.25)
    slow, slow_last, clock = _run(600.0, 0.5)
    assert slow.decision.step < fast.decision.step and slow_last < fast_last
    assert clock.now - 1000.0 <= 600 * (1 - DEFAULT_RESERVE_FRACTION) + 0.5


def test_the_measured_end_of_run_work_replaces_the_default_reserve():
    clock = FakeClock()
    budget = TimeBudget(600.0, warmup=0, decay_fraction=0.2, max_steps=100_000, clock=clock)
    budget.note_end_work(40.0)
    budget, last, clock = _run(600.0, 0.5, budget=budget, clock=clock)
    assert budget.decision.reserve_s == pytest.approx(RESERVE_MARGIN * 40.0)
    assert abs(last - (600 - RESERVE_MARGIN * 40.0) / 0.5) <= 1


def test_the_step_limit_comes_first_when_the_budget_is_generous():
    budget, last, _ = _run(3600.0, 0.1, max_steps=500, warmup=0)
    assert budget.decision is None and last == 500
    assert budget.step_based_decay_start() == 400 and budget.multiplier(399) == 1.0 and budget.multiplier(450) < 1


def test_the_pace_is_not_trusted_before_enough_steps():
    budget, last, _ = _run(1.0, 0.5, warmup=0)  # the budget is spent before the pace is known
    assert budget.decision is not None and budget.decision.step == MIN_PACE_STEPS + 1
    assert budget.decision.decay_steps == 1 and last == MIN_PACE_STEPS + 2


def test_a_resume_keeps_the_budget_left_and_the_decay_begun():
    whole, whole_last, _ = _run(600.0, 0.5)
    first, _, clock = _run(600.0, 0.5, stop_at=700)  # preempted during the stable phase
    state = first.state_dict()
    assert state["used_s"] == pytest.approx(350.0) and state["decision"] is None
    resumed = TimeBudget(600.0, warmup=10, decay_fraction=0.2, max_steps=100_000, clock=clock)
    resumed.load_state_dict(state)
    clock.now += 3600  # the requeued job starts an hour later: waiting is not training time
    resumed, last, _ = _run(600.0, 0.5, budget=resumed, clock=clock, start=700)
    assert abs(resumed.decision.step - whole.decision.step) <= MIN_PACE_STEPS + 1 and abs(last - whole_last) <= 1
    # stopped inside the decay: the resumed run keeps the decision it had
    first, _, clock = _run(600.0, 0.5, stop_at=whole.decision.step + 10)
    resumed = TimeBudget(600.0, warmup=10, decay_fraction=0.2, max_steps=100_000, clock=clock)
    resumed.load_state_dict(first.state_dict())
    assert resumed.decision == first.decision and resumed.total_steps() == whole_last


def test_every_rank_follows_the_main_processs_decision():
    decision = DecayDecision(step=800, decay_steps=200, elapsed_s=1.0, seconds_per_step=0.5, reserve_s=3.0,
                             reason="why")
    sent = []

    def broadcast(tensor):  # rank 0's tensor reaches every rank
        sent.append(tensor.tolist())
        return torch.tensor(sent[0])

    assert share(decision, broadcast) is decision
    other = share(None, broadcast)  # a rank with no clock of its own gets rank 0's numbers
    assert (other.step, other.decay_steps) == (800, 200)
    sent.clear()
    assert share(None, broadcast) is None


# ---- through the trainer, on a clock of one second per optimizer step (faults.budget_clock) --------------------
BUDGETED = ["train.max_steps=40", "optim.scheduler=wsd", "optim.warmup_steps=0", "train.time_budget=0:24",
            "train.checkpoint_every=4", "train.keep_last=10"]
# 24 s at 1 s/step, 5% (1.2 s) kept back: after step s, floor(22.8 - s) steps remain affordable; the decay (20% of
# the run) begins at the first s where 0.8 * (22 - s) <= 0.2 * s, i.e. s = 18, and lasts the 4 steps left.
DECAY_STEP, END_STEP = 18, 22


@pytest.mark.usefixtures("fresh_accelerate")
def test_the_trainer_decays_where_the_budget_says_and_a_resume_inside_the_decay_keeps_it(tmp_path, monkeypatch):
    """(That a resumed run ends at the uninterrupted adapter bit for bit is tested with real ranks:
    tests/integration/test_time_budget_ranks.py.)"""
    from support.fakes import make_trainer, reset_accelerate

    from cxrdist.train import faults

    monkeypatch.setenv(faults.STEP_SECONDS_ENV, "1")
    trainer = make_trainer(tmp_path / "whole", *BUDGETED)
    result = trainer.fit()
    assert result.steps == END_STEP and trainer.total_steps == END_STEP
    record = json.loads((tmp_path / "whole" / "fold0" / "time_budget.json").read_text())
    assert (record["step"], record["decay_steps"], record["end_step"]) == (DECAY_STEP, 4, END_STEP)
    assert record["budget_s"] == 24.0 and record["max_steps"] == 40 and "budget" in record["reason"]
    assert trainer.budget.multiplier(DECAY_STEP - 1) == 1.0 > trainer.budget.multiplier(DECAY_STEP + 1)
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)  # decayed to 0 at the end
    decision = trainer.budget.decision
    trainer.close()
    reset_accelerate()

    real_die = faults.maybe_die_after_step

    def preempted(step, rank):
        if step == 21:  # inside the decay, after the step-20 checkpoint
            raise KeyboardInterrupt
        real_die(step, rank)

    monkeypatch.setattr(faults, "maybe_die_after_step", preempted)
    cut = make_trainer(tmp_path / "cut", *BUDGETED)
    with pytest.raises(KeyboardInterrupt):
        cut.fit()
    cut.close()
    reset_accelerate()
    monkeypatch.setattr(faults, "maybe_die_after_step", real_die)
    resumed = make_trainer(tmp_path / "cut", *BUDGETED, resume="latest")
    assert resumed.state.step == 20 and resumed.total_steps == END_STEP  # the decision came with the checkpoint
    assert resumed.budget.decision == decision and resumed.budget.used_before_s == 20.0
    peak = resumed.cfg.optim.lr_unet
    assert resumed.lr_scheduler.get_last_lr()[0] == pytest.approx(peak * decision_multiplier(20))
    assert resumed.fit().steps == END_STEP
    resumed.close()


def decision_multiplier(step: int) -> float:
    """The budgeted schedule's multiplier after `step` steps: cosine from DECAY_STEP over its 4 steps."""
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - DECAY_STEP) / (END_STEP - DECAY_STEP))))
