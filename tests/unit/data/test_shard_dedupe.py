"""Shard builder deduplication (cxrdist.data.listing.drop_duplicates): one image listed twice (two group ids,
another spelling of its path, a link) or byte-copied under another name and patient lands in one split only, with
the duplicates in the rejects; otherwise the same image in train and test would leak into the evaluation."""
from __future__ import annotations

import json

import pytest

from cxrdist.data.listing import drop_duplicates
from cxrdist.data.shard import build_shards
from cxrdist.data.sources.base import Record
from cxrdist.data.sources.manifest import ManifestSource
from support.data_files import SHARD_OPTS, leaky_manifest, png_digests_by_split, write_png


def test_no_image_content_in_two_splits(tmp_path):
    manifest = leaky_manifest(tmp_path / "in")
    index = build_shards(ManifestSource(manifest), tmp_path / "out", **SHARD_OPTS)
    by_split = png_digests_by_split(tmp_path / "out", index)
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
    manifest = leaky_manifest(tmp_path / "in")
    index = build_shards(ManifestSource(manifest), tmp_path / "out", **{**SHARD_OPTS, "workers": workers})
    assert index["counts"]["duplicates"] == 4
