"""Where an adapter's nodule zone is lost: in the text, or in placing the nodule in the image.

The nodule attribute has 7 classes (none, or left / right x upper / middle / lower). Two measurements, on
phantom studies of a set that no shard set of the demo or the base uses (--seed 99):

1. The text (`--text-probe`): is the reported zone in the encoder's last-layer state of the report's "nodule"
   token, the context the UNet's cross-attention reads? A linear probe for the 6 zones (chance 1/6), fitted on
   3/4 of --probe-reports nodule reports and scored on the rest.
2. The image: each model draws each of --studies nodule reports as `cxrdist sample` does (same seeds for every
   model); the reader says whether a nodule is there and in which zone, and, where one is, whether its side and
   its height are the reported ones (chance 1/2 and 1/3).

    python benchmarks/nodule_zone.py --model-path runs/demo/fold0/best_model_fold0_epoch24 --text-probe
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cxrdist.data.sources.phantom import draw_study  # noqa: E402
from cxrdist.metrics.reader import read_image  # noqa: E402
from cxrdist.models.text import encode_ids, tokenize  # noqa: E402
from cxrdist.sampling.loading import load_for_sampling  # noqa: E402
from cxrdist.sampling.pipeline import SampleSettings, generate_images  # noqa: E402

ZONES = ("upper", "middle", "lower")


def nodule_studies(count: int, seed: int) -> list:
    studies, index = [], 0
    while len(studies) < count:
        study = draw_study(index, seed)
        index += 1
        if study.nodule:
            studies.append(study)
    return studies


def zone_of(study) -> str:
    return f"{study.findings.nodule_side} {study.findings.nodule_zone}"


def placement(images: np.ndarray, truth: list[str]) -> dict[str, float]:
    reads = [read_image(image)["nodule"] for image in images]
    drawn = [(read, want) for read, want in zip(reads, truth) if read not in ("none", "unknown")]
    return {"present": len(drawn) / len(reads),
            "zone": float(np.mean([read == want for read, want in zip(reads, truth)])),
            "side_if_present": float(np.mean([r.split()[0] == w.split()[0] for r, w in drawn])) if drawn else 0.0,
            "height_if_present": float(np.mean([r.split()[1] == w.split()[1] for r, w in drawn])) if drawn else 0.0}


@torch.no_grad()
def text_probe(model, studies, batch_size: int = 200) -> float:
    """Held-out accuracy of a linear probe for the 6 zones on the "nodule" token's last-layer state."""
    reports = [s.report for s in studies]
    ids, mask = tokenize(model.tokenizer, reports, warn=False)
    states = torch.cat([encode_ids(model.text_encoder, ids[i:i + batch_size], mask[i:i + batch_size])
                        for i in range(0, len(reports), batch_size)])
    tokens = [model.tokenizer.convert_ids_to_tokens(row) for row in ids]
    where = torch.tensor([next(i for i, t in enumerate(row) if t.startswith("nod")) for row in tokens])
    x = states[torch.arange(len(states)), where].float()
    y = torch.tensor([2 * ZONES.index(s.findings.nodule_zone) + (s.findings.nodule_side == "left") for s in studies])
    fit = len(x) * 3 // 4
    x = (x - x[:fit].mean(0)) / (x[:fit].std(0) + 1e-6)
    with torch.enable_grad():
        weight = torch.zeros(x.shape[1], 6, requires_grad=True)
        bias = torch.zeros(6, requires_grad=True)
        opt = torch.optim.LBFGS([weight, bias], max_iter=200)

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(x[:fit] @ weight + bias, y[:fit]) + 1e-3 * weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
    return float(((x[fit:] @ weight + bias).argmax(1) == y[fit:]).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", action="append", required=True, help="an adapter export or base; repeat")
    ap.add_argument("--studies", type=int, default=96, help="nodule studies drawn and scored per row")
    ap.add_argument("--seed", type=int, default=99, help="phantom set the studies come from")
    ap.add_argument("--probe-reports", type=int, default=1600, help="nodule reports of the text probe")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--text-probe", action="store_true", help="also probe each model's text encoder for the zone")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    studies = nodule_studies(args.studies, args.seed)
    truth, reports = [zone_of(s) for s in studies], [s.report for s in studies]
    settings = SampleSettings(steps=args.steps, scheduler="dpm++", guidance=args.guidance, batch_size=32)
    print(f"{len(studies)} nodule studies of phantom set {args.seed}; zone chance given a nodule: side 1/2, "
          f"height 1/3, zone 1/6")
    probe_studies = nodule_studies(args.probe_reports, args.seed) if args.text_probe else []
    print(f"{'model':<44}{'nodule drawn':>13}{'zone':>7}{'side | drawn':>14}{'height | drawn':>16}")
    for path in args.model_path:
        model, _ = load_for_sampling(path)
        label = path if len(path) < 44 else "..." + path[-40:]  # exports of several runs share their folder name
        if args.text_probe:
            print(f"{label:<44}text: zone from the 'nodule' token, held out: "
                  f"{text_probe(model, probe_studies):.3f}", flush=True)
        p = placement(generate_images(model, reports, settings, seeds=list(range(len(studies)))), truth)
        print(f"{label:<44}{p['present']:>13.3f}{p['zone']:>7.3f}{p['side_if_present']:>14.3f}"
              f"{p['height_if_present']:>16.3f}", flush=True)


if __name__ == "__main__":
    main()
