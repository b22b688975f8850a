"""docs/config.md is what `python -m cxrdist.config_reference` writes from the config dataclasses: every key, with
a type, a default and a help text."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from cxrdist.config import Config
from cxrdist.config_reference import render

PAGE = Path(__file__).resolve().parents[3] / "docs" / "config.md"


def test_the_committed_page_is_what_the_code_generates():
    assert PAGE.read_text(encoding="utf-8") == render(), (
        "docs/config.md is out of date: run `python -m cxrdist.config_reference > docs/config.md`")


def test_every_key_is_on_the_page_with_a_help_text():
    # cells split at unescaped pipes: key, type, default, allowed, help
    rows = {cells[0].strip("`"): cells for cells in (
        [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in render().splitlines()
        if line.startswith("| `"))}
    defaults = Config()
    keys = [f"{s.name}.{f.name}" for s in dataclasses.fields(Config)
            for f in dataclasses.fields(getattr(defaults, s.name))]
    assert sorted(rows) == sorted(keys)
    assert all(len(cells) == 5 for cells in rows.values())
    assert [key for key, cells in rows.items() if not cells[4]] == []  # a help text for every key
