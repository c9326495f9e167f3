"""The server's side of differential privacy in the rounds loop: budgets, noise, the privacy record.

    dp = RoundPrivacy.setup(cfg, silos, run_dir, resume=resume)   # None when privacy.mode = "none"
    sampled, stopped = dp.admit(sampled)          # silos whose budget the round would overrun stop
    mean = dp.noisy_mean(updates, round_idx=r)    # client DP without secure aggregation
    dp.spend(contributors, per_silo)              # after the round: the ledger, privacy.json
    row["epsilon"] = dp.spent()

Every party is an adversary here: the server adds central noise from a fresh secret key each
round (`fedlm.privacy.randomness`), never from the config; the silos draw theirs from their
own keys (`fedlm.federation.silo_privacy`). The ledger states ε against the server and
against a peer (a silo that knows its own noise share), admits a round only if the worst
case (the fewest survivors that can complete it) stays within the target, and charges what
the round really released.

Record mode: each silo runs DP-SGD itself (`fedlm.privacy.dpsgd`, planned silo-side over all
rounds × local steps and checked before round 1 in the silo's `query` handler); it reports
its noise multiplier, sampling rate and steps with each update, and the server's ledger
(Opacus's accountant) turns them into ε per silo. Client mode: the plan is made here from the
public round schedule (`fedlm.privacy.client_dp`); the silos clip, and add their noise share
under secure aggregation, or the server adds the noise (central). Either way the ledger
refuses to let a silo take part in a round that would take it past `privacy.target_epsilon`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedlm.config import Config
from fedlm.errors import UserError
from fedlm.federation.secagg import min_survivors
from fedlm.federation.strategies import num_sampled, sample_silos
from fedlm.fileio import write_json
from fedlm.privacy.accounting import PrivacyLedger
from fedlm.privacy.client_dp import ClientPlan, clip_update, noise_like, plan_client_dp
from fedlm.privacy.randomness import party_key

log = logging.getLogger("fedlm.federation")


@dataclass
class RoundPrivacy:
    """The run's privacy state on the server: the ledger, and the client-level plan (client mode)."""

    ledger: PrivacyLedger
    """ε against a peer (client mode; record mode: against everyone): the one the target binds."""
    plan: ClientPlan | None
    path: Path
    seed: int
    local_steps: int
    insecure_noise: bool = False
    server_ledger: PrivacyLedger | None = None
    """Client mode with distributed noise: ε against the server (which sees the whole noise)."""

    @classmethod
    def setup(cls, cfg: Config, silos: list[str], run_dir: Path, *, resume: bool) -> RoundPrivacy | None:
        pc, fed = cfg.privacy, cfg.federation
        if pc.mode == "none":
            return None
        if pc.mode not in ("record", "client"):
            raise UserError(f"privacy.mode = {pc.mode!r} is not known")
        plan = None
        if pc.mode == "client":
            k = num_sampled(len(silos), fed.fraction)
            if not fed.secure_aggregation:
                log.warning("client-level DP without secure aggregation: the server adds the noise and "
                            "sees each clipped update (trusted server)")
            participations = dict.fromkeys(silos, 0)
            for r in range(fed.rounds):
                for s in sample_silos(silos, fraction=fed.fraction, round_idx=r, seed=cfg.train.seed):
                    participations[s] += 1
            plan = plan_client_dp(num_silos=len(silos), participations=participations, per_round=k,
                                  distributed=fed.secure_aggregation, privacy=pc,
                                  min_survivors=min_survivors(k, fed.min_silos) if fed.secure_aggregation else 0)
        path = run_dir / "privacy.json"
        ledger = PrivacyLedger(mode=pc.mode, target_epsilon=pc.target_epsilon, delta=pc.delta,
                               accountant=pc.accountant, clip=pc.clip)
        server = PrivacyLedger(mode="client", target_epsilon=pc.target_epsilon, delta=pc.delta,
                               accountant=pc.accountant, clip=pc.clip) if plan and plan.distributed else None
        if resume and path.exists():
            try:
                saved = json.loads(path.read_text())
                ledger = PrivacyLedger.from_json(saved)
                if server is not None:
                    server = PrivacyLedger.from_json({**saved, "silos": saved.get("against_server", {})})
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise UserError(f"{path} is corrupt ({e}); its ε cannot be trusted: start a new run") from None
        if pc.insecure_reproducible_noise:
            log.warning("privacy.insecure_reproducible_noise = true: THIS RUN HAS NO PRIVACY (bitwise tests only)")
        return cls(ledger, plan, path, cfg.train.seed, fed.local_steps, pc.insecure_reproducible_noise, server)

    # -----------------------------------------------------------------------------------
    # before a round

    def next_entry(self, silo: str) -> tuple[float, float, int] | None:
        """What one more round would spend for `silo` (None when not yet known: record mode, round 1)."""
        if self.plan is not None:
            return (self.plan.noise_multiplier, 1.0, 1)
        past = self.ledger.history.get(silo)
        if not past:
            return None
        z, q, _ = past[-1]
        return (z, q, self.local_steps)

    def admit(self, sampled: list[str]) -> tuple[list[str], dict[str, str]]:
        """The sampled silos that may take part, and {silo: why} for those whose budget is spent."""
        keep, stopped = [], {}
        for silo in sampled:
            entry = self.next_entry(silo)
            if silo in self.ledger.stopped:
                stopped[silo] = self.ledger.stopped[silo]
                continue
            if entry is not None:
                exceed, eps = self.ledger.would_exceed(silo, entry)
                if exceed:
                    why = (f"privacy budget: one more round would spend ε = {eps:.3f} > "
                           f"privacy.target_epsilon = {self.ledger.target_epsilon:g}; this silo stops contributing")
                    self.ledger.stop(silo, why)
                    log.warning("silo %s: %s", silo, why)
                    stopped[silo] = why
                    continue
            keep.append(silo)
        return keep, stopped

    def config_entries(self) -> dict[str, float]:
        """Extra numbers the silos need in the round's config (their noise share under SecAgg)."""
        return {"dp-share-std": self.plan.share_std} if self.plan is not None else {}

    def min_contributors(self) -> int:
        """The fewest updates a round may aggregate (distributed noise: what the shares are sized for)."""
        return self.plan.min_survivors if self.plan is not None and self.plan.distributed else 0

    def sum_noise_std(self, contributors: int) -> float:
        """Std per coordinate of the noise on a SecAgg round's unmasked sum (0 without client DP)."""
        return self.plan.share_std * contributors ** 0.5 if self.plan is not None and self.plan.distributed else 0.0

    def secagg_clip_range(self, default: float) -> float:
        """The quantiser's per-coordinate range: the clip plus 8 noise-share stds (client mode)."""
        if self.plan is None:
            return default
        return self.plan.clip + 8 * self.plan.share_std

    # -----------------------------------------------------------------------------------
    # the aggregate (client mode)

    def noisy_mean(self, updates: list[dict[str, torch.Tensor]], *, round_idx: int) -> dict[str, torch.Tensor]:
        """Central noise: (Σ clip(u_i) + N(0, (z·C)²)) / m for the m accepted updates (server-trusted)."""
        assert self.plan is not None
        clipped = [clip_update(u, max_norm=self.plan.clip)[0] for u in updates]
        key = party_key(insecure=self.insecure_noise, seed=self.seed, who="server", owner_dir=None)  # fresh
        total = noise_like(clipped[0], std=self.plan.sum_std, generator=key.torch_generator("central", round_idx))
        for u in clipped:
            for k in total:
                total[k] += u[k].float()
        return {k: (t / len(clipped)).to(updates[0][k].dtype) for k, t in total.items()}

    # -----------------------------------------------------------------------------------
    # after a round

    def spend(self, contributors: list[str], per_silo: dict[str, dict[str, float]]) -> None:
        """Charge each contributor for the round's release, then rewrite RUN/privacy.json."""
        if self.plan is not None and self.plan.distributed and len(contributors) < self.plan.min_survivors:
            raise ValueError(f"a distributed-noise round of {len(contributors)} silos was applied, fewer than "
                             f"the {self.plan.min_survivors} its noise shares are sized for")
        for silo in contributors:
            if self.plan is not None:
                self.ledger.spend(silo, (self.plan.against_peer(len(contributors)), 1.0, 1))
                z_server = self.plan.against_server(len(contributors))
                if self.server_ledger is not None and z_server is not None:
                    self.server_ledger.spend(silo, (z_server, 1.0, 1))
            else:
                m = per_silo.get(silo, {})
                z, q, n = m.get("dp_noise_multiplier"), m.get("dp_sample_rate"), m.get("dp_steps")
                if z is None or q is None or n is None or not all(map(math.isfinite, (z, q, n))):
                    raise UserError(f"silo {silo!r} sent an update without its DP-SGD parameters; "
                                    "its ε cannot be accounted (is it running another fedlm version?)")
                self.ledger.spend(silo, (z, q, int(n)))
        self.write()

    def spent(self) -> dict[str, float]:
        return self.ledger.spent()

    def write(self) -> None:
        """RUN/privacy.json: the ledger (ε against a peer), and ε against the server beside it."""
        extra: dict[str, Any]
        if self.plan is not None:
            against_server: Any = ("not protected: the trusted server adds the noise and sees each clipped update"
                                   if self.server_ledger is None else self.server_ledger.to_json()["silos"])
            d = self.plan.dishonest
            others = "one other silo" if d == 1 else f"{d} other silos"
            extra = {"noise_multiplier": self.plan.noise_multiplier, "sampling": "fixed public schedule "
                     "(federation.fraction, seeded): no amplification claimed",
                     "silos_per_round": self.plan.per_round,
                     "noise": "distributed (each silo adds a secret share, under secure aggregation)"
                     if self.plan.distributed else "central (added by the trusted server, from a fresh secret key)",
                     "planned_epsilon": self.plan.planned_epsilon,
                     "planned_rounds_per_silo": self.plan.max_participations,
                     "min_survivors": self.plan.min_survivors,
                     "dishonest_silos": d,
                     "epsilon_is_against": "a peer (a silo that knows its own noise share)"
                     + (f", with the shares of {others} left out" if d else ""),
                     "against_server": against_server}
        else:
            extra = {"sampling": "poisson (records = training windows, per silo)",
                     "noise": "DP-SGD inside each silo, from its own secret key",
                     "epsilon_is_against": "everyone: the server and every peer see only DP-SGD's output"}
        if self.insecure_noise:
            extra["insecure_reproducible_noise"] = "ON: the noise is derived from the config; no privacy"
        write_json(self.path, self.ledger.to_json(**extra))
