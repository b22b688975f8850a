"""A DeepSpeed launch on CPU builds no DeepSpeed op in its ranks (cxrdist.train.deepspeed_ops), so the build
lock of the extension cache that every job of the user shares cannot hold it: a lock left by a build that was
killed made every later rank wait in torch's FileBaton.wait() forever."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from support.launching import ACCEL, free_port
from support.training import child_env, run_reaped

LAUNCH_TIMEOUT_S = 180

PROBE = """
import tempfile, torch
from cxrdist.config import load_config
from cxrdist.train.accel import build_accelerator
acc = build_accelerator(load_config(None, ["train.collective_timeout_s=60"]), tempfile.mkdtemp())
total = acc.reduce(torch.tensor([acc.process_index + 1.0], device=acc.device), "sum")
print(f"REDUCED rank={acc.process_index} sum={total.item()}", flush=True)
acc.end_training()
"""


def _launch(config: str, script, env: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCEL / f"{config}.yaml"),
           "--main_process_port", str(free_port()), str(script)]
    try:
        return run_reaped(cmd, env=env, timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired as hung:
        pytest.fail(f"the launch did not end within {LAUNCH_TIMEOUT_S} s:\n{hung.output[-2000:]}\n"
                    f"{hung.stderr[-3000:]}")


@pytest.mark.slow
@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 120)
def test_zero2_ranks_build_no_comm_op_and_pass_a_stale_build_lock(tmp_path):
    extensions = tmp_path / "torch_extensions"
    op_folder = extensions / "deepspeed_shm_comm"
    op_folder.mkdir(parents=True)
    (op_folder / "lock").touch()  # what a build killed while holding torch's lock leaves behind
    script = tmp_path / "probe.py"
    script.write_text(PROBE)

    proc = _launch("zero2", script, child_env(DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(extensions)))

    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(re.findall(r"REDUCED rank=(\d) sum=3\.0", proc.stdout)) == ["0", "1"], proc.stdout[-2000:]
    assert [p.name for p in op_folder.iterdir()] == ["lock"]  # nothing was built
    assert "deepspeed_shm_comm" not in proc.stdout + proc.stderr
