"""Synthetic radiographs from report text: the scheduler table and batched, seeded generation.

`generate_images` is the one generation path: `cxrdist sample`, the trainer's validation and `cxrdist evaluate`
all call it, so what is validated is what users sample. It assembles the family's diffusers pipeline
(StableDiffusionPipeline, PixArtSigmaPipeline, SanaPipeline) around modules that are already loaded (no weight
copies, never a safety checker: it blacks out radiographs) and hands it precomputed conditioning and attention
masks from `cxrdist.models.text.encode_prompts_masked`, so every text encoder goes through the same code.
Loading a model for sampling is `cxrdist.sampling.loading`; a whole `cxrdist sample` run is
`cxrdist.sampling.run`.

A sample whose latents or decoded pixels hold NaN or inf is an error (`NonFiniteSample`), not an image: clamping
and the uint8 conversion would turn it into a plausible-looking black or white square. It means damaged weights
(an adapter with an absurd alpha, a diverged run) or an overflow at half precision.
"""
from __future__ import annotations

import contextlib
import logging
import numbers
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from cxrdist.config import SCHEDULERS, sampler_problem
from cxrdist.data.latents import encode_mean
from cxrdist.errors import InputError, ModelError
from cxrdist.models.families import FAMILIES, Family
from cxrdist.models.loading import BaseModel
from cxrdist.models.text import apply_template, encode_prompts_masked
from cxrdist.progress import progress_meter

log = logging.getLogger(__name__)


# torch.Generator.manual_seed takes up to 2**64 - 1, numpy and PNG metadata readers want a signed 64-bit int:
# seeds live in 0..2**63 - 1 so every tool reading a sample's seed back can reproduce it.
SEED_MAX = 2**63 - 1


class NonFiniteSample(ModelError):
    """Image `index` of a generate_images call came out as NaN/inf (its latents or its decoded pixels)."""

    def __init__(self, index: int, seed: int, stage: str, base: str, dtype: torch.dtype, model: str | None = None,
                 prompt: int | None = None) -> None:
        self.index, self.seed, self.stage, self.base, self.dtype = index, seed, stage, base, dtype
        self.model, self.prompt = model, prompt
        source = f"model '{model}' on base '{base}'" if model else f"base '{base}'"
        which = f"prompt {index if prompt is None else prompt} (image {index}, seed {seed})"
        precision = "" if dtype == torch.float32 else \
            f"; or {str(dtype).removeprefix('torch.')} overflowed: try --dtype fp32"
        super().__init__(f"{which} came out as NaN/inf {stage} from {source}, so nothing was written: its weights "
                         f"are damaged or diverged (check the adapter's weights and the alpha in its cxrdist.json)"
                         f"{precision}")

    def naming(self, model: str, prompt: int) -> "NonFiniteSample":
        """The same error, naming the model path the user gave and the index of their prompt."""
        return NonFiniteSample(self.index, self.seed, self.stage, self.base, self.dtype, model, prompt)


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


def build_scheduler(name: str, scheduler_config: dict, family: Family = FAMILIES["sd"]):
    """A fresh scheduler of the named kind on the base model's noise schedule (for a flow-matching family, the
    flow form of the sampler, on the base's flow shift)."""
    import diffusers

    if name not in SCHEDULERS:
        raise InputError(f"unknown scheduler '{name}': choose one of {', '.join(SCHEDULERS)}")
    if name not in family.samplers:
        raise InputError(f"scheduler '{name}' does not fit {family.label}'s noise schedule: choose one of "
                         f"{', '.join(family.samplers)} (sample.scheduler / --scheduler)")
    if family.objective == "flow":
        shift = float(scheduler_config.get("flow_shift") or scheduler_config.get("shift") or 1.0)
        if name == "euler":
            return diffusers.FlowMatchEulerDiscreteScheduler.from_config(scheduler_config, shift=shift)
        return diffusers.DPMSolverMultistepScheduler.from_config(
            scheduler_config, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
            **SCHEDULERS[name][1])
    class_name, kwargs = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(scheduler_config, **kwargs)


