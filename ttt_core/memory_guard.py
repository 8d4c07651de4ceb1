"""Memory guard: estimate a heavy job's peak memory from its shapes before it starts, refuse it
with advice when it cannot fit, and turn a real out-of-memory into the same clear message.

Why: a job that outgrows the machine does not fail politely. On Linux the kernel's OOM killer
ends the whole process (the Streamlit server and every session with it); a large allocation that
fails raises deep inside torch. So each heavy job asks `check` first, and runs inside
`oom_guard`, which re-raises torch.OutOfMemoryError / MemoryError / torch's CPU "can't allocate
memory" as `MemoryBudgetError` — a ValueError, so pages that show ValueError messages show it.

Memory available (`available_memory`)
-------------------------------------
* ``TTT_LENS_MEMORY_LIMIT_MB`` (float, MB) when set: the memory a job may use on top of what the
  process holds (tests and operators; no system files are read then);
* else the smallest of: the cgroup limit minus its usage (cgroup v2 ``memory.max`` −
  ``memory.current``, or v1 ``memory.limit_in_bytes`` − ``memory.usage_in_bytes``; reclaimable
  page cache, ``inactive_file``, counts as free) and MemAvailable from /proc/meminfo.

Estimates (bytes; L layers, d hidden, f intermediate, V vocabulary, Hq / Hkv query / key-value
heads of width hd, b = activation bytes (4 fp32, 8 fp64), T tokens)
------------------------------------------------------------------------------------------------
Building blocks:
* graph(rows, L') = rows · L' · (C_ROW_HIDDEN·d + C_ROW_FFN·f) · b — the tensors one
  forward keeps for its backward, per token row and layer. Frozen-KV rows (keys/values detached)
  use C_ROW_HIDDEN = 8, C_ROW_FFN = 4 (counted for a Llama layer: two RMSNorms, q, the attention
  output, SiLU and the gated product; measured 43 KB per row and layer on SmolLM2 against
  (8·576 + 4·1536)·4 = 43 KB); graph_full, full autograd (few-shot, paper GD, the exact
  per-output route), adds the key/value paths: C_FULL_HIDDEN = 10 instead of 8.
* logits(rows) = rows · V · 4 · 3 — fp32 logits, their log-softmax and its gradient.
* kv(T) = 2 · L · Hkv · hd · T · b — a key/value cache (46 KB per token on SmolLM2).
* prefill(T) = T · (4·d + 3·f) · b — one no-grad forward's largest live set (one layer at a
  time; only the last position's logits are kept).
* factors(n) = n · (d_in + d_out) · L · s, s = 4 (fp32 stores; 8 for fp64 models).
* gram(n) = 5 · n² · 8 — the float64 kernel K, its symmetrised copy and the fp32/fp64 block
  products while it is summed.
* slack (`MemoryEstimate.total`): + 15 % + 64 MB (allocator fragmentation, thread buffers).

Per job:
* prompt kernel, ``qttt-frozen-kv`` (n positions, T tokens, rows R = span of the supervised
  rows): kv(T) + factors(n) + max(prefill(T), graph(r, L) + logits(r) + attention, gram(n)),
  r = min(R, row_chunk) rows per pass (row_chunk = 128 by default);
  attention (the dQ-only frozen kernel) = the probabilities it may keep for the backward,
  ≤ min(Hq·r·T·4, 16 MB) per layer, + 3·2²⁴·4 bytes of score blocks while it recomputes them.
* prompt kernel, ``loo-exact`` (few-shot, B = n+1 prompts of width W, N_rows = Σ lengths of the
  LOO prompts): graph_full(B·W, L) + logits(B) + B·W·(d_in + d_out)·L·b (captured inputs and
  probe gradients) + factors(N_rows + the query prompt's rows) + gram(N_rows).
* prompt kernel, ``exact-per-output`` (m outputs, T tokens, c = `chunk` outputs per forward, block
  out × in, q = min(T, in) (in for W_O)): features L·m·out·q·4 + max(graph_full(T, L) + logits(c)
  + 2·T·out·8·L (one output's gradients and the probes), gram(m)).
* qTTT run (T tokens, span k): 2·kv(T) (the cache and the decoding template's copy) + the
  optimizer 6·Σ|W_Q|·4 (Δ, two Adam moments, gradient, clipped gradient, the previous Δ) +
  max(prefill(T) + T·d·b (hidden states) + 2·512·V·4 (the per-token NLL in 512-row blocks), a step: graph(k, L) + logits(k) + frozen attention
  (L·min(Hq·k·T·4, 16 MB) + 3·2²⁴·4)).
* paper GD (B = n+1 prompts of width W, layers l₀ … L−1 run): graph_full(B·W, L − l₀) + logits(B)
  + 2·B·W·d·b when l₀ > 0 (the cached hidden states) + 6·Σ|updated blocks|·4.

Calibration (SmolLM2-135M fp32, 2 CPU threads; measured = VmHWM − VmRSS of a fresh process
after a warm-up has paged the memory-mapped weights in; `bench/evidence.py --long`,
`bench/qttt_step.py --long`). The estimate (with slack) is an upper bound within 2×:

    job                                              measured MB   estimate MB   ratio
    kernel, n = 2,048 (2,066 tokens, 128-row chunks)   1,009–1,029     1,277      1.24–1.27
    kernel, 256 positions of an 8,174-token context    1,029–1,069     1,553      1.45–1.51
    qTTT run, 8,186 tokens, k = 128, prepare + 3 steps     1,357        2,190      1.61

(The implementation before issue 15 needed 1,858–2,347 MB and 2,172–2,313 MB for the two
kernels, measured the same way in the same runs.)
"""

