"""Calibrated honesty: `fedlm plan`'s predictions against measured runs on this machine.

    from bench.plan_bench import run, measure_silo
    run(quick=True)          # the demo model (FULL size): memory and seconds per step and per round
    run()                    # + bf16 / checkpointing variants, SmolLM2-135M with LoRA r=8, and its
                             #   fedsgd rounds on the six QA silos (the assistant demo's run)
    measure_silo(["model.vocab_size=4096", "train.batch_size=8"], steps=3)   # one silo, measured

Memory is measured as the process's peak RSS (VmHWM; `getrusage`'s ru_maxrss would include the
parent's, which Linux carries across exec) minus its RSS just before the
model is built, in a fresh subprocess per case (one torch thread, as a silo runs in the
in-process engine), doing what a silo does in a round: hold the global arrays, train
`steps` optimizer steps from them with a fresh AdamW, compute the update. Seconds per round
are the real runner's (`rounds.jsonl`, rounds after the first) on a workspace of the bundled
silos: the demo model's (few, large arrays) and SmolLM2 LoRA fedsgd's on the six QA silos
(240 small adapter arrays, one window per silo: a round that is mostly per-array overhead).
Each row gives predicted, measured and predicted / measured; the target is ±25%.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEMO_FULL = ["model.preset=tiny", "model.max_seq_len=128", "train.seq_len=128", "train.batch_size=8",
             "federation.local_steps=5", "train.mode=federated"]
SMOLLM2_LORA = ["train.init_from=smollm2", "train.seq_len=128", "train.batch_size=4", "lora.rank=8",
                "federation.local_steps=2", "train.mode=federated"]


def _measure_main(overrides: list[str], steps: int) -> dict[str, Any]:
    """In the subprocess: build the model, run a silo's round, report peak RSS delta and step seconds."""
    import numpy as np
    import torch

    from fedlm.config import load_config
    from fedlm.lora import apply_lora
    from fedlm.plan import resolve_model
    from fedlm.train import SiloBatches, lm_loss, lr_at, make_optimizer, train_step

    torch.set_num_threads(1)
    cfg = load_config(None, overrides)
    mc = resolve_model(cfg)
    tc = cfg.train
    tokens = np.random.default_rng(0).integers(0, mc.vocab_size, size=200_000, dtype=np.int64)
    data = SiloBatches([tokens], torch.ones(1), torch.Generator().manual_seed(0))
    lm_loss  # noqa: B018  (imported so torch's lazy modules load before the baseline)
    page = __import__("os").sysconf("SC_PAGE_SIZE")
    baseline = int(Path("/proc/self/statm").read_text().split()[1]) * page
    from fedlm.model import Transformer

    model = Transformer(mc)
    model.activation_checkpointing = tc.activation_checkpointing
    if cfg.lora.rank:
        apply_lora(model, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                   targets=cfg.lora.targets)
    model.train()
    wire = [n for n, p in model.named_parameters() if p.requires_grad]
    state = model.state_dict()
    global_arrays = {n: state[n].detach().clone() for n in wire}  # what a silo receives
    optimizer = make_optimizer(model, tc)
    seconds = []
    for i in range(steps):
        t0 = time.perf_counter()
        train_step(model, optimizer, lambda: data.next(tc.batch_size, tc.seq_len), lr=lr_at(i, tc),
                   grad_accum=tc.grad_accum, grad_clip=tc.grad_clip, precision=tc.precision)
        seconds.append(time.perf_counter() - t0)
    local = model.state_dict()
    update = {n: local[n] - global_arrays[n] for n in wire}
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the parent across exec
    status = Path("/proc/self/status").read_text().splitlines()
    peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    return {"peak_bytes": peak - baseline, "seconds_per_step": statistics.median(seconds[1:] or seconds),
            "update_arrays": len(update)}


