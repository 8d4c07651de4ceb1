"""Exports (issue 11): what a chart draws as CSV / JSON, the diagnosis with provenance, and saved
runs that load back. Pure: no Streamlit; the pages' download rows are in pages/downloads.py.

* Envelope (`envelope`): every JSON export is {"ttt_lens_export": EXPORT_VERSION, "kind", "created"
  (UTC ISO 8601), "model", "prompt_sha256" (SHA-256 of the UTF-8 prompt text the engines read,
  `Prompt.to_text()`), "prompt_kind", "settings", "versions" {torch, transformers, ttt_lens, plotly,
  streamlit}, "data"}. A CSV export carries the same fields as leading ``# key: value`` lines: read
  it with ``pandas.read_csv(path, comment="#")`` (strings are quoted, so a "#" inside a value is
  kept), or with `read_export_csv` for the metadata too.
* `figure_table(fig)` / `figure_json(fig)` (ttt_core.figure_data, re-exported): the data read back
  FROM the plotly figure (trace names, x / y / z arrays, plotly's binary "bdata" decoded), so a
  download cannot disagree with its chart; `figure_exports` wraps them in the envelope.
* `SavedRun`: one versioned JSON file per Live qTTT run or Steps & bounds result
  (`to_json` / `from_json`, which validates and refuses a wrong, old or damaged file with a
  `RunFormatError` whose message says why). Comparing runs: ttt_core.run_compare.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from importlib import metadata
from typing import Any, Mapping

import pandas as pd

import ttt_core
from ttt_core.engine import StepRecord
from ttt_core.figure_data import COLUMNS, column_names, figure_json, figure_table, json_clean, slug  # noqa: F401 (re-exported)

EXPORT_VERSION = 1
RUN_VERSION = 1
RUN_KINDS = {"qttt_run": "a Live qTTT run", "steps_run": "a Steps & bounds result"}
OTHER_KINDS = {"figure": "a chart's data", "table": "a table", "diagnosis": "a diagnosis report"}
READ_HINT = 'pandas.read_csv(path, comment="#")'


# ------------------------------------------------------------------------------------------ envelope
def utc_now() -> str:
    """The current time, UTC, ISO 8601 to the second ("2025-01-31T12:00:00Z")."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def prompt_sha256(text: str | None) -> str | None:
    """SHA-256 (hex) of the UTF-8 prompt text, None without a prompt."""
    return None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest()


