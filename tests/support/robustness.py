"""Plumbing of the hostile-input battery: the case table's types, running a case, and its generic checks.

A case builds its inputs in a temporary folder (`Ctx`), says how to run the command (`Plan`), and the one
test in test_hostile_inputs.py checks what every case shares: the exit status, one `Error: ` line naming
the thing (no traceback, no uncaught exception), and that the inputs and any output folder that existed
before are byte-identical afterwards.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import pytest

REPO = Path(__file__).resolve().parents[2]
# Progress shares the output with the error line: a tqdm bar on a terminal ("shard out:  20%|██  | 8/40 [...]"), or
# cxrdist.progress's plain lines elsewhere, CliRunner included ("shard out: img 8/40 (20%), 31 img/s, eta 1s").
PROGRESS_LINE = re.compile(r"\d+%\||^(?!Error: ).*, \S+ ?\S*/s(, (eta|done in) \S+)?(, [^,=\s]+=[^,]*)*$")


@dataclass
class Ctx:
    """What a case's setup gets: a fresh folder, monkeypatch, and access to fixtures and finalizers."""

    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    request: pytest.FixtureRequest
    model_loads: list = field(default_factory=list)

    def fixture(self, name: str) -> Any:
        return self.request.getfixturevalue(name)

    def forbid_model_load(self) -> None:
        """Record (and refuse) any base-model load: the case must fail before the slow part."""
        def refuse(*args, **kwargs):
            self.model_loads.append(args)
            raise RuntimeError("the base model must not load for this case")

        self.monkeypatch.setattr("cxrdist.sampling.loading.load_base", refuse)


@dataclass
class Plan:
    argv: list[str]
    keep: Sequence[Path] = ()  # files / folders that must be byte-identical after the run
    absent: Sequence[Path] = ()  # paths that must not exist after the run (a fresh --out, a zip-slip target)
    check: Optional[Callable[["Result"], None]] = None  # further assertions on the outcome
    runner: str = "cli"  # "cli": click's CliRunner on cxrdist.cli:main; "train": `python launch/train.py`


@dataclass
class Result:
    exit_code: int
    output: str
    exc_info: Any = None  # an exception the command let escape (CliRunner catches it; a real run prints it)


@dataclass
class Case:
    id: str
    setup: Callable[[Ctx], Plan]
    error: Optional[str]  # regex the one `Error: ` line must match; None: the command must succeed
    marks: tuple = ()


def invoke(plan: Plan) -> Result:
    if plan.runner == "train":
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        done = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), *plan.argv], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=180)
        return Result(done.returncode, done.stdout + done.stderr)
    from click.testing import CliRunner

    from cxrdist.cli import main

    result = CliRunner().invoke(main, [str(a) for a in plan.argv])
    escaped = result.exc_info if result.exception is not None and not isinstance(result.exception, SystemExit) \
        else None
    return Result(result.exit_code, result.output, escaped)


def escaped_traceback(result: Result) -> str:
    return "".join(traceback.format_exception(*result.exc_info)) if result.exc_info else ""


def error_line(result: Result) -> str:
    """The output's one line: `Error: ...` (progress bars aside), with no traceback and nothing escaped."""
    assert result.exc_info is None, f"uncaught exception:\n{escaped_traceback(result)}\noutput:\n{result.output}"
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.strip() and not PROGRESS_LINE.search(line)]
    assert len(lines) == 1 and lines[0].startswith("Error: "), f"expected one 'Error: ' line, got:\n{result.output}"
    return lines[0]


def snapshot(paths: Sequence[Path]) -> dict[str, str]:
    """path -> sha256 of every file (a link's target, 'dir' for folders, 'absent') under `paths`."""
    state: dict[str, str] = {}
    for root in map(Path, paths):
        entries = [root] + (sorted(root.rglob("*")) if root.is_dir() and not root.is_symlink() else [])
        for path in entries:
            if path.is_symlink():
                state[str(path)] = "link:" + os.readlink(path)
            elif path.is_file():
                state[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            elif path.is_dir():
                state[str(path)] = "dir"
            else:
                state[str(path)] = "absent"
    return state


def params(cases: Sequence[Case]) -> list:
    ids = [case.id for case in cases]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    return [pytest.param(case, id=case.id, marks=case.marks) for case in cases]


def run_case(case: Case, ctx: Ctx, line_of: Callable[[Result], str] = error_line) -> Result:
    """Run one case and hold it to the contract every battery shares: success without a traceback, or a non-zero
    exit with one `Error: ` line (found by `line_of`) matching case.error; `keep` byte-identical; `absent`
    absent; then the case's own check. Returns the result for a battery's further checks."""
    plan = case.setup(ctx)
    before = snapshot(plan.keep)
    result = invoke(plan)
    if case.error is None:
        assert result.exc_info is None, escaped_traceback(result)
        assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    else:
        line = line_of(result)
        assert result.exit_code != 0, result.output
        assert re.search(case.error, line), f"{line!r} does not match {case.error!r}"
    assert snapshot(plan.keep) == before, "inputs or earlier outputs changed"
    for path in plan.absent:
        assert not Path(path).exists(), f"{path} was left behind"
    if plan.check:
        plan.check(result)
    return result


def mount_tmpfs(ctx: Ctx, name: str, size: str) -> Path:
    """A tmpfs of `size` ("1m") at ctx.tmp/name, unmounted when the test ends; the test skips without root."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = ctx.tmp / name
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    ctx.request.addfinalizer(lambda: subprocess.run(["umount", "-l", str(mount)], capture_output=True))
    return mount


# ---- manifests the batteries shard ----------------------------------------------------------------------------
SHARD = ["--size", "16", "--folds", "2", "--test-fraction", "0", "--workers", "1"]


def good_rows(root: Path, n: int = 6) -> list[dict]:
    """n distinct 40x32 PNGs under root/img, one patient each."""
    from support.data_files import write_png

    rows = []
    for i in range(n):
        write_png(root / "img" / f"good{i}.png", seed=i)
        rows.append({"image": f"img/good{i}.png", "group": f"p{i}", "report": f"Report {i}: clear lungs."})
    return rows


def shard_manifest(manifest: Path, out: Path, *extra) -> list:
    return ["shard", "manifest", manifest, "--out", out, *SHARD, *extra]


def rejects_of(out: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (out / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]


def index_of(out: Path) -> dict:
    import json

    return json.loads((out / "index.json").read_text(encoding="utf-8"))
