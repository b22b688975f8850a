"""Shared CLI plumbing: config options on every command and one-line errors for our known failures."""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import click

from cxrdist.errors import CxrdistError
from cxrdist.fileio import is_disk_full


def config_options(func: Callable) -> Callable:
    """Add `--config` and repeatable `--set section.key=value` to a command."""
    func = click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                        help="Override one config value, e.g. --set train.batch_size=4 (repeatable).")(func)
    func = click.option("--config", "config", default=None, metavar="PRESET|FILE",
                        help="Config preset name (dev, product, demo) or a YAML file.")(func)
    return func


def load_command_config(config: str | None, overrides: tuple[str, ...], *, command: str,
                        reads: tuple[str, ...]):
    """The config of a command that reads only the `reads` sections: a `--set` on another section would do nothing
    there, so it is refused in one line (a --config file may hold every section: presets are shared)."""
    from cxrdist.config import Config, load_config, parse_overrides
    from cxrdist.errors import ConfigError

    cfg = load_config(config, overrides)  # unknown keys and bad values first: they name what is wrong exactly
    sections = {f.name for f in dataclasses.fields(Config)}
    for item in overrides:
        section = next(iter(parse_overrides([item])))
        if section in sections and section not in reads:
            raise ConfigError(f"--set {item}: `cxrdist {command}` reads no {section}.* setting (only "
                              f"{', '.join(s + '.*' for s in reads)}): drop it")
    return cfg


def friendly_errors(func: Callable) -> Callable:
    """Turn our own errors (and a few OS ones) into a one-line message with exit code 1."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except CxrdistError as exc:
            if exc.reported:  # its line is already out (cxrdist.errors.report_now)
                raise SystemExit(1) from None
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            if is_disk_full(exc):
                raise click.ClickException(f"disk full while writing {exc.filename or 'output'}: free space and rerun") from None
            if isinstance(exc, PermissionError):
                raise click.ClickException(f"permission denied: {exc.filename}: choose a writable location") from None
            raise

    return wrapper
