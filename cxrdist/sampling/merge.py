"""Merge a LoRA checkpoint into its base and write a standalone diffusers pipeline folder.

The merge runs on freshly loaded modules, never on a live training model (the original project's
`merge_and_unload` destroyed the model it was still using), and the adapter checkpoint is only read.
The merged folder is a plain pipeline of the base's family (StableDiffusionPipeline without safety checker,
PixArtSigmaPipeline, SanaPipeline) that `load_base`, diffusers and `cxrdist sample` load directly, plus
`cxrdist.json` saying where it came from.

It is written into a temporary folder of this process beside --out (cxrdist.fileio.temp_name) and renamed
when complete: --out appears whole or not at all, a failure (a full disk included) leaves nothing behind, and
nothing of the user's beside --out is touched.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from cxrdist import __version__
from cxrdist.errors import InputError
from cxrdist.fileio import is_disk_full, sha256_file, temp_name
from cxrdist.models.loading import BaseModel
from cxrdist.models.lora import WEIGHTS_NAME
from cxrdist.sampling.loading import load_for_sampling
from cxrdist.sampling.pipeline import assemble_pipeline

log = logging.getLogger(__name__)

MERGED_FORMAT = "cxrdist-merged/1"


def fuse_lora(model: torch.nn.Module) -> int:
    """Fold every LoRA layer's update into its base weight and put the plain layer back; return the count.

    Afterwards the model has the architecture and state-dict keys of the base, so it saves as a normal model.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    fused = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, BaseTunerLayer):
            continue
        module.merge(safe_merge=True)  # safe_merge: refuses to write NaN/inf into the base weight
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
        fused += 1
    # Both diffusers and transformers save only the adapter while these say one is loaded.
    if hasattr(model, "peft_config"):
        del model.peft_config
    if getattr(model, "_hf_peft_config_loaded", False):
        model._hf_peft_config_loaded = False
    return fused


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"--out {out} exists and is not an empty folder: choose a new folder")


def _saved_scheduler(base: BaseModel):
    """The scheduler a merged folder carries: SD's DDPM training schedule, or the transformer base's own scheduler
    (its class as its scheduler_config.json names it, accepted only when it is a diffusers scheduler)."""
    import diffusers

    if base.family.name == "sd":
        return diffusers.DDPMScheduler.from_config(base.scheduler_config)
    name = str(base.scheduler_config.get("_class_name", ""))
    scheduler_class = getattr(diffusers, name, None) if name.isidentifier() else None
    if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, diffusers.SchedulerMixin)):
        raise InputError(f"the base's scheduler_config.json names '{name}', not a diffusers scheduler: restore the "
                         "base model folder")
    return scheduler_class.from_config(base.scheduler_config)


def save_pipeline(base: BaseModel, out: Path, provenance: dict) -> Path:
    """Write the modules as the family's pipeline folder (+ cxrdist.json) via a temporary folder."""
    pipe = assemble_pipeline(base, _saved_scheduler(base))
    created = _make_parents(out)
    tmp = temp_name(out)
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "cxrdist.json").write_text(json.dumps(provenance, indent=2, default=str))
        os.rename(tmp, out)  # an empty --out (checked above) is replaced in the same step
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in created:  # deepest first, and only while still empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        if isinstance(exc, OSError):
            raise InputError(_write_problem(out, exc)) from None
        raise
    return out


def _make_parents(out: Path) -> list[Path]:
    """Create the missing folders above `out`; those created, deepest first (removed again on failure)."""
    missing, parent = [], out.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(_write_problem(out, exc)) from None
    return missing


def _write_problem(out: Path, exc: OSError) -> str:
    if is_disk_full(exc):
        return f"disk full while writing the merged pipeline {out}: free space and rerun (nothing was left behind)"
    if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
        return f"--out {out} was filled while the merge ran: choose a new folder (nothing was written)"
    return f"cannot write the merged pipeline {out} ({exc.strerror or exc}): choose a writable --out"


def merge_adapter(model_path: str | Path, out: str | Path, base_override: str | None = None) -> Path:
    """Load base + adapter into fresh modules, fuse, save a standalone pipeline folder at `out`."""
    out = Path(out)
    _check_out(out)
    source = Path(model_path)
    base, meta = load_for_sampling(source, base_override)
    if not getattr(base.unet, "peft_config", None):
        raise InputError(f"{model_path} holds no LoRA adapter (it is a full pipeline already): nothing to merge")
    fused = fuse_lora(base.unet) + fuse_lora(base.text_encoder)
    log.info("fused %d LoRA layers into the base weights", fused)
    weights = source if source.is_file() else source / WEIGHTS_NAME
    meta = meta or {}
    provenance = {
        "format": MERGED_FORMAT,
        "merged_from": str(model_path),
        "merged_from_sha256": sha256_file(weights) if weights.is_file() else None,
        "base": meta.get("base", {"source": base.source, "fingerprint": base.fingerprint}),
        "adapter": meta.get("adapter"),
        "prompt_template": meta.get("prompt_template", "{report}"),
        "text_instruction": meta.get("text_instruction"),
        "config": meta.get("config", {}),
        "software": f"cxrdist {__version__}",
    }
    return save_pipeline(base, out, provenance)
