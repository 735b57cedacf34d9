"""Calibration solvers are conservative (eps <= target) and tight (eps >= 0.999 target)."""

from __future__ import annotations

import pytest

from dpengine.accounting import epochs_to_steps, get_epsilon, get_max_steps, get_noise_multiplier, get_sample_rate

CASES = [(3.0, 1e-5, 0.004, 2500), (1.0, 1e-6, 0.01, 10000), (8.0, 1e-5, 0.1, 100), (0.5, 1e-5, 1e-3, 500)]


@pytest.mark.parametrize("target,delta,q,steps", CASES)
def test_noise_multiplier_conservative(target: float, delta: float, q: float, steps: int) -> None:
    sigma = get_noise_multiplier(target, delta, q, steps=steps)
    eps = get_epsilon(sigma, q, steps, delta)
    assert 0.999 * target <= eps <= target


def test_noise_multiplier_pld_and_epochs() -> None:
    sigma = get_noise_multiplier(3.0, 1e-5, 0.01, steps=300, accountant="pld")
    assert 0.999 * 3.0 <= get_epsilon(sigma, 0.01, 300, 1e-5, "pld") <= 3.0
    assert sigma < get_noise_multiplier(3.0, 1e-5, 0.01, steps=300)
    by_epochs = get_noise_multiplier(3.0, 1e-5, 0.004, epochs=10)
    assert by_epochs == get_noise_multiplier(3.0, 1e-5, 0.004, steps=epochs_to_steps(10, 0.004))
    assert epochs_to_steps(10, 0.004) == 2500 and epochs_to_steps(60, 256 / 60000) == 14063


@pytest.mark.parametrize("target,delta,q,sigma", [(3.0, 1e-5, 0.004, 0.85), (1.0, 1e-5, 0.01, 1.5)])
def test_max_steps_conservative(target: float, delta: float, q: float, sigma: float) -> None:
    steps = get_max_steps(target, delta, q, sigma)
    assert get_epsilon(sigma, q, steps, delta) <= target < get_epsilon(sigma, q, steps + 1, delta)


@pytest.mark.parametrize("target,delta,steps,sigma", [(3.0, 1e-5, 2500, 0.85), (1.0, 1e-5, 1000, 1.5)])
def test_sample_rate_conservative(target: float, delta: float, steps: int, sigma: float) -> None:
    q = get_sample_rate(target, delta, sigma, steps=steps)
    assert 0.999 * target <= get_epsilon(sigma, q, steps, delta) <= target
    q_ep = get_sample_rate(target, delta, sigma, epochs=5)
    assert get_epsilon(sigma, q_ep, epochs_to_steps(5, q_ep), delta) <= target


def test_infeasible_requests_raise() -> None:
    with pytest.raises(ValueError, match="single step"):
        get_max_steps(0.001, 1e-5, 1.0, 0.1)
    with pytest.raises(ValueError, match="noise_multiplier=0"):
        get_sample_rate(1.0, 1e-5, 0.0, steps=10)
    with pytest.raises(ValueError, match="not exhausted"):
        get_max_steps(1.0, 1e-5, 0.0, 1.0)
    with pytest.raises(ValueError, match="target_epsilon=-1"):
        get_noise_multiplier(-1, 1e-5, 0.01, steps=10)
    with pytest.raises(ValueError, match="exactly one"):
        get_noise_multiplier(1.0, 1e-5, 0.01)
