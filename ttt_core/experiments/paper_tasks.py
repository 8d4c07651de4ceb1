"""What a paper reproduction runs on (DESIGN §7.1; paper A.8): the paper's digit-shift tasks with
its ten-digit label set, the settings of a run, and the paper's published Exp1 numbers.

Task i of base seed s is drawn from ``np.random.SeedSequence([s, i, stream])`` (stream 0: the task
itself, 1: the random block draws of Exp2), so a task — and every random choice made for it —
depends only on the base seed and its index: results are identical on every backend and worker
count. Pilot tasks use indices ``PILOT_OFFSET + i``, a stream disjoint from the tasks'.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ttt_core.generators import DigitShiftTask, digit_shift_task
from ttt_core.models import EMBEDDED_MODEL
from ttt_core.prompts import FewShotPrompt

DIGITS = tuple(str(d) for d in range(10))
PILOT_CS = (0.05, 0.1, 0.2)
PILOT_TASKS = 20
PILOT_OFFSET = 1_000_000
KIND_NAMES = {"v": "W_V", "q": "W_Q"}

#: The paper's published Exp1 numbers (Table 1; distilgpt2, V-head updates, 2 000 tasks, MSE ± SE).
PAPER_EXP1 = {
    "model": "distilgpt2", "tasks": 2000, "subspace": "W_V heads",
    "rows": [
        {"method": "evidence_profiled", "label": "TTT (evidence, profiled σ)", "mse": 0.0719, "se": 0.0029, "mean_T": 11.2},
        {"method": "evidence_fixed", "label": "TTT (evidence, fixed σ)", "mse": 0.0722, "se": 0.0030, "mean_T": 9.793},
        {"method": "fixed_8", "label": "TTT (T = 8)", "mse": 0.0734, "se": 0.0030, "mean_T": 8.0},
        {"method": "icl", "label": "ICL (T = 0)", "mse": 0.0747, "se": 0.0031, "mean_T": 0.0},
    ],
    "paired_vs_T8": {"evidence_fixed": [0.000545, 0.002894, 0.00325], "evidence_profiled": [0.000605, 0.003079, 0.00250]},
    "T8_vs_icl": [0.000648, 0.001796, 5.0e-5],
}


class PaperDigitPrompt(FewShotPrompt):
    """A digit-shift prompt whose label set is all ten digits 0…9 (the paper's restricted softmax
    over the digit tokens), whatever digits occur in the demonstrations."""

    @property
    def labels(self) -> list[str]:  # type: ignore[override]
        return list(DIGITS)


def task_rng(seed: int, index: int, stream: int = 0) -> np.random.Generator:
    """The generator of task `index` (stream 0: the task itself, 1: random block draws)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index), int(stream)]))


def paper_task(seed: int, index: int, n: int = 10) -> DigitShiftTask:
    """Digit-shift task `index` of base seed `seed`, with the paper's ten-digit label set."""
    t = digit_shift_task(task_rng(seed, index), n=n)
    p = t.prompt
    t.prompt = PaperDigitPrompt(demos=list(p.demos), query_x=p.query_x, query_y=p.query_y, sep=p.sep, spaced=p.spaced)
    return t


@dataclass
class ReproSettings:
    """Everything a reproduction run depends on (stored with its results)."""

    model: str = EMBEDDED_MODEL
    tasks: int = 8
    seed: int = 2606
    n_demos: int = 10
    grid_max: int = 12
    c: float = 0.1
    fixed_T: int = 8
    exp1_kinds: tuple[str, ...] = ("v", "q")
    last_layers: int = 4
    exp2: str = "gd"              # "off" | "gd" (real GD) | "linear" (linearised) | "both"
    exp2_layers: int = 16
    exp2_budgets: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    exp2_random_draws: int = 5
    exp2_gd_tasks: int | None = None   # real GD on the first N tasks (None = all tasks)
    pilot: bool = False
    pilot_tasks: int = PILOT_TASKS
    pilot_cs: tuple[float, ...] = PILOT_CS
    n_boot: int = 10_000

    def __post_init__(self) -> None:
        self.exp1_kinds = tuple(self.exp1_kinds)
        self.exp2_budgets = tuple(int(b) for b in self.exp2_budgets)
        self.pilot_cs = tuple(float(c) for c in self.pilot_cs)
        if self.exp2 not in ("off", "linear", "gd", "both"):
            raise ValueError("exp2 must be one of off, linear, gd, both")
        if not 0 < self.fixed_T <= self.grid_max:
            raise ValueError(f"the grid 0..{self.grid_max} must contain the fixed T = {self.fixed_T}")
        if any(k not in KIND_NAMES for k in self.exp1_kinds):
            raise ValueError(f"Exp1 subspaces must be among {list(KIND_NAMES)}")
        if not 0 < self.c < 1:
            raise ValueError("c must lie in (0, 1)")
        if self.tasks < 1:
            raise ValueError("tasks must be ≥ 1")
        if self.exp2_gd_tasks is not None:
            self.exp2_gd_tasks = int(self.exp2_gd_tasks)
            if self.exp2_gd_tasks < 0:
                raise ValueError("exp2_gd_tasks must be ≥ 0 (or None for all tasks)")

    def runs_exp2_gd(self, index: int) -> bool:
        """Whether task `index` runs Exp2's real GD (mode "gd" or "both", within `exp2_gd_tasks`)."""
        return self.exp2 in ("gd", "both") and (self.exp2_gd_tasks is None or index < self.exp2_gd_tasks)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
