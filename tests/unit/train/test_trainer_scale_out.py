"""Trainer pieces that scale-out relies on, without launching processes: equal forward passes on a rank
without validation samples, per-sample randomness independent of rank and batch, the optimizer chain."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from cxrdist.train.trainer import draw_seed, optimizer_chain
from cxrdist.train.validation import LossSet, diffusion_loss


class _CountingModel:
    def __init__(self):
        self.calls = 0

    def __call__(self, noisy, steps, ids, mask):
        self.calls += 1
        return torch.zeros_like(noisy)


class _Objective:
    def noisy_inputs(self, x0, noise, steps):
        return x0 + noise, x0  # target 1 everywhere: a counted sample adds loss 1

    def per_sample_loss(self, pred, target, steps, weighted=True):
        scale = 2.0 if weighted else 1.0  # validation must ask for the unweighted loss
        return scale * (pred - target).pow(2).flatten(1).mean(1)


def _accelerator(most_batches_elsewhere: int):
    """One rank of two: the other rank reports `most_batches_elsewhere` batches; sums are not reduced."""
    def gather(t):
        return torch.cat([t, torch.tensor([most_batches_elsewhere])])

    return SimpleNamespace(device=torch.device("cpu"), gather=gather, reduce=lambda t, reduction: t)


def _loss_set(n: int, padding_only: bool = False) -> LossSet:
    lat = torch.ones(max(n, 1), 4, 2, 2)
    ids = torch.zeros(max(n, 1), 3, dtype=torch.long)
    return LossSet(lat, ids, torch.ones_like(ids), torch.zeros_like(lat), padding_only=padding_only)


def test_a_rank_without_samples_runs_as_many_forward_passes_and_counts_nothing():
    model = _CountingModel()
    loss = diffusion_loss(model, _Objective(), _loss_set(1, padding_only=True), [10, 20], 2, _accelerator(3))
    assert model.calls == 3 * 2  # the other rank's 3 batches x 2 timesteps: no rank waits alone under ZeRO-3
    assert loss != loss  # nothing counted here (NaN before the cross-rank reduction adds the others' sums)


def test_a_rank_with_fewer_samples_pads_with_zero_weight_batches():
    model = _CountingModel()
    loss = diffusion_loss(model, _Objective(), _loss_set(2), [10], 2, _accelerator(2))
    assert model.calls == 2 and loss == 1.0  # 1 real batch + 1 padding batch; only the real one is counted


def test_sample_draws_depend_on_key_and_step_not_on_rank_or_batch():
    assert draw_seed(0, "a", 3) == draw_seed(0, "a", 3)
    assert len({draw_seed(0, "a", 3), draw_seed(0, "b", 3), draw_seed(0, "a", 4), draw_seed(1, "a", 3)}) == 4


def test_optimizer_chain_names_the_optimizer_that_steps():
    inner = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    wrapped = SimpleNamespace(optimizer=SimpleNamespace(optimizer=inner))
    assert optimizer_chain(wrapped).endswith("> AdamW") and optimizer_chain(inner) == "AdamW"


def test_collective_timeout_reaches_groups_created_later(monkeypatch):
    """DeepSpeed builds its own groups with new_group(), which takes torch's module default, not the world's."""
    from datetime import timedelta

    import torch.distributed.distributed_c10d as c10d

    from cxrdist.train import distributed

    monkeypatch.setattr(c10d, "default_pg_timeout", c10d.default_pg_timeout)
    monkeypatch.setattr(c10d, "default_pg_nccl_timeout", c10d.default_pg_nccl_timeout)
    distributed.default_collective_timeout(12)
    assert c10d._get_default_timeout(c10d.Backend.GLOO) == timedelta(seconds=12)
