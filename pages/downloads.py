"""Download rows, the diagnosis buttons and the saved-run sections of the pages (issue 11). UI only:
the data and its envelope come from ttt_core.export, run comparisons from ttt_core.run_compare,
their figures from ttt_core.figures.compare.

* `figure_downloads(fig, figure_id, lm, prompt)`: CSV + JSON of exactly what `fig` draws, right
  under its chart. Settings: the page's widgets (session keys starting with the figure id's first
  "_" part, e.g. "spec_") unless given.
* `table_download(df, table_id, lm, prompt)`: a table's CSV.
* `diagnosis_section(lm, prompt, page, **settings)`: "Prepare the diagnosis", then the JSON and
  Markdown of `ttt-lens diagnose` for the sidebar's model and prompt (cached in this session).
* `qttt_runs_section` / `steps_runs_section`: save this run, load saved runs, compare up to two
  loaded or previous runs with the current one.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

import pandas as pd
import streamlit as st

from ttt_core import export
from ttt_core import run_compare as rc
from ttt_core.figures.compare import difference_figure, overlay_figure

SS = st.session_state
DIAG_KEY = "_ttt_diagnoses"  # (model, prompt text, settings) → (report, created)
DIAGNOSE_DEFAULTS: dict[str, Any] = dict(subspace="q", c=0.1, grid=30, delta=0.05, top_k=8, last_layers=None,
                                         max_positions=256)
CSV_HELP = ("Exactly the data this chart draws, read from the figure. Metadata (model, prompt SHA-256, settings, "
            f"versions, what each column is) in leading '#' lines: read it with {export.READ_HINT}.")
JSON_HELP = "The chart's data nested (every trace, axis, reference line) in a versioned TTT Lens envelope."
MAX_COMPARED = 2


def _primitive(v: Any) -> bool:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return True
    return isinstance(v, (list, tuple)) and all(isinstance(x, (str, int, float, bool)) or x is None for x in v)


def page_settings(prefix: str) -> dict[str, Any]:
    """This session's widget values whose keys start with `prefix` (plain values only)."""
    return {k: v for k, v in sorted(SS.items(), key=lambda kv: str(kv[0]))
            if isinstance(k, str) and k.startswith(prefix) and _primitive(v)}


def _meta(figure_id: str, lm: Any, prompt: Any, settings: Mapping[str, Any] | None, model: str | None) -> dict:
    s = dict(page_settings(figure_id.split("_")[0] + "_") if settings is None else settings)
    if lm is not None:
        s.setdefault("token_limit", SS.get("max_tokens"))
    return {"model": model if model is not None else getattr(lm, "name", None),
            "prompt_text": None if prompt is None else prompt.to_text(),
            "prompt_kind": getattr(prompt, "kind", None), "settings": s}


def figure_downloads(fig: Any, figure_id: str, lm: Any = None, prompt: Any = None, *,
                     settings: Mapping[str, Any] | None = None, model: str | None = None) -> None:
    """A row of two small buttons under a chart: its data as CSV and as JSON."""
    try:
        csv_text, json_text = export.figure_exports(fig, figure_id, **_meta(figure_id, lm, prompt, settings, model))
    except Exception as exc:  # noqa: BLE001 — a download must never take the page down
        st.caption(f"Data download unavailable for this chart ({type(exc).__name__}: {exc}).")
        return
    with st.container(horizontal=True, gap="small"):
        st.download_button("CSV", csv_text, file_name=export.file_name(figure_id, "csv"), mime="text/csv",
                           key=f"dl_{figure_id}_csv", on_click="ignore", icon=":material/download:",
                           type="tertiary", help=CSV_HELP)
        st.download_button("JSON", json_text, file_name=export.file_name(figure_id, "json"),
                           mime="application/json", key=f"dl_{figure_id}_json", on_click="ignore",
                           icon=":material/download:", type="tertiary", help=JSON_HELP)


def table_download(df: pd.DataFrame, table_id: str, lm: Any = None, prompt: Any = None, *,
                   settings: Mapping[str, Any] | None = None) -> None:
    """One small button: the table as CSV (metadata in leading '#' lines)."""
    text = export.table_csv(df, table_id, **_meta(table_id, lm, prompt, settings, None))
    st.download_button("CSV", text, file_name=export.file_name(table_id, "csv"), mime="text/csv",
                       key=f"dl_{table_id}_csv", on_click="ignore", icon=":material/download:", type="tertiary",
                       help=f"This table as CSV; metadata in leading '#' lines: read it with {export.READ_HINT}.")


