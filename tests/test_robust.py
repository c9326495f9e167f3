"""Robust rounds: aggregation against numpy/scipy, and rejection of malformed or oversized updates."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats

from fedlm.federation.robust import aggregate, check_update, update_norm

SHAPES = {"layers.0.wq": (4, 3), "norm": (3,)}


def _updates(rng: np.random.Generator, n: int) -> list[dict[str, np.ndarray]]:
    return [
        {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(n)
    ]


def _t(d: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in d.items()}


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 7),
    seed=st.integers(0, 2**32 - 1),
    tokens=st.lists(st.integers(1, 10**6), min_size=7, max_size=7),
)
def test_weighted_mean_is_numpy_average(n: int, seed: int, tokens: list[int]) -> None:
    """FedAvg: the token-weighted mean equals numpy.average(..., weights=tokens)."""
    ups = _updates(np.random.default_rng(seed), n)
    w = tokens[:n]
    got = aggregate([_t(u) for u in ups], [float(x) for x in w], method="mean", trim_fraction=0.0)
    for k in SHAPES:
        ref = np.average(np.stack([u[k] for u in ups]), axis=0, weights=w)
        np.testing.assert_allclose(got[k].numpy(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 5, 6, 10, 20])
@pytest.mark.parametrize("trim", [0.0, 0.1, 0.2, 0.34, 0.49])
def test_trimmed_mean_is_scipys(n: int, trim: float) -> None:
    ups = _updates(np.random.default_rng(n), n)
    got = aggregate([_t(u) for u in ups], [1.0] * n, method="trimmed_mean", trim_fraction=trim)
    for k in SHAPES:
        ref = stats.trim_mean(np.stack([u[k] for u in ups]).astype(np.float64), trim, axis=0)
        np.testing.assert_allclose(got[k].numpy(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 17])
def test_median_is_numpys(n: int) -> None:
    """Coordinate-wise median, the mean of the middle two for an even count, like numpy."""
    ups = _updates(np.random.default_rng(10 + n), n)
    got = aggregate([_t(u) for u in ups], [5.0] * n, method="median", trim_fraction=0.0)
    for k in SHAPES:
        ref = np.median(np.stack([u[k] for u in ups]), axis=0)
        np.testing.assert_allclose(got[k].numpy(), ref, rtol=1e-6)


def test_robust_methods_resist_one_outlier_and_ignore_weights() -> None:
    good = [{"w": torch.full((3,), 1.0 + 0.01 * i)} for i in range(4)]
    bad = {"w": torch.full((3,), 1e6)}
    ups = [*good, bad]
    med = aggregate(ups, [1, 1, 1, 1, 1000], method="median", trim_fraction=0.0)
    trimmed = aggregate(ups, [1, 1, 1, 1, 1000], method="trimmed_mean", trim_fraction=0.2)
    assert float(med["w"].max()) < 1.1 and float(trimmed["w"].max()) < 1.1
    assert float(aggregate(ups, [1.0] * 5, method="mean", trim_fraction=0.0)["w"][0]) > 1e5


def test_aggregate_rejects_bad_arguments() -> None:
    u = {"w": torch.ones(2)}
    with pytest.raises(ValueError, match="at least one"):
        aggregate([], [], method="mean", trim_fraction=0.0)
    with pytest.raises(ValueError, match="weights"):
        aggregate([u, u], [1.0], method="mean", trim_fraction=0.0)
    with pytest.raises(ValueError, match="weights"):
        aggregate([u, u], [0.0, 0.0], method="mean", trim_fraction=0.0)
    with pytest.raises(ValueError, match="names"):
        aggregate([u, {"v": torch.ones(2)}], [1.0, 1.0], method="mean", trim_fraction=0.0)


def _good() -> dict[str, torch.Tensor]:
    return {k: torch.full(s, 0.1) for k, s in SHAPES.items()}


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (
            lambda u: u["layers.0.wq"].__setitem__((1, 2), float("nan")),
            "non-finite values in layers.0.wq",
        ),
        (lambda u: u["norm"].__setitem__(0, float("inf")), "non-finite values in norm"),
        (lambda u: u["norm"].__setitem__(0, -float("inf")), "non-finite values in norm"),
        (lambda u: u.pop("norm"), "missing array norm"),
        (lambda u: u.__setitem__("extra", torch.zeros(1)), "unexpected array extra"),
        (lambda u: u.__setitem__("norm", torch.zeros(4)), "shape mismatch for norm"),
        (lambda u: u.__setitem__("norm", torch.zeros(3, dtype=torch.int64)), "non-float dtype"),
        (lambda u: u["norm"].__setitem__(0, 10.0), "> bound 5"),
    ],
)
def test_check_update_names_the_reason(mutate, needle: str) -> None:  # type: ignore[no-untyped-def]
    u = _good()
    assert check_update(u, expected=SHAPES, max_norm=5.0) is None
    mutate(u)
    reason = check_update(u, expected=SHAPES, max_norm=5.0)
    assert reason is not None and needle in reason


def test_zero_bound_disables_the_norm_check_but_not_finiteness() -> None:
    u = {k: torch.full(s, 1e30) for k, s in SHAPES.items()}  # norm overflows fp32, fine in fp64
    assert check_update(u, expected=SHAPES, max_norm=0.0) is None
    assert "norm" in (check_update(u, expected=SHAPES, max_norm=1e6) or "")
    u["norm"][0] = float("nan")
    assert "non-finite" in (check_update(u, expected=SHAPES, max_norm=0.0) or "")


@settings(max_examples=80, deadline=None)
@given(
    arr=hnp.arrays(
        np.float32,
        (5, 3),
        elements=st.floats(-(2.0**64), 2.0**64, width=32)
        | st.sampled_from([float("nan"), float("inf"), -float("inf")]),
    ),
    bound=st.floats(1e-3, 1e21),
)
def test_an_accepted_update_never_exceeds_the_bound(arr: np.ndarray, bound: float) -> None:
    """Property: accepted => finite and norm <= bound (norm recomputed in numpy fp64)."""
    u = {"w": torch.from_numpy(arr.copy())}
    reason = check_update(u, expected={"w": (5, 3)}, max_norm=bound)
    finite = bool(np.isfinite(arr).all())
    norm = float(np.linalg.norm(arr.astype(np.float64))) if finite else math.inf
    if reason is None:
        assert finite and norm <= bound * (1 + 1e-12)
    else:
        assert (not finite) or norm > bound * (1 - 1e-12)
    if finite:
        assert update_norm(u) == pytest.approx(norm, rel=1e-12)
