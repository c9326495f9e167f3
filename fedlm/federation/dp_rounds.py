"""The server's side of differential privacy in the rounds loop: budgets, noise, the privacy record.

    dp = RoundPrivacy.setup(cfg, silos, run_dir, resume=resume)   # None when privacy.mode = "none"
    sampled, stopped = dp.admit(sampled)          # silos whose budget the round would overrun stop
    mean = dp.noisy_mean(updates, round_idx=r)    # client DP without secure aggregation
    dp.spend(contributors, per_silo)              # after the round: the ledger, privacy.json
    row["epsilon"] = dp.spent()

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
from fedlm.federation.strategies import num_sampled, sample_silos
from fedlm.fileio import write_json
from fedlm.privacy.accounting import PrivacyLedger
from fedlm.privacy.client_dp import ClientPlan, clip_update, noise_like, noise_seed, plan_client_dp

log = logging.getLogger("fedlm.federation")


@dataclass
class RoundPrivacy:
    """The run's privacy state on the server: the ledger, and the client-level plan (client mode)."""

    ledger: PrivacyLedger
    plan: ClientPlan | None
    path: Path
    seed: int
    local_steps: int

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
                                  distributed=fed.secure_aggregation, privacy=pc)
        path = run_dir / "privacy.json"
        ledger = PrivacyLedger(mode=pc.mode, target_epsilon=pc.target_epsilon, delta=pc.delta,
                               accountant=pc.accountant, clip=pc.clip)
        if resume and path.exists():
            try:
                ledger = PrivacyLedger.from_json(json.loads(path.read_text()))
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise UserError(f"{path} is corrupt ({e}); its ε cannot be trusted: start a new run") from None
        return cls(ledger, plan, path, cfg.train.seed, fed.local_steps)

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
        gen = torch.Generator().manual_seed(noise_seed(self.seed, round_idx, "server"))
        total = noise_like(clipped[0], std=self.plan.sum_std, generator=gen)
        for u in clipped:
            for k in total:
                total[k] += u[k].float()
        return {k: (t / len(clipped)).to(updates[0][k].dtype) for k, t in total.items()}

    # -----------------------------------------------------------------------------------
    # after a round

    def spend(self, contributors: list[str], per_silo: dict[str, dict[str, float]]) -> None:
        """Charge each contributor for the round's release, then rewrite RUN/privacy.json."""
        for silo in contributors:
            if self.plan is not None:
                z_eff = self.plan.effective_noise_multiplier(len(contributors))
                self.ledger.spend(silo, (z_eff, 1.0, 1))
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
        extra: dict[str, Any] = {}
        if self.plan is not None:
            extra = {"noise_multiplier": self.plan.noise_multiplier, "sampling": "fixed public schedule "
                     "(federation.fraction, seeded): no amplification claimed",
                     "silos_per_round": self.plan.per_round,
                     "noise": "distributed (each silo adds a share, under secure aggregation)"
                     if self.plan.distributed else "central (added by the trusted server)",
                     "planned_epsilon": self.plan.planned_epsilon,
                     "planned_rounds_per_silo": self.plan.max_participations}
        else:
            extra = {"sampling": "poisson (records = training windows, per silo)",
                     "noise": "DP-SGD inside each silo"}
        write_json(self.path, self.ledger.to_json(**extra))
