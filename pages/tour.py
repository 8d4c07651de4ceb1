"""The guided tour: curated examples in the order when → how far → which (teaching layer).

UI content (page paths, titles, what to look at), drawn on Home by ``pages.common.render_tour``;
the examples themselves live in ``ttt_core.examples``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TourStep:
    """One stop of the tour: which example to load, which page to open, what to look at."""

    title: str
    example: str
    page: str
    page_title: str
    look_for: str


TOUR: tuple[TourStep, ...] = (
    TourStep("1 · When: a clean few-shot task", "Digit shift, clean labels", "pages/spectrum.py", "Spectrum & SNR",
             "Clean labels make the residuals line up with the kernel's top eigen-directions: high per-mode SNR, "
             "a small λ⋆ and a verdict that adapting beats in-context prediction."),
    TourStep("2 · When not: the same task with noisy labels", "Digit shift, noisy labels (p = 0.55)", "pages/spectrum.py",
             "Spectrum & SNR",
             "With 55 % label noise the fitted σ² grows, λ⋆ grows and the Bayes filter g⋆ shrinks every mode: "
             "compare the verdict and the filter-match picture with stop 1."),
    TourStep("3 · How far: error against steps", "Digit shift, clean labels", "pages/steps_bounds.py", "Steps & bounds",
             "The measured query error of real TTT at every step, its linearised prediction, the evidence curves "
             "and T_MAP, next to a plug-in PAC-Bayes bound."),
    TourStep("4 · Which directions: heads and blocks", "Digit shift, clean labels", "pages/heads.py", "Heads & blocks",
             "Query-Aware and Trace scores for every head; the recommended top-k are the heads whose kernel "
             "carries the query-relevant evidence."),
    TourStep("5 · Long context: a short needle", "Needle in a haystack, short", "pages/live_qttt.py", "Live qTTT",
             "Run query-only TTT against the frozen KV cache and watch the answer probability and the attention "
             "mass on the needle."),
    TourStep("6 · Long context: a long needle", "Needle in a haystack, long", "pages/long_context.py", "Long context",
             "Score dilution: with more distractors the needle's attention falls as 1/(1 + m e^{-Δ}); qTTT moves the "
             "queries to restore the margin."),
)
