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

A suite built with kernels (``--suite-kernels``) also gets `kernel_check`: per family and target,
whether the target's kernel verdict (DESIGN §4, §5.1: P(TTT beats ICL) at T_MAP over the λ⋆
posterior) foresaw the measured change of the same target on the same prompt. The kernel speaks of
gradient descent in the kernel regime for T_MAP steps; the measured run is `steps` AdamW steps, a
different update: the check says how far the kernel's answer carries over to the real run, not
whether the kernel mathematics is right (that is tested against autograd and Monte-Carlo).
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
from ttt_core.experiments.store import artifacts_root, provenance, published_dir, results_newest_first, write_json
from ttt_core.fused_head import LM_HEAD_MODES, lm_head_mode
from ttt_core.generators import needle_haystack
from ttt_core.models import EMBEDDED_MODEL, LoadedModel
from ttt_core.prompts import Prompt, parse_prompt
from ttt_core.targets.comparison import compare_targets
from ttt_core.targets.signals import SIGNALS
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
    check = kernel_check(records)
    if check is not None:
        out["kernel_check"] = check
    return out


#: the signal whose measured change the kernel verdict is compared with: the kernel is that of the
#: squared-loss frame of next-token prediction (DESIGN §7, §11); for entropy it describes a pseudo-residual
KERNEL_CHECK_SIGNAL = "nll"


def _kernel_group(items: list[tuple[dict[str, Any], float]]) -> dict[str, Any]:
    """Statistics of (kernel columns, measured change) pairs — `kernel_check`'s docstring."""
    from ttt_core.experiments.calibration_report import balanced_accuracy, reliability_bins
    from ttt_core.noise_posterior import ADAPT, DONT_ADAPT

    p = np.array([float(k["prob_ttt_beats_icl"]) for k, _ in items], dtype=float)
    helped = np.array([d < 0.0 for _, d in items], dtype=bool)
    dec = [k.get("decision") for k, _ in items]
    firm = [(x == ADAPT, h) for x, h in zip(dec, helped) if x in (ADAPT, DONT_ADAPT)]
    ba = balanced_accuracy(p >= 0.5, helped)
    med = lambda key: float(np.median([float(k[key]) for k, _ in items if k.get(key) is not None]))  # noqa: E731
    return {"n": len(items), "helped": int(helped.sum()),
            "effective_rank_median": med("effective_rank"), "lambda_star_median": med("lambda_star"),
            "verdict_T_median": med("verdict_T"), "mean_prob": float(p.mean()),
            "adapt": sum(x == ADAPT for x in dec), "dont_adapt": sum(x == DONT_ADAPT for x in dec),
            "undetermined": sum(x not in (ADAPT, DONT_ADAPT) for x in dec),
            "brier": float(np.mean((p - helped) ** 2)),
            "brier_base_rate": float(np.mean((helped.mean() - helped) ** 2)),
            "balanced_accuracy": None if not np.isfinite(ba) else ba,
            "firm_agreement": None if not firm else float(np.mean([a == h for a, h in firm])), "firm_n": len(firm),
            "reliability": [{k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in b.items()}
                            for b in reliability_bins(p, helped.astype(float), n_bins=5)]}


