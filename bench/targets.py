"""Benchmark of the adaptation targets (issue 12) on SmolLM2-135M with a 256-position prompt.

For every target (`ttt_core.targets`): the kernel build seconds (`compute_prompt_kernel(lm,
prompt, target, max_positions=256)`, median of `--repeats`) and the seconds of one TTT step
(`targets.TargetRun`, NLL signal, span 128, the median step of a `--steps`-step run, repeated),
with the counted FLOPs of one step and the route. The prompt is a needle haystack whose context
gives ≥ 256 supervised positions (the kernel keeps the last 256). The 1-minute load average is
printed beside each case (the machine is shared: seconds are only comparable at similar load).

The last line printed is one JSON object: per target {"kernel_s", "step_s", "flops_per_step",
"route", "params", "n"} (or {"error"}), plus "load_avg_1min", "torch_threads", "kernel_s_max",
"all_kernels_within_10s".
Each target runs in its own process (a target the OS kills for memory is reported as such).
Usage: python bench/targets.py [--quick] [--repeats R] [--steps S] [--targets q,v,...]
       python bench/targets.py --baseline-n N [--targets v,o]
       python bench/targets.py --kv frozen [--repeats R] [--frozen-baseline-n N] [--targets o,mlp_up,...]
  --quick: targets q, mlp_gate, lora:q:8 and norm_attn, 1 repeat, 3 steps.
  --baseline-n N (only this section runs): the exact per-output kernel at N positions against the
  obvious baseline measured in the same process: for each output, one forward and one backward of
  the whole text with zero weight deltas on every layer (parameter gradients), K = ΦΦᵀ. Linear
  targets only (the baseline needs weight deltas; it holds Φ, n × parameters fp32: 5 GB for W_O at
  N = 128). Final JSON line: per target
  {"kernel_s", "baseline_s", "speedup", "rel_diff"}.
  --kv frozen (only this section runs): the frozen-K/V kernels (`compute_prompt_kernel(...,
  kv="frozen")`: the kernel of the qTTT-style update of each target, one backward for all
  positions) at 256 positions, median of --repeats; for o, mlp_up and mlp_down also at N positions
  (default 32) against the obvious baseline in the same process: a prefill, then each output's row
  alone against the frozen cache with zero weight deltas and one backward, K = ΦΦᵀ. Final JSON
  line: per target {"kernel_s", "n", "route"} (+ "baseline_s", "speedup", "rel_diff"),
  "kernel_s_max", "all_frozen_kernels_within_10s".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ttt_core.generators import needle_haystack  # noqa: E402
from ttt_core.models import load_model  # noqa: E402
from ttt_core.prompt_kernel import compute_prompt_kernel  # noqa: E402
from ttt_core.targets import DEFAULT_TARGETS, TargetConfig, TargetRun  # noqa: E402
from ttt_core.targets.measure import count_step_flops  # noqa: E402

QUICK_TARGETS = ("q", "mlp_gate", "lora:q:8", "norm_attn")


def load() -> float:
    return round(os.getloadavg()[0], 2)


def bench_target(lm, prompt, target: str, repeats: int, steps: int) -> dict:
    out: dict = {"target": target}
    ks = []
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            ev = compute_prompt_kernel(lm, prompt, target, max_positions=256)
            ks.append(time.perf_counter() - t0)
        out.update(kernel_s=round(float(np.median(ks)), 3), n=ev.n, kernel_route=ev.route)
    except Exception as exc:  # noqa: BLE001 — a missing kernel is a result, not a crash
        out["kernel_error"] = f"{type(exc).__name__}: {exc}"
    st = []
    try:
        for _ in range(repeats):
            run = TargetRun(lm, prompt, TargetConfig(target=target, steps=steps, span=128))
            recs = run.run_to_end()
            st.append(float(np.median([r.step_s for r in recs if r.status == "ok"])))
        out.update(step_s=round(float(np.median(st)), 4), route=run.route, params=run.params.n_params,
                   flops_per_step=count_step_flops(run))
    except Exception as exc:  # noqa: BLE001
        out["step_error"] = f"{type(exc).__name__}: {exc}"
    out["load_avg_1min"] = load()
    print(json.dumps(out), flush=True)
    return out


def baseline_kernel(lm, prompt, target: str, max_positions: int) -> np.ndarray:
    """The obvious per-output baseline (module docstring): (n, n) K over the n supervised positions."""
    from ttt_core.encoding import encode_long_context
    from ttt_core.readout import token_prob

    li = encode_long_context(lm, prompt, max_positions)
    ids = torch.tensor(li.ids)[None]
    a = lm.adapter
    rows = []
    for p, t in zip(li.positions, li.targets):
        d = {(l, target): torch.zeros(a.spec(l, target).out_features, a.spec(l, target).in_features,
                                      requires_grad=True) for l in range(a.n_layers)}
        with a.apply(deltas=d):
            s = token_prob(lm.model(input_ids=ids, logits_to_keep=torch.tensor([p])).logits[0], torch.tensor([t]))
        g = torch.autograd.grad(s.sum(), list(d.values()))
        rows.append(torch.cat([x.reshape(-1) for x in g]))
    Phi = torch.stack(rows)                                   # (n, params) fp32: n·params·4 bytes
    del rows
    return (Phi @ Phi.T).double().numpy()


def baseline_section(lm, prompt, targets: list[str], n: int) -> dict:
    out: dict = {}
    for t in targets:
        t0 = time.perf_counter()
        ev = compute_prompt_kernel(lm, prompt, t, max_positions=n)
        new_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        Kb = baseline_kernel(lm, prompt, t, n)
        base_s = time.perf_counter() - t0
        r = {"n": ev.n, "kernel_s": round(new_s, 2), "baseline_s": round(base_s, 2),
             "speedup": round(base_s / new_s, 2),
             "rel_diff": float(np.linalg.norm(ev.K - Kb) / np.linalg.norm(Kb)), "load_avg_1min": load()}
        print(json.dumps({"target": t, **r}), flush=True)
        out[t] = r
    return out


FROZEN_TARGETS = ("o", "mlp_up", "mlp_gate", "mlp_down", "lora:o:8", "norm_attn", "norm_mlp")
FROZEN_BASELINE_TARGETS = ("o", "mlp_up", "mlp_down")


def frozen_baseline_kernel(lm, prompt, target: str, max_positions: int) -> np.ndarray:
    """The obvious baseline of the frozen-K/V kernel: a prefill (no grad), then for each output its
    row alone against the frozen cache (`attention.forward_with_frozen_kv`) with zero weight deltas
    on every layer, one backward each (parameter gradients), K = ΦΦᵀ."""
    from ttt_core.attention import forward_with_frozen_kv, prefill
    from ttt_core.encoding import encode_long_context
    from ttt_core.readout import token_prob

    li = encode_long_context(lm, prompt, max_positions)
    ids = torch.tensor(li.ids)[None]
    a = lm.adapter
    with torch.no_grad():
        _, cache = prefill(lm.model, ids)
    rows = []
    for p, t in zip(li.positions, li.targets):
        d = {(l, target): torch.zeros(a.spec(l, target).out_features, a.spec(l, target).in_features,
                                      requires_grad=True) for l in range(a.n_layers)}
        with a.apply(deltas=d):
            logits = forward_with_frozen_kv(lm.model, ids[:, p:p + 1], cache, p).logits[0]
            s = token_prob(logits, torch.tensor([t]))
        g = torch.autograd.grad(s.sum(), list(d.values()))
        rows.append(torch.cat([x.reshape(-1) for x in g]))
    Phi = torch.stack(rows)
    del rows
    return (Phi @ Phi.T).double().numpy()


def frozen_section(lm, prompt, targets: list[str], repeats: int, baseline_n: int) -> dict:
    """``--kv frozen``: each target's frozen-K/V kernel at 256 positions (median of `repeats`), and
    for the linear targets in FROZEN_BASELINE_TARGETS the kernel at `baseline_n` positions against
    `frozen_baseline_kernel` in the same process (speedup, rel. diff)."""
    out: dict = {}
    for t in targets:
        ks = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            ev = compute_prompt_kernel(lm, prompt, t, max_positions=256, kv="frozen")
            ks.append(time.perf_counter() - t0)
        r = {"n": ev.n, "route": ev.route, "kernel_s": round(float(np.median(ks)), 3)}
        if t in FROZEN_BASELINE_TARGETS and baseline_n:
            t0 = time.perf_counter()
            ev_b = compute_prompt_kernel(lm, prompt, t, max_positions=baseline_n, kv="frozen")
            new_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            Kb = frozen_baseline_kernel(lm, prompt, t, baseline_n)
            base_s = time.perf_counter() - t0
            r.update(baseline_n=ev_b.n, kernel_s_at_baseline_n=round(new_s, 3), baseline_s=round(base_s, 3),
                     speedup=round(base_s / new_s, 2),
                     rel_diff=float(np.linalg.norm(ev_b.K - Kb) / np.linalg.norm(Kb)))
        r["load_avg_1min"] = load()
        print(json.dumps({"target": t, **r}), flush=True)
        out[t] = r
    return out


def _child(target: str, repeats: int, steps: int) -> dict:
    """One target in a fresh process: a target that the OS kills for memory (no Python exception,
    no message) is then a result of this bench, not the end of it."""
    import subprocess

    cmd = [sys.executable, __file__, "--one", target, "--repeats", str(repeats), "--steps", str(steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        out = json.loads(lines[-1])
        print(lines[-1], flush=True)                 # progress: one line per target as it finishes
    else:
        why = (f"killed by signal {-proc.returncode} (the OS ends a process that runs out of memory this way)"
               if proc.returncode < 0 else f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
        out = {"target": target, "error": why, "load_avg_1min": load()}
        print(json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--targets", default=None)
    ap.add_argument("--one", default=None, help="(internal) run one target in this process")
    ap.add_argument("--baseline-n", type=int, default=None)
    ap.add_argument("--kv", choices=["frozen"], default=None,
                    help="only this section: frozen-K/V kernels at 256 positions (+ baseline at --frozen-baseline-n)")
    ap.add_argument("--frozen-baseline-n", type=int, default=32)
    args = ap.parse_args()
    if args.kv == "frozen":
        lm = load_model()
        ts = [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else list(FROZEN_TARGETS)
        load_start = load()
        res = frozen_section(lm, needle_haystack(0, n_words=260), ts, args.repeats, args.frozen_baseline_n)
        ks = [r["kernel_s"] for r in res.values()]
        print(json.dumps({"bench": "targets_frozen_kv", "model": lm.name, "targets": res, "kernel_s_max": max(ks),
                          "all_frozen_kernels_within_10s": max(ks) <= 10.0, "load_avg_1min_at_start": load_start,
                          "load_avg_1min": load(), "torch_threads": torch.get_num_threads()}), flush=True)
        return
    if args.baseline_n:
        lm = load_model()
        ts = [t.strip() for t in (args.targets or "v,o").split(",") if t.strip()]
        load_start = load()
        res = baseline_section(lm, needle_haystack(0, n_words=260), ts, args.baseline_n)
        print(json.dumps({"bench": "targets_baseline", "model": lm.name, "n": args.baseline_n, "targets": res,
                          "load_avg_1min_at_start": load_start, "load_avg_1min": load(),
                          "torch_threads": torch.get_num_threads()}), flush=True)
        return
    if args.one:
        lm = load_model()
        bench_target(lm, needle_haystack(0, n_words=260), args.one, args.repeats, args.steps)
        return
    targets = list(QUICK_TARGETS) if args.quick else list(DEFAULT_TARGETS) + ["lora:q:4", "lora:q:16"]
    if args.targets:
        targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    repeats, steps = (1, 3) if args.quick else (args.repeats, args.steps)
    load_start = load()
    res = {t: _child(t, repeats, steps) for t in targets}
    ks = [r["kernel_s"] for r in res.values() if "kernel_s" in r]
    final = {"bench": "targets", "model": load_model().name, "quick": bool(args.quick), "repeats": repeats,
             "steps": steps, "targets": {t: {k: v for k, v in r.items() if k != "target"} for t, r in res.items()},
             "kernel_s_max": max(ks) if ks else None,
             "all_kernels_within_10s": bool(ks) and len(ks) == len(res) and max(ks) <= 10.0,
             "load_avg_1min_at_start": load_start, "load_avg_1min": load(), "torch_threads": torch.get_num_threads()}
    print(json.dumps(final), flush=True)


if __name__ == "__main__":
    main()
