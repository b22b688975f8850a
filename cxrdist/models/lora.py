"""LoRA adapters (peft) on the UNet and the text encoder: attach, name, save, load; the file names of adapter
folders and of training checkpoints, which training writes and sampling reads.

Only adapter weights are trainable; the base stays frozen. Adapters are saved as
`pytorch_lora_weights.safetensors` in the layout diffusers' `load_lora_weights` reads ("unet." and
"text_encoder." prefixes, peft key names) plus `cxrdist.json` describing the base, ranks, targets and the
prompt template. Loading goes through peft's `set_peft_model_state_dict`, which works for CLIP and
BERT-style encoders alike (diffusers' loader cannot take a BERT text-encoder LoRA).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from cxrdist.config import LoraConfig
from cxrdist.errors import ModelError
from cxrdist.fileio import check_not_special, temp_name
from cxrdist.models.families import FAMILIES
from cxrdist.models.loading import BaseModel

log = logging.getLogger(__name__)

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
METADATA_NAME = "cxrdist.json"
ADAPTER_FORMAT = "cxrdist-lora/1"
# A training checkpoint (`checkpoints/step_N`, written by cxrdist.train.checkpoint) holds the adapter tensors by
# full parameter name, the run's config and, written last, a marker: a folder without it is unfinished.
CHECKPOINT_MARKER = "cxrdist_checkpoint.json"
CHECKPOINT_ADAPTER = "adapter.safetensors"
CHECKPOINT_CONFIG = "config.yaml"
# Adapter-folder keys carry the module they belong to: diffusers' `load_lora_weights` layout ("transformer." for
# the denoiser of PixArt-Σ and Sana, see Family.lora_prefix).
PREFIXES = ("unet.", "text_encoder.")
PEFT_FOLDER = "peft"
# Attention projections per encoder family: CLIP names its projections q/k/v/out_proj, BERT query/key/value
# and attention.output.dense (the attention output, not the MLP's output.dense).
TEXT_TARGETS = {
    "clip": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "bert": ["query", "key", "value", "attention.output.dense"],
}


def text_targets(base: BaseModel, cfg: LoraConfig) -> list[str]:
    return TEXT_TARGETS[base.text_encoder_kind] if cfg.text_targets == ["auto"] else list(cfg.text_targets)


def _peft_config(rank: int, alpha: float, dropout: float, targets: list[str]):
    from peft import LoraConfig as PeftLoraConfig

    # Gaussian A / zero B: the adapted model starts exactly equal to the base.
    return PeftLoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
                          target_modules=targets)


def _matches(name: str, targets: list[str]) -> bool:
    # peft's rule for a list of target names: the module's full name, or its last dotted components
    return any(name == target or name.endswith("." + target) for target in targets)


def unet_targets(unet: torch.nn.Module, cfg: LoraConfig) -> list[str]:
    """What the UNet adapter is injected into: `lora.unet_targets` in every block or, with `lora.unet_blocks`,
    the full names of those modules inside the named blocks only (kohya's block-wise LoRA with the other blocks'
    weights at 0). Full names keep the adapter loadable from its stored targets alone."""
    if not cfg.unet_blocks:
        return list(cfg.unet_targets)
    names = [name for name, _ in unet.named_modules() if _matches(name, cfg.unet_targets)]
    for block in cfg.unet_blocks:
        if not any(name.startswith(block + ".") for name in names):
            # "down_blocks.0.attentions..." -> "down_blocks.0", "mid_block.attentions..." -> "mid_block"
            held = sorted({".".join(name.split(".")[:2 if name.startswith(("down_blocks.", "up_blocks.")) else 1])
                           for name in names})
            raise ModelError(f"lora.unet_blocks: '{block}' holds none of lora.unet_targets {cfg.unet_targets}; "
                             f"blocks that do: {', '.join(held) or 'none'}")
    return [name for name in names if any(name.startswith(block + ".") for block in cfg.unet_blocks)]


def add_adapter(module: torch.nn.Module, config) -> None:
    """Inject a peft LoRA as adapter "default": through diffusers' `add_adapter` where the model has it, else (PixArt-Σ's
    transformer has no PeftAdapterMixin) with peft directly, recording the config where peft's state-dict helpers
    look for it."""
    if hasattr(module, "add_adapter"):
        module.add_adapter(config)
        return
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, module, adapter_name="default")
    module.peft_config = {"default": config}


def attach_lora(base: BaseModel, cfg: LoraConfig) -> dict[str, Any]:
    """Inject adapters in place; return the resolved adapter description stored with checkpoints."""
    if cfg.train_text_encoder and not base.family.text_encoder_lora:
        raise ModelError(f"lora.train_text_encoder=true is not supported on {base.family.label} bases (diffusers' "
                         f"{base.family.pipeline} loads no text-encoder LoRA): set lora.train_text_encoder=false")
    base.unet.requires_grad_(False)
    base.text_encoder.requires_grad_(False)
    targets = unet_targets(base.unet, cfg)
    add_adapter(base.unet, _peft_config(cfg.unet_rank, cfg.unet_alpha, cfg.unet_dropout, targets))
    spec: dict[str, Any] = {
        "unet": {"rank": cfg.unet_rank, "alpha": cfg.unet_alpha, "dropout": cfg.unet_dropout,
                 "targets": targets, **({"blocks": list(cfg.unet_blocks)} if cfg.unet_blocks else {})},
        "text_encoder": None,
    }
    if cfg.train_text_encoder:
        targets = text_targets(base, cfg)
        base.text_encoder.add_adapter(_peft_config(cfg.text_rank, cfg.text_alpha, cfg.text_dropout, targets))
        spec["text_encoder"] = {"rank": cfg.text_rank, "alpha": cfg.text_alpha, "dropout": cfg.text_dropout,
                                "targets": targets}
    _check_targets_matched(base, spec)
    for module in (base.unet, base.text_encoder):
        for name, param in module.named_parameters():
            param.requires_grad_(is_lora_name(name))
    return spec


def _check_targets_matched(base: BaseModel, spec: dict) -> None:
    if not lora_parameters(base.unet):
        raise ModelError(f"lora.unet_targets {spec['unet']['targets']} match no module of the denoiser: use "
                         "attention projection names such as to_q, to_k, to_v, to_out.0")


def is_lora_name(name: str) -> bool:
    """True for a parameter (or state-dict key) of a LoRA adapter as peft names them (`...lora_A...`)."""
    return "lora_" in name


def lora_named_parameters(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, param) for name, param in module.named_parameters() if is_lora_name(name)]


def lora_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [param for _, param in lora_named_parameters(module)]


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of tensors by name and fp32 value, independent of dict and file-header order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def count_parameters(module: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (a ZeRO-3 partition counts as its whole tensor: `ds_numel`)."""
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in module.parameters()]
    return sum(n for n, trained in sizes if trained), sum(n for n, _ in sizes)


