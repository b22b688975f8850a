"""Estimate the GPU memory of one LoRA training step (SD 1.5-size base, `product` config) without a GPU.

The trainer's own code runs one micro-step -- VAE encode under no_grad, CLIP text encoder and UNet with LoRA
forward under autocast, the min-SNR loss, backward -- on fake tensors (torch's FakeTensorMode: shapes and dtypes,
no data, no compute), with the model built as `Trainer` builds it: `attach_lora`, `LoraDiffusionModel`,
`configure_model` (frozen base in bf16, adapters fp32, SDPA, gradient checkpointing), the VAE in
`model.vae_dtype`. Counted, on one GPU:

- weights: every parameter and buffer in the dtype the trainer stores it, and the adapters' fp32 gradients
  (created before the step: with `train.grad_accum` > 1 they live across micro-batches);
- optimizer state by bitsandbytes' and torch's rules: AdamW 8 bytes per adapter element; AdamW8bit 2 bytes per
  element + an fp32 absmax per 256-element block for tensors of at least 4,096 elements (`min_8bit_size`),
  8 bytes per element below that;
- the validation loss set the Evaluator keeps on the device (eval.max_eval_samples latents, noise, token ids);
- the step: every storage an op creates, from creation until autograd or Python frees it (a TorchDispatchMode
  with weak references; sizes rounded up to the caching allocator's 512 bytes): what autograd saves for
  backward, the inputs gradient checkpointing keeps and its recomputation in backward, the VAE encode's buffers
  at full resolution (counted even though cached latents skip it), the loss, every gradient and temporary of
  backward. Its maximum is the simulated `torch.cuda.max_memory_allocated()` of the step.

Dtypes are CUDA autocast's, not CPU autocast's: on CUDA, group/layer norm, softmax, upsampling, exp, pow and the
rest of torch's CUDA fp32 list run in fp32 (CPU autocast keeps norms in bf16: CPU measurements underestimate a
GPU). `cuda_autocast_rules()` puts CUDA's per-op policy (lower precision, fp32, fp32 output dtype, promote) on
the CPU autocast key while a step runs and removes it afterwards; its tables must classify exactly the ops this
torch build registers for AutocastCUDA (checked), and `check_rules()` compares output dtypes with torch's own
AutocastCUDA kernels on fake CUDA tensors (they run without autograd on a CPU-only build). Attention goes
through SDPA with a fused kernel (flash on CPU; flash or memory-efficient on a GPU, which also serves the VAE's
one 512-wide head): q, k, v, the output and an fp32 logsumexp are saved, never the attention matrix.

Not countable here, so added as a stated allowance: the caching allocator's reserve and fragmentation
(reserved - allocated: 10% of the counted bytes), workspaces allocated inside kernels (0.5 GiB: cuDNN
convolution workspaces at full-resolution VAE layers, cuBLAS, flash-attention backward accumulators) and the
CUDA context (0.75 GiB: driver, runtime and lazily loaded cuBLAS/cuDNN kernels, on the card but outside
max_memory_allocated): estimate = counted x 1.10 + 1.25 GiB. Not modelled: validation and sampling passes (no
grad, smaller batches), DDP buckets and ZeRO partitions (megabytes for LoRA). Measured figures from a GPU run of
benchmarks/gpu_train.py (`make gpu-check`) replace these estimates.

    python benchmarks/gpu_memory_model.py                               # sd15-arch, product, 256 and 512 px
    python benchmarks/gpu_memory_model.py --sizes 512 --batches 8,16 --checkpointing on
    python benchmarks/gpu_memory_model.py --preset sd15-arch-narrow --sizes 64 --batches 2 --images 4

CPU only, nothing downloaded: a few seconds per simulated step on sd15-arch (the default table, 24 steps, takes
about two minutes on 2 cores).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
import warnings
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 2**30
ALLOCATOR_ROUND = 512  # bytes: the CUDA caching allocator's smallest block
CUDA_CONTEXT_GIB = 0.75
WORKSPACES_GIB = 0.5
RESERVE_FRACTION = 0.10

# CUDA autocast's per-op policy (aten/src/ATen/autocast_mode.h: AT_FORALL_LOWER_PRECISION_FP, AT_FORALL_FP32,
# AT_FORALL_FP32_SET_OPT_DTYPE, AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE, AT_FORALL_PROMOTE; the tables in
# torch's amp documentation). Together they must name exactly the ops this build registers for AutocastCUDA.
CUDA_LOWER = {
    "_convolution", "_convolution.deprecated", "_scaled_dot_product_flash_attention", "_thnn_fused_gru_cell",
    "_thnn_fused_lstm_cell", "addbmm", "addmm", "addmv", "addr", "baddbmm", "bmm", "chain_matmul", "conv1d",
    "conv2d", "conv3d", "conv_tbc", "conv_transpose1d", "conv_transpose2d.input", "conv_transpose3d.input",
    "convolution", "cudnn_convolution", "cudnn_convolution_transpose", "einsum", "gru_cell", "linalg_multi_dot",
    "linalg_vecdot", "linear", "lstm_cell", "matmul", "mm", "mv", "prelu", "rnn_relu_cell", "rnn_tanh_cell",
    "scaled_dot_product_attention",
}
CUDA_FP32 = {
    "_upsample_bicubic2d_aa", "_upsample_bilinear2d_aa", "_upsample_nearest_exact1d", "_upsample_nearest_exact2d",
    "_upsample_nearest_exact3d", "acos", "asin", "binary_cross_entropy_with_logits", "cdist", "cosh",
    "cosine_embedding_loss", "cosine_similarity", "dist", "erfinv", "exp", "expm1", "frobenius_norm.dim",
    "group_norm", "hinge_embedding_loss", "huber_loss", "kl_div", "l1_loss", "layer_norm", "log", "log10", "log1p",
    "log2", "logsumexp", "margin_ranking_loss", "mse_loss", "multi_margin_loss", "multilabel_margin_loss",
    "native_layer_norm", "nll_loss", "nll_loss2d", "nuclear_norm", "nuclear_norm.dim", "pdist", "poisson_nll_loss",
    "pow.Scalar", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "reciprocal", "renorm", "rms_norm", "rsqrt", "sinh",
    "smooth_l1_loss", "soft_margin_loss", "softplus", "tan", "triplet_margin_loss", "upsample_bicubic2d",
    "upsample_bilinear2d", "upsample_linear1d", "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d",
    "upsample_trilinear3d",
    "norm.Scalar", "norm.ScalarOpt_dim",  # fp32_append_dtype: runs the dtype overload in fp32, same result
}
CUDA_FP32_SET_OPT_DTYPE = {  # fp32 output unless the call names a dtype
    "cumprod", "cumsum", "linalg_matrix_norm", "linalg_matrix_norm.str_ord", "linalg_vector_norm", "log_softmax.int",
    "prod", "prod.dim_int", "softmax.int", "sum", "sum.dim_IntList",
}
CUDA_PROMOTE = {"addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "grid_sampler", "index_put",
                "scatter_add", "tensordot", "vdot"}
CUDA_BANNED = {"binary_cross_entropy"}
CUDA_POLICY_TABLES = (CUDA_LOWER, CUDA_FP32, CUDA_FP32_SET_OPT_DTYPE, CUDA_PROMOTE, CUDA_BANNED)


class RulesOutOfDate(RuntimeError):
    """This torch build's CUDA autocast op set differs from the tables above: update them first."""