def image_shape(base: BaseModel, settings: SampleSettings) -> tuple[int, int]:
    height = settings.height or base.image_size
    width = settings.width or base.image_size
    for what, value in (("height", height), ("width", width)):
        if value < 8 or value % 8:
            raise InputError(f"image {what} {value} must be a positive multiple of 8")
    return height, width


def _check(settings: SampleSettings, reports: list[str], seeds: list[int]) -> None:
    problem = sampler_problem(settings.steps, settings.scheduler, settings.batch_size)
    if problem:
        name, expected = problem
        raise InputError(f"sampler setting {name}={getattr(settings, name)!r} must be {expected}")
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


def check_seed_range(first: int, count: int, setting: str | None = "sample.seed") -> None:
    """Refuse a run whose seeds (first, first + 1, ..., first + count - 1) leave 0..SEED_MAX, before loading.
    `setting`: the config key the seed came from, named in the message (None: the flag only)."""
    if not (_seed_ok(first) and _seed_ok(first + max(count, 1) - 1)):
        where = f" ({setting})" if setting else ""
        raise InputError(f"--seed {first} is out of range: image i gets seed + i, so seed must be in "
                         f"0..{SEED_MAX - max(count, 1) + 1} for {count} image(s){where}")


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
    """The family's diffusers pipeline around the loaded modules: shares them, copies nothing, no safety checker."""
    import diffusers

    parts = {"vae": base.vae, "text_encoder": base.text_encoder, "tokenizer": base.tokenizer, "scheduler": scheduler,
             base.family.denoiser_folder: base.unet}
    if base.family.name == "sd":
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = getattr(diffusers, base.family.pipeline)(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _denoise(pipe, base: BaseModel, cond, cond_mask, uncond, uncond_mask, noise, generators, height: int, width: int,
             settings: SampleSettings, tick) -> torch.Tensor:
    """The family pipeline's own denoising loop on precomputed conditioning; returns the final latents."""
    common = dict(prompt_embeds=cond, negative_prompt_embeds=uncond, height=height, width=width,
                  num_inference_steps=settings.steps, guidance_scale=settings.guidance, generator=generators,
                  latents=noise, output_type="latent")
    family = base.family.name
    if family == "sd":
        return pipe(**common, callback_on_step_end=tick).images
    # negative_prompt=None: these pipelines default it to "" and then refuse precomputed negative embeddings
    masks = dict(prompt_attention_mask=cond_mask, negative_prompt_attention_mask=uncond_mask, negative_prompt=None,
                 use_resolution_binning=False)
    if family == "sana":
        return pipe(**common, **masks, complex_human_instruction=None, callback_on_step_end=tick).images
    # PixArt-Σ's pipeline still takes the older per-step callback
    return pipe(**common, **masks, clean_caption=False, callback=lambda *args: tick(pipe, 0, 0, {}),
                callback_steps=1).images


def _initial_noise(seeds: list[int], shape: tuple[int, ...]) -> tuple[torch.Tensor, list[torch.Generator]]:
    """Per-image CPU generators: image i's noise depends on seeds[i] only (not on batch, device or dtype)."""
    generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
    noise = torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in generators])
    return noise, generators


