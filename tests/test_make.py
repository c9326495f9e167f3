"""README's `make` commands: each is a Makefile target, and `make check` is the fast tier it says."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The tests run inside the venv `make setup` built: its stamp is taken as up to date (-o), so no
# test ever reinstalls the environment it runs in.
KEEP_VENV = ["-o", ".venv/.installed-stamp", "-o", "setup"]


def _readme_make_lines() -> list[str]:
    block = re.search(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README.md opens with no sh block"
    lines = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    return [line for line in lines if line.startswith("make ")]


def _make(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}  # not a sub-make of ours
    return subprocess.run(["make", *KEEP_VENV, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_readme_make_commands_are_makefile_targets() -> None:
    """Every `make X` the README opens with is a target (`make -n` resolves it), and check's recipe is
    lint + types + the tests not marked slow, while test's is the whole suite."""
    lines = _readme_make_lines()
    assert {"make demo", "make test", "make check"} <= set(lines), lines
    for line in lines:
        r = _make("-n", *line.split()[1:])
        assert r.returncode == 0, (line, r.stderr)
    demo = _make("-n", "demo").stdout
    assert "fedlm demo --assistant" in demo, demo  # the main path: a pretrained chat model, tuned together
    check = _make("-n", "check").stdout
    assert "ruff check" in check and "mypy fedlm" in check and '-m "not slow" tests' in check, check
    full = _make("-n", "test").stdout
    assert "pytest -q -n 2 --no-loadscope-reorder tests" in full and "not slow" not in full, full


@pytest.mark.slow
def test_make_check_runs_as_written() -> None:
    """`make check` really runs (ruff, mypy, pytest) and leaves slow tests out, here on two files."""
    tests = "tests/test_make.py::test_readme_make_commands_are_makefile_targets tests/test_cli.py::test_readme_step_by_step_commands_run"
    r = _make("check", f"TESTS={tests}", timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert re.search(r"\d+ passed, 1 deselected", r.stdout), r.stdout[-2000:]
