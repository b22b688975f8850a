"""Synthetic radiographs from report text: scheduler table, batched seeded generation, model loading for
sampling, and output writing (PNG + metadata, index.jsonl, contact sheet).

`generate_images` is the one generation path: the CLI, the trainer's validation and `cxrdist evaluate` all
call it, so what is validated is what users sample. It assembles a diffusers StableDiffusionPipeline around
modules that are already loaded (no weight copies, never a safety checker: it blacks out radiographs) and
hands it precomputed conditioning from `cxrdist.models.text.encode_prompts`, so CLIP and BERT-style text
encoders go through the same code.
"""
from __future__ import annotations

import contextlib
import logging
import numbers
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from cxrdist.config import SAMPLE_SCHEDULERS
from cxrdist.errors import InputError, ModelError
from cxrdist.models.loading import PRESET_PREFIX, BaseModel, check_weights_file, fingerprint, load_base
from cxrdist.models.text import apply_template, encode_prompts
from cxrdist.sample_output import check_output_dir, contact_sheet, write_samples  # contact_sheet: for trainer grids

log = logging.getLogger(__name__)


def _scheduler_table() -> dict[str, tuple[Any, dict]]:
    from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                           PNDMScheduler)

    return {
        # Default: 2nd-order DPM-Solver++ gives usable images in ~25 steps (the original used PNDM x 500).
        "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
        "ddim": (DDIMScheduler, {}),
        "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
        "euler": (EulerDiscreteScheduler, {}),
        "ddpm": (DDPMScheduler, {}),
    }


SCHEDULERS: dict[str, tuple[Any, dict]] = _scheduler_table()
# torch.Generator.manual_seed takes up to 2**64 - 1, numpy and PNG metadata readers want a signed 64-bit int:
# seeds live in 0..2**63 - 1 so every tool reading a sample's seed back can reproduce it.
SEED_MAX = 2**63 - 1
assert set(SCHEDULERS) == set(SAMPLE_SCHEDULERS), "config.SAMPLE_SCHEDULERS and sample.SCHEDULERS disagree"


@dataclass
class SampleSettings:
    """How to sample; the same knobs as SampleConfig minus what is per-run (seed, count, device)."""

    steps: int = 25
    scheduler: str = "dpm++"
    guidance: float = 4.0
    negative_prompt: str = ""  # used as is (no template); "" is the unconditional prompt seen in training
    height: int = 0  # 0 = base.image_size
    width: int = 0
    batch_size: int = 8

    @classmethod
    def from_config(cls, cfg) -> "SampleSettings":
        return cls(steps=cfg.steps, scheduler=cfg.scheduler, guidance=cfg.guidance,
                   negative_prompt=cfg.negative_prompt, height=cfg.height, width=cfg.width,
                   batch_size=cfg.batch_size)


def build_scheduler(name: str, scheduler_config: dict):
    """A fresh scheduler of the named kind on the base model's noise schedule."""
    if name not in SCHEDULERS:
        raise InputError(f"unknown scheduler '{name}': choose one of {', '.join(SCHEDULERS)}")
    cls, kwargs = SCHEDULERS[name]
    return cls.from_config(scheduler_config, **kwargs)


def image_shape(base: BaseModel, settings: SampleSettings) -> tuple[int, int]:
    height = settings.height or base.image_size
    width = settings.width or base.image_size
    for what, value in (("height", height), ("width", width)):
        if value < 8 or value % 8:
            raise InputError(f"image {what} {value} must be a positive multiple of 8")
    return height, width


def _check(settings: SampleSettings, reports: list[str], seeds: list[int]) -> None:
    if settings.steps < 1:
        raise InputError(f"steps must be >= 1, got {settings.steps}")
    if settings.batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {settings.batch_size}")
    if settings.scheduler not in SCHEDULERS:
        raise InputError(f"unknown scheduler '{settings.scheduler}': choose one of {', '.join(SCHEDULERS)}")
    if len(reports) != len(seeds):
        raise InputError(f"{len(reports)} reports but {len(seeds)} seeds: give one seed per image")
    bad = next((seed for seed in seeds if not _seed_ok(seed)), None)
    if bad is not None:
        raise InputError(f"seed {bad} is out of range: seeds must be integers in 0..{SEED_MAX}")
    if not reports:
        raise InputError("nothing to generate: give at least one report")


