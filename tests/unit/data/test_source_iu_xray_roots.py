"""IU X-ray source with overlapping roots (cxrdist.data.sources.iu_xray): with --out (and so its download cache)
inside --from, each report is read once, not once from --from and again from the cache, and a second copy of the
reports is rejected rather than counted twice."""
from __future__ import annotations

import shutil

from click.testing import CliRunner

from cxrdist.cli import main
from cxrdist.data.sources.iu_xray import IUXraySource
from support.data_files import make_iu_tree, pack_iu_archives, write_png

SUMMARY = {"reports_seen": 6, "reports_used": 6, "images_listed": 12, "images_found": 12, "images_missing": 0}


def _cache_inside_from(tmp_path):
    source = tmp_path / "from"
    out = source / "shards"
    cache_root = make_iu_tree(out / ".inputs" / "NLMCXR", n_reports=6)  # what prepare_iu_inputs extracts
    write_png(out / "preview.png")  # `shard inspect` writes this into the shard set: it is no X-ray
    return source, out, cache_root


def test_excluded_output_is_not_scanned_from_the_outer_root(tmp_path):
    source, out, cache_root = _cache_inside_from(tmp_path)
    iu = IUXraySource([source, cache_root], exclude=[out])
    records = list(iu.records())
    assert iu.summary() == SUMMARY and len(records) == 12 and iu.rejected() == []
    assert "preview" not in {r.uid for r in records}
    assert all(str(r.source_path).startswith(str(cache_root)) for r in records)


def test_overlapping_roots_read_each_file_once(tmp_path):
    source, _, cache_root = _cache_inside_from(tmp_path)
    iu = IUXraySource([source, cache_root])  # no exclude: resolved paths still count each file once
    assert len(list(iu.records())) == 12 and iu.summary() == SUMMARY


def test_a_second_copy_of_the_reports_is_rejected_not_counted(tmp_path):
    root = make_iu_tree(tmp_path / "iu", n_reports=6)
    shutil.copytree(root / "ecgen-radiology", tmp_path / "iu" / "copy" / "ecgen-radiology")
    iu = IUXraySource([root])
    assert len(list(iu.records())) == 12 and iu.summary() == SUMMARY
    assert [reason for _, reason, _ in iu.rejected()] == ["duplicate_report"] * 6


def test_cli_with_out_inside_from_counts_each_report_once(tmp_path):
    tree = make_iu_tree(tmp_path / "tree", n_reports=6)
    source = tmp_path / "from"
    pack_iu_archives(tree, source)
    result = CliRunner().invoke(main, ["shard", "iu-xray", "--from", str(source), "--out", str(source / "shards"),
                                       "--size", "32", "--folds", "2", "--test-fraction", "0.2", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "reports seen 6" in result.output and "12 samples" in result.output
    assert "duplicate" not in result.output
