"""K-fold cross-validation summary: mean ± std of every metric over folds, as JSON and TensorBoard."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from cxrdist.config import Config
from cxrdist.fileio import write_json_atomic
from cxrdist.train.trainer import TEST_METRICS, FoldResult

SUMMARY_FILE = "cv_summary.json"


def fold_metrics(result) -> dict[str, float]:
    """A fold's numbers: its best validation value and every test metric."""
    values = {f"test_{k}": float(v) for k, v in (result.test_metrics or {}).items()}
    if result.best_value is not None:
        values["best_val"] = float(result.best_value)
    return values


def mean_std(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per metric: mean, sample std (n-1; 0 for a single fold) and n."""
    out = {}
    for key in sorted({k for row in rows for k in row}):
        vals = [row[key] for row in rows if key in row and not math.isnan(row[key])]
        if not vals:
            continue
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        out[key] = {"mean": mean, "std": std, "n": len(vals)}
    return out


def write_cv_summary(cfg: Config, root: Path, results: list) -> dict[str, Any]:
    from torch.utils.tensorboard import SummaryWriter

    rows = {r.fold: fold_metrics(r) for r in results}
    summary = {"metric": cfg.eval.metric, "folds": {str(k): v for k, v in rows.items()},
               "best_checkpoints": {str(r.fold): str(r.best_path) for r in results},
               "summary": mean_std(list(rows.values()))}
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(root / SUMMARY_FILE, summary)
    writer = SummaryWriter(str(root / "cv"))
    lines = ["| metric | mean | std | folds |", "|---|---|---|---|"]
    for key, s in summary["summary"].items():
        writer.add_scalar(f"cv/{key}_mean", s["mean"], 0)
        writer.add_scalar(f"cv/{key}_std", s["std"], 0)
        lines.append(f"| {key} | {s['mean']:.5g} | {s['std']:.5g} | {s['n']} |")
    writer.add_text("cv/summary", "\n".join(lines), 0)
    writer.close()
    print("cross-validation over %d folds (%s):\n%s" % (len(results), root, "\n".join(
        f"  {k}: {s['mean']:.5g} ± {s['std']:.5g}" for k, s in summary["summary"].items())), flush=True)
    return summary


def finished_result(run_dir: Path):
    """A fold that already wrote test_metrics.json (skipped by --all-folds --resume latest)."""
    path = Path(run_dir) / TEST_METRICS
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return FoldResult(fold=data["fold"], run_dir=Path(run_dir), steps=0, best_path=Path(data["checkpoint"]),
                      best_value=data.get("best_value"), best_epoch=data.get("best_epoch", -1), stopped_early=False,
                      test_metrics=data.get("test", {}), images_per_s=float("nan"))
