"""Typed configuration: dataclasses built from YAML presets, files and `--set a.b=c` overrides.

Build order is always: defaults -> preset or file (YAML) -> overrides. Unknown keys and wrong types are
errors that name the key, raised before any heavy work starts. The resolved config is written next to
every output (run folders, checkpoints, sample folders) and its hash is logged.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional

import yaml

from cxrdist.errors import ConfigError
from cxrdist.fileio import write_text_atomic

# The named presets (dev, product, demo) ship inside the package, so `--config dev` works from an installed wheel.
PRESETS_DIR = Path(__file__).resolve().parent / "presets"


class ConfigLoader(yaml.SafeLoader):
    """SafeLoader whose booleans are only true/false and whose numbers have no base-60 form (YAML 1.2 core style).
    YAML 1.1 also reads no/off/yes/on as booleans, which turns `mixed_precision: no` or a negative prompt "no" into
    False, and reads 10:00 as the integer 600, which turns `time_budget: 10:00` into 600 minutes; here they stay
    strings (bool keys still accept them: see _coerce)."""


_YAML_1_1_ONLY = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _YAML_1_1_ONLY]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:bool",
                                   re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
# SafeLoader's int and float patterns without their base-60 alternatives (e.g. 1:30 or 1:30.5)
ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(
    r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"), list("-+0123456789"))
ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
    r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    """YAML text -> plain data, with the config's restricted booleans; every failure is a yaml.YAMLError."""
    try:
        return yaml.load(text, Loader=ConfigLoader)
    except (ValueError, RecursionError, OverflowError) as exc:
        # PyYAML lets these through: an integer past Python's 4300-digit limit, nesting past the recursion limit.
        raise yaml.YAMLError(f"{type(exc).__name__}: {str(exc).split(';')[0][:80]}") from None


# Where training metrics go (train.report_to): accelerate's trackers by name, or all three.
REPORT_TO = ("tensorboard", "wandb", "mlflow", "all")
TIMESTEP_BIASES = ("none", "later", "earlier", "range")  # train.timestep_bias (cxrdist.models.diffusion)
FLOW_TIMESTEPS = ("uniform", "logit_normal", "mode")  # train.flow_timesteps
FLOW_LOSS_WEIGHTS = ("none", "sigma_sqrt", "cosmap")  # train.flow_loss_weight
TRAIN_METHODS = ("lora", "full")  # train.method (cxrdist.models.trained)
RANK_SPLITS = ("shards", "samples")  # data.rank_split (cxrdist.data.loader)

# The direction in which each eval.metric improves; eval.mode "auto" (the default) takes it from here.
METRIC_MODES = {"val_loss": "min", "ssim": "max", "psnr": "max", "mse": "min", "faithfulness": "max", "fid": "min",
                "kid": "min"}
# What eval.metrics may add at each validation (cxrdist.metrics.distribution / .memorization), on the generated
# eval.num_metric_images and the same number of the split's real images.
SET_METRICS = ("fid", "kid", "prdc", "memorization")


@dataclass(frozen=True)
class AtLeast:
    """A bound of an integer or float key, declared on its type: `Annotated[int, AtLeast(1)]`."""

    low: float


VAE_DTYPES = ("fp32", "bf16", "fp16")  # model.vae_dtype (cxrdist.models.loading)
TEXT_INSTRUCTIONS = ("none", "sana")  # model.text_instruction (cxrdist.models.text.instruction_text)
ATTENTIONS = ("sdpa", "default")  # model.attention (cxrdist.train.model_setup.ATTENTION)
OPTIMIZERS = ("adamw", "adamw8bit")  # optim.name (cxrdist.train.optim.OPTIMIZERS)
LR_SCHEDULES = ("cosine", "constant", "linear", "wsd")  # optim.scheduler (cxrdist.train.optim.SCHEDULES)
PRECISIONS = ("no", "fp16", "bf16")  # train.mixed_precision
NONFINITE_LOSS = ("stop", "skip")  # train.nonfinite_loss


def _choices(values) -> str:
    *others, last = [str(v) for v in values]
    return f"{', '.join(others)} or {last}" if others else last


def _check_declared(section: Any, prefix: str) -> None:
    """What a key's type declares, checked for every key of a section: a `Literal[...]` key holds one of its values,
    an `Annotated[..., AtLeast(n)]` key is at least n. One rule for every key, so a value accepted here cannot fail
    later for being that value (a KeyError on a table of choices, a division by a zero cadence)."""
    for name, tp in typing.get_type_hints(type(section), include_extras=True).items():
        if name in getattr(type(section), "DERIVED", {}):
            continue
        value = getattr(section, name, None)
        bounds = [m for m in getattr(tp, "__metadata__", ()) if isinstance(m, AtLeast)]
        base = typing.get_args(tp)[0] if bounds else tp
        if typing.get_origin(base) is Literal and value not in typing.get_args(base):
            raise ConfigError(f"config key '{prefix}.{name}' must be {_choices(typing.get_args(base))}, got {value!r}")
        for bound in bounds:
            if not isinstance(value, bool) and isinstance(value, (int, float)) and value < bound.low:
                low = int(bound.low) if float(bound.low).is_integer() else bound.low
                raise ConfigError(f"config key '{prefix}.{name}' must be >= {low}, got {value!r}")


