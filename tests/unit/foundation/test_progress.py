"""Progress reporting: tqdm's bar on a terminal, a bounded number of plain lines (no `\\r`) in a log."""
from __future__ import annotations

import io
import threading

import pytest

from cxrdist.errors import ConfigError, CxrdistError, report_now
from cxrdist.progress import ENV, LineProgress, Silent, duration, progress_meter, resolve_mode
from support.robustness import PROGRESS_LINE


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    """A clock the test moves: `tick` seconds pass at every call."""

    def __init__(self, tick: float = 0.0):
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


@pytest.fixture(autouse=True)
def _no_forced_mode(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)


def test_a_log_gets_one_line_per_tenth_and_a_last_line_without_carriage_returns():
    log = io.StringIO()
    with progress_meter(1000, desc="train", unit="step", every=100, file=log, clock=Clock(0.01)) as meter:
        assert isinstance(meter, LineProgress)
        for _ in range(1000):
            meter.update(1)
    text = log.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and text.endswith("\n")
    assert len(lines) == 10  # 100, 200, ... 900, then the last line (1000 is said once, by close)
    assert lines[0].startswith("train: step 100/1000 (10%), ") and ", eta " in lines[0]
    assert lines[-2].startswith("train: step 900/1000 (90%)")
    assert lines[-1].startswith("train: step 1000/1000 (100%), ") and ", done in " in lines[-1]


def test_the_default_pace_is_a_tenth_of_the_total():
    log = io.StringIO()
    with progress_meter(37, desc="shard out", unit="img", file=log, clock=Clock(0.0)) as meter:
        for _ in range(37):
            meter.update(1)
    counts = [line.split("/")[0].split()[-1] for line in log.getvalue().splitlines()]
    assert counts == ["4", "8", "12", "16", "20", "24", "28", "32", "36", "37"]


def test_a_slow_run_also_gets_a_line_every_interval_seconds():
    log = io.StringIO()
    meter = progress_meter(100, desc="unet", unit="step", every=10**9, interval=5.0, file=log, clock=Clock(1.0))
    for _ in range(100):
        meter.update(1)
    meter.close()
    lines = log.getvalue().splitlines()
    # One clock reading (1 s) per update: a line every 5 updates, none at 100/100 (the last line says it).
    assert len(lines) == 20 and lines[0].startswith("unet: step 5/100 (5%)")
    assert lines[-1].startswith("unet: step 100/100 (100%)")


def test_resumed_counts_start_at_initial_and_the_rate_counts_only_new_work():
    log = io.StringIO()
    clock = Clock(0.0)
    meter = progress_meter(500, initial=100, desc="train", unit="step", file=log, clock=clock)
    for _ in range(60):
        clock.now += 0.5
        meter.update(1)
    assert log.getvalue().splitlines() == ["train: step 150/500 (30%), 2.0 step/s, eta 2m55s"]


def test_byte_counts_are_scaled_and_an_unknown_total_prints_no_eta():
    log = io.StringIO()
    clock = Clock(0.0)
    meter = progress_meter(None, desc="NLMCXR_png.tgz", unit="B", unit_scale=True, unit_divisor=1024,
                           interval=10.0, file=log, clock=clock)
    for _ in range(12):
        clock.now += 1.0
        meter.update(1 << 20)
    meter.close()
    assert log.getvalue().splitlines() == ["NLMCXR_png.tgz: 10.0MiB, 1.0MiB/s",
                                           "NLMCXR_png.tgz: 12.0MiB, 1.0MiB/s, done in 12s"]


def test_postfix_values_follow_the_counts():
    log = io.StringIO()
    with progress_meter(2, desc="shard out", unit="img", file=log) as meter:
        meter.update(2)
        meter.set_postfix(written=2, rejected=0)
    assert log.getvalue().rstrip("\n").endswith(", written=2, rejected=0")


def test_a_terminal_gets_tqdm_and_a_log_gets_plain_lines():
    from tqdm.std import tqdm

    terminal = Terminal()
    bar = progress_meter(3, desc="train", unit="step", file=terminal)
    assert isinstance(bar, tqdm)
    bar.update(3)
    bar.close()
    assert "\r" in terminal.getvalue() and "3/3" in terminal.getvalue()
    assert isinstance(progress_meter(3, file=io.StringIO()), LineProgress)
    assert resolve_mode(None, Terminal()) == "bar" and resolve_mode(None, io.StringIO()) == "lines"
    assert resolve_mode(None, None) == "lines"


def test_the_environment_forces_a_mode(monkeypatch):
    monkeypatch.setenv(ENV, "lines")
    assert isinstance(progress_meter(3, file=Terminal()), LineProgress)
    monkeypatch.setenv(ENV, "bar")
    assert not isinstance(progress_meter(3, file=io.StringIO(), disable=True), LineProgress)
    assert resolve_mode(None, io.StringIO()) == "bar"
    monkeypatch.setenv(ENV, "off")
    log = io.StringIO()
    with progress_meter(3, file=log) as meter:
        meter.update(3)
    assert isinstance(meter, Silent) and log.getvalue() == ""
    monkeypatch.setenv(ENV, "fancy")
    with pytest.raises(ConfigError, match=r"CXRDIST_PROGRESS=fancy is not a progress mode: use one of auto, bar"):
        progress_meter(3, file=log)


