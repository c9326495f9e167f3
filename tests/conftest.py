"""Shared fixtures: a small real workspace (three bundled silos, trimmed) with tokenizer and shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Two cores: tests that start processes must not fight over OpenMP threads.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

TEST_SILOS = ("legal", "technical", "drama")

# `make test` runs the suite on two pytest-xdist workers; a group runs whole on one worker. A test
# file is a group (its module fixtures are built once). The tests that start Flower's processes
# (SuperLink, SuperNodes, nginx, `fedlm train`) are one group, so two deployments never race for
# the cores against their round timeouts; so are the users of the session's `fedlm demo --quick`.
# (xdist's own `--dist loadgroup` markers do nothing under pytest 9.2: xdist 3.8 renames
# `item._nodeid`, which pytest no longer reads, so the grouping is this scheduler's.)
FLOWER_FILES = ("test_federation_deploy.py", "test_lifecycle.py", "test_multimachine.py", "test_warm_exec.py")
QUICK_DEMO_TESTS = ("tests/test_demo.py::", "tests/test_report.py::test_demo_report_in_headless_chromium")


def worker_group(nodeid: str) -> str:
    """The worker group of the test `nodeid`."""
    path = nodeid.split("::", 1)[0]
    if path.endswith(FLOWER_FILES):
        return "flower"
    if nodeid.startswith(QUICK_DEMO_TESTS):
        return "quick_demo"
    return path


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: absent without it
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    from xdist.scheduler import LoadScopeScheduling

    class Groups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return worker_group(nodeid)

    return Groups(config, log)


def _docs_from_corpus(folder: Path, limit_bytes: int) -> list[str]:
    """Plain-text documents from an extracted corpus folder (txt/rst files), up to limit_bytes."""
    docs, size = [], 0
    for path in sorted(folder.rglob("*")):
        if path.suffix not in (".txt", ".rst") or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")[:20_000]
        docs.append(text)
        size += len(text.encode())
        if size >= limit_bytes:
            break
    return docs


def build_workspace(root: Path, *, silos: tuple[str, ...] = TEST_SILOS, limit_bytes: int = 120_000,
                    vocab_size: int = 512) -> Path:
    """A workspace of trimmed real silos: docs.jsonl per silo, an exact-count tokenizer, shards."""
    from fedlm.corpus import extract
    from fedlm.data.shards import shard_silo
    from fedlm.data.tokenizer import agree_tokenizer

    raw = extract(root / "raw", silos)
    ws = root / "ws"
    for silo in silos:
        d = ws / "silos" / silo
        d.mkdir(parents=True)
        with open(d / "docs.jsonl", "w", encoding="utf-8") as f:
            for text in _docs_from_corpus(raw[silo], limit_bytes):
                f.write(json.dumps({"text": text, "source": silo}) + "\n")
    agree_tokenizer(ws, vocab_size=vocab_size, epsilon=None)
    for silo in silos:
        shard_silo(ws, silo, val_fraction=0.1, seed=0)
    return ws


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_workspace(tmp_path_factory.mktemp("ws"))


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """`fedlm demo --quick` once per session, as a user runs it: (its output folder, the process).

    tests/test_demo.py checks its summary and explains its model, tests/test_report.py renders its report.html."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    (out / "runs" / "federated" / "checkpoint").mkdir(parents=True)  # as left by an earlier demo: re-runs work
    r = subprocess.run([sys.executable, "-m", "fedlm.cli", "demo", "--quick", "--out", str(out)],
                       env={**os.environ, "COLUMNS": "160"}, capture_output=True, text=True, timeout=1800)
    return out, r  # each test asserts the exit status