@dataclass
class DataConfig:
    """Where the shards are and how samples become model inputs."""

    # a shard set written by `cxrdist shard` (has index.json): a folder, a URL of any fsspec protocol, or a
    # webdataset "pipe:" command with {} for the file name (cxrdist.data.storage)
    shards: str = "shards/phantom"
    image_size: int = 64  # must equal the shard set's size; checked at load time
    prompt_template: str = "{report}"  # applied exactly once, at training and at sampling
    # DataLoader workers per rank: they split the decoding, but each reads the rank's whole share of the tar bytes
    # (the stream order must not depend on the worker count), so reads grow with it
    num_workers: Annotated[int, AtLeast(0)] = 0
    shuffle_buffer: Annotated[int, AtLeast(1)] = 256  # webdataset sample shuffle buffer
    augment: bool = False  # mild rotation / crop / contrast jitter; never a horizontal flip
    max_train_samples: Annotated[int, AtLeast(0)] = 0  # 0 = all; small values make quick experiments and tests
    # How ranks share an epoch (cxrdist.data.loader): "shards" = each rank reads only its contiguous 1/world of
    # the epoch's shards; "samples" = every rank reads every shard and keeps every world-th sample, so N ranks x
    # batch b get exactly the batches of one process with batch N*b, at N times the reads.
    rank_split: Literal[RANK_SPLITS] = "shards"

    def __post_init__(self) -> None:
        _check_declared(self, "data")
        _require(self.image_size >= 8 and self.image_size % 8 == 0, "data.image_size", "a multiple of 8, >= 8")
        _require("{report}" in self.prompt_template, "data.prompt_template", "a string containing {report}")


@dataclass
class ModelConfig:
    """The base model: a diffusers folder or hub id, or a named preset built from a config."""

    # path, hub id, or "preset:<name>" (cxrdist.models.presets: tiny, tiny-minilm, pixart-sigma-tiny, sana-tiny,
    # *-arch); an SD 1.x/2.x, PixArt-Σ or Sana pipeline (cxrdist.models.families)
    pretrained: str = "preset:tiny"
    revision: Optional[str] = None  # hub branch, tag or commit of `pretrained`
    # Weight files of a variant, e.g. fp16 for unet/diffusion_pytorch_model.fp16.safetensors (hub bases often ship
    # only those); passed to from_pretrained for the UNet, VAE and text encoder, and recorded in adapters.
    variant: Optional[str] = None
    vae_dtype: Literal[VAE_DTYPES] = "fp32"  # the frozen VAE's weights
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, about a third more time
    attention: Literal[ATTENTIONS] = "sdpa"  # UNets; the transformer families keep their own kernels
    # Sana only: an instruction every non-empty prompt is encoded after, as diffusers' SanaPipeline applies its
    # `complex_human_instruction` ("sana": that pipeline's default; the context keeps the prompt's tokens as the
    # text encoder reads them after it). Off by default, as in diffusers' Sana training script; recorded in exports,
    # so sampling encodes as training did.
    text_instruction: Literal[TEXT_INSTRUCTIONS] = "none"

    def __post_init__(self) -> None:
        _check_declared(self, "model")
        _require(self.variant is None or re.fullmatch(r"[A-Za-z0-9_-]+", self.variant) is not None, "model.variant",
                 "a weights variant name such as fp16 (letters, digits, - and _), or null")


@dataclass
class LoraConfig:
    """Adapters: separate rank/alpha/dropout for the UNet and the text encoder."""

    unet_rank: Annotated[int, AtLeast(1)] = 8  # rank of the denoiser's adapter (its size and capacity)
    unet_alpha: float = 8.0  # scale: the adapter's update is multiplied by alpha / rank
    unet_dropout: float = 0.0  # dropout on the adapter's input while training
    # module names (peft's rule: a name or its last dotted parts) that get an adapter
    unet_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    # UNet blocks the adapter goes into (down_blocks.N, mid_block, up_blocks.N, or down_blocks / up_blocks for a
    # whole side); empty = every block. Blocks before the first adapted one need no backward pass.
    unet_blocks: list[str] = field(default_factory=list)
    # an adapter on the text encoder too (SD family only; a full fine-tune reads train.train_text_encoder)
    train_text_encoder: bool = True
    text_rank: Annotated[int, AtLeast(1)] = 8  # rank of the text encoder's adapter
    text_alpha: float = 8.0  # scale of the text encoder's adapter: alpha / rank
    text_dropout: float = 0.0  # dropout on the text encoder adapter's input while training
    # CLIP names; BERT-style encoders use query/key/value/dense (resolved per encoder when left as "auto").
    text_targets: list[str] = field(default_factory=lambda: ["auto"])

    def __post_init__(self) -> None:
        _require_finite(self, "lora")
        _check_declared(self, "lora")
        _require(0.0 <= self.unet_dropout < 1.0, "lora.unet_dropout", "in [0, 1)")
        _require(0.0 <= self.text_dropout < 1.0, "lora.text_dropout", "in [0, 1)")
        _require(bool(self.unet_targets), "lora.unet_targets", "a non-empty list of module names")


