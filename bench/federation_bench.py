"""Federation overhead: in-process round time against the silos' training, with and without SecAgg.

    python -m bench.federation_bench [--quick]     # or: from bench.federation_bench import run
    python -m bench.federation_bench --deployed    # issue 15's figure alone

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
same call; the deployed round time minus the in-process one is at most 5 s. On a loaded
machine the two runs see different loads, so beside that difference the section reports the
difference with the silos' training left out (each round's `overhead_seconds`), the CPU
seconds per round of every process each run started, the load average, and where a deployed
train message's seconds go hop by hop (`fedlm.federation.hops`: median over the rounds of
the hops of the reply each round waited for last; a negative hop is one that overlapped the
previous, e.g. a SuperNode hands a message on before all of its content has arrived).

Threads: `run_federated` runs each silo on its own worker thread with one torch thread each
(it sets `torch.set_num_threads(1)` itself). Plain and SecAgg runs alternate, and each
figure is a median over rounds after the first (which warms up). These are wall times on a
shared machine: each ratio compares runs made side by side in the same call.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedlm.federation.rundir import RoundCallback

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
            extra: tuple[str, ...] = (), on_round: RoundCallback | None = None) -> list[dict[str, Any]]:
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
    run_federated(cfg, out, on_round=on_round)
    return [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]


def _deployed_rows(ws: Path, tmp: Path, *, rounds: int, quick: bool) -> dict[str, Any]:
    """FedAvg rounds on three silos in process, then on Flower's deployment engine on loopback;
    each run's rows, CPU seconds per round, and the deployed run's hops (`fedlm.federation.hops`)."""
    from fedlm.corpus import SILOS
    from fedlm.federation import hops

    three = (f"data.silos={list(SILOS[:3])!r}".replace("'", '"'), "federation.round_timeout=300")
    got: dict[str, Any] = {"load_before": os.getloadavg()[0]}
    trace = tmp / "hops.jsonl"
    for kind, engine in (("inprocess_3", "inprocess"), ("deployed", "flower")):
        cpu: list[float] = []  # CPU seconds of this process and every process it started, at each round's end
        if engine == "flower":
            os.environ[hops.ENV] = str(trace)
        try:
            rows = _rounds(ws, tmp / kind, rounds=rounds, secure=False, quick=quick,
                           extra=(*three, f'federation.engine="{engine}"'),
                           on_round=functools.partial(_note_cpu, cpu))
        finally:
            os.environ.pop(hops.ENV, None)
        got[kind] = [r for r in rows[1:] if r["completed"]]
        got[f"{kind}_cpu_per_round"] = statistics.median(b - a for a, b in zip(cpu[1:], cpu[2:], strict=False))
    got["load_after"] = os.getloadavg()[0]
    got["hops"] = hop_breakdown(trace, rounds=[r["round"] for r in got["deployed"]])
    return got


def _note_cpu(cpu: list[float], round_no: int, rounds: int, row: dict[str, Any]) -> None:
    cpu.append(tree_cpu_seconds())


def tree_cpu_seconds() -> float:
    """CPU seconds of this process and all its descendants, living and reaped (/proc, Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    used: dict[int, float] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(d.name)] = int(fields[1])  # after the name: state, ppid, ...; utime is field 14
        used[int(d.name)] = sum(int(x) for x in fields[11:15]) / tick  # utime, stime, cutime, cstime
    me = os.getpid()

    def mine(pid: int) -> bool:
        while pid > 1:
            if pid == me:
                return True
            pid = parent.get(pid, 0)
        return False

    return sum(t for pid, t in used.items() if mine(pid))


HOPS = (
    ("server push", "server push start", "server push end"),
    ("to the SuperNode (its poll)", "server push end", "receiving"),
    ("SuperNode pulls the content", "receiving", "received"),
    ("launcher forks the client", "received", "client start"),
    ("client pulls and reads the message", "client start", "client handler start"),
    ("client handler: train, encode", "client handler start", "client handler end"),
    ("client sends the reply", "client handler end", "client end"),
    ("SuperNode takes the reply", "client end", "sending"),
    ("SuperNode uploads the reply", "sending", "sent"),
    ("server pulls the reply", "sent", "server reply"),
)
"""A train message's path, as (name, from event, to event) of `fedlm.federation.hops`."""


def hop_breakdown(trace: Path, *, rounds: list[int]) -> dict[str, Any]:
    """Per hop of a train message, the median over `rounds` of the seconds on the round's last
    reply's path (the silo the round waited for); the CPU seconds per round of the silos' client
    processes together, and of the server's exchange."""
    events = [json.loads(line) for line in trace.read_text().splitlines()] if trace.exists() else []
    node_pid = {e["node"]: e["pid"] for e in events if e["who"] == "supernode" and e.get("node")}
    per_hop: dict[str, list[float]] = {name: [] for name, _, _ in HOPS}
    cpu: dict[str, list[float]] = {"client": [], "server": []}
    for rnd in rounds:
        g = str(rnd)
        push = [e for e in events if e["who"] == "server" and e["event"] == "push" and e["group"] == g
                and e["type"] == "train"]
        replies = [e for e in events if e["who"] == "server" and e["event"] == "reply" and e["group"] == g]
        if len(push) < 2 or not replies:
            continue
        last = max(replies, key=lambda e: e["t"])
        pid = node_pid.get(last["node"])
        node = [e for e in events if e["who"] == "supernode" and e["pid"] == pid and e["group"] == g]
        at = {f"server push {p['phase']}": p["t"] for p in push} | {e["event"]: e["t"] for e in node}
        at["server reply"] = last["t"]
        start, end = at.get("received", 0.0), at.get("sending", 0.0)
        child = {e["pid"] for e in events if e["who"] == "client" and e["event"] == "start"
                 and e.get("node_pid") == pid and start - 5 <= e["t"] <= end}  # the launcher's child for it
        at |= {f"client {e['event']}": e["t"] for e in events if e["who"] == "client" and e["pid"] in child}
        for name, a, b in HOPS:
            if a in at and b in at:
                per_hop[name].append(at[b] - at[a])
        kids = [e for e in events if e["who"] == "client" and e["event"] == "end" and at["server push start"] <= e["t"]
                <= last["t"]]
        cpu["client"].append(sum(e["cpu"] for e in kids))  # a forked child's CPU clock starts at 0
        server = [e["cpu"] for e in events if e["who"] == "server" and e["group"] == g]
        cpu["server"].append(max(server) - min(server))
    return {"seconds": {k: statistics.median(v) for k, v in per_hop.items() if v},
            "clients_cpu_s_per_round": statistics.median(cpu["client"]) if cpu["client"] else None,
            "server_exchange_cpu_s": statistics.median(cpu["server"]) if cpu["server"] else None}


