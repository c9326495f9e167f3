"""Evaluation against hand-computed values: a uniform model scores log2(V) bits per token."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlm.config import ModelConfig
from fedlm.data.shards import open_split
from fedlm.data.tokenizer import load_tokenizer, token_byte_lengths
from fedlm.evaluate import evaluate_silo, evaluate_tokens
from fedlm.model import Transformer


class Uniform(torch.nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*idx.shape, self.vocab)


def test_uniform_model_matches_hand_computed_metrics(workspace: Path) -> None:
    silo = workspace / "silos" / "legal"
    tokens = open_split(silo, "val")
    tok = load_tokenizer(workspace / "tokenizer.json")
    nbytes = token_byte_lengths(tok)
    vocab = tok.get_vocab_size()
    got = evaluate_tokens(Uniform(vocab), tokens, nbytes, seq_len=64, batch_size=4)
    # every token but the first of each 64-token window (+1 target each) is predicted
    targets = np.asarray(tokens[1:], dtype=np.int64)
    assert got["tokens"] == len(targets)
    assert got["perplexity"] == pytest.approx(vocab, rel=1e-6)
    expected_bpb = len(targets) * math.log2(vocab) / int(nbytes[targets].sum())
    assert got["bits_per_byte"] == pytest.approx(expected_bpb, rel=1e-6)


@pytest.mark.slow
def test_bits_per_byte_matches_direct_computation(workspace: Path) -> None:
    """A real (random) model: the windowed metrics equal a direct per-token computation."""
    tok = load_tokenizer(workspace / "tokenizer.json")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(preset="tiny", vocab_size=tok.get_vocab_size(), max_seq_len=32))
    silo = workspace / "silos" / "drama"
    got = evaluate_silo(model, workspace / "tokenizer.json", silo)
    tokens = torch.from_numpy(np.asarray(open_split(silo, "val"), dtype=np.int64))
    nll = correct = nbytes = count = 0.0
    lengths = token_byte_lengths(tok)
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, 32):
            x = tokens[start : start + 32]
            y = tokens[start + 1 : start + 33]
            x = x[: len(y)]
            logp = torch.log_softmax(model(x[None])[0].double(), -1)
            nll -= float(logp[torch.arange(len(y)), y].sum())
            correct += float((logp.argmax(-1) == y).sum())
            nbytes += float(lengths[y.numpy()].sum())
            count += len(y)
    assert got["tokens"] == count
    assert math.isclose(got["perplexity"], math.exp(nll / count), rel_tol=1e-4)
    assert math.isclose(got["bits_per_byte"], nll / math.log(2) / nbytes, rel_tol=1e-4)
    assert math.isclose(got["token_accuracy"], correct / count, rel_tol=1e-9)
