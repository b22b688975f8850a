"""benchmarks/gpu_train.py: the exact-name peak table, MFU bookkeeping, the deadline, results written after every
row, and the real-trainer sweep kept alive on CPU (--smoke: tiny preset, 64 px, phantom shards, 1 FLOP-counted +
2 measured steps per variant)."""
from __future__ import annotations

import json

import pytest

from support.scripts import load_script

# The names torch.cuda.get_device_name() reports, and their dense bf16 peaks (TFLOP/s).
KNOWN = {
    "NVIDIA L4": 121.0,
    "NVIDIA L40S": 362.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA H100 80GB HBM3": 989.0,
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA H200": 989.0,
    "NVIDIA H200 NVL": 835.0,
}


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/gpu_train.py", "gpu_train_bench")


@pytest.mark.parametrize("name, peak", sorted(KNOWN.items()))
def test_exact_device_names_give_their_peak(bench, name, peak):
    assert bench.peak_for_name(name) == peak
    assert bench.resolve_peak(name, None) == (peak, "table")


@pytest.mark.parametrize("name", ["NVIDIA H100", "H100", "NVIDIA H100 80GB HBM3 MIG 3g.40gb", "NVIDIA GH200 480GB",
                                  "NVIDIA A100", "NVIDIA L40", "nvidia h100 pcie", "Some Future GPU"])
def test_substring_or_unknown_names_are_measured_with_mfu_not_available(bench, name):
    assert bench.peak_for_name(name) is None
    peak, why = bench.resolve_peak(name, None)
    assert peak is None and "MFU n/a" in why and "--peak-tflops" in why and name.strip() in why


def test_peak_override_precision_and_whitespace_normalisation(bench):
    assert bench.peak_for_name("  NVIDIA H100   PCIe ") == 756.0  # the one documented normalisation
    assert bench.resolve_peak("NVIDIA H100 80GB HBM3 MIG 3g.40gb", 420.0) == (420.0, "--peak-tflops")
    with pytest.raises(bench.PeakError):
        bench.resolve_peak("NVIDIA H200", 0.0)
    assert bench.resolve_peak("NVIDIA H200", None, "fp16") == (989.0, "table")  # same tensor-core rate as bf16
    peak, why = bench.resolve_peak("NVIDIA H200", None, "no")  # fp32/TF32 has another peak: never the bf16 one
    assert peak is None and "MFU n/a" in why
    assert bench.resolve_peak("NVIDIA H200", 495.0, "no") == (495.0, "--peak-tflops")


