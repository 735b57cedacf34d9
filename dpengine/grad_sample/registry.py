"""One registry of per-layer handlers.

A handler knows, for one layer family, how to turn the layer input ``a`` and the output gradient ``g``
captured during the ordinary backward into

* ``per_sample``  -> ``{param_name: (B, *param.shape)}``   (materialized; the reference path)
* ``norm_sq``     -> ``{param_name: (B,)}``               (squared per-sample norms, possibly without
                                                          materializing: the "ghost" / Gram form)
* ``clipped_sum`` -> ``{param_name: param.shape}``         (sum_i c_i * grad_i, one weighted GEMM: book-keeping)
                                                          (``out``: destinations the controller offers, the
                                                          parameter's slot of the flat sum buffer; a handler
                                                          may write there and return it, saving a copy)

Handlers are pure functions of ``(layer, record)``: they know nothing about clipping modes, noise or
accounting. Per-sample gradients are gradients of the *summed* loss here; the controller undoes a
mean reduction by scaling (it multiplies norms and factors by the batch size, never the tensors).
"""

from __future__ import annotations

import enum
import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn


#: the ``norm_sq`` key of a total over all the asked parameters (see ``LayerHandler.joint_norms``)
JOINT = "*"


class PerSampleGradientError(RuntimeError):
    """Raised when per-sample gradients cannot be formed correctly for a batch."""


class NormMethod(enum.Enum):
    """How a handler computes a per-sample gradient norm."""

    GRAM = "gram"  # ghost norm: never materializes the per-sample gradient
    MATERIALIZE = "materialize"  # per-sample gradient of this layer alone, reduced to its norm


