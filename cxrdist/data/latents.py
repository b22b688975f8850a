"""Latent caching: store each sample's VAE latents in its shard so training skips the VAE encoder.

`cache_latents(shards_dir, vae, base=...)` rewrites every shard with an added `latents.npy` (float16, the
posterior mean before the scaling factor: the same tensor the trainer computes on the fly) and records the
VAE's fingerprint under "latents" in index.json. The trainer refuses latents made by another VAE (or VAE
precision). The VAE comes from the caller (`cxrdist shard cache-latents` loads it): the data layer knows no
model loading.

One writer per set: cache-latents holds the shard build's lock (`.cxrdist-build.lock`), so two cache-latents,
or a build and a cache-latents, never change one set at once.

The swap is all or nothing. New shards are written into a staging folder of this process
(`.parts/.latents.<pid>-<hex>.cxrdist-tmp/`); the set is untouched until every one is complete. Then a journal,
`.parts/latents-swap.json` (staging folder, each shard's new sha256 and size, the latents record), is written
atomically, and only then are the shards moved in, the build's stats and index.json brought up to date, and the
journal removed. A run stopped before the journal leaves the old set (its staging folder is removed by the next
cache-latents or build); a run stopped after it is finished from the journal by the next cache-latents or
`cxrdist shard ... --resume`, which say so. Until then the trainer's latents check names the rerun that
finishes it. SIGINT and SIGTERM wait until the swap is done.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import signal
import threading
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from cxrdist.data import storage
from cxrdist.data.imageio import to_model_range
from cxrdist.data.index import PARTS_DIR, latents_record, load_index, record_latents
from cxrdist.data.sharding.layout import stats_path
from cxrdist.data.sharding.lock import build_lock
from cxrdist.data.tars import read_samples, write_tar
from cxrdist.errors import DataError
from cxrdist.fileio import TEMP_SUFFIX, is_disk_full, probe_writable, temp_name, write_json_atomic
from cxrdist.progress import progress_meter

log = logging.getLogger(__name__)

LATENTS_EXT = "latents.npy"
SWAP_JOURNAL = "latents-swap.json"  # in .parts: present only while a swap is under way (or was stopped)
STAGING_STEM = "latents"  # staging folders are temp_name(.parts/latents)
_STAGING = re.compile(rf"\.{STAGING_STEM}\.[0-9]+-[0-9a-f]{{8}}{re.escape(TEMP_SUFFIX)}")
_SHARD = re.compile(r"(test|fold[0-9]+)-[0-9]{6,}\.tar")
_SHA256 = re.compile(r"[0-9a-f]{64}")


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


def _local_root(shards_dir: str | os.PathLike) -> Path:
    return Path(storage.local_path(shards_dir))


def swap_journal_path(shards_dir: str | os.PathLike) -> Path:
    return _local_root(shards_dir) / PARTS_DIR / SWAP_JOURNAL


def interrupted_swap_message(shards_dir: str | os.PathLike) -> str | None:
    """The one line to show while a stopped swap waits to be finished, or None when there is none."""
    if storage.is_remote(shards_dir):
        return None
    journal = swap_journal_path(shards_dir)
    if not journal.exists():
        return None
    base = "<base>"
    with contextlib.suppress(OSError, ValueError, AttributeError):
        recorded = json.loads(journal.read_text(encoding="utf-8")).get("latents", {}).get("base")
        if isinstance(recorded, str) and recorded:
            base = storage.safe_text(recorded)
    root = _local_root(shards_dir)
    return (f"{root}: cache-latents was stopped while swapping in its shards, so index.json and the shards "
            f"disagree until it finishes: rerun `cxrdist shard cache-latents {root} --pretrained {base}` to "
            "finish it")


def latents_info(shards_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The "latents" record of index.json, or None when the shards carry no latents; DataError naming the rerun
    that finishes it while a stopped cache-latents swap is pending."""
    if (problem := interrupted_swap_message(shards_dir)) is not None:
        raise DataError(problem)
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


def _pixels(png: bytes, channels: int):
    import torch
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        array = np.asarray(image)
    return torch.from_numpy(to_model_range(array))[None].expand(channels, -1, -1)  # [-1, 1], like the loader


def encode_mean(vae, pixels):
    """The latent a VAE gives for model-range pixels, unscaled: an AutoencoderKL's posterior mean, DC-AE's
    (deterministic) latent. Training, latent caching and the memorization audit all encode through here."""
    encoded = vae.encode(pixels)
    distribution = getattr(encoded, "latent_dist", None)
    return distribution.mode() if distribution is not None else encoded.latent