from __future__ import annotations

import gc
import os
import re
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

ENV_LIMIT = "TTT_LENS_MEMORY_LIMIT_MB"
MB = 1 << 20

C_ROW_HIDDEN = 8
C_ROW_FFN = 4
C_FULL_HIDDEN = 10
LOGIT_COPIES = 3
GRAM_COPIES = 5
SLACK_FIXED = 64 * MB
SLACK_FRACTION = 0.15
KEEP_P_BUDGET = 16 << 20          # kernels.dispatch.SAVED_PROBS_BUDGET
SCORE_TRANSIENT = 3 * (1 << 24) * 4

class MemoryBudgetError(ValueError):
    """A job would not fit (or ran out of) memory; the message names a setting that fits."""


class ContextLengthError(ValueError):
    """The prompt has more tokens than the model has positions."""


# --------------------------------------------------------------------------------------------
# how much memory there is
# --------------------------------------------------------------------------------------------


def _read_int(path: Path) -> int | None:
    try:
        raw = path.read_text().strip()
    except OSError:
        return None
    if raw == "max":
        return None
    try:
        v = int(raw)
    except ValueError:
        return None
    return None if v >= 1 << 60 else v


def _inactive_file(stat: Path, keys: tuple[str, ...]) -> int:
    try:
        for line in stat.read_text().splitlines():
            k, _, v = line.partition(" ")
            if k in keys:
                return int(v)
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_available(root: Path = Path("/sys/fs/cgroup"), proc: Path = Path("/proc/self/cgroup")) -> int | None:
    """limit − (usage − inactive_file) of this process's memory cgroup, or None without a limit."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return None
    best: int | None = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, ctrls, rel = parts
        rel = rel.lstrip("/")
        if ctrls == "":                       # cgroup v2
            cands = [root / rel, root, root / "unified" / rel, root / "unified"]
            files = ("memory.max", "memory.current", "memory.stat", ("inactive_file",))
        elif "memory" in ctrls.split(","):    # cgroup v1
            cands = [root / "memory" / rel, root / "memory"]
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "memory.stat", ("total_inactive_file", "inactive_file"))
        else:
            continue
        for d in cands:
            limit = _read_int(d / files[0])
            if limit is None:
                continue
            usage = _read_int(d / files[1]) or 0
            free = limit - max(0, usage - _inactive_file(d / files[2], files[3]))
            best = free if best is None else min(best, free)
            break
    return best


def _meminfo_available(path: Path = Path("/proc/meminfo")) -> int | None:
    try:
        m = re.search(r"^MemAvailable:\s+(\d+) kB", path.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


def available_memory() -> tuple[int | None, str]:
    """(bytes a job may still use, where the number comes from); (None, …) when unknown."""
    raw = os.environ.get(ENV_LIMIT, "").strip()
    if raw:
        try:
            return int(float(raw) * MB), f"{ENV_LIMIT}={raw}"
        except ValueError as exc:
            raise ValueError(f"{ENV_LIMIT}={raw!r} is not a number of megabytes") from exc
    cg, mi = _cgroup_available(), _meminfo_available()
    if cg is not None and (mi is None or cg <= mi):
        return max(0, cg), "the memory cgroup's limit minus its usage"
    if mi is not None:
        return mi, "MemAvailable in /proc/meminfo"
    return None, "unknown"


# --------------------------------------------------------------------------------------------
# estimates
# --------------------------------------------------------------------------------------------


@dataclass
class MemoryEstimate:
    """A job's estimated peak (bytes) and the parts it is made of."""

    job: str
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def raw(self) -> int:
        return int(sum(self.parts.values()))

    @property
    def total(self) -> int:
        """Upper bound: the parts plus allocator slack."""
        return int(self.raw * (1 + SLACK_FRACTION) + SLACK_FIXED)

    def describe(self) -> str:
        big = sorted(self.parts.items(), key=lambda kv: -kv[1])[:3]
        return ", ".join(f"{k} {v / MB:,.0f} MB" for k, v in big if v >= MB)


