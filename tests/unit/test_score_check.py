"""Per-prompt check of the head scores against real TTT (ttt_core.score_check; DESIGN §6, §10).

Tiny llama (3 layers; W_V has 2 kv heads per layer = 6 blocks, W_Q 4 heads = 12 blocks)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import spearmanr

from ttt_core.diagnosis import json_clean
from ttt_core.examples import load_example
from ttt_core.figures.score_check import (
    TRACE_DIAGONAL,
    TRACE_RANDOM,
    TRACE_TOP,
    score_check_figure,
)
from ttt_core.generators import digit_shift_task, needle_haystack
from ttt_core.models import build_tiny_model
from ttt_core.paper_gd import gd_trajectory
from ttt_core.prompt_kernel import compute_prompt_kernel
from ttt_core.prompts import FewShotPrompt, parse_prompt
from ttt_core.qttt import QTTTConfig, QTTTRun
from ttt_core.score_check import check_scores
from ttt_core.scores import score_blocks
from ttt_core.steps import block_kernel, theory_curves
from ttt_core.types import parse_block_label

K, STEPS, R, SEED = 2, 2, 3, 7


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model("llama")


@pytest.fixture(scope="module")
def fewshot():
    return digit_shift_task(3).prompt


@pytest.fixture(scope="module")
def ev_v(tiny, fewshot):
    return compute_prompt_kernel(tiny, fewshot, "v")


@pytest.fixture(scope="module")
def sc_v(ev_v):
    return score_blocks(ev_v)


@pytest.fixture(scope="module")
def chk_v(tiny, fewshot, ev_v, sc_v):
    calls = []
    chk = check_scores(tiny, fewshot, ev_v, sc_v, k=K, steps=STEPS, random_subsets=R, seed=SEED,
                       progress=lambda f, t: calls.append((f, t)))
    chk.calls = calls  # type: ignore[attr-defined]
    return chk


def _blocks(labels):
    return [parse_block_label(s)[:2] for s in labels]


# ------------------------------------------------------------------ which subsets
def test_subsets_are_the_ranked_and_seeded_blocks(ev_v, sc_v, chk_v):
    """Catches: a wrong score or order (top-k must be the first k of scores.ranked, bottom-k the last
    k), non-canonical labels, and random subsets that are not the documented seeded draw."""
    assert chk_v.possible and chk_v.note is None and chk_v.score == "Query-Aware" and chk_v.engine == "paper GD"
    assert [s.label for s in chk_v.subsets] == ["top-k", "bottom-k"] + [f"random {i}" for i in range(1, R + 1)]
    ranked = [r["block"] for r in sc_v.ranked("Query-Aware")]
    assert chk_v.subset("top-k").blocks == ranked[:K]
    assert chk_v.subset("bottom-k").blocks == ranked[-K:]
    assert all(b.startswith("L") and ".vH" in b for s in chk_v.subsets for b in s.blocks)
    rng = np.random.default_rng(SEED)
    blocks = ev_v.blocks()
    for s in chk_v.randoms:
        idx = np.sort(rng.choice(len(blocks), size=K, replace=False))
        assert _blocks(s.blocks) == [blocks[int(j)] for j in idx]
        assert len(set(s.blocks)) == K


def test_trace_score_and_seed_change_the_subsets(tiny, fewshot, ev_v, sc_v):
    """Catches: `score` ignored (Trace must rank by the trace), the seed ignored."""
    chk = check_scores(tiny, fewshot, ev_v, sc_v, k=K, steps=1, random_subsets=4, seed=SEED + 1, score="Trace")
    ranked = [r["block"] for r in sc_v.ranked("Trace")]
    assert chk.score == "Trace" and chk.subset("top-k").blocks == ranked[:K]
    other = check_scores(tiny, fewshot, ev_v, sc_v, k=K, steps=1, random_subsets=4, seed=SEED + 2, score="Trace")
    assert [s.blocks for s in chk.randoms] != [s.blocks for s in other.randoms]


def test_progress_after_every_run(chk_v):
    """Catches: progress missing or not reaching 1 (the page's bar)."""
    fr = [f for f, _ in chk_v.calls]
    assert len(fr) == 2 + R
    np.testing.assert_allclose(fr, np.arange(1, 3 + R) / (2 + R))
    assert all(isinstance(t, str) and t for _, t in chk_v.calls)


# ------------------------------------------------------------------ measured and predicted
def test_measured_change_equals_an_independent_gd_trajectory(tiny, fewshot, ev_v, chk_v):
    """Catches: the wrong ρ (must be c/λ_max of the subset's own kernel), the wrong blocks, the wrong
    step index or sign of the change."""
    for label in ("top-k", "random 1"):
        s = chk_v.subset(label)
        blocks = _blocks(s.blocks)
        KS, _ = block_kernel(ev_v, blocks)
        rho = 0.1 / np.linalg.eigvalsh(KS)[-1]
        assert s.rho == pytest.approx(rho, rel=1e-9)
        err = gd_trajectory(tiny, fewshot, "v", blocks, rho, STEPS)["error"]
        assert s.measured == pytest.approx(err[STEPS] - err[0], rel=1e-6, abs=1e-12)
        assert s.measured_start == pytest.approx(err[0], rel=1e-6)
        assert s.measured_start == pytest.approx((ev_v.query.value - ev_v.query.target) ** 2, rel=1e-4)
        assert s.status == "done" and s.seconds > 0


def test_measured_matches_linearised_to_first_order(tiny, fewshot, ev_v, sc_v):
    """For small ρ = c/λ_max the measured change of the query error equals the linearised one up to
    O(ρ²): the relative gap shrinks ∝ c. Catches a prediction at the wrong ρ, T or sign, or one built
    from the wrong kernel (e.g. the full subspace instead of the subset)."""
    rel = {}
    for c in (0.04, 0.02, 0.01):
        chk = check_scores(tiny, fewshot, ev_v, sc_v, k=K, steps=STEPS, c=c, random_subsets=1, seed=SEED)
        rel[c] = np.array([abs(s.measured - s.predicted) / abs(s.predicted) for s in chk.subsets])
        assert all(np.sign(s.measured) == np.sign(s.predicted) for s in chk.subsets)
    assert np.all(rel[0.01] < 0.03), rel
    for a, b in ((0.04, 0.02), (0.02, 0.01)):
        ratio = rel[a] / rel[b]
        assert np.all((ratio > 1.5) & (ratio < 2.7)), (a, b, ratio)


def test_summary_and_plain_data(chk_v):
    """Catches: verdict flags or Spearman not computed from the subsets, a summary that omits them,
    and a result that is not plain JSON data."""
    top, bot = chk_v.subset("top-k").measured, chk_v.subset("bottom-k").measured
    mean = np.mean([s.measured for s in chk_v.randoms])
    assert chk_v.random_mean == pytest.approx(mean)
    assert chk_v.top_beats_random == (top < mean) and chk_v.top_beats_bottom == (top < bot)
    rho = spearmanr([s.predicted for s in chk_v.subsets], [s.measured for s in chk_v.subsets]).statistic
    assert chk_v.spearman == pytest.approx(rho)
    assert "Spearman" in chk_v.summary and f"{chk_v.spearman:.2f}" in chk_v.summary
    assert ("beats both" in chk_v.summary) == (chk_v.top_beats_random and chk_v.top_beats_bottom)
    d = json.loads(json.dumps(json_clean(chk_v.to_dict())))
    assert d["summary"] == chk_v.summary and len(d["subsets"]) == 2 + R and d["same_scale"] is True
    assert len(chk_v.table_rows()) == 2 + R


# ------------------------------------------------------------------ long context (qTTT)
def test_long_context_uses_qttt_and_says_the_scales_differ(tiny):
    """Catches: the long-context path not running qTTT on exactly the subset's W_Q heads with the
    given steps and seed, a prediction that is not Δ(1 − p), and a summary that hides the scales."""
    prompt = needle_haystack(0, n_words=40)
    ev = compute_prompt_kernel(tiny, prompt, "q", max_positions=16)
    sc = score_blocks(ev)
    chk = check_scores(tiny, prompt, ev, sc, k=K, steps=STEPS, random_subsets=2, seed=SEED, qttt_span=16, qttt_lr=1e-3)
    assert chk.possible and chk.engine == "qTTT" and chk.same_scale is False
    assert chk.measured_label == "answer NLL" and "compare ranks" in chk.summary
    assert len(chk.subsets) == 4
    s = chk.subset("top-k")
    blocks = _blocks(s.blocks)
    run = QTTTRun(tiny, prompt, QTTTConfig(steps=STEPS, span=16, lr=1e-3, heads=blocks, seed=SEED))
    recs = [run.prepare(), *run.steps()]
    assert s.measured == pytest.approx(recs[-1].answer_nll - recs[0].answer_nll, rel=1e-5, abs=1e-7)
    assert s.measured != 0.0
    KS, kx = block_kernel(ev, blocks)
    tc = theory_curves(KS, ev.residuals, kx, ev.query.value, 1.0, 0.1, np.array([0.0, STEPS]))
    assert s.predicted == pytest.approx(-(tc.linear_prediction[1] - tc.linear_prediction[0]), rel=1e-9)


# ------------------------------------------------------------------ not possible
def test_not_possible_cases_carry_a_note(tiny, fewshot):
    """Catches: a check attempted (or crashing) where the engine cannot update the subspace or there
    is no answer, and a silent empty result without a reason."""
    calls = []
    cases = []
    ev = compute_prompt_kernel(tiny, fewshot, "o")
    cases.append((fewshot, ev, "W_V or W_Q"))
    no_answer = FewShotPrompt(demos=fewshot.demos, query_x=fewshot.query_x, query_y=None, sep=fewshot.sep,
                              spaced=fewshot.spaced)
    cases.append((no_answer, compute_prompt_kernel(tiny, no_answer, "v"), "answer"))
    needle = needle_haystack(0, n_words=30)
    cases.append((needle, compute_prompt_kernel(tiny, needle, "v", max_positions=8), "W_Q only"))
    free = parse_prompt(load_example("Free text (no question)"))
    cases.append((free, compute_prompt_kernel(tiny, free, "q", max_positions=8), "Answer"))
    for prompt, ev, why in cases:
        chk = check_scores(tiny, prompt, ev, score_blocks(ev), k=K, steps=1, progress=lambda f, t: calls.append(f))
        assert chk.possible is False and chk.subsets == [] and why in chk.note, chk.note
        assert chk.note in chk.summary and "not possible" in chk.summary
        fig = score_check_figure(chk)
        assert len(fig.data) == 0 and "not possible" in fig.layout.title.text
    assert calls == []


def test_bad_arguments_and_greedy_rank(tiny, fewshot, ev_v, sc_v):
    """Catches: silently accepting an impossible step size or an unknown score; greedy rank (which
    ranks only its picks) must give a note, not a bogus bottom-k."""
    with pytest.raises(ValueError):
        check_scores(tiny, fewshot, ev_v, sc_v, c=1.5)
    with pytest.raises(ValueError):
        check_scores(tiny, fewshot, ev_v, sc_v, score="Nope")
    with pytest.raises(ValueError):
        check_scores(tiny, fewshot, ev_v, sc_v, steps=0)
    sc = score_blocks(ev_v, greedy_budget=2)
    chk = check_scores(tiny, fewshot, ev_v, sc, score="Greedy rank")
    assert not chk.possible and "bottom-k" in chk.note


# ------------------------------------------------------------------ figure
def test_figure_points_labels_and_diagonal(chk_v):
    """Catches: points not at (linearised, measured), labels missing, no y = x line."""
    fig = score_check_figure(chk_v)
    by = {t.name: t for t in fig.data}
    assert set(by) == {TRACE_TOP, "bottom-k", TRACE_RANDOM, TRACE_DIAGONAL}
    top = chk_v.subset("top-k")
    assert list(by[TRACE_TOP].x) == [top.predicted] and list(by[TRACE_TOP].y) == [top.measured]
    assert list(by[TRACE_RANDOM].text) == [s.label for s in chk_v.randoms]
    assert list(by[TRACE_RANDOM].y) == [s.measured for s in chk_v.randoms]
    d = by[TRACE_DIAGONAL]
    assert list(d.x) == list(d.y)
    vals = [s.measured for s in chk_v.subsets] + [s.predicted for s in chk_v.subsets]
    assert d.x[0] <= min(vals) and d.x[-1] >= max(vals)
