"""Per-session caches of the pages: one helper owns the cache keys and the defaults.

Everything here is keyed inside one browser session's ``st.session_state`` (nothing global, so one
session never sees another's results, DESIGN §1). The core (`ttt_core`) knows nothing of sessions:
pages call `cached_prompt_kernel` / `cached_result` instead of building keys by hand.
"""

from __future__ import annotations

from typing import Any, Callable, MutableMapping, TypeVar

from ttt_core.models import LoadedModel
from ttt_core.prompt_kernel import DEFAULT_MAX_POSITIONS, PromptKernel, compute_prompt_kernel
from ttt_core.prompts import LongContextPrompt, Prompt
from ttt_core.types import Progress

CACHE_KEY = "_ttt_session_cache"
MAX_ENTRIES = 6
T = TypeVar("T")


def cached(store: MutableMapping[str, Any], key: tuple, compute: Callable[[], T], max_entries: int = MAX_ENTRIES) -> T:
    """Memoise `compute()` under `key` in an insertion-ordered dict kept at store[CACHE_KEY]
    (one browser session's st.session_state); the oldest entries are dropped beyond
    `max_entries`. Exceptions are not cached."""
    cache = store.get(CACHE_KEY) if hasattr(store, "get") else None
    if cache is None:
        cache = {}
        store[CACHE_KEY] = cache
    if key in cache:
        value = cache.pop(key)
        cache[key] = value
        return value
    value = compute()
    cache[key] = value
    while len(cache) > max_entries:
        cache.pop(next(iter(cache)))
    return value


def kernel_key(lm: LoadedModel, prompt: Prompt, subspace: str, max_positions: int = DEFAULT_MAX_POSITIONS,
               qttt: bool = True) -> tuple:
    """Hashable key of one prompt kernel: (model name, prompt text, subspace, settings). max_positions
    only matters for a long context."""
    mp = int(max_positions) if isinstance(prompt, LongContextPrompt) else None
    return ("prompt_kernel", lm.name, prompt.to_text(), subspace, mp, bool(qttt))


def cached_prompt_kernel(store: MutableMapping[str, Any], lm: LoadedModel, prompt: Prompt, subspace: str = "q", *,
                         max_positions: int = DEFAULT_MAX_POSITIONS, qttt: bool = True,
                         progress: Progress = None) -> PromptKernel:
    """`compute_prompt_kernel` memoised per (model, prompt text, subspace, settings) in `store`."""
    key = kernel_key(lm, prompt, subspace, max_positions, qttt)
    return cached(store, key, lambda: compute_prompt_kernel(lm, prompt, subspace, max_positions=max_positions,
                                                            qttt=qttt, progress=progress))


def cached_result(store: MutableMapping[str, Any], lm: LoadedModel, prompt: Prompt, subspace: str, what: str,
                  settings: tuple, compute: Callable[[], T], *, max_positions: int = DEFAULT_MAX_POSITIONS) -> T:
    """A result derived from one prompt kernel (spectrum, scores, steps …), keyed by the kernel's key,
    `what` and the page's settings tuple."""
    return cached(store, kernel_key(lm, prompt, subspace, max_positions) + (what,) + tuple(settings), compute)


def cached_calibration_advice(store: MutableMapping[str, Any], lm: LoadedModel, prompt: Prompt,
                              fallback: dict[str, Any]) -> dict[str, Any]:
    """`calibration_advice.advice_for_prompt` for the latest saved calibration result, keyed by the
    model, the prompt, that result (file and creation time) and the fallback verdict; its kernels
    come from `cached_prompt_kernel`."""
    from ttt_core.experiments.calibration_advice import advice_for_prompt
    from ttt_core.experiments.calibration_suite import latest_calibration

    hit = latest_calibration()
    key = ("calibration_advice", lm.name, prompt.to_text(), None if hit is None else str(hit[0]),
           None if hit is None else hit[1].get("created"), fallback.get("T_star"), fallback.get("text"))

    def kernel(p: Prompt, subspace: str, max_positions: int) -> PromptKernel:
        return cached_prompt_kernel(store, lm, p, subspace, max_positions=max_positions)

    return cached(store, key, lambda: advice_for_prompt(lm, prompt, fallback, saved=hit, kernel=kernel))
