"""A run folder is owned by one training at a time, and its checkpoints can neither hang, crash nor half-exist.

- A second training, or a `--resume latest`, into a folder a live training holds is refused in one line -- by every
  rank of a 2-rank launch, none left waiting -- and writes and touches nothing; once the holder is dead, its lock is
  taken over and the run continues.
- A checkpoint removed while it is read (as a run rotating checkpoints in the folder would) is one line, whatever
  the reading library raised, or when it raised nothing.
- A full disk while a checkpoint is written is one line naming the folder and the space a checkpoint needs; the
  earlier checkpoints stay byte-identical, nothing that looks complete is left, and `--resume latest` works.
- A FIFO or a device in a checkpoint is refused before anything opens it (opening a FIFO blocks forever).
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cxrdist.errors import InputError
from cxrdist.train.checkpoint import TRAIN_LOCK, check_resumable, complete_checkpoints
from support.fakes import make_trainer, reset_accelerate
from support.launching import ACCEL, free_port
from support.processes import reap, start
from support.robustness import Result, error_line, snapshot
from support.training import REPO, child_env, run_reaped

pytestmark = pytest.mark.usefixtures("fresh_accelerate")  # several Trainers in this process
SETS = ["model.pretrained=preset:tiny", "data.image_size=64", "data.max_train_samples=32", "data.shuffle_buffer=1",
        "train.batch_size=4", "train.max_steps=4", "train.checkpoint_every=1", "eval.num_metric_images=0",
        "eval.num_grid_prompts=0", "eval.max_eval_samples=1", "eval.val_loss_timesteps=[200]", "eval.run_test=false"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from cxrdist.data.shard import build_shards
    from cxrdist.data.sources import source_class

    out = tmp_path_factory.mktemp("shards") / "phantom"
    build_shards(source_class("phantom")(n=60, size=64, seed=0), out, size=64, folds=2, test_fraction=0.2, seed=0,
                 shard_size=32, workers=1, progress=False)
    return out


def train_argv(shards: Path, out: Path, *extra: str) -> list[str]:
    return [str(REPO / "launch" / "train.py"), "--fold", "1", "--shards", str(shards), "--output-dir", str(out),
            *[a for s in SETS for a in ("--set", s)], *extra]


def state_of(folder: Path) -> dict[str, tuple]:
    """Every file's content digest and modification time, every folder's name: what "touches nothing" compares."""
    digests = snapshot([folder])
    return {path: (digest, os.stat(path).st_mtime_ns if digest != "dir" else None) for path, digest in digests.items()}


def wait_stopped(pid: int, timeout: float = 240.0) -> None:
    """Until process `pid` is stopped (state T): the fault hook SIGSTOPs it after its first optimizer step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state in ("T", "t"):
            return
        if state == "Z":
            raise AssertionError("the holding training exited")
        time.sleep(0.2)
    raise AssertionError("the holding training never reached its first step")


