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

import contextlib
import enum
import inspect
import itertools
import math
import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules.module import _global_forward_hooks  # read, never replaced, by torch's module calls

from ..clipping import ClippingPolicy
from . import fused
from .functorch import FALLBACK
from .precision import exact_fp32
from .ledger import BatchLedger, accumulate, nonfinite_flag, sum_dtype
from .rows import RowPack, accumulate_pieces
from .registry import (JOINT, LayerHandler, NormMethod, PerSampleGradientError, Record, cross_term, direct_trainable,
                       find_handler, row_sq, weighted_sum)


class GradSampleMode(enum.Enum):
    """How per-sample norms and clipped sums are computed (the *what* is the clipping policy's)."""

    HOOKS = "hooks"  # materialize every per-sample gradient (reference path)
    GHOST = "ghost"  # Gram-form norms wherever a handler has one (least memory); weighted-GEMM sums
    BK = "bk"  # book-keeping: per layer, Gram or materialized norm by cost; weighted-GEMM sums
    FUSED = "fused"  # bk with Triton kernels for the layers they cover (see grad_sample/fused.py)


#: ghost mode warns (once) when a layer's Gram-form norm costs more than this many times materializing it
GHOST_COST_WARNING = 10.0


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


def _cuda_graph_capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (never without an initialized CUDA context; the
    query itself does not exist in a CPU-only build)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def _refuse_cuda_graph_capture() -> None:
    """Capture runs Python at every layer call and a reduction at the end of the backward; a CUDA graph
    records neither, so a replay would reuse stale captures and never clip. Refused while a stream captures."""
    if _cuda_graph_capturing():
        raise PerSampleGradientError(
            "a private model ran inside CUDA graph capture (torch.compile(mode='reduce-overhead') or "
            "torch.cuda.graph): dpengine's per-sample capture and clipping run Python that a CUDA graph cannot "
            "record, so replays would not be clipped. Compile with torch.compile(model) (mode='default' or "
            "'max-autotune-no-cudagraphs') instead.")


