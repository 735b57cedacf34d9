"""Conservative calibration: noise multiplier, number of steps or sample rate for a target epsilon.

Every solver returns a value whose epsilon (by the chosen accountant) is <= the target; the
continuous solvers also land within ``epsilon_tolerance`` (default 0.1%) below the target.

Epochs are turned into steps by ``steps = ceil(epochs / sample_rate)`` (after rounding the ratio
to 9 decimals to absorb floating-point noise): at least ``epochs`` expected passes, never fewer.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ._validate import check_delta, check_int, check_noise_multiplier, check_positive, check_probability
from .accountants import create_accountant

__all__ = ["epochs_to_steps", "get_epsilon", "get_max_steps", "get_noise_multiplier", "get_sample_rate"]


def epochs_to_steps(epochs: float, sample_rate: float) -> int:
    """Number of steps for ``epochs`` passes at ``sample_rate``: ``ceil(epochs / sample_rate)``.

    Args:
        epochs: Expected number of passes over the data (> 0).
        sample_rate: Poisson sampling probability in (0, 1].

    Returns:
        The number of steps.

    Raises:
        ValueError: On invalid inputs.

    >>> epochs_to_steps(60, 256 / 60000)
    14063
    >>> epochs_to_steps(3, 0.1)
    30
    """
    epochs = check_positive("epochs", epochs)
    q = check_probability("sample_rate", sample_rate)
    if q == 0:
        raise ValueError(f"Expected sample_rate={sample_rate} > 0 to convert epochs to steps.")
    return int(math.ceil(round(epochs / q, 9)))


def _resolve_steps(steps: int | None, epochs: float | None, sample_rate: float) -> int:
    if (steps is None) == (epochs is None):
        raise ValueError(f"Expected exactly one of steps={steps} and epochs={epochs}.")
    if steps is not None:
        return check_int("steps", steps)
    return epochs_to_steps(epochs, sample_rate)  # type: ignore[arg-type]


def get_epsilon(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon of ``steps`` homogeneous steps with the named accountant.

    Args:
        noise_multiplier: Noise multiplier (>= 0).
        sample_rate: Poisson sampling probability in [0, 1].
        steps: Number of steps (>= 0).
        delta: Target delta in (0, 1).
        accountant: ``"rdp"``, ``"pld"`` or ``"prv"``.

    Returns:
        Epsilon.

    Raises:
        ValueError: On invalid inputs.

    >>> round(get_epsilon(1.0, 0.01, 1000, 1e-5), 4)
    2.1013
    """
    acc = create_accountant(accountant)
    acc.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate, num_steps=steps)
    return acc.get_epsilon(delta)


def _solve_log(
    eps_of: Callable[[float], float], lo: float, hi: float, target: float, tol: float, increasing: bool, max_iter: int = 100
) -> float:
    """Finds x in [lo, hi] (log-space Illinois regula falsi) with (1 - tol) target <= eps(x) <= target.

    Requires eps(safe end) <= target < eps(other end); returns the safe end of the final bracket
    (so the answer is conservative even if the tolerance is not reached).
    """
    safe, unsafe = (lo, hi) if increasing else (hi, lo)
    f_safe, f_unsafe = eps_of(safe), eps_of(unsafe)
    goal = target * (1 - tol / 2)
    lg = math.log(goal)

    def h(f: float) -> float:
        return (math.log(f) if f > 0 else -745.0) - lg if math.isfinite(f) else 745.0

    h_safe, h_unsafe = h(f_safe), h(f_unsafe)
    side = 0
    for it in range(max_iter):
        if (1 - tol) * target <= f_safe <= target:
            return safe
        ls, lu = math.log(safe), math.log(unsafe)
        if it % 3 == 2 or h_unsafe - h_safe <= 0:  # guarantee progress: plain bisection now and then
            lm = 0.5 * (ls + lu)
        else:
            lm = ls - h_safe * (lu - ls) / (h_unsafe - h_safe)
            lm = min(max(lm, min(ls, lu) + 1e-3 * abs(lu - ls)), max(ls, lu) - 1e-3 * abs(lu - ls))
        x = math.exp(lm)
        fx = eps_of(x)
        if fx <= target:
            safe, f_safe, h_safe = x, fx, h(fx)
            if side == 1:
                h_unsafe /= 2
            side = 1
        else:
            unsafe, f_unsafe, h_unsafe = x, fx, h(fx)
            if side == -1:
                h_safe /= 2
            side = -1
        if abs(math.log(unsafe) - math.log(safe)) < 1e-13:
            break
    return safe


def get_noise_multiplier(
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int | None = None,
    epochs: float | None = None,
    accountant: str = "rdp",
    epsilon_tolerance: float = 1e-3,
) -> float:
    """Smallest-ish noise multiplier whose epsilon is within ``epsilon_tolerance`` below the target.

    Args:
        target_epsilon: Target epsilon (> 0).
        target_delta: Target delta in (0, 1).
        sample_rate: Poisson sampling probability in [0, 1].
        steps: Number of steps; or give ``epochs`` (``steps = ceil(epochs / sample_rate)``).
        epochs: Number of epochs, alternative to ``steps``.
        accountant: ``"rdp"``, ``"pld"`` or ``"prv"``.
        epsilon_tolerance: Relative window: the result has ``(1 - tol) * target <= eps <= target``.

    Returns:
        The noise multiplier (0.0 if no step touches data: ``steps == 0`` or ``sample_rate == 0``).

    Raises:
        ValueError: On invalid inputs or if no finite noise multiplier reaches the target.

    >>> sigma = get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.004, steps=2500)
    >>> round(sigma, 3)
    0.735
    >>> 0.999 * 3.0 <= get_epsilon(sigma, 0.004, 2500, 1e-5) <= 3.0
    True
    """
    target = check_positive("target_epsilon", target_epsilon)
    delta = check_delta("target_delta", target_delta)
    q = check_probability("sample_rate", sample_rate)
    n = _resolve_steps(steps, epochs, q)
    if n == 0 or q == 0:
        return 0.0

    def eps_of(sigma: float) -> float:
        return get_epsilon(sigma, q, n, delta, accountant)

    hi = 1.0
    while eps_of(hi) > target:
        hi *= 4
        if hi > 1e8:
            raise ValueError(
                f"No noise multiplier <= 1e8 reaches target_epsilon={target_epsilon} "
                f"(target_delta={target_delta}, sample_rate={sample_rate}, steps={n})."
            )
    lo = hi / 4
    while eps_of(lo) <= target:
        hi, lo = lo, lo / 4
        if lo < 1e-6:
            return hi
    return _solve_log(eps_of, lo, hi, target, epsilon_tolerance, increasing=False)


