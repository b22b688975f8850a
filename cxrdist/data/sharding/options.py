"""ShardOptions: what a shard build is asked for, checked once, and the part of it that shapes the output."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

from cxrdist.data.imageio import BIT_DEPTHS, RESIZE_MODES
from cxrdist.errors import InputError

DEFAULT_TEST_FRACTION = 0.2
OFFICIAL_TEST_FRACTION = ("--test-fraction does not apply with --official-split: the data set's own test split is "
                          "used; pass --no-official-split to draw a test split by patient")


@dataclass
class ShardOptions:
    size: int = 256
    folds: int = 5
    test_fraction: Optional[float] = None  # None: DEFAULT_TEST_FRACTION, or nothing drawn with official_split
    seed: int = 0
    shard_size: int = 1000
    workers: int = 0  # 0 = all cores
    resize_mode: str = "pad"  # pad (letterbox, keeps the whole image) | crop (centre crop)
    bit_depth: int = 8  # 8 | 16 bit PNG
    resume: bool = False
    progress: bool = True
    max_reject_fraction: float = 0.5  # more rejects than this share of the inputs fails the build
    official_split: bool = False  # the source's test split (Record.split) replaces --test-fraction

    def __post_init__(self) -> None:
        if self.official_split and self.test_fraction is not None:
            raise InputError(OFFICIAL_TEST_FRACTION)  # it would be silently ignored
        checks = [
            (self.size >= 8 and self.size % 8 == 0, "--size", "a multiple of 8, >= 8"),
            (self.folds >= 1, "--folds", ">= 1"),
            (self.test_fraction is None or 0.0 <= self.test_fraction < 1.0, "--test-fraction", "in [0, 1)"),
            (self.shard_size >= 1, "--shard-size", ">= 1"),
            (self.workers >= 0, "--workers", ">= 0 (0 = all cores)"),
            (self.resize_mode in RESIZE_MODES, "--resize", " or ".join(RESIZE_MODES)),
            (self.bit_depth in BIT_DEPTHS, "--bit-depth", "8 or 16"),
            (0.0 <= self.max_reject_fraction <= 1.0, "--max-reject-fraction", "in [0, 1]"),
            (0 <= self.seed <= 2**63 - 1, "--seed", "in 0..2**63-1"),  # what numpy and torch generators take
        ]
        for ok, name, wanted in checks:
            if not ok:
                raise InputError(f"{name} must be {wanted}")

    @property
    def drawn_test_fraction(self) -> Optional[float]:
        """The share of groups drawn into the test split; None with the official split (nothing is drawn)."""
        if self.official_split:
            return None
        return DEFAULT_TEST_FRACTION if self.test_fraction is None else self.test_fraction

    def plan_key(self) -> dict[str, Any]:
        """The options that shape the output; a resumed build must match them."""
        data = {**asdict(self), "test_fraction": self.drawn_test_fraction}
        for key in ("workers", "resume", "progress", "max_reject_fraction"):
            data.pop(key)
        if not data["official_split"]:
            data.pop("official_split")  # plans and indexes written before the option existed still match
        return data

    def replaced(self, **changes: Any) -> "ShardOptions":
        """A copy with `changes` (ShardOptions fields), checked again."""
        return ShardOptions(**{**asdict(self), **changes})
