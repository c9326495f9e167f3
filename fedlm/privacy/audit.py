"""Privacy audits of a trained model: canary exposure and membership inference.

    plant_canaries(WS / "silos" / "legal", repeats=[1, 10])      # before `fedlm data shard`
    report = audit(model, WS, silo="legal", reference=ref_model)  # exposure + MIA, a JSON-able dict

Canary exposure (Carlini, Liu, Erlingsson, Kos & Song 2019, "The Secret Sharer"). A canary is
"<prefix> <secret>" with the secret drawn uniformly from a space R (9 random digits:
|R| = 10⁹). `plant_canaries` inserts each canary into `repeats` different training documents
of a silo's docs.jsonl (choosing documents whose new text still falls in the train split) and
records them in WS/silos/NAME/canaries.json. The audit scores the canary and C candidate
secrets from R by the model's log-perplexity (total NLL of the text after an EOS); the
exposure is log2|R| − log2 rank. Two estimates: `exposure_rank` = log2(C+1) − log2(rank among
the C+1) (exact, capped at log2(C+1)), and `exposure` by the paper's extrapolation (§4.3):
fit a normal distribution to the candidates' log-perplexities and take −log2 P(X ≤ x_canary),
the expected fraction of R that beats the canary. A model that never saw the canary gives
exposure near 1 (rank ~ |R|/2); a memorised canary approaches log2|R| ≈ 29.9.

Membership inference. Members are training windows of the silo (from train.bin), non-members
windows of its held-out documents (val.bin), as many of each. The loss attack (Yeom et al.
2018) scores −loss; the calibrated attack (Carlini et al. 2022, "Membership Inference
Attacks From First Principles", the LiRA idea in its simplest form; Watson et al. 2022)
scores loss_reference − loss_target, with a reference model that was not trained on the
silo. Reported: ROC AUC (0.5 = chance) and the TPR at 1% FPR (the low-FPR regime that
matters).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import tokenizers
import torch
import torch.nn.functional as F

from fedlm.data.shards import open_split, read_meta, split_hash
from fedlm.data.tokenizer import eos_id, load_tokenizer
from fedlm.errors import UserError
from fedlm.fileio import atomic_path, write_json

CANARY_PREFIX = "My secret access code is"
CANARIES_FILE = "canaries.json"


# ---------------------------------------------------------------------------------------
# ROC: AUC and TPR at a fixed FPR, by hand (numpy)


def roc_auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """P(score_member > score_nonmember) + ½ P(equal): the area under the ROC curve."""
    pos, neg = np.asarray(members, dtype=np.float64), np.asarray(nonmembers, dtype=np.float64)
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    scores = np.concatenate([pos, neg])
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(scores.size, dtype=np.float64)
    ranks[order] = np.arange(1, scores.size + 1)
    for value in np.unique(scores):  # average ranks over ties
        tie = scores == value
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2
    return float(u / (pos.size * neg.size))


def roc_curve(members: np.ndarray, nonmembers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every threshold "score >= t", from the highest t down, starting at (0, 0)."""
    pos, neg = np.asarray(members, dtype=np.float64), np.asarray(nonmembers, dtype=np.float64)
    thresholds = np.unique(np.concatenate([pos, neg]))[::-1]
    tpr = np.array([0.0] + [(pos >= t).mean() for t in thresholds])
    fpr = np.array([0.0] + [(neg >= t).mean() for t in thresholds])
    return fpr, tpr


def tpr_at_fpr(members: np.ndarray, nonmembers: np.ndarray, fpr: float = 0.01) -> float:
    """The highest TPR over thresholds whose FPR is at most `fpr`."""
    f, t = roc_curve(members, nonmembers)
    return float(t[f <= fpr].max())


# ---------------------------------------------------------------------------------------
# canaries


def random_secret(rng: random.Random, digits: int = 9) -> str:
    return "".join(rng.choice("0123456789") for _ in range(digits))


def canary_text(secret: str, prefix: str = CANARY_PREFIX) -> str:
    return f"{prefix} {secret}"


