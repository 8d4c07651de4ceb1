"""End-to-end: the Live qTTT page runs both modes on the default curated example (clean digit
shift, SmolLM2) in Debian's Chromium. Its own server (module-scoped fixture), so no work left by
other pages' sessions competes with these runs."""

from __future__ import annotations

import re

import pytest

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
