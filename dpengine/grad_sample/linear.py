"""nn.Linear on inputs of any rank, and GPT-2's ``Conv1D`` (a linear layer with a transposed weight)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .registry import (JOINT, LayerHandler, NormMethod, OuterFactors, Record, fits, flatten_tokens, gram_norm_sq,
                       register, row_sq, weighted_sum)


class _LinearLike(LayerHandler):
    has_gram = True
    stackable = True  # (B, K, ..., d) inputs are tokens like any other: calls can be stacked along dim 1
    joint_norms = True
    #: True when the weight is stored (in, out) as in GPT-2's Conv1D, False for nn.Linear's (out, in).
    transposed = False

    def _ag(self, rec: Record) -> tuple[Tensor, Tensor]:
        return flatten_tokens(rec.a), flatten_tokens(rec.g)  # (B, T, d), (B, T, p)

    def per_sample(self, layer: nn.Module, rec: Record, names: list[str]) -> dict[str, Tensor]:
        a, g = self._ag(rec)
        out: dict[str, Tensor] = {}
        if "weight" in names:
            eq = "btp,btd->bdp" if self.transposed else "btp,btd->bpd"
            out["weight"] = torch.einsum(eq, g, a)
        if "bias" in names:
            out["bias"] = _token_sum(g)
        return out

    def factors(self, layer: nn.Module, rec: Record, name: str) -> OuterFactors | None:
        if name != "weight":
            return None
        a, g = self._ag(rec)
        return OuterFactors(a, g) if self.transposed else OuterFactors(g, a)

    def prefers_gram(self, layer: nn.Module, rec: Record) -> bool:
        t = rec.a.numel() // max(rec.a.shape[0], 1) // rec.a.shape[-1]
        p, d = rec.g.shape[-1], rec.a.shape[-1]
        return 2 * t * t < p * d  # Gram matrices smaller than the per-sample gradient (fastDP's rule)

    def gram_flop_ratio(self, layer: nn.Module, rec: Record) -> float | None:
        t = rec.a.numel() // max(rec.a.shape[0], 1) // rec.a.shape[-1]
        p, d = rec.g.shape[-1], rec.a.shape[-1]
        return t * (d + p) / (p * d)

    def norm_sq(self, layer: nn.Module, rec: Record, names: list[str], method: NormMethod,
                joint: bool = False) -> dict[str, Tensor]:
        a, g = self._ag(rec)
        out: dict[str, Tensor] = {}
        if joint and "bias" in names and "weight" in names and (a.shape[1] == 1 or method is NormMethod.GRAM):
            # weight and bias in one group: ||G_i||^2 + ||b_i||^2 = sum_{t,s} (a_t . a_s + 1)(g_t . g_s), since
            # the bias gradient sum_t g_t has squared norm sum_{t,s} g_t . g_s; one token: ||g||^2 (||a||^2 + 1)
            if a.shape[1] == 1:
                return {JOINT: row_sq(g) * (row_sq(a) + 1)}
            aa = torch.bmm(a, a.transpose(1, 2)).add_(1)
            return {JOINT: (aa * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))}
        if "weight" in names and a.shape[1] > 1 and method is NormMethod.MATERIALIZE:
            # Materialized once; the clipped sum is then a weighted sum of these (no second GEMM), and
            # the captured a and g are released: the per-sample gradients take their place.
            ps = self._cached_per_sample(layer, rec, names)
            rec.release()
            return {n: row_sq(t) for n, t in ps.items()}
        if "weight" in names:
            if a.shape[1] == 1:  # one token: ||g a^T|| = ||g|| ||a||
                out["weight"] = row_sq(a) * row_sq(g)
            else:
                out["weight"] = gram_norm_sq(a, g)
        if "bias" in names:
            out["bias"] = row_sq(_bias_rows(rec, g))
        return out

    def clipped_sum(self, layer: nn.Module, rec: Record, names: list[str], c: Tensor,
                    out: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        dst = out or {}
        cached = rec.extra.get("per_sample", {})
        if all(n in cached for n in names):
            return {n: weighted_sum(cached[n], c, out=dst.get(n)) for n in names}
        a, g = self._ag(rec)
        cv = c.to(g.dtype)
        res: dict[str, Tensor] = {}
        if "weight" in names:
            # book-keeping: sum_i c_i g_i^T a_i is one GEMM once the factors are folded into the
            # smaller of the two operands; a single token needs no token dimension at all
            aw, gw, col = (a[:, 0], g[:, 0], cv.unsqueeze(1)) if a.shape[1] == 1 else (a, g, cv.view(-1, 1, 1))
            if aw.shape[-1] <= gw.shape[-1]:
                a2, g2 = _rows(aw * col), _rows(gw)
            else:
                a2, g2 = _rows(aw), _rows(gw * col)
            left, right = (a2.t(), g2) if self.transposed else (g2.t(), a2)
            w = dst.get("weight")
            res["weight"] = torch.mm(left, right, out=w) if fits(w, left.dtype) else left @ right
        if "bias" in names:
            b, s = dst.get("bias"), _bias_rows(rec, g)  # (B, p)
            res["bias"] = torch.mv(s.t(), cv, out=b) if fits(b, s.dtype) else cv @ s
        return res


def _rows(x: Tensor) -> Tensor:
    """(B, T, n) -> (B T, n); (B, n) as it is."""
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


def _bias_rows(rec: Record, g: Tensor) -> Tensor:
    """The per-sample bias gradients (B, p), formed once per record for the norm and the sum."""
    return rec.memo("bias_rows", lambda: _token_sum(g))


def _token_sum(g: Tensor) -> Tensor:
    """(B, T, p) -> (B, p)."""
    return g[:, 0] if g.shape[1] == 1 else g.sum(1)


@register(nn.Linear)
class LinearHandler(_LinearLike):
    """``nn.Linear``: ``out = x @ W.T + b`` with ``W`` of shape (out, in); inputs of any rank."""


@register("transformers.pytorch_utils.Conv1D")
class GPT2Conv1DHandler(_LinearLike):
    """transformers' ``Conv1D``: ``out = x @ W + b`` with ``W`` of shape (in, out)."""

    transposed = True
