"""Brute-force references for the tests: per-sample gradients by torch.func (vmap of grad), float64."""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from dpengine.grad_sample.controller import GradSampleController, GradSampleMode, LossReduction

LossFn = Callable[[Tensor, Tensor], Tensor]


def oracle_per_sample(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """{param name: (B, *shape)}: gradient of each sample's own loss (the loss of a batch of one)."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}

    def loss_i(ps: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, {**ps, **frozen}, (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    return vmap(grad(loss_i), in_dims=(None, 0, 0))(params, x, y)


def flat_norms(per_sample: dict[str, Tensor]) -> Tensor:
    return torch.stack([t.reshape(t.shape[0], -1).pow(2).sum(1) for t in per_sample.values()]).sum(0).sqrt()


def run_controller(
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    *,
    mode: str,
    reduction: str,
    factors: Callable[[Tensor], Tensor],
) -> tuple[dict[str, Tensor], Tensor]:
    """One forward/backward through the controller on a copy of ``model``.

    ``loss_fn`` must be a per-sample-mean or per-sample-sum loss matching ``reduction``; returns the
    accumulated clipped sums by parameter name and the per-sample norms.
    """
    model = copy.deepcopy(model)
    ctrl = GradSampleController(model, mode=GradSampleMode(mode), clip_factors=factors,
                                loss_reduction=LossReduction(reduction))
    ctrl.note_batch(x.shape[0])  # as the private loader does for each batch it yields
    loss_fn(model(x), y).backward()
    sums = ctrl.pop_clipped_sums()
    names = {id(p): n for n, p in model.named_parameters()}
    out = {names[id(p)]: t for p, t in sums.items()}
    for n, p in model.named_parameters():
        assert p.grad is None, f"autograd wrote a non-private gradient into {n}"
    ctrl.detach()
    return out, ctrl.last_norms


def rel_err(a: Tensor, b: Tensor, scale: float | None = None) -> float:
    """Max abs error over ``scale`` (default: max |b|). Pass the scale of the whole gradient when ``b`` is a
    parameter whose gradient is zero up to rounding (e.g. a conv bias followed by InstanceNorm)."""
    if a.numel() == 0 and b.numel() == 0:
        return 0.0
    scale = max(float(b.abs().max()) if scale is None else scale, 1e-300)
    return float((a - b).abs().max()) / scale
