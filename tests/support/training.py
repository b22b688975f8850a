"""Helpers shared by the training integration tests (imported by path; holds no tests)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from support.processes import PORT_TRIES, on_another_port, port_taken, reap, start

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


def run_reaped(cmd: list[str], *, env: dict, timeout: float, cwd=REPO) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)`, except that every process the command
    started (launched ranks included, a stopped one too) is killed and reaped before this returns or raises, however
    the command ended; a launch whose rendezvous port was taken before the launcher bound it is run again on another
    (support.processes), at most PORT_TRIES times."""
    for attempt in range(1, PORT_TRIES + 1):
        proc = start(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        timed_out = False
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            reap(proc)  # also when pytest-timeout or Ctrl-C interrupts the wait
        if timed_out:
            out, err = proc.communicate()
            raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err)
        again = on_another_port(cmd, env) if proc.returncode and port_taken(err) else None
        if again is None or attempt == PORT_TRIES:
            return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
        cmd, env = again
    raise AssertionError("unreachable")


def launch_train(args: list[str], *, timeout: int = 300, env: dict | None = None, launcher: list[str] | None = None):
    """Run launch/train.py in a child process (optionally under `accelerate launch ...`)."""
    cmd = (launcher or [sys.executable]) + [str(REPO / "launch" / "train.py"), *args]
    return run_reaped(cmd, env=env or child_env(), timeout=timeout)


def architecture_run_inputs(tmp_path: Path, preset: str, size: int) -> tuple[Path, Path]:
    """(12 phantoms at `size` px as a shard set, the preset's folder) for a one-step run on a real architecture.
    The preset (4 GB at full size) is materialised in its own process, so the pytest process never holds it."""
    from cxrdist.data.shard import build_shards
    from cxrdist.data.sources import source_class

    shards = tmp_path / "shards"
    build_shards(source_class("phantom")(n=12, size=size, seed=0), shards, size=size, folds=2, test_fraction=0.2,
                 seed=0, shard_size=8, workers=1, progress=False)
    built = subprocess.run([sys.executable, "-c", "from cxrdist.models.loading import preset_folder; "
                            f"print(preset_folder('{preset}'))"], env=child_env(), capture_output=True, text=True,
                           timeout=900)
    assert built.returncode == 0, built.stderr[-3000:]
    return shards, Path(built.stdout.strip().splitlines()[-1])


def trainable_counts(log: str) -> tuple[int, int]:
    """(trainable, total) parameters as the trainer's start-up line states them."""
    import re

    found = re.search(r"trainable ([\d,]+) of ([\d,]+) parameters", log)
    assert found, log[-4000:]
    trainable, total = (int(g.replace(",", "")) for g in found.groups())
    return trainable, total


def tiny_lora_model(base_path, train_text: bool = True):
    """(base, joint model) of a tiny base with LoRA attached, the text encoder's too when `train_text`."""
    from cxrdist.config import LoraConfig
    from cxrdist.models.diffusion import LoraDiffusionModel
    from cxrdist.models.loading import load_base
    from cxrdist.models.lora import attach_lora

    base = load_base(base_path)
    attach_lora(base, LoraConfig(train_text_encoder=train_text))
    return base, LoraDiffusionModel(base.unet, base.text_encoder, train_text)