def versions() -> dict[str, str | None]:
    """Versions of the packages an export depends on (None when one is not installed)."""
    def v(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None
    return {"torch": v("torch"), "transformers": v("transformers"), "ttt_lens": ttt_core.__version__,
            "plotly": v("plotly"), "streamlit": v("streamlit")}


clean = json_clean


def dumps(obj: Any) -> str:
    """JSON text of an export (NaN-free, UTF-8 kept, one-space indent like `ttt-lens diagnose`)."""
    return json.dumps(clean(obj), indent=1, ensure_ascii=False, allow_nan=False)


def envelope(kind: str, data: Any, *, model: str | None = None, prompt_text: str | None = None,
             prompt_kind: str | None = None, settings: Mapping[str, Any] | None = None,
             created: str | None = None) -> dict[str, Any]:
    """The versioned, self-contained envelope of every JSON export (module docstring)."""
    return {"ttt_lens_export": EXPORT_VERSION, "kind": kind, "created": created or utc_now(), "model": model,
            "prompt_sha256": prompt_sha256(prompt_text), "prompt_kind": prompt_kind,
            "settings": clean(dict(settings or {})), "versions": versions(), "data": clean(data)}


def file_name(kind: str, ext: str) -> str:
    """Download file name of an export: ttt_lens_<kind>.<ext> (unsafe characters → "_")."""
    return f"ttt_lens_{re.sub(r'[^A-Za-z0-9_.-]+', '_', kind).strip('_')}.{ext}"


def _header(meta: Mapping[str, Any]) -> str:
    lines = []
    for k, v in meta.items():
        text = v if isinstance(v, str) else json.dumps(clean(v), ensure_ascii=False)
        lines.append(f"# {k}: {' '.join(str(text).split())}")
    return "\n".join(lines) + "\n"


def csv_text(df: pd.DataFrame, meta: Mapping[str, Any]) -> str:
    """CSV with the envelope (`meta`: every field but "data") as leading ``# key: value`` lines, then
    the df's own documentation (df.attrs: title, one "column <name>" line per column, reference
    lines). Strings are quoted, so ``pandas.read_csv(..., comment="#")`` reads it back."""
    head = dict(meta)
    head.pop("data", None)
    attrs = df.attrs or {}
    if attrs.get("title"):
        head["title"] = attrs["title"]
    for col, doc in (attrs.get("columns") or {}).items():
        head[f"column {col}"] = doc
    for i, line in enumerate(attrs.get("lines") or [], 1):
        head[f"line {i}"] = line
    for i, note in enumerate(attrs.get("annotations") or [], 1):
        head[f"annotation {i}"] = note
    if df.empty:
        head["note"] = "this chart draws no data (its title or annotation says why)"
    head["read with"] = READ_HINT
    return _header(head) + df.to_csv(index=False, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\n")


def read_export_csv(source: str | bytes | io.IOBase) -> tuple[dict[str, Any], pd.DataFrame]:
    """(metadata, table) of a CSV export: the ``# key: value`` lines (JSON values decoded) and
    ``pandas.read_csv(..., comment="#")``."""
    if hasattr(source, "read"):
        source = source.read()  # type: ignore[union-attr]
    text = source.decode("utf-8") if isinstance(source, bytes) else str(source)
    meta: dict[str, Any] = {}
    for line in text.splitlines():
        if not line.startswith("# "):
            break
        key, _, value = line[2:].partition(": ")
        try:
            meta[key] = None if value == "null" else (
                json.loads(value) if value[:1] in "{[" or key == "ttt_lens_export" else value)
        except ValueError:
            meta[key] = value
    return meta, pd.read_csv(io.StringIO(text), comment="#")


def figure_exports(fig: Any, figure_id: str, **meta: Any) -> tuple[str, str]:
    """(CSV text, JSON text) of one chart: `figure_table` / `figure_json` inside the envelope
    (kind "figure"; `meta`: model, prompt_text, prompt_kind, settings, created)."""
    env = envelope("figure", None, **meta)
    table = figure_table(fig, column_names(figure_id))
    head = {**{k: v for k, v in env.items() if k != "data"}, "figure": figure_id}
    env["data"] = {"figure": figure_id, **figure_json(fig)}
    return csv_text(table, head), dumps(env)


def table_csv(df: pd.DataFrame, table_id: str, **meta: Any) -> str:
    """A table's CSV in the envelope's comment header (kind "table")."""
    env = envelope("table", None, **meta)
    return csv_text(df, {**{k: v for k, v in env.items() if k != "data"}, "table": table_id})


# ------------------------------------------------------------------------------------------ diagnosis
def diagnosis_export(report: Mapping[str, Any], *, prompt_text: str, settings: Mapping[str, Any],
                     created: str | None = None) -> dict[str, Any]:
    """The `ttt-lens diagnose` report with the envelope's provenance fields added in front
    (ttt_lens_export, kind "diagnosis", created, prompt_sha256, settings); the report's own keys
    and values are unchanged."""
    extra = {"ttt_lens_export": EXPORT_VERSION, "kind": "diagnosis", "created": created or utc_now(),
             "prompt_sha256": prompt_sha256(prompt_text), "settings": clean(dict(settings))}
    return {**{k: v for k, v in extra.items() if k not in report}, **report}


def diagnose_command(model: str, settings: Mapping[str, Any], prompt_file: str = "prompt.txt") -> str:
    """The `ttt-lens diagnose` command line that prints the same report (settings: the keyword
    arguments of `diagnose_report`, plus max_tokens and trust_remote_code)."""
    import shlex

    s = dict(settings)
    parts = ["ttt-lens", "diagnose", prompt_file, "--model", shlex.quote(model)]
    flags = [("subspace", "--subspace"), ("c", "--c"), ("grid", "--grid"), ("delta", "--delta"),
             ("top_k", "--top-k"), ("last_layers", "--last-layers"), ("max_positions", "--max-positions"),
             ("max_tokens", "--max-tokens")]
    for key, flag in flags:
        if s.get(key) is not None:
            parts += [flag, f"{s[key]:g}" if isinstance(s[key], float) else str(s[key])]
    if s.get("trust_remote_code"):
        parts.append("--trust-remote-code")
    return " ".join(parts)


# ------------------------------------------------------------------------------------------ saved runs
class RunFormatError(ValueError):
    """A file that is not a saved run this version can read; the message says why, in words."""


@dataclass
class SavedRun:
    """One saved Live qTTT run (kind "qttt_run": data = records (every StepRecord dict), status,
    answers, backend, timings) or Steps & bounds result (kind "steps_run": data =
    StepsReport.to_dict()), with its provenance. `label` (a file name, say) is not saved."""
    kind: str
    model: str | None
    prompt_sha256: str | None
    prompt_kind: str | None
    settings: dict[str, Any]
    data: dict[str, Any]
    created: str
    versions: dict[str, Any]
    label: str = field(default="", compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"ttt_lens_export": EXPORT_VERSION, "kind": self.kind, "run_version": RUN_VERSION,
                "created": self.created, "model": self.model, "prompt_sha256": self.prompt_sha256,
                "prompt_kind": self.prompt_kind, "settings": self.settings, "versions": self.versions,
                "data": self.data}

    def to_json(self) -> str:
        return dumps(self.to_dict())

    @classmethod
    def from_json(cls, source: str | bytes, *, kind: str | None = None, label: str = "") -> "SavedRun":
        """Parse and validate a saved run; `kind` ("qttt_run" / "steps_run") is the kind expected.
        Raises RunFormatError (never anything else) for a file that is not one."""
        if isinstance(source, bytes):
            try:
                source = source.decode("utf-8")
            except UnicodeDecodeError:
                raise RunFormatError("it is not a text file (not UTF-8), so not a saved TTT Lens run.") from None
        try:
            obj = json.loads(source)
        except ValueError as exc:
            msg = getattr(exc, "msg", str(exc))
            where = f" at line {exc.lineno}, column {exc.colno}" if hasattr(exc, "lineno") else ""
            raise RunFormatError(f"it is not valid JSON ({msg}{where}); the file is damaged or not a saved run.") from None
        want = RUN_KINDS.get(kind or "", "a saved TTT Lens run")
        if not isinstance(obj, dict):
            raise RunFormatError(f"it holds a JSON {type(obj).__name__}, not {want}.")
        if "ttt_lens_export" not in obj:
            what = "a `ttt-lens diagnose` report" if "ttt_lens_diagnose" in obj else "not a TTT Lens export"
            raise RunFormatError(f"it is {what} (no 'ttt_lens_export' field), not {want}.")
        for name, current in (("ttt_lens_export", EXPORT_VERSION), ("run_version", RUN_VERSION)):
            v = obj.get(name)
            if name == "run_version" and v is None and obj.get("kind") not in RUN_KINDS:
                break
            if not isinstance(v, int) or isinstance(v, bool):
                raise RunFormatError(f"its '{name}' field is {v!r}, not a version number.")
            if v > current:
                raise RunFormatError(f"it was written by a newer TTT Lens ({name} {v}; this version reads "
                                     f"{current}). Update TTT Lens to load it.")
            if v < current:
                raise RunFormatError(f"it uses an old format ({name} {v}) that this version (format {current}) "
                                     "no longer reads.")
        k = obj.get("kind")
        if k not in RUN_KINDS:
            what = OTHER_KINDS.get(k, f"an export of kind {k!r}")
            raise RunFormatError(f"it is {what}, not {want}.")
        if kind is not None and k != kind:
            raise RunFormatError(f"it is {RUN_KINDS[k]}, not {want}.")
        for name, types in (("created", (str,)), ("model", (str, type(None))), ("prompt_sha256", (str, type(None))),
                            ("prompt_kind", (str, type(None))), ("settings", (dict,)), ("versions", (dict,)),
                            ("data", (dict,))):
            if name not in obj:
                raise RunFormatError(f"it is damaged: the '{name}' field is missing.")
            if not isinstance(obj[name], types):
                raise RunFormatError(f"it is damaged: '{name}' is a {type(obj[name]).__name__}.")
        sha = obj["prompt_sha256"]
        if sha is not None and not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise RunFormatError("it is damaged: 'prompt_sha256' is not a SHA-256 hex digest.")
        data = validate_run_data(k, obj["data"])
        return cls(kind=k, model=obj["model"], prompt_sha256=sha, prompt_kind=obj["prompt_kind"],
                   settings=obj["settings"], data=data, created=obj["created"], versions=obj["versions"],
                   label=label)


_REC_NUMBERS = ("loss", "loss_per_token", "grad_norm", "step_s", "eval_s", "wall_s", "elapsed_s", "query_prediction",
                "query_error", "answer_nll", "answer_prob", "needle_mass", "context_nll")


def _err(msg: str) -> Exception:
    return RunFormatError(f"it is damaged: {msg}.")


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _num_list(v: Any, where: str, n: int | None = None, optional: bool = True) -> None:
    if v is None and optional:
        return
    if not isinstance(v, list) or not all(x is None or _is_num(x) for x in v):
        raise _err(f"{where} is not a list of numbers")
    if n is not None and len(v) != n:
        raise _err(f"{where} has {len(v)} values for {n} steps")


def _dict(v: Any, where: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise _err(f"'{where}' is missing or not an object")
    return v


def validate_run_data(kind: str, data: Any) -> dict[str, Any]:
    """The checked data of a saved run of `kind`; Live qTTT records are completed with the
    StepRecord defaults of any field an older writer left out. Raises RunFormatError."""
    data = _dict(data, "data")
    if kind == "qttt_run":
        recs = data.get("records")
        if not isinstance(recs, list) or not recs:
            raise _err("it has no step records ('data.records')")
        defaults = {f.name: (f.default_factory() if callable(f.default_factory) else f.default)  # type: ignore[misc]
                    for f in fields(StepRecord) if f.name not in ("step", "mode")}
        out, last = [], -1
        for i, r in enumerate(recs):
            where = f"step record {i}"
            if not isinstance(r, dict):
                raise _err(f"{where} is not an object")
            if not isinstance(r.get("step"), int) or isinstance(r.get("step"), bool) or r["step"] <= last:
                raise _err(f"{where} has no valid, increasing 'step'")
            if r.get("mode") not in ("qttt", "paper"):
                raise _err(f"{where} has mode {r.get('mode')!r} (expected 'qttt' or 'paper')")
            for k in _REC_NUMBERS:
                if r.get(k) is not None and not _is_num(r[k]):
                    raise _err(f"{where}: '{k}' is not a number")
            _num_list(r.get("delta_norms"), f"{where}: 'delta_norms'")
            if r.get("label_probs") is not None and not isinstance(r["label_probs"], dict):
                raise _err(f"{where}: 'label_probs' is not an object")
            last = r["step"]
            out.append({**{k: v for k, v in defaults.items() if k not in r}, **r})
        return {**data, "records": out}
    if kind == "steps_run":
        T = data.get("T_grid")
        _num_list(T, "'T_grid'", optional=False)
        if not T:
            raise _err("'T_grid' is empty")
        n = len(T)
        lin, ev, pb = _dict(data.get("linearised"), "linearised"), _dict(data.get("evidence"), "evidence"), \
            _dict(data.get("pac_bayes"), "pac_bayes")
        for k in ("prediction", "error", "prompt_mse"):
            _num_list(lin.get(k), f"'linearised.{k}'", n)
        for k in ("ell_fixed", "ell_profiled"):
            _num_list(ev.get(k), f"'evidence.{k}'", n, optional=False)
        for k in ("bound", "gibbs"):
            _num_list(pb.get(k), f"'pac_bayes.{k}'", n, optional=False)
        m = data.get("measured")
        if m is not None:
            for k in ("prediction", "error", "prompt_mse", "answer_nll", "answer_prob"):
                _num_list(_dict(m, "measured").get(k), f"'measured.{k}'", n)
        _dict(data.get("verdict"), "verdict")
        return data
    raise _err(f"unknown kind {kind!r}")



def _run(kind: str, data: Mapping[str, Any], settings: Mapping[str, Any], *, model: str | None,
         prompt_text: str | None, prompt_kind: str | None, created: str | None, label: str) -> SavedRun:
    plain = json.loads(dumps(data))  # exactly what a file holds, so a reloaded run compares equal
    return SavedRun(kind=kind, model=model, prompt_sha256=prompt_sha256(prompt_text), prompt_kind=prompt_kind,
                    settings=json.loads(dumps(settings)), data=validate_run_data(kind, plain),
                    created=created or utc_now(), versions=versions(), label=label)


def qttt_saved_run(result: Mapping[str, Any], *, model: str | None, prompt_text: str | None,
                   prompt_kind: str | None, created: str | None = None, label: str = "this run") -> SavedRun:
    """A SavedRun of a Live qTTT result dict (the page's session result: settings, records of
    StepRecord.to_dict(), status, reason, answers and label distributions)."""
    recs = list(result.get("records") or [])
    last = recs[-1] if recs else {}
    steps = [r for r in recs if r.get("step")]
    data = {"records": recs, "status": result.get("status"), "reason": result.get("reason"),
            **{k: result.get(k) for k in ("answer_before", "answer_after", "labels_before", "labels_after",
                                          "true_label", "answer_expected")},
            "backend": last.get("backend"), "backend_label": last.get("backend_label"),
            "timings": {"total_s": last.get("elapsed_s"), "prefill_s": recs[0].get("elapsed_s") if recs else None,
                        "steps": len(steps), "mean_step_s": _mean([r.get("step_s") for r in steps]),
                        "mean_eval_s": _mean([r.get("eval_s") for r in steps]),
                        "mean_wall_s": _mean([r.get("wall_s") for r in steps])}}
    return _run("qttt_run", data, result.get("settings") or {}, model=model, prompt_text=prompt_text,
                prompt_kind=prompt_kind, created=created, label=label)


def steps_saved_run(report: Any, *, prompt_text: str | None, prompt_kind: str | None = None,
                    created: str | None = None, label: str = "this result") -> SavedRun:
    """A SavedRun of a Steps & bounds result (a StepsReport or its to_dict())."""
    data = report if isinstance(report, Mapping) else report.to_dict()
    return _run("steps_run", data, data.get("settings") or {}, model=data.get("model"), prompt_text=prompt_text,
                prompt_kind=prompt_kind or data.get("prompt_kind"), created=created, label=label)


def _mean(xs: list[Any]) -> float | None:
    v = [float(x) for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]
    return sum(v) / len(v) if v else None
