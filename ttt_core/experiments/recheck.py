"""Recompute one committed record, and measure how far float32 summation order alone moves it.

A committed result is checked by recomputing a few of its records with today's code (issue 16.5).
On the CPU model that made a record every number must come back to 1e-6. On another CPU model the
same code sums its float32 products in another order (MKL picks other kernels on an Intel Xeon
than on an AMD EPYC; ATen's vector kernels differ with AVX-512 or AVX2), and most numbers still
agree to a fixed float32 tolerance (`tests/unit/experiments/test_published.py`). A few records
magnify round-off far beyond it:

* an Adam trajectory: Adam's first step is ≈ lr · sign(g) per parameter, so a gradient component
  near zero takes the other sign under another summation order, and the curve moves by a fraction
  of lr (measured: a norm_attn entropy curve recomputed on an AMD EPYC moved by 4.6e-4, 0.12 %, from
  its Intel value, while its step-0 value agreed to 2e-6);
* a maximum-likelihood τ² on a flat likelihood, where a 1e-5 change of the eigenvalues moves the
  maximiser by 0.3 %.

`roundoff_spread` measures that magnification on this machine, record by record: the record is
recomputed in child processes whose float32 arithmetic sums in other orders (`probe_envs`: MKL's
conditional-numerical-reproducibility COMPATIBLE code path, and ATen's AVX2 or default kernels
instead of the ones this CPU would pick) and each number's largest distance from the in-process
value is its round-off spread. A cross-CPU check may then allow `NOISE_K` × spread on top of the
fixed tolerance, per number: a well-conditioned number keeps its tight tolerance, and a discrete
field (a step count, a verdict) may differ only where a probe flipped it too.

`recheck_result` (the command `ttt-lens recheck RESULT`) recomputes random records of any committed
result and says, record by record, whether it agrees. `python -m ttt_core.experiments.recheck KIND
'JSON ARGS'` prints one recomputed record as JSON (the child side of a probe); KIND is one of
`RECOMPUTE`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ttt_core.models import LoadedModel

#: A record recomputed on the CPU model that made it: every number equal to ≤ 1e-6 (issue 16.5).
SAME_CPU_ATOL = 1e-6
#: On another CPU model (or for a record that does not name its CPU: provenance gained `cpu_model` on
#: 2026-12-02), float32 matrix products sum in another order (other BLAS kernels), so the same code
#: gives other round-off. Measured on 2026-12-02, 16 Exp1/Exp2 records made on an Intel Xeon
#: recomputed on an AMD EPYC: model outputs moved by ≤ 2.4e-6 absolute (≤ 4.4e-6 relative), fitted
#: hyper-parameters (evidence τ² and σ², the ridge λ⋆, step sizes ρ = c/λ_max) by ≤ 6.3e-5 relative;
#: a calibration trajectory by 1.1e-6, a targets entropy curve by 7.9e-6 (4.4e-6 relative). The
#: cross-CPU check allows |new − saved| ≤ 1e-5 + 1e-3·|saved|: 16× the largest relative and 4× the
#: largest absolute change seen, far below what a changed formula or an edited number moves; a
#: record that magnifies round-off more gets its measured allowance (`compare_record`). A discrete
#: choice (a step count, a selected head) that flips at a near-tie fails unless a probe flips it too.
CROSS_CPU_ATOL, CROSS_CPU_RTOL = 1e-5, 1e-3
#: The measured distance may be this many times the round-off spread: on the norm_attn entropy
#: curve above, Intel-vs-AMD distance / spread = 1.5 (two probes); 4 leaves a margin for a spread
#: estimated from two probes only.
NOISE_K = 4.0
#: fields of a targets row that are measured, not timed (seconds and peak memory vary by run)
TARGET_ROW_FIELDS = ("target", "signal", "route", "params", "status", "errors", "deltas", "delta_mean",
                     "error_start", "error_end", "seeds_run", "deterministic")
#: the kernel columns a row of a suite with kernels is checked on (not its seconds or wording notes)
TARGET_KERNEL_FIELDS = ("status", "n", "route", "effective_rank", "participation_ratio", "lambda_star",
                        "lambda_star_ci90", "verdict_T", "prob_ttt_beats_icl", "decision", "top_blocks")


def target_row_fields(row: dict[str, Any], like: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a targets-suite row is checked on: `TARGET_ROW_FIELDS`, and where its kernel was built
    (status "ok") the kernel's `TARGET_KERNEL_FIELDS` under "kernel". `like`: take the shape from this
    (saved) row instead — the kernel columns whenever *it* has a built kernel, so a fresh row whose
    kernel was lost shows them as None and differs."""
    out = {k: row[k] for k in TARGET_ROW_FIELDS}
    if ((like if like is not None else row).get("kernel") or {}).get("status") == "ok":
        k = row.get("kernel") or {}
        out["kernel"] = {f: k.get(f) for f in TARGET_KERNEL_FIELDS}
    return out


