"""benchmarks/gpu_train.py: the exact-name peak table, MFU bookkeeping, and the real-trainer sweep kept alive on
CPU (--smoke: tiny preset, 64 px, phantom shards, 1 FLOP-counted + 2 measured steps per variant)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_train.py"

# The names torch.cuda.get_device_name() reports, and their dense bf16 peaks (TFLOP/s).
KNOWN = {
    "NVIDIA L4": 121.0,
    "NVIDIA L40S": 362.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA H100 80GB HBM3": 989.0,
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H200": 989.0,
}


def _load():
    spec = importlib.util.spec_from_file_location("gpu_train_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load()


@pytest.mark.parametrize("name, peak", sorted(KNOWN.items()))
def test_exact_device_names_give_their_peak(bench, name, peak):
    assert bench.peak_for_name(name) == peak
    assert bench.resolve_peak(name, None) == (peak, "table")


@pytest.mark.parametrize("name", ["NVIDIA H100", "H100", "NVIDIA H100 NVL", "NVIDIA H100 80GB HBM3 MIG 3g.40gb",
                                  "NVIDIA H200 NVL", "NVIDIA A100", "NVIDIA L40", "nvidia h100 pcie",
                                  "Some Future GPU"])
def test_substring_or_unknown_names_are_refused(bench, name):
    assert bench.peak_for_name(name) is None
    with pytest.raises(bench.UnknownDeviceError, match="--peak-tflops"):
        bench.resolve_peak(name, None)


def test_peak_override_and_whitespace_normalisation(bench):
    assert bench.peak_for_name("  NVIDIA H100   PCIe ") == 756.0  # the one documented normalisation
    assert bench.resolve_peak("NVIDIA H100 NVL", 835.0) == (835.0, "--peak-tflops")
    with pytest.raises(bench.UnknownDeviceError):
        bench.resolve_peak("NVIDIA H200", 0.0)


def test_mfu_uses_recomputation_free_flops(bench):
    def row(ckpt, gflop, size=256, world=1):
        return {"status": "ok", "size": size, "checkpointing": ckpt, "gflop_img": gflop, "images_per_s": 100.0,
                "world_size": world, "mfu": None, "hfu": None}

    rows = [row(False, 1000.0), row(True, 1400.0), row(True, 1400.0, size=512, world=2), {"status": "oom"}]
    bench.add_utilisation(rows, 100.0)  # 100 TFLOP/s per device
    assert rows[0]["mfu"] == pytest.approx(1.0) and rows[0]["hfu"] == pytest.approx(1.0)
    assert rows[1]["model_gflop_img"] == 1000.0 and rows[1]["mfu"] == pytest.approx(1.0)
    assert rows[1]["hfu"] == pytest.approx(1.4)  # recomputation counts as hardware work only
    assert rows[2]["model_flops_from"].startswith("own count") and rows[2]["mfu"] == pytest.approx(0.7)
    bench.add_utilisation(rows[:1], None)  # no peak: nothing to divide by, values left alone
    assert bench.busy_us([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17


def test_unknown_peak_is_a_one_line_refusal(bench, tmp_path, capsys):
    assert bench.main(["--smoke", "--peak-tflops", "-1", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--peak-tflops" in err
    assert not (tmp_path / "b" / "results.json").exists()


@pytest.mark.timeout(150)
def test_smoke_sweep_runs_the_real_trainer(bench, tmp_path, tiny_base_path, one_thread, capsys):
    out = tmp_path / "bench"
    assert bench.main(["--smoke", "--peak-tflops", "1", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    meta, rows = data["meta"], data["rows"]
    assert meta["device"].startswith("cpu") and meta["torch"] and meta["date"] and meta["peak_bf16_tflops"] == 1.0
    grid = {(ckpt, optim) for ckpt in (False, True) for optim in ("adamw", "adamw8bit")}
    assert {(r["checkpointing"], r["optim"]) for r in rows} == grid
    for r in rows:
        assert r["status"] == "ok" and r["size"] == 64 and r["batch"] == 2 and r["world_size"] == 1
        assert r["images_per_s"] > 0 and r["step_ms"] > 0 and r["data_ms"] >= 0
        assert r["gflop_img"] > 0.01 and 0 < r["vae_share"] < 1  # counted on the trainer's step, VAE included
        assert 0 < r["mfu"] <= r["hfu"] < 1
        assert r["peak_mem_gib"] is None and r["host_ms"] is None  # GPU-only measurements
    off = {r["optim"]: r["gflop_img"] for r in rows if not r["checkpointing"]}
    assert all(r["gflop_img"] > off[r["optim"]] for r in rows if r["checkpointing"])  # recomputation is counted
    assert (out / "runs" / "64px-b2-ckptoff-adamw" / "config.yaml").exists()
    table = (out / "results.md").read_text()
    assert "| px | batch | ranks | grad ckpt | optim | status | images/s |" in table
    assert table.count("| 64 | 2 | 1 |") == 4 and meta["torch"] in table and meta["date"] in table
    assert not list(out.glob(".*.tmp"))  # written through a temporary name, then renamed
    assert "results.md" in capsys.readouterr().out.splitlines()[-1]


@pytest.mark.timeout(150)
def test_smoke_variant_in_its_own_process(bench, tmp_path, tiny_base_path, one_thread):
    out = tmp_path / "bench"
    assert bench.main(["--smoke", "--isolation", "subprocess", "--checkpointing", "off", "--optims", "adamw",
                       "--out", str(out)]) == 0
    (row,) = json.loads((out / "results.json").read_text())["rows"]
    assert row["status"] == "ok" and row["images_per_s"] > 0 and row["mfu"] is None  # CPU without a peak
    assert "cxrdist.train.trainer" in (out / "logs" / "64px-b2-ckptoff-adamw.log").read_text()  # the trainer's log
