"""Empirical privacy audit in one training run (Steinke, Nasr & Jagielski, NeurIPS 2023).

The audit trains once with the real dpengine pipeline and estimates a *lower* bound on epsilon:

1. m canary records are drawn; each is included in the training set independently with probability 1/2
   (the vector S of inclusions is secret to the training run).
2. After training, every canary gets a score (how strongly the final model "remembers" it); the auditor
   guesses "in" for the k+ highest scores, "out" for the k- lowest and abstains on the rest.
3. If training is (epsilon, delta)-DP with respect to adding/removing one canary, the number W of correct
   guesses among the r = k+ + k- guesses is (up to a delta term) stochastically dominated by
   Binomial(r, e^epsilon / (1 + e^epsilon)) (Steinke et al.'s main theorem for (epsilon, delta)-DP, in the
   form of the p-value their paper computes). An epsilon whose tail probability at the observed W is at most beta is refuted with confidence
   1 - beta; the largest epsilon below which every value is refuted is the lower bound.

What it can and cannot show: a lower bound above the accountant's epsilon proves (with probability
1 - beta over the training run's randomness) that the implementation or the analysis is wrong. A lower
bound below it proves nothing: the audit is one adversary, only sees the final model, and one-run audits
are loose at large epsilon (with m canaries and perfect guessing the bound cannot exceed about
log(m / log(1 / beta)), see ``max_lower_bound``).

The bound math (``one_run_p_value``, ``epsilon_lower_bound``, ``epsilon_lower_bound_from_scores``) uses numpy and
scipy only; ``audit_one_run`` runs the training (torch).

Canaries used by ``audit_one_run`` (white-box, Dirac-style): the model is a bias-free linear classifier on
scikit-learn's digits (64 standardized features and a constant-1 feature that only real records have) plus a
one-hot canary feature, stored as an embedding with one row per canary (``CanaryLinear``). Canary i is a
record with zero real features, canary id i + 1 and a random label; its gradient,
canary_scale * (softmax - e_y), lives in its own row only, which no other record touches. An excluded canary
is replaced by the all-zero record with id 0 (the padding row), whose gradient is exactly zero, so the dataset
size, the sample rate q and the expected batch size are the same for every S: training with the placeholder
is the same mechanism as training without the record. Score ``"gradient"``: the inner product of the
final-minus-initial canary row with the canary's negative gradient direction at initialization
(e_y - 1/K); ``"loss"`` (black-box): minus the canary's final cross-entropy loss.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import click
import numpy as np
import torch
from scipy import stats
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from ._validate import in_range, one_of, positive

PLANTED_BUGS = ["none", "no-noise", "no-clip"]
SCORES = ["gradient", "loss"]
#: fractions of m guessed "in" (top scores) and, as many, "out" (bottom scores); the bound is the best over
#: these choices, each tested at beta / len(choices) (Bonferroni), so choosing the best is still valid
DEFAULT_GUESS_FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.45)


# ------------------------------------------------------------------------------------------------ bound math
def _check_counts(m: int, r: int, v: int) -> None:
    for name, val in (("m", m), ("r", r), ("v", v)):
        if not isinstance(val, (int, np.integer)) or val < 0:
            raise ValueError(f"Expected {name}={val!r} to be a non-negative integer.")
    if not v <= r <= m:
        raise ValueError(f"Expected correct guesses v={v} <= guesses r={r} <= canaries m={m}.")


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P-value of observing at least ``v`` correct guesses out of ``r`` if training is (epsilon, delta)-DP.

    Steinke, Nasr & Jagielski (2023, arXiv:2305.08846), main theorem for (epsilon, delta)-DP: with m canaries
    each included with probability 1/2, p = e^epsilon / (1 + e^epsilon) and B ~ Binomial(r, p),

        P[W >= v] <= P[B >= v] + 2 m delta * max_{i = 1..v} P[v - i <= B < v] / i.

    Args:
        m: number of canaries (each included independently with probability 1/2).
        r: number of guesses (abstentions excluded), r <= m.
        v: number of correct guesses, v <= r.
        epsilon: the null hypothesis' epsilon (>= 0).
        delta: the null hypothesis' delta, in [0, 1].

    Returns:
        The bound, capped at 1.

    Raises:
        ValueError: counts that are not 0 <= v <= r <= m, a negative epsilon, or delta outside [0, 1].
    """
    _check_counts(m, r, v)
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"Expected epsilon={epsilon!r} >= 0.")
    in_range(0.0, 1.0, delta=delta)
    if v == 0:
        return 1.0
    p = 1.0 / (1.0 + math.exp(-epsilon))  # the accuracy of epsilon-DP randomized response
    tail = float(stats.binom.sf(v - 1, r, p))  # P[B >= v]
    if delta == 0:
        return min(1.0, tail)
    below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, p)  # P[B = v-1], P[B = v-2], ..., P[B = 0]
    window = np.cumsum(below)  # window[i-1] = P[v - i <= B < v]
    alpha = float(np.max(window / np.arange(1, v + 1)))
    return min(1.0, tail + 2.0 * m * delta * alpha)


