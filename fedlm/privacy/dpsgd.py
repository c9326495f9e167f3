"""Record-level DP-SGD for a silo's local training: Poisson sampling of records, Opacus's
per-sample clipping and Gaussian noise, and the plan that ties the noise to the budget.

    plan = plan_record_dp(num_records=n, batch_size=8, steps=rounds * local_steps, privacy=cfg.privacy)
    records = PoissonRecords([train_tokens], seq_len=128, sample_rate=plan.sample_rate, generator=g)
    g = secret_generator(key, run_id, round_idx)       # the silo's own secret stream
    with DPSGD(model, optimizer, plan=plan, generator=g) as dp:
        loss = dp.step(*records.next(), lr=3e-3, precision="fp32")
    # after the `with`, `model` is the plain model again (hooks gone, same state_dict names)

What a record is. A record is one training window: the split's tokens cut into
non-overlapping windows of `seq_len` targets (window i predicts tokens i·T+1 … i·T+T from
tokens i·T … i·T+T−1), N = (tokens − 1) // T windows. This is the unit each step samples, clips
and noises, so it is the unit the (ε, δ) guarantee protects. Why not the document: the
bundled silos hold tens of long documents (up to 20 kB each), so document-level sampling
would leave a handful of records, a sampling rate near 1 and no amplification; windows give
hundreds to millions of records. A document of L tokens spans about L / T records, so its
guarantee follows by group privacy (k records: roughly k·ε, and a canary repeated r times
in different places is r records).

Sampling is real Poisson sampling: each step includes every window independently with
probability q (`privacy.sample_rate`, or train.batch_size / N), so the batch size varies
(it may be 0: the step is then noise only) and the accountant's sampling rate is exactly q.
The gradient is averaged over the expected batch size q·N, as Opacus does.

Per-sample gradients come from Opacus's `GradSampleModule`: its hooks for Linear and
Embedding (the tied embedding/head accumulates both uses per sample) and functorch for the
RMSNorm weights it has no hook for. `DPOptimizer` clips each record's gradient to
`privacy.clip`, adds N(0, (z·clip)²) to the sum and divides by the expected batch size; the
wrapped AdamW then steps. train.grad_clip is not applied (the noisy gradient is already
bounded; clipping it again would be post-processing and is skipped for clarity).

Sampling and noise are secret. `generator` must come from the silo's own key
(`fedlm.privacy.randomness`: its whole state from a CSPRNG, never from the config); each step
draws a fresh noise generator's full state from it, and Opacus adds the noise in secure mode
(the sum of four Gaussians, against floating-point attacks on the noise's low bits).
`secret_generator` names the stream of one round or step.
What the guarantee does not cover: the training loss a silo logs or reports (one number per
round), which is outside the DP-SGD release.
"""

from __future__ import annotations

import json
import secrets
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedlm.config import PrivacyConfig
from fedlm.device import autocast, module_device
from fedlm.errors import UserError
from fedlm.privacy.accounting import (
    max_record_steps,
    record_epsilon,
    record_noise_multiplier,
)
from fedlm.privacy.randomness import NoiseKey, child_generator, reseed


