"""Silo values (`fedlm value`, issue 17): Shapley arithmetic against brute force on synthetic games,
and real short federated runs valued by retraining (exact) and inside the run (rounds)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
import shutil
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Context, Message
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlm.value.shapley import (
    all_coalitions,
    cached,
    exact_shapley,
    largest_remainder,
    leave_one_out,
    sampled_shapley,
    spearman,
)

# ---------------------------------------------------------------------------------------
# the arithmetic, against brute force (no training)


def brute_shapley(players: list[str], v: dict[frozenset[str], float]) -> dict[str, float]:
    """The definition: each player's marginal averaged over all n! orders."""
    total = dict.fromkeys(players, 0.0)
    orders = list(itertools.permutations(players))
    for order in orders:
        c: frozenset[str] = frozenset()
        for p in order:
            total[p] += v[c | {p}] - v[c]
            c = c | {p}
    return {p: t / len(orders) for p, t in total.items()}


def random_game(players: list[str], seed: int) -> dict[frozenset[str], float]:
    rng = random.Random(seed)
    return {c: (0.0 if not c else rng.uniform(-1, 3) * len(c) ** 0.5) for c in all_coalitions(players)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_shapley_is_the_average_marginal_over_all_orders(seed: int) -> None:
    """The subset formula equals the n!-permutation definition; efficiency: the values sum to v(N) - v(∅)."""
    players = list("abcde")
    v = random_game(players, seed)
    v[frozenset()] = 0.25  # a baseline that is not 0
    phi = exact_shapley(players, v.__getitem__)
    ref = brute_shapley(players, v)
    assert phi == pytest.approx(ref, abs=1e-12)
    assert sum(phi.values()) == pytest.approx(v[frozenset(players)] - v[frozenset()], abs=1e-12)


def test_symmetry_null_player_and_additivity() -> None:
    """Two interchangeable players get equal values; a player that adds nothing gets 0; the value of
    the sum of two games is the sum of their values."""
    players = ["a", "b", "c", "null"]

    def base(c: frozenset[str]) -> float:  # a and b interchangeable, "null" adds nothing
        k = len(c & {"a", "b"})
        return k ** 1.5 + (2.0 if "c" in c else 0.0) * (1 + k)

    phi = exact_shapley(players, base)
    assert phi["a"] == pytest.approx(phi["b"], abs=1e-12)
    assert phi["null"] == pytest.approx(0.0, abs=1e-12)
    v, w = random_game(players, 5), random_game(players, 6)
    both = exact_shapley(players, lambda c: v[c] + w[c])
    apart = [exact_shapley(players, v.__getitem__), exact_shapley(players, w.__getitem__)]
    assert both == pytest.approx({p: apart[0][p] + apart[1][p] for p in players}, abs=1e-12)
    assert leave_one_out(players, base)["null"] == pytest.approx(0.0, abs=1e-12)


def test_sampled_shapley_converges_to_exact_within_its_stderr() -> None:
    """On a 6-player game, permutation sampling lands within 4 of its own standard errors of the exact
    values, and its error shrinks as permutations grow."""
    players = [f"s{i}" for i in range(6)]
    v = random_game(players, 11)
    exact = exact_shapley(players, v.__getitem__)
    est = sampled_shapley(players, v.__getitem__, permutations=2000, seed=3)
    for p in players:
        assert abs(est.values[p] - exact[p]) <= 4 * est.stderr[p] + 1e-12, p
    small = sampled_shapley(players, v.__getitem__, permutations=50, seed=3)
    err = [max(abs(e.values[p] - exact[p]) for p in players) for e in (small, est)]
    assert err[1] < err[0]
    assert sum(est.stderr.values()) < sum(small.stderr.values())


def test_sampling_stops_once_every_stderr_is_within_the_tolerance() -> None:
    """The stopping rule: sampling ends at the first permutation (after the minimum) at which every
    player's stderr is <= the tolerance, the permutation cap stops a tolerance it cannot reach (and
    says so), and the reported stderrs stay honest under the early stop: over 60 games, >= 90% of
    the values lie within 2 stderr of exact (95% for a normal error; 2% of them outside 3)."""
    players = [f"s{i}" for i in range(6)]
    v = random_game(players, 11)
    est = sampled_shapley(players, v.__getitem__, permutations=5000, seed=3, tolerance=0.1)
    assert est.converged and 30 <= est.permutations < 5000
    assert max(est.stderr.values()) <= 0.1
    one_less = sampled_shapley(players, v.__getitem__, permutations=est.permutations - 1, seed=3)
    assert max(one_less.stderr.values()) > 0.1 or est.permutations == 30  # it stopped at the first that met it
    capped = sampled_shapley(players, v.__getitem__, permutations=40, seed=3, tolerance=1e-6)
    assert not capped.converged and capped.permutations == 40
    errors = []
    for seed in range(60):
        game = random_game(players, 100 + seed)
        ref = exact_shapley(players, game.__getitem__)
        got = sampled_shapley(players, game.__getitem__, permutations=5000, seed=seed, tolerance=0.2)
        errors += [abs(got.values[p] - ref[p]) / got.stderr[p] for p in players]
    assert np.mean(np.array(errors) <= 2) >= 0.90
    assert np.mean(np.array(errors) > 3) <= 0.02


def test_truncation_skips_coalitions_and_stays_within_its_bound() -> None:
    """Truncated sampling evaluates fewer coalitions; each value moves by at most the truncation."""
    players = [f"s{i}" for i in range(6)]
    v = {c: min(len(c), 3) * 1.0 for c in all_coalitions(players)}  # saturates after 3 players
    game, seen = cached(v.__getitem__)
    sampled_shapley(players, game, permutations=200, seed=0)
    full = len(seen)
    game, seen = cached(v.__getitem__)
    est = sampled_shapley(players, game, permutations=200, seed=0, truncation=1e-9)
    assert len(seen) < 0.8 * full  # coalitions past saturation are never evaluated
    assert est.values == pytest.approx(exact_shapley(players, v.__getitem__), abs=0.15)


def _bpb_game(players: list[str], seed: int, *, saturate: int | None = None):  # type: ignore[no-untyped-def]
    """A valuation game on synthetic scores (bits/byte per beneficiary, no training) that counts its
    calls: the start model scores 3.0; a coalition saves a random amount per beneficiary (or, with
    `saturate`, one unit per member up to that many)."""
    from fedlm.value.compute import Game

    rng = random.Random(seed)
    gain = {c: {j: (min(len(c), saturate) if saturate else rng.uniform(0, 2) * len(c) ** 0.5) for j in players}
            for c in all_coalitions(players)}
    calls: list[frozenset[str]] = []

    def score(c: frozenset[str]) -> dict[str, float]:
        calls.append(c)
        return {j: 3.0 - gain[c][j] for j in players}

    return Game(list(players), list(players), dict.fromkeys(players, 1000), dict.fromkeys(players, 3.0), score), calls


def test_values_over_seeds_are_the_exact_values_of_the_mean_game() -> None:
    """`over_seeds` on exact bodies of two seeds' games: the mean values, leave-one-out and matrix are
    those of the game whose scores are the seeds' mean (Shapley is linear), they still sum to grand -
    baseline, and the stderr is the standard error of the mean over the seeds."""
    from fedlm.value.compute import Game, contributions, over_seeds

    players = ["a", "b", "c", "d"]
    games = [_bpb_game(players, seed)[0] for seed in (21, 22)]
    bodies = [contributions(g, method="exact") for g in games]
    both = over_seeds(bodies)
    mean = Game(list(players), list(players), games[0].tokens, games[0].start,
                lambda c: {j: (games[0].bpb(c)[j] + games[1].bpb(c)[j]) / 2 for j in players})
    ref = contributions(mean, method="exact")
    for p in players:
        assert both["shapley"][p] == pytest.approx(ref["shapley"][p], abs=1e-12)
        assert both["leave_one_out"][p] == pytest.approx(ref["leave_one_out"][p], abs=1e-12)
        assert both["matrix"][p] == pytest.approx(ref["matrix"][p], abs=1e-12)
        spread = abs(bodies[0]["shapley"][p] - bodies[1]["shapley"][p])
        assert both["stderr"][p] == pytest.approx(spread / 2, abs=1e-12)  # sd of two / sqrt(2)
    assert sum(both["shapley"].values()) == pytest.approx(both["grand_utility"] - both["baseline_utility"], abs=1e-12)
    assert both["seeds"] == [b["shapley"] for b in bodies]
    # a seed whose sampled orders never met grand - p has no leave-one-out for p: the mean has none either
    bodies[1]["leave_one_out"]["a"] = None
    assert over_seeds(bodies)["leave_one_out"]["a"] is None and over_seeds(bodies)["leave_one_out"]["b"] is not None


def test_sampled_that_met_every_coalition_reports_the_exact_values() -> None:
    """When sampling's orders have trained every coalition (few silos), `sampled` returns the exact
    Shapley values, matrix and leave-one-out of those scores (stderr 0) at no further cost, and keeps its
    sampling estimate beside them; when truncation leaves coalitions untrained it stays an estimate."""
    from fedlm.value.compute import contributions

    players = ["a", "b", "c", "d"]
    game, calls = _bpb_game(players, 7)
    body = contributions(game, method="sampled", permutations=400, seed=1)
    ref_game, _ = _bpb_game(players, 7)
    ref = contributions(ref_game, method="exact")
    assert body["complete"] and len(calls) == len(set(calls)) == 16  # each coalition scored once
    assert (body["shapley"], body["matrix"], body["leave_one_out"]) == (ref["shapley"], ref["matrix"], ref["leave_one_out"])
    assert set(body["stderr"].values()) == {0.0}
    assert body["sampled_shapley"] != body["shapley"] and min(body["sampled_stderr"].values()) > 0
    for p in players:  # the estimate kept is the sampler's, within its own error of the exact value
        assert abs(body["sampled_shapley"][p] - ref["shapley"][p]) <= 4 * body["sampled_stderr"][p]
    game, calls = _bpb_game(players, 7, saturate=2)
    cut = contributions(game, method="sampled", permutations=400, seed=1, truncation=1e-6)
    assert not cut["complete"] and len(calls) < 16 and "sampled_shapley" not in cut
    assert cut["leave_one_out"] == dict.fromkeys(players, None)  # a saturated game never meets the grand minus one
    assert max(cut["stderr"].values()) > 0


@pytest.mark.parametrize("budget", [100.0, 1000.01, 0.07, 12345.67])
def test_largest_remainder_pays_the_budget_to_the_cent(budget: float) -> None:
    """Payouts are whole cents, proportional to max(value, 0), and sum to the budget exactly."""
    weights = {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3 + 1e-9, "d": -0.2, "e": 0.0}
    pay = largest_remainder(weights, budget=budget)
    assert sum(Decimal(str(x)) for x in pay.values()) == Decimal(str(budget))
    assert all(Decimal(str(x)) == Decimal(str(x)).quantize(Decimal("0.01")) for x in pay.values())
    assert pay["d"] == 0.0 and pay["e"] == 0.0
    assert max(pay[k] for k in "abc") - min(pay[k] for k in "abc") <= 0.01 + 1e-9


def test_spearman_against_hand_computed_ranks() -> None:
    """Spearman's rho: 1 for the same order, -1 reversed, ties averaged (hand-checked value)."""
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks x: 1, 2.5, 2.5, 4; y: 1, 2, 3, 4 -> Pearson of the ranks
    rx, ry = np.array([1, 2.5, 2.5, 4]), np.array([1, 2, 3, 4])
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(float(np.corrcoef(rx, ry)[0, 1]))


# ---------------------------------------------------------------------------------------
# real short runs

SETS = [
    "model.preset=custom", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.d_ff=128",
    "model.max_seq_len=32", "train.seq_len=32", "train.batch_size=4", "train.lr=3e-3", "train.warmup_steps=2",
    "train.mode=federated", 'federation.strategy="fedavg"', "federation.rounds=4", "federation.local_steps=3",
    "value.eval_tokens=1024",
]


def _letters(rng: random.Random, words: int) -> str:
    return " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
                    for _ in range(words))


