"""End-to-end: a link reopens the view (GitHub issue 11, point 3), in Debian's Chromium.

One browser edits the prompt and changes the Spectrum page's subspace and T, reads λ⋆ there and the
top-ranked block on Heads & blocks, and copies the Spectrum link; a NEW browser context (no shared
session, cookies or storage) opens the link and must show the same λ⋆ and, on Heads, the same top
block. The server runs with a tiny random model as its default (no SmolLM2 needed), so the link
must carry the model by name as well as the prompt (compressed, p=1.…) and the settings."""

from __future__ import annotations

import os
import re
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.e2e.conftest import ARTIFACTS
from tests.e2e.test_browser_pages import set_number

pytestmark = [pytest.mark.e2e]

MODEL = "tiny-random-llama"
PROMPT = "3->4\n1->2\n7->8\n5->6\n0->1\n8->9\n2->3\n6->\n# answer: 7"
SUBSPACE_V = "W_V per kv head (paper)"


@pytest.fixture(scope="module")
def tiny_default():
    old = os.environ.get("TTT_LENS_MODEL")
    os.environ["TTT_LENS_MODEL"] = MODEL  # the server (started after this) inherits it
    yield
    if old is None:
        os.environ.pop("TTT_LENS_MODEL", None)
    else:
        os.environ["TTT_LENS_MODEL"] = old


@pytest.fixture(scope="module")
def app_url(tiny_default, app_url):  # the suite's server, with the tiny model as its default
    return app_url


def settle(page, ms: int = 1500) -> None:
    """Wait until Streamlit reports no running script for a moment."""
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')"
                           " || !/Running|Stop/.test(document.querySelector('[data-testid=\"stStatusWidget\"]')"
                           ".innerText)", timeout=180_000)
    page.wait_for_timeout(ms)


def metric(page, label: str) -> str:
    m = page.locator('[data-testid="stMetric"]').filter(has_text=label).first
    m.wait_for(timeout=180_000)
    return m.locator('[data-testid="stMetricValue"]').inner_text().strip()


def top_block(page) -> str:
    alert = page.locator('[data-testid="stAlert"]').filter(has_text="Recommended").first
    alert.wait_for(timeout=180_000)
    text = alert.inner_text()
    return re.search(r"Recommended \d+ block\(s\) by [^:]+: (L\d+\.\w+)", text).group(1)


def open_heads(page) -> None:
    page.get_by_role("link", name="Heads & blocks").first.click()
    page.get_by_role("combobox", name="Block").wait_for(timeout=180_000)
    settle(page)


def test_link_reopens_the_same_numbers_in_a_new_browser(app_url, page, browser):
    page.goto(app_url, wait_until="domcontentloaded")
    page.get_by_text("Model card").first.wait_for(timeout=120_000)
    box = page.get_by_role("textbox", name="Prompt", exact=True)
    box.fill(PROMPT)
    box.press("Control+Enter")
    page.get_by_text("few-shot (7 demonstrations").first.wait_for(timeout=60_000)
    page.get_by_role("link", name="Spectrum & SNR").first.click()
    metric(page, "λ⋆ = σ²/τ²")
    page.get_by_role("combobox", name="Update subspace").click()
    page.get_by_role("option", name=SUBSPACE_V).click()
    page.get_by_role("combobox", name="Kernel to decompose").wait_for(timeout=180_000)
    settle(page)
    set_number(page, "Steps T", "5")
    metric(page, "P(TTT beats ICL at T=5)")          # the rerun with T = 5 is drawn
    settle(page)
    lam, prob = metric(page, "λ⋆ = σ²/τ²"), metric(page, "P(TTT beats ICL at T=5)")
    # the browser URL already shows the view: the bound settings and the compressed prompt
    q = parse_qs(urlsplit(page.url).query)
    assert q.get("spec_T") == ["5"] and q.get("spec_subspace") == [SUBSPACE_V] and q["p"][0].startswith("1.")
    page.get_by_role("button", name="Copy link").click()
    code = page.locator('[data-testid="stSidebar"] [data-testid="stCode"] code').first
    code.wait_for(timeout=60_000)
    link = code.inner_text().strip()
    lq = parse_qs(urlsplit(link).query)
    assert urlsplit(link).path == "/spectrum" and lq["model"] == [MODEL] and lq["spec_T"] == ["5"]
    page.screenshot(path=str(ARTIFACTS / "e2e_links_source.png"), full_page=True)
    open_heads(page)
    top = top_block(page)
    assert "spec_T" not in page.url and "p=1." in page.url   # page switch: Spectrum's settings left, prompt stays

    fresh = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        other = fresh.new_page()
        other.goto(link, wait_until="domcontentloaded")
        assert metric(other, "P(TTT beats ICL at T=5)") == prob
        settle(other)
        assert metric(other, "λ⋆ = σ²/τ²") == lam
        assert other.get_by_role("combobox", name="Update subspace").input_value() == SUBSPACE_V \
            or other.get_by_text(SUBSPACE_V).first.is_visible()
        assert PROMPT.splitlines()[0] in other.get_by_role("textbox", name="Prompt", exact=True).input_value()
        assert other.get_by_text("This link could not be opened").count() == 0
        other.screenshot(path=str(ARTIFACTS / "e2e_links_opened.png"), full_page=True)
        open_heads(other)
        assert top_block(other) == top
        other.screenshot(path=str(ARTIFACTS / "e2e_links_heads.png"), full_page=True)
    finally:
        fresh.close()
