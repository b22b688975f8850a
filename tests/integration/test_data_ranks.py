"""Two real processes (rank 0 and 1): eval sees every sample exactly once; train ranks get equal batches."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from cxrdist.data.shard import build_shards
from cxrdist.data.sources.manifest import ManifestSource
from support.data_files import make_manifest_set

RANK = textwrap.dedent("""
    import json, sys
    from cxrdist.data.loader import eval_loader, train_loader
    shards, rank = sys.argv[1], int(sys.argv[2])
    out = {"eval": [], "train": [], "train_len": 0}
    for split in ("test", "fold0", "fold1", "fold2"):
        for batch in eval_loader(shards, split, batch_size=2, image_size=16, rank=rank, world_size=2, num_workers=1):
            out["eval"] += batch["keys"]
    loader = train_loader(shards, 2, batch_size=3, image_size=16, rank=rank, world_size=2, seed=5)
    for batch in loader:
        out["train"].append(batch["keys"])
    out["train_len"] = len(loader)
    print(json.dumps(out))
""")


@pytest.mark.timeout(120)
def test_two_ranks(tmp_path):
    # 11 patients x 2 images with shard_size 3: split sizes and shard counts do not divide by 2
    manifest = make_manifest_set(tmp_path / "in", n_groups=11)
    index = build_shards(ManifestSource(manifest), tmp_path / "shards", size=16, folds=3, test_fraction=0.2,
                         seed=1, shard_size=3, workers=1, progress=False)
    procs = [subprocess.Popen([sys.executable, "-c", RANK, str(tmp_path / "shards"), str(rank)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=100)
        assert proc.returncode == 0, stderr
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    eval_keys = results[0]["eval"] + results[1]["eval"]
    assert len(eval_keys) == len(set(eval_keys)) == index["counts"]["written"]  # each sample exactly once
    assert abs(len(results[0]["eval"]) - len(results[1]["eval"])) <= 4  # at most one sample per split apart
    n_train = index["splits"]["fold0"]["count"] + index["splits"]["fold1"]["count"]
    assert results[0]["train_len"] == results[1]["train_len"] == n_train // 2 // 3
    assert len(results[0]["train"]) == len(results[1]["train"]) == results[0]["train_len"]
    train_keys = [k for r in results for batch in r["train"] for k in batch]
    assert len(train_keys) == len(set(train_keys))
