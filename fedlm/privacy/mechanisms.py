"""Differential-privacy primitives: the Gaussian mechanism and a thresholded sparse histogram.

This is the foundation the rest of fedlm's privacy builds on (the tokenizer's private pre-token
counts today; DP-SGD and client-level DP in federation later). Everything here is a plain
function of numbers: the caller states the sensitivity of what it releases, and these functions
turn (epsilon, delta) into a noise scale, add the noise, and report what was spent.

Gaussian mechanism. Releasing f(D) + N(0, sigma^2 I), where ||f(D) - f(D')||_2 <= sensitivity for
neighbouring D, D', is (epsilon, delta)-DP exactly when

    delta >= Phi(s / (2 sigma) - epsilon sigma / s) - e^epsilon Phi(-s / (2 sigma) - epsilon sigma / s)

(Balle & Wang 2018, "Improving the Gaussian Mechanism for Differential Privacy: Analytical
Calibration and Optimal Denoising", Theorem 8; the same curve is the privacy profile of
mu-GDP with mu = s / sigma, Dong, Roth & Su 2019, Corollary 2.13). `calibrate_gaussian_sigma`
finds the smallest sigma meeting it by bisection ("analytic Gaussian mechanism"): for epsilon < 1
it is well below the classical sigma = s sqrt(2 ln(1.25 / delta)) / epsilon, and unlike the
classical bound it is valid for any epsilon > 0.

Sparse histogram with a threshold. To release counts over keys that are not known in advance
(words, pre-tokens, URLs), each privacy unit (a document, a user) must add at most `max_count`
to each key and touch at most `max_keys` keys; then the L2 sensitivity of the histogram is
max_count * sqrt(max_keys). Noise is added only to keys that are present, and a key is
released only if its noisy count exceeds a threshold tau. A key that exists only because of
one unit has a true count <= max_count, so with

    tau = max_count + sigma * Phi^-1(1 - delta_threshold / max_keys)

the probability that any of that unit's (at most max_keys) unique keys is released is at most
delta_threshold (union bound). Conditioned on none being released, the output on the common
keys is the Gaussian mechanism followed by post-processing. So the release is
(epsilon, delta_noise + delta_threshold)-DP; we split the delta asked between the two
(`threshold_delta_fraction`, half by default). This is the "Gaussian policy with threshold"
of Korolova, Kenthapadi, Mishra & Ntoulas 2009 ("Releasing search queries and clicks
privately") and Gopi, Gulhane, Kulkarni, Shen, Shokouhi & Yekhanin 2020 ("Differentially
Private Set Union", section 3).

The caller passes the generator. fedlm's callers draw it from the releasing party's secret
key (`fedlm.privacy.randomness`: PCG64 seeded with 256 bits of an AES-CTR stream), never from
the config. Caveat: the Gaussians are floating-point samples, not a discrete Gaussian
(Mironov 2012 shows how low-order bits of such noise can leak); the released counts are
rounded to integers, which removes those bits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from statistics import NormalDist
from typing import Generic, TypeVar

import numpy as np
import torch

K = TypeVar("K", bound=Hashable)

_STD_NORMAL = NormalDist()


def _phi(x: float) -> float:
    """Standard normal CDF, accurate in the far left tail (erfc, not 1 - erf)."""
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _check_positive(name: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_delta(delta: float) -> None:
    if not (0.0 < delta < 1.0):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def gaussian_delta(*, sigma: float, epsilon: float, sensitivity: float) -> float:
    """Exact delta(epsilon) of the Gaussian mechanism with noise `sigma` (Balle & Wang 2018, Thm 8)."""
    _check_positive("sigma", sigma)
    _check_positive("sensitivity", sensitivity)
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")
    a = sensitivity / (2.0 * sigma)
    b = epsilon * sigma / sensitivity
    first = _phi(a - b)
    tail = _phi(-a - b)
    # e^eps * Phi(.) in log space: e^eps alone overflows for eps > 709.
    second = math.exp(epsilon + math.log(tail)) if tail > 0.0 else 0.0
    return max(0.0, first - second)


def gaussian_epsilon(*, sigma: float, delta: float, sensitivity: float) -> float:
    """Smallest epsilon for which the Gaussian mechanism with `sigma` is (epsilon, delta)-DP.

    Rounded up (bisection keeps the upper end), so the value stated never understates the loss.
    """
    _check_delta(delta)
    if gaussian_delta(sigma=sigma, epsilon=0.0, sensitivity=sensitivity) <= delta:
        return 0.0
    return _smallest_passing(
        lambda eps: gaussian_delta(sigma=sigma, epsilon=eps, sensitivity=sensitivity) > delta, 0.0, 1.0
    )


def calibrate_gaussian_sigma(*, epsilon: float, delta: float, sensitivity: float) -> float:
    """Smallest noise std making the Gaussian mechanism (epsilon, delta)-DP (analytic calibration).

    Rounded up (bisection keeps the upper end): gaussian_delta(sigma, epsilon) <= delta holds.
    """
    _check_positive("epsilon", epsilon)
    _check_delta(delta)
    _check_positive("sensitivity", sensitivity)

    def excess(sigma: float) -> bool:
        return gaussian_delta(sigma=sigma, epsilon=epsilon, sensitivity=sensitivity) > delta

    lo = sensitivity * 1e-3
    while not excess(lo):
        lo /= 2.0
    return _smallest_passing(excess, lo, sensitivity)


def _smallest_passing(excess: Callable[[float], bool], lo: float, hi: float) -> float:
    """The boundary of a monotone `excess` (True below it) by bisection from an `excess(lo)` start;
    doubles `hi` until it passes, and returns the upper end, so the result always passes."""
    while excess(hi):
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if excess(mid):
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return hi


def add_gaussian_noise(values: np.ndarray, *, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Return `values` (as float64) plus i.i.d. N(0, sigma^2) noise; the input is not modified."""
    values = np.asarray(values, dtype=np.float64)
    return values + rng.normal(0.0, sigma, size=values.shape)


