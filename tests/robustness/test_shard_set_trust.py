"""Hostile shard sets: an index.json or shard that is not what the builder wrote, from a folder, a URL or a pipe:
command. Nothing in one runs a command, reads outside the set, grows the process without bound or paints the
terminal; each way it can go wrong is one `Error: ` line naming the thing, and the set is left as it was.

The case table runs the real commands (click's CliRunner on `cxrdist shard inspect` / `cache-latents`, or
`python launch/train.py`); the tests after it hold the loaders training uses to the same.
"""
from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import http.server
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest

from cxrdist.data import storage
from cxrdist.data.index import latents_record, load_index
from cxrdist.data.loader import batches_per_epoch, eval_loader, train_loader, train_reports
from cxrdist.data.tars import read_samples, write_tar
from cxrdist.errors import DataError
from support.http_shards import serve
from support.robustness import REPO, Case, Ctx, Plan, Result, escaped_traceback, mount_tmpfs, params, run_case
from support.trust import Payload

SHELL_NAME = "test-000000.tar; touch PWNED; echo "  # a shard name that is also a shell command
FIRST_TEST_SHARD = "test-000000.tar"


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory) -> Path:
    """12 phantoms at 16 px: test-000000.tar (3 samples), fold0-00000{0,1}.tar, fold1-000000.tar."""
    from cxrdist.data.shard import build_shards
    from cxrdist.data.sources.phantom import PhantomSource

    out = tmp_path_factory.mktemp("trust") / "set"
    build_shards(PhantomSource(12, size=16), out, size=16, folds=2, test_fraction=0.25, seed=0, shard_size=4,
                 workers=1, progress=False)
    return out


# ---- building hostile sets ---------------------------------------------------------------------------------

def _copy(ctx: Ctx, name: str = "set", into: Path | None = None) -> Path:
    return Path(shutil.copytree(ctx.fixture("shard_set"), (into or ctx.tmp) / name))


def _edit_index(folder: Path, change: Callable[[dict], None]) -> None:
    data = json.loads((folder / "index.json").read_text(encoding="utf-8"))
    change(data)
    (folder / "index.json").write_text(json.dumps(data), encoding="utf-8")


def _first_test_shard(data: dict) -> dict:
    return data["splits"]["test"]["shards"][0]


def _rename_first_test_shard(new_name: str) -> Callable[[dict], None]:
    return lambda data: _first_test_shard(data).update(name=new_name)


def _replace_shard(folder: Path, data: bytes, name: str = FIRST_TEST_SHARD) -> None:
    """Write `data` as shard `name` and record its real size and sha256, so only the content is hostile."""
    (folder / name).write_bytes(data)

    def record(index: dict) -> None:
        for split in index["splits"].values():
            for entry in split["shards"]:
                if entry["name"] == name:
                    entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    _edit_index(folder, record)


def _rewrite_samples(folder: Path, change: Callable[[str, dict[str, bytes]], tuple[str, dict[str, bytes]]],
                     name: str = FIRST_TEST_SHARD) -> None:
    samples = [change(key, parts) for key, parts in read_samples(folder / name)]
    staging = folder.parent / "staging.tar"
    write_tar(staging, samples)
    data = staging.read_bytes()
    staging.unlink()
    _replace_shard(folder, data, name)


