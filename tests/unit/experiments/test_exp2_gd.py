"""Exp2's real GD as a supplement to a published reproduction (ttt_core.experiments.exp2_gd):
the records equal what ``reproduce --exp2 both`` computes for the same tasks, a sweep resumes
from its records, records of another base file are refused, and the saved summary is the one
the records give."""

from __future__ import annotations

import dataclasses
import json

import pytest

from ttt_core.cli import main
from ttt_core.experiments import exp2_gd as G
from ttt_core.experiments.paper_tasks import ReproSettings
from ttt_core.experiments.reproduce import run_reproduction
from ttt_core.experiments.reproduce_report import write_results
from ttt_core.models import build_tiny_model

LINEAR = ReproSettings(model="tiny-random-llama", tasks=3, grid_max=2, fixed_T=2, exp1_kinds=("v",), exp2="linear",
                       exp2_layers=2, exp2_budgets=(1, 2), exp2_random_draws=2, n_boot=200)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model("llama", seed=0)


@pytest.fixture(scope="module")
def base(tiny, tmp_path_factory):
    """A linear-only reproduction written as a results file (the supplement's base)."""
    out = tmp_path_factory.mktemp("repro")
    res = run_reproduction(LINEAR, backend="serial", lm=tiny)
    jp, _ = write_results(res, out)
    return jp


def test_records_equal_the_exp2_both_run_of_the_same_tasks(tiny, base):
    sup = G.run_supplement(base, tasks=2, backend="serial", lm=tiny, command="test")
    assert sup["tasks"] == 2 and sup["base_tasks"] == 3 and sup["contiguous"]
    both = run_reproduction(dataclasses.replace(LINEAR, tasks=2, exp2="both"), backend="serial", lm=tiny)
    merged = G.merge(json.loads(base.read_text()), G.load_records(G.records_dir(base)))
    assert [t["index"] for t in merged] == [0, 1]
    n = 0
    for ref, got in zip(both["tasks"], merged):
        for b, row in ref["exp2"]["budgets"].items():
            for name, entry in row.items():
                assert got["exp2"]["budgets"][b][name]["blocks"] == entry["blocks"]
                for k in ("query_error", "prompt_mse"):
                    assert got["exp2"]["budgets"][b][name]["gd"][k] == pytest.approx(entry["gd"][k], abs=1e-9)
                assert got["exp2"]["budgets"][b][name]["gd"]["status"] == entry["gd"]["status"]
                n += 1
    assert n == 2 * 2 * (3 + 2)
    # the merged summary is the "both" run's Exp2 summary (same tasks, same numbers)
    ref_gd = both["summary"]["exp2"]["gd"]
    for b, e in ref_gd.items():
        assert sup["summary"]["exp2"]["gd"][b]["tasks"] == e["tasks"] == 2
        assert sup["summary"]["exp2"]["gd"][b]["query_aware"]["query_error"]["delta"] == pytest.approx(
            e["query_aware"]["query_error"]["delta"], abs=1e-9)
    assert sup["summary"]["exp2"]["linear_vs_gd"]["tasks"] == 2
    assert any(x.startswith("Exp2 (measured GD)") for x in sup["findings"])


def test_a_rerun_resumes_and_the_saved_summary_is_what_the_records_give(tiny, base, monkeypatch):
    G.run_supplement(base, tasks=2, backend="serial", lm=tiny, command="test")
    folder = G.records_dir(base)
    before = {p.name: p.read_text() for p in folder.glob("task-*.json")}
    calls = []
    real = G.gd_trajectory
    monkeypatch.setattr(G, "gd_trajectory", lambda *a, **k: calls.append(1) or real(*a, **k))
    sup = G.run_supplement(base, tasks=3, backend="serial", lm=tiny, command="test")
    after = {p.name: p.read_text() for p in folder.glob("task-*.json")}
    assert set(after) == set(before) | {"task-00002.json"}
    assert all(after[k] == v for k, v in before.items())             # finished records are not recomputed
    assert len(calls) == len(G.block_sets(json.loads(base.read_text())["tasks"][2]["exp2"]))   # task 2 only
    assert sup["tasks"] == 3
    saved = json.loads(G.supplement_path(base).read_text())
    fresh = G.summarize_supplement(base)
    saved.pop("created"), fresh.pop("created")
    assert json.loads(json.dumps(fresh)) == saved
    assert G.latest_supplement(base)["tasks"] == 3
    md = G.supplement_path(base).with_suffix(".md").read_text()
    assert "3 of its 3 tasks" in md and "real GD" in md


def test_records_of_another_base_file_are_refused(tiny, base, tmp_path):
    other = tmp_path / base.name
    d = json.loads(base.read_text())
    d["created"] = "another run"
    other.write_text(json.dumps(d))
    folder = G.records_dir(other)
    folder.mkdir()
    rec = json.loads(next(G.records_dir(base).glob("task-*.json")).read_text()) if G.records_dir(base).is_dir() \
        else {"kind": G.RECORD_KIND, "index": 0, "runs": {}, "base_sha256": "0" * 64}
    (folder / "task-00000.json").write_text(json.dumps({**rec, "base_sha256": "0" * 64}))
    with pytest.raises(ValueError, match="another base file"):
        G.run_supplement(other, tasks=1, backend="serial", lm=tiny)
    assert G.latest_supplement(other) is None


def test_a_prompt_that_the_settings_do_not_rebuild_is_refused(tiny, base):
    task = dict(json.loads(base.read_text())["tasks"][0])
    task["prompt"] = task["prompt"] + "\n7->7"
    with pytest.raises(ValueError, match="different prompt"):
        G.run_gd_record(tiny, LINEAR, task)


def test_a_file_that_is_not_a_reproduction_is_refused(tmp_path):
    p = tmp_path / "x.json"
    p.write_text(json.dumps({"kind": "something else"}))
    with pytest.raises(ValueError, match="not a reproduction result"):
        G.load_base(p)


def test_cli_summary_only_rewrites_the_summary_without_a_model(tiny, base, capsys):
    G.run_supplement(base, tasks=1, backend="serial", lm=tiny, command="test")
    G.supplement_path(base).unlink()
    assert main(["reproduce-gd", "--base", str(base), "--summary-only", "--quiet"]) == 0
    out = capsys.readouterr()
    assert "Exp2 with real GD" in out.out and "summary:" in out.err
    assert G.latest_supplement(base) is not None
    assert main(["reproduce-gd", "--base", str(base.with_name("missing.json")), "--quiet"]) == 2
