"""Stopping a run when asked -- a scheduler's preemption or time-limit signal, a Ctrl-C -- with its work saved.

What cluster trainers do (torchtitan, Lightning's SLURM plugin, SimpleTuner): the signal handler only records
the request (`StopSignals`); the training loop asks at each optimizer-step boundary, the ranks agree with one
all-reduce (max) of the recorded signal per step -- so all stop after the same step, although the signal reaches
them at different moments, or reaches only some of them -- and the run writes a complete checkpoint through the
normal checkpoint path (collective under DeepSpeed). The main process then prints one line saying where the
checkpoint is and the exact command that continues the run, and every rank exits with 128 + the signal's number
(143 for SIGTERM, 138 for SIGUSR1, 130 for SIGINT): what a process killed by that signal reports, so a shell, a
scheduler or a workflow tool sees "stopped, not finished", never success. launch/slurm/train.sbatch requeues
the job on its time-limit signal and the requeued job continues with `--resume auto`.

Time to do it in: under `accelerate launch` with several processes, torch.distributed's elastic agent forwards
the SIGTERM / SIGINT it receives (and SIGUSR1 when PET_SIGNALS_TO_HANDLE names it) to every rank, then SIGKILLs
the ranks TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds later (30 by default); SLURM allows KillWait or a partition's
GraceTime. The step in progress and one checkpoint must fit in that time. A process still busy after two thirds
of it logs a warning naming the last complete checkpoint, so a SIGKILL that follows does not end it silently.

A second SIGINT (a second Ctrl-C, a second or more after the first) stops at once, without a checkpoint. Other
repeated signals are ignored: SLURM signals every process of a job step and the elastic agent forwards the same
signal again, so each rank sees one request twice.
"""
from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from cxrdist.errors import CxrdistError, write_line

log = logging.getLogger(__name__)

REPEAT_INTERRUPT_S = 1.0  # a SIGINT this soon after the first is the same Ctrl-C delivered twice
SHUTDOWN_TIMEOUT_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"
DEFAULT_GRACE_S = 30.0  # torch's elastic agent and SLURM's default KillWait


class StopRequested(CxrdistError):
    """The run stopped at a step boundary because a signal in train.preempt_signals asked it to."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def announce(line: str) -> None:
    """One line on stderr at once, on a line of its own below a progress bar (cxrdist.errors.write_line)."""
    write_line(line)


def grace_s() -> float:
    """Seconds between the signal and the SIGKILL that follows it under torch's elastic agent."""
    try:
        return max(1.0, float(os.environ.get(SHUTDOWN_TIMEOUT_ENV, DEFAULT_GRACE_S)))
    except ValueError:
        return DEFAULT_GRACE_S


class StopSignals:
    """Records the first of `names` this process receives, while installed (a context manager; main thread only).

    `status` is called, from a timer thread, when the process is still running two thirds of the grace time
    after the signal: it returns what the process is doing and where its last checkpoint is, for the warning.
    """

    def __init__(self, names: Sequence[str], status: Optional[Callable[[], str]] = None):
        self.signals = [getattr(signal, name) for name in names]
        self.status = status
        self.received = 0  # the first signal's number; 0 while none came
        self._received_at = 0.0
        self._previous: dict[int, object] = {}
        self._timer: Optional[threading.Timer] = None

    def install(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            log.debug("not on the main thread: signals keep their default actions")
            return self
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __enter__(self) -> "StopSignals":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()

    def restore(self) -> None:
        """The handlers from before install(); safe to call more than once."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def ignore_from_now(self) -> None:
        """Ignore these signals until the process ends (kept past Python's own shutdown, unlike a Python handler):
        once the checkpoint is written the process only exits, and a launcher that signals the last rank when the
        first has exited would otherwise kill it during that exit and replace its status."""
        if self._previous:
            if self._timer is not None:
                self._timer.cancel()
            for signum in self.signals:
                signal.signal(signum, signal.SIG_IGN)

    def _handle(self, signum: int, frame) -> None:
        # Only records: the loop acts at the next step boundary, where every rank can agree and save.
        now = time.monotonic()
        if not self.received:
            self.received, self._received_at = signum, now
            self._start_timer()
            again = " (Ctrl-C again to stop at once, without one)" if signum == signal.SIGINT else ""
            log.info("%s received: stopping after the current optimizer step, with a checkpoint%s",
                     signal_name(signum), again)
            return
        if signum == signal.SIGINT and now - self._received_at >= REPEAT_INTERRUPT_S:
            self.restore()
            raise KeyboardInterrupt

    def _start_timer(self) -> None:
        if self.status is None:
            return
        delay = grace_s() * 2 / 3
        self._timer = threading.Timer(delay, self._warn_still_running, args=(delay,))
        self._timer.daemon = True
        self._timer.start()

    def _warn_still_running(self, waited: float) -> None:
        log.warning("%s came %.0f s ago and this process is still %s: if it is killed before the checkpoint is "
                    "complete, continue from that one", signal_name(self.received), waited, self.status())

    def agreed(self, accelerator) -> int:
        """The signal some rank received (the largest number when they differ), 0 when none did. Collective: every
        rank calls it at the same step boundary."""
        if accelerator.num_processes < 2:
            return self.received
        flag = torch.tensor([self.received], dtype=torch.int64, device=accelerator.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())


# -- the command that continues a run ---------------------------------------------------------------------
_MODULE_MAIN = os.path.join("cxrdist", "train", "__main__.py")


def _without_options(args: Sequence[str], options: Sequence[str]) -> list[str]:
    """`args` without each of `options` and its value (`--opt value` and `--opt=value`)."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        elif not any(arg.startswith(option + "=") for option in options):
            kept.append(arg)
    return kept


def _parent_argv() -> list[str]:
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:  # not Linux, or the parent is gone
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _python() -> str:
    """`python` when that names this interpreter in this environment, else its path. The folders are compared
    unresolved: a virtual environment's python is a symlink to its base interpreter, so the two resolve to one
    file, yet the base one has none of the environment's packages."""
    found = shutil.which("python")
    same_folder = found and os.path.abspath(os.path.dirname(found)) == os.path.abspath(os.path.dirname(sys.executable))
    return "python" if same_folder else sys.executable


def launch_prefix(script: list[str], parent: Optional[list[str]] = None) -> list[str]:
    """What precedes the training script in the command that started this run: the launcher's own command line
    (`accelerate launch --config_file ...`) when the parent process is one that ran `script`, else `python`."""
    parent = _parent_argv() if parent is None else parent
    for i in range(len(parent) - len(script) + 1):
        if parent[i:i + len(script)] == script:
            prefix = parent[:i]
            # an entry-point script shows as `/venv/bin/python /venv/bin/accelerate launch ...`
            if len(prefix) >= 2 and Path(prefix[0]).name.startswith("python") and \
                    Path(prefix[1]).name in ("accelerate", "torchrun"):
                prefix = [Path(prefix[1]).name, *prefix[2:]]
            return prefix
    return [_python()]


def resume_command(output_root: Path, argv: Optional[Sequence[str]] = None) -> str:
    """The command line that continues this run from its latest checkpoint: this run's own command with
    `--output-dir` set to the run's root folder and `--resume latest`."""
    argv = list(sys.argv if argv is None else argv)
    script = ["-m", "cxrdist.train"] if argv[0].endswith(_MODULE_MAIN) else [argv[0]]
    args = _without_options(argv[1:], ("--resume", "--output-dir"))
    return shlex.join([*launch_prefix(script), *script, *args, "--output-dir", str(output_root), "--resume", "latest"])
