"""Generic handler through ``torch.func``: per-sample gradients of any layer without buffers.

For sample i, grad_i = vjp of the layer's functional forward at (params, a_i) applied to g_i, vectorized
over the batch with ``vmap``. Used for trainable layers with no dedicated handler; it materializes, so
it is the slowest path, but it is exact.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from .registry import LayerHandler, Record


class FunctorchHandler(LayerHandler):
    output_may_be_saved = True  # an arbitrary layer may save its output (e.g. it ends in a sigmoid)

    def problems(self, layer: nn.Module) -> list[str]:
        if any(True for _ in layer.buffers(recurse=False)):
            names = [n for n, _ in layer.named_buffers(recurse=False)]
            return [f"it has buffers {names} (state updated from the data, which breaks per-sample "
                    "gradients and leaks information); no generic per-sample rule applies"]
        return []

    def per_sample(self, layer: nn.Module, rec: Record, names: list[str]) -> dict[str, Tensor]:
        b = rec.g.shape[0]
        params = {n: p.detach() for n, p in layer.named_parameters(recurse=False) if n in names}
        frozen = {n: p.detach() for n, p in layer.named_parameters(recurse=False) if n not in names}
        batched = [isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == b for x in rec.args]
        kw_names = list(rec.kwargs)
        kw_batched = [isinstance(rec.kwargs[k], Tensor) and rec.kwargs[k].dim() > 0 and rec.kwargs[k].shape[0] == b
                      for k in kw_names]

        def one(g_i: Tensor, *xs: Any) -> tuple[Tensor, ...]:
            args = [x.unsqueeze(0) if bt else x for x, bt in zip(xs[: len(rec.args)], batched)]
            kws = {k: (v.unsqueeze(0) if bt else v) for k, v, bt in zip(kw_names, xs[len(rec.args):], kw_batched)}

            def f(p: dict[str, Tensor]) -> Tensor:
                return functional_call(layer, {**p, **frozen}, tuple(args), kws)

            _, pullback = vjp(f, params)
            return pullback(g_i.unsqueeze(0))[0]

        in_dims = (0, *[0 if bt else None for bt in batched], *[0 if bt else None for bt in kw_batched])
        if b == 0:
            return {n: p.new_zeros(0, *p.shape) for n, p in params.items()}
        out = vmap(one, in_dims=in_dims)(rec.g, *rec.args, *[rec.kwargs[k] for k in kw_names])
        return dict(out)


FALLBACK = FunctorchHandler()
