"""Model loading: tiny models, local folders through the real from_pretrained, errors, SmolLM2."""

from __future__ import annotations

import time

import pytest
import torch

from ttt_core.models import EMBEDDED_MODEL, ModelLoadError, build_tiny_model, load_model


def test_tiny_models_of_each_family():
    for fam, arch in [("llama", "LlamaForCausalLM"), ("gpt2", "GPT2LMHeadModel"), ("neox", "GPTNeoXForCausalLM")]:
        lm = load_model(f"tiny-random-{fam}")
        card = lm.card()
        assert card["architecture"] == arch and card["family"] == fam and card["layers"] == 3
        assert all(not p.requires_grad for p in lm.model.parameters())


def test_local_folder_loads_with_from_pretrained(tmp_path):
    lm = build_tiny_model("gpt2", seed=3)
    lm.model.save_pretrained(tmp_path, safe_serialization=True)
    lm.tokenizer.save_pretrained(tmp_path)
    again = load_model(str(tmp_path))
    assert again.card()["family"] == "gpt2" and again.source.startswith("local folder")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids).logits, lm.model(ids).logits)


def test_pickle_only_folder_is_refused(tmp_path):
    lm = build_tiny_model("llama")
    lm.model.save_pretrained(tmp_path, safe_serialization=False)
    lm.tokenizer.save_pretrained(tmp_path)
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    if not list(tmp_path.glob("*.bin")):
        torch.save(lm.model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("name, msg", [("/definitely/not/here", "No folder"), ("tiny-random-bert", "No tiny model")])
def test_unloadable_models_give_readable_errors(name, msg):
    with pytest.raises(ModelLoadError, match=msg):
        load_model(name)


def test_unreachable_hub_id_gives_readable_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="Could not load model"):
        load_model("some-org/some-model-that-is-not-cached")


@pytest.mark.smollm2
def test_embedded_smollm2_loads_fast_and_answers():
    load_model(EMBEDDED_MODEL)  # first call may convert; the suite's setup already prepared it
    t0 = time.perf_counter()
    lm = load_model(EMBEDDED_MODEL)
    assert time.perf_counter() - t0 < 10.0  # ~0.5 s from the safetensors cache on a 2-core CPU
    card = lm.card()
    assert (card["layers"], card["heads"], card["kv_heads"], card["head_dim"]) == (30, 9, 3, 64)
    assert 1.3e8 < card["parameters"] < 1.4e8
    tok = lm.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt")
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    out = lm.model.generate(ids, max_new_tokens=16, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