def _tar_with_header(size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    """A tar whose first header announces `size` bytes, followed by a little data and no more."""
    info = tarfile.TarInfo("phantom-0.png" if kind == tarfile.REGTYPE else "././@PaxHeader")
    info.size, info.type = size, kind
    return info.tobuf(format=tarfile.USTAR_FORMAT) + b"\x89PNG" + b"\0" * 1020


def _fifo_shard(folder: Path, name: str = FIRST_TEST_SHARD) -> None:
    (folder / name).unlink()
    os.mkfifo(folder / name)


# ---- HTTP servers that misbehave ---------------------------------------------------------------------------

class _HostileHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the folder, except the `endless` names (their bytes, then filler that never ends) and the `cut`
    names (a Content-Length for the whole file, then half of it, then a closed connection)."""

    endless: frozenset = frozenset()
    cut: frozenset = frozenset()

    def do_GET(self) -> None:
        name = self.path.rsplit("/", 1)[-1]
        if name not in self.endless | self.cut:
            return super().do_GET()
        file = Path(self.translate_path(self.path))
        data = file.read_bytes() if file.is_file() else b""
        self.send_response(200)
        if name in self.cut:
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:len(data) // 2])
            return
        self.end_headers()
        filler = (b" " if name.endswith(".json") else b"\0") * 65536  # blanks after JSON keep it valid JSON
        with contextlib.suppress(OSError):  # the reader hung up
            self.wfile.write(data)
            while True:
                self.wfile.write(filler)

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def _serve_hostile(folder: Path, endless: tuple[str, ...] = (), cut: tuple[str, ...] = ()) -> Iterator[str]:
    handler = type("Handler", (_HostileHandler,), {"endless": frozenset(endless), "cut": frozenset(cut)})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder.parent)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/{folder.name}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _served(ctx: Ctx, folder: Path, **hostile) -> str:
    """The URL of `folder`, served until the case ends."""
    stack = contextlib.ExitStack()
    ctx.request.addfinalizer(stack.close)
    return stack.enter_context(_serve_hostile(folder, **hostile))


# ---- the case table ----------------------------------------------------------------------------------------

@dataclass
class SetCase(Case):
    summary: bool = False  # the index was fine: inspect's summary (and BAD lines) may come before the Error line


def _inspect(target, *flags) -> list:
    return ["shard", "inspect", str(target), *flags]


def _refused_index(change: Callable[[dict], None], pipe: bool = False):
    """A copy of the set whose index.json `change` made hostile, inspected (with --verify) as a folder or through
    `pipe:cat <folder>/{}`."""
    def setup(ctx: Ctx) -> Plan:
        folder = _copy(ctx)
        _edit_index(folder, change)
        target = f"pipe:cat {folder}/{{}}" if pipe else folder
        return Plan(_inspect(target, "--verify", "--no-preview"), keep=[folder])
    return setup


def _shell_name_over_http(ctx: Ctx) -> Plan:
    folder = _copy(ctx)
    _edit_index(folder, _rename_first_test_shard(SHELL_NAME))
    url = _served(ctx, folder)
    return Plan(_inspect(f"pipe:curl -sf {url}/{{}}", "--verify", "--no-preview"), keep=[folder])


def _shell_name_in_training(ctx: Ctx) -> Plan:
    folder = _copy(ctx)
    _edit_index(folder, _rename_first_test_shard(SHELL_NAME))
    out = ctx.tmp / "run"
    return Plan(["--fold", "0", "--shards", f"pipe:cat {folder}/{{}}", "--output-dir", out], keep=[folder],
                absent=[out, REPO / "PWNED"], runner="train")


def _names_unchecked(name: str, pipe: bool):
    """The index check switched off: storage.member alone stands between the name and the shell or the disk."""
    def setup(ctx: Ctx) -> Plan:
        ctx.monkeypatch.setattr("cxrdist.data.index._check_names", lambda path, index: None)
        plan = _refused_index(_rename_first_test_shard(name), pipe=pipe)(ctx)
        victim = _copy(ctx, "victim")
        return Plan(plan.argv, keep=[*plan.keep, victim])
    return setup


def _outside_the_set(name_of: Callable[[Path], str], command: str):
    """The first test shard named as a file of another set (`victim`), which must be neither read nor rewritten."""
    def setup(ctx: Ctx) -> Plan:
        folder, victim = _copy(ctx), _copy(ctx, "victim")
        _edit_index(folder, _rename_first_test_shard(name_of(victim)))
        argv = (_inspect(folder, "--verify", "--no-preview") if command == "inspect"
                else ["shard", "cache-latents", folder, "--pretrained", "preset:tiny"])
        return Plan(argv, keep=[folder, victim])
    return setup


def _endless_index(ctx: Ctx) -> Plan:
    ctx.monkeypatch.setattr(storage, "MAX_INDEX_BYTES", 1 << 20)  # the same check as at 64 MiB, sooner
    folder = _copy(ctx)
    return Plan(_inspect(_served(ctx, folder, endless=("index.json",)), "--no-preview"), keep=[folder])


def _index_over_the_limit(ctx: Ctx) -> Plan:
    ctx.monkeypatch.setattr(storage, "MAX_INDEX_BYTES", 1 << 20)
    folder = _copy(ctx)
    with open(folder / "index.json", "a", encoding="utf-8") as handle:
        handle.write(" " * (1 << 20))  # still valid JSON: only the size is wrong
    return Plan(_inspect(folder, "--no-preview"), keep=[folder])


def _fifo_index(ctx: Ctx) -> Plan:
    folder = _copy(ctx)
    (folder / "index.json").unlink()
    os.mkfifo(folder / "index.json")
    return Plan(_inspect(folder, "--no-preview"), keep=[folder])


def _fifo_shard_case(*flags):
    def setup(ctx: Ctx) -> Plan:
        folder = _copy(ctx)
        _fifo_shard(folder)
        preview = ctx.tmp / "p.png"
        return Plan(_inspect(folder, *flags, "--preview", preview), keep=[folder], absent=[preview],
                    check=lambda result: "--verify" not in flags or _bad_line(result, r"is a FIFO, not a shard file"))
    return setup


def _endless_shard_over_http(ctx: Ctx) -> Plan:
    folder = _copy(ctx)
    url = _served(ctx, folder, endless=(FIRST_TEST_SHARD,))
    return Plan(_inspect(url, "--verify", "--preview", ctx.tmp / "p.png"), keep=[folder], absent=[ctx.tmp / "p.png"],
                check=lambda result: _bad_line(result, rf"{FIRST_TEST_SHARD} holds more than \d+ bytes"))


def _hostile_shard(data: Callable[[Ctx], bytes], *flags, patch: Callable[[Ctx], None] = lambda ctx: None):
    """The first test shard replaced by `data` (index.json records its real size and sha256), then inspected."""
    def setup(ctx: Ctx) -> Plan:
        patch(ctx)
        folder = _copy(ctx)
        _replace_shard(folder, data(ctx))
        preview = ctx.tmp / "p.png"
        return Plan(_inspect(folder, "--preview", preview, *flags), keep=[folder], absent=[preview])
    return setup


def _pax_header_of(size: int) -> Callable[[Ctx], bytes]:
    return lambda ctx: _tar_with_header(size, tarfile.XHDTYPE)


def _gzipped_shard(ctx: Ctx) -> bytes:
    return gzip.compress((ctx.fixture("shard_set") / FIRST_TEST_SHARD).read_bytes())


def _few_members(ctx: Ctx) -> None:
    ctx.monkeypatch.setattr("cxrdist.data.tars.MAX_MEMBERS", 5)  # a test shard of 3 samples has 9


def _unchanged(ctx: Ctx) -> bytes:
    return (ctx.fixture("shard_set") / FIRST_TEST_SHARD).read_bytes()


ESCAPES = "\x1b]0;owned\x07\x1b[2J\r\x1b[1A\u202e"


def _escapes_in_the_index(ctx: Ctx) -> Plan:
    folder = _copy(ctx)

    def change(data: dict) -> None:
        data["source"] = f"phantom{ESCAPES}"
        data["options"]["resize_mode"] = "pad\x1b[31m"
        data["rejects"] = {"unreadable\x1b[8m": 1}
        data["source_summary"] = {"note\n": "x\x9b2J"}
        data["splits"]["test"]["labels"] = {"Cardiomégalie 心脏肥大\x1b[0m": 2}
    _edit_index(folder, change)

    def check(result: Result) -> None:
        assert result.exit_code == 0, result.output
        assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u202e]", result.output), repr(result.output)
        assert r"phantom\x1b]0;owned\x07\x1b[2J\r\x1b[1A\u202e" in result.output
        assert r"Cardiomégalie 心脏肥大\x1b[0m 2" in result.output  # letters of any script as they are
        assert r"note\n x\x9b2J" in result.output
    return Plan(_inspect(folder, "--no-preview"), keep=[folder], check=check)


def _without_png(key_prefix: str = ""):
    def setup(ctx: Ctx) -> Plan:
        folder = _copy(ctx)
        _rewrite_samples(folder, lambda key, parts: (key_prefix + key, {e: b for e, b in parts.items() if e != "png"}))
        preview = ctx.tmp / "p.png"
        return Plan(_inspect(folder, "--preview", preview), keep=[folder], absent=[preview])
    return setup


def _http_cut(*flags):
    def setup(ctx: Ctx) -> Plan:
        folder = _copy(ctx)
        url = _served(ctx, folder, cut=(FIRST_TEST_SHARD,))
        preview = ctx.tmp / "p.png"
        return Plan(_inspect(url, "--preview", preview, *flags), keep=[folder], absent=[preview])
    return setup


def _read_only_preview_folder(ctx: Ctx) -> Plan:
    """The shard set on a read-only mount: the default preview beside it cannot be written."""
    mount = mount_tmpfs(ctx, "ro", "4m")
    folder = _copy(ctx, into=mount)
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True, capture_output=True)
    return Plan(_inspect(folder), keep=[folder])


def _preview_under_a_file(ctx: Ctx) -> Plan:
    folder = _copy(ctx)
    (ctx.tmp / "file").write_text("a file, not a folder")
    return Plan(_inspect(folder, "--preview", ctx.tmp / "file" / "p.png"), keep=[folder, ctx.tmp / "file"])


def _bad_line(result: Result, pattern: str) -> None:
    bad = [line for line in result.output.splitlines() if line.startswith("BAD  ")]
    assert bad and re.search(pattern, bad[0]), result.output


NAME_REFUSED = r"this is not an index the shard builder wrote; rebuild the shard set"

INJECTION_CASES = [
    SetCase("pipe-shard-name-is-a-command", _refused_index(_rename_first_test_shard(SHELL_NAME), pipe=True),
            rf"split test names shard 'test-000000\.tar; touch PWNED; echo ', not test-NNNNNN\.tar: {NAME_REFUSED}"),
    SetCase("pipe-over-http-shard-name-is-a-command", _shell_name_over_http, r"names shard 'test-000000\.tar; touch"),
    SetCase("train-pipe-shard-name-is-a-command", _shell_name_in_training, r"names shard 'test-000000\.tar; touch"),
    SetCase("pipe-split-name-is-a-command",
            _refused_index(lambda d: d["splits"].update({"test; touch PWNED": d["splits"].pop("test")}), pipe=True),
            r"split 'test; touch PWNED' is neither test nor fold0\.\.fold1"),
    SetCase("shard-name-of-another-split", _refused_index(_rename_first_test_shard("fold0-000000.tar")),
            r"split test names shard 'fold0-000000\.tar', not test-NNNNNN\.tar"),
    SetCase("shard-number-in-other-digits", _refused_index(_rename_first_test_shard("test-\u0660\u0661\u0662\u0663\u0664"
                                                                                    "\u0665.tar")),
            r"names shard 'test-\u0660"),
    SetCase("shard-listed-twice", _refused_index(lambda d: d["splits"]["fold0"]["shards"].append(
        dict(d["splits"]["fold0"]["shards"][0]))), r"shard fold0-000000\.tar is listed twice"),
    SetCase("shard-without-size", _refused_index(lambda d: _first_test_shard(d).pop("bytes")),
            r"shard test-000000\.tar has no sample count, size and sha256"),
    SetCase("unchecked-names-pipe-command-refused-by-member", _names_unchecked(SHELL_NAME, pipe=True),
            r"file name 'test-000000\.tar; touch PWNED; echo ' is not one plain word for the shell", summary=True),
    SetCase("unchecked-names-option-refused-by-member", _names_unchecked("-n", pipe=True),
            r"file name '-n' is not one plain word for the shell", summary=True),
]

ESCAPE_CASES = [
    SetCase("pipe-shard-name-leaves-the-set", _names_unchecked("../victim/test-000000.tar", pipe=True),
            r"'\.\./victim/test-000000\.tar' is not a file name of the set", summary=True),
    SetCase("unchecked-names-shard-leaves-the-set", _names_unchecked("../victim/test-000000.tar", pipe=False),
            r"'\.\./victim/test-000000\.tar' is not a file name of the set", summary=True),
    SetCase("inspect-verify-shard-in-another-set", _outside_the_set(lambda v: "../victim/test-000000.tar", "inspect"),
            r"names shard '\.\./victim/test-000000\.tar', not test-NNNNNN\.tar"),
    SetCase("cache-latents-rewrites-another-set", _outside_the_set(lambda v: "../victim/test-000000.tar", "latents"),
            r"names shard '\.\./victim/test-000000\.tar'"),
    SetCase("absolute-shard-name", _outside_the_set(lambda v: str(v / FIRST_TEST_SHARD), "inspect"),
            r"names shard '/.*victim/test-000000\.tar'"),
    SetCase("shard-name-with-escape-codes", _refused_index(_rename_first_test_shard("\x1b[2J\x1b]0;x\x07test.tar")),
            r"names shard '\\x1b\[2J\\x1b\]0;x\\x07test\.tar'"),
]

BOUND_CASES = [
    SetCase("endless-index-over-http", _endless_index,
            r"index\.json holds more than 1048576 bytes: an index\.json holds at most 1 MiB"),
    SetCase("local-index-over-the-limit", _index_over_the_limit, r"index\.json holds more than 1048576 bytes"),
    SetCase("index-is-a-fifo", _fifo_index, r"index file .*index\.json is a FIFO, not a regular file",
            marks=(pytest.mark.timeout(60),)),
    SetCase("verify-shard-is-a-fifo", _fifo_shard_case("--verify"),
            r"1 of 4 shards failed verification", summary=True, marks=(pytest.mark.timeout(60),)),
    SetCase("preview-reads-a-fifo-shard", _fifo_shard_case(),
            r"shard set file .*test-000000\.tar is a FIFO", summary=True, marks=(pytest.mark.timeout(60),)),
    SetCase("endless-shard-over-http", _endless_shard_over_http, r"1 of 4 shards failed verification",
            summary=True),
    SetCase("member-header-claims-300-mib", _hostile_shard(lambda ctx: _tar_with_header(300 << 20)),
            r"member phantom-0\.png has 314572800 bytes, more than the 256 MiB a shard member may hold", summary=True),
    SetCase("pax-header-claims-1-gib", _hostile_shard(_pax_header_of(1 << 30)),
            r"has 1073741824 bytes, more than the 256 MiB", summary=True),
    SetCase("shard-with-too-many-members", _hostile_shard(_unchanged, patch=_few_members),
            r"test-000000\.tar has more than 5 members", summary=True),
    SetCase("gzipped-shard", _hostile_shard(_gzipped_shard), r"test-000000\.tar is not a readable shard",
            summary=True),
]

PRINT_CASES = [
    SetCase("escape-codes-in-index-text", _escapes_in_the_index, None),
    SetCase("latents-record-with-escape-codes",
            _refused_index(lambda d: d.update(latents={"vae_fingerprint": "\x1b[2J" + "0" * 12, "base": "x"})),
            r"the latents record \{'vae_fingerprint': '\\x1b\[2J0+', .*\} is not one cache-latents writes"),
]

ONE_LINE_CASES = [
    SetCase("http-shard-cut-mid-transfer-verify", _http_cut("--verify"), r"1 of 4 shards failed verification",
            summary=True),
    SetCase("http-shard-cut-mid-transfer-preview", _http_cut(),
            r"test-000000\.tar could not be read \(ClientPayloadError: .*\): check the location and the network",
            summary=True),
    SetCase("preview-on-a-read-only-mount", _read_only_preview_folder,
            r"cannot write the preview .*/set/preview\.png \(Read-only file system\): .*/set is not writable; "
            r"pass --preview", summary=True),
    SetCase("preview-under-a-file", _preview_under_a_file,
            r"cannot write the preview .*file/p\.png \((File exists|Not a directory)\).*--preview", summary=True),
    SetCase("sample-without-png", _without_png(), r"test-000000\.tar: sample phantom-\d+ has no readable png member",
            summary=True),
    SetCase("sample-without-png-key-with-escapes", _without_png("\x1b[2J"),
            r"sample \\x1b\[2Jphantom-\d+ has no readable png member", summary=True),
]

CASES = INJECTION_CASES + ESCAPE_CASES + BOUND_CASES + PRINT_CASES + ONE_LINE_CASES


def _the_error_line(result: Result, summary: bool) -> str:
    """The one `Error: ` line, last, with no traceback; before it only inspect's summary and BAD lines when the
    index itself was fine."""
    assert result.exc_info is None, f"uncaught exception:\n{escaped_traceback(result)}\noutput:\n{result.output}"
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], f"expected one last 'Error: ' line, got:\n{result.output}"
    if not summary:
        assert lines == errors, result.output
    return errors[0]


@pytest.mark.parametrize("case", params(CASES))
def test_hostile_shard_set(case: SetCase, ctx: Ctx):
    ctx.monkeypatch.chdir(ctx.tmp)  # where a command a shell ran from a name would leave PWNED
    result = run_case(case, ctx, line_of=lambda result: _the_error_line(result, case.summary))
    assert "\x1b" not in result.output, repr(result.output)
    assert not list(ctx.tmp.rglob("PWNED")) and not (REPO / "PWNED").exists()


# ---- the loaders training uses -------------------------------------------------------------------------------

LOADERS = {
    "load_index": lambda root: load_index(root),
    "latents_record": lambda root: latents_record(root),
    "batches_per_epoch": lambda root: batches_per_epoch(root, 0, batch_size=1),
    "train_loader": lambda root: list(train_loader(root, 0, batch_size=1, image_size=16)),
    "eval_loader": lambda root: list(eval_loader(root, "test", batch_size=1, image_size=16)),
    "train_reports": lambda root: train_reports(root, 0),
}


@pytest.mark.parametrize("read", LOADERS.values(), ids=LOADERS.keys())
@pytest.mark.parametrize("name", [SHELL_NAME, "test-000000.tar`touch PWNED`", "test-$(touch PWNED).tar"])
def test_no_loader_runs_a_shard_name_as_a_command(shard_set, tmp_path, monkeypatch, read, name):
    monkeypatch.chdir(tmp_path)
    folder = Path(shutil.copytree(shard_set, tmp_path / "set"))
    _edit_index(folder, _rename_first_test_shard(name))
    with pytest.raises(DataError, match=r"split test names shard .*not test-NNNNNN\.tar"):
        read(f"pipe:cat {folder}/{{}}")
    assert not list(tmp_path.rglob("PWNED"))


@pytest.mark.parametrize("root", ["pipe:cat /data/set/{}", "pipe:curl -s 'https://h/set/{}'", "shards/set",
                                  "https://h/set", "s3://bucket/set", "file:///data/set"])
@pytest.mark.parametrize("name", ["../x/test-000000.tar", "/etc/passwd", "a\\..\\b.tar", "test\0.tar", "..", ""])
def test_member_refuses_a_name_that_leaves_the_set(root, name):
    with pytest.raises(DataError, match=r"is not a file name of the set \(a path separator, '\.\.' or NUL\)"):
        storage.member(root, name)


@pytest.mark.parametrize("name", [SHELL_NAME, "a'b.tar", 'a"b.tar', "a b.tar", "$(id).tar", "`id`.tar", "a|b",
                                  "a\nb", "-rf", "a*.tar"])
def test_member_refuses_a_name_that_is_not_one_plain_shell_word(name):
    # {} inside the command's own quotes: a quoted name would close them, so such names are refused, not quoted
    with pytest.raises(DataError, match=r"is not one plain word for the shell"):
        storage.member("pipe:curl -s 'https://h/set/{}'", name)


def test_member_passes_the_builders_names_through_unchanged():
    for name in ("index.json", "test-000000.tar", "fold12-001234.tar", ".parts"):
        assert storage.member("pipe:cat '/data/my set/{}'", name) == f"pipe:cat '/data/my set/{name}'"
        assert storage.member("/data/set", name) == f"/data/set/{name}"


@pytest.mark.parametrize("text, shown", [
    ("\x1b[31mred\x1b[0m", r"\x1b[31mred\x1b[0m"), ("a\rb\nc\td", r"a\rb\nc\td"), ("\x07\x00\x7f\x9b", r"\x07\x00\x7f\x9b"),
    ("rtl\u202eevil\u200b", r"rtl\u202eevil\u200b"), ("Cardiomégalie, 心脏肥大, кардиомегалия", None),
])
def test_safe_text_escapes_what_a_terminal_would_act_on_and_keeps_letters(text, shown):
    assert storage.safe_text(text) == (shown if shown is not None else text)


def _loader_set(tmp_path: Path, shard_set: Path) -> Path:
    return Path(shutil.copytree(shard_set, tmp_path / "set"))


def _pickled_latents(marker: Path) -> Callable[[str, dict], tuple[str, dict]]:
    def change(key: str, parts: dict) -> tuple[str, dict]:
        buffer = io.BytesIO()
        np.save(buffer, np.array([Payload(marker)], dtype=object), allow_pickle=True)
        return key, {**parts, "latents.npy": buffer.getvalue()}
    return change


def test_pickled_latents_are_refused_unloaded(shard_set, tmp_path):
    folder = _loader_set(tmp_path, shard_set)
    marker = tmp_path / "PWNED"
    _rewrite_samples(folder, _pickled_latents(marker))
    with pytest.raises(DataError, match=r"test-000000\.tar: sample phantom-\d+ has unreadable latents \(.*\): "
                                        r"rebuild the latents with `cxrdist shard cache-latents`"):
        list(eval_loader(folder, "test", batch_size=1, image_size=16))
    assert not marker.exists()


@pytest.mark.parametrize("latents", [b"", b"\x80\x04K\x01.", b"\x93NUMPY\x01\x00v\x00{'descr': '<f2', "
                                     b"'fortran_order': False, 'shape': (100000000000,), }" + b" " * 53 + b"\n"])
def test_damaged_latents_are_one_line(shard_set, tmp_path, latents):
    folder = _loader_set(tmp_path, shard_set)
    _rewrite_samples(folder, lambda key, parts: (key, {**parts, "latents.npy": latents}))
    with pytest.raises(DataError, match=r"has unreadable latents .*rebuild the latents with") as err:
        list(eval_loader(folder, "test", batch_size=1, image_size=16))
    assert "\n" not in str(err.value)


def test_a_sample_without_png_names_the_shard_and_the_sample(shard_set, tmp_path):
    folder = _loader_set(tmp_path, shard_set)
    _rewrite_samples(folder, lambda key, parts: (key, {e: b for e, b in parts.items() if e != "png"}))
    with pytest.raises(DataError, match=r"test-000000\.tar: sample phantom-\d+ has no png member: the shard is "):
        list(eval_loader(folder, "test", batch_size=1, image_size=16))


def test_a_sample_without_a_report_names_the_shard_and_the_sample(shard_set, tmp_path):
    folder = _loader_set(tmp_path, shard_set)
    _rewrite_samples(folder, lambda key, parts: (key, {e: b for e, b in parts.items() if e != "txt"}),
                     "fold0-000000.tar")
    with pytest.raises(DataError, match=r"fold0-000000\.tar: sample phantom-\d+ has no txt member"):
        train_reports(folder, 1)


def test_a_remote_shard_cut_mid_transfer_is_one_line_naming_it(shard_set, tmp_path):
    with _serve_hostile(shard_set, cut=(FIRST_TEST_SHARD,)) as url:
        with pytest.raises(DataError, match=rf"{url}/{FIRST_TEST_SHARD} could not be read \(ClientPayloadError"):
            list(eval_loader(url, "test", batch_size=1, image_size=16))


def test_a_remote_shard_that_never_ends_stops_at_its_size_in_index_json(shard_set):
    size = json.loads((shard_set / "index.json").read_text())["splits"]["test"]["shards"][0]["bytes"]
    with _serve_hostile(shard_set, endless=(FIRST_TEST_SHARD,)) as url:
        with pytest.raises(DataError, match=rf"{FIRST_TEST_SHARD} holds more than {size} bytes: more than index"):
            list(eval_loader(url, "test", batch_size=1, image_size=16))


def test_an_endless_remote_index_stops_at_the_limit(shard_set, monkeypatch):
    monkeypatch.setattr(storage, "MAX_INDEX_BYTES", 1 << 20)
    with _serve_hostile(shard_set, endless=("index.json",)) as url:
        with pytest.raises(DataError, match=r"index\.json holds more than 1048576 bytes"):
            train_loader(url, 0, batch_size=1, image_size=16)


@pytest.mark.timeout(60)
def test_a_fifo_shard_is_refused_before_training_opens_it(shard_set, tmp_path):
    folder = _loader_set(tmp_path, shard_set)
    _fifo_shard(folder, "fold1-000000.tar")
    with pytest.raises(DataError, match=r"fold1-000000\.tar is a FIFO, not a shard file"):
        train_loader(folder, 0, batch_size=1, image_size=16)


def test_an_oversized_member_is_refused_before_it_is_read(shard_set, tmp_path):
    folder = _loader_set(tmp_path, shard_set)
    _replace_shard(folder, _tar_with_header(300 << 20))
    with pytest.raises(DataError, match=r"member phantom-0\.png has 314572800 bytes, more than the 256 MiB"):
        list(eval_loader(folder, "test", batch_size=1, image_size=16))


def test_http_shards_still_stream_and_verify_with_the_bounds_in_place(shard_set):
    with serve(shard_set) as (url, _):
        assert len(list(eval_loader(url, "test", batch_size=1, image_size=16))) == 3
        assert train_reports(url, 0) == train_reports(shard_set, 0)
