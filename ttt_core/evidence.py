"""Prompt evidence on a real transformer: supervised outputs, residuals, per-block kernels and the
query coupling for one prompt and one update subspace (DESIGN §2, §7; paper A.1, A.2, A.7).

Scalar outputs (what the kernel is a kernel *of*)
-------------------------------------------------
* Few-shot (DESIGN §7.1): s_i = Σ_y v(y) p(y), the expected label value under the softmax
  restricted to the label tokens, at the last position of leave-one-out prompt i (demonstration i
  removed, x_i as the query). r_i = v(y_i) − s_i. The query output s_x is the same scalar on the
  full prompt; its error is (s_x − v(query_y))² when the true label is known.
  Label token = first token of ``label_prefix() + y``. Whitespace-only leading tokens that *every*
  label shares (SmolLM2 writes " 5" as [" ", "5"]) are appended to every prompt instead, so the
  label token is the first token that can differ; two labels sharing it is an error.
* Long context / free text (DESIGN §7.2): supervised positions are the next-token predictions
  inside the context, capped to the last ``max_positions`` positions (default 256); the scalar is
  the probability p of the observed next token with target 1 and residual 1 − p. This puts free
  text in the paper's squared-loss frame (the kernel regime needs a scalar output per position).
  Query: with a question *and* an answer, s_x = probability of the answer's first token after
  "…Answer:" (leading whitespace tokens of " answer" are appended to the query, as for labels);
  error = 1 − s_x, and the NLL −log s_x is reported too. Without an answer there is no query
  target: k_x is None and ``query_note`` says why.

Routes (how the per-position gradients b are obtained)
------------------------------------------------------
* ``loo-exact`` (few-shot, every subspace): the n LOO prompts and the full prompt form one
  right-padded batch (causal attention makes right padding harmless; each prompt's last real
  position is gathered). Samples are independent, so ONE backward of Σ_i s_i + s_x gives every
  b_{i,t} = ∂s_i/∂y_{i,t} at every position t exactly (adapter output probes), and the kernel is
  K_ij = Σ_{t,t'} (a_{i,t}·a_{j,t'})(b_{i,t}·b_{j,t'}) (DESIGN §2), stored as `RowFactors`.
* ``qttt-frozen-kv`` (long context, W_Q): keys/values held at their unadapted values, so positions
  are independent and one backward of Σ_i s_i (+ s_x) gives every b_i exactly; K^(h) =
  (AAᵀ) ⊙ (B_h B_hᵀ) is the *qTTT* kernel (the kernel of the update qTTT actually makes), not the
  exact-model W_Q kernel. When the rows fit one chunk (``row_chunk``, default 384): a no-grad
  prefill of the tokens before the first row, then one forward of the rows with their own K/V
  detached (`attention.detached_kv`) and one backward. Longer spans: prefill the full text once, then
  run the rows in chunks of ``row_chunk`` with `forward_with_frozen_kv`, so memory does not grow
  with the context length.
* ``exact-per-output`` (long context, W_K/W_V/W_O/MLP, or W_Q with ``qttt=False``): positions
  are not independent (s_i depends on the block at every t ≤ i), so each output needs its own
  backward. The full sequence is replicated ``chunk`` times in a batch and each copy back-propagates
  one output (one backward per ``chunk`` outputs). Per-output features G_i = B_iᵀ A (rows
  compressed to an orthonormal basis of the input row space when the sequence is shorter than the
  input width) are stored as `FeatureFactors`. Cost: ⌈(n+1)/chunk⌉ forward+backward passes over
  ``chunk`` copies of the sequence, times the number of layer groups needed to keep the features
  under ``feature_budget_bytes`` (n·out·min(N, in)·4 bytes per layer) — far more expensive than
  the other two routes. The batch holds at most ``tokens_per_batch`` tokens (chunk is lowered
  for long sequences: a 2048-token context back-propagates one output at a time).

Memory: per-layer factors are kept, never all per-head n × n kernels (`PromptEvidence.head_kernel`
materialises one on demand).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ttt_core.attention import FrozenKV, detached_kv, forward_with_frozen_kv, record_attention
from ttt_core.kernel_factors import FeatureFactors, LayerFactors, RowFactors
from ttt_core.prompts import FewShotPrompt, LongContextPrompt

SUBSPACES: dict[str, str] = {
    "q": "W_Q per head (qTTT)",
    "k": "W_K per kv head",
    "v": "W_V per kv head (paper)",
    "o": "W_O per head",
    "mlp_up": "MLP up, one block per layer",
    "mlp_down": "MLP down, one block per layer",
}
DEFAULT_MAX_POSITIONS = 256
Block = tuple[int, int]  # (layer, head); head 0 for MLP blocks
Progress = Callable[[float, str], None] | None


class EvidenceError(ValueError):
    """The evidence cannot be computed for this prompt; the message says why, for the UI."""


# --------------------------------------------------------------------------------------------
# scalar outputs
# --------------------------------------------------------------------------------------------


def _is_space(tok: Any, tid: int) -> bool:
    return tok.decode([tid]).strip() == ""


@dataclass
class FewShotInputs:
    """Token ids and targets of the few-shot scalar outputs (DESIGN §7.1).

    seqs: n LOO prompts then the full prompt, as token-id lists (lead tokens appended);
    label_ids (k,), label_values (k,) with labels (k,) names; targets (n,) v(y_i);
    query_target v(query_y) or None; lead: shared whitespace token ids appended to every prompt."""

    seqs: list[list[int]]
    label_ids: list[int]
    label_values: list[float]
    labels: list[str]
    targets: np.ndarray
    query_target: float | None
    lead: list[int]


def fewshot_inputs(lm: Any, prompt: FewShotPrompt) -> FewShotInputs:
    """Tokenise the LOO prompts and the full prompt and resolve the label tokens (see module doc).

    Raises EvidenceError when two labels share their first distinguishing token or n < 2."""
    tok = lm.tokenizer
    if prompt.n < 2:
        raise EvidenceError("A few-shot prompt needs at least 2 demonstrations for leave-one-out residuals.")
    labels = prompt.labels
    values = prompt.label_values()
    seqs = [tok(prompt.label_prefix() + y, add_special_tokens=False).input_ids for y in labels]
    if any(len(s) == 0 for s in seqs):
        raise EvidenceError("A label tokenises to nothing.")
    lead: list[int] = []
    while (all(len(s) > len(lead) + 1 for s in seqs) and len({s[len(lead)] for s in seqs}) == 1
           and _is_space(tok, seqs[0][len(lead)])):
        lead.append(seqs[0][len(lead)])
    first = [s[len(lead)] for s in seqs]
    seen: dict[int, str] = {}
    for y, t in zip(labels, first):
        if t in seen:
            raise EvidenceError(
                f"Labels {seen[t]!r} and {y!r} share their first token {tok.decode([t])!r}: the "
                "restricted softmax over label tokens cannot tell them apart. Use labels that start "
                "with different tokens (e.g. single words or digits).")
        seen[t] = y
    texts = prompt.loo_prompts() + [prompt.render()]
    ids = [list(tok(t).input_ids) + lead for t in texts]
    targets = np.array([values[y] for _, y in prompt.demos], dtype=float)
    qt = prompt.target_value(prompt.query_y)
    return FewShotInputs(ids, first, [values[y] for y in labels], labels, targets, qt, lead)


@dataclass
class LongContextInputs:
    """Token ids and targets of the long-context outputs (DESIGN §7.2).

    ids: full token ids (context then question tokens); n_context: context length in tokens;
    positions: supervised positions p (output at p predicts ids[p+1]), ascending; targets: ids[p+1];
    query_position / query_token: the answer's first token after the question (None without an
    answer); query_note: why there is no query when there is none."""

    ids: list[int]
    n_context: int
    positions: list[int]
    targets: list[int]
    query_position: int | None
    query_token: int | None
    query_note: str | None


def longcontext_inputs(lm: Any, prompt: LongContextPrompt, max_positions: int = DEFAULT_MAX_POSITIONS) -> LongContextInputs:
    """Tokenise context (+ question) and choose the last `max_positions` supervised positions."""
    tok = lm.tokenizer
    ctx = list(tok(prompt.context).input_ids)
    if len(ctx) < 2:
        raise EvidenceError("No supervised positions: the context has fewer than 2 tokens.")
    q_ids: list[int] = []
    qpos = qtok = None
    note = None
    if prompt.question is None:
        note = "Free text without a question: there is no query output, so k_x (query alignment) is unavailable."
    else:
        q_ids = list(tok(prompt.query_text(), add_special_tokens=False).input_ids)
        if not prompt.answer:
            note = ("The question has no 'Answer:' line: the query output (probability of the answer's first "
                    "token) has no target, so k_x is unavailable.")
        else:
            ans = list(tok(" " + prompt.answer.strip(), add_special_tokens=False).input_ids)
            k = 0
            while k < len(ans) - 1 and _is_space(tok, ans[k]):
                k += 1
            q_ids += ans[:k]
            qtok = ans[k]
    ids = ctx + q_ids
    if qtok is not None:
        qpos = len(ids) - 1
    m = max(1, int(max_positions))
    positions = list(range(max(0, len(ctx) - 1 - m), len(ctx) - 1))
    return LongContextInputs(ids, len(ctx), positions, [ctx[p + 1] for p in positions], qpos, qtok, note)


def fewshot_scalar(logits: torch.Tensor, label_ids: Sequence[int], label_values: Sequence[float]) -> torch.Tensor:
    """s = Σ_y v(y) softmax(logits[label_ids])_y. logits (..., V) → (...)."""
    idx = torch.tensor(list(label_ids), device=logits.device)
    logits = _upcast(logits)
    vals = torch.tensor(list(label_values), dtype=logits.dtype, device=logits.device)
    p = torch.softmax(logits.index_select(-1, idx), dim=-1)
    return p @ vals


def token_prob(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """softmax(logits)[target]: logits (B, V), targets (B,) → (B,)."""
    return torch.log_softmax(_upcast(logits), -1).gather(-1, targets[:, None]).squeeze(-1).exp()


def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


# --------------------------------------------------------------------------------------------
# result
# --------------------------------------------------------------------------------------------


@dataclass
class QueryOutcome:
    """Prediction at the query: value s_x, target, error ((s_x − v)² few-shot, 1 − p long
    context), NLL (long context) and a label saying what is predicted."""

    value: float
    target: float | None
    error: float | None
    nll: float | None
    label: str


@dataclass
class PromptEvidence:
    """Everything the spectrum, steps and heads views need for one prompt and subspace.

    values/targets/residuals: (n,) float64 (r = target − value); K: (n, n) full kernel Σ_b K^(b);
    head_couplings: (L, H, n) k_x^(b) per block or None; k_x: (n,) = Σ_b k_x^(b) or None;
    factors[l]: per-layer factor store (`kernel_factors`); H blocks per layer (heads of the
    subspace, 1 for MLP); output_labels: text per supervised output; tokens: decoded tokens of the
    full prompt (query prompt for few-shot), ids: their ids."""

    prompt_kind: str
    subspace: str
    route: str
    route_note: str
    model_name: str
    n_layers: int
    n_blocks_per_layer: int
    values: np.ndarray
    targets: np.ndarray
    residuals: np.ndarray
    output_labels: list[str]
    query: QueryOutcome | None
    query_note: str | None
    factors: list[LayerFactors]
    K: np.ndarray
    head_couplings: np.ndarray | None
    k_x: np.ndarray | None
    tokens: list[str]
    ids: list[int]
    timings: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.values.shape[0])

    def blocks(self) -> list[Block]:
        """All blocks (layer, head) of the subspace, layer-major."""
        return [(l, h) for l in range(self.n_layers) for h in range(self.n_blocks_per_layer)]

    def block_label(self, block: Block) -> str:
        l, h = block
        return f"L{l} {self.subspace}" if self.subspace.startswith("mlp") else f"L{l}.{self.subspace}H{h}"

    def head_kernel(self, layer: int, head: int) -> np.ndarray:
        """K^(b) of one block, materialised on demand: (n, n)."""
        return self.factors[layer].head_kernels([head])[0].cpu().numpy()

    def layer_kernel(self, layer: int) -> np.ndarray:
        """Σ over the layer's blocks: (n, n)."""
        return self.factors[layer].layer_kernel().cpu().numpy()

    def head_traces(self) -> np.ndarray:
        """tr(K^(b)) for every block: (L, H)."""
        return np.stack([f.head_traces().cpu().numpy() for f in self.factors])

    def trace_scores(self, M: np.ndarray) -> np.ndarray:
        """tr(K^(b) M) for every block (M symmetric (n, n)): (L, H)."""
        Mt = torch.as_tensor(M, dtype=torch.float64)
        return np.stack([f.trace_scores(Mt.to(_dev(f))).cpu().numpy() for f in self.factors])

    def quad_forms(self, Z: np.ndarray, U: np.ndarray) -> np.ndarray:
        """z_rᵀ K^(b) u_r for every block and column r: (L, H, R)."""
        Zt, Ut = torch.as_tensor(Z, dtype=torch.float64), torch.as_tensor(U, dtype=torch.float64)
        return np.stack([f.quad_forms(Zt.to(_dev(f)), Ut.to(_dev(f))).cpu().numpy() for f in self.factors])


