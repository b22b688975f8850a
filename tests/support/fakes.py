"""In-memory stand-ins for a shard set, so trainer unit tests run in seconds without shards."""
from __future__ import annotations

import torch

from cxrdist.config import load_config

REPORTS = ["Heart size normal. No effusion.", "Mild cardiomegaly.", "Left pleural effusion.",
           "Right pleural effusion. Heart size normal.", "Enlarged heart. Bilateral effusions."]


def make_samples(n: int, size: int = 64, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    out = []
    for i in range(n):
        r = 0.3 + 0.3 * torch.rand(1, generator=g).item()
        img = torch.where(xx**2 + yy**2 < r**2, 0.8, -0.8) + 0.05 * torch.randn(size, size, generator=g)
        out.append({"pixel": img[None].clamp(-1, 1), "report": REPORTS[i % len(REPORTS)], "key": f"s{i:04d}",
                    "labels": {"heart": int(r > 0.45)}})
    return out


def collate(samples: list[dict], channels: int = 1) -> dict:
    return {"pixel_values": torch.stack([s["pixel"].expand(channels, -1, -1) for s in samples]), "prompts": [s["report"] for s in samples],
            "keys": [s["key"] for s in samples], "meta": [{"uid": s["key"], "labels": s["labels"]} for s in samples]}


class FakeData:
    """The TrainData interface over fixed in-memory samples; order depends on (seed, epoch) only."""

    val_split = "fold0"
    shards_dir = None  # in-memory: never cached latents, whatever the config's data.shards holds

    def __init__(self, train: list[dict], val: list[dict], batch_size: int, *, channels: int = 1, rank: int = 0,
                 world_size: int = 1, test: list[dict] | None = None, seed: int = 0):
        self.train, self.val, self.test = train, val, test if test is not None else val
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.channels = channels  # the base VAE's: 3-channel bases get the grayscale image in every channel

    def batches_per_epoch(self) -> int:
        return len(self.train) // (self.batch_size * self.world_size)

    def train_batches(self, epoch: int, start_batch: int = 0):
        order = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
        mine = order[self.rank::self.world_size].tolist()
        for b in range(start_batch, self.batches_per_epoch()):
            yield collate([self.train[i] for i in mine[b * self.batch_size:(b + 1) * self.batch_size]], self.channels)

    def eval_batches(self, split: str):
        data = self.test if split == "test" else self.val
        mine = data[self.rank::self.world_size]
        for i in range(0, len(mine), self.batch_size):
            yield collate(mine[i:i + self.batch_size], self.channels)

    def training_splits(self) -> list[str]:
        return ["train"]

    def first_samples(self, split: str, n: int):
        data = {"test": self.test, "train": self.train}.get(split, self.val)
        if n:
            yield collate(data[:n], self.channels)

    def train_reports(self) -> list[str]:
        n = len(self.train)
        share = self.train[self.rank * n // self.world_size:(self.rank + 1) * n // self.world_size]
        return [s["report"] for s in share]


FAST = ["train.batch_size=4", "eval.num_metric_images=0", "eval.num_grid_prompts=0", "train.log_every=1",
        "eval.run_test=false", "train.checkpoint_every=1000", "eval.eval_every_steps=1000"]


def make_trainer(tmp_path, *overrides, n_train=16, n_val=4, resume=None):
    from cxrdist.train.trainer import Trainer

    cfg = load_config(None, FAST + [f"train.output_dir={tmp_path}", *overrides])
    samples = make_samples(n_train + n_val)

    def factory(channels, rank, world_size):
        return FakeData(samples[:n_train], samples[n_train:], cfg.train.batch_size, channels=channels, rank=rank,
                        world_size=world_size)

    return Trainer(cfg, fold=0, run_dir=tmp_path / "fold0", data_factory=factory, resume=resume)


def reset_accelerate() -> None:
    """accelerate keeps one process-wide state: each Accelerator built after this starts from none (another mixed
    precision, another world)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
