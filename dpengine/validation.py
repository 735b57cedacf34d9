"""Model checks before private training: ``validate`` lists every problem at once; ``fix`` repairs some."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from .grad_sample import FALLBACK, find_handler
from .grad_sample.registry import shadowed_handler
from .grad_sample.controller import trainable_layers
from .layers import DPMultiheadAttention, DPRNNBase, _warn_swapped, swap_reason, swap_unsupported


@dataclass(frozen=True)
class Problem:
    """One reason a model cannot be trained privately as it is."""

    module: str
    layer: str
    reason: str

    def __str__(self) -> str:
        return f"{self.module or '<root>'} ({self.layer}): {self.reason}"


class UnsupportedModuleError(ValueError):
    """Raised by ``make_private`` with every problem ``validate`` found."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"The model cannot be trained privately as it is ({len(problems)} problem(s)):\n{lines}")


_BATCHNORM = ("batch statistics mix samples in the forward (so no per-sample gradient exists) and running "
              "statistics leak data; use dpengine.fix(model) to replace it with GroupNorm")
_SWAPPABLE = ("{kind} computes with its weights inside one fused op, so no per-layer rule sees them; run "
              "dpengine.fix(model) to swap in {new} (the same function from nn.Linear layers: same outputs, "
              "same state_dict keys)")
_BAG = ("nn.EmbeddingBag has no per-sample rule in dpengine (with offsets the batch is packed into one "
        "dimension); use nn.Embedding on padded token ids followed by a masked sum or mean")
_PARAMETRIZED = ("its parameters are computed by torch.nn.utils.parametrize (weight_norm, spectral_norm, ...) outside "
                 "the layer's call, so no per-sample rule applies; remove the parametrization before make_private "
                 "(torch.nn.utils.parametrize.remove_parametrizations(layer, name))")


def validate(module: nn.Module) -> list[Problem]:
    """Every reason ``module`` cannot be trained privately, all at once (empty list if none).

    What no static check can see: the guarantee also assumes that each sample's loss depends on that
    sample alone. Batch statistics (``x - x.mean(0)``, BatchNorm), a loss that couples samples (a softmax
    over the batch, in-batch negatives) or augmented views of one record placed as separate samples in
    the batch all let one record move several samples' gradients, so its contribution can exceed
    ``max_grad_norm``. Normalise per sample, use a per-sample loss, and augment inside the dataset (one
    record -> one sample). At run time dpengine refuses layers whose dimension 0 is not the loader's
    batch (which catches concatenated views and batch folding), but not mixing within the batch.
    """
    problems: list[Problem] = []
    for name, layer in module.named_modules():
        kind = type(layer).__name__
        trainable = any(p.requires_grad for p in layer.parameters())
        running = [n for n, _ in layer.named_buffers(recurse=False) if n.startswith("running_")]
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            problems.append(Problem(name, kind, _BATCHNORM))
        elif isinstance(layer, (nn.MultiheadAttention, nn.RNNBase)) and trainable:
            replacement, why = swap_reason(layer)
            if parametrize.is_parametrized(layer):
                why = _PARAMETRIZED
            problems.append(Problem(name, kind, why or _SWAPPABLE.format(kind=kind, new=replacement)))
        elif isinstance(layer, nn.EmbeddingBag) and trainable:
            problems.append(Problem(name, kind, _BAG))
        elif parametrize.is_parametrized(layer) and trainable:
            problems.append(Problem(name, kind, _PARAMETRIZED))
        elif running:
            problems.append(Problem(name, kind, f"running statistics {running} are updated from the data and leak "
                                                "it; use track_running_stats=False, or GroupNorm"))
    reported = {p.module for p in problems}
    for name, layer, _ in trainable_layers(module):
        if name in reported or any(name.startswith(r + ".") for r in reported if r):
            continue
        handler = find_handler(layer) or FALLBACK
        reasons = list(handler.problems(layer))
        unknown = handler.unknown_params(layer)
        if unknown:
            reasons.append(f"trainable parameters {unknown} are not covered by its per-sample rule (a hook-based "
                           "reparametrization such as the deprecated torch.nn.utils.weight_norm?); remove the "
                           "reparametrization, or freeze them")
        if handler is FALLBACK and any(p.requires_grad for c in layer.children() for p in c.parameters()):
            reasons.append("it holds trainable parameters directly and also calls trainable sublayers, so dpengine "
                           "would have to re-run it whole for each sample; move its own parameters into a small "
                           "submodule (e.g. nn.Linear, or a module that holds the parameter and applies it) called "
                           "from forward")
        shadow = shadowed_handler(layer) if handler is FALLBACK and reasons else None
        if shadow is not None:
            reasons = [_OVERRIDDEN.format(kind=type(layer).__name__, base=shadow[0].__name__,
                                          methods=", ".join(shadow[1]), why=r) for r in reasons]
        problems += [Problem(name, type(layer).__name__, r) for r in reasons]
    return problems


_OVERRIDDEN = ("{kind} subclasses {base} but overrides {methods}, so {base}'s per-sample rule does not apply to it "
               "(it would miss what the override computes), and the generic torch.func rule cannot either: {why}. "
               "Register a handler for {kind} (dpengine.grad_sample.register), or do not override forward (apply "
               "the extra computation outside the layer, e.g. in its parent module)")


def fix(module: nn.Module) -> nn.Module:
    """Swap layers dpengine cannot train privately for equivalents it can (in place; returns the module).

    * ``nn.MultiheadAttention`` -> :class:`dpengine.layers.DPMultiheadAttention`, ``nn.RNN`` / ``nn.GRU`` /
      ``nn.LSTM`` -> :class:`~dpengine.layers.DPRNN` / ``DPGRU`` / ``DPLSTM``: the same function built from
      ``nn.Linear`` layers, same outputs and ``state_dict`` keys, holding the same parameter objects (only the
      q/k/v biases of an attention with ``kdim``/``vdim`` are new tensors). Frozen ones are left as they are.
    * BatchNorm -> GroupNorm with the largest group count <= 32 that divides the channel count, copying
      the affine parameters so a pretrained model keeps its scale and shift.

    A warning lists every attention and recurrent layer swapped. Create the optimizer after ``fix``. If
    ``module`` itself is such a layer, its replacement is returned (the argument is left unchanged).
    """
    replacement, _ = swap_reason(module)
    if replacement is not None and any(p.requires_grad for p in module.parameters()) \
            and not parametrize.is_parametrized(module):
        new = (DPMultiheadAttention.from_torch(module) if isinstance(module, nn.MultiheadAttention)
               else DPRNNBase.from_torch(module))
        _warn_swapped([("", type(module).__name__, type(new).__name__)])
        return new
    _warn_swapped(swap_unsupported(module))
    _fix_batchnorm(module)
    return module


def _fix_batchnorm(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            c = child.num_features
            groups = max(g for g in range(1, min(32, c) + 1) if c % g == 0)
            gn = nn.GroupNorm(groups, c, eps=child.eps, affine=child.affine)
            if child.affine:
                gn = gn.to(device=child.weight.device, dtype=child.weight.dtype)
                with torch.no_grad():
                    gn.weight.copy_(child.weight)
                    gn.bias.copy_(child.bias)
                gn.requires_grad_(child.weight.requires_grad)
            setattr(module, name, gn)
        else:
            _fix_batchnorm(child)
