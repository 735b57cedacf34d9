"""``grad_sample_mode="fused"``: Triton kernels for the layers they cover, the bk path for the rest.

Covered: ``nn.Linear`` and transformers' GPT-2 ``Conv1D`` (any input rank). For these, the weight's
per-sample norms (Gram or materialized form, chosen per layer by FLOPs) and its clipped sum are
computed by the kernels of ``dpengine.kernels`` straight from the captured bf16/fp16/fp32 ``a`` and
``g`` with fp32 accumulation: no Gram matrix, per-sample gradient or scaled copy of ``g`` is written.
With per-layer clipping, a layer whose groups are its own is clipped by ``fused_clip`` (norms, factors
and sum in one launch pair) as soon as its output gradient arrives. Biases (a (B, p) token sum) and the
cross terms of tied weights stay on the exact torch path.

Everything else (embeddings, convolutions, norm layers, the torch.func fallback) runs the bk handlers,
and ``fused_plan`` says so layer by layer; ``make_private`` warns with the list (``FusedFallbackWarning``).

Where it runs: on CUDA, the compiled kernels. Without CUDA, only under Triton's interpreter
(``TRITON_INTERPRET=1`` set before ``triton`` is imported: CI runs the kernels this way); otherwise, and
without Triton, choosing the mode raises an error that points to ``"bk"``.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .ledger import sum_dtype
from .linear import GPT2Conv1DHandler, LinearHandler, _LinearLike, _positions, _token_sum
from .registry import (LayerHandler, NormMethod, OuterFactors, PerSampleGradientError, Record, flatten_tokens,
                       rank_one_norm_sq, row_sq, token_pad)


class FusedFallbackWarning(UserWarning):
    """Some layers of a ``grad_sample_mode="fused"`` model run on the bk path (see ``fused_plan``)."""


def check_runtime() -> None:
    """Raise a RuntimeError saying what is missing if the fused kernels cannot run here."""
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError('grad_sample_mode="fused" needs Triton, which is not installed: pip install '
                           '"dpengine[cuda]" on a CUDA machine, or use grad_sample_mode="bk" (the same clipping '
                           'with torch kernels).')
    from dpengine.kernels._common import INTERPRET

    if not torch.cuda.is_available() and not INTERPRET:
        raise RuntimeError('grad_sample_mode="fused" runs compiled Triton kernels on a CUDA GPU, and none is '
                           'available. Use grad_sample_mode="bk" (the same clipping with torch kernels); to test '
                           'the kernels on the CPU, set TRITON_INTERPRET=1 before triton is imported (slow).')


def _kernels() -> Any:
    from dpengine.kernels import clipped_sum, fused_clip, linear_norms

    return linear_norms, clipped_sum, fused_clip


def _kernel_dtype(a: Tensor, g: Tensor) -> torch.dtype:
    """One dtype for both operands. Under autocast a linear layer multiplies in bf16/fp16 even when its
    captured input is fp32 (a LayerNorm output), and its gradient g is bf16/fp16: the layer's own weight
    gradient is then g^T bf16(a), so the fp32 operand is rounded as the layer itself rounded it. Any
    other mix is promoted."""
    low = {torch.float16, torch.bfloat16}
    if a.dtype in low and g.dtype == torch.float32:
        return a.dtype
    if g.dtype in low and a.dtype == torch.float32:
        return g.dtype
    return torch.promote_types(a.dtype, g.dtype)


class _FusedLinearLike(_LinearLike):
    """A linear handler whose weight norms and clipped sums are Triton kernels.

    Norms and sums are both computed from the same (possibly bf16) operands with fp32 accumulation, so each
    sample's released contribution has norm at most C up to fp32 rounding, as on the torch path.
    """

    #: the controller passes the captured a and g as they are (no promotion to fp32)
    takes_low_precision = True
    fused = True
    joint_norms = False  # the weight norm is a kernel of its own; the bias norm is one small reduction

    def _operands(self, rec: Record) -> tuple[Tensor, Tensor]:
        """(B, T, d) inputs and (B, T, p) output gradients in one kernel dtype."""
        a, g = flatten_tokens(rec.a), flatten_tokens(rec.g)
        dt = _kernel_dtype(a, g)
        a, g = a.to(dt), g.to(dt)
        from dpengine.kernels._common import INTERPRET

        if not INTERPRET and not a.is_cuda:
            raise PerSampleGradientError(
                f'grad_sample_mode="fused" runs its kernels on CUDA tensors; this layer ran on {a.device}. Move '
                'the model and batches to the GPU, or use grad_sample_mode="bk".')
        return a, g

    @staticmethod
    def _promoted(x: Tensor) -> Tensor:
        return x.to(sum_dtype(x.dtype))

    def _rows_cols(self, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """The weight's (rows, cols) operands: (g, a) for Linear's (out, in), (a, g) for Conv1D's (in, out)."""
        return (a, g) if self.transposed else (g, a)

    def row_params(self, layer: nn.Module, rec: Record, names: list[str], method: NormMethod,
                   joint: bool) -> dict[str, bool]:
        return {}  # g may be 16-bit here: the bias is promoted and reduced on its own (norm_sq, clipped_sum)

    def prefers_gram(self, layer: nn.Module, rec: Record) -> bool:
        # Neither kernel writes anything per sample, so memory no longer decides: FLOPs do. Per sample the
        # Gram form costs T^2 (d + p), the materialized form T p d.
        t, p, d = _positions(rec), rec.g.shape[-1], rec.a.shape[-1]
        return t * (p + d) < p * d

    def per_sample(self, layer: nn.Module, rec: Record, names: list[str]) -> dict[str, Tensor]:
        # the materializing paths (hooks-style reference, several uses of a parameter without factors)
        saved = rec.args, rec.g
        rec.args = (self._promoted(rec.a), *rec.args[1:])
        rec.g = self._promoted(rec.g)
        try:
            return super().per_sample(layer, rec, names)
        finally:
            rec.args, rec.g = saved

    def factors(self, layer: nn.Module, rec: Record, name: str) -> OuterFactors | None:
        # cross terms of tied weights run in torch (registry.cross_term): in at least fp32
        f = super().factors(layer, rec, name)
        return None if f is None else OuterFactors(self._promoted(f.left), self._promoted(f.right))

    def norm_sq(self, layer: nn.Module, rec: Record, names: list[str], method: NormMethod) -> dict[str, Tensor]:
        linear_norms = _kernels()[0]
        out: dict[str, Tensor] = {}
        if "weight" in names:
            a, g = self._operands(rec)
            if a.shape[1] == 1:  # one token: ||g a^T|| = ||g|| ||a||, exact and O(B (p + d))
                out["weight"] = rank_one_norm_sq(self._promoted(a), self._promoted(g))
            elif method is NormMethod.GRAM:
                out["weight"] = linear_norms.gram_norm_sq(a, g, token_pad(a, g))
            else:
                out["weight"] = linear_norms.materialized_norm_sq(a, g)
        if "bias" in names:
            out["bias"] = row_sq(_token_sum(self._promoted(flatten_tokens(rec.g))))
        return out

    def clipped_sum(self, layer: nn.Module, rec: Record, names: list[str], c: Tensor,
                    out: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        # ``out`` is not used: the kernel writes its own float32 result (the controller copies it in)
        clipped_sum = _kernels()[1]
        out: dict[str, Tensor] = {}
        if "weight" in names:
            x, y = self._rows_cols(*self._operands(rec))
            out["weight"] = clipped_sum.clipped_sum(x, y, c)
        if "bias" in names:
            g = self._promoted(flatten_tokens(rec.g))
            out["bias"] = c.to(g.dtype) @ _token_sum(g)
        return out


class FusedLinearHandler(_FusedLinearLike, LinearHandler):
    """``nn.Linear`` on the fused kernels."""


class FusedConv1DHandler(_FusedLinearLike, GPT2Conv1DHandler):
    """transformers' GPT-2 ``Conv1D`` on the fused kernels."""


_FUSED_FOR: dict[type, LayerHandler] = {LinearHandler: FusedLinearHandler(), GPT2Conv1DHandler: FusedConv1DHandler()}


def fused_handler(handler: LayerHandler) -> LayerHandler:
    """The fused counterpart of a bk handler, or the handler itself when no kernel covers its layers."""
    return _FUSED_FOR.get(type(handler), handler)


@dataclass(frozen=True)
class PlanEntry:
    name: str  # the layer's qualified name in the model
    layer_type: str
    backend: str  # "fused" or "bk"
    why: str


_BK_WHY = {
    "EmbeddingHandler": "embedding: the bk segment sum already reads g once (sort + index_add); a kernel "
                        "would save no memory traffic",
}


def fused_plan(module: nn.Module) -> list[PlanEntry]:
    """Which trainable layers of ``module`` run on the fused kernels and which on the bk path, and why.

    >>> [(e.name, e.backend) for e in fused_plan(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))]
    [('0', 'fused'), ('1', 'bk')]
    """
    from .controller import trainable_layers
    from .functorch import FALLBACK
    from .registry import find_handler

    out = []
    for name, layer, _ in trainable_layers(module):
        handler = find_handler(layer) or FALLBACK
        kind = type(layer).__name__
        if getattr(fused_handler(handler), "fused", False):
            out.append(PlanEntry(name, kind, "fused", "weight norms and clipped sum by Triton kernels; bias by torch"))
        else:
            hname = type(handler).__name__
            why = _BK_WHY.get(hname, f"no fused kernel for {kind} ({hname}); see docs/DESIGN.md, 'Fused kernels'")
            out.append(PlanEntry(name, kind, "bk", why))
    return out


def format_plan(plan: list[PlanEntry]) -> str:
    """One line per layer: ``name (Type): fused|bk - why``."""
    return "\n".join(f"  {e.name or '<root>'} ({e.layer_type}): {e.backend} - {e.why}" for e in plan)


def prepare(module: nn.Module) -> list[PlanEntry]:
    """For a controller in the fused mode: check that the kernels can run here (RuntimeError otherwise),
    and return the plan of ``module`` after a ``FusedFallbackWarning`` listing its layers on the bk path."""
    check_runtime()
    plan = fused_plan(module)
    bk = [e for e in plan if e.backend == "bk"]
    if bk:
        warnings.warn(f'grad_sample_mode="fused": {len(bk)} of {len(plan)} trainable layers run on the bk path '
                      f"(no fused kernel for them):\n{format_plan(bk)}", FusedFallbackWarning, stacklevel=4)
    return plan


def reduce_layer(handler: LayerHandler, layer: nn.Module, rec: Record, names: list[str], params: list[nn.Parameter],
                 policy: Any, method: NormMethod, scale: float, output_scale: float,
                 ) -> tuple[Tensor, dict[nn.Parameter, Tensor]] | None:
    """Per-layer clipping of one fused linear layer whose clipping groups are its own, by ``fused_clip``.

    Returns the (K, B) squared norms and the clipped sums by parameter, or None where it does not apply
    (not a fused handler, or not exactly ``PerLayerClipping``: another policy's factors are not the
    kernel's formula), and the caller takes the general path.

    Privacy: the weight's factors are formed in the kernel from the same squared norms that are returned
    and checked here; the bias, when it shares the weight's group, gets those very factors.
    """
    from ..clipping import PerLayerClipping

    if not getattr(handler, "fused", False) or type(policy) is not PerLayerClipping or "weight" not in names:
        return None
    fused_clip = _kernels()[2]
    a, g = handler._operands(rec)  # type: ignore[attr-defined]
    if a.shape[1] == 1:
        return None  # one token: the rank-1 norm is cheaper than a kernel; the general path is exact
    by_name = dict(zip(names, params))
    kw = policy.group(by_name["weight"])
    kb = policy.group(by_name["bias"]) if "bias" in by_name else None
    g32 = handler._promoted(g)  # type: ignore[attr-defined]
    bias_sq = row_sq(_token_sum(g32)) if kb is not None else None
    mult = scale * output_scale
    x, y = handler._rows_cols(a, g)  # type: ignore[attr-defined]
    sq_w, c_w, total = fused_clip.fused_clip(
        x, y, gram=method is NormMethod.GRAM, clip=policy.thresholds[kw], scale=scale, mult=mult,
        extra_sq=bias_sq if kb == kw else None, pad=token_pad(a, g))
    b = a.shape[0]
    sq = torch.zeros(policy.num_groups, b, dtype=sq_w.dtype, device=sq_w.device)
    sq[kw] += sq_w  # includes the bias when it is in the weight's group
    if kb is not None and kb != kw:
        sq[kb] += bias_sq.to(sq.dtype)
    # no host read here: the controller flags a non-finite sq on the device (_reduce) and the step is masked
    sums = {by_name["weight"]: total}
    if kb is not None:
        c_b = c_w if kb == kw else policy.factors(sq.sqrt() * scale)[kb] * mult
        sums[by_name["bias"]] = c_b.to(g32.dtype) @ _token_sum(g32)
    return sq, sums
