"""Benchmark: one qTTT step against one full-context TTT step on SmolLM2-135M (CPU, 2 threads).

    .venv/bin/python bench/qttt_step.py            # full benchmark; the last line is one JSON object
    .venv/bin/python bench/qttt_step.py --lr-sweep # also the learning-rate sweep behind DEFAULT_LR

What is timed (DESIGN §7.2, §8; both steps end with the same clip + AdamW update of all W_Q):
* qTTT step: span of k = 128 rows against the frozen prefill K/V of all T tokens
  (`ttt_core.qttt.span_loss_and_grads`: forward + dQ-only backward). The prefill is done once per
  run and is reported separately (`prefill_s`).
* full-context step: an ordinary forward over all T tokens with ΔW_Q requiring grad (keys and
  values recomputed from the adapted model), the LM head on the same k span rows only, the same
  summed span NLL, and the backward to every layer's ΔW_Q.
Medians over `--repeats` after one warm-up. `grad_cosine_T*` is the cosine between the two W_Q
gradients (they differ: qTTT ignores the span's effect through the keys/values).

Memory: peak resident set size (VmHWM from /proc/self/status) of a fresh subprocess per
(mode, T). Before the measured step the subprocess resets its high-water mark
(/proc/self/clear_refs ← 5), so `step_extra_mb` = VmHWM − VmRSS just before the step is the step's
own working memory (glibc is told to return large frees to the OS: MALLOC_MMAP_THRESHOLD_=131072,
MALLOC_TRIM_THRESHOLD_=0). `step_peak_rss_mb` is the absolute RSS peak during that step,
`setup_peak_rss_mb` the peak before it (model load — dominated by the loader —, prefill, warm-up).

FLOPs: counted exactly with torch.utils.flop_counter.FlopCounterMode over one qTTT step
(matmuls and attention, forward and backward); `qttt_gflops_design` is DESIGN §8's estimate
2(C_quad·k·T + (2+2r)·L·k·d²), C_quad = 2Ld (r = d_ff/d), which omits the LM head and the wasted
K/V projections of the span rows. Achieved GFLOP/s = counted FLOPs / median step time, against
the machine's fp32 torch.mm rate (2048² matrices) measured in the same run.

The 32-step default run (`default_run_s`): QTTTRun with the default config (k = 128, N = 32,
lr = DEFAULT_LR, metrics every step) on a ~1024-token needle-in-a-haystack prompt, prefill and
generation-free; target ≤ 60 s on this 2-core CPU.

Learning-rate sweep (`--lr-sweep`): 32 default steps for lr ∈ {1e-5, 3e-5, 1e-4, 3e-4, 1e-3} on
two ~1024-token needle prompts; reports the whole-context NLL and the answer NLL before/after.

Long contexts (`--long`, issue 15; only this section runs): SmolLM2's full 8,192 positions.
* ``long_qttt_step_s_T8192``: the qTTT step above (k = 128) against the frozen cache of 8,192
  tokens, median of `--repeats`; ``long_qttt_step_mem_mb_T8192``: its working memory (fresh
  subprocess, as above); the same at T = 2,048 in the same run is the baseline:
  ``long_qttt_step_time_ratio_T8192_vs_T2048`` / ``…_mem_ratio_…``. With ``--long-full`` the
  full-context step at T = 8,192 (~12 GB of activations by `ttt_core.memory_guard`'s estimate) is
  measured too and gives ``long_speedup_T8192`` / ``long_mem_ratio_T8192``.
* ``long_run_*``: `QTTTRun` (k = 128, 3 steps) on a needle prompt of ~8,190 tokens in a fresh
  subprocess: prepare (prefill) seconds, mean step seconds, peak memory above the resident model
  (VmHWM after a warm-up that pages the memory-mapped weights in) and the guard's estimate.
* ``long_over_limit_error``: the message for a prompt over 8,192 positions.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads sleep instead of spinning between parallel regions: on this shared 2-core machine,
# spinning makes 2-thread runs up to ~15× slower whenever another process is busy (measured).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

THREADS = int(os.environ.get("QTTT_BENCH_THREADS", "2"))
SPAN = 128


def _setup_torch() -> None:
    torch.set_num_threads(THREADS)


def _status_kb(field: str) -> int:
    m = re.search(rf"{field}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
    return int(m.group(1)) if m else -1


def _load():
    from ttt_core.models import load_model

    return load_model()


def _context_ids(lm, T: int) -> torch.Tensor:
    """T tokens of real filler text (a needle haystack long enough, cut to T tokens)."""
    from ttt_core.generators import needle_haystack

    p = needle_haystack(0, n_words=int(T * 1.2) + 50, position=0.5)
    ids = lm.tokenizer(p.context, add_special_tokens=False)["input_ids"]
    assert len(ids) >= T, (len(ids), T)
    return torch.tensor([ids[:T]], device=lm.device)


def _zero_deltas(lm):
    a = lm.adapter
    return {(l, "q"): torch.zeros(a.spec(l, "q").out_features, a.spec(l, "q").in_features) for l in range(a.n_layers)}


class Step:
    """The two step kinds, sharing one AdamW on all W_Q (clip 1.0)."""

    def __init__(self, lm, ids: torch.Tensor) -> None:
        from ttt_core.optim import AdamWConfig, DeltaAdamW

        self.lm, self.ids = lm, ids
        self.T = ids.shape[1]
        self.start = (self.T - 1 - SPAN) // 2
        self.deltas = _zero_deltas(lm)
        base = {k: lm.adapter.logical_weight(*k) for k in self.deltas}
        self.opt = DeltaAdamW(base, AdamWConfig(lr=1e-4))
        self.cache = None

    def prefill(self) -> float:
        from ttt_core.attention import FrozenKV

        t = time.perf_counter()
        with torch.no_grad():
            pkv = self.lm.model.get_decoder()(input_ids=self.ids, use_cache=True).past_key_values
        self.cache = FrozenKV([l.keys for l in pkv.layers], [l.values for l in pkv.layers])
        return time.perf_counter() - t

    def grads_qttt(self):
        from ttt_core.qttt import span_loss_and_grads

        return span_loss_and_grads(self.lm, self.cache, self.ids, self.start, SPAN, self.deltas)

    def grads_full(self):
        lm, s = self.lm, self.start
        leaves = {k: d.detach().requires_grad_(True) for k, d in self.deltas.items()}
        with torch.enable_grad(), lm.adapter.apply(deltas=leaves):
            hidden = lm.model.get_decoder()(input_ids=self.ids, use_cache=False).last_hidden_state
            logits = lm.model.get_output_embeddings()(hidden[0, s:s + SPAN]).float()
            loss = F.cross_entropy(logits, self.ids[0, s + 1:s + SPAN + 1], reduction="sum")
            grads = torch.autograd.grad(loss, list(leaves.values()))
        return loss.detach(), dict(zip(leaves, grads))

    def step(self, mode: str) -> None:
        from ttt_core.optim import clip_grad_norm

        _, grads = self.grads_qttt() if mode == "qttt" else self.grads_full()
        clipped, _ = clip_grad_norm(grads, 1.0)
        self.opt.step(self.deltas, clipped)  # out of place: deltas stay 0, so every repeat is the same step


def _matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def _timeit(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _child(mode: str, T: int) -> None:
    """Subprocess body for the memory measurement: prints one JSON line."""
    _setup_torch()
    lm = _load()
    st = Step(lm, _context_ids(lm, T))
    if mode == "qttt":
        st.prefill()
    st.step(mode)  # warm-up (allocator, lazy inits)
    setup_peak = _status_kb("VmHWM")  # model load, prefill, warm-up step
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kb("VmRSS")
    st.step(mode)
    hwm = _status_kb("VmHWM")
    print(json.dumps({"mode": mode, "T": T, "rss_before_mb": before / 1024, "step_extra_mb": (hwm - before) / 1024,
                      "setup_peak_mb": setup_peak / 1024, "step_peak_mb": hwm / 1024}))


def _memory(mode: str, T: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(T)], capture_output=True, text=True,
                         env=env, timeout=900)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"memory subprocess failed: {out.stderr[-2000:]}")
    return json.loads(lines[-1])


def _long_needle(lm, tokens: int):
    """A needle prompt whose prompt + answer has at most `tokens` tokens (context cut by offsets)."""
    from ttt_core.encoding import encode
    from ttt_core.generators import needle_haystack
    from ttt_core.prompts import LongContextPrompt

    p = needle_haystack(0, n_words=int(tokens * 0.9) + 200, position=0.3)
    offs = lm.tokenizer(p.context, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    cut_tokens = tokens - 24
    for _ in range(10):
        cut = offs[cut_tokens][0]
        q = LongContextPrompt(context=p.context[:cut], question=p.question, answer=p.answer,
                              needle_spans=[(a, b) for a, b in p.needle_spans if b <= cut])
        n = len(encode(lm, q).train_ids)
        if n <= tokens:
            return q, n
        cut_tokens -= n - tokens
    raise RuntimeError("could not fit the needle prompt")


def _run_child(tokens: int, steps: int) -> None:
    """Subprocess body: QTTTRun prepare + `steps` steps on a ~`tokens`-token needle prompt."""
    from ttt_core import memory_guard
    from ttt_core.qttt import QTTTConfig, QTTTRun

    _setup_torch()
    lm = _load()
    p, n = _long_needle(lm, tokens)
    warm = QTTTRun(lm, _needle_prompt(lm, 200, seed=1)[0], QTTTConfig(steps=1))
    warm.prepare()
    warm.run_to_end()
    del warm
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    cfg = QTTTConfig(steps=steps)
    run = QTTTRun(lm, p, cfg)
    t = time.perf_counter()
    base = run.prepare()
    prep = time.perf_counter() - t
    recs = run.run_to_end()
    hwm = _status_kb("VmHWM")
    est = memory_guard.qttt_estimate(lm, n, run.span)
    print(json.dumps({"tokens": n, "steps": len(recs), "status": run.status, "prepare_s": round(prep, 2),
                      "mean_step_s": round(statistics.mean(r.wall_s for r in recs), 3),
                      "step_s": [round(r.wall_s, 3) for r in recs],
                      "mb_above_model": round((hwm - before) / 1024, 1), "rss_model_mb": round(before / 1024, 1),
                      "estimate_mb": round(est.total / 2**20, 1), "estimate_raw_mb": round(est.raw / 2**20, 1),
                      "answer_nll": [round(base.answer_nll, 4), round(recs[-1].answer_nll, 4)]}))


def _long(args) -> dict:
    from ttt_core import memory_guard
    from ttt_core.qttt import QTTTConfig, QTTTRun

    res: dict = {}
    lm = _load()
    T_long, T_base = 8192, 2048
    for T in (T_base, T_long):
        st = Step(lm, _context_ids(lm, T))
        res[f"long_prefill_s_T{T}"] = round(st.prefill(), 2)
        res[f"long_qttt_step_s_T{T}"] = round(_timeit(lambda: st.step("qttt"), args.repeats), 3)
        if args.long_full and T == T_long:
            res[f"long_full_step_s_T{T}"] = round(_timeit(lambda: st.step("full"), max(1, args.repeats - 1)), 3)
        print(json.dumps({k: v for k, v in res.items() if k.endswith(f"T{T}")}), file=sys.stderr, flush=True)
        del st
    for T in (T_base, T_long):
        res[f"long_qttt_step_mem_mb_T{T}"] = round(_memory("qttt", T)["step_extra_mb"], 1)
    if args.long_full:
        res[f"long_full_step_mem_mb_T{T_long}"] = round(_memory("full", T_long)["step_extra_mb"], 1)
        res[f"long_speedup_T{T_long}"] = round(res[f"long_full_step_s_T{T_long}"] / res[f"long_qttt_step_s_T{T_long}"], 2)
        res[f"long_mem_ratio_T{T_long}"] = round(res[f"long_full_step_mem_mb_T{T_long}"]
                                                 / max(res[f"long_qttt_step_mem_mb_T{T_long}"], 1e-9), 2)
    res["long_qttt_step_time_ratio_T8192_vs_T2048"] = round(res["long_qttt_step_s_T8192"] / res["long_qttt_step_s_T2048"], 2)
    res["long_qttt_step_mem_ratio_T8192_vs_T2048"] = round(res["long_qttt_step_mem_mb_T8192"]
                                                           / max(res["long_qttt_step_mem_mb_T2048"], 1e-9), 2)
    res["long_full_step_estimate_mb_T8192"] = round(
        memory_guard.MemoryEstimate("full step", {"graph": memory_guard._graph(memory_guard.Shapes.of(lm), T_long,
                                                                              lm.adapter.n_layers, full=True)}).total / 2**20)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run([sys.executable, __file__, "--run-child", str(T_long), "3"], capture_output=True, text=True,
                         env=env, timeout=1800)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"run subprocess failed: {out.stderr[-2000:]}")
    for k, v in json.loads(lines[-1]).items():
        res[f"long_run_{k}"] = v
    over, _ = _long_needle(lm, 8400)
    try:
        QTTTRun(lm, over, QTTTConfig(steps=1)).prepare()
        res["long_over_limit_error"] = None
    except memory_guard.ContextLengthError as exc:
        res["long_over_limit_error"] = str(exc)
    return res


def _cos(a: dict, b: dict) -> float:
    va = torch.cat([a[k].reshape(-1) for k in sorted(a)]).double()
    vb = torch.cat([b[k].reshape(-1) for k in sorted(b)]).double()
    return float(va @ vb / (va.norm() * vb.norm()))


def _needle_prompt(lm, tokens: int, seed: int):
    from ttt_core.generators import needle_haystack

    words = int(tokens * 0.78)
    for _ in range(20):
        p = needle_haystack(seed, n_words=words, position=0.3)
        n = len(lm.tokenizer(p.full_text(), add_special_tokens=False)["input_ids"])
        if abs(n - tokens) <= 16:
            return p, n
        words = int(words * tokens / n)
    return p, n


def _default_run(lm) -> dict:
    from ttt_core.qttt import QTTTConfig, QTTTRun

    p, n = _needle_prompt(lm, 1024, seed=0)
    t = time.perf_counter()
    run = QTTTRun(lm, p, QTTTConfig())
    base = run.prepare()
    recs = run.run_to_end()
    total = time.perf_counter() - t
    return {"default_run_s": round(total, 2), "default_run_tokens": n, "default_run_steps": len(recs),
            "default_run_status": run.status, "default_run_prefill_s": round(base.elapsed_s, 2),
            "default_run_mean_step_s": round(statistics.mean(r.wall_s for r in recs), 3),
            "default_run_answer_nll": [round(base.answer_nll, 4), round(recs[-1].answer_nll, 4)],
            "default_run_needle_mass": [round(base.needle_mass, 5), round(recs[-1].needle_mass, 5)]}


def _lr_sweep(lm, lrs=(1e-5, 3e-5, 1e-4, 3e-4, 1e-3), seeds=(0, 1)) -> list[dict]:
    """Per (seed, lr): context NLL and answer NLL before/after 32 default steps."""
    from ttt_core.qttt import QTTTConfig, QTTTRun

    rows = []
    for seed in seeds:
        p, n = _needle_prompt(lm, 1024, seed=seed)
        for lr in lrs:
            run = QTTTRun(lm, p, QTTTConfig(lr=lr, seed=seed))
            base = run.prepare()
            ctx0 = run.context_nll({})
            run.run_to_end()
            last = run.records[-1]
            rows.append({"seed": seed, "tokens": n, "lr": lr, "status": run.status,
                         "context_nll": [round(ctx0, 4), round(run.context_nll(), 4)],
                         "answer_nll": [round(base.answer_nll, 4), round(last.answer_nll, 4)],
                         "needle_mass": [round(base.needle_mass, 5), round(last.needle_mass, 5)],
                         "max_delta_norm": round(max(run.delta_norms()), 4)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, nargs="*", default=[512, 1024, 2048])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-default-run", action="store_true")
    ap.add_argument("--lr-sweep", action="store_true")
    ap.add_argument("--lr-sweep-only", action="store_true", help="run only the learning-rate sweep")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "T"))
    ap.add_argument("--long", action="store_true", help="only the long-context section (module docstring)")
    ap.add_argument("--long-full", action="store_true", help="--long: also the full-context step at T = 8192")
    ap.add_argument("--run-child", nargs=2, metavar=("TOKENS", "STEPS"))
    args = ap.parse_args()
    if args.child:
        _child(args.child[0], int(args.child[1]))
        return
    if args.run_child:
        _run_child(int(args.run_child[0]), int(args.run_child[1]))
        return
    _setup_torch()
    if args.long:
        res = {"bench": "qttt_step --long", "threads": THREADS, "span": SPAN, "repeats": args.repeats,
               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "load_average_start": round(os.getloadavg()[0], 2)}
        res.update(_long(args))
        res["load_average_end"] = round(os.getloadavg()[0], 2)
        print(json.dumps(res))
        return
    if args.lr_sweep_only:
        print(json.dumps({"lr_sweep": _lr_sweep(_load()), "threads": THREADS}))
        return
    from torch.utils.flop_counter import FlopCounterMode

    from kernels import backend_label

    res: dict = {"bench": "qttt_step", "model": "SmolLM2-135M-Instruct (embedded)", "threads": THREADS, "span": SPAN,
                 "kernel_backend": backend_label(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                 "load_average_start": round(os.getloadavg()[0], 2)}
    res["matmul_fp32_gflops"] = round(_matmul_gflops(), 1)
    lm = _load()
    cfg = lm.model.config
    L, d, dff = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    for T in args.T:
        st = Step(lm, _context_ids(lm, T))
        res[f"prefill_s_T{T}"] = round(st.prefill(), 3)
        tq = _timeit(lambda: st.step("qttt"), args.repeats)
        tf = _timeit(lambda: st.step("full"), args.repeats)
        with FlopCounterMode(display=False) as fc:
            st.grads_qttt()
        fq = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            st.grads_full()
        ff = fc.get_total_flops()
        design = 2 * (2 * L * d * SPAN * T + (2 + 2 * dff / d) * L * SPAN * d * d)
        res[f"qttt_step_s_T{T}"] = round(tq, 3)
        res[f"full_step_s_T{T}"] = round(tf, 3)
        res[f"speedup_T{T}"] = round(tf / tq, 2)
        res[f"qttt_gflop_counted_T{T}"] = round(fq / 1e9, 2)
        res[f"full_gflop_counted_T{T}"] = round(ff / 1e9, 2)
        res[f"qttt_gflop_design_T{T}"] = round(design / 1e9, 2)
        res[f"qttt_gflops_achieved_T{T}"] = round(fq / tq / 1e9, 1)
        res[f"qttt_fraction_of_matmul_peak_T{T}"] = round(fq / tq / 1e9 / res["matmul_fp32_gflops"], 3)
        res[f"grad_cosine_T{T}"] = round(_cos(st.grads_qttt()[1], st.grads_full()[1]), 4)
        print(f"T={T}: qTTT {tq:.3f}s full {tf:.3f}s speedup {tf / tq:.2f}×", file=sys.stderr, flush=True)
        del st
    if not args.no_memory:
        for T in args.T:
            mq, mf = _memory("qttt", T), _memory("full", T)
            res[f"qttt_step_mem_mb_T{T}"] = round(mq["step_extra_mb"], 1)
            res[f"full_step_mem_mb_T{T}"] = round(mf["step_extra_mb"], 1)
            res[f"mem_ratio_T{T}"] = round(mf["step_extra_mb"] / max(mq["step_extra_mb"], 1e-9), 2)
            res[f"step_peak_rss_mb_T{T}"] = {"qttt": round(mq["step_peak_mb"], 1), "full": round(mf["step_peak_mb"], 1)}
            res[f"setup_peak_rss_mb_T{T}"] = {"qttt": round(mq["setup_peak_mb"], 1), "full": round(mf["setup_peak_mb"], 1)}
        res["memory_method"] = ("peak RSS (VmHWM) of a fresh subprocess per (mode, T), reset just before one step; "
                                "step_mem = VmHWM − VmRSS before the step")
    if not args.no_default_run:
        res.update(_default_run(lm))
    if args.lr_sweep:
        res["lr_sweep"] = _lr_sweep(lm)
    res["load_average_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
