"""Stop signals (train.preempt_signals): which are accepted, what the first and a repeated one do, the resume command printed, and the warning of a slow stop."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from cxrdist.config import load_config
from cxrdist.errors import ConfigError


def test_preempt_signals_default_to_the_schedulers_and_ctrl_c_and_refuse_others_in_one_line():
    assert load_config(None, []).train.preempt_signals == ["SIGTERM", "SIGUSR1", "SIGINT"]
    assert load_config(None, ["train.preempt_signals=[usr2, SIGTERM, term]"]).train.preempt_signals == \
        ["SIGUSR2", "SIGTERM"]
    assert load_config(None, ["train.preempt_signals=[]"]).train.preempt_signals == []
    for bad in ("[SIGKILL]", "[SIGTERN]", "[SIGSEGV]"):
        with pytest.raises(ConfigError, match=r"config key 'train.preempt_signals' must be a list of SIGTERM, ") as err:
            load_config(None, [f"train.preempt_signals={bad}"])
        assert "\n" not in str(err.value)


def test_stop_signals_record_the_first_ignore_repeats_and_a_second_ctrl_c_stops_at_once(monkeypatch):
    import os
    import signal

    from cxrdist.train import preemption

    before = signal.getsignal(signal.SIGUSR1)
    with preemption.StopSignals(["SIGUSR1", "SIGINT"]) as stop:
        assert stop.received == 0 and stop.agreed(type("One", (), {"num_processes": 1})()) == 0
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.received == signal.SIGUSR1
        os.kill(os.getpid(), signal.SIGUSR1)  # SLURM and the launcher both deliver it: still one request
        os.kill(os.getpid(), signal.SIGINT)  # the same Ctrl-C seen twice, within REPEAT_INTERRUPT_S
        assert stop.received == signal.SIGUSR1
        monkeypatch.setattr(preemption, "REPEAT_INTERRUPT_S", 0.0)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGUSR1) is before and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_the_resume_command_is_the_launch_command_with_the_run_folder_and_resume_latest(monkeypatch):
    from cxrdist.train import preemption

    argv = ["launch/train.py", "--fold", "2", "--resume", "runs/x/fold2/checkpoints/step_8", "--output-dir=old",
            "--set", "eval.val_loss_timesteps=[200, 600]"]
    agent = ["/venv/bin/python3", "/venv/bin/accelerate", "launch", "--config_file", "z2.yaml", "launch/train.py",
             "--fold", "2"]
    monkeypatch.setattr(preemption, "_parent_argv", lambda: agent)
    assert preemption.resume_command(Path("/runs/my run"), argv) == (
        "accelerate launch --config_file z2.yaml launch/train.py --fold 2 --set 'eval.val_loss_timesteps=[200, 600]' "
        "--output-dir '/runs/my run' --resume latest")
    monkeypatch.setattr(preemption, "_parent_argv", lambda: ["-bash"])  # started from a shell
    module = ["/site-packages/cxrdist/train/__main__.py", "--all-folds", "--resume", "auto"]
    command = preemption.resume_command(Path("r"), module)
    assert command.endswith(" -m cxrdist.train --all-folds --output-dir r --resume latest")
    assert command.split()[0] in ("python", sys.executable)


def test_the_resume_command_names_the_environments_python_not_the_base_it_links_to(monkeypatch, tmp_path):
    """A virtual environment's python is a symlink to the base interpreter. With the base's folder first on PATH,
    `python` resolves to the same file but runs without the environment's packages: print the full path then."""
    from cxrdist.train import preemption

    base = tmp_path / "base" / "bin"
    venv = tmp_path / "venv" / "bin"
    base.mkdir(parents=True)
    venv.mkdir(parents=True)
    (base / "python").write_text("")
    (base / "python").chmod(0o755)
    (venv / "python").symlink_to(base / "python")
    monkeypatch.setattr(preemption.sys, "executable", str(venv / "python"))
    monkeypatch.setenv("PATH", f"{base}{os.pathsep}{venv}")
    assert preemption._python() == str(venv / "python")
    monkeypatch.setenv("PATH", f"{venv}{os.pathsep}{base}")
    assert preemption._python() == "python"


def test_a_stop_still_running_after_two_thirds_of_the_launchers_grace_says_so(monkeypatch, caplog):
    """torch's elastic agent SIGKILLs TORCH_ELASTIC_SHUTDOWN_TIMEOUT s after passing the signal on: a process still
    busy before then logs what it is doing and the last complete checkpoint, so a SIGKILL does not end it silently."""
    import logging
    import os
    import signal
    import time

    from cxrdist.train import preemption

    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "1")
    with caplog.at_level(logging.WARNING, logger="cxrdist.train.preemption"):
        with preemption.StopSignals(["SIGUSR2"], status=lambda: "saving the checkpoint of step 7") as stop:
            os.kill(os.getpid(), signal.SIGUSR2)
            deadline = time.monotonic() + 10
            while not caplog.records and time.monotonic() < deadline:
                time.sleep(0.05)
    assert stop.received == signal.SIGUSR2
    assert [r.getMessage() for r in caplog.records] == [
        "SIGUSR2 came 1 s ago and this process is still saving the checkpoint of step 7: if it is killed before the "
        "checkpoint is complete, continue from that one"]
