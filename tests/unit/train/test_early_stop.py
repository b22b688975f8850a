"""Early stopping: patience counted in evaluations, each direction, its state round trip."""
from __future__ import annotations

from cxrdist.train.early_stop import EarlyStopper


def test_early_stopping_min_counts_patience_in_evaluations():
    s = EarlyStopper("val_loss", "min", patience=2)
    stops = []
    for epoch, value in enumerate([1.0, 0.8, 0.85, 0.79, 0.9, 0.95, 0.5], start=1):
        s.update(value, step=epoch * 10, epoch=epoch)
        stops.append(s.should_stop)
    # improvement at 1, 2, 4; two bad evaluations (5, 6) -> stop after epoch 6, not before
    assert stops == [False, False, False, False, False, True, False]
    assert (s.best, s.best_epoch, s.best_step) == (0.5, 7, 70)


def test_early_stopping_max_mode_like_the_original_ssim_and_state_round_trip():
    s = EarlyStopper("ssim", "max", patience=1)
    assert s.update(0.3, step=1, epoch=1) and not s.update(0.3, step=2, epoch=2)  # equal is not better
    assert s.should_stop and s.best == 0.3 and s.best_epoch == 1
    t = EarlyStopper("ssim", "max", patience=1)
    t.load_state_dict(s.state_dict())
    assert t == s
    assert not EarlyStopper("x", "min", patience=0).should_stop
    nan = EarlyStopper("x", "min", patience=5)
    assert not nan.update(float("nan"), step=1, epoch=1)  # a NaN never becomes the best
