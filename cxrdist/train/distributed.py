"""Scale-out helpers that do not depend on the trainer: DDP, DeepSpeed ZeRO-2 and ZeRO-3 through accelerate.

Each function takes an `Accelerator` (or its DeepSpeed plugin) and hides one DeepSpeed nuance:
- `wants_cpu_flag`: `Accelerator(cpu=True)` turns a DeepSpeed launch into plain MULTI_CPU (the DeepSpeed
  plugin is dropped), so on a CPU-only machine only non-DeepSpeed launches may pass `cpu=True`.
- `configure_deepspeed`: accelerate fills `"gradient_clipping": "auto"` with a hard-coded 1.0 and needs a
  DataLoader with an integer `batch_size` to fill `train_micro_batch_size_per_gpu`; a WebDataset pipeline
  batches inside the dataset, so both values are written from our config before `prepare`.
- `check_optimizer_offload`: with `offload_optimizer`, accelerate silently replaces a client optimizer by
  DeepSpeedCPUAdam (and an 8-bit AdamW becomes plain Adam with L2 decay); we refuse that instead.
- `lora_state_dicts`, `trained_named_state`: under ZeRO-3 module parameters are empty partitions, and under bf16
  they are bf16 copies; the fp32 master values are gathered from the optimizer on every rank.
- `trained_fp32_values`: what the EMA is updated from at every step: the parameters themselves under DDP (no
  copy), the gathered fp32 masters under DeepSpeed.
- `checkpoint_kwargs`: `save_state` must leave the frozen base out of DeepSpeed checkpoints, and `load_state`
  must then accept a module state without the base.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Mapping

import torch

from cxrdist.errors import ConfigError
from cxrdist.models.trained import trained_named_parameters
from cxrdist.train.ranks import all_ranks

# Optimizers that DeepSpeed's CPU offload cannot run as a client optimizer, and what to use instead.
OFFLOAD_INCOMPATIBLE = {
    "adamw8bit": "bitsandbytes' 8-bit AdamW runs on the GPU and cannot step CPU-offloaded fp32 states "
                 "(accelerate would silently swap it for DeepSpeedCPUAdam)",
}


def launched_with_deepspeed(env: Mapping[str, str] = os.environ) -> bool:
    """True inside a process started by `accelerate launch` with a DeepSpeed config."""
    return env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def cpu_forced(env: Mapping[str, str] = os.environ) -> bool:
    """ACCELERATE_USE_CPU set true (`--cpu`, `use_cpu: true` under the one-process launcher, or by hand), read as
    accelerate itself reads it."""
    from accelerate.utils import str_to_bool

    try:
        return bool(str_to_bool(env.get("ACCELERATE_USE_CPU", "false")))
    except ValueError:  # a value accelerate's own parser refuses as well
        return False


def wants_cpu_flag() -> bool:
    """The value for `Accelerator(cpu=...)`: CPU-only machine and not a DeepSpeed launch.

    On CPU, DeepSpeed runs with DS_ACCELERATOR=cpu and a gloo process group (InitProcessGroupKwargs
    backend="gloo"); passing cpu=True there would silently train with DDP instead.
    """
    return not torch.cuda.is_available() and not launched_with_deepspeed()


def check_deepspeed_kept(accelerator: Any) -> None:
    """A DeepSpeed launch must train under DeepSpeed: refuse the run when accelerate dropped the plugin.

    accelerate silently turns a DeepSpeed config into plain DDP when ACCELERATE_USE_CPU=1 is set (or
    `--cpu` is passed); the run would then differ from what was asked for in memory, checkpoints and numerics.
    """
    if launched_with_deepspeed() and deepspeed_plugin(accelerator) is None:
        cause = "ACCELERATE_USE_CPU=1 is set" if cpu_forced() else "accelerate did not keep its DeepSpeed plugin"
        raise ConfigError(f"a DeepSpeed config was launched but {cause}, so accelerate would run plain DDP instead: "
                          "unset ACCELERATE_USE_CPU and drop --cpu (DeepSpeed runs on CPU with DS_ACCELERATOR=cpu), "
                          "or launch a non-DeepSpeed config such as configs/accelerate/cpu_2ranks.yaml")


def refuse_fsdp(env: Mapping[str, str] = os.environ) -> None:
    """An FSDP launch is refused before anything loads: cxrdist shards with DeepSpeed ZeRO-3 today.

    FSDP2 itself runs on CPU with gloo (torch 2.13: fully_shard, forward, backward and AdamW over 2 ranks), but
    accelerate 1.15 turns an FSDP config into FSDP only on GPU-class devices: on a CPU machine each rank of a 2-rank
    FSDP launch came up as its own unconnected process (DistributedType.NO), so the trainer's FSDP path cannot be
    tested on the CPU ranks every other launcher is tested on."""
    from accelerate.utils import str_to_bool

    try:
        fsdp = bool(str_to_bool(env.get("ACCELERATE_USE_FSDP", "false")))
    except ValueError:
        fsdp = False
    if fsdp:
        raise ConfigError("FSDP launches are not supported yet: shard the model with DeepSpeed ZeRO-3 instead "
                          "(accelerate launch --config_file configs/accelerate/zero3.yaml ...)")


def launched_distributed() -> bool:
    """True inside a process started by a launcher (accelerate launch, torchrun): LOCAL_RANK is set."""
    return int(os.environ.get("LOCAL_RANK", "-1")) != -1 or int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_group_backend() -> str | None:
    """gloo for launched processes without CUDA (DDP and DeepSpeed alike), else None.

    None lets accelerate pick NCCL on GPUs, and must be used for a plain `python train.py`: accelerate
    treats any explicit backend as "distributed" and fails on the missing process group.
    """
    return "gloo" if launched_distributed() and not torch.cuda.is_available() else None


def default_collective_timeout(seconds: float) -> None:
    """Make process groups created later (DeepSpeed's data-parallel groups) time out after `seconds` too.

    `InitProcessGroupKwargs(timeout=...)` sets the timeout of the world group only; `new_group()` without a
    timeout takes torch's module default (30 min for gloo, 10 min for NCCL), so a ZeRO-2 rank waiting on a
    silent peer in DeepSpeed's own group hung for that long (measured on CPU: still waiting after 50 s with a
    10 s configured timeout). Call before the model is prepared.
    """
    from datetime import timedelta

    import torch.distributed.distributed_c10d as c10d

    timeout = timedelta(seconds=seconds)
    c10d.default_pg_timeout = timeout
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), timedelta):
        c10d.default_pg_nccl_timeout = timeout


def deepspeed_plugin(accelerator_or_plugin: Any):
    """The active DeepSpeed plugin of an Accelerator, the plugin itself, or None."""
    if hasattr(accelerator_or_plugin, "state"):  # an Accelerator
        return getattr(accelerator_or_plugin.state, "deepspeed_plugin", None)
    return accelerator_or_plugin if hasattr(accelerator_or_plugin, "deepspeed_config") else None


def zero_stage(accelerator: Any) -> int:
    """0 when DeepSpeed is not active, else the ZeRO stage."""
    plugin = deepspeed_plugin(accelerator)
    if plugin is None:
        return 0
    return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def _offload_device(config: dict) -> str:
    return str(config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") or "none")


def check_optimizer_offload(accelerator_or_plugin: Any, optim_name: str) -> None:
    """Refuse a client optimizer that DeepSpeed's optimizer offload would replace behind our back."""
    plugin = deepspeed_plugin(accelerator_or_plugin)
    if plugin is None:
        return
    device = _offload_device(plugin.deepspeed_config)
    why = OFFLOAD_INCOMPATIBLE.get(optim_name)
    if device != "none" and why:
        raise ConfigError(
            f"optim.name={optim_name} cannot run with DeepSpeed offload_optimizer.device={device}: {why}; "
            "use optim.name=adamw with offload, or remove offload_optimizer from the DeepSpeed config "
            "(configs/deepspeed/zero2.json keeps optimizer state on the GPU)")


