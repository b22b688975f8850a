"""Hostile inputs, item 1: one image listed twice (two group ids, another spelling of its path, a link) or
byte-copied under another name and patient must land in one split only, with the duplicates in the rejects."""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path

import pytest

from cxrdist.data.shard import assign_splits, build_shards, drop_duplicates
from cxrdist.data.sources.base import Record
from cxrdist.data.sources.manifest import ManifestSource
from test_data_fixtures import write_manifest, write_png

OPTS = dict(size=32, folds=3, test_fraction=0.25, seed=0, shard_size=4, workers=1, progress=False)


def _row(image: str, group: str) -> dict:
    return {"image": image, "group": group, "report": f"Report of {group}.", "view": "PA", "labels": "normal"}


def _other_split_group(groups: list[str], original: str, suffix: str) -> str:
    """A new group id that the seeded split puts in another split than `original`: without deduplication the
    duplicate would sit in two splits. (The shuffle permutes sorted ids, so the candidates must sort at
    different places: `patient03<suffix>` sorts right after patient03.)"""
    for n in range(8):
        candidate = f"patient{n:02d}{suffix}"
        split = assign_splits(groups + [candidate], OPTS["folds"], OPTS["test_fraction"], OPTS["seed"])
        if split[candidate] != split[original]:
            return candidate
    raise AssertionError("no group id lands in another split")


def _leaky_manifest(root: Path) -> Path:
    rows = []
    for i in range(16):  # 8 patients x 2 images, all distinct
        write_png(root / "img" / f"im{i:03d}.png", 48, 36, seed=i)
        rows.append(_row(f"img/im{i:03d}.png", f"patient{i // 2:02d}"))
    groups = sorted({r["group"] for r in rows})
    # the same file under another patient id, and again spelled another way
    groups.append(_other_split_group(groups, "patient00", "relisted"))
    rows.append(_row("img/im000.png", groups[-1]))
    groups.append(_other_split_group(groups, "patient01", "respelled"))
    rows.append(_row("img/../img/im003.png", groups[-1]))
    # a byte-copy under another name and patient
    (root / "img" / "copy_of_im004.png").write_bytes((root / "img" / "im004.png").read_bytes())
    groups.append(_other_split_group(groups, "patient02", "copied"))
    rows.append(_row("img/copy_of_im004.png", groups[-1]))
    # a symbolic link to another image
    os.symlink(root / "img" / "im006.png", root / "img" / "link_to_im006.png")
    groups.append(_other_split_group(groups, "patient03", "linked"))
    rows.append(_row("img/link_to_im006.png", groups[-1]))
    return write_manifest(root / "manifest.csv", rows)


def _png_digests_by_split(out: Path, index: dict) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for name, split in index["splits"].items():
        for entry in split["shards"]:
            with tarfile.open(out / entry["name"]) as tar:
                for member in tar.getmembers():
                    if member.name.endswith(".png"):
                        found.setdefault(name, []).append(hashlib.sha256(tar.extractfile(member).read()).hexdigest())
    return found


def test_no_image_content_in_two_splits(tmp_path):
    manifest = _leaky_manifest(tmp_path / "in")
    index = build_shards(ManifestSource(manifest), tmp_path / "out", **OPTS)
    by_split = _png_digests_by_split(tmp_path / "out", index)
    every = [digest for digests in by_split.values() for digest in digests]
    assert len(every) == 16 and len(set(every)) == 16  # each of the 16 distinct images once, in one split
    for a in by_split:
        for b in by_split:
            assert a == b or not set(by_split[a]) & set(by_split[b]), (a, b)

    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    kept_of = {(r["reason"], r["kept"]) for r in rejects}
    assert kept_of == {("duplicate_path", "im000"), ("duplicate_path", "im003"), ("duplicate_path", "im006"),
                       ("duplicate_content", "im004")}
    assert all("which is kept" in r["detail"] for r in rejects)
    assert index["rejects"] == {"duplicate_content": 1, "duplicate_path": 3}
    assert index["counts"] == {"records": 16, "written": 16, "rejected": 4, "duplicates": 4}
    assert index["dedupe"]["duplicate_path"] == 3 and index["dedupe"]["duplicate_content"] == 1
    assert index["dedupe"]["without_file"] == 0 and index["dedupe"]["files"] == 17


def test_first_record_in_source_order_is_kept(tmp_path):
    write_png(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes((tmp_path / "a.png").read_bytes())
    write_png(tmp_path / "c.png", seed=3)
    records = [Record(uid=u, group=g, prompt="p", source_path=str(tmp_path / f))
               for u, g, f in [("b", "g1", "b.png"), ("a", "g2", "a.png"), ("c", "g3", "c.png"),
                               ("c2", "g4", "c.png")]]
    kept, rejects, counts = drop_duplicates(records, workers=2)
    assert [r.uid for r in kept] == ["b", "c"]
    assert [(r["id"], r["reason"], r["kept"]) for r in rejects] == [("c2", "duplicate_path", "c"),
                                                                    ("a", "duplicate_content", "b")]
    assert counts["files_hashed"] == 2  # a.png and b.png share a size; c.png is never read


def test_records_without_a_file_are_compared_by_descriptor_only():
    records = [Record(uid=f"p{i}", group=f"g{i}", prompt="p", source_path=f"phantom:seed=0:index={i}:size=64")
               for i in range(3)]
    records.append(Record(uid="again", group="g9", prompt="p", source_path="phantom:seed=0:index=1:size=64"))
    kept, rejects, counts = drop_duplicates(records)
    assert [r.uid for r in kept] == ["p0", "p1", "p2"]
    assert [(r["id"], r["reason"], r["kept"]) for r in rejects] == [("again", "duplicate_path", "p1")]
    assert counts["without_file"] == 3 and counts["files"] == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_dedupe_keeps_builds_identical_across_worker_counts(tmp_path, workers):
    manifest = _leaky_manifest(tmp_path / "in")
    index = build_shards(ManifestSource(manifest), tmp_path / "out", **{**OPTS, "workers": workers})
    assert index["counts"]["duplicates"] == 4
