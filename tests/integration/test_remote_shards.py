"""A 2-rank `accelerate launch` training run whose shards come over HTTP from a server on 127.0.0.1: it trains one
epoch, and the server's byte counts show each training shard was streamed about once in total (not once per rank)."""
from __future__ import annotations

import json

import pytest

from support.http_shards import serve
from support.launching import ACCEL, LAUNCH_TIMEOUT_S, launch

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("tiny_base_path")]


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
def test_two_ranks_train_one_epoch_from_http_shards_reading_each_shard_about_once(phantom_shards, tmp_path):
    index = json.loads((phantom_shards / "index.json").read_text())
    train = index["splits"]["fold0"]["shards"]  # --fold 1 holds fold1 out: fold0 is the training split
    with serve(phantom_shards) as (url, sent):
        res = launch(ACCEL / "cpu_2ranks.yaml", url, tmp_path / "run", "data.max_train_samples=0",
                     "train.max_steps=0", "train.epochs=1", "eval.run_test=false")
        assert res.returncode == 0, res.stderr[-4000:]
    steps = index["splits"]["fold0"]["count"] // 2 // 4  # 2 ranks x batch 4, one epoch
    metrics = json.loads((tmp_path / "run" / "fold1" / "adapter_digests.json").read_text())
    assert len(set(metrics["per_rank"])) == 1
    assert f"{steps} optimizer steps" in res.stderr
    read = sum(sent[e["name"]] for e in train)
    size = sum(e["bytes"] for e in train)
    # the two ranks together: each shard once, plus at most the head of the one shard rank 1 starts inside
    assert size <= read <= size + max(e["bytes"] for e in train), (read, size, dict(sent))
    assert sent["test-000000.tar"] == 0  # the test split is never opened with eval.run_test=false
