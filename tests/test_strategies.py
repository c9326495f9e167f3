"""Server optimisers against a hand-written numpy version of Reddi et al. (2021), Algorithm 2,
and against Flower's own FedYogi/FedAdam; FedProx's term; deterministic silo sampling."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlm.federation.strategies import ServerOptimizer, sample_silos

SHAPES = {"w": (3, 4), "b": (4,)}
LR, B1, B2, TAU = 0.05, 0.9, 0.99, 1e-3


def _state(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def _t(d: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v.copy()) for k, v in d.items()}


def _reference(
    strategy: str, w0: dict[str, np.ndarray], deltas: list[dict[str, np.ndarray]], v0: float
) -> dict[str, np.ndarray]:
    """The paper's update rule in fp64 numpy, written from the paper, not from our code."""
    w = {k: v.astype(np.float64) for k, v in w0.items()}
    m = {k: np.zeros_like(v) for k, v in w.items()}
    v = {k: np.full_like(x, v0) for k, x in w.items()}
    for delta in deltas:
        for k in w:
            d = delta[k].astype(np.float64)
            if strategy == "fedavg":
                w[k] = w[k] + LR * d
                continue
            m[k] = B1 * m[k] + (1 - B1) * d
            if strategy == "fedadam":
                v[k] = B2 * v[k] + (1 - B2) * d**2
            else:
                v[k] = v[k] - (1 - B2) * d**2 * np.sign(v[k] - d**2)
            w[k] = w[k] + LR * m[k] / (np.sqrt(v[k]) + TAU)
    return w


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam", "fedyogi"])
@pytest.mark.parametrize("steps", [1, 4])
def test_server_optimizer_matches_the_papers_rule(strategy: str, steps: int) -> None:
    """One and several rounds equal the numpy reference, with v0 = tau^2 as in the paper."""
    rng = np.random.default_rng(steps)
    w0 = _state(rng)
    deltas = [
        {k: (0.1 * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}
        for _ in range(steps)
    ]
    opt = ServerOptimizer(strategy, lr=LR, beta1=B1, beta2=B2, tau=TAU)
    w = _t(w0)
    for d in deltas:
        w = opt.apply(w, _t(d))
    ref = _reference(strategy, w0, deltas, TAU * TAU)
    for k in SHAPES:
        np.testing.assert_allclose(w[k].numpy(), ref[k], rtol=1e-5, atol=1e-6)


def test_fedprox_server_step_is_fedavgs() -> None:
    rng = np.random.default_rng(0)
    w0, d = _state(rng), _state(rng)
    a = ServerOptimizer("fedprox", lr=0.5, beta1=B1, beta2=B2, tau=TAU).apply(_t(w0), _t(d))
    for k in SHAPES:
        np.testing.assert_allclose(a[k].numpy(), w0[k] + 0.5 * d[k], rtol=1e-6)


def _flower_replies(arrays: list[dict[str, np.ndarray]], weights: list[int]) -> list:
    from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict

    msgs = []
    for i, (arr, n) in enumerate(zip(arrays, weights, strict=True)):
        content = RecordDict(
            {
                "arrays": ArrayRecord({k: Array(v) for k, v in arr.items()}),
                "metrics": MetricRecord({"num-examples": n}),
            }
        )
        md = Metadata(
            run_id=1,
            message_id=f"m{i}",
            src_node_id=i + 1,
            dst_node_id=0,
            reply_to_message_id="r",
            group_id="1",
            created_at=time.time(),
            ttl=3600.0,
            message_type="train",
        )
        msgs.append(Message(content, metadata=md))
    return msgs


@pytest.mark.parametrize("strategy", ["fedyogi", "fedadam"])
def test_matches_flowers_strategies(strategy: str) -> None:
    """Second reference: Flower 1.42's FedYogi (v0 = 0) over 3 rounds, and FedAdam's first round
    (its bias correction folded into our lr), each fed silos' weights with token counts."""
    from flwr.serverapp.strategy import FedAdam, FedYogi

    logging.getLogger("flwr").setLevel(logging.WARNING)
    rng = np.random.default_rng(7)
    tokens = [100, 300, 50]
    flower = (FedYogi if strategy == "fedyogi" else FedAdam)(eta=LR, beta_1=B1, beta_2=B2, tau=TAU)
    rounds = 3 if strategy == "fedyogi" else 1
    lr = LR
    if strategy == "fedadam":  # Flower's eta_norm at server_round = 1
        lr = LR * np.sqrt(1 - B2**2) / (1 - B1**2)
    ours = ServerOptimizer(strategy, lr=float(lr), beta1=B1, beta2=B2, tau=TAU, initial_v=0.0)
    w = _state(rng)
    w_ours = _t(w)
    for r in range(1, rounds + 1):
        local = [
            {k: v + (0.1 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in w.items()}
            for _ in tokens
        ]
        flower.current_arrays = {k: v.copy() for k, v in w.items()}
        out, _ = flower.aggregate_train(r, _flower_replies(local, tokens))
        mean_update = {
            k: np.average([loc[k] - w[k] for loc in local], axis=0, weights=tokens) for k in w
        }
        w_ours = ours.apply(
            w_ours, {k: torch.from_numpy(v.astype(np.float32)) for k, v in mean_update.items()}
        )
        w = {k: out[k].numpy().astype(np.float32) for k in w}
        for k in w:
            np.testing.assert_allclose(w_ours[k].numpy(), w[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", ["fedadam", "fedyogi"])
def test_state_dict_resume_is_bitwise(strategy: str) -> None:
    """3 rounds, save, load into a fresh optimiser, 2 more == 5 rounds uninterrupted, bitwise."""
    rng = np.random.default_rng(3)
    w0 = _t(_state(rng))
    deltas = [_t({k: 0.1 * v for k, v in _state(rng).items()}) for _ in range(5)]
    a = ServerOptimizer(strategy, lr=LR, beta1=B1, beta2=B2, tau=TAU)
    wa = w0
    for d in deltas:
        wa = a.apply(wa, d)
    b = ServerOptimizer(strategy, lr=LR, beta1=B1, beta2=B2, tau=TAU)
    wb = w0
    for d in deltas[:3]:
        wb = b.apply(wb, d)
    saved = {k: v.clone() for k, v in b.state_dict().items()}
    c = ServerOptimizer(strategy, lr=LR, beta1=B1, beta2=B2, tau=TAU)
    c.load_state_dict(saved)
    assert c.step == 3
    for d in deltas[3:]:
        wb = c.apply(wb, d)
    for k in SHAPES:
        assert torch.equal(wa[k], wb[k])


def test_apply_rejects_unknown_names_and_keeps_the_rest() -> None:
    w = {"w": torch.ones(2), "frozen": torch.zeros(3)}
    opt = ServerOptimizer("fedavg", lr=1.0, beta1=B1, beta2=B2, tau=TAU)
    new = opt.apply(w, {"w": torch.ones(2)})
    assert torch.equal(new["w"], torch.full((2,), 2.0)) and new["frozen"] is w["frozen"]
    with pytest.raises(ValueError, match="nope"):
        opt.apply(w, {"nope": torch.ones(1)})
    with pytest.raises(ValueError, match="shape"):
        opt.apply(w, {"w": torch.ones(3)})
    with pytest.raises(ValueError, match="unknown strategy"):
        ServerOptimizer("fedsgd", lr=1.0, beta1=B1, beta2=B2, tau=TAU)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 12),
    fraction=st.floats(0.01, 1.0),
    round_idx=st.integers(0, 1000),
    seed=st.integers(0, 2**31),
)
def test_sample_silos_is_deterministic_and_sized(
    n: int, fraction: float, round_idx: int, seed: int
) -> None:
    silos = [f"silo{i}" for i in range(n)]
    a = sample_silos(silos, fraction=fraction, round_idx=round_idx, seed=seed)
    assert a == sample_silos(silos, fraction=fraction, round_idx=round_idx, seed=seed)
    assert 1 <= len(a) <= n and len(set(a)) == len(a) and set(a) <= set(silos)
    assert len(a) >= fraction * n - 1e-9  # at least the asked share
    assert a == [s for s in silos if s in a]  # in the given order


def test_sample_silos_varies_over_rounds_and_covers_everyone() -> None:
    silos = [f"s{i}" for i in range(6)]
    picks = [tuple(sample_silos(silos, fraction=0.5, round_idx=r, seed=1)) for r in range(30)]
    assert all(len(p) == 3 for p in picks)
    assert len(set(picks)) > 5
    assert {s for p in picks for s in p} == set(silos)
    assert sample_silos(silos, fraction=1.0, round_idx=4, seed=9) == silos
