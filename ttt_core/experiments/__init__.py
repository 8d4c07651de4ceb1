"""The experiments wing of TTT Lens: sweeps over many generated tasks that test the theory, built on
the per-prompt core (`ttt_core.prompt_kernel`, `ttt_core.paper_gd`, `ttt_core.qttt`, ...).

* `stats` — paired statistics, mean ± SE, bootstrap CIs and the verdict wording of the reports.
* `store` — the one artifacts root, the one JSON encoder, writing results, the latest-result lookup.
* `pool` — the one local process pool (and the Ray backend behind the same call) for task sweeps.
* `paper_tasks`, `reproduce`, `reproduce_report` — the decision-theoretic paper's experiments
  (DESIGN §7.1): tasks and settings, the per-task work and the run, summaries and Markdown.
* `suite_tasks`, `suite`, `schedules`, `controller` — adaptive step schedules (issue 7): the task
  families and one engine trajectory per task, the cached suite, the schedules and their
  evaluation, the learned step controller.
* `score_validation` — does a block score predict the measured one-step gain (DESIGN §6)?
* `calibration_tasks`, `calibration_suite`, `calibration_report`, `calibration_advice` — is the
  diagnosis right (issue 16; DESIGN §10): the seeded prompt families and one prompt's record
  (statistics, oracle trajectory, head-choice runs), the cached and resumable suite with its saved
  summaries (`run_calibration`, `latest_calibration`), the regret of every step rule, the verdict's
  reliability and head choice (`calibration_report`, `recommended_rule`), and the step count the
  dashboard recommends for a prompt (the family's lowest held-out regret rule applied to its kernel).

Layering: nothing outside this package imports it except `ttt_core.cli`, `pages/` and `bench/`.
"""
