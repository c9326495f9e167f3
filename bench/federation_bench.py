"""Federation overhead: in-process round time against the silos' training, with and without SecAgg.

    python -m bench.federation_bench [--quick]     # or: from bench.federation_bench import run

Issue 7's targets at the demo's model size (the `tiny` preset, context 128, all six bundled
silos), measured on FedAvg rounds of 5 local steps at batch 8: the round's overhead (round
wall time minus the slowest silo's training time, the `overhead_seconds` of rounds.jsonl) is
at most 10% of the round, and secure aggregation adds at most 50% to the round time. The
demo's own rounds (fedsgd: one gradient of 2 sequences per silo) are timed beside them: there
the fixed cost of sending the model dominates a round, which is what fedsgd trades for steps.
The workspace is built from the bundled corpus, trimmed per silo, with an exact-count
tokenizer (vocab 4096).

Issue 15's target for Flower's deployment engine: the same FedAvg rounds on three silos run
once in process and once on a SuperLink with three SuperNodes on 127.0.0.1 (`engine =
"flower"`, every message through Flower's HTTP APIs and a forked ClientApp process), in the
same call; the deployed round time minus the in-process one is at most 5 s.

Threads: `run_federated` runs each silo on its own worker thread with one torch thread each
(it sets `torch.set_num_threads(1)` itself). Plain and SecAgg runs alternate, and each
figure is a median over rounds after the first (which warms up). These are wall times on a
shared machine: each ratio compares runs made side by side in the same call.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

TARGET_OVERHEAD = 0.10
TARGET_SECAGG = 0.50
TARGET_DEPLOYED_EXTRA_S = 5.0


def build_workspace(root: Path, *, limit_bytes: int, vocab_size: int) -> Path:
    """Every bundled silo trimmed to about `limit_bytes` of text, an exact-count tokenizer, shards."""
    from fedlm.corpus import SILOS, extract
    from fedlm.data.shards import shard_silo
    from fedlm.data.tokenizer import agree_tokenizer

    raw = extract(root / "raw")
    ws = root / "ws"
    for silo in SILOS:
        d = ws / "silos" / silo
        d.mkdir(parents=True)
        size = 0
        with open(d / "docs.jsonl", "w", encoding="utf-8") as f:
            for path in sorted(p for p in raw[silo].rglob("*") if p.is_file()):
                text = path.read_text(encoding="utf-8", errors="replace")[:50_000]
                if not text.strip():
                    continue
                f.write(json.dumps({"text": text, "source": silo}) + "\n")
                size += len(text.encode())
                if size >= limit_bytes:
                    break
    agree_tokenizer(ws, vocab_size=vocab_size, epsilon=None)
    for silo in SILOS:
        shard_silo(ws, silo, val_fraction=0.1, seed=0)
    return ws


def _rounds(ws: Path, out: Path, *, rounds: int, secure: bool, quick: bool, fedavg: bool = True,
            extra: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Run a federated config of the demo's size (FedAvg, 5 local steps at batch 8, or the demo's
    own strategy); return its rounds.jsonl rows."""
    from fedlm.config import load_config
    from fedlm.demo import FULL, QUICK, demo_sets
    from fedlm.federation.runner import run_federated

    size = QUICK if quick else FULL
    steps = 4 if quick else 5
    sets = demo_sets(ws, size) + [
        f"federation.rounds={rounds}", f"train.steps={rounds * (steps if fedavg else 1)}",
        f"federation.secure_aggregation={'true' if secure else 'false'}",
    ]
    if fedavg:
        sets += ['federation.strategy="fedavg"', f"federation.local_steps={steps}", "train.batch_size=8"]
    cfg = load_config(None, [*sets, *extra])
    run_federated(cfg, out)
    return [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]


def _deployed_rows(ws: Path, tmp: Path, *, rounds: int, quick: bool) -> dict[str, list[dict[str, Any]]]:
    """FedAvg rounds on three silos in process, then on Flower's deployment engine on loopback."""
    from fedlm.corpus import SILOS

    three = (f"data.silos={list(SILOS[:3])!r}".replace("'", '"'), "federation.round_timeout=300")
    got: dict[str, list[dict[str, Any]]] = {}
    for kind, engine in (("inprocess_3", "inprocess"), ("deployed", "flower")):
        rows = _rounds(ws, tmp / kind, rounds=rounds, secure=False, quick=quick,
                       extra=(*three, f'federation.engine="{engine}"'))
        got[kind] = [r for r in rows[1:] if r["completed"]]
    return got


def run(quick: bool = False) -> dict[str, Any]:
    """Round wall time, overhead share and SecAgg's added share; medians over rounds 2..N."""
    import torch

    threads = torch.get_num_threads()
    rounds = 3 if quick else 4
    repeats = 1
    try:
        with tempfile.TemporaryDirectory(prefix="fedlm-fed-bench-") as tmp:
            ws = build_workspace(Path(tmp), limit_bytes=100_000 if quick else 300_000,
                                 vocab_size=1024 if quick else 4096)
            rows: dict[str, list[dict[str, Any]]] = {"plain": [], "secagg": []}
            for rep in range(repeats):
                order = ("plain", "secagg") if rep % 2 == 0 else ("secagg", "plain")
                for kind in order:
                    got = _rounds(ws, Path(tmp) / f"{kind}-{rep}", rounds=rounds, secure=kind == "secagg",
                                  quick=quick)
                    rows[kind] += [r for r in got[1:] if r["completed"]]
            got = _rounds(ws, Path(tmp) / "demo", rounds=3 * rounds, secure=False, quick=quick, fedavg=False)
            rows["demo"] = [r for r in got[1:] if r["completed"]]
            rows.update(_deployed_rows(ws, Path(tmp), rounds=rounds, quick=quick))
    finally:
        torch.set_num_threads(threads)
    out: dict[str, Any] = {"silos": 6, "rounds_per_run": rounds, "runs_each": repeats,
                           "preset": "tiny", "seq_len": 64 if quick else 128, "batch": 8, "local_steps": 4 if quick else 5}
    for kind, rs in rows.items():
        secs = statistics.median(r["seconds"] for r in rs)
        over = statistics.median(r["overhead_seconds"] / r["seconds"] for r in rs)
        slowest = statistics.median(max(s.get("train_seconds", 0.0) for s in r["silos"].values()) for r in rs)
        up = statistics.median(sum(s.get("bytes_up", 0.0) for s in r["silos"].values()) / len(r["silos"]) for r in rs)
        out[kind] = {"round_s": secs, "slowest_silo_train_s": slowest, "overhead_share": over,
                     "bytes_up_per_silo": up, "rounds_measured": len(rs)}
    from fedlm.demo import FULL, QUICK

    size = QUICK if quick else FULL
    out["demo_strategy"] = f"{size.strategy}, {size.local_steps} × {size.silo_batch} sequences per silo and round"
    out["secagg_added_share"] = out["secagg"]["round_s"] / out["plain"]["round_s"] - 1
    out["deployed_extra_s"] = out["deployed"]["round_s"] - out["inprocess_3"]["round_s"]
    out["targets"] = {
        "overhead_10pct": out["plain"]["overhead_share"] <= TARGET_OVERHEAD,
        "secagg_50pct": out["secagg_added_share"] <= TARGET_SECAGG,
        "deployed_5s": out["deployed_extra_s"] <= TARGET_DEPLOYED_EXTRA_S,
    }
    return out


if __name__ == "__main__":
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
