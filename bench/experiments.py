"""Seconds per experiment task, today's path against the previous one, in the same run (issue 16.1).

Two tasks on the embedded SmolLM2-135M:
* few-shot: one paper digit-shift task (`experiments.paper_tasks.paper_task`), LOO paper GD on the
  W_V heads of the last 4 layers for T = 0…30 (one trajectory), ρ = c/λ_max (c = 0.1) of those
  heads' kernel: kernel + one trajectory is the unit of Exp1 and of the calibration suite (today's
  path, as `experiments.reproduce.run_task`: the kernel of layers ≥ L−4 only, whose hidden states
  entering layer L−4 the trajectory then reuses);
* needle: a ≈1k-token needle-in-a-haystack prompt, 16 qTTT steps (span 128, lr 1e-4) with the
  answer NLL recorded at every step.
Today's qTTT path runs its step loop inside `cpu_threads.gemm_threads_only()` (element-wise ATen work on
one thread, MKL matrix products on all: far fewer OpenMP wake-ups under OMP_WAIT_POLICY=PASSIVE,
which the app and this bench use); it is also run with that switched off
(TTT_LENS_GEMM_THREADS_ONLY=0, `*_threads_off`), so its own share of the speed-up is measured.
The previous path is the code of commit PREVIOUS (before the redesign: `evidence.compute_evidence`
and `reproduce.LooGD`, the old `qttt.QTTTRun`), checked out into a temporary git worktree and run
in a subprocess with the same Python; today's path runs in another subprocess. Each task runs
REPEATS times per path (medians reported); the records (query error over T, answer NLL over
steps) of both paths are compared (`records_max_abs_diff`).

Usage: python bench/experiments.py [--repeats 3] [--previous COMMIT]
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PREVIOUS = "ef48b10"

# One task of each kind, printed as JSON: {"fewshot": {...}, "needle": {...}}. Runs against whichever
# ttt_core is first on sys.path (the worktree of the previous commit, or this clone).
TASK_SCRIPT = r'''
import json, sys, time
import numpy as np
import torch
torch.set_num_threads(int(sys.argv[2]))
which = sys.argv[1]
from ttt_core.models import load_model
from ttt_core.generators import needle_haystack
lm = load_model()
out = {}
if which == "previous":
    from ttt_core.evidence import compute_evidence as kernel_of
    from ttt_core.reproduce import LooGD, paper_task
    from ttt_core.qttt import QTTTConfig, QTTTRun
    def kernel(p):
        return kernel_of(lm, p, "v")
    def trajectory(p, kind, blocks, rho, steps):
        return LooGD(lm, p, kind, blocks).run(rho, steps)
else:
    from ttt_core.prompt_kernel import compute_prompt_kernel as kernel_of
    from ttt_core.experiments.paper_tasks import paper_task
    from ttt_core.paper_gd import gd_trajectory
    from ttt_core.qttt import QTTTConfig, QTTTRun
    store = {}   # as experiments.reproduce.run_task: the kernel's layers ≥ L−4 only, hidden states shared
    def kernel(p):
        return kernel_of(lm, p, "v", first_layer=lm.adapter.n_layers - 4, shared=store)
    def trajectory(p, kind, blocks, rho, steps):
        return gd_trajectory(lm, p, kind, blocks, rho, steps, store)
from ttt_core.steps import block_kernel, select_blocks, theory_curves
task = paper_task(2606, int(sys.argv[3]))
p = task.prompt
t0 = time.perf_counter()
ev = kernel(p)
blocks = select_blocks(ev, 4)
K, kx = block_kernel(ev, blocks)
tc = theory_curves(K, ev.residuals, kx, ev.query.value, ev.query.target, 0.1, np.arange(31.0))
t1 = time.perf_counter()
gd = trajectory(p, "v", blocks, tc.rho, 30)
t2 = time.perf_counter()
out["fewshot"] = {"seconds": t2 - t0, "kernel_s": t1 - t0, "trajectory_s": t2 - t1,
                  "error": [float(x) for x in gd["error"]]}
prompt = needle_haystack(np.random.default_rng(int(sys.argv[3])), n_words=700)
t0 = time.perf_counter()
run = QTTTRun(lm, prompt, QTTTConfig(steps=16, span=128, lr=1e-4, seed=0))
recs = [run.prepare()] + run.run_to_end()
t1 = time.perf_counter()
out["needle"] = {"seconds": t1 - t0, "tokens": int(run.enc.ids.shape[1]),
                 "answer_nll": [float(r.answer_nll) for r in recs]}
print("RESULT " + json.dumps(out))
'''


def run_path(pythonpath: Path, which: str, threads: int, index: int, extra_env: dict | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(extra_env or {})}
    proc = subprocess.run([sys.executable, "-c", TASK_SCRIPT, which, str(threads), str(index)], cwd=str(pythonpath),
                          env=env, capture_output=True, text=True, timeout=3600)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"{which} path failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--previous", default=PREVIOUS)
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        wt = Path(tmp) / "previous"
        subprocess.run(["git", "worktree", "add", "--detach", str(wt), args.previous], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            res: dict[str, list[dict]] = {"previous": [], "current": [], "threads_off": []}
            for i in range(args.repeats):
                for which, path, env in (("previous", wt, None), ("current", ROOT, None),
                                         ("threads_off", ROOT, {"TTT_LENS_GEMM_THREADS_ONLY": "0"})):
                    t0 = time.perf_counter()
                    r = run_path(path, "previous" if which == "previous" else "current", args.threads, i, env)
                    res[which].append(r)
                    print(f"{which} task {i}: few-shot {r['fewshot']['seconds']:.2f} s "
                          f"(kernel {r['fewshot']['kernel_s']:.2f} s + trajectory {r['fewshot']['trajectory_s']:.2f} s), "
                          f"needle {r['needle']['seconds']:.2f} s at {r['needle']['tokens']} tokens "
                          f"(process {time.perf_counter() - t0:.0f} s)", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(wt)], cwd=ROOT, capture_output=True)
    out = {"bench": "experiments", "model": "SmolLM2-135M-Instruct (embedded)", "threads": args.threads,
           "repeats": args.repeats, "previous_commit": args.previous, "load_avg_1min_at_start": round(load0, 2)}
    diffs = []
    for kind, key in (("fewshot", "error"), ("needle", "answer_nll")):
        prev = float(np.median([r[kind]["seconds"] for r in res["previous"]]))
        cur = float(np.median([r[kind]["seconds"] for r in res["current"]]))
        name = "fewshot" if kind == "fewshot" else "needle"
        out[f"{name}_task_s"] = round(cur, 3)
        out[f"{name}_task_s_previous"] = round(prev, 3)
        out[f"{name}_speedup_vs_previous"] = round(prev / cur, 2)
        off = float(np.median([r[kind]["seconds"] for r in res["threads_off"]]))
        out[f"{name}_task_s_threads_off"] = round(off, 3)
        out[f"{name}_gemm_threads_only_speedup"] = round(off / cur, 2)
        for a, b in zip(res["previous"], res["current"]):
            diffs.append(float(np.max(np.abs(np.asarray(a[kind][key]) - np.asarray(b[kind][key])))))
        out[f"{name}_records_max_abs_diff_threads_off"] = max(
            float(np.max(np.abs(np.asarray(a[kind][key]) - np.asarray(b[kind][key]))))
            for a, b in zip(res["current"], res["threads_off"]))
        if kind == "fewshot":
            out["fewshot_kernel_s"] = round(float(np.median([r[kind]["kernel_s"] for r in res["current"]])), 3)
            out["fewshot_trajectory_s"] = round(float(np.median([r[kind]["trajectory_s"] for r in res["current"]])), 3)
        else:
            out["needle_tokens"] = res["current"][0]["needle"]["tokens"]
    out["speedup_vs_previous"] = {"fewshot": out["fewshot_speedup_vs_previous"],
                                  "needle": out["needle_speedup_vs_previous"]}
    out["records_max_abs_diff"] = max(diffs)
    out["load_avg_1min_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