@dataclass(frozen=True)
class Shapes:
    L: int
    d: int
    f: int
    V: int
    Hq: int
    Hkv: int
    hd: int
    b: int

    @classmethod
    def of(cls, lm: Any) -> Shapes:
        a = lm.adapter
        emb = lm.model.get_output_embeddings()
        V = int(emb.weight.shape[0]) if emb is not None else int(getattr(lm.model.config, "vocab_size", 0))
        return cls(L=a.n_layers, d=a.hidden_size, f=a.intermediate_size, V=V, Hq=a.n_heads, Hkv=a.n_kv_heads,
                   hd=a.head_dim, b=torch.empty(0, dtype=lm.dtype).element_size())


def _graph(s: Shapes, rows: float, layers: int, full: bool = False) -> float:
    ch = C_FULL_HIDDEN if full else C_ROW_HIDDEN
    return rows * layers * (ch * s.d + C_ROW_FFN * s.f) * s.b


def _logits(s: Shapes, rows: float) -> float:
    return rows * s.V * 4 * LOGIT_COPIES


def _kv(s: Shapes, tokens: float) -> float:
    return 2 * s.L * s.Hkv * s.hd * tokens * s.b


def _prefill(s: Shapes, tokens: float) -> float:
    return tokens * (4 * s.d + 3 * s.f) * s.b


def _store_bytes(s: Shapes) -> int:
    return 8 if s.b == 8 else 4


def _gram(n: float) -> float:
    return GRAM_COPIES * n * n * 8


def _block_shape(lm: Any, kind: str) -> tuple[int, int]:
    """(in, out) of the projection behind `kind` (a LoRA subspace name → its projection)."""
    sp = lm.adapter.spec(0, _base_kind(kind))
    return int(sp.in_features), int(sp.out_features)


def _base_kind(kind: str) -> str:
    """``lora:<kind>:<rank>`` → <kind>; anything else unchanged."""
    return kind.split(":")[1] if kind.startswith("lora:") else kind


def _feature_width(lm: Any, kind: str, tokens: int) -> int:
    """Columns of one output's per-output feature in the exact route: in (o), min(T, in), the rank
    (LoRA) or 1 (norm gains/biases: a (d,) vector)."""
    if kind.startswith("lora:"):
        return int(kind.split(":")[2])
    if kind.startswith("norm_"):
        return 1
    d_in, _ = _block_shape(lm, kind)
    return d_in if kind == "o" else min(tokens, d_in)


