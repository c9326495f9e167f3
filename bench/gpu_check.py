"""`train.device = "cuda"` end to end: a short federated LoRA run on the GPU and on the CPU, compared.

    python -m bench.gpu_check                 # needs a CUDA GPU; prints one JSON object
    python -m bench.gpu_check --out FILE      # and writes it to FILE
    python -m bench.gpu_check --device cpu    # the harness itself, with the CPU standing in for the GPU

Three silos of the bundled corpus (trimmed, as the tests build them), a tiny model with LoRA
r = 8, FedAvg with secure aggregation, the same seed, run three times in process:

- cpu fp32 (the reference), cuda fp32 and cuda bf16 (autocast);
- the per-round training losses (the silos' token-weighted mean) of each CUDA run against the CPU's: fp32 within
  FP32_RTOL (the kernels differ, the maths does not), bf16 within BF16_RTOL (bf16 keeps 8
  bits of mantissa: a relative error of 2^-8 per rounding);
- that every update reached the codec and secure aggregation as CPU tensors (the two are
  wrapped to check), while the model trained on the GPU (CUDA memory was allocated);
- tokens/s of each run (the silos' tokens per round over the round's seconds).

Without CUDA it exits 1 with one line saying so, and runs nothing.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

FP32_RTOL = 1e-3
BF16_RTOL = 2e-2
SETS = ["model.preset=tiny", "model.max_seq_len=128", "train.seq_len=128", "train.batch_size=8",
        "train.mode=federated", "federation.rounds=3", "federation.local_steps=4", "train.warmup_steps=1",
        "lora.rank=8", "federation.secure_aggregation=true", "train.seed=7"]


def _require_cuda() -> str:
    import torch

    if not torch.cuda.is_available():
        build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise SystemExit(f"bench/gpu_check.py needs a CUDA GPU: torch {torch.__version__} ({build}) sees none; "
                         "nothing was run (run it on a machine with a GPU)")
    return str(torch.cuda.get_device_name(0))


def _watch_cpu_only() -> dict[str, int]:
    """Wrap the codec and secure aggregation's entry so that a tensor off the CPU fails the run."""
    from fedlm.federation import codecs, secagg

    seen = {"codec": 0, "secagg": 0}

    def check(where: str, update: dict[str, Any]) -> None:
        bad = [n for n, t in update.items() if getattr(t, "device", None) is not None and t.device.type != "cpu"]
        if bad:
            raise AssertionError(f"{where} got {bad[0]} on {update[bad[0]].device}: updates must cross on the CPU")
        seen[where] += 1

    encode, flatten = codecs.encode_for_send, secagg.flatten

    def encode_checked(update: Any, **kw: Any) -> Any:
        check("codec", update)
        return encode(update, **kw)

    def flatten_checked(update: Any, *a: Any, **kw: Any) -> Any:
        check("secagg", update)
        return flatten(update, *a, **kw)

    codecs.encode_for_send = encode_checked  # type: ignore[assignment]
    secagg.flatten = flatten_checked  # type: ignore[assignment]
    return seen


def _run(ws: Path, out: Path, device: str, precision: str) -> dict[str, Any]:
    import torch

    from fedlm.config import load_config
    from fedlm.federation.runner import run_federated
    from fedlm.federation.task import planned_tokens

    cfg = load_config(None, [*SETS, f"data.workspace={json.dumps(str(ws))}", f"train.device={device}",
                             f"train.precision={precision}"])
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    run_federated(cfg, out)
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    tokens = len(rows[0]["sampled"]) * planned_tokens(cfg)  # every silo's tokens in a round
    return {
        "device": device, "precision": precision, "seconds": time.perf_counter() - t0,
        "losses": [r["loss"] for r in rows],  # the round's mean (secure aggregation hides each silo's)
        "tokens_per_s": statistics.median(tokens / r["seconds"] for r in rows[1:]),  # round 1 builds the model
        "cuda_peak_bytes": int(torch.cuda.max_memory_allocated()) if device.startswith("cuda") else 0,
    }


def _worst_rtol(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True))


def run(device: str = "cuda") -> dict[str, Any]:
    gpu = _require_cuda() if device.startswith("cuda") else f"none: {device} stands in (a check of this script)"
    from tests.conftest import build_workspace

    seen = _watch_cpu_only()
    with tempfile.TemporaryDirectory(prefix="fedlm-gpu-check-") as tmp:
        ws = build_workspace(Path(tmp), vocab_size=512)
        runs = [_run(ws, Path(tmp) / f"run-{i}-{d}-{p}", d, p)
                for i, (d, p) in enumerate((("cpu", "fp32"), (device, "fp32"), (device, "bf16")))]
    cpu, cuda32, cuda16 = runs
    checks = {
        "cuda_fp32_loss_rtol": _worst_rtol(cpu["losses"], cuda32["losses"]),
        "cuda_bf16_loss_rtol": _worst_rtol(cpu["losses"], cuda16["losses"]),
        "updates_checked_on_cpu": seen,
    }
    ok = (checks["cuda_fp32_loss_rtol"] <= FP32_RTOL and checks["cuda_bf16_loss_rtol"] <= BF16_RTOL
          and seen["codec"] > 0 and seen["secagg"] > 0
          and all(r["cuda_peak_bytes"] > 0 for r in runs[1:] if device.startswith("cuda")))
    return {"gpu": gpu, "runs": runs, "checks": checks, "tolerance": {"fp32": FP32_RTOL, "bf16": BF16_RTOL},
            "ok": ok}


if __name__ == "__main__":
    result = run(sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cuda")
    text = json.dumps(result, indent=2)
    print(text)
    if "--out" in sys.argv:
        Path(sys.argv[sys.argv.index("--out") + 1]).write_text(text + "\n")
    sys.exit(0 if result["ok"] else 1)
