"""Shared UI pieces for every page: the sidebar, the teaching helpers, cached model access.

This module draws and reads widgets only; everything it shows is computed in `ttt_core`.
Per-session state lives in `st.session_state`; the only cross-session object is the cached,
never-mutated model (DESIGN §1).
"""

from __future__ import annotations

import numpy as np
import streamlit as st


def require_app_navigation() -> None:
    """Rerun through app.py when Streamlit ran this page on its own.

    Until app.py's `st.navigation` has run once in the server process, Streamlit treats the
    `pages/` folder (DESIGN §1 fixes that name) as a legacy multipage folder: on a freshly started
    server, the first request for a deep link (a shared `/spectrum?…` link) runs the page script
    without app.py — no shared sidebar, every helper module listed as a page. Switching the legacy
    flag off and rerunning makes app.py run and route the request (the flag is the one
    `st.navigation` itself clears)."""
    from streamlit.runtime.pages_manager import PagesManager

    if PagesManager.uses_pages_directory:
        PagesManager.uses_pages_directory = False
        st.rerun()


def page_header(title: str, question: str) -> None:
    """Page title plus the one sentence saying which question the page answers (teaching layer).
    Every page calls it first, so it also makes sure the page runs inside app.py
    (`require_app_navigation`)."""
    require_app_navigation()
    st.title(title)
    st.markdown(f"*{question}*")


def how_to_read(
    formula_latex: str | None,
    what: str,
    good: str | None = None,
    bad: str | None = None,
    section: str | None = None,
) -> None:
    """A collapsed "how to read this" expander under a figure.

    Args:
        formula_latex: the formula the figure plots, as LaTeX for `st.latex` (or None).
        what: one or two sentences on what is plotted.
        good: what a healthy / favourable picture looks like.
        bad: what an unhealthy picture looks like.
        section: the DESIGN.md section the formula comes from, e.g. "§3".
    """
    with st.expander("How to read this", expanded=False):
        if formula_latex:
            st.latex(formula_latex)
        st.markdown(what + (f" (DESIGN {section})" if section else ""))
        if good:
            st.markdown(f"**Good picture:** {good}")
        if bad:
            st.markdown(f"**Bad picture:** {bad}")


# ------------------------------------------------------------------------------------------
# Sidebar: model choice, prompt box, example picker (shared by all pages)
# ------------------------------------------------------------------------------------------

import html
import os

from ttt_core import memory_guard
from ttt_core.examples import DEFAULT_EXAMPLE, EXAMPLES, load_example
from ttt_core.models import EMBEDDED_MODEL, TINY_FAMILIES, TINY_PREFIX, LoadedModel, ModelLoadError, load_model
from ttt_core.prompts import (
    MAX_PROMPT_CHARS,
    Prompt,
    PromptParseError,
    fit_to_token_limit,
    parse_prompt,
    too_long_message,
)

CUSTOM = "Other: hub id or local folder…"
PRESETS = [EMBEDDED_MODEL] + [TINY_PREFIX + f for f in TINY_FAMILIES] + [CUSTOM]
DEFAULT_TOKEN_LIMIT = 2048


def default_model_name() -> str:
    """The sidebar's initial model: $TTT_LENS_MODEL if set, else the embedded SmolLM2."""
    return os.environ.get("TTT_LENS_MODEL", EMBEDDED_MODEL)


def _init_state() -> None:
    ss = st.session_state
    if "model_name" not in ss:
        ss["model_name"] = default_model_name()
    if "model_preset" not in ss:
        ss["model_preset"] = ss["model_name"] if ss["model_name"] in PRESETS else CUSTOM
    if "example" not in ss:
        ss["example"] = DEFAULT_EXAMPLE
    if "prompt_text" not in ss:
        ss["prompt_text"] = load_example(ss["example"])
    ss.setdefault("max_tokens", DEFAULT_TOKEN_LIMIT)
    ss.setdefault("trust_remote_code", False)


def _on_preset() -> None:
    choice = st.session_state["model_preset"]
    if choice != CUSTOM:
        st.session_state["model_name"] = choice


def _on_example() -> None:
    st.session_state["prompt_text"] = load_example(st.session_state["example"])


