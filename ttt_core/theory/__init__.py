"""Spectral theory of test-time training (DESIGN.md §3, §4, §5).

Everything here works in the eigenbasis of the prompt kernel K = U diag(λ) Uᵀ (DESIGN §2):
callers pass the eigenvalues ``lam`` (shape ``(n,)``) and, where needed, rotated vectors
``k_tilde = Uᵀ k_x`` and ``r_tilde = Uᵀ r``.  All functions are vectorised over eigenvalues and
over step grids; nothing here builds an n × n matrix.

Modules, by DESIGN section (every public name is re-exported here, so ``theory.X`` works):

* ``filters`` (§2, §3): spectrum and step checks, ``eigh_psd``, the GD / gradient-flow / Bayes
  filters, matching time, implied prior and evidence covariance.
* ``risk`` (§4): query weights, query Bayes gap, the TTT-versus-ICL verdict, prompt risks.
* ``shift`` (§4): distribution shift on a projector, subspace James–Stein, out-of-range floor.
* ``evidence`` (§5): evidence scores ℓ_T, step selection, Gibbs posterior, KL, model-averaged
  filter, Gaussian log-likelihood and the (τ², σ²) fit.
* ``pac_bayes`` (§5): population evidence risk, PAC-Bayes variance, slack, general bound, β⋆.

Conventions
-----------
* Eigenvalues.  ``lam`` must be those of a positive semi-definite matrix.  Round-off negatives
  down to ``-EIG_TOL_REL * max|λ|`` are treated as exact zeros; anything more negative raises.
* Step size.  ρ = η/σ² must satisfy 0 < ρ < 1/λ_max (strict) so that g_T ∈ [0, 1) and
  1 − ρλ > 0 (DESIGN §3).  When λ_max = 0 every ρ > 0 is admissible.
* Step grids.  ``T`` may be a scalar (result has ``lam``'s shape) or an array (result has shape
  ``T.shape + lam.shape``, i.e. ``(len(T), n)`` for a 1-D grid).  T may be non-integer (the
  filters are analytic in T) but must be ≥ 0.
* Powers.  (1 − ρλ)^T is computed as exp(T·log1p(−ρλ)) and 1 − (1 − ρλ)^T as
  −expm1(T·log1p(−ρλ)): accurate for tiny ρλ, no overflow for huge T.
"""

from __future__ import annotations

from ttt_core.theory._common import DEFAULT_C, DEFAULT_T_GRID, EIG_TOL_REL, VAR_FLOOR, FloatArray
from ttt_core.theory.evidence import (
    NoiseSpec,
    evidence_scores,
    fit_signal_noise,
    gaussian_loglik,
    gibbs_posterior,
    kl_to_prior,
    model_averaged_filter,
    profiled_scores,
    select_steps,
)
from ttt_core.theory.filters import (
    bayes_filter,
    bayes_query_filter,
    check_eigenvalues,
    check_rho,
    eigh_psd,
    evidence_cov_eigs,
    gd_filter,
    gd_query_filter,
    gradient_flow_filter,
    gradient_flow_query_filter,
    implied_prior_eigs,
    matching_time,
    rho_from_c,
)
from ttt_core.theory.pac_bayes import (
    optimal_beta,
    pac_bayes_general_bound,
    pac_bayes_slack,
    pac_bayes_variance,
    population_evidence_risk,
)
from ttt_core.theory.risk import (
    IclVerdict,
    prompt_excess_risk,
    prompt_risk,
    query_bayes_gap,
    query_weights,
    ttt_beats_icl,
)
from ttt_core.theory.shift import (
    fixed_estimator_shift_risk,
    james_stein_risk_projector,
    no_fixed_T_lower_bound,
    out_of_range_floor,
    subspace_james_stein,
)

__all__ = [
    # constants and types
    "DEFAULT_C",
    "DEFAULT_T_GRID",
    "EIG_TOL_REL",
    "VAR_FLOOR",
    "FloatArray",
    "NoiseSpec",
    # filters (§2, §3)
    "check_eigenvalues",
    "check_rho",
    "rho_from_c",
    "eigh_psd",
    "gd_filter",
    "gd_query_filter",
    "gradient_flow_filter",
    "gradient_flow_query_filter",
    "bayes_filter",
    "bayes_query_filter",
    "matching_time",
    "implied_prior_eigs",
    "evidence_cov_eigs",
    # risk (§4)
    "query_weights",
    "query_bayes_gap",
    "IclVerdict",
    "ttt_beats_icl",
    "prompt_excess_risk",
    "prompt_risk",
    # evidence (§5)
    "evidence_scores",
    "profiled_scores",
    "select_steps",
    "gibbs_posterior",
    "kl_to_prior",
    "model_averaged_filter",
    "fit_signal_noise",
    "gaussian_loglik",
    # PAC-Bayes (§5)
    "population_evidence_risk",
    "pac_bayes_variance",
    "pac_bayes_slack",
    "pac_bayes_general_bound",
    "optimal_beta",
    # distribution shift (§4)
    "fixed_estimator_shift_risk",
    "no_fixed_T_lower_bound",
    "subspace_james_stein",
    "james_stein_risk_projector",
    "out_of_range_floor",
]
