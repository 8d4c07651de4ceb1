"""End-to-end: the Spectrum & SNR and Heads & blocks pages in Debian's Chromium (SmolLM2),
including a click on a heatmap cell that must select that head for the drill-down. (Steps & bounds
has its own module, test_browser_steps.py, so its own server: no work left by these pages'
sessions competes with its run.)"""

from __future__ import annotations

import re

import pytest

from tests.e2e.conftest import ARTIFACTS

pytestmark = [pytest.mark.e2e, pytest.mark.smollm2]


def open_page(page, app_url, link: str):
    page.goto(app_url, wait_until="domcontentloaded")
    page.get_by_text("Model card").first.wait_for(timeout=120_000)
    page.get_by_role("textbox", name="Prompt", exact=True).wait_for(timeout=60_000)
    page.get_by_role("link", name=link).first.click()


def wait_plots(page, n: int, timeout: int = 240_000) -> None:
    """Wait until at least `n` plotly figures are in the page (some sit in hidden tabs)."""
    page.locator(".js-plotly-plot").nth(n - 1).wait_for(state="attached", timeout=timeout)
    page.locator(".js-plotly-plot").first.wait_for(state="visible", timeout=timeout)


def set_number(page, label: str, value: str) -> None:
    box = page.get_by_role("spinbutton", name=label, exact=True)
    box.wait_for(timeout=180_000)
    box.fill(value)
    box.press("Enter")


def test_spectrum_page_shows_real_spectrum(app_url, page):
    open_page(page, app_url, "Spectrum & SNR")
    wait_plots(page, 4)
    # the page's own verdict: the metric and the λ⋆ posterior caption under it (DESIGN §5.1)
    page.locator('[data-testid="stMetric"]').filter(has_text="P(TTT beats ICL at T=8)").first.wait_for()
    page.get_by_text("λ⋆ posterior median").first.wait_for()
    assert page.locator(".js-plotly-plot").count() >= 4
    page.screenshot(path=str(ARTIFACTS / "e2e_spectrum.png"), full_page=True)


def drilldown_block(page) -> str:
    return page.get_by_role("combobox", name="Block").input_value()


def test_heads_page_click_on_heatmap_cell_selects_that_head(app_url, page):
    open_page(page, app_url, "Heads & blocks")
    wait_plots(page, 2)
    page.get_by_text("Query-Aware").first.wait_for()
    heat = page.locator(".js-plotly-plot").first
    heat.scroll_into_view_if_needed()
    before = drilldown_block(page)
    assert re.fullmatch(r"L\d+\.qH\d+", before)
    # the data coordinates under a point of the plot area, from plotly's own axes
    target = heat.evaluate("""(el) => {
        const fl = el._fullLayout, xa = fl.xaxis, ya = fl.yaxis;
        const fx = 0.62, fy = 0.37;   // fractions of the plot area, away from the selected marker
        const x = xa.range[0] + fx * (xa.range[1] - xa.range[0]);
        const y = ya.range[0] + (1 - fy) * (ya.range[1] - ya.range[0]);
        const box = el.querySelector('.nsewdrag').getBoundingClientRect();
        return {px: box.left + fx * box.width, py: box.top + fy * box.height,
                head: Math.round(x), layer: Math.round(y)};
    }""")
    expected = f"L{target['layer']}.qH{target['head']}"
    assert expected != before, "pick another point: the clicked cell is already selected"
    page.mouse.click(target["px"], target["py"])
    page.wait_for_function("(name) => [...document.querySelectorAll('input[role=combobox]')]"
                           ".some(e => e.getAttribute('aria-label') === 'Block' && e.value === name)",
                           arg=expected, timeout=120_000)            # the drill-down follows the click
    assert drilldown_block(page) == expected
    # the heatmap's highlight moved to the clicked cell in the same rerun
    page.wait_for_function("([h, l]) => { const el = document.querySelector('.js-plotly-plot');"
                           " const t = el && el.data && el.data.find(d => d.name === 'selected');"
                           " return t && t.x[0] === h && t.y[0] === l; }",
                           arg=[target["head"], target["layer"]], timeout=60_000)
    page.get_by_text(f"Spectrum of {expected}").first.wait_for(state="attached", timeout=120_000)
    page.screenshot(path=str(ARTIFACTS / "e2e_heads.png"), full_page=True)
