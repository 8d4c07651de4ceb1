"""AppTest of the Targets page through app.py on the tiny random model (issue 12): nothing runs
before the button; the table, both charts and the winner sentence are what compare_targets gives."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from tests.app.plotly_json import charts

APP = Path(__file__).resolve().parents[2] / "app.py"
FEWSHOT = "0 -> 3\n1 -> 4\n2 -> 5\n3 -> 6\n4 -> 7\n5 ->\n# answer: 8\n"


def _app(tmp_path) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=300)
    at.session_state["model_name"] = "tiny-random-llama"
    at.session_state["model_preset"] = "tiny-random-llama"
    at.session_state["prompt_text"] = FEWSHOT
    return at


@pytest.fixture()
def app(tmp_path, monkeypatch):
    from ttt_core.experiments import targets_suite as TS

    monkeypatch.setenv("TTT_LENS_ARTIFACTS", str(tmp_path))
    monkeypatch.setattr(TS, "published_targets_dir", lambda: tmp_path / "no_published_suite")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    at = _app(tmp_path)
    at.session_state["tgt_targets"] = ["q", "lora:q:4", "norm_attn"]
    at.session_state["tgt_signals"] = ["nll", "entropy"]
    at.session_state["tgt_steps"] = 2
    at.session_state["tgt_lr"] = 1e-2
    at.switch_page("pages/targets.py").run()
    return at


def test_targets_page_compares_and_draws(app: AppTest) -> None:
    assert not app.exception, app.exception
    assert not app.get("plotly_chart")
    assert any("Compare targets" in i.value for i in app.info)
    assert any("No targets suite found" in i.value for i in app.info)
    app.button(key="tgt_run").click().run()
    assert not app.exception, app.exception
    figs = charts(app)
    assert {"tgt_fig_steps", "tgt_fig_flops"} <= set(figs)
    names = {tr["name"] for tr in figs["tgt_fig_steps"]["data"]}
    assert names == {f"{t} · {s}" for t in ("q", "lora:q:4", "norm_attn") for s in ("nll", "entropy")}
    assert len(app.success) == 1 and ("wins" in app.success[0].value or "No target" in app.success[0].value)
    df = app.dataframe[0].value
    assert list(df["target"]) == ["q", "q", "lora:q:4", "lora:q:4", "norm_attn", "norm_attn"]
    assert df["flops_per_step"].notna().all() and df["kernel"].eq("ok").all()
    assert any("the kernel columns are the exact leave-one-out kernels" in c.value for c in app.caption)


def test_targets_page_shows_the_committed_suite_by_default(tmp_path, monkeypatch) -> None:
    """A newcomer (nothing built on this machine) sees the committed suite: its table is the
    summary's rows, its caption says where it comes from and warns that it is about another model."""
    from ttt_core.experiments import targets_suite as TS
    from ttt_core.models import load_model

    lm_name = "tiny-random-llama"
    s = TS.TargetsSuiteSettings(model=lm_name, targets=("q", "norm_attn"), signals=("nll",), steps=2, lr=1e-2,
                                span=16, needle_words=20, n_demos=4)
    pub = tmp_path / "published"
    summary = TS.build_suite(load_model(lm_name), s, 2, root=pub / "suite-x", command="ttt-lens compare-targets --suite 2")
    (pub / "suite-x" / "summary.json").write_text(
        (pub / "suite-x" / "summary.json").read_text().replace(f'"model": "{lm_name}"', '"model": "Other/Model"'))
    monkeypatch.setenv("TTT_LENS_ARTIFACTS", str(tmp_path / "empty"))
    monkeypatch.setattr(TS, "published_targets_dir", lambda: pub)
    at = _app(tmp_path)
    at.switch_page("pages/targets.py").run()
    assert not at.exception, at.exception
    cap = " ".join(c.value for c in at.caption)
    assert "the committed suite" in cap and "ttt-lens compare-targets --suite 2" in cap
    assert "made with Other/Model, not the model loaded now" in cap
    assert "ttt-lens recheck " in cap and "summary.json --records 3" in cap
    table = next(d.value for d in at.dataframe if "vs qTTT" in d.value.columns)
    want = [(f, r["target"], r["mean_delta"]) for f, rs in summary["families"].items() for r in rs]
    assert list(zip(table["family"], table["target"], table["mean_delta"])) == want


