"""The calibration suite on disk (issue 16; DESIGN §10): one JSON record per prompt
(`calibration_tasks.run_calibration_task`), cached under
``<out>/<model>-<settings hash>/tasks/<task id>.json`` and resumable, and the summary of a run
(`run_calibration`: the report of `calibration_report` plus provenance) written beside it as
``<out>/calibration-<time>.json`` with ``"kind": "calibration"``.

Each record is written as soon as its prompt is done, so an interrupted build resumes where it
stopped (``resume=True``) and larger suites reuse smaller ones (task ids and seeds do not depend on
the suite size). A prompt that enters the head-choice subset later (a larger ``n_head``) is run
again with its head subsets (the same seeds give the same oracle). Prompts not cached run
serially with the given model, or on `pool.map_jobs` (process pool or Ray; each worker loads
`settings.model` once, 1 torch thread) when workers > 1.

Where results are looked up (`latest_calibration`): the newest summary under
``<artifacts root>/calibration``, else the committed one under ``artifacts/published/calibration``.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ttt_core.experiments.calibration_report import calibration_report
from ttt_core.experiments.calibration_tasks import (
    CalibrationSettings,
    calibration_specs,
    head_subset,
    run_calibration_task,
)
from ttt_core.experiments.pool import map_jobs
from ttt_core.experiments.store import artifacts_root, latest_result, provenance, published_dir, write_json
from ttt_core.experiments.suite import Suite
from ttt_core.experiments.suite_tasks import TaskSpec
from ttt_core.models import LoadedModel
from ttt_core.types import CountProgress

KIND = "calibration"


def calibration_dir() -> Path:
    """<artifacts root>/calibration: the calibration suites and their summaries."""
    return artifacts_root() / KIND


def published_calibration_dir() -> Path:
    """artifacts/published/calibration: the committed result, shown when nothing newer exists."""
    return published_dir(KIND)


def records_dir(settings: CalibrationSettings, out: str | Path | None = None) -> Path:
    """<out or calibration_dir()>/<model slug>-<settings hash>."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", settings.model).strip("-").lower()[:40]
    return Path(out if out is not None else calibration_dir()) / f"{slug}-{settings.key()}"


def settings_from_dict(d: dict[str, Any]) -> CalibrationSettings:
    """CalibrationSettings from its JSON (lists back to tuples). Settings saved before `lm_head`
    existed (2026-12-03) were made with the model's own logits: a missing key reads "logits"."""
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    kw.setdefault("lm_head", "logits")
    return CalibrationSettings(**kw)


def _task_file(folder: str | Path, task_id: str) -> Path:
    return Path(folder) / "tasks" / f"{task_id}.json"


def _cached(folder: Path, spec: TaskSpec, heads: bool) -> dict[str, Any] | None:
    f = _task_file(folder, spec.task_id)
    if not f.exists():
        return None
    try:
        rec = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    return rec if (not heads or "heads" in rec) else None


def _calibration_job(lm: LoadedModel, job: tuple[TaskSpec, CalibrationSettings, str, bool]) -> str:
    """One prompt for `pool.map_jobs`: run it and write its record (in the worker)."""
    spec, settings, folder, heads = job
    rec = run_calibration_task(lm, spec, settings, heads=heads)
    write_json(_task_file(folder, rec["task_id"]), rec)
    return rec["task_id"]


def build_calibration(lm: LoadedModel | None, settings: CalibrationSettings, n_prompts: int, n_head: int, *,
                      out: str | Path | None = None, resume: bool = True, workers: int = 1, backend: str = "process",
                      progress: CountProgress = None) -> Suite:
    """Run (or, with `resume`, read from the cache) every prompt of a calibration suite of
    `n_prompts` prompts, the first `n_head` of `head_subset` order with their head-choice runs.
    Returns a `suite.Suite` of the records (the schedules and the controller read it)."""
    settings.validate()
    if lm is not None and getattr(lm, "name", settings.model) != settings.model:
        raise ValueError(f"the calibration settings are for model {settings.model!r}, not {lm.name!r}")
    folder = records_dir(settings, out)
    (folder / "tasks").mkdir(parents=True, exist_ok=True)
    write_json(folder / "settings.json", asdict(settings), indent=1)
    specs = calibration_specs(n_prompts, settings.families)
    with_heads = head_subset(specs, n_head)
    todo = [s for s in specs if not (resume and _cached(folder, s, s.task_id in with_heads) is not None)]
    t0 = time.perf_counter()

    def tick(done: int, total: int = 0, text: str = "") -> None:
        if progress is not None:
            progress(done, len(todo), f"{done}/{len(todo)} prompts run ({len(specs) - len(todo)} cached) — "
                                      f"{time.perf_counter() - t0:.0f} s")

    tick(0)
    pooled = workers > 1 and len(todo) > 1
    if todo and lm is None and not pooled:
        raise ValueError("a model is needed to run the prompts that are not cached")
    map_jobs(_calibration_job, [(s, settings, str(folder), s.task_id in with_heads) for s in todo],
             model=settings.model, backend=backend if pooled else "serial", workers=workers, lm=lm, progress=tick,
             label="prompts")
    tasks = [json.loads(_task_file(folder, s.task_id).read_text()) for s in specs]
    return Suite(settings, tasks, str(folder))  # type: ignore[arg-type]