def measure_silo(overrides: list[str], *, steps: int = 3, timeout: float = 900.0) -> dict[str, Any]:
    """Peak memory (bytes above the pre-model RSS) and seconds per step of one silo, in a fresh process."""
    out = subprocess.run([sys.executable, "-m", "bench.plan_bench", "measure", json.dumps(overrides), str(steps)],
                         capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).parent.parent,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    if out.returncode:
        raise RuntimeError(f"measurement failed: {out.stderr[-2000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _row(pred: float, meas: float) -> dict[str, float]:
    return {"predicted": round(pred, 3), "measured": round(meas, 3), "ratio": round(pred / meas, 3),
            "within_25pct": bool(abs(pred / meas - 1) <= 0.25)}


def _case(name: str, overrides: list[str], steps: int) -> dict[str, Any]:
    from fedlm.config import load_config
    from fedlm.plan import plan_run

    cfg = load_config(None, [*overrides, "data.silos=['one']"])
    plan = plan_run(cfg)
    meas = measure_silo(overrides, steps=steps)
    return {"case": name, "overrides": overrides,
            "peak_memory_mib": _row(plan.memory["peak"] / 2**20, meas["peak_bytes"] / 2**20),
            "seconds_per_step": _row(float(plan.seconds_per_step or 0), meas["seconds_per_step"])}


def _round_case(quick: bool) -> dict[str, Any]:
    """Seconds per round: the plan vs the real in-process runner on the bundled silos."""
    from fedlm.config import load_config
    from fedlm.federation.runner import run_federated
    from fedlm.plan import plan_run
    from tests.conftest import TEST_SILOS, build_workspace

    silos = TEST_SILOS  # the bundled silos with plain-text files (what build_workspace reads)
    rounds = 3 if quick else 5
    with tempfile.TemporaryDirectory(prefix="fedlm-plan-bench-") as tmp:
        ws = build_workspace(Path(tmp), silos=tuple(silos), limit_bytes=200_000, vocab_size=4096)
        cfg = load_config(None, [*DEMO_FULL, f"data.workspace={json.dumps(str(ws))}", f"federation.rounds={rounds}",
                                 f"train.steps={rounds * 5}", "train.warmup_steps=1"])
        plan = plan_run(cfg)
        run_federated(cfg, Path(tmp) / "run")
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "rounds.jsonl").read_text().splitlines()]
    measured = statistics.median(r["seconds"] for r in rows[1:])
    up = statistics.median(s["bytes_up"] for r in rows for s in r["silos"].values())
    return {"case": f"demo FULL model, federated, {len(silos)} silos (real runner)",
            "seconds_per_round": _row(float(plan.seconds_per_round or 0), measured),
            "bytes_up_per_silo": _row(float(max(plan.bytes_up_per_round.values())), float(up)),
            "vocab_size": plan.model["vocab_size"]}


def _lora_round_case(rounds: int = 4) -> dict[str, Any]:
    """Seconds per round of the assistant demo's federated run (SmolLM2 LoRA fedsgd, six QA silos,
    quick size): the plan vs the real in-process runner, rounds after the first."""
    from fedlm.assistant import QUICK, assistant_sets, prepare_workspace
    from fedlm.config import load_config
    from fedlm.federation.runner import run_federated
    from fedlm.plan import plan_run

    with tempfile.TemporaryDirectory(prefix="fedlm-plan-bench-") as tmp:
        ws = prepare_workspace(Path(tmp))
        cfg = load_config(None, [*assistant_sets(ws, QUICK, seed=1337), f"federation.rounds={rounds}",
                                 f"train.steps={rounds}"])
        t0, c0 = time.perf_counter(), time.process_time()
        plan = plan_run(cfg)
        plan_s, plan_cpu = time.perf_counter() - t0, time.process_time() - c0
        run_federated(cfg, Path(tmp) / "run")
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "rounds.jsonl").read_text().splitlines()]
    return {"case": f"SmolLM2 LoRA r={cfg.lora.rank} fedsgd, {len(plan.silo_tokens)} QA silos (real runner)",
            "seconds_per_round": _row(float(plan.seconds_per_round or 0), statistics.median(r["seconds"] for r in rows[1:])),
            "overhead_seconds": statistics.median(r["overhead_seconds"] for r in rows[1:]),
            "plan_seconds": round(plan_s, 1), "plan_cpu_seconds": round(plan_cpu, 1), "time_source": plan.time_source}


def run(quick: bool = False) -> dict[str, Any]:
    """Predicted vs measured peak memory and seconds (per step, per round) on this machine."""
    demo = [*DEMO_FULL, "model.vocab_size=4096"]  # FULL's tokenizer size (the round case reads the real one)
    cases = [_case("demo FULL model fp32", demo, 3)]
    if not quick:
        cases += [
            _case("demo FULL model bf16", [*demo, "train.precision=bf16"], 3),
            _case("demo FULL model fp32 + checkpointing", [*demo, "train.activation_checkpointing=true"], 3),
        ]
        try:
            from fedlm.hf import smollm2_gguf_path

            smollm2_gguf_path()
            cases.append(_case("SmolLM2-135M LoRA r=8, seq 128, batch 4", SMOLLM2_LORA, 3))
            cases.append(_lora_round_case())
        except Exception as e:  # no SmolLM2 package: say so, keep the rest
            cases.append({"case": "SmolLM2-135M LoRA r=8", "skipped": str(e)})
    cases.append(_round_case(quick))
    return {"cases": cases}


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "measure":
        print(json.dumps(_measure_main(json.loads(sys.argv[2]), int(sys.argv[3]))))
    elif len(sys.argv) >= 2 and sys.argv[1] == "lora-round":
        print(json.dumps(_lora_round_case(), indent=2))
    else:
        print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
