"""Cooperative-game arithmetic for silo values: Shapley values (exact and sampled), leave-one-out,
payouts by largest remainder, and Spearman's rank correlation. No training, no files.

    v = {frozenset(): 0.0, frozenset({"a"}): 0.3, frozenset({"b"}): 0.1, frozenset({"a", "b"}): 0.5}
    phi = exact_shapley(["a", "b"], v.__getitem__)                  # {"a": 0.35, "b": 0.15}
    est = sampled_shapley(["a", "b"], v.__getitem__, permutations=500, seed=0, tolerance=0.01)  # stderr <= 0.01
    cents = largest_remainder({"a": 0.35, "b": 0.15}, budget=100.0)  # {"a": 70.0, "b": 30.0}

A game is a function from a coalition (a frozenset of players) to its utility; every function
here calls it at most once per coalition (callers retrain or score a model per call).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal

import numpy as np

Game = Callable[[frozenset[str]], float]


def cached(game: Game) -> tuple[Game, dict[frozenset[str], float]]:
    """`game` memoised, and the dict of the coalitions it has evaluated (their number is the cost)."""
    seen: dict[frozenset[str], float] = {}

    def once(coalition: frozenset[str]) -> float:
        if coalition not in seen:
            seen[coalition] = float(game(coalition))
        return seen[coalition]

    return once, seen


def all_coalitions(players: Sequence[str]) -> list[frozenset[str]]:
    """Every coalition of `players`, the empty one first, the grand one last (2^n)."""
    return [frozenset(c) for k in range(len(players) + 1) for c in itertools.combinations(players, k)]


def exact_shapley(players: Sequence[str], game: Game) -> dict[str, float]:
    """Shapley values by the subset formula: sum over S not holding i of |S|!(n-|S|-1)!/n! (v(S+i) - v(S))."""
    n = len(players)
    weight = [math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n) for k in range(n)]
    phi = dict.fromkeys(players, 0.0)
    for i in players:
        others = [p for p in players if p != i]
        for k in range(n):
            for c in itertools.combinations(others, k):
                s = frozenset(c)
                phi[i] += weight[k] * (game(s | {i}) - game(s))
    return phi


def leave_one_out(players: Sequence[str], game: Game) -> dict[str, float]:
    """v(N) - v(N without i): what the consortium loses if silo i alone leaves."""
    grand = frozenset(players)
    return {i: game(grand) - game(grand - {i}) for i in players}


@dataclass
class Estimate:
    """Sampled Shapley values with their standard errors (std of the per-permutation marginals / sqrt(m))."""

    values: dict[str, float]
    stderr: dict[str, float]
    permutations: int
    converged: bool = True  # every stderr reached the tolerance (False: the permutation cap stopped it)


MIN_PERMUTATIONS = 30  # before the stopping rule may stop: a standard error from fewer orders is itself too noisy


def sampled_shapley(players: Sequence[str], game: Game, *, permutations: int, seed: int,
                    truncation: float = 0.0, stop: Game | None = None, tolerance: float = 0.0,
                    min_permutations: int = MIN_PERMUTATIONS) -> Estimate:
    """Monte-Carlo Shapley over random orders of the players (Castro et al. 2009), with truncation
    and a stopping rule.

    Walking a permutation, once the coalition so far is within `truncation` of v(N) (in the
    game's units), the remaining players' marginals are taken as 0 and not evaluated (the
    truncation of Ghorbani & Zou 2019's TMC-Shapley): a bias of at most `truncation` per
    permutation, bought for fewer coalitions. Each player's standard error is the sample std
    of its marginals over the permutations / sqrt(permutations): the sampling error only, not
    truncation's bias. `tolerance` > 0: sample until every player's standard error is
    <= `tolerance` (after at least `min_permutations`), with `permutations` as the cap; 0: exactly
    `permutations`. `stop` (default: `game`) is the game whose closeness to its grand value
    truncates, so that several games (one per beneficiary) walk the same permutations and coalitions.
    """
    if permutations < 2:
        raise ValueError("sampled Shapley needs at least 2 permutations for a standard error")
    rng = np.random.default_rng(seed)  # the order of evaluation only: no secret here
    stop = stop or game
    grand = stop(frozenset(players))
    marginals = np.zeros((permutations, len(players)))  # (permutation, player)
    done, converged = 0, tolerance <= 0
    while done < permutations:
        order = rng.permutation(len(players))
        coalition: frozenset[str] = frozenset()
        before = game(coalition)
        for k in order:
            if truncation > 0 and abs(grand - stop(coalition)) <= truncation:
                break  # the rest contribute 0 in this order
            coalition = coalition | {players[k]}
            after = game(coalition)
            marginals[done, k] = after - before
            before = after
        done += 1
        if tolerance > 0 and done >= max(2, min_permutations) and _stderr(marginals[:done]).max() <= tolerance:
            converged = True
            break
    seen = marginals[:done]
    values = dict(zip(players, seen.mean(0).tolist(), strict=True))
    return Estimate(values, dict(zip(players, _stderr(seen).tolist(), strict=True)), done, converged)


def _stderr(marginals: np.ndarray) -> np.ndarray:
    """Each player's standard error of the mean marginal, from (permutations, players) samples."""
    return marginals.std(0, ddof=1) / math.sqrt(len(marginals))


def largest_remainder(weights: dict[str, float], *, budget: float, unit: float = 0.01) -> dict[str, float]:
    """Split `budget` in proportion to max(weight, 0), in whole `unit`s (cents), summing to it exactly.

    Hamilton's method: each share's floor in units, then the units left over go to the largest
    remainders (ties to the earlier name). All weights <= 0: nobody is paid (all 0). Decimal
    arithmetic, so the sum is exact in base 10 and not only within float error."""
    total_units = int((Decimal(str(budget)) / Decimal(str(unit))).to_integral_value(ROUND_FLOOR))
    positive = {k: max(float(w), 0.0) for k, w in weights.items()}
    mass = sum(positive.values())
    if mass <= 0:
        return dict.fromkeys(weights, 0.0)
    exact = {k: Decimal(repr(w)) / Decimal(repr(mass)) * total_units for k, w in positive.items()}
    units = {k: int(x.to_integral_value(ROUND_FLOOR)) for k, x in exact.items()}
    left = total_units - sum(units.values())
    for k in sorted(exact, key=lambda k: (-(exact[k] - units[k]), k))[:left]:
        units[k] += 1
    return {k: float(Decimal(u) * Decimal(str(unit))) for k, u in units.items()}


def ranks(x: Sequence[float]) -> np.ndarray:
    """1-based ranks, ties given their mean rank (as Spearman's rho needs)."""
    a = np.asarray(x, dtype=float)
    order = np.argsort(a, kind="stable")
    r = np.empty(len(a))
    r[order] = np.arange(1, len(a) + 1)
    for value in np.unique(a):
        tied = a == value
        r[tied] = r[tied].mean()
    return r


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's r of the ranks (scipy is not a fedlm dependency;
    this is its definition, ties averaged, in a few lines of numpy)."""
    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])