def test_targets_page_picks_between_suites_and_shows_the_kernel_check(tmp_path, monkeypatch) -> None:
    """Two committed suites: a picker lists both (newest first); choosing the one with kernel columns
    shows its kernel check (table and reliability chart) as the summary computed it."""
    from ttt_core.experiments import targets_suite as TS
    from ttt_core.models import load_model

    lm = load_model("tiny-random-llama")
    base = dict(model=lm.name, targets=("q", "norm_attn"), signals=("nll",), steps=2, lr=1e-2, span=16,
                needle_words=20, n_demos=4, families=("needle",))
    pub = tmp_path / "published"
    TS.build_suite(lm, TS.TargetsSuiteSettings(**base), 2, root=pub / "plain", command="ttt-lens compare-targets --suite 2")
    kern = TS.build_suite(lm, TS.TargetsSuiteSettings(**base, kernels=True, kv="frozen"), 2, root=pub / "kern",
                          command="ttt-lens compare-targets --suite 2 --suite-kernels --kv frozen")
    monkeypatch.setenv("TTT_LENS_ARTIFACTS", str(tmp_path / "empty"))
    monkeypatch.setattr(TS, "published_targets_dir", lambda: pub)
    at = _app(tmp_path)
    at.switch_page("pages/targets.py").run()
    assert not at.exception, at.exception
    pick = at.selectbox(key="tgt_suite_pick")
    labels = list(pick.options)                                                   # AppTest gives the formatted labels
    assert len(labels) == 2 and "with kernel columns" in labels[0] and "no kernel columns" in labels[1]
    assert "frozen K/V for every target" in labels[0] and "committed" in labels[0]
    assert pick.value == 0                                                          # the newest first
    assert "tgt_fig_kernel_check" in charts(at)
    table = next(d.value for d in at.dataframe if "Brier" in d.value.columns)
    want = kern["kernel_check"]["families"]["needle"]
    assert list(table["target"]) == list(want) and list(table["Brier"]) == [g["brier"] for g in want.values()]
    at.selectbox(key="tgt_suite_pick").set_value(1).run()
    assert not at.exception, at.exception
    assert "tgt_fig_kernel_check" not in charts(at) and not any("Brier" in d.value.columns for d in at.dataframe)
    assert any("the rest on the full context" in c.value for c in at.caption)


def test_targets_page_passes_its_kernel_positions(tmp_path, monkeypatch) -> None:
    """The "Kernel positions" input reaches compare_targets (the per-output kernels cost one
    backward per position, so the page's default is 64, not the library's 256)."""
    import ttt_core.targets as T
    from ttt_core.experiments import targets_suite as TS

    seen, real = [], T.compare_targets
    monkeypatch.setattr(T, "compare_targets", lambda *a, **kw: seen.append(kw["max_positions"]) or real(*a, **kw))
    monkeypatch.setenv("TTT_LENS_ARTIFACTS", str(tmp_path))
    monkeypatch.setattr(TS, "published_targets_dir", lambda: tmp_path / "no_published_suite")
    at = _app(tmp_path)
    at.session_state["prompt_text"] = "The cat sat on the mat. " * 8 + "\nQuestion: Where did the cat sit?\nAnswer: mat"
    at.session_state["tgt_targets"] = ["norm_attn"]
    at.session_state["tgt_signals"] = ["nll"]
    at.session_state["tgt_steps"] = 1
    at.switch_page("pages/targets.py").run()
    assert at.number_input(key="tgt_positions").value == 64
    at.number_input(key="tgt_positions").set_value(16).run()
    at.button(key="tgt_run").click().run()
    assert not at.exception, at.exception
    assert seen == [16]
    df = at.dataframe[0].value
    assert df["kernel"].eq("ok").all()
    (res,) = at.session_state["_tgt_results"].values()
    assert res["settings"]["max_positions"] == 16


def test_targets_page_frozen_keys_and_values_for_every_target(tmp_path, monkeypatch) -> None:
    """"Keys and values during TTT: frozen": W_O / MLP / norm targets get the frozen-K/V kernel (one
    backward) and the frozen-K/V engine route; W_V is marked unavailable with the reason."""
    from ttt_core.experiments import targets_suite as TS

    monkeypatch.setenv("TTT_LENS_ARTIFACTS", str(tmp_path))
    monkeypatch.setattr(TS, "published_targets_dir", lambda: tmp_path / "no_published_suite")
    at = _app(tmp_path)
    at.session_state["prompt_text"] = "The cat sat on the mat. " * 8 + "\nQuestion: Where did the cat sit?\nAnswer: mat"
    at.session_state["tgt_targets"] = ["mlp_up", "v"]
    at.session_state["tgt_signals"] = ["nll"]
    at.session_state["tgt_steps"] = 1
    at.switch_page("pages/targets.py").run()
    assert at.radio(key="tgt_kv").value == "auto"
    at.radio(key="tgt_kv").set_value("frozen").run()
    at.button(key="tgt_run").click().run()
    assert not at.exception, at.exception
    (res,) = at.session_state["_tgt_results"].values()
    assert res["settings"]["kv"] == "frozen" and res["settings"]["route"] == "frozen_kv"
    rows = {r["target"]: r for r in res["rows"]}
    assert rows["mlp_up"]["kernel"]["route"] == "qttt-frozen-kv" and rows["mlp_up"]["route"] == "frozen_kv"
    assert rows["mlp_up"]["status"] == "ok" and len(rows["mlp_up"]["errors"]) == 2
    assert rows["v"]["status"] == "unavailable" and "makes the keys and values" in rows["v"]["reason"]
    assert rows["v"]["kernel"]["status"] == "unavailable" and "makes the keys and values" in rows["v"]["kernel"]["note"]
    assert any("Keys and values during TTT: frozen for every target" in c.value for c in at.caption)
    assert "--kv frozen" in at.code[0].value and "--max-positions 64" in at.code[0].value