def _prompt_box_key() -> str:
    """Widget key of the prompt box. The canonical text lives in session_state["prompt_text"]; the
    box is a keyed text area whose *default* is that text, re-created under a new key whenever the
    text changes outside the box (example picker, tour, tests). With the text as the widget's
    default, a box the browser mounts before it has received its value (e.g. after a page switch
    right after loading) starts from the prompt, not from an empty string that the next
    interaction would send back and so erase the prompt (seen in Chromium)."""
    ss = st.session_state
    key = f"prompt_box_{ss.setdefault('prompt_box_version', 0)}"
    if key in ss and ss[key] != ss["prompt_text"]:   # changed outside the box: new box, new default
        ss["prompt_box_version"] += 1
        key = f"prompt_box_{ss['prompt_box_version']}"
    return key


def _on_prompt_edit() -> None:
    key = f"prompt_box_{st.session_state['prompt_box_version']}"
    st.session_state["prompt_text"] = st.session_state[key]


def render_sidebar() -> None:
    """Draw the shared sidebar. Values live in st.session_state (per browser session):
    model_name, trust_remote_code, prompt_text, example, max_tokens."""
    _init_state()
    with st.sidebar:
        st.subheader("Model")
        st.selectbox("Model", PRESETS, key="model_preset", on_change=_on_preset,
                     help="The embedded SmolLM2 needs no network. Tiny random models are for quick checks.")
        if st.session_state["model_preset"] == CUSTOM:
            st.text_input("Hub id or local folder", key="model_name",
                          help="Any Hugging Face causal LM with safetensors weights (Llama/Qwen/Mistral, GPT-2, GPT-NeoX).")
        else:
            st.caption(f"Using **{st.session_state['model_name']}**")
        st.checkbox("Trust remote code", key="trust_remote_code",
                    help="Off by default. Only tick it for a model whose custom code you trust.")
        st.subheader("Prompt")
        st.selectbox("Example", list(EXAMPLES), key="example", on_change=_on_example)
        st.text_area("Prompt", value=st.session_state["prompt_text"], key=_prompt_box_key(), height=220,
                     on_change=_on_prompt_edit,
                     help="Few-shot: 'x -> y' lines, then a query 'x ->' (optional '# answer: y'). "
                          "Long context: text, then 'Question: …' and optionally 'Answer: …'. "
                          "Mark a needle with <needle>…</needle>.")
        n_chars = _prompt_chars()
        if n_chars > MAX_PROMPT_CHARS:  # said next to the box too; nothing parses or tokenises it
            st.error(f"Prompt too long: {n_chars:,} characters ({n_chars / 1e6:.1f} MB), over the limit of "
                     f"{MAX_PROMPT_CHARS:,} characters. It was refused: nothing is analysed until you paste a "
                     "shorter one.")
        with st.expander("Limits"):
            st.number_input("Token limit", min_value=64, max_value=32768, step=64, key="max_tokens",
                            help="Longer prompts are refused (few-shot) or cut from the start (long context), with a warning.")


@st.cache_resource(max_entries=1, show_spinner=False)
def _cached_model(name: str, trust_remote_code: bool) -> LoadedModel:
    """One resident model shared by all sessions (never mutated; adaptations use deltas)."""
    return load_model(name, trust_remote_code=trust_remote_code)


def get_model() -> LoadedModel | None:
    """The sidebar's model, loaded once and cached; shows a readable error and returns None if
    it cannot be loaded."""
    _init_state()
    name = (st.session_state.get("model_name") or "").strip() or EMBEDDED_MODEL
    trust = bool(st.session_state.get("trust_remote_code", False))
    try:
        with st.spinner(f"Loading {name} (first use of the embedded model converts it once, ~30 s)…"):
            return _cached_model(name, trust)
    except ModelLoadError as exc:
        st.error(str(exc))
    except Exception as exc:  # the app stays up whatever the loader raises
        st.error(f"Could not load model {name!r}: {type(exc).__name__}: {exc}")
    return None


def _prompt_chars() -> int:
    text = st.session_state.get("prompt_text")
    return len(text) if isinstance(text, str) else 0


PROMPT_FIT_KEY = "prompt_fit_cache"  # (model, token limit, text) → (prompt, note, error) of the last get_prompt