@dataclass
class OptimConfig:
    # adamw8bit: bitsandbytes' 8-bit AdamW (moments in 8 bits, 2 bytes per parameter instead of 8)
    name: Literal[OPTIMIZERS] = "adamw"
    lr_unet: float = 1e-4  # learning rate of the denoiser's trained weights (its adapter, or all of it)
    lr_text: float = 5e-5  # learning rate of the text encoder's trained weights
    weight_decay_unet: float = 1e-2  # AdamW's decoupled weight decay for the denoiser's group
    weight_decay_text: float = 1e-2  # AdamW's decoupled weight decay for the text encoder's group
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.999  # AdamW's second-moment decay
    eps: float = 1e-8  # AdamW's denominator epsilon
    max_grad_norm: float = 1.0  # 0 disables clipping; applied on every optimizer step
    scheduler: Literal[LR_SCHEDULES] = "cosine"  # wsd: warm-up, peak lr held, cosine decay at the end
    warmup_steps: Annotated[int, AtLeast(0)] = 0  # optimizer steps of linear warm-up from 0 to the peak rate
    decay_fraction: float = 0.2  # wsd only: the share of the steps after warm-up over which the lr decays to 0

    def __post_init__(self) -> None:
        _require_finite(self, "optim")
        _check_declared(self, "optim")
        _require(0 < self.decay_fraction <= 1, "optim.decay_fraction", "in (0, 1]")
        _require(self.lr_unet > 0 and self.lr_text > 0, "optim.lr_unet/lr_text", "> 0")
        _require(self.max_grad_norm >= 0, "optim.max_grad_norm", ">= 0 (0 disables clipping)")


