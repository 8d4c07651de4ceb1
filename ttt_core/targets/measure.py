"""Cost measurements of one TTT run (issue 12 item 3): counted FLOPs of a training step and the
peak memory of a run.

* FLOPs: counted by ``torch.utils.flop_counter.FlopCounterMode`` around one training step (the
  forward and backward of the signal's loss; the AdamW update's elementwise work is not counted,
  nor is anything the counter has no formula for — Triton kernels on CUDA among them).
* Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` minus the allocation at the start
  (after ``reset_peak_memory_stats``); on CPU the peak resident-set size (``/proc/self/statm``,
  sampled every 2 ms by a thread) minus the RSS at the start. RSS counts what the allocator takes
  from the OS, so memory it reuses from an earlier run is not counted again: a lower bound.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

FLOPS_METHOD = "counted: torch.utils.flop_counter.FlopCounterMode on one training step (forward + backward)"
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss() -> int | None:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """``with PeakMemory(device) as pm: …`` then pm.bytes (None when it cannot be measured) and
    pm.method (module docstring)."""

    def __init__(self, device: torch.device | str, interval_s: float = 0.002) -> None:
        self.device = torch.device(device)
        self.interval = float(interval_s)
        self.bytes: int | None = None
        self.cuda = self.device.type == "cuda"
        self.method = ("CUDA: torch.cuda.max_memory_allocated − allocated at the start" if self.cuda else
                       "CPU: peak RSS increase (sampled every 2 ms; memory reused from earlier runs is not counted)")

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        self._start = _rss()
        self._peak = self._start
        self._stop = threading.Event()
        if self._start is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            r = _rss()
            if r is not None and r > self._peak:
                self._peak = r

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.bytes = int(torch.cuda.max_memory_allocated(self.device) - self._start)
            return
        if self._start is None:
            return
        self._stop.set()
        self._thread.join()
        r = _rss()
        peak = max(self._peak, r or 0)
        self.bytes = int(max(peak - self._start, 0))


def count_step_flops(run: Any) -> int | None:
    """FLOPs of one training step of a prepared `TargetRun` at its current params (forward and
    backward of the loss; one extra span is drawn). None when counting fails."""
    try:
        with FlopCounterMode(display=False) as fc:
            run._loss_grads(run.deltas, len(run.records) + 1)
        return int(fc.get_total_flops())
    except Exception:  # noqa: BLE001 — a cost column, never a reason to fail the comparison
        return None
