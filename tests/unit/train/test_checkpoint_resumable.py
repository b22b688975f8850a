"""A checkpoint is resumed only under the config it was trained with: another one is refused, naming the keys that differ."""
from __future__ import annotations

import pytest

from cxrdist.config import load_config
from cxrdist.errors import ConfigError


def test_resume_refuses_a_checkpoint_of_another_config_naming_the_keys(tmp_path):
    import json

    from cxrdist.models.lora import CHECKPOINT_CONFIG, CHECKPOINT_MARKER
    from cxrdist.train.checkpoint import check_resumable

    old = load_config(None, ["train.batch_size=4", "lora.unet_rank=4"])
    old.save(tmp_path / CHECKPOINT_CONFIG)
    (tmp_path / CHECKPOINT_MARKER).write_text(json.dumps({"step": 3, "fold": 1}))
    check_resumable(tmp_path, load_config(None, ["train.batch_size=4", "lora.unet_rank=4", "train.log_every=1"]), 1)
    new = load_config(None, ["train.batch_size=8", "lora.unet_rank=4"])
    with pytest.raises(ConfigError, match=r"train.batch_size: 4 -> 8"):
        check_resumable(tmp_path, new, 1)
    with pytest.raises(ConfigError, match="fold 1, not fold 2"):
        check_resumable(tmp_path, old, 2)
