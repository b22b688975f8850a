"""`cxrdist pretrain`: train a tiny phantom base (autoencoder, then denoiser) from scratch and save it."""
from __future__ import annotations

import click

from cxrdist.cli_options import config_options, friendly_errors


@click.command()
@click.option("--shards", required=True, type=click.Path(file_okay=False), help="Phantom shard set (has index.json).")
@click.option("--out", required=True, type=click.Path(), help="Output diffusers folder for the base.")
@config_options
@friendly_errors
def pretrain(shards: str, out: str, config: str | None, overrides: tuple[str, ...]) -> None:
    """Pretrain a tiny base on phantoms, captioned with how each film was taken (knows anatomy and spatial
    words, no findings). pretrain.preset picks the family: tiny-minilm (UNet) or sana-minilm (Sana)."""
    import yaml

    from cxrdist.cli_options import load_command_config
    from cxrdist.logging_utils import setup_logging
    from cxrdist.train.pretrain import pretrain as run_pretrain

    setup_logging()
    cfg = load_command_config(config, overrides, command="pretrain", reads=("pretrain",))
    result = run_pretrain(shards, out, cfg.pretrain, resolved_config=yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    click.echo(f"base written to {result.out}: {result.train_images} images, VAE PSNR {result.vae_psnr:.2f} dB, "
               f"denoiser loss {result.unet_final_loss:.4f} (autoencoder {result.vae_seconds:.0f} s, denoiser "
               f"{result.unet_seconds:.0f} s)")
