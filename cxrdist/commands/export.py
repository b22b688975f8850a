"""`cxrdist export`: a LoRA checkpoint as a merged standalone pipeline, a .zip, or a kohya-format LoRA file."""
from __future__ import annotations

import click

from cxrdist.cli_options import friendly_errors

FORMATS = ("merged", "zip", "kohya")


@click.command()
@click.option("--model-path", required=True, metavar="PATH",
              help="LoRA checkpoint folder (or a .zip of one for --format merged).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
              help="merged: fuse the adapter into its base and write a standalone diffusers pipeline folder. "
                   "zip: pack the checkpoint folder into a .zip archive. kohya: one .safetensors LoRA file with "
                   "kohya key names, for AUTOMATIC1111, ComfyUI and kohya-ss.")
@click.option("--base", default=None, metavar="PATH|HUB_ID|preset:NAME",
              help="With --format merged: the base to fuse into, instead of the one recorded in cxrdist.json.")
@click.option("--out", default=None, metavar="PATH",
              help="merged: new folder (required). zip: archive path [<checkpoint>.zip]. "
                   "kohya: new .safetensors file (required).")
@friendly_errors
def export(model_path: str, fmt: str | None, base: str | None, out: str | None) -> None:
    """Export a LoRA checkpoint; the checkpoint itself is only read, never changed. Every export appears whole at
    --out or not at all."""
    from cxrdist.errors import InputError
    from cxrdist.logging_utils import setup_logging

    setup_logging()
    if fmt is None:  # checked here, not by click, whose message for a missing choice spans four lines
        raise InputError("say what to export: --format merged|zip|kohya")
    if base and fmt != "merged":
        raise InputError("--base only applies to --format merged")
    if fmt == "merged":
        from cxrdist.sampling.merge import merge_adapter

        if not out:
            raise InputError("--format merged needs --out DIR for the merged pipeline folder")
        folder = merge_adapter(model_path, out, base_override=base)
        click.echo(f"wrote merged pipeline to {folder}/ (load it with --model-path {folder} or "
                   f"--set model.pretrained={folder})")
        return
    if fmt == "kohya":
        from cxrdist.sampling.kohya import export_kohya

        if not out:
            raise InputError("--format kohya needs --out FILE.safetensors for the LoRA file")
        done = export_kohya(model_path, out)
        text = f" + {done.text_modules} text-encoder" if done.text_modules else ""
        click.echo(f"wrote {done.path} (kohya LoRA: {done.unet_modules} UNet{text} modules); load it on base "
                   f"'{done.base}', prompt template '{done.prompt_template}'")
        return
    from cxrdist.sampling.archive import write_zip

    click.echo(f"wrote {write_zip(model_path, out)}")
