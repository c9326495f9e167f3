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
def test_quick_demo_writes_the_summary(quick_demo: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, r = quick_demo  # conftest runs `fedlm demo --quick` once a session, over the remains of an earlier demo
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
    value = summary["value"]  # issue 17: each silo's contribution and gain, valued by retraining
    assert value["method"] == "exact" and value["coalitions_trained"] == 62 and set(value["silos"]) == set(SILOS)
    assert sum(v["shapley"] for v in value["silos"].values()) == pytest.approx(
        value["grand_utility"] - value["baseline_utility"], abs=1e-9)
    assert all(math.isfinite(v["gain"]) for v in value["silos"].values())
    # the valuation run follows the demo's recipe (fedsgd): joining costs the silos little on average, where a FedAvg
    # valuation run of the same steps left every silo worse off than training alone (mean gain -0.48 bits/byte)
    assert sum(v["gain"] for v in value["silos"].values()) / len(SILOS) > -0.1, value["silos"]
    assert "value of each silo" in r.stdout + r.stderr and "a separate small fedsgd run" in r.stdout + r.stderr


@pytest.mark.slow
def test_readme_explain_runs_on_the_demo_model(quick_demo: tuple[Path, subprocess.CompletedProcess[str]],
                                               tmp_path: Path) -> None:
    """README's "Looking inside the demo's model" commands, as written, on the quick demo's output: the
    page is written, the JSON has the documented keys, attributions are complete to 1% at the default
    step count on a trained model (or to 5e-4 bits where the gap is tiny), and provenance covers every silo's personalised model."""
    import json
    import re
    import shlex

    out, r = quick_demo
    assert r.returncode == 0, r.stderr[-3000:]
    (tmp_path / "demo-out").symlink_to(out)
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"```sh\n(.*?)```", text[text.index("## Looking inside the demo's model"):], re.S)
    assert block
    lines = [line for line in block.group(1).splitlines() if line.startswith("fedlm explain ")]
    assert len(lines) == 2
    for line in lines:
        r = subprocess.run([sys.executable, "-m", "fedlm.cli", *shlex.split(line)[1:]], cwd=tmp_path,
                           env={**os.environ, "COLUMNS": "160"}, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (line, r.stderr[-2000:])
        if "--json" in line:
            result = json.loads(r.stdout)
            assert {"tokens", "surprisal_bits", "alternatives", "bits_per_byte", "attention", "attributions",
                    "logit_lens", "provenance", "provenance_models"} <= set(result)
            assert result["attributions"]["target"] == " the"
            # complete to 1% of the gap f(x) - f(baseline), or to 5e-4 bits where the gap is under 0.05
            # bits: the quick demo's model differs with its tokenizer's fresh DP noise, its gap for " the"
            # ranged 0.01-0.38 bits over five demos, and a near-zero gap leaves a relative error to fp32
            # rounding (a suite run once read 0.71 of such a gap). Where the rule refined to its most
            # points and still missed that, the result must say so, and miss by at most a tenth of it: a
            # suite run's model (gap 0.028 bits) left 0.0023 bits, where a wrong baseline or rule misses by
            # more than the gap
            from fedlm.explain import IG_MAX_STEPS

            a = result["attributions"]
            gap = a["f_x"] - a["f_baseline"]
            miss = abs(sum(a["scores"]) - gap)
            assert a["completeness_error"] == pytest.approx(miss / abs(gap), rel=1e-6), a
            assert miss <= 0.01 * max(abs(gap), 0.05) or (
                a["steps"] == IG_MAX_STEPS and miss <= 0.1 * max(abs(gap), 0.05)), a
            assert result["provenance_models"] == "personalised" and set(result["provenance"]) == set(SILOS)
        else:
            assert "bits/byte" in r.stdout and "provenance (personalised models" in r.stdout, r.stdout
    page = (tmp_path / "explain.html").read_text()
    assert page.startswith("<!doctype html>") and "<script" not in page
