"""Renyi DP of the Poisson-subsampled Gaussian mechanism and conversion to (epsilon, delta).

References:
    [MTZ19] I. Mironov, K. Talwar, L. Zhang. "Renyi Differential Privacy of the Sampled
        Gaussian Mechanism", 2019 (arXiv:1908.10530). Section 3.3 (integer orders, binomial
        expansion) and Section 3.4 (fractional orders, two-series expansion).
    [BBGHS20] B. Balle, G. Barthe, M. Gaboardi, J. Hsu, T. Sato. "Hypothesis Testing
        Interpretations and Renyi Differential Privacy", AISTATS 2020, Theorem 21
        (= Canonne, Kamath, Steinke 2020, Proposition 12).
    [Mir17] I. Mironov. "Renyi Differential Privacy", CSF 2017, Proposition 3 (classic conversion).

The quantity computed is ``A_alpha = E_{x ~ N(0, s^2)}[(1 - q + q L(x))^alpha]`` with
``L(x) = exp((2x - 1) / (2 s^2))`` the likelihood ratio N(1, s^2) / N(0, s^2), and
``RDP(alpha) = log(A_alpha) / (alpha - 1)`` (add/remove-one adjacency, sensitivity 1, noise
std ``s`` = noise_multiplier; MTZ19 show this direction dominates the other one).

Every value returned is an *upper bound* on the true RDP (up to floating-point rounding, for
which a margin is added): integer orders are summed exactly in log space; the fractional-order
series is truncated only past ``alpha`` where its terms alternate in sign with decreasing
magnitude, and the first omitted term is added when positive (Leibniz bound). Hence any
order may be used for the conversion, and optimising over continuous orders is sound.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Sequence

import numpy as np
from scipy import optimize, special

from ._validate import check_delta, check_int, check_noise_multiplier, check_probability

__all__ = [
    "DEFAULT_ORDERS",
    "classic_epsilon",
    "compute_epsilon",
    "compute_rdp",
    "epsilon_from_rdp",
    "rdp_subsampled_gaussian",
]

#: Integer orders evaluated before the continuous refinement: every integer up to 64, then a
#: geometric-ish ladder to 8192. Fractional orders (e.g. in (1, 2)) are reached by the refinement.
DEFAULT_ORDERS: tuple[int, ...] = tuple(
    list(range(2, 65))
    + [72, 80, 88, 96, 112, 128, 144, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896, 1024]
    + [1280, 1536, 2048, 3072, 4096, 6144, 8192]
)

_SERIES_MIN_TERMS = 64
_SERIES_MAX_TERMS = 1 << 20  # iteration cap of the fractional series
_SERIES_RTOL = 1e-9  # stop once the Leibniz tail bound is this small relative to the sum
_EPS = np.finfo(np.float64).eps


def _log_expm1(x: np.ndarray) -> np.ndarray:
    """Stable ``log(exp(x) - 1)`` for ``x > 0`` (``-inf`` at 0)."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(divide="ignore"):
        small = np.log(np.expm1(np.minimum(x, 30.0)))
        large = x + np.log1p(-np.exp(-np.maximum(x, 30.0)))
    return np.where(x < 30.0, small, large)


def _log_a_int_many(q: float, sigma: float, orders: np.ndarray) -> np.ndarray:
    """``log A_alpha`` for integer orders >= 2, vectorised over orders ([MTZ19] Sec. 3.3).

    Uses ``A - 1 = sum_{k>=2} C(a,k) (1-q)^(a-k) q^k (exp((k^2-k)/(2 s^2)) - 1)`` (the binomial
    identity removes the k = 0, 1 terms); every summand is positive, so there is no cancellation
    and no overflow in log space, for any order (1e4, 1e5, ...).
    """
    orders = np.asarray(orders, dtype=np.int64)
    lengths = orders - 1  # k = 2..alpha
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    alpha = np.repeat(orders, lengths).astype(np.float64)
    k = (np.arange(lengths.sum()) - np.repeat(starts, lengths) + 2).astype(np.float64)
    log_binom = special.gammaln(alpha + 1) - special.gammaln(k + 1) - special.gammaln(alpha - k + 1)
    log_terms = log_binom + (alpha - k) * math.log1p(-q) + k * math.log(q) + _log_expm1((k * k - k) / (2 * sigma**2))
    seg_max = np.maximum.reduceat(log_terms, starts)
    seg_sum = np.add.reduceat(np.exp(log_terms - np.repeat(seg_max, lengths)), starts)
    log_a_minus_1 = seg_max + np.log(seg_sum)
    return np.logaddexp(0.0, log_a_minus_1)


