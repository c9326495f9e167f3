"""From silos' scores of coalition models to values, flags and payouts (the body of RUN/value.json).

    game = Game(silos, beneficiaries, tokens={"a": 4096, ...}, start={"a": 2.31, ...}, score=score)
    body = contributions(game, method="exact")                 # shapley, leave_one_out, matrix
    body = contributions(game, method="sampled", permutations=1000, seed=0, truncation=0.01, tolerance=0.01)
    flags = flag_silos(game, body, update_norms={"a": [0.4, 0.3], ...})
    share, pay = payouts(pay_weights(game, body, flags, "shapley"), budget=1000.0)

The value of a model M to silo j is bits/byte of the starting model on j's validation split
minus that of M (what j measures itself); the consortium's utility is their token-weighted mean
over the beneficiary silos. `score(coalition)` returns the beneficiaries' bits/byte of that
coalition's model; it is called at most once per coalition (it may retrain one).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedlm.value.shapley import exact_shapley, largest_remainder, leave_one_out, sampled_shapley

Coalition = frozenset[str]
FREE_RIDER_TOLERANCE = 1e-3  # a one-silo model within this share of the grand gain of the start: it moved nowhere


@dataclass
class Game:
    """The silos' valuation game: who plays, who benefits, and the scores of coalition models."""

    silos: list[str]
    beneficiaries: list[str]
    tokens: dict[str, int]  # beneficiary -> validation tokens it scores on
    start: dict[str, float]  # beneficiary -> bits/byte of the starting model
    score: Callable[[Coalition], dict[str, float]]  # coalition -> {beneficiary: bits/byte}
    seen: dict[Coalition, dict[str, float]] = field(default_factory=dict)

    def bpb(self, coalition: Coalition) -> dict[str, float]:
        if coalition not in self.seen:
            self.seen[coalition] = self.score(coalition)
        return self.seen[coalition]

    def utility(self, coalition: Coalition, beneficiary: str | None = None) -> float:
        """Bits/byte gained over the starting model: by one beneficiary, or token-weighted over all."""
        got = self.bpb(coalition)
        if beneficiary is not None:
            return self.start[beneficiary] - got[beneficiary]
        total = sum(self.tokens[j] for j in self.beneficiaries)
        return sum(self.tokens[j] * (self.start[j] - got[j]) for j in self.beneficiaries) / total


def contributions(game: Game, *, method: str, permutations: int = 0, seed: int = 0, truncation: float = 0.0,
                  tolerance: float = 0.0) -> dict[str, Any]:
    """Shapley values (exact, or sampled with stderr), leave-one-out and the contributor × beneficiary
    matrix of `game`; the utilities of the empty and grand coalitions.

    sampled: `truncation` and `tolerance` are fractions of the grand coalition's gain over the empty
    one; sampling stops once every silo's stderr is within `tolerance` of it (0: exactly
    `permutations`, otherwise the cap), and each beneficiary's row walks the same permutations.
    When the orders drawn have visited every coalition ("complete"), the values returned are the
    exact ones from those coalitions' scores (stderr 0): each coalition was trained once, so they
    cost nothing more, and the sampling estimate is kept beside them ("sampled_shapley")."""
    players = list(game.silos)
    grand, empty = frozenset(players), frozenset[str]()
    stderr: dict[str, float | None]
    sampling: dict[str, Any] = {}
    complete = method != "sampled"  # every coalition scored
    if method == "sampled":
        spread = abs(game.utility(grand) - game.utility(empty))
        est = sampled_shapley(players, game.utility, permutations=permutations, seed=seed,
                              truncation=truncation * spread, tolerance=tolerance * spread)
        phi, stderr = est.values, dict(est.stderr)
        per = {j: sampled_shapley(players, _for(game, j), permutations=est.permutations, seed=seed,
                                  truncation=truncation * spread, stop=game.utility).values for j in game.beneficiaries}
        complete = len(game.seen) == 2 ** len(players)
        sampling = {"permutations": est.permutations, "converged": est.converged, "complete": complete}
        if complete:  # the orders trained every coalition: the exact values cost nothing more
            sampling.update(sampled_shapley=phi, sampled_stderr=stderr)
    if complete:  # exact over every coalition (retrained, or rebuilt in the run)
        phi = exact_shapley(players, game.utility)
        stderr = dict.fromkeys(players, 0.0)
        per = {j: exact_shapley(players, _for(game, j)) for j in game.beneficiaries}
    loo: dict[str, float | None] = dict.fromkeys(players, None)
    if complete or all(grand - {i} in game.seen for i in players):
        loo = dict(leave_one_out(players, game.utility))
    return {
        "baseline_utility": game.utility(empty), "grand_utility": game.utility(grand),
        "shapley": phi, "stderr": stderr, "leave_one_out": loo,
        "matrix": {i: {j: per[j][i] for j in game.beneficiaries} for i in players},
        "coalitions_scored": len(game.seen), **sampling,
    }


