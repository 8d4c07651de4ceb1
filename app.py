"""TTT Lens: Streamlit entry point.

Run with `streamlit run app.py`. Builds the navigation over `pages/` and the shared sidebar
(model choice, prompt box, example picker). Pages only draw; all computation is in `ttt_core`.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: no spin-waiting threads

import streamlit as st

from pages.common import render_sidebar
from pages.links import apply_link, link_control, show_link_problems, sync_url


def _leave_legacy_pages_mode() -> None:
    """Streamlit treats an app with a folder named `pages/` beside it as a legacy (v1) multipage
    app until st.navigation has run once in the process: the very first run of the first
    session is then wrapped in an extra legacy navigation, its widgets get other ids, and the
    user's first edit is lost (the sidebar even appears twice). Switch the flag off and rerun
    at once, so every visible run is a plain st.navigation run."""
    try:
        from streamlit.runtime.pages_manager import PagesManager
    except ImportError:  # pragma: no cover - internal location may move in a later Streamlit
        return
    if PagesManager.uses_pages_directory:
        PagesManager.uses_pages_directory = False
        st.rerun()


_leave_legacy_pages_mode()

ROOT = Path(__file__).parent

# (file, title, icon, section). A page is listed only when its file exists.
PAGES: list[tuple[str, str, str, str]] = [
    ("pages/home.py", "Home", ":material/home:", "Prompt"),
    ("pages/spectrum.py", "Spectrum & SNR", ":material/equalizer:", "When"),
    ("pages/steps_bounds.py", "Steps & bounds", ":material/stacked_line_chart:", "How far"),
    ("pages/heads.py", "Heads & blocks", ":material/grid_on:", "Which"),
    ("pages/live_qttt.py", "Live qTTT", ":material/play_circle:", "Adapt"),
    ("pages/schedules.py", "Schedules", ":material/schedule:", "Adapt"),
    ("pages/targets.py", "Targets", ":material/tune:", "Adapt"),
    ("pages/long_context.py", "Long context", ":material/manage_search:", "Theory"),
    ("pages/gp_lab.py", "GP lab", ":material/science:", "Theory"),
    ("pages/reproduction.py", "Paper reproduction", ":material/fact_check:", "Theory"),
    ("pages/reliability.py", "Reliability", ":material/verified:", "Theory"),
]


def build_navigation() -> dict[str, list[st.Page]]:
    """Group the existing page files into navigation sections (Home is the default page)."""
    sections: dict[str, list[st.Page]] = {}
    for path, title, icon, section in PAGES:
        if not (ROOT / path).exists():
            continue
        page = st.Page(path, title=title, icon=icon, default=(path == "pages/home.py"))
        sections.setdefault(section, []).append(page)
    return sections


st.set_page_config(page_title="TTT Lens", page_icon=":material/lens_blur:", layout="wide")
apply_link()          # a link's model / prompt / token limit, once per session (pages/links.py)
render_sidebar()
sync_url()            # the URL always shows the view (page settings are bound widgets)
navigation = st.navigation(build_navigation())
with st.sidebar:
    link_control(navigation.url_path)
show_link_problems()
navigation.run()