def add_gaussian_noise_torch(
    values: torch.Tensor, *, sigma: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Return `values` plus i.i.d. N(0, sigma^2) noise of the same dtype and device."""
    noise = torch.randn(
        values.shape, generator=generator, dtype=values.dtype, device=values.device
    )
    return values + sigma * noise


def sparse_histogram_threshold(
    *, sigma: float, delta_threshold: float, max_keys: int, max_count: float = 1.0
) -> float:
    """Threshold tau: the chance that any of one unit's <= max_keys unique keys passes is <= delta_threshold."""
    _check_positive("sigma", sigma)
    _check_delta(delta_threshold)
    if max_keys < 1:
        raise ValueError(f"max_keys must be >= 1, got {max_keys!r}")
    # Phi^-1(1 - p) = -Phi^-1(p), computed on the small p to keep precision.
    return max_count - sigma * _STD_NORMAL.inv_cdf(delta_threshold / max_keys)


@dataclass(frozen=True)
class HistogramRelease(Generic[K]):
    """A DP histogram release and what it cost."""

    counts: dict[K, float]
    """Noisy counts of the released keys (all > threshold)."""
    epsilon: float
    """Epsilon actually spent (<= the epsilon asked: sigma is rounded up)."""
    delta: float
    """Total delta: delta_noise + delta_threshold (<= the delta asked)."""
    delta_noise: float
    delta_threshold: float
    sigma: float
    """Std of the Gaussian noise added to each count."""
    threshold: float
    """Keys whose noisy count is <= this are not released."""
    l2_sensitivity: float
    max_keys: int
    max_count: float


def release_sparse_histogram(
    counts: Mapping[K, float],
    *,
    epsilon: float,
    delta: float,
    max_keys: int,
    max_count: float = 1.0,
    rng: np.random.Generator,
    threshold_delta_fraction: float = 0.5,
) -> HistogramRelease[K]:
    """Release `counts` with (epsilon, delta)-DP: Gaussian noise on present keys, then a threshold.

    The caller guarantees the contribution bound: one privacy unit adds at most `max_count` to
    any key and touches at most `max_keys` keys. See the module docstring for the proof sketch.
    """
    _check_positive("epsilon", epsilon)
    _check_delta(delta)
    if not 0.0 < threshold_delta_fraction < 1.0:
        raise ValueError(f"threshold_delta_fraction must be in (0, 1), got {threshold_delta_fraction!r}")
    delta_threshold = delta * threshold_delta_fraction
    delta_noise = delta - delta_threshold
    l2 = max_count * math.sqrt(max_keys)
    sigma = calibrate_gaussian_sigma(epsilon=epsilon, delta=delta_noise, sensitivity=l2)
    tau = sparse_histogram_threshold(
        sigma=sigma, delta_threshold=delta_threshold, max_keys=max_keys, max_count=max_count
    )
    keys = list(counts)
    noisy = add_gaussian_noise(np.fromiter((counts[k] for k in keys), np.float64, len(keys)),
                               sigma=sigma, rng=rng)
    released = {k: float(v) for k, v, keep in zip(keys, noisy, noisy > tau, strict=True) if keep}
    return HistogramRelease(
        counts=released,
        # sigma meets (epsilon, delta_noise) by construction; the bisection for the spent epsilon
        # could land a hair above it, and the true spend is the smaller of the two.
        epsilon=min(epsilon, gaussian_epsilon(sigma=sigma, delta=delta_noise, sensitivity=l2)),
        delta=delta_noise + delta_threshold,
        delta_noise=delta_noise,
        delta_threshold=delta_threshold,
        sigma=sigma,
        threshold=tau,
        l2_sensitivity=l2,
        max_keys=max_keys,
        max_count=max_count,
    )
