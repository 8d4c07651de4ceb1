"""One way to run a sweep of jobs: in this process, on a local process pool, or on Ray.

A job function is a module-level ``fn(lm, job) -> result`` (picklable by reference) and a job any
picklable value. `map_jobs(fn, jobs, model=...)` returns the results in job order on every
backend:

* ``serial`` — in this process, with the given model as it is (thread count untouched); without
  one, the model is loaded once as in a worker.
* ``process`` (default) — `concurrent.futures.ProcessPoolExecutor` with the spawn context; each
  worker loads `model` once in its initializer and sets torch to 1 thread, and exits when the
  process that started it is gone (`_exit_with_parent`): a suite whose command is killed (SIGTERM,
  SIGKILL) leaves no workers behind still writing records into its folder.
* ``ray`` — one remote task per job (1 CPU each) on a local Ray instance with num_cpus=workers, or
  on the cluster at ``$RAY_ADDRESS``; each Ray worker process loads the model once (module cache)
  and sets torch to 1 thread.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Callable, Sequence

import torch

from ttt_core.experiments.store import REPO_ROOT
from ttt_core.models import LoadedModel, load_model
from ttt_core.types import CountProgress

BACKENDS = ("process", "ray", "serial")
JobFn = Callable[[LoadedModel, Any], Any]

_WORKER: dict[str, Any] = {}


def _init_worker(model: str) -> None:
    """Process initializer (and lazy Ray / serial set-up): 1 torch thread, the model loaded once."""
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if _WORKER.get("name") != model:
        _WORKER["lm"] = load_model(model)
        _WORKER["name"] = model


#: seconds between a pool worker's checks that its parent process still lives
PARENT_CHECK_S = 1.0


def _exit_with_parent(parent: int, every: float = PARENT_CHECK_S) -> threading.Thread:
    """A daemon thread that ends this process (exit code 3) once `parent` is no longer its parent
    (the parent died and the worker was re-parented), checked every `every` seconds. A worker killed
    with its pool otherwise outlives a killed command and keeps running jobs: measured, two workers of
    a killed targets suite went on writing prompt records for 15 minutes."""
    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(3)
            time.sleep(every)

    t = threading.Thread(target=watch, name="ttt-lens-parent-watch", daemon=True)
    t.start()
    return t


def _init_pool_worker(model: str, parent: int) -> None:
    """The process pool's initializer: the parent watch, then `_init_worker`."""
    _exit_with_parent(parent)
    _init_worker(model)


def worker_model(model: str) -> LoadedModel:
    """This process's worker copy of `model` (loaded on first use)."""
    _init_worker(model)
    return _WORKER["lm"]


def _call(fn: JobFn, model: str, job: Any) -> Any:
    return fn(worker_model(model), job)


def _ray_results(fn: JobFn, jobs: Sequence[Any], model: str, workers: int, tick: Callable[[int], None]) -> list[Any]:
    import ray  # optional and heavy: only for this backend

    results: list[Any] = [None] * len(jobs)
    started = False
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, runtime_env={"working_dir": str(REPO_ROOT), "excludes": [
                ".venv", "artifacts", ".git", "*.safetensors", "*.gguf"]}, log_to_driver=False)
        else:
            path = os.pathsep.join([str(REPO_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
            ray.init(num_cpus=max(1, int(workers)), include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1",
                                               "TOKENIZERS_PARALLELISM": "false"}})
        started = True
    try:
        remote = ray.remote(num_cpus=1)(_call)
        refs = [remote.remote(fn, model, job) for job in jobs]
        index = {ref: i for i, ref in enumerate(refs)}
        pending, done = list(refs), 0
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                results[index[ref]] = ray.get(ref)
                done += 1
                tick(done)
    finally:
        if started:
            ray.shutdown()
    return results


def map_jobs(fn: JobFn, jobs: Sequence[Any], *, model: str, backend: str = "process", workers: int = 2,
             lm: LoadedModel | None = None, progress: CountProgress = None, label: str = "jobs") -> list[Any]:
    """``[fn(lm, job) for job in jobs]`` on `backend` (see module docstring); `progress(done, total,
    "done/total label")` after every finished job."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: use process, ray or serial")
    total = len(jobs)

    def tick(done: int) -> None:
        if progress is not None:
            progress(done, total, f"{done}/{total} {label}")

    if backend == "ray":
        return _ray_results(fn, jobs, model, workers, tick)
    results: list[Any] = [None] * total
    if backend == "serial":
        use = lm if lm is not None or not jobs else worker_model(model)
        for i, job in enumerate(jobs):
            results[i] = fn(use, job)
            tick(i + 1)
        return results
    with ProcessPoolExecutor(max_workers=max(1, int(workers)), mp_context=mp.get_context("spawn"),
                             initializer=_init_pool_worker, initargs=(model, os.getpid())) as pool:
        futs = {pool.submit(_call, fn, model, job): i for i, job in enumerate(jobs)}
        for done, fut in enumerate(as_completed(futs), 1):
            results[futs[fut]] = fut.result()
            tick(done)
    return results
