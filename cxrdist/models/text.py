"""Prompts to conditioning: the prompt template (applied exactly once) and the text encoder call.

Training, validation and sampling all go through `tokenize`, so the conditioning the sampler sees is the
conditioning the adapter was trained on, for CLIP and BERT-style encoders alike. `lowercase` is the family's
(`Family.lowercase_prompts`): PixArt-Σ and Sana prompts are lower-cased as diffusers' pipelines do.
"""
from __future__ import annotations

import logging

import torch

from cxrdist.errors import InputError

log = logging.getLogger(__name__)


def apply_template(template: str, report: str) -> str:
    """Fill the template once. An empty report stays empty (the unconditional prompt for guidance)."""
    report = report.strip()
    if not report:
        return ""
    return template.replace("{report}", report)


# What SD's CLIP reads; BERT-style encoders on a UNet are held to the same budget. PixArt-Σ and Sana read 300
# (their family's `context_tokens`, passed as `limit`).
CONTEXT_TOKENS = 77


def max_length(tokenizer, limit: int = CONTEXT_TOKENS) -> int:
    length = int(getattr(tokenizer, "model_max_length", limit) or limit)
    return min(length, limit)


def as_read(prompts: list[str], lowercase: bool = False) -> list[str]:
    """The prompts as the text encoder reads them: lower-cased and stripped where the family's pipeline does so."""
    return [p.lower().strip() for p in prompts] if lowercase else list(prompts)


def tokenize(tokenizer, prompts: list[str], warn: bool = True, limit: int = CONTEXT_TOKENS,
             lowercase: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids padded to the encoder's length (at most `limit`); say what was cut rather than truncating
    silently."""
    prompts = as_read(prompts, lowercase)
    length = max_length(tokenizer, limit)
    if warn:
        for prompt in prompts:
            ids = tokenizer(prompt, truncation=False, add_special_tokens=True)["input_ids"]
            if len(ids) > length:
                # ids = [start] content... [end]; the encoder keeps [start] + length-2 tokens + [end].
                cut = tokenizer.decode(ids[length - 1 : -1], skip_special_tokens=True).strip()
                log.warning("prompt is %d tokens, the text encoder reads %d: cut '%s'", len(ids), length,
                            _shorten(cut))
    # right padding whatever the tokenizer's default (Gemma's pads left): diffusers' Sana pipeline sets it so, and
    # trimming a batch to its longest report (cxrdist.models.diffusion.trim_padding) relies on it
    batch = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt",
                      padding_side="right")
    return batch["input_ids"], batch["attention_mask"]


def _shorten(text: str, limit: int = 120) -> str:
    """Keep both ends of a long cut: where it starts and how the report ended."""
    half = (limit - 5) // 2
    return text if len(text) <= limit else f"{text[:half]} ... {text[-half:]}"


def encode_ids(text_encoder, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token last-layer hidden states used as cross-attention context.

    CLIP is causal and SD never masks it (padding after the end token cannot change earlier tokens); a
    bidirectional BERT-style encoder was pretrained with masks, so it gets one.
    """
    device = next(text_encoder.parameters()).device
    if is_clip(text_encoder) or attention_mask is None:
        return text_encoder(input_ids.to(device))[0]
    return text_encoder(input_ids.to(device), attention_mask=attention_mask.to(device))[0]


def is_clip(text_encoder) -> bool:
    return getattr(getattr(text_encoder, "config", None), "model_type", "").startswith("clip")


def encode_prompts(tokenizer, text_encoder, prompts: list[str], warn: bool = True,
                   limit: int = CONTEXT_TOKENS, lowercase: bool = False) -> torch.Tensor:
    return encode_prompts_masked(tokenizer, text_encoder, prompts, warn, limit, lowercase)[0]


def encode_prompts_masked(tokenizer, text_encoder, prompts: list[str], warn: bool = True,
                          limit: int = CONTEXT_TOKENS, lowercase: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(contexts, attention masks): the transformer families' denoisers read the mask too."""
    ids, mask = tokenize(tokenizer, prompts, warn=warn, limit=limit, lowercase=lowercase)
    return encode_ids(text_encoder, ids, mask), mask


def check_prompts(prompts: list[str]) -> list[str]:
    cleaned = [p.strip() for p in prompts]
    if not cleaned or any(not p for p in cleaned):
        raise InputError("empty description: give report text with --description or --prompts-file")
    return cleaned
