"""Load whatever `--model-path` points at, for sampling, evaluating or merging.

A cxrdist LoRA folder (on its recorded base, or `--base`), a training checkpoint (`checkpoints/step_N`), a .zip of
either (extracted with `cxrdist.sampling.archive.safe_extract`), a full diffusers pipeline folder, or a plain
diffusers LoRA folder (needs `--base`). Every weights file is checked before the base loads, so a bad adapter
fails in milliseconds.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from safetensors.torch import load_file

from cxrdist.config import config_from_dict, load_yaml
from cxrdist.errors import ConfigError, InputError, ModelError
from cxrdist.models.diffusion import LoraDiffusionModel
from cxrdist.models.loading import (PICKLED_WEIGHTS, PRESET_PREFIX, BaseModel, check_model_files, check_weights_file,
                                    fingerprint, load_base)
from cxrdist.models.lora import (CHECKPOINT_ADAPTER, CHECKPOINT_CONFIG, CHECKPOINT_MARKER, METADATA_NAME,
                                 WEIGHTS_NAME, adapter_metadata, attach_lora, load_adapter, read_adapter_metadata)
from cxrdist.models.text import Instruction, instruction_for
from cxrdist.models.trained import CHECKPOINT_FULL, load_trained_state, unfreeze_denoiser
from cxrdist.sampling.archive import safe_extract
from cxrdist.sampling.pipeline import assemble_pipeline, build_scheduler


def load_for_sampling(model_path: str | Path, base_override: str | None = None,
                      vae_dtype: str = "fp32") -> tuple[BaseModel, dict | None]:
    """Load a cxrdist LoRA folder (on its recorded base, or `base_override`), a .zip of one, a full
    diffusers pipeline folder, or a plain diffusers LoRA folder (needs `base_override`).

    Returns the base with any adapter attached and the checkpoint's metadata (None when there is none).
    """
    path = Path(model_path).expanduser()
    if not path.exists():
        raise ModelError(f"model path '{model_path}' not found: give a LoRA checkpoint folder, a .zip of one, "
                         "or a diffusers pipeline folder")
    if not _readable(path):
        raise ModelError(f"model path '{model_path}' is not readable: check its permissions")
    # A FIFO or device, as --model-path or anywhere inside the folder, would block or never end when opened.
    check_model_files(path, "model path" if not path.is_dir() else "model folder")
    if path.is_dir():
        return _with_instruction(*_load_folder(path, base_override, vae_dtype))
    with tempfile.TemporaryDirectory(prefix="cxrdist-zip-") as tmp:
        root = safe_extract(path, tmp)
        return _with_instruction(*_load_folder(_model_root(root, path), base_override, vae_dtype))


def _with_instruction(base: BaseModel, meta: dict | None) -> tuple[BaseModel, dict | None]:
    """The instruction the model was trained after (model.text_instruction), as its metadata records it."""
    text = (meta or {}).get("text_instruction")
    if text is not None and not isinstance(text, str):
        raise ModelError("the model's cxrdist.json has a 'text_instruction' that is not a string: export it again")
    base.instruction = Instruction.build(base.tokenizer, text)
    return base, meta


def _readable(path: Path) -> bool:
    return os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0))


def _kind(folder: Path) -> str | None:
    if (folder / "model_index.json").exists():
        return "pipeline"
    if (folder / METADATA_NAME).exists():
        return "adapter"
    if (folder / CHECKPOINT_MARKER).exists():
        return "training-checkpoint"
    if (folder / WEIGHTS_NAME).exists():
        return "diffusers-lora"
    return None


def _model_root(root: Path, archive: Path) -> Path:
    """The archive's model folder: its top level, or the single folder inside it that holds a model."""
    if _kind(root):
        return root
    found = [p for p in sorted(root.iterdir()) if p.is_dir() and _kind(p)]
    if len(found) != 1:
        raise ModelError(f"{archive} holds {'no' if not found else 'more than one'} model folder: expected one "
                         "LoRA checkpoint (cxrdist.json) or diffusers pipeline (model_index.json)")
    return found[0]