# ------------------------------------------------------------------------------------------ diagnosis
def diagnosis_section(lm: Any, prompt: Any, page: str, **settings: Any) -> None:
    """The whole `ttt-lens diagnose` report for the sidebar's model and prompt, computed only when
    asked (it takes seconds) and kept in this session per (model, prompt, settings)."""
    from ttt_core.diagnosis import diagnose_markdown, diagnose_report
    from ttt_core.experiments.calibration_advice import attach_calibration

    s = {**DIAGNOSE_DEFAULTS, **settings}
    cmd_settings = {**s, "max_tokens": int(SS.get("max_tokens", 2048)),
                    "trust_remote_code": bool(SS.get("trust_remote_code", False))}
    st.subheader("The whole diagnosis")
    st.caption("When / how far / which in one report: exactly what this command prints, with the sidebar's prompt "
               "saved as prompt.txt (add `--format md` for the Markdown).")
    st.code(export.diagnose_command(lm.name, cmd_settings), language="bash")
    key = (lm.name, prompt.to_text(), tuple(sorted(s.items())))
    store = SS.setdefault(DIAG_KEY, {})
    if st.button("Prepare the diagnosis", key=f"{page}_diag_prepare", icon=":material/summarize:",
                 help="Computes the prompt kernel, the steps theory and the block scores: a few seconds to a minute."):
        bar = st.progress(0.0, text="Starting the diagnosis…")
        try:
            report = diagnose_report(lm, prompt, **s, progress=lambda f, t: bar.progress(f, text=t))
            report = attach_calibration(report, lm, prompt)
        except Exception as exc:  # noqa: BLE001 — the page stays up
            bar.empty()
            st.error(f"The diagnosis failed: {type(exc).__name__}: {exc}")
            return
        bar.empty()
        store.pop(key, None)
        store[key] = (report, export.utc_now())
        while len(store) > 4:
            store.pop(next(iter(store)))
    held = store.get(key)
    if held is None:
        st.caption("Not prepared yet for this model, prompt and settings.")
        return
    report, created = held
    env = export.diagnosis_export(report, prompt_text=prompt.to_text(), settings=cmd_settings, created=created)
    with st.container(horizontal=True, gap="small"):
        st.download_button("Download the diagnosis (JSON)", export.dumps(env), file_name="ttt_lens_diagnosis.json",
                           mime="application/json", key=f"dl_{page}_diag_json", on_click="ignore",
                           icon=":material/download:")
        st.download_button("Download the diagnosis (Markdown)", diagnose_markdown(report),
                           file_name="ttt_lens_diagnosis.md", mime="text/markdown", key=f"dl_{page}_diag_md",
                           on_click="ignore", icon=":material/download:")
    st.caption(f"Prepared {created} in {report['timings']['total_s']:.1f} s. Verdict: {report['verdict']['text']}")


# ------------------------------------------------------------------------------------------ saved runs
def _load(kind: str, key: str) -> list[export.SavedRun]:
    files = st.file_uploader(f"Load saved {'runs' if kind == 'qttt_run' else 'results'} to compare (JSON)",
                             type=["json"], accept_multiple_files=True, key=f"{key}_upload",
                             help="Files saved with the button above (this page's kind only).")
    runs = []
    for f in files or []:
        try:
            runs.append(export.SavedRun.from_json(f.getvalue(), kind=kind, label=f.name))
        except export.RunFormatError as exc:
            st.error(f"**{f.name}** was not loaded: {exc}", icon=":material/error:")
    return runs


def _compare(runs: list[export.SavedRun], key: str) -> None:
    """Overlay and difference charts of the chosen curves, and the final metrics with differences."""
    labels = rc.unique_labels(runs)
    runs = [replace(r, label=lab) for r, lab in zip(runs, labels)]
    st.dataframe(pd.DataFrame(rc.runs_overview(runs)), hide_index=True, key=f"{key}_cmp_runs")
    if any(r.prompt_sha256 != runs[0].prompt_sha256 for r in runs[1:]):
        st.warning("Not every run used the same prompt (see 'same prompt as the first'): compare with care.")
    curves = [rc.run_metrics(r) for r in runs]
    options = list(dict.fromkeys(m for c in curves for m in c))
    defaults = [m for m in rc.default_metrics(runs[0]) if m in options] or options[:1]
    chosen = st.multiselect("Curves to compare", options, default=defaults, key=f"{key}_cmp_metrics")
    xt = rc.x_title(runs[0])
    for i, metric in enumerate(chosen):
        have = [(lab, *c[metric]) for lab, c in zip(labels, curves) if metric in c]
        left, right = st.columns(2)
        with left:
            st.plotly_chart(fig := overlay_figure(have, metric, xt), key=f"{key}_cmp_fig_{i}")
            figure_downloads(fig, f"{key}_cmp_{i}", settings={"runs": labels, "metric": metric})
        with right:
            if metric in curves[0] and len(have) > 1:
                st.plotly_chart(fig := difference_figure(have[0], have[1:], metric, xt), key=f"{key}_cmp_diff_{i}")
                figure_downloads(fig, f"{key}_cmp_diff_{i}", settings={"runs": labels, "metric": metric})
            else:
                st.caption(f"No difference: the first run has no '{metric}' curve, or only one run has it.")
    st.markdown("**Final metrics** (first run − each other run)")
    st.dataframe(pd.DataFrame(rc.compare_table(runs)), hide_index=True, key=f"{key}_cmp_table")


