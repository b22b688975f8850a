"""Folders the toolkit shares with a user and with other runs of itself.

Every test runs the real command (click's CliRunner on `cxrdist`, or a child process that is killed at a chosen
point) and holds it to four rules: one writer per shard set at a time; a run stopped anywhere leaves a folder that
is either complete or finished by the next run, which says so; nothing is deleted that the toolkit did not
create; and a failure is one `Error: ` line naming the thing, with nothing half-written left behind.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cxrdist.data.index import verify_checksums
from cxrdist.errors import DataError
from support.robustness import Plan, Result, error_line, invoke, snapshot
from support.training import QUICK, REPO, child_env

PHANTOM = ["--n", "24", "--size", "32", "--folds", "2", "--test-fraction", "0.25", "--shard-size", "4",
           "--workers", "1"]
CACHE = ["--pretrained", "preset:tiny", "--batch-size", "8"]
LOCK = ".cxrdist-build.lock"


def run_cli(*argv):
    return invoke(Plan([str(a) for a in argv]))


INFO_LINE = re.compile(r"^\d\d:\d\d:\d\d INFO ")  # export's progress log, beside its one error line


def error_after_info(result) -> str:
    """error_line, once the INFO log lines a command prints on its way there are set aside."""
    kept = "\n".join(line for line in result.output.splitlines() if not INFO_LINE.match(line))
    return error_line(Result(result.exit_code, kept, result.exc_info))


def ok(result) -> str:
    assert result.exc_info is None and result.exit_code == 0, result.output
    return result.output


def index_of(folder: Path) -> dict:
    return json.loads((folder / "index.json").read_text(encoding="utf-8"))


def leftovers(folder: Path) -> list[str]:
    """Temporary names of ours anywhere under `folder` (files and folders)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.endswith(".cxrdist-tmp"))


