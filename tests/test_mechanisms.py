"""The Gaussian mechanism's calibration and the thresholded histogram, against references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlm.privacy.mechanisms import (
    add_gaussian_noise,
    add_gaussian_noise_torch,
    calibrate_gaussian_sigma,
    gaussian_delta,
    gaussian_epsilon,
    release_sparse_histogram,
    sparse_histogram_threshold,
)

CASES = [(1.0, 1e-5, 1.0), (0.1, 1e-6, 4.0), (3.0, 1e-9, 16.0), (8.0, 1e-6, 1.0)]


@pytest.mark.parametrize("epsilon,delta,sensitivity", CASES)
def test_delta_matches_dp_accounting_pld(epsilon: float, delta: float, sensitivity: float) -> None:
    """Our delta(eps) at the calibrated sigma equals Google's dp-accounting PLD for the Gaussian."""
    pld_mod = pytest.importorskip("dp_accounting.pld.privacy_loss_distribution")
    sigma = calibrate_gaussian_sigma(epsilon=epsilon, delta=delta, sensitivity=sensitivity)
    pld = pld_mod.from_gaussian_mechanism(
        sigma, sensitivity=sensitivity, value_discretization_interval=1e-4
    )
    assert pld.get_delta_for_epsilon(epsilon) == pytest.approx(delta, rel=1e-2)
    assert pld.get_epsilon_for_delta(delta) == pytest.approx(epsilon, rel=1e-2, abs=1e-3)


@pytest.mark.parametrize("epsilon,delta,sensitivity", CASES)
def test_delta_matches_numerical_integral_of_privacy_loss(
    epsilon: float, delta: float, sensitivity: float
) -> None:
    """delta(eps) = integral of (p(x) - e^eps q(x))_+ for p = N(s, sigma^2), q = N(0, sigma^2)."""
    integrate = pytest.importorskip("scipy.integrate")
    stats = pytest.importorskip("scipy.stats")
    sigma = calibrate_gaussian_sigma(epsilon=epsilon, delta=delta, sensitivity=sensitivity)
    # p(x) > e^eps q(x) exactly when x > x0 (the privacy loss is linear in x).
    x0 = sigma**2 * epsilon / sensitivity + sensitivity / 2
    value, _ = integrate.quad(
        lambda x: stats.norm.pdf(x, sensitivity, sigma)
        - math.exp(epsilon) * stats.norm.pdf(x, 0, sigma),
        x0, x0 + 40 * sigma, epsabs=1e-16, epsrel=1e-10, limit=200,
    )
    assert value == pytest.approx(delta, rel=1e-6)


def test_known_value_and_classical_bound() -> None:
    """Balle & Wang's example: eps=1, delta=1e-5, s=1 needs sigma ~= 3.73 (classical bound: 4.84)."""
    sigma = calibrate_gaussian_sigma(epsilon=1.0, delta=1e-5, sensitivity=1.0)
    assert sigma == pytest.approx(3.7306, abs=1e-3)
    for eps in (0.1, 0.5, 0.99):
        classical = math.sqrt(2 * math.log(1.25 / 1e-6)) / eps
        assert calibrate_gaussian_sigma(epsilon=eps, delta=1e-6, sensitivity=1.0) < classical


@settings(max_examples=60, deadline=None)
@given(
    epsilon=st.floats(0.01, 50.0),
    log10_delta=st.floats(-12.0, -1.0),
    sensitivity=st.floats(0.01, 100.0),
)
def test_calibration_is_tight_and_epsilon_stated_never_exceeds_asked(
    epsilon: float, log10_delta: float, sensitivity: float
) -> None:
    """sigma meets (eps, delta), a hair less would not, and the epsilon stated for it is <= asked."""
    delta = 10.0**log10_delta
    sigma = calibrate_gaussian_sigma(epsilon=epsilon, delta=delta, sensitivity=sensitivity)
    assert gaussian_delta(sigma=sigma, epsilon=epsilon, sensitivity=sensitivity) <= delta
    assert gaussian_delta(sigma=sigma * (1 - 1e-6), epsilon=epsilon, sensitivity=sensitivity) > delta
    assert gaussian_epsilon(sigma=sigma, delta=delta, sensitivity=sensitivity) <= epsilon * (1 + 1e-9)