def _threads_of(doc: dict[str, Any]) -> int:
    return int(doc["provenance"]["machine"]["torch_threads_per_worker"])


@contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _model(name: str, lm: LoadedModel | None) -> LoadedModel:
    if lm is not None:
        return lm
    from ttt_core.models import load_model

    return load_model(name)


def _as_json(x: Any) -> Any:
    return json.loads(json.dumps(x, default=float))


def recompute_calibration(lm: LoadedModel | None, path: str, task_file: str) -> dict[str, Any]:
    """Calibration record `task_file` (a name under the result's tasks folder) of the committed
    result at `path`, recomputed with its settings and thread count; timings stripped."""
    from ttt_core.experiments.calibration_suite import settings_from_dict
    from ttt_core.experiments.calibration_tasks import run_calibration_task, strip_timings
    from ttt_core.experiments.suite_tasks import TaskSpec

    p = Path(path)
    d = json.loads(p.read_text())
    settings = settings_from_dict(d["settings"])
    saved = json.loads((p.parent / d["records_folder_name"] / "tasks" / task_file).read_text())
    spec = TaskSpec(saved["split"], int(saved["index"]), int(saved["seed"]), saved["family"])
    lm = _model(settings.model, lm)
    with _threads(_threads_of(d)):
        return strip_timings(_as_json(run_calibration_task(lm, spec, settings, heads="heads" in saved)))


def recompute_targets_row(lm: LoadedModel | None, path: str, prompt_file: str, row: int) -> dict[str, Any]:
    """Row `row` of prompt record `prompt_file` of the committed targets suite whose summary is
    `path`, re-run on its prompt and settings; only the checked fields (`target_row_fields` of the
    saved row's shape: the kernel columns too when the saved row has them)."""
    from ttt_core.experiments.targets_suite import prompt_of
    from ttt_core.targets.comparison import compare_targets

    p = Path(path)
    d = json.loads(p.read_text())
    s = d["settings"]
    rec = json.loads((p.parent / "prompts" / prompt_file).read_text())
    saved = rec["comparison"]["rows"][row]
    lm = _model(s["model"], lm)
    from ttt_core.fused_head import lm_head_mode

    # only a suite with kernels names lm_head; without kernels nothing reads the head path
    with _threads(_threads_of(d)), lm_head_mode(s.get("lm_head", "logits")):
        cmp = compare_targets(lm, prompt_of(rec), [saved["target"]], [saved["signal"]], steps=s["steps"],
                              seeds=s["seeds"], lr=s["lr"], span=s["span"], last_layers=s["last_layers"],
                              max_positions=s["max_positions"], kernels=s["kernels"],
                              count_flops=s.get("count_flops", True), kv=s.get("kv", "auto"))
    return target_row_fields(_as_json(cmp.to_dict())["rows"][0], like=saved)


def recompute_reproduction(lm: LoadedModel | None, path: str, position: int) -> dict[str, Any]:
    """Task record at `position` of the committed reproduction result `path`, re-run; without its
    seconds."""
    from ttt_core.experiments.exp2_gd import settings_of
    from ttt_core.experiments.reproduce import run_task

    d = json.loads(Path(path).read_text())
    s = settings_of(d)
    saved = d["tasks"][position]
    lm = _model(s.model, lm)
    with _threads(_threads_of(d)):
        fresh = _as_json(run_task(lm, saved["index"], s, saved["c"]))
    fresh.pop("seconds", None)
    return fresh


