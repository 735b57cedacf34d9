"""nn.Linear on inputs of any rank, and GPT-2's ``Conv1D`` (a linear layer with a transposed weight)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .registry import (JOINT, LayerHandler, NormMethod, OuterFactors, Record, factor_view, fits, flatten_tokens,
                       gram, gram_norm_sq, rank_one_norm_sq, register, row_sq, token_pad, underflow_pad, weighted_sum)


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

    def row_params(self, layer: nn.Module, rec: Record, names: list[str], method: NormMethod,
                   joint: bool) -> dict[str, bool]:
        if "bias" not in names:
            return {}
        one_token = _positions(rec) == 1
        # norm_sq's joint forms (one token, or the Gram form) include the bias norm
        return {"bias": not (joint and "weight" in names and (one_token or method is NormMethod.GRAM))}

    def write_rows(self, layer: nn.Module, rec: Record, out: dict[str, Tensor]) -> None:
        g = rec.g
        if g.dim() == 2:
            out["bias"].copy_(g)
        else:
            torch.sum(flatten_tokens(g), 1, out=out["bias"])

    def prefers_gram(self, layer: nn.Module, rec: Record) -> bool:
        t, p, d = _positions(rec), rec.g.shape[-1], rec.a.shape[-1]
        return 2 * t * t < p * d  # Gram matrices smaller than the per-sample gradient (fastDP's rule)

    def gram_flop_ratio(self, layer: nn.Module, rec: Record) -> float | None:
        t, p, d = _positions(rec), rec.g.shape[-1], rec.a.shape[-1]
        return t * (d + p) / (p * d)

    def norm_sq(self, layer: nn.Module, rec: Record, names: list[str], method: NormMethod,
                joint: bool = False) -> dict[str, Tensor]:
        if rec.a.dim() == 2:  # one token per sample (the common MLP case): no token dimension at all
            return self._norm_sq_rows(rec, names, joint)
        a, g = self._ag(rec)
        if a.shape[1] == 1:
            return self._norm_sq_rows(rec, names, joint, a[:, 0], g[:, 0])
        out: dict[str, Tensor] = {}
        if joint and "bias" in names and "weight" in names and method is NormMethod.GRAM:
            # weight and bias in one group: ||G_i||^2 + ||b_i||^2 = sum_{t,s} (a_t . a_s + 1)(g_t . g_s), since
            # the bias gradient sum_t g_t has squared norm sum_{t,s} g_t . g_s (both Grams padded against
            # underflow, registry.underflow_pad)
            pad = token_pad(a, g)
            aa = gram(a, a.transpose(1, 2), pad, plus_one=True)
            return {JOINT: (aa * gram(g, g.transpose(1, 2), pad)).sum((1, 2))}
        if "weight" in names and method is NormMethod.MATERIALIZE:
            # Materialized once; the clipped sum is then a weighted sum of these (no second GEMM), and
            # the captured a and g are released: the per-sample gradients take their place.
            ps = self._cached_per_sample(layer, rec, names)
            rec.release()
            return {n: row_sq(t) for n, t in ps.items()}
        if "weight" in names:
            out["weight"] = gram_norm_sq(a, g)
        if "bias" in names:
            out["bias"] = row_sq(_bias_rows(rec, g))
        return out

    @staticmethod
    def _norm_sq_rows(rec: Record, names: list[str], joint: bool, a: Tensor | None = None,
                      g: Tensor | None = None) -> dict[str, Tensor]:
        """One token per sample, (B, d) and (B, p): ||g a^T|| = ||g|| ||a||, and the bias gradient is g (the
        factors padded against underflow, ``registry.underflow_pad``)."""
        a = rec.a if a is None else a
        g = rec.g if g is None else g
        if joint and "bias" in names and "weight" in names:
            pad = underflow_pad(a.dtype, 1, max(a.shape[-1], g.shape[-1]))
            return {JOINT: (row_sq(g) + pad) * (row_sq(a) + 1)}  # the 1 dwarfs a's own pad
        out: dict[str, Tensor] = {}
        if "weight" in names:
            out["weight"] = rank_one_norm_sq(a, g)
        if "bias" in names:
            out["bias"] = row_sq(g)
        return out

    def clipped_sum(self, layer: nn.Module, rec: Record, names: list[str], c: Tensor,
                    out: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        dst = out or {}
        cached = rec.extra.get("per_sample", {})
        if all(n in cached for n in names):
            return {n: weighted_sum(cached[n], c, out=dst.get(n)) for n in names}
        rows = rec.a.dim() == 2  # one token per sample, no token dimension
        a, g = (rec.a, rec.g) if rows else self._ag(rec)
        cv = c.to(g.dtype)
        res: dict[str, Tensor] = {}
        if "weight" in names:
            # book-keeping: sum_i c_i g_i^T a_i is one GEMM once the factors are folded into one operand: the
            # smaller, or g when the bias is summed here too (its sum is then the column sum of the scaled g);
            # a single token needs no token dimension at all
            if not rows and a.shape[1] == 1:
                a, g, rows = a[:, 0], g[:, 0], True
            col = factor_view(cv, a.dim())
            if a.shape[-1] <= g.shape[-1] and "bias" not in names:
                a2, g2 = _rows(a * col), _rows(g)
            else:
                a2, g2 = _rows(a), _rows(g * col)
            left, right = (a2.t(), g2) if self.transposed else (g2.t(), a2)
            w = dst.get("weight")
            res["weight"] = torch.mm(left, right, out=w) if fits(w, left.dtype) else left @ right
            if "bias" in names:  # sum over samples and tokens of c_i g_it
                b = dst.get("bias")
                res["bias"] = torch.sum(g2, 0, out=b) if fits(b, g2.dtype) else g2.sum(0)
        elif "bias" in names:
            b, s = dst.get("bias"), (g if g.dim() == 2 else _bias_rows(rec, g))  # (B, p)
            res["bias"] = torch.mv(s.t(), cv, out=b) if fits(b, s.dtype) else cv @ s
        return res


def _positions(rec: Record) -> int:
    """Tokens per sample: the product of the input's dimensions between the batch and the features."""
    return rec.a.numel() // max(rec.a.shape[0], 1) // rec.a.shape[-1]


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