def _autocast_ops(dispatch_key: str) -> set[str]:
    names = set()
    for name in torch._C._dispatch_get_all_op_names():
        if name.startswith("aten::") and torch._C._dispatch_has_kernel_for_dispatch_key(name, dispatch_key):
            names.add(name.removeprefix("aten::"))
    return names


def check_tables() -> None:
    """The tables must classify every op torch registers for AutocastCUDA, and nothing else."""
    cuda = _autocast_ops("AutocastCUDA")
    tabled = set().union(*CUDA_POLICY_TABLES)
    if cuda != tabled:
        raise RulesOutOfDate(f"CUDA autocast ops not in the tables: {sorted(cuda - tabled)}; in the tables but not "
                             f"registered: {sorted(tabled - cuda)}")


def _eligible(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64


def _cast(value, dtype: torch.dtype):
    if _eligible(value) and value.dtype != dtype:
        return value.to(dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def _widest(values) -> Optional[torch.dtype]:
    widest = None
    for x in tree_leaves(list(values)):
        if _eligible(x):
            widest = x.dtype if widest is None else torch.promote_types(widest, x.dtype)
    return widest


def _kernel(op, policy: str):
    """A Python AutocastCPU kernel applying CUDA's policy, then running the op below autocast (as autocast's own
    C++ kernels do, so autograd records the casts and saves the cast tensors). Lower precision is the dtype the
    autocast region was opened with (bf16 or fp16)."""
    below = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def run(*args, **kwargs):
        lower = torch.get_autocast_dtype("cpu")
        with torch._C._ExcludeDispatchKeyGuard(below):
            if policy == "lower":
                return op(*_cast(args, lower), **{k: _cast(v, lower) for k, v in kwargs.items()})
            if policy == "fp32":
                return op(*_cast(args, torch.float32), **{k: _cast(v, torch.float32) for k, v in kwargs.items()})
            if policy == "set_opt_dtype":
                if args and _eligible(args[0]) and kwargs.get("dtype") is None:
                    kwargs = {**kwargs, "dtype": torch.float32}
                return op(*args, **kwargs)
            if policy == "promote":
                widest = _widest([*args, *kwargs.values()])
                if widest is not None:
                    args, kwargs = _cast(args, widest), {k: _cast(v, widest) for k, v in kwargs.items()}
                return op(*args, **kwargs)
            raise RuntimeError(f"{op} is not allowed under CUDA autocast (unsafe to autocast)")

    return run


def _op(name: str):
    base, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, base), overload or "default")


