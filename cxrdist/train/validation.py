"""Evaluation during training and on the test split.

(a) diffusion loss at fixed timesteps with fixed per-sample noise: deterministic and cheap, the default
    early-stopping signal; every sample of the split counted exactly once across ranks.
(b) the original project's image metrics (MSE, SSIM, PSNR, data range 1.0) between images generated with
    the fast sampler and the ground truth for the same reports, on a fixed subset; `faithfulness` on
    phantom data.
    `eval.metrics` adds set metrics on the same images: FID, KID, precision / recall / density / coverage
    against the subset's real images, and the memorization audit against the first `eval.memorization_pool`
    training images (features and pool read once per run).
(c) a grid of images for fixed validation prompts.
(b) and (c) run on the main process with the live modules; the numbers are broadcast so every rank takes
the same early-stopping decision. Under ZeRO-3 the modules hold only parameter partitions that are gathered
collectively at every layer call, so there (b) and (c) run on EVERY rank with the same prompts and seeds (the
same sequence of collectives everywhere) and rank 0's images and numbers are kept.
Every rank runs the same number of forward passes in (a) -- a rank with fewer (or no) samples repeats
zero-weight padding -- because ZeRO-3 forward passes are collectives too.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np
import torch

from cxrdist.config import Config
from cxrdist.errors import ModelError, report_now
from cxrdist.data.loader import SplitImages, read_split_images
from cxrdist.metrics.faithfulness import faithfulness
from cxrdist.models.diffusion import BatchEncoder, DiffusionObjective
from cxrdist.sampling.output import read_prompts
from cxrdist.sampling.pipeline import NonFiniteSample, SampleSettings, generate_images
from cxrdist.train.distributed import zero_stage
from cxrdist.train.ranks import all_ranks

log = logging.getLogger(__name__)

IMAGE_METRICS = ("mse", "ssim", "psnr")


def validation_noise_seed(key: str, seed: int) -> int:
    """Fixed validation noise of one sample: depends on its key and the run seed only, not on the step, batching,
    rank or world size, so every evaluation of a run (and every run with the seed) sees the same noise."""
    return (int(hashlib.sha256(key.encode()).hexdigest()[:12], 16) + seed * 7919) % (2**62)


@dataclass
class LossSet:
    """One rank's share of a split, encoded once: scaled latents, token ids, fixed noise."""

    latents: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    noise: torch.Tensor
    padding_only: bool = False  # a stand-in for a rank without samples: forward passes, no loss counted

    def __len__(self) -> int:
        return 0 if self.padding_only else int(self.latents.shape[0])


def padding_set(base, encoder: BatchEncoder, image_size: int, device) -> LossSet:
    """One zero sample shaped like the real ones, for a rank that holds no sample of the split."""
    ids, mask = encoder.token_ids([""])
    size = image_size // base.vae_scale_factor
    latents = torch.zeros(1, int(base.unet.config.in_channels), size, size, device=device)
    return LossSet(latents, ids.to(device), mask.to(device), torch.zeros_like(latents), padding_only=True)


@torch.no_grad()
def build_loss_set(batches, encoder: BatchEncoder, device, seed: int) -> LossSet | None:
    latents, ids, masks, noise = [], [], [], []
    for batch in batches:
        lat = encoder.latents(batch, device)
        i, m = encoder.token_ids(encoder.prompts(batch["prompts"], None))
        for key in batch["keys"]:
            g = torch.Generator().manual_seed(validation_noise_seed(str(key), seed))
            noise.append(torch.randn(lat.shape[1:], generator=g))
        latents.append(lat)
        ids.append(i)
        masks.append(m)
    if not latents:
        return None
    return LossSet(torch.cat(latents), torch.cat(ids).to(device), torch.cat(masks).to(device),
                   torch.stack(noise).to(device))


