"""fp16 with a fixed loss scale: ``make_private(loss_scale=2**k)``.

dpengine multiplies the gradient by the scale where it enters the model (the tensors the model returns)
and divides it out of the norms and the clipped sums, so fp16's backward keeps small gradients without
a GradScaler (whose scale and skipped steps are driven by single records, and which is refused).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from oracle import flat_norms, oracle_per_sample

from dpengine import PrivacyEngine
from dpengine.grad_sample.registry import PerSampleGradientError

CLIPPINGS = {"flat": {}, "per_layer": {}, "automatic": {}, "adaptive": {"unclipped_num_std": 2.0},
             "error_feedback": {}}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 3))


def _private(model: nn.Module, loss_scale: float, mode: str = "bk", clipping: str = "flat", sigma: float = 0.0,
             c: float = 0.5, ds: TensorDataset | None = None):
    ds = ds or TensorDataset(torch.randn(24, 5, 6), torch.randint(0, 3, (24, 5)))
    return PrivacyEngine(seed=0).make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=DataLoader(ds, batch_size=8),
        noise_multiplier=sigma, max_grad_norm=c, clipping=clipping, grad_sample_mode=mode, poisson_sampling=False,
        loss_scale=loss_scale, **CLIPPINGS[clipping])


def _token_ce(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), y.reshape(-1))


def _single_linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(6, 3)  # the model is itself a tracked layer: tapped first, then scaled


@pytest.mark.parametrize("build", [_model, _single_linear], ids=["mlp", "bare-linear"])
@pytest.mark.parametrize("clipping", sorted(CLIPPINGS))
@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk"])
def test_the_scale_is_divided_out_exactly(mode, clipping, build):
    """In float32 a power-of-two scale changes no bit: norms, clipped (and unclipped) sums and the update are
    those of the unscaled run, in every backend and clipping mode (per_layer takes the early path)."""
    runs = []
    for scale in (1.0, 2.0 ** 10):
        model, opt, dl = _private(build(), scale, mode, clipping)
        for x, y in dl:
            opt.zero_grad()
            _token_ce(model(x), y).backward()
            norms = opt.controller.last_norms.clone()
            sums = [t.clone() for t in opt.clipped_grads_for_debugging().values()]
            opt.step()
        runs.append((norms, sums, [p.detach().clone() for p in model.parameters()]))
    (n1, s1, p1), (n2, s2, p2) = runs
    assert torch.equal(n1, n2)
    assert all(torch.equal(a, b) for a, b in zip(s1, s2)) and all(torch.equal(a, b) for a, b in zip(p1, p2))


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk"])
def test_fp16_backward_keeps_small_gradients_with_a_scale(mode):
    """fp16 autocast with a loss 1e-6 times smaller than usual: unscaled, the fp16 backward loses most bits of
    the output gradients (subnormals) and the update is 9% off the float64 oracle; with loss_scale=2**20 it
    is off by fp16's ordinary rounding (4e-4, as for an unscaled loss of the usual size). The model's fp16
    output comes back in float32, so its gradient is scaled before it is rounded to 16 bits."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    loss_fn = lambda out, t: 1e-6 * F.cross_entropy(out.float(), t, reduction="sum")  # noqa: E731
    ps = oracle_per_sample(copy.deepcopy(base).double(), loss_fn, x.double(), y)
    norms = flat_norms(ps)
    c = float(norms.median())  # about half the samples clipped
    factors = (c / (norms + 1e-6)).clamp(max=1.0)
    ref = torch.cat([torch.einsum("b,b...->...", factors, ps[n]).flatten() for n, _ in base.named_parameters()])
    errors = {}
    for scale in (1.0, 2.0 ** 20):
        model = copy.deepcopy(base)
        model, opt, _ = PrivacyEngine(seed=0).make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(TensorDataset(x, y), batch_size=8), noise_multiplier=0.0, max_grad_norm=c,
            grad_sample_mode=mode, poisson_sampling=False, loss_reduction="sum", loss_scale=scale)
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(x)
        assert out.dtype == (torch.float16 if scale == 1.0 else torch.float32)
        loss_fn(out, y).backward()
        sums = opt.clipped_grads_for_debugging()
        got = torch.cat([sums[p].double().flatten() for p in model.parameters()])
        errors[scale] = float((got - ref).norm() / ref.norm())
    assert errors[1.0] > 0.05 and errors[2.0 ** 20] < 2e-3, errors


