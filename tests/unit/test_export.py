"""ttt_core.export / figure_data / run_compare / figures.compare: the data read back from plotly
figures, the CSV and JSON envelopes, saved runs (round trip, refusal of bad files), comparisons."""

from __future__ import annotations

import json

import numpy as np
import plotly.graph_objects as go
import pytest
from plotly.subplots import make_subplots

from ttt_core import export
from ttt_core import run_compare as rc
from ttt_core.engine import StepRecord
from ttt_core.export import RunFormatError, SavedRun, figure_json, figure_table
from ttt_core.figures.compare import difference_figure, overlay_figure
from ttt_core.figures.heads import score_heatmap


# ------------------------------------------------------------------------------------------ figure_table
def test_bar_figure_wide_with_error_bars_and_categories():
    fig = go.Figure([go.Bar(x=["a", "b", "c"], y=[1.0, 2.5, 3.0], name="before",
                            error_y=dict(type="data", array=[0.1, 0.2, 0.3])),
                     go.Bar(x=["a", "b", "c"], y=[0.5, 0.5, 0.0], name="after")])
    fig.update_layout(xaxis_title="label (category)", yaxis_title="probability")
    df = figure_table(fig)
    assert list(df.columns) == ["label", "before", "before_error", "after"]
    assert df["label"].tolist() == ["a", "b", "c"]
    np.testing.assert_array_equal(df["before"], [1.0, 2.5, 3.0])
    np.testing.assert_array_equal(df["before_error"], [0.1, 0.2, 0.3])
    assert 'trace "before" (bar)' in df.attrs["columns"]["before"]


def test_scatter_wide_long_and_names():
    x = np.arange(5)
    fig = go.Figure([go.Scatter(x=x, y=x ** 2.0, name="square"),
                     go.Scatter(x=[0, 4], y=[1.0, 1.0], name="ICL (T = 0)")])
    fig.update_layout(xaxis_title="steps T")
    df = figure_table(fig, {"square": "sq"})
    assert list(df.columns) == ["steps_T", "sq", "ICL_T_0"]  # sub-grid trace placed at its x
    np.testing.assert_array_equal(df["sq"], x ** 2.0)
    assert df["ICL_T_0"].isna().tolist() == [False, True, True, True, False]
    # x values that are not among the longest trace's → one row per point with a "trace" column
    fig.add_trace(go.Scatter(x=[0.5, 1.5], y=[3.0, 4.0], name="off-grid"))
    long = figure_table(fig)
    assert list(long.columns[:3]) == ["trace", "steps_T", "y"] and len(long) == 5 + 2 + 2
    np.testing.assert_array_equal(long[long.trace == "off_grid"]["y"], [3.0, 4.0])


def test_secondary_axis_and_reference_lines():
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=[1, 2, 3], y=[5.0, 2.0, 1.0], name="eigenvalue λᵢ"), secondary_y=False)
    fig.add_trace(go.Scatter(x=[1, 2, 3], y=[0.6, 0.9, 1.0], name="cumulative energy"), secondary_y=True)
    fig.add_hline(y=0.5, annotation_text="λ⋆")
    fig.add_vline(x=1.5, annotation_text="effective rank")
    fig.update_yaxes(type="log", secondary_y=False)
    fig.update_layout(xaxis_title="mode i (descending λ)")
    df = figure_table(fig, {"x": "mode", "#0": "eigenvalue"})
    assert list(df.columns) == ["mode", "eigenvalue", "cumulative_energy"]
    np.testing.assert_array_equal(df["cumulative_energy"], [0.6, 0.9, 1.0])
    assert "y2" in df.attrs["columns"]["cumulative_energy"] and "log scale" in df.attrs["columns"]["eigenvalue"]
    assert df.attrs["lines"] == ["horizontal line at y = 0.5 — λ⋆", "vertical line at x = 1.5 — effective rank"]
    js = figure_json(fig)
    assert [t["yaxis"] for t in js["traces"]] == ["y", "y2"] and js["axes"]["yaxis"]["type"] == "log"


def test_heatmap_cells_from_figure_object_and_its_json():
    z = np.arange(12, dtype=float).reshape(3, 4) / 7.0
    z[1, 2] = np.nan
    fig = score_heatmap(z, "Query-Aware", "head", selected=(1, 2))   # plus marker traces on top
    for source in (fig, fig.to_json(), json.loads(fig.to_json())):    # object, JSON text with bdata, dict
        df = figure_table(source, {"x": "block", "y": "layer"})
        assert list(df.columns) == ["layer", "block", "Query_Aware"]
        np.testing.assert_array_equal(df["layer"], np.repeat(np.arange(3), 4))
        np.testing.assert_array_equal(df["block"], np.tile(np.arange(4), 3))
        np.testing.assert_array_equal(df["Query_Aware"].to_numpy().reshape(3, 4), z)
    assert figure_json(fig)["traces"][0]["z"][1][2] is None   # NaN → null in JSON


