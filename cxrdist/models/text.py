"""Prompts to conditioning: the prompt template (applied exactly once) and the text encoder call.

Training, validation and sampling all go through `tokenize`, so the conditioning the sampler sees is the
conditioning the adapter was trained on, for CLIP and BERT-style encoders alike. `lowercase` is the family's
(`Family.lowercase_prompts`): PixArt-Σ and Sana prompts are lower-cased as diffusers' pipelines do.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Optional

import torch

from cxrdist.config import TEXT_INSTRUCTIONS
from cxrdist.errors import ConfigError, InputError

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


def instruction_text(name: str) -> Optional[str]:
    """The instruction `model.text_instruction` names, joined as diffusers joins it; None for "none". "sana" is
    SanaPipeline's own default `complex_human_instruction`, read from the installed diffusers."""
    if name == "none":
        return None
    if name == "sana":
        from diffusers import SanaPipeline

        lines = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
        return "\n".join(lines)
    raise ValueError(f"unknown text instruction {name!r}: choose one of {', '.join(TEXT_INSTRUCTIONS)}")


def instruction_for(name: str, base) -> Optional["Instruction"]:
    """model.text_instruction for `base` (a cxrdist.models.loading.BaseModel): None for "none"; "sana" on a base of
    another family is refused in one line (its pipeline has no such instruction)."""
    if name != "none" and base.family.name != name:
        raise ConfigError(f"model.text_instruction={name} applies to {name.capitalize()} bases; {base.source} is "
                          f"{base.family.label}: set model.text_instruction=none")
    return Instruction.build(base.tokenizer, instruction_text(name))


@dataclass(frozen=True)
class Instruction:
    """An instruction prefix as diffusers' SanaPipeline applies `complex_human_instruction`: each non-empty prompt is
    encoded after it (padded to the instruction's tokens + limit - 2), and the context keeps the first position and
    the last limit - 1 (the instruction's last token, the prompt, its padding): the prompt's tokens as the causal
    text encoder reads them after the instruction. Empty prompts (caption dropout, guidance's unconditional side)
    are encoded without it, as the pipeline encodes its negative prompt.

    A row carries the instruction when it starts with `lead`, the instruction's tokens but its last (which may merge
    with the prompt's first when tokenized together)."""

    text: str
    tokens: int  # len(tokenizer.encode(text)), as diffusers counts them
    lead: tuple[int, ...]

    @classmethod
    def build(cls, tokenizer, text: Optional[str]) -> Optional["Instruction"]:
        if not text:
            return None
        ids = tokenizer.encode(text)
        return cls(text, len(ids), tuple(ids[: len(ids) - 1]))

    def width(self, limit: int) -> int:
        """Token columns of a tokenized batch (before any trimming)."""
        return self.tokens + limit - 2

    def prefixed(self, prompts: list[str]) -> list[str]:
        """The texts to tokenize: each non-empty prompt after the instruction, the empty prompt alone."""
        return [self.text + p if p else p for p in prompts]

    def carried(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Per row: whether it starts with the instruction (B bools)."""
        lead = torch.tensor(self.lead, dtype=input_ids.dtype, device=input_ids.device)
        if input_ids.shape[1] < len(lead):
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return (input_ids[:, : len(lead)] == lead).all(dim=1)

    def cut_width(self, input_ids: torch.Tensor, limit: int) -> int:
        """K, the columns every row keeps: W - tokens + 2 when some row carries the instruction, else min(W, limit)
        (W: the batch's width, which trimming the padding may have lowered)."""
        return self._width(input_ids.shape[1], bool(self.carried(input_ids).any()), limit)

    def _width(self, width: int, any_carried: bool, limit: int) -> int:
        return width - self.tokens + 2 if any_carried else min(width, limit)

    def kept_columns(self, input_ids: torch.Tensor, limit: int) -> torch.Tensor:
        """B x K column indices each row keeps (`cut_width`): [0] + [tokens - 1, W) where it carries the
        instruction, [0, K) where not."""
        rows, width = input_ids.shape
        carried = self.carried(input_ids)
        keep = self._width(width, bool(carried.any()), limit)
        plain = torch.arange(keep, device=input_ids.device).expand(rows, keep)
        instructed = torch.cat([torch.zeros(1, dtype=torch.long, device=input_ids.device),
                                torch.arange(self.tokens - 1, self.tokens - 1 + keep - 1, device=input_ids.device)])
        return torch.where(carried[:, None], instructed.expand(rows, keep), plain)

    def cut(self, contexts: torch.Tensor, attention_mask: torch.Tensor, input_ids: torch.Tensor,
            limit: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(contexts, mask) of the columns each row keeps (`kept_columns`)."""
        index = self.kept_columns(input_ids, limit).to(contexts.device)
        contexts = torch.gather(contexts, 1, index[..., None].expand(-1, -1, contexts.shape[-1]))
        return contexts, torch.gather(attention_mask.to(index.device), 1, index)

    def cut_mask(self, attention_mask: torch.Tensor, input_ids: torch.Tensor, limit: int) -> torch.Tensor:
        index = self.kept_columns(input_ids, limit).to(attention_mask.device)
        return torch.gather(attention_mask, 1, index)


def as_read(prompts: list[str], lowercase: bool = False) -> list[str]:
    """The prompts as the text encoder reads them: lower-cased and stripped where the family's pipeline does so."""
    return [p.lower().strip() for p in prompts] if lowercase else list(prompts)


def tokenize(tokenizer, prompts: list[str], warn: bool = True, limit: int = CONTEXT_TOKENS,
             lowercase: bool = False, instruction: Optional[Instruction] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids padded to the encoder's length (at most `limit`); say what was cut rather than truncating
    silently. With an `instruction`, non-empty prompts are tokenized after it, to its width (Instruction)."""
    prompts = as_read(prompts, lowercase)
    length = max_length(tokenizer, limit)
    if instruction is not None:
        prompts, length = instruction.prefixed(prompts), instruction.width(length)
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
                          limit: int = CONTEXT_TOKENS, lowercase: bool = False,
                          instruction: Optional[Instruction] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(contexts, attention masks): the transformer families' denoisers read the mask too."""
    ids, mask = tokenize(tokenizer, prompts, warn=warn, limit=limit, lowercase=lowercase, instruction=instruction)
    contexts = encode_ids(text_encoder, ids, mask)
    if instruction is not None:
        return instruction.cut(contexts, mask, ids, max_length(tokenizer, limit))
    return contexts, mask


def check_prompts(prompts: list[str]) -> list[str]:
    cleaned = [p.strip() for p in prompts]
    if not cleaned or any(not p for p in cleaned):
        raise InputError("empty description: give report text with --description or --prompts-file")
    return cleaned