def num_records(num_tokens: int, seq_len: int) -> int:
    """Windows of `seq_len` targets in a split of `num_tokens` tokens (the records)."""
    return max(0, (int(num_tokens) - 1) // seq_len)


@dataclass(frozen=True)
class RecordPlan:
    """The parameters of one silo's DP-SGD over the whole run (what RUN/privacy.json records)."""

    num_records: int
    sample_rate: float
    steps: int
    noise_multiplier: float
    clip: float
    delta: float
    target_epsilon: float
    accountant: str
    planned_epsilon: float

    @property
    def expected_batch_size(self) -> int:
        return max(1, round(self.sample_rate * self.num_records))

    def epsilon_after(self, steps: int) -> float:
        return record_epsilon(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate,
                              steps=steps, delta=self.delta, accountant=self.accountant)  # type: ignore[arg-type]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_record_dp(*, num_records: int, batch_size: int, steps: int, privacy: PrivacyConfig,
                   where: str = "this silo") -> RecordPlan:
    """Check the budget against the data and derive the noise multiplier; UserError if it cannot fit."""
    n = num_records
    if n < 1:
        raise UserError(f"{where}: no complete training window (record) to sample; lower train.seq_len")
    if privacy.delta >= 1 / n:
        raise UserError(f"{where}: privacy.delta = {privacy.delta:g} must be < 1/N = {1 / n:.3g} "
                        f"for N = {n} records (a larger δ allows publishing a record outright); lower it")
    q = privacy.sample_rate or batch_size / n
    if q > 1:
        raise UserError(f"{where}: train.batch_size = {batch_size} exceeds the {n} records; "
                        "lower train.batch_size or train.seq_len, or add data")
    if round(q * n) < 1:
        raise UserError(f"{where}: privacy.sample_rate = {q:g} × {n} records rounds to an expected batch "
                        f"of 0; raise it to at least {1 / n:.3g}")
    acc = privacy.accountant
    if privacy.noise_multiplier > 0:
        z = privacy.noise_multiplier
        eps = record_epsilon(noise_multiplier=z, sample_rate=q, steps=steps, delta=privacy.delta, accountant=acc)
        if eps > privacy.target_epsilon:
            fit = max_record_steps(target_epsilon=privacy.target_epsilon, noise_multiplier=z,
                                   sample_rate=q, delta=privacy.delta, accountant=acc)
            raise UserError(
                f"{where}: {steps} DP-SGD steps at noise multiplier {z:g} and sampling rate {q:.4g} spend "
                f"ε = {eps:.3g} > privacy.target_epsilon = {privacy.target_epsilon:g} (δ = {privacy.delta:g}); "
                f"at most {fit} steps fit: lower the steps/rounds, raise privacy.noise_multiplier or the target"
            )
    else:
        z = record_noise_multiplier(target_epsilon=privacy.target_epsilon, delta=privacy.delta,
                                    sample_rate=q, steps=steps, accountant=acc)
        eps = record_epsilon(noise_multiplier=z, sample_rate=q, steps=steps, delta=privacy.delta, accountant=acc)
    return RecordPlan(num_records=n, sample_rate=q, steps=steps, noise_multiplier=z, clip=privacy.clip,
                      delta=privacy.delta, target_epsilon=privacy.target_epsilon, accountant=acc,
                      planned_epsilon=eps)


class PoissonRecords:
    """Poisson-sampled batches of records (windows) from one or more token splits (pooled)."""

    def __init__(self, splits: list[np.ndarray], *, seq_len: int, sample_rate: float,
                 generator: torch.Generator, masks: list[np.ndarray | None] | None = None) -> None:
        self.splits, self.seq_len, self.sample_rate, self.generator = splits, seq_len, sample_rate, generator
        self.masks = masks or [None] * len(splits)  # per split: a chat silo's loss mask (1: trained)
        self.counts = [num_records(len(s), seq_len) for s in splits]
        self.starts = np.cumsum([0, *self.counts])  # record r of the pool is split k, window r - starts[k]
        self.num_records = int(self.starts[-1])

    def window(self, r: int) -> np.ndarray:
        """Record r as seq_len + 1 token ids (inputs and shifted targets)."""
        k = int(np.searchsorted(self.starts, r, side="right") - 1)
        i = (r - int(self.starts[k])) * self.seq_len
        return np.asarray(self.splits[k][i : i + self.seq_len + 1], dtype=np.int64)

    def trained(self, r: int) -> np.ndarray:
        """Record r's loss mask over its seq_len + 1 tokens (all True outside chat silos)."""
        k = int(np.searchsorted(self.starts, r, side="right") - 1)
        mask = self.masks[k]
        if mask is None:
            return np.ones(self.seq_len + 1, dtype=bool)
        i = (r - int(self.starts[k])) * self.seq_len
        return np.asarray(mask[i : i + self.seq_len + 1]) == 1

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y of shape (b, T): each record included independently with probability q (b may be 0)."""
        picked = torch.rand(self.num_records, generator=self.generator) < self.sample_rate
        rows = picked.nonzero().flatten().tolist()
        if not rows:
            empty = torch.zeros((0, self.seq_len), dtype=torch.int64)
            return empty, empty
        chunk = torch.from_numpy(np.stack([self.window(r) for r in rows]))  # (b, T + 1)
        y = chunk[:, 1:].contiguous()
        if any(m is not None for m in self.masks):  # targets outside the answers are not trained
            trained = torch.from_numpy(np.stack([self.trained(r) for r in rows]))[:, 1:]
            y = torch.where(trained, y, torch.full_like(y, -100))
        return chunk[:, :-1].contiguous(), y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next()


class DPSGD:
    """Opacus around `model` and its optimizer for the duration of a `with` block.

    Inside, `step` runs one DP-SGD step; on exit the hooks are removed and the per-sample
    buffers freed, so `model` is the plain model (state_dict names unchanged) and generates.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, plan: RecordPlan,
                 generator: torch.Generator) -> None:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        self.model, self.generator = model, generator
        self.gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        self.device = module_device(model)  # the records, per-sample gradients and noise go there
        self.noise = torch.Generator(device=self.device)
        self.optimizer = DPOptimizer(optimizer, noise_multiplier=plan.noise_multiplier,
                                     max_grad_norm=plan.clip, expected_batch_size=plan.expected_batch_size,
                                     loss_reduction="mean", generator=self.noise, secure_mode=True)
        self.params = [p for p in model.parameters() if p.requires_grad]
        # Opacus's hooks fire on module outputs (token ids need no grad): expected, not a problem
        warnings.filterwarnings("ignore", message="Full backward hook is firing")

    def __enter__(self) -> DPSGD:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove Opacus's hooks and per-sample state from the model."""
        self.gsm._close()
        for p in self.model.parameters():
            for attr in ("grad_sample", "summed_grad", "_forward_counter"):
                if hasattr(p, attr):
                    delattr(p, attr)

    def step(self, x: torch.Tensor, y: torch.Tensor, *, lr: float, precision: str = "fp32") -> float:
        """One DP-SGD step on the sampled records x, y (b, T); returns their mean loss (nan if b = 0)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        child_generator(self.generator, self.noise)  # a whole fresh state: no 32-bit seed in between
        loss = float("nan")
        if len(x) == 0:  # an empty Poisson batch: the step is noise only
            for p in self.params:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)  # type: ignore[attr-defined]
        else:
            x, y = x.to(self.device), y.to(self.device)
            with autocast(self.device, precision):
                logits = self.gsm(x)  # (b, T, V)
            # mean over each record's tokens, then over records: Opacus scales by b per sample
            out = record_mean_loss(logits, y)
            out.backward()
            loss = float(out.detach())
        self.optimizer.step()
        return loss


def record_mean_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over records of each record's mean cross-entropy over its trained targets (y != -100).

    Each record is normalised by its own count, never by the batch's: a record's gradient must
    not depend on which other records were sampled, or clipping would not bound its influence.
    A record with no trained target contributes zero."""
    logits = logits.float()
    trained = y != -100
    if bool(trained.all()):  # no loss mask: the plain mean (same numbers as before masks existed)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())
    ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)  # (b, T), 0 at -100
    return (ce.sum(1) / trained.sum(1).clamp(min=1)).mean()


