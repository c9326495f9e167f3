"""`fedlm demo`: the whole flow on the bundled corpus, with no network.

extract the corpus -> prepare each silo -> agree a tokenizer -> shard -> train -> evaluate every
model on every silo -> print the table and write OUT/summary.json -> generate a sample.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.table import Table

from fedlm.config import load_config
from fedlm.corpus import SILOS, extract
from fedlm.data.prepare import prepare_silo
from fedlm.data.shards import shard_silo
from fedlm.data.tokenizer import EOS, agree_tokenizer, load_tokenizer
from fedlm.evaluate import evaluate_silo
from fedlm.fileio import write_json
from fedlm.generate import generate
from fedlm.modelio import load_model
from fedlm.progress import console, progress_bar
from fedlm.train import train


def _presets(quick: bool) -> dict[str, Any]:
    if quick:
        return {"vocab_size": 2048, "steps": 60, "batch_size": 8, "seq_len": 128}
    return {"vocab_size": 4096, "steps": 600, "batch_size": 16, "seq_len": 128}


def prepare_workspace(out: Path, *, vocab_size: int) -> Path:
    """Extract the bundled corpus and build a sharded workspace with an agreed tokenizer."""
    ws = out / "workspace"
    raw = extract(out / "raw")
    for silo in SILOS:
        with progress_bar(f"prepare {silo}", unit="bytes") as update:
            card = prepare_silo([raw[silo]], silo=silo, workspace=ws, on_progress=update)
        console.print(f"  {silo}: {card['documents_out']} documents, {card['bytes_out']:,} bytes")
    with progress_bar("tokenizer") as update:
        agree_tokenizer(ws, vocab_size=vocab_size, epsilon=8.0, seed=0, on_progress=update)
    for silo in SILOS:
        with progress_bar(f"shard {silo}", unit="bytes") as update:
            shard_silo(ws, silo, on_progress=update)
    return ws


def _train_run(ws: Path, run_dir: Path, silos: list[str], p: dict[str, Any]) -> Path:
    cfg = load_config(None, [
        f"data.workspace={str(ws)!r}",
        f"data.silos={silos!r}".replace("'", '"'),
        f"train.steps={p['steps']}",
        f"train.batch_size={p['batch_size']}",
        f"train.seq_len={p['seq_len']}",
        f"train.checkpoint_every={p['steps']}",
    ])
    with progress_bar(f"train {run_dir.name}", unit="steps") as update:
        train(cfg, run_dir, on_step=lambda s, t, row: update(s, t, info=f"loss {row['loss']:.3f}"))
    return run_dir


def evaluate_everywhere(run_dir: Path, ws: Path) -> dict[str, float]:
    """Bits per byte of one model on every silo's validation split, plus the mean."""
    model, tok = load_model(run_dir)
    bpb = {silo: float(evaluate_silo(model, tok, ws / "silos" / silo)["bits_per_byte"]) for silo in SILOS}
    bpb["mean"] = sum(bpb.values()) / len(SILOS)
    return bpb


def run_demo(out: Path, *, quick: bool = False) -> dict[str, Any]:
    t0 = time.perf_counter()
    p = _presets(quick)
    ws = prepare_workspace(out, vocab_size=p["vocab_size"])
    runs = {"centralised": _train_run(ws, out / "runs" / "centralised", list(SILOS), p)}
    models = {name: {"run_dir": str(d), "bits_per_byte": evaluate_everywhere(d, ws)} for name, d in runs.items()}
    summary = {"models": models, "seconds": time.perf_counter() - t0, "quick": quick}
    write_json(out / "summary.json", summary)

    table = Table(title="bits per byte on each silo's validation set (lower is better)")
    table.add_column("model")
    for col in [*SILOS, "mean"]:
        table.add_column(col, justify="right")
    for name, m in models.items():
        table.add_row(name, *(f"{m['bits_per_byte'][c]:.3f}" for c in [*SILOS, "mean"]))
    console.print(table)

    model, tok_path = load_model(runs["centralised"])
    tok = load_tokenizer(tok_path)  # type: ignore[arg-type]
    prompt = "The patient"
    ids = list(generate(model, tok.encode(prompt).ids, max_new_tokens=40, temperature=0.8, top_k=50,
                        eos_id=tok.token_to_id(EOS), seed=0))
    console.print(f"[bold]sample:[/] {prompt}{tok.decode(ids)}", highlight=False)
    console.print(f"demo finished in {summary['seconds']:.0f} s -> {out / 'summary.json'}")
    return summary
