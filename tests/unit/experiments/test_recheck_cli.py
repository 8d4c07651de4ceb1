"""`ttt-lens recheck RESULT`: a user recomputes random records of a committed result and is told,
record by record, whether each agrees; an edited number is caught (exit 3), bad input gets one
line (exit 2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ttt_core.cli import main
from ttt_core.experiments.store import published_dir

TARGETS = sorted(published_dir("targets").glob("*/summary.json"))


def test_a_file_that_is_not_a_result_is_refused_in_one_line(tmp_path, capsys):
    f = tmp_path / "x.json"
    f.write_text(json.dumps({"kind": "something else"}))
    assert main(["recheck", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a saved result" in err and err.count("\n") == 1
    assert main(["recheck", str(tmp_path / "missing.json")]) == 2
    (tmp_path / "bad.json").write_text("{not json")
    for bad in (tmp_path / "bad.json", tmp_path):          # unparseable, a folder
        capsys.readouterr()
        assert main(["recheck", str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "internal" not in err and err.count("\n") == 1
    assert main(["recheck", str(f), "--records", "0"]) == 2


@pytest.mark.smollm2
@pytest.mark.skipif(not TARGETS, reason="no committed targets suite")
def test_a_committed_row_agrees_and_an_edited_copy_is_caught(tmp_path, capsys):
    summary = TARGETS[0]
    rows = [(f.name, i) for f in sorted((summary.parent / "prompts").glob("*.json"))
            for i in range(len(json.loads(f.read_text())["comparison"]["rows"]))]
    seed = 0
    (pick,) = np.random.default_rng(seed).choice(len(rows), size=1, replace=False)
    name, row = rows[int(pick)]

    code = main(["recheck", str(summary), "--records", "1", "--seed", str(seed), "--json"])
    out = capsys.readouterr()
    res = json.loads(out.out)
    assert code == 0 and res["ok"] and res["kind"] == "targets" and res["seed"] == seed
    assert len(res["records"]) == 1 and res["records"][0]["label"].startswith(name)
    assert "1 of 1 records agree" in out.err

    copy = tmp_path / summary.parent.name
    shutil.copytree(summary.parent, copy)
    rec_file = copy / "prompts" / name
    rec = json.loads(rec_file.read_text())
    rec["comparison"]["rows"][row]["error_start"] += 0.05     # an edited number, 2-3 % of a typical NLL
    rec_file.write_text(json.dumps(rec))
    code = main(["recheck", str(copy / "summary.json"), "--records", "1", "--seed", str(seed), "--json"])
    out = capsys.readouterr()
    res = json.loads(out.out)
    assert code == 3 and not res["ok"]
    assert any(".error_start" in m for m in res["records"][0]["mismatches"]), res["records"][0]
    assert "DIFFERS" in out.err and "1 differ" in out.err
