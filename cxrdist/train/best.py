"""The best model of a fold: `BestModel` judges each validation with the early stopper and exports a new best;
`export_best` writes the adapter as `cxrdist sample` loads it, or under train.method=full the whole pipeline
(cxrdist.models.pipeline_folder), plus metrics and a short model card.

Exporting only copies trained tensors (never merges or unloads), so the live model is untouched. The
previous best of the fold is replaced only after the new one is completely written.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable

from cxrdist import __version__
from cxrdist.fileio import write_json_atomic
from cxrdist.models.families import family_of
from cxrdist.models.lora import (METADATA_NAME, WEIGHTS_NAME, adapter_metadata, adapter_state_dicts, save_adapter,
                                 split_prefixed, tensors_digest)
from cxrdist.models.pipeline_folder import read_denoiser, read_text_encoder, save_with_trained
from cxrdist.models.trained import FULL_FORMAT, is_full, trained_named_parameters
from cxrdist.train.early_stop import EarlyStopper
from cxrdist.train.ranks import all_ranks, main_process_only

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
CARD_FILE = "README.md"


def best_name(fold: int, epoch: int) -> str:
    return f"best_model_fold{fold}_epoch{epoch}"


class BestModel:
    """The best model so far of one fold: the early stopper that judges each validation (eval.metric, mode,
    patience), the export of each new best (written by the main process) and its path. Its state travels in the
    trainer's checkpoint state (`state_dict` / `load_state_dict`: the keys `stopper`, `best_path`,
    `stopped_early`)."""

    def __init__(self, accelerator, cfg, run_dir: Path, fold: int, base, spec: dict):
        self.accelerator, self.cfg, self.run_dir, self.fold = accelerator, cfg, Path(run_dir), fold
        self.base, self.spec = base, spec
        self.stopper = EarlyStopper(cfg.eval.metric, cfg.eval.mode, cfg.eval.patience, cfg.eval.min_delta)
        self.path: Path | None = None
        self.stopped = False  # patience ran out: the run ends at this step

    @all_ranks
    def consider_all_ranks(self, metrics: dict[str, float], *, step: int, epoch: int,
                           weights_all_ranks: Callable[[], Any], module, ema: dict[str, Any] | None) -> bool:
        """Record one validation; on a new best, export it and return True. Every rank calls this with the same
        (reduced) metrics, so all take the same decision; `weights_all_ranks()` (what the export writes, on the
        main process; a collective under DeepSpeed) runs on every rank, then only the main process writes."""
        metric = self.cfg.eval.metric
        improved = self.stopper.update(metrics[metric], step=step, epoch=epoch)
        if improved:
            state_dicts = weights_all_ranks()
            if self.accelerator.is_main_process:
                with main_process_only():
                    path = export_best(module, self.base, self.spec, self.cfg, self.run_dir, fold=self.fold,
                                       epoch=epoch, step=step, metrics=metrics, previous=self.path,
                                       state_dicts=state_dicts, ema=ema)
                log.info("step %d: %s %.5g is the best so far -> %s", step, metric, metrics[metric], path)
            self.path = self.run_dir / best_name(self.fold, epoch)
        self.accelerator.wait_for_everyone()
        if self.stopper.should_stop:
            log.info("early stopping at step %d (epoch %d): no %s improvement in %d evaluations; best %.5g at epoch "
                     "%d", step, epoch, metric, self.stopper.patience, self.stopper.best, self.stopper.best_epoch)
            self.stopped = True
        return improved

    def state_dict(self) -> dict[str, Any]:
        return {"stopper": self.stopper.state_dict(), "best_path": str(self.path) if self.path else "",
                "stopped_early": self.stopped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stopper.load_state_dict(state.get("stopper") or {})
        self.path = Path(state["best_path"]) if state.get("best_path") else None
        self.stopped = bool(state.get("stopped_early", False))


def export_best(model, base, spec: dict, cfg, run_dir: Path, *, fold: int, epoch: int, step: int,
                metrics: dict[str, float], previous: Path | None, state_dicts: tuple | None = None,
                ema: dict[str, Any] | None = None) -> Path:
    """Write `run_dir/best_model_fold{k}_epoch{e}/` (main process only) and remove the previous best.

    `state_dicts` = (unet_sd, text_sd) from `cxrdist.train.distributed.lora_state_dicts`, which every rank must call
    under DeepSpeed (ZeRO-3 holds only partitions in the module); without it they are read from `model`. Under
    train.method=full (`spec`), it is the denoiser's fp32 tensors by full name (`unet.<name>`, from
    `distributed.trained_named_state` or the EMA) and the export is a pipeline folder.
    `ema` (`TrainedEMA.info()`) says that `state_dicts` are the adapter EMA's: cxrdist.json's `training`,
    metrics.json and the model card then record `weights: ema` with its decay.
    """
    run_dir = Path(run_dir)
    final = run_dir / best_name(fold, epoch)
    staging = run_dir / f".{final.name}.staging"
    if staging.exists():
        shutil.rmtree(staging)
    info = {"fold": fold, "epoch": epoch, "step": step, "metrics": metrics, "early_stopping_metric": cfg.eval.metric}
    if ema is not None:
        info.update(weights="ema", ema=dict(ema))
    meta = adapter_metadata(base, spec, cfg.data.prompt_template, cfg.to_dict(), training=info)
    if is_full(spec):
        _save_full(staging, base, state_dicts, meta)
    else:
        if state_dicts is None:
            state_dicts = adapter_state_dicts(model.unet, model.text_encoder if model.train_text_encoder else None)
        unet_sd, text_sd = state_dicts
        save_adapter(staging, unet_sd, text_sd if model.train_text_encoder else None, meta)
    write_json_atomic(staging / METRICS_FILE, info)
    (staging / CARD_FILE).write_text(model_card(cfg, base, info))
    for old in {previous, final} - {None}:
        # A run resumed from another run folder's checkpoint carries that run's best path in its state: that
        # export belongs to the other run and is never removed from here.
        if old.exists() and old.parent.resolve() == run_dir.resolve():
            shutil.rmtree(old)
    staging.rename(final)
    return final


def _save_full(folder: Path, base, trained: dict, meta: dict) -> None:
    """The base's pipeline with the trained denoiser (and text encoder), and cxrdist.json (what `cxrdist sample`
    reads: the template; the base it came from and how it was trained)."""
    parts: dict[str, dict] = {"unet": {}, "text_encoder": {}}
    for name, tensor in trained.items():
        module, _, inner = name.partition(".")
        if module not in parts:
            raise ValueError(f"a full fine-tune's export takes unet.* and text_encoder.* tensors, not '{name}'")
        parts[module][inner] = tensor
    save_with_trained(base, parts["unet"], folder, text_encoder=parts["text_encoder"] or None)
    meta = {"format": FULL_FORMAT, **{k: v for k, v in meta.items() if k != "adapter"}, "trained": meta["adapter"],
            "software": f"cxrdist {__version__}"}
    (folder / METADATA_NAME).write_text(json.dumps(meta, indent=2, default=str))


def model_card(cfg, base, info: dict[str, Any]) -> str:
    metrics = "\n".join(f"| {k} | {v:.6g} |" for k, v in info["metrics"].items())
    what = "full fine-tune (a diffusers pipeline folder)" if cfg.train.method == "full" else "LoRA adapter"
    return f"""# cxrdist {what} — fold {info['fold']}, epoch {info['epoch']} (step {info['step']})