def epsilon_lower_bound(m: int, r: int, v: int, *, delta: float, beta: float, tol: float = 1e-6,
                        epsilon_max: float = 50.0) -> float:
    """The largest epsilon such that every epsilon' below it is refuted at level ``beta``.

    With probability at least 1 - beta over the training run, an (epsilon, delta)-DP run gives a bound
    <= epsilon: if the bound exceeded the true epsilon*, then epsilon* itself was refuted, which happens
    with probability <= beta. The p-value with delta > 0 need not be monotone in epsilon, so the first epsilon
    that is not refuted is found by a scan (step 0.05) and then bisection; the result is rounded down (within
    ``tol``), never up.

    Args:
        m, r, v: canaries, guesses and correct guesses (see ``one_run_p_value``).
        delta: the delta at which epsilon is audited.
        beta: 1 - confidence, in (0, 1).
        tol: absolute tolerance of the bisection.
        epsilon_max: the scan stops here (a bound at it means "at least this much").

    Returns:
        The lower bound (0.0 when not even epsilon = 0 is refuted).
    """
    in_range(0.0, 1.0, delta=delta)
    if not 0 < beta < 1:
        raise ValueError(f"Expected beta={beta!r} in (0, 1).")
    positive(tol=tol)

    def refuted(eps: float) -> bool:
        return one_run_p_value(m, r, v, eps, delta) <= beta

    if not refuted(0.0):
        return 0.0
    lo, step = 0.0, 0.05
    while True:  # lo is refuted, and so is everything below it (checked at this grid's resolution)
        hi = min(lo + step, epsilon_max)
        if hi == lo:
            return lo
        if not refuted(hi):
            break
        lo = hi
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if refuted(mid):
            lo = mid
        else:
            hi = mid
    return lo


def max_lower_bound(m: int, *, delta: float, beta: float) -> float:
    """The bound with every one of m canaries guessed correctly: the most any audit with m canaries can show."""
    return epsilon_lower_bound(m, m, m, delta=delta, beta=beta)


def guesses_from_scores(scores: np.ndarray, k_pos: int, k_neg: int, *, seed: int = 0) -> np.ndarray:
    """+1 ("in") for the ``k_pos`` highest scores, -1 ("out") for the ``k_neg`` lowest, 0 (abstain) otherwise.

    Ties are broken by a random permutation drawn from ``seed`` (independent of which canaries are in).
    """
    scores = np.asarray(scores, dtype=np.float64)
    m = scores.shape[0]
    if k_pos < 0 or k_neg < 0 or k_pos + k_neg > m:
        raise ValueError(f"Expected k_pos={k_pos} >= 0, k_neg={k_neg} >= 0 and k_pos + k_neg <= m={m}.")
    if not np.all(np.isfinite(scores)):
        raise ValueError("Canary scores must be finite.")
    perm = np.random.default_rng(seed).permutation(m)
    order = perm[np.argsort(scores[perm], kind="stable")]  # ascending, ties in random order
    guesses = np.zeros(m, dtype=np.int64)
    guesses[order[:k_neg]] = -1
    if k_pos:
        guesses[order[m - k_pos:]] = 1
    return guesses


