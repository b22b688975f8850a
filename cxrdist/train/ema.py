"""Exponential moving average (EMA) of the trained weights: `train.ema_decay` (0 = off). The trained weights are
the LoRA adapters, or under train.method=full every weight of the denoiser (cxrdist.models.trained): an fp32 copy of
the whole denoiser on every rank, on the device without DeepSpeed and on the CPU under ZeRO.

What it is:
- Updated after every optimizer step that really happened (never after a step skipped for inf/NaN gradients), in
  fp32, on the adapter tensors only (the frozen base never changes). The k-th update (k = 1, 2, ...) uses diffusers'
  `EMAModel` warm-up: decay 0 at the first (the EMA starts as the adapter after step 1, not as the fresh one),
  then min(ema_decay, (1 + n) / (10 + n)) with n = k - 1, so a short run is not dominated by its initial adapter.
- Every rank keeps the whole EMA, identical everywhere: without DeepSpeed on the adapters' device, updated from
  the parameters themselves (no copy, no collective); under DeepSpeed ZeRO-2/3 on the CPU, updated from the fp32
  masters gathered from the optimizer (`distributed.trained_fp32_values`: a collective, which every rank runs in
  the same step).
- Saved with every training checkpoint as `ema.safetensors` (tensors by full parameter name; decay and update
  count in its header) by the main process, read back on every rank on resume: a resumed run ends with the
  same EMA as an uninterrupted one. A checkpoint without it (or with a damaged one) is refused in one line when
  the EMA is on: starting the EMA again from the live adapter would silently break that promise.
- Validation runs with the EMA swapped into the adapters (`swapped_in`) and the raw values put back exactly
  afterwards, so training continues on them; the best export holds the EMA adapter.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator

import torch

from cxrdist.errors import InputError
from cxrdist.models.lora import tensors_digest
from cxrdist.models.trained import trained_named_parameters
from cxrdist.train import distributed
from cxrdist.train.ranks import all_ranks

log = logging.getLogger(__name__)

EMA_FILE = "ema.safetensors"
EMA_FORMAT = "cxrdist-ema/1"
WARMUP = "min(ema_decay, (1 + n) / (10 + n)) at the (n + 1)-th update, 0 at the first (diffusers' EMAModel)"


def decay_at(ema_decay: float, update: int) -> float:
    """The decay of the `update`-th EMA update (1-based): 0 at the first, then min(ema_decay, (1 + n) / (10 + n))
    with n = update - 1, as diffusers' EMAModel (without `use_ema_warmup`) does."""
    n = update - 1
    return 0.0 if n <= 0 else min(float(ema_decay), (1 + n) / (10 + n))


