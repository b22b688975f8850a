"""cxrdist.train.data.check_shards: the config is checked against the shard set before training starts, e.g.
eval.k_folds must match the number of folds the set was split into (0 takes the set's)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from cxrdist.config import load_config
from cxrdist.errors import DataError


def test_eval_k_folds_is_checked_against_the_shard_set():
    from cxrdist.train.data import check_shards

    index = SimpleNamespace(folds=2, root="shards/x", channels=1, splits={"fold0": 1, "fold1": 1, "test": 1},
                            check_fold=lambda fold: f"fold{fold}", check_image_size=lambda size: None)
    assert check_shards(index, load_config(None), 0, 1) == "fold0"  # default 0: the shard set's folds
    assert check_shards(index, load_config(None, ["eval.k_folds=2"]), 0, 1) == "fold0"
    with pytest.raises(DataError, match=r"split into 2 folds but eval.k_folds=5: set eval.k_folds=2"):
        check_shards(index, load_config("product"), 0, 1)
