"""A learned step controller: a small MLP over a prompt's statistics that chooses T ∈ {skip} ∪ grid
to minimise the post-adaptation query error + λ·steps (issue 7).

Model. Features x (`FEATURE_NAMES`, computed by `features` from the statistics
`suite_tasks.run_task` records; none uses the query's true label) are standardised with the *training* mean/std and fed
to a one-hidden-layer MLP (tanh) with one logit per action. The policy is π(a|x) = softmax(logits).

Training objective (cost-sensitive classification). Every training task has the measured cost of
*every* action (one engine trajectory), C_ia = error_i(T_a) + λ·T_a. The loss is the expected
regret under the policy, (1/n) Σ_i Σ_a π(a|x_i) (C_ia − min_b C_ib), plus AdamW weight decay.
It is minimised full-batch; after every epoch the same quantity is computed on the VALIDATION split
and the epoch with the lowest validation loss is kept (early stopping, patience `patience`); the
best of `restarts` random initialisations (by validation loss) is the controller. Decisions are
argmax π. Test tasks are never passed to training: `train_controller` takes a suite, keeps only
its train and val splits, and records the seeds it used.

Saved as <dir>/controller.json (config, λ, actions, features, normalisation, training history,
the suite settings and the seeds of the train/val tasks) + <dir>/controller.safetensors (tensors
only).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ttt_core.experiments.schedules import action_costs, all_schedules, choice_counts, compare_controller, results_table
from ttt_core.experiments.store import controller_dir, write_json
from ttt_core.experiments.suite import Suite, build_suite
from ttt_core.experiments.suite_tasks import SPLITS, SuiteSettings
from ttt_core.models import LoadedModel
from ttt_core.types import Progress

FEATURE_NAMES: tuple[str, ...] = (
    "long_context",          # 1 for a long-context prompt (qTTT on text), 0 for few-shot
    "log_n_tokens",
    "log_n_positions",
    "log_lambda_max",
    "lambda_2_ratio",
    "lambda_3_ratio",
    "eff_rank_frac",         # exp(spectral entropy) / n
    "participation_frac",    # (Σλ)²/Σλ² / n
    "log_tau2",
    "log_sigma2",
    "log_lambda_star",
    "alignment_top3",        # share of ‖k_x‖² in the top-3 eigen-directions
    "log_residual_ms",
    "t_map_fixed_frac",      # evidence T_MAP / T_max
    "t_map_profiled_frac",
    "log_gap_ratio",         # log(plug-in query gap at T_MAP / ICL gap)
    "verdict_beats",
    "confidence",            # base model: max label prob / max next-token prob at the answer
)
LOG_CLIP = 30.0


def _log(x: Any, floor: float = 1e-12) -> float:
    if x is None or not np.isfinite(float(x)):
        return LOG_CLIP
    return float(np.clip(math.log(max(float(x), floor)), -LOG_CLIP, LOG_CLIP))


def features(stats: dict[str, Any], t_max: int) -> np.ndarray:
    """Feature vector (len(FEATURE_NAMES),) of one task's statistics."""
    n = max(int(stats.get("n_positions", 1)), 1)
    al = stats.get("alignment_top3")
    v = [
        1.0 if stats.get("long_context") else 0.0,
        _log(stats.get("n_tokens", 1)),
        _log(n),
        _log(stats.get("lambda_max")),
        float(stats.get("lambda_2_ratio") or 0.0),
        float(stats.get("lambda_3_ratio") or 0.0),
        float(stats.get("eff_rank_entropy") or 0.0) / n,
        float(stats.get("participation_ratio") or 0.0) / n,
        _log(stats.get("tau2")),
        _log(stats.get("sigma2")),
        _log(stats.get("lambda_star")),
        0.0 if al is None else float(al),
        _log(stats.get("residual_ms")),
        float(stats.get("t_map_fixed", 0.0)) / max(t_max, 1),
        float(stats.get("t_map_profiled", 0.0)) / max(t_max, 1),
        _log(stats.get("gap_ratio_at_t_map")),
        1.0 if stats.get("verdict_beats") else 0.0,
        float(stats.get("confidence") or 0.0),
    ]
    out = np.asarray(v, dtype=float)
    return np.where(np.isfinite(out), out, 0.0)


def feature_matrix(suite: Suite) -> np.ndarray:
    t_max = suite.settings.t_max
    return np.stack([features(t["stats"], t_max) for t in suite.tasks]) if len(suite) else \
        np.zeros((0, len(FEATURE_NAMES)))


@dataclass
class ControllerConfig:
    """Training settings (saved with the controller)."""

    lam: float = 1e-3
    hidden: int = 16
    lr: float = 1e-2
    weight_decay: float = 1e-2
    epochs: int = 400
    patience: int = 80
    restarts: int = 5
    seed: int = 0