def configure_deepspeed(accelerator: Any, micro_batch: int, grad_accum: int, max_grad_norm: float,
                        optim_name: str) -> None:
    """Write our config's batch, accumulation and clipping into the DeepSpeed config; call before prepare().

    No-op without DeepSpeed. `max_grad_norm=0` disables clipping (DeepSpeed treats 0 as off).
    """
    plugin = deepspeed_plugin(accelerator)
    if plugin is None:
        return
    check_optimizer_offload(plugin, optim_name)
    config = plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = int(micro_batch)
    config["gradient_accumulation_steps"] = int(grad_accum)
    config["train_batch_size"] = int(micro_batch) * int(grad_accum) * int(accelerator.num_processes)
    config["gradient_clipping"] = float(max_grad_norm)
    plugin.gradient_clipping = float(max_grad_norm)
    plugin.gradient_accumulation_steps = int(grad_accum)


def checkpoint_kwargs(accelerator: Any) -> tuple[dict, dict]:
    """Extra keyword arguments for (save_state, load_state).

    Under DeepSpeed they reach `engine.save_checkpoint` / `engine.load_checkpoint`: the frozen base stays out
    of the checkpoint, so loading must not insist on finding it. Without DeepSpeed accelerate ignores them,
    and the save hooks decide what goes into the checkpoint.
    """
    if deepspeed_plugin(accelerator) is None:
        return {}, {}
    return {"exclude_frozen_parameters": True}, {"load_module_strict": False}