@dataclass(frozen=True)
class GuessBound:
    """The audit's best guess set and its epsilon lower bound."""

    epsilon_lower_bound: float
    confidence: float  # 1 - beta overall (each of the ``choices`` guess sets was tested at beta / choices)
    canaries: int  # m
    k_pos: int
    k_neg: int
    guesses: int  # r
    correct: int  # v
    choices: int


def epsilon_lower_bound_from_scores(scores: Sequence[float] | np.ndarray, included: Sequence[bool] | np.ndarray,
                                    *, delta: float, beta: float = 0.05,
                                    guess_fractions: Sequence[float] = DEFAULT_GUESS_FRACTIONS,
                                    seed: int = 0) -> GuessBound:
    """Turn canary scores into an epsilon lower bound at confidence 1 - beta.

    For each fraction f in ``guess_fractions`` the auditor guesses "in" for the top round(f m) scores and
    "out" for the bottom round(f m), and computes the bound at level beta / len(guess_fractions); the best is
    returned. The union bound makes the maximum valid at level beta.

    Args:
        scores: one score per canary, higher meaning "more likely included".
        included: the secret inclusion bits S (used only to count correct guesses).
        delta: the delta audited.
        beta: 1 - confidence.
        guess_fractions: fractions of m guessed on each side, each in (0, 0.5].
        seed: tie-breaking.
    """
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim != 1 or scores.size == 0:
        raise ValueError(f"Expected scores and included of the same shape (m,); got {scores.shape} and "
                         f"{included.shape}.")
    if not guess_fractions:
        raise ValueError("Expected at least one guess fraction.")
    for f in guess_fractions:
        if not 0 < f <= 0.5:
            raise ValueError(f"Expected guess fraction {f!r} in (0, 0.5].")
    m = scores.size
    level = beta / len(guess_fractions)
    truth = np.where(included, 1, -1)
    best: GuessBound | None = None
    for f in guess_fractions:
        k = max(1, int(round(f * m)))
        k = min(k, m // 2) if m >= 2 else 1
        g = guesses_from_scores(scores, k, k if m >= 2 else 0, seed=seed)
        r, v = int(np.count_nonzero(g)), int(np.count_nonzero(g == truth))
        eps = epsilon_lower_bound(m, r, v, delta=delta, beta=level)
        if best is None or eps > best.epsilon_lower_bound:
            best = GuessBound(eps, 1.0 - beta, m, k, int(np.count_nonzero(g == -1)), r, v, len(guess_fractions))
    assert best is not None
    return best


# ------------------------------------------------------------------------------------------ the audited run
@dataclass(frozen=True)
class AuditConfig:
    """Settings of ``audit_one_run`` (and of ``dpengine audit``; a TOML file's [audit] table uses these names).

    Attributes:
        epsilon: the target epsilon the noise multiplier is calibrated to (RDP accountant).
        delta: the delta of the guarantee and of the audit.
        canaries: m, the number of canaries (each in with probability 1/2).
        steps: DP-SGD steps.
        batch_size: expected batch size is about this (q = 1 / ceil(N / batch_size), N = real records + m).
        lr: SGD learning rate (mean loss reduction).
        max_grad_norm: the clipping threshold C.
        canary_scale: a canary's one-hot feature has this value: its unclipped gradient norm starts at
            about 0.95 * canary_scale (far above C, so skipped clipping shows).
        seed: seeds the canaries, the inclusion bits, the model, sampling and noise (not secure mode).
        beta: 1 - confidence of the lower bound.
        score: "gradient" (white-box, final minus initial weights) or "loss" (black-box, canary loss).
        plant_bug: "none", or a deliberate bug planted in this run's optimizer behind the accountant's back,
            to demonstrate that the audit catches it: "no-noise" (noise std 0) or "no-clip" (factors 1).
        grad_sample_mode: the per-sample gradient backend ("hooks", "ghost", "bk").
    """

    epsilon: float = 2.0
    delta: float = 1e-5
    canaries: int = 1000
    steps: int = 300
    batch_size: int = 128
    lr: float = 0.2
    max_grad_norm: float = 1.0
    canary_scale: float = 20.0
    seed: int = 0
    beta: float = 0.05
    score: str = "gradient"
    plant_bug: str = "none"
    grad_sample_mode: str = "bk"

    def __post_init__(self) -> None:
        positive(epsilon=self.epsilon, lr=self.lr, max_grad_norm=self.max_grad_norm, canary_scale=self.canary_scale)
        in_range(0.0, 0.1, delta=self.delta)
        if not (isinstance(self.canaries, int) and self.canaries >= 2):
            raise ValueError(f"Expected canaries={self.canaries!r} >= 2.")
        for name in ("steps", "batch_size"):
            val = getattr(self, name)
            if not (isinstance(val, int) and val >= 1):
                raise ValueError(f"Expected {name}={val!r} >= 1.")
        if not 0 < self.beta < 1:
            raise ValueError(f"Expected beta={self.beta!r} in (0, 1).")
        one_of(SCORES, score=self.score)
        one_of(PLANTED_BUGS, plant_bug=self.plant_bug)
        one_of(["hooks", "ghost", "bk"], grad_sample_mode=self.grad_sample_mode)


def load_audit_config(path: str | Path | None = None, **overrides: Any) -> AuditConfig:
    """An ``AuditConfig`` from a TOML file's ``[audit]`` table (or defaults), with ``overrides`` on top
    (``None`` values are ignored)."""
    raw: dict[str, Any] = {}
    if path is not None:
        data = tomllib.loads(Path(path).read_text())
        unknown_sections = set(data) - {"audit"}
        if unknown_sections:
            raise ValueError(f"Unknown section(s) {sorted(unknown_sections)}; expected [audit].")
        raw = dict(data.get("audit", {}))
    known = {f.name for f in dataclasses.fields(AuditConfig)}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"Unknown key(s) {sorted(unknown)} in [audit]; expected some of {sorted(known)}.")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return AuditConfig(**raw)


