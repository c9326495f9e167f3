"""Strategies: the server optimiser that turns an aggregated update into new global weights
and the per-round sample of silos.

    opt = ServerOptimizer("fedadam", lr=1e-2, beta1=0.9, beta2=0.99, tau=1e-3)
    new_global = opt.apply(global_state, aggregated_update)   # aggregated_update = mean of updates
    torch.save(opt.state_dict(), ...)                          # with the round checkpoint

Strategies (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2), with
Δ = aggregated update (mean of local − global) and η = server lr:
- fedavg, fedprox:  w ← w + η Δ   (FedProx differs only on the client: `train.local_update`'s prox_mu)
- cyclic:  w ← w + η Δ with Δ = the sum of the silos' updates made in turn (cyclic weight
  transfer, Chang et al. 2018): each silo trains from the weights the one before it left.
- fedadam:  m ← β1 m + (1 − β1) Δ;  v ← β2 v + (1 − β2) Δ²;             w ← w + η m / (√v + τ)
- fedyogi:  m ← β1 m + (1 − β1) Δ;  v ← v − (1 − β2) Δ² sign(v − Δ²);   w ← w + η m / (√v + τ)
with m₀ = 0 and v₀ = τ² (the paper's v₋₁ ≥ τ²), and no bias correction, as in the paper.
- fedsgd (`ServerAdamW`): each silo sends −(its mean-loss gradient) at the global weights, one
  batch; the server clips the token-weighted mean and takes one step of the trainer's AdamW on
  it (train.lr's schedule × η, betas, weight decay). With every silo sampled that is the
  centralised trainer's step on the silos' batches pooled (McMahan et al. 2017's FedSGD, with
  the optimiser on the server): the most sequential steps a per-silo budget buys, at one
  round per step.
(Flower's 1.42 FedYogi starts from v₀ = 0, reproduced with `initial_v=0.0`; its FedAdam also
starts from 0 and adds an Adam-style bias correction to η.)

Math in fp32 torch, one `if` per strategy; the state (m, v, step) is plain tensors so a run
resumed from a round checkpoint continues bitwise-identically.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedlm.config import TrainConfig
from fedlm.train import lr_at, make_optimizer

SERVER_OPTIMIZER_STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "cyclic")
STRATEGIES = (*SERVER_OPTIMIZER_STRATEGIES, "fedsgd")  # fedsgd: ServerAdamW


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
        if strategy not in SERVER_OPTIMIZER_STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; known: {', '.join(SERVER_OPTIMIZER_STRATEGIES)}")
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


class ServerAdamW:
    """fedsgd's server: the trainer's AdamW (`make_optimizer`, with its weight-decay rule) over the
    global arrays, applied to the aggregated negative gradient; the same `apply` / `state_dict` as
    ServerOptimizer.

    The aggregate's global norm is clipped to train.grad_clip, as the centralised trainer clips
    its batch gradient; the learning rate is `server_lr` × train.lr's schedule at the number of
    steps taken. The state is kept as `m.NAME`, `v.NAME` and `step`, for round checkpoints.
    """

    def __init__(self, tc: TrainConfig, shapes: dict[str, tuple[int, ...]], *, server_lr: float = 1.0) -> None:
        self.tc, self.server_lr = tc, server_lr
        self.params = {n: torch.nn.Parameter(torch.zeros(shape)) for n, shape in shapes.items()}
        self.optimizer = make_optimizer(torch.nn.ParameterList(self.params.values()), tc)
        self.step = 0

    def apply(self, global_state: dict[str, torch.Tensor], aggregated_update: dict[str, torch.Tensor]
              ) -> dict[str, torch.Tensor]:
        """One AdamW step from `global_state` along the aggregated update (−gradient)."""
        for name, delta in aggregated_update.items():
            if name not in self.params or delta.shape != self.params[name].shape:
                raise ValueError(f"update {name} does not fit the global model")
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(global_state[name])
                p.grad = -aggregated_update[name].to(torch.float32) if name in aggregated_update else None
        stepped = [p for p in self.params.values() if p.grad is not None]
        if self.tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(stepped, self.tc.grad_clip, foreach=True)
        for group in self.optimizer.param_groups:
            group["lr"] = self.server_lr * lr_at(self.step, self.tc)
        self.optimizer.step()
        self.step += 1
        new = dict(global_state)
        for name in aggregated_update:
            new[name] = self.params[name].detach().clone().to(global_state[name].dtype)
        self.optimizer.zero_grad(set_to_none=True)
        return new

    def state_dict(self) -> dict[str, torch.Tensor]:
        """AdamW's moments and the steps taken (`m.NAME`, `v.NAME`, `step`)."""
        out = {"step": torch.tensor(self.step, dtype=torch.int64)}
        for name, p in self.params.items():
            if state := self.optimizer.state.get(p):
                out[f"m.{name}"] = state["exp_avg"].clone()
                out[f"v.{name}"] = state["exp_avg_sq"].clone()
        return out

    def load_state_dict(self, d: dict[str, torch.Tensor]) -> None:
        """Restore what `state_dict` wrote."""
        self.step = int(d["step"])
        self.optimizer.state.clear()
        for name, p in self.params.items():
            if f"m.{name}" in d:
                self.optimizer.state[p] = {"step": torch.tensor(float(self.step)), "exp_avg": d[f"m.{name}"].clone(),
                                           "exp_avg_sq": d[f"v.{name}"].clone()}


def make_server_optimizer(strategy: str, *, tc: TrainConfig, shapes: dict[str, tuple[int, ...]], lr: float,
                          beta1: float, beta2: float, tau: float) -> ServerOptimizer | ServerAdamW:
    """The server optimiser of `strategy` over arrays of `shapes`: ServerAdamW for fedsgd,
    ServerOptimizer otherwise."""
    if strategy == "fedsgd":
        return ServerAdamW(tc, shapes, server_lr=lr)
    return ServerOptimizer(strategy, lr=lr, beta1=beta1, beta2=beta2, tau=tau)


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