def get_prompt(lm: LoadedModel | None = None) -> Prompt | None:
    """The sidebar's prompt, parsed (and fitted to the token limit when `lm` is given). Shows a
    readable error and returns None when it cannot be parsed; warns visibly when it is cut.

    Responsiveness: a prompt over MAX_PROMPT_CHARS is refused from its length alone (no parsing,
    no tokenising); the outcome for the current (text, model, token limit) is kept in this
    session, so a rerun (any widget click) does not tokenise a long prompt again."""
    _init_state()
    ss = st.session_state
    text = ss.get("prompt_text", "")
    n_chars = _prompt_chars()
    if n_chars > MAX_PROMPT_CHARS:
        st.error(too_long_message(n_chars, MAX_PROMPT_CHARS))
        return None
    limit = int(ss["max_tokens"])
    model_max = None if lm is None else memory_guard.max_positions_of(lm)
    if model_max is not None and limit > model_max:   # the sidebar cannot know the model's positions
        st.info(f"Token limit {limit:,} is above {lm.name}'s {model_max:,} positions (max_position_embeddings): "
                f"prompts are fitted to {model_max:,} tokens.")
        limit = model_max
    key = (None if lm is None else lm.name, limit)
    hit = ss.get(PROMPT_FIT_KEY)
    if hit is not None and hit[0] == key and (hit[1] is text or hit[1] == text):  # same text, model and limit
        prompt, note, error = hit[2]
    else:
        prompt, note, error = None, None, None
        try:
            prompt = parse_prompt(text)
            if lm is not None:
                prompt, note = fit_to_token_limit(prompt, lm.tokenizer, key[1])
        except PromptParseError as exc:
            prompt, error = None, str(exc)
        ss[PROMPT_FIT_KEY] = (key, text, (prompt, note, error))
    if error is not None:
        st.error(error)
        return None
    if note:
        st.warning(note)
    return prompt


def token_view_html(tokens: list[str], highlight: set[int] | None = None) -> str:
    """HTML for the token view: one chip per token (alternating shades, index on hover;
    highlighted tokens — e.g. a needle — outlined)."""
    highlight = highlight or set()
    chips = []
    for i, t in enumerate(tokens):
        shown = html.escape(t.replace("\n", "↵").replace(" ", "␣") if t.strip() == "" else t.replace("\n", "↵"))
        bg = "#dbe9f6" if i % 2 == 0 else "#fbe3c5"
        border = "2px solid #D55E00" if i in highlight else "1px solid #bbb"
        chips.append(f'<span class="tok" title="token {i}" style="background:{bg};border:{border};'
                     f'border-radius:3px;padding:0 2px;margin:1px;display:inline-block;font-family:monospace">{shown}</span>')
    return f'<div class="token-view" style="line-height:1.9">{"".join(chips)}</div>'



def render_tour(existing_pages: set[str]) -> None:
    """The guided tour on the Home page: one card per stop, a button that loads the stop's example
    into this session's prompt box, and a link to the page to look at."""
    from pages.tour import TOUR

    with st.expander("Guided tour: when → how far → which", expanded=False):
        st.markdown("Six stops through the curated examples. Each loads an example into the sidebar "
                    "and points to the page that answers one question.")
        for i, stop in enumerate(TOUR):
            with st.container(border=True):
                st.markdown(f"**{stop.title}** — example *{stop.example}*")
                st.caption(stop.look_for)
                cols = st.columns([1, 1, 3])
                cols[0].button("Load example", key=f"tour_load_{i}", on_click=_load_example, args=(stop.example,))
                if stop.page in existing_pages:
                    cols[1].page_link(stop.page, label=f"Open {stop.page_title}")


def _load_example(title: str) -> None:
    st.session_state["example"] = title
    st.session_state["prompt_text"] = load_example(title)


# ------------------------------------------------------------------------------------------
# How sure a verdict is (DESIGN §5.1): one look on every page
# ------------------------------------------------------------------------------------------

_DECISION_BOX = {"adapt": "success", "don't adapt": "info", "undetermined on this prompt": "warning"}


def posterior_flag(flag: str | None) -> None:
    """Say in words when the λ⋆ posterior is mostly the prior or piles up at a grid end."""
    if flag:
        st.warning(f"**Noise level not identified.** {flag[0].upper() + flag[1:]}. Read λ⋆, τ², σ² and the "
                   "verdict as 'this prompt cannot tell'.", icon=":material/help:")