def recompute_exp2_gd(lm: LoadedModel | None, base: str, index: int, labels: list[str]) -> dict[str, Any]:
    """The Exp2 real-GD runs (block sets named by `labels`, `exp2_gd.set_label`) of task `index` of
    the reproduction result `base`, with the thread count its GD record was made with:
    {label: run}."""
    from ttt_core.experiments import exp2_gd

    d, s = exp2_gd.load_base(base)
    task = next(t for t in d["tasks"] if int(t["index"]) == int(index))
    rec = exp2_gd.load_records(exp2_gd.records_dir(base))[int(index)]
    keys = {exp2_gd.set_label(k): k for k, _, _ in exp2_gd.block_sets(task["exp2"])}
    lm = _model(s.model, lm)
    with _threads(_threads_of(rec)):
        runs = exp2_gd.run_gd_record(lm, s, task, only=[keys[label] for label in labels])["runs"]
    return _as_json(runs)


#: kind → recompute(lm, **args); `lm=None` loads the record's model.
RECOMPUTE: dict[str, Callable[..., dict[str, Any]]] = {
    "calibration": recompute_calibration,
    "targets": recompute_targets_row,
    "reproduction": recompute_reproduction,
    "exp2_gd": recompute_exp2_gd,
}


def tolerance(machine: dict[str, Any], here: str | None = None) -> tuple[tuple[float, float], str]:
    """((atol, rtol), a sentence saying which check) for recomputing, on CPU model `here` (default:
    this machine's), a record made on `machine` (a provenance's "machine")."""
    from ttt_core.experiments.store import cpu_model

    here, made = here or cpu_model(), machine.get("cpu_model")
    if made is not None and made == here:
        return (SAME_CPU_ATOL, 0.0), f"same CPU model as the record ({here}): numbers must agree to {SAME_CPU_ATOL:g}"
    return (CROSS_CPU_ATOL, CROSS_CPU_RTOL), (
        f"record made on {made or 'a CPU it does not name'}, recomputed on {here}: float32 cross-CPU "
        f"tolerance {CROSS_CPU_ATOL:g} + {CROSS_CPU_RTOL:g}·|saved|")


def compare_record(kind: str, args: dict[str, Any], fresh: Any, saved: Any, tol: tuple[float, float],
                   path: str = "record") -> tuple[list[str], list[str]]:
    """(mismatches, notes) of `fresh` (the record recomputed in this process) against `saved`.
    With the strict same-CPU tolerance that is the whole check. With the cross-CPU one, a record
    that misses it is recomputed under other summation orders (`roundoff_spread`) and compared
    again with NOISE_K × each number's spread allowed on top; the notes say so."""
    bad = mismatches(fresh, saved, *tol, path=path)
    notes: list[str] = []
    if bad and tol != (SAME_CPU_ATOL, 0.0):
        notes.append(f"{path}: {len(bad)} number(s) past the fixed cross-CPU tolerance, e.g. {bad[0]}; "
                     "measuring this record's round-off")
        noise, runs = roundoff_spread(kind, args, fresh)
        notes.append("probes (ATen kernels, MKL_CBWR): " + ", ".join(f"({r['cpu_capability']}, {r['mkl_cbwr']})"
                                                                     for r in runs))
        bad = mismatches(fresh, saved, *tol, noise=noise, path=path)
    return bad, notes


def probe_envs(capability: str | None = None) -> list[dict[str, str]]:
    """Environments whose float32 arithmetic sums in another order than this process's: MKL's
    COMPATIBLE code path, and ATen's AVX2 kernels (the default ones where this CPU's are AVX2)."""
    cap = (capability or torch.backends.cpu.get_cpu_capability()).upper()
    return [{"MKL_CBWR": "COMPATIBLE"}, {"ATEN_CPU_CAPABILITY": "default" if cap == "AVX2" else "avx2"}]


def probe(kind: str, args: dict[str, Any], env: dict[str, str], timeout: float = 1800.0) -> dict[str, Any]:
    """The record recomputed in a child process run with `env` added to this one's environment:
    {"record": ..., "cpu_capability": the child's ATen kernels, "mkl_cbwr": its MKL_CBWR}."""
    if kind not in RECOMPUTE:
        raise ValueError(f"unknown record kind {kind!r}; one of {sorted(RECOMPUTE)}")
    out = subprocess.run([sys.executable, "-m", "ttt_core.experiments.recheck", kind, json.dumps(args)],
                         env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"probe {env} of {kind} {args} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def roundoff_spread(kind: str, args: dict[str, Any], fresh: Any,
                    envs: list[dict[str, str]] | None = None) -> tuple[Any, list[dict[str, Any]]]:
    """(`spread` of the record over one probe per environment of `envs` (default `probe_envs()`),
    the probes' outputs)."""
    runs = [probe(kind, args, env) for env in (envs if envs is not None else probe_envs())]
    return spread(fresh, [r["record"] for r in runs]), runs


