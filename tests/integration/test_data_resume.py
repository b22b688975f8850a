"""A build killed with SIGKILL mid-shard, then resumed, equals a clean build byte for byte."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

from cxrdist.data.shard import build_shards
from cxrdist.data.sources.manifest import ManifestSource
from support.data_files import make_manifest_set

OPTS = dict(size=32, folds=3, test_fraction=0.2, seed=3, shard_size=3, progress=False)

CRASH = textwrap.dedent("""
    import os, signal, sys
    from cxrdist.data import shard as m
    from cxrdist.data.sharding import writer
    from cxrdist.data.sources.manifest import ManifestSource
    from cxrdist.fileio import temp_name
    real, calls = writer.write_tar, []
    def write_then_die(path, samples):
        calls.append(path.name)
        if len(calls) == 4:  # half a shard on disk under its temp name, then the process dies hard
            tmp = temp_name(path)
            tmp.write_bytes(b"partial" * 100)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, samples)
    writer.write_tar = write_then_die
    m.build_shards(ManifestSource(sys.argv[1]), sys.argv[2], workers=2, **eval(sys.argv[3]))
""")


@pytest.mark.timeout(120)
def test_resume_after_kill_equals_clean_build(tmp_path):
    manifest = make_manifest_set(tmp_path / "in", n_groups=10, corrupt=[7])
    crashed = tmp_path / "crashed"
    proc = subprocess.run([sys.executable, "-c", CRASH, str(manifest), str(crashed), repr(OPTS)],
                          capture_output=True, text=True, timeout=100)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert len(list(crashed.glob("*.tar"))) == 3 and list(crashed.glob("*.cxrdist-tmp"))
    assert not (crashed / "index.json").exists()

    resumed = build_shards(ManifestSource(manifest), crashed, workers=1, resume=True, **OPTS)
    assert resumed["run"]["shards_resumed"] == 3
    build_shards(ManifestSource(manifest), tmp_path / "clean", workers=1, **OPTS)
    clean_files = sorted(p.name for p in (tmp_path / "clean").iterdir() if p.is_file())
    assert clean_files == sorted(p.name for p in crashed.iterdir() if p.is_file())
    assert "rejects.jsonl" in clean_files and not list(crashed.glob("*.cxrdist-tmp"))
    for name in clean_files:
        assert (tmp_path / "clean" / name).read_bytes() == (crashed / name).read_bytes(), name