def test_default_batches_follow_the_size(bench, tmp_path):
    args = bench.parse_args(["--sizes", "512", "--out", str(tmp_path)])
    assert (args.batch, args.grad_accum) == ([8], [1])  # not 256 px's 32
    args = bench.parse_args(["--sizes", "256", "512", "1024", "--out", str(tmp_path)])
    assert args.batch == [32, 8, 2]
    args = bench.parse_args(["--sizes", "256", "512", "--batch", "16", "8", "--grad-accum", "3", "6",
                             "--checkpointing", "off", "--optims", "adamw8bit", "--out", str(tmp_path)])
    assert [v.name for v in bench.plan(args)] == ["256px-b16x3-ckptoff-adamw8bit", "512px-b8x6-ckptoff-adamw8bit"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--sizes", "256", "512", "--grad-accum", "1", "2", "3", "--out", str(tmp_path)])


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


def test_a_bad_peak_is_a_one_line_refusal(bench, tmp_path, capsys):
    assert bench.main(["--smoke", "--peak-tflops", "-1", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--peak-tflops" in err
    assert not (tmp_path / "b" / "results.json").exists()


def test_a_deadline_skips_what_cannot_finish(bench):
    def row(size, wall, status="ok"):
        return {"size": size, "wall_s": wall, "status": status}

    v256, v512 = bench.Variant(256, 32, False, "adamw"), bench.Variant(512, 8, False, "adamw")
    assert bench.expected_wall_s([], v256) is None  # the first variant always gets its chance
    done = [row(256, 30.0), row(256, 42.0), row(512, None, "skipped")]
    assert bench.expected_wall_s(done, v256) == 42.0 and bench.expected_wall_s(done, v512) == 42.0
    assert bench.expected_wall_s(done + [row(512, 80.0)], v512) == 80.0
    job = bench.Job(v512, "product", [], 2, 15, "/tmp/x")
    skipped = bench.skipped_row(job, 80.0, 61.4)
    assert skipped["status"] == "skipped" and skipped["error"] == "--deadline: about 80 s needed, 61 s left"


@pytest.mark.timeout(150)
def test_smoke_sweep_runs_the_real_trainer(bench, tmp_path, tiny_base_path, one_thread, capsys):
    out = tmp_path / "bench"
    assert bench.main(["--smoke", "--peak-tflops", "1", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    meta, rows = data["meta"], data["rows"]
    assert meta["device"].startswith("cpu") and meta["torch"] and meta["date"] and meta["peak_tflops"] == 1.0
    assert meta["finished"] is True and meta["variants"] == 4
    grid = {(ckpt, optim) for ckpt in (False, True) for optim in ("adamw", "adamw8bit")}
    assert {(r["checkpointing"], r["optim"]) for r in rows} == grid
    for r in rows:
        assert r["status"] == "ok" and r["size"] == 64 and r["batch"] == 2 and r["world_size"] == 1
        assert r["images_per_s"] > 0 and r["step_ms"] > 0 and r["data_ms"] >= 0
        assert r["gflop_img"] > 0.01 and 0 < r["vae_share"] < 1  # counted on the trainer's step, VAE included
        assert 0 < r["mfu"] <= r["hfu"] < 1
        assert r["peak_alloc_gib"] is None and r["peak_reserved_gib"] is None and r["device_used_gib"] is None
        assert r["host_ms"] is None  # GPU-only measurements
    off = {r["optim"]: r["gflop_img"] for r in rows if not r["checkpointing"]}
    assert all(r["gflop_img"] > off[r["optim"]] for r in rows if r["checkpointing"])  # recomputation is counted
    assert (out / "runs" / "64px-b2-ckptoff-adamw" / "config.yaml").exists()
    table = (out / "results.md").read_text()
    assert "| px | batch | ranks | grad ckpt | optim | status | images/s |" in table
    assert table.count("| 64 | 2 | 1 |") == 4 and meta["torch"] in table and meta["date"] in table
    assert not list(out.glob("*.cxrdist-tmp"))  # written through a temporary name, then renamed
    assert "results.md" in capsys.readouterr().out.splitlines()[-1]


@pytest.mark.timeout(150)
def test_smoke_variant_in_its_own_process(bench, tmp_path, tiny_base_path, one_thread, monkeypatch):
    import torch

    def no_cuda_here(*args, **kwargs):
        raise AssertionError("the sweep's own process touched CUDA")

    # With the variants in processes of their own, this process holds no CUDA context: a child describes the device.
    for name in ("_lazy_init", "init", "get_device_name", "get_device_properties", "device_count", "mem_get_info"):
        monkeypatch.setattr(torch.cuda, name, no_cuda_here)
    out = tmp_path / "bench"
    assert bench.main(["--smoke", "--isolation", "subprocess", "--checkpointing", "off", "--optims", "adamw",
                       "--out", str(out)]) == 0
    meta, (row,) = (lambda d: (d["meta"], d["rows"]))(json.loads((out / "results.json").read_text()))
    assert meta["device"].startswith("cpu (") and meta["peak_tflops"] is None and "MFU n/a" in meta["peak_source"]
    assert row["status"] == "ok" and row["images_per_s"] > 0 and row["mfu"] is None  # CPU without a peak
    assert "cxrdist.train.trainer" in (out / "logs" / "64px-b2-ckptoff-adamw.log").read_text()  # the trainer's log


@pytest.mark.timeout(150)
def test_results_are_written_after_every_row(bench, tmp_path, tiny_base_path, one_thread, monkeypatch):
    """A sweep cut short after its first variant (killed at a deadline, preempted) keeps the row it finished."""
    real, calls = bench.run_in_process, []

    def first_then_killed(job):
        calls.append(job.variant.name)
        if len(calls) > 1:
            raise KeyboardInterrupt  # stands in for the process dying mid-variant
        return real(job)

    monkeypatch.setattr(bench, "run_in_process", first_then_killed)
    out = tmp_path / "bench"
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--smoke", "--checkpointing", "off", "--out", str(out)])
    data = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in data["rows"]] == ["64px-b2-ckptoff-adamw"] and data["rows"][0]["status"] == "ok"
    assert data["meta"]["finished"] is False and data["meta"]["variants"] == 2
    assert "partial: 1 of 2 variants so far" in (out / "results.md").read_text()


@pytest.mark.timeout(150)
def test_a_spent_deadline_skips_every_variant_and_says_so(bench, tmp_path, tiny_base_path, one_thread, capsys):
    out = tmp_path / "bench"
    assert bench.main(["--smoke", "--deadline", "0.001", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len(rows) == 4 and all(r["status"] == "skipped" and r["error"].startswith("--deadline") for r in rows)
    assert "skipped at the deadline: 64px-b2-ckptoff-adamw" in (out / "results.md").read_text()
    assert "0/4 variants measured, 4 skipped at the --deadline" in capsys.readouterr().out


def test_the_preset_is_found_where_the_trainer_built_it(bench, tiny_base_path, monkeypatch):
    """The sweep's readiness check looks in the folder the trainer's loader writes: once built, no rank rebuilds it
    and a waiting rank sees it at once (it used to look for another folder name and rebuild the 860M preset)."""
    from cxrdist.models import loading

    assert (loading.preset_path("tiny") / "model_index.json").exists()  # built by the fixture, through the loader
    monkeypatch.setattr(loading, "preset_folder", lambda name: pytest.fail("the built preset was built again"))
    bench.ensure_preset("tiny")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(bench.time, "sleep", lambda s: pytest.fail("rank 1 waited for a preset that was there"))
    bench.ensure_preset("tiny")


def test_a_preset_that_cannot_be_built_is_one_line(bench, tmp_path, monkeypatch, capsys):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "open_clip" else real_find_spec(name, *a))
    monkeypatch.setenv("CXRDIST_CACHE", str(tmp_path / "cache"))  # nothing built there yet
    assert bench.main(["--smoke", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install --no-deps open-clip-torch" in err


@pytest.mark.timeout(150)
def test_a_device_without_a_peak_on_file_is_measured_with_mfu_not_available(bench, tmp_path, tiny_base_path,
                                                                             one_thread, monkeypatch):
    """A MIG slice (or an NVL part before it was in the table) used to stop the run with exit 2 and no row."""
    facts = bench.device_facts()
    monkeypatch.setattr(bench, "device_facts", lambda: {**facts, "name": "NVIDIA H100 80GB HBM3 MIG 3g.40gb"})
    out = tmp_path / "bench"
    # fp32, as every in-process smoke variant (accelerate keeps one precision per process), so MFU is n/a here for
    # the precision too; what the name alone gives is checked name by name above (resolve_peak).
    assert bench.main(["--smoke", "--checkpointing", "off", "--optims", "adamw", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    (row,) = data["rows"]
    assert row["status"] == "ok" and row["images_per_s"] > 0 and row["mfu"] is None and row["hfu"] is None
    assert data["meta"]["device"] == "NVIDIA H100 80GB HBM3 MIG 3g.40gb" and data["meta"]["peak_tflops"] is None
    assert "MFU n/a" in (out / "results.md").read_text()
