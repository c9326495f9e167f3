"""Privacy accountants for fedlm's two kinds of DP, and the per-silo budget ledger.

    z = record_noise_multiplier(target_epsilon=8, delta=1e-5, sample_rate=0.01, steps=500, accountant="rdp")
    eps = record_epsilon(noise_multiplier=z, sample_rate=0.01, steps=500, delta=1e-5, accountant="rdp")
    eps = client_epsilon([z] * rounds, delta=1e-5)          # client-level: one Gaussian release per round

Record level (DP-SGD, `fedlm.privacy.dpsgd`): each step is the Poisson-subsampled Gaussian
mechanism (sampling rate q, noise multiplier z); the steps of every round compose. Both the
noise calibration and ε come from Opacus's accountants (RDP: Mironov et al. 2019; PRV: Gopi
et al. 2021), so `record_epsilon` is what Opacus itself would report for the same history.

Client level (`fedlm.privacy.client_dp`): each round a silo that takes part contributes one
clipped update to a sum released with N(0, (z·clip)²) noise: a Gaussian mechanism with
sensitivity `clip` (add/remove one silo). The silos of a round are drawn from a public seed
(`federation.fraction`), so no amplification by sampling is claimed; a silo spends only in
the rounds it takes part in. ε comes from dp-accounting's RDP accountant (the library Flower's
`flwr[dp]` accountant uses), one `GaussianDpEvent` per round, with the noise the party in
question really faces that round (`ClientPlan.against_peer`, `against_server`).

`PrivacyLedger` holds each silo's history; the federation checks `would_exceed` before a
round and stops a silo whose budget the round would overrun, and writes `to_json()` to
RUN/privacy.json.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

Accountant = Literal["rdp", "prv"]

# Budgets are met to this relative slack: Opacus's own search stops within 1% of the target
# from below, so a reported ε never exceeds the target by more than float noise.
_EPS_SLACK = 1e-9


def record_epsilon(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                   accountant: Accountant = "rdp") -> float:
    """ε after `steps` Poisson-sampled Gaussian steps (Opacus's accountant); 0 for no steps."""
    return record_epsilon_history([(noise_multiplier, sample_rate, steps)], delta=delta,
                                  accountant=accountant)


def record_epsilon_history(history: list[tuple[float, float, int]], *, delta: float,
                           accountant: Accountant = "rdp") -> float:
    """ε of a composed history [(noise multiplier, sample rate, steps), ...] (Opacus)."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    history = [(float(z), float(q), int(n)) for z, q, n in history if n > 0]
    if not history:
        return 0.0
    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = list(history)
    with warnings.catch_warnings():  # "optimal order is the largest alpha": ε is then an upper bound
        warnings.simplefilter("ignore", UserWarning)
        return float(acc.get_epsilon(delta=delta))


def record_noise_multiplier(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                            accountant: Accountant = "rdp") -> float:
    """The noise multiplier that spends at most `target_epsilon` in `steps` steps (Opacus's search)."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps, accountant=accountant,
                                          epsilon_tolerance=0.01))