@contextlib.contextmanager
def cuda_autocast_rules() -> Iterator[None]:
    """While open, CPU autocast follows CUDA autocast's op lists (and only those): ops CUDA lists get CUDA's
    policy, ops only the CPU lists name fall through. Everything registered here is removed on exit."""
    check_tables()
    lib = torch.library.Library("aten", "IMPL")
    policies = {**{n: "lower" for n in CUDA_LOWER}, **{n: "fp32" for n in CUDA_FP32},
                **{n: "set_opt_dtype" for n in CUDA_FP32_SET_OPT_DTYPE}, **{n: "promote" for n in CUDA_PROMOTE},
                **{n: "banned" for n in CUDA_BANNED}}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Overriding a previously registered kernel": intended, and undone
            for name, policy in policies.items():
                lib.impl(name, _kernel(_op(name), policy), "AutocastCPU")
            for name in _autocast_ops("AutocastCPU") - set(policies):
                lib.impl(name, torch.library.fallthrough_kernel, "AutocastCPU")
        yield
    finally:
        lib._destroy()


@contextlib.contextmanager
def cuda_autocast(dtype: torch.dtype = torch.bfloat16) -> Iterator[None]:
    """What `accelerator.autocast()` is on a GPU, on fake CPU tensors: CUDA's op lists, bf16. Backward must also
    run inside `cuda_autocast_rules()` when it recomputes (gradient checkpointing re-enters autocast)."""
    with cuda_autocast_rules(), torch.autocast("cpu", dtype=dtype):
        yield


