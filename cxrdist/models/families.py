"""Model families: what differs between Stable Diffusion 1.x/2.x, PixArt-Σ and Sana, in one table.

A base's family is the pipeline class its `model_index.json` names. Everything else in cxrdist (the trainer, the
sampler, evaluation, export) asks the family rather than testing class names:

- the denoiser: a UNet (`unet/`) or a diffusion transformer (`transformer/`), and how it is called: the
  transformers read the text's attention mask, PixArt-Σ's also predicts a variance (learned sigma) that training
  and sampling drop, as diffusers' PixArt scripts and pipeline do;
- the objective: DDPM noise prediction on the base's own schedule (SD, PixArt-Σ) or rectified-flow matching with
  a velocity target (Sana), as diffusers' `train_dreambooth_lora_sana.py` trains it;
- how many text tokens the denoiser reads: CLIP's 77, or 300 for the T5 (PixArt-Σ) and Gemma-2 (Sana) encoders;
- the key prefix of the denoiser's tensors in an exported LoRA file (`unet.` / `transformer.`), the samplers that
  fit the noise schedule, and which export formats have a meaning.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from cxrdist.errors import ModelError

MODEL_INDEX = "model_index.json"


@dataclass(frozen=True)
class Family:
    name: str
    label: str  # as users know it, for messages
    pipeline: str  # diffusers pipeline class named in model_index.json
    denoiser_folder: str  # "unet" or "transformer"
    denoiser_class: str  # diffusers class of the denoiser
    vae_class: str  # diffusers autoencoder class
    text_encoder_class: str  # transformers class the text encoder loads with
    objective: str  # "ddpm": the base's DDPM schedule and prediction type; "flow": rectified flow, velocity target
    context_tokens: int  # text tokens the denoiser reads
    lora_prefix: str  # key prefix of the denoiser's tensors in an exported LoRA file
    samplers: tuple[str, ...]  # sample.scheduler names that fit the noise schedule
    export_formats: tuple[str, ...]  # `cxrdist export --format` values that have a meaning for the family
    text_encoder_lora: bool  # whether an adapter on the text encoder is supported (and loadable by diffusers)
    # diffusers' PixArt-Σ and Sana pipelines lower-case and strip every prompt before tokenizing (their
    # `_text_preprocessing` with clean_caption=False), and so do its training scripts through `encode_prompt`: a model
    # trained on other text than those pipelines feed it would be sampled off its training conditioning there
    lowercase_prompts: bool
    call_denoiser: Callable[..., torch.Tensor]

    @property
    def is_transformer(self) -> bool:
        return self.denoiser_folder == "transformer"


def _call_unet(unet, noisy, timesteps, context, mask):
    # SD never masks CLIP's padding in cross-attention (a BERT-style encoder's mask is applied inside the encoder)
    return unet(noisy, timesteps, encoder_hidden_states=context).sample


def _call_pixart(transformer, noisy, timesteps, context, mask):
    # PixArt-Σ's micro-conditions (resolution, aspect ratio) are off for every Σ checkpoint; diffusers passes None
    out = transformer(noisy, encoder_hidden_states=context, encoder_attention_mask=mask, timestep=timesteps,
                      added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    if out.shape[1] == 2 * noisy.shape[1]:  # learned sigma: the first half is the noise prediction
        out = out.chunk(2, dim=1)[0]
    return out


def _call_sana(transformer, noisy, timesteps, context, mask):
    return transformer(noisy, encoder_hidden_states=context, encoder_attention_mask=mask, timestep=timesteps).sample


DDPM_SAMPLERS = ("dpm++", "ddim", "pndm", "euler", "ddpm")
FAMILIES: dict[str, Family] = {
    "sd": Family(
        name="sd", label="Stable Diffusion 1.x/2.x", pipeline="StableDiffusionPipeline", denoiser_folder="unet",
        denoiser_class="UNet2DConditionModel", vae_class="AutoencoderKL", text_encoder_class="AutoModel",
        objective="ddpm", context_tokens=77, lora_prefix="unet", samplers=DDPM_SAMPLERS,
        export_formats=("merged", "zip", "kohya"), text_encoder_lora=True, lowercase_prompts=False,
        call_denoiser=_call_unet),
    "pixart-sigma": Family(
        name="pixart-sigma", label="PixArt-Σ", pipeline="PixArtSigmaPipeline", denoiser_folder="transformer",
        denoiser_class="PixArtTransformer2DModel", vae_class="AutoencoderKL", text_encoder_class="T5EncoderModel",
        objective="ddpm", context_tokens=300, lora_prefix="transformer", samplers=DDPM_SAMPLERS,
        export_formats=("merged", "zip"), text_encoder_lora=False, lowercase_prompts=True,
        call_denoiser=_call_pixart),
    "sana": Family(
        name="sana", label="Sana", pipeline="SanaPipeline", denoiser_folder="transformer",
        denoiser_class="SanaTransformer2DModel", vae_class="AutoencoderDC", text_encoder_class="AutoModel",
        objective="flow", context_tokens=300, lora_prefix="transformer", samplers=("dpm++", "euler"),
        export_formats=("merged", "zip"), text_encoder_lora=False, lowercase_prompts=True,
        call_denoiser=_call_sana),
}
BY_PIPELINE = {family.pipeline: family for family in FAMILIES.values()}


def supported_pipelines() -> str:
    return ", ".join(f"{family.pipeline} ({family.label})" for family in FAMILIES.values())


def family_from_index(index: dict, where: str) -> Family:
    """The family a model_index.json (as a dict) names; an unsupported pipeline is one ModelError naming the
    supported ones."""
    name = index.get("_class_name")
    if name in BY_PIPELINE:
        return BY_PIPELINE[name]
    raise ModelError(f"{where} is a {name or 'pipeline of unknown class'}, which cxrdist does not train: supported "
                     f"are {supported_pipelines()}")


def family_of(path: str, revision: str | None = None) -> Family:
    """The family of a local pipeline folder or a hub id (reads model_index.json; a folder without one, holding
    only `unet/`, is Stable Diffusion)."""
    folder = Path(path)
    if folder.is_dir():
        index_file = folder / MODEL_INDEX
        if not index_file.exists():
            return FAMILIES["sd"]
        try:
            index = json.loads(index_file.read_text(encoding="utf-8"))
        except (ValueError, OSError) as exc:
            raise ModelError(f"{index_file} is not valid JSON ({type(exc).__name__}): restore the model "
                             "folder") from None
        if not isinstance(index, dict):
            raise ModelError(f"{index_file} is not a JSON object: restore the model folder")
        return family_from_index(index, str(folder))
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(path, revision=revision)
    except (OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"cannot read {MODEL_INDEX} of '{path}': {first}") from None
    return family_from_index(dict(index), path)


def vae_scale_factor(vae) -> int:
    """Pixels per latent pixel: AutoencoderKL halves per block after the first, DC-AE likewise per encoder stage."""
    config = vae.config
    blocks = getattr(config, "encoder_block_out_channels", None) or config.block_out_channels
    return 2 ** (len(blocks) - 1)