@dataclass(frozen=True)
class AuditResult:
    """What ``audit_one_run`` measured."""

    config: AuditConfig
    reported_epsilon: float  # the engine's accountant after training
    noise_multiplier: float
    sample_rate: float
    steps: int
    canaries_included: int
    bound: GuessBound
    test_accuracy: float  # of the audited model on the held-out digits (the training is real)
    seconds: float

    @property
    def lower_bound(self) -> float:
        return self.bound.epsilon_lower_bound

    @property
    def passed(self) -> bool:
        """False when the empirical lower bound exceeds the reported epsilon (a privacy violation, unless
        this run is the beta-probability false alarm)."""
        return self.lower_bound <= self.reported_epsilon

    def verdict(self) -> str:
        if self.passed:
            return (f"audit PASSED: empirical lower bound {self.lower_bound:.3f} <= reported epsilon "
                    f"{self.reported_epsilon:.3f} (this does not prove the run private)")
        return (f"audit FAILED: empirical lower bound {self.lower_bound:.3f} > reported epsilon "
                f"{self.reported_epsilon:.3f}")

    def summary(self) -> str:
        c, b = self.config, self.bound
        bug = "" if c.plant_bug == "none" else f"   [planted bug: {c.plant_bug}]"
        return "\n".join([
            f"training:  {self.steps} DP-SGD steps, q = {self.sample_rate:.4g}, sigma = {self.noise_multiplier:.4g}, "
            f"C = {c.max_grad_norm:g}, test accuracy {self.test_accuracy:.1%}, {self.seconds:.1f} s{bug}",
            f"canaries:  m = {b.canaries} ({self.canaries_included} included), score = {c.score}; best guess set: "
            f"{b.k_pos} in + {b.k_neg} out, {b.correct}/{b.guesses} correct (best of {b.choices})",
            f"reported:  epsilon = {self.reported_epsilon:.3f} at delta = {c.delta:g} (RDP accountant)",
            f"empirical: epsilon >= {self.lower_bound:.3f} with confidence {b.confidence:.0%} "
            f"(at most {max_lower_bound(b.canaries, delta=c.delta, beta=c.beta / b.choices):.2f} is "
            f"measurable with {b.canaries} canaries)",
            self.verdict(),
        ])

    def to_dict(self) -> dict[str, Any]:
        return {"config": dataclasses.asdict(self.config), "reported_epsilon": self.reported_epsilon,
                "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate, "steps": self.steps,
                "canaries_included": self.canaries_included, "bound": dataclasses.asdict(self.bound),
                "lower_bound": self.lower_bound, "passed": self.passed, "test_accuracy": self.test_accuracy,
                "seconds": self.seconds}


