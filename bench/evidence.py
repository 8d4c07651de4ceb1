"""Benchmark of the factorised prompt-kernel build (DESIGN §2) on SmolLM2-135M.

1. W_Q kernel of a long free-text prompt (qTTT frozen-KV semantics) at n = 128 and 256 supervised
   positions: the factorised build (prefill + one forward + ONE backward over all rows) against
   the one-backward-per-position reference: for each position, its row alone is run against the
   frozen cache with zero W_Q deltas (requires_grad) on all 30 layers and back-propagated once
   (the strongest per-position baseline: every row is computed once), then K = ΦΦᵀ. Φ is stored
   only for the checked layers (all 30 layers × n × 331,776 fp32 floats would need 10 GB at
   n = 256); the reference's Gram time is measured on those layers and scaled linearly to 30
   layers (identical shapes per layer). `speedup_n*` = (reference backward + Gram) / factorised;
   `speedup_backward_only_n*` leaves the Gram out (a lower bound). Relative error (Frobenius)
   over the checked layers' layer kernels and all their per-head kernels, twice on the same
   prompt: in fp32 (`fp32_max_rel_err_n*`, the timed run) and on a float64 copy of the model
   (`max_rel_err_n*`, the error of the factorisation itself). In fp32 both routes sit ~1e-4 from
   the float64 truth (`fp32_reference_vs_fp64_n*`, `fp32_factorised_vs_fp64_n*`): that is the
   model's fp32 round-off floor, not a property of the factorisation.
2. End-to-end: prompt → evidence → spectrum → Query-Aware + Trace scores for all 270 W_Q heads,
   on a ~256-token needle prompt with a question and answer (model already loaded).
3. Peak RSS (resource.getrusage, in a fresh subprocess each) for a 2048-token prompt at
   max_positions 256 (default) and 2048 (n = 2048).
4. ``--long`` (issue 15; only this section runs): long prompts, each case in a fresh subprocess.
   Memory = VmHWM − VmRSS after a warm-up kernel has paged the model's weights in (the weights are
   memory-mapped: without the warm-up ~0.5 GB of them count as "above the model", as in section
   3's `extra_over_model_mb`), so `*_mb_above_model` is the job's own working memory. Seconds are
   the median of `--repeats` runs in that process (the first run also sets the memory peak).
   * ``long_kernel_n2048_*``: `compute_prompt_kernel` (W_Q, qTTT frozen-KV route) on a
     ~2,060-token needle prompt at max_positions 2048 (n = 2,048 positions);
   * ``long_kernel_t8192_*``: the same at max_positions 256 on a context filling SmolLM2's 8,192
     positions;
   * ``*_baseline_*``: the implementation before issue 15, measured in the same run
     (`baseline_kernel`: prefill of the whole text then 384-row chunks against the frozen cache,
     or one pass with the rows' K/V detached through SDPA, and float64 Grams); ``*_speedup`` =
     baseline seconds / new seconds, ``*_memory_ratio`` = baseline MB / new MB,
     ``*_rel_diff_vs_baseline`` = ‖K_new − K_base‖/‖K_base‖ (fp32 round-off);
   * ``long_kernel_n2048_plain_head``: today's route with the LM head read through autograd of
     the logits (TTT_LENS_FUSED_HEAD=0) instead of `ttt_core.fused_head`, in the same run:
     ``*_fused_head_speedup`` = its seconds / the fused run's, ``*_rel_diff_vs_plain_head``;
   * ``*_estimate_mb``: `ttt_core.memory_guard`'s estimate for the job (an upper bound);
   * ``long_over_limit_error``: the message for a prompt over the 8,192 positions.

The last line printed is one JSON object.
Usage: python bench/evidence.py [--quick] | [--long [--repeats R]]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# OpenMP threads sleep instead of spinning between parallel regions (as bench/qttt_step.py): on a
# shared 2-core machine spinning makes runs many times slower whenever another process is busy.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ttt_core.attention import forward_with_frozen_kv, prefill  # noqa: E402
from ttt_core.encoding import encode_long_context  # noqa: E402
from ttt_core.generators import FILLER, needle_haystack  # noqa: E402
from ttt_core.models import load_model  # noqa: E402
from ttt_core.prompt_kernel import compute_prompt_kernel  # noqa: E402
from ttt_core.prompts import LongContextPrompt  # noqa: E402
from ttt_core.readout import token_prob  # noqa: E402
from ttt_core.scores import score_blocks  # noqa: E402
from ttt_core.spectrum import kernel_spectrum  # noqa: E402

CHECK_LAYERS = (0, 15, 29)


def free_text(n_tokens: int, tok) -> LongContextPrompt:
    rng = np.random.default_rng(0)
    parts: list[str] = []
    while len(tok(" ".join(parts)).input_ids) < n_tokens + 8:
        parts.append(FILLER[int(rng.integers(len(FILLER)))])
    return LongContextPrompt(context=" ".join(parts))


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def reference(lm, prompt, n: int, single_row: bool = True, dtype=torch.float32) -> tuple[float, dict]:
    """One backward per position; returns (seconds, {layer: Φ_l (n, 576·576)}) for CHECK_LAYERS.
    single_row=False runs all rows in one graph and back-propagates each output through it
    (retain_graph) — the textbook form, far slower (every backward traverses all n rows)."""
    a = lm.adapter
    li = encode_long_context(lm, prompt, n)
    ids = torch.tensor(li.ids)[None]
    t0 = time.perf_counter()
    _, cache = prefill(lm.model, ids)
    deltas = {(l, "q"): torch.zeros(a.spec(l, "q").out_features, a.spec(l, "q").in_features, dtype=dtype,
                                    requires_grad=True) for l in range(a.n_layers)}
    dl = list(deltas.values())
    phi = {l: torch.empty(n, dl[l].numel(), dtype=dtype) for l in CHECK_LAYERS}
    pos, tg = li.positions, torch.tensor(li.targets)
    if single_row:
        for j, p in enumerate(pos):
            with lm.adapter.apply(deltas=deltas):
                out = forward_with_frozen_kv(lm.model, ids[:, p:p + 1], cache, p)
                s = token_prob(out.logits[0], tg[j:j + 1])[0]
            g = torch.autograd.grad(s, dl)
            for l in CHECK_LAYERS:
                phi[l][j] = g[l].reshape(-1)
    else:
        start = pos[0]
        rows = torch.tensor([p - start for p in pos])
        with lm.adapter.apply(deltas=deltas):
            out = forward_with_frozen_kv(lm.model, ids[:, start:pos[-1] + 1], cache, start, logits_to_keep=rows)
            s = token_prob(out.logits[0], tg)
        for j in range(n):
            g = torch.autograd.grad(s[j], dl, retain_graph=j < n - 1)
            for l in CHECK_LAYERS:
                phi[l][j] = g[l].reshape(-1)
    return time.perf_counter() - t0, phi


def compare(ev, phi, lm) -> dict:
    """Relative errors (Frobenius) over the checked layers: layer kernels; per-head kernels relative
    to their layer kernel's norm (the scale they are summed at); per-head kernels relative to
    their own norm (fp32 round-off dominates for heads ~1e-6 of their layer)."""
    d = lm.adapter.head_dim
    layer, head_scaled, head_own = [], [], []
    for l, P in phi.items():
        P = P.double()
        K_ref = (P @ P.T).numpy()
        layer.append(rel(ev.layer_kernel(l), K_ref))
        G = P.reshape(P.shape[0], lm.adapter.n_heads, d, -1)
        for h in range(lm.adapter.n_heads):
            Ph = G[:, h].reshape(P.shape[0], -1)
            Kh_ref, Kh = (Ph @ Ph.T).numpy(), ev.head_kernel(l, h)
            head_scaled.append(float(np.linalg.norm(Kh - Kh_ref) / np.linalg.norm(K_ref)))
            head_own.append(rel(Kh, Kh_ref))
    return {"layer": max(layer), "head_scaled": max(head_scaled), "head_own": max(head_own)}


def kernel_speed(lm, n: int, lm64=None) -> dict:
    prompt = free_text(n + 16, lm.tokenizer)
    t0 = time.perf_counter()
    ev = compute_prompt_kernel(lm, prompt, "q", max_positions=n)
    t_fact = time.perf_counter() - t0
    assert ev.n == n, ev.n
    t_ref, phi = reference(lm, prompt, n)
    gram0 = time.perf_counter()
    for P in phi.values():
        P @ P.T
    t_gram = (time.perf_counter() - gram0) * lm.adapter.n_layers / len(phi)
    err = compare(ev, phi, lm)
    out = {f"factorised_s_n{n}": round(t_fact, 3), f"reference_backward_s_n{n}": round(t_ref, 3),
           f"reference_gram_s_n{n}": round(t_gram, 3),
           f"speedup_n{n}": round((t_ref + t_gram) / t_fact, 1),
           f"speedup_backward_only_n{n}": round(t_ref / t_fact, 1),
           f"fp32_max_rel_err_n{n}": max(err["layer"], err["head_scaled"]),
           f"fp32_max_rel_err_layer_kernels_n{n}": err["layer"],
           f"fp32_max_rel_err_head_vs_layer_norm_n{n}": err["head_scaled"],
           f"fp32_max_rel_err_head_own_norm_n{n}": err["head_own"]}
    if lm64 is not None:
        out.update(fp64_check(lm64, prompt, n, ev32=ev, phi32=phi))
    del phi
    print(json.dumps(out), flush=True)
    return out


def fp64_check(lm64, prompt, n: int, ev32=None, phi32=None) -> dict:
    """The same comparison on a private float64 copy of the model and the same prompt: the error
    of the factorisation itself (`max_rel_err_n*`), free of fp32 round-off. Given the fp32
    results it also reports the fp32 floor: how far the fp32 *reference* and the fp32 factorised
    kernels each are from the float64 truth (SmolLM2's fp32 forward leaves ~1e-4 in these
    gradients: p(1 − p) of confident next-token predictions amplifies logit round-off)."""
    ev = compute_prompt_kernel(lm64, prompt, "q", max_positions=n)
    _, phi = reference(lm64, prompt, n, dtype=torch.float64)
    err = compare(ev, phi, lm64)
    out = {f"max_rel_err_n{n}": max(err["layer"], err["head_scaled"]),
           f"fp64_max_rel_err_layer_kernels_n{n}": err["layer"],
           f"fp64_max_rel_err_head_own_norm_n{n}": err["head_own"]}
    if ev32 is not None and phi32 is not None:
        ref32, fact32 = [], []
        for l, P in phi.items():
            K64 = (P @ P.T).numpy()
            P32 = phi32[l].double()
            ref32.append(rel((P32 @ P32.T).numpy(), K64))
            fact32.append(rel(ev32.layer_kernel(l), K64))
        out[f"fp32_reference_vs_fp64_n{n}"] = max(ref32)
        out[f"fp32_factorised_vs_fp64_n{n}"] = max(fact32)
    return out


def full_graph_reference(lm, n: int, probe: int = 6) -> dict:
    """The textbook per-position route (all n rows in one graph, one retain_graph backward per
    output): time `probe` backward passes and scale to n (each backward costs the same)."""
    a = lm.adapter
    prompt = free_text(n + 16, lm.tokenizer)
    li = encode_long_context(lm, prompt, n)
    ids = torch.tensor(li.ids)[None]
    _, cache = prefill(lm.model, ids)
    deltas = [torch.zeros(a.spec(l, "q").out_features, a.spec(l, "q").in_features, requires_grad=True)
              for l in range(a.n_layers)]
    start = li.positions[0]
    rows = torch.tensor([p - start for p in li.positions])
    t0 = time.perf_counter()
    with lm.adapter.apply(deltas={(l, "q"): d for l, d in enumerate(deltas)}):
        out = forward_with_frozen_kv(lm.model, ids[:, start:li.positions[-1] + 1], cache, start, logits_to_keep=rows)
        s = token_prob(out.logits[0], torch.tensor(li.targets))
    t_fwd = time.perf_counter() - t0
    t1 = time.perf_counter()
    for j in range(probe):
        torch.autograd.grad(s[j], deltas, retain_graph=True)
    per = (time.perf_counter() - t1) / probe
    out = {f"full_graph_reference_s_per_position_n{n}": round(per, 3),
           f"full_graph_reference_s_n{n}_extrapolated": round(t_fwd + per * n, 1)}
    print(json.dumps(out), flush=True)
    return out


def end_to_end(lm) -> dict:
    prompt = needle_haystack(1, n_words=190, position=0.4)
    n_tok = len(lm.tokenizer(prompt.full_text()).input_ids)
    t0 = time.perf_counter()
    ev = compute_prompt_kernel(lm, prompt, "q", max_positions=256)
    t1 = time.perf_counter()
    rep = kernel_spectrum(ev, T=8, c=0.5)
    t2 = time.perf_counter()
    sc = score_blocks(ev, spectrum=rep)
    t3 = time.perf_counter()
    g0 = time.perf_counter()
    score_blocks(ev, spectrum=rep, greedy_budget=4)
    t_greedy = time.perf_counter() - g0 - (t3 - t2)
    out = {"e2e_prompt_tokens": n_tok, "e2e_n": ev.n, "e2e_heads": int(sc.trace.size),
           "e2e_evidence_s": round(t1 - t0, 3), "e2e_spectrum_s": round(t2 - t1, 3), "e2e_scores_s": round(t3 - t2, 3),
           "e2e_total_s": round(t3 - t0, 3), "greedy_budget4_extra_s": round(t_greedy, 3),
           "e2e_verdict": rep.verdict}
    print(json.dumps(out), flush=True)
    return out


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def memory_child(max_positions: int) -> None:
    """Run in a fresh process: evidence + spectrum + scores for a ~2048-token prompt. Reports the
    process peak RSS (ru_maxrss, includes model loading) and the peak *after* loading: VmHWM is
    reset through /proc/self/clear_refs once the model is resident, so it measures the evidence
    computation on top of the model."""
    lm = load_model()
    prompt = needle_haystack(2, n_words=1745, position=0.3)
    n_tok = len(lm.tokenizer(prompt.full_text()).input_ids)
    rss0 = _status_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    t0 = time.perf_counter()
    ev = compute_prompt_kernel(lm, prompt, "q", max_positions=max_positions)
    rep = kernel_spectrum(ev)
    score_blocks(ev, spectrum=rep)
    secs = time.perf_counter() - t0
    hwm = _status_kb("VmHWM")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"tokens": n_tok, "n": ev.n, "seconds": round(secs, 2),
                      "rss_before_mb": round(rss0 / 1024, 1),
                      "peak_rss_during_evidence_mb": round(hwm / 1024, 1) if reset else None,
                      "extra_over_model_mb": round((hwm - rss0) / 1024, 1) if reset else None,
                      # Linux keeps ru_maxrss across fork+exec: this includes the parent bench's RSS
                      # at the fork (the float64 model copy and Φ), so it is not this child's peak
                      "ru_maxrss_mb_includes_parent_at_fork": round(peak / 1024, 1)}))


def memory(max_positions: int) -> dict:
    cmd = [sys.executable, __file__, "--memory-child", str(max_positions)]
    if torch.get_num_threads():
        cmd += ["--threads", str(torch.get_num_threads())]
    res = subprocess.run(cmd, capture_output=True,
                         text=True, cwd=ROOT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode or not line:
        raise RuntimeError(res.stderr[-2000:])
    d = json.loads(line[-1])
    out = {f"mem2048_maxpos{max_positions}_{k}": v for k, v in d.items()}
    print(json.dumps(out), flush=True)
    return out


# --------------------------------------------------------------------------------------------
# --long (issue 15)
# --------------------------------------------------------------------------------------------


def long_prompt(lm, context_tokens: int, seed: int = 2) -> LongContextPrompt:
    """A needle prompt (question + answer) whose context is cut to about `context_tokens` tokens."""
    tok = lm.tokenizer
    p = needle_haystack(seed, n_words=int(context_tokens * 0.9) + 200, position=0.3)
    offs = tok(p.context, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if len(offs) <= context_tokens:
        raise RuntimeError(f"filler too short: {len(offs)} tokens")
    cut = offs[context_tokens][0]
    spans = [(a, b) for a, b in p.needle_spans if b <= cut]
    return LongContextPrompt(context=p.context[:cut], question=p.question, answer=p.answer, needle_spans=spans)


def baseline_kernel(lm, prompt, max_positions: int, row_chunk: int = 384):
    """The W_Q frozen-KV prompt kernel as it was before issue 15 (for the same-run baseline):
    rows spanning ≤ row_chunk tokens: prefill of the tokens before them, one pass with their own
    K/V detached (SDPA); longer spans: prefill of the whole text, then the rows in chunks of
    row_chunk against its frozen cache (`forward_with_frozen_kv`); Grams in float64.
    Returns (K (n, n) float64 numpy, k_x or None, n)."""
    from ttt_core import kernel_routes as kr
    from ttt_core.attention import detached_kv

    li = encode_long_context(lm, prompt, max_positions)
    wanted = list(li.positions) + ([li.query_position] if li.query_position is not None else [])
    targets = list(li.targets) + ([li.query_token] if li.query_token is not None else [])
    ids = torch.tensor(li.ids)[None]
    keys = kr._keys(lm, "q")
    start, stop = wanted[0], wanted[-1] + 1
    A_parts: dict = {k: [] for k in keys}
    B_parts: dict = {k: [] for k in keys}
    vals = []
    if stop - start <= row_chunk:
        cache = None
        if start > 0:
            with torch.no_grad():
                cache = lm.model(input_ids=ids[:, :start], use_cache=True, logits_to_keep=1).past_key_values
        rows = torch.tensor([p - start for p in wanted])
        probes = kr._probes(lm, keys, 1, stop - start)
        with detached_kv(), lm.adapter.apply(probes=probes, capture=set(keys)) as st:
            out = lm.model(input_ids=ids[:, start:stop], past_key_values=cache, use_cache=cache is not None,
                           logits_to_keep=rows)
            s = token_prob(out.logits[0], torch.tensor(targets))
            grads = torch.autograd.grad(s.sum(), [probes[k] for k in keys])
        vals.append(s.detach())
        for k, g in zip(keys, grads):
            A_parts[k].append(st.capture_in[k][0].detach().index_select(0, rows).float())
            B_parts[k].append(g[0].index_select(0, rows).float())
        del out, st, grads, probes, cache
    else:
        cache = kr._prefill_cache(lm.model, ids)
        for r0 in range(start, stop, row_chunk):
            r1 = min(stop, r0 + row_chunk)
            sel = [j for j, p in enumerate(wanted) if r0 <= p < r1]
            rows = torch.tensor([wanted[j] - r0 for j in sel])
            probes = kr._probes(lm, keys, 1, r1 - r0)
            with lm.adapter.apply(probes=probes, capture=set(keys)) as st:
                out = forward_with_frozen_kv(lm.model, ids[:, r0:r1], cache, r0, logits_to_keep=rows)
                s = token_prob(out.logits[0], torch.tensor([targets[j] for j in sel]))
                grads = torch.autograd.grad(s.sum(), [probes[k] for k in keys])
            vals.append(s.detach())
            for k, g in zip(keys, grads):
                A_parts[k].append(st.capture_in[k][0].detach().index_select(0, rows).float())
                B_parts[k].append(g[0].index_select(0, rows).float())
            del out, st, grads, probes
        del cache
    rr = kr._frozen_kv_result(lm, li, A_parts, B_parts, vals)
    K = None
    for f in rr.factors:                                  # float64 Grams, as before
        O, H = f.O.double(), f.H.double()
        Kl = (O @ O.T) * (H @ H.T)
        K = Kl if K is None else K + Kl
    K = K.numpy()
    kx = None
    if li.query_position is not None:
        kx = sum(f.query_couplings().sum(0) for f in rr.factors).numpy()
    return 0.5 * (K + K.T), kx, len(li.positions)


LONG_CASES = {
    # case: (context tokens, max_positions, baseline?)
    "kernel_n2048": (2052, 2048, False),
    "kernel_n2048_baseline": (2052, 2048, True),
    "kernel_n2048_plain_head": (2052, 2048, False),
    "kernel_t8192": (8160, 256, False),
    "kernel_t8192_baseline": (8160, 256, True),
}


def long_child(case: str, repeats: int) -> None:
    """Fresh process: warm-up (pages the weights in), reset VmHWM, run the case `repeats` times."""
    from ttt_core import memory_guard

    ctx, max_pos, base = LONG_CASES[case]
    if case.endswith("_plain_head"):                 # today's route with the LM head read through autograd
        os.environ["TTT_LENS_FUSED_HEAD"] = "0"
    lm = load_model()
    prompt = long_prompt(lm, ctx)
    li = encode_long_context(lm, prompt, max_pos)
    compute_prompt_kernel(lm, free_text(40, lm.tokenizer), "q", max_positions=16)      # warm-up
    if base:
        baseline_kernel(lm, free_text(40, lm.tokenizer), 16)
    rss0 = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    secs, cpu, K = [], [], None
    for _ in range(max(1, repeats)):
        t0, c0 = time.perf_counter(), time.process_time()
        if base:
            K, _, n = baseline_kernel(lm, prompt, max_pos)
        else:
            ev = compute_prompt_kernel(lm, prompt, "q", max_positions=max_pos)
            K, n = ev.K, ev.n
            del ev
        secs.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if len(secs) == 1:
            hwm = _status_kb("VmHWM")
    if os.environ.get("EVIDENCE_LONG_OUT"):
        np.save(Path(os.environ["EVIDENCE_LONG_OUT"]) / f"{case}.npy", K)
    wanted = li.positions + ([li.query_position] if li.query_position is not None else [])
    est = memory_guard.frozen_kv_kernel_estimate(lm, len(li.ids), len(li.positions), wanted[-1] + 1 - wanted[0])
    print(json.dumps({"case": case, "tokens": len(li.ids), "n": n, "seconds": [round(x, 2) for x in secs],
                      "median_s": round(float(np.median(secs)), 2), "min_s": round(min(secs), 2),
                      "cpu_seconds_median": round(float(np.median(cpu)), 2),
                      "load_avg_1min": round(os.getloadavg()[0], 2),
                      "mb_above_model": round((hwm - rss0) / 1024, 1), "rss_model_mb": round(rss0 / 1024, 1),
                      "estimate_mb": round(est.total / 2**20, 1), "estimate_raw_mb": round(est.raw / 2**20, 1)}))


def long_section(repeats: int, cases: list[str]) -> dict:
    import tempfile

    from ttt_core import memory_guard
    from ttt_core.prompt_kernel import KernelContextLengthError

    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        res = {}
        for case in cases:
            cmd = [sys.executable, __file__, "--long-child", case, "--repeats", str(repeats)]
            if torch.get_num_threads():
                cmd += ["--threads", str(torch.get_num_threads())]
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                               env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "EVIDENCE_LONG_OUT": tmp})
            line = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
            if r.returncode or not line:
                raise RuntimeError(r.stderr[-3000:])
            d = json.loads(line[-1])
            print(json.dumps(d), flush=True)
            res[case] = d
            key = "long_" + case
            out[f"{key}_tokens"], out[f"{key}_n"] = d["tokens"], d["n"]
            out[f"{key}_seconds_median"], out[f"{key}_seconds"] = d["median_s"], d["seconds"]
            out[f"{key}_cpu_seconds_median"] = d.get("cpu_seconds_median")
            out[f"{key}_mb_above_model"] = d["mb_above_model"]
            out[f"{key}_estimate_mb"] = d["estimate_mb"]
        for case in cases:
            if case + "_plain_head" in res:
                plain, key = res[case + "_plain_head"], "long_" + case
                out[f"{key}_fused_head_speedup"] = round(plain["median_s"] / res[case]["median_s"], 2)
                out[f"{key}_fused_head_memory_ratio"] = round(plain["mb_above_model"] / max(res[case]["mb_above_model"], 1e-9), 2)
                Kn, Kp = np.load(Path(tmp) / f"{case}.npy"), np.load(Path(tmp) / f"{case}_plain_head.npy")
                out[f"{key}_rel_diff_vs_plain_head"] = rel(Kn, Kp)
            if case.endswith(("_baseline", "_plain_head")) or case + "_baseline" not in res:
                continue
            new, base = res[case], res[case + "_baseline"]
            key = "long_" + case
            out[f"{key}_speedup"] = round(base["median_s"] / new["median_s"], 2)
            if new.get("cpu_seconds_median") and base.get("cpu_seconds_median"):
                out[f"{key}_cpu_speedup"] = round(base["cpu_seconds_median"] / new["cpu_seconds_median"], 2)
            out[f"{key}_memory_ratio"] = round(base["mb_above_model"] / max(new["mb_above_model"], 1e-9), 2)
            Kn, Kb = np.load(Path(tmp) / f"{case}.npy"), np.load(Path(tmp) / f"{case}_baseline.npy")
            out[f"{key}_rel_diff_vs_baseline"] = rel(Kn, Kb)
    lm = load_model()
    try:
        compute_prompt_kernel(lm, long_prompt(lm, 8300), "q", max_positions=256)
        out["long_over_limit_error"] = None
    except KernelContextLengthError as exc:
        out["long_over_limit_error"] = str(exc)
    out["long_memory_limit_source"] = memory_guard.available_memory()[1]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="n = 32 and 64 only, no memory runs")
    ap.add_argument("--memory-child", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--sections", default="kernel,e2e,memory", help="comma list of kernel, e2e, memory")
    ap.add_argument("--long", action="store_true", help="only the long-prompt section (module docstring, 4.)")
    ap.add_argument("--long-cases", default=",".join(LONG_CASES), help="comma list of " + ", ".join(LONG_CASES))
    ap.add_argument("--long-child", default=None)
    ap.add_argument("--repeats", type=int, default=3, help="--long: runs per case (median seconds)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child is not None:
        memory_child(args.memory_child)
        return
    if args.long_child is not None:
        long_child(args.long_child, args.repeats)
        return
    if args.long:
        result = {"device": "cpu", "threads": torch.get_num_threads(), "section": "long",
                  "load_avg_1min_at_start": round(os.getloadavg()[0], 2)}
        result.update(long_section(args.repeats, args.long_cases.split(",")))
        result["load_avg_1min_at_end"] = round(os.getloadavg()[0], 2)
        print(json.dumps(result))
        return
    torch.manual_seed(0)
    lm = load_model()
    result: dict = {"device": "cpu", "threads": torch.get_num_threads(), "model": lm.name,
                    "load_avg_1min_at_start": round(os.getloadavg()[0], 2)}
    compute_prompt_kernel(lm, free_text(40, lm.tokenizer), "q", max_positions=16)   # warm-up (allocator, kernels)
    reference(lm, free_text(40, lm.tokenizer), 2)
    sections = set(args.sections.split(","))
    sizes = (32, 64) if args.quick else (128, 256)
    if "kernel" in sections:
        lm64 = load_model()
        lm64.model.double()
        for n in sizes:
            result.update(kernel_speed(lm, n, lm64))
        del lm64
        result.update(full_graph_reference(lm, sizes[0]))
        result["max_rel_err"] = max(v for k, v in result.items() if re.fullmatch(r"max_rel_err_n\d+", k))
        result["max_rel_err_fp32"] = max(v for k, v in result.items() if re.fullmatch(r"fp32_max_rel_err_n\d+", k))
    if "e2e" in sections:
        result.update(end_to_end(lm))
    if "memory" in sections and not args.quick:
        result.update(memory(256))
        result.update(memory(2048))
    result["load_avg_1min_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