# Ops the SD UNet, CLIP and the VAE call under autocast, each a function of the device, for check_rules().
def _probes():
    import torch.nn.functional as F

    bf16 = torch.bfloat16

    def x(device, *shape, dtype=bf16):
        return torch.empty(*shape, dtype=dtype, device=device)

    return {
        "linear fp32 in": lambda d: F.linear(x(d, 4, 8, dtype=torch.float32), x(d, 6, 8, dtype=torch.float32)),
        "conv2d fp32 in": lambda d: F.conv2d(x(d, 2, 4, 8, 8, dtype=torch.float32), x(d, 6, 4, 3, 3)),
        "baddbmm": lambda d: torch.baddbmm(x(d, 2, 4, 4, dtype=torch.float32), x(d, 2, 4, 8), x(d, 2, 8, 4)),
        "group_norm": lambda d: F.group_norm(x(d, 2, 8, 4, 4), 4, x(d, 8), x(d, 8)),
        "layer_norm": lambda d: F.layer_norm(x(d, 2, 5, 8), (8,), x(d, 8), x(d, 8)),
        "softmax": lambda d: torch.softmax(x(d, 2, 8), -1),
        "upsample_nearest2d": lambda d: F.interpolate(x(d, 2, 4, 4, 4), scale_factor=2.0, mode="nearest"),
        "exp": lambda d: torch.exp(x(d, 8)),
        "pow": lambda d: x(d, 8).pow(2),
        "sum": lambda d: x(d, 8).sum(),
        "gelu (no policy)": lambda d: F.gelu(x(d, 8)),
        "silu (no policy)": lambda d: F.silu(x(d, 8)),
        "mul mixed (type promotion)": lambda d: x(d, 8) * x(d, 8, dtype=torch.float32),
    }


