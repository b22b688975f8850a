"""The `cxrdist` command: a click group. Each command lives in cxrdist/commands/ and stays thin."""
from __future__ import annotations

import click

from cxrdist import __version__
from cxrdist.commands import COMMANDS


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cxrdist")
def main() -> None:
    """Shard chest X-ray datasets, fine-tune text-to-X-ray models with LoRA, and sample synthetic radiographs."""


for _command in COMMANDS:
    main.add_command(_command)


if __name__ == "__main__":  # pragma: no cover
    main()
