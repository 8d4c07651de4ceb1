"""Shared constants, types and private step-grid helpers of ``ttt_core.theory`` (DESIGN §2-§5).

Internal module: the public names defined here are re-exported by ``ttt_core.theory``; the
private helpers (``_grid``, ``_grid_1d``, ``_log_contraction``) serve the filter, evidence and
PAC-Bayes modules and live only here.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]

#: Relative tolerance below zero accepted for eigenvalues of a PSD matrix (round-off).
EIG_TOL_REL: float = 1e-10
#: Default step fraction c in ρ = c/λ_max for prompt-level views (spectrum, steps, scores, paper
#: mode, diagnose, reproduction): the paper's SST-2 choice, inside its pilot grid {0.05, 0.1, 0.2}.
DEFAULT_C = 0.1
#: Default step grid {0, 1, ..., 30} (DESIGN §5).
DEFAULT_T_GRID: FloatArray = np.arange(31, dtype=float)
#: Variance floor used only when the data carry no scale at all (r = 0 exactly).
VAR_FLOOR: float = 1e-300


def _grid(T: ArrayLike) -> tuple[FloatArray, bool]:
    """T as a float array and whether it was a scalar; rejects negative or non-finite T."""
    T_arr = np.asarray(T, dtype=float)
    if not np.all(np.isfinite(T_arr)) or np.any(T_arr < 0):
        raise ValueError("step counts T must be finite and >= 0")
    return T_arr, T_arr.ndim == 0


def _log_contraction(lam: FloatArray, rho: float) -> FloatArray:
    """log(1 − ρλ) via log1p (finite because ρλ < 1 was validated)."""
    return np.log1p(-rho * lam)


def _grid_1d(T_grid: ArrayLike | None) -> FloatArray:
    """A non-empty 1-D step grid as floats; None gives a copy of DEFAULT_T_GRID."""
    if T_grid is None:
        return DEFAULT_T_GRID.copy()
    T_arr, _ = _grid(T_grid)
    T_arr = np.atleast_1d(T_arr)
    if T_arr.ndim != 1 or T_arr.size == 0:
        raise ValueError("T_grid must be a non-empty 1-D array of step counts")
    return T_arr
