"""Adaptation targets × training signals on one prompt (DESIGN §11; issue 12).

* `registry`: target names (the kernel's subspaces: q, k, v, o, mlp_up, mlp_gate, mlp_down,
  lora:<kind>:<rank>, norm_attn, norm_mlp, norm_*_bias) → trainable parameters and adapter deltas;
* `signals`: next-token NLL, Tent's entropy, SyTTA's perplexity + entropy;
* `engine`: `TargetRun`, real TTT of any target with any signal (qTTT's optimiser and budget);
* `measure`: counted FLOPs and peak memory;
* `comparison`: `compare_targets`, the typed rows, the winner and how sure.
"""

from ttt_core.targets.comparison import KernelSummary, TargetComparison, TargetRow, compare_targets, kernel_summary
from ttt_core.targets.engine import TargetConfig, TargetRun, error_label, measured_error
from ttt_core.targets.registry import (
                                       DEFAULT_TARGETS,
                                       Target,
                                       TargetParams,
                                       TargetUnavailableError,
                                       build_params,
                                       describe,
                                       param_count,
                                       parse_target,
)
from ttt_core.targets.signals import SIGNALS

__all__ = ["DEFAULT_TARGETS", "SIGNALS", "KernelSummary", "Target", "TargetComparison", "TargetConfig", "TargetParams",
           "TargetRow", "TargetRun", "TargetUnavailableError", "build_params", "compare_targets", "describe",
           "error_label", "kernel_summary", "measured_error", "param_count", "parse_target"]
