"""Strategies: the server optimiser that turns an aggregated update into new global weights,
FedProx's proximal term, and the per-round sample of silos.

    opt = ServerOptimizer("fedadam", lr=1e-2, beta1=0.9, beta2=0.99, tau=1e-3)
    new_global = opt.apply(global_state, aggregated_update)   # aggregated_update = mean of updates
    torch.save(opt.state_dict(), ...)                          # with the round checkpoint

Strategies (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2), with
Δ = aggregated update (mean of local − global) and η = server lr:
- fedavg, fedprox:  w ← w + η Δ   (FedProx differs only on the client: `prox_penalty`)
- cyclic:  w ← w + η Δ with Δ = the sum of the silos' updates made in turn (cyclic weight
  transfer, Chang et al. 2018): each silo trains from the weights the one before it left.
- fedadam:  m ← β1 m + (1 − β1) Δ;  v ← β2 v + (1 − β2) Δ²;             w ← w + η m / (√v + τ)
- fedyogi:  m ← β1 m + (1 − β1) Δ;  v ← v − (1 − β2) Δ² sign(v − Δ²);   w ← w + η m / (√v + τ)
with m₀ = 0 and v₀ = τ² (the paper's v₋₁ ≥ τ²), and no bias correction, as in the paper.
(Flower's 1.42 FedYogi starts from v₀ = 0, reproduced with `initial_v=0.0`; its FedAdam also
starts from 0 and adds an Adam-style bias correction to η.)

Math in fp32 torch, one `if` per strategy; the state (m, v, step) is plain tensors so a run
resumed from a round checkpoint continues bitwise-identically.
"""

from __future__ import annotations

import math

import numpy as np
import torch

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "cyclic")


class ServerOptimizer:
    """Holds the server's optimiser state and applies each round's aggregated update."""

    def __init__(
        self,
        strategy: str,
        *,
        lr: float,
        beta1: float,
        beta2: float,
        tau: float,
        initial_v: float | None = None,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
        if lr <= 0 or tau <= 0 or not 0 <= beta1 < 1 or not 0 <= beta2 < 1:
            raise ValueError("server optimiser needs lr > 0, tau > 0 and betas in [0, 1)")
        self.strategy = strategy
        self.lr, self.beta1, self.beta2, self.tau = lr, beta1, beta2, tau
        self.initial_v = tau * tau if initial_v is None else initial_v
        self.step = 0
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}
        self.carry: dict[str, torch.Tensor] = {}  # cyclic: the AdamW state passed from silo to silo

    def apply(
        self, global_state: dict[str, torch.Tensor], aggregated_update: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Return new global weights; arrays the update does not name are kept unchanged."""
        for name, delta in aggregated_update.items():
            if name not in global_state:
                raise ValueError(f"update names {name}, which the global model does not have")
            if delta.shape != global_state[name].shape:
                raise ValueError(
                    f"update {name} has shape {tuple(delta.shape)}, global {tuple(global_state[name].shape)}"
                )
        new = dict(global_state)
        for name, delta in aggregated_update.items():
            w = global_state[name]
            d = delta.to(torch.float32)
            if self.strategy in ("fedavg", "fedprox", "cyclic"):
                step = self.lr * d
            else:
                m = self.m.get(name)
                v = self.v.get(name)
                if m is None or v is None:
                    m = torch.zeros_like(d)
                    v = torch.full_like(d, self.initial_v)
                m = self.beta1 * m + (1 - self.beta1) * d
                d2 = d * d
                if self.strategy == "fedadam":
                    v = self.beta2 * v + (1 - self.beta2) * d2
                else:  # fedyogi
                    v = v - (1 - self.beta2) * d2 * torch.sign(v - d2)
                self.m[name], self.v[name] = m, v
                step = self.lr * m / (torch.sqrt(v) + self.tau)
            new[name] = (w.to(torch.float32) + step).to(w.dtype)
        self.step += 1
        return new

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The optimiser state as tensors (`m.NAME`, `v.NAME`, `c.KEY`, `step`), for round checkpoints."""
        out = {"step": torch.tensor(self.step, dtype=torch.int64)}
        for name, t in self.m.items():
            out[f"m.{name}"] = t.clone()
        for name, t in self.v.items():
            out[f"v.{name}"] = t.clone()
        for name, t in self.carry.items():
            out[f"c.{name}"] = t.clone()
        return out

    def load_state_dict(self, d: dict[str, torch.Tensor]) -> None:
        """Restore the state saved by `state_dict`."""
        self.step = int(d["step"])
        self.m = {k[2:]: t.clone() for k, t in d.items() if k.startswith("m.")}
        self.v = {k[2:]: t.clone() for k, t in d.items() if k.startswith("v.")}
        self.carry = {k[2:]: t.clone() for k, t in d.items() if k.startswith("c.")}


def prox_penalty(
    params: dict[str, torch.Tensor], global_params: dict[str, torch.Tensor], *, mu: float
) -> torch.Tensor:
    """FedProx's proximal term (mu / 2) * ||w − w_global||², added to the local loss.

    `params` are the live (trainable) parameters, `global_params` the round's starting
    weights (detached); the gradient mu * (w − w_global) pulls each silo back toward the
    global model, which limits client drift with many local steps (Li et al. 2020).
    """
    total = torch.zeros((), dtype=torch.float32)
    for name, p in params.items():
        g = global_params[name].detach().to(p.dtype)
        total = total + torch.sum((p - g).float() ** 2)
    return 0.5 * mu * total


def num_sampled(num_silos: int, fraction: float) -> int:
    """How many of `num_silos` a round samples: ceil(fraction * n), at least 1."""
    # The epsilon keeps float noise (0.1 * 30 = 3.0000000000000004) from adding a silo.
    return max(1, min(num_silos, math.ceil(fraction * num_silos - 1e-9)))


def sample_silos(silos: list[str], *, fraction: float, round_idx: int, seed: int) -> list[str]:
    """The silos taking part in round `round_idx`: deterministic in (seed, round_idx), >= 1.

    Returned in the order of `silos`. fraction = 1 takes every silo without drawing.
    """
    if not silos:
        raise ValueError("sample_silos needs at least one silo")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    k = num_sampled(len(silos), fraction)
    if k == len(silos):
        return list(silos)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, round_idx])))
    picked = rng.choice(len(silos), size=k, replace=False)
    return [silos[i] for i in sorted(picked.tolist())]


def cyclic_order(silos: list[str], *, round_idx: int, seed: int) -> list[str]:
    """The order in which a cyclic round's silos train: a permutation drawn from (seed, round).

    Drawn afresh each round so that no silo is always the last one (whose data the new
    global model has seen most recently).
    """
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, round_idx, 1])))  # 1: not the sample's stream
    return [silos[i] for i in rng.permutation(len(silos))]
