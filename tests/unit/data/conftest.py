"""Fixtures of the data tests: manifest sets built once per test module (read-only: tests that damage their inputs
build their own with support.data_files.make_manifest_set). Build options: support.data_files.SHARD_OPTS."""
from __future__ import annotations

from pathlib import Path

import pytest

from support.data_files import make_manifest_set


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """24 images of 12 patients (two each, 48x36, every third a 16-bit PNG) and their CSV manifest."""
    return make_manifest_set(tmp_path_factory.mktemp("m"))


@pytest.fixture(scope="module")
def corrupt_manifest(tmp_path_factory) -> Path:
    """The same set with image 5 (im005) truncated: a build writes 23 samples and rejects that one."""
    return make_manifest_set(tmp_path_factory.mktemp("m"), corrupt=[5])
