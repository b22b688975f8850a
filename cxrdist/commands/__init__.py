"""Registry of CLI commands; each module exposes one click command (or group) and only parses and calls."""
from __future__ import annotations

from cxrdist.commands import cache_latents as _cache_latents  # noqa: F401  adds `shard cache-latents`
from cxrdist.commands.evaluate import evaluate
from cxrdist.commands.export import export
from cxrdist.commands.info import info
from cxrdist.commands.init_model import init_model
from cxrdist.commands.pretrain import pretrain
from cxrdist.commands.sample import sample
from cxrdist.commands.shard import shard

COMMANDS = [info, init_model, shard, pretrain, sample, export, evaluate]
