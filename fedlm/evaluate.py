"""Evaluation: perplexity, bits per byte, next-token accuracy over a silo's whole validation split.

Bits per byte divides the summed negative log-likelihood (in bits) by the UTF-8 bytes of the
predicted tokens, so models with different tokenizers compare on the same text.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedlm.data.shards import iter_eval_windows, open_split
from fedlm.data.tokenizer import load_tokenizer, token_byte_lengths, tokenizer_hash
from fedlm.device import module_device
from fedlm.errors import UserError
from fedlm.model import Transformer

MAX_EVAL_CONTEXT = 1024
"""Longest window `evaluate_silo` scores: a pretrained model's whole context (SmolLM2: 8192
tokens) would make each window's (T, V) logits gigabytes, and a silo's text is scored the same."""
MAX_LOGITS = 2**27
"""Logits a batch of windows may hold (512 MiB in fp32): fewer windows a batch for large vocabularies."""


@torch.no_grad()
def evaluate_tokens(
    model: torch.nn.Module,
    tokens: np.ndarray,
    token_bytes: np.ndarray,
    *,
    seq_len: int,
    batch_size: int = 8,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, float | int]:
    """Score every token of `tokens` (after the first of each window) with `model`."""
    was_training = model.training
    model.eval()
    device = module_device(model)  # the windows go where the model is; the sums come back as numbers
    byte_len = torch.from_numpy(token_bytes.astype(np.int64)).to(device)
    nll = 0.0
    correct = 0
    count = 0
    n_bytes = 0
    done = 0
    for x, y in iter_eval_windows(tokens, seq_len=seq_len, batch_size=batch_size):
        x, y = x.to(device), y.to(device)
        logits = model(x).float()  # (B, T, V)
        mask = y >= 0  # windows shorter than seq_len are padded with -1 targets
        target = y.clamp(min=0)
        loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view_as(y)
        nll += float(loss[mask].sum())
        correct += int((logits.argmax(-1) == y)[mask].sum())
        count += int(mask.sum())
        n_bytes += int(byte_len[target][mask].sum())
        done += x.numel()
        if on_progress is not None:
            on_progress(min(done, len(tokens)), len(tokens))
    model.train(was_training)
    if count == 0:
        raise UserError("nothing to evaluate: the validation split has fewer than 2 tokens")
    return {
        "perplexity": math.exp(nll / count),
        "bits_per_byte": nll / math.log(2) / max(n_bytes, 1),
        "token_accuracy": correct / count,
        "tokens": count,
    }


def check_silo_dir(silo_dir: Path) -> None:
    """UserError unless `silo_dir` is a silo, WS/silos/NAME, saying what the path is instead."""
    silo_dir = Path(silo_dir)
    guess = silo_dir.parent / "silos" / silo_dir.name
    hint = f"did you mean {guess}?" if guess.is_dir() else "give a silo, WS/silos/NAME"
    if not silo_dir.is_dir():
        raise UserError(f"{silo_dir}: no such directory, so not a silo; {hint}")
    if silo_dir.parent.name == "silos" and ((silo_dir / "meta.json").is_file() or (silo_dir / "docs.jsonl").is_file()):
        return  # a silo (open_split says so if it is not sharded yet)
    if (silo_dir / "silos").is_dir():
        names = sorted(p.name for p in (silo_dir / "silos").iterdir() if p.is_dir())
        raise UserError(f"{silo_dir}: a workspace, not a silo; give one of its silos, "
                        f"{silo_dir / 'silos' / (names[0] if names else 'NAME')} (silos: {', '.join(names) or 'none'})")
    raise UserError(f"{silo_dir}: not a silo (a silo is WS/silos/NAME, with meta.json once sharded); {hint}")


def evaluate_silo(
    model: Transformer,
    model_tokenizer: Path | None,
    silo_dir: Path,
    *,
    split: str = "val",
    batch_size: int = 8,
    max_tokens: int = 0,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, float | int]:
    """Evaluate on a silo's shards; the model's tokenizer must be the one the shards were made with.

    `max_tokens` > 0 scores only the split's first max_tokens targets (the same prefix for every
    model, so comparisons stay fair).
    """
    check_silo_dir(silo_dir)
    tok_path = silo_dir.parent.parent / "tokenizer.json"
    if model_tokenizer is not None and tokenizer_hash(model_tokenizer) != tokenizer_hash(tok_path):
        raise UserError(
            f"{silo_dir}: its shards use {tok_path}, not the model's tokenizer ({model_tokenizer}); "
            "evaluate on a workspace sharded with the model's tokenizer"
        )
    tokens = open_split(silo_dir, split, expect_tokenizer_sha256=tokenizer_hash(tok_path))  # type: ignore[arg-type]
    if max_tokens > 0:
        tokens = tokens[: max_tokens + 1]
    token_bytes = token_byte_lengths(load_tokenizer(tok_path))
    seq_len = min(int(model.cfg.max_seq_len), MAX_EVAL_CONTEXT)
    rows = max(1, min(batch_size, MAX_LOGITS // (seq_len * int(model.cfg.vocab_size))))
    return evaluate_tokens(model, tokens, token_bytes, seq_len=seq_len, batch_size=rows,
                           on_progress=on_progress)
