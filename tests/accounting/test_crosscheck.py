"""Cross-checks against Opacus and dp-accounting, pinned values, and monotonicity properties."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpengine.accounting import (
    RDPAccountant,
    classic_epsilon,
    compute_epsilon,
    compute_rdp,
    create_accountant,
    epsilon_from_rdp,
)

opacus_rdp = pytest.importorskip("opacus.accountants.analysis.rdp")
dp_accounting = pytest.importorskip("dp_accounting")
from dp_accounting.pld import privacy_loss_distribution as pld_lib  # noqa: E402
from dp_accounting.rdp import rdp_privacy_accountant as dpa_rdp  # noqa: E402
from opacus.accountants import RDPAccountant as OpacusRDP  # noqa: E402

OPACUS_ORDERS = OpacusRDP.DEFAULT_ALPHAS


def opacus_eps(sigma: float, q: float, steps: int, delta: float) -> float:
    rdp = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=OPACUS_ORDERS)
    return float(opacus_rdp.get_privacy_spent(orders=OPACUS_ORDERS, rdp=rdp, delta=delta)[0])


def dpa_eps(sigma: float, q: float, steps: int, delta: float) -> float:
    acc = dpa_rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return float(acc.get_epsilon(delta))


def pld_optimistic_eps(sigma: float, q: float, steps: int, delta: float) -> float:
    """A near-exact *lower* bound on the true epsilon (optimistic PLD, fine discretisation)."""
    pld = pld_lib.from_gaussian_mechanism(
        standard_deviation=sigma, sampling_prob=q, value_discretization_interval=1e-3, pessimistic_estimate=False,
        use_connect_dots=False,
    ).self_compose(steps)
    return float(pld.get_epsilon_for_delta(delta))


def test_pinned_opacus_value_on_opacus_orders() -> None:
    # Opacus' own test: sigma=1.5, q=0.04, 2250 steps, delta=1e-5 -> 7.32911 on its default orders.
    eps, order = compute_epsilon([(1.5, 0.04, 2250)], 1e-5, orders=OPACUS_ORDERS)
    assert eps == pytest.approx(7.32911, abs=5e-6)
    assert order == 3.9
    # the continuous optimum is a little tighter
    eps_c, order_c = compute_epsilon([(1.5, 0.04, 2250)], 1e-5)
    assert 7.3283 < eps_c < eps and 3.9 < order_c < 4.0


def test_pinned_mnist_value() -> None:
    # q = 256/60000, sigma = 1.1, 14063 steps (60 epochs), delta = 1e-5.
    eps, order = compute_epsilon([(1.1, 256 / 60000, 14063)], 1e-5)
    assert eps == pytest.approx(2.596642, abs=2e-6)
    assert order == pytest.approx(8.12, abs=0.01)
    assert opacus_eps(1.1, 256 / 60000, 14063, 1e-5) == pytest.approx(2.596656, abs=2e-6)


def test_within_0p1_percent_of_best_continuous_order() -> None:
    for sigma, q, steps, delta in [(1.1, 256 / 60000, 14063, 1e-5), (0.8, 0.01, 100000, 1e-6), (5.0, 1e-3, 1000, 1e-5)]:
        eps, _ = compute_epsilon([(sigma, q, steps)], delta)
        fine = np.concatenate([np.linspace(1.01, 3, 400), np.geomspace(3, 2000, 3000)])
        brute = float(np.min(epsilon_from_rdp(fine, compute_rdp(q, sigma, steps, fine), delta)))
        assert eps <= brute * (1 + 1e-9)
        assert eps >= brute * (1 - 1e-3)


_rng = np.random.default_rng(1234)
_GRID = [
    (float(s), float(q), int(t), float(d))
    for s, q, t, d in zip(
        np.exp(_rng.uniform(np.log(0.5), np.log(10), 24)),
        np.exp(_rng.uniform(np.log(1e-4), np.log(0.5), 24)),
        np.exp(_rng.uniform(0, np.log(2e5), 24)).astype(int) + 1,
        10.0 ** _rng.uniform(-9, -3, 24),
    )
]


@pytest.mark.parametrize("sigma,q,steps,delta", _GRID)
def test_never_above_library_default_grids(sigma: float, q: float, steps: int, delta: float) -> None:
    ours, _ = compute_epsilon([(sigma, q, steps)], delta)
    assert ours <= opacus_eps(sigma, q, steps, delta) * (1 + 1e-9) + 1e-12
    assert ours <= dpa_eps(sigma, q, steps, delta) * (1 + 1e-9) + 1e-12


@pytest.mark.parametrize("sigma,q,steps,delta", _GRID[:6])
def test_never_below_pld(sigma: float, q: float, steps: int, delta: float) -> None:
    steps = min(steps, 3000)  # keep the PLD composition cheap
    ours, _ = compute_epsilon([(sigma, q, steps)], delta)
    assert ours >= pld_optimistic_eps(sigma, q, steps, delta)


def test_classic_conversion_is_looser() -> None:
    orders = np.array([2.0, 8.0, 32.0])
    rdp = compute_rdp(0.01, 1.0, 1000, orders)
    assert np.all(classic_epsilon(orders, rdp, 1e-5) >= epsilon_from_rdp(orders, rdp, 1e-5))
    eps_classic, _ = compute_epsilon([(1.0, 0.01, 1000)], 1e-5, conversion="classic")
    assert eps_classic > compute_epsilon([(1.0, 0.01, 1000)], 1e-5)[0]


def test_heterogeneous_segments_compose_exactly() -> None:
    orders = np.array([2.0, 5.5, 16.0])
    acc = RDPAccountant()
    acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=300)
    acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=200)  # merges
    acc.step(noise_multiplier=2.0, sample_rate=0.05)
    acc.step(noise_multiplier=2.0, sample_rate=0.05, num_steps=99)
    assert acc.history == [(1.0, 0.01, 500), (2.0, 0.05, 100)]
    assert acc.total_steps == 600
    eps, order = compute_epsilon(acc.history, 1e-5, orders=orders)
    total = compute_rdp(0.01, 1.0, 500, orders) + compute_rdp(0.05, 2.0, 100, orders)
    assert eps == pytest.approx(float(np.min(epsilon_from_rdp(orders, total, 1e-5))), rel=1e-12)
    assert acc.get_epsilon(1e-5) <= eps


sigmas = st.floats(0.5, 20)
rates = st.floats(1e-4, 1.0)
steps_st = st.integers(1, 100000)
deltas = st.floats(1e-10, 1e-3)


@settings(max_examples=25, deadline=None)
@given(sigmas, st.floats(1.01, 2.0), rates, steps_st, deltas)
def test_epsilon_falls_with_sigma(sigma: float, factor: float, q: float, steps: int, delta: float) -> None:
    e1 = compute_epsilon([(sigma, q, steps)], delta)[0]
    e2 = compute_epsilon([(sigma * factor, q, steps)], delta)[0]
    assert e2 <= e1 * (1 + 1e-9)


@settings(max_examples=25, deadline=None)
@given(sigmas, rates, steps_st, st.integers(1, 1000), deltas)
def test_epsilon_rises_with_steps(sigma: float, q: float, steps: int, extra: int, delta: float) -> None:
    assert compute_epsilon([(sigma, q, steps)], delta)[0] <= compute_epsilon([(sigma, q, steps + extra)], delta)[0] * (1 + 1e-9)


@settings(max_examples=25, deadline=None)
@given(sigmas, rates, st.floats(1.01, 3.0), steps_st, deltas)
def test_epsilon_rises_with_q(sigma: float, q: float, factor: float, steps: int, delta: float) -> None:
    q2 = min(1.0, q * factor)
    assert compute_epsilon([(sigma, q, steps)], delta)[0] <= compute_epsilon([(sigma, q2, steps)], delta)[0] * (1 + 1e-9)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(sigmas, rates, st.integers(0, 1000)), max_size=5), st.sampled_from(["rdp", "pld", "prv"]))
def test_state_dict_round_trip(segments: list, name: str) -> None:
    acc = create_accountant(name)
    for s, q, n in segments:
        acc.step(noise_multiplier=s, sample_rate=q, num_steps=n)
    sd = json.loads(json.dumps(acc.state_dict()))
    assert sd["accountant"] == name and sd["version"] == 1
    other = create_accountant(name)
    other.load_state_dict(sd)
    assert other.history == acc.history and other.total_steps == acc.total_steps
    assert other.state_dict() == acc.state_dict()


def test_pld_accountant_tighter_than_rdp() -> None:
    rdp, pld = create_accountant("rdp"), create_accountant("pld")
    for acc in (rdp, pld):
        acc.step(noise_multiplier=1.1, sample_rate=256 / 60000, num_steps=14063)
    e_rdp, e_pld = rdp.get_epsilon(1e-5), pld.get_epsilon(1e-5)
    assert 0.55 * e_rdp < e_pld < 0.95 * e_rdp
    assert pld.get_privacy_spent(1e-5)[1] is None


@pytest.mark.parametrize("sigma,q,steps", [(1.1, 256 / 60000, 14063), (1.0, 0.01, 1000), (2.0, 0.1, 500),
                                           (0.8, 0.001, 100)])
def test_prv_accountant_against_opacus_prv(sigma: float, q: float, steps: int) -> None:
    """"prv" (Opacus' default name) is computed by dp-accounting's pessimistic PLD: an upper bound on the
    true epsilon (never below the optimistic PLD of the same mechanism), close to Opacus' PRV estimate."""
    from opacus.accountants import PRVAccountant as OpacusPRV

    ours = create_accountant("prv")
    ours.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
    eps = ours.get_epsilon(1e-5)
    theirs = OpacusPRV()
    theirs.history = [(sigma, q, steps)]
    eps_opacus = theirs.get_epsilon(1e-5)
    assert 0.9 * eps_opacus <= eps <= eps_opacus * 1.01
    assert eps >= pld_optimistic_eps(sigma, q, steps, 1e-5) * (1 - 1e-9)
    pld = create_accountant("pld")
    pld.load_state_dict(ours.state_dict())
    assert pld.get_epsilon(1e-5) == eps and ours.state_dict()["accountant"] == "prv"


def test_validation_messages() -> None:
    acc = RDPAccountant()
    with pytest.raises(ValueError, match=r"Expected sample_rate=1.3 in \[0, 1\]\."):
        acc.step(noise_multiplier=1.0, sample_rate=1.3)
    with pytest.raises(ValueError, match=r"noise_multiplier=-1"):
        acc.step(noise_multiplier=-1, sample_rate=0.1)
    with pytest.raises(ValueError, match=r"delta=2"):
        acc.get_epsilon(delta=2)
    with pytest.raises(ValueError, match="accountant='nope'"):
        create_accountant("nope")


def test_import_does_not_pull_torch() -> None:
    code = "import sys, dpengine.accounting, dpengine.accounting.budget; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registry() -> None:
    from dpengine.accounting import ACCOUNTANTS, RDPAccountant, register_accountant

    register_accountant("rdp-alias", RDPAccountant)
    try:
        assert isinstance(create_accountant("rdp-alias"), RDPAccountant)
    finally:
        ACCOUNTANTS.pop("rdp-alias")
    assert math.isinf(compute_epsilon([(0.0, 0.1, 10)], 1e-5)[0])
