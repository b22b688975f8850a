"""Progress of long work: tqdm's bar on a terminal, a few plain lines in a log.

On a terminal (or in a notebook) `progress_meter(...)` is a tqdm bar. Anywhere else -- CI logs, nohup, SLURM, a pipe --
tqdm's `\\r` redraws would pile up into one endless line, so it prints one plain line every `every` units or every
`interval` seconds, whichever comes first, and a last line when it closes:

    train: step 120/500 (24%), 3.1 step/s, eta 1m52s
    train: step 500/500 (100%), 3.1 step/s, done in 2m41s

`CXRDIST_PROGRESS=bar|lines|off` forces a mode; `auto` (the default) asks whether stderr is a terminal. Both kinds
share the small interface the call sites use: `update(n)`, `set_postfix(**values)`, `close()` and `with`.
A disabled one (`disable=True`: the other ranks of a launch) prints nothing.
"""
from __future__ import annotations

import math
import os
import sys
import threading
import time
from typing import Any, Callable, Optional, TextIO

from cxrdist.errors import ConfigError

ENV = "CXRDIST_PROGRESS"
MODES = ("auto", "bar", "lines", "off")
LINES_PER_RUN = 10  # with a known total, a plain line every total/10 units ...
INTERVAL_S = 60.0  # ... or after this long without one, whichever comes first


def progress_meter(total: Optional[float] = None, *, desc: str = "", unit: str = "it", initial: float = 0,
                   disable: bool = False, unit_scale: bool = False, unit_divisor: int = 1000,
                   every: Optional[float] = None, interval: Optional[float] = INTERVAL_S, mode: Optional[str] = None,
                   file: Optional[TextIO] = None, clock: Callable[[], float] = time.monotonic, **bar_options: Any):
    """A progress reporter for `total` units (None: unknown) starting at `initial`.

    `mode` (default: $CXRDIST_PROGRESS, else auto) picks the kind; `every` / `interval` set the plain lines' pace
    (default: a tenth of `total` / INTERVAL_S; None turns that trigger off); `bar_options` go to tqdm only.
    """
    chosen = resolve_mode(mode, file if file is not None else sys.stderr)
    if disable or chosen == "off":
        return Silent()
    if chosen == "bar":
        from tqdm.auto import tqdm

        if file is not None:
            bar_options["file"] = file
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit_scale,
                    unit_divisor=unit_divisor, **bar_options)
    return LineProgress(total, desc=desc, unit=unit, initial=initial, unit_scale=unit_scale,
                        unit_divisor=unit_divisor, every=every, interval=interval, file=file, clock=clock)


def resolve_mode(mode: Optional[str], stream: Optional[TextIO]) -> str:
    """bar, lines or off: `mode`, else $CXRDIST_PROGRESS, else (auto) a bar when `stream` is a terminal."""
    chosen = mode or os.environ.get(ENV, "").strip().lower() or "auto"
    if chosen not in MODES:
        raise ConfigError(f"{ENV}={chosen} is not a progress mode: use one of {', '.join(MODES)}")
    if chosen != "auto":
        return chosen
    return "bar" if is_terminal(stream) or "ipykernel" in sys.modules else "lines"


def is_terminal(stream: Optional[TextIO]) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