def adapter_state_dicts(unet, text_encoder) -> tuple[dict, dict | None]:
    """peft-format LoRA tensors of both models (copied to CPU, contiguous, detached)."""
    from peft.utils import get_peft_model_state_dict

    def grab(module):
        return {k: v.detach().to("cpu").contiguous().clone() for k, v in get_peft_model_state_dict(module).items()}

    unet_sd = grab(unet)
    text_sd = grab(text_encoder) if getattr(text_encoder, "peft_config", None) else None
    return unet_sd, text_sd


def _peft_metadata(spec: dict | None) -> dict | None:
    if spec is None:
        return None
    return {"r": spec["rank"], "lora_alpha": spec["alpha"], "target_modules": spec["targets"]}


def save_adapter(out_dir: str | Path, unet_sd: dict, text_sd: dict | None, metadata: dict) -> Path:
    """Write weights + cxrdist.json into a temporary folder and rename it into place. The weights file is the one
    the family's diffusers loader reads (`load_lora_weights`: "unet."/"text_encoder." keys for SD, "transformer."
    for Sana); PixArt-Σ, whose pipeline has no LoRA loader, also gets a PEFT adapter folder (`peft/`)."""
    from diffusers import SanaPipeline, StableDiffusionPipeline

    out = Path(out_dir)
    if out.exists():
        raise ModelError(f"{out} already exists: adapters are never overwritten, choose another folder")
    family = FAMILIES[metadata["base"].get("family", "sd")]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(out)  # unique to this process: a user's `X.partial` folder is never touched
    try:
        tmp.mkdir()
        spec = metadata["adapter"]
        if family.is_transformer:
            # diffusers' writer of a transformer-only LoRA file ("transformer." keys, peft metadata in the header)
            SanaPipeline.save_lora_weights(tmp, transformer_lora_layers=unet_sd, safe_serialization=True,
                                           transformer_lora_adapter_metadata=_peft_metadata(spec["unet"]))
        else:
            StableDiffusionPipeline.save_lora_weights(
                tmp, unet_lora_layers=unet_sd, text_encoder_lora_layers=text_sd, safe_serialization=True,
                unet_lora_adapter_metadata=_peft_metadata(spec["unet"]),
                text_encoder_lora_adapter_metadata=_peft_metadata(spec["text_encoder"]),
            )
        if family.name == "pixart-sigma":
            save_peft_folder(tmp / PEFT_FOLDER, unet_sd, spec["unet"])
        (tmp / METADATA_NAME).write_text(json.dumps({"format": ADAPTER_FORMAT, **metadata}, indent=2, default=str),
                                         encoding="utf-8")
        tmp.rename(out)  # fails rather than replace a folder that appeared meanwhile (unless it is empty)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # only the folder this call created
        raise
    return out