def deepspeed_safe_globals() -> list:
    """The classes DeepSpeed's checkpoint files hold besides tensors and plain data (found by loading ZeRO-2 and
    ZeRO-3 bf16/fp16 checkpoints with weights_only=True): allow-listed, so nothing else can be built on load."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(engine: Any) -> None:
    """Make a DeepSpeed engine read its checkpoint files with torch.load(weights_only=True).

    DeepSpeed's own checkpoint engine uses the full (code-running) unpickler, so a swapped file would run code
    on `--resume`; the weights-only unpickler builds tensors, plain data and the allow-listed classes only.
    """
    checkpoint_engine = getattr(engine, "checkpoint_engine", None)
    if checkpoint_engine is None:
        return
    allowed = deepspeed_safe_globals()

    def load(path, map_location=None):
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    checkpoint_engine.load = load


def _full_fp32(param: torch.nn.Parameter) -> torch.Tensor:
    """The full fp32 value of a parameter: DeepSpeed's master copy when there is one, else the parameter."""
    from deepspeed.utils import safe_get_full_fp32_param

    full = safe_get_full_fp32_param(param)
    return param.detach() if full is None else full


def _gathered(params: list[torch.nn.Parameter], stage: int):
    if stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _raw_trained_state(module: torch.nn.Module, stage: int | None, keep: bool = True) -> dict[str, torch.Tensor]:
    """Trained tensors of `module` (LoRA adapters, or the whole denoiser under train.method=full) by parameter name
    (fp32, CPU); `stage` None means no DeepSpeed. Under DeepSpeed each tensor is gathered and moved to the CPU in
    turn, so a full fine-tune's model is never whole on the device twice; with `keep` False (ranks that only take
    part in the gather) nothing is kept."""
    named = trained_named_parameters(module)

    def on_cpu(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to("cpu", torch.float32).contiguous().clone()

    if stage is None:
        return {name: on_cpu(param.detach()) for name, param in named} if keep else {}
    state = {}
    try:
        for name, param in named:
            value = on_cpu(_full_fp32(param))
            if keep:
                state[name] = value
    except (AttributeError, AssertionError, RuntimeError):  # engine without a ZeRO optimizer (inference)
        with _gathered([p for _, p in named], stage):
            state = {name: on_cpu(param.detach()) for name, param in named} if keep else {}
    return state


def _module_lora_state(module: torch.nn.Module, stage: int | None) -> dict[str, torch.Tensor] | None:
    """peft-format LoRA tensors of one module (fp32, CPU); `stage` None means no DeepSpeed."""
    from peft.utils import get_peft_model_state_dict

    if not getattr(module, "peft_config", None):
        return None
    return get_peft_model_state_dict(module, state_dict=_raw_trained_state(module, stage))


def _stage_or_none(accelerator: Any) -> int | None:
    return zero_stage(accelerator) if deepspeed_plugin(accelerator) is not None else None


@all_ranks
def trained_named_state(accelerator: Any, joint: torch.nn.Module, main_only: bool = False) -> dict[str, torch.Tensor]:
    """Every trained tensor of the prepared module by its full parameter name (the training-checkpoint format),
    fp32 on CPU, from DeepSpeed's master copy where there is one. Collective under DeepSpeed: every rank. With
    `main_only` the other ranks take part in the gathers and keep nothing ({}): a full fine-tune's export needs the
    model on the main process only."""
    keep = not main_only or accelerator.is_main_process
    return _raw_trained_state(accelerator.unwrap_model(joint), _stage_or_none(accelerator), keep=keep)


@all_ranks
def trained_fp32_values(accelerator: Any, joint: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trained tensor's full fp32 value by full name, copied only where it must be: without DeepSpeed the
    module holds them whole in fp32, so these are the parameters themselves (detached, on their device: read
    them, never change them in place); under DeepSpeed `trained_named_state` (the fp32 masters, gathered, CPU;
    collective: every rank)."""
    if deepspeed_plugin(accelerator) is not None:
        return trained_named_state(accelerator, joint)
    named = trained_named_parameters(accelerator.unwrap_model(joint))
    return {name: param.detach().float() for name, param in named}


@all_ranks
def live_trained_state(accelerator: Any, joint: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained values the module computes with, by full name (fp32, CPU): each rank's own copy under DDP and
    ZeRO-2 (so comparing ranks means something), gathered partitions under ZeRO-3 (collective: every rank)."""
    named = trained_named_parameters(accelerator.unwrap_model(joint))
    with _gathered([p for _, p in named], zero_stage(accelerator)):
        return {name: p.detach().to("cpu", torch.float32).clone() for name, p in named}


@all_ranks
def set_fp32_masters(accelerator: Any, joint: torch.nn.Module, values: dict[str, torch.Tensor]) -> int:
    """Make DeepSpeed's fp32 master copies of the trained parameters exactly `values` (by full name); returns how
    many were set. The engine builds its masters from the module it is given, which under bf16/fp16 holds the
    weights rounded to half precision: a full fine-tune would start from the base's rounding, not from the base.
    Collective under ZeRO-3 (each rank sets its own partition): every rank, with the same values."""
    from deepspeed.utils import safe_set_full_fp32_param

    named = trained_named_parameters(accelerator.unwrap_model(joint))
    for name, param in named:
        safe_set_full_fp32_param(param, values[name].to(torch.float32))
    return len(named)


@all_ranks
def gathered_for_update(accelerator: Any, params: list[torch.nn.Parameter]):
    """Context in which rank 0's in-place changes to `params` reach every rank's partition under ZeRO-3
    (enter on every rank and make the same change everywhere); a no-op otherwise."""
    if zero_stage(accelerator) != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def prepare_text_encoder_for_zero3(text_encoder: torch.nn.Module, spec: dict) -> list[str]:
    """Make ZeRO-3 gather a text encoder's embedding blocks whole before they run; call before `prepare`.

    ZeRO-3 fetches a module's own parameters in its pre-forward hook and releases them after its forward -- small
    "persistent" ones too while it records a new call order (DeepSpeed 0.19.8, release_sub_module without a complete
    trace), as when validation generates images with the text encoder outside the engine's forward. CLIP's
    embeddings block reads its position table's size before calling the table (its child), so after a resume it saw
    an empty partition and failed ("max_position_embeddings: 0"). As a ZeRO-3 leaf the block fetches its children's
    parameters too. A leaf whose parameters train fails in backward, so a fully trained text encoder is refused
    under ZeRO-3 (ZeRO-2 and DDP train it)."""
    from deepspeed.utils import set_z3_leaf_module

    if spec.get("method") == "full" and spec.get("text_encoder"):
        raise ConfigError("train.train_text_encoder=true is not supported under DeepSpeed ZeRO-3 (its validation "
                          "images fail after a resume, and the fix for that breaks a trained text encoder's "
                          "backward): use ZeRO-2 (configs/accelerate/zero2.yaml) or DDP, or leave the text encoder "
                          "frozen")
    marked = []
    for name, module in text_encoder.named_modules():
        if type(module).__name__.endswith("Embeddings"):
            set_z3_leaf_module(module, True)
            marked.append(name)
    return marked


@all_ranks
def lora_state_dicts(accelerator: Any, joint: torch.nn.Module) -> tuple[dict, dict | None]:
    """(unet_sd, text_sd) in peft format, fp32 on CPU, for DDP, ZeRO-2 and ZeRO-3 alike.

    `joint` is the prepared module (a DDP wrapper or a DeepSpeed engine) around one nn.Module with
    attributes `unet` and `text_encoder`. Under DeepSpeed this is a collective: call it on EVERY rank
    (then write the result on rank 0 only), or ranks hang.
    """
    module = accelerator.unwrap_model(joint)
    stage = _stage_or_none(accelerator)
    unet_sd = _module_lora_state(module.unet, stage)
    text_sd = _module_lora_state(module.text_encoder, stage)
    return unet_sd or {}, text_sd