def check_rules() -> dict[str, tuple[str, str]]:
    """Output dtype of each probe under torch's real AutocastCUDA kernels (fake CUDA tensors, no autograd) and
    under `cuda_autocast` on fake CPU tensors; raises when one differs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    results = {}
    was = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    for name, probe in _probes().items():
        with FakeTensorMode(), torch.no_grad():
            torch.set_autocast_enabled("cuda", True)  # torch.autocast("cuda") refuses without a GPU; the kernels don't
            torch.set_autocast_dtype("cuda", torch.bfloat16)
            try:
                on_cuda = probe("cuda").dtype
            finally:
                torch.set_autocast_enabled("cuda", was[0])
                torch.set_autocast_dtype("cuda", was[1])
            with cuda_autocast():
                emulated = probe("cpu").dtype
        results[name] = (str(on_cuda).removeprefix("torch."), str(emulated).removeprefix("torch."))
    wrong = {k: v for k, v in results.items() if v[0] != v[1]}
    if wrong:
        raise RulesOutOfDate(f"emulated CUDA autocast differs from torch's CUDA kernels (cuda, emulated): {wrong}")
    return results


class DeviceMemory(TorchDispatchMode):
    """Bytes of every storage alive on the simulated device: `resident` (weights registered up front) plus what
    ops create, freed when the last reference goes (autograd releasing saved tensors included)."""

    def __init__(self):
        super().__init__()
        self.sizes: dict[int, int] = {}
        self.refs: dict[int, weakref.ref] = {}
        self.now = 0
        self.phase = ""
        self.peaks: dict[str, int] = {}

    def add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.sizes or storage.nbytes() == 0:
            return
        size = -(-storage.nbytes() // ALLOCATOR_ROUND) * ALLOCATOR_ROUND
        self.sizes[key] = size
        self.refs[key] = weakref.ref(storage, lambda _ref, key=key: self._free(key))
        self.now += size
        if self.phase:
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), self.now)

    def _free(self, key: int) -> None:
        self.now -= self.sizes.pop(key)
        self.refs.pop(key, None)

    def enter_phase(self, name: str) -> None:
        self.phase = name
        self.peaks[name] = self.now

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.add(leaf)
        return out


class SavedForBackward:
    """Bytes autograd saves for backward outside checkpointed regions, by dtype, each storage once
    (`torch.autograd.graph.saved_tensors_hooks`); parameters are not counted (they are weights)."""

    def __init__(self, skip_storages: set[int]):
        self.skip = skip_storages
        self.by_storage: dict[int, tuple[int, str]] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in self.skip:
            self.by_storage[storage._cdata] = (storage.nbytes(), str(tensor.dtype).removeprefix("torch."))
        return tensor

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)

    def by_dtype(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for nbytes, dtype in self.by_storage.values():
            totals[dtype] = totals.get(dtype, 0) + nbytes
        return totals


def optimizer_state_bytes(params: list[torch.Tensor], name: str) -> int:
    """Device bytes of AdamW (torch: exp_avg + exp_avg_sq fp32; `step` stays on the host) or bitsandbytes'
    AdamW8bit (uint8 states + fp32 absmax per 256-element block; fp32 states below min_8bit_size, 4096)."""
    if name == "adamw":
        return sum(8 * p.numel() for p in params)
    if name == "adamw8bit":
        total = 2 * 256 * 4  # the two shared quantisation maps
        for p in params:
            n = p.numel()
            total += 8 * n if n < 4096 else 2 * n + 2 * 4 * math.ceil(n / 256)
        return total
    raise ValueError(f"unknown optimizer '{name}': adamw or adamw8bit")


@dataclass
class StepModel:
    """One simulated micro-step on one GPU, in bytes. `held` and the peaks are above the resident bytes."""

    preset: str
    px: int
    batch: int
    checkpointing: bool
    frozen: int  # frozen parameters and buffers: UNet and text encoder in the compute dtype, VAE in vae_dtype
    adapters: int  # LoRA parameters (fp32)
    grads: int  # their fp32 gradients (created before the step: accumulation keeps them between micro-batches)
    optimizer: dict  # optimizer name -> state bytes
    val_set: int  # the validation loss set the Evaluator keeps on the device (latents, noise, token ids)
    vae_encode: int  # peak while the VAE encodes the batch (no_grad, full resolution)
    held: int  # alive when backward starts: saved activations, checkpoint inputs, the loss
    step_peak: int  # the maximum over the whole micro-step (VAE encode, forward, backward)
    train_peak: int  # the maximum over forward and backward alone (the step's peak with cached latents)
    saved_by_dtype: dict  # bytes autograd saved outside checkpointed regions, by dtype
    params: dict  # element counts: unet, text_encoder, vae (frozen), adapters
    seconds: float

    def counted(self, optim: str) -> int:
        return self.frozen + self.adapters + self.grads + self.optimizer[optim] + self.val_set + self.step_peak


def estimate_gib(counted_bytes: int) -> float:
    """The stated allowance on top of what is counted: reserve/fragmentation, workspaces, CUDA context."""
    return counted_bytes / GIB * (1 + RESERVE_FRACTION) + WORKSPACES_GIB + CUDA_CONTEXT_GIB


def _fake_parameters(modules, mode) -> None:
    """Replace meta parameters and buffers by fake CPU tensors of the same dtype (shared ones stay shared)."""
    from torch._subclasses.fake_tensor import FakeTensor

    done: dict[int, torch.Tensor] = {}
    cpu = torch.device("cpu")
    for module in modules:
        for sub in module.modules():
            for name, param in sub._parameters.items():
                if param is not None:
                    if id(param) not in done:
                        done[id(param)] = torch.nn.Parameter(FakeTensor(mode, param.data, cpu),
                                                             requires_grad=param.requires_grad)
                    sub._parameters[name] = done[id(param)]
            for name, buf in sub._buffers.items():
                if buf is not None:
                    if id(buf) not in done:
                        done[id(buf)] = FakeTensor(mode, buf, cpu)
                    sub._buffers[name] = done[id(buf)]


def build_step_parts(preset: str, cfg, mode=None):
    """The trainer's model, built as Trainer builds it: (LoraDiffusionModel, base, objective, encoder). With a
    FakeTensorMode, weights are created on the meta device (nothing is allocated), then made fake CPU tensors;
    without one, they are real (random) CPU tensors."""
    from types import SimpleNamespace

    from cxrdist.models.diffusion import BatchEncoder, DiffusionObjective, LoraDiffusionModel
    from cxrdist.models.loading import DTYPES, BaseModel
    from cxrdist.models.lora import attach_lora
    from cxrdist.models.presets import build_preset
    from cxrdist.train.accel import weight_dtype
    from cxrdist.train.model_setup import configure_model

    with torch.device("meta") if mode is not None else contextlib.nullcontext(), _quiet():
        parts = build_preset(preset)
        parts["vae"].to(DTYPES[cfg.model.vae_dtype])
        for module in (parts["unet"], parts["vae"], parts["text_encoder"]):
            module.requires_grad_(False)
            module.eval()
        base = BaseModel(unet=parts["unet"], vae=parts["vae"], text_encoder=parts["text_encoder"],
                         tokenizer=parts["tokenizer"], scheduler_config=dict(parts["scheduler"].config),
                         source=f"preset:{preset}", path=f"preset:{preset}", fingerprint="memory-model")
        attach_lora(base, cfg.lora)
        model = LoraDiffusionModel(base.unet, base.text_encoder, cfg.lora.train_text_encoder,
                                   text_cache_size=cfg.train.text_cache_size)
        configure_model(model, cfg, weight_dtype(SimpleNamespace(mixed_precision=cfg.train.mixed_precision)))
    model.train()
    if mode is not None:
        _fake_parameters([model, base.vae], mode)
    objective = DiffusionObjective(base.scheduler_config, cfg.train.noise_offset, cfg.train.snr_gamma)
    encoder = BatchEncoder(base.vae, base.tokenizer, cfg.data.prompt_template, cfg.train.caption_dropout,
                           use_cached=False, context_tokens=base.context_tokens, lowercase=base.lowercase_prompts)
    return model, base, objective, encoder


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Without diffusers' "modules that should be kept in float32: []" after `.to(dtype)` and deprecation notes."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        diffusers_logging.set_verbosity(level)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _base_count(module) -> int:
    return sum(p.numel() for name, p in module.named_parameters() if "lora_" not in name)


def validation_set_bytes(cfg, latent_channels: int, latent_px: int) -> int:
    """The Evaluator's loss set, kept on the device once built: fp32 latents and noise, int64 ids and mask for
    eval.max_eval_samples samples (an upper bound; a smaller split holds less)."""
    n = cfg.eval.max_eval_samples
    return n * (2 * latent_channels * latent_px * latent_px * 4 + 2 * 77 * 8)


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def simulate_step(preset: str, cfg, px: int, batch: int, checkpointing: bool, fake: bool = True) -> StepModel:
    """One training micro-step of `cfg` at `px` and `batch`: Trainer.train_step's work under CUDA autocast rules
    (when train.mixed_precision is bf16 or fp16), on fake tensors (`fake=False`: on real CPU tensors, computed,
    for small presets: the counts must not depend on it)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from cxrdist.config import merge
    from cxrdist.models.lora import lora_parameters
    from cxrdist.models.text import CONTEXT_TOKENS

    started = time.perf_counter()
    cfg = merge(cfg, {"model": {"gradient_checkpointing": checkpointing}})
    # allow_non_fake_inputs: the objective's schedule tables are real CPU tensors
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
    model, base, objective, encoder = build_step_parts(preset, cfg, mode)
    adapters = lora_parameters(model)
    adapter_ids = {id(p) for p in adapters}
    frozen = [t for t in [*model.parameters(), *model.buffers(), *base.vae.parameters(), *base.vae.buffers()]
              if id(t) not in adapter_ids]
    autocast_dtype = AUTOCAST_DTYPES.get(cfg.train.mixed_precision)
    memory = DeviceMemory()
    saved = SavedForBackward({t.untyped_storage()._cdata for t in [*frozen, *adapters]})
    with mode or contextlib.nullcontext(), memory, cuda_autocast_rules():
        for p in adapters:
            p.grad = torch.zeros_like(p)  # steady state: gradients exist (accumulated) before a micro-step
        for tensor in [*frozen, *adapters, *(p.grad for p in adapters)]:
            memory.add(tensor)
        resident = memory.now
        memory.enter_phase("vae")
        pixels = torch.empty(batch, base.channels, px, px)  # the loader's fp32 batch, copied to the device
        latents = encoder.latents({"pixel_values": pixels}, "cpu")
        del pixels
        noise = torch.empty_like(latents)
        timesteps = torch.zeros(batch, dtype=torch.long)
        ids = torch.zeros(batch, CONTEXT_TOKENS, dtype=torch.long)
        mask = torch.ones(batch, CONTEXT_TOKENS, dtype=torch.long)
        noisy, target = objective.noisy_inputs(latents, noise, timesteps)
        latent_shape = tuple(latents.shape)
        del latents, noise
        memory.enter_phase("forward")
        autocast = (torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype is not None
                    else contextlib.nullcontext())
        with saved.hooks(), autocast:
            pred = model(noisy, timesteps, ids, mask).float()  # accelerate converts autocast outputs to fp32
        loss = objective.per_sample_loss(pred, target, timesteps).mean()
        del pred, noisy, target
        held = memory.now
        memory.enter_phase("backward")
        loss.backward()
        del loss
    peaks = memory.peaks
    return StepModel(
        preset=preset, px=px, batch=batch, checkpointing=checkpointing,
        frozen=_nbytes(frozen), adapters=_nbytes(adapters), grads=_nbytes(p.grad for p in adapters),
        optimizer={name: optimizer_state_bytes(adapters, name) for name in ("adamw", "adamw8bit")},
        val_set=validation_set_bytes(cfg, latent_shape[1], latent_shape[2]),
        vae_encode=peaks["vae"] - resident, held=held - resident, step_peak=max(peaks.values()) - resident,
        train_peak=max(peaks["forward"], peaks["backward"]) - resident,
        saved_by_dtype=saved.by_dtype(),
        params={"unet": _base_count(model.unet), "text_encoder": _base_count(model.text_encoder),
                "vae": _base_count(base.vae), "adapters": sum(p.numel() for p in adapters)},
        seconds=time.perf_counter() - started,
    )


