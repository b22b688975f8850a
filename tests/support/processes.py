"""The processes a test starts: each one is ended with everything it started, whatever the outcome of the test, and
a launch's rendezvous port comes from outside the range the kernel hands out by itself.

`start` puts a command in a process group and session of its own and marks its environment; `reap` then finds every
process below it -- also a rank whose launcher died first (reparented out of the tree), one in a session of its own
(torchrun starts ranks so) and one stopped by SIGSTOP -- kills them all, and waits for them. `started` pairs the two.
"""
from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import psutil

# Every process a test starts, and whatever that one starts, carries this variable (launchers pass the environment
# on to their ranks): how `reap` finds a process that is no longer below the one the test started.
MARK = "CXRDIST_TEST_LAUNCH"
REAP_WAIT_S = 30.0


def start(cmd: list[str], *, env: dict, cwd, **popen) -> subprocess.Popen:
    """`subprocess.Popen(cmd, ...)` in a process group and session of its own, marked for `reap`."""
    mark = f"{os.getpid()}-{uuid.uuid4().hex}"
    proc = subprocess.Popen(cmd, cwd=cwd, env={**env, MARK: mark}, start_new_session=True, **popen)
    proc.cxrdist_mark = mark  # type: ignore[attr-defined]
    return proc


@contextmanager
def started(cmd: list[str], *, env: dict, cwd, **popen) -> Iterator[subprocess.Popen]:
    """`start`, and `reap` on leaving the block, however it is left."""
    proc = start(cmd, env=env, cwd=cwd, **popen)
    try:
        yield proc
    finally:
        reap(proc)


def _members(proc: subprocess.Popen) -> list[psutil.Process]:
    """The processes below `proc` (not `proc` itself): every process whose environment carries its mark, and while
    `proc` is not reaped (its PID cannot be another's then) also its descendants and its process group."""
    found: dict[int, psutil.Process] = {}
    ours = proc.returncode is None  # Popen sets it when it reaps the process: from then on the PID may be reused
    if ours:
        try:
            found.update((p.pid, p) for p in psutil.Process(proc.pid).children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    mark = getattr(proc, "cxrdist_mark", None)
    for p in psutil.process_iter():
        if p.pid in found or p.pid in (proc.pid, os.getpid()):
            continue
        try:
            if (ours and os.getpgid(p.pid) == proc.pid) or (mark and p.environ().get(MARK) == mark):
                found[p.pid] = p
        except (psutil.Error, OSError):
            continue  # gone meanwhile, a zombie, or another user's
    return list(found.values())


def _alive(p: psutil.Process) -> bool:
    try:  # is_running: not a new process with a reused PID; a zombie is dead (its parent, maybe init, reaps it)
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill(p: psutil.Process) -> None:
    """SIGKILL, then SIGCONT: SIGKILL ends a stopped process too; the SIGCONT leaves nothing stopped either way."""
    for sig in (signal.SIGKILL, signal.SIGCONT):
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            return


def reap(proc: subprocess.Popen, wait_s: float = REAP_WAIT_S) -> None:
    """Kill `proc` and every process below it (see `_members`), stopped ones included, and wait until they are gone;
    `proc` itself is reaped last (keeping its return code where it had exited). A process still there after
    `wait_s` is an error: a test does not leave processes behind silently."""
    deadline = time.monotonic() + wait_s
    while True:
        members = [p for p in _members(proc) if _alive(p)]
        if proc.returncode is None:  # not reaped yet, so its PID and group are still its own
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # its group, also a member started after the listing
            except (ProcessLookupError, PermissionError):
                pass
            for sig in (signal.SIGKILL, signal.SIGCONT):
                try:
                    os.kill(proc.pid, sig)  # a zombie until reaped (unless something else reaped it)
                except ProcessLookupError:
                    pass
        for p in members:
            _kill(p)
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        until = min(deadline, time.monotonic() + 5.0)
        while (left := [p for p in members if _alive(p)]) and time.monotonic() < until:
            time.sleep(0.05)  # not psutil.wait_procs: a zombie whose new parent does not reap it would count as alive
        left += [p for p in _members(proc) if _alive(p) and p not in members]
        if not left and proc.returncode is not None:
            return
        if time.monotonic() > deadline:
            names = [p.pid for p in left]
            raise RuntimeError(f"processes of {proc.args!r} still there after {wait_s:.0f} s: {names}")


# -- rendezvous ports -----------------------------------------------------------------------------------------
# A port found free by binding port 0 lies in the ephemeral range, from which the kernel hands out ports to every
# bind(0) and outgoing connection on the host -- gloo's own among them -- until the launcher binds it. Ports are
# taken below that range instead, from a slice per pytest-xdist worker at a random place (other pytest sessions
# on this host pick elsewhere), never one this process handed out before; `port_taken` recognises the rare launch
# that still lost its port, which a caller retries on another (nothing has started training then: the launcher
# binds the rendezvous store before it starts any rank).
LOWEST_PORT = 15000
PORT_TRIES = 3
_handed_out: set[int] = set()


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("", port))  # all addresses, as the rendezvous store does; no SO_REUSEADDR
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port that no process holds now, below the kernel's ephemeral range (see above)."""
    high = _ephemeral_start()
    if high - LOWEST_PORT < 1000:  # an unusual range: ask the kernel
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    worker = int(re.sub(r"\D", "", os.environ.get("PYTEST_XDIST_WORKER", "")) or 0) % workers
    span = (high - LOWEST_PORT) // workers
    low = LOWEST_PORT + worker * span
    rng = random.Random()  # seeded from the OS
    for _ in range(500):
        port = low + rng.randrange(span)
        if port not in _handed_out and _bindable(port):
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no free port in {low}-{low + span - 1}")


def port_taken(stderr: str) -> bool:
    """The launch failed because its rendezvous port was taken between `free_port` and the launcher's bind (torch's
    store failing to listen, or accelerate finding it in use before a multi-machine launch)."""
    return ("EADDRINUSE" in stderr or "address already in use" in stderr.lower()
            or "but another process is utilizing it" in stderr)


def on_another_port(cmd: list[str], env: dict) -> Optional[tuple[list[str], dict]]:
    """(cmd, env) with the port after `--main_process_port` and in MASTER_PORT replaced by a new `free_port()`;
    None when neither names one."""
    cmd, env, port = list(cmd), dict(env), str(free_port())
    changed = False
    for i, arg in enumerate(cmd[:-1]):
        if arg == "--main_process_port":
            cmd[i + 1], changed = port, True
            break
    if "MASTER_PORT" in env:
        env["MASTER_PORT"], changed = port, True
    return (cmd, env) if changed else None