@dataclass
class TrainConfig:
    # lora: adapters on the frozen base (the `lora` section); full: every weight of the denoiser (UNet or
    # transformer) trains, the VAE stays frozen and the `lora` section is not read
    method: Literal[TRAIN_METHODS] = "lora"
    # train.method=full only: every weight of the text encoder trains too, at optim.lr_text (a LoRA run puts an
    # adapter on it with lora.train_text_encoder instead)
    train_text_encoder: bool = False
    # passes over the training folds (train.max_steps, when set, ends the run first)
    epochs: Annotated[int, AtLeast(1)] = 1
    max_steps: Annotated[int, AtLeast(0)] = 0  # optimizer steps; 0 = derived from epochs
    batch_size: Annotated[int, AtLeast(1)] = 8  # per rank, per micro-step
    grad_accum: Annotated[int, AtLeast(1)] = 1  # micro-batches accumulated per optimizer step
    # bf16 or fp16 autocast (or DeepSpeed's half-precision engine); fp16 needs a GPU
    mixed_precision: Literal[PRECISIONS] = "no"
    seed: int = 0  # seeds the adapter's initialisation, the data order and every sample's noise
    caption_dropout: float = 0.1  # share of prompts replaced by "" so classifier-free guidance is trained
    noise_offset: float = 0.0  # per-image, per-channel constant added to the noise (brightness shifts)
    snr_gamma: float = 0.0  # min-SNR-gamma weighting; 0 = off
    # Timestep sampling (diffusers' SDXL scripts, SimpleTuner): none = uniform; later / earlier = the noisiest /
    # least noisy `portion` of the schedule drawn `multiplier` times as often; range = timesteps [begin, end).
    timestep_bias: Literal[TIMESTEP_BIASES] = "none"
    timestep_bias_multiplier: float = 1.0  # how many times as often the biased timesteps are drawn
    timestep_bias_portion: float = 0.25  # share of the schedule that later / earlier favours
    timestep_bias_begin: Annotated[int, AtLeast(0)] = 0  # first timestep that range favours
    timestep_bias_end: int = 1000  # end (exclusive) of the timesteps that range favours
    # Flow-matching bases (Sana), as diffusers' SD3 / Sana scripts (`--weighting_scheme`, `--logit_mean`,
    # `--logit_std`, `--mode_scale`): where timesteps are drawn (uniform | logit_normal: sigmoid of a normal,
    # most draws near the middle | mode: toward the middle by mode_scale) and how each sample's loss is weighted
    # (none | sigma_sqrt: 1 / sigma^2 | cosmap). Refused for DDPM bases.
    flow_timesteps: Literal[FLOW_TIMESTEPS] = "uniform"
    flow_logit_mean: float = 0.0  # mean of the normal whose sigmoid logit_normal draws
    flow_logit_std: float = 1.0  # standard deviation of that normal
    flow_mode_scale: float = 1.29  # how strongly mode pulls timesteps toward the middle
    # sigma_sqrt: 1 / sigma^2; cosmap: SD3's cosine map; none: unweighted
    flow_loss_weight: Literal[FLOW_LOSS_WEIGHTS] = "none"
    # optimizer steps between accelerate save_state; 0 = end of epoch only
    checkpoint_every: Annotated[int, AtLeast(0)] = 0
    # complete checkpoints kept; older ones are removed once a newer one is complete
    keep_last: Annotated[int, AtLeast(1)] = 2
    log_every: Annotated[int, AtLeast(1)] = 10  # optimizer steps between training log lines and TensorBoard points
    report_to: Literal[REPORT_TO] = "tensorboard"  # wandb and mlflow need their package
    output_dir: str = "runs"  # folder under which each run gets its own folder (--output-dir overrides)
    run_name: str = ""  # "" = derived from config hash and fold
    export_zip: bool = False  # also pack the best export as a .zip at the end (--zip)
    collective_timeout_s: Annotated[int, AtLeast(1)] = 600  # ranks waiting longer than this on a dead peer fail loudly
    # how long a rank waits to see the probe file rank 0 writes into the run folder (NFS-style caching) before
    # the run stops because the folder is not shared by every node
    shared_folder_wait_s: float = 30.0
    allow_tf32: bool = True  # TF32 matmuls on Ampere and later GPUs (no effect elsewhere)
    # with a frozen text encoder: remember this many reports' contexts (0 = off)
    text_cache_size: Annotated[int, AtLeast(0)] = 0
    use_cached_latents: bool = True  # train on shard latents (from `cxrdist shard cache-latents`) when present
    nonfinite_loss: Literal[NONFINITE_LOSS] = "stop"  # an inf/NaN training loss stops the run, or its step is skipped
    # Deterministic kernels (torch.use_deterministic_algorithms, cuDNN deterministic, cuBLAS workspace): what makes
    # a resumed GPU run end at the uninterrupted adapter bit for bit (CPU runs already do); slower on GPUs.
    deterministic: bool = False
    # EMA of the trained weights (cxrdist.train.ema): 0 = off; in (0, 1) it is updated after every optimizer step,
    # with diffusers' warm-up, and is what validation, the best export and the test split use.
    ema_decay: float = 0.0
    # Signals that stop the run at the next optimizer-step boundary with a checkpoint (cxrdist.train.preemption):
    # SLURM sends SIGTERM on preemption and `--signal` (SIGUSR1 in launch/slurm/train.sbatch) before the time
    # limit; SIGINT is a Ctrl-C. [] leaves every signal its default action.
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1", "SIGINT"])
    # Wall-clock budget of the training loop, as SLURM writes times: minutes ("90"), "MM:SS", "HH:MM:SS" or
    # "D-HH:MM:SS"; "" = off. With optim.scheduler=wsd the run measures its pace, holds the peak lr while time
    # allows and starts the decay so that it ends within the budget (cxrdist.train.time_budget); max_steps (or the
    # epochs) stays an upper bound.
    time_budget: str = ""

    def __post_init__(self) -> None:
        _require_finite(self, "train")
        self.preempt_signals = _signal_names(self.preempt_signals)
        try:
            parse_duration(self.time_budget)
        except ValueError as exc:
            raise ConfigError(f"config key 'train.time_budget' must be a time: {exc}") from None
        _check_declared(self, "train")
        _require(self.method == "full" or not self.train_text_encoder, "train.train_text_encoder",
                 "false with train.method=lora (an adapter on the text encoder is lora.train_text_encoder)")
        _require(0.0 <= self.caption_dropout < 1.0, "train.caption_dropout", "in [0, 1)")
        _require(self.shared_folder_wait_s >= 0, "train.shared_folder_wait_s", ">= 0")
        _require(self.ema_decay == 0.0 or 0.0 < self.ema_decay < 1.0, "train.ema_decay", "0 (off) or in (0, 1)")
        _require(self.timestep_bias_multiplier > 0, "train.timestep_bias_multiplier", "> 0")
        _require(0.0 < self.timestep_bias_portion <= 1.0, "train.timestep_bias_portion", "in (0, 1]")
        _require(0 <= self.timestep_bias_begin < self.timestep_bias_end, "train.timestep_bias_begin/end",
                 "0 <= begin < end")
        _require(self.flow_logit_std > 0, "train.flow_logit_std", "> 0")
        _require(self.flow_timesteps == "uniform" or self.timestep_bias == "none", "train.flow_timesteps",
                 "uniform when train.timestep_bias is set (one way of drawing timesteps at a time)")


_SLURM_TIME = re.compile(r"^(?:(?P<days>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?$")


def parse_duration(text: Any) -> float:
    """Seconds of a duration written as SLURM writes times: "90" (minutes), "MM:SS", "HH:MM:SS", "D-HH",
    "D-HH:MM", "D-HH:MM:SS"; "" or "0" is 0.0 (off). ValueError naming the accepted forms otherwise."""
    text = str(text).strip()
    if not text or text == "0":
        return 0.0
    match = _SLURM_TIME.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a time: write minutes (90), MM:SS, HH:MM:SS or D-HH:MM:SS")
    a, b, c = (int(v) if v is not None else None for v in (match["a"], match["b"], match["c"]))
    if match["days"] is not None:  # D-HH[:MM[:SS]]
        seconds = int(match["days"]) * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # HH:MM:SS
        seconds = a * 3600 + b * 60 + c
    elif b is not None:  # MM:SS
        seconds = a * 60 + b
    else:  # minutes
        seconds = a * 60
    return float(seconds)


