"""TTT Lens command line.

    python -m ttt_core prepare            convert the embedded SmolLM2 once (safetensors cache)
    python -m ttt_core info [--model M]   print the model card as JSON
    python -m ttt_core diagnose FILE|-    one JSON (or --format md) report: when / how far / which
    python -m ttt_core reproduce [...]    the paper's experiments (ttt_core.reproduce), JSON + Markdown
    python -m ttt_core train-controller [--tasks N] [--lambda L] [--out DIR]
                                          schedule suite + learned step controller (ttt_core.controller)

Errors go to stderr with a non-zero exit code.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any, Callable

from ttt_core.models import EMBEDDED_MODEL, ModelLoadError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}  # filled at the end of the module


def _prepare(args: argparse.Namespace) -> int:
    from ttt_core.models import convert_embedded

    t0 = time.perf_counter()
    folder = convert_embedded()
    print(f"embedded model ready in {folder} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0


def _info(args: argparse.Namespace) -> int:
    from ttt_core.models import load_model

    lm = load_model(args.model, trust_remote_code=args.trust_remote_code)
    print(json.dumps(lm.card(), indent=2))
    return 0


# --------------------------------------------------------------------------------------------
# diagnose
# --------------------------------------------------------------------------------------------


def _clean(o: Any) -> Any:
    """JSON-safe copy: numpy → Python, non-finite floats → None."""
    import numpy as np

    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, np.ndarray):
        return _clean(o.tolist())
    if isinstance(o, (np.floating, float)):
        return float(o) if math.isfinite(float(o)) else None
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, np.bool_):
        return bool(o)
    return o


def diagnose_report(lm: Any, prompt: Any, *, subspace: str = "q", c: float = 0.1, grid: int = 30,
                    delta: float = 0.05, top_k: int = 8, last_layers: int | None = None,
                    max_positions: int = 256) -> dict[str, Any]:
    """The `diagnose` report (keys documented in README.md, section "diagnose report").

    When: plug-in TTT-vs-ICL query Bayes gap (prompt-value excess risk without a query).
    How far: evidence curves ℓ_T (fixed σ̂, profiled σ), T_MAP, plug-in PAC-Bayes slack.
    Which: Query-Aware / Trace scores of every block of the subspace and the recommended top-k.
    The kernel is that of every block of the subspace (or of the last `last_layers` layers)."""
    import numpy as np
    import torch
    import transformers

    import ttt_core
    from ttt_core.evidence import SUBSPACES, compute_evidence
    from ttt_core.scores import score_blocks
    from ttt_core.spectrum import compute_spectrum
    from ttt_core.steps import StepsSettings, block_kernel, compute_steps, select_blocks

    t0 = time.perf_counter()
    ev = compute_evidence(lm, prompt, subspace, max_positions=max_positions)
    t1 = time.perf_counter()
    st = StepsSettings(subspace=subspace, c=c, grid_max=grid, delta=delta, last_layers=last_layers, measure=False)
    rep = compute_steps(lm, prompt, st, ev=ev)
    blocks = select_blocks(ev, last_layers)
    K, kx = block_kernel(ev, blocks)
    tc, b = rep.theory, rep.bounds
    spec = compute_spectrum(K, ev.residuals, kx, T=float(tc.t_map_fixed), c=c, T_grid=tc.T_grid,
                            tau2_sigma2=(tc.tau2, tc.sigma2))
    t2 = time.perf_counter()
    has_q = ev.head_couplings is not None
    sc = score_blocks(ev, greedy_budget=top_k if has_q else 0, greedy_c=c)
    rank_by = "Query-Aware" if has_q else "Trace"
    ranked = sc.ranked(rank_by)
    t3 = time.perf_counter()
    q = ev.query
    tm = tc.t_map_fixed
    lam = tc.lam
    return _clean({
        "ttt_lens_diagnose": 1,
        "model": lm.name,
        "prompt_kind": ev.prompt_kind,
        "n_positions": ev.n,
        "subspace": subspace,
        "subspace_label": SUBSPACES[subspace],
        "blocks": rep.blocks_label,
        "route": ev.route,
        "query": None if q is None else {"label": q.label, "value": q.value, "target": q.target, "error": q.error,
                                         "nll": q.nll},
        "query_note": ev.query_note,
        "eigenvalues": lam,
        "effective_rank": {"entropy": spec.eff_rank_entropy, "participation_ratio": spec.participation_ratio},
        "tau2": tc.tau2,
        "sigma2": tc.sigma2,
        "lambda_star": tc.lambda_star,
        "snr": spec.snr,
        "c": c,
        "rho": tc.rho,
        "lambda_max": float(lam[0]) if lam.size else 0.0,
        "t_map": tm,
        "when": {"criterion": spec.criterion, "T": tm, "beats": spec.beats, "gap_ttt": spec.gap_ttt,
                 "gap_icl": spec.gap_icl, "best_T_plug_in": spec.best_T, "gap_grid": spec.gap_grid,
                 "verdict": spec.verdict, "plug_in": True},
        "how_far": {"T_grid": tc.T_grid.astype(int).tolist(), "ell_fixed": tc.ell_fixed, "ell_profiled": tc.ell_profiled,
                    "sigma2_hat": tc.sigma2_hat, "t_map_fixed": tc.t_map_fixed, "t_map_profiled": tc.t_map_profiled,
                    "pac_bayes": {"plug_in": True, "label": "plug-in PAC-Bayes bound (estimate), Σ⋆ ≈ τ̂²K + σ̂²I",
                                  "delta": delta, "v_bar": b.v_bar, "slack": b.slack,
                                  "bound_at_t_map": float(tc.ell_fixed[int(np.argmin(tc.ell_fixed))] + b.slack)}},
        "which": {"ranked_by": rank_by, "sigma2": sc.sigma2, "sigma2_source": sc.sigma2_source,
                  "top_k": [r["block"] for r in ranked[:top_k]],
                  "greedy_query_aware": None if not sc.greedy else [ev.block_label(g.block) for g in sc.greedy],
                  "scores": ranked},
        "verdict": rep.verdict,
        "unavailable": rep.unavailable,
        "timings": {"evidence_s": t1 - t0, "spectrum_steps_s": t2 - t1, "scores_s": t3 - t2, "total_s": t3 - t0},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "ttt_lens": ttt_core.__version__},
    })


def diagnose_markdown(r: dict[str, Any]) -> str:
    """Human summary of a diagnose report."""
    def f(x: Any) -> str:
        return "∞" if x is None else (f"{x:.4g}" if isinstance(x, float) else str(x))

    w, h, wh, v = r["when"], r["how_far"], r["which"], r["verdict"]
    pb = h["pac_bayes"]
    lines = [
        f"# TTT Lens diagnosis — {r['model']}",
        "",
        f"* Prompt: {r['prompt_kind'].replace('_', ' ')}, n = {r['n_positions']} supervised positions; "
        f"subspace {r['subspace_label']} ({r['blocks']}).",
        f"* Spectrum: λ_max = {f(r['lambda_max'])}, effective rank {r['effective_rank']['entropy']:.2f}; "
        f"τ² = {f(r['tau2'])}, σ² = {f(r['sigma2'])}, λ⋆ = σ²/τ² = {f(r['lambda_star'])}.",
        f"* **Verdict: {v['text']}**",
        "",
        "## When",
        f"{w['verdict']}: {w['criterion']} TTT {f(w['gap_ttt'])} vs ICL {f(w['gap_icl'])} at T = {w['T']}; "
        f"lowest plug-in gap on the grid at T = {f(w['best_T_plug_in'])}.",
        "",
        "## How far",
        f"T_MAP = {h['t_map_fixed']} (fixed σ̂² = {f(h['sigma2_hat'])}), {h['t_map_profiled']} (σ profiled); "
        f"ρ = c/λ_max = {f(r['rho'])} (c = {r['c']}). {pb['label']}: slack {f(pb['slack'])} at δ = {pb['delta']} "
        f"(v̄ = {f(pb['v_bar'])}), bound {f(pb['bound_at_t_map'])}.",
        "",
        "## Which",
        f"Top {len(wh['top_k'])} by {wh['ranked_by']}: {', '.join(wh['top_k'])}.",
    ]
    if wh.get("greedy_query_aware"):
        lines.append(f"Greedy Query-Aware order: {', '.join(wh['greedy_query_aware'])}.")
    if r.get("query_note"):
        lines += ["", f"Note: {r['query_note']}"]
    if r.get("unavailable"):
        lines += ["", "Not available: " + "; ".join(f"{k} — {why}" for k, why in r["unavailable"].items())]
    lines += ["", f"Timings: {r['timings']['total_s']:.1f} s. Versions: "
              + ", ".join(f"{k} {val}" for k, val in r["versions"].items()) + "."]
    return "\n".join(lines) + "\n"


def _diagnose(args: argparse.Namespace) -> int:
    from ttt_core.models import load_model
    from ttt_core.prompts import PromptParseError, fit_to_token_limit, parse_prompt

    try:
        text = sys.stdin.read() if args.prompt_file == "-" else open(args.prompt_file, encoding="utf-8").read()
    except OSError as exc:
        print(f"error: cannot read prompt file {args.prompt_file!r}: {exc}", file=sys.stderr)
        return 2
    try:
        prompt = parse_prompt(text)
    except PromptParseError as exc:
        print(f"error: cannot parse the prompt: {exc}", file=sys.stderr)
        return 2
    lm = load_model(args.model, trust_remote_code=args.trust_remote_code)
    prompt, note = fit_to_token_limit(prompt, lm.tokenizer, args.max_tokens)
    if note:
        print(f"warning: {note}", file=sys.stderr)
    report = diagnose_report(lm, prompt, subspace=args.subspace, c=args.c, grid=args.grid, delta=args.delta,
                             top_k=args.top_k, last_layers=args.last_layers, max_positions=args.max_positions)
    if args.format == "md":
        sys.stdout.write(diagnose_markdown(report))
    else:
        print(json.dumps(report, indent=1, ensure_ascii=False))
    return 0


# --------------------------------------------------------------------------------------------
# reproduce
# --------------------------------------------------------------------------------------------


def _reproduce(args: argparse.Namespace) -> int:
    from ttt_core.reproduce import ReproSettings, run_reproduction, to_markdown, write_results

    s = ReproSettings(model=args.model, tasks=args.tasks, seed=args.seed, grid_max=args.grid, c=args.c,
                      fixed_T=args.fixed_T, exp1_kinds=tuple(k.strip() for k in args.kinds.split(",") if k.strip()),
                      last_layers=args.last_layers, exp2=args.exp2, exp2_layers=args.exp2_layers,
                      exp2_budgets=tuple(int(b) for b in args.budgets.split(",")), exp2_gd_tasks=args.exp2_gd_tasks,
                      pilot=args.pilot)

    def progress(done: int, total: int, text: str) -> None:
        print(f"[reproduce] {text}", file=sys.stderr, flush=True)

    res = run_reproduction(s, backend=args.backend, workers=args.workers, progress=progress)
    failed = res["summary"].get("tasks_failed", [])
    for t in failed:
        print(f"warning: task {t['index']} failed: {t['error']}", file=sys.stderr)
    if not res["summary"].get("tasks_ok"):
        print("error: every task failed", file=sys.stderr)
        return 1
    jp, mp = write_results(res, args.out)
    sys.stdout.write(to_markdown(res))
    print(f"results: {jp}\ntable:   {mp}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------------
# train-controller
# --------------------------------------------------------------------------------------------


def _train_controller(args: argparse.Namespace) -> int:
    """Build the schedule suite (cached), train the step controller on train/val, evaluate every
    schedule on the test split; JSON summary on stdout, progress on stderr."""
    import torch

    from ttt_core.controller import ControllerConfig, train_and_evaluate
    from ttt_core.schedules import DEFAULT_LAMBDA, SuiteSettings

    if args.tasks < 3:
        raise ValueError("--tasks must be at least 3 (one task per split)")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    grid = tuple(int(g) for g in args.grid.split(",") if g.strip())
    model_name = args.model
    lm = None
    if args.workers <= 1:
        from ttt_core.models import load_model

        lm = load_model(args.model)
        model_name = lm.name
    settings = SuiteSettings(model=model_name, grid=grid, fewshot_engine=args.fewshot_engine, lr_fewshot=args.lr,
                             lr_long=args.lr, c=args.c)
    if args.tiny:
        settings = SuiteSettings(**{**settings.__dict__, "fewshot_n": (4, 6), "needle_words": (20, 30),
                                    "max_positions": 16, "span_long": 16})
    lam = DEFAULT_LAMBDA if args.lam is None else args.lam
    cfg = ControllerConfig(lam=lam, epochs=args.epochs, restarts=args.restarts)

    def progress(frac: float, text: str) -> None:
        print(f"[train-controller] {text}", file=sys.stderr, flush=True)

    res = train_and_evaluate(lm, settings, args.tasks, lam=lam, out=args.out, workers=args.workers, config=cfg,
                             suite_root=args.suite_dir, progress=progress)
    print(json.dumps(_clean(res), indent=1, ensure_ascii=False))
    print(res["comparison"]["sentence"], file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ttt_core", description="TTT Lens command line")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="convert the embedded SmolLM2 GGUF to a safetensors cache once")
    p.set_defaults(func=_prepare)
    p = sub.add_parser("info", help="print the model card as JSON")
    p.add_argument("--model", default=EMBEDDED_MODEL, help="hub id, local folder, or the embedded default")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (off by default)")
    p.set_defaults(func=_info)

    p = sub.add_parser("diagnose", help="when / how far / which for one prompt: one JSON report on stdout")
    p.add_argument("prompt_file", help="prompt file ('-' reads stdin)")
    p.add_argument("--model", default=EMBEDDED_MODEL, help="hub id, local folder, tiny-random-<family> or the embedded default")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (off by default)")
    p.add_argument("--subspace", default="q", choices=["q", "k", "v", "o", "mlp_up", "mlp_down"],
                   help="update subspace (blocks = its heads, or one block per layer for MLP)")
    p.add_argument("--c", type=float, default=0.1, help="step fraction: ρ = c/λ_max (0 < c < 1)")
    p.add_argument("--grid", type=int, default=30, help="step grid 0..GRID")
    p.add_argument("--delta", type=float, default=0.05, help="PAC-Bayes confidence δ")
    p.add_argument("--top-k", type=int, default=8, help="number of recommended blocks")
    p.add_argument("--last-layers", type=int, default=None, help="kernel of the last N layers only (default all)")
    p.add_argument("--max-positions", type=int, default=256, help="long context: supervised positions kept")
    p.add_argument("--max-tokens", type=int, default=2048, help="token limit of the prompt")
    p.add_argument("--format", choices=["json", "md"], default="json")
    p.set_defaults(func=_diagnose)

    p = sub.add_parser("reproduce", help="the paper's experiments (Exp1 horizon, Exp2 heads); JSON + Markdown")
    p.add_argument("--model", default=EMBEDDED_MODEL)
    p.add_argument("--tasks", type=int, default=8, help="digit-shift tasks (the paper: 2000)")
    p.add_argument("--seed", type=int, default=2606, help="base seed; task i uses SeedSequence([seed, i])")
    p.add_argument("--grid", type=int, default=12, help="step grid 0..GRID (the paper: 30)")
    p.add_argument("--c", type=float, default=0.1, help="ρ = c/λ_max (ignored with --pilot)")
    p.add_argument("--pilot", action="store_true", help="choose c from {0.05, 0.1, 0.2} on 20 separate tasks first")
    p.add_argument("--fixed-T", type=int, default=8, help="the fixed-horizon baseline")
    p.add_argument("--kinds", default="v,q", help="Exp1 subspaces, comma-separated (v, q)")
    p.add_argument("--last-layers", type=int, default=4, help="Exp1 updates every head of the last N layers")
    p.add_argument("--exp2", choices=["off", "linear", "gd", "both"], default="linear",
                   help="Exp2 query error: linearised (cheap), real GD, or both")
    p.add_argument("--exp2-layers", type=int, default=16, help="Exp2 candidates: W_V heads of the last N layers")
    p.add_argument("--exp2-gd-tasks", type=int, default=8, help="run Exp2's real GD on the first N tasks")
    p.add_argument("--budgets", default="1,2,4,8,16,32", help="Exp2 budgets")
    p.add_argument("--backend", choices=["process", "ray", "serial"], default="process")
    p.add_argument("--workers", type=int, default=2, help="worker processes / Ray CPUs")
    p.add_argument("--out", default=str(_default_out()), help="results folder")
    p.set_defaults(func=_reproduce)
    p = sub.add_parser("train-controller", help="schedule suite + learned step controller; test-split evaluation")
    p.add_argument("--tasks", type=int, default=40, help="suite size (≈ 50/20/30 %% train/val/test)")
    p.add_argument("--lambda", dest="lam", type=float, default=None,
                   help="latency trade-off: cost = error + λ·steps (default 1e-3)")
    p.add_argument("--out", default=None, help="controller folder (default artifacts/controller)")
    p.add_argument("--model", default=EMBEDDED_MODEL, help="hub id, local folder, tiny-random-<family> or the embedded default")
    p.add_argument("--grid", default="1,2,4,8", help="step grid (actions: skip and these)")
    p.add_argument("--lr", type=float, default=1e-3, help="qTTT learning rate (AdamW)")
    p.add_argument("--c", type=float, default=0.5, help="ρ = c/λ_max of the theory schedules")
    p.add_argument("--fewshot-engine", choices=["qttt", "paper"], default="qttt",
                   help="few-shot engine: qTTT (fast) or the paper's LOO GD on W_V (faithful, slow)")
    p.add_argument("--workers", type=int, default=1, help="single-threaded worker processes for the suite")
    p.add_argument("--threads", type=int, default=1, help="torch threads in this process (0 = torch default)")
    p.add_argument("--epochs", type=int, default=400, help="controller training epochs (early stopping on val)")
    p.add_argument("--restarts", type=int, default=5, help="controller random restarts (best on val)")
    p.add_argument("--suite-dir", default=None, help="suite cache folder (default artifacts/schedules/<key>)")
    p.add_argument("--tiny", action="store_true", help="tiny prompts (for tests with tiny-random models)")
    p.set_defaults(func=_train_controller)
    return parser


def _default_out() -> str:
    from ttt_core.reproduce import results_dir

    return str(results_dir())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ModelLoadError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


COMMANDS.update({"prepare": _prepare, "info": _info, "diagnose": _diagnose, "reproduce": _reproduce,
                 "train-controller": _train_controller})