def _summarise(rs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over a run's measured rounds."""
    return {"round_s": statistics.median(r["seconds"] for r in rs),
            "slowest_silo_train_s": statistics.median(max(s.get("train_seconds", 0.0) for s in r["silos"].values())
                                                      for r in rs),
            "overhead_share": statistics.median(r["overhead_seconds"] / r["seconds"] for r in rs),
            "overhead_s": statistics.median(r["overhead_seconds"] for r in rs),
            "bytes_up_per_silo": statistics.median(sum(s.get("bytes_up", 0.0) for s in r["silos"].values())
                                                   / len(r["silos"]) for r in rs),
            "rounds_measured": len(rs)}


def deployed(ws: Path, tmp: Path, *, rounds: int, quick: bool) -> dict[str, Any]:
    """Issue 15's figure: the deployed round's extra seconds over in process, with its hops and CPU."""
    got = _deployed_rows(ws, tmp, rounds=rounds, quick=quick)
    out: dict[str, Any] = {kind: _summarise(got[kind]) | {"cpu_s_per_round": got[f"{kind}_cpu_per_round"]}
                           for kind in ("inprocess_3", "deployed")}
    out["deployed_extra_s"] = out["deployed"]["round_s"] - out["inprocess_3"]["round_s"]
    # The same rounds' time beside the silos' training (which a changing load stretches most, and
    # which is the same work on both engines): what the deployment adds, judged with the training left out.
    out["deployed_extra_beside_training_s"] = out["deployed"]["overhead_s"] - out["inprocess_3"]["overhead_s"]
    out["deployed_extra_cpu_s"] = out["deployed"]["cpu_s_per_round"] - out["inprocess_3"]["cpu_s_per_round"]
    out["deployed_hops"] = got["hops"]
    out["load_average"] = [got["load_before"], got["load_after"]]
    return out


def run(quick: bool = False, *, only_deployed: bool = False) -> dict[str, Any]:
    """Round wall time, overhead share and SecAgg's added share; medians over rounds 2..N."""
    import torch

    threads = torch.get_num_threads()
    rounds = 3 if quick else 4
    repeats = 1
    out: dict[str, Any] = {"silos": 6, "rounds_per_run": rounds, "runs_each": repeats,
                           "preset": "tiny", "seq_len": 64 if quick else 128, "batch": 8, "local_steps": 4 if quick else 5}
    try:
        with tempfile.TemporaryDirectory(prefix="fedlm-fed-bench-") as tmp:
            ws = build_workspace(Path(tmp), limit_bytes=100_000 if quick else 300_000,
                                 vocab_size=1024 if quick else 4096)
            rows: dict[str, list[dict[str, Any]]] = {"plain": [], "secagg": []}
            for rep in range(0 if only_deployed else repeats):
                order = ("plain", "secagg") if rep % 2 == 0 else ("secagg", "plain")
                for kind in order:
                    got = _rounds(ws, Path(tmp) / f"{kind}-{rep}", rounds=rounds, secure=kind == "secagg",
                                  quick=quick)
                    rows[kind] += [r for r in got[1:] if r["completed"]]
            if not only_deployed:
                got = _rounds(ws, Path(tmp) / "demo", rounds=3 * rounds, secure=False, quick=quick, fedavg=False)
                rows["demo"] = [r for r in got[1:] if r["completed"]]
            out.update(deployed(ws, Path(tmp), rounds=rounds, quick=quick))
    finally:
        torch.set_num_threads(threads)
    if only_deployed:
        return out
    for kind, rs in rows.items():
        out[kind] = _summarise(rs)
    from fedlm.demo import FULL, QUICK

    size = QUICK if quick else FULL
    out["demo_strategy"] = f"{size.strategy}, {size.local_steps} × {size.silo_batch} sequences per silo and round"
    out["secagg_added_share"] = out["secagg"]["round_s"] / out["plain"]["round_s"] - 1
    out["targets"] = {
        "overhead_10pct": out["plain"]["overhead_share"] <= TARGET_OVERHEAD,
        "secagg_50pct": out["secagg_added_share"] <= TARGET_SECAGG,
        "deployed_5s": out["deployed_extra_s"] <= TARGET_DEPLOYED_EXTRA_S,
    }
    return out


if __name__ == "__main__":
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv, only_deployed="--deployed" in sys.argv), indent=2))
