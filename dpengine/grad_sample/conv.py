"""nn.Conv1d/2d/3d through an N-d unfold (stride, padding incl. 'same' and non-zero modes, dilation, groups).

With the input unfolded to patches ``A`` of shape (B, G, L, C/G*K) and the output gradient ``g`` as
(B, G, L, O/G), a convolution is a grouped linear layer over L = prod(output spatial) positions, so the
linear-layer identities carry over per group.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import LayerHandler, NormMethod, Record, register


def _pad_input(layer: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    """Pad ``x`` exactly as ``layer._conv_forward`` would (explicitly, so the unfold needs no padding)."""
    if layer.padding_mode != "zeros":
        return F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
    nd = len(layer.kernel_size)
    if layer.padding == "valid":
        return x
    if layer.padding == "same":
        pads: list[int] = []
        for i in reversed(range(nd)):  # F.pad takes the last dimension first
            total = layer.dilation[i] * (layer.kernel_size[i] - 1)
            pads += [total // 2, total - total // 2]
    else:
        pads = [p for i in reversed(range(nd)) for p in (layer.padding[i], layer.padding[i])]
    return F.pad(x, pads) if any(pads) else x


def unfold_nd(layer: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    """(B, C, *spatial) -> (B, L, C*K) patches, K = prod(kernel_size), L = prod(output spatial)."""
    nd = len(layer.kernel_size)
    x = _pad_input(layer, x)
    for i in range(nd):
        k, d, s = layer.kernel_size[i], layer.dilation[i], layer.stride[i]
        x = x.unfold(2 + i, d * (k - 1) + 1, s)  # appends a window dimension
        if d > 1:
            x = x[..., ::d]
    # x: (B, C, L1..Ln, K1..Kn)
    b, c = x.shape[:2]
    perm = [0] + list(range(2, 2 + nd)) + [1] + list(range(2 + nd, 2 + 2 * nd))
    return x.permute(perm).reshape(b, -1, c * math.prod(layer.kernel_size))


@register(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvHandler(LayerHandler):
    has_gram = True

    def _ag(self, layer: nn.Module, rec: Record) -> tuple[Tensor, Tensor]:
        """Unfolded input (B, G, L, C/G*K) and gradient (B, G, L, O/G); cached on the record."""
        if "ag" not in rec.extra:
            gr = layer.groups
            g = rec.g.reshape(rec.g.shape[0], gr, layer.out_channels // gr, -1).transpose(2, 3)
            a = unfold_nd(layer, rec.a)  # (B, L, C*K)
            if a.shape[1] != g.shape[2]:
                raise RuntimeError(f"internal: unfolded {a.shape[1]} positions but output has {g.shape[2]}")
            a = a.reshape(a.shape[0], a.shape[1], gr, -1).transpose(1, 2)
            rec.extra["ag"] = (a, g)
        return rec.extra["ag"]

    def per_sample(self, layer: nn.Module, rec: Record, names: list[str]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if "weight" in names:
            a, g = self._ag(layer, rec)
            out["weight"] = torch.einsum("bglo,bglc->bgoc", g, a).reshape(g.shape[0], *layer.weight.shape)
        if "bias" in names:
            out["bias"] = rec.g.reshape(rec.g.shape[0], rec.g.shape[1], -1).sum(2)
        return out

    def prefers_gram(self, layer: nn.Module, rec: Record) -> bool:
        positions = math.prod(rec.g.shape[2:])
        p = layer.out_channels // layer.groups
        d = layer.in_channels // layer.groups * math.prod(layer.kernel_size)
        return 2 * positions * positions < p * d

    def norm_sq(self, layer: nn.Module, rec: Record, names: list[str], method: NormMethod) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if "weight" in names:
            a, g = self._ag(layer, rec)
            if method is NormMethod.GRAM:
                aa = a @ a.transpose(2, 3)  # (B, G, L, L)
                out["weight"] = (aa * (g @ g.transpose(2, 3))).sum((1, 2, 3))
            else:
                out["weight"] = torch.einsum("bglo,bglc->bgoc", g, a).pow(2).sum((1, 2, 3))
        if "bias" in names:
            out["bias"] = rec.g.reshape(rec.g.shape[0], rec.g.shape[1], -1).sum(2).pow(2).sum(1)
        return out

    def clipped_sum(self, layer: nn.Module, rec: Record, names: list[str], c: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        cv = c.to(rec.g.dtype)
        if "weight" in names:
            a, g = self._ag(layer, rec)
            gc = g * cv.view(-1, 1, 1, 1)
            b, gr, length = a.shape[:3]
            # one (batched over groups) GEMM: (G, O/G, B*L) @ (G, B*L, C/G*K)
            g2 = gc.transpose(0, 1).reshape(gr, b * length, -1)
            a2 = a.transpose(0, 1).reshape(gr, b * length, -1)
            out["weight"] = (g2.transpose(1, 2) @ a2).reshape(layer.weight.shape)
        if "bias" in names:
            out["bias"] = cv @ rec.g.reshape(rec.g.shape[0], rec.g.shape[1], -1).sum(2)
        return out
