"""The targets suite (issue 12 item 4): `targets.compare_targets` over seeded prompts of two
families — digit shift (the paper's task, `paper_tasks.paper_task`) and needle in a haystack
(`generators.needle_haystack`) — with one cached record per prompt.

Records live in ``<artifacts root>/targets/<model slug>-<settings hash>/prompts/<family>-<i>.json``
and are written as soon as a prompt is done, so an interrupted build resumes where it stopped and
a larger suite reuses a smaller one (prompt i of a family does not depend on the suite size).
Every record carries its provenance (`store.provenance`: command, commit, machine, versions);
`summary.json` is rewritten after each build.

`summarise` gives, per family and target × signal, the mean measured error change with a 95 %
bootstrap CI, how often the row won its prompt, and each row against the reference (qTTT: target
"q" with "nll") paired over prompts, worded by the one suite rule (`stats.suite_verdict`, DESIGN §10:
≥ 20 prompts, a CI excluding 0 and p < 0.05, else "too few prompts" / "not distinguishable").
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ttt_core.experiments.paper_tasks import paper_task, task_rng
from ttt_core.experiments.pool import map_jobs
from ttt_core.experiments.stats import boot_ci, paired_stats, suite_verdict
from ttt_core.experiments.store import artifacts_root, latest_result, provenance, published_dir, write_json
from ttt_core.fused_head import LM_HEAD_MODES, lm_head_mode
from ttt_core.generators import needle_haystack
from ttt_core.models import EMBEDDED_MODEL, LoadedModel
from ttt_core.prompts import Prompt, parse_prompt
from ttt_core.targets.comparison import compare_targets
from ttt_core.types import CountProgress

FAMILIES = ("digit_shift", "needle")
FAMILY_LABELS = {"digit_shift": "digit shift (paper task, 10 demos)", "needle": "needle in a haystack"}
REFERENCE = ("q", "nll")


@dataclass
class TargetsSuiteSettings:
    """Everything a suite record depends on (hashed into its folder name)."""

    model: str = EMBEDDED_MODEL
    targets: tuple[str, ...] = ("q", "v", "o", "mlp_up", "mlp_gate", "mlp_down", "lora:q:8", "norm_attn", "norm_mlp")
    signals: tuple[str, ...] = ("nll", "entropy")
    steps: int = 8
    seeds: tuple[int, ...] = (0,)
    lr: float = 1e-4
    span: int = 128
    last_layers: int | None = None
    kernels: bool = False
    count_flops: bool = False     # the FLOP counter re-runs one step per row (~10 % of a prompt); per-prompt view has it
    max_positions: int = 64
    seed: int = 1212
    n_demos: int = 10
    needle_words: int = 150
    families: tuple[str, ...] = FAMILIES
    kv: str = "auto"              # compare_targets(kv=): "auto" (qTTT for W_Q/LoRA-q, full context else) or "frozen"
    #: how the kernel columns read the LM head (`fused_head.lm_head_mode`): only the kernels read it, so
    #: it is part of a suite's settings (its dict, its key) only with `kernels`
    lm_head: str = "fused"

    def __post_init__(self) -> None:
        self.targets, self.signals = tuple(self.targets), tuple(self.signals)
        self.seeds, self.families = tuple(int(s) for s in self.seeds), tuple(self.families)
        bad = [f for f in self.families if f not in FAMILIES]
        if bad:
            raise ValueError(f"unknown families {bad}; choose from {list(FAMILIES)}")
        if self.kv not in ("auto", "frozen"):
            raise ValueError(f"kv must be 'auto' or 'frozen', not {self.kv!r}")
        if self.lm_head not in LM_HEAD_MODES:
            raise ValueError(f"lm_head must be one of {LM_HEAD_MODES}, not {self.lm_head!r}")

    def to_dict(self) -> dict[str, Any]:
        """The settings as saved; `lm_head` only with `kernels` (suites without kernels, and every suite
        made before the field, do not read the head path)."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        if not self.kernels:
            d.pop("lm_head")
        return d

    def key(self) -> str:
        """Hash of every setting; kv = "auto" (the default, and the only mode before kv existed)
        is left out so that suites made before it keep their folder names."""
        d = self.to_dict()
        if d["kv"] == "auto":
            d.pop("kv")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def suite_name(settings: TargetsSuiteSettings) -> str:
    """The suite's folder name under <artifacts root>/targets: model slug + settings hash."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", settings.model).strip("-").lower()[:40]
    return f"{slug}-{settings.key()}"


def suite_folder(settings: TargetsSuiteSettings, root: str | Path | None = None) -> Path:
    """`root` when given, else <artifacts root>/targets/<suite_name>."""
    return Path(root) if root is not None else artifacts_root() / "targets" / suite_name(settings)


def make_prompt(settings: TargetsSuiteSettings, family: str, index: int) -> Prompt:
    """Prompt `index` of `family` (seeded by settings.seed; independent of the suite size)."""
    if family == "digit_shift":
        return paper_task(settings.seed, index, n=settings.n_demos).prompt
    if family == "needle":
        rng = task_rng(settings.seed, index, stream=7)
        return needle_haystack(rng, n_words=settings.needle_words, position=float(rng.uniform(0.1, 0.9)))
    raise ValueError(f"unknown family {family!r}")


def _record_path(folder: Path, family: str, index: int) -> Path:
    return folder / "prompts" / f"{family}-{index:04d}.json"


def run_prompt(lm: LoadedModel, settings: TargetsSuiteSettings, family: str, index: int,
               command: str | None = None) -> dict[str, Any]:
    """The record of one prompt: the comparison (`TargetComparison.to_dict()`) and provenance."""
    p = make_prompt(settings, family, index)
    with lm_head_mode(settings.lm_head):
        cmp = compare_targets(lm, p, settings.targets, settings.signals, steps=settings.steps, seeds=settings.seeds,
                              lr=settings.lr, span=settings.span, last_layers=settings.last_layers,
                              max_positions=settings.max_positions, kernels=settings.kernels,
                              count_flops=settings.count_flops, kv=settings.kv)
    return {"kind": "ttt_lens_targets_prompt", "family": family, "index": int(index), "prompt_text": p.to_text(),
            "settings": settings.to_dict(), "comparison": cmp.to_dict(), "provenance": provenance(command)}


def _prompt_job(lm: LoadedModel, job: tuple) -> str:
    """Pool job (`pool.map_jobs`): compute one prompt's record and write it; returns its path."""
    settings, family, index, path, command = job
    write_json(Path(path), run_prompt(lm, settings, family, index, command))
    return path


