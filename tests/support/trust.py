"""Hostile files for the trust tests: a pickle that runs code when loaded, a minimal adapter folder."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from cxrdist.models.lora import ADAPTER_FORMAT, METADATA_NAME, WEIGHTS_NAME


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def plant(file: Path, marker: Path) -> None:
    torch.save({"state": Payload(marker)}, file)


def adapter_metadata_json(source: str = "preset:tiny", fingerprint_: str = "0" * 16) -> dict:
    spec = {"rank": 4, "alpha": 4.0, "targets": ["to_q"]}
    return {"format": ADAPTER_FORMAT, "base": {"source": source, "fingerprint": fingerprint_},
            "adapter": {"unet": spec, "text_encoder": None}, "prompt_template": "{report}"}


def write_adapter(folder: Path, meta: dict | None = None, weights: bytes | None = None) -> Path:
    """An adapter folder whose weights file is valid safetensors unless `weights` replaces it."""
    folder.mkdir(parents=True)
    (folder / METADATA_NAME).write_text(json.dumps(meta or adapter_metadata_json()))
    save_file({"unet.x.lora_A.weight": torch.zeros(2, 2)}, str(folder / WEIGHTS_NAME))
    if weights is not None:
        (folder / WEIGHTS_NAME).write_bytes(weights)
    return folder
