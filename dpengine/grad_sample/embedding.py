"""nn.Embedding: per-sample gradients are sparse (one row per distinct token of the sample)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .registry import LayerHandler, NormMethod, OuterFactors, Record, factor_view, fits, register


@register(nn.Embedding)
class EmbeddingHandler(LayerHandler):
    has_gram = True

    def problems(self, layer: nn.Module) -> list[str]:
        out = []
        if layer.max_norm is not None:
            out.append("max_norm renormalizes rows in place during the forward; set max_norm=None")
        if layer.scale_grad_by_freq:
            out.append("scale_grad_by_freq divides by token counts of the whole batch, which mixes samples; "
                       "set scale_grad_by_freq=False")
        if layer.sparse:
            out.append("sparse gradients are not supported; set sparse=False")
        return out

    @staticmethod
    def _ids_g(layer: nn.Embedding, rec: Record) -> tuple[Tensor, Tensor]:
        """(B, T) ids and (B, T, d) output gradients, formed once per record (the norm and the sum)."""
        def make() -> tuple[Tensor, Tensor]:
            a, g = rec.a, rec.g
            ids = a if a.dim() == 2 else a.reshape(a.shape[0], -1)  # reshape copies expanded position ids
            g = g if g.dim() == 3 else g.reshape(ids.shape[0], -1, g.shape[-1])
            if layer.padding_idx is not None:  # PyTorch gives the padding row zero gradient
                g = g.masked_fill((ids == layer.padding_idx).unsqueeze(-1), 0)
            return ids, g
        return rec.memo("ids_g", make)

    @staticmethod
    def _keys(ids: Tensor, v: int) -> Tensor:
        """(B T,) row of the (B V)-row per-sample table each token's gradient goes to: sample * V + id."""
        return (ids + torch.arange(0, ids.shape[0] * v, v, device=ids.device).unsqueeze(1)).view(-1)

    def per_sample(self, layer: nn.Module, rec: Record, names: list[str]) -> dict[str, Tensor]:
        ids, g = self._ids_g(layer, rec)
        b, v, d = ids.shape[0], layer.num_embeddings, g.shape[-1]
        ps = g.new_zeros(b * v, d).index_add_(0, self._keys(ids, v), g.reshape(-1, d))
        return {"weight": ps.view(b, v, d)}

    def factors(self, layer: nn.Module, rec: Record, name: str) -> OuterFactors | None:
        ids, g = self._ids_g(layer, rec)  # padding positions have g = 0
        return OuterFactors(ids, g)

    def prefers_gram(self, layer: nn.Module, rec: Record) -> bool:
        return False  # the segment sum below is exact, O(B*T*d), and never forms (B, V, d)

    def norm_sq(self, layer: nn.Module, rec: Record, names: list[str], method: NormMethod) -> dict[str, Tensor]:
        ids, g = self._ids_g(layer, rec)
        b, d = ids.shape[0], g.shape[-1]
        if method is NormMethod.GRAM:
            # sum_{t,s} 1[x_t = x_s] (g_t . g_s): the token-equality Gram form.
            same = (ids.unsqueeze(2) == ids.unsqueeze(1)).to(g.dtype)  # (B, T, T)
            return {"weight": (same * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))}
        # Segment sum: sum over distinct (sample, token) pairs of ||sum_{t: x_t = v} g_t||^2.
        uniq, inv = torch.unique(self._keys(ids, layer.num_embeddings), return_inverse=True)
        rows = g.new_zeros(uniq.numel(), d).index_add_(0, inv, g.reshape(-1, d))
        return {"weight": g.new_zeros(b).index_add_(0, uniq // layer.num_embeddings, rows.pow(2).sum(1))}

    def clipped_sum(self, layer: nn.Module, rec: Record, names: list[str], c: Tensor,
                    out: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        ids, g = self._ids_g(layer, rec)
        gc = (g * factor_view(c.to(g.dtype), 3)).reshape(-1, g.shape[-1])
        w = (out or {}).get("weight")
        dst = w.zero_() if fits(w, g.dtype) else g.new_zeros(layer.num_embeddings, g.shape[-1])
        return {"weight": dst.index_add_(0, ids.reshape(-1), gc)}
