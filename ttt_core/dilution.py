"""Score dilution: how much attention the answer position puts on a needle as the context grows,
before and after qTTT, against the qTTT paper's bounds (DESIGN §8; Bansal et al. Lemma 2.2, 2.3).

For one head at the answer position (the last prompt token, whose output predicts the first answer
token) with pre-softmax logits z_j = q·k_j/√d_k over the T visible keys:

* j* = the needle token with the largest logit; α* = its attention; the needle mass is the
  attention summed over all needle tokens.
* Lemma 2.2 (dilution): if m distractors have z_j ≥ z_{j*} − Δ (Δ ≥ 0), then
  α* ≤ 1/(1 + m e^{−Δ}). Distractors here are the non-needle keys. `dilution_bound` at a given Δ,
  and `tightest_bound`: the minimum of that bound over every Δ (Δ_m = the m-th smallest gap).
* Lemma 2.3 (margin): if min_{j≠j*} (z_{j*} − z_j) ≥ log((T − 1)(1 − ε)/ε) then α* ≥ 1 − ε, so a
  fixed target mass needs a margin growing like log T (`required_margin`). The retrieval margin
  γ = z_{j*} − log Σ_{j≠j*} e^{z_j} satisfies α* = 1/(1 + e^{−γ}) exactly.

Logits from attention probabilities: within one row z_j − z_l = log α_j − log α_l (the softmax
normaliser cancels), so every quantity above is computed from the recorded probabilities'
logarithms (keys with probability 0 in fp32 have z = −∞: they are never within Δ of the needle).
The measurement runs the answer row against the frozen cache of the prefill
(`attention.forward_with_frozen_kv` + `record_attention`), with the adapted W_Q after qTTT.

The query gradient (DESIGN §8): with z = s·Kq (s = 1/√d_k), α = softmax(z) and μ = Σ_j α_j k_j,

    ∂(−log α_needle)/∂q = s (μ − k_needle),

so a gradient step on q moves it toward k_needle − μ: it raises the needle's logit against the
attention-weighted mean key, which is what qTTT's query-only update can do against dilution.
`needle_query_gradient` is the closed form, `autograd_needle_gradient` the same derivative by
torch.autograd, `query_gradient_check` compares them; `measured_query_gradient_check` does it on a
real model's answer row (keys from the frozen cache, the query recovered from the recorded row,
see there) and `synthetic_row` gives a small random row when the prompt marks no needle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ttt_core.attention import forward_with_frozen_kv, prefill, record_attention
from ttt_core.generators import needle_haystack
from ttt_core.models import LoadedModel
from ttt_core.prompts import LongContextPrompt, Prompt
from ttt_core.qttt import QTTTConfig, QTTTRun, qttt_inputs

Progress = Callable[[float, str], None] | None


# ============================================================================================
# the lemmas on logit rows
# ============================================================================================


def dilution_bound(m: Any, delta: Any) -> Any:
    """Lemma 2.2: 1/(1 + m e^{−Δ})."""
    return 1.0 / (1.0 + np.asarray(m, dtype=float) * np.exp(-np.asarray(delta, dtype=float)))


def required_margin(T: Any, eps: float) -> Any:
    """Lemma 2.3: the worst-case logit gap log((T − 1)(1 − ε)/ε) that guarantees α ≥ 1 − ε."""
    if not 0.0 < eps < 1.0:
        raise ValueError("ε must lie in (0, 1)")
    T = np.asarray(T, dtype=float)
    return np.log(np.maximum(T - 1.0, 1e-300) * (1.0 - eps) / eps)


def margin_lower_bound(T: Any, gap: Any) -> Any:
    """α* ≥ 1/(1 + (T − 1) e^{−gap}) for the minimum gap over the other T − 1 keys (Lemma 2.3's proof)."""
    return 1.0 / (1.0 + (np.asarray(T, dtype=float) - 1.0) * np.exp(-np.asarray(gap, dtype=float)))


def _logsumexp(z: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(z, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(m, axis) + np.log(np.sum(np.exp(z - m), axis=axis))


@dataclass
class RowStats:
    """Lemma quantities of logit rows (..., T) for a needle key set; arrays of the leading shape."""
    j_star: np.ndarray
    alpha_star: np.ndarray
    needle_mass: np.ndarray
    gamma: np.ndarray        # retrieval margin z* − log Σ_{j≠j*} e^{z_j}
    min_gap: np.ndarray      # z* − max_{j≠j*} z_j
    m: np.ndarray            # distractors (non-needle keys) within Δ of z*
    bound: np.ndarray        # 1/(1 + m e^{−Δ})
    tight_bound: np.ndarray  # min over Δ of the Lemma 2.2 bound
    delta: float
    n_keys: int


def row_stats(z: np.ndarray, needle: Sequence[int], delta: float) -> RowStats:
    """Lemma 2.2/2.3 quantities for logit rows z (..., T) (any additive constant per row; −∞
    allowed) and the needle key indices. α is softmax(z)."""
    z = np.asarray(z, dtype=float)
    if delta < 0:
        raise ValueError("Δ must be ≥ 0")
    needle = np.asarray(sorted(set(int(i) for i in needle)), dtype=int)
    T = z.shape[-1]
    if needle.size == 0 or needle.min() < 0 or needle.max() >= T:
        raise ValueError("needle indices must be non-empty and inside the row")
    lse = _logsumexp(z)
    logp = z - lse[..., None]
    zn = z[..., needle]
    j_star = needle[np.argmax(zn, axis=-1)]
    z_star = np.take_along_axis(z, j_star[..., None], axis=-1)[..., 0]
    alpha_star = np.exp(z_star - lse)
    mass = np.exp(logp[..., needle]).sum(-1)
    others = z.copy()
    np.put_along_axis(others, j_star[..., None], -np.inf, axis=-1)
    with np.errstate(invalid="ignore"):
        gamma = z_star - _logsumexp(others)
        min_gap = z_star - np.max(others, axis=-1)
    is_distr = np.ones(T, dtype=bool)
    is_distr[needle] = False
    gaps = z_star[..., None] - z[..., is_distr]       # ≥ 0 unless the distractor beats the needle
    m = np.sum(gaps <= delta, axis=-1)
    bound = dilution_bound(m, delta)
    # tightest: sort gaps; with Δ_m = max(gap_(m), 0) at least m distractors are within Δ_m
    g = np.sort(np.where(np.isfinite(gaps), gaps, np.inf), axis=-1)
    ms = np.arange(1, g.shape[-1] + 1, dtype=float)
    with np.errstate(over="ignore"):
        cand = 1.0 / (1.0 + ms * np.exp(-np.maximum(g, 0.0)))
    tight = np.minimum(1.0, cand.min(axis=-1)) if g.shape[-1] else np.ones(z_star.shape)
    return RowStats(j_star=j_star, alpha_star=alpha_star, needle_mass=mass, gamma=gamma, min_gap=min_gap, m=m,
                    bound=bound, tight_bound=tight, delta=float(delta), n_keys=int(T))


# ============================================================================================
# measuring a model
# ============================================================================================


@dataclass
class Measurement:
    """One answer-row measurement (all layers × query heads), before or after adaptation.

    Arrays (L, H): needle mass, α*, γ, min gap, m(Δ), the Lemma 2.2 bound at Δ and the tightest
    bound. answer_prob: probability of the whole expected answer (teacher forced), answer_first_prob:
    of its first token; answer: the greedy answer; correct: it starts with the expected answer."""
    n_keys: int
    needle_tokens: list[int]
    stats: RowStats
    answer_prob: float
    answer_first_prob: float
    answer: str | None = None
    correct: bool | None = None

    @property
    def mean_mass(self) -> float:
        return float(np.mean(self.stats.needle_mass))


def measure_answer_row(lm: LoadedModel, run: QTTTRun, deltas: dict | None, delta: float) -> Measurement:
    """Attention of the answer row (the last prompt token) over the frozen cache of a prepared
    `qttt.QTTTRun`, with `deltas` applied to W_Q (None/{} = base model); plus the teacher-forced
    answer probability over the answer rows."""

    enc = run.enc
    row = enc.n_prompt - 1
    m = max(1, enc.answer_len)
    with torch.no_grad(), lm.adapter.apply(deltas=deltas or {}):
        with record_attention() as rec:
            out = forward_with_frozen_kv(lm.model, enc.ids[:, row:row + m], run.cache, row)
    layers = sorted(k for k in rec if isinstance(k, int))
    P = torch.stack([rec[l][0, :, 0, : row + 1] for l in layers]).double().cpu().numpy()  # (L, H, T)
    with np.errstate(divide="ignore"):
        Z = np.log(P)
    needle = [i for i in enc.needle if i <= row]
    st = row_stats(Z, needle, delta)
    if enc.answer_len:
        tgt = enc.ids[0, enc.n_prompt:enc.n_prompt + enc.answer_len]
        logp = torch.log_softmax(out.logits[0, : enc.answer_len].float(), -1).gather(-1, tgt[:, None])[:, 0]
        ans_prob, first = float(logp.sum().exp()), float(logp[0].exp())
    else:
        ans_prob = first = float("nan")
    return Measurement(n_keys=row + 1, needle_tokens=needle, stats=st, answer_prob=ans_prob, answer_first_prob=first)


@dataclass
class DilutionPoint:
    """One context length and needle position: before/after measurements and the run."""
    n_words: int
    position: float
    n_tokens: int
    before: Measurement
    after: Measurement
    steps: int
    span: int
    lr: float
    qttt_seconds: float
    status: str


def dilution_point(lm: LoadedModel, n_words: int, position: float, *, steps: int = 4, span: int = 64, lr: float = 1e-4,
                   seed: int = 0, delta: float = 2.0, answers: bool = True) -> DilutionPoint:
    """Needle-in-a-haystack prompt of `n_words` words, needle at `position`; measure the answer row
    before and after `steps` qTTT steps (engine run, W_Q of every layer)."""
    prompt = needle_haystack(seed, n_words=int(n_words), position=float(position))
    run = QTTTRun(lm, prompt, QTTTConfig(steps=int(steps), span=int(span), lr=float(lr), seed=int(seed),
                                         max_new_tokens=8))
    run.prepare()
    before = measure_answer_row(lm, run, None, delta)
    secs = 0.0
    for rec in run.steps():
        secs += rec.step_s
    deltas = {k: (d if run.masks.get(k) is None else d * run.masks[k]) for k, d in run.deltas.items()}
    after = measure_answer_row(lm, run, deltas, delta)
    if answers:
        for meas, adapted in ((before, False), (after, True)):
            meas.answer = run.generate(adapted=adapted, max_new_tokens=8)
            meas.correct = bool(meas.answer.strip().startswith(str(prompt.answer)))
    return DilutionPoint(n_words=int(n_words), position=float(position), n_tokens=int(run.enc.n_prompt),
                         before=before, after=after, steps=len(run.records), span=int(run.span), lr=float(lr),
                         qttt_seconds=secs, status=run.status)


def dilution_sweep(lm: LoadedModel, lengths: Sequence[int] = (100, 400, 1000), positions: Sequence[float] = (0.5,), *,
                   steps: int = 4, span: int = 64, lr: float = 1e-4, seed: int = 0, delta: float = 2.0,
                   answers: bool = True, progress: Progress = None) -> list[DilutionPoint]:
    """`dilution_point` for every (length, position); the prompt of point i uses seed + i."""
    pts, jobs = [], [(int(n), float(p)) for n in lengths for p in positions]
    for i, (n, p) in enumerate(jobs):
        if progress is not None:
            progress(i / len(jobs), f"{n} words, needle at {p:.0%} ({i + 1}/{len(jobs)})")
        pts.append(dilution_point(lm, n, p, steps=steps, span=span, lr=lr, seed=seed + i, delta=delta,
                                  answers=answers))
    if progress is not None:
        progress(1.0, "done")
    return pts


def sweep_table(points: Sequence[DilutionPoint], eps: float = 0.1) -> list[dict[str, Any]]:
    """One row per point: mean needle mass, best-head γ, required margin, answer prob/correctness."""
    rows = []
    for p in points:
        rows.append({
            "words": p.n_words, "needle at": p.position, "tokens T": p.n_tokens,
            "mass before": p.before.mean_mass, "mass after": p.after.mean_mass,
            "max γ before": float(np.nanmax(p.before.stats.gamma)),
            "max γ after": float(np.nanmax(p.after.stats.gamma)),
            f"required margin (ε = {eps:g})": float(required_margin(p.n_tokens, eps)),
            "answer p before": p.before.answer_prob, "answer p after": p.after.answer_prob,
            "correct before": p.before.correct, "correct after": p.after.correct,
            "qTTT steps": p.steps, "qTTT s": p.qttt_seconds,
        })
    return rows


# ============================================================================================
# the qTTT query gradient identity (DESIGN §8)
# ============================================================================================


def _row_inputs(q: Any, K: Any, needle: int, scale: float | None) -> tuple[np.ndarray, np.ndarray, int, float]:
    q = np.asarray(q, dtype=np.float64)
    K = np.asarray(K, dtype=np.float64)
    if q.ndim != 1 or K.ndim != 2 or K.shape[1] != q.shape[0] or K.shape[0] < 1:
        raise ValueError(f"need q (d_k,) and K (T, d_k); got {q.shape} and {K.shape}")
    needle = int(needle)
    if not 0 <= needle < K.shape[0]:
        raise ValueError(f"needle index {needle} outside the {K.shape[0]} keys")
    s = float(q.shape[0] ** -0.5 if scale is None else scale)
    return q, K, needle, s


def row_attention(q: Any, K: Any, scale: float | None = None) -> np.ndarray:
    """α = softmax(s·Kq) over the T keys (float64), s = 1/√d_k unless given."""
    q, K, _, s = _row_inputs(q, K, 0, scale)
    z = s * (K @ q)
    z = z - z.max()
    e = np.exp(z)
    return e / e.sum()


def needle_query_gradient(q: Any, K: Any, needle: int, scale: float | None = None) -> np.ndarray:
    """Closed form of ∂(−log α_needle)/∂q = s (μ − k_needle), μ = Σ_j α_j k_j (DESIGN §8).

    q (d_k,), K (T, d_k), needle: index of the needle key; s = scale (default 1/√d_k).
    Returns the gradient (d_k,), float64."""
    q, K, needle, s = _row_inputs(q, K, needle, scale)
    alpha = row_attention(q, K, s)
    return s * (alpha @ K - K[needle])


def autograd_needle_gradient(q: Any, K: Any, needle: int, scale: float | None = None) -> np.ndarray:
    """The same derivative by torch.autograd: −log_softmax(s·Kq)[needle] backpropagated to q (float64)."""
    q, K, needle, s = _row_inputs(q, K, needle, scale)
    with torch.enable_grad():
        qt = torch.tensor(q, dtype=torch.float64, requires_grad=True)
        loss = -torch.log_softmax(s * (torch.tensor(K, dtype=torch.float64) @ qt), dim=0)[needle]
        (g,) = torch.autograd.grad(loss, qt)
    return g.numpy().copy()


@dataclass
class QueryGradientCheck:
    """Closed-form query gradient of −log α_needle against torch.autograd's, for one attention row.

    source: "measured" (a model's answer row) or "synthetic"; description: where the row comes from.
    layer, head: the query head of a measured row (None for synthetic). needle: index of the needle
    key in the row (for a measured row j*: the needle token the head attends to most); n_keys = T,
    d_k, scale s. q: the query used (d_k,). alpha_needle: α of that key. closed, autograd: the two
    gradients (d_k,).
    norm_closed, norm_autograd, cosine, max_abs_diff: their comparison.
    For a measured row also: recon_max_abs = max_j |softmax(s·Kq̂)_j − α_j(recorded)|, q_identified
    (the least-squares system for q̂ had full rank), alpha_star_grid (L, H) = α* of every head."""
    source: str
    description: str
    layer: int | None
    head: int | None
    needle: int
    n_keys: int
    d_k: int
    scale: float
    q: np.ndarray
    alpha_needle: float
    closed: np.ndarray
    autograd: np.ndarray
    norm_closed: float
    norm_autograd: float
    cosine: float
    max_abs_diff: float
    recon_max_abs: float | None = None
    q_identified: bool | None = None
    alpha_star_grid: np.ndarray | None = None


def query_gradient_check(q: Any, K: Any, needle: int, scale: float | None = None, *, source: str = "synthetic",
                         description: str = "", **extra: Any) -> QueryGradientCheck:
    """Compare `needle_query_gradient` with `autograd_needle_gradient` on one row (float64)."""
    q, K, needle, s = _row_inputs(q, K, needle, scale)
    a = needle_query_gradient(q, K, needle, s)
    b = autograd_needle_gradient(q, K, needle, s)
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    cos = float(a @ b / (na * nb)) if na > 0 and nb > 0 else float("nan")
    return QueryGradientCheck(source=source, description=description, needle=needle, n_keys=int(K.shape[0]),
                              d_k=int(K.shape[1]), scale=s, q=q.copy(), alpha_needle=float(row_attention(q, K, s)[needle]),
                              closed=a, autograd=b, norm_closed=na, norm_autograd=nb, cosine=cos,
                              max_abs_diff=float(np.max(np.abs(a - b))), **{"layer": None, "head": None, **extra})


def synthetic_row(n_keys: int = 64, d_k: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """A small random row: keys K ~ N(0, I) (n_keys, d_k), needle at n_keys // 3, and a query
    q = 0.7·k_needle + N(0, I) noise, so the needle gets a visible but diluted share of the attention
    (α_needle ≈ 0.43 at the defaults). Returns (q, K, needle)."""
    rng = np.random.default_rng(seed)
    K = rng.standard_normal((int(n_keys), int(d_k)))
    needle = int(n_keys) // 3
    q = 0.7 * K[needle] + rng.standard_normal(int(d_k))
    return q, K, needle


def has_marked_needle(prompt: Prompt | None) -> bool:
    """A long-context prompt with at least one <needle>…</needle> span."""
    return isinstance(prompt, LongContextPrompt) and bool(prompt.needle_spans)


def _attention_scale(lm: LoadedModel, layer: int) -> float:
    """The attention module's own scaling (1/√d_k for the supported families), else 1/√d_k."""
    for m in lm.model.modules():
        if getattr(m, "layer_idx", None) == layer and getattr(m, "scaling", None) is not None:
            return float(m.scaling)
    return float(lm.adapter.head_dim) ** -0.5


def measured_query_gradient_check(lm: LoadedModel, prompt: Prompt, layer: int | None = None,
                                  head: int | None = None, tiny: float = 1e-30) -> QueryGradientCheck:
    """The query-gradient identity on a model's answer row (the last prompt token) for a prompt
    with a marked needle, base weights.

    One prefill of the prompt gives the frozen keys (already position-rotated where the model uses
    RoPE); one frozen-cache forward of the answer row records its attention α (every layer, query
    head). The row's query is not exposed by the model, so it is recovered from the row: z = s·Kq and
    log α = z − logsumexp(z), hence s·Kq − c·1 = log α for one constant c; q̂ is the least-squares
    solution over the keys with α > `tiny` (unique when [K, 1] has full column rank, i.e. enough
    keys in general position: `q_identified`). `recon_max_abs` reports how well softmax(s·Kq̂)
    reproduces the recorded row. The gradient depends on q only through α, so the identity is
    checked on the model's own α and keys either way.

    layer, head: the query head; None picks the head with the largest needle attention α*.
    The needle key is j*, the needle token that head attends to most."""
    if not has_marked_needle(prompt):
        raise ValueError("the prompt marks no needle: use synthetic_row")
    inp = qttt_inputs(lm, prompt)
    row = inp.n_prompt - 1
    needle = [i for i in inp.needle if i <= row]
    if not needle:
        raise ValueError("no needle token lies before the answer row")
    ids = inp.ids[:, : inp.n_prompt]
    with torch.no_grad():
        _, cache = prefill(lm.model, ids)
        with record_attention() as rec:
            forward_with_frozen_kv(lm.model, ids[:, row:row + 1], cache, row)
    layers = sorted(k for k in rec if isinstance(k, int))
    P = torch.stack([rec[l][0, :, 0, : row + 1] for l in layers]).double().cpu().numpy()  # (L, H, T)
    with np.errstate(divide="ignore"):
        stats = row_stats(np.log(P), needle, 0.0)
    if layer is None or head is None:
        layer, head = (int(v) for v in np.unravel_index(int(np.argmax(stats.alpha_star)), stats.alpha_star.shape))
    layer, head = int(layer), int(head)
    if not (0 <= layer < P.shape[0] and 0 <= head < P.shape[1]):
        raise IndexError(f"(layer {layer}, head {head}) outside the model's {P.shape[0]} × {P.shape[1]} query heads")
    kv = lm.adapter.kv_head_of(head)
    K = cache.keys[layer][0, kv, : row + 1].double().cpu().numpy()  # (T, d_k)
    alpha = P[layer, head]
    s = _attention_scale(lm, layer)
    keep = alpha > tiny
    A = np.hstack([s * K[keep], -np.ones((int(keep.sum()), 1))])
    sol, _, rank, _ = np.linalg.lstsq(A, np.log(alpha[keep]), rcond=None)
    q_hat = sol[:-1]
    j = int(stats.j_star[layer, head])
    recon = float(np.max(np.abs(row_attention(q_hat, K, s) - alpha)))
    desc = (f"answer row {row} (the last prompt token) of {lm.name}, layer {layer}, query head {head} "
            f"(kv head {kv}); needle key j* = {j} of {len(needle)} needle token(s); {row + 1} keys")
    return query_gradient_check(q_hat, K, j, s, source="measured", description=desc, layer=layer, head=head,
                                recon_max_abs=recon, q_identified=bool(rank == A.shape[1]),
                                alpha_star_grid=stats.alpha_star)
