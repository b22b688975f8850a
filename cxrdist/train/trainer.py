"""The trainer: one fold, from a fresh adapter (or the pristine base's denoiser, under train.method=full), to the
best checkpoint and its test metrics.

Reproducibility contract: the data order is a pure function of (seed, epoch) and the noise, timestep and
caption dropout of a sample are drawn from a generator seeded with (seed, sample key, micro-step) -- not
with its rank or its neighbours in the batch. The saved state is therefore just the optimizer step (plus
optimizer, scheduler, adapter, adapter-EMA and early-stopping state): a run killed at any point and resumed
from its last checkpoint ends with the same adapter (and EMA) as a run that was never interrupted. With
data.rank_split=samples, N ranks x batch b also train like one process with batch N*b (same samples per step, up
to the order of float reductions); the default, "shards", gives each rank its own 1/N of the shards to read.

Scale-out (DDP, DeepSpeed ZeRO-2/3; see cxrdist.train.distributed): every collective -- checkpoint saves, adapter
exports, the rank-agreement check, validation forward passes -- runs on every rank; only rank 0 writes. Methods
that every rank must call at the same point end in `_all_ranks` (or are `train_step` / `fit`) and carry
`cxrdist.train.ranks.all_ranks`; what only the main process does runs inside `ranks.main_process_only()`, where
a collective raises at once instead of hanging the other ranks.

The loop (`_fit`) asks components and decides nothing itself: the optimizer-step policy (OptimizerStep: stepped,
or skipped and why), each component's cadence (`due(step, ..., last_step=...)`: the logger, the validator, the
checkpointer), the best model (BestModel: early stopping, export, best path) and the time budget. TrainState holds
the counters and, at each save, the components' state.

A run owns its run folder (cxrdist.train.checkpoint.run_folder_lock) from before its first write until close(),
and a signal of train.preempt_signals stops it at the next optimizer-step boundary with a checkpoint
(cxrdist.train.preemption).
"""
from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from cxrdist.config import Config, parse_duration
from cxrdist.data.latents import check_cached_latents, latents_info
from cxrdist.errors import ConfigError, CxrdistError, DataError, report_now
from cxrdist.fileio import write_json_atomic
from cxrdist.models.diffusion import (BatchEncoder, DiffusionObjective, FlowSettings, LoraDiffusionModel,
                                      timestep_weights, to_device)
from cxrdist.models.loading import load_base
from cxrdist.models.lora import count_parameters, tensors_digest
from cxrdist.models.text import instruction_for
from cxrdist.models.trained import attach_training, is_full, trained_parameters, trains_text_encoder
from cxrdist.progress import progress_meter
from cxrdist.sampling.archive import write_zip
from cxrdist.train import checkpoint, distributed, faults
from cxrdist.train.accel import build_accelerator, describe, weight_dtype
from cxrdist.train.best import BestModel, load_exported, weights_digest
from cxrdist.train.checkpoint import Checkpointer, check_shared_folder, decide_resume, run_folder_lock
from cxrdist.train.ema import TrainedEMA
from cxrdist.train.optim import GROUP_NAMES, build_lr_scheduler, build_optimizer
from cxrdist.train.preemption import StopRequested, StopSignals, announce, signal_name
from cxrdist.train.ranks import all_ranks, main_process_only
from cxrdist.train.step_policy import OptimizerStep, StepOutcome
from cxrdist.train.text_prefill import distinct_prompts, prefill_text_cache
from cxrdist.train.time_budget import DecayDecision, TimeBudget
from cxrdist.train.model_setup import configure_model
from cxrdist.train.tracking import MetricsLogger, Window, memory_scalars
from cxrdist.train.validation import Evaluator

log = logging.getLogger(__name__)

TEST_METRICS = "test_metrics.json"


class PeerLostError(CxrdistError):
    """A collective failed: another rank died or stopped answering within train.collective_timeout_s."""


class NonFiniteLossError(CxrdistError):
    """The training loss was inf or NaN on some rank and train.nonfinite_loss=stop."""


def draw_seed(seed: int, key: str, micro_step: int) -> int:
    """Seed of one training sample's draws (noise, timestep, caption dropout) at one micro-step: independent of
    rank and batching. (Validation noise has its own, step-free seed: validation.validation_noise_seed.)"""
    digest = int(hashlib.sha256(str(key).encode()).hexdigest()[:12], 16)
    return (seed * 1_000_003 + digest + micro_step * 7_919) % (2**62)


