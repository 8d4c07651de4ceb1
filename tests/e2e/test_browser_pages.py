"""End-to-end: the Spectrum & SNR and Heads & blocks pages in Debian's Chromium (SmolLM2).

Live qTTT and Steps & bounds browser checks passed when run alone but timed out when run after
the other pages against one shared server on a loaded 2-core machine; they are not in CI yet
(see the issue notes). Their pages are covered by AppTest."""

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
