"""Affine normalization layers: LayerNorm, GroupNorm, RMSNorm, InstanceNorm1/2/3d.

Their per-sample gradients are small (one vector per sample), so they are always materialized:
weight_i = sum over non-parameter positions of g * x_hat, bias_i = sum of g, where x_hat is the
normalized input recomputed from the saved input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import LayerHandler, NormMethod, Record, register


class _AffineNorm(LayerHandler):
    def x_hat(self, layer: nn.Module, x: Tensor) -> Tensor:
        raise NotImplementedError

    def reduce_dims(self, layer: nn.Module, x: Tensor) -> list[int]:
        """Dimensions summed over to reach (B, *param.shape)."""
        raise NotImplementedError

    def per_sample(self, layer: nn.Module, rec: Record, names: list[str],
                   out: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        x, g = rec.a, rec.g
        dims = self.reduce_dims(layer, x)
        dst = out or {}
        res: dict[str, Tensor] = {}
        if "weight" in names:
            prod = g * self.x_hat(layer, x)  # (an einsum here is 3-4x slower on CPU)
            res["weight"] = _summed(prod, dims, dst.get("weight"))
        if "bias" in names:
            res["bias"] = _summed(g, dims, dst.get("bias"))
        return res

    def row_params(self, layer: nn.Module, rec: Record, names: list[str], method: NormMethod,
                   joint: bool) -> dict[str, bool]:
        return {n: True for n in names}  # always materialized: (B, *param.shape)

    def write_rows(self, layer: nn.Module, rec: Record, out: dict[str, Tensor]) -> None:
        self.per_sample(layer, rec, list(out), out=out)


def _summed(t: Tensor, dims: list[int], out: Tensor | None) -> Tensor:
    """``t`` summed over ``dims`` (none: ``t`` itself), into ``out`` when given."""
    if out is None:
        return t.sum(dims) if dims else t
    return torch.sum(t, dims, out=out) if dims else out.copy_(t)


class _LastDims(_AffineNorm):
    """Norms whose parameters have the shape of the trailing ``normalized_shape``."""

    def reduce_dims(self, layer: nn.Module, x: Tensor) -> list[int]:
        return list(range(1, x.dim() - len(layer.normalized_shape)))


@register(nn.LayerNorm)
class LayerNormHandler(_LastDims):
    def x_hat(self, layer: nn.Module, x: Tensor) -> Tensor:
        return F.layer_norm(x, layer.normalized_shape, eps=layer.eps)


@register(nn.RMSNorm)
class RMSNormHandler(_LastDims):
    def x_hat(self, layer: nn.Module, x: Tensor) -> Tensor:
        return F.rms_norm(x, layer.normalized_shape, eps=layer.eps)


class _Channels(_AffineNorm):
    """Norms with one parameter per channel (dimension 1)."""

    def reduce_dims(self, layer: nn.Module, x: Tensor) -> list[int]:
        return list(range(2, x.dim()))


@register(nn.GroupNorm)
class GroupNormHandler(_Channels):
    def x_hat(self, layer: nn.Module, x: Tensor) -> Tensor:
        return F.group_norm(x, layer.num_groups, eps=layer.eps)


@register(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
class InstanceNormHandler(_Channels):
    """Affine instance norm without running statistics (``validate`` rejects ``track_running_stats``)."""

    def x_hat(self, layer: nn.Module, x: Tensor) -> Tensor:
        return F.instance_norm(x, eps=layer.eps)