@torch.no_grad()
def diffusion_loss(model, objective: DiffusionObjective, data: LossSet | None, timesteps: list[int],
                   batch_size: int, accelerator) -> float:
    """Mean unweighted MSE over samples x fixed timesteps, comparable across runs whatever their snr_gamma.
    Ranks run the same number of forward passes (padding with zero-weight repeats), which sharded engines
    need, and sums are reduced across ranks."""
    device = accelerator.device
    n_local = len(data) if data is not None else 0
    pad_rows = int(data.latents.shape[0]) if data is not None else 0
    n_batches = torch.tensor([-(-n_local // batch_size)], device=device)
    most = int(accelerator.gather(n_batches).max().item())
    total = torch.zeros(2, device=device, dtype=torch.float64)  # loss sum, sample count
    # A rank given no LossSet at all (more ranks than samples, no padding_set) has nothing to pad with and
    # runs no batch: fine under DDP, a hang under ZeRO-3 -- Evaluator always passes a padding_set there.
    for b in range(most if pad_rows else 0):
        lo = b * batch_size
        real = lo < n_local
        sl = slice(lo, lo + batch_size) if real else slice(0, batch_size)  # zero-weight repeat of the first batch
        x0, noise = data.latents[sl], data.noise[sl]
        for t in timesteps:
            steps = torch.full((x0.shape[0],), int(t), device=device, dtype=torch.long)
            noisy, target = objective.noisy_inputs(x0, noise, steps)
            pred = model(noisy, steps, data.input_ids[sl], data.attention_mask[sl])
            if real:
                total[0] += objective.per_sample_loss(pred, target, steps, weighted=False).double().sum()
        if real:
            total[1] += x0.shape[0] * len(timesteps)
    total = accelerator.reduce(total, reduction="sum")
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


def generate(base, reports: list[str], cfg: Config, dtype: torch.dtype, seed: int) -> np.ndarray:
    steps, scheduler, guidance = cfg.validation_sampling()
    settings = SampleSettings(steps=steps, scheduler=scheduler, guidance=guidance,
                              negative_prompt=cfg.sample.negative_prompt, height=cfg.data.image_size,
                              width=cfg.data.image_size, batch_size=cfg.sample.batch_size)
    seeds = [seed + i for i in range(len(reports))]
    return generate_images(base, reports, settings, template=cfg.data.prompt_template, seeds=seeds,
                           device=next(base.unet.parameters()).device, dtype=dtype)


def image_scores(cfg: Config, generated: np.ndarray, subset: SplitImages,
                 references: "SetReferences | None" = None) -> dict[str, float]:
    from cxrdist.metrics.image import \
        image_metrics  # torchmetrics: ~2 s to import, paid only when scoring images

    scores = {k: float(v) for k, v in image_metrics(generated, subset.references).items() if k in IMAGE_METRICS}
    if cfg.eval.metric == "faithfulness":
        scores["faithfulness"] = float(faithfulness(generated, subset.labels)["macro"])
    if references is not None:
        scores.update(references.scores(generated))
    return scores


class SetReferences:
    """The real side of eval.metrics, computed once: features of the validation subset's real images, and for
    the memorization audit the training pool, its features and the real images' nearest-training SSIM."""

    def __init__(self, cfg: Config, real: np.ndarray, pool: np.ndarray | None, base):
        from cxrdist.metrics.features import feature_extractor, image_batch

        self.wants = set(cfg.eval.metrics)
        self.extractor = feature_extractor(cfg.eval.features)
        self.real_features = self.extractor(image_batch(real))
        self.audit = None
        if pool is not None:  # the base's VAE is frozen: the pool as it draws it is the same at every validation
            import functools

            from cxrdist.metrics.memorization import AuditSide
            from cxrdist.sampling.pipeline import as_drawn

            self.audit = AuditSide.build(self.extractor, real, pool, functools.partial(as_drawn, base))

    def scores(self, generated: np.ndarray) -> dict[str, float]:
        from cxrdist.metrics.distribution import distribution_metrics
        from cxrdist.metrics.features import image_batch
        from cxrdist.metrics.memorization import memorization_audit

        batch = image_batch(generated)
        features = self.extractor(batch)
        out: dict[str, float] = {}
        if self.wants & {"fid", "kid", "prdc"}:
            full = distribution_metrics(self.real_features, features, self.extractor.name, bootstrap=0)
            names = [n for n in ("fid", "kid") if n in self.wants]
            names += ["precision", "recall", "density", "coverage"] if "prdc" in self.wants else []
            out.update({n: float(full[n]) for n in names})
        if self.audit is not None:
            audit = memorization_audit(self.audit.nearest(batch, features), self.audit.heldout)
            out["memorization_flagged"] = float(audit["flagged_fraction"])
        return out


class Evaluator:
    """Evaluates one split (the held-out fold or `test`); inputs are read and encoded once."""

    def __init__(self, cfg: Config, accelerator, data, split: str, encoder: BatchEncoder,
                 objective: DiffusionObjective, base, dtype: torch.dtype):
        self.cfg, self.accelerator, self.data, self.split = cfg, accelerator, data, split
        self.encoder, self.objective, self.base, self.dtype = encoder, objective, base, dtype
        self._loss_set: LossSet | None = None
        self._subset: SplitImages | None = None
        self._set_references: SetReferences | None = None
        self._loaded = False
        if cfg.eval.metrics:  # a bad eval.features fails here, before training
            from cxrdist.errors import ConfigError
            from cxrdist.metrics.features import FeatureError, feature_extractor

            try:
                feature_extractor(cfg.eval.features)
            except FeatureError as err:
                raise ConfigError(f"eval.features: {err}") from None
        # Grid prompts from eval.prompts_file (read now: a bad file fails before training), else the split's own.
        self.grid_prompts = read_prompts((), cfg.eval.prompts_file) if cfg.eval.prompts_file else None
        split_grid = 0 if self.grid_prompts else cfg.eval.num_grid_prompts
        self.n_images = max(cfg.eval.num_metric_images, split_grid)  # split samples to generate for

    def due(self, step: int, epochs_done: int | None, *, last_step: bool = False) -> bool:
        """Every `eval.eval_every_steps` optimizer steps, else after every `eval.eval_every_epochs`-th epoch
        (`epochs_done`: epochs completed when an epoch has just ended, None otherwise); and always at the run's
        last step (`last_step`), so the best export has seen the final weights."""
        e = self.cfg.eval
        if last_step:
            return True
        if e.eval_every_steps:
            return step % e.eval_every_steps == 0
        return epochs_done is not None and epochs_done % e.eval_every_epochs == 0

    def _load(self) -> None:
        if self._loaded:
            return
        acc = self.accelerator
        self._loss_set = build_loss_set(self.data.eval_batches(self.split), self.encoder, acc.device,
                                        self.cfg.train.seed)
        held = acc.reduce(torch.tensor([len(self._loss_set or ())], device=acc.device), reduction="sum")
        cap = self.cfg.eval.max_eval_samples
        log.info("%s: diffusion loss on %d samples over %d rank(s), held in memory (%s)", self.split,
                 int(held.item()), acc.num_processes,
                 f"eval.max_eval_samples={cap} caps it; 0 = the whole split" if cap else "the whole split")
        if self._loss_set is None and acc.num_processes > 1:
            self._loss_set = padding_set(self.base, self.encoder, self.cfg.data.image_size, acc.device)
        if self.n_images and self._generating_rank():
            self._subset = read_split_images(self.data.first_samples(self.split, self.n_images))
        if self.cfg.eval.metrics and self._subset is not None and acc.is_main_process:
            real = self._subset.references[: self.cfg.eval.num_metric_images]
            pool = self._training_pool() if "memorization" in self.cfg.eval.metrics else None
            self._set_references = SetReferences(self.cfg, real, pool, self.base)
        self._loaded = True

    def _training_pool(self) -> np.ndarray:
        """The first eval.memorization_pool images of the training folds (every fold but the held-out one)."""
        left, parts = self.cfg.eval.memorization_pool, []
        for split in self.data.training_splits():
            if left <= 0:
                break
            part = read_split_images(self.data.first_samples(split, left))
            if part is not None:
                parts.append(part.references)
                left -= len(part.references)
        log.info("memorization audit: %d training images searched", sum(len(p) for p in parts))
        return np.concatenate(parts)

    def _generating_rank(self) -> bool:
        """Rank 0 generates; under ZeRO-3 every rank does (layer calls gather partitions collectively)."""
        return self.accelerator.is_main_process or zero_stage(self.accelerator) == 3

    @all_ranks
    def run(self, model) -> tuple[dict[str, float], np.ndarray | None]:
        """Metrics (identical on every rank) and the grid images (main process only, else None)."""
        from accelerate.utils import broadcast_object_list

        self._load()
        unwrapped = self.accelerator.unwrap_model(model)
        was_training = unwrapped.training
        unwrapped.eval()
        try:
            metrics = {"val_loss": diffusion_loss(model, self.objective, self._loss_set,
                                                  self.cfg.eval.val_loss_timesteps, self.cfg.train.batch_size,
                                                  self.accelerator)}
            images, grid, scores, diverged = None, None, {}, None
            try:
                if self.n_images and self._generating_rank() and self._subset is not None:
                    images = generate(self.base, self._subset.reports, self.cfg, self.dtype, self.cfg.train.seed)
                    if self.cfg.eval.num_metric_images and self.accelerator.is_main_process:
                        n = self.cfg.eval.num_metric_images
                        part = SplitImages(self._subset.reports[:n], self._subset.references[:n],
                                           self._subset.labels[:n])
                        scores = image_scores(self.cfg, images[:n], part, self._set_references)
                    if not self.grid_prompts and self.cfg.eval.num_grid_prompts:
                        grid = images[: self.cfg.eval.num_grid_prompts]
                if self.grid_prompts and self._generating_rank():
                    # The same seeds at every evaluation: grids of one run differ only by what the adapter learned.
                    grid = generate(self.base, self.grid_prompts, self.cfg, self.dtype, self.cfg.train.seed)
            except NonFiniteSample as exc:
                # raised on the generating rank only: the others learn it from the broadcast below instead of
                # waiting there for a rank that left
                diverged = (f"validation image {exc.index} (seed {exc.seed}) came out as NaN/inf {exc.stage}: the "
                            "adapter diverged; lower optim.lr_unet, set optim.max_grad_norm, or train in "
                            "train.mixed_precision=no to find where it overflows")
            shared = [scores, diverged]
            if self.accelerator.num_processes > 1:
                broadcast_object_list(shared, from_process=0)
            if shared[1] is not None:  # rank 0's view, so every rank stops at this same point
                raise report_now(ModelError(shared[1]))
            metrics.update(shared[0])
            if not self.accelerator.is_main_process:
                grid = None
        finally:
            unwrapped.train(was_training)
        return metrics, grid
