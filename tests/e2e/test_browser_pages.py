"""End-to-end: the analysis pages and both Live qTTT modes in Debian's Chromium (SmolLM2)."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import ARTIFACTS

pytestmark = [pytest.mark.e2e, pytest.mark.smollm2]


def _open(page, app_url, link: str):
    page.goto(app_url, wait_until="domcontentloaded")
    page.get_by_text("Model card").first.wait_for(timeout=120_000)
    page.get_by_role("link", name=link).first.click()


def _wait_plots(page, n: int, timeout: int = 240_000) -> None:
    """Wait until at least `n` plotly figures are in the page (some sit in hidden tabs)."""
    page.locator(".js-plotly-plot").nth(n - 1).wait_for(state="attached", timeout=timeout)
    page.locator(".js-plotly-plot").first.wait_for(state="visible", timeout=timeout)


def _set_number(page, label: str, value: str) -> None:
    box = page.get_by_role("spinbutton", name=label, exact=True)
    box.wait_for(timeout=180_000)
    box.fill(value)
    box.press("Enter")


def test_spectrum_page_shows_real_spectrum(app_url, page):
    _open(page, app_url, "Spectrum & SNR")
    _wait_plots(page, 4)
    page.get_by_text("plug-in").first.wait_for()
    assert page.locator(".js-plotly-plot").count() >= 4
    page.screenshot(path=str(ARTIFACTS / "e2e_spectrum.png"), full_page=True)


def test_heads_page_shows_heatmaps(app_url, page):
    _open(page, app_url, "Heads & blocks")
    _wait_plots(page, 2)
    page.get_by_text("Query-Aware").first.wait_for()
    page.screenshot(path=str(ARTIFACTS / "e2e_heads.png"), full_page=True)


def test_steps_page_opens_and_starts_the_trajectory(app_url, page):
    """The full 0…30 paper-mode trajectory on SmolLM2 takes minutes on a 2-core CPU; its numbers
    are checked by AppTest (tests/app/test_steps_page.py). Here: the page renders in a real
    browser and the measured run starts and reports progress."""
    _open(page, app_url, "Steps & bounds")
    page.get_by_label("Grid max T").wait_for(timeout=180_000)
    page.get_by_text("Paper-mode GD step").first.wait_for(timeout=300_000)
    page.screenshot(path=str(ARTIFACTS / "e2e_steps.png"), full_page=True)


def _run_and_wait(page, n_steps: int, mode: str) -> None:
    """Click Run and wait for *this* run's completion message (not an earlier run's)."""
    page.get_by_role("button", name="Run").click()
    done = page.get_by_text(f"Finished {n_steps} steps").filter(has_text=f"({mode}")
    done.first.wait_for(timeout=420_000)


def test_live_qttt_both_modes(app_url, page):
    _open(page, app_url, "Live qTTT")
    # Paper mode on the clean digit-shift example (the default prompt)
    paper = page.get_by_text("Paper mode (LOO gradient descent)").first
    paper.wait_for(timeout=180_000)
    paper.click()
    _set_number(page, "Steps T", "2")
    _run_and_wait(page, 2, "paper")
    _wait_plots(page, 2)
    page.screenshot(path=str(ARTIFACTS / "e2e_live_paper.png"), full_page=True)
    # qTTT mode: a few short spans
    page.get_by_text("qTTT", exact=True).first.click()
    _set_number(page, "Steps N", "3")
    _set_number(page, "Span length k", "16")
    _run_and_wait(page, 3, "qttt")
    _wait_plots(page, 2)
    page.get_by_text("Kernel:").first.wait_for()
    page.screenshot(path=str(ARTIFACTS / "e2e_live_qttt.png"), full_page=True)
