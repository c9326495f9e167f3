"""Issue 16's targets for `fedlm demo --assistant`, over two seeds.

Runs the assistant demo once per seed, each in its own process, and checks on the summaries: federated LoRA beats the base model's held-out exact
match on every silo and each silo's local-only LoRA on at least 4 of 6 (per seed, and on the
mean over seeds); federated answer bits per byte <= 1.10x centralised; each silo's traffic
<= 1% of sending the full fp32 model every round; the demo's wall time with the CPU seconds of
its process beside it (the machine is shared).

The demo runs at `fedlm.assistant.BENCH` (the --quick training, 20 held-out questions per silo
and model) unless --size says otherwise: `quick` is `fedlm demo --assistant --quick` (its 8
questions rank models too coarsely to judge the targets), `full` the demo without --quick.

    python -m bench.assistant_bench [--size quick|bench|full] [--seed S ...] [--keep DIR]

Each seed's demo can be run alone, in a quiet window of a shared machine: with --keep DIR its
results stay in DIR/seedS, a later call with the same DIR reuses every seed found there, and a
call without --seed reports on both seeds. `bench.run --only assistant` honours
FEDLM_BENCH_ASSISTANT_DIR as --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedlm.assistant import SIZES

SEEDS = (1337, 1338)
TARGET_BEATS_LOCAL = 4
TARGET_BPB_RATIO = 1.10
TARGET_COMM_SHARE = 0.01
TARGET_SECONDS = {"quick": 300.0, "bench": 750.0, "full": 1800.0}
"""The demo's wall time: --quick within 5 minutes, the full run within 30 (the issue's), and the
bench's own size within 12.5 minutes a seed (two seeds in ~25 minutes)."""
_CHILD = """
import json, resource, sys, time
from pathlib import Path
from fedlm.assistant import SIZES, run_assistant
t = time.perf_counter()
run_assistant(Path(sys.argv[1]), quick=sys.argv[2] == "quick", seed=int(sys.argv[3]), size=SIZES[sys.argv[2]])
r = resource.getrusage(resource.RUSAGE_SELF)
Path(sys.argv[1], "bench.json").write_text(json.dumps(
    {"wall_s": time.perf_counter() - t, "cpu_s": r.ru_utime + r.ru_stime}))
"""


def _run_seeds(root: Path, size: str, seeds: tuple[int, ...] = SEEDS) -> dict[int, dict[str, Any]]:
    """One demo per seed, each in a fresh child process, one after the other (two side by side
    were killed for memory on the shared 23 GB machine: a demo process peaks at ~5-6 GB). A seed
    whose results are already in `root` (a finished earlier call) is not run again."""
    env = {**os.environ, "COLUMNS": "150"}
    results = {}
    for seed in seeds:
        out = root / f"seed{seed}"
        if not ((out / "summary.json").is_file() and (out / "bench.json").is_file()):
            load_before = os.getloadavg()[0]
            with open(root / f"seed{seed}.log", "w") as log:
                rc = subprocess.run([sys.executable, "-c", _CHILD, str(out), size, str(seed)],
                                    env=env, stdout=log, stderr=subprocess.STDOUT).returncode
            if rc != 0:
                tail = (root / f"seed{seed}.log").read_text()[-3000:]
                raise RuntimeError(f"assistant demo (seed {seed}) exited {rc}:\n{tail}")
            bench = json.loads((out / "bench.json").read_text())
            bench["load_average"] = [load_before, os.getloadavg()[0]]  # 1-minute load as it started and ended
            (out / "bench.json").write_text(json.dumps(bench))
        summary = json.loads((out / "summary.json").read_text())
        if summary["size"] != SIZES[size].__dict__:
            raise RuntimeError(f"{out}: a run of another size ({summary['size']}); use another --keep DIR")
        results[seed] = {"summary": summary, **json.loads((out / "bench.json").read_text())}
    return results


