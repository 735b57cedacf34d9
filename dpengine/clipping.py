"""Clipping policies: per-sample norms -> per-sample factors, and the sensitivity noise is scaled to.

A policy decides *what* is clipped; the grad-sample backend decides *how* norms and clipped sums are
computed. Every policy states its sensitivity, so no caller recomputes it from flags.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from torch import Tensor

from ._validate import positive


class ClippingMode(enum.Enum):
    FLAT = "flat"


@dataclass(frozen=True)
class FlatClipping:
    """Clip each sample's whole gradient (all trainable parameters together) to norm ``max_grad_norm``.

    Factor ``min(1, C / (||g_i|| + 1e-6))`` as in Opacus; every clipped gradient has norm <= C, so the
    L2 sensitivity of the sum under add/remove-one adjacency is C.
    """

    max_grad_norm: float

    def __post_init__(self) -> None:
        positive(max_grad_norm=self.max_grad_norm)

    @property
    def sensitivity(self) -> float:
        return float(self.max_grad_norm)

    def factors(self, norms: Tensor) -> Tensor:
        return (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)


def make_policy(mode: str | ClippingMode, max_grad_norm: float) -> FlatClipping:
    """Build the policy named at the user-facing boundary (strings are validated here, once)."""
    try:
        mode = ClippingMode(mode)
    except ValueError:
        raise ValueError(f"Unknown clipping={mode!r}; supported: {[m.value for m in ClippingMode]}.") from None
    return FlatClipping(max_grad_norm)