def _series_terms(q: float, sigma: float, alpha: float, i: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sign and log-magnitudes of the two series of [MTZ19] Sec. 3.4 at indices ``i``.

    ``s0_i = C(a,i) (1-q)^(a-i) q^i exp((i^2-i)/(2s^2)) Phi((z0-i)/s)`` and
    ``s1_i = C(a,i) (1-q)^i q^(a-i) exp((j^2-j)/(2s^2)) Phi((j-z0)/s)``, ``j = a - i``,
    ``z0 = s^2 log(1/q - 1) + 1/2`` (the point where q L(x) = 1 - q).
    """
    j = alpha - i
    with np.errstate(divide="ignore", invalid="ignore"):
        log_binom = special.gammaln(alpha + 1) - special.gammaln(i + 1) - special.gammaln(j + 1)
        sign = special.gammasgn(j + 1)
    pole = (j + 1 <= 0) & (np.floor(j + 1) == j + 1)  # C(a, i) = 0 for integer a < i
    # Leading coefficients by the exact product C(a,i) = prod_{k<i} (a-k)/(k+1): the difference of
    # large gammaln values loses ~1e-13 relative accuracy, which A - 1 ~ 0 would amplify.
    m = min(len(i), 128)
    if m > 1 and i[0] == 0:
        k = np.arange(m - 1, dtype=np.float64)
        with np.errstate(divide="ignore"):
            log_binom = log_binom.copy()
            log_binom[:m] = np.concatenate([[0.0], np.cumsum(np.log(np.abs(alpha - k)) - np.log(k + 1))])
    log_binom = np.where(pole, -np.inf, log_binom)
    sign = np.where(pole, 0.0, sign)
    z0 = sigma**2 * (math.log1p(-q) - math.log(q)) + 0.5
    c = 1.0 / (2 * sigma**2)
    lt0 = log_binom + i * math.log(q) + j * math.log1p(-q) + (i * i - i) * c + special.log_ndtr((z0 - i) / sigma)
    lt1 = log_binom + j * math.log(q) + i * math.log1p(-q) + (j * j - j) * c + special.log_ndtr((j - z0) / sigma)
    return sign, lt0, lt1


def _f_small(q: float, alpha: float) -> float:
    """``(1-q)^a - 1 + a q`` without cancellation (binomial series when ``a q`` is small)."""
    if alpha * q > 0.1:
        return math.expm1(alpha * math.log1p(-q)) + alpha * q
    total, coef, k = 0.0, alpha * (alpha - 1) / 2.0, 2
    while True:
        term = coef * (-q) ** k
        total += term
        if abs(term) <= 1e-18 * abs(total) or k > 200:
            return total
        coef *= (alpha - k) / (k + 1)
        k += 1


def _log_a_frac(q: float, sigma: float, alpha: float) -> float:
    """Upper bound on ``log A_alpha`` for any real order ``alpha > 1`` ([MTZ19] Sec. 3.4).

    The series is summed up to index ``N - 1`` with ``N > alpha`` so that the remaining terms
    alternate in sign with decreasing magnitude (the binomial coefficients do, and each series'
    remaining factor is a constant times the Mills ratio, which is decreasing); the tail is then
    bounded by ``max(0, a_N)``. ``N`` grows geometrically until ``|a_N|`` is below
    ``_SERIES_RTOL`` of the sum, capped at ``_SERIES_MAX_TERMS``; on non-convergence ``+inf`` is
    returned with a warning (never an early, possibly too small, value).
    """
    z0 = sigma**2 * (math.log1p(-q) - math.log(q)) + 0.5
    n = max(_SERIES_MIN_TERMS, int(2 * math.ceil(alpha)) + 2)
    while True:
        i = np.arange(n + 1, dtype=np.float64)
        sign, lt0, lt1 = _series_terms(q, sigma, alpha, i)
        lmag = np.logaddexp(lt0, lt1)
        log_tail = float(lmag[-1])
        tail_positive = sign[-1] > 0
        if not np.isnan(lmag).any() and log_tail < np.inf:
            # Log-space sum (accurate when A is not close to 1).
            signs = np.concatenate([sign[:-1], sign[:-1], [1.0 if tail_positive else 0.0]])
            logs = np.concatenate([lt0[:-1], lt1[:-1], [log_tail]])
            with np.errstate(divide="ignore", invalid="ignore"):
                log_a, s = special.logsumexp(logs, b=signs, return_sign=True)
            if np.isfinite(log_a) and s > 0 and log_a > 0.1:
                if log_tail <= math.log(_SERIES_RTOL) + float(_log_expm1(log_a)):
                    return float(log_a)
            elif np.isfinite(log_a) and s > 0:
                # A close to 1: sum A - 1 in linear space so tiny RDP keeps full relative
                # precision. A - 1 = E[(1 - q + qL)^a - 1 - a q (L - 1)] split at z0 (E[L] = 1):
                # left  = f(q) Phi(z0/s) + a q ((1-q)^(a-1) - 1) Phi((z0-1)/s) + sum_{i>=2} s0_i
                # right = sum_{i>=0} s1_i - (1 - a q) Phi(-z0/s) - a q Phi(-(z0-1)/s)
                parts = [
                    _f_small(q, alpha) * special.ndtr(z0 / sigma),
                    alpha * q * math.expm1((alpha - 1) * math.log1p(-q)) * special.ndtr((z0 - 1) / sigma),
                    -(1 - alpha * q) * special.ndtr(-z0 / sigma),
                    -alpha * q * special.ndtr((1 - z0) / sigma),
                ]
                s0 = sign[2:-1] * np.exp(lt0[2:-1])
                s1 = sign[:-1] * np.exp(lt1[:-1])
                tail = math.exp(log_tail)
                total = math.fsum(parts) + math.fsum(s0) + math.fsum(s1) + (tail if tail_positive else 0.0)
                scale = sum(abs(p) for p in parts) + float(np.abs(s0).sum() + np.abs(s1).sum())
                a_minus_1 = max(total + 16 * _EPS * scale, 0.0)  # rounding margin: never below truth
                if tail <= _SERIES_RTOL * a_minus_1 or tail < 1e-300:
                    return float(math.log1p(a_minus_1))
        if n >= _SERIES_MAX_TERMS:
            warnings.warn(
                f"RDP series for order alpha={alpha} (q={q}, sigma={sigma}) did not converge within "
                f"{n} terms; using +inf for this order.",
                RuntimeWarning,
                stacklevel=3,
            )
            return math.inf
        n = min(4 * n, _SERIES_MAX_TERMS)


def _check_q_sigma(sample_rate: float, noise_multiplier: float) -> tuple[float, float]:
    return check_probability("sample_rate", sample_rate), check_noise_multiplier("noise_multiplier", noise_multiplier)


def rdp_subsampled_gaussian(sample_rate: float, noise_multiplier: float, orders: float | Sequence[float]) -> np.ndarray:
    """RDP of one step of the Poisson-subsampled Gaussian mechanism ([MTZ19]).

    Integer orders use the exact binomial sum (in log space with ``gammaln``), other orders the
    two-series expansion with a sound stopping rule. ``q = 1`` gives ``alpha / (2 sigma^2)``,
    ``q = 0`` gives 0 and ``sigma = 0`` (with ``q > 0``) gives ``+inf``.

    Args:
        sample_rate: Poisson sampling probability ``q`` in [0, 1].
        noise_multiplier: Noise std divided by the clipping norm, ``sigma >= 0``.
        orders: One order or a sequence of orders, each > 1.

    Returns:
        Array of RDP values (an upper bound for each order), same shape as ``orders``.

    Raises:
        ValueError: On an invalid sample rate, noise multiplier or order.

    >>> rdp_subsampled_gaussian(1.0, 2.0, [2, 3.5]).tolist()
    [0.25, 0.4375]
    >>> round(float(rdp_subsampled_gaussian(0.01, 1.0, 8)), 8)
    0.00089364
    >>> round(float(rdp_subsampled_gaussian(0.01, 1.0, 8.0000001)), 8)
    0.00089364
    """
    q, sigma = _check_q_sigma(sample_rate, noise_multiplier)
    arr = np.asarray(orders, dtype=np.float64)
    flat = arr.reshape(-1)
    if flat.size and not np.all(flat > 1):
        bad = flat[~(flat > 1)][0]
        raise ValueError(f"Expected every order > 1, got order={bad}.")
    if q == 0 or math.isinf(sigma):
        return np.zeros_like(arr)
    if sigma == 0:
        return np.full_like(arr, np.inf)
    if q == 1:
        return arr / (2 * sigma**2)  # [MTZ19]: un-subsampled Gaussian
    out = np.empty_like(flat)
    is_int = flat == np.floor(flat)
    if is_int.any():
        ints = flat[is_int].astype(np.int64)
        out[is_int] = _log_a_int_many(q, sigma, ints) / (ints - 1)
    for idx in np.flatnonzero(~is_int):
        out[idx] = _log_a_frac(q, sigma, float(flat[idx])) / (flat[idx] - 1)
    return out.reshape(arr.shape)


@functools.lru_cache(maxsize=256)
def _default_grid_rdp(q: float, sigma: float) -> np.ndarray:
    out = rdp_subsampled_gaussian(q, sigma, np.asarray(DEFAULT_ORDERS, dtype=np.float64))
    out.flags.writeable = False
    return out


def compute_rdp(sample_rate: float, noise_multiplier: float, steps: int, orders: float | Sequence[float]) -> np.ndarray:
    """RDP of ``steps`` compositions of the Poisson-subsampled Gaussian (RDP adds up).

    Args:
        sample_rate: Poisson sampling probability in [0, 1].
        noise_multiplier: Noise multiplier ``sigma >= 0``.
        steps: Number of steps (>= 0).
        orders: Order(s) > 1.

    Returns:
        ``steps * rdp(orders)`` as an array.

    Raises:
        ValueError: On invalid inputs.

    >>> round(float(compute_rdp(0.01, 1.0, 1000, 8)), 5)
    0.89364
    """
    steps = check_int("steps", steps)
    rdp = rdp_subsampled_gaussian(sample_rate, noise_multiplier, orders)
    return rdp * steps if steps else np.zeros_like(rdp)


def epsilon_from_rdp(orders: float | Sequence[float], rdp: float | Sequence[float], delta: float) -> np.ndarray:
    """Converts RDP to epsilon at each order ([BBGHS20] Thm 21, clamped at 0).

    ``eps = rdp + log((a-1)/a) - (log(delta) + log(a)) / (a-1)``. Additionally, if
    ``1 - exp(-rdp) <= delta^2`` then epsilon is 0 (total variation <= sqrt(1 - exp(-KL)) by
    Bretagnolle-Huber and KL <= D_alpha; the same rule dp-accounting applies).

    Args:
        orders: Order(s) > 1.
        rdp: RDP value(s) at those orders.
        delta: Target delta in (0, 1).

    Returns:
        Epsilon at each order.

    Raises:
        ValueError: On an invalid delta.

    >>> round(float(epsilon_from_rdp(32, 0.5, 1e-5)), 4)
    0.7278
    """
    delta = check_delta("delta", delta)
    a = np.asarray(orders, dtype=np.float64)
    r = np.asarray(rdp, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        eps = r + np.log1p(-1.0 / a) - (math.log(delta) + np.log(a)) / (a - 1)
        eps = np.where(delta**2 + np.expm1(-r) >= 0, 0.0, eps)
    eps = np.where(np.isnan(eps), np.inf, eps)
    return np.maximum(eps, 0.0)


def classic_epsilon(orders: float | Sequence[float], rdp: float | Sequence[float], delta: float) -> np.ndarray:
    """The classic conversion ``eps = rdp + log(1/delta) / (alpha - 1)`` ([Mir17] Prop. 3).

    Args:
        orders: Order(s) > 1.
        rdp: RDP value(s) at those orders.
        delta: Target delta in (0, 1).

    Returns:
        Epsilon at each order (looser than :func:`epsilon_from_rdp`, kept for comparison).

    Raises:
        ValueError: On an invalid delta.

    >>> round(float(classic_epsilon(32, 0.5, 1e-5)), 4)
    0.8714
    """
    delta = check_delta("delta", delta)
    a = np.asarray(orders, dtype=np.float64)
    return np.asarray(rdp, dtype=np.float64) + math.log(1 / delta) / (a - 1)


Segment = tuple[float, float, int]


def _normalise_segments(segments: Iterable[Segment]) -> list[Segment]:
    out = []
    for seg in segments:
        sigma, q, steps = seg
        q, sigma = _check_q_sigma(q, sigma)
        steps = check_int("num_steps", steps)
        if steps and q > 0 and not math.isinf(sigma):
            out.append((sigma, q, steps))
    return out


def _total_rdp(segments: list[Segment], orders: np.ndarray) -> np.ndarray:
    total = np.zeros_like(orders, dtype=np.float64)
    for sigma, q, steps in segments:
        total = total + steps * rdp_subsampled_gaussian(q, sigma, orders)
    return total


def compute_epsilon(
    segments: Iterable[Segment],
    delta: float,
    orders: Sequence[float] | None = None,
    conversion: str = "balle",
) -> tuple[float, float | None]:
    """Epsilon of a heterogeneous composition of Poisson-subsampled Gaussian segments.

    RDP adds per order over segments ``(noise_multiplier, sample_rate, num_steps)``. With
    ``orders=None`` the default integer grid (2..8192) is evaluated, then the best order is
    refined by bounded scalar minimisation over continuous orders between its grid neighbours
    (``(1, 3)`` when the best grid order is 2); every order gives a valid bound, so the minimum
    over all evaluated orders is reported.

    Args:
        segments: Iterable of ``(noise_multiplier, sample_rate, num_steps)``.
        delta: Target delta in (0, 1).
        orders: Explicit orders to use instead (no refinement).
        conversion: ``"balle"`` ([BBGHS20] Thm 21, default) or ``"classic"`` ([Mir17]).

    Returns:
        ``(epsilon, best_order)``; ``best_order`` is ``None`` when epsilon is 0 without any step.

    Raises:
        ValueError: On invalid inputs.

    >>> eps, order = compute_epsilon([(1.1, 256 / 60000, 14063)], 1e-5)
    >>> round(eps, 4), round(order, 2)
    (2.5966, 8.12)
    """
    delta = check_delta("delta", delta)
    if conversion not in ("balle", "classic"):
        raise ValueError(f"Expected conversion={conversion!r} in ('balle', 'classic').")
    conv = epsilon_from_rdp if conversion == "balle" else classic_epsilon
    segs = _normalise_segments(segments)
    if not segs:
        return 0.0, None
    if orders is not None:
        grid = np.asarray(orders, dtype=np.float64)
        eps = conv(grid, _total_rdp(segs, grid), delta)
        idx = int(np.argmin(eps))
        return float(eps[idx]), float(grid[idx])
    grid = np.asarray(DEFAULT_ORDERS, dtype=np.float64)
    total = np.zeros_like(grid)
    for sigma, q, steps in segs:
        total = total + steps * _default_grid_rdp(q, sigma)
    eps = conv(grid, total, delta)
    idx = int(np.argmin(eps))
    best_eps, best_order = float(eps[idx]), float(grid[idx])
    if best_eps == 0.0 or not math.isfinite(best_eps):
        return best_eps, best_order
    lo = 1.0 + 1e-6 if idx == 0 else float(grid[idx - 1])
    hi = float(grid[min(idx + 1, len(grid) - 1)]) if idx + 1 < len(grid) else float(grid[-1]) * 4

    def objective(a: float) -> float:
        nonlocal best_eps, best_order
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            val = float(conv(a, _total_rdp(segs, np.asarray([a]))[0], delta))
        if val < best_eps:
            best_eps, best_order = val, a
        return val

    optimize.minimize_scalar(objective, bounds=(lo, hi), method="bounded", options={"xatol": 1e-7 * best_order})
    return float(best_eps), float(best_order)
