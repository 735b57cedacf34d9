"""nn.Conv1d/2d/3d through an N-d unfold (stride, padding incl. 'same' and non-zero modes, dilation, groups).

With the input unfolded to patches ``A`` of shape (B, G, C/G*K, L) and the output gradient ``g`` as
(B, G, O/G, L), a convolution is a grouped linear layer over L = prod(output spatial) positions, so the
linear-layer identities carry over per group.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import (LayerHandler, NormMethod, Record, factor_view, fits, gram, register, row_sq, underflow_pad,
                       weighted_sum)


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


def _padded(layer: nn.modules.conv._ConvNd, rec: Record) -> Tensor:
    """The captured input padded as the layer's forward pads it, once per record: the unfold, the
    per-sample kernel and the clipped-sum kernel all read it."""
    return rec.memo("padded", lambda: _pad_input(layer, rec.a))


def unfold_nd(layer: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    """(B, C, *spatial), already padded (``_pad_input``) -> (B G, C/G*K, L) patches per sample and group;
    K = prod(kernel_size), L = prod(output spatial), G = groups. 1-D and 2-D use ``F.unfold`` (im2col); 3-D
    strided windows, one copy."""
    nd = len(layer.kernel_size)
    b, c, gr = x.shape[0], x.shape[1], layer.groups
    if nd <= 2:
        if nd == 1:
            x = x.unsqueeze(2)
        k, d, s = ((1,) * (2 - nd) + tuple(v) for v in (layer.kernel_size, layer.dilation, layer.stride))
        cols = F.unfold(x, kernel_size=k, dilation=d, stride=s)  # (B, C*K, L), channel-major
        return cols.view(b * gr, -1, cols.shape[-1])
    for i in range(nd):
        k, d, s = layer.kernel_size[i], layer.dilation[i], layer.stride[i]
        x = x.unfold(2 + i, d * (k - 1) + 1, s)  # appends a window dimension
        if d > 1:
            x = x[..., ::d]
    # x: (B, C, L1..Ln, K1..Kn) -> (B, G, C/G, K1..Kn, L1..Ln)
    x = x.reshape(b, gr, c // gr, *x.shape[2:])
    perm = [0, 1, 2] + list(range(3 + nd, 3 + 2 * nd)) + list(range(3, 3 + nd))
    return x.permute(perm).reshape(b * gr, c // gr * math.prod(layer.kernel_size), -1)


def _bias_rows(rec: Record) -> Tensor:
    """Per-sample bias gradients (B, C_out): g summed over positions, once per record (norm and sum)."""
    return rec.memo("bias_rows", lambda: rec.g.reshape(rec.g.shape[0], rec.g.shape[1], -1).sum(2))


#: per-sample implementation chosen per (shape, dtype, device): "grouped" or "im2col"
_IMPL: dict[tuple, str] = {}


@register(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvHandler(LayerHandler):
    """Norms from the unfolded input; the clipped sum from oneDNN's own weight-gradient kernel
    (``convolution_backward`` with the factors folded into g), i.e. at the cost of the ordinary
    weight gradient that autograd no longer computes."""

    has_gram = True
    forward_methods = ("forward", "_conv_forward")  # forward calls _conv_forward, whose padding the rules redo

    def _ag(self, layer: nn.Module, rec: Record) -> tuple[Tensor, Tensor]:
        """Unfolded input (B G, C/G*K, L) and gradient (B G, O/G, L), one matrix per sample and group (3-D, so
        the products are plain ``bmm``s); cached on the record."""
        if "ag" not in rec.extra:
            b, gr = rec.g.shape[0], layer.groups
            g = rec.g.reshape(b * gr, layer.out_channels // gr, -1)
            a = unfold_nd(layer, _padded(layer, rec))
            if a.shape[2] != g.shape[2]:
                raise RuntimeError(f"internal: unfolded {a.shape[2]} positions but output has {g.shape[2]}")
            rec.extra["ag"] = (a, g)
        return rec.extra["ag"]

    def _ps_im2col(self, layer: nn.Module, rec: Record) -> Tensor:
        a, g = self._ag(layer, rec)  # (B G, O/G, C/G K) per sample and group is (B, O, C/G, *kernel) in memory
        return torch.bmm(g, a.transpose(1, 2)).view(rec.g.shape[0], *layer.weight.shape)

    @staticmethod
    def _ps_grouped(layer: nn.Module, rec: Record) -> Tensor:
        """Per-sample weight gradients from the backend's grouped weight-gradient kernel: the batch is
        folded into the channels (one sample per group), so no im2col copy is made."""
        x = _padded(layer, rec)
        b, nd = x.shape[0], len(layer.kernel_size)
        w = layer.weight
        w_shape = torch.empty((b * w.shape[0], *w.shape[1:]), device=w.device, dtype=rec.g.dtype)  # shape only
        gw = torch.ops.aten.convolution_backward(
            rec.g.reshape(1, -1, *rec.g.shape[2:]), x.reshape(1, -1, *x.shape[2:]), w_shape, None,
            list(layer.stride), [0] * nd, list(layer.dilation), False, [0] * nd, b * layer.groups,
            [False, True, False])[1]
        return gw.view(b, *w.shape)

    def _ps_weight(self, layer: nn.Module, rec: Record) -> Tensor:
        """Per-sample weight gradients by whichever exact implementation was faster for this shape on
        this device (measured once per shape and cached). The batch size enters the key rounded up to a
        power of two: Poisson batches change size every step, and re-timing each new size would cost more
        than it could save."""
        b = rec.a.shape[0]
        key = (tuple(layer.weight.shape), (1 << max(b - 1, 0).bit_length(), *rec.a.shape[1:]), layer.stride, layer.dilation, layer.groups,
               str(layer.padding), layer.padding_mode, rec.a.dtype, str(rec.a.device))
        impl = _IMPL.get(key)
        if impl is None:
            best = None
            for name, fn in (("grouped", self._ps_grouped), ("im2col", self._ps_im2col)):
                fn(layer, rec)  # warm-up (one-time backend set-up)
                rec.extra.pop("ag", None)
                start = time.perf_counter()
                fn(layer, rec)
                if rec.a.is_cuda:
                    torch.cuda.synchronize(rec.a.device)
                elapsed = time.perf_counter() - start
                rec.extra.pop("ag", None)
                if best is None or elapsed < best[0]:
                    best = (elapsed, name)
            impl = _IMPL[key] = best[1]
        return self._ps_grouped(layer, rec) if impl == "grouped" else self._ps_im2col(layer, rec)

    def per_sample(self, layer: nn.Module, rec: Record, names: list[str]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if "weight" in names:
            out["weight"] = self._ps_weight(layer, rec)
        if "bias" in names:
            out["bias"] = _bias_rows(rec)
        return out

    def row_params(self, layer: nn.Module, rec: Record, names: list[str], method: NormMethod,
                   joint: bool) -> dict[str, bool]:
        return {"bias": True} if "bias" in names else {}

    def write_rows(self, layer: nn.Module, rec: Record, out: dict[str, Tensor]) -> None:
        torch.sum(rec.g.reshape(rec.g.shape[0], rec.g.shape[1], -1), 2, out=out["bias"])

    def prefers_gram(self, layer: nn.Module, rec: Record) -> bool:
        positions = math.prod(rec.g.shape[2:])
        p = layer.out_channels // layer.groups
        d = layer.in_channels // layer.groups * math.prod(layer.kernel_size)
        return 2 * positions * positions < p * d

    def gram_flop_ratio(self, layer: nn.Module, rec: Record) -> float | None:
        positions = math.prod(rec.g.shape[2:])
        p = layer.out_channels // layer.groups
        d = layer.in_channels // layer.groups * math.prod(layer.kernel_size)
        return positions * (d + p) / (p * d)

    def norm_sq(self, layer: nn.Module, rec: Record, names: list[str], method: NormMethod) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if "weight" in names:
            if method is NormMethod.GRAM:
                a, g = self._ag(layer, rec)
                # (B G, L, L) Grams, padded against underflow (registry.underflow_pad)
                pad = underflow_pad(a.dtype, a.shape[2], max(a.shape[1], g.shape[1]))
                per_group = (gram(a.transpose(1, 2), a, pad) * gram(g.transpose(1, 2), g, pad)).sum((1, 2))
                out["weight"] = per_group if layer.groups == 1 else per_group.view(-1, layer.groups).sum(1)
            else:
                ps = self._cached_per_sample(layer, rec, ["weight"])["weight"]
                out["weight"] = row_sq(ps)
        if "bias" in names:
            out["bias"] = row_sq(_bias_rows(rec))
        return out

    def clipped_sum(self, layer: nn.Module, rec: Record, names: list[str], c: Tensor,
                    out: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        dst = out or {}
        res: dict[str, Tensor] = {}
        cv = c.to(rec.g.dtype)
        cached = rec.extra.get("per_sample", {})
        if "weight" in names:
            if "weight" in cached:  # materialized for the norm: the sum is a cheap weighted sum
                res["weight"] = weighted_sum(cached["weight"], cv, out=dst.get("weight"))
            else:
                nd = len(layer.kernel_size)
                gc = rec.g * factor_view(cv, rec.g.dim())
                res["weight"] = torch.ops.aten.convolution_backward(
                    gc, _padded(layer, rec), layer.weight, None, list(layer.stride), [0] * nd,
                    list(layer.dilation), False, [0] * nd, layer.groups, [False, True, False])[1]
        if "bias" in names:
            b, s = dst.get("bias"), _bias_rows(rec)  # (B, C_out)
            res["bias"] = torch.mv(s.t(), cv, out=b) if fits(b, s.dtype) else cv @ s
        return res