def plant_canaries(silo_dir: Path, *, repeats: Sequence[int] = (1, 10), per_repeat: int = 1, seed: int = 0,
                   digits: int = 9, val_fraction: float = 0.1, split_seed: int = 0) -> list[dict[str, Any]]:
    """Insert canaries into a silo's docs.jsonl (before sharding); record them in canaries.json.

    For each count r in `repeats`, `per_repeat` canaries each go into r different documents,
    at a random line break, choosing documents whose new text lands in the train split of
    `fedlm data shard` with `val_fraction` and `split_seed`. Rewrites docs.jsonl atomically.
    """
    silo_dir = Path(silo_dir)
    docs_path = silo_dir / "docs.jsonl"
    if not docs_path.is_file():
        raise UserError(f"no {docs_path}: prepare the silo before planting canaries")
    rows = [json.loads(line) for line in docs_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rng = random.Random(seed)
    need = max(repeats, default=0)
    train_idx = [i for i, r in enumerate(rows) if split_hash(r["text"], split_seed) >= val_fraction]
    if len(train_idx) < need:
        raise UserError(f"{docs_path}: {len(train_idx)} training documents, fewer than the {need} repeats asked")
    canaries = []
    for r in repeats:
        for _ in range(per_repeat):
            secret = random_secret(rng, digits)
            line = canary_text(secret) + "."
            hosts = rng.sample(train_idx, len(train_idx))
            placed = 0
            for i in hosts:
                if placed == r:
                    break
                text = rows[i]["text"]
                cuts = [j + 1 for j, ch in enumerate(text) if ch == "\n"] or [len(text)]
                for _ in range(8):  # a few positions: one whose text stays in train
                    at = rng.choice(cuts)
                    new = text[:at] + ("" if at == 0 or text[at - 1] == "\n" else "\n") + line + "\n" + text[at:]
                    if split_hash(new, split_seed) >= val_fraction:
                        rows[i] = {**rows[i], "text": new}
                        placed += 1
                        break
            if placed < r:
                raise UserError(f"{docs_path}: could place canary {placed} of {r} times; use fewer repeats")
            canaries.append({"prefix": CANARY_PREFIX, "secret": secret, "text": canary_text(secret),
                             "repeats": r, "digits": digits})
    with atomic_path(docs_path) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    old = json.loads((silo_dir / CANARIES_FILE).read_text()) if (silo_dir / CANARIES_FILE).exists() else []
    write_json(silo_dir / CANARIES_FILE, old + canaries)
    return canaries


@torch.no_grad()
def sequence_nll(model: torch.nn.Module, seqs: list[list[int]], *, eos: int = 0,
                 batch_size: int = 256) -> np.ndarray:
    """Total NLL (nats) of each token sequence given a leading end-of-text token (`eos`, as a document
    starts in the shards): its log-perplexity."""
    model.eval()
    out = np.zeros(len(seqs))
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        width = max(len(s) for s in chunk)
        x = torch.full((len(chunk), width), eos, dtype=torch.int64)
        y = torch.full((len(chunk), width), -100, dtype=torch.int64)
        for i, s in enumerate(chunk):
            ids = torch.tensor(s, dtype=torch.int64)
            x[i, 1 : len(s)] = ids[:-1]
            y[i, : len(s)] = ids
        logits = model(x).float()  # (b, T, V)
        nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="none")
        out[start : start + len(chunk)] = nll.view(len(chunk), width).sum(1).double().numpy()
    return out


def canary_exposure(model: torch.nn.Module, tokenizer: tokenizers.Tokenizer, canaries: list[dict[str, Any]], *,
                    candidates: int = 5000, seed: int = 0, eos: int = 0) -> list[dict[str, Any]]:
    """Exposure of each canary against `candidates` random secrets of the same format, each scored
    after the tokenizer's end-of-text id `eos`, as a document starts in the shards.

    Canaries of the same format (prefix, digits) are ranked against one shared pool of
    candidates, scored once: the candidates are independent of the canaries, so sharing
    them changes no canary's rank distribution and saves a forward pass over the pool per
    canary. No planted secret is a candidate.
    """
    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False).ids)

    rng = random.Random(seed)
    planted = {c["secret"] for c in canaries}
    pools: dict[tuple[str, int], np.ndarray] = {}
    out = []
    for c in canaries:
        digits = int(c["digits"])
        key = (str(c["prefix"]), digits)
        if key not in pools:
            pool = {random_secret(rng, digits) for _ in range(candidates)} - planted
            pools[key] = sequence_nll(model, [encode(canary_text(s, c["prefix"])) for s in sorted(pool)], eos=eos)
        cand = pools[key]
        x = float(sequence_nll(model, [encode(c["text"])], eos=eos)[0])
        rank = 1 + int((cand < x).sum())
        mu, sd = float(cand.mean()), float(cand.std()) or 1e-12
        p = NormalDist(mu, sd).cdf(x)
        space_bits = digits * math.log2(10)
        exposure = min(space_bits, -math.log2(max(p, 2.0**-space_bits)))
        out.append({"secret": c["secret"], "repeats": c["repeats"], "log_perplexity": x, "rank": rank,
                    "candidates": len(cand), "exposure_rank": math.log2(len(cand) + 1) - math.log2(rank),
                    "exposure": exposure, "max_exposure": space_bits})
    return out


