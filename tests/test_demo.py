"""`fedlm demo --quick` end to end: every stage runs and summary.json has the contract's shape."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedlm.corpus import SILOS


@pytest.mark.slow
def test_quick_demo_writes_the_summary(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    (out / "runs" / "federated" / "checkpoint").mkdir(parents=True)  # as left by an earlier demo: re-runs work
    r = subprocess.run([sys.executable, "-m", "fedlm.cli", "demo", "--quick", "--out", str(out)],
                       env={**os.environ, "COLUMNS": "160"}, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    names = {"federated", "centralised", *(f"local:{s}" for s in SILOS), *(f"personalised:{s}" for s in SILOS)}
    assert set(summary["models"]) == names
    for name, model in summary["models"].items():
        assert Path(model["run_dir"]).is_dir(), name
        bpb = model["bits_per_byte"]
        assert set(bpb) == {*SILOS, "mean"}
        assert all(math.isfinite(v) and 0 < v < 16 for v in bpb.values()), (name, bpb)
        assert bpb["mean"] == pytest.approx(sum(bpb[s] for s in SILOS) / len(SILOS))
    # every model learned something: far below a uniform guess over the vocabulary (~10 bits per token)
    assert summary["models"]["federated"]["bits_per_byte"]["mean"] < 6.0
    assert "federated" in r.stdout + r.stderr and "sample (federated)" in r.stdout + r.stderr
