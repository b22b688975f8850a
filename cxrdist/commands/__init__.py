"""Registry of CLI commands; each module exposes one click command (or group) and only parses and calls."""
from __future__ import annotations

import importlib

# (module, attribute) pairs; a module missing here means the command is not built yet.
_ENTRIES = [
    ("info", "info"),
    ("init_model", "init_model"),
    ("sample", "sample"),
    ("export", "export"),
    ("shard", "shard"),
    ("cache_latents", "shard"),  # adds `shard cache-latents` to the shard group (same group object)
    ("evaluate", "evaluate"),
    ("pretrain", "pretrain"),
]


def _load():
    commands = []
    for module, attr in _ENTRIES:
        try:
            mod = importlib.import_module(f"cxrdist.commands.{module}")
        except ModuleNotFoundError as exc:
            if exc.name == f"cxrdist.commands.{module}":
                continue
            raise
        commands.append(getattr(mod, attr))
    return commands


COMMANDS = _load()
