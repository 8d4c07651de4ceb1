"""Links that reopen a view (GitHub issue 11, point 3): the view's state lives in st.query_params.

* Page settings are widgets with ``bind="query-params"`` (Streamlit 1.67): the widget key is the
  query parameter, Streamlit writes it into the URL when it leaves its default, seeds the widget
  from the URL when a session opens, drops invalid values, and keeps a page's parameters only while
  that page is shown. FIELDS below lists them per page, with how a value is written and checked.
* Model, prompt and token limit (the sidebar) are written here (`sync_url`): ``model=``, ``ex=``
  (a curated example by title) or ``p=1.<data>`` (the prompt, compressed, ttt_core.share), ``tok=``.
  Streamlit clears unbound parameters on a page switch; `sync_url` runs on every run and puts them
  back, so the URL always shows the whole view.
* `apply_link` reads a link once, when a session opens, and reports what it cannot use
  (`show_link_problems`): the rest of the view opens, the unusable part keeps its default.
* `link_control` is the sidebar's "Copy link" button: st.context.url (the browser's address, page
  included) plus the view's parameters, every one explicit (defaults too), so the link opens the
  same numbers on a server with another default model. TTT_LENS_BASE_URL replaces st.context.url
  where it is not known (tests) or wrong (a proxy).

The encoding itself is pure and tested on its own: ttt_core/share.py.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import streamlit as st

from pages.common import DEFAULT_TOKEN_LIMIT, PRESETS, default_model_name
from ttt_core.examples import DEFAULT_EXAMPLE, EXAMPLES, load_example
from ttt_core.prompt_kernel import PAGE_SUBSPACES
from ttt_core.share import (
    BLOCK_LABEL,
    BOOL,
    Field,
    PromptTooLong,
    View,
    choice_field,
    float_field,
    int_field,
    make_link,
    read_view,
    view_params,
)

APPLIED = "_link_applied"
PROBLEMS = "_link_problems"
OWN_KEYS = ("model", "ex", "p", "tok")  # the parameters this module writes (the rest are bound widgets)
TOKEN_RANGE = (64, 32768)                # the sidebar's token-limit input

# Options that the pages pass to their widgets (tests/app/test_links.py checks they agree).
LIVE_LRS = [1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
STEPS_BETAS = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0]
LIVE_MODES = ["qTTT", "Paper mode (LOO gradient descent)"]
HEADS_SCORES = ["Query-Aware", "Trace", "Kernel share", "Greedy rank"]

SUBSPACE = choice_field(PAGE_SUBSPACES)
FIELDS: dict[str, dict[str, Field]] = {   # page url_path → widget key → field
    "spectrum": {
        "spec_subspace": SUBSPACE, "spec_T": int_field(1, 200), "spec_c": float_field(0.05, 0.95),
        "spec_maxpos": int_field(8, 2048), "spec_block": Field("label", pattern=BLOCK_LABEL),
    },
    "heads": {
        "heads_subspace": SUBSPACE, "heads_maxpos": int_field(8, 2048), "heads_budget": int_field(0, 64),
        "heads_rank_by": choice_field(HEADS_SCORES), "heads_topk": int_field(1, 100_000),
        "heads_pick": Field("label", pattern=BLOCK_LABEL),
    },
    "steps_bounds": {
        "steps_subspace": SUBSPACE, "steps_c": float_field(0.02, 0.9), "steps_grid": int_field(2, 100),
        "steps_layers": int_field(1, 1000), "steps_delta": float_field(0.01, 0.5),
        "steps_beta": choice_field(STEPS_BETAS), "steps_measure": BOOL,
    },
    "live_qttt": {
        "qttt_mode": choice_field(LIVE_MODES), "qttt_steps": int_field(1, 256), "qttt_span": int_field(2, 4096),
        "qttt_lr": choice_field(LIVE_LRS, lambda v: f"{v:.0e}"), "qttt_ctx_nll": BOOL,
        "qttt_seed": int_field(0, 10_000), "paper_steps": int_field(1, 64), "paper_c": float_field(0.001, 1.9),
        "paper_kind": choice_field(["V (the paper)", "Q"]),
        "qttt_head_mode": choice_field(["All heads", "Top-k by head scores", "Manual"]),
        "qttt_topk": int_field(1, 100_000),
        "qttt_manual_q": Field("labels", pattern=BLOCK_LABEL), "qttt_manual_v": Field("labels", pattern=BLOCK_LABEL),
    },
}
ALL_FIELDS: dict[str, Field] = {k: f for page in FIELDS.values() for k, f in page.items()}


def _params() -> dict[str, Any]:
    """st.query_params as a dict (repeated keys as lists)."""
    qp = st.query_params
    return {k: (vals if len(vals := qp.get_all(k)) > 1 else qp[k]) for k in qp}


# ------------------------------------------------------------------------------------------ open a link


def apply_link() -> None:
    """Once per session, before the sidebar: put the link's model, prompt and token limit into
    session state (bound page settings are seeded by Streamlit itself) and keep a message for
    everything the link carries that cannot be used."""
    ss = st.session_state
    if ss.get(APPLIED):
        return
    ss[APPLIED] = True
    try:
        view, problems = read_view(_params(), examples=EXAMPLES, presets=PRESETS[:-1], fields=ALL_FIELDS,
                                   token_range=TOKEN_RANGE)
    except Exception as exc:  # noqa: BLE001 — whatever a link holds, the app opens
        view, problems = View(), [f"the link could not be read ({type(exc).__name__}); showing the default view."]
    if view.model and view.model in PRESETS:
        ss["model_name"] = view.model
        ss["model_preset"] = view.model
    elif view.model:  # a link never makes the server fetch or load a model nobody here chose
        problems = list(problems) + [f"the link names the model {view.model!r}, which is not one of this server's "
                                     "presets; it was not loaded automatically (choose 'Other: hub id or local "
                                     "folder…' in the sidebar to load it)"]
    if view.example is not None:
        ss["example"] = view.example
        ss["prompt_text"] = load_example(view.example)
    elif view.prompt is not None:
        ss["prompt_text"] = view.prompt
    if view.max_tokens is not None:
        ss["max_tokens"] = view.max_tokens
    if problems:
        ss[PROBLEMS] = problems


def show_link_problems() -> None:
    """What the opened link carried that could not be used (until dismissed)."""
    problems = st.session_state.get(PROBLEMS)
    if not problems:
        return
    with st.container(border=True):
        st.warning("**This link could not be opened as it was.** The rest of the view is shown; these parts keep "
                   "their defaults:\n\n" + "\n".join(f"- {p[0].upper() + p[1:]}" for p in problems),
                   icon=":material/link_off:")
        st.button("Dismiss", key="link_dismiss", on_click=lambda: st.session_state.pop(PROBLEMS, None))


def url_choice(key: str, options: Sequence[str]) -> str | None:
    """The URL's value of a bound select box, if it is one of `options` (for a page that must know
    the value before it draws the widget, e.g. the heatmap highlight of the Heads drill-down)."""
    value = st.query_params.get(key)
    return value if value in options else None


# ------------------------------------------------------------------------------------------ the view now


def current_view(page: str, explicit: bool) -> View:
    """This session's view on `page`. explicit=False leaves out the defaults (the browser URL);
    explicit=True names everything (the copied link)."""
    ss = st.session_state
    model = (ss.get("model_name") or "").strip() or None
    text = ss.get("prompt_text", "")
    example = ss.get("example")
    is_example = example in EXAMPLES and text == load_example(example)
    view = View(model=model)
    if is_example:
        view.example = example
    else:
        view.prompt = text
    tok = ss.get("max_tokens", DEFAULT_TOKEN_LIMIT)
    if explicit or tok != DEFAULT_TOKEN_LIMIT:
        view.max_tokens = int(tok)
    if not explicit:
        if model == default_model_name():
            view.model = None
        if is_example and example == DEFAULT_EXAMPLE:
            view.example = None
        return view
    url = _params()
    for key, f in FIELDS.get(page, {}).items():
        value = None
        if key in ss:
            try:
                value = f.to_url(ss[key])
            except Exception:  # noqa: BLE001 — an odd session value: leave the setting out of the link
                value = None
        elif key in url and f.check(url[key]) is None:
            value = url[key]  # seeded from the URL this run, before its widget was drawn
        if value is not None:
            view.settings[key] = value
    return view


def sync_url() -> None:
    """Write model, prompt and token limit into the browser URL when they differ from it (every
    run: a page switch clears unbound parameters). Bound page settings are Streamlit's."""
    try:
        wanted = view_params(current_view("", explicit=False))
    except PromptTooLong:
        view = current_view("", explicit=False)
        view.prompt = None
        wanted = view_params(view)  # the prompt cannot travel: the copied link says so
    qp = st.query_params
    for key in OWN_KEYS:
        have = qp.get(key)
        if key in wanted:
            if have != wanted[key]:
                qp[key] = wanted[key]
        elif have is not None:
            del qp[key]