# Signals train.preempt_signals may name: those a scheduler or a terminal sends to ask a job to stop (SIGXCPU: a
# CPU-time limit). SIGKILL and SIGSTOP cannot be caught; the others are faults or job control, not requests.
PREEMPT_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGQUIT", "SIGXCPU")


def _signal_names(names: Any) -> list[str]:
    """train.preempt_signals as canonical names ("usr1" and "SIGUSR1" alike become "SIGUSR1"), each once."""
    canonical = []
    for name in names:
        upper = str(name).strip().upper()
        upper = upper if upper.startswith("SIG") else "SIG" + upper
        _require(upper in PREEMPT_SIGNALS, "train.preempt_signals",
                 f"a list of {', '.join(PREEMPT_SIGNALS)} (got {name!r})")
        if upper not in canonical:
            canonical.append(upper)
    return canonical


@dataclass
class EvalConfig:
    k_folds: int = 0  # folds the shard set must have (checked against index.json); 0 = whatever it has
    eval_every_epochs: Annotated[int, AtLeast(1)] = 1  # epochs between validations when eval_every_steps is 0
    eval_every_steps: Annotated[int, AtLeast(0)] = 0  # 0 = use eval_every_epochs
    metric: Literal[tuple(METRIC_MODES)] = "val_loss"  # the early-stopping metric (METRIC_MODES)
    mode: str = "auto"  # auto (the metric's direction, METRIC_MODES) | min | max; always min or max once built
    # evaluations without improvement before stopping; 0 = never stop early
    patience: Annotated[int, AtLeast(0)] = 3
    # fixed timesteps of the validation loss (the same noise at every evaluation)
    val_loss_timesteps: list[int] = field(default_factory=lambda: [100, 300, 500, 700, 900])
    num_metric_images: Annotated[int, AtLeast(0)] = 8  # images generated per evaluation for SSIM/PSNR/MSE
    # grid images of the split's first reports (when no prompts_file is given)
    num_grid_prompts: Annotated[int, AtLeast(0)] = 4
    # Validation grid prompts from a file (.txt: one report per line; .jsonl as `cxrdist sample --prompts-file`):
    # every prompt of the file, generated with the same seeds at every evaluation so grids compare. "" = off.
    prompts_file: str = ""
    # The sampler of validation images: steps, scheduler (a name of SCHEDULERS that fits the base) and guidance.
    # null = the sample section's (sample.steps / scheduler / guidance): one setting for how a run's images are drawn
    # in validation, `cxrdist sample` and `cxrdist evaluate`, unless validation is given its own.
    inference_steps: Optional[int] = None  # null = sample.steps
    scheduler: Optional[str] = None  # null = sample.scheduler
    guidance: Optional[float] = None  # null = sample.guidance
    # The validation loss (and the test split's) is taken on the first N samples of the split, encoded once and
    # kept in memory with fixed noise: 2,048 x 5 timesteps is a steady early-stopping signal, where a whole
    # MIMIC-size fold would hold gigabytes and cost hundreds of thousands of forward passes. 0 = the whole split.
    max_eval_samples: Annotated[int, AtLeast(0)] = 2048
    min_delta: float = 0.0  # an evaluation must beat the best by more than this to count as an improvement
    run_test: bool = True  # after training, evaluate the best checkpoint on the held-out test split
    # Set metrics at every validation, logged as val/fid, val/kid, val/precision ..., val/memorization_flagged:
    # any of SET_METRICS, on eval.num_metric_images images and `eval.features` (cxrdist.metrics.features).
    metrics: list[str] = field(default_factory=list)
    # features of the set metrics: pixels[:SIDE], inception, txv:WEIGHTS, raddino:PATH_OR_HUB_ID
    features: str = "pixels"
    # training images the audit searches (the first N of the training folds)
    memorization_pool: Annotated[int, AtLeast(1)] = 2048

    # Fields worked out from others in __post_init__. A merge starts them again from these values unless it sets
    # them itself: the built mode always equals the metric's direction, so keeping it would make
    # `--set eval.metric=ssim` on top of a min-mode preset look like a contradiction instead of flipping to max.
    DERIVED: ClassVar[dict[str, Any]] = {"mode": "auto"}

    def __post_init__(self) -> None:
        _require_finite(self, "eval")
        _check_declared(self, "eval")
        self.mode = _resolve_mode(self.metric, self.mode)
        _require_sampler("eval", "inference_steps", 1 if self.inference_steps is None else self.inference_steps,
                         "dpm++" if self.scheduler is None else self.scheduler)
        _require(self.guidance is None or self.guidance >= 0, "eval.guidance", ">= 0, or null (sample.guidance)")
        _require(self.k_folds == 0 or self.k_folds >= 2, "eval.k_folds", "0 (the shard set's folds) or >= 2")
        _require(set(self.metrics) <= set(SET_METRICS), "eval.metrics", f"a list of {', '.join(SET_METRICS)}")
        if self.metric in ("fid", "kid") and self.metric not in self.metrics:
            self.metrics = [*self.metrics, self.metric]  # early stopping on it computes it
        _require(not self.metrics or self.num_metric_images >= 16, "eval.num_metric_images",
                 ">= 16 when eval.metrics is set (FID / KID / precision need a set of images; 128+ is better)")


