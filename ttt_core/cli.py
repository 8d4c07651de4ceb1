"""TTT Lens command line.

    python -m ttt_core prepare            convert the embedded SmolLM2 once (safetensors cache)
    python -m ttt_core info [--model M]   print the model card as JSON
    python -m ttt_core diagnose FILE|-    one JSON (or --format md) report: when / how far / which
    python -m ttt_core reproduce [...]    the paper's experiments (ttt_core.reproduce), JSON + Markdown
    python -m ttt_core reproduce-gd [...] Exp2's real GD for a published reproduction, resumable (ttt_core.experiments.exp2_gd)
    python -m ttt_core compare-targets FILE|-  every adaptation target × signal on one prompt (--json)
    python -m ttt_core calibrate [--prompts N] [--head-prompts N] [--quick] [--resume]
                                          calibration suite vs real TTT (ttt_core.calibration_*)
    python -m ttt_core train-controller [--tasks N] [--lambda L] [--out DIR]
                                          schedule suite + learned step controller (ttt_core.controller)

Errors go to stderr with a non-zero exit code.
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import stat
import sys
import time
from pathlib import Path
from typing import Any, Callable

from ttt_core.diagnosis import diagnose_markdown, diagnose_report
from ttt_core.models import EMBEDDED_MODEL, ModelLoadError, convert_embedded, load_model
from ttt_core.progress import ProgressBar
from ttt_core.prompts import MAX_PROMPT_CHARS, PromptParseError, fit_to_token_limit, parse_prompt

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}  # filled at the end of the module


def _prepare(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    folder = convert_embedded()
    print(f"embedded model ready in {folder} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0


def _info(args: argparse.Namespace) -> int:
    lm = load_model(args.model, trust_remote_code=args.trust_remote_code)
    print(json.dumps(lm.card(), indent=2))
    return 0


# --------------------------------------------------------------------------------------------
# diagnose
# --------------------------------------------------------------------------------------------


class PromptFileError(ValueError):
    """The prompt file cannot be used as a prompt; the message is one line naming the file."""


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.1f} MB"


def read_prompt_file(name: str, max_chars: int = MAX_PROMPT_CHARS) -> str:
    """The text of prompt file `name` ('-' = standard input), checked before anything is loaded:
    bounded read (never more than 4·max_chars + 1 bytes: UTF-8 needs at most 4 bytes a
    character), non-empty, UTF-8 (an initial BOM is dropped), no NUL bytes, at most `max_chars`
    characters. Raises PromptFileError with one line naming the file and the problem."""
    label = "standard input" if name == "-" else name
    cap = 4 * max_chars
    limit = f"prompts are limited to {max_chars:,} characters"
    if name == "-":
        buf = getattr(sys.stdin, "buffer", None)
        raw: bytes | str = buf.read(cap + 1) if buf is not None else sys.stdin.read(max_chars + 1)
    else:
        try:
            st = os.stat(name)
            if stat.S_ISDIR(st.st_mode):
                raise PromptFileError(f"cannot read prompt file {name}: it is a directory, not a file")
            if stat.S_ISREG(st.st_mode) and st.st_size > cap:
                raise PromptFileError(f"{name} is {_mb(st.st_size)}; {limit}")
            with open(name, "rb") as fh:
                raw = fh.read(cap + 1)  # bounded even for /dev/zero-like files that report size 0
        except OSError as exc:
            raise PromptFileError(f"cannot read prompt file {name}: {exc.strerror or exc}") from None
    if isinstance(raw, bytes):
        if len(raw) > cap:
            raise PromptFileError(f"{label} is more than {_mb(cap)}; {limit}")
        offset = 3 if raw.startswith(codecs.BOM_UTF8) else 0
        try:
            text = raw[offset:].decode("utf-8")
        except UnicodeDecodeError as exc:
            pos = exc.start + offset
            raise PromptFileError(f"{label} is not UTF-8 text (invalid byte 0x{raw[pos]:02x} at position {pos})") from None
    else:
        text = raw
    if not text.strip():
        raise PromptFileError(f"{label} is empty" + (" (only whitespace)" if text else ""))
    nul = text.find("\x00")
    if nul >= 0:
        raise PromptFileError(f"{label} contains NUL characters (first at character {nul}): "
                              "it looks like a binary file, not a prompt")
    if len(text) > max_chars:
        raise PromptFileError(f"{label} has {len(text):,} characters; {limit}")
    return text


def _model_and_prompt(args: argparse.Namespace) -> tuple[Any, Any] | None:
    """(model, prompt fitted to --max-tokens) of `args.prompt_file`, or None after printing one
    'error:' line. Every check on the input (size, encoding, parse) runs before the model loads."""
    label = "standard input" if args.prompt_file == "-" else args.prompt_file
    try:
        text = read_prompt_file(args.prompt_file)
    except PromptFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    try:
        prompt = parse_prompt(text)
    except PromptParseError as exc:
        print(f"error: cannot parse the prompt in {label}: {exc}", file=sys.stderr)
        return None
    lm = load_model(args.model, trust_remote_code=args.trust_remote_code)
    prompt, note = fit_to_token_limit(prompt, lm.tokenizer, args.max_tokens)
    if note:
        print(f"warning: {note}", file=sys.stderr)
    return lm, prompt


def _diagnose(args: argparse.Namespace) -> int:
    got = _model_and_prompt(args)
    if got is None:
        return 2
    lm, prompt = got
    with ProgressBar("diagnose", quiet=args.quiet) as bar:
        report = diagnose_report(lm, prompt, subspace=args.subspace, c=args.c, grid=args.grid, delta=args.delta,
                                 top_k=args.top_k, last_layers=args.last_layers, max_positions=args.max_positions,
                                 check=args.check, check_k=args.check_k, check_steps=args.check_steps,
                                 check_random=args.check_random, check_seed=args.check_seed, progress=bar.fraction)
    from ttt_core.experiments.calibration_advice import attach_calibration

    report = attach_calibration(report, lm, prompt)   # the optional "calibration" field (a saved result only)
    if args.format == "md":
        sys.stdout.write(diagnose_markdown(report))
    else:
        print(json.dumps(report, indent=1, ensure_ascii=False))
    return 0


# --------------------------------------------------------------------------------------------
# reproduce
# --------------------------------------------------------------------------------------------


def _reproduce_gd(args: argparse.Namespace) -> int:
    from ttt_core.experiments.exp2_gd import records_dir, run_supplement, supplement_markdown, supplement_path
    from ttt_core.experiments.reproduce_report import RESULT_KIND
    from ttt_core.experiments.store import latest_result, published_dir

    base = args.base
    if base is None:
        found = latest_result(published_dir("reproduction"), RESULT_KIND)
        if found is None:
            print("error: no published reproduction to supplement; pass --base FILE", file=sys.stderr)
            return 2
        base = found[0]
    base = Path(base)
    if not base.is_file():
        print(f"error: {base} does not exist", file=sys.stderr)
        return 2
    with ProgressBar("Exp2 GD", quiet=args.quiet) as bar:
        sup = run_supplement(base, tasks=0 if args.summary_only else args.tasks, backend=args.backend,
                             workers=args.workers, progress=bar.count,
                             command="ttt-lens " + " ".join(sys.argv[1:]))
    sys.stdout.write(supplement_markdown(sup))
    p = supplement_path(base)
    print(f"records: {records_dir(base)}\nsummary: {p}\ntable:   {p.with_suffix('.md')}", file=sys.stderr)
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from ttt_core.experiments.paper_tasks import ReproSettings
    from ttt_core.experiments.reproduce import run_reproduction
    from ttt_core.experiments.reproduce_report import to_markdown, write_results

    s = ReproSettings(model=args.model, tasks=args.tasks, seed=args.seed, grid_max=args.grid, c=args.c,
                      fixed_T=args.fixed_T, exp1_kinds=tuple(k.strip() for k in args.kinds.split(",") if k.strip()),
                      last_layers=args.last_layers, exp2=args.exp2, exp2_layers=args.exp2_layers,
                      exp2_budgets=tuple(int(b) for b in args.budgets.split(",")), exp2_gd_tasks=args.exp2_gd_tasks,
                      pilot=args.pilot)

    with ProgressBar("reproduce", quiet=args.quiet) as bar:
        res = run_reproduction(s, backend=args.backend, workers=args.workers, progress=bar.count,
                               command="ttt-lens " + " ".join(sys.argv[1:]), cache_dir=args.cache)
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

    from ttt_core.experiments.controller import ControllerConfig, train_and_evaluate
    from ttt_core.experiments.schedules import DEFAULT_LAMBDA
    from ttt_core.experiments.suite_tasks import SuiteSettings
    from ttt_core.figure_data import json_clean

    if args.tasks < 3:
        raise ValueError("--tasks must be at least 3 (one task per split)")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    grid = tuple(int(g) for g in args.grid.split(",") if g.strip())
    model_name = args.model
    lm = None
    if args.workers <= 1:
        lm = load_model(args.model)
        model_name = lm.name
    settings = SuiteSettings(model=model_name, grid=grid, fewshot_engine=args.fewshot_engine, lr_fewshot=args.lr,
                             lr_long=args.lr, c=args.c)
    if args.tiny:
        settings = SuiteSettings(**{**settings.__dict__, "fewshot_n": (4, 6), "needle_words": (20, 30),
                                    "max_positions": 16, "span_long": 16})
    lam = DEFAULT_LAMBDA if args.lam is None else args.lam
    cfg = ControllerConfig(lam=lam, epochs=args.epochs, restarts=args.restarts)

    with ProgressBar("train-controller", quiet=args.quiet) as bar:
        res = train_and_evaluate(lm, settings, args.tasks, lam=lam, out=args.out, workers=args.workers, config=cfg,
                                 suite_root=args.suite_dir, progress=bar.fraction)
    print(json.dumps(json_clean(res), indent=1, ensure_ascii=False))
    print(res["comparison"]["sentence"], file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------------
# compare-targets
# --------------------------------------------------------------------------------------------


def _compare_targets(args: argparse.Namespace) -> int:
    """Every adaptation target × signal on one prompt (ttt_core.targets): JSON (--json) or a
    Markdown table on stdout, the winner sentence and progress on stderr."""
    from ttt_core.figure_data import json_clean
    from ttt_core.targets import compare_targets
    from ttt_core.targets.report import comparison_markdown

    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    signals = [s.strip() for s in args.signals.split(",") if s.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.suite:
        return _targets_suite(args, targets, signals, seeds)
    if not args.prompt_file:
        print("error: give a prompt file ('-' reads stdin) or --suite N", file=sys.stderr)
        return 2
    got = _model_and_prompt(args)
    if got is None:
        return 2
    lm, prompt = got
    with ProgressBar("compare-targets", quiet=args.quiet) as bar:
        cmp = compare_targets(lm, prompt, targets, signals, steps=args.steps, seeds=seeds, lr=args.lr, span=args.span,
                              last_layers=args.last_layers, c=args.c, max_positions=args.max_positions,
                              kernels=not args.no_kernels, kv=args.kv, progress=bar.fraction)
    if args.json:
        print(json.dumps(json_clean(cmp.to_dict()), indent=1, ensure_ascii=False))
    else:
        sys.stdout.write(comparison_markdown(cmp.to_dict()))
    print(cmp.sentence, file=sys.stderr)
    return 0


def _targets_suite(args: argparse.Namespace, targets: list[str], signals: list[str], seeds: list[int]) -> int:
    """compare-targets --suite N: N seeded prompts per family (digit shift, needle), cached per prompt."""
    from ttt_core.experiments.targets_suite import TargetsSuiteSettings, build_suite
    from ttt_core.figure_data import json_clean

    workers = max(1, int(args.workers))
    if workers > 1 and args.trust_remote_code:
        print("error: --workers > 1 loads the model in each worker without the model's own code; "
              "use --workers 1 with --trust-remote-code", file=sys.stderr)
        return 2
    lm = load_model(args.model, trust_remote_code=args.trust_remote_code)
    settings = TargetsSuiteSettings(model=lm.name, targets=tuple(targets), signals=tuple(signals), steps=args.steps,
                                    seeds=tuple(seeds), lr=args.lr, span=args.span, last_layers=args.last_layers,
                                    kernels=args.suite_kernels, max_positions=args.max_positions, kv=args.kv)
    with ProgressBar("compare-targets --suite", quiet=args.quiet) as bar:
        summary = build_suite(lm, settings, args.suite, root=args.suite_dir, progress=bar.count, workers=workers,
                              command="ttt-lens " + " ".join(sys.argv[1:]))
    print(json.dumps(json_clean(summary), indent=1, ensure_ascii=False))
    print(f"suite: {summary['folder']}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------------
# calibrate
# --------------------------------------------------------------------------------------------


def _calibrate(args: argparse.Namespace) -> int:
    """The calibration suite (DESIGN §10): records + a summary JSON with provenance in --out; the
    headline sentences on stderr, the summary path on stdout."""
    import torch

    from ttt_core.experiments.calibration_suite import run_calibration
    from ttt_core.experiments.calibration_tasks import CalibrationSettings, quick_settings

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    n_prompts = args.prompts if args.prompts is not None else (36 if args.quick else 300)
    n_head = args.head_prompts if args.head_prompts is not None else (12 if args.quick else 100)
    if n_prompts < 3:
        raise ValueError("--prompts must be at least 3 (one prompt per split)")
    if not 0 <= n_head <= n_prompts:
        raise ValueError("--head-prompts must lie between 0 and --prompts")
    workers = max(1, int(args.workers))
    backend = "ray" if args.ray else "process"
    lm = None
    model_name = args.model
    if workers <= 1:
        lm = load_model(args.model)
        model_name = lm.name
    extra = {}
    if args.grid:
        extra["grid"] = tuple(int(g) for g in args.grid.split(",") if g.strip())
    settings = quick_settings(model_name, **extra) if args.quick else CalibrationSettings(model=model_name, **extra)
    settings.validate()
    t0 = time.perf_counter()
    last = [0.0]

    def log(done: int, total: int, text: str) -> None:  # plain lines when no bar is drawn
        now = time.perf_counter()
        if not args.quiet and (done == total or now - last[0] >= 10.0):
            last[0] = now
            print(f"calibrate: {text}", file=sys.stderr, flush=True)

    with ProgressBar("calibrate", quiet=args.quiet) as bar:
        summary = run_calibration(lm, settings, n_prompts, n_head, out=args.out, resume=args.resume, workers=workers,
                                  backend=backend, command="ttt-lens " + " ".join(sys.argv[1:]),
                                  progress=bar.count or log, n_boot=args.n_boot)
    rep = summary["report"]
    ctrl = rep.get("controller")
    if ctrl:
        print(ctrl["comparison"]["sentence"], file=sys.stderr)
    pooled = (rep.get("recommended") or {}).get("all prompts")
    if pooled:
        print(pooled["sentence"], file=sys.stderr)
    print(f"calibrate: {summary['n_prompts']} prompts in {time.perf_counter() - t0:.0f} s; records in "
          f"{summary['records_folder']}", file=sys.stderr)
    print(summary["path"])
    return 0


# --------------------------------------------------------------------------------------------
# recheck
# --------------------------------------------------------------------------------------------


def _recheck(args: argparse.Namespace) -> int:
    """Recompute random records of a saved result and compare (ttt_core.experiments.recheck): a
    line per record on stderr, a JSON summary on stdout with --json; exit 0 when every record
    agrees, 3 when one differs."""
    import json

    from ttt_core.experiments.recheck import recheck_result

    if args.records < 1:
        raise ValueError("--records must be at least 1")
    res = recheck_result(args.result, records=args.records, seed=args.seed,
                         log=lambda line: print(f"recheck: {line}", file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(res, indent=1))
    n_bad = sum(not r["ok"] for r in res["records"])
    print(f"recheck: {len(res['records']) - n_bad} of {len(res['records'])} records agree with {res['path']}"
          + ("" if not n_bad else f"; {n_bad} differ"), file=sys.stderr)
    return 0 if res["ok"] else 3


def build_parser() -> argparse.ArgumentParser:
    prog = "python -m ttt_core" if sys.argv and sys.argv[0].endswith("__main__.py") else "ttt-lens"
    parser = argparse.ArgumentParser(prog=prog, description="TTT Lens command line")
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
    p.add_argument("--check", action="store_true",
                   help="check the ranked scores against real TTT: adapt the top-k, bottom-k and random k-subsets "
                        "(paper GD few-shot, qTTT long context) and compare with the linearised prediction")
    p.add_argument("--check-k", type=int, default=3, help="--check: blocks per subset")
    p.add_argument("--check-steps", type=int, default=4, help="--check: TTT steps per subset")
    p.add_argument("--check-random", type=int, default=5, help="--check: number of random k-subsets")
    p.add_argument("--check-seed", type=int, default=0, help="--check: seed of the random subsets and qTTT spans")
    p.add_argument("--quiet", action="store_true", help="no progress bar (it is off anyway when stderr is not a terminal)")
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
    p.add_argument("--exp2", choices=["gd", "linear", "both", "off"], default="gd",
                   help="Exp2 query error: real GD (default; ~4 CPU-minutes per task on SmolLM2), "
                        "linear = linearised — the same quantity the greedy rule maximises (cheap, favours "
                        "Query-Aware by construction), both, or off")
    p.add_argument("--exp2-layers", type=int, default=16, help="Exp2 candidates: W_V heads of the last N layers")
    p.add_argument("--exp2-gd-tasks", type=int, default=None,
                   help="run Exp2's real GD on the first N tasks only (default: all tasks)")
    p.add_argument("--budgets", default="1,2,4,8,16,32", help="Exp2 budgets")
    p.add_argument("--backend", choices=["process", "ray", "serial"], default="process")
    p.add_argument("--workers", type=int, default=2, help="worker processes / Ray CPUs")
    p.add_argument("--out", default=str(_default_out()), help="results folder")
    p.add_argument("--cache", default=None,
                   help="folder keeping every finished task record; a rerun with the same settings resumes from it")
    p.add_argument("--quiet", action="store_true", help="no progress bar (it is off anyway when stderr is not a terminal)")
    p.set_defaults(func=_reproduce)

    p = sub.add_parser("reproduce-gd", help="Exp2's real GD for a published --exp2 linear reproduction, task by task "
                                             "(resumable; ~4 CPU-minutes per SmolLM2 task)")
    p.add_argument("--base", default=None, help="the reproduction results JSON to supplement (default: the newest "
                                                "published one, artifacts/published/reproduction)")
    p.add_argument("--tasks", type=int, default=None, help="cover the base file's first N tasks (default: all)")
    p.add_argument("--summary-only", action="store_true", help="compute nothing; rewrite the summary from the records")
    p.add_argument("--backend", choices=["process", "ray", "serial"], default="process")
    p.add_argument("--workers", type=int, default=2, help="worker processes / Ray CPUs")
    p.add_argument("--quiet", action="store_true", help="no progress bar (it is off anyway when stderr is not a terminal)")
    p.set_defaults(func=_reproduce_gd)
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
    p.add_argument("--quiet", action="store_true", help="no progress bar (it is off anyway when stderr is not a terminal)")
    p.set_defaults(func=_train_controller)
    p = sub.add_parser("calibrate", help="is the diagnosis right? the calibration suite against real TTT (DESIGN §10)")
    p.add_argument("--prompts", type=int, default=None, help="suite size (default 300; 36 with --quick)")
    p.add_argument("--head-prompts", type=int, default=None,
                   help="prompts that also get the head-choice runs (default 100; 12 with --quick)")
    p.add_argument("--model", default=EMBEDDED_MODEL, help="hub id, local folder, tiny-random-<family> or the embedded default")
    p.add_argument("--grid", default=None, help="fixed-T rules, comma-separated (default 1,2,4,8,16; the oracle runs "
                   "to the largest)")
    p.add_argument("--workers", type=int, default=1, help="single-threaded worker processes (or Ray CPUs)")
    p.add_argument("--ray", action="store_true", help="run the prompts as Ray tasks ($RAY_ADDRESS for a cluster)")
    p.add_argument("--out", default=None, help="folder of the records and the summary (default artifacts/calibration)")
    p.add_argument("--quick", action="store_true", help="small prompts and a short grid (tests, a first look)")
    p.add_argument("--resume", action="store_true", help="reuse the records already in --out (after an interruption)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap / permutation resamples of the report")
    p.add_argument("--threads", type=int, default=1, help="torch threads in this process (0 = torch default)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=_calibrate)
    p = sub.add_parser("compare-targets", help="which parameters and which signal: every adaptation target × signal "
                       "on one prompt (kernel columns, measured error change, seconds, FLOPs, memory)")
    p.add_argument("prompt_file", nargs="?", default=None, help="prompt file ('-' reads stdin); not with --suite")
    p.add_argument("--model", default=EMBEDDED_MODEL, help="hub id, local folder, tiny-random-<family> or the embedded default")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (off by default)")
    p.add_argument("--suite", type=int, default=0,
                   help="instead of one prompt: N seeded prompts per family (digit shift, needle), cached and resumable")
    p.add_argument("--suite-dir", default=None, help="--suite: folder (default artifacts/targets/<model>-<hash>)")
    p.add_argument("--suite-kernels", action="store_true", help="--suite: also the kernel columns (slower)")
    p.add_argument("--workers", type=int, default=1, help="--suite: single-threaded worker processes")
    p.add_argument("--targets", default="q,k,v,o,mlp_up,mlp_gate,mlp_down,lora:q:8,lora:v:8,norm_attn,norm_mlp",
                   help="comma-separated targets: q,k,v,o,mlp_up,mlp_gate,mlp_down,norm_attn,norm_mlp,"
                        "norm_attn_bias,norm_mlp_bias or lora:<kind>:<rank>")
    p.add_argument("--signals", default="nll", help="comma-separated signals: nll, entropy (Tent), syttta")
    p.add_argument("--steps", type=int, default=8, help="TTT steps per run (the same for every target)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (span starts, LoRA init); ≥ 3 for a CI")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate shared by every target")
    p.add_argument("--span", type=int, default=128, help="span length k of the NLL signal")
    p.add_argument("--last-layers", type=int, default=None, help="kernel and training on the last N layers only")
    p.add_argument("--c", type=float, default=0.1, help="kernel verdict: ρ = c/λ_max")
    p.add_argument("--max-positions", type=int, default=256, help="long context: supervised positions of the kernel")
    p.add_argument("--max-tokens", type=int, default=2048, help="token limit of the prompt")
    p.add_argument("--kv", choices=["auto", "frozen"], default="auto",
                   help="keys and values during TTT: auto (frozen for W_Q / LoRA q as qTTT, full context for the "
                        "rest) or frozen for every target (qTTT-style; its kernels take one backward; W_K/W_V rows "
                        "unavailable)")
    p.add_argument("--no-kernels", action="store_true", help="skip the kernel columns (measured runs only)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout (default: a Markdown table)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (it is off anyway when stderr is not a terminal)")
    p.set_defaults(func=_compare_targets)
    p = sub.add_parser("recheck", help="recompute random records of a saved result (reproduction, its exp2-gd "
                       "supplement, calibration, a targets suite's summary.json) and say whether each agrees; "
                       "exit 3 when one differs")
    p.add_argument("result", help="the saved result's JSON file")
    p.add_argument("--records", type=int, default=3, help="how many records to recompute (default 3)")
    p.add_argument("--seed", type=int, default=None, help="the draw's seed (printed; default fresh)")
    p.add_argument("--json", action="store_true", help="the per-record outcome as JSON on stdout")
    p.set_defaults(func=_recheck)
    return parser


def _default_out() -> str:
    from ttt_core.experiments.store import reproduction_dir

    return str(reproduction_dir())


def _one_line(text: str, limit: int = 2000) -> str:
    """An error message as one line (newlines and runs of whitespace folded), at most `limit` chars."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def main(argv: list[str] | None = None) -> int:
    """Run one command. Errors are ONE line on stderr, never a traceback: bad input / a model that
    cannot be loaded → exit 2; anything unexpected → exit 1 ("internal error", with the
    exception's type; TTT_LENS_DEBUG=1 re-raises it for the traceback); Ctrl-C → 130."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ModelLoadError, ValueError, FileNotFoundError) as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (`… | head`): stop quietly, like other Unix tools
        try:  # no second BrokenPipeError when Python flushes stdout at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141
    except Exception as exc:  # noqa: BLE001 — the CLI's contract: one line, no traceback
        if os.environ.get("TTT_LENS_DEBUG", "").strip() not in ("", "0"):
            raise
        print(f"error: internal error ({type(exc).__name__}): {_one_line(exc)} (TTT_LENS_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1


COMMANDS.update({"compare-targets": _compare_targets, "prepare": _prepare, "info": _info, "diagnose": _diagnose, "reproduce": _reproduce, "reproduce-gd": _reproduce_gd,
                 "train-controller": _train_controller, "calibrate": _calibrate, "recheck": _recheck})