class _Net(torch.nn.Module):
    def __init__(self, n_in: int, hidden: int, n_out: int) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(n_in, hidden)
        self.l2 = torch.nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(x)))


def expected_regret(logits: torch.Tensor, costs: torch.Tensor) -> torch.Tensor:
    """(1/n) Σ_i Σ_a softmax(logits_i)_a (C_ia − min_b C_ib)."""
    regret = costs - costs.min(dim=1, keepdim=True).values
    return (torch.softmax(logits, dim=1) * regret).sum(dim=1).mean()


@dataclass
class Controller:
    """A trained controller: decide(suite) → chosen T per task."""

    config: ControllerConfig
    actions: tuple[int, ...]
    t_max: int
    mean: np.ndarray
    std: np.ndarray
    net: _Net
    history: dict[str, list[float]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def logits(self, X: np.ndarray) -> np.ndarray:
        Z = (np.asarray(X, dtype=float) - self.mean) / self.std
        with torch.no_grad():
            return self.net(torch.as_tensor(Z, dtype=torch.float32)).numpy()

    def decide_features(self, X: np.ndarray) -> np.ndarray:
        if len(X) == 0:
            return np.zeros(0, dtype=int)
        return np.asarray(self.actions)[np.argmax(self.logits(X), axis=1)]

    def decide(self, suite: Suite) -> np.ndarray:
        """Chosen T (0 = skip) for every task of `suite` (statistics only, no labels)."""
        if suite.settings.t_max != self.t_max or tuple(suite.settings.actions) != tuple(self.actions):
            raise ValueError(f"controller was trained for actions {self.actions}, the suite has {suite.settings.actions}")
        return self.decide_features(feature_matrix(suite))

    # ------------------------------------------------------------------ persistence
    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        tensors["feature_mean"] = torch.as_tensor(self.mean, dtype=torch.float64)
        tensors["feature_std"] = torch.as_tensor(self.std, dtype=torch.float64)
        save_file(tensors, str(folder / "controller.safetensors"))
        meta = {"format": "ttt_lens_controller/1", "config": asdict(self.config), "actions": list(self.actions),
                "t_max": self.t_max, "features": list(FEATURE_NAMES), "history": self.history, "info": self.info}
        write_json(folder / "controller.json", meta, indent=1)
        return folder


def load_controller(folder: str | Path) -> Controller:
    folder = Path(folder)
    meta = json.loads((folder / "controller.json").read_text())
    if list(meta["features"]) != list(FEATURE_NAMES):
        raise ValueError("the saved controller uses other features than this version of TTT Lens")
    tensors = load_file(str(folder / "controller.safetensors"))
    cfg = ControllerConfig(**meta["config"])
    net = _Net(len(FEATURE_NAMES), cfg.hidden, len(meta["actions"]))
    net.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("feature_")})
    net.eval()
    return Controller(cfg, tuple(meta["actions"]), int(meta["t_max"]), tensors["feature_mean"].numpy(),
                      tensors["feature_std"].numpy(), net, meta.get("history", {}), meta.get("info", {}))


def fit(X_train: np.ndarray, C_train: np.ndarray, X_val: np.ndarray, C_val: np.ndarray, actions: Sequence[int],
        t_max: int, config: ControllerConfig | None = None) -> Controller:
    """Train on (features, per-action costs) of the training tasks with early stopping on the
    validation tasks' expected regret (see module docstring)."""
    cfg = config or ControllerConfig()
    X_train, C_train = np.asarray(X_train, float), np.asarray(C_train, float)
    X_val, C_val = np.asarray(X_val, float), np.asarray(C_val, float)
    if len(X_train) == 0 or len(X_val) == 0:
        raise ValueError("training needs at least one training and one validation task")
    mean = X_train.mean(axis=0)
    std = X_train.std(axis=0)
    std = np.where(std > 1e-8, std, 1.0)
    xt = torch.as_tensor((X_train - mean) / std, dtype=torch.float32)
    xv = torch.as_tensor((X_val - mean) / std, dtype=torch.float32)
    ct, cv = torch.as_tensor(C_train, dtype=torch.float32), torch.as_tensor(C_val, dtype=torch.float32)
    best: tuple[float, dict | None, dict, int, int] = (math.inf, None, {}, 0, 0)
    for restart in range(cfg.restarts):
        torch.manual_seed(cfg.seed + restart)
        net = _Net(xt.shape[1], cfg.hidden, len(actions))
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        hist = {"train": [], "val": [], "val_hard": []}
        with torch.no_grad():
            v0 = float(expected_regret(net(xv), cv))
        r_best, r_state, r_epoch, since = v0, {k: v.clone() for k, v in net.state_dict().items()}, 0, 0
        hist["train"].append(float(expected_regret(net(xt), ct).detach()))
        hist["val"].append(v0)
        hist["val_hard"].append(_hard_regret(net, xv, cv))
        for epoch in range(1, cfg.epochs + 1):
            net.train()
            opt.zero_grad()
            loss = expected_regret(net(xt), ct)
            loss.backward()
            opt.step()
            net.eval()
            with torch.no_grad():
                v = float(expected_regret(net(xv), cv))
            hist["train"].append(float(loss.detach()))
            hist["val"].append(v)
            hist["val_hard"].append(_hard_regret(net, xv, cv))
            if v < r_best - 1e-12:
                r_best, r_state, r_epoch, since = v, {k: t.clone() for k, t in net.state_dict().items()}, epoch, 0
            else:
                since += 1
                if since >= cfg.patience:
                    break
        if r_best < best[0]:
            best = (r_best, r_state, hist, r_epoch, restart)
    val_loss, state, hist, epoch, restart = best
    net = _Net(xt.shape[1], cfg.hidden, len(actions))
    net.load_state_dict(state)
    net.eval()
    info = {"best_epoch": epoch, "best_restart": restart, "val_loss_best": val_loss,
            "val_loss_init": hist["val"][0], "n_train": len(X_train), "n_val": len(X_val)}
    return Controller(cfg, tuple(int(a) for a in actions), int(t_max), mean, std, net, hist, info)