def _section(kind: str, key: str, current: export.SavedRun | None, history: list[export.SavedRun]) -> None:
    if current is not None:
        st.download_button("Save this run (JSON)" if kind == "qttt_run" else "Save this result (JSON)",
                           current.to_json(), file_name=export.file_name(kind, "json"), mime="application/json",
                           key=f"dl_{key}_save", on_click="ignore", icon=":material/save:",
                           help="One versioned JSON file (settings, every curve, timings, versions, model, prompt "
                                "SHA-256) that loads back below, here or in another session.")
    others = _load(kind, key) + history
    if len(others) > MAX_COMPARED:
        st.warning(f"{len(others)} runs to compare: only the first {MAX_COMPARED} "
                   f"({', '.join(r.label for r in others[:MAX_COMPARED])}) are drawn.")
    runs = ([current] if current is not None else []) + others[:MAX_COMPARED]
    if len(runs) < 2:
        st.caption("Load a saved file (or keep another run) to compare it with this one.")
        return
    _compare(runs, key)


def qttt_runs_section(lm: Any, prompt: Any, result: Mapping[str, Any] | None) -> None:
    """Save the finished run, load saved ones, and compare with up to two loaded or previous runs
    (this session's two runs before the current one are kept automatically)."""
    st.subheader("Save and compare runs")
    hist: list[export.SavedRun] = SS.setdefault("_qttt_previous_runs", [])
    seen = SS.get("_qttt_seen")  # (result dict, created, model, prompt text, prompt kind) of the shown run
    finished = bool(result and result.get("records") and result.get("status") != "running")
    if not finished:
        if result is None:
            SS["_qttt_seen"] = None  # Reset: this run is forgotten, not kept for comparison
        current = None
    else:
        if seen is None or seen[0] is not result:
            if seen is not None:
                hist.insert(0, _qttt_run(seen, f"previous run {seen[1][11:19]} UTC"))
                del hist[MAX_COMPARED:]
            seen = SS["_qttt_seen"] = (result, export.utc_now(), lm.name, prompt.to_text(), prompt.kind)
        current = _qttt_run(seen, "this run")
    if hist and st.button("Forget the previous runs", key="qttt_forget_previous"):
        hist.clear()
    _section("qttt_run", "qttt", current, list(hist))


def _qttt_run(seen: tuple, label: str) -> export.SavedRun:
    result, created, model, text, kind = seen
    return export.qttt_saved_run(result, model=model, prompt_text=text, prompt_kind=kind, created=created, label=label)


def steps_runs_section(lm: Any, prompt: Any, report: Any) -> None:
    """Save this Steps & bounds result, keep it for comparison, load saved ones, compare."""
    st.subheader("Save and compare results")
    hist: list[export.SavedRun] = SS.setdefault("_steps_kept_results", [])
    current = export.steps_saved_run(report, prompt_text=prompt.to_text(), prompt_kind=prompt.kind)
    c1, c2 = st.columns([1, 1])
    if c1.button("Keep this result for comparison", key="steps_keep_result",
                 help="Kept in this session (the two newest); change a setting or the prompt and compare."):
        s = current.settings
        current.label = f"kept {current.created[11:19]} UTC ({s.get('subspace')}, c = {s.get('c')})"
        hist.insert(0, current)
        del hist[MAX_COMPARED:]
        current = export.steps_saved_run(report, prompt_text=prompt.to_text(), prompt_kind=prompt.kind)
    if hist and c2.button("Forget the kept results", key="steps_forget_kept"):
        hist.clear()
    _section("steps_run", "steps", current, list(hist))


def slot_chart(slot: Any, fig: Any, key: str, figure_id: str, res: Mapping[str, Any], lm: Any, prompt: Any) -> None:
    """A chart drawn into a placeholder (Live qTTT streams into them); under it, once the run is
    no longer running, its data downloads (settings: the run's own)."""
    with slot.container():
        st.plotly_chart(fig, key=key)
        if res.get("status") != "running":
            figure_downloads(fig, figure_id, lm, prompt, settings=res.get("settings") or {})