# ---------------------------------------------------------------------------------------
# membership inference


@torch.no_grad()
def window_losses(model: torch.nn.Module, tokens: np.ndarray, windows: np.ndarray, *, seq_len: int,
                  batch_size: int = 64) -> np.ndarray:
    """Mean NLL of each non-overlapping window i (targets i·T+1 … i·T+T) of a token split."""
    model.eval()
    out = []
    for start in range(0, len(windows), batch_size):
        rows = windows[start : start + batch_size]
        idx = rows[:, None] * seq_len + np.arange(seq_len + 1)
        chunk = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
        logits = model(chunk[:, :-1]).float()
        nll = F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="none")
        out.append(nll.view(len(rows), seq_len).mean(1).double().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def membership_inference(model: torch.nn.Module, silo_dir: Path, *, seq_len: int, reference: torch.nn.Module | None = None,
                         max_samples: int = 500, seed: int = 0) -> dict[str, Any]:
    """Loss and reference-calibrated attacks: train windows (members) vs held-out windows."""
    train, val = open_split(silo_dir, "train"), open_split(silo_dir, "val")
    n_train, n_val = (len(train) - 1) // seq_len, (len(val) - 1) // seq_len
    n = min(n_train, n_val, max_samples)
    if n < 2:
        raise UserError(f"{silo_dir}: {n_val} held-out windows of {seq_len} tokens; membership inference needs "
                        "more validation data (shard with a larger val_fraction) or a smaller --seq-len")
    rng = np.random.default_rng(seed)
    mem = np.sort(rng.choice(n_train, n, replace=False))
    non = np.sort(rng.choice(n_val, n, replace=False))
    lm, ln = window_losses(model, train, mem, seq_len=seq_len), window_losses(model, val, non, seq_len=seq_len)
    result: dict[str, Any] = {"members": n, "nonmembers": n, "seq_len": seq_len,
                              "loss": {"auc": roc_auc(-lm, -ln), "tpr_at_1pct_fpr": tpr_at_fpr(-lm, -ln)}}
    if reference is not None:
        rm = window_losses(reference, train, mem, seq_len=seq_len)
        rn = window_losses(reference, val, non, seq_len=seq_len)
        result["calibrated"] = {"auc": roc_auc(rm - lm, rn - ln), "tpr_at_1pct_fpr": tpr_at_fpr(rm - lm, rn - ln)}
    return result


# ---------------------------------------------------------------------------------------
# the whole audit


def audit(model: torch.nn.Module, workspace: Path, *, silos: Sequence[str], reference: torch.nn.Module | None = None,
          candidates: int = 5000, seq_len: int = 64, max_samples: int = 500) -> dict[str, Any]:
    """Exposure of every planted canary and membership inference, for each silo named."""
    workspace = Path(workspace)
    tokenizer = load_tokenizer(workspace / "tokenizer.json")
    report: dict[str, Any] = {"silos": {}}
    for silo in silos:
        d = workspace / "silos" / silo
        read_meta(d)
        entry: dict[str, Any] = {}
        if (d / CANARIES_FILE).exists():
            entry["canaries"] = canary_exposure(model, tokenizer, json.loads((d / CANARIES_FILE).read_text()),
                                                candidates=candidates, eos=eos_id(tokenizer))
        entry["membership"] = membership_inference(model, d, seq_len=seq_len, reference=reference,
                                                   max_samples=max_samples)
        report["silos"][silo] = entry
    return report