def test_two_heatmaps_on_one_grid_and_binary_arrays_decoded():
    fig = make_subplots(rows=1, cols=2, subplot_titles=("before", "after"))
    a, b = np.random.default_rng(0).random((2, 3)), np.random.default_rng(1).random((2, 3))
    fig.add_trace(go.Heatmap(z=a, name="before"), row=1, col=1)
    fig.add_trace(go.Heatmap(z=b, name="after"), row=1, col=2)
    spec = json.loads(fig.to_json())
    assert "bdata" in json.dumps(spec["data"][0]["z"])         # plotly ≥ 6 binary encoding
    df = figure_table(spec)
    np.testing.assert_array_equal(df["before"].to_numpy().reshape(2, 3), a)
    np.testing.assert_array_equal(df["after"].to_numpy().reshape(2, 3), b)


def test_csv_envelope_round_trip():
    fig = go.Figure(go.Scatter(x=[1, 2, 3], y=[0.1, 1 / 3, np.nan], name="snr", text=["a#1", "b", "c"]))
    csv_text, json_text = export.figure_exports(fig, "spec_snr", model="tiny-random-llama", prompt_text="1 -> 2",
                                                prompt_kind="few_shot", settings={"spec_T": 8})
    assert csv_text.startswith("# ttt_lens_export: 1\n# kind: figure\n")
    meta, df = export.read_export_csv(csv_text)
    assert meta["ttt_lens_export"] == 1 and meta["figure"] == "spec_snr" and meta["settings"] == {"spec_T": 8}
    assert meta["prompt_sha256"] == export.prompt_sha256("1 -> 2") and set(meta["versions"]) == {
        "torch", "transformers", "ttt_lens", "plotly", "streamlit"}
    assert list(df.columns) == ["mode", "snr_median", "snr_median_text"]
    np.testing.assert_array_equal(df["snr_median"].to_numpy(), [0.1, 1 / 3, np.nan])   # exact floats
    assert df["snr_median_text"].tolist() == ["a#1", "b", "c"]                        # "#" inside a value kept
    env = json.loads(json_text)
    assert {"ttt_lens_export", "kind", "created", "model", "prompt_sha256", "prompt_kind", "settings", "versions",
            "data"} <= set(env) and env["created"].endswith("Z")
    assert env["data"]["traces"][0]["y"] == [0.1, 1 / 3, None]


def test_diagnosis_export_keeps_the_report_and_the_command():
    report = {"ttt_lens_diagnose": 2, "model": "m", "prompt_kind": "few_shot", "versions": {"torch": "x"}}
    env = export.diagnosis_export(report, prompt_text="p", settings={"c": 0.1}, created="2025-01-01T00:00:00Z")
    assert {k: env[k] for k in report} == report
    assert env["prompt_sha256"] == export.prompt_sha256("p") and env["kind"] == "diagnosis"
    cmd = export.diagnose_command("tiny-random-llama", {"subspace": "v", "c": 0.1, "grid": 30, "last_layers": None,
                                                        "max_tokens": 2048})
    assert cmd == "ttt-lens diagnose prompt.txt --model tiny-random-llama --subspace v --c 0.1 --grid 30 --max-tokens 2048"


# ------------------------------------------------------------------------------------------ saved runs
def _records(n: int = 3, scale: float = 1.0, mode: str = "qttt") -> list[dict]:
    out = []
    for t in range(n + 1):
        r = StepRecord(step=t, mode=mode, loss=scale * (4.0 - t), loss_per_token=scale * (2.0 - 0.1 * t),
                       delta_norms=[0.0, 0.1 * t], answer_nll=scale * (1.5 - 0.2 * t), answer_prob=0.2 + 0.05 * t,
                       step_s=0.1, eval_s=0.05, wall_s=0.15, elapsed_s=0.5 + 0.15 * t, backend="torch",
                       backend_label="PyTorch reference on CPU")
        out.append(r.to_dict())
    return out


def _qttt_run(scale: float = 1.0, label: str = "run") -> SavedRun:
    result = {"settings": {"mode": "qttt", "steps": 3, "heads": [(1, 2)], "span": 16, "lr": 1e-3, "seed": 0},
              "records": _records(3, scale), "status": "done", "reason": None, "answer_before": "12",
              "answer_after": "4821", "labels_before": None, "true_label": None, "answer_expected": "4821"}
    return export.qttt_saved_run(result, model="tiny-random-llama", prompt_text="ctx\nQuestion: q\nAnswer: 4821",
                                 prompt_kind="long_context", label=label)


def test_qttt_run_round_trip_equals():
    run = _qttt_run()
    text = run.to_json()
    back = SavedRun.from_json(text.encode("utf-8"), kind="qttt_run", label="file.json")
    assert back == run and back.label == "file.json"
    d = json.loads(text)
    assert d["ttt_lens_export"] == 1 and d["run_version"] == 1 and d["kind"] == "qttt_run"
    assert d["settings"]["heads"] == [[1, 2]] and len(d["data"]["records"]) == 4
    assert d["data"]["backend_label"] == "PyTorch reference on CPU" and d["data"]["timings"]["steps"] == 3
    assert set(d["versions"]) == {"torch", "transformers", "ttt_lens", "plotly", "streamlit"}


