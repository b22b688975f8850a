"""cxrdist.locks: one holder per folder, a dead holder's lock taken over by exactly one of several racers, a
requeued SLURM job's earlier start recognised as gone, and the holder's lock never removed by another."""
from __future__ import annotations

import multiprocessing
import os
import socket

import pytest

from cxrdist.errors import DataError
from cxrdist.locks import TAKEOVER_SUFFIX, folder_lock
from support.lock_holders import dead_pid

KW = dict(busy="used", wait="it", elsewhere="folder", error=DataError)


def _race(folder: str, start, done, results) -> None:
    start.wait()
    try:
        with folder_lock(folder, "x.lock", **KW):
            results.put("won")
            done.wait(60)  # hold the lock until every racer has tried
    except DataError as exc:
        results.put(str(exc))


@pytest.mark.parametrize("stale", [False, True], ids=["empty folder", "dead holder's lock"])
def test_of_racers_started_at_one_instant_exactly_one_holds_the_folder(tmp_path, stale):
    if stale:
        (tmp_path / "x.lock").write_text(f"{dead_pid()} {socket.gethostname()}\n")
    racers = 6
    ctx = multiprocessing.get_context("fork")
    start, done, results = ctx.Barrier(racers), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path), start, done, results)) for _ in range(racers)]
    for proc in procs:
        proc.start()
    try:
        outcomes = [results.get(timeout=60) for _ in range(racers)]
    finally:
        done.set()
    for proc in procs:
        proc.join(timeout=60)
    assert outcomes.count("won") == 1, outcomes
    assert all("is used by process" in o for o in outcomes if o != "won")
    assert not (tmp_path / "x.lock").exists() and not (tmp_path / ("x.lock" + TAKEOVER_SUFFIX)).exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".cxrdist-tmp")]


def test_an_earlier_start_of_this_requeued_slurm_job_is_gone(tmp_path, monkeypatch):
    (tmp_path / "x.lock").write_text("4242 node-a 777 0\n")  # another host: unknowable, unless it is our job
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    with pytest.raises(DataError, match="is used by process 4242 on node-a"):
        with folder_lock(tmp_path, "x.lock", **KW):
            pass
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with folder_lock(tmp_path, "x.lock", **KW) as lock:
        assert lock.read_text().split() == [str(os.getpid()), socket.gethostname(), "777", "1"]
    assert not (tmp_path / "x.lock").exists()


def test_a_takeover_marker_left_by_a_killed_process_is_one_line(tmp_path):
    (tmp_path / "x.lock").write_text(f"{dead_pid()} {socket.gethostname()}\n")
    marker = tmp_path / ("x.lock" + TAKEOVER_SUFFIX)
    marker.write_text("")
    os.utime(marker, (0, 0))
    with pytest.raises(DataError, match="was left by a process stopped while taking over"):
        with folder_lock(tmp_path, "x.lock", **KW):
            pass
    assert marker.exists()  # not ours to remove


def test_a_lock_replaced_while_held_is_not_removed_by_the_first_holder(tmp_path):
    with folder_lock(tmp_path, "x.lock", **KW) as lock:
        lock.write_text("1 some-other-host\n")
    assert lock.read_text() == "1 some-other-host\n"