def _reducing() -> contextlib.ExitStack:
    """The context every reduction runs in: no autograd, no capture, and no autocast. A backward called
    inside ``torch.autocast`` runs the reduction with autocast still on (it is thread-local state, and the
    engine carries it into the backward), which would form the norms' GEMMs in bf16/fp16 and could
    under-state a sample's norm: norms, factors and clipped sums are computed in the dtypes chosen here.
    For the same reason float32 products and convolutions run exact, not in TF32 or oneDNN's bf16 mode
    (``precision.exact_fp32``)."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.no_grad())
    stack.enter_context(_suspend_capture())
    for device in ("cpu", "cuda"):
        if torch.is_autocast_enabled(device):
            stack.enter_context(torch.autocast(device, enabled=False))
    exact_fp32(stack)
    return stack


@contextlib.contextmanager
def no_capture() -> Any:
    """Run a private model without capturing it: its parameters get ordinary gradients, and nothing
    computed inside can reach the private update.

    For passes that are not the training backward, e.g. the input gradient of adversarial training::

        with dpengine.no_capture():
            x_adv = x + eps * torch.autograd.grad(loss_fn(model(x), y), x)[0].sign()
        loss_fn(model(x_adv), y).backward()   # the training backward, captured and clipped
        optimizer.step()

    A backward of a graph built inside ``no_capture`` may set ``p.grad`` of the model's parameters
    (``backward()`` rather than ``autograd.grad``); the private step refuses such gradients.
    """
    with _suspend_capture():
        yield


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


def _accumulator(leaf: Tensor) -> Any:
    """The gradient accumulator node of a leaf tensor (kept alive by the caller, so it stays the same)."""
    return leaf.view_as(leaf).grad_fn.next_functions[0][0]


def _full_backward(acc: Any) -> bool | None:
    """Whether the running backward is a full ``backward()`` (it accumulates into every leaf), given the
    accumulator of a leaf that is in the graph: False for ``torch.autograd.grad`` or ``backward(inputs=)``;
    None if autograd cannot tell."""
    try:
        return bool(torch._C._will_engine_execute_node(acc))
    except Exception:  # a private API: never let it decide privacy on its own
        return None


# ------------------------------------------------------------------------- capture under torch.compile
# Under torch.compile a tensor hook or an autograd.Function backward that writes Python state is a graph
# break (dynamo traces them as side-effect-free subgraphs). The compiled path captures through two opaque
# custom ops instead, which dynamo, AOTAutograd and inductor keep as calls made at run time with the real
# tensors: ``capture`` (forward) copies the layer's inputs into a Record filed under a fresh sequence number
# and returns a copy of the output plus that number as a tensor (saved for the backward); its registered
# backward calls ``file_grad``, which hands a copy of ``g`` and the record to ``_on_grad`` exactly as the eager
# tap does, and returns another copy of ``g`` as the gradient passed on. Kept copies: inductor reuses an
# intermediate's buffer after its last use in the graph, so a kept reference to ``a`` or ``g`` could be
# overwritten later in the same graph. The returned copy: with ``g`` itself passed on, ``g`` has two users in
# the backward graph, and inductor 2.13 then fails to compile a convolution's backward under dynamic shapes
# (require_stride_order: "Exponent must be non-negative"). ``file_grad`` is registered as effectful, or the
# backward graph would drop it where its output is unused (the first layer, whose input needs no gradient);
# a mutated argument does not keep it (measured: dropped). See DESIGN.md, "torch.compile".
_CONTROLLERS: dict[int, Callable[[], Any]] = {}  # key -> weakref to the GradSampleController
_CONTROLLER_KEYS = itertools.count()
_SEQ = itertools.count()


def _live_controller(key: int) -> "GradSampleController":
    ctl = _CONTROLLERS.get(key, lambda: None)()
    if ctl is None:
        raise PerSampleGradientError("a compiled graph captured a layer of a model whose dpengine controller is gone "
                                     "(the model was detached or its engine deleted); recompile the model.")
    return ctl


@torch.library.custom_op("dpengine::capture", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def _capture_op(out: Tensor, ctl: int, layer: int, anchor: Tensor, args: list[Tensor]) -> tuple[Tensor, Tensor]:
    seq = _live_controller(ctl)._open_record(layer, args)
    return out.clone(), seq


@_capture_op.register_fake
def _capture_fake(out: Tensor, ctl: int, layer: int, anchor: Tensor, args: list[Tensor]) -> tuple[Tensor, Tensor]:
    return torch.empty_like(out), torch.empty((), dtype=torch.int64)


@torch.library.custom_op("dpengine::file_grad", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def _file_grad_op(g: Tensor, ctl: int, seq: Tensor) -> Tensor:
    _live_controller(ctl)._file_grad(int(seq), g)  # seq is a CPU scalar: no device sync
    return g.clone()


@_file_grad_op.register_fake
def _file_grad_fake(g: Tensor, ctl: int, seq: Tensor) -> Tensor:
    return torch.empty_like(g)


def _register_effectful() -> bool:
    """Mark ``file_grad`` effectful, so it is kept where its output is unused (the first layer, whose input
    needs no gradient). A semi-private torch API: where it is missing, the compiled path is not used (traced
    calls take the eager hooks, which break the graph but capture every call)."""
    try:
        from torch._library.effects import EffectType

        torch.library._register_effectful_op(_file_grad_op._opoverload, EffectType.ORDERED)
    except Exception:  # noqa: BLE001 - any failure means: do not rely on the op being kept
        return False
    return True


#: the custom-op capture is used under torch.compile (False: this torch cannot keep file_grad in the graph)
COMPILED_CAPTURE = _register_effectful()


def _capture_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    ctx.ctl, ctx.n_args = inputs[1], len(inputs[4])
    ctx.save_for_backward(output[1])


def _capture_backward(ctx: Any, g: Tensor, _seq_grad: Any) -> tuple:
    (seq,) = ctx.saved_tensors
    return _file_grad_op(g, ctx.ctl, seq), None, None, None, [None] * ctx.n_args


_capture_op.register_autograd(_capture_backward, setup_context=_capture_setup)


# --------------------------------------------------------------------------------- broadcast outputs
_BROADCAST_OPS = frozenset(
    f for name in ("add", "sub", "mul", "div") for f in (
        getattr(torch, name), getattr(Tensor, name), getattr(Tensor, name + "_"))) | frozenset(
    getattr(Tensor, f"__{op}__") for op in (
        "add", "radd", "iadd", "sub", "rsub", "isub", "mul", "rmul", "imul", "truediv", "rtruediv", "itruediv"))
# ops that present the same values in another dtype, device or layout: the expanded twin follows them
_SAME_VALUE_OPS = frozenset({Tensor.to, Tensor.contiguous, Tensor.type_as, Tensor.float, Tensor.half,
                             Tensor.bfloat16, Tensor.double})


class _BroadcastOutput(Tensor):
    """The batch-1 output of a tracked layer called with a batch-1 index input (position ids of shape
    (1, T)) while the private loader's batch has B > 1 samples.

    Its values are the layer's own output, so the model computes exactly what it computed before. Where it
    meets a per-sample operand in an elementwise add/sub/mul/div (the other operand has the same rank and
    the batch B as dimension 0), the op uses an expanded twin of shape (B, ...) instead: identical values
    by broadcasting, and a gradient that arrives per sample. Any other use (a reduction, indexing,
    concatenation, another layer) gets the plain batch-1 tensor, whose gradient is the sum over the
    batch: if a gradient ever arrives there, the backward is refused. So expansion counts only where it is
    certain to be a broadcast.

    The same wrapper, with ``lead``, presents the output of a rank-1 index lookup (nanoGPT's
    ``wpe(torch.arange(T))``, shape (T, d)): an elementwise op with an operand of one more dimension whose
    dimension 0 is B broadcasts it over a new leading batch dimension, so that use gets the (B, T, d) twin.
    Its plain use stays an ordinary record with the batch as dimension 0 (per-sample ids of shape (B,));
    ``unsqueeze(0)`` lifts it to the batch-1 form above. Without this, a (T,) lookup would be taken as
    per sample whenever a Poisson batch happens to have T records.
    """

    _dp_twin: Callable[[], Tensor]
    _dp_batch: int
    _dp_misuse: list[str]
    _dp_lead: bool
    _dp_lift: Callable[[Tensor], Tensor] | None

    @classmethod
    def wrap(cls, plain: Tensor, twin: Callable[[], Tensor], batch: int, misuse: list[str], lead: bool = False,
             lift: Callable[[Tensor], Tensor] | None = None) -> "_BroadcastOutput":
        out = plain.as_subclass(cls)
        out._dp_twin, out._dp_batch, out._dp_misuse = twin, batch, misuse
        out._dp_lead, out._dp_lift = lead, lift
        return out

    def _is_broadcast(self, func: Any, args: tuple, kwargs: dict) -> bool:
        if func not in _BROADCAST_OPS:
            return False
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
        others = [a for a in tensors if a is not self]
        if len(tensors) != 2 or len(others) != 1 or isinstance(others[0], _BroadcastOutput):
            return False
        name = getattr(func, "__name__", "")
        if args[0] is self and (name.endswith("_") or name.startswith("__i")):
            return False  # modifies the batch-1 value itself
        other = others[0]
        if self._dp_lead:
            return other.dim() == self.dim() + 1 and other.shape[0] == self._dp_batch
        return other.dim() == self.dim() and other.shape[0] == self._dp_batch and self.shape[0] == 1

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        ours = [a for a in (*args, *kwargs.values()) if isinstance(a, _BroadcastOutput)]
        with torch._C.DisableTorchFunctionSubclass():
            if len(ours) == 1:
                me = ours[0]
                if func in _SAME_VALUE_OPS and args and args[0] is me:
                    plain = func(me.as_subclass(Tensor), *args[1:], **kwargs)
                    parent = me._dp_twin
                    return cls.wrap(plain, _lazy(lambda: func(parent(), *args[1:], **kwargs)), me._dp_batch,
                                    me._dp_misuse, me._dp_lead, me._dp_lift)
                if me._dp_lead and me._dp_lift is not None and func in (Tensor.unsqueeze, torch.unsqueeze) \
                        and args and args[0] is me and (args[1:] or [kwargs.get("dim")])[0] == 0:
                    # (T, d) -> (1, T, d): the batch-1 form, whose twin is the same (B, T, d) tensor and whose
                    # plain use (its gradient summed over the batch) is refused
                    lifted = me._dp_lift(func(me.as_subclass(Tensor), 0))
                    return cls.wrap(lifted, me._dp_twin, me._dp_batch, me._dp_misuse)
                if me._is_broadcast(func, args, kwargs):
                    twin = me._dp_twin()
                    return func(*[twin if a is me else a for a in args],
                                **{k: (twin if v is me else v) for k, v in kwargs.items()})

            def plain(x: Any) -> Any:
                return x.as_subclass(Tensor) if isinstance(x, _BroadcastOutput) else x

            out = func(*[plain(a) for a in args], **{k: plain(v) for k, v in kwargs.items()})
            if isinstance(out, Tensor) and out.requires_grad:
                for me in ours:
                    me._dp_misuse.append(getattr(func, "__name__", str(func)))
            return out


def _lazy(make: Callable[[], Tensor]) -> Callable[[], Tensor]:
    """``make()`` on first call, the same tensor afterwards."""
    cache: list[Tensor] = []

    def get() -> Tensor:
        if not cache:
            cache.append(make())
        return cache[0]
    return get


#: the largest loss scale: its S^-2, which multiplies the float32 squared norms, stays a normal float32 number
#: with room to spare (from 2**75 on it rounded to 0: every norm read 0 and nothing was clipped); fp16's range
#: needs at most about 2**24
MAX_LOSS_SCALE = 2.0 ** 32


def check_loss_scale(loss_scale: float) -> None:
    """A loss scale is a power of two in [1, 2**32], so dividing by it (and by its square) is exact."""
    ok = isinstance(loss_scale, (int, float)) and not isinstance(loss_scale, bool) and math.isfinite(loss_scale) \
        and 1 <= loss_scale <= MAX_LOSS_SCALE and math.frexp(loss_scale)[0] == 0.5
    if not ok:
        raise ValueError(f"Expected loss_scale={loss_scale!r} as a power of two in [1, 2**32] (e.g. 2**8), so that "
                         "dividing norms and sums by it is exact (fp16 gradients need at most about 2**24; a larger "
                         "scale's inverse square would underflow the float32 norms to 0).")


class _ScaleGrad(torch.autograd.Function):
    """Identity on a model output (16-bit outputs come back as float32) whose backward multiplies the incoming
    gradient by the controller's loss scale (fp16: gradients that would underflow in the backward keep their
    bits). Why privacy does not
    depend on the scale having been applied: the reduction clips each captured per-sample vector v_i at C
    after dividing its norm by S, and divides the sum by S, so each released contribution is
    c_i v_i / S with norm min(|v_i| / S, C) <= C whatever v_i is (docs/DESIGN.md)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, ctl: "GradSampleController") -> Tensor:
        ctx.ctl, ctx.dtype = ctl, x.dtype
        # a 16-bit output is returned in float32: the gradient arriving here is then formed in float32 and
        # scaled before it is rounded to 16 bits (scaled after, it would already have underflowed)
        return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        ctx.ctl._scaled_task = torch._C._current_graph_task_id()
        return (g * ctx.ctl.loss_scale).to(ctx.dtype), None


class _OneGroup(ClippingPolicy):
    """A bare factor function as a one-group policy (tests and tools that bring their own factors)."""

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def factors(self, norms: Tensor) -> Tensor:
        return self.fn(norms[0]).unsqueeze(0)