def save_peft_folder(folder: Path, state: dict, spec: dict) -> None:
    """A PEFT adapter folder (adapter_config.json + adapter_model.safetensors, keys as PeftModel saves them), which
    `peft.PeftModel.from_pretrained(pipe.transformer, folder)` loads onto a plain diffusers pipeline."""
    from safetensors.torch import save_file

    folder.mkdir()
    _peft_config(spec["rank"], spec["alpha"], spec.get("dropout", 0.0), spec["targets"]).save_pretrained(str(folder))
    save_file({f"base_model.model.{key}": value.contiguous() for key, value in state.items()},
              str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def adapter_metadata(base: BaseModel, spec: dict, prompt_template: str, config: dict | None = None,
                     **extra: Any) -> dict:
    """What a checkpoint needs to be self-describing: the base, the adapter shapes, the template, the config."""
    return {
        "base": {"source": base.source, "fingerprint": base.fingerprint, "family": base.family.name,
                 "text_encoder": base.text_encoder_kind,
                 "image_size": base.image_size, "channels": base.channels, "revision": base.revision,
                 "variant": base.variant},
        "adapter": spec,
        "prompt_template": prompt_template,
        # the instruction every non-empty prompt was encoded after (model.text_instruction), as text: sampling uses
        # exactly what training did, whatever the installed diffusers' default
        "text_instruction": base.instruction.text if base.instruction is not None else None,
        "config": config or {},
        **extra,
    }


def read_adapter_metadata(folder: str | Path) -> dict:
    """cxrdist.json of an adapter folder, checked: every key that loading reads is there with the right type,
    so a damaged or hand-edited file is one ModelError naming the key, not a KeyError deep in loading."""
    path = Path(folder) / METADATA_NAME
    if not path.exists():
        raise ModelError(f"{folder} has no {METADATA_NAME}: not a cxrdist adapter folder")
    check_not_special(path, "adapter metadata", ModelError)  # reading a FIFO would block forever
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ModelError(f"{path} is not valid JSON ({type(exc).__name__}: {str(exc).splitlines()[0]}): "
                         "the adapter folder is damaged; export it again") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} is not a JSON object: the adapter folder is damaged; export it again")
    if data.get("format") != ADAPTER_FORMAT:
        raise ModelError(f"{path} has format {data.get('format')!r}, expected {ADAPTER_FORMAT!r}")
    problem = _metadata_problem(data)
    if problem:
        raise ModelError(f"{path} is incomplete: {problem}; the adapter folder is damaged, export it again")
    return data


