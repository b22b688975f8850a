"""Latent caching: store each sample's VAE latents in its shard so training skips the VAE encoder.

`cache_latents(shards_dir, vae, base=...)` rewrites every shard with an added `latents.npy` (float16, the
posterior mean before the scaling factor: the same tensor the trainer computes on the fly) and records the
VAE's fingerprint under "latents" in index.json. All new shards are written to temporary names first, then
swapped in and index.json rewritten last (cxrdist.data.index.record_latents), so an interrupted run leaves the
old, consistent shard set. The trainer refuses latents made by another VAE (or VAE precision). The VAE comes
from the caller (`cxrdist shard cache-latents` loads it): the data layer knows no model loading.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxrdist.data.imageio import to_model_range
from cxrdist.data.index import latents_record, load_index, record_latents
from cxrdist.data.tars import read_samples, write_tar
from cxrdist.errors import DataError
from cxrdist.progress import progress_meter

log = logging.getLogger(__name__)

LATENTS_EXT = "latents.npy"


def vae_fingerprint(vae) -> str:
    """sha256 of the VAE's config and weights (with their dtype): latents from another VAE are refused.

    Where the weights were loaded from (`_name_or_path`) and the diffusers version that saved them are left out:
    the same VAE in another folder or on another machine makes the same latents."""
    config = {k: v for k, v in dict(vae.config).items() if k not in ("_name_or_path", "_diffusers_version")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def latents_info(shards_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The "latents" record of index.json, or None when the shards carry no latents."""
    return latents_record(shards_dir)


def check_cached_latents(shards_dir, vae) -> bool:
    """True when the shards carry latents made by exactly this VAE; DataError when made by another."""
    info = latents_info(shards_dir)
    if not info:
        return False
    mine = vae_fingerprint(vae)
    if info.get("vae_fingerprint") != mine:
        raise DataError(f"latents in {shards_dir} were made by VAE {info.get('vae_fingerprint')} ({info.get('base')}), "
                        f"this run's VAE is {mine}: rerun `cxrdist shard cache-latents {shards_dir} --pretrained "
                        "<this base>` or set train.use_cached_latents=false")
    return True


def _pixels(png: bytes, channels: int) -> torch.Tensor:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        array = np.asarray(image)
    return torch.from_numpy(to_model_range(array))[None].expand(channels, -1, -1)  # [-1, 1], like the loader


@torch.no_grad()
def _encode(vae, pngs: list[bytes], device) -> list[bytes]:
    channels = int(vae.config.in_channels)
    pixels = torch.stack([_pixels(p, channels) for p in pngs]).to(device=device, dtype=vae.dtype)
    means = vae.encode(pixels).latent_dist.mode().float().cpu().numpy().astype(np.float16)
    out = []
    for mean in means:
        buf = io.BytesIO()
        np.save(buf, mean)
        out.append(buf.getvalue())
    return out


def writable_index(shards_dir: str | os.PathLike):
    """The index of a shard set that latents can be written into: a local one (DataError for a URL)."""
    index = load_index(shards_dir)
    if index.remote:
        raise DataError(f"{shards_dir}: cache-latents rewrites the shards, so it needs a local shard set: run it "
                        "before uploading, or on a local copy")
    return index


def cache_latents(shards_dir: str | os.PathLike, vae, *, base: str, vae_dtype: str = "fp32", batch_size: int = 32,
                  progress: bool = True) -> dict[str, Any]:
    """Add the latents of `vae` (already on its device, in eval mode) to every shard; `base` and `vae_dtype` are
    recorded with them. Returns the latents record plus shard and sample counts."""
    index = writable_index(shards_dir)
    root = Path(shards_dir)
    device = next(vae.parameters()).device
    staged: list[tuple[Path, Path, dict]] = []
    samples: list = []
    bar = progress_meter(index.count(list(index.splits)), unit="img", desc="cache latents", disable=not progress)
    try:
        with bar:  # a failure leaves no closing progress line after the last one
            for entry in index.shards(list(index.splits)):
                samples = list(read_samples(entry["path"]))
                for start in range(0, len(samples), batch_size):
                    chunk = samples[start:start + batch_size]
                    for (_, parts), npy in zip(chunk, _encode(vae, [p["png"] for _, p in chunk], device)):
                        parts[LATENTS_EXT] = npy
                    bar.update(len(chunk))
                staging = Path(entry["path"] + ".latents")
                digest, size = write_tar(staging, samples)
                staged.append((staging, Path(entry["path"]), {"sha256": digest, "bytes": size}))
    except BaseException:
        for staging, _, _ in staged:
            staging.unlink(missing_ok=True)
        raise
    shape = list(np.load(io.BytesIO(samples[0][1][LATENTS_EXT])).shape) if staged else []
    record = {"vae_fingerprint": vae_fingerprint(vae), "base": base, "vae_dtype": vae_dtype,
              "shape": shape, "dtype": "float16", "what": "VAE posterior mean, before scaling_factor"}
    for staging, final, _ in staged:
        os.replace(staging, final)
    record_latents(root, {final.name: info for _, final, info in staged}, record)
    return record | {"shards": len(staged), "samples": index.count(list(index.splits))}
