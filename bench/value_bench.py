"""Silo values (issue 17): in-run valuation (`rounds`) and sampled Shapley against exact retraining.

    python -m bench.value_bench [--quick]     # or: from bench.value_bench import run

The six bundled silos as the quick demo prepares them (vocabulary 1024), and small runs, so
that exact Shapley's 2^6 - 2 = 62 retrained federated runs fit this shared 2-core machine three
times. For each of 3 seeds: one federated run with `federation.value = "rounds"`, valued
by `fedlm value --method rounds` (no retraining) and `--method exact` (every coalition
retrained). `sampled` (permutation sampling, truncated) is computed on the same seed's retrained
coalitions, looked up instead of retrained again (a retrained run is bitwise the same), so its
cost is the number of distinct coalitions it visits. Seed 1's run is also repeated without
valuation, alternating, for the wall-time overhead of `rounds`.

The methods are compared at METHOD_SIZE (FedAvg, 4 rounds of 5 local steps) on three seeds, and again
at the demo's own valuation size (`fedlm.demo.VALUE_SIZE`: fedsgd, 20 rounds) on two.

Targets: `rounds` and `sampled` against `exact`, Spearman's rank correlation >= 0.9 and every
silo within 10% of the grand utility; `rounds` adds <= 30% to the run's wall time; `exact`
for 6 silos <= 30 minutes. Stability: each silo's exact value over the seeds (mean, spread)
and the order of the silos per seed.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedlm.demo import VALUE_SIZE

TARGET_SPEARMAN = 0.9
TARGET_WITHIN = 0.10  # of the grand utility
TARGET_OVERHEAD = 0.30
TARGET_EXACT_S = 1800.0
TRUNCATION = 0.01  # sampled cuts an order short within this share of the grand gain
SEEDS = (1, 2, 3)
METHOD_SIZE = [*(x for x in VALUE_SIZE if not x.startswith(("federation.strategy=", "federation.rounds=",
                                                         "federation.local_steps=", "federation.server_lr="))),
               'federation.strategy="fedavg"', "federation.rounds=4", "federation.local_steps=5"]
"""The size at which the methods are compared on SEEDS: VALUE_SIZE's model and per-silo steps as FedAvg, 4 rounds of
5 local steps, the kind of run `rounds`' reconstruction (Song et al.'s, and GTG-Shapley's) was made for."""
DEMO_SEEDS = (1, 2)
"""The comparison repeated at the demo's own valuation run (fedlm.demo.VALUE_SIZE, fedsgd) on these seeds."""


def size_text(size: list[str] = METHOD_SIZE) -> str:
    """A valuation size in words, for the BENCHMARKS section."""
    kv = dict(item.split("=", 1) for item in size)
    lr = f" at {float(kv['federation.server_lr']):.2f} × the silos' lr" if "federation.server_lr" in kv else ""
    return (f"a {kv['model.n_layers']}-layer d={kv['model.d_model']} model, {kv['federation.strategy'].strip(chr(34))} "
            f"{kv['federation.rounds']} rounds × {kv['federation.local_steps']} local steps of {kv['train.batch_size']} "
            f"× {kv['train.seq_len']} tokens{lr}, each silo scoring {int(kv['value.eval_tokens']):,} validation tokens")


def _config(ws: Path, seed: int, value: str, size: list[str] = METHOD_SIZE) -> Any:
    from fedlm.config import load_config

    return load_config(None, [f"data.workspace={json.dumps(str(ws))}", *size, f"train.seed={seed}",
                              f'federation.value="{value}"'])


def _cpu() -> float:
    """CPU seconds (user + sys) of this process, all threads: on a shared machine, what a run cost."""
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def _timed_run(ws: Path, out: Path, seed: int, value: str, size: list[str] = METHOD_SIZE) -> tuple[float, float]:
    """(wall, CPU) seconds of one federated run."""
    from fedlm.federation.runner import run_federated

    shutil.rmtree(out, ignore_errors=True)
    t0, c0 = time.perf_counter(), _cpu()
    run_federated(_config(ws, seed, value, size), out)
    return time.perf_counter() - t0, _cpu() - c0


