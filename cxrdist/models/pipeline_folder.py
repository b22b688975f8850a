"""A base's diffusers pipeline folder with the trained weights replaced: what a full fine-tune exports.

Every component but the trained ones (the denoiser; the text encoder with train.train_text_encoder) is the base's
own files, linked where the filesystem allows (a hard link costs no space, and neither side is ever written in
place) and copied otherwise; a component that only references an
installed package (cxrdist's phantom bases) keeps that reference. A trained component is its config (the live
module's) and its weights in safetensors, split into files of at most `max_shard_size` with an index, as diffusers'
and transformers' `save_pretrained` write them, so `DiffusionPipeline.from_pretrained` and `cxrdist sample` load
the folder like any base.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from cxrdist.errors import ModelError
from cxrdist.models.families import MODEL_INDEX
from cxrdist.models.loading import BaseModel, referenced_package_path

DENOISER_WEIGHTS = "diffusion_pytorch_model{suffix}.safetensors"  # diffusers' weight files
TEXT_ENCODER_WEIGHTS = "model{suffix}.safetensors"  # transformers'
TEXT_ENCODER = "text_encoder"

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
        raise ModelError(f"cannot read {folder / MODEL_INDEX} ({type(exc).__name__}): restore the base "
                         "folder") from None
    return [name for name, value in index.items()
            if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and value[0] is not None]


def save_with_trained(base: BaseModel, denoiser: dict[str, torch.Tensor], out: Path,
                      text_encoder: dict[str, torch.Tensor] | None = None, max_shard_size: str = "5GB") -> Path:
    """Write `out` (which must not exist) as the base's pipeline with `denoiser` (tensors by their names inside the
    denoiser, fp32 on the CPU) as its denoiser and, when given, `text_encoder` as its text encoder. A trained
    module's buffers that its weight files hold (a position table, say) are the base's own, copied exactly."""
    source = local_base_folder(base)
    trained = {base.family.denoiser_folder: (denoiser, base.unet, DENOISER_WEIGHTS)}
    if text_encoder is not None:
        trained[TEXT_ENCODER] = (text_encoder, base.text_encoder, TEXT_ENCODER_WEIGHTS)
    out.mkdir(parents=True)
    shutil.copy2(source / MODEL_INDEX, out / MODEL_INDEX)
    for name in components(source):
        if name in trained or not (source / name).is_dir():
            continue
        shutil.copytree(source / name, out / name, copy_function=_link_or_copy)
    from huggingface_hub import save_torch_state_dict

    for name, (state, module, pattern) in trained.items():
        state = {**_saved_buffers(_weights_folder(source, name), state, module), **state}
        if hasattr(module, "save_config"):  # diffusers' models
            module.save_config(str(out / name))
        else:  # transformers' keep theirs on .config
            module.config.save_pretrained(str(out / name))
        save_torch_state_dict(state, out / name, filename_pattern=pattern, max_shard_size=max_shard_size)
    return out


def _weights_folder(source: Path, component: str) -> Path:
    """Where a component's weight files are: its folder, or the installed package a reference names."""
    referenced = referenced_package_path(str(source), component)
    return Path(referenced) if referenced else source / component


def _saved_buffers(folder: Path, trained: dict[str, torch.Tensor], module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of a component's weight files that are not parameters (persistent buffers), read from the base."""
    from safetensors import safe_open

    params = {name for name, _ in module.named_parameters()} | set(trained)
    found: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key not in params and key not in found:
                    found[key] = f.get_tensor(key)
    return found


def _read_weights(folder: Path, pattern: str) -> dict[str, torch.Tensor]:
    """Every tensor of a component folder's weight files named by `pattern` (one file, or the parts of a split)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob(pattern.format(suffix="*"))):
        state.update(load_file(str(file)))
    return state


def read_denoiser(folder: Path, family) -> dict[str, torch.Tensor]:
    """Every denoiser tensor of a pipeline folder by its name inside the denoiser (safetensors only)."""
    state = _read_weights(Path(folder) / family.denoiser_folder, DENOISER_WEIGHTS)
    if not state:
        raise ModelError(f"{folder / family.denoiser_folder} holds no {DENOISER_WEIGHTS.format(suffix='')}: "
                         "restore the exported model")
    return state


def read_text_encoder(folder: Path) -> dict[str, torch.Tensor]:
    """A pipeline folder's text-encoder tensors (safetensors only); {} when it holds none of its own."""
    return _read_weights(Path(folder) / TEXT_ENCODER, TEXT_ENCODER_WEIGHTS)
