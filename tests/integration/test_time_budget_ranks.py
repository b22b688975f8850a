"""train.time_budget under 2 ranks: the main process's decision is every rank's, it lands where the arithmetic
says (a clock of one second per optimizer step, faults.budget_clock), and a run killed before the decision and
resumed with `--resume latest` carries the budget it used, decides at the same step and ends at the uninterrupted
run's adapter bit for bit."""
from __future__ import annotations

import json
import signal

import pytest
from safetensors.torch import load_file

from support.launching import ACCEL, LAUNCH_TIMEOUT_S, last_by_step, launch, scalars
from support.training import child_env

# 24 s at 1 s/step with 5% kept back for the end of the run: the decay (20% of the run) begins after step 18 and
# ends at step 22 (tests/unit/train/test_time_budget.py works the arithmetic through)
BUDGET = ["train.max_steps=40", "optim.scheduler=wsd", "optim.warmup_steps=0", "train.time_budget=0:24",
          "train.checkpoint_every=4", "train.keep_last=10", "eval.eval_every_steps=100", "eval.num_metric_images=0",
          "eval.num_grid_prompts=0", "train.log_every=2"]
DECAY_STEP, END_STEP = 18, 22
CLOCK = {"CXRDIST_FAULT_SECONDS_PER_STEP": "1", "DS_ACCELERATOR": "cpu"}


def _adapter(run, step: int) -> dict:
    return load_file(str(run / "fold1" / "checkpoints" / f"step_{step:08d}" / "adapter.safetensors"))


@pytest.mark.integration
@pytest.mark.timeout(3 * LAUNCH_TIMEOUT_S)
def test_two_ranks_follow_one_decision_and_a_resume_before_it_decides_the_same(phantom_shards, tmp_path):
    whole = tmp_path / "whole"
    done = launch(ACCEL / "cpu_2ranks.yaml", phantom_shards, whole, *BUDGET, env=child_env(**CLOCK))
    assert done.returncode == 0, done.stderr[-4000:]
    record = json.loads((whole / "fold1" / "time_budget.json").read_text())
    assert (record["step"], record["end_step"]) == (DECAY_STEP, END_STEP)
    digests = json.loads((whole / "fold1" / "adapter_digests.json").read_text())["per_rank"]
    assert len(digests) == 2 and len(set(digests)) == 1  # both ranks stopped at the same step with one adapter
    assert last_by_step(scalars(whole, "train/decay_start_step")) == {DECAY_STEP: DECAY_STEP}
    lr = last_by_step(scalars(whole, "lr/unet"))
    assert lr[DECAY_STEP - 2] == lr[2] > lr[END_STEP - 2] and max(lr) == END_STEP
    assert "time budget: ended at step 22 (train.max_steps allowed 40)" in done.stderr

    cut = tmp_path / "cut"
    killed = launch(ACCEL / "cpu_2ranks.yaml", phantom_shards, cut, *BUDGET,
                    env=child_env(**CLOCK, CXRDIST_FAULT_KILL_AT_STEP="10"))
    assert killed.returncode != 0 and not (cut / "fold1" / "time_budget.json").exists()
    assert f"exitcode: -{int(signal.SIGKILL)}" in killed.stderr or "exitcode  : -9" in killed.stderr
    resumed = launch(ACCEL / "cpu_2ranks.yaml", phantom_shards, cut, *BUDGET, extra=("--resume", "latest"),
                     env=child_env(**CLOCK))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "step_00000008 at step 8" in resumed.stderr
    again = json.loads((cut / "fold1" / "time_budget.json").read_text())
    assert {k: again[k] for k in ("step", "decay_steps", "elapsed_s")} == \
        {k: record[k] for k in ("step", "decay_steps", "elapsed_s")}
    a, b = _adapter(whole, END_STEP), _adapter(cut, END_STEP)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), "the resumed run ended elsewhere"
