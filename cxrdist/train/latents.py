"""Latent caching: store each sample's VAE latents in its shard so training skips the VAE encoder.

`cache_latents(shards_dir, pretrained)` rewrites every shard with an added `latents.npy` (float16, the
posterior mean before the scaling factor: the same tensor the trainer computes on the fly) and records the
VAE's fingerprint under "latents" in index.json. All new shards are written to temporary names first, then
swapped in and index.json rewritten last, so an interrupted run leaves the old, consistent shard set.
The trainer refuses latents made by another VAE (or VAE precision).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from cxrdist.errors import DataError

log = logging.getLogger(__name__)

LATENTS_KEY = "latents"
LATENTS_EXT = "latents.npy"


def vae_fingerprint(vae) -> str:
    """sha256 of the VAE's config and weights (with their dtype): latents from another VAE are refused."""
    digest = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def latents_info(shards_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The "latents" record of index.json, or None when the shards carry no latents."""
    path = Path(shards_dir) / "index.json"
    return json.loads(path.read_text()).get(LATENTS_KEY) if path.exists() else None


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


def _read_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) in file order; webdataset's key = name up to the first dot."""
    current, parts = None, {}
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            if key != current and current is not None:
                yield current, parts
                parts = {}
            current = key
            parts[ext] = tar.extractfile(member).read()
    if current is not None:
        yield current, parts


def _pixels(png: bytes, channels: int) -> torch.Tensor:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        array = np.asarray(image)
    scale = 65535.0 if array.dtype == np.uint16 else 255.0
    pixels = torch.from_numpy(array.astype(np.float32) * (2.0 / scale) - 1.0)[None]  # [-1, 1], like the loader
    return pixels.expand(channels, -1, -1)


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


def cache_latents(shards_dir: str | os.PathLike, pretrained: str, *, revision: str | None = None,
                  vae_dtype: str = "fp32", batch_size: int = 32, device: str | None = None,
                  progress: bool = True) -> dict[str, Any]:
    from diffusers import AutoencoderKL
    from tqdm.auto import tqdm

    from cxrdist.data.index import load_index, write_json_atomic
    from cxrdist.data.shard import write_tar
    from cxrdist.models.loading import DTYPES, resolve_base_path

    root = Path(shards_dir)
    index = load_index(root)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vae = AutoencoderKL.from_pretrained(resolve_base_path(pretrained), subfolder="vae", revision=revision,
                                        torch_dtype=DTYPES[vae_dtype]).to(device).eval()
    staged: list[tuple[Path, Path, dict]] = []
    bar = tqdm(total=index.count(list(index.splits)), unit="img", desc="cache latents", disable=not progress)
    try:
        for entry in index.shards(list(index.splits)):
            samples = list(_read_samples(Path(entry["path"])))
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
    finally:
        bar.close()
    data = json.loads((root / "index.json").read_text())
    updates = {final.name: info for _, final, info in staged}
    for split in data["splits"].values():
        for shard in split["shards"]:
            shard.update(updates[shard["name"]])
    shape = list(np.load(io.BytesIO(samples[0][1][LATENTS_EXT])).shape) if staged else []
    data[LATENTS_KEY] = {"vae_fingerprint": vae_fingerprint(vae), "base": pretrained, "vae_dtype": vae_dtype,
                         "shape": shape, "dtype": "float16", "what": "VAE posterior mean, before scaling_factor"}
    for staging, final, _ in staged:
        os.replace(staging, final)
    write_json_atomic(root / "index.json", data)
    return data[LATENTS_KEY] | {"shards": len(staged), "samples": index.count(list(index.splits))}