def _base_url(page: str) -> str:
    url = None
    try:
        url = st.context.url
    except Exception:  # noqa: BLE001 — not in every Streamlit context
        url = None
    env = os.environ.get("TTT_LENS_BASE_URL", "").strip()
    if env:
        return env.rstrip("/") + ("/" + page if page else "/")
    if url:
        return url
    return "http://localhost:8501" + ("/" + page if page else "/")


def view_link(page: str) -> tuple[str | None, str | None]:
    """(link, None), or (link without the prompt, why) when the prompt is too long for a link."""
    view = current_view(page, explicit=True)
    try:
        return make_link(_base_url(page), view_params(view)), None
    except PromptTooLong as exc:
        view.prompt = None
        return make_link(_base_url(page), view_params(view)), str(exc)


def link_control(page: str) -> None:
    """The sidebar's "Copy link": a button that shows the link to this view (built when pressed,
    from the settled state of the run before, so a click that changed a setting is included)."""
    st.subheader("Link")
    if not st.button("Copy link", key="link_copy", icon=":material/link:",
                     help="A link that reopens this page with this model, prompt and settings."):
        return
    link, problem = view_link(page)
    if problem:
        st.warning(problem)
        st.download_button("Download the prompt", st.session_state.get("prompt_text", ""), file_name="prompt.txt",
                           mime="text/plain", key="link_prompt_download")
        st.caption("The link below carries every setting except the prompt:")
    st.code(link, language=None, wrap_lines=True)
    st.caption("Copy it with the button at the code box's corner. Opened in a fresh browser, it shows the same view "
               "(results are recomputed; Live qTTT needs its Run button pressed).")
