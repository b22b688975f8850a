"""Property-based hostile inputs (hypothesis): whatever bytes a manifest or a config holds, and whatever text
`--set` gets, the readers raise nothing but the project's own errors (CxrdistError subclasses), which the CLI
prints as one line.

Examples are derandomized (the same ones every run, so CI cannot turn red by chance) and no example
database is written; `HYPOTHESIS_PROFILE=explore` draws fresh random examples for a local bug hunt.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cxrdist.config import Config, load_config, merge, parse_overrides
from cxrdist.data.sources.manifest import MAX_REPORT_BYTES, ManifestSource
from cxrdist.errors import CxrdistError

settings.register_profile("robustness", max_examples=200, deadline=None, database=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", max_examples=2000, deadline=None, database=None)
PROFILE = settings.get_profile("explore" if os.environ.get("HYPOTHESIS_PROFILE") == "explore" else "robustness")


# ---- manifests ---------------------------------------------------------------------------------------------

COLUMNS = ["image", "group", "report", "report_path", "labels", "view", "uid"]
# Paths a hostile manifest likes: files in and out of the data folder, devices, home folders, NUL bytes.
PATHS = st.sampled_from([
    "img/a.png", "a.png", "r.txt", "bad.txt", "big.txt", "sub", "sub/", ".", "..", "../x", "../../etc/passwd",
    "/etc/passwd", "/dev/zero", "/proc/self/environ", "~", "~/r.txt", "~no-such-user-xyz/r.txt", "a\0b",
    "img/../img/a.png", "x" * 300, "/" + "y" * 5000, "C:\\x\\y.png", "file:///etc/passwd", "link.txt",
])
CELLS = st.one_of(PATHS, st.text(max_size=30))
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), CELLS),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8)
NEWLINES = st.sampled_from(["\n", "\r\n", "\r"])


TAIL = st.one_of(st.just(b""), st.just(b""), st.just(b""), st.binary(max_size=12))  # mostly clean text
BOM = st.sampled_from([b"", b"", b"\xef\xbb\xbf"])


@st.composite
def headers(draw) -> list[str]:
    """Mostly a usable header (image, group and a report column, in any order, plus extras), sometimes any."""
    usable = draw(st.booleans()) or draw(st.booleans())
    if not usable:
        return draw(st.lists(st.one_of(st.sampled_from(COLUMNS), st.text(max_size=8)), min_size=1, max_size=7))
    columns = ["image", "group", draw(st.sampled_from(["report", "report_path"]))]
    columns += draw(st.lists(st.one_of(st.sampled_from(COLUMNS), st.text(max_size=8)), max_size=4))
    return draw(st.permutations(columns))


@st.composite
def csv_manifests(draw) -> tuple[bytes, str]:
    header = draw(headers())
    delimiter = draw(st.sampled_from([",", ",", "\t", ";"]))
    rows = draw(st.lists(st.lists(CELLS, min_size=len(header) - 1, max_size=len(header) + 1), max_size=6))
    quote = draw(st.booleans())
    cell = (lambda c: '"' + c.replace('"', '""') + '"') if quote else (lambda c: c)
    newline = draw(NEWLINES)
    text = newline.join([delimiter.join(header)] + [delimiter.join(map(cell, row)) for row in rows])
    suffix = ".tsv" if delimiter == "\t" else ".csv"
    return draw(BOM) + text.encode("utf-8") + draw(TAIL), suffix


@st.composite
def jsonl_manifests(draw) -> tuple[bytes, str]:
    keys = draw(headers())
    row = st.fixed_dictionaries({key: st.one_of(CELLS, JSON_VALUES) for key in keys})
    junk = st.one_of(st.text(max_size=30), st.sampled_from(["[1, 2]", "null", "3", '"text"', "{", "", "  "]))
    lines = draw(st.lists(st.one_of(row.map(json.dumps), row.map(json.dumps), row.map(json.dumps), junk),
                          max_size=6))
    return draw(BOM) + "\n".join(lines).encode("utf-8") + draw(TAIL), draw(st.sampled_from([".jsonl", ".ndjson"]))


# raw bytes under any suffix, or text shaped like the suffix's format
MANIFESTS = st.one_of(st.tuples(st.binary(max_size=1500), st.sampled_from([".csv", ".tsv", ".jsonl", ".ndjson"])),
                      csv_manifests(), jsonl_manifests())


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """A data folder with report files (fine, not UTF-8, over the cap), a folder, a link to outside."""
    root = tmp_path_factory.mktemp("hostile-manifests") / "data"
    (root / "img").mkdir(parents=True)
    (root / "sub").mkdir()
    (root / "r.txt").write_text("Small left effusion.", encoding="utf-8")
    (root / "bad.txt").write_bytes("Cardiom\xe9galie.".encode("latin-1"))
    (root / "big.txt").write_bytes(b"word " * (MAX_REPORT_BYTES // 5 + 10))
    (root.parent / "outside.txt").write_text("outside words", encoding="utf-8")
    (root / "link.txt").symlink_to(root.parent / "outside.txt")
    return root


@PROFILE
@given(manifest_file=MANIFESTS, confined=st.booleans())
def test_manifest_reader_raises_only_project_errors(data_root, manifest_file, confined):
    data, suffix = manifest_file
    manifest = data_root / f"manifest{suffix}"
    manifest.write_bytes(data)
    source = ManifestSource(manifest, root=data_root if confined else None)
    try:
        records = list(source.records())
    except CxrdistError:
        return
    summary = source.summary()
    assert summary["rows"] == summary["records"] + len(source.rejected()) and summary["records"] == len(records)
    for record in records:
        assert record.uid and "." not in record.uid and record.group and record.prompt.strip()
        assert "outside words" not in record.prompt and "\ufffd" not in record.prompt
        if confined:  # --root: every image resolves inside it
            assert Path(record.source_path).resolve().is_relative_to(data_root.resolve())


# ---- config overrides --------------------------------------------------------------------------------------

KEYS = [f"{section.name}.{key.name}" for section in dataclasses.fields(Config)
        for key in dataclasses.fields(section.default_factory())]
YAML_ODDITIES = st.sampled_from([
    "", " ", "~", "null", "NULL", "inf", "-inf", ".inf", ".nan", "nan", "1e400", "1.0e+400", "-0", "0x1F", "0o17",
    "017", "1_000", "1:30", "2001-12-14", "2001-12-14t21:59:43.10-05:00", "yes", "no", "on", "off", "True", "y",
    "[1, 2]", "[a, [b]]", "{a: 1}", "[]", "{}", "a,b,,c", "'unterminated", '"unterminated', "!!python/object:os.system",
    "!!binary aGVsbG8=", "&a [*a]", "*undefined", "? complex key", "- item", "|\n  block", "{report}", "%TAG", "@x",
    "\t", "\0", "\ufeff", "=", "==",
])
VALUES = st.one_of(st.text(max_size=30), YAML_ODDITIES, st.integers().map(str), st.floats().map(repr),
                   st.lists(st.text(max_size=6), max_size=4).map(lambda items: "[" + ", ".join(items) + "]"))
ITEMS = st.lists(st.one_of(
    st.text(max_size=40),
    st.builds(lambda key, value: f"{key}={value}", st.one_of(st.sampled_from(KEYS), st.text(max_size=15)), VALUES),
), max_size=5)


@PROFILE
@given(items=ITEMS)
def test_config_overrides_raise_only_project_errors(items):
    try:
        nested = parse_overrides(items)
    except CxrdistError:
        nested = None
    if nested is not None:
        try:
            merge(Config(), nested)
        except CxrdistError:
            pass
    try:
        cfg = load_config(None, items)
    except CxrdistError:
        return
    cfg.hash()  # a config that built is complete enough to be saved and hashed


@PROFILE
@given(data=st.one_of(st.binary(max_size=400),
                      st.builds(lambda section, key, value: f"{section}:\n  {key}: {value}\n".encode("utf-8"),
                                st.sampled_from([f.name for f in dataclasses.fields(Config)] + ["x"]),
                                st.sampled_from([k.split(".")[1] for k in KEYS] + ["x"]), VALUES)))
def test_config_files_raise_only_project_errors(tmp_path_factory, data):
    path = tmp_path_factory.getbasetemp() / "hostile-config.yaml"
    path.write_bytes(data)
    try:
        load_config(str(path))
    except CxrdistError:
        pass


# ---- what a key's type declares ----------------------------------------------------------------------------
def _declared_keys() -> list[tuple[str, str, tuple, float | None]]:
    """(section, key, choices or (), lower bound or None) of every key whose type declares its values."""
    import typing

    from cxrdist.config import AtLeast

    out, defaults = [], Config()
    for section in dataclasses.fields(Config):
        hints = typing.get_type_hints(type(getattr(defaults, section.name)), include_extras=True)
        for key, tp in hints.items():
            bounds = [m.low for m in getattr(tp, "__metadata__", ()) if isinstance(m, AtLeast)]
            choices = typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else ()
            if bounds or choices:
                out.append((section.name, key, choices, bounds[0] if bounds else None))
    return out


DECLARED = _declared_keys()
NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_+-", min_size=1, max_size=12)


@PROFILE
@given(data=st.data())
def test_a_value_is_refused_for_its_declaration_exactly_when_it_breaks_it(data):
    """Below a key's bound, or outside its choices: refused, naming the key and what it allows. Within them: never
    refused for that reason (another rule, e.g. eval.metric=fid needing 16 metric images, may still apply)."""
    section, key, choices, low = data.draw(st.sampled_from(DECLARED))
    if choices:
        value = data.draw(st.one_of(st.sampled_from(choices), NAMES))
        breaks = value not in choices
    else:
        value = data.draw(st.integers(min_value=-10**6, max_value=10**6))
        breaks = value < low
    declared_refusal = f"config key '{section}.{key}' must be "
    try:
        load_config(overrides=[f"{section}.{key}={value}"])
        refusal = ""
    except CxrdistError as exc:
        refusal = str(exc)
    assert (declared_refusal in refusal) == breaks, (section, key, value, refusal)
