"""cxrdist.processes.kill_tree ends a launcher and the ranks it started in sessions of their own."""
from __future__ import annotations

import subprocess
import sys
import time

import psutil

from cxrdist.processes import kill_tree

# A stand-in for torchrun: it starts a "rank" in a new session (as torch's elastic agent does), prints its pid and
# waits. Killing its process group would leave the rank running.
LAUNCHER = """
import subprocess, sys, time
rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
print(rank.pid, flush=True)
time.sleep(600)
"""


def test_kill_tree_reaches_ranks_in_sessions_of_their_own():
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdout=subprocess.PIPE, text=True)
    rank_pid = int(launcher.stdout.readline())
    rank = psutil.Process(rank_pid)
    assert rank.ppid() == launcher.pid and rank.status() != psutil.STATUS_ZOMBIE
    started = time.monotonic()
    kill_tree(launcher.pid)
    launcher.wait(timeout=10)  # kill_tree reaped it already (so its return code reads 0 here)
    assert not psutil.pid_exists(launcher.pid)
    assert not rank.is_running() or rank.status() == psutil.STATUS_ZOMBIE
    assert time.monotonic() - started < 10
    kill_tree(launcher.pid)  # gone already: nothing to do, no error
