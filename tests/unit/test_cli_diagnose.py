"""`python -m ttt_core diagnose`: one JSON report (or Markdown) per prompt; errors → stderr, exit 2."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ttt_core.cli import main
from ttt_core.examples import EXAMPLES, EXAMPLES_DIR

ROOT = Path(__file__).resolve().parents[2]
TINY = "tiny-random-llama"
REQUIRED = {"eigenvalues": list, "tau2": float, "sigma2": float, "lambda_star": (float, type(None)), "t_map": int,
            "prompt_kind": str, "n_positions": int, "effective_rank": dict, "when": dict, "how_far": dict,
            "which": dict, "verdict": dict, "timings": dict, "versions": dict, "rho": float, "c": float,
            "posterior": dict, "flags": list, "lambda_star_ci90": list}


def _file(title: str) -> str:
    return str(EXAMPLES_DIR / EXAMPLES[title])


def _run(argv, capsys, stdin: str | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def check_schema(r: dict, grid: int, top_k: int, kind: str) -> None:
    for key, typ in REQUIRED.items():
        assert key in r, key
        assert isinstance(r[key], typ), (key, type(r[key]))
    assert r["prompt_kind"] == kind
    n = r["n_positions"]
    assert len(r["eigenvalues"]) == n and all(isinstance(x, float) for x in r["eigenvalues"])
    assert r["eigenvalues"] == sorted(r["eigenvalues"], reverse=True) and r["eigenvalues"][-1] >= 0
    assert r["lambda_max"] == r["eigenvalues"][0]
    hf = r["how_far"]
    assert hf["T_grid"] == list(range(grid + 1))
    assert len(hf["ell_fixed"]) == len(hf["ell_profiled"]) == grid + 1
    assert r["t_map"] == hf["t_map_fixed"] == int(np.argmin(hf["ell_fixed"]))
    assert hf["t_map_profiled"] == int(np.argmin(hf["ell_profiled"]))
    pb = hf["pac_bayes"]
    assert pb["plug_in"] is True and "plug-in" in pb["label"] and pb["slack"] > 0
    assert pb["bound_at_t_map"] == pytest.approx(min(hf["ell_fixed"]) + pb["slack"])
    lo, hi = pb["slack_ci90"]
    assert 0 < lo <= hi          # the slack's interval over the λ⋆ posterior
    w = r["when"]
    assert 0.0 <= w["prob_ttt_beats_icl"] <= 1.0 and "posterior" in w["basis"]
    want = "adapt" if w["prob_ttt_beats_icl"] >= 0.9 else (
        "don't adapt" if w["prob_ttt_beats_icl"] <= 0.1 else "undetermined on this prompt")
    assert w["decision"] == want
    assert w["gap_ttt_ci90"][0] <= w["gap_ttt_ci90"][1] and w["gap_icl_ci90"][0] <= w["gap_icl_ci90"][1]
    assert len(w["gap_grid"]) == len(w["prob_grid"]) == grid + 1
    v = r["verdict"]
    assert v["decision"] in ("adapt", "don't adapt", "undetermined on this prompt")
    assert v["adapt"] == (v["decision"] == "adapt") and ("posterior" in v["basis"])
    post = r["posterior"]
    assert post["lambda_star"]["ci90"][0] <= r["lambda_star"] <= post["lambda_star"]["ci90"][1]
    assert post["maximum_likelihood"]["label"] == "maximum likelihood"
    assert post["prior"]["grid_points"] >= 200
    assert (post["flag"] is not None) == bool(r["flags"])
    wh = r["which"]
    assert len(wh["top_k"]) == min(top_k, len(wh["scores"]))
    assert wh["top_k"] == [s["block"] for s in wh["scores"][:top_k]]
    vals = [s[wh["ranked_by"]] for s in wh["scores"]]
    assert vals == sorted(vals, reverse=True)
    assert r["lambda_star"] > 0 and r["lambda_star_ci90"][0] <= r["lambda_star"] <= r["lambda_star_ci90"][1]
    assert r["rho"] == pytest.approx(r["c"] / r["lambda_max"])
    assert set(r["versions"]) == {"torch", "transformers", "ttt_lens"}
    assert r["timings"]["total_s"] > 0


def test_fewshot_json(capsys):
    code, out, err = _run(["diagnose", _file("Digit shift, clean labels"), "--model", TINY, "--grid", "12",
                           "--top-k", "5", "--c", "0.2"], capsys)
    assert code == 0, err
    r = json.loads(out)
    check_schema(r, 12, 5, "few_shot")
    assert r["n_positions"] == 10 and r["query"]["target"] is not None
    assert r["which"]["ranked_by"] == "Query-Aware" and len(r["which"]["greedy_query_aware"]) == 5
    assert r["subspace"] == "q"


def test_long_context_json_v_subspace(capsys):
    code, out, err = _run(["diagnose", _file("Needle in a haystack, short"), "--model", TINY, "--subspace", "v",
                           "--max-positions", "24", "--grid", "10", "--top-k", "3"], capsys)
    assert code == 0, err
    r = json.loads(out)
    check_schema(r, 10, 3, "long_context")
    assert r["n_positions"] == 24 and r["subspace"] == "v"


def test_free_text_from_stdin_markdown(capsys, monkeypatch):
    text = (EXAMPLES_DIR / EXAMPLES["Free text (no question)"]).read_text()
    code, out, err = _run(["diagnose", "-", "--model", TINY, "--format", "md", "--max-positions", "32"], capsys,
                          stdin=text, monkeypatch=monkeypatch)
    assert code == 0, err
    assert out.startswith("# TTT Lens diagnosis") and "## When" in out and "## How far" in out and "## Which" in out
    assert "plug-in" in out and "by Trace" in out


def test_stdin_json_through_the_module_entry_point():
    text = (EXAMPLES_DIR / EXAMPLES["Digit shift, noisy labels (p = 0.55)"]).read_text()
    proc = subprocess.run([sys.executable, "-m", "ttt_core", "diagnose", "-", "--model", TINY, "--grid", "5"],
                          input=text, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    check_schema(json.loads(proc.stdout), 5, 8, "few_shot")


@pytest.mark.parametrize("text", ["", "1 -> 2\n3 -> 4\nnot a demo line\n5 -> 6\n7 ->"])
def test_bad_prompt_exits_2_with_stderr(capsys, monkeypatch, text):
    code, out, err = _run(["diagnose", "-", "--model", TINY], capsys, stdin=text, monkeypatch=monkeypatch)
    assert code == 2 and out == "" and err.startswith("error:")


def test_missing_file_and_bad_model_exit_2(capsys, tmp_path):
    code, out, err = _run(["diagnose", str(tmp_path / "nope.txt"), "--model", TINY], capsys)
    assert code == 2 and out == "" and "cannot read" in err
    code, out, err = _run(["diagnose", _file("Digit shift, clean labels"), "--model", str(tmp_path / "no-such-model")],
                          capsys)
    assert code == 2 and out == "" and err.startswith("error:")


@pytest.mark.smollm2
def test_fewshot_json_smollm2(capsys):
    code, out, err = _run(["diagnose", _file("Digit shift, clean labels"), "--grid", "30"], capsys)
    assert code == 0, err
    r = json.loads(out)
    check_schema(r, 30, 8, "few_shot")
    assert r["model"].startswith("SmolLM2") and len(r["which"]["scores"]) == 30 * 9


def test_check_adds_the_score_check_to_json_and_markdown(capsys):
    """`--check` runs real TTT on the top-k / bottom-k / random subsets of the ranked score. Catches:
    the option not reaching diagnose_report, the check's settings ignored, its top-k not the report's
    own ranking, and the Markdown not printing it."""
    argv = ["diagnose", _file("Digit shift, clean labels"), "--model", TINY, "--grid", "5", "--check",
            "--check-steps", "2", "--check-k", "2", "--check-random", "2"]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    r = json.loads(out)
    check_schema(r, 5, 8, "few_shot")
    ck = r["check"]
    assert ck["possible"] is True and ck["steps"] == 2 and ck["k"] == 2 and ck["engine"] == "paper GD"
    assert [s["label"] for s in ck["subsets"]] == ["top-k", "bottom-k", "random 1", "random 2"]
    assert ck["score"] == r["which"]["ranked_by"] == "Query-Aware"
    assert ck["subsets"][0]["blocks"] == r["which"]["top_k"][:2]
    assert all(isinstance(s["measured"], float) and isinstance(s["predicted"], float) for s in ck["subsets"])
    assert isinstance(ck["summary"], str) and "Spearman" in ck["summary"] and r["timings"]["check_s"] > 0
    code, out, err = _run(argv + ["--format", "md"], capsys)
    assert code == 0, err
    assert "## Check against real TTT" in out and ck["summary"] in out and "| top-k |" in out


def test_check_not_possible_is_a_note_and_no_check_without_the_flag(capsys):
    """Catches: --check crashing (or inventing numbers) where the engine cannot update the subspace,
    and a "check" key appearing without --check."""
    code, out, err = _run(["diagnose", _file("Digit shift, clean labels"), "--model", TINY, "--grid", "3",
                           "--subspace", "o", "--check", "--check-steps", "2"], capsys)
    assert code == 0, err
    ck = json.loads(out)["check"]
    assert ck["possible"] is False and ck["subsets"] == [] and "W_V or W_Q" in ck["note"]
    assert ck["note"] in ck["summary"]
    code, out, err = _run(["diagnose", _file("Digit shift, clean labels"), "--model", TINY, "--grid", "3"], capsys)
    assert code == 0 and "check" not in json.loads(out)
