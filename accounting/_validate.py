"""Small input-validation helpers shared by the accounting package.

Every error message names the parameter and carries the offending value, e.g.
``Expected sample_rate=1.3 in [0, 1].``
"""

from __future__ import annotations

import math
from numbers import Integral, Real

__all__ = ["check_delta", "check_int", "check_noise_multiplier", "check_positive", "check_probability"]


def _as_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"Expected {name} to be a real number, got {value!r} ({type(value).__name__}).")
    out = float(value)
    if math.isnan(out):
        raise ValueError(f"Expected {name}={value} to be a number, got NaN.")
    return out


def check_probability(name: str, value: object) -> float:
    """Checks that ``value`` lies in [0, 1].

    Args:
        name: Parameter name used in the error message.
        value: The value to check.

    Returns:
        The value as a float.

    Raises:
        ValueError: If the value is outside [0, 1] or NaN.
        TypeError: If the value is not a real number.

    >>> check_probability("sample_rate", 0.25)
    0.25
    >>> check_probability("sample_rate", 1.3)
    Traceback (most recent call last):
    ...
    ValueError: Expected sample_rate=1.3 in [0, 1].
    """
    out = _as_float(name, value)
    if not 0.0 <= out <= 1.0:
        raise ValueError(f"Expected {name}={value} in [0, 1].")
    return out


def check_delta(name: str, value: object) -> float:
    """Checks that a target delta lies in the open interval (0, 1).

    Args:
        name: Parameter name used in the error message.
        value: The value to check.

    Returns:
        The value as a float.

    Raises:
        ValueError: If the value is not in (0, 1).

    >>> check_delta("delta", 1e-5)
    1e-05
    >>> check_delta("delta", 0)
    Traceback (most recent call last):
    ...
    ValueError: Expected delta=0 in (0, 1).
    """
    out = _as_float(name, value)
    if not 0.0 < out < 1.0:
        raise ValueError(f"Expected {name}={value} in (0, 1).")
    return out


def check_noise_multiplier(name: str, value: object) -> float:
    """Checks that a noise multiplier is >= 0 (``inf`` allowed: no privacy loss).

    Args:
        name: Parameter name used in the error message.
        value: The value to check.

    Returns:
        The value as a float.

    Raises:
        ValueError: If the value is negative.

    >>> check_noise_multiplier("noise_multiplier", -1.0)
    Traceback (most recent call last):
    ...
    ValueError: Expected noise_multiplier=-1.0 >= 0.
    """
    out = _as_float(name, value)
    if out < 0:
        raise ValueError(f"Expected {name}={value} >= 0.")
    return out


def check_positive(name: str, value: object, *, allow_inf: bool = False) -> float:
    """Checks that ``value`` is a strictly positive (finite unless ``allow_inf``) number.

    Args:
        name: Parameter name used in the error message.
        value: The value to check.
        allow_inf: Whether ``+inf`` is accepted.

    Returns:
        The value as a float.

    Raises:
        ValueError: If the value is not > 0 (or is infinite when not allowed).

    >>> check_positive("target_epsilon", 3)
    3.0
    """
    out = _as_float(name, value)
    if not out > 0 or (math.isinf(out) and not allow_inf):
        raise ValueError(f"Expected {name}={value} > 0" + ("" if allow_inf else " and finite") + ".")
    return out


def check_int(name: str, value: object, *, minimum: int = 0) -> int:
    """Checks that ``value`` is an integer >= ``minimum``.

    Args:
        name: Parameter name used in the error message.
        value: The value to check (an integral float such as ``10.0`` is accepted).
        minimum: The smallest accepted value.

    Returns:
        The value as an int.

    Raises:
        ValueError: If the value is not integral or below ``minimum``.

    >>> check_int("num_steps", 3.0)
    3
    >>> check_int("num_steps", -2)
    Traceback (most recent call last):
    ...
    ValueError: Expected num_steps=-2 to be an integer >= 0.
    """
    if isinstance(value, bool):
        raise TypeError(f"Expected {name} to be an integer, got {value!r}.")
    if isinstance(value, Integral):
        out = int(value)
    elif isinstance(value, Real) and math.isfinite(float(value)) and float(value).is_integer():
        out = int(value)
    else:
        raise ValueError(f"Expected {name}={value} to be an integer >= {minimum}.")
    if out < minimum:
        raise ValueError(f"Expected {name}={value} to be an integer >= {minimum}.")
    return out