def test_steps_run_round_trip_equals():
    from ttt_core.models import build_tiny_model
    from ttt_core.prompts import parse_prompt
    from ttt_core.steps import StepsSettings, compute_steps

    lm = build_tiny_model("llama", seed=0)
    prompt = parse_prompt("1 -> 2\n4 -> 5\n6 -> 7\n2 -> 3\n7 -> 8\n3 ->\n# answer: 4")
    rep = compute_steps(lm, prompt, StepsSettings(grid_max=6, measure=False))
    run = export.steps_saved_run(rep, prompt_text=prompt.to_text(), prompt_kind=prompt.kind)
    assert SavedRun.from_json(run.to_json(), kind="steps_run") == run
    assert run.model == lm.name and run.settings["grid_max"] == 6 and "linearised error" in rc.run_metrics(run)


@pytest.mark.parametrize("text, words", [
    (b"\xff\xfe\x00garbage", "not UTF-8"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON list"),
    ('{"ttt_lens_diagnose": 2, "model": "m"}', "diagnose` report"),
    ('{"hello": 1}', "not a TTT Lens export"),
])
def test_garbled_files_are_refused_with_a_message(text, words):
    with pytest.raises(RunFormatError, match=words):
        SavedRun.from_json(text, kind="qttt_run")


def test_wrong_kind_old_new_and_damaged_runs_are_refused():
    good = json.loads(_qttt_run().to_json())

    def refused(obj, words, kind="qttt_run"):
        with pytest.raises(RunFormatError, match=words):
            SavedRun.from_json(json.dumps(obj), kind=kind)

    refused(good, "a Live qTTT run, not a Steps & bounds result", kind="steps_run")
    refused({**good, "ttt_lens_export": 2}, "newer TTT Lens")
    refused({**good, "run_version": 0}, "old format")
    refused({**good, "kind": "figure"}, "chart's data")
    refused({k: v for k, v in good.items() if k != "settings"}, "'settings' field is missing")
    refused({**good, "prompt_sha256": "abc"}, "SHA-256")
    bad = json.loads(json.dumps(good))
    del bad["data"]["records"][2]["step"]
    refused(bad, "step record 2 has no valid")
    bad = json.loads(json.dumps(good))
    bad["data"]["records"][1]["loss"] = "high"
    refused(bad, "'loss' is not a number")
    bad = json.loads(json.dumps(good))
    bad["data"]["records"] = []
    refused(bad, "no step records")


def test_older_records_are_completed_with_defaults():
    obj = json.loads(_qttt_run().to_json())
    for r in obj["data"]["records"]:
        r.pop("context_nll")
    run = SavedRun.from_json(json.dumps(obj))
    assert all(r["context_nll"] is None for r in run.data["records"])


# ------------------------------------------------------------------------------------------ comparing
def test_overlay_one_trace_per_run_and_difference_is_a_minus_b():
    a, b, c = _qttt_run(1.0, "A"), _qttt_run(2.0, "B"), _qttt_run(0.5, "C")
    metric = rc.QTTT_METRICS["answer_nll"]
    curves = [(r.label, *rc.run_metrics(r)[metric]) for r in (a, b, c)]
    over = overlay_figure(curves, metric)
    assert [t.name for t in over.data] == ["A", "B", "C"]
    np.testing.assert_allclose(over.data[1].y, [2.0 * (1.5 - 0.2 * t) for t in range(4)])
    diff = difference_figure(curves[0], curves[1:], metric)
    assert [t.name for t in diff.data] == ["A − B", "A − C"]
    ya, yb = np.asarray(curves[0][2]), np.asarray(curves[1][2])
    np.testing.assert_allclose(diff.data[0].y, ya - yb)
    np.testing.assert_allclose(figure_table(diff)["A_B"], ya - yb)     # the download of the difference too
    assert rc.default_metrics(a) == [rc.QTTT_METRICS["loss"], rc.QTTT_METRICS["answer_nll"]]
    # loss: per token, steps ≥ 1 (what the page's loss chart draws)
    assert rc.run_metrics(a)[rc.QTTT_METRICS["loss"]][0] == [1.0, 2.0, 3.0]


def test_compare_table_final_metrics_and_differences():
    a, b = _qttt_run(1.0, "A"), _qttt_run(2.0, "B")
    rows = {r["metric"]: r for r in rc.compare_table([a, b])}
    row = rows["final " + rc.QTTT_METRICS["answer_nll"]]
    assert row["A"] == pytest.approx(1.5 - 0.6) and row["B"] == pytest.approx(2 * (1.5 - 0.6))
    assert row["A − B"] == pytest.approx(row["A"] - row["B"])
    assert rows["steps run"]["A − B"] == 0.0
    assert [r["same prompt as the first"] for r in rc.runs_overview([a, b])] == ["yes", "yes"]
    assert rc.unique_labels([a, _qttt_run(1.0, "A")]) == ["A", "A (2)"]
