"""Privacy–utility table: no DP vs record-level ε ∈ {8, 3, 1} vs client-level ε ∈ {8, 3}.

    .venv/bin/python -m bench.privacy_bench [--quick]     # prints the table, writes bench-privacy.json
    rows = run(quick=True)["rows"]                         # for bench/run.py

On the bundled corpus (three silos, trimmed as in tests/conftest.py): canaries are planted in
one silo ("legal": one secret once, one secret 10 times) before sharding, then each
configuration trains the same tiny model federated (3 silos, FedAvg) and is measured on:
validation bits/byte (pooled over the silos' val splits), exposure of each canary, membership
inference AUC on the canary silo (loss attack, and calibrated by a reference model trained
on the other two silos only), and training time relative to no DP (same batch size).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

SILOS = ("legal", "technical", "drama")
CANARY_SILO = "legal"


def build_workspace(root: Path, *, limit_bytes: int, vocab_size: int = 512, val_fraction: float = 0.2) -> Path:
    """Trimmed bundled silos with canaries planted in CANARY_SILO, a tokenizer and shards."""
    from fedlm.corpus import extract
    from fedlm.data.shards import shard_silo
    from fedlm.data.tokenizer import agree_tokenizer
    from fedlm.privacy.audit import plant_canaries

    raw = extract(root / "raw", SILOS)
    ws = root / "ws"
    for silo in SILOS:
        d = ws / "silos" / silo
        d.mkdir(parents=True)
        docs, size = [], 0
        for path in sorted(raw[silo].rglob("*")):
            if path.suffix not in (".txt", ".rst") or not path.is_file():
                continue
            text = path.read_text(encoding="utf-8", errors="replace")[:8_000]
            docs.append(text)
            size += len(text.encode())
            if size >= limit_bytes:
                break
        with open(d / "docs.jsonl", "w", encoding="utf-8") as f:
            for text in docs:
                f.write(json.dumps({"text": text, "source": silo}) + "\n")
    plant_canaries(ws / "silos" / CANARY_SILO, repeats=[1, 10], seed=7, val_fraction=val_fraction)
    agree_tokenizer(ws, vocab_size=vocab_size, epsilon=None)
    for silo in SILOS:
        shard_silo(ws, silo, val_fraction=val_fraction, seed=0)
    return ws


def _bits_per_byte(model: Any, tok_path: Path, ws: Path) -> float:
    """Validation bits/byte, the mean over the silos."""
    from fedlm.evaluate import evaluate_silo

    values = [float(evaluate_silo(model, tok_path, ws / "silos" / s, split="val")["bits_per_byte"]) for s in SILOS]
    return sum(values) / len(values)


def run(quick: bool = True) -> dict[str, Any]:
    """Train each configuration and measure it; returns {"rows": [...], "settings": {...}}."""
    from fedlm.config import load_config
    from fedlm.federation.runner import run_federated
    from fedlm.modelio import load_model
    from fedlm.privacy.audit import audit
    from fedlm.train import train

    torch.set_num_threads(1)
    rounds, local_steps = (4, 10) if quick else (10, 20)
    settings = {"rounds": rounds, "local_steps": local_steps, "batch_size": 16, "seq_len": 64,
                "delta": 1e-5, "limit_bytes": 60_000 if quick else 150_000, "model": "tiny", "vocab": 512}
    configs: list[tuple[str, list[str]]] = [("no DP", ["privacy.mode=none"])]
    for eps in (8, 3, 1):
        configs.append((f"record ε={eps}", ["privacy.mode=record", f"privacy.target_epsilon={eps}"]))
    for eps in (8, 3):
        configs.append((f"client ε={eps}", ["privacy.mode=client", f"privacy.target_epsilon={eps}",
                                            "privacy.delta=0.1"]))
    root = Path(tempfile.mkdtemp(prefix="fedlm-privacy-bench-"))
    try:
        ws = build_workspace(root, limit_bytes=int(settings["limit_bytes"]))
        base = [f"data.workspace={ws}", "train.mode=federated", f"federation.rounds={rounds}",
                f"federation.local_steps={local_steps}", "train.batch_size=16", "train.seq_len=64",
                "model.max_seq_len=64", "train.warmup_steps=5", f"privacy.delta={settings['delta']}"]
        ref_cfg = load_config(overrides=[*base[:1], "train.mode=centralised", "data.silos=technical,drama",
                                         "train.batch_size=16", "train.seq_len=64", "model.max_seq_len=64",
                                         f"train.steps={rounds * local_steps}", "train.warmup_steps=5"])
        train(ref_cfg, root / "reference")
        reference, _ = load_model(root / "reference")
        rows = []
        for name, extra in configs:
            cfg = load_config(overrides=base + extra)
            out = root / name.replace(" ", "_").replace("=", "")
            t0 = time.perf_counter()
            run_federated(cfg, out)
            seconds = time.perf_counter() - t0
            model, tok = load_model(out)
            assert tok is not None
            report = audit(model, ws, silos=[CANARY_SILO], reference=reference,
                           candidates=2000 if quick else 10000, seq_len=64)["silos"][CANARY_SILO]
            eps = json.loads((out / "privacy.json").read_text())["silos"] if (out / "privacy.json").exists() else {}
            exp = {c["repeats"]: c["exposure"] for c in report["canaries"]}
            rows.append({
                "config": name, "bits_per_byte": _bits_per_byte(model, tok, ws),
                "epsilon": max((v["epsilon"] for v in eps.values()), default=None),
                "exposure_1x": exp.get(1), "exposure_10x": exp.get(10),
                "mia_auc": report["membership"]["loss"]["auc"],
                "mia_tpr_at_1pct": report["membership"]["loss"]["tpr_at_1pct_fpr"],
                "mia_calibrated_auc": report["membership"]["calibrated"]["auc"],
                "seconds": seconds,
            })
        base_s = rows[0]["seconds"]
        base_bpb = rows[0]["bits_per_byte"]
        for row in rows:
            row["slowdown"] = row["seconds"] / base_s
            row["bpb_ratio"] = row["bits_per_byte"] / base_bpb
        return {"rows": rows, "settings": settings}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def table(result: dict[str, Any]) -> str:
    head = f"{'config':<14}{'ε':>7}{'bits/byte':>11}{'×':>6}{'exp 1×':>8}{'exp 10×':>9}{'MIA AUC':>9}" \
           f"{'TPR@1%':>8}{'cal AUC':>9}{'slowdown':>10}"
    lines = [head]
    for r in result["rows"]:
        eps = f"{r['epsilon']:.2f}" if r["epsilon"] is not None else "∞"
        lines.append(f"{r['config']:<14}{eps:>7}{r['bits_per_byte']:>11.3f}{r['bpb_ratio']:>6.2f}"
                     f"{r['exposure_1x']:>8.2f}{r['exposure_10x']:>9.2f}{r['mia_auc']:>9.3f}"
                     f"{r['mia_tpr_at_1pct']:>8.3f}{r['mia_calibrated_auc']:>9.3f}{r['slowdown']:>10.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    result = run(quick="--quick" in sys.argv)
    print(table(result))
    Path("bench-privacy.json").write_text(json.dumps(result, indent=2))