def _seed_ok(seed) -> bool:
    # numbers.Integral: numpy integers count too (callers may derive seeds from arrays)
    return isinstance(seed, numbers.Integral) and not isinstance(seed, bool) and 0 <= int(seed) <= SEED_MAX


def check_seed_range(first: int, count: int) -> None:
    """Refuse a run whose seeds (first, first + 1, ..., first + count - 1) leave 0..SEED_MAX, before loading."""
    if not (_seed_ok(first) and _seed_ok(first + max(count, 1) - 1)):
        raise InputError(f"--seed {first} is out of range: image i gets seed + i, so seed must be in "
                         f"0..{SEED_MAX - max(count, 1) + 1} for {count} image(s) (sample.seed)")


@contextlib.contextmanager
def _eval_mode(*modules: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no LoRA dropout) while sampling; every submodule's own flag is restored afterwards."""
    saved = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for m, training in saved:
            m.training = training


@contextlib.contextmanager
def _on_device(base: BaseModel, device: torch.device) -> Iterator[None]:
    """Move the modules to `device` for the call only when they are elsewhere, and back afterwards."""
    modules = (base.unet, base.vae, base.text_encoder)
    before = [next(m.parameters()).device for m in modules]
    moved = any(d != device for d in before)
    if moved:
        for module in modules:
            module.to(device)
    try:
        yield
    finally:
        if moved:
            for module, where in zip(modules, before):
                module.to(where)


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def assemble_pipeline(base: BaseModel, scheduler):
    """A StableDiffusionPipeline around the loaded modules: shares them, copies nothing, no safety checker."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                   unet=base.unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _initial_noise(seeds: list[int], shape: tuple[int, ...]) -> tuple[torch.Tensor, list[torch.Generator]]:
    """Per-image CPU generators: image i's noise depends on seeds[i] only (not on batch, device or dtype)."""
    generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
    noise = torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in generators])
    return noise, generators


def _decode(base: BaseModel, latents: torch.Tensor) -> np.ndarray:
    """Latents -> grayscale float32 images in [0, 1]; 3-channel VAEs are averaged over channels."""
    vae = base.vae
    latents = latents.to(vae.dtype) / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift:
        latents = latents + shift
    pixels = vae.decode(latents, return_dict=False)[0].float()
    pixels = (pixels / 2 + 0.5).clamp(0, 1).mean(dim=1)
    return pixels.cpu().numpy().astype(np.float32)


def _embed_unique(base: BaseModel, prompts: list[str]) -> torch.Tensor:
    """Encode each distinct prompt once (one truncation warning per prompt), then index per image."""
    unique = list(dict.fromkeys(prompts))
    embeds = encode_prompts(base.tokenizer, base.text_encoder, unique)
    where = {p: i for i, p in enumerate(unique)}
    return embeds[torch.tensor([where[p] for p in prompts], device=embeds.device)]


