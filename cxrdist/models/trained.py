"""What a run trains (train.method): LoRA adapters on the frozen base, or every weight of the denoiser.

Either way the trained tensors are the parameters that require a gradient after `attach_training`, so the optimizer,
checkpoints, the EMA and the rank-agreement check read one set by one rule, whatever the method. The VAE is never
part of it; under `full` the text encoder trains only with train.train_text_encoder (a LoRA run puts an adapter on it
through lora.train_text_encoder).
"""
from __future__ import annotations

from typing import Any

import torch

from cxrdist.config import Config
from cxrdist.errors import ModelError
from cxrdist.models.loading import BaseModel
from cxrdist.models.lora import attach_lora

FULL_FORMAT = "cxrdist-full/1"
# A full fine-tune's training checkpoint without DeepSpeed: the denoiser's fp32 weights by full parameter name (under
# DeepSpeed the engine's own files, one part per rank, hold them; nothing is gathered into one file).
CHECKPOINT_FULL = "trained.safetensors"


def unfreeze_denoiser(base: BaseModel, text_encoder: bool = False) -> dict[str, Any]:
    """Every weight of the denoiser trains, and of the text encoder with `text_encoder`; the rest stays frozen.
    Returns the spec checkpoints and exports record."""
    for module in (base.unet, base.text_encoder):
        if getattr(module, "peft_config", None):
            raise ModelError("the base already holds a LoRA adapter: full fine-tuning starts from plain weights "
                             "(merge the adapter first: cxrdist export --format merged)")
    base.text_encoder.requires_grad_(text_encoder)
    base.unet.requires_grad_(True)
    return {"method": "full", "denoiser": type(base.unet).__name__,
            "text_encoder": type(base.text_encoder).__name__ if text_encoder else None}


def attach_training(base: BaseModel, cfg: Config) -> dict[str, Any]:
    """Make what `train.method` trains require a gradient (and nothing else); the spec describes it."""
    if cfg.train.method == "full":
        return unfreeze_denoiser(base, text_encoder=cfg.train.train_text_encoder)
    return attach_lora(base, cfg.lora)  # the adapter spec, as adapter folders record it


def trains_text_encoder(spec: dict[str, Any]) -> bool:
    return spec.get("text_encoder") is not None


def is_full(spec: dict[str, Any]) -> bool:
    return spec.get("method") == "full"


def trained_named_parameters(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The trained parameters of `module` by full name: those that require a gradient."""
    return [(name, param) for name, param in module.named_parameters() if param.requires_grad]


def trained_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [param for _, param in trained_named_parameters(module)]


def fully_trained(module: torch.nn.Module) -> bool:
    """True when every parameter of `module` trains (a fully fine-tuned denoiser): it keeps fp32 weights, which
    mixed precision computes from, instead of the frozen base's half-precision copy."""
    params = list(module.parameters())
    return bool(params) and all(p.requires_grad for p in params)


def load_trained_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where) -> None:
    """Copy a training checkpoint's trained tensors (by full name) into `model`, refusing any key mismatch."""
    expected = {name for name, _ in trained_named_parameters(model)}
    missing = sorted(expected - set(tensors))
    unknown = sorted(set(tensors) - expected)
    if missing or unknown:
        raise ModelError(f"checkpoint {where} does not fit this model: trained tensor "
                         f"'{(missing or unknown)[0]}' {'missing' if missing else 'unexpected'}; "
                         "resume with the config it was trained with")
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
