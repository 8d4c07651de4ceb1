"""End-to-end: the linked Altair view of the modes on Spectrum & SNR, in Debian's Chromium, on the
tiny random Llama (its own server, started with TTT_LENS_MODEL so the sidebar defaults to it).

A drag across the spectrum chart must (1) grey out the unbrushed marks of the SNR, alignment and
filter-match charts, in the browser, without a server round trip, and (2) after the rerun that the
selection triggers, list exactly the brushed modes in the table under the chart. The charts ask
for Vega's SVG renderer, so every highlight mark is a <path> in the group
"<layer name>_marks" (names in ttt_core.figures.linked.SPECTRUM_MARKS) whose fill says whether
it is highlighted. Screenshots before/after go to artifacts/."""

from __future__ import annotations

import os
import re

import pytest

from tests.e2e.conftest import ARTIFACTS
from ttt_core.figures.linked import MUTED, SPECTRUM_MARKS

pytestmark = [pytest.mark.e2e]

MODEL = "tiny-random-llama"
CHART = ".st-key-spec_linked"


@pytest.fixture(scope="module", autouse=True)
def _tiny_model_default():
    """Autouse, module scope: runs before the module's `app_url` server starts, so the server's
    sidebar defaults to the tiny model (pages/common.default_model_name reads TTT_LENS_MODEL)."""
    old = os.environ.get("TTT_LENS_MODEL")
    os.environ["TTT_LENS_MODEL"] = MODEL
    yield
    if old is None:
        os.environ.pop("TTT_LENS_MODEL", None)
    else:
        os.environ["TTT_LENS_MODEL"] = old


def fills(page, layer: str) -> list[str]:
    """Fill colours (lower case) of the marks of one highlight layer, in drawing order."""
    return page.eval_on_selector_all(
        f'{CHART} g[class*="{layer}"] path',
        "els => els.map(e => (e.getAttribute('fill') || e.style.fill || '').toLowerCase())")


def counts(page) -> dict[str, tuple[int, int]]:
    """{layer: (highlighted, greyed)} for every highlight layer of the chart."""
    out = {}
    for layer in SPECTRUM_MARKS:
        f = fills(page, layer)
        grey = sum(c == MUTED.lower() for c in f)
        out[layer] = (len(f) - grey, grey)
    return out


def point_centres(page, layer: str) -> list[tuple[float, float]]:
    boxes = page.eval_on_selector_all(
        f'{CHART} g[class*="{layer}"] path',
        "els => els.map(e => { const b = e.getBoundingClientRect(); return [b.x + b.width / 2, b.y + b.height / 2]; })")
    return [tuple(b) for b in boxes]


def test_brush_on_spectrum_highlights_same_modes_everywhere(app_url, page):
    ARTIFACTS.mkdir(exist_ok=True)
    vega_errors: list[str] = []
    page.on("console", lambda m: vega_errors.append(m.text) if m.type == "error" and "vega" in m.text.lower() else None)
    page.set_viewport_size({"width": 1400, "height": 1700})   # the whole linked chart fits below the header
    page.goto(app_url, wait_until="domcontentloaded")
    page.get_by_text("Model card").first.wait_for(timeout=120_000)
    page.get_by_text(f"Using {MODEL}").first.wait_for(timeout=60_000)
    page.get_by_role("link", name="Spectrum & SNR").first.click()
    page.get_by_text("Linked view of the modes").first.wait_for(timeout=240_000)
    chart = page.locator(CHART)
    chart.wait_for(timeout=120_000)
    page.locator(f'{CHART} g[class*="filter_pts"] path').first.wait_for(state="attached", timeout=120_000)
    chart.evaluate("e => e.scrollIntoView({block: 'center'})")
    page.wait_for_timeout(1_000)                         # let vega finish its first render

    before = counts(page)
    # no brush yet: every mark is highlighted; the log charts show the positive eigenvalues only
    n_spec = before["spec_pts"][0]
    assert n_spec >= 5 and all(g == 0 for _, g in before.values()), before
    assert before["filter_pts"][0] == 2 * n_spec          # g_T and g⋆ for each positive mode
    assert page.get_by_text("No modes brushed yet").first.is_visible()
    chart.screenshot(path=str(ARTIFACTS / "e2e_linked_before.png"))

    # drag from between modes 1 and 2 to between modes 4 and 5 on the spectrum chart
    pts = sorted(point_centres(page, "spec_pts"))         # mode order = x order
    assert len(pts) == n_spec
    x0 = (pts[0][0] + pts[1][0]) / 2
    x1 = (pts[3][0] + pts[4][0]) / 2
    ys = [p[1] for p in pts]
    y = (min(ys) + max(ys)) / 2
    page.mouse.move(x0, y)
    page.mouse.down()
    page.mouse.move((x0 + x1) / 2, y, steps=5)
    page.mouse.move(x1, y, steps=5)
    page.mouse.up()

    # the other charts grey out the unbrushed modes (client side, right away)
    page.wait_for_function(
        "([sel, muted]) => [...document.querySelectorAll(sel)].some(e => (e.getAttribute('fill') || '')"
        ".toLowerCase() === muted)",
        arg=[f'{CHART} g[class*="snr_pts"] path', MUTED.lower()], timeout=30_000)
    # the selection reruns the script: the table lists the brushed modes
    page.get_by_text("Share of query alignment").first.wait_for(timeout=120_000)
    table = page.locator('[data-testid="stTable"]').last
    table.wait_for(timeout=60_000)
    rows = table.locator("tbody tr")
    modes = [int(re.sub(r"\D", "", rows.nth(i).locator("td, th").first.inner_text()))
             for i in range(rows.count())]
    assert modes == [2, 3, 4], table.inner_text()
    page.wait_for_timeout(1_000)
    after = counts(page)
    assert after["spec_pts"] == (3, n_spec - 3), after
    assert after["snr_pts"][0] == 3 and after["snr_pts"][1] == before["snr_pts"][0] - 3, (before, after)
    assert after["align_pts"][0] == 3 and after["align_pts"][1] >= 1, (before, after)
    assert after["filter_pts"] == (6, 2 * n_spec - 6), (before, after)
    assert page.get_by_text("Brushed modes").first.is_visible()
    chart.screenshot(path=str(ARTIFACTS / "e2e_linked_after.png"))
    page.screenshot(path=str(ARTIFACTS / "e2e_linked_page.png"), full_page=True)
    assert not vega_errors, vega_errors                    # e.g. the interpreter choking on a spec
