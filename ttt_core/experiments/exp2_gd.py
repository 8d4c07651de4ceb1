"""Exp2's real GD as a resumable supplement to a published reproduction (DESIGN §7.1, §10;
GitHub issue 16, point 4).

Why a supplement
----------------
Exp2's measured query error needs one real GD run per distinct block set of a task (up to 48 runs
× T = 8 steps): ~4 CPU-minutes per SmolLM2 task, so 200 tasks are ~14 CPU-hours — more than one
working session on a 2-core machine. A published reproduction with ``--exp2 linear`` already holds,
for every task, the block sets each method chose and their step sizes ρ (``entry["blocks"]``,
``entry["rho"]``). Those depend only on the task and the kernel, not on GD, so the GD part can be
computed afterwards, task by task, from the published file:

* one record file per task (``task-00042.json`` in ``exp2-gd-<base file stem>/`` beside the base
  file), written atomically when the task is done; a rerun skips the tasks that have one, so the
  sweep resumes across interruptions, sessions and machines. Every record carries the base file's
  sha256, its own provenance (command, commit, machine, threads, UTC time) and compute seconds.
* the GD numbers are exactly what ``reproduce --exp2 both`` computes for that task
  (`reproduce._exp2`): ``paper_gd.gd_trajectory(lm, prompt, "v", S, ρ_S, T)`` once per distinct
  block set S (any order), in the order the base record lists the selections
  (tests/unit/experiments/test_exp2_gd.py checks the two agree to 1e-9 on a tiny model).
* `summarize_supplement` merges the records into the base tasks and summarises Exp2 with
  `reproduce_report.summarize_exp2` ("gd", and "linear" on the same tasks) and
  `reproduce_report.exp2_linear_vs_gd`; `write_supplement` writes ``exp2-gd-<stem>.json`` and
  ``.md`` beside the base file (the Reproduction page shows them).

Command (resumable; ``--tasks`` is how many of the base file's first tasks to cover)::

    python -m ttt_core reproduce-gd --tasks 200 --workers 2
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ttt_core.experiments.paper_tasks import ReproSettings, paper_task
from ttt_core.experiments.pool import map_jobs
from ttt_core.experiments.reproduce_report import (
    RESULT_KIND,
    exp2_linear_vs_gd,
    exp2_markdown,
    findings,
    summarize_exp2,
)
from ttt_core.experiments.store import provenance, write_json
from ttt_core.models import LoadedModel
from ttt_core.paper_gd import gd_trajectory
from ttt_core.types import Block, CountProgress, parse_block_label

RECORD_KIND = "ttt_lens_exp2_gd_record"
SUPPLEMENT_KIND = "ttt_lens_exp2_gd_supplement"
VERSION = 1


# ============================================================================================
# files
# ============================================================================================


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (hex): which base file a record was computed from."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def records_dir(base_path: str | Path) -> Path:
    """The folder of the per-task GD records of `base_path`: ``exp2-gd-<stem>/`` beside it."""
    base_path = Path(base_path)
    return base_path.parent / f"exp2-gd-{base_path.stem}"


def supplement_path(base_path: str | Path) -> Path:
    """The summary file of the supplement: ``exp2-gd-<stem>.json`` beside the base file."""
    base_path = Path(base_path)
    return base_path.parent / f"exp2-gd-{base_path.stem}.json"


def record_path(folder: Path, index: int) -> Path:
    return folder / f"task-{int(index):05d}.json"


def load_base(base_path: str | Path) -> tuple[dict[str, Any], ReproSettings]:
    """The base reproduction result and its settings; refuses a file that is not one, or one whose
    tasks carry no Exp2 block sets."""
    d = json.loads(Path(base_path).read_text())
    if d.get("kind") != RESULT_KIND:
        raise ValueError(f"{base_path} is not a reproduction result (kind {d.get('kind')!r})")
    s = settings_of(d)
    if s.exp2 == "off" or not any(t.get("exp2") and t["exp2"].get("budgets") for t in d.get("tasks", [])):
        raise ValueError(f"{base_path} has no Exp2 block sets (it was run with --exp2 off)")
    return d, s


def settings_of(d: dict[str, Any]) -> ReproSettings:
    return ReproSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in d["settings"].items()})


def load_records(folder: str | Path) -> dict[int, dict[str, Any]]:
    """Every finished record in `folder`, by task index."""
    out: dict[int, dict[str, Any]] = {}
    for p in sorted(Path(folder).glob("task-*.json")) if Path(folder).is_dir() else []:
        rec = json.loads(p.read_text())
        if rec.get("kind") == RECORD_KIND:
            out[int(rec["index"])] = rec
    return out


# ============================================================================================
# one task
# ============================================================================================


def block_sets(exp2: dict[str, Any]) -> list[tuple[tuple[Block, ...], list[Block], float]]:
    """The distinct block sets of a task's Exp2 record, in the order the record lists them
    (budgets, then methods): (sorted key, blocks in the method's order, ρ of that selection).
    `reproduce._exp2` runs GD once per key, with the first selection's order and ρ."""
    seen: dict[tuple[Block, ...], tuple[list[Block], float]] = {}
    for row in exp2["budgets"].values():
        for entry in row.values():
            blocks = [_block(lbl) for lbl in entry["blocks"]]
            key = tuple(sorted(blocks))
            if key not in seen:
                seen[key] = (blocks, float(entry["rho"]))
    return [(k, b, rho) for k, (b, rho) in seen.items()]


def _block(label: str) -> Block:
    layer, head, sub = parse_block_label(label)
    if sub not in (None, "v"):
        raise ValueError(f"Exp2 blocks are W_V heads; got {label!r}")
    return (int(layer), int(head))


def run_gd_record(lm: LoadedModel, s: ReproSettings, task: dict[str, Any],
                  only: list[tuple[Block, ...]] | None = None) -> dict[str, Any]:
    """Exp2's real GD for one base task record: {"index", "runs": {set label: {"query_error",
    "prompt_mse", "status"}}, "seconds"}. The prompt is rebuilt from the settings and must be the
    base record's prompt. `only`: just these block-set keys (the recompute test)."""
    t0 = time.perf_counter()
    index = int(task["index"])
    prompt = paper_task(s.seed, index, s.n_demos).prompt
    if prompt.to_text() != task["prompt"]:
        raise ValueError(f"task {index}: the settings rebuild a different prompt than the base record's")
    store: dict = {}   # hidden states below the first updated layer, shared by this task's runs
    runs: dict[str, Any] = {}
    for key, blocks, rho in block_sets(task["exp2"]):
        if only is not None and key not in only:
            continue
        g = gd_trajectory(lm, prompt, "v", blocks, rho, s.fixed_T, store)
        runs[set_label(key)] = {"query_error": float(g["error"][-1]), "prompt_mse": float(g["prompt_mse"][-1]),
                                "status": g["status"]}
    return {"index": index, "runs": runs, "seconds": time.perf_counter() - t0}


def set_label(key: tuple[Block, ...]) -> str:
    """A block set's name in a record: its sorted W_V head labels joined by '+'."""
    return "+".join(f"L{layer}.vH{head}" for layer, head in key)


def _job(lm: LoadedModel, job: tuple) -> dict[str, Any]:
    """One unit of work for `pool.map_jobs`: (base task record, settings dict, record file, base
    sha256, command). A failed task is reported, not raised, and writes no record (a rerun retries it)."""
    task, sd, out, sha, command = job
    s = ReproSettings(**sd)
    try:
        res = run_gd_record(lm, s, task)
    except Exception as exc:
        return {"index": int(task["index"]), "error": f"{type(exc).__name__}: {exc}"}
    rec = {"kind": RECORD_KIND, "version": VERSION, "base_sha256": sha, **res,
           "provenance": provenance(command, workers=1)}
    write_json(out, rec)
    return rec


# ============================================================================================
# the sweep and its summary
# ============================================================================================


def run_supplement(base_path: str | Path, tasks: int | None = None, backend: str = "process", workers: int = 2,
                   lm: LoadedModel | None = None, progress: CountProgress = None,
                   command: str | None = None) -> dict[str, Any]:
    """Compute the missing GD records of the base file's first `tasks` tasks (all by default),
    then write and return the supplement summary (`write_supplement`)."""
    base_path = Path(base_path)
    d, s = load_base(base_path)
    sha = file_sha256(base_path)
    folder = records_dir(base_path)
    folder.mkdir(parents=True, exist_ok=True)
    have = load_records(folder)
    stale = [i for i, r in have.items() if r.get("base_sha256") != sha]
    if stale:
        raise ValueError(f"{len(stale)} records in {folder} were computed from another base file (tasks "
                         f"{sorted(stale)[:5]}…); move them away first")
    chosen = sorted((t for t in d["tasks"] if "error" not in t and t.get("exp2")), key=lambda t: t["index"])
    chosen = chosen if tasks is None else chosen[: int(tasks)]
    cmd = command or f"ttt-lens reproduce-gd --base {base_path}"
    todo = [(t, s.to_dict(), str(record_path(folder, t["index"])), sha, cmd) for t in chosen if t["index"] not in have]
    if todo:
        for res in map_jobs(_job, todo, model=s.model, backend=backend, workers=workers, lm=lm, progress=progress,
                            label="Exp2 GD tasks"):
            if "error" in res:
                print(f"warning: task {res['index']} failed: {res['error']}")
    return write_supplement(base_path)


def merge(d: dict[str, Any], records: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """The base tasks that have a GD record, each selection's entry given its set's "gd" numbers
    (as `reproduce._exp2` stores them with ``--exp2 both``)."""
    out = []
    for t in sorted(d["tasks"], key=lambda t: t["index"]):
        rec = records.get(int(t["index"]))
        if rec is None or "error" in t or not t.get("exp2"):
            continue
        budgets = {}
        for b, row in t["exp2"]["budgets"].items():
            budgets[b] = {}
            for name, entry in row.items():
                key = tuple(sorted(_block(lbl) for lbl in entry["blocks"]))
                budgets[b][name] = {**entry, "gd": dict(rec["runs"][set_label(key)])}
        out.append({**t, "exp2": {**t["exp2"], "budgets": budgets}})
    return out


def summarize_supplement(base_path: str | Path) -> dict[str, Any]:
    """The supplement summary from the base file and the records beside it (see module docstring)."""
    base_path = Path(base_path)
    d, s = load_base(base_path)
    sha = file_sha256(base_path)
    records = {i: r for i, r in load_records(records_dir(base_path)).items() if r.get("base_sha256") == sha}
    tasks = merge(d, records)
    first = tasks[0]["exp2"] if tasks else {}
    exp2 = {"gd": summarize_exp2(tasks, s, "gd"), "linear": summarize_exp2(tasks, s, "linear"),
            "candidates": first.get("candidates", 0), "candidate_layers": first.get("candidate_layers"),
            "linear_vs_gd": exp2_linear_vs_gd(tasks, s)}
    secs = [float(r["seconds"]) for r in records.values()]
    commits = sorted({r["provenance"].get("commit") or "?" for r in records.values()})
    machines = sorted({f"{m.get('cpu_model') or m['processor']} × {m['cpu_count']}"
                       for m in (r["provenance"]["machine"] for r in records.values())})
    runs = sum(len(r["runs"]) for r in records.values())
    indices = sorted(records)
    return {"kind": SUPPLEMENT_KIND, "version": VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "base": base_path.name, "base_sha256": sha, "settings": d["settings"],
            "tasks": len(tasks), "base_tasks": len(d["tasks"]),
            "contiguous": indices == list(range(len(indices))),
            "gd_runs": runs, "task_seconds": {"sum": float(np.sum(secs)) if secs else 0.0,
                                              "median": float(np.median(secs)) if secs else None},
            "record_commits": commits, "record_machines": machines,
            "command": "ttt-lens reproduce-gd --base " + f"{base_path.parent.name}/{base_path.name}",
            "summary": {"tasks_ok": len(tasks), "exp2": exp2},
            "findings": findings({"tasks_ok": len(tasks), "exp2": exp2})}


def write_supplement(base_path: str | Path) -> dict[str, Any]:
    """Write ``exp2-gd-<stem>.json`` and ``.md`` beside the base file; returns the summary."""
    sup = summarize_supplement(base_path)
    jp = supplement_path(base_path)
    write_json(jp, sup, indent=1)
    jp.with_suffix(".md").write_text(supplement_markdown(sup))
    return sup


def supplement_markdown(sup: dict[str, Any]) -> str:
    """The supplement as Markdown: what it covers, the Exp2 tables and the findings."""
    ts = sup["task_seconds"]
    med = "—" if ts["median"] is None else f"{ts['median']:.0f} s"
    lines = ["# Exp2 with real GD (TTT Lens): a supplement to a published reproduction", "",
             f"Base: `{sup['base']}` (sha256 {sup['base_sha256'][:12]}…) · **{sup['tasks']} of its "
             f"{sup['base_tasks']} tasks** have their real-GD records ({sup['gd_runs']} GD runs; "
             f"{'tasks 0…' + str(sup['tasks'] - 1) if sup['contiguous'] and sup['tasks'] else 'not contiguous'}) · "
             f"compute {ts['sum'] / 3600:.2f} CPU-h, median {med} per task · record commits "
             f"{', '.join(c[:7] for c in sup['record_commits'])} · machines {'; '.join(sup['record_machines'])} · "
             f"created {sup['created']}", "",
             f"Command (resumable): `{sup['command']}`", ""]
    lines += exp2_markdown(sup["summary"]["exp2"], sup["settings"])
    lines += ["## What the real GD says", ""] + [f"* {x}" for x in sup["findings"] if x.startswith("Exp2")] + [""]
    return "\n".join(lines) + "\n"


def latest_supplement(base_path: str | Path) -> dict[str, Any] | None:
    """The supplement summary written beside `base_path`, if there is one made from this very file
    (same sha256); None otherwise."""
    p = supplement_path(base_path)
    if not p.is_file():
        return None
    sup = json.loads(p.read_text())
    ok = sup.get("kind") == SUPPLEMENT_KIND and sup.get("base_sha256") == file_sha256(base_path)
    return sup if ok else None


__all__ = ["RECORD_KIND", "SUPPLEMENT_KIND", "block_sets", "file_sha256", "latest_supplement", "load_records", "merge",
           "record_path", "records_dir", "run_gd_record", "run_supplement", "set_label", "summarize_supplement",
           "supplement_markdown", "supplement_path", "write_supplement"]
