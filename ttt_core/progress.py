"""Progress bars for the long CLI jobs (`diagnose`, `reproduce`, `train-controller`; GitHub issue 11,
point 6): a tqdm bar with elapsed time and ETA on stderr, adapted to the core's callbacks.

The core reports progress through callbacks (ttt_core.types): `Progress` (fraction ∈ [0, 1], text)
inside one prompt, `CountProgress` (done, total, text) over tasks. `ProgressBar` turns either into
a bar. It draws only when stderr is a terminal and --quiet is not given; otherwise its callbacks are
None, so the core skips its progress work and nothing is written (logs and pipes stay clean).

    with ProgressBar("diagnose", quiet=args.quiet) as bar:
        report = diagnose_report(..., progress=bar.fraction)

tqdm comes with transformers and huggingface_hub (pinned through them); without it the bar is off.
"""

from __future__ import annotations

import io
import os
import re
import sys
from typing import IO, Any

from ttt_core.types import CountProgress, Progress

FRACTION_STEPS = 1000  # a fraction bar counts in thousandths, so tqdm's rate and ETA work unchanged
_COUNT_PREFIX = re.compile(r"^\s*\d+\s*/\s*\d+\s*")


def is_terminal(stream: IO[str] | None) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # closed or odd streams
        return False


class ProgressBar:
    """One labelled bar on `stream` (default: sys.stderr at construction). `fraction` and `count`
    are the callbacks to pass to the core (None when the bar is off). A count bar whose total
    changes (a new phase, e.g. the pilot tasks before the tasks) starts a new bar line."""

    def __init__(self, label: str, *, quiet: bool = False, stream: IO[str] | None = None) -> None:
        self.label = label
        self.stream = sys.stderr if stream is None else stream
        self.active = not quiet and is_terminal(self.stream) and _tqdm() is not None
        self._bar: Any = None
        self._total: int | None = None

    # -------------------------------------------------------------- callbacks for the core
    @property
    def fraction(self) -> Progress:
        return self._on_fraction if self.active else None

    @property
    def count(self) -> CountProgress:
        return self._on_count if self.active else None

    def _on_fraction(self, frac: float, text: str) -> None:
        bar = self._ensure(FRACTION_STEPS, "fraction")
        target = int(round(min(max(float(frac), 0.0), 1.0) * FRACTION_STEPS))
        if target > bar.n:
            bar.update(target - bar.n)
        self._text(text)

    def _on_count(self, done: int, total: int, text: str) -> None:
        total = max(int(total), 1)
        bar = self._ensure(total, "count")
        if int(done) < bar.n:  # counting again from below: a new phase
            bar = self._ensure(total, "count", new=True)
        if int(done) > bar.n:
            bar.update(int(done) - bar.n)
        self._text(_COUNT_PREFIX.sub("", text))

    # -------------------------------------------------------------- the tqdm bar
    def _ensure(self, total: int, kind: str, new: bool = False) -> Any:
        if self._bar is not None and (new or total != self._total):
            self._bar.close()
            self._bar = None
        if self._bar is None:
            tqdm = _tqdm()
            counts = "" if kind == "fraction" else " {n_fmt}/{total_fmt}"
            width = {"dynamic_ncols": True} if _columns(self.stream) else {"ncols": 100, "nrows": 24}  # 0×0 pty: fixed size
            self._bar = tqdm(total=total, file=self.stream, desc=self.label, leave=True, mininterval=0.2,
                             smoothing=0.1, **width,
                             bar_format="{desc}: {percentage:3.0f}%|{bar}|" + counts +
                                        " [{elapsed}<{remaining}]{postfix}")
            self._total = total
        return self._bar

    def _text(self, text: str) -> None:
        text = (text or "").strip()
        if text:
            self._bar.set_postfix_str(text[:80], refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _columns(stream: IO[str]) -> int:
    """The terminal's width (0 when unknown, e.g. a pseudo-terminal that was never sized)."""
    try:
        return int(os.get_terminal_size(stream.fileno()).columns)
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return 0


def _tqdm() -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - transformers depends on tqdm
        return None
    return tqdm