def _local_models(ws: Path, out: Path, seed: int, size: list[str] = METHOD_SIZE) -> dict[str, Path]:
    """Each silo's local-only model at the run's per-silo budget (what `fedlm value` trains for gains)."""
    from fedlm.federation.valuation import local_config
    from fedlm.resolve import resolve_config, resolve_silos
    from fedlm.train import train

    cfg = resolve_config(_config(ws, seed, "none", size))
    runs = {}
    for silo in resolve_silos(ws, []):
        runs[silo] = out / silo
        train(local_config(cfg, silo), runs[silo])
    return runs


def _compare(values: dict[str, float], exact: dict[str, float], grand: float) -> dict[str, Any]:
    from fedlm.value.shapley import spearman

    silos = sorted(exact)
    worst = max(abs(values[s] - exact[s]) for s in silos) / abs(grand)
    rho = spearman([values[s] for s in silos], [exact[s] for s in silos])
    return {"spearman": rho, "max_error_of_grand": worst,
            "ok": bool(rho >= TARGET_SPEARMAN and worst <= TARGET_WITHIN)}


def _sampled(exact_body: dict[str, Any], *, seed: int) -> dict[str, Any]:
    """Sampled Shapley (fedlm value's stopping rule and cap, truncated at TRUNCATION of the grand gain) on the
    retrained coalitions' scores; its values, stderrs, orders drawn and coalitions visited. When the orders met
    every coalition, fedlm reports exact's values ("complete"); "estimate" is then the sampling estimate alone."""
    from fedlm.value.compute import Game, contributions
    from fedlm.value.run import PERMUTATIONS, TOLERANCE

    table = {frozenset(k.split("+")) if k else frozenset(): v for k, v in exact_body["coalition_bits_per_byte"].items()}
    game = Game(sorted(exact_body["silos"]), exact_body["beneficiaries"], exact_body["eval_tokens"],
                exact_body["start_bits_per_byte"], table.__getitem__)
    body = contributions(game, method="sampled", permutations=PERMUTATIONS, seed=seed, truncation=TRUNCATION,
                         tolerance=TOLERANCE)
    return {"values": body["shapley"], "stderr": body.get("sampled_stderr", body["stderr"]),
            "estimate": body.get("sampled_shapley", body["shapley"]), "complete": body["complete"],
            "permutations": body["permutations"], "converged": body["converged"], "coalitions": len(game.seen)}


def _one_seed(ws: Path, root: Path, seed: int, size: list[str]) -> dict[str, Any]:
    """One seed at `size`: a run valued in-run, then by exact retraining and sampled on its coalitions."""
    from fedlm.value.run import value_run

    run_dir = root / "run"
    _timed_run(ws, run_dir, seed, "rounds", size)
    t0, c0 = time.perf_counter(), _cpu()
    local = _local_models(ws, root / "local", seed, size)  # the gains' baselines, once for both methods
    exact = value_run(run_dir, method="exact", local_models=local)
    exact_s, exact_cpu = time.perf_counter() - t0, _cpu() - c0
    load = os.getloadavg()[0]
    rounds = value_run(run_dir, method="rounds", local_models=local)
    ex = {s: v["shapley"] for s, v in exact["silos"].items()}
    rv = {s: v["shapley"] for s, v in rounds["silos"].items()}
    grand = exact["grand_utility"] - exact["baseline_utility"]
    sampled = _sampled(exact, seed=seed)
    sv = sampled["values"]
    return {
        "exact": ex, "rounds": rv, "sampled": sv, "grand_utility": grand, "exact_seconds": exact_s,
        "exact_cpu_seconds": exact_cpu, "load": load,
        "exact_coalitions_trained": exact["coalitions_trained"], "sampled_coalitions": sampled["coalitions"],
        "sampled_permutations": sampled["permutations"], "sampled_converged": sampled["converged"],
        "sampled_stderr": sampled["stderr"], "sampled_complete": sampled["complete"],
        "rounds_vs_exact": _compare(rv, ex, grand), "sampled_vs_exact": _compare(sv, ex, grand),
        "sampled_estimate_vs_exact": _compare(sampled["estimate"], ex, grand),
        "rounds_valuation": {k: v for k, v in json.loads((run_dir / "value_rounds.json").read_text()).items()
                             if k.endswith("seconds")},
        "flags_exact": {s: v["flag"] for s, v in exact["silos"].items() if v["flag"]},
        "flags_rounds": {s: v["flag"] for s, v in rounds["silos"].items() if v["flag"]},
        "gain": {s: v["gain"] for s, v in exact["silos"].items()},
        "order_exact": sorted(ex, key=lambda s: -ex[s]),
    }


