"""Registry of CLI commands; each module exposes one click command (or group) and only parses and calls."""
from __future__ import annotations

from cxrdist.commands.cache_latents import cache_latents_cmd
from cxrdist.commands.evaluate import evaluate
from cxrdist.commands.export import export
from cxrdist.commands.info import info
from cxrdist.commands.init_model import init_model
from cxrdist.commands.pretrain import pretrain
from cxrdist.commands.sample import sample
from cxrdist.commands.shard import shard
from cxrdist.train.cli import main as train

shard.add_command(cache_latents_cmd)
# `cxrdist train` is the training command of launch/train.py and `python -m cxrdist.train` (all three stay):
# `accelerate launch launch/train.py ...`, or `cxrdist train ...` in one process
train.name = "train"
COMMANDS = [info, init_model, shard, pretrain, train, sample, export, evaluate]
