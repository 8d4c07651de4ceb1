"""AppTest: the Paper reproduction page through app.py — no results yet, then a small run from the
button; the tables and the figure show exactly the numbers in the results JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from tests.app.plotly_json import decode
from ttt_core.experiments.paper_tasks import PAPER_EXP1
from ttt_core.experiments.reproduce_report import latest_results

APP = str(Path(__file__).resolve().parents[2] / "app.py")
MODEL = "tiny-random-llama"


def app() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=300)
    at.session_state["model_name"] = MODEL
    at.session_state["model_preset"] = MODEL
    at.run()
    return at.switch_page("pages/reproduction.py").run()


def run_small(tasks: int, exp2: str | None = None) -> AppTest:
    """The page's "Run reproduction" button with `tasks` tasks on grid 0..8 (and an Exp2 mode)."""
    at = app()
    at.number_input(key="repro_tasks").set_value(tasks)
    at.number_input(key="repro_grid").set_value(8)
    if exp2 is not None:
        at.selectbox(key="repro_exp2").set_value(exp2)
    at.button(key="repro_run").click()
    at.run()
    assert not at.exception, at.exception
    return at


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    """An empty results folder and no committed results (artifacts/published/ hidden)."""
    import ttt_core.experiments.store as store

    monkeypatch.setenv("TTT_LENS_REPRO_DIR", str(tmp_path / "runs"))
    monkeypatch.setattr(store, "PUBLISHED_DIR", tmp_path / "published")
    return tmp_path / "runs"


def test_the_committed_result_is_shown_by_default_with_how_it_was_made(tmp_path, monkeypatch):
    from ttt_core.experiments.store import published_dir

    committed = sorted(published_dir("reproduction").glob("reproduction-*.json"))
    assert committed, "artifacts/published/reproduction holds the committed result"
    monkeypatch.setenv("TTT_LENS_REPRO_DIR", str(tmp_path))          # nothing newer
    at = app()
    assert not at.exception, at.exception
    doc = json.loads(committed[-1].read_text())
    assert {m.label: m.value for m in at.metric}["Tasks"] == str(doc["summary"]["tasks_ok"])
    captions = " ".join(c.value for c in at.caption)
    assert committed[-1].name in captions
    assert f"`{doc['provenance']['command']}`" in captions and doc["provenance"]["commit"][:12] in captions
    # how to check it: the recheck command names this very file (relative to the working directory)
    assert f"ttt-lens recheck {committed[-1].resolve().relative_to(Path.cwd().resolve())} --records 3" in captions


def test_no_results_says_how_to_make_them(results_dir):
    at = app()
    assert not at.exception
    text = " ".join(i.value for i in at.info)
    assert "No reproduction results yet" in text and "python -m ttt_core reproduce" in text
    assert not at.dataframe and not at.get("plotly_chart")  # no numbers that were not computed


def test_button_runs_a_small_reproduction_and_the_page_shows_it(results_dir):
    at = run_small(2)
    assert not at.error, [e.value for e in at.error]
    found = latest_results(results_dir)
    assert found is not None
    path, res = found
    summ = res["summary"]
    assert summ["tasks_ok"] == 2 and res["settings"]["model"] == MODEL and res["backend"] == "serial"
    assert {m.label: m.value for m in at.metric}["Tasks"] == "2"
    assert res["settings"]["exp2"] == "gd"  # the page's default is real GD
    frames = [d.value for d in at.dataframe]
    # per subspace: this run's Exp1 table, then the paper's published table; then Exp2 (measured GD)
    assert len(frames) == 2 * len(summ["exp1"]) + 1
    for i, block in enumerate(summ["exp1"].values()):
        mine, paper = frames[2 * i], frames[2 * i + 1]
        np.testing.assert_allclose(mine["Query MSE"].to_numpy(), [r["mse"] for r in block["rows"]], rtol=1e-12)
        np.testing.assert_allclose(mine["Mean T"].to_numpy(), [r["mean_T"] for r in block["rows"]], rtol=1e-12)
        assert list(mine["Method"]) == [r["label"] for r in block["rows"]]
        np.testing.assert_allclose(paper["Query MSE"].to_numpy(), [r["mse"] for r in PAPER_EXP1["rows"]])
    exp2 = frames[-1]
    gd = summ["exp2"]["gd"]
    assert summ["exp2"]["linear"] is None
    assert list(exp2["Budget"]) == [int(b) for b in gd]
    np.testing.assert_allclose(exp2["Query-Aware (greedy) ΔMSE"].to_numpy(),
                               [e["query_aware"]["query_error"]["delta"] for e in gd.values()], rtol=1e-12)
    np.testing.assert_allclose(exp2["QA − TopK p (permutation)"].to_numpy(),
                               [e["qa_vs_topk"]["query_error"]["p"] for e in gd.values()], rtol=1e-12)
    fig = json.loads(at.get("plotly_chart")[0].proto.spec)
    for kind, block in summ["exp1"].items():
        tr = next(t for t in fig["data"] if t["name"] == f"mean query MSE, {block['subspace']} heads")
        np.testing.assert_allclose(decode(tr["y"]), block["mean_error_by_T"], rtol=1e-12)
    text = " ".join(m.value for m in at.markdown)
    assert "What did and did not reproduce" in text and res["findings"][0] in text
    # 2 tasks: every verdict sentence on the page says too few tasks, none claims a result
    assert all(f in text for f in res["findings"])
    assert text.count("too few tasks to decide (2 < 20 paired tasks)") >= 2 * len(summ["exp1"]) + 1
    assert "reproduces here" not in text and "does not reproduce" not in text and "Exp2 — block selection (measured GD" in text
    assert any("a verdict needs ≥ 20 paired tasks" in c.value for c in at.caption)