def _hard_regret(net: _Net, x: torch.Tensor, c: torch.Tensor) -> float:
    with torch.no_grad():
        a = net(x).argmax(dim=1)
        regret = c - c.min(dim=1, keepdim=True).values
        return float(regret.gather(1, a[:, None]).mean())


def train_controller(suite: Suite, config: ControllerConfig | None = None) -> Controller:
    """Train on the suite's TRAIN split with early stopping on its VAL split; test tasks are
    dropped before anything is computed (their seeds are recorded as never used)."""
    cfg = config or ControllerConfig()
    t0 = time.perf_counter()
    train, val = suite.split("train"), suite.split("val")
    used = set(train.seeds.tolist()) | set(val.seeds.tolist())
    test_seeds = set(suite.split("test").seeds.tolist())
    assert not (used & test_seeds), "training would touch test tasks"
    ctrl = fit(feature_matrix(train), action_costs(train, cfg.lam), feature_matrix(val), action_costs(val, cfg.lam),
               suite.settings.actions, suite.settings.t_max, cfg)
    ctrl.info.update({
        "train_seeds": sorted(int(s) for s in train.seeds), "val_seeds": sorted(int(s) for s in val.seeds),
        "suite_settings": asdict(suite.settings), "suite_key": suite.settings.key(),
        "train_seconds": time.perf_counter() - t0,
    })
    return ctrl


def train_and_evaluate(lm: LoadedModel | None, settings: SuiteSettings, n_tasks: int, *, lam: float | None = None,
                       out: str | Path | None = None, workers: int = 1, config: ControllerConfig | None = None,
                       suite_root: str | Path | None = None, progress: Progress = None) -> dict[str, Any]:
    """Build (or load) the suite, train the controller on train/val, evaluate every schedule on
    the TEST split, save the controller and `evaluation.json` to `out` (default
    `store.controller_dir()`). Returns the evaluation dict."""
    cfg = config or ControllerConfig()
    if lam is not None:
        cfg = ControllerConfig(**{**asdict(cfg), "lam": float(lam)})
    t0 = time.perf_counter()
    suite = build_suite(lm, settings, n_tasks, root=suite_root, progress=progress, workers=workers)
    t1 = time.perf_counter()
    ctrl = train_controller(suite, cfg)
    test = suite.split("test")
    results = all_schedules(test, cfg.lam, ctrl)
    comparison = compare_controller(suite, ctrl, cfg.lam)
    evaluation = {
        "suite_folder": suite.folder, "suite_key": settings.key(), "n_tasks": len(suite),
        "split_sizes": {s: len(suite.split(s)) for s in SPLITS}, "lambda": cfg.lam,
        "actions": list(settings.actions), "test_table": results_table(results, cfg.lam),
        "comparison": comparison,
        "test_choices": choice_counts(results, test, ["learned controller", "evidence T_MAP (σ profiled)",
                                                      "skip rule (TTT-vs-ICL verdict)"]),
        "controller_info": ctrl.info, "suite_seconds": t1 - t0, "train_seconds": time.perf_counter() - t1,
    }
    folder = Path(out) if out is not None else controller_dir()
    ctrl.info["evaluation"] = {"comparison": comparison, "n_test": len(test)}
    ctrl.save(folder)
    write_json(folder / "evaluation.json", evaluation, indent=1)
    evaluation["out"] = str(folder)
    return evaluation
