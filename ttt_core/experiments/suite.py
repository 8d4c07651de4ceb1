"""The schedule suite: one record per task (`suite_tasks.run_task`), cached as JSON under
``<artifacts root>/schedules/<model>-<settings hash>/tasks/<task id>.json``, and the arrays the
schedules read off it (`Suite`).

Each task's record is written as soon as it is done, so an interrupted build resumes where it
stopped and larger suites reuse smaller ones (task ids and seeds do not depend on the suite size).
Tasks not cached run serially with the given model, or on `pool.map_jobs` (each worker loads
`settings.model` once, 1 torch thread) when workers > 1.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ttt_core.experiments.pool import map_jobs
from ttt_core.experiments.store import schedules_dir, write_json
from ttt_core.experiments.suite_tasks import SuiteSettings, TaskSpec, make_specs, run_task
from ttt_core.models import LoadedModel
from ttt_core.types import Progress


def suite_dir(settings: SuiteSettings, root: str | Path | None = None) -> Path:
    """`root` if given, else <artifacts root>/schedules/<model slug>-<settings hash>."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", settings.model).strip("-").lower()[:40]
    return Path(root) if root is not None else schedules_dir() / f"{slug}-{settings.key()}"


@dataclass
class Suite:
    """Results of a suite: settings plus one record per task (see `suite_tasks.run_task`)."""

    settings: SuiteSettings
    tasks: list[dict[str, Any]]
    folder: str | None = None

    # ------------------------------------------------------------------ selection
    def split(self, name: str | Sequence[str]) -> "Suite":
        names = {name} if isinstance(name, str) else set(name)
        return Suite(self.settings, [t for t in self.tasks if t["split"] in names], self.folder)

    def families(self, names: Sequence[str]) -> "Suite":
        return Suite(self.settings, [t for t in self.tasks if t["family"] in set(names)], self.folder)

    def __len__(self) -> int:
        return len(self.tasks)

    # ------------------------------------------------------------------ arrays
    @property
    def errors(self) -> np.ndarray:
        """(n_tasks, T_max + 1) measured error after T steps."""
        return np.array([t["errors"] for t in self.tasks], dtype=float).reshape(len(self.tasks), -1)

    @property
    def seconds(self) -> np.ndarray:
        """(n_tasks, T_max + 1) measured cumulative adaptation seconds after T steps."""
        return np.array([t["seconds"] for t in self.tasks], dtype=float).reshape(len(self.tasks), -1)

    @property
    def stats_seconds(self) -> np.ndarray:
        return np.array([t["stats_seconds"] for t in self.tasks], dtype=float)

    @property
    def family(self) -> np.ndarray:
        return np.array([t["family"] for t in self.tasks])

    @property
    def seeds(self) -> np.ndarray:
        return np.array([t["seed"] for t in self.tasks], dtype=np.int64)

    def stat(self, name: str) -> np.ndarray:
        return np.array([np.nan if t["stats"].get(name) is None else float(t["stats"][name]) for t in self.tasks])

    def to_json(self) -> dict[str, Any]:
        return {"settings": asdict(self.settings), "tasks": self.tasks}


def _task_file(folder: str | Path, task_id: str) -> Path:
    return Path(folder) / "tasks" / f"{task_id}.json"


def load_cached_suite(settings: SuiteSettings, n_tasks: int, root: str | Path | None = None) -> Suite | None:
    """The suite of `n_tasks` from the cache if every task is there, else None."""
    folder = suite_dir(settings, root)
    tasks = []
    for spec in make_specs(n_tasks, settings.families):
        f = _task_file(folder, spec.task_id)
        if not f.exists():
            return None
        tasks.append(json.loads(f.read_text()))
    return Suite(settings, tasks, str(folder))


def _suite_job(lm: LoadedModel, job: tuple[TaskSpec, SuiteSettings, str]) -> str:
    """One task for `pool.map_jobs`: run it and write its record (in the worker)."""
    spec, settings, folder = job
    rec = run_task(lm, spec, settings)
    write_json(_task_file(folder, rec.task_id), rec.to_dict())
    return rec.task_id


def build_suite(lm: LoadedModel | None, settings: SuiteSettings, n_tasks: int, *, root: str | Path | None = None,
                progress: Progress = None, use_cache: bool = True, workers: int = 1, backend: str = "process") -> Suite:
    """Run (or read from the cache) every task of a suite of `n_tasks` tasks.

    Each task's record is written to <suite dir>/tasks/<task id>.json as soon as it is done, so
    an interrupted build resumes where it stopped and larger suites reuse smaller ones.
    workers > 1 runs tasks in that many single-threaded processes (`backend` "process", or Ray
    tasks with "ray"; each loads `settings.model`; `lm` may then be None)."""
    settings.validate()
    if lm is not None and getattr(lm, "name", settings.model) != settings.model:
        raise ValueError(f"the suite settings are for model {settings.model!r}, not {lm.name!r}")
    folder = suite_dir(settings, root)
    (folder / "tasks").mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(json.dumps(asdict(settings), indent=1))
    specs = make_specs(n_tasks, settings.families)
    todo = [s for s in specs if not (use_cache and _task_file(folder, s.task_id).exists())]
    t0 = time.perf_counter()

    def report(done: int, total: int = 0, text: str = "") -> None:
        if progress is not None:
            progress(done / max(len(todo), 1), f"{done}/{len(todo)} tasks run ({len(specs) - len(todo)} cached) — "
                                               f"{time.perf_counter() - t0:.0f} s")

    report(0)
    pooled = workers > 1 and len(todo) > 1
    if todo and lm is None and not pooled:
        raise ValueError("a model is needed to run the tasks that are not cached")
    map_jobs(_suite_job, [(spec, settings, str(folder)) for spec in todo], model=settings.model,
             backend=backend if pooled else "serial", workers=workers, lm=lm, progress=report, label="tasks")
    tasks = [json.loads(_task_file(folder, s.task_id).read_text()) for s in specs]
    suite = Suite(settings, tasks, str(folder))
    write_json(folder / f"suite-{n_tasks}.json", suite.to_json())
    return suite
