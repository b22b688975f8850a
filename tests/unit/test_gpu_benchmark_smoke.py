"""benchmarks/gpu_train.py stays alive on machines without a GPU (--smoke: CPU, 64 px, 1 step)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_train.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_train_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_peak_table_matches_device_names():
    bench = _load()
    assert bench.peak_for_name("NVIDIA H100 80GB HBM3") == 989.0
    assert bench.peak_for_name("NVIDIA H100 PCIe") == 756.0
    assert bench.peak_for_name("NVIDIA H200") == 989.0
    assert bench.peak_for_name("NVIDIA A100-SXM4-40GB") == 312.0
    assert bench.peak_for_name("NVIDIA L4") == 121.0
    assert bench.peak_for_name("Some Future GPU") is None  # then --peak-tflops is needed for MFU


@pytest.mark.timeout(120)
def test_smoke_run_writes_a_table_with_measured_flops(tmp_path, monkeypatch, tiny_base_path):
    monkeypatch.setenv("BENCH_THREADS", "2")  # tiny_base_path: the preset cache is warm
    bench = _load()
    out = tmp_path / "bench"
    assert bench.main(["--smoke", "--preset", "tiny", "--ranks", "4", "--checkpointing", "on",
                       "--peak-tflops", "1", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    rows = data["rows"]
    assert {r["optim"] for r in rows} == {"adamw", "adamw8bit"}
    for row in rows:
        assert row["status"] == "ok" and row["size"] == 64 and row["batch"] == 1 and row["checkpointing"]
        assert row["images_per_s"] > 0 and row["gflops_per_image"] > 0.01  # counted, not guessed
        assert 0 < row["mfu"] < 1
    table = (out / "results.md").read_text()
    assert "| px | rank | grad ckpt |" in table and table.count("| 64 | 4 | on |") == 2
