"""Train / eval loaders over a tiny shard set: batch format, exact counts per rank, order, errors."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch

from cxrdist.data.index import sha256_file
from cxrdist.data.loader import batches_per_epoch, eval_loader, train_loader
from cxrdist.data.tars import write_tar
from cxrdist.errors import DataError
from support.data_files import build_uneven_shard_set, loader_keys

@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return build_uneven_shard_set(tmp_path_factory.mktemp("loader"))


_keys = loader_keys


def _split_keys(shards, split):
    index = json.loads((shards / "index.json").read_text())
    keys = []
    for entry in index["splits"][split]["shards"]:
        with tarfile.open(shards / entry["name"]) as tar:
            keys += [m.name[:-4] for m in tar.getmembers() if m.name.endswith(".png")]
    return keys


def test_batch_format(shards):
    batch = next(iter(train_loader(shards, 0, batch_size=4, image_size=32)))
    assert batch["pixel_values"].shape == (4, 1, 32, 32) and batch["pixel_values"].dtype == torch.float32
    assert -1.0 <= batch["pixel_values"].min() < 0 and batch["pixel_values"].max() <= 1.0
    assert all(p.startswith("Report for patient") for p in batch["prompts"])
    assert [m["uid"] for m in batch["meta"]] == batch["keys"] and "latents" not in batch
    rgb = next(iter(eval_loader(shards, "test", batch_size=2, image_size=32, channels=3)))
    assert rgb["pixel_values"].shape == (2, 3, 32, 32)
    assert torch.equal(rgb["pixel_values"][:, 0], rgb["pixel_values"][:, 2])


@pytest.mark.parametrize("rank_split", ["shards", "samples"])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_train_every_rank_gets_exactly_batches_per_epoch(shards, world_size, rank_split):
    expected = batches_per_epoch(shards, 1, batch_size=2, world_size=world_size)
    train = set(_split_keys(shards, "fold0") + _split_keys(shards, "fold2"))
    assert expected == len(train) // world_size // 2
    seen = []
    for rank in range(world_size):
        loader = train_loader(shards, 1, batch_size=2, image_size=32, rank=rank, world_size=world_size,
                              rank_split=rank_split)
        batches = list(loader)
        assert len(batches) == len(loader) == expected
        assert all(len(b["keys"]) == 2 for b in batches)
        seen += [k for b in batches for k in b["keys"]]
    assert len(seen) == len(set(seen)) and set(seen) <= train  # disjoint ranks, held-out fold never used


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_split_shards_opens_only_the_shards_of_a_ranks_range(shards, world_size):
    """Each rank opens the shards its contiguous 1/world of the epoch overlaps: together once over the epoch,
    plus the head of the shard a rank starts inside; the ranges tile the epoch without overlap."""
    index = json.loads((shards / "index.json").read_text())
    sizes = {e["name"]: e["count"] for split in ("fold0", "fold2") for e in index["splits"][split]["shards"]}
    total, largest = sum(sizes.values()), max(sizes.values())
    read = []
    for rank in range(world_size):
        pieces = train_loader(shards, 1, batch_size=1, image_size=32, rank=rank, world_size=world_size,
                              epoch=4).stream.pieces
        read.append(sum(p.end for p in pieces))  # a piece is read from its shard's start to its end
        assert sum(p.end - p.first for p in pieces) == total // world_size
        assert read[-1] <= total // world_size + largest
    assert sum(read) <= total + (world_size - 1) * largest
    every = [train_loader(shards, 1, batch_size=1, image_size=32, rank=r, world_size=world_size, rank_split="samples",
                          epoch=4).stream.pieces for r in range(world_size)]
    assert all(sum(p.end for p in pieces) == total for pieces in every)  # "samples": every rank reads it all


def test_rank_split_samples_gives_the_global_batches_of_one_process(shards):
    """With rank_split="samples" (and no shuffle buffer), step k's batches of 2 ranks x 2 are one process's batch
    of 4: what makes N ranks x batch b train like one process with batch N*b."""
    one = [b["keys"] for b in train_loader(shards, 1, batch_size=4, image_size=32, shuffle_buffer=0, seed=3)]
    ranks = [[b["keys"] for b in train_loader(shards, 1, batch_size=2, image_size=32, shuffle_buffer=0, seed=3,
                                              rank=r, world_size=2, rank_split="samples")] for r in (0, 1)]
    assert len(one) == len(ranks[0]) == len(ranks[1])
    assert [sorted(a + b) for a, b in zip(*ranks)] == [sorted(k) for k in one]


def test_train_order_seeded_epoch_dependent_and_worker_independent(shards):
    a = _keys(train_loader(shards, 0, batch_size=2, image_size=32, seed=1, epoch=0))
    assert a == _keys(train_loader(shards, 0, batch_size=2, image_size=32, seed=1, epoch=0))
    assert a != _keys(train_loader(shards, 0, batch_size=2, image_size=32, seed=1, epoch=1))
    assert sorted(a) == sorted(_keys(train_loader(shards, 0, batch_size=2, image_size=32, seed=1, epoch=1)))
    assert a == _keys(train_loader(shards, 0, batch_size=2, image_size=32, seed=1, num_workers=2))
    resumed = _keys(train_loader(shards, 0, batch_size=2, image_size=32, seed=1, start_batch=3))
    assert resumed == a[6:]


def test_max_samples_and_augment(shards):
    loader = train_loader(shards, 0, batch_size=2, image_size=32, max_samples=5)
    assert len(loader) == 2 == batches_per_epoch(shards, 0, batch_size=2, max_samples=5)
    plain = next(iter(train_loader(shards, 0, batch_size=2, image_size=32)))["pixel_values"]
    jittered = next(iter(train_loader(shards, 0, batch_size=2, image_size=32, augment=True)))["pixel_values"]
    assert plain.shape == jittered.shape and not torch.equal(plain, jittered)
    assert jittered.min() >= -1 and jittered.max() <= 1


def test_eval_fixed_order_and_max_samples(shards):
    keys = _split_keys(shards, "fold1")
    assert _keys(eval_loader(shards, "fold1", batch_size=4, image_size=32)) == keys
    assert _keys(eval_loader(shards, 1, batch_size=4, image_size=32, num_workers=2)) == keys
    assert _keys(eval_loader(shards, "fold1", batch_size=4, image_size=32, max_samples=3)) == keys[:3]
    parts = [_keys(eval_loader(shards, "test", batch_size=2, image_size=32, rank=r, world_size=3)) for r in range(3)]
    assert [k for p in parts for k in p] == _split_keys(shards, "test")  # contiguous ranges, in order
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_clear_errors(shards, tmp_path):
    with pytest.raises(DataError, match=r"fold 3 is out of range .*valid folds are 0\.\.2"):
        train_loader(shards, 3, batch_size=2, image_size=32)
    with pytest.raises(DataError, match=r"holds 32x32 images but 64 .*--size 64 or set data.image_size=32"):
        train_loader(shards, 0, batch_size=2, image_size=64)
    with pytest.raises(DataError, match=r"index.json not found.*cxrdist shard"):
        eval_loader(tmp_path, "test", batch_size=2, image_size=32)
    with pytest.raises(DataError, match="split 'val' not in"):
        eval_loader(shards, "val", batch_size=2, image_size=32)
    with pytest.raises(DataError, match="fewer than batch_size x world_size"):
        train_loader(shards, 0, batch_size=64, image_size=32)


def test_checksum_mismatch_is_refused(shards, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    victim = copy / "fold0-000000.tar"
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(DataError, match="fold0-000000.tar checksum mismatch.*rebuild"):
        train_loader(copy, 1, batch_size=2, image_size=32)


def test_cached_latents_are_passed_through(shards, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    index = json.loads((copy / "index.json").read_text())
    entry = index["splits"]["test"]["shards"][0]
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(copy / entry["name"]) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    for parts in samples.values():
        buffer = io.BytesIO()
        np.save(buffer, np.ones((4, 4, 4), dtype=np.float16))
        parts["latents.npy"] = buffer.getvalue()
    entry["sha256"], entry["bytes"] = write_tar(copy / entry["name"], list(samples.items()))
    (copy / "index.json").write_text(json.dumps(index))
    batch = next(iter(eval_loader(copy, "test", batch_size=2, image_size=32, max_samples=2)))
    assert batch["latents"].shape == (2, 4, 4, 4) and batch["latents"].dtype == torch.float32
    assert sha256_file(copy / entry["name"]) == entry["sha256"]
