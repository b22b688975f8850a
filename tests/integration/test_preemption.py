"""A preempted run keeps its work: a signal of train.preempt_signals stops every rank after one and the same optimizer
step, with a complete checkpoint written through the normal checkpoint path, one line on the main process naming it
and the exact command that continues, and exit status 128 + the signal's number; that command ends at the adapter
of an uninterrupted run, bit for bit.

The signals are real and reach the ranks by the routes a cluster uses: to `accelerate launch` (torch's elastic agent
forwards it to every rank), to one rank only (the others learn it from the per-step agreement), to a single process
(SIGINT as a Ctrl-C, SIGTERM), and to the SLURM batch script (its trap passes it on through srun and requeues).
A test-only fault hook (cxrdist.train.faults) sends each at a chosen step, so every run is reproducible.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from support.launching import ACCEL, free_port
from support.training import REPO, child_env, run_reaped

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("tiny_base_path")]

# 32 samples, batch 4: 4 steps per epoch on 2 ranks (8 on one process); train.checkpoint_every stays 0 (the default:
# a checkpoint at each epoch's end), so a stop before step 4 has no other checkpoint to fall back on.
SETS = ["model.pretrained=preset:tiny", "data.image_size=64", "data.max_train_samples=32", "data.shuffle_buffer=1",
        "train.batch_size=4", "train.log_every=1", "train.max_steps=6", "eval.num_metric_images=0",
        "eval.num_grid_prompts=0", "eval.max_eval_samples=1", "eval.val_loss_timesteps=[200]", "eval.run_test=false",
        "optim.lr_unet=1e-2", "optim.lr_text=1e-2"]
FINAL = Path("fold1") / "checkpoints" / "step_00000006" / "adapter.safetensors"
TIMEOUT_S = 240


def train_args(shards: Path, out: Path) -> list[str]:
    return ["--fold", "1", "--shards", str(shards), "--output-dir", str(out), *[a for s in SETS for a in ("--set", s)]]


def two_ranks(shards: Path, out: Path, env: dict | None = None, config: str = "cpu_2ranks.yaml"):
    """launch/train.py on 2 CPU ranks: DDP (gloo), or DeepSpeed with config="zero2.yaml"."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCEL / config),
           "--main_process_port", str(free_port()), str(REPO / "launch" / "train.py"), *train_args(shards, out)]
    return run_reaped(cmd, env=env or child_env(), timeout=TIMEOUT_S)


def one_process(shards: Path, out: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_reaped([sys.executable, str(REPO / "launch" / "train.py"), *train_args(shards, out)],
                      env=env or child_env(), timeout=TIMEOUT_S)


def fault(step: int, signame: str, **extra: str) -> dict:
    return child_env(CXRDIST_FAULT_KILL_AT_STEP=str(step), CXRDIST_FAULT_SIGNAL=signame, DS_ACCELERATOR="cpu", **extra)


def stop_line(res: subprocess.CompletedProcess, signame: str) -> tuple[int, str]:
    """(the step it stopped after, the command that continues) from the one line the main process printed."""
    lines = [line for line in res.stderr.splitlines() if line.startswith("stopped by ")]
    assert len(lines) == 1, res.stderr[-4000:]  # the main process only
    line = lines[0]
    assert line.startswith(f"stopped by {signame} after step "), line
    step = int(line.split(" after step ")[1].split()[0])
    command = line.split("; continue with: ", 1)[1]
    return step, command


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "fold1" / "checkpoints").iterdir())


def check_stopped(out: Path, step: int, earlier: tuple[str, ...] = ()) -> None:
    """The stop checkpoint is complete, is the only one besides `earlier`, and the run folder is free again."""
    name = f"step_{step:08d}"
    assert checkpoints(out) == sorted({*earlier, name})
    assert (out / "fold1" / "checkpoints" / name / "cxrdist_checkpoint.json").is_file()
    assert not (out / "fold1" / ".cxrdist-train.lock").exists()


def continue_with(command: str, out: Path, step: int) -> None:
    """Run exactly the printed command (no fault in its environment): it resumes from `step` and finishes."""
    argv = shlex.split(command)
    assert argv[-2:] == ["--resume", "latest"] and argv[argv.index("--output-dir") + 1] == str(out), command
    res = run_reaped(argv, env=child_env(DS_ACCELERATOR="cpu"), timeout=TIMEOUT_S)
    assert res.returncode == 0, res.stderr[-4000:]
    assert f"resumed from {out / 'fold1' / 'checkpoints' / f'step_{step:08d}'} at step {step}" in res.stderr


