"""`cxrdist shard cache-latents DIR --pretrained X`: add VAE latents to a shard set (training skips the VAE).

A command of the `shard` group, added to it by the command registry (cxrdist.commands).
"""
from __future__ import annotations

import click

from cxrdist.cli_options import friendly_errors


@click.command("cache-latents")
@click.argument("shards_dir", type=click.Path(file_okay=False))
@click.option("--pretrained", required=True, help="Base model whose VAE encodes the images (folder, hub id, preset:NAME).")
@click.option("--vae-dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
              help="VAE precision; training must use the same (model.vae_dtype).")
@click.option("--batch-size", default=32, show_default=True)
@friendly_errors
def cache_latents_cmd(shards_dir, pretrained, vae_dtype, batch_size) -> None:
    """Store each sample's VAE latents (latents.npy) in its shard and the VAE fingerprint in index.json.

    The shards are swapped in all together once every one is written; a run that was stopped while swapping
    them in is finished by running this again (or by `cxrdist shard ... --resume`)."""
    import torch

    from cxrdist.data.latents import cache_latents, check_can_cache
    from cxrdist.models.loading import load_vae

    check_can_cache(shards_dir)  # a missing, remote, read-only or busy set fails before the VAE loads
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae = load_vae(pretrained, vae_dtype=vae_dtype).to(device)
    info = cache_latents(shards_dir, vae, base=pretrained, vae_dtype=vae_dtype, batch_size=batch_size)
    if info["finished_swap"]:
        same = "" if info["encoded"] else f" (latents {info['shape']} of this VAE, {info['vae_fingerprint']})"
        click.echo(f"finished the stopped cache-latents of {shards_dir}: all {info['finished_swap']} shards with "
                   f"latents swapped in and index.json updated{same}")
    if info["encoded"]:
        click.echo(f"cached latents {info['shape']} for {info['samples']} samples in {info['shards']} shards of "
                   f"{shards_dir} (VAE {info['vae_fingerprint']} from {pretrained})")


__all__ = ["cache_latents_cmd"]
