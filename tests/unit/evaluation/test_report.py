"""The evaluation's intervals and its HTML report: Wilson and bootstrap intervals, the table both outputs share,
and the page as a browser shows it (it renders, every image loads, nothing is requested)."""
from __future__ import annotations

import base64
import io
import re
from dataclasses import asdict

import numpy as np
import pytest
from PIL import Image

from cxrdist.data.loader import SplitImages
from cxrdist.data.sources.phantom import draw_study
from cxrdist.evaluation.report import render_report, write_report
from cxrdist.evaluation.runs import (EvaluateOptions, Evaluated, References, describe_model, format_table,
                                     metric_rows, score_against_split)
from cxrdist.metrics.attributes import ATTRIBUTES
from cxrdist.metrics.faithfulness import faithfulness_details, macro_interval, wilson_interval
from cxrdist.metrics.image import image_metrics
from support.browser import open_page


@pytest.mark.parametrize("hits, n, low, high", [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605)])
def test_wilson_interval_matches_newcombe(hits, n, low, high):
    # Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table I, method 3 (Wilson).
    assert wilson_interval(hits, n) == pytest.approx((low, high), abs=5e-5)


def test_wilson_interval_at_the_ends_and_without_data():
    z2 = 1.959963984540054**2
    assert wilson_interval(0, 20) == pytest.approx((0.0, z2 / (20 + z2)))
    assert wilson_interval(29, 29) == pytest.approx((29 / (29 + z2), 1.0))
    assert all(np.isnan(wilson_interval(0, 0)))


def test_macro_interval_is_a_bootstrap_over_whole_images():
    rng = np.random.default_rng(1)
    hits = (rng.random((200, 4)) < 0.7).astype(float)
    hits[::3, 2] = np.nan  # attribute 2 not stated for a third of the images
    low, high = macro_interval(hits)
    shares = np.nanmean(hits, axis=0)
    assert low < shares.mean() < high and high - low < 0.12
    assert macro_interval(hits) == [low, high]  # a fixed seed: the same interval on every run
    assert macro_interval(np.ones((50, 4))) == [1.0, 1.0]
    wider = macro_interval(hits[:40])
    assert wider[1] - wider[0] > high - low  # fewer images, wider interval
    # Images right or wrong about every attribute at once vary the macro more than independent attributes do:
    together = np.repeat((rng.random((200, 1)) < 0.7).astype(float), 4, axis=1)
    assert np.diff(macro_interval(together))[0] > 1.5 * (high - low)


@pytest.fixture(scope="module")
def evaluated():
    """Two models on 48 phantom reports: one draws the real images (a perfect generator), one draws them
    shuffled (text-blind, a base); scored with the evaluation's own scoring."""
    studies = [draw_study(i, 7) for i in range(48)]
    real = np.stack([s.render(64) for s in studies]).astype(np.float32)
    data = SplitImages([s.report for s in studies], real, [s.labels for s in studies])
    refs = References(data)
    shuffled = real[np.random.default_rng(0).permutation(len(real))]
    out = {}
    for path, images, meta in (("models/phantom-base", shuffled, None),
                               ("runs/demo/best", real, {"base": {"source": "models/phantom-base"}})):
        result = {"split": "test", "samples": len(images), "options": asdict(EvaluateOptions()),
                  **score_against_split(images, data, {"faithfulness", "image"}),
                  "diversity": 0.42, "diversity_se": None, "model": describe_model(path, meta)}
        out[path] = Evaluated(result, images, refs)
    return out


def test_the_evaluation_keeps_each_attributes_interval_and_the_macros(evaluated):
    result = evaluated["runs/demo/best"].result
    data = evaluated["runs/demo/best"].references.data
    details = faithfulness_details(list(data.references), data.labels)
    for attr in ATTRIBUTES:
        low, high = result["faithfulness_intervals"][attr]["ci95"]
        assert low <= result["faithfulness"][attr] <= high
        assert result["faithfulness_intervals"][attr]["n"] == details["attributes"][attr]["n"]
    assert result["faithfulness_intervals"]["macro"]["n"] == 48
    metrics = image_metrics(data.references, data.references[::-1])
    assert metrics["ssim_se"] > 0 and metrics["mse_se"] > 0
    assert image_metrics(data.references[:1], data.references[1:2])["ssim_se"] is None