def row(step: StepModel, images: int, optim: str) -> dict:
    counted = step.counted(optim)
    estimate = estimate_gib(counted)
    return {"px": step.px, "batch": step.batch, "grad_accum": images // step.batch,
            "checkpointing": step.checkpointing, "optimizer": optim,
            "weights_gib": step.frozen / GIB,
            "lora_grads_optim_gib": (step.adapters + step.grads + step.optimizer[optim]) / GIB,
            "val_set_gib": step.val_set / GIB, "step_peak_gib": step.step_peak / GIB,
            "held_per_image_mib": step.held / step.batch / 2**20, "counted_gib": counted / GIB,
            "allowance_gib": estimate - counted / GIB, "estimate_gib": estimate}


COLUMNS = [("px", "px", "{}"), ("batch x accum", None, None), ("ckpt", "checkpointing", None),
           ("optimizer", "optimizer", "{}"), ("weights", "weights_gib", "{:.2f}"),
           ("lora+grads+opt", "lora_grads_optim_gib", "{:.3f}"), ("val set", "val_set_gib", "{:.2f}"),
           ("step peak", "step_peak_gib", "{:.2f}"), ("held/img MiB", "held_per_image_mib", "{:.0f}"),
           ("counted", "counted_gib", "{:.2f}"), ("allowance", "allowance_gib", "{:.2f}"),
           ("estimate GiB", "estimate_gib", "{:.1f}")]


