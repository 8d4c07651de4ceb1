"""End-to-end: the real app in Debian's Chromium, on the embedded SmolLM2 model."""

from __future__ import annotations

import re

import pytest

from tests.e2e.conftest import ARTIFACTS

pytestmark = [pytest.mark.e2e, pytest.mark.smollm2]


def test_home_token_view_and_model_card(app_url, page):
    page.goto(app_url, wait_until="domcontentloaded")
    page.get_by_text("Model card").first.wait_for(timeout=120_000)
    page.get_by_text("Parameters").first.wait_for()
    assert page.get_by_text("134.5 M").first.is_visible()  # SmolLM2-135M parameter count
    box = page.get_by_role("textbox", name="Prompt", exact=True)
    box.fill("great fun -> positive\nso dull -> negative\nloved it -> positive\nawful -> negative\nsuperb ->")
    box.press("Control+Enter")  # apply the text area
    page.get_by_text("few-shot (4 demonstrations").first.wait_for(timeout=60_000)
    page.locator(".token-view").first.wait_for()
    page.get_by_text("superb", exact=True).first.wait_for()
    chips = page.locator(".token-view .tok").count()
    assert chips >= 15
    # the sidebar (model choice, prompt box) is still there after the rerun
    assert page.get_by_role("textbox", name="Prompt", exact=True).is_visible()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "e2e_home.png"), full_page=True)


def test_guided_tour_opens_and_loads_an_example(app_url, page):
    page.goto(app_url, wait_until="domcontentloaded")
    page.get_by_text("Model card").first.wait_for(timeout=120_000)
    page.get_by_text("Guided tour: when → how far → which").first.click()
    page.get_by_text("5 · Long context: a short needle").first.wait_for()
    page.get_by_role("button", name="Load example").nth(4).click()
    page.get_by_text("long context + question").first.wait_for(timeout=60_000)
    page.get_by_text("The secret number is").first.wait_for()
    assert "secret number" in page.get_by_role("textbox", name="Prompt", exact=True).input_value()
    page.screenshot(path=str(ARTIFACTS / "e2e_tour.png"), full_page=True)


def test_prompt_survives_a_page_switch_right_after_loading(app_url, page):
    """Regression: switching page as soon as Home shows its content used to mount the sidebar's
    prompt box empty, and the next interaction sent the empty text back (prompt lost)."""
    page.goto(app_url, wait_until="domcontentloaded")
    page.get_by_text("Model card").first.wait_for(timeout=120_000)
    page.get_by_role("link", name="GP lab").first.click()               # no wait for the sidebar
    box = page.get_by_role("textbox", name="Prompt", exact=True)
    box.wait_for(timeout=60_000)
    page.wait_for_timeout(3_000)
    assert "->" in box.input_value()                                     # the default few-shot example
    page.get_by_role("link", name="Home").first.click()                 # an interaction: a rerun
    page.get_by_text(re.compile(r"few-shot \(\d+ demonstrations")).first.wait_for(timeout=60_000)
    assert page.get_by_text("The prompt is empty").count() == 0