@dataclass
class TrainState:
    """Everything beyond accelerate's own state that a resumed run needs (same on every rank); saved as JSON
    (checkpoint.TRAINER_STATE), never as a pickle. The counters move only through the methods below; the
    components' own state (best model, time budget) is copied in at each save (`snapshot`)."""

    step: int = 0  # optimizer steps taken (a step skipped for overflow is not one)
    micro_step: int = 0  # micro-batches consumed: the data position (the loss of a skipped step was still read)
    skipped_steps: int = 0  # optimizer steps skipped: gradient overflow (fp16 loss scale, DeepSpeed) or inf/NaN
    nonfinite_losses: int = 0  # micro-batches whose loss was inf/NaN on some rank (train.nonfinite_loss=skip)
    stopper: dict = field(default_factory=dict)  # BestModel.state_dict()
    best_path: str = ""
    stopped_early: bool = False
    last_eval_step: int = -1
    time_budget: dict = field(default_factory=dict)  # TimeBudget.state_dict(): the budget used, the decay decided

    def state_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def snapshot(self, **component_state: Any) -> None:
        """Copy the components' state in before a save (keys of this class only)."""
        unknown = set(component_state) - set(self.__dict__)
        if unknown:
            raise KeyError(f"TrainState has no field {sorted(unknown)[0]}")
        self.__dict__.update(component_state)

    # -- the data position: micro-batches consumed, whatever happened to their optimizer steps -----------------
    def consumed_micro_batch(self) -> None:
        self.micro_step += 1

    def took_step(self) -> None:
        self.step += 1

    def skipped_step(self) -> None:
        self.skipped_steps += 1

    def counted_nonfinite_loss(self) -> None:
        self.nonfinite_losses += 1

    def position(self, micro_per_epoch: int) -> tuple[int, int]:
        """(0-based epoch of the next micro-batch, micro-batches of it already consumed)."""
        return divmod(self.micro_step, micro_per_epoch)

    def epoch(self, micro_per_epoch: int) -> int:
        """1-based epoch of the latest micro-batch (of the latest optimizer step, when none was skipped)."""
        return (max(self.micro_step, 1) - 1) // micro_per_epoch + 1

    def epochs_done_if_ended(self, micro_per_epoch: int) -> int | None:
        """Epochs completed, when the latest micro-batch ended one; None within an epoch."""
        done, within = self.position(micro_per_epoch)
        return done if within == 0 else None


@dataclass
class FoldResult:
    fold: int
    run_dir: Path
    steps: int
    best_path: Optional[Path]
    best_value: Optional[float]
    best_epoch: int
    stopped_early: bool
    test_metrics: dict[str, float]
    images_per_s: float  # all ranks together, over the whole fit (text prefill and validations included)
    # a signal of train.preempt_signals that came after the last step (the fold finished): the next fold must not start
    stop_signal: int = 0


