"""CLI progress bars (GitHub issue 11, point 6): a bar with an ETA on a terminal's stderr, nothing
with --quiet or when stderr is not a terminal (ttt_core.progress, wired in ttt_core.cli)."""

from __future__ import annotations

import io
import json
import sys

import pytest

from ttt_core import cli
from ttt_core.progress import ProgressBar


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


FEWSHOT = "6->5\n6->5\n8->7\n5->4\n7->6\n2->1\n0->9\n3->2\n2->\n# answer: 1"


def test_fraction_bar_on_a_terminal_shows_percent_eta_and_text():
    out = FakeTTY()
    with ProgressBar("diagnose", stream=out) as bar:
        assert bar.fraction is not None and bar.count is not None
        for i in range(5):
            bar.fraction(i / 4, f"step {i}")
    text = out.getvalue()
    assert "diagnose:" in text and "100%" in text and "step 4" in text
    assert "<" in text  # [elapsed<remaining]: the ETA


def test_count_bar_starts_a_new_line_for_a_new_phase():
    out = FakeTTY()
    with ProgressBar("reproduce", stream=out) as bar:
        for d in range(1, 4):
            bar.count(d, 3, f"{d}/3 pilot tasks")
        for d in range(1, 9):
            bar.count(d, 8, f"{d}/8 tasks")
    text = out.getvalue()
    assert "3/3" in text and "8/8" in text and "pilot tasks" in text and "1/3 pilot" not in text


@pytest.mark.parametrize("stream, quiet", [(io.StringIO(), False), (FakeTTY(), True)])
def test_quiet_or_not_a_terminal_writes_nothing(stream, quiet):
    with ProgressBar("diagnose", quiet=quiet, stream=stream) as bar:
        assert bar.fraction is None and bar.count is None  # the core then skips its progress work
    assert stream.getvalue() == ""


def _diagnose(tmp_path, monkeypatch, stderr, *extra):
    path = tmp_path / "p.txt"
    path.write_text(FEWSHOT)
    monkeypatch.setattr(sys, "stderr", stderr)
    return cli.main(["diagnose", str(path), "--model", "tiny-random-llama", "--grid", "4", *extra])


def test_diagnose_draws_the_bar_on_a_terminal(tmp_path, monkeypatch, capsys):
    err = FakeTTY()
    assert _diagnose(tmp_path, monkeypatch, err, "--check", "--check-random", "1", "--check-steps", "1") == 0
    text = err.getvalue()
    assert "diagnose:" in text and "100%" in text and "Checking the scores" in text
    json.loads(capsys.readouterr().out)  # stdout is still exactly one JSON report


@pytest.mark.parametrize("stderr, extra", [(io.StringIO(), ()), (FakeTTY(), ("--quiet",))])
def test_diagnose_is_quiet_off_a_terminal_or_with_quiet(tmp_path, monkeypatch, capsys, stderr, extra):
    assert _diagnose(tmp_path, monkeypatch, stderr, *extra) == 0
    assert stderr.getvalue() == ""
    json.loads(capsys.readouterr().out)


def test_reproduce_and_train_controller_pass_the_bar(monkeypatch, tmp_path):
    """Both commands hand the bar's callbacks to the core (faked here: the real runs take minutes)."""
    import ttt_core.experiments.controller as controller
    import ttt_core.experiments.reproduce as reproduce

    def fake_reproduction(s, backend, workers, progress, command=None, cache_dir=None):
        for d in range(1, 4):
            progress(d, 3, f"{d}/3 tasks")
        return {"summary": {"tasks_ok": 0, "tasks_failed": []}}

    def fake_train(lm, settings, n, *, progress, **kw):
        for i in range(5):
            progress(i / 4, f"{i}/4 tasks run")
        return {"comparison": {"sentence": "done."}}

    monkeypatch.setattr(reproduce, "run_reproduction", fake_reproduction)
    monkeypatch.setattr(controller, "train_and_evaluate", fake_train)
    for argv, label in [(["reproduce", "--out", str(tmp_path)], "reproduce:"),
                        (["train-controller", "--model", "tiny-random-llama", "--tasks", "3"], "train-controller:")]:
        err = FakeTTY()
        monkeypatch.setattr(sys, "stderr", err)
        cli.main(argv)
        assert label in err.getvalue() and "100%" in err.getvalue()
        quiet = FakeTTY()
        monkeypatch.setattr(sys, "stderr", quiet)
        cli.main(argv + ["--quiet"])
        assert label not in quiet.getvalue()


def test_bar_shows_on_a_real_unsized_pseudo_terminal(monkeypatch):
    """A pty nobody sized (0×0, as under CI runners and `script`): tqdm would hide the bar (it takes
    the row count -1 for a full screen), so the bar falls back to a fixed size."""
    import os
    import pty

    master, slave = pty.openpty()
    with os.fdopen(slave, "w", encoding="utf-8") as tty:
        monkeypatch.setattr(sys, "stderr", tty)
        with ProgressBar("diagnose") as bar:
            bar.fraction(0.5, "half way")
            bar.fraction(1.0, "done")
        tty.flush()
        data = os.read(master, 65536).decode("utf-8", "replace")
    os.close(master)
    assert "diagnose: 100%" in data and "done" in data