def frozen_kv_kernel_estimate(lm: Any, tokens: int, positions: int, span_rows: int | None = None,
                             row_chunk: int = 128, kind: str = "q") -> MemoryEstimate:
    """The ``qttt-frozen-kv`` prompt kernel: `positions` supervised rows (+ the query row) at the
    end of `tokens` tokens; `span_rows`: tokens from the first supervised row to the last row
    (default positions + 1); `kind`: the probed adapter kind (its (in, out) sizes the factor
    stores). Formula: module docstring."""
    s = Shapes.of(lm)
    n = max(1, int(positions))
    R = max(1, int(span_rows if span_rows is not None else n + 1))
    T = max(int(tokens), R)
    d_in, d_out = _block_shape(lm, kind)
    r = min(R, max(1, int(row_chunk)))
    attn = s.L * min(s.Hq * r * T * 4, KEEP_P_BUDGET) + SCORE_TRANSIENT
    route = _graph(s, r, s.L) + _logits(s, min(r, n + 1)) + attn
    return MemoryEstimate("prompt kernel (qTTT frozen-KV route)", {
        "K/V cache": _kv(s, T), "factor stores": (n + 1) * (d_in + d_out) * s.L * _store_bytes(s),
        "largest phase (prefill / chunk graph / Gram)": max(_prefill(s, T), route, _gram(n)),
    })


def exact_per_output_estimate(lm: Any, tokens: int, outputs: int, kind: str, chunk: int = 16) -> MemoryEstimate:
    """The ``exact-per-output`` prompt kernel (module docstring)."""
    s = Shapes.of(lm)
    T, m = max(1, int(tokens)), max(1, int(outputs))
    c = max(1, int(chunk))
    d_in, d_out = _block_shape(lm, kind)
    q = _feature_width(lm, kind, T)
    return MemoryEstimate(f"prompt kernel (exact per-output route, W_{kind})", {
        "per-output features": s.L * m * d_out * q * _store_bytes(s),
        "largest phase (sequence graph / Gram)": max(_graph(s, T, s.L, full=True) + _logits(s, c)
                                                     + 2 * T * d_out * 8 * s.L, _gram(m)),
    })


def loo_exact_estimate(lm: Any, lengths: list[int], kind: str) -> MemoryEstimate:
    """The few-shot ``loo-exact`` prompt kernel: lengths of the n LOO prompts and the full prompt."""
    s = Shapes.of(lm)
    B, W = len(lengths), max(lengths)
    rows = sum(lengths)
    d_in, d_out = _block_shape(lm, kind)
    return MemoryEstimate(f"prompt kernel (few-shot leave-one-out route, W_{kind})", {
        "batch graph": _graph(s, B * W, s.L, full=True) + _logits(s, B) + B * W * (d_in + d_out) * s.L * s.b,
        "factor stores": rows * (d_in + d_out) * s.L * _store_bytes(s),
        "row Grams": _gram(rows - lengths[-1]),
    })


def qttt_estimate(lm: Any, tokens: int, span: int) -> MemoryEstimate:
    """A qTTT run: prefill of `tokens` tokens and steps over `span` rows (module docstring)."""
    s = Shapes.of(lm)
    T, k = max(2, int(tokens)), max(1, int(span))
    d_in, d_out = _block_shape(lm, "q")
    step = _graph(s, k, s.L) + _logits(s, k) + SCORE_TRANSIENT + s.L * min(s.Hq * k * T * 4, KEEP_P_BUDGET)
    return MemoryEstimate("qTTT run", {
        "K/V cache + decoding copy": 2 * _kv(s, T),
        "largest phase (prefill / step)": max(_prefill(s, T) + T * s.d * s.b + 2 * 512 * s.V * 4, step),
        "optimizer state": 6 * s.L * d_in * d_out * 4,
    })


