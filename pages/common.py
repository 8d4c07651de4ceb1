"""Shared UI pieces for every page: the sidebar, the teaching helpers, cached model access.

This module draws and reads widgets only; everything it shows is computed in `ttt_core`.
Per-session state lives in `st.session_state`; the only cross-session object is the cached,
never-mutated model (DESIGN §1).
"""

from __future__ import annotations

import streamlit as st


def page_header(title: str, question: str) -> None:
    """Page title plus the one sentence saying which question the page answers (teaching layer)."""
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