def _totals(terms: list[list[Tensor]], batch: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(K, B): the sum of each group's (B,) squared-norm terms, in ``dtype`` (one group: one stack, one sum)."""
    if len(terms) == 1 and len(terms[0]) > 1:
        return torch.stack([t.to(dtype) for t in terms[0]]).sum(0, keepdim=True)
    return torch.stack([_total(ts, batch, dtype, device) for ts in terms])


def _total(terms: list[Tensor], batch: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The (B,) sum of a group's squared-norm terms, in ``dtype``."""
    if not terms:
        return torch.zeros(batch, dtype=dtype, device=device)
    if len(terms) == 1:
        return terms[0].to(dtype)
    return torch.stack([t.to(dtype) for t in terms]).sum(0)


def _promote(rec: Record) -> None:
    """Per-sample norms and sums in at least float32, with a and g in one dtype (under autocast a layer's
    input and output gradient may differ): low-precision norms could under-state a sample's norm."""
    work = sum_dtype(rec.g.dtype)
    if rec.g.is_floating_point() and rec.g.dtype != work:
        rec.g = rec.g.to(work)
    if any(isinstance(x, Tensor) and x.is_floating_point() and x.dtype != work for x in rec.args):
        rec.args = tuple(x.to(work) if isinstance(x, Tensor) and x.is_floating_point() else x for x in rec.args)


def _stack_repeated_calls(pending: list[tuple[TrackedLayer, Record]]) -> list[tuple[TrackedLayer, Record]]:
    """Merge the records of a layer called several times in one forward (an RNN's hidden-to-hidden Linear,
    once per time step) into one record: ``a`` and ``g`` stacked along a new dimension 1, (B, K, ...).

    Only for a handler with ``stackable`` (its per-sample gradient sums over every dimension between the
    batch and the features, as Linear's sum_t g_t a_t^T), for checked records with one positional input, no
    keyword arguments and no handler scratch, grouped by layer, shapes and dtypes. The merged record has
    exactly the per-sample gradient of the sum of the calls, so its norm is one Gram (or materialized) step
    instead of K^2 pairwise cross terms in Python, and its clipped sum one GEMM. The originals are released.
    """
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, (tl, rec) in enumerate(pending):
        if tl.handler.stackable and len(rec.args) == 1 and not rec.kwargs and not rec.extra \
                and isinstance(rec.args[0], Tensor) and rec.g is not None:
            a, g = rec.args[0], rec.g
            groups.setdefault((id(tl), a.shape, g.shape, a.dtype, g.dtype), []).append(i)
    merged: dict[int, tuple[TrackedLayer, Record]] = {}
    drop: set[int] = set()
    for idx in groups.values():
        if len(idx) < 2:
            continue
        recs = [pending[i][1] for i in idx]
        rec = Record((torch.stack([r.args[0] for r in recs], 1),), {}, torch.stack([r.g for r in recs], 1))
        for r in recs:
            r.release()
        merged[idx[0]] = (pending[idx[0]][0], rec)
        drop.update(idx[1:])
    if not merged:
        return pending
    return [merged.get(i, p) for i, p in enumerate(pending) if i not in drop]


class _Ahead:
    """Notes the output a layer's forward returned, through a one-shot global forward hook placed first among
    the global hooks (they all run before the layer's own hooks): the capture hook compares it, and its
    version, with the output it is handed. Installed only for a call that some hook runs ahead of the capture
    (see ``GradSampleController._watch_ahead``), never in the common case."""

    NONE: "_Ahead"

    def __init__(self, layer: nn.Module | None) -> None:
        self.layer, self.seen = layer, None
        self.handle = None
        if layer is not None:
            self.handle = torch.nn.modules.module.register_module_forward_hook(self._note, always_call=True)
            _global_forward_hooks.move_to_end(self.handle.id, last=False)

    def _note(self, module: nn.Module, args: Any, out: Any) -> None:
        if module is self.layer and self.seen is None:
            self.seen = (out, out._version if isinstance(out, Tensor) else None)
            self.remove()

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def unchanged(self, out: Any) -> bool:
        self.remove()
        return self.seen is not None and self.seen[0] is out and (
            not isinstance(out, Tensor) or out._version == self.seen[1])


_Ahead.NONE = _Ahead(None)


class _Calls(NamedTuple):
    """What the handler is asked for one record: ``norm_sq`` of ``norm`` (``covered``: the names among them
    whose rows a ``RowPack`` sums, their norms inside a joint form) and ``clipped_sum`` of ``sums``."""

    tl: TrackedLayer
    rec: Record
    norm: list[str]
    covered: list[str]
    sums: list[str]


class GradSampleController(BatchLedger):
    """Drives the per-layer handlers for one module; owns the captured tensors and the clipped sums."""

    def __init__(
        self,
        module: nn.Module,
        *,
        mode: GradSampleMode,
        loss_reduction: LossReduction,
        policy: ClippingPolicy | None = None,
        clip_factors: Callable[[Tensor], Tensor] | None = None,
        loss_scale: float = 1.0,
    ) -> None:
        """``policy`` groups the parameters and turns per-group norms into factors; ``clip_factors`` is a
        shorthand for one group: (B,) norms -> (B,) factors. ``loss_scale`` (a power of two, for fp16):
        gradients entering the model through its outputs are multiplied by it, and norms and sums are
        divided by it again (see ``_ScaleGrad``)."""
        super().__init__()
        check_loss_scale(loss_scale)
        if loss_scale != 1.0 and mode is GradSampleMode.FUSED:
            raise ValueError("loss_scale is not supported with grad_sample_mode='fused' (its kernels clip the "
                             "gradient they read); use grad_sample_mode='bk', or bf16 autocast, which needs no scale.")
        self.module = module
        self.mode = mode
        self.loss_scale = float(loss_scale)
        self._scaled_task: int | None = None  # the graph task whose backward last passed a scaled output
        if (policy is None) == (clip_factors is None):
            raise ValueError("give exactly one of policy= and clip_factors=")
        self.policy = policy if policy is not None else _OneGroup(clip_factors)  # type: ignore[arg-type]
        self.loss_reduction = loss_reduction
        self.layers: list[TrackedLayer] = []
        #: for the fused mode: which layers run on the kernels and which on the bk path (fused.fused_plan)
        self.fused_plan = fused.prepare(module) if mode is GradSampleMode.FUSED else None
        for name, layer, trainable in trainable_layers(module):
            handler = find_handler(layer) or FALLBACK
            if mode is GradSampleMode.FUSED:
                handler = fused.fused_handler(handler)
            self.layers.append(TrackedLayer(name, layer, handler, [n for n, _ in trainable], [p for _, p in trainable]))
        self.params: list[nn.Parameter] = list({id(p): p for tl in self.layers for p in tl.params}.values())
        self._named = [(f"{tl.name}.{n}", p) for tl in self.layers for n, p in zip(tl.names, tl.params)]
        self.param_ids = frozenset(id(p) for p in self.params)
        # A leaf that every tapped output depends on: whether its gradient accumulator runs tells a full
        # ``backward()`` (the training backward) from ``torch.autograd.grad`` (e.g. an input gradient).
        self._anchor = torch.zeros((), requires_grad=True)
        self._anchor_acc = _accumulator(self._anchor)
        self._anchored = False  # a layer call since the last root call already carries the anchor
        self._pending: list[tuple[TrackedLayer, Record]] = []
        self._pending_full: bool | None = None  # the anchor's verdict for the running backward
        self._queued_for: int | None = None
        self._method_cache: dict[tuple[int, tuple[int, ...]], NormMethod] = {}
        self._warned_ghost_cost = False
        self._signatures: dict[type, inspect.Signature | None] = {}
        #: backward passes that were not a full ``backward()`` (``torch.autograd.grad``), dropped
        self.skipped_backwards = 0
        self._warned_unverified = False
        # (K, B) squared per-group norms of the last backward and their scale: the diagnostics ``last_norms``
        # and ``last_group_norms`` are formed from them when read, not in every step
        self._last_sq: Tensor | None = None
        self._last_scale = 1.0
        self._last_norms: tuple[Tensor, Tensor] | None = None
        self._unclipped: dict[nn.Parameter, Tensor] = {}  # sum_i g_i, for policies that need it
        self._swapped: set[int] = set()  # layers whose parameters the pre-hook swapped for this call
        # layers whose clipping groups hold only their own parameters (used by no other layer): with a
        # separable policy (per-layer) they are reduced as soon as their output gradient arrives
        self._own_groups = self._separable_layers() if self.policy.separable else {}
        self._calls: dict[int, int] = {}  # captured calls per layer since the last reduction
        self.early_reductions = 0  # layer calls reduced as soon as their gradient arrived (diagnostics)
        self._staged: dict[nn.Parameter, Tensor] = {}
        self._staged_unclipped: dict[nn.Parameter, Tensor] = {}
        self._staged_sq: Tensor | None = None
        self._staged_sizes: list[tuple[str, tuple[int, ...]]] = []
        # the compiled path's records by sequence number (see ``_capture_op``); an entry goes when the graph
        # that saved its number is freed
        self._ctl_key = next(_CONTROLLER_KEYS)
        _CONTROLLERS[self._ctl_key] = weakref.ref(self)
        weakref.finalize(self, _CONTROLLERS.pop, self._ctl_key, None)
        self._inflight: dict[int, tuple[TrackedLayer, Record]] = {}
        self._handles = [module.register_forward_pre_hook(self._root_pre_hook)]
        # The capture hook is the layer's first forward hook (prepend): it taps the output the layer's forward
        # returned, before a user's forward hook (registered before or after make_private) transforms it. Only a
        # global forward hook or a user hook prepended later can run ahead of it: see ``_Ahead``.
        self._capture_ids: dict[int, int] = {}  # id(tracked layer) -> id of its capture hook's handle
        self._ahead: dict[int, _Ahead] = {}  # layers whose call is watched by an _Ahead right now
        for index, tl in enumerate(self.layers):
            self._handles.append(tl.module.register_forward_pre_hook(self._make_pre_hook(tl)))
            handle = tl.module.register_forward_hook(self._make_hook(tl, index), with_kwargs=True, always_call=True,
                                                     prepend=True)
            self._handles.append(handle)
            self._capture_ids[id(tl)] = handle.id
        if self.loss_scale != 1.0:  # last: a model that is itself a tracked layer is tapped before it is scaled
            self._handles.append(module.register_forward_hook(self._scale_outputs))

    def _separable_layers(self) -> dict[int, bool]:
        users: dict[int, int] = {}
        for tl in self.layers:
            for p in tl.params:
                users[id(p)] = users.get(id(p), 0) + 1
        members: dict[int, set[int]] = {}
        for p in self.params:
            members.setdefault(self.policy.group(p), set()).add(id(p))
        out = {}
        for tl in self.layers:
            own = {id(p) for p in tl.params}
            out[id(tl)] = all(users[i] == 1 for i in own) and all(
                members[self.policy.group(p)] <= own for p in tl.params)
        return out

    # ----------------------------------------------------------------------------------- capture
    def _scale_outputs(self, module: nn.Module, args: tuple, out: Any) -> Any:
        """With a loss scale, every tensor the model returns multiplies its incoming gradient by it."""
        if not (torch.is_grad_enabled() and _capture_on()):
            return None
        if torch.compiler.is_compiling():
            raise PerSampleGradientError("loss_scale is not supported under torch.compile; use bf16 autocast "
                                         "(no loss scale needed) or run the model eagerly.")
        return torch.utils._pytree.tree_map_only(
            Tensor, lambda t: _ScaleGrad.apply(t, self) if t.requires_grad else t, out)

    def _check_scaled(self, task: int | None) -> None:
        """A training backward with a loss scale must have passed through the model's scaled outputs."""
        if self.loss_scale != 1.0 and (task is None or self._scaled_task != task):
            raise PerSampleGradientError(
                f"loss_scale={self.loss_scale:g} multiplies the gradient where it enters the model, at the tensors "
                "the model returns, but this backward reached the model's layers without passing through them "
                "(a loss on an intermediate tensor, or an output type dpengine cannot look into: tensors, tuples, "
                "lists and dicts are). Compute the loss from the model's outputs, or drop loss_scale.")

    def _root_pre_hook(self, module: nn.Module, args: tuple) -> None:
        if torch.is_grad_enabled() and _capture_on():
            self._anchored = False  # the first layer call of this forward carries the anchor

    def _make_pre_hook(self, tl: TrackedLayer) -> Callable:
        def pre_hook(layer: nn.Module, args: tuple) -> None:
            if torch.is_grad_enabled() and _capture_on():
                if not torch.compiler.is_compiling():  # traced calls are checked when the custom op runs
                    _refuse_cuda_graph_capture()
                for n, p in zip(tl.names, tl.params):
                    if layer._parameters.get(n) is not p:
                        raise PerSampleGradientError(
                            f"parameter '{tl.name}.{n}' was replaced after make_private (load_state_dict(..., "
                            "assign=True), or a new nn.Parameter assigned); the private optimizer still holds "
                            "the old one. Load weights with assign=False (it copies into the tracked "
                            "parameters), or call make_private again with a new optimizer and PrivacyEngine.")
                self._swapped.add(id(tl))
                for n, p in zip(tl.names, tl.params):
                    layer._parameters[n] = p.detach()  # alias: same storage, no autograd edge
                if _global_forward_hooks or next(iter(layer._forward_hooks), None) != self._capture_ids[id(tl)]:
                    self._watch_ahead(tl, layer)
        return pre_hook

    def _watch_ahead(self, tl: TrackedLayer, layer: nn.Module) -> None:
        """Forward hooks will run before the capture hook in this call (global ones, or one registered on the
        layer with ``prepend=True`` after make_private): have the output the forward returns noted first, so
        the capture can refuse a call whose output they replaced or modified in place."""
        if torch.compiler.is_compiling():
            raise PerSampleGradientError(
                f"layer '{tl.name}' ({type(layer).__name__}) has forward hooks that run before dpengine's capture (a "
                "global hook from torch.nn.modules.module.register_module_forward_hook, or a hook registered on "
                "the layer with prepend=True after make_private); under torch.compile dpengine cannot check that "
                "they leave the layer's output as it is. Remove them, or register them on the layer without "
                "prepend=True.")
        self._ahead.pop(id(tl), _Ahead.NONE).remove()
        self._ahead[id(tl)] = _Ahead(layer)

    def _positional(self, layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Inputs given by keyword (``lin(input=x)``) moved to their positions, so ``args[0]`` is the input."""
        key = type(layer)
        if key not in self._signatures or "forward" in vars(layer):  # a forward of its own: not the class's
            try:
                sig = inspect.signature(layer.forward)
            except (TypeError, ValueError):
                sig = None
            if "forward" in vars(layer):
                return self._bind(sig, args, kwargs)
            self._signatures[key] = sig
        return self._bind(self._signatures[key], args, kwargs)

    @staticmethod
    def _bind(sig: inspect.Signature | None, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if sig is None:
            return args, kwargs
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError:
            return args, kwargs
        return tuple(bound.args), dict(bound.kwargs)

    def _broadcast_batch(self, args: tuple, out: Tensor) -> int | None:
        """The batch to present a batch-1 call's output at (see ``_BroadcastOutput``): only when the private
        loader says the batch has B > 1 records and the layer's input is a batch-1 *index* tensor (such as
        GPT-2's position ids of shape (1, T)), never a feature computed from a sample."""
        b = self.loader_batch
        a = args[0] if args else None
        if b is None or b <= 1 or self._batch_reduced or not isinstance(a, Tensor) or a.dim() == 0:
            return None
        if a.is_floating_point() or a.is_complex() or a.shape[0] != 1 or out.dim() == 0 or out.shape[0] != 1:
            return None
        return b

    def _make_hook(self, tl: TrackedLayer, index: int) -> Callable:
        def hook(layer: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
            if id(tl) not in self._swapped:
                return None
            self._swapped.discard(id(tl))
            for n, p in zip(tl.names, tl.params):
                layer._parameters[n] = p
            ahead = self._ahead.pop(id(tl), None)
            if ahead is not None and not ahead.unchanged(out):
                raise PerSampleGradientError(
                    f"a forward hook that runs before dpengine's capture changed the output of layer '{tl.name}' "
                    f"({type(layer).__name__}), or dpengine could not check that it left it alone (under "
                    "torch.compile): a global hook (torch.nn.modules.module.register_module_forward_hook) or a hook "
                    "registered on the layer with prepend=True after make_private. dpengine's per-sample rules need "
                    "the gradient of the layer's own output. Register the hook on the layer itself without "
                    "prepend=True (dpengine then captures the output before the hook transforms it), or apply the "
                    "change outside the layer.")
            if not isinstance(out, Tensor):
                raise PerSampleGradientError(
                    f"layer '{tl.name}' ({type(layer).__name__}) returned {type(out).__name__}; dpengine captures "
                    "layers with a single tensor output. Register a handler for this layer type.")
            if kwargs:
                args, kwargs = self._positional(layer, args, kwargs)
            if COMPILED_CAPTURE and torch.compiler.is_compiling() and self._compiled_capture_applies(args, kwargs, out):
                # traced: capture through the opaque custom ops (no graph break; see _capture_op)
                return _capture_op(out, self._ctl_key, index, self._anchor, [x.detach() for x in args])[0]
            # Under torch.compile this body is traced with fake tensors: a `_version` read would be the fake
            # tensor's counter frozen into the graph (a false "modified in place" at the reduction), and
            # `_is_view()` is a graph break. So a traced call keeps its own copy of the inputs instead (the
            # graph is functional, so the copy holds the values the layer read; nothing else can write to
            # it) and a tagged output is a copy. See DESIGN.md, "torch.compile".
            # Eager calls keep the inputs themselves, not detached aliases: every use of a record runs under
            # no_grad (``_reducing``), so no graph is built from them, and the version counter is the same.
            compiling = torch.compiler.is_compiling()
            if compiling:
                args = tuple(x.detach().clone() if isinstance(x, Tensor) else x for x in args)
            copy = tl.handler.output_may_be_saved
            batch = self._broadcast_batch(args, out)
            if batch is not None:
                return self._broadcast(tl, args, kwargs, out, batch)
            lead = self._lead_batch(args, out)
            if lead is not None:
                copy = True  # the output object is replaced by the wrapper: tag a copy, not the value itself
            rec = Record(args, {k: (v.detach() if isinstance(v, Tensor) else v) for k, v in kwargs.items()})
            # autograd no longer saves the input for a weight gradient, so nothing else would notice an
            # in-place change to it before the reduction: remember its version (detach shares the counter)
            if not compiling:
                rec.extra["versions"] = [(i, x._version) for i, x in enumerate(args) if isinstance(x, Tensor)]
                task = torch._C._current_graph_task_id()
                if task != -1:  # called inside a backward: a recomputation (activation checkpointing)
                    rec.extra["forward_task"] = task
            anchor = not self._anchored
            self._anchored = True
            self._calls[id(tl)] = self._calls.get(id(tl), 0) + 1

            if out.requires_grad and not copy and not anchor:
                # the common case (the input needs a gradient): a tensor hook sees g without touching the
                # graph; it fires with the gradient of this value even if it is later modified in place
                out.register_hook(lambda g: self._on_grad(tl, rec, g, tapped=False))
                return None
            # the output does not need a gradient yet (first layer, embedding), or it is the first layer
            # call of this forward and carries the anchor: tag it. A view is copied: tagging it in place
            # would make autograd rebase it (two copies in the backward).
            tapped = _Tap.apply(self._anchor, out, lambda g: self._on_grad(tl, rec, g, tapped=True),
                                copy or compiling or out._is_view())
            if lead is not None:
                return self._lead(tl, args, kwargs, out, tapped, lead)
            return tapped
        return hook

    @staticmethod
    def _compiled_capture_applies(args: tuple, kwargs: dict, out: Tensor) -> bool:
        """Whether a traced layer call is captured by the custom ops: tensor inputs only, and not an index
        lookup that the eager path may present as a ``_BroadcastOutput`` (a batch-1 or rank-1 integer input;
        decided from shapes alone, so the loader's batch size is not read, and not guarded on, while
        tracing). Other calls take the eager path's code, which breaks the graph."""
        if kwargs or not args or not all(isinstance(x, Tensor) for x in args):
            return False
        a = args[0]
        if a.is_floating_point() or a.is_complex():
            return True
        if a.dim() == 1 and out.dim() >= 2:
            return False
        return not (a.dim() > 0 and a.shape[0] == 1 and out.dim() > 0 and out.shape[0] == 1)

    def _open_record(self, index: int, args: list[Tensor]) -> Tensor:
        """Run time, forward of ``_capture_op``: file a record of this call (a copy of its inputs) under a new
        sequence number, returned as a CPU scalar tensor that the graph saves for the backward."""
        _refuse_cuda_graph_capture()
        tl = self.layers[index]
        self._calls[id(tl)] = self._calls.get(id(tl), 0) + 1
        s = next(_SEQ)
        self._inflight[s] = (tl, Record(tuple(a.clone() for a in args), {}))
        seq = torch.tensor(s)
        weakref.finalize(seq, self._inflight.pop, s, None)  # no backward (or graph freed): forget the record
        return seq

    def _file_grad(self, seq: int, g: Tensor) -> None:
        """Run time, backward of ``_capture_op``: the output gradient of record ``seq``, handed on as the
        eager tap does (the anchor is an input of every captured call, so ``tapped``)."""
        entry = self._inflight.get(seq)
        if entry is None:
            raise PerSampleGradientError(
                "dpengine's compiled capture received an output gradient for a layer call it has no record of; "
                "per-sample gradients cannot be formed. Please report this with the model.")
        tl, rec = entry
        self._on_grad(tl, rec, g.clone(), tapped=True)

    def _lead_batch(self, args: tuple, out: Tensor) -> int | None:
        """The batch to offer a rank-1 index lookup's output at (``_BroadcastOutput`` with ``lead``): only
        when the private loader's batch is known."""
        b = self.loader_batch
        a = args[0] if args else None
        if b is None or self._batch_reduced or not isinstance(a, Tensor) or a.dim() != 1 or out.dim() < 2:
            return None
        return None if a.is_floating_point() or a.is_complex() else b

    def _lead(self, tl: TrackedLayer, args: tuple, kwargs: dict, out: Tensor, tapped: Tensor, batch: int) -> Tensor:
        """Wrap a rank-1 index lookup's (already tapped, per-sample-over-dimension-0) output so that a
        broadcast over a new leading batch dimension gets a per-sample twin instead (see ``_BroadcastOutput``)."""
        misuse: list[str] = []
        summed = Record(args, {}, extra={"summed": misuse})
        base = out.detach()
        ids = args[0]

        def make_twin() -> Tensor:
            self._calls[id(tl)] = self._calls.get(id(tl), 2) + 2  # two records now: never reduced early
            rec = Record((ids.unsqueeze(0).expand(batch, *ids.shape), *args[1:]), kwargs)
            rec.extra["versions"] = [(0, ids._version)]
            return _Tap.apply(self._anchor, base.unsqueeze(0).expand(batch, *base.shape),
                              lambda g: self._on_grad(tl, rec, g, tapped=True), True)

        def lift(t: Tensor) -> Tensor:
            self._calls[id(tl)] = self._calls.get(id(tl), 2) + 2
            return _Tap.apply(self._anchor, t, lambda g: self._on_grad(tl, summed, g, tapped=True), True)

        return _BroadcastOutput.wrap(tapped, _lazy(make_twin), batch, misuse, lead=True, lift=lift)

    def _broadcast(self, tl: TrackedLayer, args: tuple, kwargs: dict, out: Tensor, batch: int) -> Tensor:
        """Present a batch-1 output (position ids of shape (1, T)) as ``_BroadcastOutput``: per-sample
        gradients through the broadcasts against the batch, refusal for any other use."""
        self._anchored = True
        self._calls[id(tl)] = self._calls.get(id(tl), 2) + 2  # never reduced early
        misuse: list[str] = []
        summed = Record(args, {}, extra={"summed": misuse})
        base = out.detach()  # the twin's values, without the plain output's tap
        ids = args[0]
        plain = _Tap.apply(self._anchor, out, lambda g: self._on_grad(tl, summed, g, tapped=True), out._is_view())

        def make_twin() -> Tensor:
            rec = Record((ids.expand(batch, *ids.shape[1:]), *args[1:]), kwargs)
            rec.extra["versions"] = [(0, ids._version)]
            # a fresh (B, ...) tensor: tagging an expanded view in place would route g through its base
            return _Tap.apply(self._anchor, base.expand(batch, *base.shape[1:]),
                              lambda g: self._on_grad(tl, rec, g, tapped=True), True)
        return _BroadcastOutput.wrap(plain, _lazy(make_twin), batch, misuse)

    def _on_grad(self, tl: TrackedLayer, rec: Record, g: Tensor, tapped: bool) -> None:
        rec.g = g
        rec.extra["g_version"] = g._version
        task = torch._C._current_graph_task_id()
        if rec.extra.pop("forward_task", task) != task:
            # the layer ran inside one backward and its gradient arrives in another, nested one: reentrant
            # activation checkpointing recomputes a segment in the backward and runs a backward of its own over
            # it, which dpengine would clip as a second backward of the batch
            raise PerSampleGradientError(
                f"layer '{tl.name}' ({type(tl.module).__name__}) was recomputed inside a backward and its gradient "
                "came from a nested backward pass: reentrant activation checkpointing "
                "(torch.utils.checkpoint.checkpoint(..., use_reentrant=True), the default of older torch and of "
                "some libraries' gradient_checkpointing_enable()). It runs a separate backward per checkpointed "
                "segment, which dpengine would clip on its own, so a sample could contribute more than "
                "max_grad_norm. Use torch.utils.checkpoint.checkpoint(..., use_reentrant=False) (exact with "
                "dpengine; in transformers: gradient_checkpointing_enable(gradient_checkpointing_kwargs="
                "{'use_reentrant': False})).")
        if self._queued_for != task:  # first tap of this backward
            self._pending = []  # drop what an earlier backward that raised left behind
            self._clear_staged()
            self._pending_full = None
            self._queued_for = task
            torch.autograd.Variable._execution_engine.queue_callback(self._reduce_pending)
        if tapped and self._pending_full is None:  # the anchor is in this graph: ask whether it runs
            self._pending_full = _full_backward(self._anchor_acc)
        if self._own_groups.get(id(tl)) and self._calls.get(id(tl)) == 1:
            # not in a pass known to be torch.autograd.grad: its record would be released, and a retained
            # graph's training backward would then find it empty (the pass's sums are dropped anyway)
            full = self._pending_full if self._pending_full is not None else _full_backward(self._anchor_acc)
            if full is not False:
                self._reduce_early(tl, rec)
                return
        self._pending.append((tl, rec))

    def _clear_staged(self) -> None:
        self._staged, self._staged_unclipped = {}, {}
        self._staged_sq, self._staged_sizes = None, []

    # ----------------------------------------------------------------------------------- reduce
    def _method(self, tl: TrackedLayer, rec: Record) -> NormMethod:
        if self.mode is GradSampleMode.GHOST:
            if tl.handler.has_gram and not self._warned_ghost_cost:
                self._warn_ghost_cost(tl, rec)
            return NormMethod.GRAM if tl.handler.has_gram else NormMethod.MATERIALIZE
        key = (id(tl), tuple(rec.g.shape[1:]))
        if key not in self._method_cache:  # BK: chosen per layer by cost, cached per shape
            use_gram = tl.handler.has_gram and tl.handler.prefers_gram(tl.module, rec)
            self._method_cache[key] = NormMethod.GRAM if use_gram else NormMethod.MATERIALIZE
        return self._method_cache[key]

    def _warn_ghost_cost(self, tl: TrackedLayer, rec: Record) -> None:
        """Once per model: ghost's Gram form over many positions (a convolution at 32x32) costs far more
        than materializing the layer's per-sample gradient, which bk would pick."""
        ratio = tl.handler.gram_flop_ratio(tl.module, rec)
        if ratio is not None and ratio > GHOST_COST_WARNING:
            self._warned_ghost_cost = True
            warnings.warn(
                f"grad_sample_mode='ghost': the Gram-form norm of layer '{tl.name}' ({type(tl.module).__name__}, "
                f"{rec.g.shape[0]} samples) costs about {ratio:.0f}x the FLOPs of materializing its per-sample "
                "gradient. grad_sample_mode='bk' (the default) picks the cheaper form per layer; ghost only saves "
                "memory here.", stacklevel=4)

    def _reduce_pending(self) -> None:
        pending, full, task = self._pending, self._pending_full, self._queued_for
        self._pending, self._queued_for, self._pending_full = [], None, None
        self._calls = {}
        if not pending and not self._staged_sizes:
            return
        if full is False:
            # torch.autograd.grad (an input gradient, a penalty term) or backward(inputs=...): not the
            # training backward. Its captures never reach the update; they are simply dropped.
            self.skipped_backwards += 1
            self._clear_staged()
            return
        self._check_scaled(task)
        with _reducing():
            self._reduce(pending)

    def _check_batch(self, seen: list[tuple[str, tuple[int, ...]]]) -> int:
        """The batch size of this backward, checked against the batch the private loader yielded.
        ``seen``: (layer name, shape of its output gradient) for every record of the backward; dimension 0
        must be the batch. An error names the offending layers and their shapes first, then the fix."""

        def odd_ones(batch: int) -> str:
            odd = list(dict.fromkeys((name, shape) for name, shape in seen if shape[0] != batch))
            return ", ".join(f"'{name}' saw {shape[0]} (output shape {tuple(shape)})" for name, shape in odd[:3]) + \
                (f" and {len(odd) - 3} more" if len(odd) > 3 else "")

        ahead = self.drawn_ahead
        expected = self._count_loader_batch()
        if expected is not None:
            if ahead is not None and ahead != expected and all(shape[0] == ahead for _, shape in seen):
                raise PerSampleGradientError(
                    f"this backward's batch has {ahead} records, the size of the batch drawn before the last one, "
                    f"while the private data loader has since yielded another ({expected} records) that no backward "
                    "has reduced yet: a loop that draws the next batch before this one's backward and step (a "
                    "prefetching data fetcher such as Lightning's or accelerate's, or next(loader) ahead of the "
                    "step). dpengine checks each backward against the batch yielded last and releases one batch "
                    "per step: iterate the loader returned by make_private directly, drawing the next batch after "
                    "optimizer.step().")
            if any(shape[0] != expected for _, shape in seen):
                raise PerSampleGradientError(
                    f"{odd_ones(expected)}, but the private data loader yielded a batch of {expected} records: "
                    "per-sample gradients would mix samples. dpengine needs the batch as dimension 0 of every "
                    "tracked layer's input: a model that is time-major ((T, B, d): use batch_first=True), folds "
                    "the batch into another dimension ((B, K, d) -> (B*K, d)), splits the batch into micro-batches "
                    "inside its forward, or runs a batch-1 float tensor through a layer cannot be trained "
                    "privately as it is; expand tensors shared by all samples to the batch (x.expand(B, ...)) "
                    "before the layer.")
            return expected
        sizes = {shape[0] for _, shape in seen}
        if len(sizes) != 1:
            common = max(sizes, key=lambda b: sum(1 for _, shape in seen if shape[0] == b))
            raise PerSampleGradientError(
                f"{odd_ones(common)}, while the other tracked layers saw a batch of {common}: per-sample "
                "gradients are ill-defined. Every tracked layer must take inputs with the batch as dimension 0: "
                "use batch_first=True for a sequence-first model, expand a tensor shared by all samples to the "
                "batch (x.expand(B, ...)) before the layer, and iterate the loader returned by make_private so "
                "the batch size is known.")
        if not self._warned_unverified:
            self._warned_unverified = True
            warnings.warn(
                "This backward's batch did not come from the data loader returned by make_private, so dpengine "
                "could only check that the tracked layers agree on dimension 0, not that it is the batch (a "
                "time-major or batch-folding model would be clipped wrongly). Iterate the returned loader (or "
                "dpengine.VirtualSteps over it).", stacklevel=2)
        return sizes.pop()

    def _check_record(self, tl: TrackedLayer, rec: Record) -> None:
        if "summed" in rec.extra:
            ops = ", ".join(dict.fromkeys(rec.extra["summed"])) or "an op dpengine cannot see"
            raise PerSampleGradientError(
                f"layer '{tl.name}' ({type(tl.module).__name__}) was called with a batch-1 input and its output "
                f"was used other than by broadcasting it against the batch ({ops}), so its gradient is summed "
                "over the samples and per-sample gradients cannot be formed. Expand its input to the batch "
                "before the call (ids.expand(B, -1)).")
        if any(rec.args[i]._version != v for i, v in rec.extra.pop("versions", [])) or \
                rec.g._version != rec.extra.pop("g_version", rec.g._version):
            raise PerSampleGradientError(
                f"the input of layer '{tl.name}' ({type(tl.module).__name__}) was modified in place after the "
                "layer used it, so its per-sample gradients cannot be formed. Use an out-of-place operation "
                "(x = x + 1 rather than x += 1) on tensors that a tracked layer has read.")
        if not getattr(tl.handler, "takes_low_precision", False):  # fused kernels accumulate in fp32 themselves
            _promote(rec)

    def _reduce_early(self, tl: TrackedLayer, rec: Record) -> None:
        """Per-layer clipping of a layer whose groups are its own: its factors need only its own norms, so
        its clipped sums are formed as soon as its output gradient arrives, and its captured input and
        gradient are freed at once (peak memory: one layer's buffers). The sums are staged until the end
        of the backward, which checks the batch and commits them (or drops them for autograd.grad)."""
        self.early_reductions += 1
        self._check_scaled(torch._C._current_graph_task_id())  # never an autograd.grad pass (see _on_grad)
        with _reducing():
            self._check_record(tl, rec)
            b = rec.g.shape[0]
            self._staged_sizes.append((tl.name, tuple(rec.g.shape)))
            if b > 0:
                if self._staged_sq is not None and self._staged_sq.shape[1] != b:
                    self._check_batch(self._staged_sizes)  # raises: layers disagree on the batch
                done = self._reduce_fused(tl, rec, b) if self.mode is GradSampleMode.FUSED else None
                sq = done if done is not None else self._norms_and_sums(
                    [(tl, rec)], b, self._staged, self._staged_unclipped)
                self._staged_sq = sq if self._staged_sq is None else self._staged_sq + sq
            for p in tl.params:
                self._staged.setdefault(p, torch.zeros_like(p, dtype=sum_dtype(p.dtype)))
            rec.release()

    def _reduce_fused(self, tl: TrackedLayer, rec: Record, batch: int) -> Tensor | None:
        """Per-layer clipping of a fused linear layer in one kernel launch pair (fused.reduce_layer); None
        where it does not apply. Stages the sums and returns the (K, B) squared norms."""
        scale = float(batch) if self.loss_reduction is LossReduction.MEAN else 1.0
        if self.policy.needs_unclipped:
            return None
        done = fused.reduce_layer(tl.handler, tl.module, rec, tl.names, tl.params, self.policy,
                                  self._method(tl, rec), scale, self.output_scale)
        if done is None:
            return None
        sq, sums = done
        for p, t in sums.items():
            accumulate(self._staged, p, t)
        return sq

    def _reduce(self, pending: list[tuple[TrackedLayer, Record]]) -> None:
        staged, staged_u, staged_sq = self._staged, self._staged_unclipped, self._staged_sq
        seen = self._staged_sizes + [(tl.name, tuple(rec.g.shape)) for tl, rec in pending]
        self._clear_staged()
        batch = self._check_batch(seen)
        self.check_no_leak(self._named)
        for tl, rec in pending:
            self._check_record(tl, rec)
        for into, part, buckets in ((self._summed, staged, self.sum_buckets), (self._unclipped, staged_u, None)):
            for p, t in part.items():
                accumulate(into, p, t, buckets)
        if batch == 0:  # an empty Poisson batch: nothing to clip, the step still adds noise
            self._note_last(torch.zeros(self.policy.num_groups, 0), 1.0)
            for tl, _ in pending:
                for p in tl.params:
                    if p not in self._summed:
                        accumulate(self._summed, p, torch.zeros_like(p, dtype=sum_dtype(p.dtype)), self.sum_buckets)
            self.batches_accumulated += 1
            return
        sq = self._norms_and_sums(pending, batch, self._summed, self._unclipped) if pending else None
        sq = staged_sq if sq is None else (sq if staged_sq is None else sq + staged_sq)
        scale = float(batch) if self.loss_reduction is LossReduction.MEAN else 1.0
        self._note_last(sq, scale)
        self.note_nonfinite(nonfinite_flag(sq))  # every group of every record, staged ones included
        self.batches_accumulated += 1

    def _note_last(self, sq: Tensor, scale: float) -> None:
        self._last_sq, self._last_scale, self._last_norms = sq, scale, None

    def _last(self) -> tuple[Tensor, Tensor] | None:
        if self._last_norms is None and self._last_sq is not None:
            with torch.no_grad():
                sq, scale = self._last_sq, self._last_scale
                self._last_norms = (sq.sum(0).sqrt() * scale, sq.sqrt() * scale)
        return self._last_norms

    @property
    def last_norms(self) -> Tensor | None:
        """(B,) each sample's whole-gradient norm in the last backward (None before the first)."""
        last = self._last()
        return None if last is None else last[0]

    @property
    def last_group_norms(self) -> Tensor | None:
        """(K, B) each sample's norm per clipping group in the last backward (None before the first)."""
        last = self._last()
        return None if last is None else last[1]

    def _norms_and_sums(self, pending: list[tuple[TrackedLayer, Record]], batch: int,
                        into: dict[nn.Parameter, Tensor], into_unclipped: dict[nn.Parameter, Tensor]) -> Tensor:
        """Per-group squared norms of these records' per-sample gradients, the policy's factors, and the
        clipped (and, if the policy needs them, unclipped) sums accumulated into ``into``. Returns (K, B)
        squared norms (of the summed-loss gradients)."""
        # mean reduction: autograd's g is (1/B) * per-sample g; scale norms and factors, not tensors.
        scale = float(batch) if self.loss_reduction is LossReduction.MEAN else 1.0
        group = self.policy.group
        pending = _stack_repeated_calls(pending)

        uses: dict[nn.Parameter, list[tuple[TrackedLayer, Record, str]]] = {}
        for tl, rec in pending:
            for n, p in zip(tl.names, tl.params):
                uses.setdefault(p, []).append((tl, rec, n))
        ref = pending[0][1].g
        work = sum_dtype(ref.dtype)
        # (B,) squared-norm terms per group, added up once at the end (one stack and one sum per group,
        # not a read-modify-write of a (K, B) buffer per parameter)
        terms: list[list[Tensor]] = [[] for _ in range(self.policy.num_groups)]
        direct: dict[tuple[int, int], tuple[TrackedLayer, Record, list[str]]] = {}  # reduced by the handler
        materialized: dict[nn.Parameter, Tensor] = {}  # summed per-sample gradients (hooks, or no factors)
        for p, us in uses.items():
            if self.mode is not GradSampleMode.HOOKS and len(us) > 1:
                facs = [tl.handler.factors(tl.module, rec, n) for tl, rec, n in us]
                if all(f is not None for f in facs):
                    # ||sum_u G_u||^2 = sum_u ||G_u||^2 + 2 sum_{u<v} <G_u, G_v>, never materialized
                    for i in range(len(facs)):
                        for j in range(i):
                            terms[group(p)].append(2 * cross_term(facs[i], facs[j]))
                    for tl, rec, n in us:
                        direct.setdefault((id(tl), id(rec)), (tl, rec, []))[2].append(n)
                    continue
            if self.mode is GradSampleMode.HOOKS or len(us) > 1:
                for tl, rec, n in us:
                    ps = tl.handler.per_sample(tl.module, rec, [n])[n]
                    materialized[p] = materialized[p] + ps if p in materialized else ps
                terms[group(p)].append(row_sq(materialized[p]))
                continue
            tl, rec, n = us[0]
            direct.setdefault((id(tl), id(rec)), (tl, rec, []))[2].append(n)
        direct, packs = self._pack_rows(direct, batch)
        for tl, rec, names, covered, _ in direct.values():
            if not names:
                continue
            joint = self._joint_group(tl, names)
            kw = {"joint": True} if joint is not None else {}
            got = tl.handler.norm_sq(tl.module, rec, names, self._method(tl, rec), **kw)
            if JOINT not in got and any(n not in got for n in covered):
                raise RuntimeError(f"internal: {type(tl.handler).__name__}.norm_sq left out the norm of a "
                                   "parameter it said its joint norm covers (row_params)")
            for n, t in got.items():
                terms[joint if n == JOINT else group(tl.params[tl.names.index(n)])].append(t)
        for (k, _, _), pack in packs.items():
            t = pack.norm_sq()
            if t is not None:
                terms[k].append(t)
        sq = _totals(terms, batch, work, ref.device)  # (K, B)
        if self.loss_scale != 1.0:  # g was S times the gradient: S^-2 (exact, a power of two) in the norms,
            sq = sq * (self.loss_scale ** -2)  # S^-1 in the factors below

        norms = sq.sqrt() * scale  # (K, B)
        # a non-finite norm is flagged on the device, never read here (a host sync): the optimizer makes the
        # step a no-op on the device and raises at the next step()/zero_grad() (docs/DESIGN.md)
        # (K, B): factor per group and sample, times the mean-reduction scale and the output scale (1 / expected
        # batch size for a mean-reduced loss), so no pass over the summed gradients is needed later
        c = self.policy.factors(norms) * (scale * self.output_scale / self.loss_scale)
        self._weighted_sums(direct, materialized, packs, c, into)
        if self.policy.needs_unclipped:  # one more weighted GEMM from the same captured tensors
            ones = torch.full_like(c, scale * self.output_scale / self.loss_scale)
            self._weighted_sums(direct, materialized, packs, ones, into_unclipped)
        return sq

    def _joint_group(self, tl: TrackedLayer, names: list[str]) -> int | None:
        """The clipping group of ``names`` when the handler may return their joint norm (``joint_norms``:
        several names, all in one group), else None."""
        if not tl.handler.joint_norms or len(names) < 2:
            return None
        ks = {self.policy.group(tl.params[tl.names.index(n)]) for n in names}
        return ks.pop() if len(ks) == 1 else None

    def _pack_rows(self, direct: dict[tuple[int, int], tuple[TrackedLayer, Record, list[str]]], batch: int
                   ) -> tuple[dict[tuple[int, int], _Calls], dict[tuple[int, torch.dtype, torch.device], RowPack]]:
        """Collect the parameters whose per-sample rows the handlers form anyway (``row_params``) into one
        ``RowPack`` per clipping group, dtype and device where that saves operators, and have them written.
        Returns, per record, what is left for the handler's ``norm_sq`` and ``clipped_sum``, and the packs."""
        group = self.policy.group
        candidates: dict[tuple[int, torch.dtype, torch.device], RowPack] = {}
        if self.mode is not GradSampleMode.HOOKS:  # the reference path materializes every parameter alone
            for tl, rec, names in direct.values():
                joint = self._joint_group(tl, names) is not None
                for n, norm in tl.handler.row_params(tl.module, rec, names, self._method(tl, rec), joint).items():
                    p = tl.params[tl.names.index(n)]
                    candidates.setdefault((group(p), rec.g.dtype, rec.g.device), RowPack()).add(tl, rec, n, p, norm)
        packs = {key: pack for key, pack in candidates.items() if pack.worth_it()}
        packed = {(id(e.rec), e.name): e.norm for pack in packs.values() for e in pack.entries}
        for (_, dtype, device), pack in packs.items():
            pack.write(batch, dtype, device)  # before any norm_sq, which may release a record
        out = {}
        for key, (tl, rec, names) in direct.items():
            mine = {n: packed[(id(rec), n)] for n in names if (id(rec), n) in packed}
            out[key] = _Calls(tl, rec, norm=[n for n in names if not mine.get(n, False)],
                              covered=[n for n, norm in mine.items() if not norm],
                              sums=[n for n in names if n not in mine])
        return out, packs

    def _weighted_sums(self, direct: dict[tuple[int, int], _Calls], materialized: dict[nn.Parameter, Tensor],
                       packs: dict[tuple[int, torch.dtype, torch.device], RowPack], c: Tensor,
                       into: dict[nn.Parameter, Tensor]) -> None:
        """sum_i c[group, i] * grad_i for every parameter, accumulated into ``into``. A parameter's first
        contribution is offered its slot of the sum buckets as ``out=``: a handler that writes it there saves
        a copy."""
        group = self.policy.group
        buckets = self.sum_buckets if into is self._summed else None
        rows = c.unbind(0)  # (B,) factors per group: one op, not an index per layer
        for (k, _, _), pack in packs.items():
            accumulate_pieces(into, pack.sums(rows[k]), buckets)
        for tl, rec, _, _, names in direct.values():
            by_group: dict[int, list[str]] = {}
            for n in names:
                by_group.setdefault(group(tl.params[tl.names.index(n)]), []).append(n)
            for k, ns in by_group.items():
                out = {}
                if buckets is not None:
                    for n in ns:
                        p = tl.params[tl.names.index(n)]
                        slot = None if p in into else buckets.slot(p, sum_dtype(p.dtype))
                        if slot is not None:
                            out[n] = slot
                for n, t in tl.handler.clipped_sum(tl.module, rec, ns, rows[k], out=out or None).items():
                    accumulate(into, tl.params[tl.names.index(n)], t, buckets)
        for p, ps in materialized.items():
            slot = None if buckets is None or p in into else buckets.slot(p, sum_dtype(p.dtype))
            accumulate(into, p, weighted_sum(ps, rows[group(p)], out=slot), buckets)

    # ----------------------------------------------------------------------------------- optimizer side
    def pop_unclipped_sums(self) -> dict[nn.Parameter, Tensor]:
        """The unclipped sums (policies with ``needs_unclipped``) since the last pop, in the same scale."""
        out, self._unclipped = self._unclipped, {}
        return out

    def clear(self) -> None:
        super().clear()
        self.policy.discard()  # a per-step statistic of the dropped sums (adaptive clipping's count) goes too
        self._unclipped = {}
        self._clear_staged()
        self._calls = {}
        self._pending = []

    def detach(self) -> None:
        """Remove every hook; the module is left as it was before ``make_private``."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()
