"""The cross-validation summary over folds: mean and sample standard deviation."""
from __future__ import annotations

import math


def test_cv_summary_mean_and_sample_std():
    from cxrdist.train.folds import mean_std

    out = mean_std([{"a": 1.0, "b": 2.0}, {"a": 3.0}, {"a": 5.0, "b": float("nan")}])
    assert out["a"] == {"mean": 3.0, "std": 2.0, "n": 3}
    assert out["b"] == {"mean": 2.0, "std": 0.0, "n": 1}
    assert math.isclose(mean_std([{"x": 0.1}, {"x": 0.3}])["x"]["std"], math.sqrt(0.02))