Text-to-chest-X-ray {what} of base `{base.source}` ({base.image_size} px, {base.channels} channel(s)),
trained on shards `{cfg.data.shards}` with fold {info['fold']} held out for validation. Selected as the best
of its run by `{info['early_stopping_metric']}` on the validation fold.{ema_line(info)}

| validation metric | value |
|---|---|
{metrics}

Prompt template (applied once, at training and sampling): `{cfg.data.prompt_template}`.

    cxrdist sample --model-path <this folder> --description "Mild cardiomegaly. No effusion."
{diffusers_lines(base, cfg)}
Images generated with this adapter are synthetic: they are not radiographs of a patient and must not be
used for diagnosis. Validation metrics compare generated images with real ones for the same reports and
say nothing about clinical correctness.
"""


def diffusers_lines(base, cfg=None) -> str:
    """How plain diffusers loads this export: a full fine-tune as any pipeline; an adapter, for the families whose
    loading differs from SD's `load_lora_weights`."""
    instruction = ""
    if base.family.name == "sana":  # SanaPipeline applies its own default instruction unless told otherwise
        instruction = (" Sample with `complex_human_instruction=None`: it was trained on the report alone."
                       if base.instruction is None else
                       " Sample with the pipeline's `complex_human_instruction` (cxrdist.json's `text_instruction`, "
                       "split into lines): it was trained after that instruction.")
    if cfg is not None and cfg.train.method == "full":
        return (f"\nIn plain diffusers: `{base.family.pipeline}.from_pretrained(<this folder>)` (or "
                f"`DiffusionPipeline.from_pretrained`).{instruction}\n")
    if base.family.name == "sana":
        return ("\nIn plain diffusers: `SanaPipeline.from_pretrained(<base>)`, then `pipe.load_lora_weights(<this "
                f"folder>)`.{instruction}\n")
    if base.family.name == "pixart-sigma":
        return ("\nIn plain diffusers (PixArtSigmaPipeline has no LoRA loader): `pipe.transformer = "
                "peft.PeftModel.from_pretrained(pipe.transformer, <this folder>/peft)`.\n")
    return ""


