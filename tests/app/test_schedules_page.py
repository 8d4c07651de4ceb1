"""AppTest of the Schedules page through app.py on the tiny random model: the suite is built by the
button, the figures' numbers equal what ttt_core.schedules computes from the cached suite, the
honest comparison sentence is on the page (issue 7)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from tests.app.plotly_json import charts, decode
from ttt_core.experiments import schedules as S
from ttt_core.experiments.suite import load_cached_suite
from ttt_core.experiments.suite_tasks import FAMILY_LABELS, SuiteSettings

N_TASKS = 5

APP = Path(__file__).resolve().parents[2] / "app.py"


@pytest.fixture()
def app(tmp_path, monkeypatch):
    monkeypatch.setenv("TTT_LENS_ARTIFACTS", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    at = AppTest.from_file(str(APP), default_timeout=300)
    at.session_state["model_name"] = "tiny-random-llama"
    at.session_state["model_preset"] = "tiny-random-llama"
    at.session_state["sch_tasks"] = N_TASKS
    at.session_state["sch_grid"] = "1, 2"
    at.session_state["sch_source"] = "build"
    at.switch_page("pages/schedules.py").run()
    return at


def tiny_settings() -> SuiteSettings:
    return SuiteSettings(model="tiny-random-llama", grid=(1, 2), fewshot_n=(4, 6), needle_words=(20, 30),
                         max_positions=16, span_long=16)


def test_build_train_and_figures(app: AppTest) -> None:
    assert not app.exception, app.exception
    assert not app.get("plotly_chart")  # nothing is computed before the button
    assert any("No cached suite" in i.value for i in app.info)
    app.button(key="sch_build").click().run()
    assert not app.exception, app.exception
    figs = charts(app)
    assert {"sch_fig_latency_s", "sch_fig_latency_steps", "sch_fig_choices", "sch_fig_traj", "sch_fig_train"} <= set(figs)

    suite = load_cached_suite(tiny_settings(), N_TASKS)
    assert suite is not None and len(suite) == N_TASKS
    test = suite.split("test")
    lam = S.DEFAULT_LAMBDA
    # the fixed-T markers are the trajectories at T, the steps figure's x are the steps
    data = figs["sch_fig_latency_steps"]["data"]
    by_name = {tr["name"]: tr for tr in data}
    for T in (0, 1, 2):
        name = "ICL (T = 0)" if T == 0 else f"fixed T = {T}"
        np.testing.assert_allclose(decode(by_name[name]["y"]), [test.errors[:, T].mean()], rtol=1e-9)
        np.testing.assert_allclose(decode(by_name[name]["x"]), [T])
    # the Pareto line is the front of the plotted (non-reference) schedules
    pts = [tr for tr in data if tr["name"] != "Pareto front"]
    xs = np.array([decode(tr["x"])[0] for tr in pts])
    ys = np.array([decode(tr["y"])[0] for tr in pts])
    front = S.pareto_front(xs, ys)
    np.testing.assert_allclose(decode(by_name["Pareto front"]["x"]), xs[front])
    np.testing.assert_allclose(decode(by_name["Pareto front"]["y"]), ys[front])
    # the trajectories are the suite's mean errors per family
    traj = S.family_trajectories(test)
    for tr in figs["sch_fig_traj"]["data"]:
        fam = next(f for f, lab in FAMILY_LABELS.items() if lab == tr["name"])
        np.testing.assert_allclose(decode(tr["y"]), traj[fam]["mean"], rtol=1e-9)
    # the honest sentence, computed
    text = " ".join(m.value for m in app.markdown)
    assert "On the test split" in text and "bootstrap CI" in text
    sentence = next(m.value for m in app.markdown if "On the test split" in m.value)
    assert f"too few tasks to decide ({len(test)} < 20 paired tasks)" in sentence  # DESIGN §10: no verdict below 20
    assert "beats" not in sentence and "permutation p" in sentence
    assert any("a verdict needs ≥ 20 paired tasks" in c.value for c in app.caption)
    assert "Measured vs linearised" in " ".join(i.value for i in app.info)
    assert f"λ = {lam:g}" in text


def test_split_and_lambda_change(app: AppTest) -> None:
    app.button(key="sch_build").click().run()
    app.selectbox(key="sch_split").set_value("train").run()
    assert not app.exception, app.exception
    assert any("in-sample" in w.value for w in app.warning)
    app.select_slider(key="sch_lambda").set_value(1e-2).run()
    assert not app.exception, app.exception
    text = " ".join(m.value for m in app.markdown)
    assert "λ = 0.01" in text


def test_saved_calibration_suite_is_shown_by_default(tmp_path, monkeypatch) -> None:
    """A newcomer finds the committed calibration suite: the controller is trained on its train
    split, and the plotted fixed-T errors are the committed records' test-split means."""
    from ttt_core.experiments.calibration_suite import latest_calibration, load_calibration, settings_from_dict

    monkeypatch.setenv("TTT_LENS_ARTIFACTS", str(tmp_path))   # nothing saved locally: the committed result
    hit = latest_calibration()
    assert hit is not None and hit[2] == "published"
    path, res, _ = hit
    at = AppTest.from_file(str(APP), default_timeout=300)
    at.session_state["model_name"] = "tiny-random-llama"
    at.session_state["model_preset"] = "tiny-random-llama"
    at.switch_page("pages/schedules.py").run()
    assert not at.exception, at.exception
    assert at.radio(key="sch_source").value == "saved"
    caps = " ".join(c.value for c in at.caption)
    assert "Saved suite" in caps and res["provenance"]["commit"][:12] in caps and path.name in caps
    assert "not the model loaded now" in caps                       # made with SmolLM2, tiny model loaded
    suite = load_calibration(settings_from_dict(res["settings"]), res["n_prompts"], out=path.parent)
    test = suite.split("test")
    by_name = {tr["name"]: tr for tr in charts(at)["sch_fig_latency_steps"]["data"]}
    for T in (0, 1, 8):
        name = "ICL (T = 0)" if T == 0 else f"fixed T = {T}"
        np.testing.assert_allclose(decode(by_name[name]["y"]), [test.errors[:, T].mean()], rtol=1e-9)
    sentence = next(m.value for m in at.markdown if "On the test split" in m.value)
    assert f"{len(test)}" in sentence
