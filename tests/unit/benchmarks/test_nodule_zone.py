"""benchmarks/nodule_zone.py scores what the reader sees: real phantoms place every nodule, swapped zones none."""
from __future__ import annotations


import numpy as np

from support.scripts import load_script



def _load():
    return load_script("benchmarks/nodule_zone.py", "nodule_zone_bench")


def test_placement_of_real_phantoms_and_of_wrong_zones():
    bench = _load()
    studies = bench.nodule_studies(12, seed=99)
    assert len(studies) == 12 and all(s.nodule for s in studies)
    images = np.stack([s.render(64) for s in studies])
    truth = [bench.zone_of(s) for s in studies]
    assert bench.placement(images, truth) == {"present": 1.0, "zone": 1.0, "side_if_present": 1.0,
                                              "height_if_present": 1.0}
    other_side = [("left" if t.startswith("right") else "right") + " " + t.split()[1] for t in truth]
    moved = bench.placement(images, other_side)
    assert moved["zone"] == 0.0 and moved["side_if_present"] == 0.0 and moved["height_if_present"] == 1.0
    blank = bench.placement(np.zeros_like(images), truth)
    assert blank["present"] == 0.0 and blank["zone"] == 0.0
