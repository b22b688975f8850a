"""Resume after SIGKILL ends with the same adapter as an uninterrupted run; a 2-rank CPU run keeps ranks equal."""
from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from support.launching import free_port
from support.training import QUICK, child_env, launch_train

pytestmark = pytest.mark.slow

RESUME = QUICK + ["train.max_steps=12", "train.checkpoint_every=4", "eval.eval_every_steps=6", "train.keep_last=5",
                  "eval.num_metric_images=0", "eval.num_grid_prompts=0", "train.caption_dropout=0.3",
                  "train.noise_offset=0.05", "train.grad_accum=2", "data.max_train_samples=48"]


def _args(shards: Path, out: Path, *extra: str) -> list[str]:
    sets = [a for s in RESUME for a in ("--set", s)]
    return ["--fold", "1", "--shards", str(shards), "--output-dir", str(out), *sets, *extra]


def test_sigkill_then_resume_matches_an_uninterrupted_run(phantom_shards, tmp_path):
    whole = launch_train(_args(phantom_shards, tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]

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
    a, b = load_file(str(tmp_path / "whole" / final)), load_file(str(tmp_path / "killed" / final))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), "resumed adapter differs"
    ta = json.loads((tmp_path / "whole" / "fold1" / "test_metrics.json").read_text())
    tb = json.loads((tmp_path / "killed" / "fold1" / "test_metrics.json").read_text())
    assert ta["test"] == tb["test"] and ta["best_step"] == tb["best_step"] and ta["weights_sha256"] == tb["weights_sha256"]


def test_resume_with_another_config_names_the_keys(phantom_shards, tmp_path):
    first = launch_train(_args(phantom_shards, tmp_path / "r", "--set", "train.max_steps=4"))
    assert first.returncode == 0, first.stderr[-3000:]
    other = launch_train(_args(phantom_shards, tmp_path / "r", "--set", "train.max_steps=4", "--set", "lora.unet_rank=4",
                               "--resume", "latest"))
    assert other.returncode == 1
    last = other.stderr.strip().splitlines()[-1]
    assert "lora.unet_rank: 8 -> 4" in last and "cannot resume" in last


def test_two_cpu_ranks_hold_identical_adapters(phantom_shards, tmp_path):
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    res = launch_train(_args(phantom_shards, tmp_path / "ddp", "--set", "train.max_steps=4", "--set", "eval.eval_every_steps=2"),
                       launcher=launcher, env=child_env(ACCELERATE_USE_CPU="1"), timeout=400)
    assert res.returncode == 0, res.stderr[-4000:]
    digests = json.loads((tmp_path / "ddp" / "fold1" / "adapter_digests.json").read_text())
    assert len(digests["per_rank"]) == 2 and len(set(digests["per_rank"])) == 1
    assert "2 rank(s)" in res.stderr
