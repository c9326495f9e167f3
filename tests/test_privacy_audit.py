"""Audits: ROC against scipy and a hand count, canaries land in training text, and a model that
memorised a canary has high exposure while one that never saw it does not."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import mannwhitneyu

from fedlm.config import ModelConfig
from fedlm.model import Transformer
from fedlm.privacy.audit import (
    canary_exposure,
    plant_canaries,
    roc_auc,
    tpr_at_fpr,
)


def test_auc_matches_mann_whitney_with_ties() -> None:
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 20, 300).astype(float), rng.integers(0, 18, 250).astype(float)
    u = mannwhitneyu(pos, neg, alternative="two-sided").statistic
    assert roc_auc(pos, neg) == pytest.approx(u / (300 * 250), rel=1e-12)


def test_tpr_at_low_fpr_hand_case() -> None:
    # 100 non-members 0..99; members: 3 above every non-member, 1 equal to the top one, rest low
    neg = np.arange(100, dtype=float)
    pos = np.array([150.0, 120.0, 101.0, 99.0] + [10.0] * 6)
    assert tpr_at_fpr(pos, neg, 0.01) == pytest.approx(0.4)  # t = 99: FPR 1/100, TPR 4/10
    assert tpr_at_fpr(pos, neg, 0.0) == pytest.approx(0.3)
    assert roc_auc(np.array([1.0, 2.0]), np.array([0.0, 0.5])) == 1.0


def test_planted_canaries_are_in_the_train_split(tmp_path: Path) -> None:
    from fedlm.data.shards import open_split, shard_silo
    from fedlm.data.tokenizer import agree_tokenizer, load_tokenizer

    d = tmp_path / "ws" / "silos" / "a"
    d.mkdir(parents=True)
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "court", "order"]
    with open(d / "docs.jsonl", "w") as f:
        for i in range(40):
            text = "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(6))
            f.write(json.dumps({"text": f"doc {i}\n{text}"}) + "\n")
    canaries = plant_canaries(d, repeats=[1, 10], seed=3, val_fraction=0.2)
    agree_tokenizer(tmp_path / "ws", vocab_size=300, epsilon=None)
    shard_silo(tmp_path / "ws", "a", val_fraction=0.2, seed=0)
    tok = load_tokenizer(tmp_path / "ws" / "tokenizer.json")
    train = tok.decode(open_split(d, "train").astype(np.int64).tolist(), skip_special_tokens=False)
    val = tok.decode(open_split(d, "val").astype(np.int64).tolist(), skip_special_tokens=False)
    for c in canaries:
        assert train.count(c["text"]) == c["repeats"] and c["text"] not in val
    assert json.loads((d / "canaries.json").read_text()) == canaries


class _Tok:
    """A character tokenizer with the `encode(...).ids` interface (id 0 is EOS)."""

    class _E:
        def __init__(self, ids: list[int]) -> None:
            self.ids = ids

    def encode(self, text: str, add_special_tokens: bool = False) -> _Tok._E:
        return self._E([1 + "0123456789 aceMrsydt".index(ch) if ch in "0123456789 aceMrsydt" else 22 for ch in text])


def test_memorised_canary_has_high_exposure_unseen_does_not() -> None:
    """Train a tiny model on one canary until it is memorised: exposure near log2|R| vs ~1 before."""
    torch.manual_seed(0)
    tok = _Tok()
    model = Transformer(ModelConfig(preset="custom", d_model=32, n_layers=1, n_heads=2, d_ff=64,
                                    vocab_size=24, max_seq_len=40))
    canary = {"prefix": "My secret access code is", "secret": "281265017", "repeats": 10, "digits": 9,
              "text": "My secret access code is 281265017"}
    before = canary_exposure(model, tok, [canary], candidates=500)[0]  # type: ignore[arg-type]
    ids = torch.tensor([0, *tok.encode(canary["text"]).ids])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(ids[None, :-1])[0], ids[1:]).backward()
        opt.step()
    after = canary_exposure(model, tok, [canary], candidates=500)[0]  # type: ignore[arg-type]
    assert before["exposure"] < 4 and before["rank"] > 10
    assert after["rank"] == 1 and after["exposure"] > 20 and after["exposure_rank"] == pytest.approx(np.log2(501))


@pytest.mark.slow
def test_audit_cli_json(workspace: Path, tmp_path: Path) -> None:
    """`fedlm audit MODEL --workspace WS --json` on a small trained model: AUC in [0, 1] per silo."""
    from fedlm.config import load_config
    from fedlm.train import train

    cfg = load_config(None, [f'data.workspace="{workspace}"', "data.silos=technical", "model.max_seq_len=32",
                             "train.seq_len=32", "train.batch_size=4", "train.steps=2", "train.threads=1",
                             "train.eval_batches=1"])
    train(cfg, tmp_path / "run")
    out = subprocess.run([sys.executable, "-m", "fedlm.cli", "audit", str(tmp_path / "run"), "--workspace",
                          str(workspace), "--silo", "technical", "--seq-len", "16", "--json",
                          "--reference", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout)["silos"]["technical"]["membership"]
    assert 0 <= m["loss"]["auc"] <= 1 and m["members"] == m["nonmembers"] >= 2
    assert m["calibrated"]["auc"] == pytest.approx(0.5)  # the same model as reference: no signal
