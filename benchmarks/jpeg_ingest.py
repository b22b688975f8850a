"""Fast JPEG ingest: full decode + resize against DCT-domain downscaled decode (PIL draft()) + resize.

Both variants run on the same generated JPEGs, in one process, one core, in one run: chest-film-sized
grayscale JPEGs (about 2,500 x 3,050 px, quality 95 like MIMIC-CXR-JPG) with smooth anatomy-like shading, rib-like
stripes, fine grain and a few sharp edges. The final images are compared by PSNR (data range 1) against the
full-decode result.

    python benchmarks/jpeg_ingest.py [--n 12] [--sizes 256,512] [--repeats 2]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_jpegs(folder: Path, n: int, height: int = 3050, width: int = 2500) -> list[Path]:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = 0.45 + 0.3 * np.sin(xx / width * np.pi) * np.cos((yy / height - 0.5) * np.pi)
    ribs = 0.06 * np.sin(yy / 37.0 + 0.3 * np.sin(xx / 400.0))
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        grain = rng.normal(0, 0.015, size=(height // 2, width // 2)).astype(np.float32)
        grain = np.kron(grain, np.ones((2, 2), dtype=np.float32))
        image = base * (0.85 + 0.3 * rng.random()) + ribs + grain
        top, left = rng.integers(200, 800, size=2)
        image[top:top + 300, left:left + 40] += 0.3  # a tube / wire: a sharp edge the resize must not ring on
        pixels = np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8)
        path = folder / f"film{i:03d}.jpg"
        Image.fromarray(pixels).save(path, quality=95)
        paths.append(path)
    return paths


def run(paths: list[Path], size: int, fast: bool) -> tuple[float, list[np.ndarray]]:
    from cxrdist.data.imageio import decode_file, resize_square

    out = []
    start = time.perf_counter()
    for path in paths:
        out.append(resize_square(decode_file(path, (size, "pad") if fast else None), size, "pad"))
    return len(paths) / (time.perf_counter() - start), out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=12)
    parser.add_argument("--sizes", default="256,512")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many passes per variant")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp), args.n)
        mib = sum(p.stat().st_size for p in paths) / args.n / 2**20
        print(f"{args.n} grayscale JPEGs of 2500x3050 px ({mib:.2f} MiB each), one core, best of {args.repeats}")
        print("| size | full decode + resize (img/s/core) | draft() + resize (img/s/core) | speed-up | "
              "PSNR min / mean (dB) | max abs diff (8-bit levels) |")
        print("|---|---|---|---|---|---|")
        for size in [int(s) for s in args.sizes.split(",")]:
            full_rate, full = max((run(paths, size, False) for _ in range(args.repeats)), key=lambda r: r[0])
            fast_rate, fast = max((run(paths, size, True) for _ in range(args.repeats)), key=lambda r: r[0])
            scores = [psnr(a, b) for a, b in zip(full, fast)]
            worst = max(float(np.abs(np.rint(a * 255) - np.rint(b * 255)).max()) for a, b in zip(full, fast))
            print(f"| {size} | {full_rate:.2f} | {fast_rate:.2f} | {fast_rate / full_rate:.2f}x | "
                  f"{min(scores):.1f} / {np.mean(scores):.1f} | {worst:.0f} |")


if __name__ == "__main__":
    main()
