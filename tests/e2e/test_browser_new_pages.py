"""End-to-end: the Targets, Reliability and Paper reproduction pages in Debian's Chromium, on the
embedded SmolLM2 and the committed results (artifacts/published/). Its own server.

* Targets: a real comparison of every default target on the default few-shot example (4 steps,
  seeds 0–2): the table, the error-vs-steps and error-vs-FLOPs charts and the winner sentence, and
  the committed targets suite below it.
* Reliability: the committed calibration result is shown by default (its regret table and the
  reliability diagram), with how it was made.
* Paper reproduction: the committed result (the newest file under artifacts/published/reproduction)
  is shown by default, beside the paper's, with its real-GD Exp2 supplement."""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import ARTIFACTS
from tests.e2e.test_browser_pages import open_page, set_number, wait_plots
from ttt_core.experiments.store import published_dir

pytestmark = [pytest.mark.e2e, pytest.mark.smollm2]


def _idle(page) -> None:
    page.locator("[data-testid='stStatusWidget']").wait_for(state="hidden", timeout=600_000)


def test_targets_page_compares_the_targets(app_url, page):
    open_page(page, app_url, "Targets")
    page.get_by_role("button", name="Compare targets").wait_for(timeout=180_000)
    set_number(page, "Steps (same for all)", "4")
    _idle(page)
    page.get_by_role("button", name="Compare targets").click()
    wait_plots(page, 3, timeout=900_000)   # steps + FLOPs charts, beside the committed suite's chart
    _idle(page)
    # the comparison's table and the suite's table: the grid is drawn lazily, so wait for it rather than count it now
    page.locator("[data-testid='stDataFrame']").nth(1).wait_for(state="attached", timeout=120_000)
    page.get_by_text("W_Q").first.wait_for()
    page.get_by_text("(the committed suite)").first.wait_for(timeout=60_000)   # beside the single prompt
    page.screenshot(path=str(ARTIFACTS / "e2e_targets.png"), full_page=True)


def test_reliability_page_shows_the_committed_calibration(app_url, page):
    open_page(page, app_url, "Reliability")
    page.get_by_text("Which step rule to trust on prompts like this").first.wait_for(timeout=180_000)
    page.get_by_text("Is P(TTT beats ICL) calibrated?").first.wait_for(timeout=180_000)
    wait_plots(page, 2)
    _idle(page)
    page.screenshot(path=str(ARTIFACTS / "e2e_reliability.png"), full_page=True)


def test_reproduction_page_shows_the_committed_result(app_url, page):
    open_page(page, app_url, "Paper reproduction")
    page.get_by_text("Latest results").first.wait_for(timeout=180_000)
    committed = sorted(published_dir("reproduction").glob("reproduction-*.json"))[-1].name
    page.get_by_text(committed).first.wait_for(timeout=60_000)
    page.get_by_text("Made with").first.wait_for(timeout=60_000)
    for sup in sorted(published_dir("reproduction").glob("exp2-gd-*.json")):   # its real-GD supplement
        tasks = json.loads(sup.read_text())["tasks"]
        page.get_by_text(f"Exp2 — real GD on {tasks} of the").first.wait_for(timeout=60_000)
    wait_plots(page, 1)
    _idle(page)
    page.screenshot(path=str(ARTIFACTS / "e2e_reproduction.png"), full_page=True)
