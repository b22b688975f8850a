"""Phantom generation and reader speed on ONE core, and reader accuracy on held-out real phantoms.

    python benchmarks/phantom_speed.py                 # 3000 images at 64 px, accuracy on 2000 phantoms
    python benchmarks/phantom_speed.py --n 1000 --accuracy 0

Pins itself to one CPU and one BLAS thread before numpy loads. Prints images/s from wall time and from
process CPU time (the latter is the fairer number on a shared machine).
"""
from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from cxrdist.data.sources.phantom import draw_study, generate  # noqa: E402
from cxrdist.metrics.faithfulness import chance_level, faithfulness_details, format_report  # noqa: E402
from cxrdist.metrics.reader import read_image  # noqa: E402

HELD_OUT_SEED = 12345  # reader thresholds were set on seeds 1 and 2


def timed(label: str, n: int, fn) -> list:
    fn_warm = fn(min(50, n))  # warm caches (grids, interpolation matrices)
    del fn_warm
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn(n)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    print(f"{label:<34} {n / wall:>8.0f} img/s wall   {n / cpu:>8.0f} img/s cpu   ({n} images)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=3000, help="images per speed measurement")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--accuracy", type=int, default=2000, help="held-out phantoms for reader accuracy (0: skip)")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, pinned to 1; "
          f"numpy {np.__version__}")
    images = timed(f"generate (image+report+labels) {args.size}px", args.n,
                   lambda n: [generate(i, args.size, 0)[0] for i in range(n)])
    timed("records only (no pixels)", args.n, lambda n: [draw_study(i, 0).geometry() for i in range(n)])
    timed(f"reader ({args.size}px input)", args.n, lambda n: [read_image(images[i]) for i in range(n)])
    if args.accuracy:
        studies = [draw_study(i, HELD_OUT_SEED) for i in range(args.accuracy)]
        held_out = [draw_study(i, HELD_OUT_SEED).render(args.size) for i in range(args.accuracy)]
        labels = [s.labels for s in studies]
        print(f"\nreader accuracy on {args.accuracy} held-out real phantoms (seed {HELD_OUT_SEED}); "
              "chance = a text-blind generator (sum of squared class shares)")
        print(format_report(faithfulness_details(held_out, labels), chance_level(labels)))


if __name__ == "__main__":
    main()