def test_text_table_and_report_table_are_the_same_rows(evaluated):
    results = {name: ev.result for name, ev in evaluated.items()}
    rows = metric_rows(results)
    text = format_table(results)
    assert [r.label for r in rows if r.group == "faithfulness"][-1] == "macro"
    assert all(len(r.cells) == 2 for r in rows)
    for row in rows:
        assert row.label in text
    ssim = next(r for r in rows if r.label == "ssim")
    assert ssim.cells[0].se is not None and " +-" in text.splitlines()[[r.label for r in rows].index("ssim") + 1]


def _report(evaluated, tmp_path, names=None):
    chosen = {n: evaluated[n] for n in (names or evaluated)}
    return write_report(chosen, tmp_path / "report.html"), {n: ev.result for n, ev in chosen.items()}


def test_report_shows_the_intervals_it_computed_and_says_which_have_none(evaluated, tmp_path):
    path, results = _report(evaluated, tmp_path)
    page = path.read_text()
    macro = results["runs/demo/best"]["faithfulness_intervals"]["macro"]["ci95"]
    assert f"[{macro[0]:.3f}, {macro[1]:.3f}]" in page
    assert "&plusmn;" in page and "Wilson" in page
    statement = re.search(r"<p>Intervals: (.*?)</p>", page).group(1)
    assert "Shown without one (none was computed): " in statement and "diversity (ssim)" in statement
    assert "macro_balanced" in statement and "ssim," not in statement
    assert "(base)" in page and "(trained from models/phantom-base)" in page
    assert "was not evaluated here" not in page  # the base is in the chart


def test_report_chart_draws_each_model_with_its_interval_and_chance(evaluated, tmp_path):
    path, results = _report(evaluated, tmp_path)
    svg = re.search(r"<svg.*?</svg>", path.read_text(), re.S).group(0)
    attributes = [a for a in (*ATTRIBUTES, "macro") if a in results["runs/demo/best"]["faithfulness"]]
    assert svg.count("<rect") == 2 * len(attributes)
    assert svg.count("<title>95 % interval") == 2 * len(attributes)
    assert svg.count("<title>chance") == len(attributes)
    assert "http://www.w3.org/2000/svg" in svg  # the namespace, a name only: nothing is fetched from it


def test_report_names_a_base_that_was_not_evaluated(evaluated, tmp_path):
    path, _ = _report(evaluated, tmp_path, names=["runs/demo/best"])
    assert "models/phantom-base) was not evaluated here" in path.read_text()


def test_report_is_one_file_of_inline_images(evaluated, tmp_path):
    page = render_report(evaluated, "t")
    sources = re.findall(r"<img[^>]* src=\"([^\"]*)\"", page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    Image.open(io.BytesIO(base64.b64decode(sources[0].split(",", 1)[1]))).verify()
    assert not re.search(r"(src|href)=['\"]?(https?:|//)", page)
    assert "Content-Security-Policy" in page


def test_report_in_a_headless_browser(evaluated, tmp_path):
    path, results = _report(evaluated, tmp_path)
    check = open_page(path)
    assert check.other_requests == [] and check.console_errors == []
    assert check.images > 0 and check.broken_images == []
    assert "Faithfulness per attribute" in check.text and "runs/demo/best (trained from" in check.text
    assert len(check.svg_sizes) == 1 and min(check.svg_sizes[0]) > 100


def test_the_browser_check_catches_a_request_and_a_broken_image(evaluated, tmp_path):
    path, _ = _report(evaluated, tmp_path)
    page = path.read_text()
    external = "<img src='http://203.0.113.9/x.png' width='8' height='8'>"
    blocked = tmp_path / "blocked.html"  # the page's own policy refuses the load, and the image stays broken
    blocked.write_text(page.replace("<h2>Metrics</h2>", external + "<h2>Metrics</h2>"))
    check = open_page(blocked)
    assert check.console_errors and check.broken_images
    unguarded = tmp_path / "unguarded.html"  # without the policy the browser asks the network
    unguarded.write_text(re.sub(r"<meta http-equiv='Content-Security-Policy'[^>]*>", "",
                                page.replace("<h2>Metrics</h2>", external + "<h2>Metrics</h2>")))
    assert open_page(unguarded, timeout_ms=10_000).other_requests == ["http://203.0.113.9/x.png"]
