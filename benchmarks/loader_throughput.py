"""Loader throughput: shards + train_loader vs a per-file PNG Dataset + DataLoader doing the same work.

The per-file baseline is what the original project did every epoch: open the full-size PNG, convert to
grayscale, resize to the training size, scale to [-1, 1], batch. The shard loader reads pre-resized PNGs
from tar files. Same images, batch size and worker count on both sides; one run, side by side.

    python benchmarks/loader_throughput.py [--n 64] [--size 256] [--batch-size 16] [--workers 0]
"""
from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from pathlib import Path

import torch

from shard_throughput import make_inputs


class PngFiles(torch.utils.data.Dataset):
    def __init__(self, files: list[Path], size: int) -> None:
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from cxrdist.data.imageio import decode_file, resize_square

        pixels = resize_square(decode_file(self.files[i]), self.size, "pad")
        return torch.from_numpy(pixels).unsqueeze(0) * 2 - 1, f"report {i}"


def time_batches(batches, key=None) -> tuple[int, float]:
    start, seen = time.perf_counter(), 0
    for batch in batches:
        pixels = batch[key] if key else batch[0]
        seen += pixels.shape[0]
    return seen, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=3, help="shard-loader epochs timed (it is fast)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from cxrdist.data.loader import train_loader
    from cxrdist.data.shard import build_shards
    from cxrdist.data.sources.manifest import ManifestSource

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = make_inputs(tmp / "in", args.n, bits=8)  # IU's own PNGs are 8-bit
        with open(manifest) as handle:
            files = [tmp / "in" / row["image"] for row in csv.DictReader(handle)]
        # one fold holds everything used for training: test 0, 2 folds, train on fold1 (= all but fold 0)
        build_shards(ManifestSource(manifest), tmp / "shards", size=args.size, folds=2, test_fraction=0.0,
                     shard_size=32, workers=os.cpu_count() or 1, progress=False)
        baseline = torch.utils.data.DataLoader(PngFiles(files, args.size), batch_size=args.batch_size,
                                               shuffle=True, num_workers=args.workers, drop_last=True)
        n_base, t_base = time_batches(baseline)
        n_shard, t_shard = 0, 0.0
        for epoch in range(args.epochs):
            loader = train_loader(tmp / "shards", 0, batch_size=args.batch_size, image_size=args.size,
                                  epoch=epoch, num_workers=args.workers, shuffle_buffer=64)
            n, t = time_batches(loader, "pixel_values")
            n_shard, t_shard = n_shard + n, t_shard + t
    base_rate, shard_rate = n_base / t_base, n_shard / t_shard
    print(f"load avg {os.getloadavg()[0]:.1f}; {args.n} images, batch {args.batch_size}, workers {args.workers}")
    print(f"per-file PNG Dataset + DataLoader : {base_rate:8.1f} samples/s ({n_base} samples)")
    print(f"shards + train_loader             : {shard_rate:8.1f} samples/s ({n_shard} samples, {args.epochs} epochs)")
    print(f"speed-up                          : {shard_rate / base_rate:8.1f}x")


if __name__ == "__main__":
    main()
