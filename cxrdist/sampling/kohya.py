"""A cxrdist LoRA adapter as one kohya-format .safetensors file (AUTOMATIC1111, ComfyUI, kohya-ss, diffusers).

The adapter folder holds peft tensors in diffusers' layout (`unet.<module>.lora_A.weight`,
`text_encoder.<module>.lora_B.weight`) and its ranks and alphas in `cxrdist.json`. A kohya file names each
adapted module `lora_unet_<module path, dots as underscores>` or `lora_te_<...>` and holds, per module,
`.lora_down.weight` (peft's lora_A), `.lora_up.weight` (lora_B) and a scalar `.alpha`; readers scale the update
by alpha / rank, which is peft's lora_alpha / r, so the tensors are copied unchanged and alpha is lora_alpha.

diffusers has `convert_state_dict_to_kohya` (diffusers.utils), but it is not used here because its output
differs from what these readers expect in three ways: it writes alpha = rank for every module (scale 1, wrong
whenever lora_alpha != r), it names a single CLIP text encoder `lora_te1_` (the SDXL spelling; SD 1.x files
use `lora_te_`), and it keeps the module paths of the text encoder as loaded, which transformers >= 5 flattens
(no `text_model.` level) while kohya names are those of the original CLIP layout. The renaming itself is one
rule (kohya-ss' LoRANetwork: the module path with `.` replaced by `_`), written out below.

The export reads only the adapter folder (no base model is loaded) and writes the file atomically.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from cxrdist import __version__
from cxrdist.errors import InputError, ModelError
from cxrdist.fileio import is_disk_full, sha256_file, write_bytes_atomic
from cxrdist.models.families import FAMILIES
from cxrdist.models.loading import check_weights_file
from cxrdist.models.lora import CHECKPOINT_MARKER, METADATA_NAME, WEIGHTS_NAME, read_adapter_metadata

KOHYA_FORMAT = "cxrdist-kohya/1"
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
# The only tensors a plain LoRA adapter holds: the two factors of each adapted module.
_PEFT_KEY = re.compile(r"^(unet|text_encoder)\.(.+)\.lora_([AB])\.weight$")
SYNTHETIC_NOTE = ("Images generated with this LoRA are synthetic: they are not radiographs of a patient and must "
                  "not be used for diagnosis.")


@dataclass(frozen=True)
class KohyaExport:
    path: Path
    unet_modules: int
    text_modules: int
    base: str
    prompt_template: str


def kohya_module_name(part: str, module_path: str) -> str:
    """`lora_unet_...` / `lora_te_...` for a module of the UNet or of the (CLIP) text encoder."""
    if part == "text_encoder" and not module_path.startswith("text_model."):
        # transformers >= 5 flattens CLIPTextModel (`encoder.layers.N...`, no `text_model` submodule), but kohya,
        # A1111 and ComfyUI match CLIP modules by the original `text_model.encoder.layers.N...` paths; diffusers
        # drops the prefix again when it loads such a file onto a flattened encoder.
        module_path = "text_model." + module_path
    return KOHYA_PREFIXES[part] + module_path.replace(".", "_")


def to_kohya(state: dict[str, torch.Tensor], spec: dict, where: Path | str) -> dict[str, torch.Tensor]:
    """peft adapter tensors (`unet.`/`text_encoder.` prefixes) + cxrdist.json's `adapter` entry -> kohya tensors.

    Refuses, naming the tensor, anything that is not a plain LoRA factor pair of the rank cxrdist.json records.
    """
    modules: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _PEFT_KEY.match(key)
        if not match:
            raise ModelError(f"{where}: tensor '{key}' is not a LoRA factor (unet./text_encoder. ... "
                             ".lora_A/.lora_B.weight), which a kohya file cannot hold; use --format merged")
        part, path, factor = match.groups()
        modules.setdefault((part, path), {})[factor] = tensor
    out: dict[str, torch.Tensor] = {}
    for part in KOHYA_PREFIXES:
        found = sorted(path for p, path in modules if p == part)
        if spec[part] is None and found:
            raise ModelError(f"{where} holds {part} LoRA tensors but cxrdist.json records no {part} adapter: "
                             "the adapter folder is damaged; export it again")
        if spec[part] is not None and not found:
            raise ModelError(f"{where} holds no {part} LoRA tensors although cxrdist.json records a {part} "
                             "adapter: the adapter folder is damaged; export it again")
        for path in found:
            pair = modules[(part, path)]
            _check_pair(pair, part, path, spec[part]["rank"], where)
            name = kohya_module_name(part, path)
            if f"{name}.alpha" in out:  # two module paths that differ only in '.' vs '_'
                raise ModelError(f"{where}: {part} module '{path}' gets the kohya name '{name}' of another "
                                 "module; this adapter cannot be written in kohya format, use --format merged")
            out[f"{name}.lora_down.weight"] = pair["A"].contiguous()
            out[f"{name}.lora_up.weight"] = pair["B"].contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(spec[part]["alpha"]), dtype=torch.float32)
    return out


def _check_pair(pair: dict[str, torch.Tensor], part: str, path: str, rank: int, where) -> None:
    for factor in ("A", "B"):
        if factor not in pair:
            raise ModelError(f"{where}: {part} module '{path}' has no lora_{factor} tensor: the adapter folder "
                             "is damaged; export it again")
    down, up = pair["A"], pair["B"]
    if down.ndim < 2 or up.ndim < 2 or down.shape[0] != rank or up.shape[1] != rank:
        raise ModelError(f"{where}: {part} module '{path}' has LoRA shapes {tuple(down.shape)} / "
                         f"{tuple(up.shape)}, not of rank {rank} as cxrdist.json records: the adapter folder is "
                         "damaged; export it again")


def kohya_metadata(meta: dict, source: Path, weights_sha256: str, out: Path) -> dict[str, str]:
    """The safetensors header metadata: kohya's `ss_*` keys (what A1111's and ComfyUI's model cards show)
    plus `cxrdist_*` provenance. Values are strings, as the safetensors format requires."""
    base, unet, text = meta["base"], meta["adapter"]["unet"], meta["adapter"]["text_encoder"]
    size = base.get("image_size")
    data = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(unet["rank"]),
        "ss_network_alpha": str(float(unet["alpha"])),
        "ss_network_train_unet_only": str(text is None),
        "ss_sd_model_name": base["source"],
        "ss_output_name": out.stem,
        "ss_training_comment": SYNTHETIC_NOTE,
        "cxrdist_format": KOHYA_FORMAT,
        "cxrdist_source": str(source),
        "cxrdist_source_sha256": weights_sha256,
        "cxrdist_base": base["source"],
        "cxrdist_base_fingerprint": base["fingerprint"],
        "cxrdist_prompt_template": meta.get("prompt_template", "{report}"),
        "cxrdist_synthetic": "true",
        "cxrdist_software": f"cxrdist {__version__}",
    }
    if isinstance(size, int):
        data["ss_resolution"] = f"({size}, {size})"
    if text is not None:
        data["cxrdist_text_encoder_dim"] = str(text["rank"])
        data["cxrdist_text_encoder_alpha"] = str(float(text["alpha"]))
    return data


def _check_out(out: Path) -> None:
    if out.suffix != ".safetensors":
        raise InputError(f"--out {out} must end in .safetensors: a kohya LoRA is one .safetensors file")
    if out.exists():
        raise InputError(f"--out {out} already exists: exports are never overwritten, move it or choose "
                         "another name")


def _check_adapter_folder(folder: Path, model_path) -> None:
    """One line naming what `model_path` is instead of a cxrdist adapter folder, and what to give instead."""
    wanted = f"a LoRA adapter folder ({WEIGHTS_NAME} + {METADATA_NAME})"
    if not folder.exists():
        raise ModelError(f"model path '{model_path}' not found: --format kohya needs {wanted}")
    if not folder.is_dir():
        raise ModelError(f"model path '{model_path}' is a file: --format kohya needs {wanted}; unpack an "
                         "archive first")
    if (folder / "model_index.json").exists():
        raise ModelError(f"{model_path} is a full pipeline, not a LoRA adapter: a kohya LoRA file can only be "
                         f"made from {wanted}")
    if (folder / CHECKPOINT_MARKER).exists() and not (folder / METADATA_NAME).exists():
        raise ModelError(f"{model_path} is a training checkpoint: --format kohya needs {wanted}, such as the "
                         "run's exported best_model_* folder")
    if not (folder / METADATA_NAME).exists():
        raise ModelError(f"{model_path} has no {METADATA_NAME}: not a cxrdist LoRA adapter folder; "
                         f"--format kohya needs {wanted}")


def export_kohya(model_path: str | Path, out: str | Path) -> KohyaExport:
    """Write the adapter at `model_path` as one kohya-format LoRA file at `out`; the adapter is only read."""
    from safetensors.torch import load_file, save

    out = Path(out).expanduser()
    _check_out(out)
    folder = Path(model_path).expanduser()
    _check_adapter_folder(folder, model_path)
    meta = read_adapter_metadata(folder)
    weights = folder / WEIGHTS_NAME
    check_weights_file(weights, "the adapter")
    spec = meta["adapter"]
    family = FAMILIES[meta["base"].get("family", "sd")]
    if "kohya" not in family.export_formats:
        raise ModelError(f"{model_path} adapts a {family.label} transformer, and kohya's format (A1111, ComfyUI) names "
                         f"SD UNet layers only: export with --format merged or zip")
    encoder = meta["base"].get("text_encoder", "clip")
    if spec["text_encoder"] is not None and encoder != "clip":
        raise ModelError(f"{model_path} adapts a {encoder} text encoder, which kohya-format readers (A1111, "
                         "ComfyUI) do not have: export with --format merged, or train with "
                         "lora.train_text_encoder=false for a UNet-only kohya file")
    tensors = to_kohya(load_file(str(weights)), spec, weights)
    header = kohya_metadata(meta, folder, sha256_file(weights), out)
    created = [parent for parent in out.parents if not parent.exists()]  # deepest first
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(out, save(tensors, metadata=header))  # a temporary name of ours, removed on failure
    except OSError as exc:
        for folder in created:  # only folders this export made, and only while still empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        full = is_disk_full(exc)
        raise InputError(f"disk full while writing {out}: free space and rerun (nothing was left behind)" if full
                         else f"cannot write {out} ({exc.strerror or exc}): choose a writable --out") from None
    count = {part: sum(1 for k in tensors if k.startswith(prefix) and k.endswith(".alpha"))
             for part, prefix in KOHYA_PREFIXES.items()}
    return KohyaExport(out, count["unet"], count["text_encoder"], meta["base"]["source"],
                       meta.get("prompt_template", "{report}"))
