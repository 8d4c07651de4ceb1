"""Factorised per-block prompt kernels (DESIGN §2 "Linear layers factorise").

A linear block y = W a with per-position inputs a_p and output gradients b_p = ∂s/∂y_p has
features Σ_{p ∈ output i} b_p a_pᵀ, so its kernel is a segment-sum of a Hadamard product:

    K_ij = Σ_{p ∈ seg i} Σ_{q ∈ seg j} (a_p·a_q)(b_p·b_q).

A head of W_Q/W_K/W_V owns a slice of the *output* rows (slice b); a head of W_O owns a slice of
the *input* columns (slice a); an MLP matrix is one block. This module never needs the n × d
feature matrix Φ: it keeps per-layer factors and computes what the views need per head.

Two storage forms share one interface (`LayerFactors`):

* `RowFactors` — rows p (one per (output, token position) pair with a non-zero gradient), the
  "head side" H (N, D = n_heads·d_h) and the "other side" O (N, D'), a segment index seg (N,)
  mapping rows to outputs (None = identity, N = n), and optional query rows (Hx, Ox). For q/k/v
  and MLP: H = B (gradients), O = A (inputs); for o: H = A, O = B. Row products are blocked
  (`block_rows`) so an N × N Gram never has to exist in one piece.
* `FeatureFactors` — explicit per-output feature matrices F (n, P, Q) (the block gradient
  Σ_t b_{i,t} a_{i,t}ᵀ, possibly expressed in an orthonormal basis of the input row space), with
  the head split along axis 1 (output rows) or 2 (input columns), and the query's fx (P, Q).
  Used by the exact long-context route for k/v/o/MLP subspaces (DESIGN §2: positions are not
  independent there).
* `DiagFactors` — a norm gain or bias (DESIGN §11), one block per layer: per-output features
  F (n, d), f_i = Σ_{t ∈ seg i} b_{i,t} ⊙ x̂_t for γ (Σ_t b_{i,t} for β), K = F Fᵀ.

All results are float64 tensors on the factors' device. Shapes: n outputs, n_heads blocks.

Precision of the n × n Gram products (`RowFactors`): float64 factors (the exact tests' models)
are multiplied in float64 end to end. fp32 factors with at least `FP32_GRAM_MIN_ROWS` rows are
multiplied in fp32 (the factors' own precision: ~2× faster than float64 on CPU, a relative error
~1e-6, far under the ~1e-4 fp32 floor of the gradients themselves) and the n × n result is
accumulated in float64; smaller problems (the default 256 positions, few-shot prompts) stay in
float64, where it costs well under a second and keeps blocked and unblocked products identical
to round-off. Measured on SmolLM2 at n = 2,048 (2 CPU threads): one layer kernel 0.16 s in
float64 → 0.09 s in fp32, relative difference 5e-7.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch

from kernels import head_grams

DEFAULT_BLOCK_ROWS = 2048
#: fp32 factors with at least this many rows get fp32 Gram products (module docstring).
FP32_GRAM_MIN_ROWS = 512


class LayerFactors(Protocol):
    """What every per-layer factor store provides (all kernels n × n, float64)."""
    n: int
    n_heads: int

    def layer_kernel(self) -> torch.Tensor: ...                     # (n, n) = Σ_h K_h
    def head_kernels(self, heads: Sequence[int] | None = None) -> torch.Tensor: ...  # (h, n, n)
    def trace_scores(self, M: torch.Tensor) -> torch.Tensor: ...    # (n_heads,) tr(K_h M)
    def head_traces(self) -> torch.Tensor: ...                      # (n_heads,) tr(K_h)
    def query_couplings(self) -> torch.Tensor | None: ...           # (n_heads, n) k_x^(h)
    def quad_forms(self, Z: torch.Tensor, U: torch.Tensor) -> torch.Tensor: ...  # (n_heads, R)
    def weighted_gradient(self, w: torch.Tensor, head: int) -> torch.Tensor: ...
    def query_gradient(self, head: int) -> torch.Tensor | None: ...
    def nbytes(self) -> int: ...


def _segsum(X: torch.Tensor, seg: torch.Tensor | None, n: int, dim: int = 0) -> torch.Tensor:
    """Σ over rows (along `dim`) sharing a segment id: out[s] = Σ_{p: seg p = s} X[p]."""
    if seg is None:
        return X
    shape = list(X.shape)
    shape[dim] = n
    out = torch.zeros(shape, dtype=X.dtype, device=X.device)
    return out.index_add_(dim, seg, X)


def segment_sum(X: torch.Tensor, seg: torch.Tensor | None, n: int) -> torch.Tensor:
    """Rows (N, …) summed per output: out[s] = Σ_{p: seg p = s} X[p] (n, …); X itself when seg is None."""
    return _segsum(X, seg, n, 0)


def _seg_expand(M: torch.Tensor, seg_i: torch.Tensor | None, seg_j: torch.Tensor | None,
                rows: slice, cols: slice) -> torch.Tensor:
    """(Sᵀ M S)[rows, cols] = M[seg[rows]][:, seg[cols]] (plain slicing when seg is None)."""
    Mi = M[rows] if seg_i is None else M.index_select(0, seg_i[rows])
    return Mi[:, cols] if seg_j is None else Mi.index_select(1, seg_j[cols])


@dataclass
class RowFactors:
    """Row-form factors of one layer's block family (see module docstring).

    H: (N, n_heads·d_h) head side; O: (N, D') other side; seg: (N,) int64 output index per row
    or None (row p is output p); n: number of outputs; Hx (M, n_heads·d_h), Ox (M, D'): query rows
    (None when the prompt has no query). head_on_output: True when H holds output gradients b
    (q/k/v/MLP), False when H holds inputs a (o).
    """
    H: torch.Tensor
    O: torch.Tensor
    n_heads: int
    n: int
    seg: torch.Tensor | None = None
    Hx: torch.Tensor | None = None
    Ox: torch.Tensor | None = None
    head_on_output: bool = True
    block_rows: int = DEFAULT_BLOCK_ROWS
    _blocks: list[slice] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        N = self.H.shape[0]
        if self.O.shape[0] != N:
            raise ValueError("H and O must have the same number of rows")
        if self.H.shape[1] % self.n_heads:
            raise ValueError("H's width must be a multiple of n_heads")
        if self.seg is None and N != self.n:
            raise ValueError("without seg, rows must equal outputs")
        step = max(1, int(self.block_rows))
        self._blocks = [slice(i, min(N, i + step)) for i in range(0, N, step)] or [slice(0, 0)]

    @property
    def d_head(self) -> int:
        return self.H.shape[1] // self.n_heads

    def _h(self, X: torch.Tensor) -> torch.Tensor:
        return X.double()

    @property
    def _fp32_grams(self) -> bool:
        """Gram products in fp32 (module docstring): fp32 (or lower) factors, and on CPU at least
        `FP32_GRAM_MIN_ROWS` rows."""
        if self.H.dtype == torch.float64 or self.O.dtype == torch.float64:
            return False
        return self.H.is_cuda or self.H.shape[0] >= FP32_GRAM_MIN_ROWS

    def _g(self, X: torch.Tensor) -> torch.Tensor:
        """A factor slice as the Gram products take it: fp32 or float64 (`_fp32_grams`)."""
        return X.float() if self._fp32_grams else X.double()

    def _gram_in(self, X: torch.Tensor) -> torch.Tensor:
        """Factors as `kernels.head_grams` should get them: in fp32 when `_fp32_grams` (on CUDA the
        Triton Gram kernel then runs; the CPU reference multiplies in fp32), else float64 (the
        reference then accumulates in float64)."""
        return self._g(X)

    def _per_head(self, X: torch.Tensor) -> torch.Tensor:
        """(rows, D) → (rows, n_heads) by summing each head's columns."""
        return X.reshape(X.shape[0], self.n_heads, self.d_head).sum(-1)

    def layer_kernel(self) -> torch.Tensor:
        """Σ_h K_h = S((O Oᵀ) ⊙ (H Hᵀ))Sᵀ: the whole layer's block family (n, n)."""
        K = torch.zeros(self.n, self.n, dtype=torch.float64, device=self.H.device)
        return self.add_layer_kernel_to(K)

    def _sym_blocks(self) -> list[slice]:
        """Row blocks for the symmetric Gram loop: `_blocks`, split in halves when a single
        block holds ≥ 2·FP32_GRAM_MIN_ROWS rows (then 3 of 4 block products are computed)."""
        N = self.H.shape[0]
        if len(self._blocks) == 1 and N >= 2 * FP32_GRAM_MIN_ROWS:
            h = (N + 1) // 2
            return [slice(0, h), slice(h, N)]
        return self._blocks

    def add_layer_kernel_to(self, K: torch.Tensor) -> torch.Tensor:
        """K += Σ_h K_h in place (K: (n, n) float64); returns K. Blocks J ≥ I only (K is
        symmetric); block products in fp32 or float64 (`_fp32_grams`), accumulated in float64."""
        blocks = self._sym_blocks()
        for bi, I in enumerate(blocks):
            OI, HI = self._g(self.O[I]), self._g(self.H[I])
            for J in blocks[bi:]:
                X = OI @ self._g(self.O[J]).T
                X.mul_(HI @ self._g(self.H[J]).T)
                if J == I:              # BLAS need not return a bit-symmetric A Aᵀ (AMD EPYC: it does not);
                    X = 0.5 * (X + X.T)  # a + b = b + a exactly, so the diagonal block is made exactly symmetric
                if self.seg is None:
                    K[I, J] += X
                    if J != I:
                        K[J, I] += X.T
                else:
                    X = _segsum(_segsum(X.double(), self.seg[J], self.n, 1), self.seg[I], self.n, 0)
                    K += X
                    if J != I:
                        K += X.T
                del X
        return K

    def head_kernels(self, heads: Sequence[int] | None = None) -> torch.Tensor:
        """K_h = S((O Oᵀ) ⊙ (H_h H_hᵀ))Sᵀ for the chosen heads (all by default): (h, n, n).

        Uses `kernels.head_grams` for the Hadamard build of each row-block pair on the diagonal."""
        heads = list(range(self.n_heads)) if heads is None else list(heads)
        d = self.d_head
        cols = torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads]).to(self.H.device)
        Hs = self.H.index_select(1, cols)
        out = torch.zeros(len(heads), self.n, self.n, dtype=torch.float64, device=self.H.device)
        for bi, I in enumerate(self._blocks):
            for J in self._blocks[bi:]:                       # symmetric: blocks J ≥ I only
                if I == J:
                    X = head_grams(self._gram_in(self.O[I]), self._gram_in(Hs[I]), len(heads)).double()
                else:
                    Ga = self._g(self.O[I]) @ self._g(self.O[J]).T
                    hi = self._g(Hs[I]).reshape(-1, len(heads), d)
                    hj = self._g(Hs[J]).reshape(-1, len(heads), d)
                    X = (Ga.unsqueeze(0) * torch.einsum("ihd,jhd->hij", hi, hj)).double()
                if self.seg is None:
                    out[:, I, J] = X
                    if J != I:
                        out[:, J, I] = X.transpose(1, 2)
                else:
                    X = _segsum(_segsum(X, self.seg[J], self.n, 2), self.seg[I], self.n, 1)
                    out += X
                    if J != I:
                        out += X.transpose(1, 2)
                del X
        return out

    def trace_scores(self, M: torch.Tensor) -> torch.Tensor:
        """tr(K_h M) for every head, = Σ_pq (OOᵀ ⊙ SᵀMS)_pq (H_h H_hᵀ)_pq = tr(H_hᵀ W H_h).

        M: (n, n) symmetric. Returns (n_heads,). Cost O(N² (D + D')) per layer, no n×n per head."""
        M = M.to(torch.float64)
        out = torch.zeros(self.n_heads, dtype=torch.float64, device=self.H.device)
        for I in self._blocks:
            HI, GI = self._h(self.H[I]), self._g(self.O[I])
            WH = torch.zeros_like(HI)
            for J in self._blocks:
                W = (GI @ self._g(self.O[J]).T).double() * _seg_expand(M, self.seg, self.seg, I, J)
                WH += W @ self._h(self.H[J])
            out += self._per_head(HI * WH).sum(0)
        return out

    def head_traces(self) -> torch.Tensor:
        """tr(K_h) for every head: Σ_i Σ_{p,q ∈ seg i} (o_p·o_q)(h_p·h_q). (n_heads,)."""
        if self.seg is None:
            oo = (self._h(self.O) ** 2).sum(1, keepdim=True)
            return self._per_head(oo * self._h(self.H) ** 2).sum(0)
        return self.trace_scores(torch.eye(self.n, dtype=torch.float64, device=self.H.device))

    def query_couplings(self) -> torch.Tensor | None:
        """k_x^(h)_i = Σ_{p ∈ seg i} Σ_m (o_p·o_{x,m})(h_{h,p}·h_{h,x,m}): (n_heads, n), or None."""
        if self.Hx is None or self.Ox is None:
            return None
        Ox, Hx = self._h(self.Ox), self._h(self.Hx)
        parts = []
        for I in self._blocks:
            P = (self._h(self.O[I]) @ Ox.T) @ Hx
            parts.append(self._per_head(self._h(self.H[I]) * P))
        c = torch.cat(parts, 0)
        return _segsum(c, self.seg, self.n, 0).T.contiguous()

    def quad_forms(self, Z: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
        """z_rᵀ K_h u_r for every head and probe column r: (n_heads, R). Z, U: (n, R).

        Contracts Σ_{c'} [Oᵀ diag(z) H]_{c'c} [Oᵀ diag(u) H]_{c'c} over each head's columns c —
        cost O(R·N·D·D'), never an n × n kernel (Hutchinson, DESIGN §6)."""
        Z, U = Z.to(torch.float64), U.to(torch.float64)
        R = Z.shape[1]
        Dp, D = self.O.shape[1], self.H.shape[1]
        step = max(1, (1 << 24) // max(1, Dp * D))          # probes per batch: ≤ 16M entries in X
        out = torch.zeros(self.n_heads, R, dtype=torch.float64, device=self.H.device)
        for r0 in range(0, R, step):
            rs = slice(r0, min(R, r0 + step))
            Xz = torch.zeros(rs.stop - rs.start, Dp, D, dtype=torch.float64, device=self.H.device)
            Xu = torch.zeros_like(Xz)
            for I in self._blocks:
                if self.seg is None:
                    zi, ui = Z[I, rs], U[I, rs]
                else:
                    zi, ui = Z[:, rs].index_select(0, self.seg[I]), U[:, rs].index_select(0, self.seg[I])
                OI, HI = self._h(self.O[I]), self._h(self.H[I])
                Xz += torch.einsum("pa,pr,pb->rab", OI, zi, HI)
                Xu += torch.einsum("pa,pr,pb->rab", OI, ui, HI)
            out[:, rs] = (Xz * Xu).sum(1).reshape(-1, self.n_heads, self.d_head).sum(-1).T
        return out

    def weighted_gradient(self, w: torch.Tensor, head: int) -> torch.Tensor:
        """Σ_i w_i ∂s_i/∂W_head in the logical layout: (d_h, in) for q/k/v, (out, d_h) for o,
        (out, in) for an MLP block (head 0). w: (n,)."""
        d = self.d_head
        wr = w.to(torch.float64) if self.seg is None else w.to(torch.float64).index_select(0, self.seg)
        Hh = self._h(self.H[:, head * d:(head + 1) * d])
        O = self._h(self.O)
        if self.head_on_output:
            return Hh.T @ (wr[:, None] * O)
        return O.T @ (wr[:, None] * Hh)

    def query_gradient(self, head: int) -> torch.Tensor | None:
        """∂s_x/∂W_head in the logical layout (same shapes as `weighted_gradient`), or None."""
        if self.Hx is None or self.Ox is None:
            return None
        d = self.d_head
        Hh, O = self._h(self.Hx[:, head * d:(head + 1) * d]), self._h(self.Ox)
        return Hh.T @ O if self.head_on_output else O.T @ Hh

    def nbytes(self) -> int:
        ts = [self.H, self.O, self.seg, self.Hx, self.Ox]
        return int(sum(t.numel() * t.element_size() for t in ts if t is not None))


@dataclass
class FeatureFactors:
    """Explicit per-output features of one layer's block family (see module docstring).

    F: (n, P, Q) feature matrix of each output (float32/64); head_axis: 1 (heads split the P
    rows: q/k/v/MLP) or 2 (heads split the Q columns: o); fx: (P, Q) query feature or None;
    basis: (in, Q) orthonormal columns V such that the logical gradient is F_i Vᵀ (None when
    F is already in logical coordinates).
    """
    F: torch.Tensor
    n_heads: int
    head_axis: int = 1
    fx: torch.Tensor | None = None
    basis: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return self.F.shape[0]

    @property
    def d_head(self) -> int:
        return self.F.shape[self.head_axis] // self.n_heads

    def _head(self, X: torch.Tensor, h: int) -> torch.Tensor:
        """Head h's slice of (…, P, Q) features, flattened to (…, d_h·Q or P·d_h)."""
        d = self.d_head
        sl = X[..., h * d:(h + 1) * d, :] if self.head_axis == 1 else X[..., :, h * d:(h + 1) * d]
        return sl.reshape(*X.shape[:-2], -1).double()

    def _flat(self) -> torch.Tensor:
        return self.F.reshape(self.n, -1).double()

    def layer_kernel(self) -> torch.Tensor:
        Fl = self._flat()
        return Fl @ Fl.T

    def head_kernels(self, heads: Sequence[int] | None = None) -> torch.Tensor:
        heads = list(range(self.n_heads)) if heads is None else list(heads)
        return torch.stack([self._head(self.F, h) @ self._head(self.F, h).T for h in heads])

    def trace_scores(self, M: torch.Tensor) -> torch.Tensor:
        M = M.to(torch.float64)
        return torch.stack([(self._head(self.F, h) * (M @ self._head(self.F, h))).sum()
                            for h in range(self.n_heads)])

    def head_traces(self) -> torch.Tensor:
        return torch.stack([(self._head(self.F, h) ** 2).sum() for h in range(self.n_heads)])

    def query_couplings(self) -> torch.Tensor | None:
        if self.fx is None:
            return None
        return torch.stack([self._head(self.F, h) @ self._head(self.fx, h) for h in range(self.n_heads)])

    def quad_forms(self, Z: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
        Z, U = Z.to(torch.float64), U.to(torch.float64)
        rows = []
        for h in range(self.n_heads):
            Fh = self._head(self.F, h)
            rows.append(((Fh.T @ Z) * (Fh.T @ U)).sum(0))
        return torch.stack(rows)

    def _logical(self, G: torch.Tensor, head: int) -> torch.Tensor:
        G = G if self.basis is None else G @ self.basis.double().T
        d = self.d_head
        return G[head * d:(head + 1) * d] if self.head_axis == 1 else G[:, head * d:(head + 1) * d]

    def weighted_gradient(self, w: torch.Tensor, head: int) -> torch.Tensor:
        G = torch.einsum("i,ipq->pq", w.to(torch.float64), self.F.double())
        return self._logical(G, head)

    def query_gradient(self, head: int) -> torch.Tensor | None:
        return None if self.fx is None else self._logical(self.fx.double(), head)

    def nbytes(self) -> int:
        ts = [self.F, self.fx, self.basis]
        return int(sum(t.numel() * t.element_size() for t in ts if t is not None))


@dataclass
class DiagFactors:
    """Features of a norm gain or bias of one layer (DESIGN §11), one block (n_heads = 1).

    F: (n, d) per-output features — f_i = Σ_{t ∈ output i} b_{i,t} ⊙ x̂_{i,t} for a gain γ
    (y = γ ⊙ x̂ + β, b = ∂s/∂y), f_i = Σ_t b_{i,t} for a bias β; fx: (d,) the query's feature or
    None. K = F Fᵀ, k_x = F fx. Gradients are in the parameter's own layout, (d,)."""
    F: torch.Tensor
    fx: torch.Tensor | None = None
    n_heads: int = 1

    @property
    def n(self) -> int:
        return self.F.shape[0]

    def _f(self) -> torch.Tensor:
        return self.F.double()

    def _heads(self, heads: Sequence[int] | None) -> list[int]:
        heads = [0] if heads is None else list(heads)
        if any(h != 0 for h in heads):
            raise IndexError("a norm target has one block per layer (head 0)")
        return heads

    def layer_kernel(self) -> torch.Tensor:
        """K = F Fᵀ: (n, n) float64."""
        Fd = self._f()
        return Fd @ Fd.T

    def head_kernels(self, heads: Sequence[int] | None = None) -> torch.Tensor:
        """(h, n, n): the layer kernel once per requested head (only head 0 exists)."""
        K = self.layer_kernel()
        return torch.stack([K for _ in self._heads(heads)])

    def trace_scores(self, M: torch.Tensor) -> torch.Tensor:
        """tr(K M) = Σ (F ⊙ M F): (1,)."""
        Fd = self._f()
        return (Fd * (M.to(torch.float64) @ Fd)).sum().reshape(1)

    def head_traces(self) -> torch.Tensor:
        """tr(K) = ‖F‖²: (1,)."""
        return (self._f() ** 2).sum().reshape(1)

    def query_couplings(self) -> torch.Tensor | None:
        """k_x = F fx: (1, n), or None without a query."""
        return None if self.fx is None else (self._f() @ self.fx.double())[None]

    def quad_forms(self, Z: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
        """z_rᵀ K u_r for every column r: (1, R). Z, U: (n, R)."""
        Fd = self._f()
        return ((Fd.T @ Z.to(torch.float64)) * (Fd.T @ U.to(torch.float64))).sum(0)[None]

    def weighted_gradient(self, w: torch.Tensor, head: int = 0) -> torch.Tensor:
        """Σ_i w_i ∂s_i/∂γ (or ∂β): (d,). w: (n,)."""
        self._heads([head])
        return w.to(torch.float64) @ self._f()

    def query_gradient(self, head: int = 0) -> torch.Tensor | None:
        """∂s_x/∂γ (or ∂β): (d,), or None."""
        self._heads([head])
        return None if self.fx is None else self.fx.double()

    def nbytes(self) -> int:
        ts = [self.F, self.fx]
        return int(sum(t.numel() * t.element_size() for t in ts if t is not None))