# The samplers of `cxrdist sample`, validation and `cxrdist evaluate`: name -> (diffusers scheduler class, its
# settings). The one table: the config checks names against it and cxrdist.sampling.pipeline builds from it.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    # Default: 2nd-order DPM-Solver++ gives usable images in ~25 steps (the original used PNDM x 500).
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
}


def sampler_problem(steps: int, scheduler: str, batch_size: int = 1) -> tuple[str, str] | None:
    """(setting, what it must be) for the first sampler setting out of range, or None. One rule for the config's
    sample and eval sections and for every caller of cxrdist.sampling.pipeline.generate_images."""
    if steps < 1:
        return "steps", ">= 1"
    if batch_size < 1:
        return "batch_size", ">= 1"
    if scheduler not in SCHEDULERS:
        return "scheduler", f"one of {', '.join(SCHEDULERS)}"
    return None


def _require_sampler(prefix: str, steps_key: str, steps: int, scheduler: str, batch_size: int = 1,
                     flags: bool = False) -> None:
    problem = sampler_problem(steps, scheduler, batch_size)
    if problem:
        name, expected = problem
        flag = f" (--{name.replace('_', '-')})" if flags else ""
        _require(False, f"{prefix}.{steps_key if name == 'steps' else name}", expected + flag)


@dataclass
class SampleConfig:
    """`cxrdist sample` defaults; every field also has a command-line flag that overrides it."""

    steps: int = 25  # denoising steps (--steps)
    scheduler: str = "dpm++"  # dpm++ | ddim | pndm | euler | ddpm
    guidance: float = 4.0  # classifier-free guidance scale; 1 = none (--guidance)
    negative_prompt: str = ""  # used as is (no template); "" = the unconditional prompt seen in training
    height: int = 0  # 0 = the base model's native size
    width: int = 0  # 0 = the base model's native size
    batch_size: int = 8  # images per forward pass (--batch-size)
    seed: int = 0  # image i of a run gets seed + i
    num_images: int = 1  # images per description
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    dtype: Literal[VAE_DTYPES] = "fp32"  # weights and compute while sampling (--dtype)

    def __post_init__(self) -> None:
        _require_finite(self, "sample")
        _check_declared(self, "sample")
        _require_sampler("sample", "steps", self.steps, self.scheduler, self.batch_size, flags=True)
        _require(self.num_images >= 1, "sample.num_images", ">= 1 (--num-images)")
        _require(self.guidance >= 0, "sample.guidance", ">= 0 (--guidance)")
        for key, value in (("height", self.height), ("width", self.width)):
            _require(value == 0 or (value >= 8 and value % 8 == 0), f"sample.{key}",
                     f"0 or a multiple of 8 (--{key})")


PRETRAIN_CAPTIONS = ("acquisition", "generic")


