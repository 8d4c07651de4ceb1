"""Block and head scores: which directions to adapt (DESIGN §6; paper A.7, App. I.4).

For blocks b of one subspace (heads of W_Q/W_K/W_V/W_O, or one MLP matrix per layer), with the
full kernel K = Σ_b K^(b) of the subspace and M = (K + λ⋆I)⁻¹:

* Query-Aware  s_b = k_x^(b)ᵀ M k_x^(b)   (Eq. 8 with Σ = I; needs a query);
* Trace        s_b = tr(K^(b) M)          (Eq. 9; computed from per-layer factors, no n×n K^(b));
* Hutchinson   s_b ≈ (1/R) Σ_r z_rᵀ K^(b) M z_r, z_r ∈ {±1}ⁿ, M z_r by conjugate gradients;
* Greedy Query-Aware (what the paper's experiments ran, App. I.4): add blocks one at a time, each
  time the b maximising h_b² with h_b = (k_x^curr + k_x^(b))ᵀ Q_T(K_curr + K^(b)) r,
  Q_T(λ) = (1 − (1 − ρλ)^T)/λ, fixed T = 8, ρ = c/λ_max(K_curr + K^(b)) of each candidate; k_x is
  restricted to the blocks in K_curr + K^(b) (couplings add over disjoint blocks).

The ridge is the noise-to-signal ratio λ⋆ = σ²/τ² (DESIGN §6): with the prior Σ = τ²I the
information capture is τ²Jᵀ(K + λ⋆I)⁻¹J, so σ² alone would make the ranking change when the kernel
is merely rescaled (Φ → cΦ moves K → c²K and λ⋆ → c²λ⋆; every score here is then unchanged). By
default λ⋆ is the posterior median of §5.1 (`noise_posterior`), never the boundary-prone point fit.
Under that posterior, `top_k_frequency` says how often (posterior mass) each block stays in the
Query-Aware top k. `share` = tr(K^(b))/tr(K).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse.linalg import LinearOperator, cg

from ttt_core import theory
from ttt_core.noise_posterior import NoisePosterior, noise_posterior
from ttt_core.prompt_kernel import PromptKernel
from ttt_core.types import Block

GREEDY_T = 8
GREEDY_C = theory.DEFAULT_C


@dataclass
class GreedyStep:
    """One greedy pick: the block, its h² and ρ used."""

    block: tuple[int, int]
    h2: float
    rho: float


@dataclass
class BlockScores:
    """Scores of every block, arrays (L, H) (H = blocks per layer).

    query_aware is None without a query; hutchinson/hutchinson_se only when requested;
    greedy: ordered picks (None when not run); ridge: the λ⋆ in (K + λ⋆I)⁻¹ and where it came
    from; top_k_frequency (L, H): posterior mass of the λ⋆ for which the block is in the
    Query-Aware top `top_k` (None without a query or a posterior)."""

    labels: np.ndarray
    ridge: float
    ridge_source: str
    trace: np.ndarray
    share: np.ndarray
    query_aware: np.ndarray | None
    hutchinson: np.ndarray | None = None
    hutchinson_se: np.ndarray | None = None
    greedy: list[GreedyStep] | None = None
    greedy_note: str | None = None
    top_k: int = 0
    top_k_frequency: np.ndarray | None = None
    posterior: NoisePosterior | None = None

    def available(self) -> dict[str, np.ndarray]:
        """Score name → (L, H) array, only those computed."""
        out = {"Trace": self.trace, "Kernel share": self.share}
        if self.query_aware is not None:
            out = {"Query-Aware": self.query_aware, **out}
        if self.greedy:
            g = np.full(self.trace.shape, np.nan)
            for rank, step in enumerate(self.greedy, 1):
                g[step.block] = rank
            out["Greedy rank"] = g
        if self.hutchinson is not None:
            out["Trace (Hutchinson)"] = self.hutchinson
        return out

    def ranked(self, score: str, k: int | None = None) -> list[dict]:
        """Rows (dict) sorted by `score` (descending; ascending for "Greedy rank"), top k."""
        arrs = self.available()
        key = arrs[score]
        order = np.argsort(key, axis=None, kind="stable")
        if score != "Greedy rank":
            order = order[::-1]
        rows = []
        for rank, flat in enumerate(order, 1):
            l, h = np.unravel_index(flat, key.shape)
            if np.isnan(key[l, h]):
                continue
            row = {"rank": rank, "block": str(self.labels[l, h]), "layer": int(l), "head": int(h)}
            row.update({name: float(a[l, h]) for name, a in arrs.items()})
            if self.top_k_frequency is not None:
                row[f"P(Query-Aware top {self.top_k})"] = float(self.top_k_frequency[l, h])
            rows.append(row)
        return rows[:k] if k else rows


@dataclass(frozen=True)
class HeadScores:
    """The Heads & blocks page's ranking handed to Live qTTT's "top-k" selection (one session).

    subspace: the projection kind scored ("q", "v", …); score: the score's name; scores: block →
    value, larger = adapt first (a greedy rank r is stored as −r)."""

    subspace: str
    score: str
    scores: dict[Block, float]

    @classmethod
    def from_scores(cls, bs: "BlockScores", subspace: str, score: str) -> "HeadScores":
        arr = bs.available()[score]
        sign = -1.0 if score == "Greedy rank" else 1.0
        L, H = arr.shape
        return cls(subspace, score, {(l, h): sign * float(arr[l, h]) for l in range(L) for h in range(H)
                                     if np.isfinite(arr[l, h])})

    def for_kind(self, kind: str, n_layers: int, n_heads: int) -> dict[Block, float]:
        """The scores of `kind`'s blocks that exist in a model of n_layers × n_heads ({} for another kind)."""
        if self.subspace != kind:
            return {}
        return {b: v for b, v in self.scores.items() if 0 <= b[0] < n_layers and 0 <= b[1] < n_heads}

    def top_k(self, k: int) -> list[Block]:
        """The k highest-scored blocks (ties by layer, head)."""
        return [b for b, _ in sorted(self.scores.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


def resolvent(lam: np.ndarray, U: np.ndarray, ridge: float) -> np.ndarray:
    """M = (K + λ⋆I)⁻¹ = U diag(1/(λ + λ⋆)) Uᵀ: (n, n)."""
    return (U / (lam + ridge)) @ U.T


def qa_over_posterior(couplings_tilde: np.ndarray, lam: np.ndarray, post: NoisePosterior, k: int) -> np.ndarray:
    """How often each block is in the Query-Aware top k over the λ⋆ posterior: Σ_j w_j·1[b ∈ top_k(λ⋆_j)]
    with s_b(λ⋆) = Σ_i (u_iᵀk_x^(b))²/(λ_i + λ⋆). couplings_tilde (B, n) = Uᵀ k_x^(b) per block → (B,)."""
    live = post.weights > 1e-6 * post.weights.max()
    grid = post.lambda_star_grid[live]
    S = (couplings_tilde ** 2) @ (1.0 / (lam[:, None] + grid[None, :]))      # (B, G')
    k = min(int(k), S.shape[0])
    top = np.argsort(-S, axis=0, kind="stable")[:k]                           # (k, G')
    member = np.zeros_like(S)
    np.put_along_axis(member, top, 1.0, axis=0)
    w = post.weights[live] / post.weights[live].sum()
    return member @ w


def hutchinson_trace(ev: PromptKernel, ridge: float, probes: int = 32, seed: int = 0, K: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Hutchinson estimate of tr(K^(b)(K + λ⋆I)⁻¹) for every block with standard errors.

    z_r ∈ {±1}ⁿ (Rademacher), u_r = (K + σ²I)⁻¹ z_r by conjugate gradients (K only as a matvec),
    s_b ≈ mean_r z_rᵀ K^(b) u_r. Returns (estimate (L, H), standard error (L, H))."""
    K = ev.K if K is None else K
    n = K.shape[0]
    rng = np.random.default_rng(seed)
    Z = rng.choice([-1.0, 1.0], size=(n, probes))
    op = LinearOperator((n, n), matvec=lambda v: K @ v + ridge * v, dtype=float)
    U = np.empty_like(Z)
    for r in range(probes):
        U[:, r], info = cg(op, Z[:, r], rtol=1e-12, atol=0.0, maxiter=10 * n)
    Q = ev.quad_forms(Z, U)  # (L, H, R)
    se = Q.std(axis=-1, ddof=1) / np.sqrt(probes) if probes > 1 else np.full(Q.shape[:2], np.nan)
    return Q.mean(axis=-1), se


def _lam_max(Kc: np.ndarray) -> np.ndarray:
    """Largest eigenvalue of each matrix in a (B, n, n) stack (exact for n ≤ 128, else 60 power
    iterations with a Rayleigh quotient — a lower bound close to λ_max; with c ≤ 0.5 ρ stays admissible)."""
    n = Kc.shape[-1]
    if n <= 128:
        return np.linalg.eigvalsh(Kc)[:, -1]
    v = np.ones(Kc.shape[:2]) / np.sqrt(n)
    for _ in range(60):
        w = np.einsum("bij,bj->bi", Kc, v)
        nrm = np.linalg.norm(w, axis=1, keepdims=True)
        v = w / np.where(nrm > 0, nrm, 1.0)
    return np.einsum("bi,bij,bj->b", v, Kc, v)


def greedy_query_aware(ev: PromptKernel, budget: int, T: int = GREEDY_T, c: float = GREEDY_C,
                       cache_bytes: int = 512 << 20, batch_bytes: int = 256 << 20) -> list[GreedyStep]:
    """Greedy Query-Aware selection (DESIGN §6, App. I.4); see module docstring.

    Per-block kernels are cached when L·H·n²·8 bytes ≤ cache_bytes, otherwise rebuilt from the
    factors at every step (slow for large n). Candidates are evaluated in batches of at most
    batch_bytes of kernels. Returns the picks in order (length min(budget, #blocks))."""
    if ev.head_couplings is None:
        raise ValueError("Greedy Query-Aware needs a query coupling k_x (this prompt has none).")
    blocks = ev.blocks()
    n = ev.n
    r = ev.residuals
    kxb = ev.head_couplings
    L, H = kxb.shape[:2]
    cached = None
    if L * H * n * n * 8 <= cache_bytes:
        cached = np.stack([f.head_kernels().cpu().numpy() for f in ev.factors])  # (L, H, n, n)

    def kern(b):
        return cached[b] if cached is not None else ev.head_kernel(*b)

    K_curr = np.zeros((n, n))
    kx_curr = np.zeros(n)
    chosen: list[GreedyStep] = []
    remaining = list(blocks)
    per = max(1, int(batch_bytes // (n * n * 8)))
    for _ in range(min(budget, len(blocks))):
        best = (-1.0, None, 0.0)
        for i0 in range(0, len(remaining), per):
            cand = remaining[i0:i0 + per]
            Kc = np.stack([K_curr + kern(b) for b in cand])            # (B, n, n)
            kx = np.stack([kx_curr + kxb[b] for b in cand])            # (B, n)
            lmax = _lam_max(Kc)
            rho = np.where(lmax > 0, c / np.where(lmax > 0, lmax, 1.0), 0.0)
            v = np.broadcast_to(r, kx.shape).copy()
            acc = np.zeros_like(v)
            for _t in range(int(T)):                                    # Q_T(K) r = ρ Σ_{t<T} (I − ρK)^t r
                acc += v
                v = v - rho[:, None] * np.einsum("bij,bj->bi", Kc, v)
            h = rho * np.einsum("bi,bi->b", kx, acc)
            j = int(np.argmax(h**2))
            if h[j] ** 2 > best[0]:
                best = (float(h[j] ** 2), cand[j], float(rho[j]))
        h2, b, rho_b = best
        chosen.append(GreedyStep(block=b, h2=h2, rho=rho_b))
        K_curr = K_curr + kern(b)
        kx_curr = kx_curr + kxb[b]
        remaining.remove(b)
    return chosen


def score_blocks(ev: PromptKernel, ridge: float | None = None, *, spectrum=None, posterior: NoisePosterior | None = None,
                 hutchinson_probes: int = 0, seed: int = 0, greedy_budget: int = 0, greedy_T: int = GREEDY_T,
                 greedy_c: float = GREEDY_C, top_k: int = 8) -> BlockScores:
    """Query-Aware, Trace, kernel share (and optionally Hutchinson and greedy) for every block.

    Args:
        ev: PromptKernel.
        ridge: λ⋆ in M = (K + λ⋆I)⁻¹; default: the posterior median of λ⋆ (module docstring).
        spectrum: a SpectrumReport of ev.K to reuse its eigendecomposition (optional).
        posterior: the §5.1 posterior of ev.K and ev.residuals, if already computed.
        hutchinson_probes: R > 0 also computes the Hutchinson trace estimate with R probes.
        greedy_budget: > 0 runs greedy Query-Aware for that many picks (needs a query).
        top_k: k of `top_k_frequency`.
    """
    if spectrum is not None:
        lam, U = spectrum.lam, spectrum.U
    else:
        lam, U = theory.eigh_psd(ev.K)
    if ridge is None:
        if posterior is None:
            posterior = noise_posterior(lam, U.T @ ev.residuals)
        ridge = float(posterior.lambda_star.median)
        source = "posterior median of λ⋆ = σ²/τ² (DESIGN §5.1)"
    else:
        source = "given"
    M = resolvent(lam, U, ridge)
    trace = ev.trace_scores(M)
    tr = ev.head_traces()
    total = float(np.trace(ev.K))
    share = tr / total if total > 0 else np.zeros_like(tr)
    qa = freq = None
    if ev.head_couplings is not None:
        qa = np.einsum("lhi,ij,lhj->lh", ev.head_couplings, M, ev.head_couplings)
        if posterior is not None:
            ct = ev.head_couplings.reshape(-1, ev.n) @ U
            freq = qa_over_posterior(ct, lam, posterior, top_k).reshape(qa.shape)
    labels = np.array([[ev.block_label((l, h)) for h in range(ev.n_blocks_per_layer)] for l in range(ev.n_layers)])
    out = BlockScores(labels=labels, ridge=float(ridge), ridge_source=source, trace=trace, share=share, query_aware=qa,
                      top_k=int(top_k), top_k_frequency=freq, posterior=posterior)
    if hutchinson_probes > 0:
        out.hutchinson, out.hutchinson_se = hutchinson_trace(ev, ridge, hutchinson_probes, seed)
    if greedy_budget > 0:
        if ev.head_couplings is None:
            out.greedy_note = "Greedy Query-Aware needs a query coupling; this prompt has none."
        else:
            out.greedy = greedy_query_aware(ev, greedy_budget, greedy_T, greedy_c)
    return out