@settings(max_examples=40, deadline=None)
@given(
    sigma=st.floats(0.1, 1000.0),
    log10_delta=st.floats(-12.0, -1.0),
    max_keys=st.integers(1, 4096),
    max_count=st.floats(1.0, 10.0),
)
def test_threshold_bounds_the_chance_a_unit_only_key_is_released(
    sigma: float, log10_delta: float, max_keys: int, max_count: float
) -> None:
    """max_keys keys of true count max_count pass tau with probability <= delta (scipy's normal tail)."""
    stats = pytest.importorskip("scipy.stats")
    delta = 10.0**log10_delta
    tau = sparse_histogram_threshold(sigma=sigma, delta_threshold=delta, max_keys=max_keys, max_count=max_count)
    p_one = stats.norm.sf((tau - max_count) / sigma)
    assert max_keys * p_one == pytest.approx(delta, rel=1e-6)
    assert -math.expm1(max_keys * math.log1p(-p_one)) <= delta * (1 + 1e-6)


@pytest.mark.slow
@settings(max_examples=30, deadline=None)
@given(
    epsilon=st.floats(0.1, 10.0),
    log10_delta=st.floats(-10.0, -2.0),
    max_keys=st.integers(1, 64),
    counts=st.dictionaries(st.text(min_size=1, max_size=4), st.integers(1, 5000), max_size=50),
    seed=st.integers(0, 2**32 - 1),
)
def test_release_keeps_only_keys_above_threshold_and_states_its_cost(
    epsilon: float, log10_delta: float, max_keys: int, counts: dict[str, int], seed: int
) -> None:
    """Every released key was present and its noisy count is > tau; eps and delta stated <= asked."""
    delta = 10.0**log10_delta
    rel = release_sparse_histogram(
        counts, epsilon=epsilon, delta=delta, max_keys=max_keys, rng=np.random.default_rng(seed)
    )
    assert set(rel.counts) <= set(counts)
    assert all(v > rel.threshold for v in rel.counts.values())
    assert rel.epsilon <= epsilon
    assert rel.delta <= delta * (1 + 1e-12)
    assert rel.l2_sensitivity == pytest.approx(math.sqrt(max_keys))
    assert rel.sigma == pytest.approx(
        calibrate_gaussian_sigma(epsilon=epsilon, delta=rel.delta_noise, sensitivity=math.sqrt(max_keys))
    )


def test_keys_seen_once_are_released_at_the_stated_rate() -> None:
    """Empirically: a count-1 key is released with probability ~= delta_threshold / max_keys."""
    keys = {i: 1 for i in range(200_000)}
    rel = release_sparse_histogram(
        keys, epsilon=1.0, delta=0.2, max_keys=4, rng=np.random.default_rng(0)
    )
    per_key = rel.delta_threshold / 4  # 0.025
    n = len(keys)
    assert abs(len(rel.counts) / n - per_key) < 4 * math.sqrt(per_key / n)


def test_frequent_keys_survive_with_unbiased_noise() -> None:
    """Keys far above the threshold are all released, with noise of the stated std."""
    counts = {i: 10_000 for i in range(20_000)}
    rel = release_sparse_histogram(counts, epsilon=1.0, delta=1e-6, max_keys=16, rng=np.random.default_rng(1))
    assert len(rel.counts) == len(counts)
    noise = np.array(list(rel.counts.values())) - 10_000
    assert abs(noise.mean()) < 4 * rel.sigma / math.sqrt(len(noise))
    assert noise.std() == pytest.approx(rel.sigma, rel=0.03)


def test_noise_helpers_have_the_stated_std() -> None:
    x = np.zeros(100_000)
    y = add_gaussian_noise(x, sigma=2.5, rng=np.random.default_rng(0))
    assert (x == 0).all() and y.std() == pytest.approx(2.5, rel=0.02)
    t = add_gaussian_noise_torch(torch.zeros(100_000), sigma=0.5, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.float32 and float(t.std()) == pytest.approx(0.5, rel=0.02)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="epsilon"):
        calibrate_gaussian_sigma(epsilon=0.0, delta=1e-5, sensitivity=1.0)
    with pytest.raises(ValueError, match="delta"):
        calibrate_gaussian_sigma(epsilon=1.0, delta=1.0, sensitivity=1.0)