def _encode(vae, pngs: list[bytes], device) -> list[bytes]:
    import torch  # here, not at the top: a resumed shard build finishes a stopped swap without torch

    channels = int(vae.config.in_channels)
    with torch.no_grad():
        pixels = torch.stack([_pixels(p, channels) for p in pngs]).to(device=device, dtype=vae.dtype)
        means = encode_mean(vae, pixels).float().cpu().numpy().astype(np.float16)
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


def _write_problem(root: Path, exc: OSError) -> str | None:
    """The one line for a failed write into the set, or None when `exc` is not about the folder."""
    if is_disk_full(exc):
        return f"disk full while caching latents in {root}: free space and rerun (the shard set is unchanged)"
    if isinstance(exc, PermissionError) or exc.errno == errno.EROFS:
        return (f"cannot write to {root} ({exc.strerror or exc}): cache-latents rewrites the shards in place; make "
                "the folder writable, or run it on a writable copy")
    return None


def _check_writable(root: Path) -> None:
    """Create and remove a file in the set and in its .parts: a read-only set fails here, before the VAE loads."""
    for folder in (root, root / PARTS_DIR):
        try:
            probe_writable(folder, parents=False)  # the set itself must exist: only .parts may be made here
        except OSError as exc:
            problem = _write_problem(root, exc)
            if problem is None:
                raise
            raise DataError(problem) from None


def check_can_cache(shards_dir: str | os.PathLike):
    """Everything cache-latents needs before the VAE loads: a readable local index, a writable folder, and no
    build or cache-latents running in it. Returns the index."""
    index = writable_index(shards_dir)
    root = _local_root(shards_dir)
    _check_writable(root)
    with build_lock(root, elsewhere="shard set"):
        pass
    return index


# ---- the swap and its journal ------------------------------------------------------------------------------
def _read_journal(root: Path) -> dict[str, Any] | None:
    """The journal of a stopped swap, held to what cache-latents writes (its names become paths), or None."""
    path = swap_journal_path(root)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        data = None
    shards = data.get("shards") if isinstance(data, dict) else None
    if not (isinstance(data, dict) and isinstance(data.get("staging"), str) and _STAGING.fullmatch(data["staging"])
            and isinstance(shards, dict) and isinstance(data.get("latents"), dict)
            and all(isinstance(name, str) and _SHARD.fullmatch(name) and isinstance(info, dict)
                    and isinstance(info.get("sha256"), str) and _SHA256.fullmatch(info["sha256"])
                    and isinstance(info.get("bytes"), int) for name, info in shards.items())):
        raise DataError(f"{path} is not a journal cache-latents writes: delete it, check the set with `cxrdist "
                        "shard inspect --verify`, and rebuild it if a shard fails")
    return data


def _apply_swap(root: Path, journal: dict[str, Any]) -> None:
    """Move the staged shards in, update their stats and index.json, remove the journal. Every step may be
    repeated: a run stopped anywhere in here is finished by running this again."""
    staging = root / PARTS_DIR / journal["staging"]
    for name, info in journal["shards"].items():
        staged, final = staging / name, root / name
        if staged.is_file():
            os.replace(staged, final)
        if not final.is_file() or final.stat().st_size != info["bytes"]:
            raise DataError(f"cannot finish the stopped cache-latents of {root}: {name} is neither staged nor the "
                            "shard it wrote; rebuild the shard set")
    for name, info in journal["shards"].items():
        stats = stats_path(root, name)
        with contextlib.suppress(OSError, ValueError, TypeError):  # unreadable stats: a resume rebuilds that shard
            current = json.loads(stats.read_text(encoding="utf-8"))
            write_json_atomic(stats, {**current, "sha256": info["sha256"], "bytes": info["bytes"]})
    record_latents(root, journal["shards"], journal["latents"])
    shutil.rmtree(staging, ignore_errors=True)
    swap_journal_path(root).unlink(missing_ok=True)


def _staging_folders(root: Path) -> list[Path]:
    parts = root / PARTS_DIR
    return [entry for entry in parts.iterdir() if _STAGING.fullmatch(entry.name)] if parts.is_dir() else []


def settle_interrupted_cache(shards_dir: str | os.PathLike) -> dict[str, Any] | None:
    """Finish a swap a stopped cache-latents left journaled, and remove the staging folders of runs stopped
    before their journal (nothing in the set refers to those). Call it holding the set's lock. Returns
    {"shards": count, "latents": record} of the finished swap, or None when there was none."""
    root = _local_root(shards_dir)
    journal = _read_journal(root)
    finished = None
    if journal is not None:
        with _signals_deferred():
            _apply_swap(root, journal)
        log.info("finished the stopped cache-latents of %s: %d shards swapped in", root, len(journal["shards"]))
        finished = {"shards": len(journal["shards"]), "latents": journal["latents"]}
    for debris in _staging_folders(root):
        shutil.rmtree(debris, ignore_errors=True)
    return finished


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the body is done, then deliver them: a swap is not left half-done by Ctrl-C
    or a polite kill (SIGKILL and power loss are what the journal is for)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {}
    for number in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(number)
        if handler is None:  # installed outside Python: it could not be put back
            continue
        previous[number] = signal.signal(number, lambda received, frame: caught.append(received))
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if caught:
            signal.raise_signal(caught[0])


