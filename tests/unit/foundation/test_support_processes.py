"""The tests' own process handling (tests/support/processes.py, lock_holders.py): `reap` leaves nothing behind, a
stopped rank whose launcher is gone included; a dead holder's PID is never alive; rendezvous ports avoid the range
the kernel hands out by itself."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from support.lock_holders import dead_pid
from support.processes import _ephemeral_start, free_port, on_another_port, port_taken, reap, start

# A stand-in for torchrun: a "rank" in a session of its own that stops itself (a silent rank), its PID printed.
LAUNCHER = """
import subprocess, sys, time
rank = subprocess.Popen([sys.executable, "-c", "import os, signal, time; os.kill(os.getpid(), signal.SIGSTOP); "
                         "time.sleep(600)"], start_new_session=True)
print(rank.pid, flush=True)
if sys.argv[1] == "stay":
    time.sleep(600)
"""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_stopped(pid: int) -> None:
    deadline = time.monotonic() + 30
    while psutil.Process(pid).status() != psutil.STATUS_STOPPED:
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.parametrize("launcher_mode, status", [("stay", -9), ("go", 0)], ids=["live-launcher", "launcher-exited"])
def test_reap_ends_a_stopped_rank_and_keeps_an_exited_launchers_status(launcher_mode, status):
    """Below a live launcher (killed: -9), and as an orphan whose launcher already exited (its status 0 is kept):
    an exited launcher's rank is outside its tree and process group, and only the environment marker finds it."""
    launcher = start([sys.executable, "-c", LAUNCHER, launcher_mode], env=dict(os.environ), cwd=None,
                     stdout=subprocess.PIPE, text=True)
    try:
        rank = int(launcher.stdout.readline())
        _wait_stopped(rank)
        if launcher_mode == "go":
            launcher.wait(timeout=30)
    finally:
        reap(launcher)
        launcher.stdout.close()
    assert _gone(rank) and launcher.returncode == status


def test_a_dead_holders_pid_is_not_alive():
    pid = dead_pid()
    assert not psutil.pid_exists(pid) and pid >= int(Path("/proc/sys/kernel/pid_max").read_text())


def test_ports_lie_below_the_ephemeral_range_and_a_lost_one_is_replaced():
    ports = [free_port() for _ in range(5)]
    assert len(set(ports)) == 5 and all(p < _ephemeral_start() for p in ports)
    assert port_taken("The server socket has failed to listen ... code: -98, name: EADDRINUSE, message: address "
                      "already in use") and not port_taken("Error: rank 0 lost the other ranks")
    cmd, env = on_another_port(["accelerate", "--main_process_port", "1", "train.py"], {"MASTER_PORT": "1"})
    assert cmd[2] == env["MASTER_PORT"] != "1" and cmd[::3] == ["accelerate", "train.py"]
    assert on_another_port(["python", "train.py"], {}) is None