@torch.no_grad()
def generate_images(base: BaseModel, reports: list[str], settings: SampleSettings, *, template: str = "{report}",
                    seeds: list[int], device=None, dtype: torch.dtype = torch.float32,
                    progress: bool = False) -> np.ndarray:
    """Generate one grayscale image per report: float32 array N x H x W in [0, 1].

    Image i depends only on (reports[i], seeds[i], settings), not on which other images share its batch.
    `template` is applied exactly once here; pass raw report text. Works with adapters attached; the
    modules' train/eval flags and devices are restored on return, requires_grad is never touched.
    `dtype` other than float32 runs under autocast (weights are not cast).
    """
    from tqdm.auto import tqdm

    reports = list(reports)
    seeds = list(seeds)
    _check(settings, reports, seeds)
    height, width = image_shape(base, settings)
    device = torch.device(device) if device is not None else next(base.unet.parameters()).device
    prompts = [apply_template(template, r) for r in reports]
    latent_shape = (int(base.unet.config.in_channels), height // base.vae_scale_factor, width // base.vae_scale_factor)
    size = settings.batch_size
    batches = [range(i, min(i + size, len(prompts))) for i in range(0, len(prompts), size)]
    out = np.empty((len(prompts), height, width), dtype=np.float32)
    bar = tqdm(total=len(batches) * settings.steps, desc="sampling", unit="step", disable=not progress)

    def tick(pipe, step, timestep, tensors):
        bar.update(1)
        return tensors

    with _on_device(base, device), _eval_mode(base.unet, base.vae, base.text_encoder), _autocast(device, dtype):
        cond = _embed_unique(base, prompts)
        uncond = encode_prompts(base.tokenizer, base.text_encoder, [settings.negative_prompt.strip()], warn=True)
        for batch in batches:
            noise, generators = _initial_noise([seeds[i] for i in batch], latent_shape)
            pipe = assemble_pipeline(base, build_scheduler(settings.scheduler, base.scheduler_config))
            latents = pipe(prompt_embeds=cond[batch.start:batch.stop],
                           negative_prompt_embeds=uncond.expand(len(batch), -1, -1),
                           height=height, width=width, num_inference_steps=settings.steps,
                           guidance_scale=settings.guidance, generator=generators,
                           latents=noise.to(device, cond.dtype), output_type="latent",
                           callback_on_step_end=tick).images
            out[batch.start:batch.stop] = _decode(base, latents)
    bar.close()
    return out


# ---------------------------------------------------------------------------------------------------------
# Loading whatever the user points --model-path at
# ---------------------------------------------------------------------------------------------------------

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
    if path.is_dir():
        return _load_folder(path, base_override, vae_dtype)
    from cxrdist.archive import safe_extract

    with tempfile.TemporaryDirectory(prefix="cxrdist-zip-") as tmp:
        root = safe_extract(path, tmp)
        return _load_folder(_model_root(root, path), base_override, vae_dtype)


def _readable(path: Path) -> bool:
    import os

    return os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0))


def _kind(folder: Path) -> str | None:
    from cxrdist.models.lora import METADATA_NAME, WEIGHTS_NAME
    from cxrdist.train.checkpoint import MARKER

    if (folder / "model_index.json").exists():
        return "pipeline"
    if (folder / METADATA_NAME).exists():
        return "adapter"
    if (folder / MARKER).exists():
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
    if kind is None:
        raise ModelError(f"{folder} is not a model: expected a LoRA checkpoint folder (cxrdist.json), a "
                         "training checkpoint (checkpoints/step_N), a diffusers pipeline folder "
                         "(model_index.json) or a .zip of one")
    return loaders[kind](folder, base_override, vae_dtype)


def _load_base_for(source: str, folder: Path, vae_dtype: str, overridden: bool) -> BaseModel:
    try:
        return load_base(source, vae_dtype=vae_dtype)
    except ModelError as exc:
        hint = "" if overridden else "; pass --base to load the adapter on another copy of its base"
        raise ModelError(f"base '{source}' of {folder.name} cannot be loaded: {exc}{hint}") from None


def _load_adapter_folder(folder: Path, base_override: str | None, vae_dtype: str):
    from cxrdist.models.lora import WEIGHTS_NAME, load_adapter, read_adapter_metadata

    meta = read_adapter_metadata(folder)
    check_weights_file(folder / WEIGHTS_NAME, "the adapter")  # before the base: it fails in ms, not after loading
    if not base_override:
        _check_recorded_base(meta, folder)
    source = base_override or meta["base"]["source"]
    base = _load_base_for(source, folder, vae_dtype, overridden=bool(base_override))
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
    """A training checkpoint (`checkpoints/step_N`): its saved config names the base, the adapter and the
    template, so any step of a run can be sampled or evaluated, not only the exported best."""
    from safetensors.torch import load_file

    from cxrdist.config import config_from_dict, load_yaml
    from cxrdist.models.lora import adapter_metadata, attach_lora
    from cxrdist.train.checkpoint import ADAPTER_FILE, CONFIG_FILE, load_adapter_state
    from cxrdist.train.model import LoraDiffusionModel

    for name in (ADAPTER_FILE, CONFIG_FILE):
        if not (folder / name).is_file():
            raise ModelError(f"training checkpoint {folder} has no {name}: it is incomplete; use another step")
    check_weights_file(folder / ADAPTER_FILE, "the training checkpoint")
    cfg = config_from_dict(load_yaml(folder / CONFIG_FILE))
    source = base_override or cfg.model.pretrained
    base = _load_base_for(source, folder, vae_dtype, overridden=bool(base_override))
    spec = attach_lora(base, cfg.lora)
    joint = LoraDiffusionModel(base.unet, base.text_encoder, cfg.lora.train_text_encoder)
    load_adapter_state(joint, load_file(str(folder / ADAPTER_FILE)), folder)
    for module in (base.unet, base.text_encoder):
        module.requires_grad_(False)
    return base, adapter_metadata(base, spec, cfg.data.prompt_template, cfg.to_dict())