class Trainer:
    def __init__(self, cfg: Config, *, fold: int, run_dir: Path, data_factory, resume: str | None = None,
                 resume_command: str | None = None):
        """`resume`: None (a new run), "latest", "auto" (latest when the run folder has a checkpoint, else new) or a
        checkpoint folder. `resume_command`: the command line that continues this run, for the line printed when a
        signal stops it (cxrdist.train.preemption.resume_command); without it, that line says to add --resume latest."""
        self.cfg, self.fold, self.run_dir = cfg, fold, Path(run_dir)
        self.resume_command = resume_command
        self._owned = contextlib.ExitStack()  # the run folder's lock: held until close()
        self.stop_signals: Optional[StopSignals] = None
        self._stopping = ""  # what a stop requested by a signal is doing now, for the warning of a slow stop
        self._last_saved_step: Optional[int] = None
        self.last_validated_step = -1
        try:
            self._build(data_factory, resume)
        except BaseException:
            self._owned.close()
            raise

    def _build(self, data_factory, resume: str | None) -> None:
        from accelerate.utils import set_seed

        cfg, fold = self.cfg, self.fold
        self.accelerator = acc = build_accelerator(cfg, self.run_dir)  # DeepSpeed settings checked here
        # Nothing is written into the run folder before its lock is held (the shared-folder probe included); what
        # the folder holds decides the resume once no other run can change it.
        resume = self._owned.enter_context(run_folder_lock(
            acc, self.run_dir, then=functools.partial(decide_resume, self.run_dir, resume, TEST_METRICS)))
        set_seed(cfg.train.seed)  # the same on every rank: identical fresh adapters everywhere
        check_shared_folder(acc, self.run_dir, cfg.train.shared_folder_wait_s)
        self.base = load_base(cfg.model.pretrained, cfg.model.revision, cfg.model.vae_dtype, cfg.model.variant)
        scheduler = cfg.validation_sampling()[1]
        if scheduler not in self.base.family.samplers:  # now, not at the first validation
            key = "eval.scheduler" if cfg.eval.scheduler is not None else "sample.scheduler (eval.scheduler is null)"
            raise ConfigError(f"{key}={scheduler} does not fit {self.base.family.label}'s noise "
                              f"schedule: choose one of {', '.join(self.base.family.samplers)}")
        self.base.instruction = instruction_for(cfg.model.text_instruction, self.base)
        self.data = data_factory(channels=self.base.channels, rank=acc.process_index, world_size=acc.num_processes)
        # every fold loads the base afresh above: a full fine-tune never starts from another fold's weights
        self.spec = attach_training(self.base, cfg)
        model = LoraDiffusionModel(self.base.unet, self.base.text_encoder, trains_text_encoder(self.spec),
                                   text_cache_size=cfg.train.text_cache_size, family=self.base.family,
                                   instruction=self.base.instruction)
        if distributed.zero_stage(acc) == 3:
            distributed.prepare_text_encoder_for_zero3(self.base.text_encoder, self.spec)
            if model.text_cache is not None:
                # ZeRO-3 gathers the text encoder's partitions collectively at every call; a cache hit on one rank
                # and a miss on another would leave the ranks waiting on different collectives.
                log.warning("train.text_cache_size is ignored under ZeRO-3 (ranks must run the same text-encoder "
                            "calls)")
                model.text_cache = None
        self.dtype = weight_dtype(acc)
        deepspeed = distributed.deepspeed_plugin(acc) is not None
        # A full fine-tune under DeepSpeed bf16/fp16: the base's exact weights, for the engine's fp32 masters below
        exact = ({name: p.detach().to("cpu", torch.float32, copy=True) for name, p in model.named_parameters()
                  if p.requires_grad} if deepspeed and is_full(self.spec) and self.dtype != torch.float32 else None)
        configure_model(model, cfg, self.dtype, deepspeed=deepspeed)
        if model.text_cache is not None:
            log.info("text cache: %s", model.text_cache.describe_bound(self.base.text_encoder, self.base.context_tokens))
        self.base.vae.to(acc.device)
        self.steps_per_epoch = self.data.batches_per_epoch() // cfg.train.grad_accum
        if self.steps_per_epoch < 1:
            raise DataError(f"fold {fold} training data gives {self.data.batches_per_epoch()} batches per rank, fewer "
                            f"than train.grad_accum={cfg.train.grad_accum}: lower train.batch_size or grad_accum")
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch
        budget_s = parse_duration(cfg.train.time_budget)
        # train.time_budget: the decay starts when the clock says so; total_steps becomes where it ends
        self.state = TrainState()
        self._clock = faults.budget_clock(lambda: self.state.step) or time.monotonic
        self.budget = TimeBudget(budget_s, warmup=cfg.optim.warmup_steps, decay_fraction=cfg.optim.decay_fraction,
                                 max_steps=self.total_steps, clock=self._clock) if budget_s else None
        self._progress = None
        optimizer = build_optimizer(model, cfg.optim, acc.device)
        scheduler = build_lr_scheduler(optimizer, cfg.optim, self.total_steps,
                                       self.budget.multiplier if self.budget is not None else None)
        self.model, self.optimizer, self.lr_scheduler = acc.prepare(model, optimizer, scheduler)
        if exact is not None:
            log.info("fp32 masters of %d trained tensors set to the base's exact weights (the engine built them from "
                     "their %s rounding)", distributed.set_fp32_masters(acc, self.model, exact),
                     str(self.dtype).replace("torch.", ""))
            del exact
        self.optimizer_step = OptimizerStep(acc, self.model, self.optimizer, self.lr_scheduler,
                                            cfg.optim.max_grad_norm)
        self.group_names = [g.get("name", GROUP_NAMES[i]) for i, g in enumerate(self.optimizer.param_groups)]
        t = cfg.train
        bias = functools.partial(timestep_weights, bias=t.timestep_bias, multiplier=t.timestep_bias_multiplier,
                                 portion=t.timestep_bias_portion, begin=t.timestep_bias_begin, end=t.timestep_bias_end)
        self.objective = DiffusionObjective(self.base.scheduler_config, t.noise_offset, t.snr_gamma, bias,
                                            objective=self.base.family.objective, flow=FlowSettings.from_train(t))
        self.encoder = BatchEncoder(self.base.vae, self.base.tokenizer, cfg.data.prompt_template,
                                    cfg.train.caption_dropout, use_cached=self._use_cached_latents(),
                                    context_tokens=self.base.context_tokens, lowercase=self.base.lowercase_prompts,
                                    instruction=self.base.instruction)
        self.best = BestModel(acc, cfg, self.run_dir, fold, self.base, self.spec)
        distributed.load_weights_only(self.model)  # a DeepSpeed engine unpickles its files with weights_only=True
        # The EMA of the trained weights (train.ema_decay): the same values on every rank; None when off.
        self.ema = TrainedEMA.from_model(acc, self.model, cfg.train.ema_decay) if cfg.train.ema_decay else None
        self.checkpointer = Checkpointer(acc, self.run_dir, cfg)
        if resume:
            self._resume(resume)
        self.logger = MetricsLogger(acc, "tensorboard", cfg.to_dict(), every=cfg.train.log_every)
        self.validator = self._evaluator(self.data.val_split)
        self._log_setup()

    # -- set-up ------------------------------------------------------------------------------------------
    def _use_cached_latents(self) -> bool:
        shards = self.data.shards_dir
        if not (shards and self.cfg.train.use_cached_latents and latents_info(shards)):
            return False
        if self.cfg.data.augment:
            log.warning("data.augment is on: cached latents are of the unaugmented images, encoding on the fly")
            return False
        check_cached_latents(shards, self.base.vae)  # DataError when made by another VAE
        log.info("training on cached latents from %s", shards)
        return True

    def _evaluator(self, split: str) -> Evaluator:
        return Evaluator(self.cfg, self.accelerator, self.data, split, self.encoder, self.objective, self.base, self.dtype)

    def _resume(self, resume: str) -> None:
        path = self.checkpointer.resolve(resume)
        with checkpoint.reading(path):  # a checkpoint removed while it is read is one line, whichever file went first
            info, trainer_state = self.checkpointer.load(path)
            self.state.load_state_dict(trainer_state)
            if self.budget is not None:  # the budget left, and a decay already begun, carry over
                self.budget.load_state_dict(self.state.time_budget)
                self.total_steps = self.budget.total_steps()
            if info.get("fold") != self.fold:
                raise DataError(f"cannot resume from {path}: it is fold {info.get('fold')}, this run is fold "
                                f"{self.fold}")
            check_same_batching(path, info, self.effective_batch_info())
            self.best.load_state_dict(self.state.state_dict())
            self.last_validated_step = self.state.last_eval_step
            if self.ema is not None:
                self.ema.load(path, step=self.state.step)  # every rank; a checkpoint without it is refused
        log.info("resumed from %s at step %d", path, self.state.step)

    def effective_batch_info(self) -> dict[str, int]:
        """What a checkpoint's data position and LR schedule depend on besides the config: the world size."""
        t = self.cfg.train
        return {"world_size": self.accelerator.num_processes,
                "effective_batch": t.batch_size * t.grad_accum * self.accelerator.num_processes}

    def _log_setup(self) -> None:
        acc, t = self.accelerator, self.cfg.train
        trainable, total = count_parameters(self.accelerator.unwrap_model(self.model))
        log.info("config %s | fold %d | %s | %d rank(s) on %s | mixed precision %s, frozen base in %s, inputs in %s "
                 "| effective batch %d (%d x %d ranks x %d accumulation)",
                 self.cfg.hash(), self.fold, describe(acc), acc.num_processes, acc.device, t.mixed_precision,
                 str(self.dtype).replace("torch.", ""),
                 str(acc.unwrap_model(self.model).input_dtype()).replace("torch.", ""),
                 t.batch_size * acc.num_processes * t.grad_accum, t.batch_size, acc.num_processes, t.grad_accum)
        log.info("%d optimizer steps (%d per epoch) | trainable %s of %s parameters | prediction %s",
                 self.total_steps, self.steps_per_epoch, f"{trainable:,}", f"{total:,}", self.objective.prediction_type)
        log.info("optimizer %s", optimizer_chain(self.optimizer))
        if self.ema is not None:
            log.info("EMA of the trained weights: decay %g with warm-up (validation, the best export and the test "
                     "split use it)", self.ema.ema_decay)

    # -- one micro-step ----------------------------------------------------------------------------------
    def sample_draws(self, batch: dict, micro_step: int, latent_shape: torch.Size):
        """(prompts after caption dropout, noise, timesteps) of one micro-batch, drawn on the CPU.

        Each sample's draws come from its own generator seeded with (seed, key, micro-step); drawing them on the
        CPU and moving the batch in one (pinned, non-blocking) transfer avoids one device generator and one host
        sync per sample on a GPU. The order of draws per generator is fixed: dropout, noise, timestep.
        """
        gens = [torch.Generator().manual_seed(draw_seed(self.cfg.train.seed, key, micro_step)) for key in batch["keys"]]
        prompts = [self.encoder.prompts([report], g)[0] for report, g in zip(batch["prompts"], gens)]
        noise = torch.cat([self.objective.sample_noise((1, *latent_shape[1:]), g) for g in gens])
        timesteps = torch.cat([self.objective.sample_timesteps(1, g) for g in gens])
        return prompts, to_device(noise, self.accelerator.device), to_device(timesteps, self.accelerator.device)

    @all_ranks
    def train_step(self, batch: dict, micro_step: int) -> dict[str, Any]:
        """Forward/backward one micro-batch; on the last micro-batch of a window also the optimizer step
        (OptimizerStep: clip, step or skip, schedule).

        Returns `synced` (a window ended), `stepped` (the optimizer really stepped: not skipped for a gradient
        overflow or an inf/NaN loss), `skipped_because`, the loss and, on synced micro-batches, the pre-clip
        gradient norm. A step that happened also updates the EMA (train.ema_decay; collective under DeepSpeed).
        """
        acc, device = self.accelerator, self.accelerator.device
        latents = self.encoder.latents(batch, device)
        prompts, noise, timesteps = self.sample_draws(batch, micro_step, latents.shape)
        ids, mask = self.encoder.token_ids(prompts)
        noisy, target = self.objective.noisy_inputs(latents, noise, timesteps)
        with acc.accumulate(self.model):
            pred = self.model(noisy, timesteps, ids.to(device), mask.to(device))
            loss = self.objective.per_sample_loss(pred, target, timesteps).mean()
            loss = faults.maybe_inf_loss(loss, micro_step, self.accelerator.process_index)
            loss_value = self._check_finite_loss_all_ranks(loss, micro_step)
            acc.backward(loss)
            outcome: StepOutcome = self.optimizer_step()
        if outcome.stepped and self.ema is not None:
            self.ema.update(distributed.trained_fp32_values(acc, self.model))
        return {"loss": loss_value, "synced": outcome.synced, "stepped": outcome.stepped,
                "skipped_because": outcome.skipped_because, "grad_norm": outcome.grad_norm}

    @all_ranks
    def _check_finite_loss_all_ranks(self, loss: torch.Tensor, micro_step: int) -> float:
        """The loss as a float; an inf/NaN loss on ANY rank stops every rank (train.nonfinite_loss=stop) or is
        counted and its step skipped (=skip). The decision is reduced, so all ranks take the same path."""
        value = float(loss.detach())
        bad = torch.tensor([0.0 if math.isfinite(value) else 1.0], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        if float(bad) == 0:
            return value
        if self.cfg.train.nonfinite_loss == "stop":
            raise report_now(NonFiniteLossError(self._stopped_message(
                f"stopped: the training loss is {value} (inf/NaN on {int(float(bad))} rank(s)) in micro-batch "
                f"{micro_step}", hint="lower optim.lr_unet/lr_text, use bf16 instead of fp16, or set "
                "train.nonfinite_loss=skip to skip such steps; then rerun with --resume latest")))
        self.state.counted_nonfinite_loss()
        log.warning("step %d: the training loss is %s on some rank: this optimizer step is skipped "
                    "(train.nonfinite_loss=skip; %d so far)", self.state.step + 1, value, self.state.nonfinite_losses)
        return value

    # -- the loop ----------------------------------------------------------------------------------------
    @all_ranks
    def fit(self) -> FoldResult:
        """Train; with several ranks, a dead or silent peer ends this rank too, with one line that says how to
        continue -- never a hang (collectives time out after train.collective_timeout_s). A signal of
        train.preempt_signals ends it at the next step boundary with a checkpoint: StopRequested."""
        self.stop_signals = StopSignals(self.cfg.train.preempt_signals, status=self._stop_status).install()
        # torchrun / accelerate launch SIGTERM the surviving ranks as soon as one rank dies. With SIGTERM a stop
        # request, such a rank still learns it at its next collective, which fails (the except below).
        peer_sigterm = self.accelerator.num_processes > 1 and "SIGTERM" not in self.cfg.train.preempt_signals
        previous = signal.signal(signal.SIGTERM, self._on_sigterm) if peer_sigterm else None
        try:
            return self._fit()
        except (RuntimeError, torch.distributed.DistError) as exc:
            if isinstance(exc, CxrdistError) or not _is_comm_failure(exc) or self.accelerator.num_processes < 2:
                raise
            reason = (f"lost the other ranks ({str(exc).splitlines()[0][:160]}): a rank died or did not answer "
                      f"within train.collective_timeout_s={self.cfg.train.collective_timeout_s} s")
            raise report_now(PeerLostError(self._stopped_message(reason))) from None
        finally:
            if peer_sigterm:
                signal.signal(signal.SIGTERM, previous)
            if not self._stopping:  # a stopped run ignores them until it has exited (StopSignals.ignore_from_now)
                self.stop_signals.restore()

    def _on_sigterm(self, signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # report once; a second SIGTERM ends the process
        raise report_now(PeerLostError(self._stopped_message(
            "stopped by SIGTERM (the launcher stops every rank when one fails; its report names that rank)")))

    def _stop_status(self) -> str:
        """What this rank is doing after a stop was requested (for StopSignals' warning of a slow stop)."""
        done = self.checkpointer.complete() if self.checkpointer is not None else []
        last = f"the last complete checkpoint is {done[-1]}" if done else "no checkpoint is complete yet"
        doing = self._stopping or f"finishing optimizer step {self.state.step + 1}"
        return f"{doing} (rank {self.accelerator.process_index}); {last}"

    @all_ranks
    def _stop_if_requested_all_ranks(self) -> None:
        """At an optimizer-step boundary: when any rank received a signal of train.preempt_signals, every rank
        saves this step's checkpoint (unless it was just saved) and raises StopRequested; the main process prints
        one line with the checkpoint and the command that continues the run. Collective: one all-reduce."""
        signum = self.stop_signals.agreed(self.accelerator) if self.stop_signals is not None else 0
        if not signum:
            return
        acc, step = self.accelerator, self.state.step
        self._stopping = f"saving the checkpoint of step {step}"
        path = self._save_checkpoint_all_ranks() if self._last_saved_step != step else self.checkpointer.path(step)
        self._stopping = "exiting"
        how = self.resume_command or "rerun the same command with --resume latest (and the same --output-dir)"
        message = (f"stopped by {signal_name(signum)} after step {step} of {self.total_steps} (epoch {self.epoch}): "
                   f"checkpoint {path} is complete; continue with: {how}")
        if acc.is_main_process:
            with main_process_only():
                announce(message)
        self.stop_signals.ignore_from_now()
        acc.wait_for_everyone()  # no rank exits (and makes a launcher stop the others) before the line is out
        stop = StopRequested(message, signum)
        stop.reported = True
        raise stop

    @all_ranks
    def _save_checkpoint_all_ranks(self) -> Path:
        """This step's checkpoint, through the one save path (every rank: DeepSpeed saves collectively), with
        the components' state copied into the trainer state first."""
        step = self.state.step
        self.state.snapshot(**self.best.state_dict(), last_eval_step=self.last_validated_step,
                            **({"time_budget": self.budget.state_dict()} if self.budget is not None else {}))
        path = self.checkpointer.save(step, {"fold": self.fold, "epoch": self.epoch, "config_hash": self.cfg.hash(),
                                             **self.effective_batch_info()}, self.state.state_dict(),
                                      writers=[self.ema.save] if self.ema is not None else ())
        self._last_saved_step = step
        return path

    def _stopped_message(self, reason: str,
                         hint: str = "fix the cause and rerun the same command with --resume latest") -> str:
        """The one line a stopped rank prints -- at once (see cxrdist.errors.report_now), so the launcher
        stopping this process cannot swallow it; the caller raises the error marked as reported."""
        done = self.checkpointer.complete()
        last = f"the last complete checkpoint is {done[-1].name}" if done else "no checkpoint is complete yet"
        return f"rank {self.accelerator.process_index} {reason} at step {self.state.step}; {last}: {hint}"

    def _finished(self) -> bool:
        """The run's last step has been taken: the step budget (which the time budget may lower) is reached, or
        early stopping ended the run."""
        return self.state.step >= self.total_steps or self.best.stopped

    def _fit(self) -> FoldResult:
        acc = self.accelerator
        per_epoch = self.micro_per_epoch
        window = Window()
        self.model.train()
        self._prefill_text_cache_all_ranks()
        # Leaving on an error writes no last progress line: the error's own line stays the last one.
        if self.budget is not None:
            self.budget.start(self.state.step)
        with _progress(acc, self.total_steps, self.state.step) as progress:
            self._progress = progress
            while not self._finished():
                # The data position counts micro-batches: a skipped optimizer step consumed its batches too.
                epoch, done_in_epoch = self.state.position(per_epoch)
                self.encoder.cut_prompts = self.encoder.seen_prompts = 0
                batches = iter(self.data.train_batches(epoch, start_batch=done_in_epoch))
                for _ in range(per_epoch - done_in_epoch):
                    batch = next(batches, None)
                    if batch is None:
                        raise DataError(f"fold {self.fold} loader ended early in epoch {epoch}: rebuild the shard set")
                    logs = self.train_step(batch, self.state.micro_step)
                    self.state.consumed_micro_batch()
                    window.add(len(batch["prompts"]))
                    window.record(logs)  # every micro-batch's loss counts in the logged mean
                    if not logs["synced"]:
                        continue
                    if not logs["stepped"]:
                        self._count_skipped_step(logs["skipped_because"])
                        continue
                    self.state.took_step()
                    progress.update(1)
                    self._after_step_all_ranks(window)
                    self._stop_if_requested_all_ranks()
                    if self._finished():
                        break
                if self.encoder.cut_prompts:
                    # 77 CLIP tokens cut many long reports where a 300-token T5 / Gemma-2 encoder reads them whole
                    log.warning("epoch %d: %d of %d prompts (%.1f%%) were longer than the %s text encoder's %d tokens "
                                "and were cut", epoch + 1, self.encoder.cut_prompts, self.encoder.seen_prompts,
                                100.0 * self.encoder.cut_prompts / max(1, self.encoder.seen_prompts),
                                self.base.family.label, self.base.context_tokens)
        return self._finish_all_ranks(window)

    @all_ranks
    def _prefill_text_cache_all_ranks(self) -> None:
        """With a frozen encoder and a cache that holds the whole training split, encode each distinct training
        prompt once over all ranks before the first step (cxrdist.train.text_prefill says why)."""
        model = self.accelerator.unwrap_model(self.model)
        cache = model.text_cache
        if cache is None or not cache.max_items:
            return
        samples = self.data.batches_per_epoch() * self.cfg.train.batch_size * self.accelerator.num_processes
        if samples > cache.max_items:
            log.info("text cache: %d training samples exceed train.text_cache_size=%d; contexts are encoded on "
                     "first sight", samples, cache.max_items)
            return
        from accelerate.utils import gather_object

        # each rank reads the reports of its own share of the shards; together, in rank order, the whole split
        reports = [report for share in gather_object([self.data.train_reports()]) for report in share]
        prompts = distinct_prompts(reports, self.cfg.data.prompt_template, with_empty=self.cfg.train.caption_dropout > 0)
        prefill_text_cache(self.accelerator, cache, model.text_encoder, self.base.tokenizer, prompts,
                           self.base.context_tokens, lowercase=self.base.lowercase_prompts,
                           instruction=self.base.instruction)

    @property
    def micro_per_epoch(self) -> int:
        return self.steps_per_epoch * self.cfg.train.grad_accum

    def _count_skipped_step(self, why: str) -> None:
        """A window whose optimizer step did not happen: not a step for the schedule, counter, checkpoints or
        early stopping; its micro-batches stay consumed (the data position moved on)."""
        self.state.skipped_step()
        scale_now = self.loss_scale()
        log.warning("optimizer step %d skipped: %s%s (%d skipped so far)", self.state.step + 1, why,
                    f", loss scale now {scale_now:g}" if scale_now is not None else "", self.state.skipped_steps)

    def loss_scale(self) -> Optional[float]:
        """The fp16 loss scale (accelerate's GradScaler or DeepSpeed's dynamic scale); None without one."""
        return self.optimizer_step.loss_scale()

    @all_ranks
    def _after_step_all_ranks(self, window: Window) -> None:
        """Each component decides its own cadence (logger, validator, checkpointer), told whether this is the run's
        last step; the validation comes before the checkpoint, so a checkpoint holds the best model it judged."""
        step = self.state.step
        epochs_done = self.state.epochs_done_if_ended(self.micro_per_epoch)
        decision = self.budget.follow_all_ranks(self.accelerator, step) if self.budget is not None else None
        if decision is not None:
            self._decay_began(decision)
        if self.logger.due(step, last_step=self._finished()):
            self._log_train_all_ranks(window)
        if self.validator.due(step, epochs_done, last_step=self._finished()):
            with self._timed("validation"):
                self.validate_all_ranks()
        if self.checkpointer.due(step, epochs_done is not None, last_step=self._finished()):  # early stop included
            with self._timed("checkpoint"):
                self._save_checkpoint_all_ranks()
        faults.maybe_die_after_step(step, self.accelerator.process_index)

    def _timed(self, work: str):
        """The time budget measures the periodic validation and checkpoint (what the last step will also need)."""
        return self.budget.timed(work) if self.budget is not None else contextlib.nullcontext()

    def _decay_began(self, decision: DecayDecision) -> None:
        """The time budget moved the run's end: the loop, the progress bar and the record follow it."""
        self.total_steps = self.budget.total_steps()
        if self._progress is not None:
            self._progress.total = self.total_steps
        if self.accelerator.is_main_process:
            with main_process_only():
                self.budget.record(decision, self.logger, self.run_dir)

    @property
    def epoch(self) -> int:
        """1-based epoch of the latest micro-batch (of the latest optimizer step, when none was skipped)."""
        return self.state.epoch(self.micro_per_epoch)

    @all_ranks
    def _log_train_all_ranks(self, window: Window) -> None:
        acc = self.accelerator
        loss = acc.reduce(torch.tensor([window.mean_loss()], device=acc.device), reduction="mean").item()
        values = {"train/loss": loss, "train/grad_norm": window.last_grad_norm,
                  "train/images_per_s": window.rate() * acc.num_processes,
                  **memory_scalars(acc.device), "train/epoch": self.epoch,
                  "train/skipped_steps": self.state.skipped_steps}
        if self.loss_scale() is not None:
            values["train/loss_scale"] = self.loss_scale()
        if self.ema is not None:
            values["train/ema_decay"] = self.ema.last_decay
        for name, lr in zip(self.group_names, self.optimizer_step.step_lrs):  # the rate step s used, at step s
            values[f"lr/{name}"] = lr
        self.logger.scalars(values, self.state.step)
        window.reset()

    # -- evaluation --------------------------------------------------------------------------------------
    @all_ranks
    def validate_all_ranks(self) -> dict[str, float]:
        """Validate (on the EMA when it is on), log, and let the best model judge the result."""
        step = self.state.step
        with self._eval_weights_all_ranks():  # the EMA when it is on; training continues on the raw weights after
            metrics, images = self.validator.run(self.model)
        self.last_validated_step = step
        self.logger.scalars({f"val/{k}": v for k, v in metrics.items()}, step)
        if images is not None:
            self.logger.image("val/samples", images, step)
        self.best.consider_all_ranks(metrics, step=step, epoch=self.epoch,
                                     weights_all_ranks=self._best_weights_all_ranks,
                                     module=self.accelerator.unwrap_model(self.model),
                                     ema=self.ema.info() if self.ema is not None else None)
        return metrics

    @all_ranks
    def _best_weights_all_ranks(self):
        """What the best export writes, on the main process (None elsewhere): the adapter in peft format, or a full
        fine-tune's denoiser by full name; the EMA's when it is on. Every rank takes the same decision (metrics are
        reduced) and calls this: the gather under DeepSpeed is collective. The EMA is whole on every rank: no
        gather, and only the main process needs it."""
        acc, full = self.accelerator, is_full(self.spec)
        if self.ema is not None:
            if not acc.is_main_process:
                return None
            return self.ema.named_cpu() if full else self.ema.peft_state_dicts(acc.unwrap_model(self.model))
        if full:
            if distributed.deepspeed_plugin(acc) is None and not acc.is_main_process:
                return None  # nothing to gather: the main process holds the whole model
            return distributed.trained_named_state(acc, self.model, main_only=True) or None
        return distributed.lora_state_dicts(acc, self.model)

    @all_ranks
    def _eval_weights_all_ranks(self):
        """Context in which the module computes with the weights validation judges: the adapter EMA swapped in
        (and the raw adapter put back exactly on leaving) when train.ema_decay is on. Every rank enters it."""
        if self.ema is None:
            return contextlib.nullcontext()
        return self.ema.swapped_in(self.accelerator, self.model)

    @all_ranks
    def test_all_ranks(self) -> dict[str, float]:
        """Load the BEST export's trained weights into the live model (every rank) and evaluate it on the test split
        (with train.ema_decay on, the best export holds the EMA: the test split is judged on it too)."""
        best = self.best.path
        live = self.accelerator.unwrap_model(self.model)
        # Under ZeRO-3 the module holds partitions: load into gathered tensors, which are re-partitioned on exit.
        trained = trained_parameters(live)
        with distributed.gathered_for_update(self.accelerator, trained):
            load_exported(live, best)
        metrics, images = self._evaluator("test").run(self.model)
        self.logger.scalars({f"test/{k}": v for k, v in metrics.items()}, self.state.step)
        if images is not None:
            self.logger.image("test/samples", images, self.state.step)
        if self.accelerator.is_main_process:
            stopper = self.best.stopper
            report = {"fold": self.fold, "validation_split": self.data.val_split, "checkpoint": str(best),
                      "weights_sha256": weights_digest(best),
                      "best_epoch": stopper.best_epoch, "best_step": stopper.best_step,
                      "early_stopping_metric": self.cfg.eval.metric, "best_value": stopper.best, "test": metrics}
            with main_process_only():
                write_json_atomic(self.run_dir / TEST_METRICS, report)
        return metrics

    @all_ranks
    def _finish_all_ranks(self, window: Window) -> FoldResult:
        self._check_ranks_agree_all_ranks()
        best, stopper = self.best.path, self.best.stopper
        test = self.test_all_ranks() if self.cfg.eval.run_test and best else {}
        if self.cfg.train.export_zip and best and self.accelerator.is_main_process:
            with main_process_only():
                log.info("wrote %s", write_zip(best))
        self.logger.hparams({**{f"test_{k}": v for k, v in test.items()}, "best_value": stopper.best or float("nan")})
        if self.budget is not None and self.accelerator.is_main_process:
            log.info("time budget: ended at step %d (train.max_steps allowed %d), %.1f of %.1f minutes used",
                     self.state.step, self.budget.max_steps, self.budget.elapsed_s() / 60, self.budget.budget_s / 60)
        return FoldResult(self.fold, self.run_dir, self.state.step, best, stopper.best, stopper.best_epoch,
                          self.best.stopped, test,
                          window.overall_rate() * self.accelerator.num_processes,
                          stop_signal=self.stop_signals.agreed(self.accelerator) if self.stop_signals else 0)

    @all_ranks
    def _check_ranks_agree_all_ranks(self) -> None:
        """Every rank must end with the same trained weights; a silent divergence would make checkpoints lie."""
        from accelerate.utils import gather_object

        digests = gather_object([adapter_digest(distributed.live_trained_state(self.accelerator, self.model))])
        report = {"step": self.state.step, "per_rank": digests}
        if self.ema is not None:
            report["ema_per_rank"] = gather_object([self.ema.digest()])
        if self.accelerator.is_main_process:
            with main_process_only():
                write_json_atomic(self.run_dir / "adapter_digests.json", report)
        if len(set(digests)) > 1:
            raise RuntimeError(f"ranks hold different adapters after training: {digests}")
        if len(set(report.get("ema_per_rank", []))) > 1:
            raise RuntimeError(f"ranks hold different adapter EMAs after training: {report['ema_per_rank']}")

    def close(self) -> None:
        """Release the fold's model, optimizer, EMA, validation set and caches, so that `--all-folds` starts each
        fold from the memory the first one started from (the accelerator stays: the caller still asks it who is
        the main process)."""
        # The DeepSpeed engine's teardown talks to the process group: free it while the group is up.
        self.accelerator.free_memory()
        self.logger.close()
        for name in ("model", "optimizer", "lr_scheduler", "optimizer_step", "base", "spec", "ema", "validator",
                     "encoder", "objective", "data", "checkpointer", "best"):
            setattr(self, name, None)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if self.stop_signals is not None and not self._stopping:
            # A run a signal stopped leaves them ignored: its process exits next (stop_signals.restore() otherwise).
            self.stop_signals.restore()
        self._owned.close()  # the run folder is free for the next run (or the next fold's Trainer)


def adapter_digest(tensors: dict[str, torch.Tensor]) -> str:
    """Short digest of adapter tensors by name (from `distributed.live_trained_state`: each rank's own values)."""
    return tensors_digest(tensors)[:16]


def optimizer_chain(optimizer) -> str:
    """'AcceleratedOptimizer > DeepSpeedZeroOptimizer > AdamW8bit': shows which optimizer really steps."""
    names = []
    while optimizer is not None and len(names) < 5:
        names.append(type(optimizer).__name__)
        optimizer = getattr(optimizer, "optimizer", None)
    return " > ".join(names)


def check_same_batching(path: Path, saved: dict[str, Any], now: dict[str, int]) -> None:
    """Refuse to resume with another world size: the data position (each rank's share of every batch) and the
    samples per optimizer step would change, so the run would neither replay nor continue what was trained."""
    for key, value in now.items():
        if key in saved and saved[key] != value:
            raise ConfigError(f"cannot resume from {path}: it was trained with {key.replace('_', ' ')} {saved[key]}, "
                              f"this launch has {value}: resume with the same number of processes "
                              f"({saved.get('world_size', '?')}), or start a new run with another --output-dir")


def _is_comm_failure(exc: BaseException) -> bool:
    """gloo / NCCL / DeepSpeed errors of a collective whose peer is gone or silent."""
    text = str(exc).lower()
    return isinstance(exc, torch.distributed.DistError) or any(
        word in text for word in ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "broken pipe"))


def _progress(accelerator, total: int, done: int):
    """The step bar on a terminal, a line every tenth of the run (or minute) in a log; main process only."""
    return progress_meter(total, initial=done, disable=not accelerator.is_main_process, desc="train", unit="step",
                          dynamic_ncols=True)
