"""Early stopping on one metric, in one direction, with patience counted in evaluations."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from cxrdist.errors import ConfigError


@dataclass
class EarlyStopper:
    """`update(value)` after every evaluation; `should_stop` once `patience` evaluations in a row brought no
    improvement over the best so far (patience 0 = never stop). One instance per fold."""

    metric: str
    mode: str = "min"  # min | max
    patience: int = 3
    min_delta: float = 0.0
    best: Optional[float] = None
    best_step: int = -1
    best_epoch: int = -1
    bad_evals: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Anything but "min" used to count as max; an unresolved "auto" must not silently pick a direction.
        if self.mode not in ("min", "max"):
            raise ConfigError(f"config key 'eval.mode' must be min or max when training starts, "
                              f"got {self.mode!r}: build the config with cxrdist.config (it resolves auto)")

    def is_better(self, value: float) -> bool:
        if value is None or math.isnan(value):
            return False
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def update(self, value: float, *, step: int, epoch: int) -> bool:
        """Record one evaluation; True when it is a new best."""
        improved = self.is_better(value)
        if improved:
            self.best, self.best_step, self.best_epoch, self.bad_evals = float(value), step, epoch, 0
        else:
            self.bad_evals += 1
        self.history.append({"step": step, "epoch": epoch, "value": float(value), "improved": improved})
        return improved

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_evals >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)
