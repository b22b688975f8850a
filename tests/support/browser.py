"""Open a local HTML file in headless Chromium (Debian's, driven by Playwright) and report what a reader would
see go wrong: requests for anything but the file itself, content-policy refusals, images that did not load.

Chromium is a system package: `.ci/run` installs it and sets CXRDIST_REQUIRE_BROWSER=1, so in CI a missing
browser fails the test; elsewhere the test is skipped with a line saying how to run it."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# As for any headless run on a closed network: no background requests of Chromium's own (update checks, sync).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def chromium_path() -> str:
    """The Chromium binary, or a skip (a failure where CI requires the browser)."""
    found = os.environ.get("CXRDIST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    message = "headless Chromium not found: apt-get install chromium (or set CXRDIST_CHROMIUM)"
    if os.environ.get("CXRDIST_REQUIRE_BROWSER"):
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class PageCheck:
    """What the page did when opened: the requests besides the page itself, the browser's console errors
    (a content-policy refusal is one), the images that did not load, and the text and chart sizes shown."""

    other_requests: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    broken_images: list[int] = field(default_factory=list)
    images: int = 0
    text: str = ""
    svg_sizes: list[tuple[float, float]] = field(default_factory=list)


def open_page(path: Path, timeout_ms: int = 30_000) -> PageCheck:
    from playwright.sync_api import sync_playwright

    url = path.resolve().as_uri()
    check = PageCheck()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(timeout_ms)
            page.on("request", lambda r: None if r.url == url or r.url.startswith("data:")
                    else check.other_requests.append(r.url))
            page.on("console", lambda m: check.console_errors.append(m.text) if m.type == "error" else None)
            page.goto(url, wait_until="load")
            states = page.evaluate("[...document.images].map(i => i.complete && i.naturalWidth > 0)")
            check.images = len(states)
            check.broken_images = [i for i, ok in enumerate(states) if not ok]
            check.text = page.inner_text("body")
            check.svg_sizes = [(box["width"], box["height"]) for box in
                               page.evaluate("[...document.querySelectorAll('svg')].map(s => "
                                             "{const r = s.getBoundingClientRect(); "
                                             "return {width: r.width, height: r.height}})")]
        finally:
            browser.close()
    return check
