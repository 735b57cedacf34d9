"""Lipschitz layers and losses whose per-sample gradient norms are bounded analytically (clipless DP-SGD).

Béthune et al. 2024, "DP-SGD without clipping: the Lipschitz neural network way" (lip-dp): if every
layer is Lipschitz with a known constant and the loss is Lipschitz in the logits, each sample's gradient
w.r.t. each parameter has a norm bound that follows from the architecture alone. The ordinary summed
gradient plus Gaussian noise scaled to those bounds is then private, with no per-sample clipping.

Design, chosen so that every bound is a one-line inequality:

* The constrained layers (``SpectralLinear``, ``SpectralConv2d``) use their trainable parameters directly
  in the forward; no normalization sits inside the graph, so no Jacobian of a normalization enters the
  gradient. Their constraints (spectral norm of the weight matrix <= a target, bias norm <=
  ``bias_bound``) are restored by ``project_(model)`` after every optimizer step; ``attach_projection``
  registers it as an optimizer step post-hook.
* The projection certifies its result: the largest singular value is computed by a float64 SVD of the
  values actually stored, plus a slack for the SVD's rounding, and the tensor is shrunk until that upper
  bound is within the constraint. The layer then keeps a copy of the certified values, so
  ``constraint_violations(model)`` says exactly (by comparison, not by another SVD) whether a
  constrained parameter changed since it was certified. The copy costs one extra copy of those weights.
* Every supported layer is 1-Lipschitz w.r.t. its input (as computed by autograd, kinks included), so
  the gradient of sample i's loss w.r.t. any layer's output has norm <= the loss's Lipschitz constant.
  Every supported layer maps 0 to at most its bias, so the input norm bound propagates forward as
  ``B_out <= B_in + ||broadcast bias||``.

The bounds are exact real-arithmetic bounds; a float32 forward/backward can exceed them by rounding
(relative ~1e-6), the same order as the 1e-6 slack of ordinary clipping.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ._validate import one_of, positive
from .grad_sample.ledger import BatchLedger, sum_dtype
from .grad_sample.precision import reduced_fp32_math

#: Relative slack that turns a float64 SVD's largest singular value into a certified upper bound. LAPACK's
#: SVD is backward stable (error O(n * 1.1e-16) relative to the largest singular value), so 1e-9 covers any
#: layer that fits in memory with a wide margin.
_SVD_SLACK = 1e-9
#: Shrink attempts before giving up; the margin grows 4x per attempt, so rounding always loses in the end.
_MAX_SHRINKS = 8

_SUPPORTED = ("SpectralLinear, SpectralConv2d, InputNormClip, GroupSort, nn.ReLU, nn.Tanh, "
              "nn.LeakyReLU (|negative_slope| <= 1), nn.Hardtanh/nn.ReLU6 (min_val <= 0 <= max_val), "
              "nn.Flatten (start_dim >= 1), nn.Identity")


# ----------------------------------------------------------------------------------- certified norms
def spectral_norm_upper_bound(matrix: Tensor) -> float:
    """A certified upper bound on ``||matrix||_2``: a float64 SVD of the stored values, times (1 + 1e-9).

    Float64 holds every float32/16 value exactly, so the only error is the SVD's own, which the slack covers.
    """
    if matrix.dim() != 2:
        raise ValueError(f"Expected a matrix, got shape {tuple(matrix.shape)}; reshape to (out, -1) first.")
    if matrix.numel() == 0:
        return 0.0
    _check_finite(matrix)
    return torch.linalg.matrix_norm(matrix.detach().to(torch.float64), ord=2).item() * (1.0 + _SVD_SLACK)


def _norm_upper_bound(t: Tensor) -> float:
    """A certified upper bound on the Euclidean norm of ``t`` (float64 sum of squares, with the same slack)."""
    _check_finite(t)
    return torch.linalg.vector_norm(t.detach().to(torch.float64)).item() * (1.0 + _SVD_SLACK)


def _check_finite(t: Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError("A constrained parameter holds NaN or inf (the optimizer step diverged); no projection "
                         "can certify it. Lower the learning rate or restore a checkpoint.")


def _matrix(weight: Tensor) -> Tensor:
    """The weight as the (out, fan_in) matrix whose spectral norm the constraint is on."""
    return weight.reshape(weight.shape[0], -1)


def _margin(dtype: torch.dtype) -> float:
    """How far inside a constraint to aim so rounding to ``dtype`` lands inside it (grown on retries)."""
    return max(1e-6, 4.0 * torch.finfo(dtype).eps)


@torch.no_grad()
def _shrink_until(t: Tensor, measure: Callable[[], float], bound: float) -> None:
    """Scale ``t`` in place until ``measure() <= bound``: certify against what is actually stored."""
    margin = _margin(t.dtype)
    for _ in range(_MAX_SHRINKS):
        value = measure()
        if value <= bound:
            return
        t.mul_(bound * (1.0 - margin) / value)
        margin *= 4.0
    raise RuntimeError(f"Could not certify a norm <= {bound} after {_MAX_SHRINKS} shrinks of a {t.dtype} tensor; "
                       "keep constrained layers in float32 or float64.")


@torch.no_grad()
def _project_spectral_(weight: Tensor, target: float) -> None:
    """Clip the singular values of the (out, fan_in) weight matrix at ``target``, in place, and certify.

    Clipping singular values is the Frobenius-nearest matrix in the spectral ball (plain rescaling would
    also shrink the directions already inside it, and deep networks would lose signal).
    """
    if spectral_norm_upper_bound(_matrix(weight)) <= target:
        return
    u, s, vh = torch.linalg.svd(_matrix(weight).to(torch.float64), full_matrices=False)
    clipped = (u * s.clamp(max=target * (1.0 - _margin(weight.dtype)))) @ vh
    weight.copy_(clipped.reshape(weight.shape))
    _shrink_until(weight, lambda: spectral_norm_upper_bound(_matrix(weight)), target)


@torch.no_grad()
def _project_norm_(t: Tensor, bound: float) -> None:
    """Rescale ``t`` into the Euclidean ball of radius ``bound`` (the exact projection), and certify."""
    _shrink_until(t, lambda: _norm_upper_bound(t), bound)


# ------------------------------------------------------------------------------- constrained layers
@torch.no_grad()
def _orthogonal_(weight: Tensor) -> None:
    """Orthogonal init (gradient-norm preserving), computed in at least float32: QR has no half kernels."""
    work = torch.empty(weight.shape, device=weight.device, dtype=torch.promote_types(weight.dtype, torch.float32))
    weight.copy_(nn.init.orthogonal_(work))


class _ConstrainedLayer(nn.Module):
    """Projection and certificate shared by ``SpectralLinear`` and ``SpectralConv2d``."""

    weight: nn.Parameter
    bias: nn.Parameter | None

    def __init__(self, bias_bound: float) -> None:
        super().__init__()
        positive(bias_bound=bias_bound)
        self.bias_bound = float(bias_bound)
        #: copies of the parameters as last certified; a mismatch means a step changed them since
        self._certified: list[Tensor] = []

    @property
    def spectral_target(self) -> float:
        """The bound kept on the spectral norm of the (out, fan_in) weight matrix."""
        raise NotImplementedError

    def _constrained(self) -> list[Tensor]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    def is_certified(self) -> bool:
        """Whether the parameters are exactly the ones the last projection certified."""
        params = self._constrained()
        return len(params) == len(self._certified) and all(
            c.shape == p.shape and c.dtype == p.dtype and c.device == p.device and torch.equal(c, p)
            for c, p in zip(self._certified, params))

    @torch.no_grad()
    def project_(self) -> bool:
        """Restore and certify the constraints if a parameter changed since the last certificate.

        Returns whether it had to (a no-op, and no SVD, when nothing changed).
        """
        if self.is_certified():
            return False
        _project_spectral_(self.weight, self.spectral_target)
        if self.bias is not None:
            _project_norm_(self.bias, self.bias_bound)
        self._certified = [p.detach().clone() for p in self._constrained()]
        return True


class SpectralLinear(_ConstrainedLayer):
    """``y = x W^T + b`` with ``||W||_2 <= 1`` and ``||b|| <= bias_bound``, kept by projection after each step.

    Why projection and not ``W / sigma(W)`` in the forward: with ``W`` used as is, sample i's gradient is
    exactly ``dL_i/dW = g_i x_i^T`` and ``dL_i/db = g_i`` (g_i the gradient w.r.t. the output), whose norms are
    ``||g_i|| ||x_i||`` and ``||g_i||``; a normalization inside the graph would add its Jacobian to bound.
    The layer is 1-Lipschitz and ``||y|| <= ||x|| + bias_bound``.

    The weight starts orthogonal (gradient-norm preserving). Inputs must be ``(batch, in_features)``: with
    more dimensions the bias would be broadcast over positions the bound does not count.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bias_bound: float = 1.0,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(bias_bound)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        _orthogonal_(self.weight)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.project_()

    @property
    def spectral_target(self) -> float:
        return 1.0

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2:
            raise ValueError(f"SpectralLinear expects (batch, {self.in_features}) inputs, got shape {tuple(x.shape)}; "
                             "flatten each sample first (nn.Flatten()), since its gradient bound assumes one "
                             "feature vector per sample.")
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bias_bound={self.bias_bound}")