def get_max_steps(
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    noise_multiplier: float,
    accountant: str = "rdp",
    max_steps: int = 10**12,
) -> int:
    """Largest number of steps whose epsilon stays <= the target.

    Args:
        target_epsilon: Target epsilon (> 0).
        target_delta: Target delta in (0, 1).
        sample_rate: Poisson sampling probability in [0, 1].
        noise_multiplier: Noise multiplier (>= 0).
        accountant: ``"rdp"``, ``"pld"`` or ``"prv"``.
        max_steps: Upper limit of the search.

    Returns:
        ``T`` with ``eps(T) <= target < eps(T + 1)``.

    Raises:
        ValueError: If even one step exceeds the target, or the budget is never exhausted
            within ``max_steps`` (e.g. ``sample_rate=0``).

    >>> get_max_steps(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.004, noise_multiplier=0.85)
    7772
    """
    target = check_positive("target_epsilon", target_epsilon)
    delta = check_delta("target_delta", target_delta)
    q = check_probability("sample_rate", sample_rate)
    sigma = check_noise_multiplier("noise_multiplier", noise_multiplier)

    def eps_of(t: int) -> float:
        return get_epsilon(sigma, q, t, delta, accountant)

    if eps_of(1) > target:
        raise ValueError(
            f"A single step already exceeds target_epsilon={target_epsilon} "
            f"(noise_multiplier={noise_multiplier}, sample_rate={sample_rate}, target_delta={target_delta})."
        )
    lo, hi = 1, 2
    while eps_of(hi) <= target:
        lo, hi = hi, hi * 2
        if hi > max_steps:
            raise ValueError(
                f"The budget target_epsilon={target_epsilon} is not exhausted within max_steps={max_steps} "
                f"(noise_multiplier={noise_multiplier}, sample_rate={sample_rate})."
            )
    while hi - lo > 1:  # invariant: eps(lo) <= target < eps(hi)
        mid = (lo + hi) // 2
        if eps_of(mid) <= target:
            lo = mid
        else:
            hi = mid
    return lo


def get_sample_rate(
    target_epsilon: float,
    target_delta: float,
    noise_multiplier: float,
    steps: int | None = None,
    epochs: float | None = None,
    accountant: str = "rdp",
    epsilon_tolerance: float = 1e-3,
) -> float:
    """Largest-ish sample rate whose epsilon is within ``epsilon_tolerance`` below the target.

    With ``epochs`` the number of steps follows the sample rate (``ceil(epochs / q)``).

    Args:
        target_epsilon: Target epsilon (> 0).
        target_delta: Target delta in (0, 1).
        noise_multiplier: Noise multiplier (>= 0).
        steps: Number of steps; or ``epochs``.
        epochs: Number of epochs, alternative to ``steps``.
        accountant: ``"rdp"``, ``"pld"`` or ``"prv"``.
        epsilon_tolerance: Relative window below the target.

    Returns:
        The sample rate in (0, 1] (1.0 if even full-batch training stays within the target).

    Raises:
        ValueError: On invalid inputs or an infeasible target (e.g. ``noise_multiplier=0``).

    >>> q = get_sample_rate(target_epsilon=3.0, target_delta=1e-5, noise_multiplier=0.85, steps=2500)
    >>> round(q, 5)
    0.00654
    """
    target = check_positive("target_epsilon", target_epsilon)
    delta = check_delta("target_delta", target_delta)
    sigma = check_noise_multiplier("noise_multiplier", noise_multiplier)
    if (steps is None) == (epochs is None):
        raise ValueError(f"Expected exactly one of steps={steps} and epochs={epochs}.")
    if steps is not None:
        steps = check_int("steps", steps)
    if epochs is not None:
        epochs = check_positive("epochs", epochs)
    if sigma == 0:
        raise ValueError(f"No sample_rate > 0 reaches target_epsilon={target_epsilon} with noise_multiplier=0.")

    def eps_of(q: float) -> float:
        n = steps if steps is not None else epochs_to_steps(epochs, q)  # type: ignore[arg-type]
        return get_epsilon(sigma, q, n, delta, accountant)

    if eps_of(1.0) <= target:
        return 1.0
    lo = 0.5
    while eps_of(lo) > target:
        lo /= 4
        if lo < 1e-12:
            raise ValueError(
                f"No sample_rate >= 1e-12 reaches target_epsilon={target_epsilon} "
                f"(noise_multiplier={noise_multiplier}, target_delta={target_delta})."
            )
    return _solve_log(eps_of, lo, min(1.0, lo * 4), target, epsilon_tolerance, increasing=True)