def _dev(f: LayerFactors) -> torch.device:
    return f.H.device if isinstance(f, RowFactors) else f.F.device


# --------------------------------------------------------------------------------------------
# gradient collection
# --------------------------------------------------------------------------------------------


def _store(t: torch.Tensor) -> torch.Tensor:
    """Factor storage dtype: fp64 stays fp64 (exact tests), everything else becomes fp32."""
    t = t.detach()
    return t if t.dtype == torch.float64 else t.float()


def _keys(lm: Any, kind: str, layers: Sequence[int] | None = None) -> list[tuple[int, str]]:
    layers = range(lm.adapter.n_layers) if layers is None else layers
    return [(l, kind) for l in layers]


def _blocks_per_layer(lm: Any, kind: str) -> int:
    return lm.adapter.heads_of(kind) or 1


def _probes(lm: Any, keys: list, batch: int, length: int) -> dict:
    return {k: torch.zeros(batch, length, lm.adapter.spec(*k).out_features, device=lm.device,
                           dtype=lm.dtype, requires_grad=True) for k in keys}


def _row_factors(kind: str, A: torch.Tensor, B: torch.Tensor, n_heads: int, n: int,
                 seg: torch.Tensor | None, Ax: torch.Tensor | None, Bx: torch.Tensor | None) -> RowFactors:
    """Assign head/other sides: q/k/v/MLP heads slice B (outputs), o heads slice A (inputs)."""
    if kind == "o":
        return RowFactors(H=A, O=B, n_heads=n_heads, n=n, seg=seg, Hx=Ax, Ox=Bx, head_on_output=False)
    return RowFactors(H=B, O=A, n_heads=n_heads, n=n, seg=seg, Hx=Bx, Ox=Ax, head_on_output=True)


