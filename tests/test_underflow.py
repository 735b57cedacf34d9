"""Factored (Gram and rank-one) per-sample norms multiply the squares of two factors. In float32 one factor's
square can underflow while the other's is huge and their product is an ordinary number: a record with an
input near 1e19 and an output gradient near 1e-23 read as norm 0 and was released unclipped (10x C under a
mean reduction). ``registry.underflow_pad`` pads both factors so the norm can only be over-stated there.

Each case below builds one such record, checks that the float64 truth needs clipping (its norm is well above
C), that the factored path without the pad releases more than C (the test can fail), and that with the pad
the release is at most C.
"""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch
from torch import nn

from dpengine.clipping import FlatClipping
from dpengine.grad_sample import registry
from dpengine.grad_sample.controller import GradSampleController, GradSampleMode, LossReduction

C = 1e-5
HUGE, TINY = 1e19, 1e-23  # HUGE^2 is a float32 number, TINY^2 is not; HUGE * TINY = 1e-4 >> C


class Shared(nn.Module):
    """One weight used by two Linear modules (cross terms between their factored forms)."""

    def __init__(self, d: int, p: int):
        super().__init__()
        self.a, self.b = nn.Linear(d, p, bias=False), nn.Linear(d, p, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.a(x) + self.b(x.flip(-1))


def _case(name: str) -> tuple[nn.Module, torch.Tensor]:
    """A model and one record whose first feature (first token) is HUGE."""
    torch.manual_seed(0)
    if name == "linear_rows":  # (B, d): the rank-one form
        model, x = nn.Linear(8, 3, bias=False), torch.randn(1, 8)
    elif name == "linear_rows_bias":  # weight and bias in one group: the joint rank-one form
        model, x = nn.Linear(8, 3), torch.randn(1, 8)
    elif name == "linear_tokens":  # (B, T, d): the Gram form
        model, x = nn.Linear(64, 8, bias=False), torch.randn(1, 3, 64)
    elif name == "linear_tokens_bias":  # the joint Gram form
        model, x = nn.Linear(64, 8), torch.randn(1, 3, 64)
    elif name == "conv":  # the convolution's Gram over positions
        model, x = nn.Conv1d(16, 8, 3, padding=1, bias=False), torch.randn(1, 16, 5)
    else:  # "shared"
        model, x = Shared(64, 8), torch.randn(1, 3, 64)
    x.view(-1)[0] = HUGE
    return model, x


CASES = ["linear_rows", "linear_rows_bias", "linear_tokens", "linear_tokens_bias", "conv", "shared"]


def _loss(out: torch.Tensor) -> torch.Tensor:
    return out.sum() * TINY


def _release(model: nn.Module, x: torch.Tensor, mode: str) -> float:
    """The norm of the clipped sum of this one record (sigma 0), float32."""
    ctrl = GradSampleController(model, mode=GradSampleMode(mode), policy=FlatClipping(C),
                                loss_reduction=LossReduction.SUM)
    try:
        ctrl.note_batch(x.shape[0])
        _loss(model(x)).backward()
        sums = ctrl.pop_clipped_sums()
    finally:
        ctrl.detach()
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in sums.values()))


def _true_norm(model: nn.Module, x: torch.Tensor) -> float:
    """The record's gradient norm in float64 (ordinary autograd, no factoring)."""
    m = copy.deepcopy(model).double()
    grads = torch.autograd.grad(_loss(m(x.double())), list(m.parameters()))
    return math.sqrt(sum(float(g.pow(2).sum()) for g in grads))


def _no_pad(monkeypatch: pytest.MonkeyPatch) -> None:
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("dpengine.grad_sample") and hasattr(mod, "underflow_pad"):
            monkeypatch.setattr(mod, "underflow_pad", lambda *a, **k: 0.0)


@pytest.mark.parametrize("mode", ["ghost", "bk"])
@pytest.mark.parametrize("case", CASES)
def test_an_underflowing_factor_cannot_release_a_record_unclipped(case, mode, monkeypatch):
    model, x = _case(case)
    true = _true_norm(model, x)
    assert true > 5 * C  # the record must be clipped
    assert _release(model, x, mode) <= C * (1 + 1e-5)
    with monkeypatch.context() as m:  # the same path without the pad: the bug this guards against
        _no_pad(m)
        assert _release(model, x, mode) > 2 * C


def test_hooks_needs_no_pad():
    model, x = _case("linear_tokens")
    assert _release(model, x, "hooks") <= C * (1 + 1e-5)


@pytest.mark.parametrize("mode", ["ghost", "bk"])
@pytest.mark.parametrize("case", CASES)
def test_the_pad_leaves_ordinary_norms_unchanged(case, mode, monkeypatch):
    model, x = _case(case)
    torch.manual_seed(1)
    x = torch.randn(4, *x.shape[1:])

    def norms() -> torch.Tensor:
        ctrl = GradSampleController(model, mode=GradSampleMode(mode), policy=FlatClipping(1e9),
                                    loss_reduction=LossReduction.SUM)
        ctrl.note_batch(x.shape[0])
        model(x).square().sum().backward()
        ctrl.pop_clipped_sums()
        out = ctrl.last_norms.clone()
        ctrl.detach()
        return out

    padded = norms()
    with monkeypatch.context() as m:
        _no_pad(m)
        plain = norms()
    torch.testing.assert_close(padded, plain, rtol=1e-6, atol=0)


def test_pad_size():
    # float32 and 16-bit operands (promoted to float32 for the norms) are padded, float64 is not
    pad = registry.underflow_pad(torch.float32, 1024, 768)
    assert pad == 4 * torch.finfo(torch.float32).tiny * 1024 * 2 ** 20
    assert registry.underflow_pad(torch.bfloat16, 1024, 768) == pad
    assert registry.underflow_pad(torch.float32, 1024, 3 * 2 ** 20) == pad * 4  # width rounded up to 2^22
    assert registry.underflow_pad(torch.float64, 1024, 768) == 0.0
    assert pad < 1e-28  # absorbed by any diagonal an ordinary Gram holds
