"""Resume after SIGKILL ends with the same adapter as an uninterrupted run; a resume under another config is refused.
(Ranks holding identical adapters is checked by every multi-rank launch: tests/support/launching.check_common.)"""
from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
from safetensors.torch import load_file

from support.training import QUICK, child_env, launch_train

pytestmark = pytest.mark.slow

RESUME = QUICK + ["train.max_steps=12", "train.checkpoint_every=4", "eval.eval_every_steps=6", "train.keep_last=5",
                  "eval.num_metric_images=0", "eval.num_grid_prompts=0", "train.caption_dropout=0.3",
                  "train.noise_offset=0.05", "train.grad_accum=2", "data.max_train_samples=48"]


def _args(shards: Path, out: Path, *extra: str) -> list[str]:
    sets = [a for s in RESUME for a in ("--set", s)]
    return ["--fold", "1", "--shards", str(shards), "--output-dir", str(out), *sets, *extra]


@pytest.fixture(scope="module")
def whole(phantom_shards, tmp_path_factory) -> Path:
    """An uninterrupted 12-step run."""
    out = tmp_path_factory.mktemp("resume") / "whole"
    res = launch_train(_args(phantom_shards, out))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_sigkill_then_resume_matches_an_uninterrupted_run(whole, phantom_shards, tmp_path):
    killed = launch_train(_args(phantom_shards, tmp_path / "killed"), env=child_env(CXRDIST_FAULT_KILL_AT_STEP="10"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    ckpts = tmp_path / "killed" / "fold1" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000004", "step_00000008"]

    again = launch_train(_args(phantom_shards, tmp_path / "killed"))  # without --resume: refused, nothing lost
    assert again.returncode != 0 and "--resume latest" in again.stderr
    resumed = launch_train(_args(phantom_shards, tmp_path / "killed", "--resume", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "step_00000008" in resumed.stderr

    final = "fold1/checkpoints/step_00000012/adapter.safetensors"
    a, b = load_file(str(whole / final)), load_file(str(tmp_path / "killed" / final))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), "resumed adapter differs"
    ta = json.loads((whole / "fold1" / "test_metrics.json").read_text())
    tb = json.loads((tmp_path / "killed" / "fold1" / "test_metrics.json").read_text())
    assert ta["test"] == tb["test"] and ta["best_step"] == tb["best_step"] and ta["weights_sha256"] == tb["weights_sha256"]


def test_resume_with_another_config_names_the_keys(whole, phantom_shards, tmp_path):
    copy = tmp_path / "r"
    shutil.copytree(whole, copy)
    other = launch_train(_args(phantom_shards, copy, "--set", "lora.unet_rank=4", "--resume", "latest"))
    assert other.returncode == 1
    last = other.stderr.strip().splitlines()[-1]
    assert "lora.unet_rank: 8 -> 4" in last and "cannot resume" in last