def targets(results: dict[int, dict[str, Any]], size: str) -> dict[str, Any]:
    """Per seed and on the seeds' mean: the issue's four targets, with the per-silo numbers."""
    seeds = list(results)
    silos = list(results[seeds[0]]["summary"]["models"]["base"]["exact_match"])
    silos.remove("mean")

    def em(seed: int, name: str, silo: str) -> float:
        return float(results[seed]["summary"]["models"][name]["exact_match"][silo])

    per_silo = {s: {kind: [em(seed, name, s) for seed in seeds] for kind, name in
                    (("base", "base"), ("local", f"local:{s}"), ("federated", "federated"),
                     ("centralised", "centralised"), ("personalised", f"personalised:{s}"))}
                for s in silos}
    mean = {s: {k: sum(v) / len(v) for k, v in row.items()} for s, row in per_silo.items()}
    out: dict[str, Any] = {"seeds": seeds, "silos": silos, "exact_match_per_seed": per_silo,
                           "exact_match_mean": mean}
    out["beats_base_per_seed"] = [sum(per_silo[s]["federated"][i] > per_silo[s]["base"][i] for s in silos)
                                  for i in range(len(seeds))]
    out["beats_local_per_seed"] = [sum(per_silo[s]["federated"][i] > per_silo[s]["local"][i] for s in silos)
                                   for i in range(len(seeds))]
    out["beats_base_mean"] = sum(mean[s]["federated"] > mean[s]["base"] for s in silos)
    out["beats_local_mean"] = sum(mean[s]["federated"] > mean[s]["local"] for s in silos)
    # beyond chance (the demo's paired exact test); None for a seed kept from before the demo ran it
    out["significant_per_seed"] = [
        [len(f[k]) for k in ("federated_beats_local_em_significant", "local_beats_federated_em_significant")]
        if "federated_beats_local_em_significant" in f else None
        for f in (r["summary"]["findings"] for r in results.values())]
    ratios = [r["summary"]["findings"]["federated_vs_centralised_bpb"] for r in results.values()]
    shares = [r["summary"]["communication"]["share_of_full_fp32"] for r in results.values()]
    out["bpb_ratio_per_seed"], out["comm_share_per_seed"] = ratios, shares
    bpb = [r["summary"]["models"] for r in results.values()]  # where the ratio's gap is: silo by silo
    out["bpb_ratio_per_silo"] = {s: [m["federated"]["bits_per_byte"][s] / m["centralised"]["bits_per_byte"][s]
                                     for m in bpb] for s in silos}
    out["comm"] = results[seeds[0]]["summary"]["communication"]
    out["wall_s_per_seed"] = [r["wall_s"] for r in results.values()]
    out["cpu_s_per_seed"] = [r["cpu_s"] for r in results.values()]
    out["load_average_per_seed"] = [r.get("load_average") for r in results.values()]
    out["phase_seconds_per_seed"] = [r["summary"].get("phase_seconds") for r in results.values()]
    out["phase_cpu_seconds_per_seed"] = [r["summary"].get("phase_cpu_seconds") for r in results.values()]
    out["ok"] = {
        "beats_base_every_silo": all(n == len(silos) for n in out["beats_base_per_seed"]),
        "beats_local_4_of_6": all(n >= TARGET_BEATS_LOCAL for n in out["beats_local_per_seed"]),
        "bpb_ratio": all(r <= TARGET_BPB_RATIO for r in ratios),
        "comm_share": all(s <= TARGET_COMM_SHARE for s in shares),
        "time": all(w <= TARGET_SECONDS[size] for w in out["wall_s_per_seed"]),
    }
    return out


def run(size: str = "bench", seeds: tuple[int, ...] = SEEDS, keep: Path | None = None) -> dict[str, Any]:
    """The targets over `seeds` (each seed's demo in `keep`/seedS when given, else in a temporary folder)."""
    keep = keep or (Path(os.environ["FEDLM_BENCH_ASSISTANT_DIR"]) if os.environ.get("FEDLM_BENCH_ASSISTANT_DIR")
                    else None)
    with tempfile.TemporaryDirectory(prefix="fedlm-assistant-bench-") as tmp:
        root = keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        results = _run_seeds(root, size, seeds)
        out = targets(results, size)
        out["bench_wall_s"] = time.perf_counter() - t0
        out["size_name"] = size
        out["size"] = results[seeds[0]]["summary"]["size"]
        out["load_average"] = os.getloadavg()
        return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="bench",
                        help="the demo size (default bench: --quick's training, 20 questions per silo)")
    parser.add_argument("--seed", type=int, action="append", help=f"run these seeds only (default {SEEDS})")
    parser.add_argument("--keep", type=Path, help="keep each seed's results in DIR/seedS and reuse those found there")
    a = parser.parse_args()
    print(json.dumps(run(size=a.size, seeds=tuple(a.seed or SEEDS), keep=a.keep), indent=1))
