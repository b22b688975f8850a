"""`make demo`'s script, end to end in a shortened form: shards, 2-rank training, samples, evaluation."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from support.training import run_reaped

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.mark.timeout(900)
def test_demo_script_runs_every_step_in_short_form(tmp_path):
    base = REPO / "models" / "phantom-base"
    assert (base / "model_index.json").exists(), "the shipped phantom base is missing from models/"
    # 2 steps: with DEMO_STEPS < 8 the script validates (the demo's full evaluation: every validation sample,
    # metric images and grids at its inference steps) and checkpoints after every step. Two steps still
    # evaluate twice and keep only the last checkpoint (keep_last=1); 4 steps paid for two more evaluations.
    # With a time budget (train.time_budget; too short a run to reach its decision, which
    # tests/integration/test_time_budget_ranks.py covers): the script's flags reach the trainer and are accepted.
    env = dict(os.environ, DEMO_N="150", DEMO_STEPS="2", DEMO_EVAL_SAMPLES="4", DEMO_SAMPLE_STEPS="2",
               DEMO_TIME_BUDGET="10", DEMO_ROOT=str(tmp_path),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = run_reaped(["bash", str(REPO / "scripts" / "demo.sh")], env=env, timeout=840)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "outputs" / "demo"
    assert len(list((out / "samples").glob("*_s*.png"))) == 10  # 5 reports x 2 images
    results = json.loads((out / "evaluate.json").read_text())
    assert len(results) == 2  # base and adapter, side by side
    assert all("macro" in r["faithfulness"] for r in results.values())
    report = (out / "report.html").read_text()  # base and adapter in one chart, each labelled
    assert "<svg" in report and "(base)" in report and "(trained from " in report
    assert "tensorboard --logdir" in proc.stdout and "macro" in proc.stdout
    assert "(a 10 budget, at most 2 steps)" in proc.stdout
    assert "trained 2 of at most 2 steps in " in proc.stdout  # the step it reached
    assert list((tmp_path / "runs" / "demo" / "fold0").glob("best_model_fold0_epoch*"))