def spread(fresh: Any, probes: list[Any]) -> Any:
    """A tree shaped like `fresh`: at each float, max over `probes` of |probe − fresh| (inf where a
    probe is not a number there, or NaN in only one of the two); at anything else, whether some
    probe differs from it."""
    if isinstance(fresh, dict):
        return {k: spread(v, [p.get(k) if isinstance(p, dict) else None for p in probes]) for k, v in fresh.items()}
    if isinstance(fresh, list):
        return [spread(v, [p[i] if isinstance(p, list) and len(p) == len(fresh) else None for p in probes])
                for i, v in enumerate(fresh)]
    if isinstance(fresh, float):
        out = 0.0
        for p in probes:
            if not isinstance(p, (int, float)) or isinstance(p, bool):
                return math.inf
            if math.isnan(fresh) or math.isnan(p):
                out = out if (math.isnan(fresh) and math.isnan(p)) else math.inf
            else:
                out = max(out, abs(float(p) - fresh))
        return out
    return any(p != fresh for p in probes)


def mismatches(new: Any, old: Any, atol: float, rtol: float = 0.0, noise: Any = None, k: float = NOISE_K,
               path: str = "record") -> list[str]:
    """Where `new` differs from `old`: same structure; each number within atol + rtol·|old|
    (+ k · its spread in `noise`, a tree from `spread`); everything else equal (or, with `noise`,
    flipped by some probe too). Returns one line per difference (empty: they agree)."""
    out: list[str] = []
    if isinstance(old, dict):
        if not isinstance(new, dict) or set(new) != set(old):
            got = set(new) if isinstance(new, dict) else set()
            return [f"{path}: keys {sorted(got ^ set(old))}"]
        for key in old:
            out += mismatches(new[key], old[key], atol, rtol, None if noise is None else noise.get(key), k,
                              f"{path}.{key}")
    elif isinstance(old, list):
        if not isinstance(new, list) or len(new) != len(old):
            return [f"{path}: length {len(new) if isinstance(new, list) else new!r} vs {len(old)}"]
        for i, (a, b) in enumerate(zip(new, old)):
            noise_i = None if not isinstance(noise, list) or len(noise) != len(old) else noise[i]
            out += mismatches(a, b, atol, rtol, noise_i, k, f"{path}[{i}]")
    elif isinstance(old, float) or (isinstance(old, int) and not isinstance(old, bool) and isinstance(new, float)):
        if math.isnan(old):
            if not (isinstance(new, float) and math.isnan(new)):
                out.append(f"{path}: {new!r} vs NaN")
        else:
            extra = float(noise) if isinstance(noise, (int, float)) and not isinstance(noise, bool) else 0.0
            tol = atol + rtol * abs(float(old)) + k * extra
            if not isinstance(new, (int, float)) or not abs(float(new) - float(old)) <= tol:
                how = f" + {k:g}×{extra:.3g} round-off spread" if extra else ""
                out.append(f"{path}: {new!r} vs saved {old!r} (tolerance {tol:.3g}{how})")
    elif new != old and noise is not True:
        out.append(f"{path}: {new!r} vs saved {old!r}")
    return out


