"""User forward hooks and pre-hooks on tracked layers: the capture sees the inputs the layer's forward received
(after pre-hooks) and the output it returned (before forward hooks), so per-sample gradients stay exact
against the float64 oracle (which runs the model, hooks included). Hooks that dpengine cannot run after
its capture (global forward hooks, a hook prepended after make_private) are checked: left alone if they
leave the output as it is, refused if they change it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

from dpengine.grad_sample.controller import GradSampleController, GradSampleMode, LossReduction, PerSampleGradientError
from models import ScaleShift
from oracle import flat_norms, oracle_per_sample, rel_err

MODES = ["hooks", "ghost", "bk"]
TOL = 1e-10
F64 = torch.float64


def sum_mse(out: Tensor, y: Tensor) -> Tensor:
    return ((out - y) ** 2).sum()


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(F64)


def _data(b: int = 4):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 5, generator=g, dtype=F64), torch.randn(b, 3, generator=g, dtype=F64)


def _check(model: nn.Module, mode: str, hook_after=None, x=None, y=None) -> None:
    """The controller's norms and weighted sums against the oracle on ``model`` as it runs (hooks included).
    ``hook_after(model)`` registers hooks once the controller is in place (after make_private)."""
    if x is None:
        x, y = _data()
    ref, model = copy.deepcopy(model), copy.deepcopy(model)
    handles = hook_after(ref) if hook_after is not None else []
    try:
        ps = oracle_per_sample(ref, sum_mse, x, y)  # the model as it runs, hooks included
    finally:
        for h in handles:
            h.remove()
    w = torch.rand(x.shape[0], dtype=F64) + 0.5
    ctrl = GradSampleController(model, mode=GradSampleMode(mode), clip_factors=lambda n: w,
                                loss_reduction=LossReduction.SUM)
    handles = hook_after(model) if hook_after is not None else []
    try:
        ctrl.note_batch(x.shape[0])
        sum_mse(model(x), y).backward()
        names = {id(p): n for n, p in model.named_parameters()}
        sums = {names[id(p)]: t for p, t in ctrl.pop_clipped_sums().items()}
        assert rel_err(ctrl.last_norms, flat_norms(ps)) <= TOL
        ref_sums = {n: torch.einsum("b,b...->...", w, t) for n, t in ps.items()}
        scale = max(float(r.abs().max()) for r in ref_sums.values())
        for n, r in ref_sums.items():
            assert rel_err(sums[n], r, scale) <= TOL, n
    finally:
        for h in handles:
            h.remove()
        ctrl.detach()


def _squash(m, args, out):
    return torch.tanh(out) * 2.0


def _squash_kw(m, args, kwargs, out):
    return torch.tanh(out) * 2.0


def _shift_input(m, args):
    return (args[0] * 2.0 + 1.0,)


def _shift_input_kw(m, args, kwargs):
    if "input" in kwargs:
        return args, {"input": kwargs["input"] * 2.0 + 1.0}
    return (args[0] * 2.0 + 1.0,), kwargs


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("kind", ["output", "output-kwargs", "input", "input-kwargs", "both"])
def test_module_hooks_keep_per_sample_gradients_exact(mode, when, kind):
    def register(model):
        lin = model[0]
        handles = []
        if kind in ("output", "both"):
            handles.append(lin.register_forward_hook(_squash))
        if kind == "output-kwargs":
            handles.append(lin.register_forward_hook(_squash_kw, with_kwargs=True))
        if kind in ("input", "both"):
            handles.append(lin.register_forward_pre_hook(_shift_input))
        if kind == "input-kwargs":
            handles.append(lin.register_forward_pre_hook(_shift_input_kw, with_kwargs=True))
        handles.append(model[2].register_forward_hook(_squash))
        return handles

    model = _net()
    if when == "before":
        register(model)
        _check(model, mode)
    else:
        _check(model, mode, hook_after=register)


class KeywordNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(5, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(input=x)))


@pytest.mark.parametrize("mode", MODES)
def test_keyword_input_replaced_by_a_kwargs_pre_hook(mode):
    model = KeywordNet().to(F64)
    model.lin.register_forward_pre_hook(_shift_input_kw, with_kwargs=True)
    _check(model, mode)


@pytest.mark.parametrize("mode", MODES)
def test_fallback_layer_hooks_are_not_run_twice(mode):
    """A layer without a handler is re-run per sample by torch.func: through its forward alone, since the
    captured input already went through its pre-hooks and g is the gradient of the forward's own output."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), ScaleShift(4), nn.Linear(4, 3)).to(F64)
    model[1].register_forward_pre_hook(_shift_input)
    model[1].register_forward_hook(_squash)
    _check(model, mode)


