"""Shard builder's folder lock (cxrdist.data.sharding.lock): two builds into one --out must not delete each other's
temporary files. The folder's lock holds the builder's PID; a live holder stops the second build, a dead one's lock
is taken over."""
from __future__ import annotations

import socket

import pytest

from cxrdist.data.shard import build_shards
from cxrdist.data.sharding.lock import LOCK_NAME, build_lock
from cxrdist.data.sources.manifest import ManifestSource
from cxrdist.errors import DataError
from support.data_files import SHARD_OPTS
from support.lock_holders import dead_pid


def test_a_running_build_holds_the_folder(tmp_path, manifest, other_process):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text(f"{other_process.pid} {socket.gethostname()}\n")
    (out / "fold0-000000.tar.tmp").write_bytes(b"the other build is writing this")
    with pytest.raises(DataError, match=rf"{out} is in use by process {other_process.pid}: wait for "
                                        rf"that shard build or cache-latents to end or choose another --out"):
        build_shards(ManifestSource(manifest), out, **{**SHARD_OPTS, "resume": True})
    assert (out / "fold0-000000.tar.tmp").read_bytes() == b"the other build is writing this"
    assert (out / LOCK_NAME).read_text().split()[0] == str(other_process.pid)  # not ours to remove
    assert not (out / ".parts" / "plan.json").exists() and not list(out.glob("*.tar"))


def test_a_dead_builders_lock_is_taken_over_and_released(tmp_path, manifest):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text(f"{dead_pid()} {socket.gethostname()}\n")
    index = build_shards(ManifestSource(manifest), out, **SHARD_OPTS)
    assert index["counts"]["written"] == 24 and not (out / LOCK_NAME).exists()


def test_lock_is_released_when_the_build_fails(tmp_path, manifest):
    with pytest.raises(DataError):
        build_shards(ManifestSource(manifest, root=tmp_path / "nowhere"), tmp_path / "out", **SHARD_OPTS)
    assert not (tmp_path / "out" / LOCK_NAME).exists()


def test_second_build_in_this_process_is_refused_and_our_old_pid_is_not_trusted(tmp_path, manifest):
    import os

    out = tmp_path / "out"
    out.mkdir()
    with build_lock(out):
        assert (out / LOCK_NAME).read_text().split() == [str(os.getpid()), socket.gethostname()]
        with pytest.raises(DataError, match=f"in use by process {os.getpid()}"):
            build_shards(ManifestSource(manifest), out, **SHARD_OPTS)
    assert not (out / LOCK_NAME).exists()
    # our PID, but written by an earlier life of this PID (e.g. a restarted container): debris
    (out / LOCK_NAME).write_text(f"{os.getpid()} {socket.gethostname()}\n")
    assert build_shards(ManifestSource(manifest), out, **SHARD_OPTS)["counts"]["written"] == 24


def test_a_lock_from_another_machine_is_respected(tmp_path):
    (tmp_path / LOCK_NAME).write_text("12345 some-other-host\n")
    with pytest.raises(DataError, match="process 12345 on some-other-host"):
        with build_lock(tmp_path):
            pass
