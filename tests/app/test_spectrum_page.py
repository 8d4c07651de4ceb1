"""AppTest: the Spectrum & SNR page, run through app.py so the shared sidebar runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from tests.app.plotly_json import chart, decode
from ttt_core.models import load_model
from ttt_core.prompt_kernel import compute_prompt_kernel
from ttt_core.prompts import parse_prompt
from ttt_core.spectrum import DEFAULT_C, kernel_spectrum

APP = str(Path(__file__).resolve().parents[2] / "app.py")
FEWSHOT = "6->5\n6->5\n8->7\n5->4\n7->6\n2->1\n0->9\n3->2\n2->\n# answer: 1"
LONG = ("The river bends twice before it reaches the old mill. The secret number is 4821. Sheep graze above the "
        "orchard.\nQuestion: What is the secret number?\nAnswer: 4821")


def run_page(model: str, prompt: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=300)
    at.session_state["model_name"] = model
    at.session_state["model_preset"] = model if model.startswith("tiny-random-") else "Other: hub id or local folder…"
    at.session_state["prompt_text"] = prompt
    at.run()
    at.switch_page("pages/spectrum.py").run()
    assert not at.exception, at.exception
    return at


def test_spectrum_page_plots_ttt_core_eigenvalues_tiny():
    at = run_page("tiny-random-llama", FEWSHOT)
    labels = [m.label for m in at.metric]
    assert labels[:6] == ["n (supervised outputs)", "Effective rank", "τ² (signal)", "σ² (noise)", "λ⋆ = σ²/τ²",
                          "P(TTT beats ICL at T=8)"]
    assert at.metric[0].value == "8"
    lm = load_model("tiny-random-llama")
    rep = kernel_spectrum(compute_prompt_kernel(lm, parse_prompt(FEWSHOT), "q"), T=8, c=DEFAULT_C)
    assert at.metric[5].value == f"{rep.prob:.2f}" and at.metric[4].value == f"{rep.lam_star:.3g}"
    boxes = {"adapt": at.success, "don't adapt": at.info, "undetermined on this prompt": at.warning}[rep.decision]
    assert any("P(TTT beats ICL)" in s.value for s in boxes)
    # the flag is shown exactly when the posterior is mostly the prior
    assert any("Noise level not identified" in w.value for w in at.warning) == (rep.flag is not None)
    # the verdict says which update it is about and where that update is run
    scope = [c.value for c in at.caption if "Which update this verdict is about" in c.value]
    assert len(scope) == 1 and "the Steps & bounds page runs it on the model and draws its measured error" in scope[0]
    spec = chart(at, "spec_scree")
    lam_plot = decode(spec["data"][0]["y"])
    expected = np.where(rep.lam > 1e-300, rep.lam, np.nan)
    np.testing.assert_allclose(lam_plot, expected, rtol=1e-6, equal_nan=True)
    np.testing.assert_allclose(decode(spec["data"][1]["y"]), rep.cum_energy, rtol=1e-6)
    # SNR, filter match and gap figures carry the same report
    np.testing.assert_allclose(decode(chart(at, "spec_snr")["data"][0]["y"]),
                               np.where(rep.snr > 1e-300, rep.snr, np.nan), rtol=1e-6, equal_nan=True)
    np.testing.assert_allclose(decode(chart(at, "spec_filter")["data"][0]["y"]), rep.g_T, rtol=1e-6)
    np.testing.assert_allclose(decode(chart(at, "spec_gap")["data"][0]["y"]), rep.gap_contrib, rtol=1e-6)
    post = chart(at, "spec_posterior")
    np.testing.assert_allclose(decode(post["data"][0]["x"]), rep.posterior.lambda_star_grid, rtol=1e-9)
    h = rep.posterior.log10_grid[1] - rep.posterior.log10_grid[0]
    np.testing.assert_allclose(decode(post["data"][0]["y"]), rep.posterior.weights / h, rtol=1e-6)
    np.testing.assert_allclose(decode(chart(at, "spec_gap_T")["data"][1]["y"]), rep.prob_grid, rtol=1e-6)
    assert len(at.get("plotly_chart")) == 7
    assert len(at.expander) >= 7  # one "how to read" per figure


def test_spectrum_page_subspace_and_block_controls():
    at = run_page("tiny-random-gpt2", FEWSHOT)
    at.selectbox(key="spec_subspace").set_value("v").run()
    assert not at.exception
    at.selectbox(key="spec_block").set_value("L1.vH2").run()
    assert not at.exception
    lm = load_model("tiny-random-gpt2")
    ev = compute_prompt_kernel(lm, parse_prompt(FEWSHOT), "v")
    rep = kernel_spectrum(ev, (1, 2), T=8, c=DEFAULT_C)
    lam_plot = decode(chart(at, "spec_scree")["data"][0]["y"])
    np.testing.assert_allclose(lam_plot, np.where(rep.lam > 1e-300, rep.lam, np.nan), rtol=1e-6, equal_nan=True)


def test_spectrum_page_errors_keep_page_up():
    bad = "good film: good\ngreat film: great\nbad film: bad\nnice film:"
    at = run_page("tiny-random-llama", bad)
    assert any("share their first token" in e.value for e in at.error)
    assert not at.get("plotly_chart")


@pytest.mark.smollm2
def test_spectrum_page_long_context_smollm2():
    at = run_page("SmolLM2-135M-Instruct (embedded)", LONG)
    assert any("squared-loss frame" in c.value for c in at.caption)
    assert any("Which update this verdict is about" in c.value and "a different update" in c.value for c in at.caption)
    spec = chart(at, "spec_scree")
    lm = load_model()
    ev = compute_prompt_kernel(lm, parse_prompt(LONG), "q", max_positions=256)
    rep = kernel_spectrum(ev, T=8, c=DEFAULT_C)
    np.testing.assert_allclose(decode(spec["data"][0]["y"]), np.where(rep.lam > 1e-300, rep.lam, np.nan),
                               rtol=1e-4, equal_nan=True)
    assert at.metric[0].value == str(ev.n)