def _load_folder(folder: Path, base_override: str | None, vae_dtype: str) -> tuple[BaseModel, dict | None]:
    kind = _kind(folder)
    loaders = {"adapter": _load_adapter_folder, "pipeline": _load_pipeline_folder,
               "diffusers-lora": _load_diffusers_lora, "training-checkpoint": _load_training_checkpoint}
    pickled = sorted(p for p in folder.glob("pytorch_lora_weights*") if p.suffix in PICKLED_WEIGHTS)
    if kind is None and pickled:
        raise ModelError(f"{pickled[0]} is a pickled LoRA weights file, which cxrdist does not load (unpickling can "
                         "run code): convert it to pytorch_lora_weights.safetensors")
    if kind is None:
        raise ModelError(f"{folder} is not a model: expected a LoRA checkpoint folder (cxrdist.json), a "
                         "training checkpoint (checkpoints/step_N), a diffusers pipeline folder "
                         "(model_index.json) or a .zip of one")
    return loaders[kind](folder, base_override, vae_dtype)


def _load_base_for(source: str, folder: Path, vae_dtype: str, overridden: bool, revision: str | None = None,
                   variant: str | None = None) -> BaseModel:
    """The base an adapter was trained on; `revision` / `variant` as recorded at training time (not for --base)."""
    try:
        return load_base(source, revision=None if overridden else revision, vae_dtype=vae_dtype,
                         variant=None if overridden else variant)
    except ModelError as exc:
        hint = "" if overridden else "; pass --base to load the adapter on another copy of its base"
        raise ModelError(f"base '{source}' of {folder.name} cannot be loaded: {exc}{hint}") from None


def _load_adapter_folder(folder: Path, base_override: str | None, vae_dtype: str):
    meta = read_adapter_metadata(folder)
    check_weights_file(folder / WEIGHTS_NAME, "the adapter")  # before the base: it fails in ms, not after loading
    if not base_override:
        _check_recorded_base(meta, folder)
    source = base_override or meta["base"]["source"]
    base = _load_base_for(source, folder, vae_dtype, overridden=bool(base_override),
                          revision=meta["base"].get("revision"), variant=meta["base"].get("variant"))
    meta = load_adapter(folder, base)
    return base, meta


def _check_recorded_base(meta: dict, folder: Path) -> None:
    """Refuse at once a recorded base that was a local folder at training time and is not here.

    Older adapters recorded a relative path; read from another working directory it names nothing, and
    `runs/base` would then be taken for a hub id (a long, failing lookup). The recorded fingerprint tells the
    cases apart: for a hub id (or a folder that did not exist) it is the hash of the name itself.
    """
    source = meta["base"]["source"]
    try:
        local = Path(source).expanduser()
    except RuntimeError:  # ~user that does not exist here
        local = Path(source)
    if source.startswith(PRESET_PREFIX) or local.exists():
        return
    if meta["base"]["fingerprint"] == fingerprint(source):  # fingerprint of a name that is not a folder here
        return
    relative = "" if local.is_absolute() else f" (a relative path, looked for in {Path.cwd()})"
    raise ModelError(f"base '{source}' recorded in {folder / 'cxrdist.json'} was a local folder when the adapter "
                     f"was trained and is not found here{relative}: pass --base PATH_OR_PRESET")


def _load_training_checkpoint(folder: Path, base_override: str | None, vae_dtype: str):
    """A training checkpoint (`checkpoints/step_N`): its saved config names the base, the adapter (or, of a full
    fine-tune without DeepSpeed, the whole denoiser) and the template, so any step of a run can be sampled or
    evaluated, not only the exported best."""
    if (folder / CHECKPOINT_FULL).is_file():
        return _load_full_checkpoint(folder, base_override, vae_dtype)
    if not (folder / CHECKPOINT_ADAPTER).is_file() and any(folder.glob("pytorch_model/*")):
        raise ModelError(f"training checkpoint {folder} is a full fine-tune's under DeepSpeed, held in one part per "
                         "rank: sample the run's best export (best_model_fold*, a pipeline folder) instead")
    for name in (CHECKPOINT_ADAPTER, CHECKPOINT_CONFIG):
        if not (folder / name).is_file():
            raise ModelError(f"training checkpoint {folder} has no {name}: it is incomplete; use another step")
    check_weights_file(folder / CHECKPOINT_ADAPTER, "the training checkpoint")
    # Read both files before the base loads (a minute on a large base): training rotates old checkpoints away
    # (train.keep_last), and one removed half-way through would otherwise surface as a raw FileNotFoundError.
    try:
        cfg = config_from_dict(load_yaml(folder / CHECKPOINT_CONFIG))
        adapter = load_file(str(folder / CHECKPOINT_ADAPTER))
    except (FileNotFoundError, ConfigError) as exc:
        if (folder / CHECKPOINT_MARKER).is_file() and not isinstance(exc, FileNotFoundError):
            raise
        raise ModelError(f"training checkpoint {folder} was removed while being read (training keeps only the "
                         "newest train.keep_last checkpoints): use a newer step, or the run's exported best "
                         "model") from None
    source = base_override or cfg.model.pretrained
    base = _load_base_for(source, folder, vae_dtype, overridden=bool(base_override), revision=cfg.model.revision,
                          variant=cfg.model.variant)
    base.instruction = instruction_for(cfg.model.text_instruction, base)  # recorded in the metadata below
    spec = attach_lora(base, cfg.lora)
    joint = LoraDiffusionModel(base.unet, base.text_encoder, cfg.lora.train_text_encoder, family=base.family)
    load_trained_state(joint, adapter, folder)  # after attach_lora only the adapters require a gradient
    for module in (base.unet, base.text_encoder):
        module.requires_grad_(False)
    return base, adapter_metadata(base, spec, cfg.data.prompt_template, cfg.to_dict())