def _fewshot_evidence(lm: Any, prompt: FewShotPrompt, kind: str, progress: Progress) -> dict:
    fs = fewshot_inputs(lm, prompt)
    n = prompt.n
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    lengths = [len(s) for s in fs.seqs]
    Lmax = max(lengths)
    ids = torch.full((n + 1, Lmax), int(pad), dtype=torch.long, device=lm.device)
    for i, s in enumerate(fs.seqs):
        ids[i, :len(s)] = torch.tensor(s)
    last = torch.tensor(lengths, device=lm.device) - 1
    keys = _keys(lm, kind)
    probes = _probes(lm, keys, n + 1, Lmax)
    _report(progress, 0.1, f"One batched forward/backward over {n} leave-one-out prompts + the query prompt")
    with lm.adapter.apply(probes=probes, capture=set(keys)) as st:
        mask = (torch.arange(Lmax, device=lm.device)[None, :] <= last[:, None]).long()
        out = lm.model(input_ids=ids, attention_mask=mask, logits_to_keep=last[:, None])
        s = fewshot_scalar(out.logits[:, 0], fs.label_ids, fs.label_values)
        grads = torch.autograd.grad(s.sum(), [probes[k] for k in keys])
    s = s.detach().double().cpu().numpy()
    seg = torch.cat([torch.full((lengths[i],), i, dtype=torch.long) for i in range(n)]).to(lm.device)
    H = _blocks_per_layer(lm, kind)
    factors = []
    for k, g in zip(keys, grads):
        a = st.capture_in[k].detach()
        A = _store(torch.cat([a[i, :lengths[i]] for i in range(n)]))
        B = _store(torch.cat([g[i, :lengths[i]] for i in range(n)]))
        Ax, Bx = _store(a[n, :lengths[n]]), _store(g[n, :lengths[n]])
        factors.append(_row_factors(kind, A, B, H, n, seg, Ax, Bx))
    values = s[:n]
    qv = float(s[n])
    qt = fs.query_target
    query = QueryOutcome(value=qv, target=qt, error=None if qt is None else (qv - qt) ** 2, nll=None,
                         label=f"E[label value | {prompt.query_x!r}]")
    note = None if qt is not None else "No '# answer:' line: the query error is unknown (k_x is still computed)."
    tok = lm.tokenizer
    full = fs.seqs[-1]
    return dict(route="loo-exact",
                route_note="Exact autograd through each leave-one-out prompt (one batched backward).",
                values=values, targets=fs.targets, factors=factors, query=query, query_note=note,
                output_labels=[f"{x} → {y}" for x, y in prompt.demos], has_query=True,
                tokens=[tok.decode([t]) for t in full], ids=full)


