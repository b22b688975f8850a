"""Past one machine, for real on one host: launch/slurm/train.sbatch starting one `accelerate launch` per "node"
through stand-ins for srun and scontrol (tests/support/slurm), and two launchers whose output folders differ.

The SLURM run is DDP on 2 machines x 1 CPU rank. It trains and checkpoints; rewound to its step-2 checkpoint
and submitted again with `--resume latest`, it ends with the same adapter bit for bit. The rendezvous only
completes when each node computes its own machine rank, which is what the script's quoting is for.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from support.launching import (ACCEL, LAUNCH_TIMEOUT_S, STEP4, check_common, free_port, max_diff,
                               rewind_to_step2, train_args, two_machines)
from support.training import REPO, child_env, run_reaped

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("tiny_base_path")]
SHIMS = REPO / "tests" / "support" / "slurm"


def submit(shards, out, *extra: str, nodes: int = 2) -> subprocess.CompletedProcess:
    """The batch script as sbatch would run it on the first node of a `nodes`-node allocation."""
    env = child_env(DS_ACCELERATOR="cpu")
    env.update(PATH=f"{SHIMS}{os.pathsep}{os.path.dirname(sys.executable)}{os.pathsep}{env['PATH']}",
               SLURM_JOB_NUM_NODES=str(nodes), SLURM_JOB_NODELIST=f"cxr[01-{nodes:02d}]", SLURM_JOB_ID="4242",
               SLURM_GPUS_ON_NODE="1", MASTER_PORT=str(free_port()),
               ACCELERATE_CONFIG=str(ACCEL / "cpu_2ranks.yaml"))
    return run_reaped(["bash", str(REPO / "launch" / "slurm" / "train.sbatch"), *train_args(shards, out, [], extra)],
                      env=env, timeout=LAUNCH_TIMEOUT_S)


@pytest.mark.timeout(2 * LAUNCH_TIMEOUT_S + 60)
def test_slurm_script_trains_on_two_nodes_and_resumes_exactly(phantom_shards, tmp_path):
    out = tmp_path / "run"
    res = submit(phantom_shards, out)
    assert "cxrdist: 2 node(s) x 1 process(es), rendezvous 127.0.0.1:" in res.stdout, res.stdout + res.stderr[-2000:]
    check_common(out, res, "DDP")
    again = rewind_to_step2(out, tmp_path / "resumed")
    resumed = submit(phantom_shards, again, "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "step_00000002" in resumed.stderr
    assert max_diff(load_file(str(again / STEP4 / "adapter.safetensors")),
                    load_file(str(out / STEP4 / "adapter.safetensors"))) == 0.0


def test_slurm_script_refuses_an_allocation_it_cannot_read(tmp_path):
    env = child_env()
    env.pop("SLURM_JOB_NUM_NODES", None)
    res = subprocess.run(["bash", str(REPO / "launch" / "slurm" / "train.sbatch")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode != 0 and "run this script with sbatch" in res.stderr
    env.update(SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="cxr[01-02]", GPUS_PER_NODE="")
    env.pop("SLURM_GPUS_ON_NODE", None)
    env.pop("SLURM_GPUS_PER_NODE", None)
    res = subprocess.run(["bash", str(REPO / "launch" / "slurm" / "train.sbatch")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "cannot tell the GPUs per node" in res.stderr


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
def test_two_machines_with_separate_output_folders_stop_with_one_line(phantom_shards, tmp_path):
    """Each "machine" writes to its own folder, as with a node-local disk: rank 1 never sees rank 0's probe file,
    and both stop before training with the line that says to use a shared filesystem."""
    results = two_machines(ACCEL / "cpu_2ranks.yaml", phantom_shards, (tmp_path / "node0", tmp_path / "node1"),
                           "train.shared_folder_wait_s=2")
    for res in results:
        assert res.returncode != 0
        lines = [line for line in res.stderr.splitlines() if "is not shared by all ranks" in line]
        assert lines and "rank(s) [1]" in lines[0] and "filesystem that every node mounts" in lines[0], \
            res.stderr[-3000:]
    assert not (tmp_path / "node0" / "fold1" / "checkpoints").exists()
