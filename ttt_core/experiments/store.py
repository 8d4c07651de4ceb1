"""Where experiment results live and how they are written.

One artifacts root: ``$TTT_LENS_ARTIFACTS``, else ``<repo>/artifacts`` (git-ignored) in a clone, or
``./artifacts`` in the working directory for an installed package (never inside site-packages).
Below it:

* ``reproduction/`` — paper reproduction results (``$TTT_LENS_REPRO_DIR`` overrides this folder);
* ``schedules/<model>-<settings hash>/`` — the cached schedule suites;
* ``controller/`` — the trained step controller and its evaluation.

One JSON encoder (`json_default`: numpy scalars and arrays), one writer (`write_json`: atomic, so
a reader never sees half a file) and one lookup of the results of a kind, newest first (`results_newest_first`, `latest_result`).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
IN_CLONE = (REPO_ROOT / "pyproject.toml").is_file() and (REPO_ROOT / "ttt_core").is_dir()


def artifacts_root() -> Path:
    """$TTT_LENS_ARTIFACTS, else <repo>/artifacts in a clone, else ./artifacts."""
    env = os.environ.get("TTT_LENS_ARTIFACTS")
    if env:
        return Path(env)
    return REPO_ROOT / "artifacts" if IN_CLONE else Path.cwd() / "artifacts"


def reproduction_dir() -> Path:
    """Where reproduction results are written and looked up: $TTT_LENS_REPRO_DIR, else
    <artifacts root>/reproduction."""
    env = os.environ.get("TTT_LENS_REPRO_DIR")
    return Path(env) if env else artifacts_root() / "reproduction"


PUBLISHED_DIR = REPO_ROOT / "artifacts" / "published"


def published_dir(kind: str) -> Path:
    """<repo>/artifacts/published/<kind>: results committed with the project (with the command,
    commit, seeds and machine that made them), shown by the pages when nothing newer exists."""
    return PUBLISHED_DIR / kind


#: Where `cpu_model` reads the CPU's name (Linux).
CPUINFO = Path("/proc/cpuinfo")


def cpu_model() -> str | None:
    """The CPU's model name (the first "model name" line of `CPUINFO`), or None where unknown:
    `platform.processor()` says only "x86_64", which cannot tell two machines' timings apart."""
    try:
        for line in CPUINFO.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() or None
    except OSError:
        pass
    return None


def provenance(command: str | None = None, workers: int | None = None) -> dict[str, Any]:
    """What a saved result needs to be checked: the command, the git commit (and whether the tree
    had uncommitted changes outside artifacts/: a run resuming into a committed results folder
    rewrites files there, which says nothing about the code that computed them), the machine and
    the library versions."""
    commit, dirty = None, None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)artifacts"], cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=10).stdout
        dirty = bool(status.strip()) if commit else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"command": command or " ".join(sys.argv), "commit": commit, "uncommitted_changes": dirty,
            "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                        "torch_threads_per_worker": 1 if workers else torch.get_num_threads()},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def schedules_dir() -> Path:
    """<artifacts root>/schedules: one folder per suite settings."""
    return artifacts_root() / "schedules"


def controller_dir() -> Path:
    """<artifacts root>/controller: the trained step controller."""
    return artifacts_root() / "controller"


def json_default(o: Any) -> Any:
    """`json.dumps` default: numpy scalars and arrays as Python numbers and lists."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def dumps(obj: Any, indent: int | None = None) -> str:
    return json.dumps(obj, indent=indent, default=json_default)


def write_json(path: str | Path, obj: Any, indent: int | None = None) -> Path:
    """Write `obj` as JSON to `path` atomically (a temporary file, then a rename)."""
    path = Path(path)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(dumps(obj, indent))
    os.replace(tmp, path)
    return path


def results_newest_first(folder: str | Path, kind: str, pattern: str = "*.json",
                         created: Callable[[dict[str, Any]], str] | None = None) -> list[tuple[Path, dict[str, Any]]]:
    """Every JSON file matching `pattern` in `folder` whose "kind" is `kind`, with its contents,
    newest first by creation time (`created(contents)`, by default its "created" field; then the
    file's mtime); unreadable files are skipped."""
    folder = Path(folder)
    when = created or (lambda d: d.get("created", ""))
    found = []
    for p in sorted(folder.glob(pattern)) if folder.is_dir() else []:
        try:
            d = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(d, dict) and d.get("kind") == kind:
            found.append(((str(when(d)), p.stat().st_mtime), p, d))
    found.sort(key=lambda x: x[0], reverse=True)
    return [(p, d) for _, p, d in found]


def latest_result(folder: str | Path, kind: str, pattern: str = "*.json",
                  created: Callable[[dict[str, Any]], str] | None = None) -> tuple[Path, dict[str, Any]] | None:
    """The newest JSON file matching `pattern` in `folder` whose "kind" is `kind`, by its creation
    time (`results_newest_first`), with its contents; None when there is none."""
    found = results_newest_first(folder, kind, pattern, created)
    return found[0] if found else None