def test_linearised_exp2_is_labelled(results_dir):
    at = run_small(1, "linear")
    path, res = latest_results(results_dir)
    assert res["settings"]["exp2"] == "linear" and res["summary"]["exp2"]["gd"] is None
    label = "linearised — the same quantity the greedy rule maximises"
    text = " ".join(m.value for m in at.markdown)
    assert f"Exp2 — block selection ({label}" in text and f"Exp2 ({label})" in text
    assert label in at.selectbox(key="repro_exp2").options
    assert "too few tasks to decide (1 < 20 paired tasks)" in text


def test_both_exp2_sources_show_how_well_the_linearisation_predicts_real_gd(results_dir):
    at = run_small(2, "both")
    _, res = latest_results(results_dir)
    agree = res["summary"]["exp2"]["linear_vs_gd"]
    assert agree["tasks"] == 2
    text = " ".join(m.value for m in at.markdown)
    assert "Exp2 — does the linearised comparison predict real GD? (2 tasks with both)" in text
    table = next(d.value for d in at.dataframe if "Mean |linearised − GD|" in d.value.columns)
    for (b, e), (_, row) in zip(agree["budgets"].items(), table.iterrows()):
        assert row["Budget"] == int(b) and row["Tasks"] == 2
        assert row["Mean |linearised − GD|"] == pytest.approx(e["mean_abs_diff"])
        assert row["QA − TopK, real GD"] == pytest.approx(e["qa_vs_topk_gd"]["mean"])
    assert any(f.startswith("Exp2, linearised against real GD on the same 2 tasks") for f in res["findings"])


def test_a_real_gd_supplement_is_shown_with_its_numbers(results_dir):
    """A supplement beside the newest results file (exp2_gd, computed here on the tiny model):
    its section, its measured-GD table with exactly the supplement's numbers, and its provenance."""
    from ttt_core.experiments import exp2_gd
    from ttt_core.experiments.paper_tasks import ReproSettings
    from ttt_core.experiments.reproduce import run_reproduction
    from ttt_core.experiments.reproduce_report import write_results
    from ttt_core.models import build_tiny_model

    s = ReproSettings(model=MODEL, tasks=3, grid_max=2, fixed_T=2, exp1_kinds=("v",), exp2="linear", exp2_layers=2,
                      exp2_budgets=(1, 2), exp2_random_draws=2, n_boot=200)
    lm = build_tiny_model("llama", seed=0)
    base, _ = write_results(run_reproduction(s, backend="serial", lm=lm), results_dir)
    sup = exp2_gd.run_supplement(base, tasks=2, backend="serial", lm=lm, command="test")
    at = app()
    assert not at.exception, at.exception
    heads = " ".join(m.value for m in at.markdown)
    assert "real GD on 2 of the 3 tasks above" in heads
    assert "What the real GD says" in heads
    # the supplement's two tables are the page's last (measured GD, then linearised vs GD)
    df, agree = at.dataframe[-2].value, at.dataframe[-1].value
    for b, e in sup["summary"]["exp2"]["gd"].items():
        row = df[df["Budget"] == int(b)].iloc[0]
        assert row["Tasks"] == e["tasks"] == 2
        assert row["Query-Aware (greedy) ΔMSE"] == pytest.approx(e["query_aware"]["query_error"]["delta"])
    assert agree["Tasks"].tolist() == [2, 2] and "QA − TopK, real GD" in agree.columns
    assert "reproduce-gd --tasks N" in " ".join(c.value for c in at.caption)