def paper_gd_estimate(lm: Any, lengths: list[int], first_layer: int = 0, kind: str = "v") -> MemoryEstimate:
    """A paper-mode GD run on one batch of LOO prompts (module docstring)."""
    s = Shapes.of(lm)
    B, W = len(lengths), max(lengths)
    d_in, d_out = _block_shape(lm, kind)
    run = s.L - int(first_layer)
    return MemoryEstimate("paper-mode GD", {
        "batch graph": _graph(s, B * W, run, full=True) + _logits(s, B),
        "cached hidden states": B * W * s.d * s.b * (2 if first_layer > 0 else 0),
        "optimizer state": 6 * run * d_in * d_out * 4,
    })


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------


def _largest(fits: Callable[[int], bool], lo: int, hi: int) -> int | None:
    """Largest x in [lo, hi] with fits(x) (fits monotone decreasing), None if fits(lo) is False."""
    if hi < lo or not fits(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def refuse_message(est: MemoryEstimate, avail: int, source: str, advice: str) -> str:
    return (f"Not enough memory for the {est.job}: it needs about {est.total / MB:,.0f} MB "
            f"({est.describe()}), but only {avail / MB:,.0f} MB are available ({source}). {advice}")


def check(est: MemoryEstimate, advice: Callable[[int], str] | str,
          error: type[MemoryBudgetError] = MemoryBudgetError) -> MemoryEstimate:
    """Raise `error` (a MemoryBudgetError) when `est` exceeds the available memory;
    `advice(avail_bytes)` (or a fixed string) names a setting that fits. Returns `est`."""
    avail, source = available_memory()
    if avail is not None and est.total > avail:
        text = advice(avail) if callable(advice) else advice
        raise error(refuse_message(est, avail, source, text))
    return est


def _fits(est: MemoryEstimate, avail: int) -> bool:
    return est.total <= avail


def kernel_advice(lm: Any, tokens: int, positions: int, route: str, **kw: Any) -> Callable[[int], str]:
    """Advice for a long-context prompt kernel: the largest max_positions (and, failing that, the
    largest token limit) that fits. kw: row_chunk, span_extra (frozen-KV route: rows spanned
    beyond the supervised positions), kind, chunk (exact route)."""
    extra = int(kw.get("span_extra", 1))        # rows after the last supervised one (question, query)

    def est(t: int, m: int) -> MemoryEstimate:
        if route == "exact-per-output":
            return exact_per_output_estimate(lm, t, m + 1, kw.get("kind", "q"), kw.get("chunk", 16))
        return frozen_kv_kernel_estimate(lm, t, m, m + extra, kw.get("row_chunk", 128))

    def advice(avail: int) -> str:
        m = _largest(lambda x: _fits(est(tokens, x), avail), 1, max(1, positions - 1))
        if m is not None:
            tip = f"Use fewer supervised positions: max_positions ≤ {m:,} fits (now {positions:,})."
            if route == "exact-per-output" and kw.get("kind") != "q":
                tip += " The W_Q subspace with the qTTT frozen-KV route needs far less."
            return tip
        t = _largest(lambda x: _fits(est(x, min(positions, x - 1)), avail), 2, tokens - 1)
        if t is not None:
            return (f"Even 1 supervised position does not fit with {tokens:,} tokens; use a shorter context: "
                    f"a token limit of {t:,} (the sidebar's token limit; prompts.fit_to_token_limit keeps the "
                    f"last tokens) fits with max_positions ≤ {min(positions, t - 1):,}.")
        return "Even a tiny prompt does not fit: free memory (close other sessions or jobs) and retry."
    return advice


def fewshot_advice(n_demos: int) -> str:
    return (f"Use fewer demonstrations (now {n_demos}) or shorter ones, or a smaller subspace "
            "(W_Q / W_K / W_V per head rather than an MLP matrix).")


def qttt_advice(lm: Any, tokens: int, span: int) -> Callable[[int], str]:
    def advice(avail: int) -> str:
        k = _largest(lambda x: _fits(qttt_estimate(lm, tokens, x), avail), 1, max(1, span - 1))
        if k is not None:
            return f"Use a shorter span: span ≤ {k:,} tokens fits (now {span:,})."
        t = _largest(lambda x: _fits(qttt_estimate(lm, x, min(span, x - 1)), avail), 2, tokens - 1)
        if t is not None:
            return (f"Use a shorter context: a token limit of {t:,} (the sidebar's token limit; "
                    f"prompts.fit_to_token_limit keeps the last tokens) fits with span ≤ {min(span, t - 1):,}.")
        return "Even a tiny context does not fit: free memory (close other sessions or jobs) and retry."
    return advice


def paper_gd_advice(lm: Any, lengths: list[int], first_layer: int, kind: str) -> Callable[[int], str]:
    def advice(avail: int) -> str:
        L = lm.adapter.n_layers
        f = _largest(lambda x: _fits(paper_gd_estimate(lm, lengths, L - x, kind), avail), 1, max(1, L - first_layer - 1))
        if f is not None:
            return (f"Update fewer layers: blocks in the last {f} layer(s) only (layers ≥ {L - f}) fit; "
                    "or use fewer demonstrations.")
        return f"Use fewer demonstrations (now {len(lengths) - 1}) or shorter ones."
    return advice


def max_positions_of(lm: Any) -> int | None:
    """The model's maximum positions (config.max_position_embeddings; 8,192 for SmolLM2)."""
    limit = getattr(lm.model.config, "max_position_embeddings", None)
    return None if limit is None else int(limit)


def check_context_length(lm: Any, tokens: int, what: str = "The prompt",
                         error: type[ContextLengthError] = ContextLengthError) -> None:
    """Raise `error` (a ContextLengthError) when `tokens` exceeds the model's maximum positions;
    the message names the limit and how to truncate."""
    limit = max_positions_of(lm)
    if limit is None or tokens <= limit:
        return
    raise error(
        f"{what} has {tokens:,} tokens, but {lm.name} has at most {int(limit):,} positions "
        f"(max_position_embeddings). Shorten the context to ≤ {int(limit):,} tokens: set the sidebar's token limit "
        f"to {int(limit):,} or less (prompts.fit_to_token_limit keeps the last tokens and the question).")


_OOM_TEXT = ("can't allocate memory", "not enough memory", "out of memory", "failed to allocate")


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    oom = getattr(torch, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and any(t in str(exc).lower() for t in _OOM_TEXT)


@contextmanager
def oom_guard(est: MemoryEstimate | None, advice: Callable[[int], str] | str,
              error: type[MemoryBudgetError] = MemoryBudgetError) -> Iterator[None]:
    """Run a heavy block; an out-of-memory inside it becomes `error` (a MemoryBudgetError) with
    `advice`. The frames of the failed computation are cleared first, so the tensors they held
    are freed before the message reaches the page (the process lives on)."""
    try:
        yield
    except BaseException as exc:  # filtered by is_oom; everything else is re-raised
        if not is_oom(exc):
            raise
        traceback.clear_frames(exc.__traceback__)
        exc.__traceback__ = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        avail, source = available_memory()
        a = avail if avail is not None else (est.total // 2 if est is not None else 0)
        tip = advice(a) if callable(advice) else advice
        job = est.job if est is not None else "job"
        need = f" (estimated {est.total / MB:,.0f} MB: {est.describe()})" if est is not None else ""
        raise error(f"Ran out of memory during the {job}{need}; {a / MB:,.0f} MB are available now "
                    f"({source}). {tip}") from None


def check_paper_gd(lm: Any, enc: Any, first_layer: int = 0, kind: str = "v") -> tuple[MemoryEstimate, Callable[[int], str]]:
    """The paper-mode GD hook: refuse (MemoryBudgetError) a LOO batch of `enc` (a FewShotEncoding)
    running layers first_layer … L−1 that cannot fit; returns (estimate, advice) for `oom_guard`."""
    lengths = [len(s) for s in enc.seqs]
    plan = (paper_gd_estimate(lm, lengths, first_layer, kind), paper_gd_advice(lm, lengths, first_layer, kind))
    check(*plan)
    return plan
