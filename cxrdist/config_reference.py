"""The configuration reference (docs/config.md), generated from the config dataclasses: every key with its type,
default, allowed values and help text. The help text is the comment written beside or above the key in
cxrdist/config.py, so the page cannot say something the code does not; tests/unit/foundation/test_config_reference.py
fails when the committed page and the code disagree.

    python -m cxrdist.config_reference > docs/config.md
"""
from __future__ import annotations

import ast
import dataclasses
import io
import json
import tokenize
import typing
from pathlib import Path

from cxrdist import config as config_module
from cxrdist.config import AtLeast, Config

HEADER = """# Configuration reference

Generated from `cxrdist/config.py` by `python -m cxrdist.config_reference > docs/config.md`; do not edit by hand.
Every key is set in a YAML file (`--config FILE`) as `section: {key: value}` or on the command line as
`--set section.key=value`. Values are checked when the config loads: a key's type, its choices and its bounds.
"""


def _comments(source: str) -> dict[int, str]:
    """Comment text by line number (1-based)."""
    found = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            found[token.start[0]] = token.string.lstrip("#").strip()
    return found


def _help_texts(source: str) -> dict[tuple[str, str], str]:
    """(class name, key) -> the comment beside the key's line, after the comment lines right above it."""
    comments, lines = _comments(source), source.splitlines()
    texts = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for statement in node.body:
            if not (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)):
                continue
            above, line = [], statement.lineno - 1
            while line >= 1 and lines[line - 1].strip().startswith("#"):
                above.insert(0, comments[line])
                line -= 1
            beside = [comments[n] for n in range(statement.lineno, statement.end_lineno + 1) if n in comments]
            texts[(node.name, statement.target.id)] = " ".join(above + beside)
    return texts


def _type_text(tp) -> tuple[str, str]:
    """(type, allowed values) as the page shows them."""
    bounds = [m for m in getattr(tp, "__metadata__", ()) if isinstance(m, AtLeast)]
    if bounds:
        tp = typing.get_args(tp)[0]
    allowed = ", ".join(f">= {int(b.low) if float(b.low).is_integer() else b.low}" for b in bounds)
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "str", " | ".join(f"`{v}`" for v in typing.get_args(tp))
    if origin is list:
        return f"list of {typing.get_args(tp)[0].__name__}", allowed
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        return f"{inner.__name__} or null", allowed
    return tp.__name__, allowed


def _default_text(value) -> str:
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render() -> str:
    source = Path(config_module.__file__).read_text(encoding="utf-8")
    helps, defaults = _help_texts(source), Config()
    parts = [HEADER.rstrip() + "\n"]
    for section in dataclasses.fields(Config):
        value = getattr(defaults, section.name)
        cls = type(value)
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        parts.append(f"## `{section.name}`\n")
        if doc and not doc.startswith(f"{cls.__name__}("):
            parts.append(f"{doc}\n")
        parts.append("| key | type | default | allowed | what it does |\n|---|---|---|---|---|")
        hints = typing.get_type_hints(cls, include_extras=True)
        derived = getattr(cls, "DERIVED", {})
        for field in dataclasses.fields(value):
            kind, allowed = _type_text(hints[field.name])
            default = derived.get(field.name, getattr(value, field.name))
            help_text = helps.get((cls.__name__, field.name), "")
            parts.append(f"| `{section.name}.{field.name}` | {kind} | {_cell(_default_text(default))} | "
                         f"{_cell(allowed) if allowed else ''} | {_cell(help_text)} |")
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