def _load_full_checkpoint(folder: Path, base_override: str | None, vae_dtype: str):
    """A full fine-tune's checkpoint written without DeepSpeed: the base with the checkpoint's denoiser weights."""
    check_weights_file(folder / CHECKPOINT_FULL, "the training checkpoint")
    cfg = config_from_dict(load_yaml(folder / CHECKPOINT_CONFIG))
    trained = load_file(str(folder / CHECKPOINT_FULL))
    source = base_override or cfg.model.pretrained
    base = _load_base_for(source, folder, vae_dtype, overridden=bool(base_override), revision=cfg.model.revision,
                          variant=cfg.model.variant)
    base.instruction = instruction_for(cfg.model.text_instruction, base)  # recorded in the metadata below
    spec = unfreeze_denoiser(base, text_encoder=cfg.train.train_text_encoder)
    joint = LoraDiffusionModel(base.unet, base.text_encoder, False, family=base.family)
    load_trained_state(joint, trained, folder)
    for module in (base.unet, base.text_encoder):
        module.requires_grad_(False)
    return base, adapter_metadata(base, spec, cfg.data.prompt_template, cfg.to_dict())


def _load_pipeline_folder(folder: Path, base_override: str | None, vae_dtype: str):
    if base_override:
        raise InputError(f"--base applies to LoRA checkpoints, but {folder} is a full pipeline: drop --base")
    meta_file = folder / "cxrdist.json"
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.exists() else None
    except (ValueError, OSError) as exc:  # not JSON / not UTF-8: checked before the weights load
        raise ModelError(f"{meta_file} is not valid JSON ({type(exc).__name__}): restore or delete it") from None
    if meta is not None and not isinstance(meta, dict):
        raise ModelError(f"{meta_file} is not a JSON object: restore or delete it")
    base = load_base(str(folder), vae_dtype=vae_dtype)
    return base, meta


def _load_diffusers_lora(folder: Path, base_override: str | None, vae_dtype: str):
    """A LoRA saved by diffusers itself (no cxrdist.json): loaded with diffusers' own loader onto --base."""
    if not base_override:
        raise ModelError(f"{folder} is a diffusers LoRA without cxrdist.json, so its base is unknown: "
                         "pass --base PATH_OR_PRESET")
    check_weights_file(folder / WEIGHTS_NAME, "the LoRA")  # before the base: it fails in ms, not after loading
    base = _load_base_for(base_override, folder, vae_dtype, overridden=True)
    pipe = assemble_pipeline(base, build_scheduler(base.family.samplers[0], base.scheduler_config, base.family))
    if not hasattr(pipe, "load_lora_weights"):
        raise ModelError(f"{folder} is a plain diffusers LoRA, and diffusers' {base.family.pipeline} has no LoRA "
                         "loader: give a cxrdist adapter folder (cxrdist.json) instead")
    try:
        # weight_name: the file that was checked, never a pickled fallback diffusers might look for
        pipe.load_lora_weights(str(folder), weight_name=WEIGHTS_NAME)
    except (ValueError, RuntimeError, KeyError, OSError) as exc:
        raise ModelError(f"LoRA {folder} does not fit base '{base.source}': {str(exc).splitlines()[0]}") from None
    for module in (base.unet, base.text_encoder):
        module.requires_grad_(False)
    return base, None