def dp_train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, records: PoissonRecords, *,
                   plan: RecordPlan, lrs: list[float], precision: str = "fp32") -> list[float]:
    """Run len(lrs) DP-SGD steps (step i at lr lrs[i]); the model is plain again afterwards.

    Returns each step's mean loss over its sampled records (nan for an empty batch).
    """
    losses = []
    with DPSGD(model, optimizer, plan=plan, generator=records.generator) as dp:
        for lr in lrs:
            losses.append(dp.step(*records.next(), lr=lr, precision=precision))
    return losses


def secret_generator(key: NoiseKey, *labels: object) -> torch.Generator:
    """The DP-SGD stream (Poisson sampling, then each step's noise state) named by `labels`."""
    return key.torch_generator("dpsgd", *labels)


def restart_stream(gen: torch.Generator, key: NoiseKey, *labels: object) -> None:
    """Set `gen` (shared by PoissonRecords and DPSGD) to the stream `labels` names, in place."""
    reseed(gen, key.words(624, "dpsgd", *labels))


def stream_name(run_dir: Path, *, resume: bool) -> str:
    """A centralised DP-SGD run's public stream name (random; privacy.json keeps it for --resume)."""
    if resume:
        try:
            return str(json.loads((run_dir / "privacy.json").read_text())["noise_stream"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # stopped before its first checkpoint: the steps to come were never released
    return secrets.token_hex(16)


def privacy_record(plan: RecordPlan, *, steps_done: int, silos: list[str], seq_len: int,
                   stream: str = "") -> dict[str, Any]:
    """RUN/privacy.json for a (centralised or local-only) DP-SGD run after `steps_done` steps."""
    eps = plan.epsilon_after(steps_done)
    return {
        "mode": "record", "record": f"a window of {seq_len} tokens ({plan.num_records} in the data)",
        "target_epsilon": plan.target_epsilon, "delta": plan.delta, "epsilon": eps,
        "noise_multiplier": plan.noise_multiplier, "clip": plan.clip, "sample_rate": plan.sample_rate,
        "sampling": "poisson", "steps": steps_done, "planned_steps": plan.steps,
        "planned_epsilon": plan.planned_epsilon, "accountant": plan.accountant, "accountant_library": "opacus",
        "silos": {s: {"epsilon": eps, "steps": steps_done} for s in silos},
        "noise": "secret: drawn from the data holder's own key (WS/.secrets), never from the config",
        "noise_stream": stream,
    }
