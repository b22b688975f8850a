"""`cxrdist init-model`: write a named preset as an ordinary diffusers pipeline folder."""
from __future__ import annotations

import click

from cxrdist.cli_options import friendly_errors


@click.command("init-model")
@click.argument("preset")
@click.option("--out", required=True, metavar="DIR", help="New (or empty) folder for the pipeline.")
@friendly_errors
def init_model(preset: str, out: str) -> None:
    """Write PRESET (tiny, tiny-minilm, sd15-arch, sd15-arch-narrow, pixart-sigma-tiny, sana-tiny, sana-arch,
    sana-arch-narrow) as a diffusers folder that every command loads with from_pretrained, e.g.
    --set model.pretrained=DIR."""
    from cxrdist.logging_utils import setup_logging
    from cxrdist.models.presets import PRESETS, save_preset

    setup_logging()
    folder = save_preset(preset, out)
    click.echo(f"wrote preset '{preset}' ({PRESETS[preset].description}) to {folder}/")
    click.echo(f"use it with --set model.pretrained={folder}")