def verdict_box(decision: str, text: str) -> None:
    """A verdict in the colour of its decision: adapt (green), don't adapt (blue), undetermined (amber)."""
    getattr(st, _DECISION_BOX.get(decision, "info"))(text)


def verdict_scope(run_note: str) -> None:
    """Under a verdict: which update it is about (the kernel's linearised GD, DESIGN §4, §7.2), what
    `run_note` says of the page's measured run, and what the newest targets suite with kernel columns
    found when such verdicts were carried over to AdamW runs (`targets_suite.kernel_transfer`)."""
    from ttt_core.experiments.targets_suite import kernel_transfer

    transfer = kernel_transfer()
    st.caption("**Which update this verdict is about:** the kernel's linearised gradient descent, step ρ = c/λ_max for "
               "T steps on the squared loss of the supervised outputs (DESIGN §4, §7.2)" + run_note
               + " It is not a forecast of what AdamW does to W_Q or another target. "
               + (transfer["sentence"] + f" (suite `{transfer['folder']}`, {str(transfer['created'])[:10]}; the "
                  "Targets page shows it per target.)" if transfer else ""))


def interval_text(median: float, lo: float, hi: float) -> str:
    """'m [lo, hi]' with 3 significant digits (∞ for non-finite)."""
    def f(x: float) -> str:
        return f"{x:.3g}" if np.isfinite(x) else "∞"
    return f"{f(median)} [{f(lo)}, {f(hi)}]"


# ------------------------------------------------------------------------------------------
# Saved results: one provenance sentence, cached record reads (Reliability, Reproduction,
# Schedules, Targets)
# ------------------------------------------------------------------------------------------


def provenance_text(prov: dict | None, *, model: str | None = None, created: str | None = None,
                    file: str | None = None) -> str:
    """One sentence saying how a saved result was made, from its `store.provenance` record:
    "Made with `<command>` at commit `<12 hex>` (+ uncommitted changes) on N CPUs (processor,
    Python x.y, k torch thread(s) per worker) · model … · created … · file `…`". Missing fields
    read "?" / "unknown" rather than failing: an old result still shows."""
    prov = prov or {}
    mach = prov.get("machine") or {}
    commit = (prov.get("commit") or "unknown")[:12]
    dirty = " + uncommitted changes" if prov.get("uncommitted_changes") else ""
    threads = mach.get("torch_threads_per_worker")
    where = ", ".join(x for x in (str(mach.get("processor") or "?"), f"Python {mach.get('python', '?')}",
                                  None if threads is None else f"{threads} torch thread(s) per worker") if x)
    parts = [f"Made with `{prov.get('command') or '?'}` at commit `{commit}`{dirty} on "
             f"{mach.get('cpu_count', '?')} CPUs ({where})"]
    parts += [f"model {model}"] if model else []
    parts += [f"created {created}"] if created else []
    parts += [f"file `{file}`"] if file else []
    return " · ".join(parts)


def recheck_text(path) -> str:
    """The sentence telling a reader how to check a saved result themselves: the `ttt-lens recheck`
    command for its file (relative to the working directory where it lies below it)."""
    from pathlib import Path

    p = Path(path)
    try:
        shown = p.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        shown = p
    return (f"Check it yourself: `ttt-lens recheck {shown} --records 3` recomputes 3 random records with "
            "today's code and says whether each agrees with the file (the test suite runs the same check).")


def _mtime_ns(path) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return -1


@st.cache_data(max_entries=4, show_spinner=False)
def _saved_calibration(path: str, mtime_ns: int) -> tuple[object, float | None]:
    from ttt_core.experiments.calibration_suite import saved_suite, suite_seconds

    suite = saved_suite(path)
    return (None, None) if suite is None else (suite, suite_seconds(suite))


def saved_calibration(path) -> tuple[object, float | None]:
    """(the calibration `Suite` behind the saved summary at `path`, Σ of its records' compute
    seconds) — (None, None) when records are missing. Read once per file version (cached on the
    path and its modification time, as a copy per session: `st.cache_data`), not on every rerun:
    a 300-prompt suite is ~300 record files."""
    return _saved_calibration(str(path), _mtime_ns(path))