def build_suite(lm: LoadedModel | None, settings: TargetsSuiteSettings, n_prompts: int, *,
                root: str | Path | None = None, command: str | None = None, progress: CountProgress = None,
                workers: int = 1, backend: str = "process") -> dict[str, Any]:
    """`n_prompts` prompts per family: cached records are reused, missing ones computed and written
    one by one (resumable), in this process (`lm`) or on `workers` single-threaded worker processes
    (`pool.map_jobs`; `lm` may then be None). Returns `summarise` of all records, also written to
    summary.json (with the backend and worker count)."""
    if lm is not None and lm.name != settings.model:
        raise ValueError(f"the settings are for {settings.model!r} but the model is {lm.name!r}")
    folder = suite_folder(settings, root)
    (folder / "prompts").mkdir(parents=True, exist_ok=True)
    jobs = [(f, i) for f in settings.families for i in range(int(n_prompts))]
    have = {job: _read(_record_path(folder, *job)) for job in jobs}   # the cached records, read once
    todo = [job for job in jobs if have[job] is None]
    pooled = workers > 1 and len(todo) > 1
    if todo and lm is None and not pooled:
        raise ValueError("a model is needed to run the prompts that are not cached")
    cached = len(jobs) - len(todo)

    def tick(done: int, total: int = 0, text: str = "") -> None:
        if progress is not None:
            progress(cached + done, len(jobs), f"{done}/{len(todo)} prompts run ({cached} cached)")

    tick(0)
    map_jobs(_prompt_job, [(settings, f, i, str(_record_path(folder, f, i)), command) for f, i in todo],
             model=settings.model, backend=backend if pooled else "serial", workers=workers, lm=lm, progress=tick,
             label="prompts")
    records = []
    for fam, i in jobs:
        rec = have[(fam, i)] or _read(_record_path(folder, fam, i))
        if rec is None:
            raise RuntimeError(f"the record of {fam} prompt {i} was not written under {folder}")
        records.append(rec)
    summary = summarise(records)
    summary.update({"kind": "ttt_lens_targets_suite", "settings": settings.to_dict(), "folder": suite_name(settings),
                    "backend": backend if pooled else "serial", "workers": int(workers) if pooled else 1,
                    "provenance": provenance(command, workers if pooled else None)})
    write_json(folder / "summary.json", summary, indent=1)
    return summary


