"""Bundled run presets (TOML files holding only what they change) and the SmolLM2 LoRA demo.

    cfg = load_config(preset_path("smollm2-lora"), overrides=['data.workspace="WS"'])
    summary = run_smollm2_lora(Path("out"), quick=True)    # workspace, shards, train, eval

`run_smollm2_lora` fine-tunes SmolLM2-135M federatedly with LoRA (r = 8, int8-compressed
adapter updates) on silos of the bundled corpus: it prepares the silos, installs SmolLM2's
tokenizer as the workspace's and shards with it, scores the pretrained model's validation
bits per byte on every silo, runs the preset, scores the fine-tuned (merged) model the same
way, and writes OUT/summary.json with both, the bytes each silo sent per round and their
share of a full fp32 update of the model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedlm.config import load_config
from fedlm.corpus import extract
from fedlm.data.prepare import prepare_silo
from fedlm.data.shards import open_split, shard_silo
from fedlm.data.tokenizer import load_tokenizer, token_byte_lengths, tokenizer_hash
from fedlm.errors import UserError
from fedlm.evaluate import evaluate_tokens
from fedlm.federation.runner import RoundCallback, run_federated
from fedlm.fileio import write_json
from fedlm.lora import num_trainable
from fedlm.model import Transformer, num_params
from fedlm.pretrained import SMOLLM2, load_model, load_pretrained, write_model_tokenizer

PRESETS = Path(__file__).parent

SMOLLM2_SILOS = ("legal", "medical", "technical", "literature", "drama")
"""The English silos of the bundled corpus (SmolLM2 is an English model)."""
QUICK_SILOS = ("legal", "technical", "drama")
QUICK_SETS = ["federation.rounds=3", "federation.local_steps=3", "train.batch_size=2"]
"""The --quick budget: 3 silos x 3 rounds x 3 steps of 2 x 128 tokens (minutes on 2 CPU cores)."""
EVAL_SEQ_LEN = 128
"""Context of the bits-per-byte evaluation (the training length; the same for both models)."""


def preset_path(name: str) -> Path:
    """The bundled preset `name` (e.g. "smollm2-lora"); UserError listing them if unknown."""
    path = PRESETS / f"{name.removesuffix('.toml')}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESETS.glob("*.toml")))
        raise UserError(f"no preset {name!r}; bundled presets: {known}")
    return path


def prepare_smollm2_workspace(ws: Path, silos: Sequence[str], *, raw: Path) -> Path:
    """Prepare `silos` of the bundled corpus in `ws` (if not yet), with SmolLM2's tokenizer and shards."""
    missing = [s for s in silos if not (ws / "silos" / s / "docs.jsonl").is_file()]
    if missing:
        folders = extract(raw, missing)
        for silo in missing:
            prepare_silo([folders[silo]], silo=silo, workspace=ws)
    tok_path = write_model_tokenizer(ws, SMOLLM2)
    sha = tokenizer_hash(tok_path)
    for silo in silos:
        meta = ws / "silos" / silo / "meta.json"
        if not meta.is_file() or json.loads(meta.read_text()).get("tokenizer_sha256") != sha:
            shard_silo(ws, silo)  # the default engine falls back to tokenizers for its vocabulary
    return ws


def val_bits_per_byte(model: Transformer, ws: Path, silos: Sequence[str], *, max_tokens: int) -> dict[str, float]:
    """Bits per byte on the first `max_tokens` validation tokens of each silo, and their mean."""
    tok_path = ws / "tokenizer.json"
    token_bytes = token_byte_lengths(load_tokenizer(tok_path))
    sha = tokenizer_hash(tok_path)
    out = {}
    for silo in silos:
        tokens = open_split(ws / "silos" / silo, "val", expect_tokenizer_sha256=sha)[: max_tokens + 1]
        out[silo] = float(evaluate_tokens(model, tokens, token_bytes, seq_len=EVAL_SEQ_LEN,
                                          batch_size=8)["bits_per_byte"])
    out["mean"] = float(np.mean([out[s] for s in silos]))
    return out


def run_smollm2_lora(out: Path, *, quick: bool = False, workspace: Path | None = None,
                     silos: Sequence[str] | None = None, overrides: Sequence[str] = (),
                     eval_tokens: int | None = None, on_round: RoundCallback | None = None) -> dict[str, Any]:
    """Fine-tune SmolLM2 with the smollm2-lora preset on the bundled silos; OUT/summary.json."""
    out = Path(out)
    silos = list(silos or (QUICK_SILOS if quick else SMOLLM2_SILOS))
    ws = prepare_smollm2_workspace(Path(workspace or out / "workspace"), silos, raw=out / "raw")
    eval_tokens = eval_tokens or (2048 if quick else 16384)
    sets = [f"data.workspace={json.dumps(str(ws))}", f"data.silos={json.dumps(silos)}",
            *(QUICK_SETS if quick else []), *overrides]
    cfg = load_config(preset_path("smollm2-lora"), sets)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like the federated silos: one thread each on a shared machine
    try:
        t0 = time.perf_counter()
        base, _ = load_pretrained(cfg.train.init_from, share_frozen=True)
        before = val_bits_per_byte(base, ws, silos, max_tokens=eval_tokens)
        t_eval = time.perf_counter() - t0
        run_dir = out / "federated"
        t0 = time.perf_counter()
        fed_summary = run_federated(cfg, run_dir, on_round=on_round)
        t_train = time.perf_counter() - t0
        tuned, _ = load_model(run_dir)
        after = val_bits_per_byte(tuned, ws, silos, max_tokens=eval_tokens)
    finally:
        torch.set_num_threads(threads)
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    bytes_up = [s["bytes_up"] for r in rounds for s in r["silos"].values()]
    full_fp32 = 4 * num_params(tuned)
    lora_model, _ = load_pretrained(cfg.train.init_from, share_frozen=True)
    from fedlm.lora import apply_lora  # counting the adapters of the preset's shape

    apply_lora(lora_model, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=0.0, targets=cfg.lora.targets)
    summary = {
        "model": cfg.train.init_from, "silos": silos, "quick": quick,
        "rounds": cfg.federation.rounds, "local_steps": cfg.federation.local_steps,
        "batch_size": cfg.train.batch_size, "seq_len": cfg.train.seq_len,
        "lora_rank": cfg.lora.rank, "compression": cfg.federation.compression,
        "params_total": num_params(tuned), "params_trainable": num_trainable(lora_model),
        "bits_per_byte_pretrained": before, "bits_per_byte_finetuned": after,
        "eval_tokens_per_silo": eval_tokens,
        "bytes_up_per_silo_round": float(np.mean(bytes_up)),
        "full_fp32_update_bytes": full_fp32,
        "bytes_up_share_of_full_fp32": float(np.mean(bytes_up)) / full_fp32,
        "seconds_train": t_train, "seconds_eval_pretrained": t_eval,
        "loss": fed_summary["loss"],
    }
    write_json(out / "summary.json", summary)
    return summary