@torch.no_grad()
def _prefill_cache(model: Any, ids: torch.Tensor) -> FrozenKV:
    """Per-layer K/V of one forward over `ids` (as `attention.prefill`, but keeping only the last
    position's logits: a 2048-token prefill would otherwise hold 2048 × vocab floats)."""
    cache = model(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values
    return FrozenKV(keys=[layer.keys for layer in cache.layers], values=[layer.values for layer in cache.layers])


def _frozen_q_single_pass(lm: Any, li: LongContextInputs, wanted: list[int], targets: list[int],
                          progress: Progress) -> tuple[dict, dict, torch.Tensor]:
    """All rows in one pass: a no-grad prefill of the tokens before the first row, then one forward
    of the rows with their own keys/values detached (`attention.detached_kv`) and one backward.
    Same features as the frozen-cache route (the rows' K/V are the values a prefill would cache),
    without prefilling the rows first. Returns ({key: A rows}, {key: B rows}, s)."""
    ids = torch.tensor(li.ids, device=lm.device)[None]
    start, stop = wanted[0], wanted[-1] + 1
    cache = None
    if start > 0:
        _report(progress, 0.05, f"Prefill of the {start} tokens before the supervised rows")
        with torch.no_grad():
            cache = lm.model(input_ids=ids[:, :start], use_cache=True, logits_to_keep=1).past_key_values
    keys = _keys(lm, "q")
    rows = torch.tensor([p - start for p in wanted], dtype=torch.long, device=lm.device)
    tg = torch.tensor(targets, dtype=torch.long, device=lm.device)
    _report(progress, 0.3, f"Rows {start}…{stop - 1}: one forward (keys/values detached) + one backward")
    probes = _probes(lm, keys, 1, stop - start)
    with detached_kv(), lm.adapter.apply(probes=probes, capture=set(keys)) as st:
        out = lm.model(input_ids=ids[:, start:stop], past_key_values=cache, use_cache=cache is not None,
                       logits_to_keep=rows)
        s = token_prob(out.logits[0], tg)
        grads = torch.autograd.grad(s.sum(), [probes[k] for k in keys])
    A = {k: _store(st.capture_in[k][0].index_select(0, rows)) for k in keys}
    B = {k: _store(g[0].index_select(0, rows)) for k, g in zip(keys, grads)}
    return A, B, s.detach()


def _frozen_q_evidence(lm: Any, li: LongContextInputs, row_chunk: int, progress: Progress) -> dict:
    wanted = list(li.positions) + ([li.query_position] if li.query_position is not None else [])
    targets = list(li.targets) + ([li.query_token] if li.query_token is not None else [])
    if wanted[-1] + 1 - wanted[0] <= row_chunk:
        A1, B1, s1 = _frozen_q_single_pass(lm, li, wanted, targets, progress)
        return _frozen_q_result(lm, li, {k: [a] for k, a in A1.items()}, {k: [b] for k, b in B1.items()}, [s1])
    ids = torch.tensor(li.ids, device=lm.device)[None]
    _report(progress, 0.05, f"Prefill of {len(li.ids)} tokens (frozen keys/values)")
    cache = _prefill_cache(lm.model, ids)
    keys = _keys(lm, "q")
    start, stop = wanted[0], wanted[-1] + 1
    A_parts: dict = {k: [] for k in keys}
    B_parts: dict = {k: [] for k in keys}
    vals: list[torch.Tensor] = []
    chunks = list(range(start, stop, row_chunk))
    for ci, r0 in enumerate(chunks):
        r1 = min(stop, r0 + row_chunk)
        sel = [j for j, p in enumerate(wanted) if r0 <= p < r1]
        if not sel:
            continue
        rows = torch.tensor([wanted[j] - r0 for j in sel], dtype=torch.long, device=lm.device)
        tg = torch.tensor([targets[j] for j in sel], dtype=torch.long, device=lm.device)
        _report(progress, 0.1 + 0.8 * ci / len(chunks), f"qTTT rows {r0}…{r1 - 1}: forward with frozen K/V + one backward")
        probes = _probes(lm, keys, 1, r1 - r0)
        with lm.adapter.apply(probes=probes, capture=set(keys)) as st:
            out = forward_with_frozen_kv(lm.model, ids[:, r0:r1], cache, r0, logits_to_keep=rows)
            s = token_prob(out.logits[0], tg)
            grads = torch.autograd.grad(s.sum(), [probes[k] for k in keys])
        vals.append(s.detach())
        for k, g in zip(keys, grads):
            A_parts[k].append(_store(st.capture_in[k][0].index_select(0, rows)))
            B_parts[k].append(_store(g[0].index_select(0, rows)))
    return _frozen_q_result(lm, li, A_parts, B_parts, vals)


def _frozen_q_result(lm: Any, li: LongContextInputs, A_parts: dict, B_parts: dict, vals: list) -> dict:
    keys = list(A_parts)
    s_all = torch.cat(vals).double().cpu().numpy()
    n = len(li.positions)
    H = _blocks_per_layer(lm, "q")
    factors = []
    for k in keys:
        A, B = torch.cat(A_parts[k]), torch.cat(B_parts[k])
        Ax = A[n:] if li.query_position is not None else None
        Bx = B[n:] if li.query_position is not None else None
        factors.append(_row_factors("q", A[:n], B[:n], H, n, None, Ax, Bx))
    return dict(route="qttt-frozen-kv",
                route_note=("qTTT kernel: keys/values held at their unadapted (prefill) values, so each "
                            "position's W_Q features come from its own row (one backward for all positions)."),
                values=s_all[:n], factors=factors, qvalue=s_all[n] if li.query_position is not None else None)


def _exact_long_evidence(lm: Any, li: LongContextInputs, kind: str, chunk: int, budget: int,
                         progress: Progress, tokens_per_batch: int = 2048) -> dict:
    N = len(li.ids)
    chunk = max(1, min(int(chunk), int(tokens_per_batch) // max(N, 1)))   # bound activation memory
    ids = torch.tensor(li.ids, device=lm.device)[None]
    outs = list(li.positions) + ([li.query_position] if li.query_position is not None else [])
    tgts = list(li.targets) + ([li.query_token] if li.query_token is not None else [])
    n_out = len(outs)
    a = lm.adapter
    spec0 = a.spec(0, kind)
    q_width = spec0.in_features if kind == "o" else min(N, spec0.in_features)
    per_layer = n_out * spec0.out_features * q_width * 4
    group = max(1, int(budget // max(per_layer, 1)))
    layer_groups = [list(range(i, min(a.n_layers, i + group))) for i in range(0, a.n_layers, group)]
    H = _blocks_per_layer(lm, kind)
    F: dict[int, torch.Tensor] = {}
    basis: dict[int, torch.Tensor | None] = {}
    vals = torch.zeros(n_out, dtype=torch.float64)
    total = len(layer_groups) * math.ceil(n_out / chunk)
    done = 0
    for gi, layers in enumerate(layer_groups):
        keys = _keys(lm, kind, layers)
        for c0 in range(0, n_out, chunk):
            sel = list(range(c0, min(n_out, c0 + chunk)))
            C = len(sel)
            _report(progress, 0.05 + 0.9 * done / total,
                    f"Exact per-output backward: outputs {c0}…{c0 + C - 1} of {n_out}, layers {layers[0]}…{layers[-1]}")
            done += 1
            probes = _probes(lm, keys, C, N)
            pos = torch.tensor([outs[j] for j in sel], device=lm.device)
            with lm.adapter.apply(probes=probes, capture=set(keys)) as st:
                out = lm.model(input_ids=ids.expand(C, N), logits_to_keep=pos[:, None])
                s = token_prob(out.logits[:, 0], torch.tensor([tgts[j] for j in sel], device=lm.device))
                grads = torch.autograd.grad(s.sum(), [probes[k] for k in keys])
            if gi == 0:
                vals[sel] = s.detach().double().cpu()
            for (l, _), g in zip(keys, grads):
                A = st.capture_in[(l, kind)].detach()[0].double()          # (N, in)
                if l not in basis:
                    if kind != "o" and N < A.shape[1]:
                        _, _, Vh = torch.linalg.svd(A, full_matrices=False)  # A = U S Vᵀ, V (in, N)
                        basis[l] = Vh.T.contiguous()
                    else:
                        basis[l] = None
                    F[l] = torch.zeros(n_out, spec0.out_features, q_width, device=lm.device,
                                       dtype=torch.float64 if lm.dtype == torch.float64 else torch.float32)
                AV = A if basis[l] is None else A @ basis[l]
                F[l][sel] = torch.einsum("cto,tq->coq", g.double(), AV).to(F[l].dtype)   # G_i = B_iᵀ A V
    n = len(li.positions)
    factors = []
    for l in range(a.n_layers):
        Fl = F.pop(l)
        fx = Fl[n] if li.query_position is not None else None
        V = basis[l]
        factors.append(FeatureFactors(F=Fl[:n].clone(), n_heads=H, head_axis=2 if kind == "o" else 1,
                                      fx=None if fx is None else fx.clone(),
                                      basis=V))
    v = vals.numpy()
    return dict(route="exact-per-output",
                route_note=(f"Exact autograd: one backward per output ({math.ceil(n_out / chunk)} batched passes of "
                            f"{chunk} sequence copies × {len(layer_groups)} layer group(s))."),
                values=v[:n], factors=factors, qvalue=v[n] if li.query_position is not None else None)


def _report(progress: Progress, frac: float, text: str) -> None:
    if progress is not None:
        progress(min(max(frac, 0.0), 1.0), text)


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------


def compute_evidence(
    lm: Any,
    prompt: FewShotPrompt | LongContextPrompt,
    subspace: str = "q",
    *,
    max_positions: int = DEFAULT_MAX_POSITIONS,
    qttt: bool = True,
    chunk: int = 8,
    row_chunk: int = 384,
    feature_budget_bytes: int = 1 << 30,
    progress: Progress = None,
) -> PromptEvidence:
    """Supervised outputs, residuals, factorised per-block kernels and query couplings.

    Args:
        lm: LoadedModel (never mutated; gradients come from adapter output probes).
        prompt: FewShotPrompt or LongContextPrompt.
        subspace: "q" (default, qTTT), "k", "v", "o" (per head) or "mlp_up"/"mlp_down" (per layer).
        max_positions: long context: keep the last this-many supervised positions.
        qttt: long context + "q": use the frozen-KV qTTT kernel (default) instead of the exact
            per-output route.
        chunk: outputs per batched backward in the exact long-context route.
        row_chunk: rows per forward in the frozen-KV route.
        feature_budget_bytes: memory for per-output features in the exact long-context route.
        progress: optional callback(fraction, text).
    Returns:
        PromptEvidence with K = Σ_b K^(b) (n, n), per-block couplings k_x^(b) (L, H, n) or None.
    Raises:
        EvidenceError: unknown subspace, labels sharing a first token, no supervised positions.
    """
    if subspace not in SUBSPACES:
        raise EvidenceError(f"Unknown subspace {subspace!r}; choose one of {list(SUBSPACES)}.")
    t0 = time.perf_counter()
    tok = lm.tokenizer
    if isinstance(prompt, FewShotPrompt):
        d = _fewshot_evidence(lm, prompt, subspace, progress)
        kind = "few_shot"
        targets = d["targets"]
    elif isinstance(prompt, LongContextPrompt):
        li = longcontext_inputs(lm, prompt, max_positions)
        if subspace == "q" and qttt:
            d = _frozen_q_evidence(lm, li, row_chunk, progress)
        else:
            d = _exact_long_evidence(lm, li, subspace, chunk, feature_budget_bytes, progress)
        kind = "long_context"
        targets = np.ones(len(li.positions))
        qv = d.pop("qvalue")
        d["query"] = None if qv is None else QueryOutcome(
            value=float(qv), target=1.0, error=1.0 - float(qv), nll=float(-np.log(max(qv, 1e-300))),
            label=f"p(answer token {tok.decode([li.query_token])!r})")
        d["query_note"] = li.query_note
        d["output_labels"] = [f"@{p}: {tok.decode([li.ids[p]])!r}→{tok.decode([t])!r}"
                              for p, t in zip(li.positions, li.targets)]
        d["tokens"] = [tok.decode([t]) for t in li.ids]
        d["ids"] = li.ids
        d["has_query"] = li.query_position is not None
    else:
        raise EvidenceError(f"Unsupported prompt type {type(prompt).__name__}.")
    t1 = time.perf_counter()
    _report(progress, 0.95, "Summing block kernels and query couplings")
    factors: list[LayerFactors] = d["factors"]
    K = sum(f.layer_kernel() for f in factors).cpu().numpy()
    K = 0.5 * (K + K.T)
    hc = None
    if d.pop("has_query"):
        hc = np.stack([f.query_couplings().cpu().numpy() for f in factors])
    values = np.asarray(d["values"], dtype=float)
    ev = PromptEvidence(
        prompt_kind=kind, subspace=subspace, route=d["route"], route_note=d["route_note"],
        model_name=lm.name, n_layers=lm.adapter.n_layers, n_blocks_per_layer=_blocks_per_layer(lm, subspace),
        values=values, targets=np.asarray(targets, dtype=float), residuals=np.asarray(targets, dtype=float) - values,
        output_labels=d["output_labels"], query=d["query"], query_note=d["query_note"], factors=factors, K=K,
        head_couplings=hc, k_x=None if hc is None else hc.sum(axis=(0, 1)), tokens=d["tokens"], ids=list(d["ids"]),
        timings={"gradients_s": t1 - t0, "kernel_s": time.perf_counter() - t1},
        settings={"max_positions": max_positions, "qttt": qttt},
    )
    _report(progress, 1.0, "Evidence ready")
    return ev


def attention_pattern(lm: Any, ev: PromptEvidence, layer: int, head: int, max_tokens: int = 96) -> tuple[np.ndarray, list[str]]:
    """Attention probabilities of query head `head` at `layer` on the prompt's last `max_tokens`
    tokens (the full few-shot prompt / the full long-context text): ((m, m) array, token labels).
    For kv-head subspaces (k, v) pass a query head that reads that kv head."""
    with torch.no_grad(), record_attention([layer]) as rec:
        lm.model(input_ids=torch.tensor(ev.ids, device=lm.device)[None])
    m = min(max_tokens, len(ev.ids))
    P = rec[layer][0, head, -m:, -m:].float().cpu().numpy()
    return P, [t.replace("\n", "↵") for t in ev.tokens[-m:]]


# --------------------------------------------------------------------------------------------
# per-session cache (the UI passes st.session_state; nothing global)
# --------------------------------------------------------------------------------------------

CACHE_KEY = "_ttt_evidence_cache"


def cached(store: Any, key: tuple, compute: Callable[[], Any], max_entries: int = 6) -> Any:
    """Memoise `compute()` under `key` in an insertion-ordered dict kept at store[CACHE_KEY]
    (e.g. one browser session's st.session_state); the oldest entries are dropped beyond
    `max_entries`. Exceptions are not cached."""
    cache = store.get(CACHE_KEY) if hasattr(store, "get") else None
    if cache is None:
        cache = {}
        store[CACHE_KEY] = cache
    if key in cache:
        value = cache.pop(key)
        cache[key] = value
        return value
    value = compute()
    cache[key] = value
    while len(cache) > max_entries:
        cache.pop(next(iter(cache)))
    return value


def evidence_key(lm: Any, prompt: FewShotPrompt | LongContextPrompt, subspace: str, max_positions: int,
                 qttt: bool = True) -> tuple:
    """Hashable cache key: (model name, prompt text, subspace, settings)."""
    mp = int(max_positions) if isinstance(prompt, LongContextPrompt) else None
    return ("evidence", lm.name, prompt.to_text(), subspace, mp, bool(qttt))


def cached_evidence(store: Any, lm: Any, prompt: FewShotPrompt | LongContextPrompt, subspace: str = "q", *,
                    max_positions: int = DEFAULT_MAX_POSITIONS, qttt: bool = True,
                    progress: Progress = None) -> PromptEvidence:
    """`compute_evidence` memoised per (model name, prompt text, subspace, settings) in `store`."""
    key = evidence_key(lm, prompt, subspace, max_positions, qttt)
    return cached(store, key, lambda: compute_evidence(lm, prompt, subspace, max_positions=max_positions,
                                                       qttt=qttt, progress=progress))