@pytest.mark.parametrize("mode", MODES)
def test_global_hooks_that_leave_outputs_alone_are_exact(mode):
    seen = []

    def spy(m, args, out):
        seen.append(type(m).__name__)

    def register(model):
        return [register_module_forward_hook(spy), register_module_forward_pre_hook(
            lambda m, args: (args[0] * 2.0,) if isinstance(m, nn.Linear) else None)]

    _check(_net(), mode, hook_after=register)
    assert "Linear" in seen


@pytest.mark.parametrize("how", ["global", "global-inplace", "prepended", "prepended-inplace"])
def test_hooks_ahead_of_the_capture_that_change_the_output_are_refused(how):
    def change(m, args, out):
        if isinstance(m, nn.Linear):
            if how.endswith("inplace"):
                out.mul_(3.0)
                return None
            return out * 3.0

    def register(model):
        if how.startswith("global"):
            return [register_module_forward_hook(change)]
        return [model[0].register_forward_hook(change, prepend=True)]

    with pytest.raises(PerSampleGradientError, match="runs before dpengine's capture changed the output"):
        _check(_net(), "bk", hook_after=register)
    assert not torch.nn.modules.module._global_forward_hooks  # the watch removed itself


@pytest.mark.parametrize("mode", MODES)
def test_prepended_hook_that_leaves_the_output_alone_is_exact(mode):
    calls = []
    _check(_net(), mode, hook_after=lambda model: [
        model[0].register_forward_hook(lambda m, a, o: calls.append(1), prepend=True)])
    assert calls


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_model_with_a_user_output_hook_is_exact(fresh_dynamo):
    model = _net()
    model[0].register_forward_hook(_squash)
    model[0].register_forward_pre_hook(_shift_input)
    x, y = _data(6)
    ps = oracle_per_sample(copy.deepcopy(model), sum_mse, x, y)
    w = torch.rand(x.shape[0], dtype=F64) + 0.5
    ctrl = GradSampleController(model, mode=GradSampleMode.BK, clip_factors=lambda n: w,
                                loss_reduction=LossReduction.SUM)
    run = torch.compile(model, dynamic=True)
    ctrl.note_batch(x.shape[0])
    sum_mse(run(x), y).backward()
    names = {id(p): n for n, p in model.named_parameters()}
    sums = {names[id(p)]: t for p, t in ctrl.pop_clipped_sums().items()}
    assert rel_err(ctrl.last_norms, flat_norms(ps)) <= TOL
    for n, t in ps.items():
        assert rel_err(sums[n], torch.einsum("b,b...->...", w, t)) <= TOL, n
    ctrl.detach()


def test_compiled_model_with_a_global_forward_hook_is_refused(fresh_dynamo):
    model = _net()
    ctrl = GradSampleController(model, mode=GradSampleMode.BK, clip_factors=lambda n: torch.ones_like(n),
                                loss_reduction=LossReduction.SUM)
    handle = register_module_forward_hook(lambda m, a, o: None)
    try:
        x, y = _data(6)
        ctrl.note_batch(6)
        # dynamo traces the hooks: dpengine cannot watch the output there, so any hook ahead of it is refused
        with pytest.raises(Exception, match="before dpengine's capture"):
            sum_mse(torch.compile(model, dynamic=True)(x), y).backward()
    finally:
        handle.remove()
        ctrl.detach()
