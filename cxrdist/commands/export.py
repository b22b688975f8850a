"""`cxrdist export`: a LoRA checkpoint as a merged standalone pipeline (--merge) or as a .zip (--zip)."""
from __future__ import annotations

import click

from cxrdist.cli_options import friendly_errors


@click.command()
@click.option("--model-path", required=True, metavar="PATH",
              help="LoRA checkpoint folder (or a .zip of one for --merge).")
@click.option("--merge", "mode", flag_value="merge",
              help="Fuse the adapter into its base and write a standalone diffusers pipeline folder.")
@click.option("--zip", "mode", flag_value="zip", help="Pack the checkpoint folder into a .zip archive.")
@click.option("--base", default=None, metavar="PATH|HUB_ID|preset:NAME",
              help="With --merge: the base to fuse into, instead of the one recorded in cxrdist.json.")
@click.option("--out", default=None, metavar="PATH",
              help="--merge: new folder (required). --zip: archive path [<checkpoint>.zip].")
@friendly_errors
def export(model_path: str, mode: str | None, base: str | None, out: str | None) -> None:
    """Export a LoRA checkpoint; the checkpoint itself is only read, never changed."""
    from cxrdist.errors import InputError
    from cxrdist.logging_utils import setup_logging

    setup_logging()
    if mode is None:
        raise InputError("say what to export: --merge (standalone pipeline folder) or --zip (archive)")
    if mode == "merge":
        from cxrdist.sampling.merge import merge_adapter

        if not out:
            raise InputError("--merge needs --out DIR for the merged pipeline folder")
        folder = merge_adapter(model_path, out, base_override=base)
        click.echo(f"wrote merged pipeline to {folder}/ (load it with --model-path {folder} or "
                   f"--set model.pretrained={folder})")
        return
    from cxrdist.sampling.archive import write_zip

    if base:
        raise InputError("--base only applies to --merge")
    click.echo(f"wrote {write_zip(model_path, out)}")
