"""The one definition of the small aliases and labels shared across `ttt_core`.

* `Key` (layer, kind): one projection matrix of one layer, kind ∈ adapter.KINDS.
* `Block` (layer, head): one scored block of a subspace (head 0 for a per-layer MLP block).
* `Progress`: callback(fraction ∈ [0, 1], text) for work inside one prompt.
* `CountProgress`: callback(done, total, text) for sweeps over tasks.
* `StopLike`: a threading.Event or a callable that says "stop before the next step".
* Block labels: ``L3.qH2`` (layer 3, W_Q head 2), ``L3.vH0`` (a kv head of W_V), ``L3.mlp_up`` (a
  per-layer block). `block_label` writes them and `parse_block_label` reads them back; every page,
  report and saved result uses this one spelling.
"""

from __future__ import annotations

import re
import threading
from typing import Callable, Sequence

Key = tuple[int, str]
Block = tuple[int, int]
HeadSel = Sequence[Block] | None
Progress = Callable[[float, str], None] | None
CountProgress = Callable[[int, int, str], None] | None
StopLike = threading.Event | Callable[[], bool] | None

_LABEL = re.compile(r"^L(?P<layer>\d+)\.(?:(?P<kind>[a-z]+)H(?P<head>\d+)|H(?P<bare>\d+)|"
                    r"(?P<mlp>mlp_[a-z]+|norm_[a-z]+(?:_bias)?|lora:[a-z_]+:\d+))$")
HEAD_SUBSPACES = ("q", "k", "v", "o")   # one block per head; every other subspace has one block per layer


def block_label(layer: int, head: int, subspace: str) -> str:
    """Canonical label of block (layer, head) of `subspace`: ``L{layer}.{subspace}H{head}`` for a
    head (q/k/v/o), ``L{layer}.{subspace}`` for a per-layer block (MLP, norm, LoRA: ``L3.lora:q:8``)."""
    if subspace not in HEAD_SUBSPACES:
        return f"L{int(layer)}.{subspace}"
    return f"L{int(layer)}.{subspace}H{int(head)}"


def parse_block_label(label: str) -> tuple[int, int, str | None]:
    """``L3.qH2`` → (3, 2, "q"); ``L3.mlp_up`` / ``L3.norm_attn`` / ``L3.lora:q:8`` → (3, 0, that
    subspace); the bare ``L3.H2`` → (3, 2, None).
    Raises ValueError on anything else."""
    m = _LABEL.match(label.strip())
    if m is None:
        raise ValueError(f"not a block label {label!r}; expected e.g. 'L3.qH2' (layer 3, W_Q head 2) or 'L3.mlp_up'")
    layer = int(m["layer"])
    if m["mlp"]:
        return layer, 0, m["mlp"]
    if m["bare"] is not None:
        return layer, int(m["bare"]), None
    return layer, int(m["head"]), m["kind"]


def should_stop(stop: StopLike) -> bool:
    """True when `stop` (an Event or a callable) asks to stop."""
    if stop is None:
        return False
    if isinstance(stop, threading.Event):
        return stop.is_set()
    return bool(stop())