def load_calibration(settings: CalibrationSettings, n_prompts: int, out: str | Path | None = None) -> Suite | None:
    """The suite of `n_prompts` from the cache if every record is there, else None."""
    folder = records_dir(settings, out)
    tasks = []
    for spec in calibration_specs(n_prompts, settings.families):
        f = _task_file(folder, spec.task_id)
        if not f.exists():
            return None
        tasks.append(json.loads(f.read_text()))
    return Suite(settings, tasks, str(folder))  # type: ignore[arg-type]


def run_calibration(lm: LoadedModel | None, settings: CalibrationSettings, n_prompts: int, n_head: int, *,
                    out: str | Path | None = None, resume: bool = True, workers: int = 1, backend: str = "process",
                    command: str | None = None, progress: CountProgress = None, n_boot: int = 2000,
                    write: bool = True) -> dict[str, Any]:
    """Build the suite, compute the report (`calibration_report.calibration_report`) and write the
    summary (report + settings + provenance: command, commit, machine, seeds, wall time) to
    <out>/calibration-<time>.json. Returns the summary (with "path" when written)."""
    t0 = time.perf_counter()
    suite = build_calibration(lm, settings, n_prompts, n_head, out=out, resume=resume, workers=workers,
                              backend=backend, progress=progress)
    t1 = time.perf_counter()
    report = calibration_report(suite.tasks, settings, n_boot=n_boot)
    prov = provenance(command, workers if workers > 1 else None)
    summary = {
        "kind": KIND, "format": "ttt_lens_calibration/1", "created": prov["created"], "provenance": prov,
        "settings": asdict(settings), "settings_key": settings.key(), "model": settings.model,
        "n_prompts": len(suite), "n_head_prompts": sum(1 for t in suite.tasks if "heads" in t),
        "records_folder": str(Path(suite.folder).resolve()) if suite.folder else None,
        "records_folder_name": Path(suite.folder).name if suite.folder else None,
        "seeds": {s: sorted(int(t["seed"]) for t in suite.tasks if t["split"] == s) for s in ("train", "val", "test")},
        "backend": backend if workers > 1 else "serial", "workers": int(workers),
        "wall_seconds": time.perf_counter() - t0, "suite_seconds": t1 - t0,
        "task_seconds_by_family": _seconds_by_family(suite.tasks), "report": report,
    }
    if write:
        folder = Path(out if out is not None else calibration_dir())
        folder.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        path = write_json(folder / f"calibration-{stamp}.json", summary, indent=1)
        summary["path"] = str(path)
    return summary


def _seconds_by_family(tasks: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean wall seconds per prompt of each family (with and without the head-choice runs)."""
    out: dict[str, dict[str, float]] = {}
    for fam in dict.fromkeys(t["family"] for t in tasks):
        rows = [t for t in tasks if t["family"] == fam]
        plain = [t["task_seconds"] - t.get("heads", {}).get("head_seconds", 0.0) for t in rows if "task_seconds" in t]
        heads = [t["heads"]["head_seconds"] for t in rows if "heads" in t]
        out[fam] = {"prompts": len(rows), "oracle_and_stats_s": sum(plain) / len(plain) if plain else float("nan"),
                    "head_runs_s": sum(heads) / len(heads) if heads else float("nan")}
    return out


def saved_calibrations(folders: list[Path] | None = None) -> list[tuple[Path, dict[str, Any]]]:
    """Every calibration summary in `folders` (default: calibration_dir(), then the published
    folder), newest first."""
    found = []
    for folder in folders if folders is not None else [calibration_dir(), published_calibration_dir()]:
        for p in sorted(Path(folder).glob("calibration-*.json")) if Path(folder).is_dir() else []:
            try:
                d = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(d, dict) and d.get("kind") == KIND:
                found.append((p, d))
    found.sort(key=lambda pd: (pd[1].get("created", ""), pd[0].stat().st_mtime), reverse=True)
    return found


def latest_calibration() -> tuple[Path, dict[str, Any], str] | None:
    """(path, summary, source) of the newest saved result (source "saved"), else the published one
    ("published"), else None."""
    hit = latest_result(calibration_dir(), KIND)
    if hit is not None:
        return hit[0], hit[1], "saved"
    hit = latest_result(published_calibration_dir(), KIND)
    return None if hit is None else (hit[0], hit[1], "published")


def saved_suite(path: str | Path, res: dict[str, Any] | None = None) -> Suite | None:
    """The `Suite` of records behind the saved summary at `path` (its JSON `res`, read when not
    given), or None when the summary is unreadable or names records that are missing."""
    try:
        res = json.loads(Path(path).read_text()) if res is None else res
        return load_calibration(settings_from_dict(res["settings"]), int(res["n_prompts"]), out=Path(path).parent)
    except (KeyError, TypeError, ValueError, OSError):
        return None


def record_seconds(path: str | Path, res: dict[str, Any]) -> float | None:
    """Σ of the per-prompt compute seconds (`task_seconds`, head runs included) of every record of
    the saved result at `path` (summary `res`), or None when its records are missing. Unlike the
    summary's wall_seconds (the last invocation only: a resumed run times only the prompts it
    computed), this covers every record, whichever run made it (per worker: workers run in parallel)."""
    suite = saved_suite(path, res)
    return None if suite is None else suite_seconds(suite)


def suite_seconds(suite: Suite) -> float:
    """Σ of the per-prompt compute seconds (`task_seconds`, head runs included) of a suite's records."""
    return float(sum(float(t.get("task_seconds", 0.0)) for t in suite.tasks))

