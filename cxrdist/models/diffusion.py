"""The trained module (UNet + text encoder as ONE nn.Module), the diffusion objective and the batch encoder.

One module, because DDP and DeepSpeed must see the text-encoder call inside the wrapped forward (and
accelerate refuses two models under DeepSpeed). The objective uses a DDPM scheduler built from the base's
own scheduler config (its betas and prediction type), never the sampler's.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from cxrdist.config import TIMESTEP_BIASES
from cxrdist.data.latents import encode_mean
from cxrdist.errors import ModelError
from cxrdist.models.families import FAMILIES, Family
from cxrdist.models.text import CONTEXT_TOKENS, Instruction, apply_template, as_read, encode_ids, max_length, tokenize

log = logging.getLogger(__name__)


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """One host-to-device copy; from pinned memory and non-blocking on CUDA, so the host does not wait on it."""
    if torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def trim_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the token columns that are padding in every row (right padding: the batch's longest report sets the
    width). For a denoiser that masks its cross-attention this changes nothing but the cost: a masked key has
    weight exp(-10000) = 0 in fp32, and a masked (bidirectional) or causal encoder gives the real tokens the same
    states whatever padding follows. Sana and PixArt-Σ read 300 tokens; radiology reports are mostly far shorter."""
    keep = attention_mask.bool().any(dim=0)
    width = int(keep.nonzero().max()) + 1 if bool(keep.any()) else 1
    return input_ids[:, :width], attention_mask[:, :width]


