"""End-to-end: the Live qTTT page runs both modes on the default curated example (clean digit
shift, SmolLM2) in Debian's Chromium. Its own server (module-scoped fixture), so no work left by
other pages' sessions competes with these runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from playwright.sync_api import Error as PlaywrightError

from tests.e2e.conftest import ARTIFACTS
from tests.e2e.test_browser_pages import open_page, set_number, wait_plots

pytestmark = [pytest.mark.e2e, pytest.mark.smollm2]


def wait_param(page, key: str, value) -> None:
    """Wait until the app has taken a setting: bound widgets write their value into the URL."""
    page.wait_for_url(re.compile(rf"[?&]{key}={value}(&|$)"), timeout=120_000)


def run_and_wait(page, n_steps: int, mode: str) -> None:
    """Click Run and wait for *this* run's completion message (mode and step count must match).
    exact: the saved-runs section has a "Help for Load saved runs…" button too."""
    page.get_by_role("button", name="Run", exact=True).click()
    done = page.get_by_text(f"Finished {n_steps} steps").filter(has_text=f"({mode}")
    done.first.wait_for(timeout=420_000)


def download_saved_run(page) -> Path:
    """Click "Save this run (JSON)" once the script run that drew the finished run has ended: a rerun
    replaces the button's file, and Chromium cancels a download started just before that (seen once
    in CI as "Download.path: canceled"). One more try if it is cancelled all the same."""
    for attempt in range(2):
        page.locator("[data-testid='stStatusWidget']").wait_for(state="hidden", timeout=120_000)
        with page.expect_download(timeout=60_000) as dl:
            page.get_by_role("button", name="Save this run (JSON)").click()
        try:
            return Path(dl.value.path())
        except PlaywrightError as exc:
            if attempt or "canceled" not in str(exc):
                raise
    raise AssertionError("unreachable")


def test_live_qttt_runs_paper_mode_then_qttt(app_url, page):
    open_page(page, app_url, "Live qTTT")
    page.get_by_role("button", name="Run", exact=True).wait_for(timeout=180_000)
    # paper mode: choose it and wait until its own controls replaced qTTT's
    page.get_by_text("Paper mode (LOO gradient descent)").first.click()
    set_number(page, "Steps T", "2")
    wait_param(page, "paper_steps", 2)
    page.get_by_text("Kernel: PyTorch SDPA").first.wait_for(timeout=60_000)
    run_and_wait(page, 2, "paper")
    wait_plots(page, 2)
    page.get_by_text("Answer before adaptation").first.wait_for()
    page.get_by_text("Answer after adaptation").first.wait_for()
    page.screenshot(path=str(ARTIFACTS / "e2e_live_paper.png"), full_page=True)
    # qTTT mode: three steps on short spans
    page.get_by_text("qTTT", exact=True).first.click()
    set_number(page, "Steps N", "3")
    set_number(page, "Span length k", "16")
    wait_param(page, "qttt_steps", 3)
    wait_param(page, "qttt_span", 16)
    run_and_wait(page, 3, "qttt")
    wait_plots(page, 3)
    page.get_by_text("Kernel: PyTorch reference on CPU").first.wait_for()
    page.screenshot(path=str(ARTIFACTS / "e2e_live_qttt.png"), full_page=True)
    # save this run: the downloaded JSON holds the shown run (its 3 steps after step 0, qTTT settings)
    saved = download_saved_run(page)
    doc = json.loads(saved.read_text())
    assert doc["kind"] == "qttt_run" and isinstance(doc["ttt_lens_export"], int)
    recs = doc["data"]["records"]
    assert [r["step"] for r in recs] == [0, 1, 2, 3] and doc["settings"]["steps"] == 3
    assert doc["data"]["backend_label"] and doc["model"]
    # the paper run before it is kept for comparison: the overlay and the final-metrics table are drawn
    page.get_by_text("Final metrics").first.wait_for(timeout=60_000)
    # load the saved file back: it joins the comparison under its file name
    named = ARTIFACTS / "e2e_saved_qttt_run.json"
    named.write_text(saved.read_text())
    page.locator("input[type=file]").first.set_input_files(str(named))
    # its name is in the overlay's legend and the runs table (canvas cells and SVG text: attached, not "visible")
    page.get_by_text("e2e_saved_qttt_run.json").first.wait_for(state="attached", timeout=60_000)
    wait_plots(page, 5)
    page.get_by_text("Final metrics").first.scroll_into_view_if_needed()
    # the script run that drew the comparison has finished (no faded, stale elements in the picture)
    page.locator("[data-testid='stStatusWidget']").wait_for(state="hidden", timeout=120_000)
    page.screenshot(path=str(ARTIFACTS / "e2e_live_overlay.png"), full_page=True)
