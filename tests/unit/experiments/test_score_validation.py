"""Score validation (DESIGN §6; ttt_core.experiments.score_validation): the batched output-probe
route equals adapter deltas, the protocol at reduced size, and the bench script at tiny size."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ttt_core.encoding import encode_few_shot
from ttt_core.experiments.score_validation import adapted_query_values, block_deltas, validate_scores
from ttt_core.generators import digit_shift_task
from ttt_core.models import build_tiny_model
from ttt_core.prompt_kernel import compute_prompt_kernel
from ttt_core.readout import FewShotReadout


@pytest.fixture(scope="module")
def lm():
    return build_tiny_model("llama", seed=5)


@pytest.mark.parametrize("kind", ["q", "o", "mlp_up"])
def test_validation_probe_route_equals_adapter_deltas(lm, kind):
    task = digit_shift_task(np.random.default_rng(3))
    ev = compute_prompt_kernel(lm, task.prompt, kind)
    deltas, rhos = block_deltas(ev, lm, 0.5)
    s_probe = adapted_query_values(lm, ev, task.prompt, deltas, batch=5)
    assert sorted(s_probe) == list(range(len(ev.blocks())))
    fs = encode_few_shot(lm, task.prompt)
    readout = FewShotReadout(fs, lm.device)
    ids = torch.tensor(fs.seqs[-1])[None]
    for b, (l, h) in enumerate(ev.blocks()):
        with torch.no_grad(), lm.adapter.apply(deltas={(l, kind): deltas[b]}):
            s = readout.scalar(lm.model(input_ids=ids).logits[0, -1], fs.n)
        assert float(s) == pytest.approx(s_probe[b], abs=1e-6)
        # the delta is one GD step: ρ_b Σ_i r_i ∂s_i/∂W_b, ρ_b = c/λ_max(K_b)
        assert rhos[b] == pytest.approx(0.5 / np.linalg.eigvalsh(ev.head_kernel(l, h))[-1])


def test_validation_runs_at_reduced_size(lm):
    res = validate_scores(lm, n_tasks=3, top_k=2)
    js = res.to_json()
    assert js["n_tasks"] == 3 and len(res.tasks) == 3
    for k in ("spearman_qa_mean", "gain_top_qa_mean", "gain_random_mean", "diff_qa_random_ci95"):
        assert k in js
    t = res.tasks[0]
    assert t.gain.shape == t.query_aware.shape == (12,)
    lo, hi = js["gain_top_qa_ci95"]
    assert lo <= js["gain_top_qa_mean"] <= hi


def test_score_validation_script_tiny(capsys):
    path = Path(__file__).resolve().parents[3] / "bench" / "score_validation.py"
    spec = importlib.util.spec_from_file_location("score_validation_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--tasks", "2", "--model", "tiny-random-gpt2", "--subspace", "v"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["n_tasks"] == 2 and last["subspace"] == "v" and last["blocks_per_task"] == 12
    assert last == json.loads(json.dumps(out))
