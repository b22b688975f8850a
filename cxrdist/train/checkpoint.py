"""Training checkpoints (accelerate `save_state`, trained weights only) and best-model exports.

Layout inside a run folder:
    checkpoints/step_00000120/   accelerate state: adapter.safetensors, optimizer, scheduler, RNG;
                                 trainer_state.json, config.yaml, ema.safetensors (train.ema_decay > 0: the
                                 adapter EMA, cxrdist.train.ema); `cxrdist_checkpoint.json` is written last, so
                                 a folder without it (a process killed mid-save) is never resumed from
    best_model_fold3_epoch7/     the best adapter so far: diffusers-format LoRA + cxrdist.json + metrics.json
                                 + README.md (model card); loadable by `cxrdist sample --model-path`

`save_state` runs on EVERY rank (DeepSpeed has a barrier inside); the hooks keep only LoRA tensors under DDP,
and DeepSpeed checkpoints leave the frozen base out (`exclude_frozen_parameters`).

Trust: nothing in a checkpoint may run code when it is resumed. The trainer's own state is JSON (not an
accelerate "custom checkpoint", which the full unpickler reads); accelerate reads its optimizer,
scheduler, scaler and RNG files with weights_only=True; DeepSpeed's engine is made to (distributed.load_weights_only).
Before any of them opens a file, every file of the checkpoint is checked to be a regular file (opening a FIFO
blocks forever, a device reads without end) and every pickle-format file is read once with the weights-only
unpickler and an allow-list, so a file that holds anything else is refused with one line naming it.

Ownership: one run at a time trains into a run folder. The main process holds `.cxrdist-train.lock` there
(cxrdist.locks) from before anything is written until the run ends; another training or `--resume` into the
folder is refused in one line by every rank, and so never rotates away a checkpoint this run is writing or
reading. A checkpoint that disappears while it is read all the same (a run on a host the lock cannot check, a
user's `rm`) and a disk that fills up while one is written are one-line errors too; a failed save leaves the
previous checkpoints as they were and no folder that looks complete.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from cxrdist.config import Config, config_from_dict, diff_configs, load_yaml
from cxrdist.errors import ConfigError, CxrdistError, InputError, report_now
from cxrdist.fileio import find_special_file, is_disk_full, write_json_atomic
from cxrdist.locks import folder_lock
from cxrdist.models.diffusion import LoraDiffusionModel
from cxrdist.models.lora import CHECKPOINT_ADAPTER, CHECKPOINT_CONFIG, CHECKPOINT_MARKER
from cxrdist.models.trained import CHECKPOINT_FULL, load_trained_state
from cxrdist.train import distributed
from cxrdist.train.ranks import all_ranks, main_process_only

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
TRAIN_LOCK = ".cxrdist-train.lock"
PICKLE_SUFFIXES = (".bin", ".pkl", ".pt", ".pth")
# Keys that may change between a run and its resumption: where things go and how verbose, not what is trained --
# and train.time_budget, since a requeued job may be given another allocation (the budget used so far carries over).
RESUME_MAY_DIFFER = ("train.output_dir", "train.run_name", "train.log_every", "train.report_to", "train.export_zip",
                     "train.collective_timeout_s", "train.shared_folder_wait_s", "train.preempt_signals",
                     "train.time_budget", "eval.prompts_file", "data.num_workers", "eval.metrics", "eval.features",
                     "eval.memorization_pool", "sample", "pretrain")


def _unwrap(model):
    """The LoraDiffusionModel inside DDP / a DeepSpeed engine / torch.compile, or None."""
    while True:
        if isinstance(model, LoraDiffusionModel):
            return model
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return None
        model = inner


class Checkpointer:
    """When to save, save / rotate, resolve and load the training state of one run folder.

    It takes the whole config: every checkpoint carries it, and a resume is refused when it differs."""

    def __init__(self, accelerator, run_dir: Path, cfg: Config):
        self.accelerator, self.cfg = accelerator, cfg
        self.every, self.keep_last = cfg.train.checkpoint_every, cfg.train.keep_last
        self.dir = Path(run_dir) / CHECKPOINTS
        accelerator.register_save_state_pre_hook(self._save_hook)
        accelerator.register_load_state_pre_hook(self._load_hook)

    # -- accelerate hooks ------------------------------------------------------------------------------
    # Under DDP / one process `models` holds the wrapped joint module and `weights` its full state dict,
    # which accelerate would write (the whole frozen base): the hook writes the adapter tensors instead and
    # drops that entry. Under DeepSpeed `models` holds the ENGINE, `weights` is empty (the engine already
    # saved itself, without frozen parameters: see distributed.checkpoint_kwargs) and the load hook gets no models
    # (the engine loads itself); adapter.safetensors is still written so every checkpoint is readable alone. A full
    # fine-tune (train.method=full) writes the denoiser as trained.safetensors without DeepSpeed, and nothing more
    # under it: the engine's files hold each rank's part, and gathering the whole model into one file is what
    # sharding avoids.
    @property
    def _trained_file(self) -> str:
        return CHECKPOINT_FULL if self.cfg.train.method == "full" else CHECKPOINT_ADAPTER

    def _save_hook(self, models, weights, output_dir) -> None:
        from safetensors.torch import save_file

        for i in reversed(range(len(models))):
            if _unwrap(models[i]) is None:
                continue
            if len(weights) == len(models):
                weights.pop(i)  # accelerate would otherwise write the whole frozen base
            if self.cfg.train.method == "full" and distributed.deepspeed_plugin(self.accelerator) is not None:
                continue
            tensors = distributed.trained_named_state(self.accelerator, models[i])  # collective under DeepSpeed
            if self.accelerator.is_main_process:
                save_file(tensors, os.path.join(output_dir, self._trained_file))

    def _load_hook(self, models, input_dir) -> None:
        from safetensors.torch import load_file

        for i in reversed(range(len(models))):
            inner = _unwrap(models[i])
            if inner is None:
                continue
            load_trained_state(inner, load_file(os.path.join(input_dir, self._trained_file)), input_dir)
            models.pop(i)

    # -- save / rotate ---------------------------------------------------------------------------------
    def due(self, step: int, epoch_end: bool, *, last_step: bool = False) -> bool:
        """Every `train.checkpoint_every` optimizer steps, or at each epoch's end when that is 0; and always at the
        run's last step (`last_step`: the step budget is reached or early stopping ends the run)."""
        return last_step or (step % self.every == 0 if self.every else epoch_end)

    @all_ranks
    def save(self, step: int, info: dict[str, Any], trainer_state: dict[str, Any],
             writers: Sequence[Callable[[Path], Any]] = ()) -> Path:
        """Save on every rank; the main process then writes the config, the trainer state, each of `writers`
        (a function of the folder writing more trainer files, e.g. the adapter EMA) and, last, the marker.

        A full disk is one line naming the folder and the space a checkpoint needs; the unfinished folder is
        removed (it never had a marker) and the earlier checkpoints are left as they were: rotation only runs
        after a checkpoint is complete."""
        path = self.path(step)
        try:
            return self._save(path, step, info, trainer_state, writers)
        except Exception as exc:
            if not is_disk_full(exc):
                raise
            message = self._disk_full_message(path, exc)
            if self.accelerator.is_main_process:
                shutil.rmtree(path, ignore_errors=True)
            raise report_now(InputError(message)) from None

    def path(self, step: int) -> Path:
        """The folder of the checkpoint of optimizer step `step`."""
        return self.dir / f"step_{step:08d}"

    def _disk_full_message(self, path: Path, exc: BaseException) -> str:
        done = [p for p in self.complete() if p != path]
        need = folder_bytes(done[-1]) if done else folder_bytes(path)
        free = shutil.disk_usage(self.dir if self.dir.is_dir() else self.dir.parent).free
        last = f"the last complete checkpoint is {done[-1].name}" if done else "no checkpoint is complete yet"
        return (f"disk full while writing checkpoint {path} ({_first_line(exc)}): {self.dir} has {_size(free)} free "
                f"and a checkpoint of this run needs {'' if done else 'more than '}{_size(need)}; {last}: free space "
                f"(train.keep_last={self.keep_last} checkpoints are kept) and rerun with --resume latest")

    def _save(self, path: Path, step: int, info: dict[str, Any], trainer_state: dict[str, Any],
              writers: Sequence[Callable[[Path], Any]]) -> Path:
        if self.accelerator.is_main_process and path.exists():
            shutil.rmtree(path)  # an unfinished save of this step, or a replay after resuming further back
        self.accelerator.wait_for_everyone()
        save_kwargs, _ = distributed.checkpoint_kwargs(self.accelerator)
        self.accelerator.save_state(str(path), **save_kwargs)  # every rank: DeepSpeed saves collectively
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            with main_process_only():
                self.cfg.save(path / CHECKPOINT_CONFIG)
                write_json_atomic(path / TRAINER_STATE, trainer_state)
                for write in writers:
                    write(path)
                write_json_atomic(path / CHECKPOINT_MARKER, {"step": step, **info})
                self._rotate()
        self.accelerator.wait_for_everyone()
        return path

    def _rotate(self) -> None:
        complete = self.complete()
        for old in complete[: max(0, len(complete) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)

    def complete(self) -> list[Path]:
        return complete_checkpoints(self.dir.parent)

    # -- resume ----------------------------------------------------------------------------------------
    def resolve(self, resume: str) -> Path:
        if resume == "latest":
            found = self.complete()
            if not found:
                raise InputError(f"--resume latest: no complete checkpoint under {self.dir}: "
                                 "start without --resume (or point --output-dir at the run to continue)")
            return found[-1]
        path = Path(resume)
        if not (path / CHECKPOINT_MARKER).is_file():
            raise InputError(f"--resume {resume}: not a complete cxrdist checkpoint (no {CHECKPOINT_MARKER}): "
                             f"give 'latest' or a folder under {self.dir}")
        return path

    def load(self, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        """(marker info, trainer state) of a checkpoint whose accelerate/DeepSpeed state is now loaded. Call it
        inside `reading(path)`, with whatever else the caller reads from the checkpoint."""
        check_resumable(path, self.cfg)
        trainer_state = read_trainer_state(path)
        check_pickles(path)
        _, load_kwargs = distributed.checkpoint_kwargs(self.accelerator)
        self.accelerator.load_state(str(path), **load_kwargs)
        return json.loads((path / CHECKPOINT_MARKER).read_text()), trainer_state


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """Turn a checkpoint that vanishes while it is read -- whatever error the reading library raises then, or
    none at all (DeepSpeed's engine only warns when its files are missing) -- into one line; and a file missing
    from a checkpoint that is still there into another."""
    path = Path(path)
    try:
        yield
    except Exception as exc:
        if _being_removed(path):
            raise report_now(InputError(_removed_message(path))) from None
        if isinstance(exc, FileNotFoundError):
            missing = Path(exc.filename).name if exc.filename else "a file"
            raise report_now(InputError(f"cannot resume from {path}: {missing} is missing from it: resume from "
                                        "another checkpoint")) from None
        raise
    if not (path / CHECKPOINT_MARKER).is_file():
        raise report_now(InputError(_removed_message(path)))


def _being_removed(path: Path, settle_s: float = 0.5) -> bool:
    """Whether the checkpoint lost its marker, now or within `settle_s`: a folder being removed loses its files in
    directory order, so the file that failed a read may go a moment before the marker does."""
    import time

    deadline = time.monotonic() + settle_s
    while (path / CHECKPOINT_MARKER).is_file():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _removed_message(path: Path) -> str:
    return (f"checkpoint {path} was removed while being read (another run rotates checkpoints in this folder?): "
            "resume from a checkpoint no run removes -- wait for that run to end, or copy the checkpoint elsewhere "
            "and give its path to --resume")


@contextlib.contextmanager
def run_folder_lock(accelerator, run_dir: Path, then: Callable[[], Any] | None = None) -> Iterator[Any]:
    """Own the run folder for as long as the body runs: the main process holds its lock (cxrdist.locks) and runs
    `then` -- decisions about what the folder holds, which only make sense once no other run can change it; every
    rank gets its result (yielded) or its refusal. Refused, every rank raises the same one-line error at once: no
    rank is left waiting in a collective for a main process that has gone. Collective; call it before anything is
    written into the folder."""
    from accelerate.utils import broadcast_object_list

    held = contextlib.ExitStack()
    outcome: tuple[str | None, Any] = (None, None)  # (refusal, what `then` returned)
    if accelerator.is_main_process:
        try:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            held.enter_context(folder_lock(run_dir, TRAIN_LOCK, busy="being trained into", wait="that run",
                                           elsewhere="--output-dir", error=InputError))
            outcome = (None, then() if then is not None else None)
        except CxrdistError as exc:
            outcome = (str(exc), None)
        except OSError as exc:
            outcome = (f"cannot use the output folder {run_dir} ({exc.strerror}): choose another --output-dir", None)
    if accelerator.num_processes > 1:
        outcome = broadcast_object_list([outcome])[0]
    refusal, decided = outcome
    if refusal:
        held.close()
        raise report_now(InputError(refusal))
    with held:
        yield decided


def decide_resume(run_dir: Path, resume: str | None, finished_marker: str) -> str | None:
    """`--resume` as the run will do it: "auto" becomes "latest" when the folder has a complete checkpoint and
    None (a new run) otherwise. A new run must not train into a folder that holds another run's checkpoints or
    results (`finished_marker`, a file a finished run leaves): it would mix with, then rotate them. Unfinished
    checkpoint folders alone (a run killed during its first save) hold nothing to continue from -- `--resume
    latest` refuses them -- so a new run may start there (its saves replace them)."""
    if resume == "auto":
        resume = "latest" if complete_checkpoints(run_dir) else None
    if resume is None and (complete_checkpoints(run_dir) or (Path(run_dir) / finished_marker).exists()):
        raise InputError(f"{run_dir} already holds a training run: continue it with --resume latest, "
                         "or choose another --output-dir / train.run_name")
    return resume


def folder_bytes(folder: Path) -> int:
    total = 0
    for file in Path(folder).rglob("*"):
        with contextlib.suppress(OSError):
            if file.is_file():
                total += file.stat().st_size
    return total


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__


def check_regular_files(path: Path) -> None:
    """Refuse a checkpoint holding a FIFO, a device or a socket, before anything opens one (a FIFO blocks
    the reader forever, a device reads without end): cxrdist.fileio.find_special_file."""
    if (found := find_special_file(path)) is not None:
        file, kind = found
        raise InputError(f"cannot resume from {path}: {file.relative_to(path)} is {kind}, not a regular file; "
                         "it was refused unopened: resume from another checkpoint")


# How long a rank waits for rank 0's probe file: NFS-style filesystems may cache a directory's listing for
# some seconds, so a file just created on another node can take that long to appear.
SHARED_PROBE_WAIT_S = 30.0
SHARED_PROBE = ".rank0_probe"


def check_shared_folder(accelerator, folder: Path, wait_s: float = SHARED_PROBE_WAIT_S) -> None:
    """Every rank must see what rank 0 writes into the run folder: only rank 0 writes checkpoints and exports,
    but every rank reads them back (`--resume`, the best model before the test split). Collective."""
    import time

    if accelerator.num_processes < 2:
        return
    probe = Path(folder) / SHARED_PROBE
    if accelerator.is_main_process:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text("written by rank 0\n")
    accelerator.wait_for_everyone()
    deadline = time.monotonic() + wait_s
    while not probe.is_file() and time.monotonic() < deadline:
        time.sleep(0.5)
    seen = accelerator.gather(torch.tensor([1.0 if probe.is_file() else 0.0], device=accelerator.device))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        probe.unlink(missing_ok=True)
    blind = [rank for rank, value in enumerate(seen.tolist()) if value == 0]
    if blind:
        from cxrdist.errors import report_now

        raise report_now(InputError(
            f"output folder {folder} is not shared by all ranks: rank(s) {blind} do not see files that rank 0 writes "
            "there, yet every rank reads checkpoints back: put --output-dir on a filesystem that every node mounts"))


def read_trainer_state(path: Path) -> dict[str, Any]:
    state_file = Path(path) / TRAINER_STATE
    if not state_file.is_file():
        raise InputError(f"cannot resume from {path}: it has no {TRAINER_STATE} (checkpoints written before it "
                         "keep the trainer state as a pickle, which is never loaded): start a new run")
    try:
        state = json.loads(state_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot resume from {path}: {TRAINER_STATE} is unreadable ({exc}): resume from another "
                         "checkpoint") from None
    if not isinstance(state, dict):
        raise InputError(f"cannot resume from {path}: {TRAINER_STATE} does not hold a JSON object")
    return state


def _safe_globals() -> list:
    from accelerate.utils.other import \
        TORCH_SAFE_GLOBALS  # what accelerate's own RNG files hold (numpy arrays)

    allowed = list(TORCH_SAFE_GLOBALS)
    try:
        allowed += distributed.deepspeed_safe_globals()
    except ImportError:  # no DeepSpeed installed: its classes cannot be in a checkpoint we may load
        pass
    return allowed


def check_pickles(path: Path) -> None:
    """Read every pickle-format file of a checkpoint with the weights-only unpickler (tensors, plain data and an
    allow-list of accelerate / DeepSpeed classes): a file holding anything else -- code to run -- or a damaged
    one is refused with one line naming it, before accelerate or DeepSpeed opens it."""
    allowed = _safe_globals()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file() and p.suffix in PICKLE_SUFFIXES):
        if file.name.startswith("custom_checkpoint_"):
            continue  # accelerate loads these only for registered objects; cxrdist registers none
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError, RuntimeError (bad zip), EOFError, ...: all mean "refuse"
            reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise InputError(f"cannot resume from {path}: {file.relative_to(path)} holds something other than "
                             f"tensors and plain data, or is damaged ({reason}); it was refused unopened: resume "
                             "from another checkpoint, or start a new run") from None


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's finished checkpoints (those with a marker), oldest first."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and (p / CHECKPOINT_MARKER).is_file())


def check_resumable(path: Path, cfg: Config, fold: int | None = None) -> None:
    """Refuse a checkpoint holding special files, or written under another config (naming every key that
    differs) or another fold."""
    check_regular_files(path)
    saved = config_from_dict(load_yaml(path / CHECKPOINT_CONFIG))
    diffs = [d for d in diff_configs(saved.with_validation_sampling_resolved(), cfg.with_validation_sampling_resolved())
             if not d.startswith(RESUME_MAY_DIFFER)]
    if diffs:
        raise ConfigError(f"cannot resume from {path}: it was trained with a different config ({'; '.join(diffs)}): "
                          "resume with the same config, or start a new run with another --output-dir")
    marker = json.loads((path / CHECKPOINT_MARKER).read_text())
    if fold is not None and marker.get("fold") != fold:
        raise ConfigError(f"cannot resume from {path}: it is fold {marker.get('fold')}, not fold {fold}")
