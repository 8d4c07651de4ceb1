"""Score validation (DESIGN §6): do top-scored heads reduce the query error more than random heads?

Runs `ttt_core.experiments.score_validation.run_task` on generated digit-shift tasks (default: 50
tasks, SmolLM2, W_Q heads, top-k = 3, c = 0.5) and prints one JSON line per task then a final JSON
line with the aggregates (Spearman ρ between score and measured one-step gain, mean gains of top-k vs
random with bootstrap CIs). Usage:

    python bench/score_validation.py [--tasks 50] [--subspace q] [--top-k 3] [--c 0.5] [--model NAME]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ttt_core.experiments.score_validation import run_task, summarize  # noqa: E402
from ttt_core.models import EMBEDDED_MODEL, load_model  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=50)
    ap.add_argument("--subspace", default="q", choices=["q", "k", "v", "o", "mlp_up", "mlp_down"])
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--c", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=EMBEDDED_MODEL)
    ap.add_argument("--sample", type=int, default=32, help="random blocks evaluated per task (Spearman, random picks)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    t0 = time.perf_counter()
    tasks = []
    for i in range(args.tasks):
        t = run_task(lm, args.seed + i, args.subspace, args.c, args.top_k, args.sample)
        tasks.append(t)
        top = np.argsort(-t.query_aware)[:args.top_k]
        print(json.dumps({"task": i, "noise": t.noise, "base_error": round(t.base_error, 5),
                          "gain_top_qa": round(float(t.gain[top].mean()), 6),
                          "gain_random": round(float(t.gain[t.random_pick].mean()), 6),
                          "best_gain": round(float(np.nanmax(t.gain)), 6)}), flush=True)
    out = {"model": lm.name, "n_tasks": args.tasks, "subspace": args.subspace, "top_k": args.top_k, "c": args.c,
           "blocks_per_task": int(tasks[0].gain.size), "blocks_sampled": int(tasks[0].sample.size), "seconds": round(time.perf_counter() - t0, 1),
           **summarize(tasks, args.top_k)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
