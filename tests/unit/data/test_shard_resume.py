"""Shard builder resume (cxrdist.data.sharding.resume): `--resume` re-checks the shards it keeps (size and sha256
against their stats) and rebuilds a damaged one, saying so, instead of keeping it."""
from __future__ import annotations

import json
import logging

import pytest

from cxrdist.data.index import verify_checksums
from cxrdist.data.shard import build_shards
from cxrdist.data.sources.manifest import ManifestSource
from support.data_files import SHARD_OPTS


@pytest.fixture(scope="module")
def clean(tmp_path_factory, manifest):
    out = tmp_path_factory.mktemp("clean") / "out"
    build_shards(ManifestSource(manifest), out, **SHARD_OPTS)
    return out


def test_damaged_kept_shards_are_rebuilt(tmp_path, manifest, clean, caplog):
    out = tmp_path / "out"
    build_shards(ManifestSource(manifest), out, **SHARD_OPTS)
    flipped, truncated, bad_stats = sorted(out.glob("*.tar"))[:3]
    data = bytearray(flipped.read_bytes())
    data[700] ^= 0xFF  # same size, other bytes: only the sha256 can tell
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:-512])
    (out / ".parts" / bad_stats.name.replace(".tar", ".json")).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="cxrdist.data.sharding.resume"):
        index = build_shards(ManifestSource(manifest), out, **{**SHARD_OPTS, "resume": True})
    assert index["run"]["shards_rebuilt"] == 3 and index["run"]["shards_written"] == 3
    assert index["run"]["shards_resumed"] == len(list(out.glob("*.tar"))) - 3
    messages = "\n".join(caplog.messages)
    assert f"{flipped.name}: its sha256 differs from its stats; rebuilding it" in messages
    assert f"{truncated.name}: it has" in messages and "rebuilding it" in messages
    assert f"{bad_stats.name}: its stats file is unreadable; rebuilding it" in messages
    assert verify_checksums(out) == []
    for tar in clean.glob("*.tar"):
        assert tar.read_bytes() == (out / tar.name).read_bytes(), tar.name
    assert json.loads((out / "index.json").read_text()) == json.loads((clean / "index.json").read_text())


def test_stats_of_another_shard_are_not_trusted(tmp_path, manifest):
    out = tmp_path / "out"
    build_shards(ManifestSource(manifest), out, **SHARD_OPTS)
    first, second = sorted((out / ".parts").glob("fold0-*.json"))[:2]
    second.write_text(first.read_text())  # matching sha256 and bytes, but of the wrong file
    index = build_shards(ManifestSource(manifest), out, **{**SHARD_OPTS, "resume": True})
    assert index["run"]["shards_rebuilt"] == 1 and verify_checksums(out) == []


def test_a_folder_without_a_matching_plan_keeps_nothing(tmp_path, manifest):
    out = tmp_path / "out"
    build_shards(ManifestSource(manifest), out, **SHARD_OPTS)
    (out / "index.json").unlink()
    (out / ".parts" / "plan.json").unlink()  # stats and shards left from a build of unknown inputs
    index = build_shards(ManifestSource(manifest), out, **SHARD_OPTS)
    assert index["run"]["shards_resumed"] == 0 and index["run"]["processed"] == 24
