"""Processes that hold, or held, a folder's lock (cxrdist.locks): a live one, and the PID of one that is gone."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Iterator

import pytest

from support.processes import started

# The kernel's PID_MAX_LIMIT on 64-bit (include/linux/threads.h): /proc/sys/kernel/pid_max cannot be set above it, and
# PIDs are below pid_max.
PID_MAX_LIMIT = 1 << 22


@pytest.fixture
def other_process() -> Iterator[subprocess.Popen]:
    """A live process of this host whose PID a test writes into a lock file."""
    with started([sys.executable, "-c", "import time; time.sleep(120)"], env=dict(os.environ), cwd=None) as proc:
        yield proc


def dead_pid() -> int:
    """A PID that no process has or can get: the holder of a lock that is gone. A reaped child's PID would do only
    until the kernel hands it out again (pid_max is 32768 on many hosts: PIDs wrap within minutes)."""
    pid = PID_MAX_LIMIT
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return pid
    raise AssertionError(f"PID {pid} is alive")  # a kernel with another limit: never seen