def ema_line(info: dict[str, Any]) -> str:
    """The model card's sentence about EMA weights ("" for the raw adapter)."""
    ema = info.get("ema")
    if info.get("weights") != "ema" or not ema:
        return ""
    return (f"\nThe weights are the exponential moving average of the adapter (decay {ema['decay']:g}, "
            f"{ema['updates']} updates), which validation also used.")


def weights_digest(folder: Path) -> str:
    """sha256 of the exported trained tensors (names and values; the file header's metadata order is not stable):
    the adapter, or a full fine-tune's denoiser."""
    from safetensors.torch import load_file

    if not (Path(folder) / WEIGHTS_NAME).is_file():
        return tensors_digest(_full_state(folder))
    return tensors_digest(load_file(str(Path(folder) / WEIGHTS_NAME)))


def load_exported(model, folder: Path) -> None:
    """Copy an export's trained weights into the live model (exactly, in place): the adapter's, or a full
    fine-tune's whole denoiser."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    if not (Path(folder) / WEIGHTS_NAME).is_file():
        _load_full(model, folder)
        return
    unet_sd, text_sd = split_prefixed(load_file(str(Path(folder) / WEIGHTS_NAME)), model.family.lora_prefix)
    for part, module in ((unet_sd, model.unet), (text_sd, model.text_encoder)):
        if part:
            result = set_peft_model_state_dict(module, part)
            unexpected = getattr(result, "unexpected_keys", [])
            if unexpected:
                raise ValueError(f"{folder}: adapter keys {unexpected[:3]} do not fit the live model")


def _full_state(folder: Path) -> dict:
    """A full fine-tune's export by the live model's names: unet.* (and text_encoder.* when it was trained)."""
    family = family_of(str(folder))
    state = {f"unet.{name}": t for name, t in read_denoiser(folder, family).items()}
    meta = json.loads((Path(folder) / METADATA_NAME).read_text())
    if (meta.get("trained") or {}).get("text_encoder"):
        state.update({f"text_encoder.{name}": t for name, t in read_text_encoder(folder).items()})
    return state


def _load_full(model, folder: Path) -> None:
    """A full fine-tune's exported weights into the live model's trained parameters (every one, exactly; a buffer
    the export also holds is the base's own, which the live model has)."""
    import torch

    state = _full_state(folder)
    params = dict(trained_named_parameters(model))
    missing = sorted(set(params) - set(state))
    if missing:
        raise ValueError(f"{folder}: trained tensor '{missing[0]}' is missing from the export")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name].to(param.device, param.dtype))
