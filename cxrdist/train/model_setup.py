"""The model as training computes with it: the frozen base in the compute dtype, the trained weights in fp32,
the attention kernel (model.attention) and gradient checkpointing."""
from __future__ import annotations

import torch

from cxrdist.config import Config
from cxrdist.errors import ModelError
from cxrdist.models.diffusion import LoraDiffusionModel
from cxrdist.models.trained import fully_trained, trained_parameters


def configure_model(model: LoraDiffusionModel, cfg: Config, dtype: torch.dtype, deepspeed: bool = False) -> None:
    """Frozen base in the compute dtype, trained weights in fp32, attention kernel, gradient checkpointing.

    A fully trained denoiser (train.method=full) keeps fp32 weights under accelerate's autocast, which computes in
    bf16/fp16 from them. Under DeepSpeed bf16/fp16 it is cast to the compute dtype like the frozen base: the engine
    computes from half-precision weights and keeps the fp32 masters in its optimizer, built from these (DeepSpeed
    0.19.8 under accelerate 1.15 left such a module in fp32, partitions included: a "bf16" run computed in fp32)."""
    for module in (model.unet, model.text_encoder):
        whole = fully_trained(module)
        if dtype != torch.float32 and (deepspeed or not whole):
            module.to(dtype)
        if not (whole and deepspeed):
            for p in trained_parameters(module):
                p.data = p.data.float()
    if model.family.is_transformer:
        # PixArt-Σ and Sana keep their own processors (SDPA, and Sana's linear attention, which a generic
        # processor would replace with softmax attention)
        if cfg.model.attention != "sdpa":
            raise ModelError(f"model.attention={cfg.model.attention} applies to UNets; {model.family.label} keeps "
                             "its own attention kernels: set model.attention=sdpa")
    else:
        ATTENTION[cfg.model.attention](model.unet)
    if cfg.model.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        if model.train_text_encoder:
            model.text_encoder.gradient_checkpointing_enable()


def _sdpa(unet) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())


def _plain_attention(unet) -> None:
    from diffusers.models.attention_processor import AttnProcessor

    unet.set_attn_processor(AttnProcessor())


ATTENTION = {"sdpa": _sdpa, "default": _plain_attention}
