"""The one-run privacy audit (dpengine.audit): the epsilon lower-bound math against independent computations
(direct binomial sums, Clopper-Pearson, an exact coverage computation), and the audit of real dpengine
training runs: a correct run passes, a run with noise or clipping silently switched off fails."""

from __future__ import annotations

import dataclasses
import json
import math
from fractions import Fraction

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import stats

from dpengine.audit import (AuditConfig, audit, audit_one_run, epsilon_lower_bound, epsilon_lower_bound_from_scores,
                            guesses_from_scores, load_audit_config, max_lower_bound, one_run_p_value)


def _p(eps: float) -> float:
    return 1.0 / (1.0 + math.exp(-eps))


# ------------------------------------------------------------------------------------------------ bound math
def _exact_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The theorem's bound summed term by term in exact rational arithmetic (p rounded once to a fraction)."""
    p = Fraction(_p(eps))
    pmf = [math.comb(r, k) * p**k * (1 - p) ** (r - k) for k in range(r + 1)]
    tail = sum(pmf[v:], Fraction(0))
    alpha = max((sum(pmf[v - i:v], Fraction(0)) / i for i in range(1, v + 1)), default=Fraction(0))
    return min(1.0, float(tail + 2 * m * Fraction(delta) * alpha))


@pytest.mark.parametrize("m,r,v,eps,delta", [
    (30, 20, 17, 1.0, 0.0), (30, 20, 17, 1.0, 1e-3), (60, 40, 40, 3.0, 1e-4), (10, 10, 5, 0.0, 0.01),
    (100, 50, 31, 0.4, 1e-5), (25, 25, 1, 2.0, 0.5)])
def test_p_value_matches_exact_sum(m, r, v, eps, delta):
    assert one_run_p_value(m, r, v, eps, delta) == pytest.approx(_exact_p_value(m, r, v, eps, delta), rel=1e-9,
                                                                  abs=1e-15)


def test_p_value_without_delta_is_the_binomial_tail():
    for r, v, eps in [(1000, 700, 0.5), (500, 500, 4.0), (200, 1, 0.1)]:
        direct = sum(stats.binom.pmf(k, r, _p(eps)) for k in range(v, r + 1))
        assert one_run_p_value(r, r, v, eps, 0.0) == pytest.approx(direct, rel=1e-9)
    assert one_run_p_value(10, 5, 0, 1.0, 0.0) == 1.0


@pytest.mark.parametrize("r,v,beta", [(1000, 700, 0.05), (100, 90, 0.01), (500, 260, 0.05), (2000, 1990, 0.1)])
def test_lower_bound_without_delta_is_the_clopper_pearson_logit(r, v, beta):
    # P[Binomial(r, p) >= v] = I_p(v, r - v + 1): the p at which it equals beta is the beta quantile of
    # Beta(v, r - v + 1) (the one-sided Clopper-Pearson bound); the epsilon bound is its logit
    p_lo = stats.beta.ppf(beta, v, r - v + 1)
    expected = max(0.0, math.log(p_lo / (1 - p_lo)))
    got = epsilon_lower_bound(r, r, v, delta=0.0, beta=beta)
    assert got <= expected + 1e-12
    assert got == pytest.approx(expected, abs=2e-6)


def test_perfect_guessing_has_a_closed_form():
    # all r guesses right, delta = 0: p^r = beta, epsilon = log(p / (1 - p))
    p = 0.05 ** (1 / 1000)
    assert epsilon_lower_bound(1000, 1000, 1000, delta=0.0, beta=0.05) == pytest.approx(math.log(p / (1 - p)),
                                                                                       abs=2e-6)
    assert max_lower_bound(1000, delta=0.0, beta=0.05) == pytest.approx(5.809, abs=1e-3)
    # pinned: the ceiling of the default audit (m = 1000, delta = 1e-5, beta = 0.05 over 6 guess sets)
    assert max_lower_bound(1000, delta=1e-5, beta=0.05 / 6) == pytest.approx(5.269, abs=1e-3)


def test_lower_bound_is_monotone_and_refutes_exactly_up_to_itself():
    m = 1000
    by_v = [epsilon_lower_bound(m, 600, v, delta=1e-5, beta=0.05) for v in range(300, 601, 25)]
    assert by_v[0] == 0.0 and all(a <= b for a, b in zip(by_v, by_v[1:])) and by_v[-1] > 4
    by_delta = [epsilon_lower_bound(m, 900, 880, delta=d, beta=0.05) for d in (0.0, 1e-6, 1e-5, 1e-4, 1e-3)]
    assert all(a >= b for a, b in zip(by_delta, by_delta[1:])) and by_delta[0] > by_delta[-1]
    by_beta = [epsilon_lower_bound(m, 900, 880, delta=1e-5, beta=b) for b in (0.001, 0.01, 0.05, 0.2)]
    assert all(a <= b for a, b in zip(by_beta, by_beta[1:]))
    eps = epsilon_lower_bound(m, 900, 880, delta=1e-5, beta=0.05)
    assert one_run_p_value(m, 900, 880, eps, 1e-5) <= 0.05 < one_run_p_value(m, 900, 880, eps + 1e-5, 1e-5)
    # nothing refuted: no bound
    assert epsilon_lower_bound(m, 900, 450, delta=1e-5, beta=0.05) == 0.0


