"""End-to-end: Steps & bounds in Debian's Chromium on SmolLM2, with its own server (module-scoped
fixture), so no work left by other pages' sessions competes with its run on a 2-core machine."""

from __future__ import annotations

import re

import pytest

from tests.e2e.conftest import ARTIFACTS
from tests.e2e.test_browser_pages import wait_plots

pytestmark = [pytest.mark.e2e, pytest.mark.smollm2]


def test_steps_page_runs_a_short_trajectory(app_url, page):
    """A 0…3 grid: the real paper-mode trajectory (SmolLM2, W_V heads of the last 4 layers)
    finishes and its plots appear. The page opens by a link that carries the grid (the setting is a
    bound widget), so its first run is the short one, not the 0…30 default (covered by AppTest)."""
    page.goto(f"{app_url}/steps_bounds?steps_grid=3", wait_until="domcontentloaded")
    box = page.get_by_role("spinbutton", name="Grid max T", exact=True)
    box.wait_for(timeout=180_000)
    assert box.input_value() == "3"
    # the page's own message for this run: grid 0…3 and the engine's step count and status
    caption = page.get_by_text(re.compile(r"grid 0…3\. Engine: .*3 step\(s\) in [\d.]+ s \(done\)"))
    caption.first.wait_for(timeout=420_000)
    page.locator('[data-testid="stMetric"]').filter(has_text="T_MAP (fixed σ̂)").first.wait_for()
    # the verdict says which update it is about, and what the committed targets suite found for AdamW runs
    scope = page.locator('[data-testid="stCaptionContainer"]').filter(has_text="Which update this verdict is about")
    scope.first.wait_for()
    assert "did no better than the base rate" in scope.first.inner_text()
    wait_plots(page, 4, timeout=420_000)
    page.screenshot(path=str(ARTIFACTS / "e2e_steps.png"), full_page=True)
