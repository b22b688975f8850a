"""cxrdist.train.run: a run over all folds refuses a --resume that names one fold's checkpoint, since every fold
would resume from it; `--resume latest` finds each fold's own."""
from __future__ import annotations

import pytest

from cxrdist.config import load_config
from cxrdist.errors import InputError


def test_all_folds_refuse_one_checkpoint_path_for_every_fold(tmp_path):
    from cxrdist.train.run import run_all_folds

    with pytest.raises(InputError, match=r"a checkpoint path names one fold; use --resume latest"):
        run_all_folds(load_config(None), output_dir=str(tmp_path), resume=str(tmp_path / "fold0/checkpoints/step_1"))
