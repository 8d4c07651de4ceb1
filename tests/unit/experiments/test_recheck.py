"""`ttt_core.experiments.recheck`: the record comparison with a measured round-off allowance, and
the probes' environments (the probes themselves run in test_published on a committed record)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from ttt_core.experiments import recheck


def test_mismatches_fixed_tolerance():
    old = {"a": 1.0, "b": [2.0, 3.0], "n": 4, "ok": True}
    assert recheck.mismatches({"a": 1.0 + 5e-7, "b": [2.0, 3.0], "n": 4, "ok": True}, old, 1e-6) == []
    bad = recheck.mismatches({"a": 1.0 + 5e-6, "b": [2.0, 3.1], "n": 5, "ok": True}, old, 1e-6)
    assert [m.split(":")[0] for m in bad] == ["record.a", "record.b[1]", "record.n"]
    assert recheck.mismatches({"a": 1.0, "b": [2.0], "n": 4, "ok": True}, old, 1e-6) == ["record.b: length 1 vs 2"]
    assert recheck.mismatches({"a": 1.0}, old, 1e-6)[0].startswith("record: keys")
    assert recheck.mismatches({"x": float("nan")}, {"x": float("nan")}, 1e-6) == []
    assert recheck.mismatches({"x": 0.0}, {"x": float("nan")}, 1e-6) == ["record.x: 0.0 vs NaN"]


def test_noise_widens_only_the_numbers_that_move_and_discrete_fields_only_where_a_probe_flipped():
    fresh = {"curve": [1.0, 1.5], "start": 1.0, "t": 3, "verdict": "adapt"}
    saved = {"curve": [1.0, 1.502], "start": 1.0 + 1e-3, "t": 4, "verdict": "adapt"}
    probes = [{"curve": [1.0, 1.501], "start": 1.0, "t": 4, "verdict": "adapt"},
              {"curve": [1.0, 1.4995], "start": 1.0, "t": 3, "verdict": "adapt"}]
    noise = recheck.spread(fresh, probes)
    assert noise["curve"][0] == 0.0 and noise["curve"][1] == pytest.approx(1e-3) and noise["start"] == 0.0
    assert noise["t"] is True and noise["verdict"] is False
    bad = recheck.mismatches(fresh, saved, 1e-5, 1e-4, noise=noise, k=4.0)
    # the curve's end moved 2e-3 ≤ 1e-5 + 1.5e-4 + 4e-3; its start did not move under the probes
    assert [m.split(":")[0] for m in bad] == ["record.start"]
    assert recheck.mismatches({**fresh, "verdict": "skip"}, saved, 1e-5, 1e-4, noise=noise)[-1].startswith(
        "record.verdict")
    # k = 0: the fixed tolerance only
    assert len(recheck.mismatches(fresh, saved, 1e-5, 1e-4, noise=noise, k=0.0)) == 2


def test_spread_marks_a_number_that_a_probe_lost():
    assert recheck.spread({"x": 1.0}, [{"x": None}]) == {"x": math.inf}
    assert recheck.spread({"x": float("nan")}, [{"x": 1.0}]) == {"x": math.inf}
    assert recheck.spread({"x": [1.0, 2.0]}, [{"x": [1.0]}]) == {"x": [math.inf, math.inf]}


def test_probe_envs_change_the_arithmetic_this_process_uses():
    assert recheck.probe_envs("AVX512") == [{"MKL_CBWR": "COMPATIBLE"}, {"ATEN_CPU_CAPABILITY": "avx2"}]
    assert recheck.probe_envs("AVX2")[1] == {"ATEN_CPU_CAPABILITY": "default"}
    import os

    import torch

    here = torch.backends.cpu.get_cpu_capability()
    env = {**os.environ, **recheck.probe_envs()[1]}
    child = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                           env=env, capture_output=True, text=True, timeout=120, check=True).stdout.strip()
    assert child != here


def test_main_refuses_an_unknown_kind(capsys):
    assert recheck.main(["nonsense", json.dumps({})]) == 2
    assert "usage" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown record kind"):
        recheck.probe("nonsense", {}, {})


def test_a_targets_row_is_checked_on_its_kernel_columns_when_it_has_them():
    """A row of a suite with kernels is compared on its kernel's numbers and verdict too (not on its
    seconds); a row without a kernel on the measured fields only."""
    row = {k: 1.0 for k in recheck.TARGET_ROW_FIELDS}
    assert "kernel" not in recheck.target_row_fields({**row, "kernel": {"status": "skipped"}})
    kern = {f: 0.5 for f in recheck.TARGET_KERNEL_FIELDS} | {"status": "ok", "decision": "adapt", "seconds": 3.0}
    got = recheck.target_row_fields({**row, "kernel": kern, "seconds": 9.0})
    assert set(got) == set(recheck.TARGET_ROW_FIELDS) | {"kernel"} and "seconds" not in got["kernel"]
    moved = recheck.target_row_fields({**row, "kernel": {**kern, "lambda_star": 0.6}})
    assert recheck.mismatches(moved, got, 1e-6, 0.0) and not recheck.mismatches(got, got, 1e-6, 0.0)
    flipped = recheck.target_row_fields({**row, "kernel": {**kern, "decision": "don't adapt"}})
    assert any("decision" in m for m in recheck.mismatches(flipped, got, 1e-6, 0.0))
    # a fresh row whose kernel was lost, shaped like the saved row: its kernel columns are None and differ
    lost = recheck.target_row_fields({**row, "kernel": {"status": "error"}}, like={**row, "kernel": kern})
    assert lost["kernel"] == {f: ("error" if f == "status" else None) for f in recheck.TARGET_KERNEL_FIELDS}
    assert recheck.mismatches(lost, got, 1e-6, 0.0)
    assert "kernel" not in recheck.target_row_fields({**row, "kernel": kern}, like=row)   # saved without: not checked