def _metadata_problem(data: dict) -> str | None:
    """The first missing or mistyped key that `load_adapter` and sampling rely on, or None."""
    base, adapter = data.get("base"), data.get("adapter")
    if not isinstance(base, dict) or not isinstance(base.get("source"), str) or not base["source"].strip():
        return "'base.source' is missing or not a string"
    if not isinstance(base.get("fingerprint"), str):
        return "'base.fingerprint' is missing or not a string"
    if "family" in base and base["family"] not in FAMILIES:  # absent in adapters written before families
        return f"'base.family' is not one of {', '.join(FAMILIES)}"
    for key in ("revision", "variant"):  # absent in adapters written before they were recorded
        if base.get(key) is not None and not isinstance(base[key], str):
            return f"'base.{key}' is not a string"
    if not isinstance(adapter, dict) or "unet" not in adapter or "text_encoder" not in adapter:
        return "'adapter' needs 'unet' and 'text_encoder' entries"
    if "prompt_template" in data and not isinstance(data["prompt_template"], str):
        return "'prompt_template' is not a string"
    if data.get("text_instruction") is not None and not isinstance(data["text_instruction"], str):
        return "'text_instruction' is not a string"
    for part in ("unet", "text_encoder"):
        spec = adapter[part]
        if spec is None and part == "text_encoder":
            continue
        if not isinstance(spec, dict):
            return f"'adapter.{part}' is not an object"
        if not isinstance(spec.get("rank"), int) or isinstance(spec.get("rank"), bool) or spec["rank"] < 1:
            return f"'adapter.{part}.rank' is not a positive integer"
        if not isinstance(spec.get("alpha"), (int, float)) or isinstance(spec.get("alpha"), bool):
            return f"'adapter.{part}.alpha' is not a number"
        if not _finite(spec["alpha"]):  # JSON as Python reads it allows NaN, Infinity and 400-digit integers
            return f"'adapter.{part}.alpha' is not a finite number"
        targets = spec.get("targets")
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
            return f"'adapter.{part}.targets' is not a list of module names"
    return None


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def split_prefixed(state: dict, denoiser_prefix: str = "unet") -> tuple[dict, dict]:
    """An adapter file's tensors -> (denoiser part, text-encoder part), each keyed without its prefix
    (`denoiser_prefix`: the family's, "unet" or "transformer")."""
    unet_prefix, text_prefix = denoiser_prefix + ".", PREFIXES[1]
    unet, text = {}, {}
    for key, value in state.items():
        if key.startswith(unet_prefix):
            unet[key[len(unet_prefix):]] = value
        elif key.startswith(text_prefix):
            text[key[len(text_prefix):]] = value
    return unet, text


def _check_shapes(module: torch.nn.Module, incoming: dict, what: str, folder: Path, base: BaseModel) -> None:
    """Refuse an adapter made for another base, naming the first tensor that does not fit."""
    from peft.utils import get_peft_model_state_dict

    expected = get_peft_model_state_dict(module)
    missing = sorted(set(expected) - set(incoming))
    unknown = sorted(set(incoming) - set(expected))
    if missing or unknown:
        key = (unknown or missing)[0]
        raise ModelError(f"LoRA {folder} does not fit base '{base.source}': {what} key '{key}' "
                         f"{'is not in the base' if unknown else 'is missing from the adapter'}")
    for key, tensor in incoming.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ModelError(f"LoRA {folder} does not fit base '{base.source}': {what} '{key}' has shape "
                             f"{tuple(tensor.shape)}, the base expects {tuple(expected[key].shape)}")


def load_adapter(folder: str | Path, base: BaseModel) -> dict:
    """Attach the adapter described in `folder` to `base` and load its weights bit-exactly."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = read_adapter_metadata(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.exists():
        raise ModelError(f"{weights} not found: the adapter folder is incomplete")
    if meta["base"]["fingerprint"] != base.fingerprint:
        log.warning("adapter %s was trained on base '%s' (fingerprint %s); loading it on '%s' (%s)", folder,
                    meta["base"]["source"], meta["base"]["fingerprint"], base.source, base.fingerprint)
    spec = meta["adapter"]
    recorded = meta["base"].get("family", "sd")
    if recorded != base.family.name:
        trained_on = FAMILIES[recorded].label if recorded in FAMILIES else recorded
        raise ModelError(f"LoRA {folder} was trained on a {trained_on} base; '{base.source}' is "
                         f"{base.family.label}: load it on its own family's base")
    unet_sd, text_sd = split_prefixed(load_file(str(weights)), base.family.lora_prefix)
    lora_cfg = LoraConfig(
        unet_rank=spec["unet"]["rank"], unet_alpha=spec["unet"]["alpha"], unet_targets=spec["unet"]["targets"],
        train_text_encoder=spec["text_encoder"] is not None,
        **({"text_rank": spec["text_encoder"]["rank"], "text_alpha": spec["text_encoder"]["alpha"],
            "text_targets": spec["text_encoder"]["targets"]} if spec["text_encoder"] else {}),
    )
    try:
        attach_lora(base, lora_cfg)
    except (ValueError, RuntimeError) as exc:
        raise ModelError(f"LoRA {folder} does not fit base '{base.source}': {str(exc).splitlines()[0]}") from None
    _check_shapes(base.unet, unet_sd, "UNet", folder, base)
    set_peft_model_state_dict(base.unet, unet_sd)
    if spec["text_encoder"]:
        _check_shapes(base.text_encoder, text_sd, "text encoder", folder, base)
        set_peft_model_state_dict(base.text_encoder, text_sd)
    for module in (base.unet, base.text_encoder):
        module.requires_grad_(False)
    return meta