def kernel_check(records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Does a target's kernel verdict foresee its measured change? (module docstring)

    Per family and target (signal `KERNEL_CHECK_SIGNAL`), over the prompts whose kernel was built
    (status "ok") and whose run has a finite change Δ = measured error after N steps − before:
    "helped" = Δ < 0; the medians of the kernel's effective rank, λ⋆ and T_MAP; the mean
    P(TTT beats ICL); how many verdicts were adapt / don't adapt / undetermined; the Brier score
    mean (P − helped)² beside the base-rate forecaster's (always P = the share helped); the
    balanced accuracy of P ≥ 0.5; the agreement of the firm verdicts (adapt ⇔ helped); and
    reliability bins of P. The same pooled over the family's targets (key "all"). None when no
    record has kernel columns."""
    fams: dict[str, dict[str, list[tuple[dict[str, Any], float]]]] = {}
    for r in records:
        for row in r["comparison"]["rows"]:
            k, d = row.get("kernel") or {}, row.get("delta_mean")
            if (row["signal"] != KERNEL_CHECK_SIGNAL or k.get("status") != "ok" or k.get("prob_ttt_beats_icl") is None
                    or d is None or not np.isfinite(float(d))):
                continue
            fams.setdefault(r["family"], {}).setdefault(row["target"], []).append((k, float(d)))
    if not fams:
        return None
    out: dict[str, Any] = {"signal": KERNEL_CHECK_SIGNAL, "families": {}}
    for fam, by_target in fams.items():
        rows = {t: _kernel_group(items) for t, items in by_target.items()}
        rows["all"] = _kernel_group([x for items in by_target.values() for x in items])
        out["families"][fam] = rows
    return out


#: how a suite's K/V mode reads in a sentence (setting "kv" other than "frozen")
_KV_WORDS = {"auto": "qTTT for W_Q, full context for the rest"}


def _n_prompts(summary: dict[str, Any]) -> int:
    """Prompts in a suite's summary, over its families."""
    return sum((summary.get("n_prompts") or {}).values())


def kernel_transfer(found: Sequence[tuple[Path, dict[str, Any]]] | None = None) -> dict[str, Any] | None:
    """What the newest suite with kernel columns says about carrying a kernel verdict over to a real
    run, for the pages that show a verdict (Steps & bounds): per family, pooled over the suite's
    targets (`kernel_check` key "all"), the Brier score of P(TTT beats ICL) against "the target's own
    run helped" beside the base-rate forecaster's, the balanced accuracy of P ≥ 0.5 and n; plus the
    suite's file, date, run settings and one sentence. `found`: (path, summary) pairs newest first
    (default `all_summaries()`). None when no suite has kernel columns."""
    for path, summary in (all_summaries() if found is None else found):
        kc = summary.get("kernel_check") or {}
        fams = {f: rows["all"] for f, rows in (kc.get("families") or {}).items() if "all" in rows}
        if not fams:
            continue
        st = summary.get("settings", {})
        parts = []
        for fam, g in fams.items():
            ba = g.get("balanced_accuracy")
            parts.append(f"{FAMILY_LABELS.get(fam, fam)}: Brier {g['brier']:.2f} against the base rate's "
                         f"{g['brier_base_rate']:.2f}" + ("" if ba is None else f", balanced accuracy {ba:.2f}")
                         + f" ({g['n']} prompt × target pairs)")
        better = [g["brier"] < g["brier_base_rate"] for g in fams.values()]
        how = ("foresaw whether the target's own run helped better than the base rate"
               if all(better) else "did no better than the base rate at foreseeing whether the target's own run "
               "helped" if not any(better) else "beat the base rate in some families only")
        kv = "keys and values frozen" if st.get("kv") == "frozen" else _KV_WORDS["auto"]
        sentence = (f"On the {'committed' if is_published(path) else 'locally built'} targets suite "
                    f"({_n_prompts(summary)} prompts, "
                    f"{len(st.get('targets', []))} targets, {st.get('steps')} AdamW steps at lr {st.get('lr'):g} "
                    f"on {' / '.join(SIGNALS.get(x, x) for x in st.get('signals', []))}, {kv}), the kernel verdict {how}: " + "; ".join(parts) + ".")
        return {"path": str(path), "folder": Path(path).parent.name, "created": (summary.get("provenance") or {}).get("created"),
                "published": is_published(path), "settings": st, "families": fams, "sentence": sentence}
    return None


@dataclass
class SuiteView:
    """A summary with its records, for the Targets page."""

    summary: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)


def published_targets_dir() -> Path:
    """artifacts/published/targets: the committed suite, shown when nothing newer exists."""
    return published_dir("targets")


def _summaries(base: Path) -> list[tuple[Path, dict[str, Any]]]:
    """The <suite folder>/summary.json files under `base`, newest first by provenance creation time."""
    return results_newest_first(base, "ttt_lens_targets_suite", pattern="*/summary.json",
                                created=lambda d: (d.get("provenance") or {}).get("created", ""))


def all_summaries(root: str | Path | None = None) -> list[tuple[Path, dict[str, Any]]]:
    """Every suite's summary.json — under `root`, or by default the suites built on this machine
    (<artifacts root>/targets) and then the committed ones (artifacts/published/targets) — each
    group newest first (by provenance creation time)."""
    bases = [Path(root)] if root is not None else [artifacts_root() / "targets", published_targets_dir()]
    return [hit for base in bases for hit in _summaries(base)]


def latest_summary(root: str | Path | None = None) -> tuple[Path, dict[str, Any]] | None:
    """The first of `all_summaries`: the newest suite built on this machine, else the newest
    committed one; None when there is none."""
    found = all_summaries(root)
    return found[0] if found else None


def suite_label(path: str | Path, summary: dict[str, Any]) -> str:
    """One line naming a suite for a picker: where it is from, its targets × signals, K/V mode,
    whether it has kernel columns, its prompts and its date."""
    s = summary.get("settings", {})
    n = _n_prompts(summary)
    when = str((summary.get("provenance") or {}).get("created", ""))[:10] or "undated"
    kv = "frozen K/V for every target" if s.get("kv") == "frozen" else _KV_WORDS["auto"]
    return (f"{'committed' if is_published(path) else 'built here'} · {len(s.get('targets', []))} targets × "
            f"{'/'.join(s.get('signals', []))} · {kv} · {'with' if s.get('kernels') else 'no'} kernel columns · "
            f"{n} prompts · {when}")


def is_published(path: str | Path) -> bool:
    """Whether a summary path lies in the committed folder (artifacts/published/targets)."""
    return published_targets_dir().resolve() in Path(path).resolve().parents


def prompt_of(record: dict[str, Any]) -> Prompt:
    return parse_prompt(record["prompt_text"])