def same_adapter(a: Path, b: Path) -> None:
    x, y = load_file(str(a / FINAL)), load_file(str(b / FINAL))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), "the continued run's adapter differs"


@pytest.fixture(scope="module")
def uninterrupted(phantom_shards, tmp_path_factory):
    """The uninterrupted 2-rank run of an accelerate config, run once per module."""
    runs: dict[str, Path] = {}

    def run(config: str = "cpu_2ranks.yaml") -> Path:
        if config not in runs:
            out = tmp_path_factory.mktemp("preempt") / config.replace(".yaml", "")
            res = two_ranks(phantom_shards, out, child_env(DS_ACCELERATOR="cpu"), config)
            assert res.returncode == 0, res.stderr[-4000:]
            runs[config] = out
        return runs[config]

    return run


@pytest.fixture(scope="module")
def whole_two_ranks(uninterrupted) -> Path:
    return uninterrupted()


@pytest.fixture(scope="module")
def whole_one_process(phantom_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("preempt") / "whole1"
    res = one_process(phantom_shards, out)
    assert res.returncode == 0, res.stderr[-4000:]
    return out


@pytest.mark.timeout(3 * TIMEOUT_S)
def test_sigterm_to_the_launcher_stops_both_ranks_at_one_step_with_a_checkpoint(whole_two_ranks, phantom_shards,
                                                                                 tmp_path):
    """As a scheduler stops a job: SIGTERM to `accelerate launch` (rank 1 sends it after step 1), whose elastic agent
    passes it to both ranks and SIGKILLs them 30 s later; they stop after the same step, mid-epoch, with the
    checkpoint the default config would not have written before step 4."""
    out = tmp_path / "run"
    res = two_ranks(phantom_shards, out, fault(1, "SIGTERM", CXRDIST_FAULT_KILL_RANK="1",
                                               CXRDIST_FAULT_SIGNAL_TARGET="launcher"))
    assert res.returncode != 0  # accelerate's own exit after its agent was signalled
    assert "Received 15 death signal, shutting down workers" in res.stderr, res.stderr[-4000:]
    step, command = stop_line(res, "SIGTERM")
    assert 1 <= step < 4, step
    assert "no checkpoint is complete" not in res.stderr
    check_stopped(out, step)
    continue_with(command, out, step)
    same_adapter(whole_two_ranks, out)


@pytest.mark.timeout(4 * TIMEOUT_S)
@pytest.mark.parametrize("config", ["cpu_2ranks.yaml", "zero2.yaml"], ids=["ddp", "zero2"])
def test_a_signal_that_reaches_one_rank_stops_every_rank_after_that_step(uninterrupted, phantom_shards, tmp_path,
                                                                         config):
    """Only rank 1 gets SIGUSR1 (after step 5, mid-epoch 2): the per-step agreement stops rank 0 after step 5 too;
    both exit 138 (128 + SIGUSR1) and the checkpoint of step 5 -- collective under DeepSpeed -- is written beside
    the epoch's one of step 4."""
    out = tmp_path / "run"
    res = two_ranks(phantom_shards, out, fault(5, "SIGUSR1", CXRDIST_FAULT_KILL_RANK="1"), config)
    assert res.returncode != 0
    step, command = stop_line(res, "SIGUSR1")
    assert step == 5
    assert res.stderr.count("exitcode  : 138") == 2, res.stderr[-4000:]  # both ranks, by themselves
    check_stopped(out, 5, earlier=("step_00000004",))
    continue_with(command, out, 5)
    same_adapter(uninterrupted(config), out)


@pytest.mark.timeout(3 * TIMEOUT_S)
@pytest.mark.parametrize("signame, step", [("SIGINT", 2), ("SIGTERM", 5)])
def test_one_process_stopped_by_a_signal_saves_exits_128_plus_it_and_continues(whole_one_process, phantom_shards,
                                                                                tmp_path, signame, step):
    """A Ctrl-C (SIGINT) and a SIGTERM on a single process: the checkpoint of that step, exit 130 / 143."""
    out = tmp_path / "run"
    res = one_process(phantom_shards, out, fault(step, signame))
    signum = int(getattr(signal, signame))
    assert res.returncode == 128 + signum, res.stderr[-4000:]
    stopped, command = stop_line(res, signame)
    assert stopped == step
    assert "Traceback" not in res.stderr
    check_stopped(out, step)
    continue_with(command, out, step)
    same_adapter(whole_one_process, out)


SRUN = """#!/usr/bin/env bash
# srun stand-in: one task per "node" on this host and, like srun, the signals it receives passed on to its tasks.
set -uo pipefail
nodes=${SLURM_JOB_NUM_NODES:?}
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes|-N|--ntasks-per-node) [ "$1" = --ntasks-per-node ] || nodes=$2; shift 2 ;;
    --*) shift ;;
    *) break ;;
  esac
done
pids=()
for ((node = 0; node < nodes; node++)); do
  SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 SLURM_NTASKS=$nodes "$@" &
  pids+=($!)
done
trap 'kill -s USR1 "${pids[@]}" 2>/dev/null' USR1
trap 'kill -s TERM "${pids[@]}" 2>/dev/null' TERM
status=0
for pid in "${pids[@]}"; do
  while kill -0 "$pid" 2>/dev/null; do wait "$pid"; done
  wait "$pid"; code=$?
  if [ "$code" -ne 0 ] && [ "$status" -eq 0 ]; then status=$code; fi
done
exit "$status"
"""
SCONTROL = """#!/usr/bin/env bash
# scontrol stand-in: `show hostnames` (every node is this host) and `requeue JOB`, recorded in $REQUEUE_LOG.
if [ "${1:-}" = show ] && [ "${2:-}" = hostnames ]; then
  for ((node = 0; node < ${SLURM_JOB_NUM_NODES:?}; node++)); do echo 127.0.0.1; done
  exit 0
fi
if [ "${1:-}" = requeue ]; then echo "requeue $2" >> "${REQUEUE_LOG:?}"; exit 0; fi
exit 2
"""


def submit(shims: Path, shards: Path, out: Path, *, restarts: int, fault_env: dict) -> subprocess.CompletedProcess:
    """launch/slurm/train.sbatch as sbatch runs it on the first node of a 2-node allocation (1 CPU rank each)."""
    env = child_env(**fault_env)
    env.update(PATH=f"{shims}{os.pathsep}{os.path.dirname(sys.executable)}{os.pathsep}{env['PATH']}",
               SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="cxr[01-02]", SLURM_JOB_ID="4242",
               SLURM_RESTART_COUNT=str(restarts), SLURM_GPUS_ON_NODE="1", MASTER_PORT=str(free_port()),
               ACCELERATE_CONFIG=str(ACCEL / "cpu_2ranks.yaml"), REQUEUE_LOG=str(shims / "requeued"))
    # `$$` of the shell that then becomes the batch script: the PID SLURM's --signal=B: would signal
    script = 'export CXRDIST_FAULT_SIGNAL_TARGET=$$; exec bash "$0" "$@"'
    return run_reaped(["bash", "-c", script, str(REPO / "launch" / "slurm" / "train.sbatch"),
                       *train_args(shards, out)], env=env, timeout=TIMEOUT_S)


@pytest.mark.timeout(3 * TIMEOUT_S)
def test_the_slurm_script_passes_its_time_limit_signal_on_requeues_and_the_restart_continues(
        whole_two_ranks, phantom_shards, tmp_path):
    """SIGUSR1 to the batch shell (as `--signal=B:USR1@600` sends it; here rank 1 sends it after step 1): the trap
    passes it through srun to each node's launcher, whose agent forwards it to the ranks (PET_SIGNALS_TO_HANDLE);
    they checkpoint and stop; the script requeues the job; the restart continues with --resume auto."""
    shims = tmp_path / "shims"
    shims.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (shims / name).write_text(text)
        (shims / name).chmod(0o755)
    out = tmp_path / "run"
    first = submit(shims, phantom_shards, out, restarts=0,
                   fault_env={"CXRDIST_FAULT_KILL_AT_STEP": "1", "CXRDIST_FAULT_SIGNAL": "SIGUSR1",
                              "CXRDIST_FAULT_KILL_RANK": "1"})
    assert first.returncode != 0
    assert "cxrdist: SIGUSR1 (time limit near)" in first.stdout, first.stdout + first.stderr[-4000:]
    assert "cxrdist: requeueing job 4242" in first.stdout
    assert (shims / "requeued").read_text() == "requeue 4242\n"
    step, _ = stop_line(first, "SIGUSR1")
    check_stopped(out, step)

    restart = submit(shims, phantom_shards, out, restarts=1, fault_env={})
    assert restart.returncode == 0, restart.stdout + restart.stderr[-4000:]
    assert "continuing with --resume auto" in restart.stdout
    assert f"at step {step}" in restart.stderr and "resumed from" in restart.stderr
    assert (shims / "requeued").read_text() == "requeue 4242\n"  # a run that ended is not requeued
    same_adapter(whole_two_ranks, out)