@pytest.mark.integration  # launches ranks of its own: run beside no other test
@pytest.mark.timeout(600)
def test_a_live_training_owns_its_folder_until_it_dies(shards, tmp_path):
    out = tmp_path / "run"
    holder = start([sys.executable, *train_argv(shards, out)], cwd=REPO, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL,
                   env=child_env(CXRDIST_FAULT_KILL_AT_STEP="1", CXRDIST_FAULT_SIGNAL="SIGSTOP"))
    try:
        wait_stopped(holder.pid)  # alive, mid-run, its step-1 checkpoint written
        fold = out / "fold1"
        assert (fold / TRAIN_LOCK).is_file() and [p.name for p in complete_checkpoints(fold)] == ["step_00000001"]
        before = state_of(out)
        busy = rf"^Error: {fold} is being trained into by process {holder.pid}: wait for that run to end or " \
               r"choose another --output-dir"
        for extra in ((), ("--resume", "latest")):
            done = run_reaped([sys.executable, *train_argv(shards, out, *extra)], env=child_env(), timeout=240)
            line = error_line(Result(done.returncode, done.stdout + done.stderr))
            assert done.returncode == 1 and re.match(busy, line), line
            assert state_of(out) == before

        # Two ranks: rank 0 is refused the lock, rank 1 learns it from rank 0 and stops with the same line (the
        # timeout is the hang a rank left waiting in a collective would be).
        done = run_reaped([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(ACCEL / "cpu_2ranks.yaml"), "--main_process_port", str(free_port()),
                           *train_argv(shards, out, "--resume", "latest")], env=child_env(), timeout=240)
        lines = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
        assert done.returncode != 0 and len(lines) == 2, done.stderr[-3000:]
        assert all(re.match(busy, line) for line in lines), lines
        assert state_of(out) == before
    finally:
        reap(holder)  # stopped, with whatever it started: killed and waited for, however the test went
    # Its holder dead, the lock is stale: taken over, and the run continues from the step-1 checkpoint.
    done = run_reaped([sys.executable, *train_argv(shards, out, "--resume", "latest")], env=child_env(), timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {out / 'fold1' / 'checkpoints' / 'step_00000001'} at step 1" in done.stderr
    assert not (out / "fold1" / TRAIN_LOCK).exists()


# -- in one process, on the fake data set (support.fakes) ----------------------------------------------------
RUN = ("train.max_steps=3", "train.checkpoint_every=1")


def trained(tmp_path: Path) -> Path:
    """The step-2 checkpoint of a finished run of RUN's config."""
    trainer = make_trainer(tmp_path / "trained", *RUN)
    trainer.fit()
    trainer.close()
    reset_accelerate()
    return tmp_path / "trained" / "fold0" / "checkpoints" / "step_00000002"


def one_line(exc: BaseException) -> str:
    assert "\n" not in str(exc)
    return str(exc)


@pytest.mark.parametrize("library_raises", [True, False], ids=["reader-raises", "reader-silent"])
def test_a_checkpoint_removed_while_it_is_read_is_one_line(tmp_path, monkeypatch, library_raises):
    """Removed between the checks and accelerate's load: its reader then fails on a missing file, or -- as
    DeepSpeed's engine does for a missing checkpoint -- only warns and loads nothing."""
    from accelerate import Accelerator

    checkpoint = trained(tmp_path)
    real_load = Accelerator.load_state

    def rotated_away(self, input_dir, **kwargs):
        shutil.rmtree(input_dir)
        return real_load(self, input_dir, **kwargs) if library_raises else None

    monkeypatch.setattr(Accelerator, "load_state", rotated_away)
    with pytest.raises(InputError) as err:
        make_trainer(tmp_path / "resume", *RUN, resume=str(checkpoint))
    assert one_line(err.value).startswith(f"checkpoint {checkpoint} was removed while being read (another run "
                                          "rotates checkpoints in this folder?)")
    assert not (tmp_path / "resume" / "fold0" / TRAIN_LOCK).exists()  # the refused run let its folder go


DISK_FULL = {
    "oserror": lambda: OSError(errno.ENOSPC, "No space left on device", "optimizer.bin"),
    "torch-zip-writer": lambda: RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed "
                                             "writing file data/0: file write failed"),
    "safetensors": lambda: RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                        'message: "No space left on device" })'),
}


