"""Generic handler through ``torch.func``: per-sample gradients of any layer without buffers.

For sample i, grad_i = vjp of the layer's functional forward at (params, a_i) applied to g_i, vectorized
over the batch with ``vmap``. Used for trainable layers with no dedicated handler; it materializes, so
it is the slowest path, but it is exact.

Which arguments are per sample is decided by where they come from, never by their shape: the layer's
data input (its first argument) is; every other argument is shared by all samples (a constant table, a
mask built for the whole batch). Deciding by "dimension 0 equals the batch size" would treat a constant
(8, d) table as per sample exactly when a Poisson batch happens to have 8 records.

The layer is re-run through its ``forward`` alone, not its ``__call__``: the captured inputs are what
``forward`` received (after any forward pre-hooks) and ``g`` is the gradient of what ``forward`` returned
(before any forward hooks), so running the hooks again would compute a different function.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.func import vjp, vmap
from torch.nn.utils.stateless import _reparametrize_module  # what torch.func.functional_call runs, hooks aside

from .registry import LayerHandler, PerSampleGradientError, Record


class FunctorchHandler(LayerHandler):
    output_may_be_saved = True  # an arbitrary layer may save its output (e.g. it ends in a sigmoid)
    param_names = None

    def problems(self, layer: nn.Module) -> list[str]:
        if any(True for _ in layer.buffers(recurse=False)):
            names = [n for n, _ in layer.named_buffers(recurse=False)]
            return [f"it has buffers {names} (state updated from the data, which breaks per-sample "
                    "gradients and leaks information); no generic per-sample rule applies"]
        return []

    def per_sample(self, layer: nn.Module, rec: Record, names: list[str]) -> dict[str, Tensor]:
        b = rec.g.shape[0]
        work = rec.g.dtype  # the controller promotes a and g to at least float32; parameters follow

        def cast(p: Tensor) -> Tensor:
            p = p.detach()
            return p.to(work) if p.is_floating_point() else p

        params = {n: cast(p) for n, p in layer.named_parameters(recurse=False) if n in names}
        frozen = {n: cast(p) for n, p in layer.named_parameters(recurse=False) if n not in names}
        if not rec.args or not isinstance(rec.args[0], Tensor) or rec.args[0].dim() == 0 or rec.args[0].shape[0] != b:
            raise PerSampleGradientError(
                f"{type(layer).__name__} (torch.func fallback) must take its per-sample input as the first "
                "argument, with the batch as dimension 0; register a handler for this layer type.")
        batched = [i == 0 for i in range(len(rec.args))]
        kw_names = list(rec.kwargs)
        kw_batched = [False for _ in kw_names]

        def one(g_i: Tensor, *xs: Any) -> tuple[Tensor, ...]:
            args = [x.unsqueeze(0) if bt else x for x, bt in zip(xs[: len(rec.args)], batched)]
            kws = {k: (v.unsqueeze(0) if bt else v) for k, v, bt in zip(kw_names, xs[len(rec.args):], kw_batched)}

            def f(p: dict[str, Tensor]) -> Tensor:
                with _reparametrize_module(layer, {**p, **frozen}):
                    return layer.forward(*args, **kws)

            _, pullback = vjp(f, params)
            return pullback(g_i.unsqueeze(0))[0]

        in_dims = (0, *[0 if bt else None for bt in batched], *[0 if bt else None for bt in kw_batched])
        if b == 0:
            return {n: p.new_zeros(0, *p.shape) for n, p in params.items()}
        out = vmap(one, in_dims=in_dims)(rec.g, *rec.args, *[rec.kwargs[k] for k in kw_names])
        return dict(out)


FALLBACK = FunctorchHandler()