def client_epsilon(noise_multipliers: list[float], *, delta: float) -> float:
    """ε after one Gaussian release per entry (sensitivity 1 in units of the clip; dp-accounting RDP)."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    if not noise_multipliers:
        return 0.0
    acc = RdpAccountant()
    for z in noise_multipliers:
        acc.compose(dp_accounting.GaussianDpEvent(float(z)))
    return float(acc.get_epsilon(delta))


def client_noise_multiplier(*, target_epsilon: float, delta: float, rounds: int) -> float:
    """The smallest z (to 0.1%) with client_epsilon([z] * rounds) <= target_epsilon (bisection)."""
    lo, hi = 0.0, 1.0
    while client_epsilon([hi] * rounds, delta=delta) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ValueError(f"no noise multiplier reaches ε = {target_epsilon} in {rounds} rounds")
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        if client_epsilon([mid] * rounds, delta=delta) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def max_record_steps(*, target_epsilon: float, noise_multiplier: float, sample_rate: float,
                     delta: float, accountant: Accountant = "rdp") -> int:
    """The most DP-SGD steps that stay within `target_epsilon` (0 if not even one)."""
    def fits(n: int) -> bool:
        return record_epsilon(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=n,
                              delta=delta, accountant=accountant) <= target_epsilon

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > 10**8:
            return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def max_client_rounds(*, target_epsilon: float, noise_multiplier: float, delta: float) -> int:
    """The most client-level releases within `target_epsilon` (0 if not even one)."""
    n = 0
    while client_epsilon([noise_multiplier] * (n + 1), delta=delta) <= target_epsilon:
        n += 1
        if n >= 100_000:
            break
    return n


@dataclass
class PrivacyLedger:
    """Each silo's privacy history in one run, and the budget check before each round.

    record mode: a history entry is (noise multiplier, sample rate, steps) of one round's
    DP-SGD; client mode: (effective noise multiplier, 1.0, 1) of one release.
    """

    mode: Literal["record", "client"]
    target_epsilon: float
    delta: float
    accountant: Accountant
    clip: float
    history: dict[str, list[tuple[float, float, int]]] = field(default_factory=dict)
    stopped: dict[str, str] = field(default_factory=dict)

    def epsilon(self, silo: str, extra: list[tuple[float, float, int]] | None = None) -> float:
        """ε spent by `silo` so far (plus the `extra` entries, to test a round before running it)."""
        events = self.history.get(silo, []) + (extra or [])
        if self.mode == "record":
            return record_epsilon_history(events, delta=self.delta, accountant=self.accountant)
        return client_epsilon([z for z, _, n in events for _ in range(n)], delta=self.delta)

    def would_exceed(self, silo: str, entry: tuple[float, float, int]) -> tuple[bool, float]:
        """Whether spending `entry` would take `silo` past the target, and the ε it would reach."""
        eps = self.epsilon(silo, [entry])
        return eps > self.target_epsilon * (1 + _EPS_SLACK), eps

    def spend(self, silo: str, entry: tuple[float, float, int]) -> None:
        self.history.setdefault(silo, []).append((float(entry[0]), float(entry[1]), int(entry[2])))

    def stop(self, silo: str, why: str) -> None:
        self.stopped.setdefault(silo, why)

    def spent(self) -> dict[str, float]:
        return {s: self.epsilon(s) for s in sorted(self.history)}

    def to_json(self, **extra: Any) -> dict[str, Any]:
        """The RUN/privacy.json record: mode, target, δ, clip, accountant, per-silo ε and history."""
        silos = {}
        for s in sorted(self.history):
            events = self.history[s]
            silos[s] = {
                "epsilon": self.epsilon(s),
                "steps": sum(n for _, _, n in events),
                "noise_multipliers": sorted({z for z, _, _ in events}),
                "sample_rates": sorted({q for _, q, _ in events}),
                "history": [list(e) for e in events],
                "stopped": self.stopped.get(s),
            }
        return {"mode": self.mode, "target_epsilon": self.target_epsilon, "delta": self.delta,
                "clip": self.clip, "accountant": self.accountant if self.mode == "record" else "rdp",
                "accountant_library": "opacus" if self.mode == "record" else "dp-accounting",
                "silos": silos, **extra}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PrivacyLedger:
        ledger = cls(mode=d["mode"], target_epsilon=float(d["target_epsilon"]), delta=float(d["delta"]),
                     accountant=d.get("accountant", "rdp"), clip=float(d["clip"]))
        for s, body in d.get("silos", {}).items():
            ledger.history[s] = [(float(z), float(q), int(n)) for z, q, n in body["history"]]
            if body.get("stopped"):
                ledger.stopped[s] = body["stopped"]
        return ledger