@dataclass
class Record:
    """One call of a tracked layer: its inputs (detached) and, after the backward, its output gradient."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    g: Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # handler scratch (e.g. an unfolded conv input)

    @property
    def a(self) -> Tensor:
        return self.args[0]

    def memo(self, key: str, make: Callable[[], Any]) -> Any:
        """``make()`` once per record, kept in ``extra[key]`` (a tensor the norm and the sum both need)."""
        if key not in self.extra:
            self.extra[key] = make()
        return self.extra[key]

    def release(self) -> None:
        """Drop the captured input and gradient once a handler has cached all it still needs."""
        self.args, self.kwargs, self.g = (), {}, None


@dataclass(frozen=True)
class OuterFactors:
    """A per-sample gradient in factored form: ``G_i = sum_t left[i, t] (outer) right[i, t]``, in the
    parameter's own (rows, cols) layout. ``left`` is (B, T, rows), or (B, T) row indices (one-hot rows,
    as for an embedding). Used for the cross terms of a parameter with several uses (tied weights)."""

    left: Tensor
    right: Tensor  # (B, T, cols)

    @property
    def indexed(self) -> bool:
        return self.left.dim() == 2


def _left_dot(u: OuterFactors, v: OuterFactors) -> Tensor:
    """(B, T_u, T_v): left_u[t] . left_v[s]."""
    if u.indexed and v.indexed:
        return (u.left.unsqueeze(2) == v.left.unsqueeze(1)).to(u.right.dtype)
    if u.indexed:
        return _left_dot(v, u).transpose(1, 2)
    if v.indexed:  # dense (B, T_u, rows) . one-hot rows x_s  ->  left_u[b, t, x_s]
        idx = v.left.unsqueeze(1).expand(-1, u.left.shape[1], -1)
        return torch.gather(u.left, 2, idx)
    return torch.bmm(u.left, v.left.transpose(1, 2))


def cross_term(u: OuterFactors, v: OuterFactors) -> Tensor:
    """(B,) per-sample inner products <G_u, G_v> = sum_{t,s} (left_u.left_v)(right_u.right_v), plus a bound on
    what underflow in the two products can have lost (see ``underflow_pad``), so that the squared norm they
    enter (``||G_u + G_v||^2 = ... + 2 <G_u, G_v>``) is never under-stated by it. The bound, for product
    entries computed with an absolute error of at most ``eps`` each, is ``eps (r sum|R| + c sum|L|)`` (r, c:
    the contracted widths), with ``sum_{t,s} |L_ts| <= sqrt(T_u T_v tr L_u tr L_v)``; one-hot (indexed) rows
    have ``tr L = T`` and are multiplied exactly."""
    inner = (_left_dot(u, v) * torch.bmm(u.right, v.right.transpose(1, 2))).sum((1, 2))
    t_u, t_v = u.right.shape[1], v.right.shape[1]
    width = max(u.right.shape[2], 1 if u.indexed else u.left.shape[2])
    pad = underflow_pad(u.right.dtype, math.sqrt(t_u * t_v), width)
    if pad == 0.0:
        return inner

    def root_tr(f: OuterFactors, side: str) -> Tensor | float:
        if side == "left" and f.indexed:
            return math.sqrt(f.right.shape[1])
        return row_sq(getattr(f, side)).sqrt()

    slack = root_tr(u, "left") * root_tr(v, "left")  # for the rights' products
    if not (u.indexed or v.indexed):  # dense lefts are multiplied too
        slack = slack + root_tr(u, "right") * root_tr(v, "right")
    return inner + pad * (slack + pad)


class LayerHandler:
    """Base class: a handler must implement ``per_sample``; the rest defaults to materializing.

    Subclasses override ``norm_sq``/``clipped_sum`` with cheaper forms and set ``has_gram``, and
    ``factors`` when their per-sample gradient is a sum of outer products.
    """

    #: True if ``norm_sq(..., NormMethod.GRAM)`` avoids materializing per-sample gradients.
    has_gram: bool = False
    #: The trainable parameters the handler's rules cover (None: any, as the torch.func fallback).
    param_names: frozenset[str] | None = frozenset({"weight", "bias"})
    #: True if autograd may save the layer's *output* for its own backward (then the capture copies the
    #: output instead of tagging it in place).
    output_may_be_saved: bool = False
    #: True if records of several calls of the layer (same shapes, no keyword arguments) may be merged into
    #: one by stacking ``a`` and ``g`` along a new dimension 1: the rules must treat every dimension between
    #: the batch and the features as positions summed over (Linear: grad_i = sum_t g_t a_t^T). The controller
    #: does this for a layer called once per time step (an RNN cell), so its norm is one Gram or materialized
    #: step instead of pairwise cross terms between calls.
    stackable: bool = False
    #: True if ``norm_sq`` accepts ``joint=True`` (all ``names`` in one clipping group): it may then return
    #: the total squared norm of those parameters under the key ``JOINT``, which can be cheaper than the
    #: parts (a Linear's bias norm comes out of the weight's Gram matrices for one extra add).
    joint_norms: bool = False
    #: The methods of the registered class whose computation the handler's rules assume: a subclass (or an
    #: instance) that replaces any of them computes something else, so the handler does not apply to it
    #: (``find_handler``). ``forward`` always; e.g. ``_conv_forward`` for the convolutions.
    forward_methods: tuple[str, ...] = ("forward",)

    def problems(self, layer: nn.Module) -> list[str]:
        """Reasons this layer cannot be trained privately (empty if it can)."""
        return []

    def unknown_params(self, layer: nn.Module) -> list[str]:
        """Trainable parameters of the layer that the handler's rules do not cover (e.g. the ``weight_g``,
        ``weight_v`` of the hook-based ``torch.nn.utils.weight_norm``, which computes ``weight`` from them)."""
        if self.param_names is None:
            return []
        return [n for n, _ in direct_trainable(layer) if n not in self.param_names]

    def per_sample(self, layer: nn.Module, rec: Record, names: list[str]) -> dict[str, Tensor]:
        raise NotImplementedError

    def factors(self, layer: nn.Module, rec: Record, name: str) -> OuterFactors | None:
        """The factored per-sample gradient of parameter ``name``, or None if it has no such form."""
        return None

    def prefers_gram(self, layer: nn.Module, rec: Record) -> bool:
        """Cost rule for the ``bk`` backend: Gram form when it needs less memory than materializing."""
        return False

    def gram_flop_ratio(self, layer: nn.Module, rec: Record) -> float | None:
        """FLOPs of the Gram-form weight norm over those of materializing it, T (d + p) / (p d) for T
        positions and a (p, d) weight; None where the handler has no Gram form."""
        return None

    def norm_sq(self, layer: nn.Module, rec: Record, names: list[str], method: NormMethod) -> dict[str, Tensor]:
        return {n: row_sq(t) for n, t in self._cached_per_sample(layer, rec, names).items()}

    def row_params(self, layer: nn.Module, rec: Record, names: list[str], method: NormMethod,
                   joint: bool) -> dict[str, bool]:
        """The parameters among ``names`` whose per-sample gradients this handler forms as (B, n) rows whatever
        the method (a bias, a norm layer's scale): the controller may have them written into one matrix with
        other layers' rows (``write_rows``) and reduce them all at once (``rows.RowPack``). Maps each to True
        if its norm is wanted from those rows, False if ``norm_sq`` with these ``method`` and ``joint``
        covers it (a Linear's bias inside the joint Gram norm); the controller then leaves the former out of
        ``names`` for ``norm_sq`` and all of them out for ``clipped_sum``."""
        return {}

    def write_rows(self, layer: nn.Module, rec: Record, out: dict[str, Tensor]) -> None:
        """Write the per-sample gradient of each parameter named in ``out`` into its (B, *param.shape)
        destination (a view of the controller's row matrix, not contiguous)."""
        raise NotImplementedError

    def clipped_sum(self, layer: nn.Module, rec: Record, names: list[str], c: Tensor,
                    out: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """``{name: sum_i c_i grad_i}``. ``out`` may hold a contiguous destination per name (in the sum dtype,
        float32 or wider): write there and return it when the result has that dtype, else return a new tensor."""
        out = out or {}
        return {n: weighted_sum(t, c, out=out.get(n)) for n, t in self._cached_per_sample(layer, rec, names).items()}

    def _cached_per_sample(self, layer: nn.Module, rec: Record, names: list[str]) -> dict[str, Tensor]:
        """Materialized per-sample gradients, computed once per record for the norm and the sum."""
        cache = rec.extra.setdefault("per_sample", {})
        missing = [n for n in names if n not in cache]
        if missing:
            cache.update(self.per_sample(layer, rec, missing))
        return {n: cache[n] for n in names}


def row_sq(per_sample: Tensor) -> Tensor:
    """(B, *shape) -> (B,) squared Frobenius norms (a 2-D reduction: the fast path on CPU)."""
    x = per_sample if per_sample.dim() == 2 else per_sample.reshape(per_sample.shape[0], -1)
    return (x * x).sum(1)


def weighted_sum(per_sample: Tensor, c: Tensor, out: Tensor | None = None) -> Tensor:
    """sum_i c_i * per_sample[i] as one matrix-vector product (into ``out`` when it has the right dtype)."""
    two_d = per_sample.dim() == 2  # (B, n): no reshapes
    flat = per_sample if two_d else per_sample.reshape(per_sample.shape[0], -1)
    if fits(out, flat.dtype):
        done = torch.mv(flat.t(), c.to(flat.dtype), out=out if two_d else out.view(-1))
    else:
        done = c.to(flat.dtype) @ flat
    return done if two_d else done.view(per_sample.shape[1:])


#: the last factors broadcast by ``factor_view``: (factors, {ndim: view}), replaced whole (thread-safe reads)
_FACTOR_VIEWS: tuple[Tensor | None, dict[int, Tensor]] = (None, {})


def factor_view(c: Tensor, ndim: int) -> Tensor:
    """(B,) factors as (B, 1, ..., 1) with ``ndim`` dimensions, to scale a (B, ...) tensor. Every layer of a
    clipping group is given the same factor tensor in one reduction, so the view is made once for all."""
    global _FACTOR_VIEWS
    last, views = _FACTOR_VIEWS
    if last is not c:
        views = {}
        _FACTOR_VIEWS = (c, views)
    if ndim not in views:
        views[ndim] = c.view(-1, *([1] * (ndim - 1)))
    return views[ndim]


def fits(out: Tensor | None, dtype: torch.dtype) -> bool:
    """True when ``out`` (an offered destination) can take a result of ``dtype`` written in place."""
    return out is not None and out.dtype == dtype and out.is_contiguous()


_BY_TYPE: dict[type, LayerHandler] = {}
# Handlers for classes of optional packages, keyed by "module.qualname" so that the package is never
# imported just to register them (transformers' GPT-2 ``Conv1D``, for example).
_BY_NAME: dict[str, LayerHandler] = {}


def register(*layer_types: type | str) -> Callable[[type[LayerHandler]], type[LayerHandler]]:
    """Class decorator: register one handler instance for the given layer types (or qualified names)."""

    def deco(cls: type[LayerHandler]) -> type[LayerHandler]:
        inst = cls()
        for t in layer_types:
            if isinstance(t, str):
                _BY_NAME[t] = inst
            else:
                _BY_TYPE[t] = inst
        return cls

    return deco


def _qualname(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"


def _registered(cls: type) -> tuple[type, LayerHandler] | None:
    """The nearest class in ``cls``'s MRO with a registered handler (by type or qualified name), and the handler."""
    for t in cls.__mro__:
        if t in _BY_TYPE:
            return t, _BY_TYPE[t]
        if _qualname(t) in _BY_NAME:
            return t, _BY_NAME[_qualname(t)]
        if t is nn.Module:
            break
    return None


def overrides(layer: nn.Module, base: type, methods: tuple[str, ...] = ("forward",)) -> list[str]:
    """The methods among ``methods`` that ``layer`` (an instance of ``base`` or of a subclass) does not run as
    ``base`` defines them: redefined by a class between ``type(layer)`` and ``base`` in the MRO, or assigned on
    the instance (``layer.forward = ...``). Empty for ``base`` itself.

    This is the one rule by which a rule written for a layer class reaches its subclasses: a per-sample
    handler (``find_handler``) or ``dpengine.fix``'s swap of an attention or recurrent layer applies to a
    subclass only if it computes what the class computes. A ``ScaledEmbedding(nn.Embedding)`` whose forward
    returns ``super().forward(x) * 8`` does not: nn.Embedding's per-sample rule would miss the factor 8."""
    cls = type(layer)
    return [m for m in methods if m in vars(layer) or getattr(cls, m, None) is not getattr(base, m, None)]


def find_handler(layer: nn.Module) -> LayerHandler | None:
    """The handler registered for the layer's class or, failing that, its nearest registered base class,
    provided the layer runs that class's own ``forward`` (see ``overrides``). None when no handler applies:
    the layer then takes the generic torch.func rule if it qualifies, else ``dpengine.validate`` reports it."""
    found = _registered(type(layer))
    if found is None:
        return None
    base, handler = found
    return None if overrides(layer, base, handler.forward_methods) else handler


def shadowed_handler(layer: nn.Module) -> tuple[type, list[str]] | None:
    """(registered base class, overridden methods) when a handler is registered for a base class of ``layer``
    but does not apply because ``layer`` overrides its forward; None otherwise."""
    found = _registered(type(layer))
    if found is None:
        return None
    base, handler = found
    changed = overrides(layer, base, handler.forward_methods)
    return (base, changed) if changed else None


def direct_trainable(layer: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in layer.named_parameters(recurse=False) if p.requires_grad]


def registered_types() -> list[str]:
    return sorted({t.__name__ for t in _BY_TYPE} | {n.rsplit(".", 1)[-1] for n in _BY_NAME})


def flatten_tokens(x: Tensor) -> Tensor:
    """(B, ..., d) -> (B, T, d) with T the product of the middle dimensions (T = 1 for 2-D inputs)."""
    return x if x.dim() == 3 else x.reshape(x.shape[0], -1, x.shape[-1])


def gram_norm_sq(a: Tensor, g: Tensor) -> Tensor:
    """||sum_t g_t a_t^T||_F^2 per sample, without forming the outer products.

    Args:
        a: (B, T, d) layer inputs.
        g: (B, T, p) output gradients.

    Returns:
        (B,) squared norms, sum_{t,s} (a_t . a_s)(g_t . g_s)  (Li et al. 2022, "ghost clipping").
    """
    if a.shape[1] == 1:
        return rank_one_norm_sq(a, g)
    pad = token_pad(a, g)
    return (gram(a, a.transpose(1, 2), pad) * gram(g, g.transpose(1, 2), pad)).sum((1, 2))


def underflow_pad(dtype: torch.dtype, positions: float, width: int) -> float:
    """What a factored norm adds so that underflow can never make it smaller than the true norm.

    A Gram-form norm ``sum_{t,s} A_ts G_ts`` (``A = a a^T``, ``G = g g^T``, contracted over widths d and p)
    multiplies the squares of two factors. Each product of two entries that falls below the dtype's smallest
    normal number (``tiny``; 2^-126 in float32) is rounded to a subnormal or flushed to zero, an absolute error
    below ``tiny``. Alone that is harmless (a per-sample gradient made of such values is tiny), but a factor
    can be huge while the other underflows: ``a`` near 1e19 and ``g`` near 1e-23 have an ordinary product,
    yet ``g g^T`` reads 0 in float32, the norm reads 0, and the sample would be released unclipped. With
    ``|dA_ts| <= d eps``, ``|dG_ts| <= p eps`` and ``sum_{t,s} |G_ts| <= T tr G``, the lost amount is at most
    ``eps T (d tr G + p tr A) + eps^2 T^3 d p``, which is exactly what adding ``pad = eps T max(d, p)`` to both
    diagonals adds (``sum (A + pad I)(G + pad I) = sum A G + pad (tr A + tr G) + pad^2 T``).

    ``eps`` is 4 ``tiny`` (margin for the pad's own rounding) and the width is rounded up to a power of two of
    at least 2^20, so one pad serves every layer with as many positions. A pad is far below anything an
    ordinary diagonal holds (float32, T = 1024: about 5e-29), so a norm that did not underflow is unchanged
    (it is absorbed by rounding). Zero for float64 inputs and below, where nothing of this size matters."""
    if dtype == torch.float64:
        return 0.0
    tiny = torch.finfo(torch.float32).tiny  # 16-bit operands are promoted to float32 for the norms
    return 4.0 * tiny * positions * 2.0 ** max(20, math.ceil(math.log2(max(width, 1))))


def token_pad(a: Tensor, g: Tensor) -> float:
    """``underflow_pad`` of the Grams of (B, T, d) inputs and (B, T, p) output gradients."""
    return underflow_pad(a.dtype, a.shape[1], max(a.shape[2], g.shape[2]))


def rank_one_norm_sq(a: Tensor, g: Tensor) -> Tensor:
    """||g a^T||_F^2 = ||a||^2 ||g||^2 per sample for (B, 1 or none, d) and (B, 1 or none, p), each factor padded
    against underflow (``underflow_pad``: a huge ``a`` with an ``||g||^2`` that reads 0 is not a zero norm)."""
    pad = underflow_pad(a.dtype, 1, max(a.shape[-1], g.shape[-1]))
    if pad == 0.0:
        return row_sq(a) * row_sq(g)
    return (row_sq(a) + pad) * (row_sq(g) + pad)


def gram(x: Tensor, xt: Tensor, pad: float, plus_one: bool = False) -> Tensor:
    """``x @ xt`` for (B, T, k) @ (B, k, T) with ``pad`` added to the diagonal (and 1 everywhere with
    ``plus_one``: a bias's constant input), in one ``baddbmm`` whose input is a cached (T, T) matrix."""
    if pad == 0.0 and not plus_one:
        return torch.bmm(x, xt)
    return torch.baddbmm(_diagonal(x.shape[1], pad, plus_one, x.dtype, x.device), x, xt)


@functools.lru_cache(maxsize=8)
def _diagonal(t: int, pad: float, plus_one: bool, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(T, T): ``pad`` on the diagonal, plus 1 everywhere with ``plus_one``; 0-dim when ``pad`` is 0. A few
    kept: a model has one T per step (the pad is the same for every width up to 2^20), and with lengths that
    vary from batch to batch a larger cache would hold T^2 floats per length on the device."""
    if pad == 0.0:
        return torch.ones((), dtype=dtype, device=device)
    out = torch.eye(t, dtype=dtype, device=device) * pad
    return out + 1 if plus_one else out