def format_table(rows: list[dict]) -> str:
    def cell(r, key, fmt, title):
        if title == "batch x accum":
            return f"{r['batch']} x {r['grad_accum']}" + (" *" if r.get("as_configured") else "")
        if title == "ckpt":
            return "on" if r["checkpointing"] else "off"
        return fmt.format(r[key])

    lines = ["| " + " | ".join(c[0] for c in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r, key, fmt, title) for title, key, fmt in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog="Counted: weights, adapters, gradients, optimizer state, the validation set "
                                        "and every tensor of one micro-step, with CUDA autocast dtypes. Estimate = "
                                        f"counted x {1 + RESERVE_FRACTION:.2f} + {WORKSPACES_GIB + CUDA_CONTEXT_GIB} "
                                        "GiB (allocator reserve, kernel workspaces, CUDA context).")
    ap.add_argument("--preset", default="sd15-arch", help="model preset (cxrdist.models.presets), default sd15-arch")
    ap.add_argument("--config", default="product", help="config preset or YAML file, default product")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, as train.py's --set (repeatable)")
    ap.add_argument("--sizes", default="256,512", help="image sizes in px, comma-separated (default 256,512)")
    ap.add_argument("--batches", default="48,24,16,12,8,4",
                    help="batch sizes per GPU, each dividing --images (default 48,24,16,12,8,4)")
    ap.add_argument("--images", type=int, default=48, help="images per optimizer step: grad_accum = images / batch")
    ap.add_argument("--checkpointing", default="off,on", help="gradient checkpointing: off, on or off,on")
    ap.add_argument("--optims", default="adamw8bit,adamw", help="optimizers: adamw8bit, adamw or both")
    ap.add_argument("--json", default=None, help="also write the rows and the simulated steps to this JSON file")
    args = ap.parse_args(argv)
    args.sizes, args.batches = _ints(args.sizes), _ints(args.batches)
    switches, args.optims = args.checkpointing.split(","), args.optims.split(",")
    bad = [b for b in args.batches if b < 1 or args.images % b]
    if bad or set(args.optims) - {"adamw", "adamw8bit"} or set(switches) - {"off", "on"}:
        ap.error(f"--batches must divide --images={args.images} (not {bad}); --optims takes adamw, adamw8bit; "
                 "--checkpointing takes off, on")
    args.checkpointing = [switch == "on" for switch in switches]
    return args


