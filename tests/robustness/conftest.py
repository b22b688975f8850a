"""Fixtures of the hostile-input battery (tests/robustness). tests/conftest.py already isolates CXRDIST_CACHE
per session and sets the offline environment variables."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from support.robustness import Ctx

# Hypothesis keeps caches in ./.hypothesis by default: keep the checkout clean (the property tests write no
# example database either). HYPOTHESIS_STORAGE_DIRECTORY still wins when set.
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    from hypothesis.configuration import set_hypothesis_home_dir

    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "cxrdist-hypothesis")


@pytest.fixture
def ctx(tmp_path, monkeypatch, request) -> Ctx:
    return Ctx(tmp=tmp_path, monkeypatch=monkeypatch, request=request)


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory, tiny_base_path) -> Path:
    """A real LoRA checkpoint (UNet + text encoder) on preset:tiny; cases copy it before changing anything."""
    from cxrdist.config import LoraConfig
    from cxrdist.models.loading import load_base
    from cxrdist.models.lora import adapter_metadata, adapter_state_dicts, attach_lora, save_adapter

    base = load_base("preset:tiny")
    spec = attach_lora(base, LoraConfig(unet_rank=4, text_rank=2))
    folder = tmp_path_factory.mktemp("robustness-adapter") / "adapter"
    return save_adapter(folder, *adapter_state_dicts(base.unet, base.text_encoder),
                        adapter_metadata(base, spec, "chest x-ray: {report}"))
