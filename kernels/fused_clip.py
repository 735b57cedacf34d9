"""FlashDP-style per-layer clipping of a linear layer: norms, factors and clipped sum in one launch pair.

Wang et al. 2025 ("FlashDP") fuse a layer's per-sample norm, clipping factor and clipped sum into the
layer's backward so that per-sample gradients never reach memory. Here, for one layer whose weight is a
clipping group of its own (per-layer clipping):

1. ``gram_norm_sq`` or ``materialized_norm_sq`` (``linear_norms.py``) reads a and g once per tile and
   leaves the (B,) squared norms in a buffer (no Gram matrix, no per-sample gradient is written);
2. ``_clipped_sum_kernel`` with ``FROM_NORMS`` reads those norms, forms each sample's factor
   ``min(1, C / (||G_i|| + 1e-6))`` in registers and accumulates ``sum_i c_i G_i`` in fp32.

A norm must be complete before any of its sample's contribution can be scaled, and a grid-wide barrier is
not available in Triton, hence a pair of launches and not one. Nothing between them runs on the host.
"""

from __future__ import annotations

import torch

from ._common import acc_dtype
from .clipped_sum import _launch
from .linear_norms import gram_norm_sq, materialized_norm_sq


def fused_clip(x: torch.Tensor, y: torch.Tensor, *, gram: bool, clip: float, scale: float = 1.0,
               mult: float = 1.0, extra_sq: torch.Tensor | None = None, pad: float = 0.0,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's per-sample norms, clipping factors and clipped sum ``sum_i c_i x_i^T y_i``.

    Args:
        x: (B, T, p) rows operand, y: (B, T, d) columns operand (see ``clipped_sum``), same dtype.
        gram: Gram form of the norm (cheaper when T (p + d) < p d) or the materialized form.
        clip: the group's threshold C.
        scale: the norm of sample i is ``sqrt(sq_i) * scale`` (the batch size for a mean-reduced loss).
        mult: every factor is multiplied by it (mean-reduction scale times the output scale).
        extra_sq: (B,) squared norms of the rest of the clipping group (the layer's bias), or None.
        pad: the Gram form's underflow pad (``linear_norms.gram_norm_sq``); the materialized form needs none
            (it squares the per-sample gradient's own entries, whose underflow loses only a negligible amount).

    Returns:
        ``sq`` (B,) squared norms of x_i^T y_i plus ``extra_sq``; ``c`` (B,) the factors used; ``sum``
        (p, d). fp32 (fp64 for fp64 inputs).
    """
    if clip <= 0:
        raise ValueError(f"Expected clip > 0. Found {clip}.")
    # (a, g) in the norm's naming; ||x^T y|| is symmetric in the roles
    sq = gram_norm_sq(y, x, pad) if gram else materialized_norm_sq(y, x)
    if extra_sq is not None:
        sq = sq + extra_sq.to(sq.dtype)
    total = _launch(x, y, None, sq, clip=clip, scale=scale, mult=mult)
    c = fused_factors(sq, clip=clip, scale=scale, mult=mult)
    return sq, c, total


def fused_factors(sq: torch.Tensor, *, clip: float, scale: float, mult: float) -> torch.Tensor:
    """The factors ``_clipped_sum_kernel`` forms from ``sq`` (the same fp32 operations), for the layer's
    other parameters (its bias) clipped in the same group."""
    return (clip / (sq.sqrt() * scale + 1e-6)).clamp(max=1.0) * mult


def fused_clip_reference(x: torch.Tensor, y: torch.Tensor, *, gram: bool, clip: float, scale: float = 1.0,
                         mult: float = 1.0, extra_sq: torch.Tensor | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-torch reference of ``fused_clip`` (materializes the per-sample gradients)."""
    acc = acc_dtype(x.dtype)
    ps = torch.einsum("btp,btd->bpd", x.to(acc), y.to(acc))
    sq = ps.pow(2).sum((1, 2))
    if extra_sq is not None:
        sq = sq + extra_sq.to(acc)
    c = (clip / (sq.sqrt() * scale + 1e-6)).clamp(max=1.0) * mult
    return sq, c, torch.einsum("b,bpd->pd", c, ps)