@dataclass
class PretrainConfig:
    """`cxrdist pretrain`: the embedded default base, trained from scratch on phantom shards."""

    preset: str = "tiny-minilm"  # architecture (and frozen text encoder) to start from
    vae_steps: int = 600  # optimizer steps of the autoencoder
    vae_batch_size: Annotated[int, AtLeast(1)] = 32  # images per autoencoder step
    vae_lr: float = 1e-3  # autoencoder learning rate
    kl_weight: float = 1e-6  # weight of the autoencoder's KL term
    unet_steps: int = 3000  # optimizer steps of the denoiser
    unet_batch_size: Annotated[int, AtLeast(1)] = 64  # images per denoiser step
    unet_lr: float = 5e-4  # denoiser learning rate
    ema_decay: float = 0.999  # EMA of the denoiser's weights, which the saved base holds
    # acquisition: each image's caption about its side marker, electrodes and exposure (never a finding), so the
    # base learns the world's spatial words, as a real base knows language and no radiology; generic: `caption`
    # for every image
    captions: Literal[PRETRAIN_CAPTIONS] = "acquisition"
    caption: str = "chest radiograph"  # the text of every image with captions=generic
    uncond_prob: float = 0.1  # share of empty prompts, so classifier-free guidance works on the base
    seed: int = 0  # seeds initialisation, data order and noise

    def __post_init__(self) -> None:
        _require_finite(self, "pretrain")
        _check_declared(self, "pretrain")
        _require(self.vae_steps >= 1 and self.unet_steps >= 1, "pretrain.vae_steps/unet_steps", ">= 1")
        _require(0.0 <= self.uncond_prob < 1.0, "pretrain.uncond_prob", "in [0, 1)")
        _require(0.0 < self.ema_decay < 1.0, "pretrain.ema_decay", "in (0, 1)")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    def __post_init__(self) -> None:
        if parse_duration(self.train.time_budget) and self.optim.scheduler != "wsd":
            # a budget moves where the decay starts; the other schedules decay from the first step after warm-up
            raise ConfigError(f"config key 'train.time_budget' needs optim.scheduler=wsd (warm-up, peak, decay at "
                              f"the end), not {self.optim.scheduler}: set optim.scheduler=wsd or drop the budget")
        if self.train.method == "full":
            _refuse_unread_lora_keys(self.lora)

    def validation_sampling(self) -> tuple[int, str, float]:
        """(steps, scheduler, guidance) of validation images: eval.* where set, else sample.*."""
        e, s = self.eval, self.sample
        return (s.steps if e.inference_steps is None else e.inference_steps,
                s.scheduler if e.scheduler is None else e.scheduler,
                s.guidance if e.guidance is None else e.guidance)

    def with_validation_sampling_resolved(self) -> "Config":
        """The same config with eval.inference_steps / scheduler / guidance written out (what runs compare on
        resume: a run saved with `inference_steps: 25` and one whose null means sample.steps = 25 are the same)."""
        steps, scheduler, guidance = self.validation_sampling()
        resolved = dataclasses.replace(self.eval, inference_steps=steps, scheduler=scheduler, guidance=guidance)
        return dataclasses.replace(self, eval=resolved)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Short, stable hash of what a training run is (logged at start-up, the default run folder's name): every
        section but `sample` and `pretrain`, which change how images are drawn afterwards and how a phantom base is
        pretrained, not the run; the validation sampler they may supply is hashed as resolved (eval.*)."""
        identity = self.with_validation_sampling_resolved().to_dict()
        for section in ("sample", "pretrain"):
            identity.pop(section)
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]

    def save(self, path: str | Path) -> Path:
        """Write the resolved config as YAML, atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_text_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


# lora.train_text_encoder is left out: under train.method=full train.train_text_encoder decides about the text
# encoder whatever it says (its default is true), and the family presets set it for their LoRA runs.
_LORA_ONLY_KEYS = ("unet_rank", "unet_alpha", "unet_dropout", "unet_targets", "unet_blocks", "text_rank",
                   "text_alpha", "text_dropout", "text_targets")


def _refuse_unread_lora_keys(lora: "LoraConfig") -> None:
    """train.method=full reads no adapter setting: one that differs from its default would do nothing."""
    default = LoraConfig()
    changed = [f"lora.{key}" for key in _LORA_ONLY_KEYS if getattr(lora, key) != getattr(default, key)]
    if changed:
        raise ConfigError(f"{', '.join(changed)} set, but train.method=full trains every weight of the denoiser and "
                          "reads no lora.* setting: remove them (or use train.method=lora)")


def _require(ok: bool, key: str, expected: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' must be {expected}")


def _require_finite(section: Any, prefix: str) -> None:
    """Refuse inf/nan in every float field: none has a use for one (0 is the documented "off" of max_grad_norm
    and snr_gamma), and most floats (eval.guidance, betas, weight decay, ...) have no range check to catch it."""
    for name, tp in typing.get_type_hints(type(section)).items():
        value = getattr(section, name, None)
        if float in (tp, *typing.get_args(tp)) and isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key '{prefix}.{name}' must be a finite number, got {value!r}")


def _resolve_mode(metric: str, mode: str) -> str:
    """eval.mode "auto" -> the metric's direction; an explicit mode must agree with it (the saved, resolved one
    does), since the other direction makes early stopping and the best export keep the worst checkpoint."""
    _require(mode in ("auto", "min", "max"), "eval.mode", "auto, min or max")
    natural = METRIC_MODES[metric]
    if mode not in ("auto", natural):
        better = "lower" if natural == "min" else "higher"
        raise ConfigError(f"config key 'eval.mode' is {mode} but eval.metric={metric} is better when {better}: "
                          f"set eval.mode={natural} (or auto)")
    return natural


# ---------------------------------------------------------------------------------------------------------
# Building from plain data, with strict keys and types
# ---------------------------------------------------------------------------------------------------------

class OverrideText(str):
    """The value of one `--set section.key=value`, exactly as typed. A string key takes it as is (so
    `sample.negative_prompt=no` is "no" and `data.prompt_template=Chest X-ray: {report}` is that text); any other
    key reads it as YAML (lists, numbers, booleans, null), see _coerce."""


_YAML_NULLS = ("null", "Null", "NULL", "~")


def _parse_override(text: OverrideText, key: str) -> Any:
    """The YAML value of override text for a non-string key; blank stays "" (an empty list for list keys)."""
    if not text.strip():
        return ""
    try:
        return parse_yaml(text)
    except yaml.YAMLError as exc:
        problem = str(exc).splitlines()[0]
        shown = text if len(text) <= 60 else text[:57] + "..."
        raise ConfigError(f"override for '{key}' ({shown}) is not a valid value ({problem}): "
                          "fix the text after '='") from None


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotated type `tp`; allow int -> float and str -> number from the CLI."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        # Optional keys: `--set model.revision=null` is the only way to unset one from the command line.
        if value is None or (isinstance(value, OverrideText) and value.strip() in _YAML_NULLS):
            return None
        return _coerce(value, args[0], key)
    if origin is Literal:  # one of a fixed set of names, kept as typed
        choices = typing.get_args(tp)
        if isinstance(value, bool) or not isinstance(value, (str, int, float)) or str(value) not in choices:
            raise ConfigError(f"config key '{key}' must be {_choices(choices)}, got {value!r}")
        return str(value)
    if isinstance(value, OverrideText):
        value = str(value) if tp is str else _parse_override(value, key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {type(value).__name__}")
        return [_coerce(v, item_tp, f"{key}[]") for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        # yes/no/on/off: YAML 1.1 spellings that ConfigLoader keeps as strings; old files may still use them.
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        try:
            return float(value)
        except (ValueError, OverflowError):  # OverflowError: an integer too large for a float
            raise ConfigError(f"config key '{key}' must be a number, got {str(value)[:40]!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return str(value)
    raise ConfigError(f"config key '{key}' has an unsupported type {tp!r}")  # pragma: no cover


def _merge_section(section: Any, updates: dict[str, Any], prefix: str) -> Any:
    if not isinstance(updates, dict):
        raise ConfigError(f"config section '{prefix}' must be a mapping, got {type(updates).__name__}")
    hints = typing.get_type_hints(type(section))
    names = {f.name for f in dataclasses.fields(section)}
    values = {**dataclasses.asdict(section), **getattr(type(section), "DERIVED", {})}
    for key, value in updates.items():
        full = f"{prefix}.{key}"
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"unknown config key '{full}' (known keys in '{prefix}': {known})")
        values[key] = _coerce(value, hints[key], full)
    return type(section)(**values)


def merge(cfg: Config, updates: dict[str, Any]) -> Config:
    """Return a new Config with `updates` (nested dict of sections) applied strictly."""
    if not isinstance(updates, dict):
        raise ConfigError("a config file must hold a mapping of sections (data, model, lora, ...)")
    sections = {f.name for f in dataclasses.fields(cfg)}
    new = {name: getattr(cfg, name) for name in sections}
    for name, sub in updates.items():
        if name not in sections:
            raise ConfigError(f"unknown config section '{name}' (known: {', '.join(sorted(sections))})")
        new[name] = _merge_section(new[name], sub or {}, name)
    return Config(**new)


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Turn ["train.lr=2e-4", "lora.unet_rank=4"] into a nested dict of OverrideText values: the text after '='
    as typed, which merge keeps for string keys and reads as YAML for the others."""
    nested: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"override key '{dotted}' must be section.key, e.g. train.batch_size")
        nested.setdefault(parts[0], {})[parts[1]] = OverrideText(raw)
    return nested


def resolve_preset(name_or_path: str) -> Path:
    """`dev` -> the packaged cxrdist/presets/dev.yaml; any existing YAML file path is taken as is."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    candidate = PRESETS_DIR / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    presets = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
    raise ConfigError(f"config '{name_or_path}' not found: give a YAML file or one of the presets {presets}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a dict. UTF-8 (with or without BOM) or UTF-16/32 with a BOM, as YAML allows and
    as Windows editors and PowerShell's `>` write it; anything else is a ConfigError naming the file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder: give a YAML file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read ({exc.strerror or exc}): check the path") from None
    try:
        data = parse_yaml(_decode_config(raw)) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start}): save it as UTF-8") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold sections (a mapping such as `train: {{...}}`), "
                          f"not a {type(data).__name__}")
    return data


def _decode_config(raw: bytes) -> str:
    import codecs

    if raw.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):  # before UTF-16: BOM_UTF32_LE starts with it
        return raw.decode("utf-32")
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return raw.decode("utf-16")
    return raw.decode("utf-8-sig")


def load_config(config: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """defaults -> preset/file -> `section.key=value` overrides, all validated."""
    cfg = Config()
    if config:
        cfg = merge(cfg, load_yaml(resolve_preset(str(config))))
    if overrides:
        cfg = merge(cfg, parse_overrides(list(overrides)))
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config saved with a run or checkpoint (strict, like any other source)."""
    return merge(Config(), data)


def diff_configs(a: Config, b: Config, ignore: tuple[str, ...] = ()) -> list[str]:
    """Keys whose values differ, as 'section.key: a -> b' strings (used to explain a refused resume)."""
    out = []
    da, db = a.to_dict(), b.to_dict()
    for section in da:
        for key in da[section]:
            full = f"{section}.{key}"
            if full in ignore or section in ignore:
                continue
            if da[section][key] != db[section][key]:
                out.append(f"{full}: {da[section][key]!r} -> {db[section][key]!r}")
    return out