@pytest.fixture(scope="module")
def value_ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """legal, an identical copy of legal, and a silo of random letter-words; one tokenizer, shards."""
    from fedlm.corpus import extract
    from fedlm.data.shards import shard_silo
    from fedlm.data.tokenizer import agree_tokenizer
    from tests.conftest import _docs_from_corpus

    root = tmp_path_factory.mktemp("value")
    docs = _docs_from_corpus(extract(root / "raw", ("legal",))["legal"], 60_000)
    rng = random.Random(0)
    texts = {"legal": docs, "legal_copy": docs, "noise": [_letters(rng, 400) for _ in range(len(docs) or 1)]}
    ws = root / "ws"
    for silo, items in texts.items():
        (ws / "silos" / silo).mkdir(parents=True)
        with open(ws / "silos" / silo / "docs.jsonl", "w", encoding="utf-8") as f:
            for text in items:
                f.write(json.dumps({"text": text, "source": silo}) + "\n")
    agree_tokenizer(ws, vocab_size=384, epsilon=None)
    for silo in texts:
        shard_silo(ws, silo, val_fraction=0.1, seed=0)
    return ws


def _cfg(ws: Path, *extra: str):  # type: ignore[no-untyped-def]
    from fedlm.config import load_config

    return load_config(None, [f"data.workspace={json.dumps(str(ws))}", *SETS, *extra])


