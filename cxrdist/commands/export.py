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
@click.option("--merge", "merge_flag", is_flag=True,
              help="Same as --format merged. Not with --zip: they are two exports, run one after the other.")
@click.option("--zip", "zip_flag", is_flag=True,
              help="Same as --format zip (the checkpoint folder as it is). Not with --merge: to share a merged "
                   "pipeline, export it with --merge, then zip that folder.")
@click.option("--base", default=None, metavar="PATH|HUB_ID|preset:NAME",
              help="With --format merged: the base to fuse into, instead of the one recorded in cxrdist.json.")
@click.option("--out", default=None, metavar="PATH",
              help="merged: new folder (required). zip: archive path [<checkpoint>.zip]. "
                   "kohya: new .safetensors file (required).")
@friendly_errors
def export(model_path: str, fmt: str | None, merge_flag: bool, zip_flag: bool, base: str | None,
           out: str | None) -> None:
    """Export a LoRA checkpoint; the checkpoint itself is only read, never changed. Every export appears whole at
    --out or not at all."""
    from cxrdist.errors import InputError
    from cxrdist.logging_utils import setup_logging

    setup_logging()
    if merge_flag and zip_flag:
        # --out is a folder for one and an archive for the other: which of them the user meant cannot be guessed
        raise InputError("--merge and --zip are two exports: give one (merge with --out DIR, then zip that folder "
                         "with `cxrdist export --model-path DIR --zip` if you want an archive of it)")
    mode = "merged" if merge_flag else "zip" if zip_flag else None
    if fmt and mode and fmt != mode:
        flag = "--merge" if mode == "merged" else "--zip"
        raise InputError(f"{flag} and --format {fmt} disagree: give one of them")
    fmt = fmt or mode
    if fmt is None:
        raise InputError("say what to export: --format merged|zip|kohya (--merge and --zip still work)")
    if base and fmt != "merged":
        raise InputError("--base only applies to --format merged (--merge)")
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