def _exact_vs_exact(per_seed: dict[int, Any]) -> dict[str, float]:
    """Spearman's ρ of exact's values between each pair of seeds: the reference's own agreement, the most
    any method can be expected to match it."""
    from fedlm.value.shapley import spearman

    seeds = list(per_seed)
    silos = sorted(per_seed[seeds[0]]["exact"])
    return {f"{a} vs {b}": spearman([per_seed[a]["exact"][s] for s in silos], [per_seed[b]["exact"][s] for s in silos])
            for i, a in enumerate(seeds) for b in seeds[i + 1:]}


def run(quick: bool = False) -> dict[str, Any]:
    from fedlm.demo import prepare_workspace

    root = Path(tempfile.mkdtemp(prefix="value-bench-"))
    try:
        ws = prepare_workspace(root, vocab_size=1024)  # the demo's own pipeline and workspace (quick size)
        seeds = SEEDS[:1] if quick else SEEDS
        walls: dict[str, list[float]] = {"none": [], "rounds": []}
        cpus: dict[str, list[float]] = {"none": [], "rounds": []}
        for value in ("none", "rounds", "none", "rounds"):  # seed 1, alternating (the first run also warms up)
            wall, cpu = _timed_run(ws, root / f"timing-{value}", seeds[0], value)
            walls[value].append(wall)
            cpus[value].append(cpu)
        load = [os.getloadavg()[0]]
        per_seed = {seed: _one_seed(ws, root / f"seed-{seed}", seed, METHOD_SIZE) for seed in seeds}
        for seed in seeds:
            load.append(per_seed[seed].pop("load"))
        silos = sorted(per_seed[seeds[0]]["exact"])
        stability = {s: {"mean": statistics.fmean(per_seed[k]["exact"][s] for k in seeds),
                         "spread": max(per_seed[k]["exact"][s] for k in seeds) - min(per_seed[k]["exact"][s] for k in seeds)}
                     for s in silos}
        overhead = statistics.median(walls["rounds"]) / statistics.median(walls["none"]) - 1
        overhead_cpu = statistics.median(cpus["rounds"]) / statistics.median(cpus["none"]) - 1
        demo_seeds = DEMO_SEEDS[:1] if quick else DEMO_SEEDS
        demo = {seed: _one_seed(ws, root / f"demo-{seed}", seed, VALUE_SIZE) for seed in demo_seeds}
        return {"seeds": list(seeds), "size": METHOD_SIZE, "size_text": size_text(), "silos": silos, "per_seed": per_seed,
                "stability": stability, "exact_vs_exact": _exact_vs_exact(per_seed),
                "run_wall_s": walls, "run_cpu_s": cpus, "rounds_overhead": overhead,
                "rounds_overhead_cpu": overhead_cpu, "overhead_ok": overhead <= TARGET_OVERHEAD,
                "exact_seconds_max": max(per_seed[k]["exact_seconds"] for k in seeds),
                "exact_cpu_seconds_max": max(per_seed[k]["exact_cpu_seconds"] for k in seeds), "load_1min": load,
                "demo": {"seeds": list(demo_seeds), "size": VALUE_SIZE, "size_text": size_text(VALUE_SIZE),
                         "per_seed": demo, "exact_vs_exact": _exact_vs_exact(demo)}}
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=1, default=str))