def _plant_bug(optimizer: Any, bug: str) -> None:
    """Break this run's clipping policy object (an instance attribute: no class and no other run is touched).
    The optimizer's noise_multiplier, and so the accountant, are left as they are: the bug is silent."""
    policy = optimizer.policy
    if bug == "no-noise":
        policy.noise_stds = lambda params, noise_multiplier: [0.0] * len(params)
    elif bug == "no-clip":
        policy.factors = lambda norms: torch.ones_like(norms)
    elif bug != "none":
        raise ValueError(f"Expected plant_bug={bug!r} to be one of {PLANTED_BUGS}.")


class CanaryLinear(nn.Module):
    """The audited model: logits = real(x) + canary_scale * canary[id].

    A bias-free linear model on the real features plus a one-hot canary feature: one embedding row per canary,
    row 0 for real records and placeholders (its ``padding_idx`` gets no gradient). Canary rows start at 0, so
    every canary's logits start uniform, and a canary's gradient, canary_scale * (softmax - e_y), lives in its
    own row only (a Dirac canary).
    """

    def __init__(self, d_real: int, m: int, classes: int, canary_scale: float) -> None:
        super().__init__()
        self.real = nn.Linear(d_real, classes, bias=False)
        self.canary = nn.Embedding(m + 1, classes, padding_idx=0)
        nn.init.zeros_(self.canary.weight)
        self.canary_scale = float(canary_scale)

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:
        return self.real(x) + self.canary_scale * self.canary(ids)  # (B, K)


