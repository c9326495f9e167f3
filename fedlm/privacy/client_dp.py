"""Client-level DP for federated rounds: clip each silo's update, add Gaussian noise to the sum.

    plan = plan_client_dp(num_silos=3, participations={"a": 10, ...}, per_round=3,
                          distributed=True, privacy=cfg.privacy)
    clipped, norm = clip_update(update, max_norm=plan.clip)                    # on the silo
    share = noise_like(clipped, std=plan.share_std, generator=g)   # distributed noise, g secret to the silo
    mean = {k: (sum_k + noise_k) / n for ...}                                   # on the server

The guarantee (McMahan et al. 2018, "Learning Differentially Private Recurrent Language
Models"): neighbouring runs differ in one silo's whole data. Each round releases
S = Σ_i clip(Δ_i) + N(0, (z·C)² I) over the silos that take part, so one silo moves S by at
most C: a Gaussian mechanism with noise multiplier z per round, composed over the rounds
the silo takes part in (`fedlm.privacy.accounting.client_epsilon`). The mean divides by the
number of contributors (public), which is post-processing; so are the server optimiser and
every later round.

Who adds the noise, and ε against whom:
- `federation.secure_aggregation = true` (distributed noise): each sampled silo adds a share
  N(0, (z·C)²/(m_min − 1)) to its clipped update before masking, where m_min is the fewest
  survivors that can complete a round (`min_survivors`: the SecAgg threshold, and never
  fewer than 3). Every party then faces at least N(0, (z·C)²) on what it can learn: the
  server sees the sum of m >= m_min shares, and a peer, who knows its own share and update
  and can take them off the next global model, still faces the other m − 1 >= m_min − 1.
  With `privacy.dishonest_silos = d`, the shares are N(0, (z·C)²/(m_min − 1 − d)), so the
  honest others' shares carry the planned noise even when d silos leave theirs out (or collude
  with whoever reads the sum), and the ledger charges what the honest shares alone give.
  So the planned z bounds ε against a peer (the binding case) and, with more noise, against
  the server; a dropout cannot lower either below plan, because a round with fewer than
  m_min survivors is never applied. The ledger charges each round with the noise really
  present against each party (`against_server`, `against_peer`). Assumption: at most d silos
  leave out their shares (d = 0 by default: every silo follows the protocol).
  The masked values are clipped coordinate-wise to ±(C + 8·share std) by the quantiser: with
  probability < 1e-14 per coordinate a noise value is cut there.
- `federation.secure_aggregation = false` (central noise): silos send clipped updates and
  the server adds N(0, (z·C)²) once, from a fresh secret key each round. The guarantee then
  holds against the peers and everyone who sees the global model, but not against the server
  itself (it is trusted, as in Flower's server-side DP wrappers).

Not covered: the per-silo metrics each silo reports in clear without secure aggregation
(under it, loss and seconds travel only as a secure sum).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from fedlm.config import PrivacyConfig
from fedlm.errors import UserError
from fedlm.privacy.accounting import client_epsilon, client_noise_multiplier, max_client_rounds

Update = dict[str, torch.Tensor]


def clip_update(update: Update, *, max_norm: float) -> tuple[Update, float]:
    """Scale `update` so its global L2 norm is at most `max_norm`; returns (clipped, norm before)."""
    norm = math.sqrt(sum(float(torch.sum(t.detach().double() ** 2)) for t in update.values()))
    scale = min(1.0, max_norm / (norm + 1e-12)) if math.isfinite(norm) else 0.0
    # the scale is rounded down a hair so float32 rounding can never push the norm past the bound
    scale *= 1 - 1e-6 if scale < 1 else 1
    return {k: (t.float() * scale).to(t.dtype) for k, t in update.items()}, norm


def noise_like(update: Update, *, std: float, generator: torch.Generator) -> Update:
    """Independent N(0, std²) per coordinate, shaped like `update` (fp32)."""
    return {k: torch.randn(t.shape, generator=generator, dtype=torch.float32) * std for k, t in update.items()}


@dataclass(frozen=True)
class ClientPlan:
    """Client-level DP parameters of a run (what RUN/privacy.json records)."""

    noise_multiplier: float
    clip: float
    delta: float
    target_epsilon: float
    per_round: int
    """Silos sampled per round (k)."""
    distributed: bool
    min_survivors: int
    """Distributed: the fewest survivors that complete a round (m_min); shares are sized for m_min − 1 − d."""
    max_participations: int
    planned_epsilon: float
    dishonest: int = 0
    """Distributed: silos (d) that may leave out their shares; the others' shares carry the noise alone."""

    @property
    def sum_std(self) -> float:
        """Std of the noise on the sum of the round's clipped updates."""
        return self.noise_multiplier * self.clip

    @property
    def share_std(self) -> float:
        """Std of one silo's noise share (distributed noise): m_min − 1 − d shares carry N(0, (z·C)²)."""
        return self.sum_std / math.sqrt(max(1, self.min_survivors - 1 - self.dishonest))

    def against_server(self, contributors: int) -> float | None:
        """The noise multiplier the server faces in a round of `contributors`, whose d dishonest silos
        may have left out their shares (None: central noise, from the trusted server)."""
        if not self.distributed:
            return None
        return self.share_std * math.sqrt(max(0, contributors - self.dishonest)) / self.clip

    def against_peer(self, contributors: int) -> float:
        """The noise multiplier a peer faces, knowing its own share, with the d dishonest silos' shares
        left out too (central: the whole noise)."""
        if not self.distributed:
            return self.noise_multiplier
        return self.share_std * math.sqrt(max(0, contributors - 1 - self.dishonest)) / self.clip

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_client_dp(*, num_silos: int, participations: dict[str, int], per_round: int, distributed: bool,
                   privacy: PrivacyConfig, min_survivors: int = 0) -> ClientPlan:
    """Derive (or check) the noise multiplier for the rounds each silo takes part in; UserError if it cannot fit."""
    if privacy.delta >= 1 / num_silos:
        raise UserError(f"privacy.delta = {privacy.delta:g} must be < 1/N = {1 / num_silos:.3g} for N = "
                        f"{num_silos} silos (client-level DP protects whole silos); lower it")
    if distributed and min_survivors < 2:
        raise ValueError("distributed noise needs min_survivors >= 2 (the fewest survivors of a round)")
    dishonest = privacy.dishonest_silos if distributed else 0
    if distributed and min_survivors - 1 - dishonest < 1:
        raise UserError(f"privacy.dishonest_silos = {dishonest}: a round may end with {min_survivors} survivors, so a "
                        f"silo's update could be left with no honest noise share beside its own; lower it, or sample "
                        f"more silos a round (federation.fraction, federation.min_silos)")
    most = max(participations.values(), default=0)
    if most == 0:
        raise UserError("privacy.mode = 'client': no silo takes part in any round")
    if privacy.noise_multiplier > 0:
        z = privacy.noise_multiplier
        eps = client_epsilon([z] * most, delta=privacy.delta)
        if eps > privacy.target_epsilon:
            fit = max_client_rounds(target_epsilon=privacy.target_epsilon, noise_multiplier=z, delta=privacy.delta)
            raise UserError(
                f"client-level DP: {most} rounds at noise multiplier {z:g} spend ε = {eps:.3g} > "
                f"privacy.target_epsilon = {privacy.target_epsilon:g} (δ = {privacy.delta:g}); at most {fit} "
                "rounds per silo fit: lower federation.rounds, raise privacy.noise_multiplier or the target"
            )
    else:
        z = client_noise_multiplier(target_epsilon=privacy.target_epsilon, delta=privacy.delta, rounds=most)
        eps = client_epsilon([z] * most, delta=privacy.delta)
    return ClientPlan(noise_multiplier=z, clip=privacy.clip, delta=privacy.delta,
                      target_epsilon=privacy.target_epsilon, per_round=per_round, distributed=distributed,
                      min_survivors=min_survivors, max_participations=most, planned_epsilon=eps,
                      dishonest=dishonest)
