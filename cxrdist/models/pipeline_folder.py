"""A base's diffusers pipeline folder with the denoiser's weights replaced: what a full fine-tune exports.

Every component but the denoiser is the base's own files, linked where the filesystem allows (a hard link costs no
space, and neither side is ever written in place) and copied otherwise; a component that only references an
installed package (cxrdist's phantom bases) keeps that reference. The denoiser is its config (the live module's) and
the trained weights in safetensors, split into files of at most `max_shard_size` with diffusers' index, as
`ModelMixin.save_pretrained` writes them, so `DiffusionPipeline.from_pretrained` and `cxrdist sample` load the folder
like any base.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from cxrdist.errors import ModelError
from cxrdist.models.families import MODEL_INDEX
from cxrdist.models.loading import BaseModel

DENOISER_WEIGHTS = "diffusion_pytorch_model{suffix}.safetensors"


def local_base_folder(base: BaseModel) -> Path:
    """The folder the base's files are in: its own folder, or the hub cache's snapshot of a hub id (already there:
    the base was loaded from it)."""
    folder = Path(base.path)
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(base.path, revision=base.revision, local_files_only=True))
    except Exception as exc:  # LocalEntryNotFoundError, OSError: the cache was cleared since the base loaded
        raise ModelError(f"the files of base '{base.path}' are no longer in the hub cache ({type(exc).__name__}): "
                         "download the base again, or train from a local copy") from None


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)
    return dst


def components(folder: Path) -> list[str]:
    """The component folders model_index.json names (entries such as `"safety_checker": [null, null]` excluded)."""
    try:
        index = json.loads((folder / MODEL_INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {folder / MODEL_INDEX} ({type(exc).__name__}): restore the base folder") from None
    return [name for name, value in index.items()
            if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and value[0] is not None]


def save_with_denoiser(base: BaseModel, state: dict[str, torch.Tensor], out: Path,
                       max_shard_size: str = "5GB") -> Path:
    """Write `out` (which must not exist) as the base's pipeline with `state` (the denoiser's tensors by their names
    inside the denoiser, fp32 on the CPU) as its denoiser."""
    source = local_base_folder(base)
    denoiser = base.family.denoiser_folder
    out.mkdir(parents=True)
    shutil.copy2(source / MODEL_INDEX, out / MODEL_INDEX)
    for name in components(source):
        if name == denoiser or not (source / name).is_dir():
            continue
        shutil.copytree(source / name, out / name, copy_function=_link_or_copy)
    from huggingface_hub import save_torch_state_dict

    base.unet.save_config(str(out / denoiser))
    save_torch_state_dict(state, out / denoiser, filename_pattern=DENOISER_WEIGHTS, max_shard_size=max_shard_size)
    return out


def denoiser_files(folder: Path, family) -> list[Path]:
    """The denoiser's weight files of a pipeline folder (one file, or the parts its index lists)."""
    sub = Path(folder) / family.denoiser_folder
    return sorted(sub.glob(DENOISER_WEIGHTS.format(suffix="*")))


def read_denoiser(folder: Path, family) -> dict[str, torch.Tensor]:
    """Every denoiser tensor of a pipeline folder by its name inside the denoiser (safetensors only)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in denoiser_files(folder, family):
        state.update(load_file(str(file)))
    if not state:
        raise ModelError(f"{folder / family.denoiser_folder} holds no {DENOISER_WEIGHTS.format(suffix='')}: "
                         "restore the exported model")
    return state
