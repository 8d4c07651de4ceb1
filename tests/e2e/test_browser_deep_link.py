"""End-to-end: a deep link is the FIRST request a freshly started server gets (its own server).

Until app.py's st.navigation has run once in the server process, Streamlit treats the `pages/`
folder as a legacy multipage folder and runs a requested page without app.py: no shared sidebar,
every helper module listed as a page. A class that restarts the server and then opens a shared
`/long_context` link hit exactly that. `pages.common.require_app_navigation` reruns such a request
through app.py; this test opens the deep link before anything else and checks the app's own
sidebar and the requested page are there, and no helper module is offered as a page."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import ARTIFACTS

pytestmark = [pytest.mark.e2e, pytest.mark.smollm2]


def test_first_request_deep_link_runs_inside_app(app_url, page):
    page.goto(app_url + "/long_context", wait_until="domcontentloaded")
    page.get_by_text("Trust remote code").first.wait_for(timeout=180_000)    # app.py's sidebar
    page.get_by_role("heading", name="Long context").first.wait_for(timeout=180_000)
    nav = page.locator("[data-testid='stSidebarNav']")
    nav.get_by_text("Spectrum & SNR").first.wait_for(timeout=60_000)       # app.py's page titles
    for helper in ("common", "downloads", "state", "links", "tour", "app"):
        assert nav.get_by_text(helper, exact=True).count() == 0, f"helper module {helper!r} listed as a page"
    assert page.url.rstrip("/").endswith("/long_context")
    page.screenshot(path=str(ARTIFACTS / "e2e_deep_link.png"), full_page=False)
