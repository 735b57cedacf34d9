"""Capture of (a, g) in the ordinary backward, and the per-batch reduction to clipped sums.

How it works (one backward, no second pass, no loss wrapper):

* A forward pre-hook on every layer with trainable parameters swaps those parameters for detached
  aliases while the layer runs, so autograd never computes their ordinary (non-private) gradient:
  that weight-gradient GEMM is exactly the work that book-keeping replaces.
* A forward hook restores the parameters and passes the output through ``_Tap``, an autograd function
  that tags the output in place (``mark_dirty``: no copy, and in-place activations downstream still
  work) and, in the backward, receives the output gradient ``g`` for that call.
* The first tap reached in a backward queues a callback that runs when the backward ends. It computes
  per-sample norms for every parameter (materialized, Gram/"ghost", or per-layer by cost), asks the
  clipping policy for factors, and accumulates each layer's clipped sum ``sum_i c_i grad_i`` into an
  engine-owned buffer, then frees the captured tensors. The optimizer later adds noise once.

Because each backward is reduced on its own, gradient accumulation over physical batches (virtual
steps) is exact in every mode. State lives here, keyed by layer, never on the user's modules.
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .functorch import FALLBACK
from .registry import (LayerHandler, NormMethod, Record, cross_term, direct_trainable, find_handler, row_sq,
                       weighted_sum)


class GradSampleMode(enum.Enum):
    """How per-sample norms and clipped sums are computed (the *what* is the clipping policy's)."""

    HOOKS = "hooks"  # materialize every per-sample gradient (reference path)
    GHOST = "ghost"  # Gram-form norms wherever a handler has one (least memory); weighted-GEMM sums
    BK = "bk"  # book-keeping: per layer, Gram or materialized norm by cost; weighted-GEMM sums


class LossReduction(enum.Enum):
    MEAN = "mean"
    SUM = "sum"


@dataclass(eq=False)
class TrackedLayer:
    name: str
    module: nn.Module
    handler: LayerHandler
    names: list[str]  # trainable parameter names local to the module
    params: list[nn.Parameter]


class PerSampleGradientError(RuntimeError):
    """Raised when per-sample gradients cannot be formed correctly for a batch."""


def trainable_layers(module: nn.Module) -> list[tuple[str, nn.Module, list[tuple[str, nn.Parameter]]]]:
    """Layers with trainable parameters of their own, each parameter assigned to the layers that use it.

    A parameter registered in a layer and again in one of its ancestors (transformers ties
    ``BertLMPredictionHead.bias`` to ``decoder.bias`` this way) belongs to the descendant only: the
    ancestor merely aliases it. Should the ancestor read it directly after all, autograd would hand it an
    ordinary gradient, which the controller detects and refuses.
    """
    owners: dict[int, list[str]] = {}
    entries = []
    for name, layer in module.named_modules():
        trainable = direct_trainable(layer)
        if trainable:
            entries.append((name, layer, trainable))
            for _, p in trainable:
                owners.setdefault(id(p), []).append(name)

    def aliased_below(name: str, p: nn.Parameter) -> bool:
        return any(o != name and (name == "" or o.startswith(name + ".")) for o in owners[id(p)])

    out = []
    for name, layer, trainable in entries:
        kept = [(n, p) for n, p in trainable if not aliased_below(name, p)]
        if kept:
            out.append((name, layer, kept))
    return out


_state = threading.local()


def _capture_on() -> bool:
    return not getattr(_state, "suspended", False)


class _suspend_capture:
    """Layers run inside (e.g. the torch.func fallback re-running a layer) are not captured."""

    def __enter__(self) -> None:
        self.prev = getattr(_state, "suspended", False)
        _state.suspended = True

    def __exit__(self, *exc: Any) -> None:
        _state.suspended = self.prev


class _Tap(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, anchor: Tensor, out: Tensor, on_grad: Callable[[Tensor], None], copy: bool) -> Tensor:
        ctx.on_grad = on_grad
        if copy:
            return out.clone()
        ctx.mark_dirty(out)
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[None, Tensor, None, None]:
        ctx.on_grad(g)
        return None, g, None, None


class GradSampleController:
    """Drives the per-layer handlers for one module; owns the captured tensors and the clipped sums."""

    def __init__(
        self,
        module: nn.Module,
        *,
        mode: GradSampleMode,
        clip_factors: Callable[[Tensor], Tensor],
        loss_reduction: LossReduction,
    ) -> None:
        self.module = module
        self.mode = mode
        self.clip_factors = clip_factors
        self.loss_reduction = loss_reduction
        self.layers: list[TrackedLayer] = []
        for name, layer, trainable in trainable_layers(module):
            handler = find_handler(layer) or FALLBACK
            self.layers.append(TrackedLayer(name, layer, handler, [n for n, _ in trainable], [p for _, p in trainable]))
        self.params: list[nn.Parameter] = list({id(p): p for tl in self.layers for p in tl.params}.values())
        self.param_ids = frozenset(id(p) for p in self.params)
        self._anchor = torch.zeros((), requires_grad=True)
        self._pending: list[tuple[TrackedLayer, Record]] = []
        self._queued_for: int | None = None
        self._summed: dict[nn.Parameter, Tensor] = {}
        self._written: dict[nn.Parameter, Tensor] = {}
        self._method_cache: dict[tuple[int, tuple[int, ...]], NormMethod] = {}
        self.batches_accumulated = 0
        self.last_norms: Tensor | None = None
        #: multiplies every clipped sum (the optimizer sets 1 / expected batch size for mean reduction)
        self.output_scale = 1.0
        self._swapped: set[int] = set()  # layers whose parameters the pre-hook swapped for this call
        self._handles = [module.register_forward_pre_hook(self._root_pre_hook, with_kwargs=True)]
        self._root_batch: int | None = None
        for tl in self.layers:
            self._handles.append(tl.module.register_forward_pre_hook(self._make_pre_hook(tl)))
            self._handles.append(
                tl.module.register_forward_hook(self._make_hook(tl), with_kwargs=True, always_call=True))

    # ----------------------------------------------------------------------------------- capture
    def _root_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Remember the batch size of the model's input (its first tensor argument's dimension 0)."""
        first = next((x for x in (*args, *kwargs.values()) if isinstance(x, Tensor) and x.dim() > 0), None)
        self._root_batch = int(first.shape[0]) if first is not None else None

    def _make_pre_hook(self, tl: TrackedLayer) -> Callable:
        def pre_hook(layer: nn.Module, args: tuple) -> None:
            if torch.is_grad_enabled() and _capture_on():
                self._swapped.add(id(tl))
                for n, p in zip(tl.names, tl.params):
                    layer._parameters[n] = p.detach()  # alias: same storage, no autograd edge
        return pre_hook

    def _make_hook(self, tl: TrackedLayer) -> Callable:
        def hook(layer: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
            if id(tl) not in self._swapped:
                return None
            self._swapped.discard(id(tl))
            for n, p in zip(tl.names, tl.params):
                layer._parameters[n] = p
            if not isinstance(out, Tensor):
                raise PerSampleGradientError(
                    f"layer '{tl.name}' ({type(layer).__name__}) returned {type(out).__name__}; dpengine captures "
                    "layers with a single tensor output. Register a handler for this layer type.")
            args = tuple(x.detach() if isinstance(x, Tensor) else x for x in args)
            batch, copy = self._root_batch, tl.handler.output_may_be_saved
            if batch is not None and batch != 1 and out.dim() > 0 and out.shape[0] == 1 and \
                    isinstance(args[0], Tensor) and args[0].dim() > 0 and args[0].shape[0] == 1:
                # A batch-1 input broadcast against the batch (e.g. GPT-2's position ids of shape (1, T)):
                # expand it, so the gradient arriving here is still per sample instead of summed.
                args = tuple(x.expand(batch, *x.shape[1:]) if isinstance(x, Tensor) and x.dim() > 0
                             and x.shape[0] == 1 else x for x in args)
                out = out.expand(batch, *out.shape[1:])
                copy = True  # tagging an expanded view in place would route g through its (summed) base
            rec = Record(args, {k: (v.detach() if isinstance(v, Tensor) else v) for k, v in kwargs.items()})
            # autograd no longer saves the input for a weight gradient, so nothing else would notice an
            # in-place change to it before the reduction: remember its version (detach shares the counter)
            rec.extra["versions"] = [(i, x._version) for i, x in enumerate(args) if isinstance(x, Tensor)]

            def on_grad(g: Tensor) -> None:
                self._on_grad(tl, rec, g)

            if out.requires_grad and not copy:
                # the common case (the input needs a gradient): a tensor hook sees g without touching the
                # graph; it fires with the gradient of this value even if it is later modified in place
                out.register_hook(on_grad)
                return None
            # the output does not need a gradient yet (first layer, embedding): tag it so that it does.
            # A view is copied: tagging it in place would make autograd rebase it (two copies in backward).
            return _Tap.apply(self._anchor, out, on_grad, copy or out._is_view())
        return hook

    def _on_grad(self, tl: TrackedLayer, rec: Record, g: Tensor) -> None:
        rec.g = g
        rec.extra["g_version"] = g._version
        task = torch._C._current_graph_task_id()
        if self._queued_for != task:  # first tap of this backward
            self._pending = []  # drop what an earlier backward that raised left behind
            self._queued_for = task
            torch.autograd.Variable._execution_engine.queue_callback(self._reduce_pending)
        self._pending.append((tl, rec))

    # ----------------------------------------------------------------------------------- reduce
    def _method(self, tl: TrackedLayer, rec: Record) -> NormMethod:
        if self.mode is GradSampleMode.GHOST:
            return NormMethod.GRAM if tl.handler.has_gram else NormMethod.MATERIALIZE
        key = (id(tl), tuple(rec.g.shape[1:]))
        if key not in self._method_cache:  # BK: chosen per layer by cost, cached per shape
            use_gram = tl.handler.has_gram and tl.handler.prefers_gram(tl.module, rec)
            self._method_cache[key] = NormMethod.GRAM if use_gram else NormMethod.MATERIALIZE
        return self._method_cache[key]

    def _reduce_pending(self) -> None:
        pending, self._pending, self._queued_for = self._pending, [], None
        if not pending:
            return
        with torch.no_grad(), _suspend_capture():
            self._reduce(pending)

    def _reduce(self, pending: list[tuple[TrackedLayer, Record]]) -> None:
        sizes = {rec.g.shape[0] for _, rec in pending}
        if len(sizes) != 1:
            detail = ", ".join(f"{tl.name}: {rec.g.shape[0]}" for tl, rec in pending)
            raise PerSampleGradientError(
                "layers saw different batch sizes in one backward, so per-sample gradients are ill-defined "
                f"({detail}). Every tracked layer must take inputs with the batch as dimension 0.")
        batch = sizes.pop()
        self._check_no_leak()
        for tl, rec in pending:
            if any(rec.args[i]._version != v for i, v in rec.extra.pop("versions", [])) or \
                    rec.g._version != rec.extra.pop("g_version", rec.g._version):
                raise PerSampleGradientError(
                    f"the input of layer '{tl.name}' ({type(tl.module).__name__}) was modified in place after the "
                    "layer used it, so its per-sample gradients cannot be formed. Use an out-of-place operation "
                    "(x = x + 1 rather than x += 1) on tensors that a tracked layer has read.")
        if batch == 0:  # an empty Poisson batch: nothing to clip, the step still adds noise
            ref = pending[0][1].g
            self.last_norms = ref.new_zeros(0)
            for tl, _ in pending:
                for p in tl.params:
                    self._summed.setdefault(p, torch.zeros_like(p))
            self.batches_accumulated += 1
            return
        # mean reduction: autograd's g is (1/B) * per-sample g; scale norms and factors, not tensors.
        scale = float(batch) if self.loss_reduction is LossReduction.MEAN else 1.0

        uses: dict[nn.Parameter, list[tuple[TrackedLayer, Record, str]]] = {}
        for tl, rec in pending:
            for n, p in zip(tl.names, tl.params):
                uses.setdefault(p, []).append((tl, rec, n))
        ref = pending[0][1].g
        sq_total = ref.new_zeros(batch, dtype=torch.promote_types(ref.dtype, torch.float32))
        direct: dict[tuple[int, int], tuple[TrackedLayer, Record, list[str]]] = {}  # reduced by the handler
        materialized: dict[nn.Parameter, Tensor] = {}  # summed per-sample gradients (hooks, or no factors)
        for p, us in uses.items():
            if self.mode is not GradSampleMode.HOOKS and len(us) > 1:
                facs = [tl.handler.factors(tl.module, rec, n) for tl, rec, n in us]
                if all(f is not None for f in facs):
                    # ||sum_u G_u||^2 = sum_u ||G_u||^2 + 2 sum_{u<v} <G_u, G_v>, never materialized
                    for i in range(len(facs)):
                        for j in range(i):
                            sq_total += 2 * cross_term(facs[i], facs[j])
                    for tl, rec, n in us:
                        direct.setdefault((id(tl), id(rec)), (tl, rec, []))[2].append(n)
                    continue
            if self.mode is GradSampleMode.HOOKS or len(us) > 1:
                for tl, rec, n in us:
                    ps = tl.handler.per_sample(tl.module, rec, [n])[n]
                    materialized[p] = materialized[p] + ps if p in materialized else ps
                sq_total += row_sq(materialized[p])
                continue
            tl, rec, n = us[0]
            direct.setdefault((id(tl), id(rec)), (tl, rec, []))[2].append(n)
        for tl, rec, names in direct.values():
            for t in tl.handler.norm_sq(tl.module, rec, names, self._method(tl, rec)).values():
                sq_total += t

        norms = sq_total.sqrt() * scale
        if batch and not bool(torch.isfinite(norms).all()):
            raise PerSampleGradientError(
                "non-finite per-sample gradient norm (NaN or inf) in this batch; the update is refused rather "
                "than clipped silently. Check the loss and inputs (lower the learning rate, or clamp logits).")
        self.last_norms = norms
        # (B,): factor per sample, times the mean-reduction scale and the output scale (1 / expected batch
        # size for a mean-reduced loss), so no pass over the summed gradients is needed later
        c = self.clip_factors(norms) * (scale * self.output_scale)

        for tl, rec, names in direct.values():
            for n, t in tl.handler.clipped_sum(tl.module, rec, names, c).items():
                self._accumulate(tl.params[tl.names.index(n)], t)
        for p, ps in materialized.items():
            self._accumulate(p, weighted_sum(ps, c))
        self.batches_accumulated += 1

    def _accumulate(self, p: nn.Parameter, t: Tensor) -> None:
        t = t.to(p.dtype)
        if p in self._summed:
            self._summed[p].add_(t)
        else:
            self._summed[p] = t

    def _check_no_leak(self) -> None:
        for tl in self.layers:
            for n, p in zip(tl.names, tl.params):
                if p.grad is not None and p.grad is not self._written.get(p):
                    raise PerSampleGradientError(
                        f"parameter '{tl.name}.{n}' received an ordinary (non-private) gradient from autograd: "
                        "it was used outside its own module's forward (e.g. read directly by a parent module). "
                        "dpengine cannot form its per-sample gradient. Use the parameter only through its "
                        "module (wrap it in nn.Linear / nn.Embedding), or freeze it.")

    # ----------------------------------------------------------------------------------- optimizer side
    def pop_clipped_sums(self) -> dict[nn.Parameter, Tensor]:
        """The clipped sums accumulated since the last pop (and forget them)."""
        out, self._summed = self._summed, {}
        self.batches_accumulated = 0
        return out

    def mark_written(self, p: nn.Parameter, grad: Tensor) -> None:
        """Remember the private gradient the optimizer wrote, so it is not mistaken for a leak."""
        self._written[p] = grad

    def clear(self) -> None:
        self._summed = {}
        self._pending = []
        self.batches_accumulated = 0
        self._written = {}

    def detach(self) -> None:
        """Remove every hook; the module is left as it was before ``make_private``."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()