def main(argv=None) -> int:
    from cxrdist.config import load_config

    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    rules = check_rules()
    print(f"CUDA autocast rules: torch's AutocastCUDA kernels and the emulation agree on {len(rules)} probes "
          f"({', '.join(k for k, v in rules.items() if v[0] == 'float32')} -> fp32)", flush=True)
    steps, rows = [], []
    for px in args.sizes:
        for checkpointing in args.checkpointing:
            for batch in args.batches:
                step = simulate_step(args.preset, cfg, px, batch, checkpointing)
                steps.append(step)
                saved = step.saved_by_dtype
                print(f"  {px} px, batch {batch}, checkpointing {'on' if checkpointing else 'off'}: held "
                      f"{step.held / GIB:.2f} GiB ({step.held / batch / 2**20:.0f} MiB/image; saved "
                      + ", ".join(f"{k} {v / GIB:.2f}" for k, v in sorted(saved.items()) if v > 2**20)
                      + f" GiB); peaks: VAE encode {step.vae_encode / GIB:.2f}, forward/backward "
                      f"{step.train_peak / GIB:.2f} GiB [{step.seconds:.1f} s]", flush=True)
                rows += [row(step, args.images, optim) for optim in args.optims]
    for r in rows:
        r["as_configured"] = (r["px"], r["batch"], r["grad_accum"], r["checkpointing"], r["optimizer"]) == (
            cfg.data.image_size, cfg.train.batch_size, cfg.train.grad_accum, cfg.model.gradient_checkpointing,
            cfg.optim.name)
    first = steps[0]
    print(f"\n{args.preset}, config {args.config}: UNet {first.params['unet'] / 1e6:.1f} M, text encoder "
          f"{first.params['text_encoder'] / 1e6:.1f} M, VAE {first.params['vae'] / 1e6:.1f} M frozen parameters; "
          f"LoRA {first.params['adapters'] / 1e6:.2f} M; train.mixed_precision={cfg.train.mixed_precision}, "
          f"model.vae_dtype={cfg.model.vae_dtype}, {args.images} images per optimizer step, one GPU")
    print(format_table(rows))
    print(f"* = {args.config} as configured: {cfg.data.image_size} px, {cfg.train.batch_size} x {cfg.train.grad_accum}, "
          f"checkpointing {'on' if cfg.model.gradient_checkpointing else 'off'}, {cfg.optim.name}")
    print(f"estimate = counted x {1 + RESERVE_FRACTION:.2f} (allocator reserve) + {WORKSPACES_GIB} GiB (kernel "
          f"workspaces) + {CUDA_CONTEXT_GIB} GiB (CUDA context). Estimated, not measured: "
          "benchmarks/gpu_train.py measures a GPU.")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "steps": [asdict(s) for s in steps]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
