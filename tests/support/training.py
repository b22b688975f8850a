"""Helpers shared by the training integration tests (imported by path; holds no tests)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Quick settings for the tiny preset: 32 training samples, batch 4 -> 8 optimizer steps per epoch.
QUICK = ["model.pretrained=preset:tiny", "data.image_size=64", "data.max_train_samples=32", "data.shuffle_buffer=8",
         "train.batch_size=4", "train.log_every=2", "eval.num_metric_images=2", "eval.num_grid_prompts=2",
         "eval.inference_steps=3", "eval.max_eval_samples=8", "eval.val_loss_timesteps=[200,600]",
         "sample.batch_size=2"]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def launch_train(args: list[str], *, timeout: int = 300, env: dict | None = None, launcher: list[str] | None = None):
    """Run launch/train.py in a child process (optionally under `accelerate launch ...`)."""
    cmd = (launcher or [sys.executable]) + [str(REPO / "launch" / "train.py"), *args]
    return subprocess.run(cmd, cwd=REPO, env=env or child_env(), capture_output=True, text=True, timeout=timeout)