@pytest.mark.parametrize("m,eps,delta", [(200, 1.0, 0.0), (200, 1.0, 1e-4), (150, 2.5, 0.0), (100, 0.3, 1e-3)])
def test_exact_coverage_against_randomized_response(m, eps, delta):
    """epsilon-DP randomized response on m canaries, every canary guessed: W ~ Binomial(m, e^eps / (1 + e^eps))
    exactly, the worst case of the theorem. The bound exceeds eps only when eps itself is refuted; summing the
    binomial pmf over those W gives the exact false-alarm probability, which must be <= beta. (An off-by-one
    tail, P[B > v] instead of P[B >= v], gives 0.067 at m = 200, eps = 1.)"""
    beta, p = 0.05, _p(eps)
    refuted = [w for w in range(m + 1) if one_run_p_value(m, m, w, eps, delta) <= beta]
    assert refuted == list(range(refuted[0], m + 1))  # refuted exactly above a threshold
    false_alarm = float(stats.binom.sf(refuted[0] - 1, m, p))
    assert 0.01 < false_alarm <= beta
    # and the bound itself: below eps just under the threshold, above it at the threshold
    assert epsilon_lower_bound(m, m, refuted[0] - 1, delta=delta, beta=beta) <= eps
    assert epsilon_lower_bound(m, m, refuted[0], delta=delta, beta=beta) > eps


def test_gaussian_canaries_bound_stays_below_the_true_epsilon_and_has_power():
    """Each canary's score is mu * S_i + N(0, 1): m independent Gaussian mechanisms, each mu-GDP, so
    (eps, delta)-DP with delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)."""
    mu, delta, m = 3.0, 1e-5, 2000
    true_eps = _gdp_epsilon(mu, delta)
    rng = np.random.default_rng(1)
    bounds = []
    for _ in range(6):
        included = rng.random(m) < 0.5
        scores = mu * np.where(included, 1.0, 0.0) + rng.standard_normal(m)
        bounds.append(epsilon_lower_bound_from_scores(scores, included, delta=delta, beta=0.05).epsilon_lower_bound)
    assert max(bounds) < true_eps
    assert min(bounds) > 1.0  # the audit is not vacuous for a strong signal
    noise_only = epsilon_lower_bound_from_scores(rng.standard_normal(m), rng.random(m) < 0.5, delta=delta)
    assert noise_only.epsilon_lower_bound < 0.5


def _gdp_epsilon(mu: float, delta: float) -> float:
    def d(eps: float) -> float:
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)

    lo, hi = 0.0, 50.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if d(mid) > delta else (lo, mid)
    return hi


def test_guesses_from_scores():
    scores = np.array([0.5, -1.0, 3.0, 0.0, 2.0, -2.0])
    g = guesses_from_scores(scores, 2, 1)
    assert g.tolist() == [0, 0, 1, 0, 1, -1]
    tied = guesses_from_scores(np.zeros(1000), 0, 300, seed=3)
    assert (tied == -1).sum() == 300 and (tied == 0).sum() == 700
    assert 100 < np.flatnonzero(tied == -1).mean() < 900  # ties broken at random, not by index
    with pytest.raises(ValueError, match="k_pos"):
        guesses_from_scores(scores, 4, 3)
    with pytest.raises(ValueError, match="finite"):
        guesses_from_scores(np.array([np.nan, 1.0]), 1, 0)


def test_bound_from_scores_counts_and_union_bound():
    m = 1000
    included = np.arange(m) < 500
    perfect = epsilon_lower_bound_from_scores(included.astype(float), included, delta=0.0, beta=0.05,
                                              guess_fractions=(0.45,))
    assert (perfect.guesses, perfect.correct, perfect.k_pos, perfect.k_neg) == (900, 900, 450, 450)
    assert perfect.epsilon_lower_bound == pytest.approx(epsilon_lower_bound(m, 900, 900, delta=0.0, beta=0.05))
    six = epsilon_lower_bound_from_scores(included.astype(float), included, delta=0.0, beta=0.05)
    assert six.choices == 6
    assert six.epsilon_lower_bound == pytest.approx(epsilon_lower_bound(m, 900, 900, delta=0.0, beta=0.05 / 6))
    with pytest.raises(ValueError, match="same shape"):
        epsilon_lower_bound_from_scores(np.zeros(3), np.zeros(4, dtype=bool), delta=0.0)
    with pytest.raises(ValueError, match="guess fraction"):
        epsilon_lower_bound_from_scores(np.zeros(4), np.zeros(4, dtype=bool), delta=0.0, guess_fractions=(0.7,))


