"""Shard builder: group-level splits, index.json, rejects, determinism, resume and write failures."""
from __future__ import annotations

import json

import pytest

from cxrdist.data.index import load_index, verify_checksums
from cxrdist.data.shard import build_shards
from cxrdist.data.sharding import writer as shard_writer
from cxrdist.data.sharding.options import ShardOptions
from cxrdist.data.sharding.splits import assign_splits
from cxrdist.data.sources.manifest import ManifestSource
from cxrdist.errors import DataError, InputError
from support.data_files import SHARD_OPTS, fill_disk_at_shard, tar_members, tar_metas


def test_assign_splits_is_group_level_and_seeded():
    groups = [f"g{i}" for i in range(100)]
    a = assign_splits(groups, 5, 0.2, seed=0)
    assert a == assign_splits(list(reversed(groups)), 5, 0.2, seed=0)
    assert a != assign_splits(groups, 5, 0.2, seed=1)
    counts = {name: list(a.values()).count(name) for name in set(a.values())}
    assert counts == {"test": 20, "fold0": 16, "fold1": 16, "fold2": 16, "fold3": 16, "fold4": 16}


def test_build_index_rejects_and_no_group_leak(tmp_path, corrupt_manifest):
    index = build_shards(ManifestSource(corrupt_manifest), tmp_path / "out", **SHARD_OPTS)
    assert index["counts"] == {"records": 24, "written": 23, "rejected": 1, "duplicates": 0}
    assert index["rejects"] == {"corrupt_image": 1}
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["id"], r["reason"]) for r in rejects] == [("im005", "corrupt_image")]
    assert set(index["splits"]) == {"test", "fold0", "fold1", "fold2"}
    assert index["splits"]["test"]["groups"] == 3  # 25 % of 12 patients
    group_split: dict[str, str] = {}
    total = 0
    for name, split in index["splits"].items():
        assert split["count"] == sum(s["count"] for s in split["shards"])
        for entry in split["shards"]:
            assert entry["name"].startswith(f"{name}-") and entry["count"] <= 4
            metas = tar_metas(tmp_path / "out" / entry["name"])
            assert len(metas) == entry["count"]
            for meta in metas:
                assert group_split.setdefault(meta["group"], name) == name  # no group in two splits
                assert meta["split"] == name and meta["original_size"] == [48, 36] and meta["source"] == "manifest"
            total += len(metas)
    assert total == 23
    members = tar_members(tmp_path / "out" / index["splits"]["fold0"]["shards"][0]["name"])
    assert members[:3] == sorted(members[:3]) and members[0].endswith(".json")
    loaded = load_index(tmp_path / "out")
    assert loaded.image_size == 32 and loaded.channels == 1 and loaded.folds == 3
    assert verify_checksums(loaded) == []
    assert sum(loaded.splits["test"]["labels"].values()) == loaded.splits["test"]["count"]


def test_same_inputs_give_identical_bytes_with_any_worker_count(tmp_path, corrupt_manifest):
    build_shards(ManifestSource(corrupt_manifest), tmp_path / "a", **SHARD_OPTS)
    build_shards(ManifestSource(corrupt_manifest), tmp_path / "b", **{**SHARD_OPTS, "workers": 2})
    names = sorted(p.name for p in (tmp_path / "a").iterdir() if p.is_file())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir() if p.is_file())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_existing_output_needs_resume_and_matching_options(tmp_path, corrupt_manifest):
    build_shards(ManifestSource(corrupt_manifest), tmp_path / "out", **SHARD_OPTS)
    with pytest.raises(DataError, match="already holds a shard set.*--resume"):
        build_shards(ManifestSource(corrupt_manifest), tmp_path / "out", **SHARD_OPTS)
    with pytest.raises(DataError, match="cannot resume.*options size"):
        build_shards(ManifestSource(corrupt_manifest), tmp_path / "out", **{**SHARD_OPTS, "size": 64, "resume": True})
    again = build_shards(ManifestSource(corrupt_manifest), tmp_path / "out", **{**SHARD_OPTS, "resume": True})
    assert again["run"]["processed"] == 0 and again["counts"]["written"] == 23


def test_disk_full_keeps_completed_shards_then_resume_finishes(tmp_path, corrupt_manifest, monkeypatch):
    real_write = shard_writer.write_tar
    calls = fill_disk_at_shard(monkeypatch, 3)
    with pytest.raises(DataError, match="disk full while writing .*--resume"):
        build_shards(ManifestSource(corrupt_manifest), tmp_path / "out", **SHARD_OPTS)
    kept = sorted(p.name for p in (tmp_path / "out").glob("*.tar"))
    assert kept == sorted(calls[:2]) and not (tmp_path / "out" / "index.json").exists()
    monkeypatch.setattr(shard_writer, "write_tar", real_write)
    index = build_shards(ManifestSource(corrupt_manifest), tmp_path / "out", **{**SHARD_OPTS, "resume": True})
    build_shards(ManifestSource(corrupt_manifest), tmp_path / "clean", **SHARD_OPTS)
    assert index["run"]["processed"] < 24
    for tar in (tmp_path / "clean").glob("*.tar"):
        assert tar.read_bytes() == (tmp_path / "out" / tar.name).read_bytes()


def test_unwritable_output_and_bad_options(tmp_path, corrupt_manifest):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="cannot write to .*writable --out"):
        build_shards(ManifestSource(corrupt_manifest), blocker / "out", **SHARD_OPTS)
    with pytest.raises(InputError, match="--size must be a multiple of 8"):
        ShardOptions(size=30)
    with pytest.raises(InputError, match="--test-fraction"):
        ShardOptions(test_fraction=1.0)


def test_sixteen_bit_and_crop_options(tmp_path, corrupt_manifest):
    index = build_shards(ManifestSource(corrupt_manifest), tmp_path / "out",
                         **{**SHARD_OPTS, "bit_depth": 16, "resize_mode": "crop", "test_fraction": 0.0})
    assert "test" not in index["splits"] and index["bit_depth"] == 16
    import io
    import tarfile

    from PIL import Image
    with tarfile.open(tmp_path / "out" / "fold0-000000.tar") as tar:
        png = next(m for m in tar.getmembers() if m.name.endswith(".png"))
        image = Image.open(io.BytesIO(tar.extractfile(png).read()))
        assert image.mode.startswith("I;16") and image.size == (32, 32)