def _pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (int(v), int(v)) if isinstance(v, int) else tuple(int(e) for e in v)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"Expected {name}={v!r} to be a positive int or a pair of them.")
    return pair  # type: ignore[return-value]


def conv_overlap(kernel_size: int | Sequence[int], stride: int | Sequence[int] = 1,
                 dilation: int | Sequence[int] = 1) -> int:
    """The most (patch, kernel offset) pairs any input pixel appears in: prod_d ceil(k_d gcd(dil_d, s_d) / s_d).

    Why: pixel q meets kernel offset a of the patch at output position p iff q = p s + a dil; the offsets
    that can do so are one residue class modulo s / gcd(dil, s), and there are at most ceil(k / that) of
    them in [0, k). Zero padding adds only zeros, so it does not change the count.
    """
    k, s, d = _pair(kernel_size, "kernel_size"), _pair(stride, "stride"), _pair(dilation, "dilation")
    return math.prod(-(-k[i] * math.gcd(d[i], s[i]) // s[i]) for i in range(2))


def conv2d_lipschitz_bound(weight: Tensor, stride: int | Sequence[int] = 1, dilation: int | Sequence[int] = 1) -> float:
    """A certified upper bound on the Lipschitz constant of ``F.conv2d(., weight, None, stride, padding, dilation)``.

    ``||K_mat||_2 * sqrt(conv_overlap)``, K_mat the (out, in*kh*kw) kernel: the conv is ``K_mat @ U(x)`` with
    U(x) the matrix of patches, and ``||U(x)||_F^2 <= overlap * ||x||^2`` since each pixel fills at most
    ``overlap`` entries of U(x). Holds for any zero padding.
    """
    return spectral_norm_upper_bound(_matrix(weight)) * math.sqrt(conv_overlap(weight.shape[-2:], stride, dilation))


class SpectralConv2d(_ConstrainedLayer):
    """2-d convolution kept 1-Lipschitz: ``||K_mat||_2 <= 1 / sqrt(overlap)`` and ``||b|| <= bias_bound``.

    K_mat is the (out, in*kh*kw) kernel and overlap is ``conv_overlap(kernel_size, stride, dilation)``; by
    ``conv2d_lipschitz_bound`` the layer is then 1-Lipschitz. Sample i's kernel gradient is ``G_i U(x_i)^T``
    (G_i: out x P output gradients), so ``||dL_i/dK|| <= ||G_i|| * sqrt(overlap) * ||x_i||``; the bias is
    broadcast over the P output positions, so ``||dL_i/db|| <= sqrt(P) ||G_i||`` and it adds at most
    ``sqrt(P) * bias_bound`` to the output norm. Both grow with the image size, so ``bias=False`` is often
    the better trade. Only zero padding (ints, pairs, "valid", or "same" at stride 1); no groups.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                 stride: int | Sequence[int] = 1, padding: int | Sequence[int] | str = 0,
                 dilation: int | Sequence[int] = 1, bias: bool = True, *, bias_bound: float = 1.0,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(bias_bound)
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.dilation = _pair(dilation, "dilation")
        if isinstance(padding, str):
            one_of(["valid", "same"], padding=padding)
            if padding == "same" and self.stride != (1, 1):
                raise ValueError("padding='same' needs stride 1 (as in torch); pass explicit integer padding.")
            self.padding: tuple[int, int] | str = padding
        else:
            self.padding = (int(padding), int(padding)) if isinstance(padding, int) else _pair_nonneg(padding)
        self.overlap = conv_overlap(self.kernel_size, self.stride, self.dilation)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size, device=device,
                                               dtype=dtype))
        _orthogonal_(self.weight)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.project_()

    @property
    def spectral_target(self) -> float:
        return 1.0 / math.sqrt(self.overlap)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"SpectralConv2d expects (batch, {self.in_channels}, H, W) inputs, got shape "
                             f"{tuple(x.shape)}; add the batch dimension (x.unsqueeze(0) for one sample).")
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}, "
                f"bias_bound={self.bias_bound}")


def _pair_nonneg(v: Sequence[int]) -> tuple[int, int]:
    pair = tuple(int(e) for e in v)
    if len(pair) != 2 or min(pair) < 0:
        raise ValueError(f"Expected padding={v!r} to be a non-negative int, a pair of them, 'valid' or 'same'.")
    return pair  # type: ignore[return-value]


# --------------------------------------------------------------------------- 1-Lipschitz, norm-safe
class GroupSort(nn.Module):
    """Sort channels (dim 1) within consecutive groups of ``group_size``; ``group_size=2`` is MaxMin.

    A permutation of each sample's entries, so it preserves norms (and gradient norms) exactly and is
    1-Lipschitz (sorting is 1-Lipschitz in l2). Unlike ReLU it discards no gradient, which keeps deep
    1-Lipschitz networks trainable.
    """

    def __init__(self, group_size: int = 2) -> None:
        super().__init__()
        if not (isinstance(group_size, int) and group_size >= 1):
            raise ValueError(f"Expected group_size={group_size!r} to be a positive int.")
        self.group_size = group_size

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] % self.group_size:
            raise ValueError(f"GroupSort({self.group_size}) sorts dim 1 in groups of {self.group_size}, but the "
                             f"input has shape {tuple(x.shape)}; make the channel count a multiple of it.")
        c = x.shape[1]
        return x.unflatten(1, (c // self.group_size, self.group_size)).sort(dim=2).values.flatten(1, 2)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}"


class InputNormClip(nn.Module):
    """Scale each sample (all of its dims but 0) into the ball of radius ``max_norm``; samples never mix.

    Gives the input norm bound the gradient bounds start from. It is the projection onto a ball, so it is
    1-Lipschitz (its autograd Jacobian, I or ``(c / ||x||)(I - x x^T / ||x||^2)``, has norm <= 1) and may
    also sit mid-network, where it caps the propagated norm bound.
    """

    def __init__(self, max_norm: float) -> None:
        super().__init__()
        positive(max_norm=max_norm)
        self.max_norm = float(max_norm)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2:
            raise ValueError(f"InputNormClip expects (batch, ...) inputs, got shape {tuple(x.shape)}.")
        norms = torch.linalg.vector_norm(x.flatten(1), dim=1)
        factor = (self.max_norm / norms.clamp_min(torch.finfo(x.dtype).tiny)).clamp(max=1.0)
        return x * factor.view(-1, *([1] * (x.dim() - 1)))

    def extra_repr(self) -> str:
        return f"max_norm={self.max_norm}"


# ------------------------------------------------------------------------------------------- losses
def _reduce(losses: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses


def _check_logits(logits: Tensor, target: Tensor, name: str) -> None:
    if logits.dim() != 2 or logits.shape[1] < 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"{name} expects logits (batch, classes >= 2) and integer targets (batch,), got "
                         f"{tuple(logits.shape)} and {tuple(target.shape)}.")


class MulticlassHinge(nn.Module):
    """Per sample ``max(0, margin - (z_y - max_{k != y} z_k))``: the multiclass (top-competitor) hinge.

    Lipschitz constant ``sqrt(2)`` in the logits z: the margin changes by at most |dz_y| + max_k |dz_k|
    <= sqrt(2) ||dz||, and autograd's gradient is 0 or ``e_k - e_y`` (split evenly over tied maxima), of
    norm <= sqrt(2). The one-vs-rest hinge ``sum_k max(0, margin - s_k z_k)`` would be sqrt(K)-Lipschitz,
    which grows the noise with the number of classes; this form does not.
    """

    def __init__(self, margin: float = 1.0, reduction: str = "mean") -> None:
        super().__init__()
        positive(margin=margin)
        one_of(["mean", "sum", "none"], reduction=reduction)
        self.margin, self.reduction = float(margin), reduction

    @property
    def lipschitz(self) -> float:
        """Lipschitz constant of one sample's loss w.r.t. its logits (l2)."""
        return math.sqrt(2.0)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        _check_logits(logits, target, "MulticlassHinge")
        is_true = torch.arange(logits.shape[1], device=logits.device) == target.unsqueeze(1)
        true = logits.gather(1, target.unsqueeze(1)).squeeze(1)
        rival = logits.masked_fill(is_true, float("-inf")).amax(dim=1)
        return _reduce(F.relu(self.margin - (true - rival)), self.reduction)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, reduction={self.reduction!r}"


class TemperatureCrossEntropy(nn.Module):
    """Softmax cross-entropy on ``logits / temperature``; Lipschitz constant ``sqrt(2) / temperature``.

    Its gradient is ``(p - e_y) / T`` with p the softmax, and ``||p - e_y||^2 = (1 - p_y)^2 + sum_{k != y} p_k^2
    <= 2 (1 - p_y)^2 <= 2``. A larger temperature lowers the constant (less noise) but flattens the loss.
    """

    def __init__(self, temperature: float = 1.0, reduction: str = "mean") -> None:
        super().__init__()
        positive(temperature=temperature)
        one_of(["mean", "sum", "none"], reduction=reduction)
        self.temperature, self.reduction = float(temperature), reduction

    @property
    def lipschitz(self) -> float:
        """Lipschitz constant of one sample's loss w.r.t. its logits (l2)."""
        return math.sqrt(2.0) / self.temperature

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        _check_logits(logits, target, "TemperatureCrossEntropy")
        return F.cross_entropy(logits / self.temperature, target, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}"


# ------------------------------------------------------------------------------------ model checks
def _leaves(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Layers in call order, descending into plain nn.Sequential; repeats kept (``named_children`` drops them)."""
    for name, child in module._modules.items():
        if child is None:
            continue
        full = f"{prefix}.{name}" if prefix else name
        if type(child) is nn.Sequential:
            yield from _leaves(child, full)
        else:
            yield full, child


_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LayerNorm, nn.GroupNorm,
          nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_ACTIVATIONS = (nn.GELU, nn.SiLU, nn.ELU, nn.SELU, nn.CELU, nn.Sigmoid, nn.Softplus, nn.Mish, nn.Hardswish,
                nn.Hardsigmoid, nn.Softmax, nn.LogSoftmax, nn.PReLU)


def _layer_problem(name: str, m: nn.Module) -> str | None:
    kind = type(m).__name__
    if isinstance(m, (_ConstrainedLayer, InputNormClip, GroupSort, nn.ReLU, nn.Tanh, nn.Identity)):
        return None
    if isinstance(m, nn.LeakyReLU):
        if abs(m.negative_slope) <= 1:
            return None
        return (f"{name} ({kind}): |negative_slope| = {abs(m.negative_slope)} > 1 makes it more than 1-Lipschitz; "
                "use a slope in [-1, 1]")
    if isinstance(m, nn.Hardtanh):  # ReLU6 included
        if m.min_val <= 0 <= m.max_val:
            return None
        return f"{name} ({kind}): [{m.min_val}, {m.max_val}] excludes 0, so it moves 0; use a range around 0"
    if isinstance(m, nn.Flatten):
        if m.start_dim >= 1:
            return None
        return (f"{name} ({kind}): start_dim={m.start_dim} may fold the batch into samples; use nn.Flatten() "
                "(start_dim=1)")
    if isinstance(m, nn.Linear):
        fix = "replace it with SpectralLinear(in_features, out_features)"
    elif isinstance(m, nn.Conv2d):
        fix = "replace it with SpectralConv2d(in_channels, out_channels, kernel_size, stride, padding, dilation)"
    elif isinstance(m, _NORMS):
        fix = ("remove it: normalization divides by a data-dependent scale, so it has no Lipschitz bound "
               "(batch norm also mixes samples)")
    elif isinstance(m, _DROPOUTS):
        fix = "remove it: it scales the kept units by 1 / (1 - p) > 1, so it is not 1-Lipschitz"
    elif isinstance(m, _ACTIVATIONS):
        fix = "replace it with GroupSort(2), nn.ReLU or nn.Tanh (1-Lipschitz and zero at zero)"
    else:
        fix = f"replace it with one of the supported layers: {_SUPPORTED}"
    return f"{name} ({kind}): not a layer with a known Lipschitz bound; {fix}"


def check_lipschitz_model(model: nn.Module) -> list[str]:
    """Every reason ``model`` has no analytic per-sample gradient bound, all at once (empty if none).

    Checks the structure only; whether the constraints currently hold is ``constraint_violations``.
    """
    if type(model) is not nn.Sequential:
        return [f"model ({type(model).__name__}): the bounds follow the layers in call order, so the model must be "
                "a plain nn.Sequential, e.g. nn.Sequential(InputNormClip(1.0), SpectralLinear(d, h), GroupSort(), "
                "SpectralLinear(h, classes))"]
    problems: list[str] = []
    first_seen: dict[int, str] = {}
    owned: Counter[int] = Counter()
    unsupported: set[int] = set()
    for name, m in _leaves(model):
        if id(m) in first_seen:
            problems.append(f"{name} ({type(m).__name__}): the same module object as layer {first_seen[id(m)]}; "
                            "a layer called twice adds two gradient terms per sample, so its bound would be too "
                            "low. Use separate layers")
            continue
        first_seen[id(m)] = name
        problem = _layer_problem(name, m)
        if problem is not None:
            problems.append(problem)
            unsupported.update(id(p) for p in m.parameters())
        elif isinstance(m, _ConstrainedLayer):
            owned.update(id(p) for p in m._constrained())
    for pname, p in model.named_parameters(remove_duplicate=False):
        if id(p) in unsupported:
            continue
        if owned[id(p)] > 1:
            problems.append(f"{pname}: a parameter shared by several Lipschitz layers gets one gradient term per "
                            "use, so its bound would be too low; give each layer its own parameter")
        elif owned[id(p)] == 0:
            problems.append(f"{pname}: a parameter outside the weight/bias of a Spectral layer, which no bound "
                            f"covers; remove it, or build the model from {_SUPPORTED}")
    return problems


# ------------------------------------------------------------------------------------------- bounds
def _output_shape(m: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    """One layer's per-sample output shape, from shapes alone (meta tensors: the module itself is not called,
    so no hook of the engine sees a dummy batch)."""
    x = torch.empty((1, *shape), device="meta")
    if isinstance(m, SpectralLinear):
        if shape != (m.in_features,):
            raise ValueError(f"expects per-sample shape ({m.in_features},), gets {shape}")
        return (m.out_features,)
    if isinstance(m, SpectralConv2d):
        if len(shape) != 3 or shape[0] != m.in_channels:
            raise ValueError(f"expects per-sample shape ({m.in_channels}, H, W), gets {shape}")
        w = torch.empty(m.weight.shape, device="meta")
        return tuple(F.conv2d(x, w, None, m.stride, m.padding, m.dilation).shape[1:])
    if isinstance(m, nn.Flatten):
        return tuple(x.flatten(m.start_dim, m.end_dim).shape[1:])
    if isinstance(m, GroupSort) and (not shape or shape[0] % m.group_size):
        raise ValueError(f"sorts dim 1 in groups of {m.group_size}, gets per-sample shape {shape}")
    return shape


def _bias_positions(layers: list[tuple[str, nn.Module]], input_shape: Sequence[int] | None) -> dict[str, int]:
    """For each layer, the number of output positions its bias is broadcast over."""
    if input_shape is None:
        needing = [n for n, m in layers if isinstance(m, SpectralConv2d) and m.bias is not None]
        if needing:
            raise ValueError(f"SpectralConv2d layer(s) {needing} have a bias, whose bound grows with the number of "
                             "output positions: pass input_shape=(C, H, W) (one sample's shape), or build them "
                             "with bias=False.")
        return {n: 1 for n, _ in layers}
    shape = tuple(int(s) for s in input_shape)
    positions: dict[str, int] = {}
    for name, m in layers:
        try:
            shape = _output_shape(m, shape)
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"input_shape={tuple(input_shape)} does not fit layer {name} ({type(m).__name__}): "
                             f"{err}") from err
        positions[name] = math.prod(shape[1:])
    return positions


def per_sample_gradient_bounds(model: nn.Sequential, input_bound: float, loss_lipschitz: float, *,
                               input_shape: Sequence[int] | None = None) -> dict[str, float]:
    """Analytic bound on ``||d loss_i / d p||`` for every trainable parameter p, keyed as in ``named_parameters``.

    Assumes the constraints hold when the gradient is taken (``constraint_violations(model) == []``) and
    that each sample's loss is ``loss_lipschitz``-Lipschitz in its own logits, the model's output as is
    (``MulticlassHinge.lipschitz``, ``TemperatureCrossEntropy.lipschitz``). With every layer 1-Lipschitz,
    the gradient w.r.t. any layer's output has norm <= loss_lipschitz =: L; with B the layer's input norm
    bound, propagated forward (``InputNormClip``: min(B, max_norm); Spectral layer: B + sqrt(P) * bias_bound;
    activations keep it):

    * SpectralLinear: weight ``L * B``, bias ``L``;
    * SpectralConv2d: weight ``L * sqrt(overlap) * B``, bias ``L * sqrt(P)``, P = H_out * W_out.

    Args:
        model: an nn.Sequential of the supported layers (see ``check_lipschitz_model``).
        input_bound: a bound on each sample's input norm; ``math.inf`` if an ``InputNormClip`` comes first.
        loss_lipschitz: the per-sample loss's Lipschitz constant in the logits.
        input_shape: one sample's shape; needed for conv biases (the bounds then hold for exactly this shape).

    Raises:
        ValueError: an unsupported model (every problem listed), or a weight with no finite input bound.
    """
    problems = check_lipschitz_model(model)
    if problems:
        raise ValueError("The model is not a supported Lipschitz network, so its per-sample gradients have no "
                         "analytic bound:\n  - " + "\n  - ".join(problems))
    if not (isinstance(input_bound, (int, float)) and input_bound > 0):
        raise ValueError(f"Expected input_bound={input_bound!r} > 0 (math.inf if an InputNormClip comes first).")
    positive(loss_lipschitz=loss_lipschitz)
    layers = list(_leaves(model))
    positions = _bias_positions(layers, input_shape)
    lip = float(loss_lipschitz)
    by_param: dict[int, float] = {}
    norm = float(input_bound)
    for name, m in layers:
        if isinstance(m, InputNormClip):
            norm = min(norm, m.max_norm)
        elif isinstance(m, _ConstrainedLayer):
            spread = math.sqrt(m.overlap) if isinstance(m, SpectralConv2d) else 1.0
            if m.weight.requires_grad:
                if not math.isfinite(norm):
                    raise ValueError(f"Layer {name} ({type(m).__name__}) has no bound on its input norm: put "
                                     "InputNormClip(max_norm) first in the model, or pass a finite input_bound.")
                by_param[id(m.weight)] = lip * spread * norm
            if m.bias is not None:
                by_param[id(m.bias)] = lip * math.sqrt(positions[name])
                norm += math.sqrt(positions[name]) * m.bias_bound
    return {n: by_param[id(p)] for n, p in model.named_parameters() if p.requires_grad}


def total_gradient_bound(bounds: Mapping[str, float]) -> float:
    """Bound on one sample's whole gradient: ``sqrt(sum of squared per-parameter bounds)``.

    The L2 sensitivity of the summed gradient under add/remove-one adjacency (flat noise).
    """
    return math.sqrt(sum(b * b for b in bounds.values()))


# ---------------------------------------------------------------------------------------- projection
def project_(model: nn.Module) -> list[str]:
    """Restore the constraints of every Spectral layer that changed since its last certificate.

    Call after every optimizer step (``attach_projection`` does), and after loading weights or changing
    dtype. Returns the names of the layers it projected; layers that did not change cost no SVD.
    """
    return [name for name, m in model.named_modules() if isinstance(m, _ConstrainedLayer) and m.project_()]


def constraint_violations(model: nn.Module) -> list[str]:
    """Spectral layers whose parameters are not the ones last certified (empty when the bounds apply).

    Exact and cheap (a comparison, no SVD): any change since the projection, an optimizer step, a loaded
    state dict or a dtype/device move, is reported, since it may have broken a constraint.
    """
    return [f"{name} ({type(m).__name__}): its parameters changed since the last projection, so the spectral-norm "
            "and bias-norm constraints the gradient bounds assume are not certified; call "
            "dpengine.lipschitz.project_(model) after every optimizer step (attach_projection(optimizer, model) "
            "does it for you)"
            for name, m in model.named_modules() if isinstance(m, _ConstrainedLayer) and not m.is_certified()]


def attach_projection(optimizer: torch.optim.Optimizer, model: nn.Module) -> RemovableHandle:
    """Project ``model`` now and after every ``optimizer.step()``; returns the hook's handle.

    A step post-hook, so the weights the next forward sees are always certified. Projection is a no-op
    for unchanged layers, so a hook that also fires on a skipped step costs nothing.
    """
    project_(model)

    def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        project_(model)

    return optimizer.register_step_post_hook(hook)


# ------------------------------------------------------------------------------------------ engine side
_HALF = (torch.float16, torch.bfloat16)
_EXACT_FIX = ("its analytic gradient bounds hold for exact float32 (or float64) arithmetic, with a 1e-5 slack for "
              "float32 rounding; bf16/fp16 or TF32 rounding (about 1e-3 per layer) could exceed them. Keep the "
              "model in float32, run it outside torch.autocast, and keep float32 math exact "
              "(torch.set_float32_matmul_precision('highest'); on CUDA also "
              "torch.backends.cudnn.conv.fp32_precision = 'ieee', as cuDNN convolutions default to TF32).")


def _check_exact_fp32(layer: nn.Module, args: Any) -> None:
    """Forward pre-hook of every constrained layer of a private Lipschitz model: refuse a forward that will
    be differentiated (grad enabled) in reduced precision."""
    if not torch.is_grad_enabled():
        return
    device = layer.weight.device.type
    found = []
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device) \
            and torch.get_autocast_dtype(device) in _HALF:
        found.append(f"torch.autocast({device!r}, dtype={torch.get_autocast_dtype(device)})")
    found += reduced_fp32_math(device, ("conv",) if isinstance(layer, SpectralConv2d) else ("matmul",))
    if found:
        raise RuntimeError(f"clipping='lipschitz' refuses this forward ({', '.join(found)}): " + _EXACT_FIX)


class LipschitzSums(BatchLedger):
    """The gradient source of ``make_private(clipping="lipschitz")``: no per-sample work at all.

    The ordinary backward computes the batch gradient through each constrained layer's forward: while a layer
    runs, its parameters are swapped for aliases (same storage, leaves of their own) as the per-sample
    controller does, and each alias's gradient is taken as it is accumulated. At the end of each backward (a
    callback queued from a hook on the model's output) the layers' gradients go into an engine-owned buffer,
    rescaled to the *sum* over samples (a mean-reduced loss is multiplied by the batch size the private loader
    yielded) and then by the optimizer's output scale. A gradient in ``p.grad`` itself came from a use of
    ``p`` outside its layer (a weight penalty in the loss), which the bounds do not cover: refused by the
    ledger's ``check_no_leak``, as in the per-sample modes. Each sample's gradient is bounded analytically
    (``per_sample_gradient_bounds``), so the sum's sensitivity is known without clipping. The same
    one-backward-per-batch rule as the per-sample controller applies, and a step is refused while the
    layers' constraints do not hold (``constraint_violations``).
    """

    def __init__(self, module: nn.Module, params: list[nn.Parameter], *, mean_reduction: bool,
                 input_bound: float = math.inf) -> None:
        super().__init__()
        self.module = module
        self.input_bound = float(input_bound)
        self.params = params
        self.param_ids = frozenset(id(p) for p in params)
        self.mean_reduction = mean_reduction
        self._queued_for: int | None = None
        self._root_batch: int | None = None
        low = sorted({str(p.dtype).replace("torch.", "") for p in params if p.dtype in _HALF})
        if low:
            raise ValueError(f"clipping='lipschitz' cannot train {'/'.join(low)} parameters: " + _EXACT_FIX)
        tracked = {id(p) for p in params}
        self._named = [(n, p) for n, p in module.named_parameters() if id(p) in tracked]
        self._grads: dict[nn.Parameter, Tensor] = {}  # the layers' gradients of the running backward
        self._handles = [module.register_forward_hook(self._on_output)]
        for m in module.modules():
            if isinstance(m, _ConstrainedLayer):
                owned = [(n, p) for n, p in m._parameters.items() if p is not None and id(p) in tracked]
                self._handles += [m.register_forward_pre_hook(_check_exact_fp32),
                                  m.register_forward_pre_hook(functools.partial(self._swap_in, owned)),
                                  m.register_forward_hook(functools.partial(self._swap_out, owned), always_call=True)]
        if math.isfinite(self.input_bound):
            self._handles.append(module.register_forward_pre_hook(self._check_input_bound, with_kwargs=True))

    def _check_input_bound(self, module: nn.Module, args: Any, kwargs: dict) -> None:
        """The bounds rest on the user's ``input_bound``: a differentiated forward whose input has a sample
        above it is refused (one norm per sample, read on the host; an ``InputNormClip`` first in the model
        enforces a bound instead of trusting one), and so is one whose input cannot be found."""
        if not torch.is_grad_enabled():
            return
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, Tensor) or x.dim() < 1:
            raise ValueError(f"clipping='lipschitz' with input_bound={self.input_bound:g} checks each sample's input "
                             "norm, but this forward's input is not a batched tensor (positional, or input=); call "
                             "model(x) with x of shape (batch, ...).")
        x = x.detach()
        if x.shape[0] == 0:
            return
        worst = float(torch.linalg.vector_norm(x.reshape(x.shape[0], -1).to(torch.float64), dim=1).max())
        if not worst <= self.input_bound:
            raise ValueError(f"clipping='lipschitz' was given input_bound={self.input_bound:g}, but a sample's input "
                             f"has norm {worst:.6g}: the per-sample gradient bounds, and so the noise, hold only for "
                             "inputs within it. Put dpengine.lipschitz.InputNormClip(max_norm) first in the model "
                             "(it enforces the bound), or pass a bound every input satisfies.")

    def _swap_in(self, owned: list[tuple[str, nn.Parameter]], layer: nn.Module, args: Any) -> None:
        """While the layer runs (differentiated), its parameters are aliases whose gradient this ledger takes:
        autograd never writes ``p.grad`` through the layer, so a ``p.grad`` is a use outside it."""
        if not torch.is_grad_enabled():
            return
        for n, p in owned:
            alias = p.detach().requires_grad_(p.requires_grad)
            alias.register_post_accumulate_grad_hook(functools.partial(self._take_grad, p))
            layer._parameters[n] = alias

    @staticmethod
    def _swap_out(owned: list[tuple[str, nn.Parameter]], layer: nn.Module, args: Any, out: Any) -> None:
        for n, p in owned:
            layer._parameters[n] = p

    def _take_grad(self, p: nn.Parameter, alias: Tensor) -> None:
        grad, alias.grad = alias.grad, None
        if grad is not None:
            self._grads[p] = grad if p not in self._grads else self._grads[p] + grad

    def _on_output(self, module: nn.Module, args: Any, out: Any) -> None:
        if isinstance(out, Tensor) and out.requires_grad:
            self._root_batch = int(out.shape[0]) if out.dim() else None
            out.register_hook(self._on_grad)

    def _on_grad(self, g: Tensor) -> None:
        task = torch._C._current_graph_task_id()
        if self._queued_for != task:
            self._queued_for = task
            torch.autograd.Variable._execution_engine.queue_callback(self._collect)

    def _collect(self) -> None:
        self._queued_for = None
        taken, self._grads = self._grads, {}
        self.check_no_leak(self._named)
        grads = [(p, taken[p]) for p in self.params if p in taken]
        if not grads:  # torch.autograd.grad: nothing accumulated, nothing released
            return
        batch = self._count_loader_batch()
        if batch is None:
            batch = self._root_batch
        if batch is None and self.mean_reduction:
            raise RuntimeError("clipping='lipschitz' with a mean-reduced loss needs the batch size to turn the "
                               "batch gradient back into a sum; iterate the loader make_private returned (or let "
                               "the model return a tensor with the batch as dimension 0).")
        factor = (float(batch) if self.mean_reduction else 1.0) * self.output_scale
        with torch.no_grad():
            for p, grad in grads:
                t = grad.to(sum_dtype(p.dtype)) * factor
                if p in self._summed:
                    self._summed[p].add_(t)
                else:
                    self._summed[p] = t
        self.batches_accumulated += 1

    def step_problem(self, in_virtual_steps: bool, releasing: bool = True) -> str | None:
        broken = constraint_violations(self.module)
        if broken:
            return ("the Lipschitz constraints do not hold, so the per-sample gradient bounds (and the noise) "
                    "would be wrong: " + "; ".join(broken) + ". Keep the projection that make_private attached "
                    "to the optimizer (it runs after every step), and change weights only through it.")
        return super().step_problem(in_virtual_steps, releasing)

    def clear(self) -> None:
        super().clear()
        self._grads = {}

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()