def over_seeds(bodies: list[dict[str, Any]]) -> dict[str, Any]:
    """Bodies of the same silos under several training seeds (exact, or sampled: each seed's own orders)
    as one: each value (Shapley, leave-one-out, matrix, utilities) their mean, `stderr` the standard
    error of the mean Shapley value over the seeds (for sampled, it holds the sampling error too: each
    seed's estimate carries its own), and `seeds` each seed's Shapley values. Shapley is linear in the
    utility, so the mean values still sum to the mean grand utility minus the mean baseline. A silo's
    leave-one-out is None unless every seed has it (sampled's orders may not meet grand - i)."""
    players, fmean = list(bodies[0]["shapley"]), statistics.fmean

    def mean_loo(i: str) -> float | None:
        got = [b["leave_one_out"][i] for b in bodies]
        return None if None in got else fmean(got)

    return {
        "baseline_utility": fmean(b["baseline_utility"] for b in bodies),
        "grand_utility": fmean(b["grand_utility"] for b in bodies),
        "shapley": {i: fmean(b["shapley"][i] for b in bodies) for i in players},
        "stderr": {i: statistics.stdev(b["shapley"][i] for b in bodies) / math.sqrt(len(bodies)) for i in players},
        "leave_one_out": {i: mean_loo(i) for i in players},
        "matrix": {i: {j: fmean(b["matrix"][i][j] for b in bodies) for j in bodies[0]["matrix"][i]} for i in players},
        "coalitions_scored": sum(b["coalitions_scored"] for b in bodies),
        "seeds": [dict(b["shapley"]) for b in bodies],
    }


def _for(game: Game, beneficiary: str) -> Callable[[Coalition], float]:
    return lambda c: game.utility(c, beneficiary)


def value_to_others(game: Game, matrix: dict[str, dict[str, float]], silo: str) -> float | None:
    """Silo `silo`'s Shapley value to the other beneficiaries (token-weighted); None when there are none."""
    others = [j for j in game.beneficiaries if j != silo]
    if not others:
        return None
    return sum(game.tokens[j] * matrix[silo][j] for j in others) / sum(game.tokens[j] for j in others)


def flag_silos(game: Game, body: dict[str, Any], *, update_norms: dict[str, list[float]] | None = None
               ) -> dict[str, dict[str, Any]]:
    """{silo: {"flag", "why"}} for silos whose value to the other silos is <= 0.

    "free_rider" when the silo sent no useful update: every update it sent was zero (seen in
    the run), or the model of it alone did not move from the start (its utility to every
    beneficiary is within FREE_RIDER_TOLERANCE of the grand gain of 0); "harmful" otherwise."""
    out: dict[str, dict[str, Any]] = {}
    spread = max(abs(body["grand_utility"] - body["baseline_utility"]), 1e-12)
    for silo in game.silos:
        others = value_to_others(game, body["matrix"], silo)
        if others is None or others > 0:
            continue
        alone = frozenset({silo})
        idle = alone in game.seen and all(abs(game.utility(alone, j) - game.utility(frozenset(), j))
                                          <= FREE_RIDER_TOLERANCE * spread for j in game.beneficiaries)
        norms = (update_norms or {}).get(silo)
        if norms is not None and norms and max(norms) == 0.0:
            idle = True
        flag = "free_rider" if idle else "harmful"
        why = ("it sent no useful update (its model alone is the starting model)" if idle
               else f"its value to the other silos is {others:+.4f} bits/byte (<= 0)")
        out[silo] = {"flag": flag, "why": why, "value_to_others": others}
    return out


PAY_BY = ("shapley", "others")
"""What a silo is paid by: its Shapley value, or the other beneficiaries' scores alone (`peer_parts`:
then nothing a silo reports can move its own pay)."""


def peer_parts(game: Game, matrix: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """{beneficiary j: {silo i: fraction}}: how j splits its equal part of the budget among the *other*
    silos, in proportion to what each added to j's own split (max(matrix[i][j], 0); equally when none
    added anything). A silo's share is the mean over the beneficiaries of what they hand it, so it
    depends on the other beneficiaries' scores only: whatever i reports, about any model, its own
    share stays the same (impartial division: de Clippel, Moulin & Tideman 2008). Shares in
    proportion to the value to the others (`value_to_others`) are not impartial: i could shrink the
    others' values by under-reporting how much their data helped it, and grow its share of the rest.
    The parts are equal, not token-weighted, for the same reason: each silo reports its own token count."""
    parts = {}
    for j in game.beneficiaries:
        added = {i: max(matrix[i][j], 0.0) for i in game.silos if i != j}
        mass = sum(added.values())
        parts[j] = {i: (a / mass if mass > 0 else 1.0 / len(added)) for i, a in added.items()}
    return parts


def pay_weights(game: Game, body: dict[str, Any], flags: dict[str, dict[str, Any]], pay_by: str
                ) -> dict[str, float]:
    """Each silo's payout weight: max(Shapley value, 0), 0 for a flagged silo; or the mean of the
    fractions the beneficiaries hand it (`peer_parts`).
    Paid by the others, a flagged silo keeps what the beneficiaries its data helped hand it: zeroing it
    would hand its part to the rest, so a silo could raise its own pay by reporting another as harmful."""
    if pay_by == "shapley":
        return {s: 0.0 if s in flags else max(v, 0.0) for s, v in body["shapley"].items()}
    parts = peer_parts(game, body["matrix"]).values()
    return {i: sum(p.get(i, 0.0) for p in parts) / len(parts) for i in game.silos}


def payouts(weights: dict[str, float], *, budget: float | None) -> tuple[dict[str, float], dict[str, float | None]]:
    """(share, payout) per silo: share ∝ weight (`pay_weights`); payouts in cents by largest remainder,
    summing to `budget` exactly (None without a budget)."""
    mass = sum(weights.values())
    share = {s: (w / mass if mass > 0 else 0.0) for s, w in weights.items()}
    if budget is None:
        return share, dict.fromkeys(weights, None)
    return share, dict(largest_remainder(weights, budget=budget))


def rank_order(values: dict[str, float]) -> Sequence[str]:
    """Silos from the highest value to the lowest."""
    return sorted(values, key=lambda s: (-values[s], s))


__all__ = ["PAY_BY", "Game", "contributions", "flag_silos", "over_seeds", "pay_weights", "payouts", "peer_parts",
           "rank_order", "value_to_others"]
