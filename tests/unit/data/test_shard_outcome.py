"""Shard builder outcome (cxrdist.data.sharding.outcome): a build that writes nothing usable (wrong --root, every
record rejected, an empty split, rejects above --max-reject-fraction) fails with one line, leaves no index.json and
does not take the folder, so the corrected rerun just works; shards completed by an earlier build stay."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cxrdist.cli import main
from cxrdist.data.shard import build_shards
from cxrdist.data.sharding import writer as shard_writer
from cxrdist.data.sharding.outcome import BuildRejected
from cxrdist.data.sharding.splits import assign_splits
from cxrdist.data.sources.manifest import ManifestSource
from cxrdist.errors import DataError
from support.data_files import SHARD_OPTS, fill_disk_at_shard, make_manifest_set


def _truncate(paths) -> None:
    for path in paths:
        path.write_bytes(path.read_bytes()[:70])


def test_wrong_root_fails_and_leaves_the_folder_free(tmp_path):
    manifest = make_manifest_set(tmp_path / "in")
    out = tmp_path / "out"
    with pytest.raises(BuildRejected, match=r"of 24 inputs rejected \(missing_image \d+\), more than "
                                            r"--max-reject-fraction 0.5: check the input paths \(--root"):
        build_shards(ManifestSource(manifest, root=tmp_path / "elsewhere"), out, **SHARD_OPTS)
    assert not (out / "index.json").exists() and not (out / ".parts" / "plan.json").exists()
    assert not list(out.glob("*.tar")) and not (out / ".cxrdist-build.lock").exists()
    assert "missing_image" in (out / "rejects.jsonl").read_text()  # what went wrong stays readable
    index = build_shards(ManifestSource(manifest), out, **SHARD_OPTS)  # no --resume, no deleting by hand
    assert index["counts"]["written"] == 24


def test_cli_exits_1_with_one_line_naming_the_top_reasons(tmp_path):
    manifest = make_manifest_set(tmp_path / "in")
    result = CliRunner().invoke(main, ["shard", "manifest", str(manifest), "--root", str(tmp_path / "nowhere"),
                                       "--out", str(tmp_path / "out"), "--size", "32", "--workers", "1"])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "missing_image" in errors[0] and "--max-reject-fraction 0.5" in errors[0]
    assert not (tmp_path / "out" / "index.json").exists()
    result = CliRunner().invoke(main, ["shard", "manifest", "--help"])
    assert "--max-reject-fraction" in result.output and "[default: 0.5; 0<=x<=1]" in result.output


def test_reject_fraction_limit(tmp_path):
    root = tmp_path / "in"
    manifest = make_manifest_set(root)
    _truncate(sorted((root / "img").glob("*.png"))[:8])  # a third of the inputs
    with pytest.raises(BuildRejected, match=r"inputs rejected \(corrupt_image \d+\), more than "
                                            r"--max-reject-fraction 0.2"):
        build_shards(ManifestSource(manifest), tmp_path / "strict", **{**SHARD_OPTS, "max_reject_fraction": 0.2})
    index = build_shards(ManifestSource(manifest), tmp_path / "default", **SHARD_OPTS)
    assert index["counts"]["rejected"] == 8 and (tmp_path / "default" / "index.json").is_file()


def test_too_few_groups_fail_before_writing(tmp_path):
    manifest = make_manifest_set(tmp_path / "in", n_groups=3)
    with pytest.raises(DataError, match="3 groups leave split fold2 empty .*lower --folds"):
        build_shards(ManifestSource(manifest), tmp_path / "out", **SHARD_OPTS)
    assert not (tmp_path / "out").exists()


def test_split_emptied_by_rejects_fails(tmp_path):
    root = tmp_path / "in"
    manifest = make_manifest_set(root)
    split = assign_splits([f"patient{g:02d}" for g in range(12)], 3, 0.25, 0)
    test_groups = [int(group[-2:]) for group, name in split.items() if name == "test"]
    _truncate(root / "img" / f"im{g * 2 + k:03d}.png" for g in test_groups for k in range(2))
    with pytest.raises(BuildRejected, match=r"split test came out empty \(its inputs were rejected: "
                                            r"corrupt_image 6\)"):
        build_shards(ManifestSource(manifest), tmp_path / "out", **{**SHARD_OPTS, "max_reject_fraction": 1.0})
    assert not (tmp_path / "out" / "index.json").exists() and not list((tmp_path / "out").glob("*.tar"))


def test_failed_resume_keeps_the_shards_an_earlier_build_completed(tmp_path, monkeypatch):
    root = tmp_path / "in"
    manifest = make_manifest_set(root)
    real_write = shard_writer.write_tar
    fill_disk_at_shard(monkeypatch, 3)
    out = tmp_path / "out"
    with pytest.raises(DataError, match="disk full"):
        build_shards(ManifestSource(manifest), out, **SHARD_OPTS)
    monkeypatch.setattr(shard_writer, "write_tar", real_write)
    kept = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    assert len(kept) == 2

    originals = {p: p.read_bytes() for p in (root / "img").glob("*.png")}
    _truncate(originals)  # the inputs went bad between the two runs
    with pytest.raises(BuildRejected, match="corrupt_image"):
        build_shards(ManifestSource(manifest), out, **{**SHARD_OPTS, "resume": True})
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == kept  # earlier shards kept, new ones gone
    assert (out / ".parts" / "plan.json").is_file() and not (out / "index.json").exists()

    for path, data in originals.items():
        path.write_bytes(data)
    index = build_shards(ManifestSource(manifest), out, **{**SHARD_OPTS, "resume": True})
    assert index["run"]["shards_resumed"] == 2 and index["counts"]["written"] == 24
    build_shards(ManifestSource(manifest), tmp_path / "clean", **SHARD_OPTS)
    for tar in (tmp_path / "clean").glob("*.tar"):
        assert tar.read_bytes() == (out / tar.name).read_bytes()
    assert json.loads((out / "index.json").read_text()) == json.loads((tmp_path / "clean" / "index.json").read_text())


def test_max_reject_fraction_is_checked_and_not_part_of_the_plan(tmp_path):
    from cxrdist.data.sharding.options import ShardOptions
    from cxrdist.errors import InputError

    with pytest.raises(InputError, match="--max-reject-fraction must be in"):
        ShardOptions(max_reject_fraction=1.5)
    assert "max_reject_fraction" not in ShardOptions().plan_key()
    manifest = make_manifest_set(tmp_path / "in")
    build_shards(ManifestSource(manifest), tmp_path / "out", **SHARD_OPTS)
    again = build_shards(ManifestSource(manifest), tmp_path / "out",
                         **{**SHARD_OPTS, "resume": True, "max_reject_fraction": 0.9})
    assert again["run"]["processed"] == 0
    assert Path(tmp_path / "out" / "index.json").is_file()


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_a_seed_out_of_range_is_refused_in_one_line(seed):
    from cxrdist.data.sharding.options import ShardOptions
    from cxrdist.errors import InputError

    with pytest.raises(InputError, match=r"--seed must be in 0..2\*\*63-1"):
        ShardOptions(seed=seed)