def _read(path: Path) -> dict[str, Any] | None:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and d.get("kind") == "ttt_lens_targets_prompt" else None


def load_records(settings: TargetsSuiteSettings, root: str | Path | None = None) -> list[dict[str, Any]]:
    """Every cached prompt record of these settings (any number per family)."""
    folder = suite_folder(settings, root) / "prompts"
    recs = [_read(p) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
    return [r for r in recs if r is not None]


def _num(x: Any) -> float:
    return float("nan") if x is None else float(x)


def summarise(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per family: rows (target, signal, n, mean_delta, ci_low, ci_high, wins, vs_reference) —
    module docstring."""
    fams: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        fams.setdefault(r["family"], []).append(r)
    out: dict[str, Any] = {"families": {}, "n_prompts": {f: len(v) for f, v in fams.items()},
                           "reference": f"{REFERENCE[0]} / {REFERENCE[1]} (qTTT)"}
    for fam, recs in fams.items():
        deltas: dict[tuple[str, str], list[float]] = {}
        wins: dict[tuple[str, str], int] = {}
        for r in recs:
            c = r["comparison"]
            for row in c["rows"]:
                deltas.setdefault((row["target"], row["signal"]), []).append(_num(row["delta_mean"]))
            if c.get("winner"):
                t, s = (x.strip() for x in c["winner"].split("/"))
                wins[(t, s)] = wins.get((t, s), 0) + 1
        ref = np.array(deltas.get(REFERENCE, []), dtype=float)
        rows = []
        for (t, s), d in deltas.items():
            a = np.array(d, dtype=float)
            ok = np.isfinite(a)
            lo, hi = boot_ci(a)
            row = {"target": t, "signal": s, "n": int(ok.sum()),
                   "mean_delta": float(a[ok].mean()) if ok.any() else None,
                   "ci_low": None if not np.isfinite(lo) else lo, "ci_high": None if not np.isfinite(hi) else hi,
                   "wins": wins.get((t, s), 0), "vs_reference": None}
            if (t, s) != REFERENCE and ref.size == a.size:
                both = ok & np.isfinite(ref)
                if both.sum() >= 2:
                    st = paired_stats(ref[both], a[both], n_boot=2000)   # d = ref − row: positive = row better
                    v = suite_verdict(st, int(both.sum()), f"{t} / {s} beats qTTT", f"{t} / {s} is worse than qTTT",
                                      "qTTT")
                    row["vs_reference"] = {**st, "verdict": v.text}
            rows.append(row)
        rows.sort(key=lambda r: (r["mean_delta"] is None, r["mean_delta"] if r["mean_delta"] is not None else 0.0))
        out["families"][fam] = rows
    return out


@dataclass
class SuiteView:
    """A summary with its records, for the Targets page."""

    summary: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)


def published_targets_dir() -> Path:
    """artifacts/published/targets: the committed suite, shown when nothing newer exists."""
    return published_dir("targets")


def _newest_summary(base: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest <suite folder>/summary.json under `base`, by its provenance's creation time."""
    return latest_result(base, "ttt_lens_targets_suite", pattern="*/summary.json",
                         created=lambda d: (d.get("provenance") or {}).get("created", ""))


def latest_summary(root: str | Path | None = None) -> tuple[Path, dict[str, Any]] | None:
    """The newest summary.json under `root` — by default <artifacts root>/targets (suites built on
    this machine), else the committed suite under artifacts/published/targets — None when there is
    none."""
    if root is not None:
        return _newest_summary(Path(root))
    return _newest_summary(artifacts_root() / "targets") or _newest_summary(published_targets_dir())


def is_published(path: str | Path) -> bool:
    """Whether a summary path lies in the committed folder (artifacts/published/targets)."""
    return published_targets_dir().resolve() in Path(path).resolve().parents


def prompt_of(record: dict[str, Any]) -> Prompt:
    return parse_prompt(record["prompt_text"])
