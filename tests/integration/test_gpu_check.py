"""`make gpu-check` in its CPU smoke form (scripts/gpu_check.py --smoke): the same steps as on a GPU, tiny.

It runs for real: `cxrdist info`, phantom shards, launch/train.py under `accelerate launch` (bf16 + AdamW8bit killed
with SIGKILL after step 3 and resumed from its step-2 checkpoint; fp32 where the GPU run uses fp16; DeepSpeed ZeRO-2
in one process with bitsandbytes as its client optimizer; a Sana base in bf16; a full fine-tune of the UNet),
`cxrdist sample` on every best export, then the
throughput sweep's own smoke form. Without a GPU, the GPU form stops in one line.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from support.training import REPO, child_env, run_reaped

pytestmark = pytest.mark.slow
SCRIPT = REPO / "scripts" / "gpu_check.py"


@pytest.mark.timeout(900)
def test_the_smoke_form_runs_every_step_of_the_gpu_check(tmp_path):
    out = tmp_path / "check"
    proc = run_reaped([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], env=child_env(), timeout=880)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    steps = {s["name"].split(" ")[0]: s for s in report["steps"]}
    assert list(steps) == ["1", "2", "2a", "2b", "2c", "2d", "2e", "3b"] and all(s["status"] == "ok" for s in steps.values())
    assert report["environment"]["bitsandbytes"].startswith("usable (AdamW8bit step ran on cpu)")
    resumed = steps["2a"]["details"]
    assert resumed["resumed from"] == "step_00000002" and resumed["steps"] == 6
    assert "AdamW8bit" in resumed["optimizer"] and resumed["test val_loss"] > 0
    assert "DeepSpeed ZeRO-2" in steps["2c"]["details"]["ran as"]
    assert steps["2c"]["details"]["optimizer"].endswith("DeepSpeedZeroOptimizer > AdamW8bit")
    assert steps["2d"]["details"]["preset"] == "sana-tiny" and "AdamW8bit" in steps["2d"]["details"]["optimizer"]
    full = steps["2e"]["details"]
    assert full["trainable"].startswith("803,204 of") and "AdamW8bit" in full["optimizer"]  # the tiny UNet, whole
    for name in ("bf16-adamw8bit", "no-adamw", "zero2-no-adamw8bit", "sana-bf16-adamw8bit", "full-bf16-adamw8bit"):
        assert list((out / "samples" / name).glob("0000_s0.png")), name  # `cxrdist sample` drew from the export
    killed = (out / "logs" / "bf16-adamw8bit-killed.log").read_text()
    assert "SIGKILL" in killed or "status -9" in killed
    sweep = json.loads((out / "sweep" / "results.json").read_text())
    assert [r["status"] for r in sweep["rows"]] == ["ok", "ok"] and sweep["meta"]["finished"]
    table = (out / "gpu_check.md").read_text()
    assert "| 2c ZeRO-2 no + AdamW8bit, one process | ok |" in table and "bitsandbytes: usable" in table
    assert "8/8 steps ok" in proc.stdout
    again = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], cwd=REPO, env=child_env(),
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "already holds a check" in again.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a usable CUDA device")
@pytest.mark.timeout(120)
def test_the_gpu_form_stops_in_one_line_without_a_gpu(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "check")], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=110)
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("gpu_check: error: no usable CUDA device (") and "--smoke" in line