def test_input_validation_names_the_value():
    with pytest.raises(ValueError, match="v=5"):
        one_run_p_value(10, 4, 5, 1.0, 0.0)
    with pytest.raises(ValueError, match="epsilon=-1"):
        one_run_p_value(10, 4, 2, -1.0, 0.0)
    with pytest.raises(ValueError, match="beta=1.5"):
        epsilon_lower_bound(10, 4, 2, delta=0.0, beta=1.5)
    with pytest.raises(ValueError, match="plant_bug='typo'"):
        AuditConfig(plant_bug="typo")
    with pytest.raises(ValueError, match="canaries=1"):
        AuditConfig(canaries=1)


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "audit.toml"
    path.write_text("[audit]\nepsilon = 3.0\ncanaries = 400\n")
    cfg = load_audit_config(path, canaries=None, steps=50)
    assert (cfg.epsilon, cfg.canaries, cfg.steps) == (3.0, 400, 50)
    path.write_text("[audit]\nepsilonn = 3.0\n")
    with pytest.raises(ValueError, match="epsilonn"):
        load_audit_config(path)


# --------------------------------------------------------------------------------- audits of real training
pytestmark = pytest.mark.usefixtures("one_thread")  # the audited model is tiny


@pytest.fixture(scope="module")
def correct_run():
    return audit_one_run(AuditConfig(epsilon=2.0, canaries=1000, steps=300, seed=0))


def test_correct_training_passes(correct_run):
    r = correct_run
    assert 1.99 <= r.reported_epsilon <= 2.0
    assert r.passed and 0.0 <= r.lower_bound < r.reported_epsilon
    assert r.steps == 300 and r.bound.canaries == 1000 and 400 < r.canaries_included < 600
    assert r.test_accuracy > 0.8  # the audited run really trains
    assert "audit PASSED" in r.summary()


@pytest.mark.parametrize("bug", ["no-noise", "no-clip"])
def test_planted_bug_is_caught(bug, correct_run):
    r = audit_one_run(AuditConfig(epsilon=2.0, canaries=1000, steps=300, seed=0, plant_bug=bug))
    # the bug is silent: same sigma, q, steps, so the accountant reports the same epsilon
    assert r.reported_epsilon == correct_run.reported_epsilon
    assert r.noise_multiplier == correct_run.noise_multiplier
    assert not r.passed and r.lower_bound > r.reported_epsilon + 2.0
    assert f"audit FAILED: empirical lower bound {r.lower_bound:.3f} > reported epsilon" in r.summary()


def test_cli_pass_and_fail():
    args = ["--canaries", "400", "--steps", "200", "--seed", "1"]
    ok = CliRunner().invoke(audit, args + ["--json"])
    assert ok.exit_code == 0, ok.output
    out = json.loads(ok.output)
    assert out["passed"] and out["lower_bound"] < out["reported_epsilon"] <= 2.0
    bad = CliRunner().invoke(audit, args + ["--plant-bug", "no-noise"])
    assert bad.exit_code == 1, bad.output
    assert "audit FAILED: empirical lower bound" in bad.output and "reported:  epsilon = 1.99" in bad.output


def test_cli_is_registered():
    from dpengine.cli import main

    res = CliRunner().invoke(main, ["audit", "--help"])
    assert res.exit_code == 0 and "--plant-bug" in res.output


@pytest.mark.slow
@pytest.mark.parametrize("epsilon,seed", [(2.0, 1), (2.0, 2), (4.0, 0), (4.0, 3), (1.0, 0)])
def test_correct_training_passes_more_settings(epsilon, seed):
    # at epsilon = 4 the audit could show up to about 5.2 with 1000 canaries, so these can fail
    r = audit_one_run(AuditConfig(epsilon=epsilon, canaries=1000, steps=300, seed=seed))
    assert r.passed and r.lower_bound < r.reported_epsilon <= epsilon


@pytest.mark.slow
@pytest.mark.parametrize("bug,score,mode", [("no-clip", "loss", "bk"), ("no-noise", "loss", "bk"),
                                            ("no-clip", "gradient", "hooks"), ("no-noise", "gradient", "ghost")])
def test_planted_bug_is_caught_black_box_and_other_backends(bug, score, mode):
    r = audit_one_run(AuditConfig(epsilon=4.0, canaries=1000, steps=300, seed=2, plant_bug=bug, score=score,
                                  grad_sample_mode=mode))
    assert not r.passed and r.lower_bound > r.reported_epsilon


def test_shipped_audit_config_is_the_defaults_and_documents_every_key():
    from pathlib import Path

    from dpengine.audit import AuditConfig, load_audit_config

    path = Path(__file__).resolve().parents[1] / "configs" / "audit" / "default.toml"
    assert load_audit_config(path) == AuditConfig()
    text = path.read_text()
    assert all(f"\n{f.name} = " in text for f in dataclasses.fields(AuditConfig))