def checkable_records(path: str | Path) -> tuple[str, list[dict[str, Any]]]:
    """(kind, one entry per record) of the saved result at `path`: a reproduction result, its Exp2
    real-GD supplement, a calibration result or a targets suite's summary.json. Each entry:
    {"label", "args" (for `RECOMPUTE[kind]`), "saved" (a zero-argument function giving the saved
    values in the recomputed shape), "machine" (the provenance machine it was made on), "model"}."""
    from ttt_core.experiments.calibration_tasks import strip_timings
    from ttt_core.experiments.reproduce_report import RESULT_KIND

    p = Path(path)
    if not p.is_file():
        what = "no such file" if not p.exists() else "not a regular file"
        raise FileNotFoundError(f"{p}: {what} (give a saved result's JSON file)")
    try:
        d = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{p} is not a saved result: it is not JSON ({exc})") from None
    kind = d.get("kind") if isinstance(d, dict) else None
    if kind == RESULT_KIND:
        machine = d["provenance"]["machine"]

        def task(i: int) -> Callable[[], Any]:
            return lambda: {k: v for k, v in d["tasks"][i].items() if k != "seconds"}

        return "reproduction", [{"label": f"task {t['index']}", "args": {"path": str(p), "position": i},
                                 "saved": task(i), "machine": machine, "model": d["settings"]["model"]} for i, t in enumerate(d["tasks"])]
    if kind == "calibration":
        machine = d["provenance"]["machine"]
        files = sorted((p.parent / d["records_folder_name"] / "tasks").glob("*.json"))
        return "calibration", [{"label": f.stem, "args": {"path": str(p), "task_file": f.name}, "machine": machine,
                                "model": d["settings"]["model"],
                                "saved": (lambda f=f: strip_timings(json.loads(f.read_text())))} for f in files]
    if kind == "ttt_lens_targets_suite":
        machine = d["provenance"]["machine"]
        out = []
        for f in sorted((p.parent / "prompts").glob("*.json")):
            rows = json.loads(f.read_text())["comparison"]["rows"]
            for i, r in enumerate(rows):
                out.append({"label": f"{f.name} {r['target']}/{r['signal']}", "machine": machine,
                            "model": d["settings"]["model"],
                            "args": {"path": str(p), "prompt_file": f.name, "row": i},
                            "saved": (lambda f=f, i=i: target_row_fields(
                                json.loads(f.read_text())["comparison"]["rows"][i]))})
        return "targets", out
    if kind == "ttt_lens_exp2_gd_supplement":
        from ttt_core.experiments import exp2_gd

        base = p.parent / d["base"]
        records = exp2_gd.load_records(exp2_gd.records_dir(base))
        model = exp2_gd.load_base(base)[1].model
        return "exp2_gd", [{"label": f"task {i}", "machine": rec["provenance"]["machine"], "model": model,
                            "args": {"base": str(base), "index": i, "labels": sorted(rec["runs"])},
                            "saved": (lambda rec=rec: rec["runs"])} for i, rec in sorted(records.items())]
    raise ValueError(f"{p} is not a saved result this command can check (kind {kind!r}); give a reproduction "
                     "result, its exp2-gd supplement, a calibration result or a targets suite's summary.json")


def recheck_result(path: str | Path, records: int = 3, seed: int | None = None, lm: LoadedModel | None = None,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Recompute `records` records of the saved result at `path`, drawn with `seed` (fresh entropy
    when None; the seed is returned so the draw can be repeated), and compare each with its saved
    values (`tolerance`, then `compare_record`). Returns {"kind", "seed", "records": [{"label",
    "ok", "mismatches", "notes", "check"}], "ok"}."""
    import numpy as np

    kind, entries = checkable_records(path)
    if not entries:
        raise ValueError(f"{path} holds no records to recompute")
    seed = int(np.random.SeedSequence().entropy % (2**32)) if seed is None else int(seed)
    picks = sorted(int(i) for i in np.random.default_rng(seed).choice(len(entries), size=min(records, len(entries)),
                                                                       replace=False))
    log(f"{kind}: recomputing {len(picks)} of {len(entries)} records {picks} (seed {seed})")
    if lm is None:
        lm = _model(entries[0]["model"], None)
    out = []
    for i in picks:
        e = entries[i]
        tol, how = tolerance(e["machine"])
        fresh = RECOMPUTE[kind](lm, **e["args"])
        bad, notes = compare_record(kind, e["args"], fresh, e["saved"](), tol, e["label"])
        out.append({"label": e["label"], "ok": not bad, "mismatches": bad, "notes": notes, "check": how})
        log(f"{e['label']}: {'agrees' if not bad else 'DIFFERS'} ({how})" + "".join(f"\n  {n}" for n in notes + bad[:12]))
    return {"kind": kind, "path": str(path), "seed": seed, "records": out, "ok": all(r["ok"] for r in out)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in RECOMPUTE:
        print(f"usage: python -m ttt_core.experiments.recheck {{{','.join(RECOMPUTE)}}} 'JSON ARGS'", file=sys.stderr)
        return 2
    rec = RECOMPUTE[argv[0]](None, **json.loads(argv[1]))
    print(json.dumps({"record": rec, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                      "mkl_cbwr": os.environ.get("MKL_CBWR")}, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