@pytest.mark.parametrize("stream", [io.StringIO, Terminal])
def test_other_ranks_print_nothing(stream):
    out = stream()
    with progress_meter(10, desc="train", file=out, disable=True) as meter:
        meter.update(10)
        meter.set_postfix(loss=1.0)
    assert out.getvalue() == ""


def test_an_error_leaves_no_last_line_after_the_error_line(capsys):
    import sys

    with pytest.raises(CxrdistError):
        with progress_meter(4, desc="train", unit="step", every=1, file=sys.stderr) as meter:
            meter.update(1)
            raise report_now(CxrdistError("rank 0 lost the other ranks at step 1"))
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("train: step 1/4 (25%)")
    assert lines[-1] == "Error: rank 0 lost the other ranks at step 1"


def test_threads_updating_one_meter_lose_no_count():
    log = io.StringIO()
    meter = progress_meter(4000, desc="x.bin", unit="B", unit_scale=True, file=log)

    def work():
        for _ in range(1000):
            meter.update(1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    meter.close()
    assert meter.n == 4000 and log.getvalue().splitlines()[-1].startswith("x.bin: 4.0kB/4.0kB (100%)")


def test_the_hostile_input_battery_tells_progress_lines_from_the_error_line():
    log = io.StringIO()
    clock = Clock(0.5)
    meter = progress_meter(40, desc="shard out", unit="img", every=8, file=log, clock=clock)
    meter.update(8)
    meter.set_postfix(written=8, rejected=0)
    meter.update(8)
    meter.close()
    unknown = progress_meter(None, desc="a.tgz", unit="B", unit_scale=True, unit_divisor=1024, interval=0.1,
                             file=log, clock=clock)
    unknown.update(100)
    unknown.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 5 and all(PROGRESS_LINE.search(line) for line in lines), lines
    assert not PROGRESS_LINE.search("Error: 12 of 40 images (30%) were rejected, 3.1 img/s")
    assert not PROGRESS_LINE.search("Error: shards/x: index.json is missing: build it with cxrdist shard")


def test_durations_read_at_a_glance():
    assert [duration(s) for s in (0, 42.4, 123, 3599.6, 3725)] == ["0s", "42s", "2m03s", "1h00m", "1h02m"]


def test_a_shard_build_in_a_log_writes_plain_lines(tmp_path, capsys):
    from cxrdist.data.shard import build_shards
    from cxrdist.data.sources.manifest import ManifestSource
    from support.data_files import make_manifest_set

    source = ManifestSource(make_manifest_set(tmp_path / "m", corrupt=[5]))
    build_shards(source, tmp_path / "out", size=32, folds=3, test_fraction=0.25, seed=0, shard_size=4, workers=1,
                 progress=True)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("shard out: ")]
    assert "\r" not in err and 2 <= len(lines) <= 12
    assert lines[-1].startswith("shard out: img 24/24 (100%)") and lines[-1].endswith("written=23, rejected=1")



def test_sampling_and_pretraining_report_in_plain_lines(tiny_base_path, one_thread, monkeypatch, capsys):
    import torch

    from cxrdist.config import PretrainConfig
    from cxrdist.models.loading import load_base
    from cxrdist.models.text import encode_prompts
    from cxrdist.sampling.pipeline import SampleSettings, generate_images
    from cxrdist.train.pretrain import train_unet, train_vae

    monkeypatch.setenv(ENV, "lines")
    tiny = load_base(tiny_base_path)  # its own copy: pretraining below changes its weights
    generate_images(tiny, ["Clear lungs.", "Mild cardiomegaly."], SampleSettings(steps=2, batch_size=1), seeds=[1, 2],
                    progress=True)
    cfg = PretrainConfig(vae_steps=3, vae_batch_size=2, unet_steps=3, unet_batch_size=2)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (4, tiny.vae.config.in_channels, 32, 32), dtype=torch.uint8)
    train_vae(tiny.vae.requires_grad_(True), pixels, pixels[:1], cfg, generator)
    latents = torch.randn(4, tiny.unet.config.in_channels, 8, 8)
    contexts = encode_prompts(tiny.tokenizer, tiny.text_encoder, ["chest radiograph", ""], warn=False)
    train_unet(tiny.unet.requires_grad_(True), latents, contexts, torch.zeros(4, dtype=torch.long),
               tiny.scheduler_config, cfg, generator)
    err = capsys.readouterr().err
    last = {line.split(":")[0]: line for line in err.splitlines() if ": step " in line}
    assert "\r" not in err
    assert last["sampling"].startswith("sampling: step 4/4 (100%)") and "done in" in last["sampling"]
    assert last["vae"].startswith("vae: step 3/3 (100%)") and ", loss=" in last["vae"]
    assert last["unet"].startswith("unet: step 3/3 (100%)") and ", loss=" in last["unet"]


def test_a_stop_line_starts_its_own_line_even_under_a_progress_bar(capsys):
    """The launcher's log is read line by line: `Error: rank 0 ...` must not trail the bar's last update."""
    import sys

    from tqdm.auto import tqdm

    from cxrdist.errors import CxrdistError, report_now

    bar = tqdm(total=2, file=sys.stderr, desc="train")
    bar.update(1)
    error = report_now(CxrdistError("rank 0 lost the other ranks at step 1"))
    bar.close()
    assert error.reported
    # split on "\n" only: splitlines() also splits on the bar's "\r", so a line glued to the bar would pass
    assert "Error: rank 0 lost the other ranks at step 1" in capsys.readouterr().err.split("\n")