def _decode_raw(base: BaseModel, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> the VAE's output in float32, before any clamping (N x C x H x W, about [-1, 1])."""
    vae = base.vae
    latents = latents.to(vae.dtype) / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift:
        latents = latents + shift
    return vae.decode(latents, return_dict=False)[0].float()


def _to_gray(pixels: torch.Tensor) -> np.ndarray:
    """VAE output -> grayscale float32 images in [0, 1]; 3-channel VAEs are averaged over channels."""
    pixels = (pixels / 2 + 0.5).clamp(0, 1).mean(dim=1)
    return pixels.cpu().numpy().astype(np.float32)


def _decode(base: BaseModel, latents: torch.Tensor) -> np.ndarray:
    return _to_gray(_decode_raw(base, latents))


def _first_nonfinite(tensor: torch.Tensor) -> int | None:
    """The first image (index along dim 0) holding a NaN or inf, or None."""
    bad = ~torch.isfinite(tensor.reshape(tensor.shape[0], -1)).all(dim=1)
    return int(bad.nonzero()[0, 0]) if bool(bad.any()) else None


@torch.no_grad()
def as_drawn(base: BaseModel, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Grayscale images in [0, 1] as this model's VAE gives them back: encoded to the posterior mean, then decoded
    as the sampler decodes. No sample can be closer to a training image than this; the memorization audit
    compares samples with training images drawn so (the VAE's own loss would hide a copy)."""
    vae = base.vae
    device = next(vae.parameters()).device
    scaling, shift = vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0
    out = np.empty(np.shape(images), dtype=np.float32)
    for start in range(0, len(images), batch_size):
        pixels = torch.as_tensor(np.asarray(images[start:start + batch_size]), dtype=torch.float32, device=device)
        pixels = (pixels * 2 - 1)[:, None].expand(-1, base.channels, -1, -1).to(vae.dtype)
        raw = encode_mean(vae, pixels).float()
        out[start:start + batch_size] = _decode(base, (raw - shift) * scaling)
    return out


def _embed_unique(base: BaseModel, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode each distinct prompt once (one truncation warning per prompt), then index per image: (contexts,
    attention masks)."""
    unique = list(dict.fromkeys(prompts))
    embeds, masks = encode_prompts_masked(base.tokenizer, base.text_encoder, unique, limit=base.context_tokens,
                                          lowercase=base.lowercase_prompts, instruction=base.instruction)
    where = torch.tensor([{p: i for i, p in enumerate(unique)}[p] for p in prompts])
    return embeds[where.to(embeds.device)], masks[where].to(embeds.device)


@torch.no_grad()
def generate_images(base: BaseModel, reports: list[str], settings: SampleSettings, *, template: str = "{report}",
                    seeds: list[int], device=None, dtype: torch.dtype = torch.float32,
                    progress: bool = False) -> np.ndarray:
    """Generate one grayscale image per report: float32 array N x H x W in [0, 1].

    Image i depends only on (reports[i], seeds[i], settings), not on which other images share its batch.
    `template` is applied exactly once here; pass raw report text. Works with adapters attached; the
    modules' train/eval flags and devices are restored on return, requires_grad is never touched.
    `dtype` other than float32 runs under autocast (weights are not cast). An image whose latents or decoded
    pixels are not finite raises NonFiniteSample (nothing is returned).
    """
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
    bar = progress_meter(len(batches) * settings.steps, desc="sampling", unit="step", disable=not progress)

    def tick(pipe, step, timestep, tensors):
        bar.update(1)
        return tensors

    with bar, _on_device(base, device), _eval_mode(base.unet, base.vae, base.text_encoder), _autocast(device, dtype):
        cond, cond_mask = _embed_unique(base, prompts)
        uncond, uncond_mask = encode_prompts_masked(base.tokenizer, base.text_encoder,
                                                    [settings.negative_prompt.strip()], warn=True,
                                                    limit=base.context_tokens, lowercase=base.lowercase_prompts)
        uncond_mask = uncond_mask.to(uncond.device)
        for batch in batches:
            noise, generators = _initial_noise([seeds[i] for i in batch], latent_shape)
            pipe = assemble_pipeline(base, build_scheduler(settings.scheduler, base.scheduler_config, base.family))
            n = len(batch)
            latents = _denoise(pipe, base, cond[batch.start:batch.stop], cond_mask[batch.start:batch.stop],
                               uncond.expand(n, -1, -1), uncond_mask.expand(n, -1),
                               noise.to(device, cond.dtype), generators, height, width, settings, tick)
            # Checked before the clamp and the uint8 conversion, which would hide NaN/inf as black or white.
            bad, stage = _first_nonfinite(latents), "in its latents"
            if bad is None:
                pixels = _decode_raw(base, latents)
                bad, stage = _first_nonfinite(pixels), "in its decoded pixels"
            if bad is not None:
                index = batch.start + bad
                raise NonFiniteSample(index, int(seeds[index]), stage, base.source, dtype)
            out[batch.start:batch.stop] = _to_gray(pixels)
    return out