@pytest.mark.parametrize("raised", list(DISK_FULL))
def test_a_full_disk_while_saving_is_one_line_and_keeps_the_earlier_checkpoints(tmp_path, monkeypatch, raised):
    from accelerate import Accelerator

    real_save = Accelerator.save_state
    earlier: dict = {}

    def disk_fills_at_step_2(self, output_dir=None, **kwargs):
        if not str(output_dir).endswith("step_00000002"):
            return real_save(self, output_dir, **kwargs)
        earlier.update(snapshot([Path(output_dir).parent / "step_00000001"]))
        real_save(self, output_dir, **kwargs)  # part of it reached the disk
        raise DISK_FULL[raised]()

    monkeypatch.setattr(Accelerator, "save_state", disk_fills_at_step_2)
    trainer = make_trainer(tmp_path, *RUN)
    try:
        with pytest.raises(InputError) as err:
            trainer.fit()
    finally:
        trainer.close()
    checkpoints = tmp_path / "fold0" / "checkpoints"
    line = one_line(err.value)
    assert line.startswith(f"disk full while writing checkpoint {checkpoints / 'step_00000002'} (")
    assert f"{checkpoints} has " in line and " free and a checkpoint of this run needs " in line
    assert "the last complete checkpoint is step_00000001" in line and "--resume latest" in line
    assert snapshot([checkpoints / "step_00000001"]) == earlier
    assert [p.name for p in complete_checkpoints(tmp_path / "fold0")] == ["step_00000001"]
    assert not (checkpoints / "step_00000002").exists()

    monkeypatch.undo()
    reset_accelerate()
    resumed = make_trainer(tmp_path, *RUN, resume="latest")
    try:
        assert resumed.state.step == 1
        assert resumed.fit().steps == 3
    finally:
        resumed.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["optimizer.bin", "adapter.safetensors", "config.yaml", "random_states_0.pkl"])
def test_a_fifo_in_a_checkpoint_is_refused_before_anything_opens_it(tmp_path, name):
    checkpoint = trained(tmp_path)
    copy = tmp_path / "copy" / checkpoint.name
    shutil.copytree(checkpoint, copy)
    (copy / name).unlink()
    os.mkfifo(copy / name)
    expected = f"cannot resume from {copy}: {name} is a FIFO, not a regular file; it was refused unopened"
    with pytest.raises(InputError) as err:  # a reader that opened the FIFO would block here until the timeout
        make_trainer(tmp_path / "resume", *RUN, resume=str(copy))
    assert one_line(err.value).startswith(expected)
    from cxrdist.config import load_config

    with pytest.raises(InputError, match="is a FIFO"):  # the CLI's preflight of --resume PATH
        check_resumable(copy, load_config(None, []), 0)


@pytest.mark.timeout(240)
def test_the_training_command_refuses_a_checkpoint_holding_a_fifo_in_one_line(shards, tmp_path):
    checkpoint = trained(tmp_path)
    copy = tmp_path / "copy" / checkpoint.name
    shutil.copytree(checkpoint, copy)
    (copy / "scheduler.bin").unlink()
    os.mkfifo(copy / "scheduler.bin")
    done = run_reaped([sys.executable, *train_argv(shards, tmp_path / "run", "--resume", str(copy))],
                      env=child_env(), timeout=180)
    line = error_line(Result(done.returncode, done.stdout + done.stderr))
    assert done.returncode == 1 and "scheduler.bin is a FIFO, not a regular file" in line, line


def test_resume_auto_continues_a_folder_with_a_checkpoint_and_starts_one_without(tmp_path):
    """What a requeued SLURM job runs: no checkpoint, or only an unfinished one (killed during its first save),
    starts the run; a complete checkpoint is continued; a new run without --resume is refused there."""
    unfinished = tmp_path / "fold0" / "checkpoints" / "step_00000001"
    unfinished.mkdir(parents=True)
    (unfinished / "optimizer.bin").write_bytes(b"half")
    first = make_trainer(tmp_path, *RUN, resume="auto")
    try:
        assert first.state.step == 0
        first.fit()
    finally:
        first.close()
    reset_accelerate()
    again = make_trainer(tmp_path, *RUN, resume="auto")
    try:
        assert again.state.step == 3  # the finished run's last checkpoint: nothing left to train
    finally:
        again.close()
    reset_accelerate()
    with pytest.raises(InputError, match="already holds a training run: continue it with --resume latest"):
        make_trainer(tmp_path, *RUN)
