"""`fedlm report` on the demo's output: wall and CPU seconds of the command, and the page's size.

    from bench.report_bench import run
    run()             # runs the full demo (`fedlm demo`), then times `fedlm report` on it
    run(quick=True)   # the same on `fedlm demo --quick`

FEDLM_BENCH_DEMO=DIR reuses a demo output made by this code instead of running the demo
again (its summary.json says whether it was --quick). The report runs as a user runs it: a
fresh `fedlm report DIR --out FILE` process each time (imports, model load, samples, the explain
panel and every figure included), `repeats` times; the median counts. On a shared machine
the wall time includes waiting for a core, so the CPU seconds of the same process and the
1-minute load average as it started are given beside it; the time target is checked on both
(on an idle machine the wall time is about the CPU seconds or less: most of the work runs on
one thread, the model's on two).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TARGET_SECONDS = 10.0
TARGET_BYTES = 3_000_000


def _fedlm(*args: str, timeout: float) -> tuple[float, float, float]:
    """Run `fedlm ARGS` in a fresh process: (wall seconds, CPU seconds of it and its children, the
    1-minute load average as it started)."""
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "fedlm.cli", *args], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "COLUMNS": "200"})
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"fedlm {' '.join(args)} failed: {r.stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), load


def _imports() -> float:
    """CPU seconds of a fresh Python that only imports what a report needs (torch, captum, matplotlib's
    Figure): the floor of the command, measured beside it because the load inflates CPU seconds too."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", "import torch, captum.attr, matplotlib.figure"], check=True, timeout=600)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _time_report(demo: Path, out_dir: Path, repeats: int) -> dict[str, Any]:
    walls, cpus, loads, floor = [], [], [], []
    page = out_dir / "report.html"
    for _ in range(repeats):  # interleaved with the bare imports: the same load for both
        wall, cpu, load = _fedlm("report", str(demo), "--out", str(page), timeout=600)
        walls.append(wall)
        cpus.append(cpu)
        loads.append(load)
        floor.append(_imports())
    rounds = sum(1 for line in (demo / "runs" / "federated" / "rounds.jsonl").read_text().splitlines() if line.strip())
    text = page.read_text(encoding="utf-8")
    return {"wall_s": walls, "cpu_s": cpus, "load_average": loads, "imports_cpu_s": statistics.median(floor),
            "median_wall_s": statistics.median(walls),
            "median_cpu_s": statistics.median(cpus), "html_bytes": page.stat().st_size, "rounds": rounds,
            "figures": text.count("<figure id=\"fig-"), "sections": text.count("<section id=")}


def run(quick: bool = False, repeats: int = 3) -> dict[str, Any]:
    reuse = os.environ.get("FEDLM_BENCH_DEMO")
    with tempfile.TemporaryDirectory(prefix="fedlm-report-bench-") as tmp:
        if reuse:
            demo, demo_s = Path(reuse), None
        else:
            demo = Path(tmp) / "demo"
            demo_s, _, _ = _fedlm("demo", *(["--quick"] if quick else []), "--out", str(demo), timeout=3 * 3600)
        summary = json.loads((demo / "summary.json").read_text())
        r = _time_report(demo, Path(tmp), repeats=1 if quick else repeats)
    r.update(demo_quick=bool(summary.get("quick")), demo_seconds=demo_s, reused=bool(reuse),
             targets={"seconds": r["median_wall_s"] <= TARGET_SECONDS, "cpu_seconds": r["median_cpu_s"] <= TARGET_SECONDS,
                      "bytes": r["html_bytes"] <= TARGET_BYTES})
    return r