class FrozenTextCache:
    """Context of a frozen text encoder, remembered per token sequence.

    Reports repeat every epoch and a frozen encoder maps them to the same context, so each distinct
    sequence is encoded once. Rows are encoded one at a time, which makes a cached context bit-identical
    to a fresh one whatever batch it first came in (resume stays exact). Bounded: the oldest entries go.

    With `trim` (denoisers that mask the text, cxrdist.models.families), a report's context is encoded and kept at
    the report's own length, and a batch is padded with zeros (masked) to its longest report: memory per entry is
    the report's tokens x the encoder's width (a 60-token report under Gemma-2-2B's 2,304 channels: 0.55 MB in
    fp32), not the 300-token budget (2.8 MB). Without it (a UNet reads every position), the padded row is kept.
    """

    def __init__(self, max_items: int, trim: bool = False, instruction: Instruction | None = None,
                 limit: int = CONTEXT_TOKENS):
        self.max_items = max_items
        self.trim = trim
        self.instruction, self.limit = instruction, limit  # a row's context is kept as cut (Instruction.cut)
        self.store: dict[bytes, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    @staticmethod
    def keys(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[bytes]:
        """One key per row from its real tokens only, so the same report has the same key at any padded width."""
        host_ids = input_ids.cpu().numpy()  # one device-to-host copy per batch, not one per row
        if attention_mask is None:
            return [row.tobytes() for row in host_ids]
        host_mask = attention_mask.cpu().numpy().astype(bool)
        return [row[keep].tobytes() for row, keep in zip(host_ids, host_mask)]

    @staticmethod
    @torch.no_grad()
    def encode_row(text_encoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   i: int, trim: bool = False, instruction: Instruction | None = None,
                   limit: int = CONTEXT_TOKENS) -> torch.Tensor:
        """Row i's context, encoded alone: the one way every cached context is computed. With `trim`, only the
        row's own tokens (right padding), so its context does not depend on the batch it came in; with an
        `instruction`, cut as Instruction.cut cuts it."""
        ids = input_ids[i : i + 1]
        mask = attention_mask[i : i + 1] if attention_mask is not None else None
        if trim and mask is not None:
            length = FrozenTextCache.own_length(mask[0])
            ids, mask = ids[:, :length], mask[:, :length]
        context = encode_ids(text_encoder, ids, mask)
        if instruction is not None and mask is not None:
            context = instruction.cut(context, mask, ids, limit)[0]
        return context[0]

    @staticmethod
    def own_length(mask_row: torch.Tensor) -> int:
        """A right-padded row's real tokens (at least one: the empty prompt's context is not empty)."""
        return max(1, int(mask_row.sum()))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.store.values())

    def describe_bound(self, text_encoder: nn.Module, context_tokens: int) -> str:
        """The most memory the cache can take on each rank (every entry at the family's full token budget: an
        upper bound where entries are kept at each report's own length)."""
        config = text_encoder.config
        width = int(getattr(config, "hidden_size", 0) or getattr(config, "d_model", 0))
        item = next(text_encoder.parameters()).element_size()
        bound = self.max_items * context_tokens * width * item
        kept = "each report at its own length" if self.trim else "each report padded to the budget"
        return (f"at most {self.max_items} reports x {context_tokens} tokens x {width} channels x {item} bytes = "
                f"{bound / 2**30:.2f} GiB per rank ({kept})")

    def put(self, key: bytes, context: torch.Tensor) -> None:
        self.store[key] = context
        if len(self.store) > self.max_items:
            self.store.pop(next(iter(self.store)))

    def __call__(self, text_encoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
        rows = []
        for i, key in enumerate(self.keys(input_ids, attention_mask)):
            if key not in self.store:
                self.misses += 1
                self.put(key, self.encode_row(text_encoder, input_ids, attention_mask, i, trim=self.trim,
                                              instruction=self.instruction, limit=self.limit))
            else:
                self.hits += 1
            rows.append(self.store[key])
        if self.trim:
            width = input_ids.shape[1] if self.instruction is None else self.instruction.cut_width(input_ids,
                                                                                                     self.limit)
            return pad_rows(rows, width)
        return torch.stack(rows)


def pad_rows(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """Stack contexts of different lengths, zero-padded (masked positions) to `width` tokens."""
    out = rows[0].new_zeros((len(rows), width, rows[0].shape[-1]))
    for i, row in enumerate(rows):
        out[i, : len(row)] = row[:width]
    return out


class LoraDiffusionModel(nn.Module):
    """forward(noisy latents, timesteps, token ids, attention mask) -> the denoiser's prediction, called as its
    family calls it (`unet` is the denoiser: a UNet or a diffusion transformer)."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, train_text_encoder: bool, text_cache_size: int = 0,
                 family: Family = FAMILIES["sd"], instruction: Instruction | None = None):
        super().__init__()
        self.unet = unet
        self.family = family
        self.text_encoder = text_encoder
        self.train_text_encoder = train_text_encoder
        # model.text_instruction (Sana): token ids arrive with it, the context and mask leave cut (Instruction.cut)
        self.instruction = instruction
        # A plain attribute, not a buffer: nothing to synchronise or checkpoint, rebuilt after a resume.
        self.text_cache = (FrozenTextCache(text_cache_size, trim=family.is_transformer, instruction=instruction,
                                           limit=family.context_tokens)
                           if text_cache_size and not train_text_encoder else None)

    def train(self, mode: bool = True) -> "LoraDiffusionModel":
        """Train mode for what trains; a frozen text encoder stays in eval mode (MiniLM has dropout 0.1: in train
        mode its contexts would be noisy, and the per-report cache would keep one noisy draw per report)."""
        super().train(mode)
        if not self.train_text_encoder:
            self.text_encoder.eval()
        return self

    def input_dtype(self) -> torch.dtype:
        """The dtype the UNet's first layer computes in. Under DeepSpeed bf16/fp16 the engine casts every
        parameter (adapters too) and runs no autocast, so inputs must arrive in that dtype; under accelerate's
        autocast or in fp32 the frozen base's dtype is as good (autocast casts per op anyway)."""
        # the input layer: a UNet's conv_in, a transformer's patch embedding (any frozen weight of the denoiser)
        return next(p for name, p in self.unet.named_parameters() if "lora_" not in name).dtype

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if self.text_cache is not None and not self.train_text_encoder:
            return self.text_cache(self.text_encoder, input_ids, attention_mask)  # cut as it is cached
        with contextlib.nullcontext() if self.train_text_encoder else torch.no_grad():
            context = encode_ids(self.text_encoder, input_ids, attention_mask)
        if self.instruction is not None and attention_mask is not None:
            context = self.instruction.cut(context, attention_mask, input_ids, self.family.context_tokens)[0]
        return context

    def forward(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is not None and self.family.is_transformer:
            input_ids, attention_mask = trim_padding(input_ids, attention_mask)
        context = self.encode_text(input_ids, attention_mask)
        if self.instruction is not None and attention_mask is not None:
            attention_mask = self.instruction.cut_mask(attention_mask, input_ids, self.family.context_tokens)
        sample = noisy_latents.to(self.input_dtype())
        mask = attention_mask.to(sample.device) if attention_mask is not None else None
        return self.family.call_denoiser(self.unet, sample, timesteps, context.to(sample.dtype), mask)


# What the UNet is trained to predict, per the base's `prediction_type`.
TARGETS: dict[str, Callable] = {
    "epsilon": lambda sched, x0, noise, t: noise,
    "v_prediction": lambda sched, x0, noise, t: sched.get_velocity(x0, noise, t),
    "sample": lambda sched, x0, noise, t: x0,
}
# min-SNR-gamma (Hang et al. 2023): the weight that turns each target's loss into min(SNR, gamma) weighting.
# epsilon's min(SNR, gamma) / SNR is written as min(gamma / SNR, 1): equal for SNR > 0, and 1 (not 0/0 = NaN)
# at the last timestep of a zero-terminal-SNR schedule, where SNR is exactly 0.
SNR_WEIGHTS: dict[str, Callable] = {
    "epsilon": lambda snr, gamma: torch.clamp(gamma / snr, max=1.0),
    "v_prediction": lambda snr, gamma: torch.clamp(snr, max=gamma) / (snr + 1),
    "sample": lambda snr, gamma: torch.clamp(snr, max=gamma),
}


def timestep_weights(num_timesteps: int, bias: str = "none", multiplier: float = 1.0, portion: float = 0.25,
                     begin: int = 0, end: int = 0) -> torch.Tensor | None:
    """Relative sampling weight of each training timestep, as diffusers' SDXL scripts and SimpleTuner bias them:
    "later" multiplies the weight of the noisiest `portion` of the schedule by `multiplier`, "earlier" that of the
    least noisy portion, "range" that of timesteps [begin, end). None for "none" (uniform) or a multiplier of 1."""
    if bias == "none" or multiplier == 1.0:
        return None
    weights = torch.ones(num_timesteps)
    count = max(1, round(num_timesteps * portion))
    if bias == "later":
        weights[num_timesteps - count:] *= multiplier
    elif bias == "earlier":
        weights[:count] *= multiplier
    elif bias == "range":
        if not 0 <= begin < end <= num_timesteps:
            raise ModelError(f"train.timestep_bias_begin/end = {begin}/{end} must satisfy 0 <= begin < end <= "
                             f"{num_timesteps} (the base scheduler's num_train_timesteps)")
        weights[begin:end] *= multiplier
    else:
        raise ModelError(f"train.timestep_bias '{bias}' is not one of {', '.join(TIMESTEP_BIASES)}")
    return weights


@dataclass(frozen=True)
class FlowSettings:
    """How a flow-matching objective draws timesteps and weights the loss (train.flow_*; see cxrdist.config)."""

    timesteps: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    loss_weight: str = "none"

    @classmethod
    def from_train(cls, t) -> "FlowSettings":
        return cls(t.flow_timesteps, t.flow_logit_mean, t.flow_logit_std, t.flow_mode_scale, t.flow_loss_weight)


class DiffusionObjective:
    """Noising, targets and the (optionally min-SNR weighted) MSE loss of the base's training schedule.
    Timesteps are drawn uniformly, or by `timestep_weights` (see there) when given.

    `objective="flow"` (Sana) is rectified-flow matching as diffusers' `train_dreambooth_lora_sana.py` trains it:
    a timestep t of the FlowMatchEulerDiscreteScheduler built from the base's scheduler config, its sigma s,
    x_t = (1 - s) x0 + s noise, and the velocity noise - x0 as the target, unweighted."""

    def __init__(self, scheduler_config: dict, noise_offset: float = 0.0, snr_gamma: float = 0.0,
                 timestep_weighting: Callable[[int], torch.Tensor | None] | None = None, objective: str = "ddpm",
                 flow: FlowSettings | None = None):
        from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

        self.flow = objective == "flow"
        self.flow_settings = flow or FlowSettings()
        if not self.flow and self.flow_settings != FlowSettings():
            raise ModelError("train.flow_timesteps / flow_loss_weight apply to flow-matching bases (Sana); this base "
                             "trains with DDPM noise prediction: leave them at uniform / none")
        if self.flow:
            if snr_gamma:
                raise ModelError("train.snr_gamma (min-SNR weighting) is defined for DDPM noise schedules; this base "
                                 "trains with flow matching: set train.snr_gamma=0")
            self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
            self.prediction_type = "flow"
        else:
            self.scheduler = DDPMScheduler.from_config(scheduler_config)
            self.prediction_type = self.scheduler.config.prediction_type
            if self.prediction_type not in TARGETS:
                raise ModelError(f"base scheduler prediction_type '{self.prediction_type}' is not supported: "
                                 f"use one of {sorted(TARGETS)}")
        self.num_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.noise_offset = noise_offset
        self.snr_gamma = snr_gamma
        self.timestep_weights = timestep_weighting(self.num_timesteps) if timestep_weighting else None
        if self.flow and self.timestep_weights is not None:
            # the weights are per timestep value 0..N-1; the flow table lists timesteps from N down to 1
            values = self.scheduler.timesteps.round().long().clamp(1, self.num_timesteps) - 1
            self.timestep_weights = self.timestep_weights[values]

    def sample_noise(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """fp32 noise of `shape` on the generator's device (the trainer draws on the CPU, then moves it)."""
        noise = torch.randn(shape, generator=generator, device=generator.device)
        if self.noise_offset:
            # A per-image, per-channel constant: lets the model learn overall brightness shifts.
            offset = torch.randn((shape[0], shape[1], 1, 1), generator=generator, device=generator.device)
            noise = noise + self.noise_offset * offset
        return noise

    def sample_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        if self.timestep_weights is not None:
            weights = self.timestep_weights.to(generator.device)
            indices = torch.multinomial(weights, n, replacement=True, generator=generator).long()
        elif self.flow:
            # diffusers' SD3 / Sana scripts: u from the density (uniform, logit-normal or mode), index = floor(u * N);
            # clamped, since "mode" gives u = 1 for a uniform draw of exactly 0
            from diffusers.training_utils import compute_density_for_timestep_sampling

            f = self.flow_settings
            u = compute_density_for_timestep_sampling(f.timesteps, n, logit_mean=f.logit_mean, logit_std=f.logit_std,
                                                      mode_scale=f.mode_scale, device=generator.device,
                                                      generator=generator)
            indices = (u * self.num_timesteps).long().clamp(max=self.num_timesteps - 1)
        else:
            return torch.randint(0, self.num_timesteps, (n,), generator=generator, device=generator.device).long()
        if self.flow:
            return self.scheduler.timesteps.to(generator.device)[indices]
        return indices

    def flow_sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Each timestep's sigma: the schedule's own where t is one of its timesteps (as diffusers' get_sigmas looks
        it up), t / N for any other t (validation's fixed timesteps)."""
        t = timesteps.float()
        table_t = self.scheduler.timesteps.to(t.device)
        table_s = self.scheduler.sigmas[: len(table_t)].to(t.device)
        match = table_t[None, :] == t[:, None]
        return torch.where(match.any(dim=1), table_s[match.float().argmax(dim=1)], t / self.num_timesteps)

    def noisy_inputs(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        """(noisy latents, target) for given noise and timesteps."""
        if self.flow:
            sigmas = self.flow_sigmas(timesteps).view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
            return (1.0 - sigmas) * latents + sigmas * noise, noise - latents
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        target = TARGETS[self.prediction_type](self.scheduler, latents, noise, timesteps)
        return noisy, target

    def per_sample_loss(self, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
                        weighted: bool = True) -> torch.Tensor:
        """Per-sample MSE; min-SNR weighted when snr_gamma is set, or by train.flow_loss_weight for a flow base,
        unless `weighted` is False (validation, so runs trained with different weightings report comparable
        losses)."""
        loss = (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, pred.ndim)))
        if self.snr_gamma and weighted:
            loss = loss * self.snr_weights(timesteps)
        if self.flow and self.flow_settings.loss_weight != "none" and weighted:
            from diffusers.training_utils import compute_loss_weighting_for_sd3

            # the weight is per sample (a function of its sigma), so weighting the per-sample mean is the scripts'
            # mean over elements of weight * squared error
            loss = loss * compute_loss_weighting_for_sd3(self.flow_settings.loss_weight,
                                                         self.flow_sigmas(timesteps).to(loss.device)).float()
        return loss

    def snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        alphas = self.scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
        snr = alphas / (1.0 - alphas)
        return SNR_WEIGHTS[self.prediction_type](snr, self.snr_gamma)


class BatchEncoder:
    """Turns loader batches into model inputs: latents (cached or VAE-encoded), template, caption dropout,
    token ids. The VAE is frozen and never part of the trained module."""

    def __init__(self, vae, tokenizer, template: str, caption_dropout: float, use_cached: bool = True,
                 context_tokens: int = CONTEXT_TOKENS, lowercase: bool = False,
                 instruction: Instruction | None = None):
        self.vae = vae
        self.context_tokens = context_tokens
        self.lowercase = lowercase  # the family's (Family.lowercase_prompts)
        self.instruction = instruction  # model.text_instruction (Instruction)
        self.use_cached = use_cached
        self.tokenizer = tokenizer
        self.template = template
        self.caption_dropout = caption_dropout
        self.scaling = float(vae.config.scaling_factor)
        self.cut_prompts = 0
        self.seen_prompts = 0

    @torch.no_grad()
    def latents(self, batch: dict, device) -> torch.Tensor:
        """Scaled latents. The posterior mean is used both when encoding here and when caching latents, so a
        run on cached latents sees exactly the inputs of a run that encodes on the fly."""
        if self.use_cached and batch.get("latents") is not None:
            raw = to_device(torch.as_tensor(batch["latents"]), device).float()
        else:
            pixels = to_device(torch.as_tensor(batch["pixel_values"]), device).to(self.vae.dtype)
            raw = encode_mean(self.vae, pixels).float()
        return raw * self.scaling

    def prompts(self, reports: list[str], generator: torch.Generator | None) -> list[str]:
        prompts = [apply_template(self.template, r) for r in reports]
        if generator is not None and self.caption_dropout > 0:
            drop = torch.rand(len(prompts), generator=generator, device=generator.device) < self.caption_dropout
            prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        return prompts

    def token_ids(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        length = max_length(self.tokenizer, self.context_tokens)
        read = as_read(prompts, self.lowercase)
        if self.instruction is not None:  # the report is cut where the instruction and it exceed the width
            read, length = self.instruction.prefixed(read), self.instruction.width(length)
        full = self.tokenizer(read, truncation=False)["input_ids"]
        self.cut_prompts += sum(len(ids) > length for ids in full)  # reported once per epoch, not per batch
        self.seen_prompts += len(prompts)
        # exactly what the sampler feeds the encoder
        return tokenize(self.tokenizer, prompts, warn=False, limit=self.context_tokens, lowercase=self.lowercase,
                        instruction=self.instruction)