def _load_pipeline_folder(folder: Path, base_override: str | None, vae_dtype: str):
    import json

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
    base = _load_base_for(base_override, folder, vae_dtype, overridden=True)
    pipe = assemble_pipeline(base, build_scheduler("ddpm", base.scheduler_config))
    try:
        pipe.load_lora_weights(str(folder))
    except (ValueError, RuntimeError, KeyError) as exc:
        raise ModelError(f"LoRA {folder} does not fit base '{base.source}': {str(exc).splitlines()[0]}") from None
    for module in (base.unet, base.text_encoder):
        module.requires_grad_(False)
    return base, None


# ---------------------------------------------------------------------------------------------------------
# A whole run, as `cxrdist sample` does it
# ---------------------------------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device that is not here is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device '{name}': use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device '{name}' asked for, but CUDA is not available here: use --device cpu")
    return device


def default_out_dir(model_path: str | Path) -> Path:
    import time

    stem = Path(model_path).name.removesuffix(".zip") or "model"
    return Path("samples") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def sample_to_folder(cfg, model_path: str | Path, reports: list[str], out_dir: str | Path,
                     base_override: str | None = None) -> dict:
    """Load the model, generate `cfg.sample.num_images` images per report (image i gets seed
    `cfg.sample.seed + i`), write them with metadata; return a summary. Inputs are checked before the model
    loads, and nothing is written before every image exists."""
    import time

    from cxrdist.models.loading import DTYPES

    check_seed_range(cfg.sample.seed, len(reports) * cfg.sample.num_images)
    out = check_output_dir(out_dir)  # writable now, not after every image was generated
    device = resolve_device(cfg.sample.device)
    dtype = DTYPES[cfg.sample.dtype]
    base, meta = load_for_sampling(model_path, base_override, vae_dtype=cfg.model.vae_dtype)
    base.to(device)
    if dtype != torch.float32:  # half weights save memory; the VAE keeps model.vae_dtype (fp16 VAEs overflow)
        base.unet.to(dtype=dtype)
        base.text_encoder.to(dtype=dtype)
    template = (meta or {}).get("prompt_template", "{report}")
    expanded = [r for r in reports for _ in range(cfg.sample.num_images)]
    seeds = [cfg.sample.seed + i for i in range(len(expanded))]
    settings = SampleSettings.from_config(cfg.sample)
    start = time.perf_counter()
    images = generate_images(base, expanded, settings, template=template, seeds=seeds, device=device,
                             dtype=dtype, progress=True)
    seconds = time.perf_counter() - start
    common = {"negative_prompt": settings.negative_prompt, "steps": settings.steps, "scheduler": settings.scheduler,
              "guidance": settings.guidance, "height": int(images.shape[1]), "width": int(images.shape[2]),
              "template": template, "dtype": cfg.sample.dtype, "model": str(model_path), "base": base.source,
              "base_fingerprint": base.fingerprint}
    records = [{"report": r, "prompt": apply_template(template, r), "seed": s, **common}
               for r, s in zip(expanded, seeds)]
    files = write_samples(out, images, records, cfg)
    return {"out": out, "files": files, "seconds": seconds, "height": images.shape[1], "width": images.shape[2],
            "device": str(device)}