class Silent:
    """What a disabled reporter is: every call does nothing."""

    n = 0

    def update(self, n: float = 1) -> None:
        pass

    def set_postfix(self, *args: Any, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "Silent":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


class LineProgress:
    """Plain lines for a log: no `\\r`, at most about `total / every` lines plus one per `interval` seconds.

    Thread-safe (parallel downloads update one reporter). The last line is written by `close()`; leaving a `with`
    block on an exception writes none, so an error line printed meanwhile stays the last thing in the log.
    """

    def __init__(self, total: Optional[float], *, desc: str = "", unit: str = "it", initial: float = 0,
                 unit_scale: bool = False, unit_divisor: int = 1000, every: Optional[float] = None,
                 interval: Optional[float] = INTERVAL_S, file: Optional[TextIO] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.unit = total, desc, unit
        self.unit_scale, self.unit_divisor = unit_scale, unit_divisor
        self.n = self._first = initial
        if every is None and total:
            every = max(1, math.ceil(total / LINES_PER_RUN))
        self.every, self.interval = every, interval
        self._next = (initial // every + 1) * every if every else math.inf
        self._file = file if file is not None else sys.stderr
        self._clock = clock
        self._started = self._printed = clock()
        self._postfix: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.closed = False

    def update(self, n: float = 1) -> None:
        with self._lock:
            if self.closed:
                return
            self.n += n
            now = self._clock()
            by_count = self.n >= self._next
            if by_count:
                self._next = (self.n // self.every + 1) * self.every
            by_time = self.interval is not None and now - self._printed >= self.interval
            finished = bool(self.total) and self.n >= self.total  # the last line says it, at close
            if (by_count or by_time) and not finished:
                self._write(self.line(now), now)

    def set_postfix(self, ordered_dict: Optional[dict] = None, refresh: bool = True, **values: Any) -> None:
        """Extra `key=value`s for the next lines (tqdm's signature; `refresh` means nothing here)."""
        with self._lock:
            self._postfix = {**(ordered_dict or {}), **values}

    def close(self) -> None:
        with self._lock:
            if not self.closed:
                self.closed = True
                now = self._clock()
                self._write(self.line(now, final=True), now)

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.closed = True

    def line(self, now: float, final: bool = False) -> str:
        """`desc: step 120/500 (24%), 3.1 step/s, eta 1m52s, key=value` (`done in 2m41s` once final)."""
        parts = [self._amount(self.n) + (f"/{self._amount(self.total, unit=False)}" if self.total else "")]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        elapsed = now - self._started
        rate = (self.n - self._first) / elapsed if elapsed > 0 and self.n > self._first else None
        parts.append(f"{self._rate(rate)}/s")
        if final:
            parts.append(f"done in {duration(elapsed)}")
        elif rate and self.total:
            parts.append(f"eta {duration(max(0.0, self.total - self.n) / rate)}")
        parts += [f"{key}={_value(value)}" for key, value in self._postfix.items()]
        return (f"{self.desc}: " if self.desc else "") + ", ".join(parts)

    def _amount(self, value: float, unit: bool = True) -> str:
        if self.unit_scale:
            return scaled(value, self.unit, self.unit_divisor)
        count = f"{value:g}" if isinstance(value, float) and not value.is_integer() else f"{int(value)}"
        return f"{self.unit} {count}" if unit else count

    def _rate(self, rate: Optional[float]) -> str:
        if rate is None:
            return f"? {self.unit}" if not self.unit_scale else f"?{self.unit}"
        return scaled(rate, self.unit, self.unit_divisor) if self.unit_scale else f"{number(rate)} {self.unit}"

    def _write(self, text: str, now: float) -> None:
        self._printed = now
        try:
            self._file.write(text + "\n")
            self._file.flush()
        except (OSError, ValueError):  # a closed or broken log must not stop the work it reports on
            pass


def number(value: float) -> str:
    """A rate at a glance: 0.042, 3.1, 31.2, 312."""
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if value >= 1 else f"{value:.2g}"


def scaled(value: float, unit: str, divisor: int = 1000) -> str:
    """4.0MiB, 12.3MiB, 512KiB (divisor 1024) or 12.3MB (1000); plain units below the first prefix: 640B."""
    prefixes = ("", "Ki", "Mi", "Gi", "Ti", "Pi") if divisor == 1024 else ("", "k", "M", "G", "T", "P")
    step = 0
    while abs(value) >= divisor and step < len(prefixes) - 1:
        value, step = value / divisor, step + 1
    digits = 0 if step == 0 or abs(value) >= 100 else 1
    return f"{value:.{digits}f}{prefixes[step]}{unit}"


def duration(seconds: float) -> str:
    """42s, 2m03s, 1h05m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _value(value: Any) -> str:
    return number(value) if isinstance(value, float) else str(value)
