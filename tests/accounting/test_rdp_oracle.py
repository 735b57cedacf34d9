"""RDP of the subsampled Gaussian against a high-precision mpmath quadrature oracle (MTZ19)."""

from __future__ import annotations

import math
import warnings

import mpmath as mp
import numpy as np
import pytest

from dpengine.accounting import rdp_subsampled_gaussian
from dpengine.accounting.rdp import _log_a_frac


def oracle_rdp(q: float, sigma: float, alpha: float, dps: int = 40) -> float:
    """D_alpha((1-q)N(0,s^2) + qN(1,s^2) || N(0,s^2)) by mpmath quadrature, in log space."""
    with mp.workdps(dps):
        q_, s, a = mp.mpf(q), mp.mpf(sigma), mp.mpf(alpha)

        def log_integrand(x):
            log_mu0 = -x * x / (2 * s * s) - mp.log(s * mp.sqrt(2 * mp.pi))
            log_ratio = mp.log((1 - q_) + q_ * mp.exp((2 * x - 1) / (2 * s * s)))
            return log_mu0 + a * log_ratio

        z0 = float(sigma**2 * (math.log1p(-q) - math.log(q)) + 0.5) if q < 1 else 0.0
        pts = sorted({-40 * sigma, 0.0, 1.0, z0, alpha - 1, alpha, alpha + 1, 40 * sigma + alpha + 5} | {0.5 * (z0 + alpha)})
        pts = [mp.mpf(p) for p in pts if -50 * sigma <= p <= 50 * sigma + alpha + 10]
        # shift by the max of the log-integrand for numerical range
        grid = np.linspace(float(pts[0]), float(pts[-1]), 301)
        shift = max(log_integrand(mp.mpf(x)) for x in grid)
        val = mp.quad(lambda x: mp.exp(log_integrand(x) - shift), [-mp.inf] + pts + [mp.inf], maxdegree=10)
        log_a = mp.log(val) + shift
        return float(log_a / (a - 1))


QS = [1e-6, 1e-3, 0.05, 0.5, 1.0]
SIGMAS = [0.3, 1.0, 5.0, 50.0]
ORDERS = [1.01, 1.5, 3.7, 20.5, 1000.5]


@pytest.mark.parametrize("q", QS)
@pytest.mark.parametrize("sigma", SIGMAS)
def test_fractional_orders_never_below_oracle(q: float, sigma: float) -> None:
    for alpha in ORDERS:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a non-converged series would warn
            ours = float(rdp_subsampled_gaussian(q, sigma, alpha))
        ref = oracle_rdp(q, sigma, alpha)
        assert ours >= ref * (1 - 1e-9), (q, sigma, alpha, ours, ref)
        assert ours == pytest.approx(ref, rel=1e-6), (q, sigma, alpha, ours, ref)


@pytest.mark.parametrize("q,sigma", [(1e-3, 0.3), (0.05, 1.0), (0.5, 5.0), (1e-6, 50.0), (0.2, 0.7)])
def test_integer_orders_match_fractional_path_and_oracle(q: float, sigma: float) -> None:
    for alpha in [2, 3, 8, 32, 256]:
        ours = float(rdp_subsampled_gaussian(q, sigma, alpha))
        frac = _log_a_frac(q, sigma, float(alpha)) / (alpha - 1)
        assert ours == pytest.approx(frac, rel=1e-8)
        ref = oracle_rdp(q, sigma, alpha)
        assert ours >= ref * (1 - 1e-9)
        assert ours == pytest.approx(ref, rel=1e-6)


def test_large_integer_orders_finite() -> None:
    orders = np.array([1e4, 1e5])
    for q, sigma in [(0.01, 1.0), (256 / 60000, 1.1), (0.5, 0.5), (1e-6, 50.0)]:
        vals = rdp_subsampled_gaussian(q, sigma, orders)
        assert np.all(np.isfinite(vals)) and np.all(vals > 0), vals
    # for huge orders the subsampled RDP approaches the full-batch value alpha/(2 sigma^2) from below
    val = float(rdp_subsampled_gaussian(0.01, 1.0, 1e5))
    assert val <= 1e5 / 2 and val > 0.99 * 1e5 / 2 + math.log(0.01) * 1e5 / (1e5 - 1) - 1


def test_special_cases() -> None:
    assert rdp_subsampled_gaussian(1.0, 2.0, [2.0, 3.5]).tolist() == [0.25, 0.4375]
    assert rdp_subsampled_gaussian(0.0, 1.0, [2.0, 1.5]).tolist() == [0.0, 0.0]
    assert np.all(np.isinf(rdp_subsampled_gaussian(0.1, 0.0, [2.0, 1.5])))
    with pytest.raises(ValueError, match=r"Expected sample_rate=1.3 in \[0, 1\]"):
        rdp_subsampled_gaussian(1.3, 1.0, 2)
    with pytest.raises(ValueError, match="order=1.0"):
        rdp_subsampled_gaussian(0.1, 1.0, [1.0])