class TrainedEMA:
    """The EMA of every LoRA tensor by full parameter name, fp32; `updates` = optimizer steps it has seen."""

    def __init__(self, ema_decay: float, values: dict[str, torch.Tensor]):
        if not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay}")
        self.ema_decay = float(ema_decay)
        self.updates = 0
        self.last_decay = 0.0
        self.shadow = {name: value.detach().to(torch.float32).clone() for name, value in values.items()}

    @classmethod
    def from_model(cls, accelerator: Any, joint: torch.nn.Module, ema_decay: float) -> "TrainedEMA":
        """An EMA shaped like the prepared module's adapters (collective under DeepSpeed: every rank)."""
        return cls(ema_decay, distributed.trained_fp32_values(accelerator, joint))

    @torch.no_grad()
    def update(self, values: dict[str, torch.Tensor]) -> float:
        """One update from the adapters' fp32 values after an optimizer step; returns the decay it used."""
        if values.keys() != self.shadow.keys():
            missing = sorted(set(self.shadow) ^ set(values))[0]
            raise KeyError(f"adapter EMA update: tensor '{missing}' is in only one of the EMA and the model")
        self.updates += 1
        decay = decay_at(self.ema_decay, self.updates)
        names = list(self.shadow)
        shadow = [self.shadow[n] for n in names]
        fresh = [values[n].to(self.shadow[n].device, torch.float32) for n in names]
        if decay == 0.0:
            for s, v in zip(shadow, fresh):
                s.copy_(v)  # exactly the adapter (s + 1 * (v - s) need not round to v)
        else:
            torch._foreach_mul_(shadow, decay)
            torch._foreach_add_(shadow, fresh, alpha=1.0 - decay)
        self.last_decay = decay
        return decay

    def info(self) -> dict[str, Any]:
        """What the best export records about its weights."""
        return {"decay": self.ema_decay, "updates": self.updates, "warmup": WARMUP}

    def digest(self) -> str:
        return tensors_digest(self.shadow)[:16]

    def named_cpu(self) -> dict[str, torch.Tensor]:
        return {name: t.detach().to("cpu").contiguous().clone() for name, t in self.shadow.items()}

    # -- checkpoints -------------------------------------------------------------------------------------
    def save(self, folder: Path) -> Path:
        """Write `folder/ema.safetensors` (main process: every rank holds the same EMA)."""
        from safetensors.torch import save_file

        path = Path(folder) / EMA_FILE
        save_file(self.named_cpu(), str(path),
                  metadata={"format": EMA_FORMAT, "ema_decay": repr(self.ema_decay), "updates": str(self.updates)})
        return path

    def load(self, folder: Path, *, step: int) -> None:
        """Replace the EMA by the one a checkpoint holds (every rank); one-line InputError when it is missing,
        damaged, of another decay or step, or does not fit the model."""
        from safetensors import safe_open

        folder = Path(folder)
        path = folder / EMA_FILE

        def refuse(why: str) -> InputError:
            return InputError(f"cannot resume from {folder}: {why}; train.ema_decay={self.ema_decay:g} needs the "
                              "adapter EMA to continue exactly: resume from another checkpoint, or start a new run")

        if not path.is_file():
            raise refuse(f"it has no {EMA_FILE}")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as exc:  # SafetensorError, OSError, ...: all mean "refuse"
            reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise refuse(f"{EMA_FILE} is unreadable ({reason})") from None
        if meta.get("format") != EMA_FORMAT:
            raise refuse(f"{EMA_FILE} has format {meta.get('format')!r}, not {EMA_FORMAT!r}")
        try:
            decay, updates = float(meta["ema_decay"]), int(meta["updates"])
        except (KeyError, ValueError):
            raise refuse(f"{EMA_FILE} lacks a readable ema_decay / updates header") from None
        if decay != self.ema_decay:
            raise refuse(f"{EMA_FILE} is an EMA with decay {decay:g}")
        if updates != step:
            raise refuse(f"{EMA_FILE} holds the EMA after {updates} optimizer steps, the checkpoint is at "
                         f"step {step}")
        odd = sorted(set(tensors) ^ set(self.shadow))
        if odd:
            raise refuse(f"{EMA_FILE} does not fit this model (adapter key '{odd[0]}' "
                         f"{'unexpected' if odd[0] in tensors else 'missing'})")
        for name, value in tensors.items():
            if value.dtype != torch.float32 or value.shape != self.shadow[name].shape:
                raise refuse(f"{EMA_FILE} holds '{name}' as {value.dtype} {tuple(value.shape)}, the model's EMA is "
                             f"float32 {tuple(self.shadow[name].shape)}")
        with torch.no_grad():
            for name, value in tensors.items():
                self.shadow[name].copy_(value)
        self.updates = updates
        self.last_decay = decay_at(self.ema_decay, updates) if updates else 0.0

    # -- evaluation and export ---------------------------------------------------------------------------
    @all_ranks
    @contextlib.contextmanager
    def swapped_in(self, accelerator: Any, joint: torch.nn.Module) -> Iterator[None]:
        """The module's adapters hold the EMA inside the block and exactly their own values again after it,
        even when it raises. Enter on every rank (collective under ZeRO-3, where the module holds partitions:
        they are gathered, changed the same way on every rank and partitioned again). Under DeepSpeed the module
        computes in bf16/fp16, so it sees the EMA rounded to that dtype, as it does the raw adapter."""
        named = trained_named_parameters(accelerator.unwrap_model(joint))
        params = [p for _, p in named]
        with torch.no_grad(), distributed.gathered_for_update(accelerator, params):
            saved = [p.data.clone() for p in params]
            for name, p in named:
                p.data.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad(), distributed.gathered_for_update(accelerator, params):
                for p, value in zip(params, saved):
                    p.data.copy_(value)

    def peft_state_dicts(self, joint_module: torch.nn.Module) -> tuple[dict, dict | None]:
        """(unet_sd, text_sd) of the EMA in peft format (fp32, CPU), as `distributed.lora_state_dicts` gives the
        raw adapter: what the best export writes. `joint_module` is the unwrapped joint model."""
        from peft.utils import get_peft_model_state_dict

        parts = []
        for attr in ("unet", "text_encoder"):
            module = getattr(joint_module, attr)
            if not getattr(module, "peft_config", None):
                parts.append(None)
                continue
            prefix = f"{attr}."
            own = {name[len(prefix):]: t.detach().to("cpu", torch.float32).contiguous().clone()
                   for name, t in self.shadow.items() if name.startswith(prefix)}
            parts.append(get_peft_model_state_dict(module, state_dict=own))
        return parts[0] or {}, parts[1]
