"""Argument checks whose messages name the parameter and carry the bad value."""

from __future__ import annotations

import math
from typing import Any


def _one(kw: dict[str, Any]) -> tuple[str, Any]:
    if len(kw) != 1:
        raise TypeError("pass exactly one keyword argument")
    return next(iter(kw.items()))


def positive(**kw: Any) -> None:
    for name, v in kw.items():
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"Expected {name}={v!r} > 0.")


def non_negative(**kw: Any) -> None:
    name, v = _one(kw)
    if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
        raise ValueError(f"Expected {name}={v!r} >= 0.")


def in_range(lo: float, hi: float, **kw: Any) -> None:
    name, v = _one(kw)
    if not (isinstance(v, (int, float)) and lo <= v <= hi):
        raise ValueError(f"Expected {name}={v!r} in [{lo}, {hi}].")


def one_of(options: list[str], **kw: Any) -> None:
    name, v = _one(kw)
    if v not in options:
        raise ValueError(f"Expected {name}={v!r} to be one of {options}.")