@pytest.mark.slow
def test_duplicates_get_equal_values_and_noise_is_flagged(value_ws: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """One run (the two legal silos benefit) valued by retraining every coalition (exact), inside
    the run (rounds) and by sampling orders (which, for three silos, meet every coalition). Exact: the two silos holding the same text get values within 15% of each
    other. Both: the random-letter silo's value to the others is <= 0 and it is flagged harmful;
    the values sum to grand - baseline; payouts sum to the budget exactly, 0 to the flagged silo.
    The retrained coalitions skip the run's own closing validation (their models are scored anyway)."""
    from fedlm.config import load_config, save_config
    from fedlm.errors import UserError
    from fedlm.federation import client_app, rounds
    from fedlm.federation.runner import run_federated
    from fedlm.value.run import exact_retrains, parts_table, value_run

    run = tmp_path / "run"
    run_federated(_cfg(value_ws, 'federation.value="rounds"', 'value.beneficiaries=["legal", "legal_copy"]'), run)
    assert (run / "validation.json").exists()
    validated: list[Path] = []
    monkeypatch.setattr(rounds, "validate_silos", lambda link, run_dir, **kw: validated.append(run_dir))
    privacy = json.loads((run / "privacy.json").read_text())
    assert "every silo's individual update" in privacy["valuation"]["server_saw"]
    values = {}
    for method in ("exact", "rounds", "sampled"):
        body = value_run(run, method=method, budget=1000.0)
        v = values[method] = {s: body["silos"][s]["shapley"] for s in body["silos"]}
        assert v["legal"] > 0 and v["legal_copy"] > 0, (method, v)
        if method == "exact":
            assert abs(v["legal"] - v["legal_copy"]) <= 0.15 * max(v["legal"], v["legal_copy"]), v
        assert body["silos"]["noise"]["flag"] == "harmful", (method, body["silos"]["noise"])
        assert body["matrix"]["noise"]["legal"] <= 0, (method, body["matrix"])
        assert sum(v.values()) == pytest.approx(body["grand_utility"] - body["baseline_utility"], abs=1e-9)
        pay = {s: body["silos"][s]["payout"] for s in body["silos"]}
        assert sum(Decimal(str(x)) for x in pay.values()) == Decimal("1000")
        assert pay["noise"] == 0.0
        assert body["silos"]["legal"]["gain"] is not None
        assert json.loads((run / "value.json").read_text())["method"] == method
        assert any("one training seed" in n for n in body["notes"]) == (method != "rounds")  # stderr 0 explained
        assert body["coalitions_trained"] == (0 if method == "rounds" else 6)  # 2^3 - 1, the grand one is the run
    # three silos: sampled's orders retrain all 8 coalitions, so it reports exact's values (retraining is deterministic)
    assert values["sampled"] == values["exact"] and "sampled_estimate" in body
    assert any("exact Shapley values (stderr 0" in n for n in body["notes"])
    # exact under two training seeds: the run's own seed gives exact's values again, the second retrains every
    # coalition (the grand one too); the values are the seeds' mean, the stderr their spread
    body = value_run(run, method="exact", seeds=2)
    first, second = (x["shapley"] for x in body["seeds"])
    assert first == values["exact"] and second != first
    assert [x["seed"] for x in body["seeds"]] == [1337, 1338]
    assert body["seeds"][0]["coalition_bits_per_byte"] == body["coalition_bits_per_byte"]  # the first seed's
    assert len(body["seeds"][1]["coalition_bits_per_byte"]) == 8  # every coalition scored under the second seed
    assert body["coalitions_trained"] == 6 + 7
    for s in first:
        assert body["silos"][s]["shapley"] == pytest.approx((first[s] + second[s]) / 2, abs=1e-12)
        assert body["silos"][s]["stderr"] == pytest.approx(abs(first[s] - second[s]) / 2, abs=1e-12)
    assert sum(body["silos"][s]["shapley"] for s in first) == pytest.approx(
        body["grand_utility"] - body["baseline_utility"], abs=1e-9)
    assert body["silos"]["noise"]["flag"] == "harmful" and any("2 seeds" in n for n in body["notes"])
    exact_seeds = {s: (v["shapley"], v["stderr"]) for s, v in body["silos"].items()}
    # sampled under the same two seeds: each seed's orders meet all 8 coalitions and retrain them as exact did
    # (retraining is deterministic), so the mean and its stderr over the seeds are exact's
    body = value_run(run, method="sampled", seeds=2)
    assert {s: (v["shapley"], v["stderr"]) for s, v in body["silos"].items()} == exact_seeds
    assert body["coalitions_trained"] == 6 + 7 and [x["seed"] for x in body["seeds"]] == [1337, 1338]
    assert sum("train.seed 133" in n and "met every one of the 8 coalitions" in n for n in body["notes"]) == 2
    assert any("`seeds[1].sampled_estimate`" in n for n in body["notes"]) and "sampled_estimate" in body["seeds"][1]
    with pytest.raises(UserError, match="--seeds 2: .*only with --method exact or sampled"):
        value_run(run, method="rounds", seeds=2)
    assert parts_table(body) is None  # paid by Shapley value
    # paid by the others: each legal silo hands half the budget to the other two silos by its own view of them
    body = value_run(run, method="rounds", budget=1000.0, pay_by="others")
    m, silos = body["matrix"], list(body["silos"])
    hand = {j: {i: max(m[i][j], 0.0) for i in silos if i != j} for j in ("legal", "legal_copy")}
    assert all(sum(h.values()) > 0 for h in hand.values()), m
    expect = {i: sum(h.get(i, 0.0) / sum(h.values()) / 2 for h in hand.values()) for i in silos}
    assert body["pay_by"] == "others" and body["silos"]["noise"]["value_to_others"] <= 0
    assert {s: v["share"] for s, v in body["silos"].items()} == pytest.approx(expect, abs=1e-12)
    assert body["silos"]["noise"]["share"] < min(body["silos"]["legal"]["share"], body["silos"]["legal_copy"]["share"])
    assert sum(Decimal(str(v["payout"])) for v in body["silos"].values()) == Decimal("1000")
    for j, h in hand.items():  # the fractions each beneficiary handed out, as value.json keeps them
        assert body["parts"][j] == pytest.approx({i: x / sum(h.values()) for i, x in h.items()}, abs=1e-12)
    table = parts_table(body)  # and prints them under the value table
    assert table is not None and [c.header for c in table.columns] == ["silo", "from legal", "from legal_copy", "share"]
    # a lying silo, in the real scoring path: legal_copy's ClientApp reports every model (the start model's too) at
    # the same bits/byte over a billion tokens, "nothing helped me"; its own share stays what honest reports gave it
    shutil.rmtree(run / "checkpoint")  # as `fedlm demo --assistant` leaves its runs: finished, with no checkpoint
    honest = value_run(run, method="exact", pay_by="others")["silos"]
    real_reply = client_app.score_reply

    def lying_reply(msg: Message, path: Path) -> Message:
        reply = real_reply(msg, path)
        if path.name == "legal_copy":
            metrics = reply.content.metric_records["metrics"]
            for key in metrics:
                metrics[key] = 1e9 if key == "tokens" else 5.0
        return reply

    monkeypatch.setattr(client_app, "score_reply", lying_reply)
    lied = value_run(run, method="exact", pay_by="others")
    monkeypatch.setattr(client_app, "score_reply", real_reply)
    assert lied["silos"]["legal_copy"]["share"] == pytest.approx(honest["legal_copy"]["share"], abs=1e-12)
    assert lied["parts"]["legal_copy"] == {"legal": 0.5, "noise": 0.5}  # it handed its part out equally instead
    assert lied["silos"]["legal"]["share"] != pytest.approx(honest["legal"]["share"])
    with pytest.raises(UserError, match="--pay-by 'own': use one of shapley, others"):
        value_run(run, pay_by="own")
    solo = tmp_path / "solo"  # the same run, with one beneficiary: nobody else's scores to pay by
    shutil.copytree(run, solo)
    (solo / "value.json").unlink()
    cfg = load_config(solo / "config.toml")
    save_config(dataclasses.replace(cfg, value=dataclasses.replace(cfg.value, beneficiaries=["legal"])),
                solo / "config.toml")
    with pytest.raises(UserError, match="--pay-by others needs at least 2 beneficiaries"):
        value_run(solo, pay_by="others")
    assert not (solo / "value.json").exists()
    assert not list(run.glob(".value-*")) and validated == []
    assert exact_retrains(3, reduced=False) == 6 and exact_retrains(3, reduced=True) == 7  # what progress counts


@pytest.mark.slow
def test_readme_value_commands_run(value_ws: Path, tmp_path: Path) -> None:
    """The README's `fedlm value` commands run as written (on a small fed.toml of the same name)."""
    import shlex
    import subprocess
    import sys

    from fedlm.config import save_config
    from tests.test_cli import _readme_block

    save_config(_cfg(value_ws, 'data.silos=["legal", "legal_copy"]'), tmp_path / "fed.toml")  # 2 silos: 3 coalitions
    for line in _readme_block("## What each silo's data was worth", "sh").splitlines():
        cmd = shlex.split(line.split("#")[0])
        if not cmd:
            continue
        assert cmd[0] == "fedlm"
        proc = subprocess.run([sys.executable, "-m", "fedlm.cli", *cmd[1:]], cwd=tmp_path, capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, (line, proc.stdout[-2000:], proc.stderr[-2000:])
    body = json.loads((tmp_path / "runs" / "fed-valued" / "value.json").read_text())
    assert body["method"] == "exact" and any("reduced budget" in n for n in body["notes"])
    assert json.loads(proc.stdout)["method"] == "exact"


def _idle_app(silo: str):  # type: ignore[no-untyped-def]
    """The real ClientApp, except that `silo` returns the global weights unchanged (a zero update)."""
    from fedlm.federation.client_app import app
    from fedlm.federation.messages import read_train_request, train_reply

    def handle(msg: Message, context: Context) -> Message:
        if msg.metadata.message_type == "train" and context.node_config["silo"] == silo:
            req = read_train_request(msg)
            zero = {k: torch.zeros_like(v) for k, v in req.arrays.items()}
            return train_reply(msg, zero, {"num_tokens": 384.0, "loss": 5.0, "train_seconds": 0.1})
        return app(msg, context)

    return handle


@pytest.mark.slow
def test_rounds_flags_a_client_that_sends_the_global_weights_back(value_ws: Path, tmp_path: Path) -> None:
    """A silo whose client returns the global weights unchanged is a free rider by `rounds`."""
    from fedlm.federation.runner import run_federated
    from fedlm.value.run import value_run

    run = tmp_path / "run"
    cfg = _cfg(value_ws, 'federation.value="rounds"', 'data.silos=["legal", "legal_copy", "noise"]')
    run_federated(cfg, run, client_app=_idle_app("legal_copy"))
    body = value_run(run, method="rounds")
    assert body["silos"]["legal_copy"]["flag"] == "free_rider", body["silos"]
    assert body["coalitions_trained"] == 0
    assert math.isfinite(body["silos"]["legal"]["shapley"])


# ---------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing written


def _run_dir(tmp_path: Path, ws: Path, *extra: str) -> Path:
    from fedlm.config import save_config

    run = tmp_path / "run"
    run.mkdir()
    save_config(_cfg(ws, *extra), run / "config.toml")
    return run


def test_a_lora_run_is_valued_with_adapters_on_the_wire(value_ws: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16 LoRA run over a frozen base, its checkpoint deleted as `fedlm demo --assistant` leaves it:
    every model the silos score (coalitions, local-only, federated, personalised) travels as adapters, and
    the values sum to grand - baseline, with gains beside them."""
    from fedlm.config import ModelConfig
    from fedlm.data.tokenizer import load_tokenizer
    from fedlm.federation.runner import run_federated
    from fedlm.federation.valuation import SCORE_BF16
    from fedlm.model import Transformer
    from fedlm.modelio import save_model
    from fedlm.train import personalise
    from fedlm.value import run as value_mod

    base = tmp_path / "base"
    torch.manual_seed(3)
    save_model(Transformer(ModelConfig(preset="tiny", max_seq_len=64,
                                       vocab_size=load_tokenizer(value_ws / "tokenizer.json").get_vocab_size())),
               base, tokenizer_path=value_ws / "tokenizer.json")
    cfg = _cfg(value_ws, f"train.init_from={json.dumps(str(base))}", "lora.rank=2", "federation.rounds=2",
               "federation.local_steps=2", "federation.personalise_steps=1", "model.preset=tiny", "model.max_seq_len=64",
               'train.precision="bf16"')
    run = tmp_path / "run"
    run_federated(cfg, run)
    personalise(cfg, run)
    shutil.rmtree(run / "checkpoint")
    sent: list[set[str]] = []
    real = value_mod.score_on_silos

    def tap(grid: Any, node_of: Any, models: dict[str, list[dict[str, torch.Tensor]]], **kw: Any) -> Any:
        sent.extend(set(state) for states in models.values() for state in states)
        return real(grid, node_of, models, **kw)

    monkeypatch.setattr(value_mod, "score_on_silos", tap)
    body = value_mod.value_run(run, method="exact", budget=10.0)
    assert sent and all(names and all(".lora_" in n for n in names) for names in sent)
    assert sum(v["shapley"] for v in body["silos"].values()) == pytest.approx(
        body["grand_utility"] - body["baseline_utility"], abs=1e-9)
    assert all(v["gain"] is not None and v["gain_personalised"] is not None for v in body["silos"].values())
    assert SCORE_BF16 in body["notes"]  # scored in the run's precision where the CPU has bf16 units, and said so


@pytest.mark.parametrize(("case", "expect"), [
    ("no_config", "not a run directory"),
    ("centralised", "not a federated run"),
    ("one_silo", "at least 2 silos"),
    ("shards_gone", "legal_copy"),
    ("rounds_secagg", "secure aggregation"),
    ("budget_zero", "must be an amount > 0"),
    ("budget_fraction", "2 decimals"),
    ("not_finished", "not finished (0 of 4 rounds); it has no checkpoint/ to resume from"),
    ("not_finished_resumable", "not finished (1 of 4 rounds); finish it with `fedlm train"),
])
def test_bad_input_is_one_line_and_exit_2(value_ws: Path, tmp_path: Path, case: str, expect: str) -> None:
    """Each bad input gets one line naming what and where, exit 2, and no value.json or work folder."""
    from fedlm.errors import UserError
    from fedlm.value.run import value_run

    ws = value_ws
    args: dict[str, object] = {}
    if case == "no_config":
        run = tmp_path / "empty"
        run.mkdir()
    elif case == "centralised":
        run = _run_dir(tmp_path, ws, "train.mode=centralised")
    elif case == "one_silo":
        run = _run_dir(tmp_path, ws, 'data.silos=["legal"]')
    elif case == "shards_gone":
        ws = tmp_path / "ws"
        shutil.copytree(value_ws, ws)
        (ws / "silos" / "legal_copy" / "train.bin").unlink()
        run = _run_dir(tmp_path, ws)
    elif case == "rounds_secagg":
        run = _run_dir(tmp_path, ws, "federation.secure_aggregation=true")
        args["method"] = "rounds"
    elif case.startswith("budget"):
        run = _run_dir(tmp_path, ws)
        args["budget"] = 0.0 if case == "budget_zero" else 10.005
    else:
        run = _run_dir(tmp_path, ws)
    if case == "not_finished_resumable":  # one round logged and checkpointed
        (run / "checkpoint").mkdir()
        (run / "rounds.jsonl").write_text(json.dumps({"round": 1, "completed": True}) + "\n")
    with pytest.raises(UserError) as err:
        value_run(run, **args)  # type: ignore[arg-type]
    assert expect in str(err.value) and "\n" not in str(err.value)
    assert not (run / "value.json").exists() and not list(run.glob(".value-*"))


def test_cli_value_bad_input_exits_2(tmp_path: Path) -> None:
    """`fedlm value` on a folder that is no run: exit 2 with one line."""
    import subprocess
    import sys

    (tmp_path / "x").mkdir()
    proc = subprocess.run([sys.executable, "-m", "fedlm.cli", "value", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "not a run directory" in proc.stdout + proc.stderr
    assert len((proc.stdout + proc.stderr).strip().splitlines()) == 1


def test_cli_says_what_an_interrupted_valuation_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C during `fedlm value`: exit 130 with one line saying what was kept (Typer used to swallow the
    interrupt's message, and the CLI's own "interrupted" line never showed)."""
    import sys

    from fedlm import cli
    from fedlm.value import run

    def interrupted(*a: Any, **kw: Any) -> None:
        raise KeyboardInterrupt("the 2 coalitions retrained so far are kept in RUN/.value-progress.json")

    monkeypatch.setattr(run, "value_run", interrupted)
    monkeypatch.setattr(sys, "argv", ["fedlm", "value", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["interrupted: the 2 coalitions retrained so far are kept in "
                                        "RUN/.value-progress.json"], err


def test_rounds_with_secure_aggregation_is_refused_before_round_1(value_ws: Path, tmp_path: Path) -> None:
    """`fedlm train` with federation.value = "rounds" and secure aggregation: exit 2 before any round,
    saying why and pointing to exact/sampled."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "fedlm.cli", "train", "/dev/null", "--out", str(tmp_path / "r"),
                           "--set", f"data.workspace={json.dumps(str(value_ws))}", "--set", "train.mode=federated",
                           "--set", "federation.secure_aggregation=true", "--set", 'federation.value="rounds"'],
                          capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "secure aggregation" in out and "--method exact" in out
    assert not (tmp_path / "r" / "rounds.jsonl").exists()


def test_rounds_that_would_not_fit_in_memory_is_refused_before_round_1(
        value_ws: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """2^n - 2 coalition models (with the server optimiser's state) beyond the memory available: a
    UserError naming the count and pointing to `--method sampled`, before any round is trained."""
    from types import SimpleNamespace

    import torch

    import fedlm.federation.valuation as valuation
    from fedlm.errors import UserError
    from fedlm.federation.runner import run_federated

    def available(n: int) -> None:
        monkeypatch.setattr(valuation.psutil, "virtual_memory", lambda: SimpleNamespace(available=n))

    state = {"w": torch.zeros(10)}  # 40 bytes; fedavg holds each coalition's weights and one round's aggregate
    available(6 * 40 * 2)
    valuation.check_memory(state, 6, "fedavg")  # exactly enough
    available(6 * 40 * 2 - 1)
    with pytest.raises(UserError, match=r"6 coalition models"):
        valuation.check_memory(state, 6, "fedavg")
    available(6 * 40 * 2)  # enough for fedavg, not for fedsgd's AdamW gradient and moments per coalition
    with pytest.raises(UserError, match=r"fedsgd optimiser's state"):
        valuation.check_memory(state, 6, "fedsgd")

    available(1)
    with pytest.raises(UserError, match=r"6 coalition models .*--method sampled"):  # 3 silos: 2^3 - 2
        run_federated(_cfg(value_ws, 'federation.value="rounds"'), tmp_path / "r")
    rounds = tmp_path / "r" / "rounds.jsonl"
    assert not rounds.exists() or not rounds.read_text().strip()


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam", "fedsgd"])
def test_coalition_models_step_like_the_run_optimiser_on_each_coalition_alone(strategy: str, tmp_path: Path) -> None:
    """The stacked in-run coalition models equal, per coalition, the run's own server optimiser
    (a fresh one per coalition) stepped on the token-weighted mean of that coalition's updates,
    norm clipping and weight decay included; the empty coalition is the start, the grand one the run."""
    from fedlm.config import load_config
    from fedlm.federation.exchanges import RoundResult
    from fedlm.federation.strategies import make_server_optimizer
    from fedlm.federation.task import federated_train_config
    from fedlm.federation.valuation import CoalitionModels

    cfg = load_config(None, ["train.mode=federated", f'federation.strategy="{strategy}"', "train.grad_clip=0.5",
                             "federation.local_steps=1", "federation.server_lr=0.5"])
    silos = ["a", "b", "c"]
    gen = torch.Generator().manual_seed(0)
    begin = {"w": torch.randn(4, 3, generator=gen), "norm": torch.randn(3, generator=gen)}

    def optimizer(shapes: dict[str, tuple[int, ...]], *, clip: bool):  # type: ignore[no-untyped-def]
        tc = federated_train_config(cfg)
        if not clip:
            tc = dataclasses.replace(tc, grad_clip=0.0)
        fed = cfg.federation
        return make_server_optimizer(strategy, tc=tc, shapes=shapes, lr=fed.server_lr, beta1=fed.server_beta1,
                                     beta2=fed.server_beta2, tau=fed.server_tau)

    class Run:  # the fields of ServerRun that start_run reads
        def __init__(self) -> None:
            self.cfg, self.silos, self.run_dir, self.rounds_done = cfg, silos, tmp_path, 0
            self.global_state = dict(begin)
            self.optimizer = optimizer({n: tuple(t.shape) for n, t in begin.items()}, clip=True)
            self.model = torch.nn.Module()
            self.model.w = torch.nn.Parameter(begin["w"].clone())
            self.model.norm = torch.nn.Parameter(begin["norm"].clone())

    tracker = CoalitionModels.start_run(Run())  # type: ignore[arg-type]
    refs = {c: (optimizer({n: tuple(t.shape) for n, t in begin.items()}, clip=True), dict(begin))
            for c in tracker.coalitions}
    for _ in range(3):
        updates = {s: {n: torch.randn(t.shape, generator=gen) for n, t in begin.items()} for s in silos}
        tokens = {"a": 100.0, "b": 300.0, "c": 50.0}
        tracker.observe(RoundResult(update={}, tokens=tokens, updates=updates), cfg)
        for c, (opt, state) in refs.items():
            total = sum(tokens[s] for s in c)
            agg = {n: sum(tokens[s] / total * updates[s][n] for s in sorted(c)) for n in begin}
            refs[c] = (opt, opt.apply(state, agg))  # type: ignore[arg-type]
    final = {n: t + 1.0 for n, t in begin.items()}
    models = tracker.models(final)
    assert models[frozenset()] is tracker.begin and models[frozenset(silos)] is final
    for c, (_, state) in refs.items():
        for n in begin:
            assert torch.allclose(models[c][n], state[n], atol=1e-6), (c, n)


def test_silo_scores_are_evaluate_silos_bits_per_byte(value_ws: Path) -> None:
    """What a silo sends back for each model is `evaluate_silo`'s bits/byte of that model on the start
    of its validation split (the split and tokenizer read once per silo, not per model)."""
    from fedlm.config import config_to_toml
    from fedlm.data.tokenizer import tokenizer_hash
    from fedlm.evaluate import evaluate_silo
    from fedlm.federation.client_app import app
    from fedlm.federation.grid import InProcessGrid
    from fedlm.federation.task import wire_names
    from fedlm.federation.valuation import score_on_silos
    from fedlm.resolve import resolve_config
    from fedlm.train import build_model

    cfg = resolve_config(_cfg(value_ws))
    models = [build_model(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed))) for seed in range(3)]
    states = [{n: m.state_dict()[n] for n in wire_names(m)} for m in models]
    silos = ["legal", "noise"]
    grid = InProcessGrid(app, {i + 1: {"workspace": str(value_ws), "silo": s} for i, s in enumerate(silos)})
    try:
        got = score_on_silos(grid, {"legal": 1, "noise": 2}, dict.fromkeys(silos, states),
                             config_text=config_to_toml(cfg), tokenizer_sha256=tokenizer_hash(value_ws / "tokenizer.json"),
                             max_tokens=500, timeout=120)
    finally:
        grid.close()
    for silo in silos:
        ref = [evaluate_silo(m, None, value_ws / "silos" / silo, max_tokens=500) for m in models]
        assert got[silo].bits_per_byte == [r["bits_per_byte"] for r in ref], silo
        assert got[silo].tokens == ref[0]["tokens"] <= 500
    assert len(set(got["legal"].bits_per_byte)) == 3  # three different models, three different numbers


def test_a_chat_silo_scores_the_answers_of_its_held_out_conversations(tmp_path: Path) -> None:
    """On a chat silo the utility is `fedlm eval`'s answer bits/byte (what tuning trains on; the
    prompts' bits/byte can rise while the answers' fall), over the held-out conversations that fit
    value.eval_tokens (at least one)."""
    from fedlm.config import config_to_toml
    from fedlm.data.shards import open_chat, open_split
    from fedlm.data.tokenizer import tokenizer_hash
    from fedlm.evaluate import answer_metrics, held_out_questions
    from fedlm.federation.client_app import app
    from fedlm.federation.grid import InProcessGrid
    from fedlm.federation.task import wire_names
    from fedlm.federation.valuation import score_on_silos
    from fedlm.resolve import resolve_config
    from fedlm.train import build_model
    from tests.test_chat import chat_workspace, qa_records

    ws = chat_workspace(tmp_path, qa_records(60))
    cfg = resolve_config(_cfg(ws, "model.max_seq_len=128", "train.seq_len=128"))
    models = [build_model(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed))) for seed in range(2)]
    states = [{n: m.state_dict()[n] for n in wire_names(m)} for m in models]
    convs = held_out_questions(open_split(ws / "silos" / "qa", "val"), open_chat(ws / "silos" / "qa", "val"))
    first_two = int(convs[0][0].size + convs[1][0].size)
    grid = InProcessGrid(app, {1: {"workspace": str(ws), "silo": "qa"}})
    try:
        def score(max_tokens: int):  # type: ignore[no-untyped-def]
            return score_on_silos(grid, {"qa": 1}, {"qa": states}, config_text=config_to_toml(cfg),
                                  tokenizer_sha256=tokenizer_hash(ws / "tokenizer.json"), max_tokens=max_tokens,
                                  timeout=120)["qa"]
        whole, two, one = score(0), score(first_two), score(1)
    finally:
        grid.close()
    ref = [answer_metrics(m, ws / "silos" / "qa", max_new_tokens=1)["answer_bits_per_byte"] for m in models]
    assert whole.bits_per_byte == pytest.approx(ref, rel=1e-5)
    assert whole.tokens == sum(int(mask[1:].sum()) for _, mask, _ in convs)  # the answers' tokens only
    assert two.tokens == sum(int(mask[1:].sum()) for _, mask, _ in convs[:2])
    assert one.tokens == int(convs[0][1][1:].sum())  # a cap below one conversation still scores one
    assert len(set(whole.bits_per_byte)) == 2


def _lying_game(effect: dict[str, dict[str, float]], lie: Callable[[frozenset[str], dict[str, float]], None] | None
                ) -> Any:
    """A game where silo i lowers beneficiary j's bits/byte by effect[i][j] when in the coalition; `lie` edits the
    honest reports of each coalition in place (a silo misreporting its own scores)."""
    from fedlm.value.compute import Game

    players = sorted(effect)

    def score(c: frozenset[str]) -> dict[str, float]:
        out = {j: 4.0 - sum(effect[i][j] for i in c) for j in players}
        if lie is not None:
            lie(c, out)
        return out
    return Game(list(players), list(players), dict.fromkeys(players, 1000), dict.fromkeys(players, 4.0), score)


def _pay(game: Any, pay_by: str) -> tuple[dict[str, float], dict[str, float | None], list[str]]:
    from fedlm.value.compute import contributions, flag_silos, pay_weights, payouts

    body = contributions(game, method="exact")
    flags = flag_silos(game, body)
    share, pay = payouts(pay_weights(game, body, flags, pay_by), budget=100.0)
    assert sum(Decimal(str(x)) for x in pay.values()) == Decimal("100")  # type: ignore[arg-type]
    return share, pay, sorted(flags)


def test_a_budget_no_silo_earned_is_said_unpaid() -> None:
    """Silos whose data helps only their own split (each lowers the others' bits/byte, as three unlike
    domains did on a from-scratch run) are all flagged harmful: paid by Shapley value nobody earns a cent, and
    value.json says the budget is unpaid and why, where it used to print payouts of 0 that sum to nothing.
    Paid by the others, the budget is paid out in full."""
    from fedlm.value.compute import contributions, flag_silos
    from fedlm.value.run import _value_json

    effect = {"a": {"a": 0.5, "b": -0.1, "c": -0.1}, "b": {"a": -0.2, "b": 0.4, "c": -0.1},
              "c": {"a": -0.1, "b": -0.1, "c": 0.6}}
    game = _lying_game(effect, None)
    body = contributions(game, method="exact")
    flags = flag_silos(game, body)
    assert sorted(flags) == ["a", "b", "c"]
    gained: dict[str, dict[str, float | None]] = {s: {} for s in effect}
    for pay_by, unpaid in (("shapley", 100.0), ("others", 0.0)):
        out = _value_json("exact", game, body, flags, gained, [], budget=Decimal("100"), trained=0, seconds=0.0,
                          pay_by=pay_by)
        assert out["unpaid"] == unpaid
        assert sum(Decimal(str(v["payout"])) for v in out["silos"].values()) + Decimal(str(unpaid)) == 100
        assert any(n.startswith("none of the budget (100.00) is paid") for n in out["notes"]) == bool(unpaid)
    assert _value_json("exact", game, body, flags, gained, [], budget=None, trained=0, seconds=0.0)["unpaid"] is None


def test_paying_by_the_others_is_not_moved_by_a_silos_own_scores() -> None:
    """Silo a misreports its own scores three ways. Inflating its split's gain from every model trained with its
    data raises its Shapley share. Paid by the others, none of the lies moves its share: not reporting that the
    others' data helped it (which, with shares in proportion to the value to the others, moved its pay from 33.34
    to 50.00), nor blaming b for harming its split (which got b flagged and paid 0, and a paid 50.00)."""
    effect = {"a": {"a": 0.5, "b": 0.2, "c": 0.1}, "b": {"a": 0.1, "b": 0.3, "c": 0.2}, "c": {"a": 0.2, "b": 0.1, "c": 0.4}}

    def inflate(c: frozenset[str], out: dict[str, float]) -> None:
        out["a"] -= 1.0 if "a" in c else 0.0

    def flat(c: frozenset[str], out: dict[str, float]) -> None:
        out["a"] = 4.0 - (0.5 if "a" in c else 0.0)

    def blame_b(c: frozenset[str], out: dict[str, float]) -> None:
        out["a"] += 0.5 if "b" in c else 0.0

    honest = {pay_by: _pay(_lying_game(effect, None), pay_by) for pay_by in ("shapley", "others")}
    assert honest["others"][0] == pytest.approx(dict.fromkeys("abc", 1 / 3))  # a symmetric game: equal thirds
    assert _pay(_lying_game(effect, inflate), "shapley")[0]["a"] > honest["shapley"][0]["a"] + 0.1
    for lie in (inflate, flat, blame_b):
        share, pay, flags = _pay(_lying_game(effect, lie), "others")
        assert share["a"] == pytest.approx(honest["others"][0]["a"], abs=1e-12), lie.__name__
        assert pay["a"] == pytest.approx(33.33, abs=0.011), lie.__name__  # the cent a remainder may move
    share, pay, flags = _pay(_lying_game(effect, blame_b), "others")
    assert flags == ["b"] and pay["b"] == pytest.approx(200 / 9, abs=0.01)  # flagged, and still paid by c


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-0.5, 1.0), min_size=16, max_size=16), st.sampled_from("abcd"),
       st.lists(st.floats(0.0, 8.0), min_size=16, max_size=16))
def test_no_report_moves_the_reporters_own_share_when_paid_by_the_others(
        effects: list[float], liar: str, reports: list[float]) -> None:
    """Whatever bits/byte a silo reports for each coalition's model (16 arbitrary numbers), its share paid by the
    others is the one its honest reports would have given; the shares sum to 1."""
    players = "abcd"
    effect = {i: {j: effects[4 * k + m] for m, j in enumerate(players)} for k, i in enumerate(players)}
    coalitions = sorted((frozenset(c) for n in range(5) for c in itertools.combinations(players, n)), key=sorted)

    def lie(c: frozenset[str], out: dict[str, float]) -> None:
        out[liar] = reports[coalitions.index(c)]

    honest, _, _ = _pay(_lying_game(effect, None), "others")
    lied, _, _ = _pay(_lying_game(effect, lie), "others")
    assert lied[liar] == pytest.approx(honest[liar], abs=1e-12)
    assert sum(lied.values()) == pytest.approx(1.0)




@pytest.mark.slow
@pytest.mark.parametrize("mode", ["record", "client"])
def test_a_dp_runs_valuation_states_the_privacy_it_spent(value_ws: Path, tmp_path: Path, mode: str) -> None:
    """Under DP every model a valuation trains on a silo's data is another release of it: each retrained
    coalition that holds the silo, and (record-level) its local-only baseline. value.json composes them
    with the run's by the same accountant (RDP; the reference here is Opacus's own accountant over the
    same steps) and the output says so. Under client-level DP the local-only baseline trains without
    noise (client DP protects a silo inside a federation), where it used to stop the valuation."""
    from fedlm.federation.runner import run_federated
    from fedlm.privacy.accounting import client_epsilon, record_epsilon
    from fedlm.value.run import value_run

    dp = ([f"privacy.mode=\"{mode}\"", "privacy.target_epsilon=8", "privacy.delta=1e-4"] if mode == "record" else
          [f"privacy.mode=\"{mode}\"", "privacy.target_epsilon=8", "privacy.delta=0.1"])
    cfg = _cfg(value_ws, "federation.rounds=1", "federation.local_steps=1", *dp)
    run = tmp_path / "run"
    run_federated(cfg, run)
    ran = json.loads((run / "privacy.json").read_text())["silos"]
    body = value_run(run)
    spent = body["privacy"]
    assert spent["mode"] == mode and spent["target_epsilon"] == 8.0
    for silo, got in spent["silos"].items():
        z, q, n = ran[silo]["history"][0]
        # the run, and the coalitions {silo}, {silo, x}, {silo, y} retrained; record: the local baseline too
        releases = 5 if mode == "record" else 4
        assert got["releases"] == releases and got["epsilon_run"] == pytest.approx(ran[silo]["epsilon"])
        if mode == "record":  # every release is the silo's one DP-SGD step with the same plan
            want = record_epsilon(noise_multiplier=z, sample_rate=q, steps=releases * n, delta=1e-4)
        else:  # one Gaussian release per run, each calibrated to the run's target over its one round
            want = client_epsilon([z] * releases, delta=0.1)
        assert got["epsilon_with_valuation"] == pytest.approx(want, rel=1e-6)
        assert got["epsilon_with_valuation"] > got["epsilon_run"]
    assert any(note.startswith("DP: every model this valuation trained") for note in body["notes"])
    assert (mode == "client") == any("local-only baseline trained without DP noise" in n for n in body["notes"])


def _noise_fits(value_ws: Path, tmp_path: Path, *, releases: int) -> tuple[Path, Any, int]:
    """A copy of the workspace whose silo 'noise' has a lifetime record-level DP policy that fits `releases`
    of its plan in a 1-round run at ε = 8 (δ = 1e-4), not one more; (workspace, the run's config, its steps)."""
    from fedlm.data.shards import open_split
    from fedlm.federation.task import silo_record_plan
    from fedlm.privacy.accounting import record_epsilon

    ws = tmp_path / "ws"
    shutil.copytree(value_ws, ws, ignore=shutil.ignore_patterns(".secrets"))
    cfg = _cfg(ws, "federation.rounds=1", "federation.local_steps=1", 'privacy.mode="record"',
               "privacy.target_epsilon=8", "privacy.delta=1e-4")
    noise = ws / "silos" / "noise"
    plan = silo_record_plan(cfg, noise, open_split(noise, "train"))
    fits, passes = (record_epsilon(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
                                   steps=k * plan.steps, delta=1e-4) for k in (releases, releases + 1))
    (noise / "privacy.toml").write_text(f'[privacy]\nmode = "record"\ntarget_epsilon = {(fits + passes) / 2}\n'
                                        'delta = 1e-4\n')
    return ws, cfg, plan.steps


@pytest.mark.slow
def test_a_coalition_retrained_without_a_member_values_nothing(value_ws: Path, tmp_path: Path) -> None:
    """A silo that drops out of a round of a retrained coalition (here: its own lifetime ε, which fits the run
    and the first coalition retrained with it, not a third release) leaves a model of another coalition. It used
    to be valued as that coalition's, in silence; now the valuation stops naming the coalition, the silo,
    the rounds and its reason, and writes nothing."""
    from fedlm.errors import UserError
    from fedlm.federation.runner import run_federated
    from fedlm.value.run import value_run

    _, cfg, _ = _noise_fits(value_ws, tmp_path, releases=2)
    run = tmp_path / "run"
    run_federated(cfg, run)
    with pytest.raises(UserError, match=r"^retraining coalition \S*noise: silo noise dropped out of round 1 "
                                        r"\(round 1: .*silo 'noise': this round would take its own ε to .*; its model "
                                        r"is not that coalition's, so no values were written"):
        value_run(run)
    assert not (run / "value.json").exists()


@pytest.mark.slow
def test_a_silos_own_ledger_charges_its_local_only_baseline(value_ws: Path, tmp_path: Path) -> None:
    """Under record-level DP a silo's local-only baseline (the gain of joining) is DP-SGD on its data, and its
    score leaves the silo: another release, which the silo's own ledger used not to charge. Now a silo whose
    lifetime target fits the run and its three retrained coalitions, but not a fifth release, refuses the
    baseline: the valuation still writes every value, with no gain for that silo and its reason. A silo
    without a policy charges its baseline on that baseline config's ledger, and the same request again
    trains the same model and charges nothing new. Each silo's own account of it all (`fedlm silo spent`)
    is the ε the coordinator's value.json states."""
    import hashlib

    from typer.testing import CliRunner

    from fedlm.cli import app
    from fedlm.config import config_to_toml, load_config
    from fedlm.federation.runner import run_federated
    from fedlm.federation.valuation import _local_arrays, local_config
    from fedlm.value.run import value_run

    ws, cfg, n = _noise_fits(value_ws, tmp_path, releases=4)
    silos = ws / "silos"
    run = tmp_path / "run"
    run_federated(cfg, run)
    body = value_run(run)

    got = body["silos"]
    assert got["noise"]["gain"] is None and got["noise"]["local_only_bpb"] is None
    assert all(isinstance(got[s]["gain"], float) for s in ("legal", "legal_copy"))
    assert [s for s in got if got[s]["shapley"] is None] == []
    assert any(note.startswith("no gain for silo noise: silo 'noise': its local-only baseline would take its own ε to")
               for note in body["notes"]), body["notes"]
    releases = {s: v["releases"] for s, v in body["privacy"]["silos"].items()}
    assert releases == {"legal": 5, "legal_copy": 5, "noise": 4}  # the run, 3 coalitions; the baselines trained
    assert json.loads((run / "value.json").read_text())["silos"]["noise"]["gain"] is None

    ran = load_config(run / "config.toml")
    key = hashlib.sha256(config_to_toml(local_config(ran, "legal")).encode()).hexdigest()[:16]
    ledger = silos / "legal" / ".secrets" / "ledger.json"
    book = json.loads(ledger.read_text())
    entries = list(book[key]["releases"].values())
    assert len(entries) == 1 and entries[0][2] == n  # one release: its plan's every step
    # the silo's own account (`fedlm silo spent`) is the coordinator's: the run, coalitions and baseline composed
    for silo in ("legal", "noise"):
        r = CliRunner().invoke(app, ["silo", "spent", "--workspace", str(ws), "--silo", silo, "--json"])
        own = json.loads(r.output)
        assert r.exit_code == 0 and list(own["ledgers"]) == (["lifetime"] if silo == "noise" else sorted(own["ledgers"]))
        assert own["total"]["record"]["epsilon"] == pytest.approx(
            body["privacy"]["silos"][silo]["epsilon_with_valuation"], rel=1e-6)
        # counted without a cap too: the run's validation (2), 2^3 coalitions' models (the start's for the empty
        # one; the grand one's, the run's own, once for its value and its gain), and the baseline but where refused
        assert own["scored"] == 2 + 2 ** 3 + (silo == "legal") and own["max_scored_models"] is None
    first, again = (_local_arrays(silos / "legal", config_to_toml(ran)) for _ in range(2))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert json.loads(ledger.read_text()) == book  # the same release: nothing new charged


# ---------------------------------------------------------------------------------------
# a valuation that stops goes on where it stopped


def test_kept_scores_belong_to_one_game(tmp_path: Path) -> None:
    """A kept coalition is reused only under the same game: the same fingerprint, the same token counts, and
    start scores within the last bits (another thread count) but not a changed split's."""
    from fedlm.value.kept import Kept, fingerprint

    cfg = _cfg(tmp_path)
    fp = fingerprint(cfg, rounds=4, local_steps=3, beneficiaries=["a", "b"])
    assert fp != fingerprint(cfg, rounds=2, local_steps=3, beneficiaries=["a", "b"])
    assert fp != fingerprint(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=2)), rounds=4,
                             local_steps=3, beneficiaries=["a", "b"])
    start, tokens = {"a": 2.5, "b": 3.0}, {"a": 1024, "b": 1024}
    kept = Kept.open(tmp_path)
    kept.game(fp, start, tokens)
    assert not kept.path.exists()  # nothing retrained, nothing written
    kept.add(fp, "a", {"a": 2.0, "b": 2.9}, None, retrained=True)
    again = Kept.open(tmp_path)
    assert again.game(fp, {"a": 2.5 + 1e-8, "b": 3.0}, tokens) == {"a": {"bits_per_byte": {"a": 2.0, "b": 2.9},
                                                                           "privacy": None, "retrained": True}}
    for other_start, other_tokens in (({"a": 2.6, "b": 3.0}, tokens), (start, {"a": 1000, "b": 1024})):
        assert Kept.open(tmp_path).game(fp, other_start, other_tokens) == {}
    kept.path.write_text("{torn")
    assert Kept.open(tmp_path).game(fp, start, tokens) == {}


@pytest.mark.slow
def test_a_stopped_valuation_goes_on_where_it_stopped(value_ws: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped (Ctrl-C) after two of its six retrained coalitions, `fedlm value` keeps their scores and says so; the same call
    again retrains the other four only and writes the values an uninterrupted call wrote, bit for bit
    (in process, without DP, retraining is deterministic), then drops what it kept."""
    from fedlm.federation.runner import run_federated
    from fedlm.value.kept import NAME
    from fedlm.value.run import Scorer, value_run

    run = tmp_path / "run"
    run_federated(_cfg(value_ws, "federation.rounds=2"), run)
    reference = value_run(run)
    (run / "value.json").unlink()
    retrain, calls, stop_at = Scorer.retrain, [], [3]

    def stop_at_third(self: Any, cfg: Any, out: Path) -> None:
        calls.append(tuple(cfg.data.silos))
        if len(calls) in stop_at:
            raise KeyboardInterrupt
        retrain(self, cfg, out)

    monkeypatch.setattr(Scorer, "retrain", stop_at_third)
    with pytest.raises(KeyboardInterrupt, match=r"^the 2 coalitions retrained so far are kept in .*: the same command "
                                                 "again goes on from there$"):
        value_run(run)
    assert not (run / "value.json").exists() and len(json.loads((run / NAME).read_text()).popitem()[1]["coalitions"]) == 2
    calls.clear()
    stop_at.clear()
    body = value_run(run)
    assert len(calls) == 4 and body["coalitions_trained"] == 6
    assert body["coalition_bits_per_byte"] == reference["coalition_bits_per_byte"]
    assert {s: v["shapley"] for s, v in body["silos"].items()} == {s: v["shapley"] for s, v in reference["silos"].items()}
    assert "resumed: 2 of the 6 coalitions were retrained by an earlier call" in " ".join(body["notes"])
    assert not (run / NAME).exists()
    calls.clear()
    value_run(run)  # a valuation that finished keeps nothing: the next one retrains all
    assert len(calls) == 6


@pytest.mark.slow
def test_a_valuation_a_silos_budget_stopped_resumes_without_charging_again(value_ws: Path, tmp_path: Path) -> None:
    """A silo's lifetime ε (fitting the run and two retrained coalitions) stops the valuation; its admin raises
    the target and the same command goes on: the coalitions retrained before the stop are neither retrained
    nor scored again (each score counts against a silo's `max_scored_models`), and the coordinator's
    account in value.json, kept coalitions included, is each silo's own (`fedlm silo spent`)."""
    from typer.testing import CliRunner

    from fedlm.cli import app
    from fedlm.errors import UserError
    from fedlm.federation.runner import run_federated
    from fedlm.value.run import value_run

    ws, cfg, _ = _noise_fits(value_ws, tmp_path, releases=3)
    run = tmp_path / "run"
    run_federated(cfg, run)
    with pytest.raises(UserError, match=r"silo noise dropped out of round 1 .*\(the \d coalitions retrained so far "
                                        r"are kept in .*\.value-progress\.json: the same command again goes on") as e:
        value_run(run)
    assert len(str(e.value).split(":")[0].split("+")) == 2  # noise and another, who trained round 1 alone
    policy = ws / "silos" / "noise" / "privacy.toml"
    policy.write_text(policy.read_text().replace("target_epsilon", "target_epsilon = 1000\n#"))
    body = value_run(run)
    assert "resumed:" in " ".join(body["notes"])
    # each: the run, its 3 coalitions, its baseline (the stopped run's round, asked again, was the same release)
    assert {s: v["releases"] for s, v in body["privacy"]["silos"].items()} == dict.fromkeys(body["silos"], 5)
    for silo in ("legal", "legal_copy", "noise"):
        r = CliRunner().invoke(app, ["silo", "spent", "--workspace", str(ws), "--silo", silo, "--json"])
        assert r.exit_code == 0, r.output
        own = json.loads(r.output)
        assert own["total"]["record"]["epsilon"] == pytest.approx(
            body["privacy"]["silos"][silo]["epsilon_with_valuation"], rel=1e-6)
        # scored: the run's validation (2), the start (twice: once a call), 6 coalitions' models and the grand
        # one (once, for its value and its gain), and the baseline
        assert own["scored"] == 2 + 2 + 6 + 1 + 1, own