def test_privacy_holds_even_where_the_scale_never_reached_the_gradient():
    """The scale enters at the model's outputs; a gradient that does not come that way (here: the first
    layer's activation also feeds the loss directly) is divided by the scale all the same. It is then merely
    smaller: each sample's released contribution is still at most C (one-sample batches, sigma = 0)."""
    torch.manual_seed(0)
    seen = []
    for j in range(6):
        model = _model()
        inter = {}
        model[1].register_forward_hook(lambda m, a, o: inter.__setitem__("h", o))
        x, y = torch.randn(1, 6) * 10, torch.randint(0, 3, (1,))
        model, opt, _ = PrivacyEngine(seed=0).make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(TensorDataset(x, y), batch_size=1), noise_multiplier=0.0, max_grad_norm=0.5,
            poisson_sampling=False, loss_reduction="sum", loss_scale=2.0 ** 8)
        out = model(x)
        assert inter["h"].requires_grad  # the direct term reaches the first layer unscaled
        (F.cross_entropy(out, y, reduction="sum") + 1e3 * inter["h"].square().sum()).backward()
        released = torch.cat([t.flatten() for t in opt.clipped_grads_for_debugging().values()]).double().norm()
        seen.append(float(released))
    assert max(seen) <= 0.5 * (1 + 1e-6) and min(seen) > 0.45, seen  # clipped, and within C


def test_a_backward_that_misses_the_scaled_outputs_is_refused():
    """A loss computed only from an intermediate tensor never passes the scaled outputs: refused, naming
    the fix, and nothing reaches the update."""
    model = _model()
    inter = {}
    model[1].register_forward_hook(lambda m, a, o: inter.__setitem__("h", o))
    model, opt, dl = _private(model, 2.0 ** 8)
    x, _ = next(iter(dl))
    model(x)
    with pytest.raises(PerSampleGradientError, match="without passing through them.*drop loss_scale"):
        inter["h"].square().sum().backward()
    assert opt.clipped_grads_for_debugging() == {}


def test_an_overflow_masks_the_step_and_names_the_scale():
    """An fp16 gradient that overflows (scale far too large) gives a non-finite norm: the step changes no
    parameter and the error says to lower loss_scale."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(8, 6) * 100, torch.randint(0, 3, (8,))
    model, opt, _ = PrivacyEngine(seed=0).make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=8), noise_multiplier=1.0, max_grad_norm=1.0,
        poisson_sampling=False, loss_scale=2.0 ** 32)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cpu", dtype=torch.float16):
        out = model(x)
    F.cross_entropy(out.float(), y).backward()
    opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    with pytest.raises(PerSampleGradientError, match="lower loss_scale"):
        opt.check_finite()


def test_bad_scales_and_combinations_are_refused():
    for bad in (3.0, 0.5, float("inf"), 0, True):
        with pytest.raises(ValueError, match="power of two"):
            _private(_model(), bad)
    with pytest.raises(ValueError, match="fused"):
        _private(_model(), 2.0 ** 8, mode="fused")



@pytest.mark.parametrize("scale", [1.0, 2.0 ** 8])
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_an_input_gradient_pass_is_dropped_not_refused(clipping, scale):
    """torch.autograd.grad from an intermediate tensor (not the training backward) never reaches the update:
    with a loss scale it is dropped as always, not refused, and the training backward over the same retained
    graph gives exactly the sums it gives alone. (With per_layer clipping that pass used to reduce a layer
    early and release its record, so the training backward crashed on an empty record.)"""
    sums = []
    for extra_pass in (False, True):
        model = _model()
        inter = {}
        model[1].register_forward_hook(lambda m, a, o: inter.__setitem__("h", o))
        model, opt, dl = _private(model, scale, clipping=clipping)
        x, y = next(iter(dl))
        x = x.clone().requires_grad_(True)
        out = model(x)
        if extra_pass:
            torch.autograd.grad(inter["h"].square().sum(), x, retain_graph=True)
        _token_ce(out, y).backward()
        sums.append([t.clone() for t in opt.clipped_grads_for_debugging().values()])
        assert opt.controller.skipped_backwards == int(extra_pass)
    assert all(torch.equal(a, b) for a, b in zip(*sums))


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk"])
def test_the_largest_scale_still_clips_and_a_larger_one_is_refused(mode):
    """S^-2 multiplies the float32 squared norms: from S = 2**75 it rounded to 0, every norm read 0 and the
    gradient went out unclipped. Scales are capped at 2**32; at the cap a record is still clipped to C."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(1, 4), torch.randn(1, 3)
    c = 1e-5
    with pytest.raises(ValueError, match=r"power of two in \[1, 2\*\*32\]"):
        PrivacyEngine(seed=0).make_private(
            module=nn.Linear(4, 3), optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
            data_loader=DataLoader(TensorDataset(x, y), batch_size=1), noise_multiplier=0.0, max_grad_norm=c,
            poisson_sampling=False, loss_scale=2.0 ** 33)
    model, opt, dl = PrivacyEngine(seed=0).make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=1), noise_multiplier=0.0, max_grad_norm=c,
        grad_sample_mode=mode, poisson_sampling=False, loss_reduction="sum", loss_scale=2.0 ** 32)
    for xb, yb in dl:
        ((model(xb) - yb) ** 2).sum().backward()
        assert float(opt.controller.last_norms[0]) > 5 * c  # the record must be clipped
        released = sum(float(t.double().pow(2).sum()) for t in opt.clipped_grads_for_debugging().values()) ** 0.5
        assert released <= c * (1 + 1e-5)
        opt.step()
