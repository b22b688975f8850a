"""Processes that hold, or held, a folder's lock (cxrdist.locks): a live one, and the PID of one that is gone."""
from __future__ import annotations

import subprocess
import sys
from typing import Iterator

import pytest


@pytest.fixture
def other_process() -> Iterator[subprocess.Popen]:
    """A live process of this host whose PID a test writes into a lock file."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid
