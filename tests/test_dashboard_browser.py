"""The dashboard in a real browser: Debian's headless Chromium driven by Playwright.

Install what it needs with `bash scripts/install_browser.sh`. Set FEDVEIL_SAVE_SCREENSHOT=1 to
refresh docs/img/dashboard.png from this test.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fixtures_dashboard as fx  # noqa: E402

from fedveil.dashboard.serve import free_port, serve, stop, url_for, wait_ready  # noqa: E402
from fedveil.platform.store import MetricsStore  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _needs_browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing: run `bash scripts/install_browser.sh` (Debian's chromium package)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is missing: run `bash scripts/install_browser.sh`")
    return sync_playwright


def test_dashboard_in_headless_chromium(tmp_path):
    sync_playwright = _needs_browser()
    url = fx.build(tmp_path / "work")
    host, port = "127.0.0.1", free_port()
    log = tmp_path / "dashboard.log"
    proc = serve(url, port=port, host=host, background=True, log_file=log)
    try:
        assert wait_ready(host, port, timeout=40, proc=proc), log.read_text()
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1440, "height": 1000})
                outside: list[str] = []  # the page must work offline: nothing but the dashboard itself
                page.on("request", lambda r: None if r.url.startswith(url_for(host, port)) or r.url.startswith(
                    ("data:", "blob:")) else outside.append(r.url))
                page.goto(url_for(host, port), wait_until="domcontentloaded")
                # the charts render: vega-embed puts a canvas or an svg in each chart
                page.wait_for_selector(".vega-embed canvas, .vega-embed svg", timeout=30_000)
                page.get_by_text("Privacy budget").first.wait_for(timeout=10_000)
                body = page.inner_text("body")
                for text in ("fedveil · hospitals-ckks", "Overview", "Convergence", "Privacy", "Secure aggregation",
                             "System", "Global accuracy", "Rounds", "5 / 8", "89.1%", "hospital-c"):
                    assert text in body, text
                assert page.locator("[data-testid='stException']").count() == 0
                assert page.locator(".vega-embed").count() >= 2
                page.wait_for_timeout(800)  # let the charts finish their first paint
                shot = tmp_path / "dashboard.png"
                page.screenshot(path=str(shot), full_page=True)
                assert shot.stat().st_size > 20_000
                if os.environ.get("FEDVEIL_SAVE_SCREENSHOT"):
                    dest = REPO / "docs" / "img" / "dashboard.png"
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(shot, dest)

                # live: a new round shows up without reloading the page
                writer = MetricsStore(url)
                try:
                    t0 = writer.get_run("run-ckks")["started_at"]
                    writer.record_round("run-ckks", 6, started_at=t0 + 50, finished_at=t0 + 60, seconds=10.0,
                                        participants=2, accuracy=0.912, loss=0.31, bytes_up=2_097_152)
                finally:
                    writer.close()
                page.get_by_text("6 / 8").first.wait_for(timeout=15_000)
                assert "91.2%" in page.inner_text("body")

                # the privacy tab shows the declined organization
                page.get_by_role("tab", name="Privacy").click()
                page.get_by_text("Declined to train because their ε budget ran out").wait_for(timeout=10_000)
                page.get_by_text("Ledger").first.wait_for(timeout=10_000)
                page.screenshot(path=str(tmp_path / "privacy.png"), full_page=True)
                assert not outside, f"the page fetched from outside the dashboard: {outside}"
            finally:
                browser.close()
    finally:
        stop(proc)
    assert proc.poll() is not None