def audit_one_run(config: AuditConfig | None = None, *, progress: bool = False) -> AuditResult:
    """Train once with dpengine on digits plus canaries and audit epsilon (see the module docstring).

    Privacy: uses ``secure_mode=False`` with a seed, so that the run is reproducible; the audit is about the
    mechanism, not about secret randomness.

    Returns:
        An ``AuditResult``; ``result.passed`` is False when the lower bound exceeds the reported epsilon.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from . import accounting
    from .engine import PrivacyEngine

    cfg = config or AuditConfig()
    start = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    m = cfg.canaries

    # real data: standardized digits, plus a constant-1 feature (the bias of the real task)
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=cfg.seed, stratify=y)
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-6
    classes = int(y.max()) + 1

    def features(a: np.ndarray) -> torch.Tensor:
        z = torch.as_tensor((a - mean) / std, dtype=torch.float32)
        return torch.cat([z, torch.ones(len(a), 1)], dim=1)

    # canaries: record i has all-zero features, id i + 1 and a random label; an excluded canary keeps id 0
    # (a placeholder whose gradient is exactly zero), so N, q and the expected batch size do not depend on
    # the inclusion bits
    canary_labels = rng.integers(0, classes, size=m)
    included = rng.random(m) < 0.5
    x_real = features(x_tr)
    train_x = torch.cat([x_real, torch.zeros(m, x_real.shape[1])])
    train_ids = torch.cat([torch.zeros(len(x_tr), dtype=torch.int64),
                           torch.as_tensor(np.where(included, np.arange(1, m + 1), 0), dtype=torch.int64)])
    train_y = torch.cat([torch.as_tensor(y_tr), torch.as_tensor(canary_labels)])

    torch.manual_seed(cfg.seed)
    model = CanaryLinear(x_real.shape[1], m, classes, cfg.canary_scale)
    e0 = model.canary.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    loader = DataLoader(TensorDataset(train_x, train_ids, train_y), batch_size=cfg.batch_size, shuffle=True)
    sample_rate = 1.0 / len(loader)  # what make_private's Poisson loader uses
    sigma = accounting.get_noise_multiplier(target_epsilon=cfg.epsilon, target_delta=cfg.delta,
                                            sample_rate=sample_rate, steps=cfg.steps)
    engine = PrivacyEngine(accountant="rdp", secure_mode=False, seed=cfg.seed)
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma,
        max_grad_norm=cfg.max_grad_norm, clipping="flat", grad_sample_mode=cfg.grad_sample_mode,
        poisson_sampling=True, loss_reduction="mean")
    if optimizer.sample_rate != sample_rate:
        raise RuntimeError(f"sample rate {optimizer.sample_rate} differs from the calibrated {sample_rate}")
    _plant_bug(optimizer, cfg.plant_bug)

    loss_fn = nn.CrossEntropyLoss()
    steps = 0
    while steps < cfg.steps:
        for xb, ib, yb in loader:
            optimizer.zero_grad()
            loss_fn(model(xb, ib), yb).backward()
            optimizer.step()
            steps += 1
            if progress and steps % 100 == 0:
                click.echo(f"  step {steps}/{cfg.steps}", err=True)
            if steps == cfg.steps:
                break

    with torch.no_grad():
        test_x = features(x_te)
        acc = float(model.real(test_x).argmax(1).eq(torch.as_tensor(y_te)).float().mean())
        rows, labels = torch.arange(m), torch.as_tensor(canary_labels)
        if cfg.score == "gradient":
            # <E_T[i+1] - E_0[i+1], e_y - 1/K>: the update along the canary's negative gradient at init
            delta_e = (model.canary.weight.detach() - e0)[1:]  # (m, K)
            scores = delta_e[rows, labels] - delta_e.mean(1)
        else:
            logits = model(torch.zeros(m, x_real.shape[1]), rows + 1)  # (m, K): the model's output on each canary
            scores = -nn.functional.cross_entropy(logits, labels, reduction="none")
    bound = epsilon_lower_bound_from_scores(scores.double().numpy(), included, delta=cfg.delta, beta=cfg.beta,
                                            seed=cfg.seed)
    return AuditResult(config=cfg, reported_epsilon=float(engine.get_epsilon(cfg.delta)),
                       noise_multiplier=float(sigma), sample_rate=float(sample_rate), steps=steps,
                       canaries_included=int(included.sum()), bound=bound, test_accuracy=acc,
                       seconds=time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------------- CLI
@click.command("audit")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="TOML file with an [audit] table (keys as the options below, with underscores).")
@click.option("--epsilon", type=float, default=None, help="Target epsilon of the audited run [2.0].")
@click.option("--delta", type=float, default=None, help="Delta of the guarantee and of the audit [1e-5].")
@click.option("--canaries", type=int, default=None, help="Number of canaries m, each in with probability 1/2 [1000].")
@click.option("--steps", type=int, default=None, help="DP-SGD steps [300].")
@click.option("--batch-size", type=int, default=None, help="Expected batch size, about [128].")
@click.option("--lr", type=float, default=None, help="SGD learning rate [0.2].")
@click.option("--seed", type=int, default=None, help="Seed of canaries, inclusion bits, sampling and noise [0].")
@click.option("--beta", type=float, default=None, help="1 - confidence of the lower bound [0.05].")
@click.option("--score", type=click.Choice(SCORES), default=None,
              help="gradient: white-box (final minus initial weights); loss: black-box canary loss [gradient].")
@click.option("--plant-bug", type=click.Choice(PLANTED_BUGS), default=None,
              help="Demonstration only: silently switch off noise or clipping in this run [none].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def audit(config_path: str | None, epsilon: float | None, delta: float | None, canaries: int | None,
          steps: int | None, batch_size: int | None, lr: float | None, seed: int | None, beta: float | None,
          score: str | None, plant_bug: str | None, as_json: bool) -> None:
    """Empirical privacy audit in one training run (Steinke, Nasr & Jagielski 2023): a lower bound on
    epsilon from canaries, compared with the accountant's epsilon. Exits 1 when the bound exceeds it."""
    try:
        cfg = load_audit_config(config_path, epsilon=epsilon, delta=delta, canaries=canaries, steps=steps,
                                batch_size=batch_size, lr=lr, seed=seed, beta=beta, score=score,
                                plant_bug=plant_bug)
    except (ValueError, TypeError, OSError) as e:
        raise click.ClickException(f"{config_path or 'audit options'}: {e}") from None
    # the audited model is tiny: intra-op threads only spin (5x slower with 2 threads on a busy 2-core machine)
    torch.set_num_threads(1)
    result = audit_one_run(cfg, progress=not as_json)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
    else:
        click.echo(result.summary())
    if not result.passed:
        raise SystemExit(1)