# ---- caching -----------------------------------------------------------------------------------------------
def cache_latents(shards_dir: str | os.PathLike, vae, *, base: str, vae_dtype: str = "fp32", batch_size: int = 32,
                  progress: bool = True) -> dict[str, Any]:
    """Add the latents of `vae` (already on its device, in eval mode) to every shard; `base` and `vae_dtype` are
    recorded with them. Returns the latents record plus shard and sample counts, `finished_swap` (shards of a
    stopped earlier run swapped in first) and `encoded` (False when that earlier run was of this very VAE, so
    nothing was left to encode)."""
    index = writable_index(shards_dir)
    root = _local_root(shards_dir)
    _check_writable(root)
    with build_lock(root, elsewhere="shard set"):
        finished = settle_interrupted_cache(root)
        swapped = finished["shards"] if finished else 0
        index = writable_index(shards_dir)  # index.json as the finished swap left it
        samples = index.count(list(index.splits))
        fingerprint = vae_fingerprint(vae)
        if finished and finished["latents"].get("vae_fingerprint") == fingerprint:
            return {**finished["latents"], "shards": swapped, "samples": samples, "finished_swap": swapped,
                    "encoded": False}
        record, staging, shards = _stage(root, index, vae, fingerprint, base=base, vae_dtype=vae_dtype,
                                         batch_size=batch_size, progress=progress)
        _swap_in(root, {"staging": staging.name, "shards": shards, "latents": record})
    return {**record, "shards": len(shards), "samples": samples, "finished_swap": swapped, "encoded": True}


def _stage(root: Path, index, vae, fingerprint: str, *, base: str, vae_dtype: str, batch_size: int,
           progress: bool) -> tuple[dict[str, Any], Path, dict[str, dict[str, Any]]]:
    """Write every shard with its latents into a new staging folder; the set itself is not touched. Returns
    (latents record, staging folder, shard name -> {"sha256", "bytes"})."""
    device = next(vae.parameters()).device
    staging = temp_name(root / PARTS_DIR / STAGING_STEM)
    shards: dict[str, dict[str, Any]] = {}
    samples: list = []
    bar = progress_meter(index.count(list(index.splits)), unit="img", desc="cache latents", disable=not progress)
    try:
        staging.mkdir()
        with bar:  # a failure leaves no closing progress line after the last one
            for entry in index.shards(list(index.splits)):
                samples = list(read_samples(entry["path"]))
                for start in range(0, len(samples), batch_size):
                    chunk = samples[start:start + batch_size]
                    for (_, parts), npy in zip(chunk, _encode(vae, [p["png"] for _, p in chunk], device)):
                        parts[LATENTS_EXT] = npy
                    bar.update(len(chunk))
                digest, size = write_tar(staging / entry["name"], samples)
                shards[entry["name"]] = {"sha256": digest, "bytes": size}
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        problem = _write_problem(root, exc)
        if problem is None:
            raise
        raise DataError(problem) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shape = list(np.load(io.BytesIO(samples[0][1][LATENTS_EXT])).shape) if shards and samples else []
    record = {"vae_fingerprint": fingerprint, "base": base, "vae_dtype": vae_dtype,
              "shape": shape, "dtype": "float16", "what": "VAE posterior mean, before scaling_factor"}
    return record, staging, shards


def _swap_in(root: Path, journal: dict[str, Any]) -> None:
    """Journal first, then the swap: once the journal exists, any later run can finish what this one started."""
    staging = root / PARTS_DIR / journal["staging"]
    with _signals_deferred():
        try:
            write_json_atomic(swap_journal_path(root), journal)
        except OSError as exc:  # no journal: the set is untouched, and the staged shards are only ours
            shutil.rmtree(staging, ignore_errors=True)
            problem = _write_problem(root, exc)
            if problem is None:
                raise
            raise DataError(problem) from None
        try:
            _apply_swap(root, journal)
        except OSError as exc:
            raise DataError(f"cache-latents could not finish swapping its shards into {root} "
                            f"({exc.strerror or exc}): fix that, then rerun `cxrdist shard cache-latents {root} "
                            f"--pretrained {storage.safe_text(journal['latents']['base'])}`, which finishes the "
                            "swap") from None