def shards_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def forbid_vae_load(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the VAE must not load for this case")

    monkeypatch.setattr("cxrdist.models.loading.load_vae", refuse)


def run_child(script: str, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *map(str, args)], cwd=REPO,
                          env=child_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A 32 px phantom set (24 images in 6 shards), built once through the CLI; tests copy it."""
    out = tmp_path_factory.mktemp("built") / "set"
    ok(run_cli("shard", "phantom", "--out", out, *PHANTOM))
    return out


@pytest.fixture(scope="module")
def cached(tmp_path_factory, built) -> Path:
    """The same set with latents of preset:tiny's VAE, cached through the CLI."""
    out = tmp_path_factory.mktemp("cached") / "set"
    shutil.copytree(built, out)
    ok(run_cli("shard", "cache-latents", out, *CACHE))
    return out


@pytest.fixture
def fresh(tmp_path, built) -> Path:
    out = tmp_path / "set"
    shutil.copytree(built, out)
    return out


@pytest.fixture
def fresh_cached(tmp_path, cached) -> Path:
    out = tmp_path / "set"
    shutil.copytree(cached, out)
    return out


# ---- 1. one writer per shard set ---------------------------------------------------------------------------
def test_cache_latents_refuses_a_held_set_before_the_vae_loads(fresh, other_process, monkeypatch):
    forbid_vae_load(monkeypatch)
    (fresh / LOCK).write_text(f"{other_process.pid} {socket.gethostname()}\n")
    before = snapshot([fresh])
    line = error_line(run_cli("shard", "cache-latents", fresh, *CACHE))
    assert f"{fresh} is in use by process {other_process.pid}" in line and "cache-latents" in line
    assert snapshot([fresh]) == before


def test_a_build_resume_is_refused_while_cache_latents_holds_the_set(fresh):
    from cxrdist.data.sharding.lock import build_lock

    before = shards_of(fresh)
    with build_lock(fresh, elsewhere="shard set"):  # what cache-latents holds while it runs
        line = error_line(run_cli("shard", "phantom", "--out", fresh, *PHANTOM, "--resume"))
    assert f"is in use by process {os.getpid()}" in line
    assert shards_of(fresh) == before and not (fresh / LOCK).exists()


def test_two_cache_latents_at_once_one_line_each_and_the_set_verifies(fresh):
    command = [sys.executable, "-c", "from cxrdist.cli import main; main()", "shard", "cache-latents", str(fresh),
               *CACHE]
    procs = [subprocess.Popen(command, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    for proc, output in zip(procs, outputs):
        assert "Traceback" not in output, output
        if proc.returncode:
            lines = [line for line in output.splitlines() if line.startswith("Error: ")]
            assert len(lines) == 1 and "is in use by process" in lines[0], output
    assert any(proc.returncode == 0 for proc in procs), outputs
    assert verify_checksums(fresh) == [] and index_of(fresh)["latents"]["base"] == "preset:tiny"
    assert not (fresh / LOCK).exists() and leftovers(fresh) == []


# ---- 2. a cache-latents stopped while swapping shards in ----------------------------------------------------
KILL_IN_SWAP = """
    import os, signal, sys
    from pathlib import Path
    root, real = Path(sys.argv[1]), os.replace
    def replace_then_die(src, dst, *args, **kwargs):
        real(src, dst, *args, **kwargs)
        if Path(dst).parent == root:  # the first shard is in the set, the others and index.json are not
            os.kill(os.getpid(), signal.SIGKILL)
    os.replace = replace_then_die
    from cxrdist.cli import main
    sys.argv = ["cxrdist", "shard", "cache-latents", sys.argv[1], "--pretrained", "preset:tiny"]
    main()
"""


@pytest.fixture
def stopped_in_swap(fresh) -> Path:
    done = run_child(KILL_IN_SWAP, fresh)
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr
    assert (fresh / ".parts" / "latents-swap.json").is_file()
    # the shards and index.json disagree until it finishes: a verification says how to finish it
    with pytest.raises(DataError, match="cache-latents was stopped while swapping in its shards"):
        verify_checksums(fresh, raise_on_error=False)
    return fresh


def test_inspect_verify_on_a_stopped_swap_names_the_rerun_that_finishes_it(stopped_in_swap):
    before = shards_of(stopped_in_swap)
    result = run_cli("shard", "inspect", stopped_in_swap, "--verify", "--no-preview")
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert result.exit_code != 0 and "Traceback" not in result.output and len(errors) == 1, result.output
    line = errors[0]  # after the set's summary, which inspect prints first
    assert "cache-latents was stopped while swapping in its shards" in line and "rebuild" not in line
    assert f"cxrdist shard cache-latents {stopped_in_swap} --pretrained preset:tiny" in line
    assert shards_of(stopped_in_swap) == before


def test_a_rerun_of_cache_latents_finishes_a_stopped_swap_and_says_so(stopped_in_swap, monkeypatch):
    out = ok(run_cli("shard", "cache-latents", stopped_in_swap, *CACHE))
    lines = [line for line in out.splitlines() if "finished the stopped cache-latents" in line]
    assert len(lines) == 1 and "cached latents" not in out  # same VAE: nothing left to encode
    assert verify_checksums(stopped_in_swap) == []
    assert index_of(stopped_in_swap)["latents"]["base"] == "preset:tiny"
    assert not (stopped_in_swap / ".parts" / "latents-swap.json").exists() and leftovers(stopped_in_swap) == []
    assert not (stopped_in_swap / LOCK).exists()  # the killed run's lock was taken over and released


def test_a_resumed_build_finishes_a_stopped_swap_and_keeps_the_latents(stopped_in_swap):
    out = ok(run_cli("shard", "phantom", "--out", stopped_in_swap, *PHANTOM, "--resume"))
    assert "finished the stopped cache-latents" in out and "already complete" in out
    assert verify_checksums(stopped_in_swap) == [] and "latents" in index_of(stopped_in_swap)
    assert leftovers(stopped_in_swap) == []


def test_training_on_a_stopped_swap_names_the_rerun_that_finishes_it(stopped_in_swap, tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--fold", "0", "--shards",
                           str(stopped_in_swap), "--output-dir", str(tmp_path / "run"),
                           *[arg for item in QUICK + ["data.image_size=32", "train.max_steps=1"]
                             for arg in ("--set", item)]],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode != 0 and "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, output
    assert "cache-latents was stopped while swapping" in lines[0]
    assert f"rerun `cxrdist shard cache-latents {stopped_in_swap} --pretrained preset:tiny`" in lines[0]


def test_a_run_stopped_before_the_swap_leaves_the_set_as_it_was(fresh):
    before = snapshot([fresh])
    done = run_child("""
        import os, signal, sys
        from cxrdist.data import latents
        real, calls = latents.write_tar, []
        def write_then_die(path, samples):
            calls.append(path)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(path, samples)
        latents.write_tar = write_then_die
        from cxrdist.cli import main
        sys.argv = ["cxrdist", "shard", "cache-latents", sys.argv[1], "--pretrained", "preset:tiny"]
        main()
    """, fresh)
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr
    staged = [p for p in (fresh / ".parts").iterdir() if p.name.endswith(".cxrdist-tmp")]
    assert len(staged) == 1 and not (fresh / ".parts" / "latents-swap.json").exists()
    assert {k: v for k, v in snapshot([fresh]).items() if ".cxrdist" not in k} == before
    assert verify_checksums(fresh) == []
    out = ok(run_cli("shard", "cache-latents", fresh, *CACHE))
    assert "cached latents" in out and "finished the stopped" not in out
    assert leftovers(fresh) == [] and verify_checksums(fresh) == []  # the staging folder went with the rerun


def test_ctrl_c_during_the_swap_waits_until_the_set_is_whole(fresh):
    from cxrdist.data.latents import cache_latents
    from cxrdist.models.loading import load_vae

    real = os.replace

    def replace_and_interrupt(src, dst, *args, **kwargs):
        real(src, dst, *args, **kwargs)
        if Path(dst).parent == fresh:  # the first shard is in the set, the others and index.json are not
            signal.raise_signal(signal.SIGINT)

    vae = load_vae("preset:tiny")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "replace", replace_and_interrupt)
        with pytest.raises(KeyboardInterrupt):
            cache_latents(fresh, vae, base="preset:tiny", progress=False)
    assert verify_checksums(fresh) == [] and index_of(fresh)["latents"]["base"] == "preset:tiny"
    assert not (fresh / ".parts" / "latents-swap.json").exists() and leftovers(fresh) == []


# ---- 3. a resumed build recognises what cache-latents changed -----------------------------------------------
def test_resume_of_a_finished_set_with_latents_leaves_it_alone(fresh_cached):
    before = snapshot([fresh_cached])
    out = ok(run_cli("shard", "phantom", "--out", fresh_cached, *PHANTOM, "--resume"))
    assert f"{fresh_cached} is already complete" in out and "rebuilt" not in out.replace("nothing was rebuilt", "")
    assert snapshot([fresh_cached]) == before


def test_resume_accepts_shards_cache_latents_rewrote_even_when_their_stats_are_older(fresh_cached, built):
    for stats in (built / ".parts").glob("*-*.json"):  # stats as a cache-latents that did not update them left
        shutil.copy(stats, fresh_cached / ".parts" / stats.name)
    before = shards_of(fresh_cached)
    out = ok(run_cli("shard", "phantom", "--out", fresh_cached, *PHANTOM, "--resume"))
    assert "this run processed 0 images" in out and "damaged" not in out
    assert shards_of(fresh_cached) == before and index_of(fresh_cached)["latents"]["base"] == "preset:tiny"
    assert verify_checksums(fresh_cached) == []


def test_resume_rebuilds_a_damaged_latents_shard_and_says_the_latents_must_be_cached_again(fresh_cached, built):
    victim = sorted(fresh_cached.glob("fold0-*.tar"))[0]
    victim.write_bytes(victim.read_bytes()[:-512])
    out = ok(run_cli("shard", "phantom", "--out", fresh_cached, *PHANTOM, "--resume"))
    assert "1 damaged shards rebuilt" in out and "rerun `cxrdist shard cache-latents" in out
    assert "latents" not in index_of(fresh_cached) and verify_checksums(fresh_cached) == []
    assert victim.read_bytes() == (built / victim.name).read_bytes()


# ---- 4. a sample run stopped while finishing its folder -----------------------------------------------------
KILL_IN_MOVES = """
    import os, signal, sys
    import numpy as np
    real, moved = os.replace, []
    def replace_then_die(src, dst, *args, **kwargs):
        real(src, dst, *args, **kwargs)
        if str(dst).endswith(".png"):
            moved.append(dst)
            if len(moved) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
    os.replace = replace_then_die
    from cxrdist.sampling.output import write_samples
    images = np.random.default_rng(0).random((4, 16, 16)).astype(np.float32)
    write_samples(sys.argv[1], images, [{"seed": i, "report": f"report {i}"} for i in range(4)])
"""


def _samples(n: int = 3):
    images = np.random.default_rng(1).random((n, 16, 16)).astype(np.float32)
    return images, [{"seed": 7 + i, "report": f"report {i}"} for i in range(n)]


def test_a_rerun_finishes_a_sample_folder_whose_moves_were_stopped_and_says_so(tmp_path, ctx):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # a used folder: the files are moved in one by one
    done = run_child(KILL_IN_MOVES, out)
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr
    assert not (out / "index.jsonl").exists()
    ctx.forbid_model_load()
    line = error_line(run_cli("sample", "--model-path", ctx.fixture("tiny_adapter"), "--description", "x",
                              "--out", out))
    assert "finished it" in line and "choose a new folder" in line
    rows = [json.loads(r) for r in (out / "index.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all((out / row["file"]).is_file() for row in rows) and (out / "grid.png").is_file()
    assert (out / "notes.txt").read_text() == "mine" and leftovers(out) == [] and not ctx.model_loads
    assert sorted(p.name for p in out.iterdir()) == sorted([row["file"] for row in rows]
                                                           + ["grid.png", "index.jsonl", "notes.txt"])


def test_a_new_sample_folder_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    from cxrdist.sampling.output import write_samples

    images, records = _samples()

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(os, "rename", stopped)
        with pytest.raises(KeyboardInterrupt):
            write_samples(tmp_path / "new", images, records)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a staging folder beside it
    files = write_samples(tmp_path / "new", images, records)
    assert [p.name for p in files] == ["0000_s7.png", "0001_s8.png", "0002_s9.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]


def test_an_empty_folder_is_filled_and_a_link_to_one_is_followed(tmp_path):
    from cxrdist.sampling.output import write_samples

    images, records = _samples()
    empty = tmp_path / "empty"
    empty.mkdir()
    write_samples(empty, images, records)
    assert (empty / "index.jsonl").is_file() and leftovers(tmp_path) == []
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    write_samples(tmp_path / "link", images, records)
    assert (tmp_path / "link").is_symlink() and (target / "index.jsonl").is_file()


def test_sample_keeps_a_users_partial_folder_inside_out(tmp_path):
    from cxrdist.sampling.output import write_samples

    out = tmp_path / "out"
    (out / ".partial-mine").mkdir(parents=True)
    (out / ".partial-mine" / "draft.png").write_bytes(b"mine")
    write_samples(out, *_samples())
    assert (out / ".partial-mine" / "draft.png").read_bytes() == b"mine" and leftovers(out) == []


# ---- 5. nothing deleted that the toolkit did not create -----------------------------------------------------
def test_export_merge_keeps_a_users_folder_named_like_the_old_temporary(tmp_path, ctx):
    out = tmp_path / "D2"
    mine = tmp_path / "D2.partial"
    mine.mkdir()
    (mine / "thesis.txt").write_text("mine")
    ok(run_cli("export", "--model-path", ctx.fixture("tiny_adapter"), "--format", "merged", "--out", out))
    assert (mine / "thesis.txt").read_text() == "mine" and (out / "model_index.json").is_file()
    assert leftovers(tmp_path) == []


def test_shard_build_keeps_a_users_tmp_files(tmp_path):
    out = tmp_path / "D4"
    out.mkdir()
    (out / "paper-draft.tmp").write_text("mine")
    ok(run_cli("shard", "phantom", "--out", out, *PHANTOM))
    ok(run_cli("shard", "phantom", "--out", out, *PHANTOM, "--resume"))
    assert (out / "paper-draft.tmp").read_text() == "mine"


def test_a_resumed_build_removes_only_the_temporaries_its_own_shards_were_written_under(tmp_path, built):
    out = tmp_path / "set"
    shutil.copytree(built, out)
    (out / "index.json").unlink()  # an interrupted build
    ours = [out / "fold0-000000.tar.tmp", out / ".fold1-000001.tar.4242-0123abcd.cxrdist-tmp",
            out / ".parts" / ".plan.json.99-deadbeef.cxrdist-tmp"]
    theirs = [out / "paper-draft.tmp", out / "fold0-000000.tar.bak.tmp", out / ".notes.1-0123abcd.cxrdist-tmp",
              out / "fold9-000000.tar.tmp"]  # the last is no shard of this plan
    for path in ours + theirs:
        path.write_bytes(b"x")
    out_text = ok(run_cli("shard", "phantom", "--out", out, *PHANTOM, "--resume"))
    assert "this run processed 0 images" in out_text
    assert [p for p in ours if p.exists()] == [] and all(p.read_bytes() == b"x" for p in theirs)


def test_iu_extraction_keeps_a_users_partial_folder(tmp_path):
    from cxrdist.data.sources.download import safe_extract

    archive = tmp_path / "a.tgz"
    source = tmp_path / "src" / "a"
    source.mkdir(parents=True)
    (source / "r.txt").write_text("report")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname="a")
    mine = tmp_path / "dest.partial"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    assert (safe_extract(archive, tmp_path / "dest") / "a" / "r.txt").read_text() == "report"
    assert (mine / "keep.txt").read_text() == "mine" and leftovers(tmp_path) == []


def test_export_zip_keeps_a_users_file_named_like_the_old_temporary(tmp_path, ctx):
    out = tmp_path / "x.zip"
    (tmp_path / "x.zip.partial").write_text("mine")
    ok(run_cli("export", "--model-path", ctx.fixture("tiny_adapter"), "--format", "zip", "--out", out))
    assert (tmp_path / "x.zip.partial").read_text() == "mine" and out.is_file() and leftovers(tmp_path) == []


# ---- 6. one-line errors, nothing half-written left ----------------------------------------------------------
def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_during_export_merge_is_one_line_and_leaves_nothing(tmp_path, ctx):
    from diffusers import StableDiffusionPipeline

    def save_then_fill(self, folder, **kwargs):
        Path(folder).mkdir(parents=True)
        (Path(folder) / "model_index.json").write_text("{}")
        _full_disk()

    ctx.monkeypatch.setattr(StableDiffusionPipeline, "save_pretrained", save_then_fill)
    out = tmp_path / "deeper" / "merged"
    line = error_after_info(run_cli("export", "--model-path", ctx.fixture("tiny_adapter"), "--format", "merged", "--out", out))
    assert "disk full while writing the merged pipeline" in line and str(out) in line
    assert list(tmp_path.iterdir()) == []  # no folder, no temporary, not even the parent it made


def test_disk_full_during_export_zip_is_one_line_and_leaves_nothing(tmp_path, ctx):
    import zipfile

    ctx.monkeypatch.setattr(zipfile.ZipFile, "write", _full_disk)
    out = tmp_path / "x.zip"
    line = error_after_info(run_cli("export", "--model-path", ctx.fixture("tiny_adapter"), "--format", "zip", "--out", out))
    assert f"disk full while writing {out}" in line and list(tmp_path.iterdir()) == []


def test_export_zip_into_a_missing_folder_is_one_line(tmp_path, ctx):
    out = tmp_path / "missing" / "dir" / "x.zip"
    line = error_after_info(run_cli("export", "--model-path", ctx.fixture("tiny_adapter"), "--format", "zip", "--out", out))
    assert f"the parent folder {out.parent} does not exist" in line and list(tmp_path.iterdir()) == []


def test_export_without_a_format_is_refused_in_one_line(tmp_path, ctx):
    ctx.forbid_model_load()
    line = error_line(run_cli("export", "--model-path", ctx.fixture("tiny_adapter"), "--out", tmp_path / "x"))
    assert "--format" in line and list(tmp_path.iterdir()) == [] and not ctx.model_loads


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_cache_latents_on_a_read_only_set_is_one_line_naming_it(fresh, monkeypatch):
    forbid_vae_load(monkeypatch)
    before = snapshot([fresh])
    os.chmod(fresh, 0o555)
    try:
        line = error_line(run_cli("shard", "cache-latents", fresh, *CACHE))
    finally:
        os.chmod(fresh, 0o755)
    assert f"cannot write to {fresh}" in line and snapshot([fresh]) == before


def test_cache_latents_on_a_read_only_mount_is_one_line_naming_it(fresh, monkeypatch):
    forbid_vae_load(monkeypatch)
    real = Path.write_bytes

    def read_only_mount(self, data):
        if str(self).startswith(str(fresh)):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", read_only_mount)
    before = snapshot([fresh])
    line = error_line(run_cli("shard", "cache-latents", fresh, *CACHE))
    assert f"cannot write to {fresh} (Read-only file system)" in line and snapshot([fresh]) == before


def test_disk_full_during_cache_latents_is_one_line_and_the_set_is_unchanged(fresh, monkeypatch):
    from cxrdist.data import latents

    real, calls = latents.write_tar, []

    def fill_at_third(path, samples):
        calls.append(path)
        if len(calls) == 3:
            _full_disk()
        return real(path, samples)

    monkeypatch.setattr(latents, "write_tar", fill_at_third)
    before = snapshot([fresh])
    line = error_line(run_cli("shard", "cache-latents", fresh, *CACHE))
    assert f"disk full while caching latents in {fresh}" in line and "unchanged" in line
    assert snapshot([fresh]) == before


def test_a_really_full_disk_during_cache_latents_is_one_line_and_the_set_is_unchanged(tmp_path, built):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        fresh = mount / "set"
        shutil.copytree(built, fresh)
        stats = os.statvfs(mount)
        with open(mount / "filler", "wb") as handle:  # room for a shard or two with latents, not for all six
            handle.write(b"\0" * (stats.f_bavail * stats.f_frsize - 24 * 1024))
        before = snapshot([fresh])
        line = error_line(run_cli("shard", "cache-latents", fresh, *CACHE))
        assert f"disk full while caching latents in {fresh}" in line
        assert snapshot([fresh]) == before
        (mount / "filler").unlink()
        ok(run_cli("shard", "cache-latents", fresh, *CACHE))
        assert verify_checksums(fresh) == [] and "latents" in index_of(fresh)
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
