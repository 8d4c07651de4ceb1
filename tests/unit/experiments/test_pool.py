"""ttt_core.experiments.pool: a process-pool worker ends when the command that started it dies, so
a killed suite leaves nothing behind writing into its folder."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

CHILD = """
import os, sys, time
from ttt_core.experiments.pool import _exit_with_parent
_exit_with_parent(os.getppid(), every=0.05)
open(sys.argv[1], "w").write("watching")
time.sleep(120)
"""

PARENT = """
import os, subprocess, sys, time
ready = sys.argv[1]
p = subprocess.Popen([sys.executable, "-c", sys.argv[2], ready], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
while not os.path.exists(ready):
    time.sleep(0.05)
time.sleep(0.5)
print(p.pid, p.poll() is None, flush=True)      # still running while its parent lives
os._exit(0)                                     # the parent dies without stopping it
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in state and "\nState:\tX" not in state


def test_a_pool_worker_exits_when_its_parent_dies(tmp_path):
    out = subprocess.run([sys.executable, "-c", PARENT, str(tmp_path / "ready"), CHILD], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    pid_text, running = out.stdout.split()
    pid = int(pid_text)
    assert running == "True", out.stderr
    deadline = time.monotonic() + 20
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid), f"worker {pid} outlived its parent"
