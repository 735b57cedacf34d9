"""make_private(clipping="lipschitz"): no per-sample work, noise per parameter scaled to analytic bounds."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpengine import PrivacyEngine
from dpengine.grad_sample.registry import PerSampleGradientError
from dpengine.lipschitz import (GroupSort, InputNormClip, SpectralLinear, TemperatureCrossEntropy,
                                per_sample_gradient_bounds)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(InputNormClip(2.0), SpectralLinear(6, 8, dtype=torch.float64), GroupSort(2),
                         SpectralLinear(8, 3, dtype=torch.float64))


def _data(n=24):
    return TensorDataset(torch.randn(n, 6, dtype=torch.float64) * 3, torch.randint(0, 3, (n,)))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_release_is_the_plain_gradient_rescaled_and_the_weights_stay_constrained(reduction):
    loss = TemperatureCrossEntropy(0.5, reduction=reduction)
    model, ref = _net(), _net()
    ds = _data()
    engine = PrivacyEngine(seed=0)
    model, opt, dl = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), data_loader=DataLoader(ds, batch_size=24),
        noise_multiplier=0.0, clipping="lipschitz", loss_lipschitz=loss.lipschitz, loss_reduction=reduction)
    for x, y in dl:  # q = 1: the whole data set
        opt.zero_grad()
        loss(model(x), y).backward()
        opt.step()
    TemperatureCrossEntropy(0.5, reduction="sum")(ref(x), y).backward()
    scale = 1.0 if reduction == "sum" else 1.0 / 24  # the private mean divides by the expected batch size
    for p, r in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p.grad, r.grad * scale, rtol=1e-12, atol=1e-15)
    assert engine.accountant.history[-1][:2] == (0.0, 1.0)


def test_noise_per_parameter_follows_the_bounds_and_the_step_is_one_gaussian_with_sigma():
    loss = TemperatureCrossEntropy(1.0, reduction="sum")
    model = _net()
    bounds = per_sample_gradient_bounds(model, math.inf, loss.lipschitz)
    engine = PrivacyEngine(seed=0)
    model, opt, dl = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), data_loader=DataLoader(_data(), batch_size=4),
        noise_multiplier=1.3, clipping="lipschitz", loss_lipschitz=loss.lipschitz, loss_reduction="sum")
    params = [p for p in model.parameters()]
    stds = opt.policy.noise_stds(params, 1.3)
    b = [bounds[n] * (1 + 1e-5) for n, _ in model.named_parameters()]
    # whitened sensitivity sqrt(sum b_p^2 / s_p^2) is exactly 1 / sigma: one Gaussian with multiplier sigma
    assert math.sqrt(sum(bi ** 2 / si ** 2 for bi, si in zip(b, stds))) == pytest.approx(1 / 1.3, rel=1e-12)
    # and the noise actually drawn has those stds (sigma = 1.3, sum loss): measured on the weights
    draws = {id(p): [] for p in params}
    for _ in range(60):
        for x, y in dl:
            opt.zero_grad()
            (0.0 * model(x).sum()).backward()  # zero gradient: p.grad is the noise alone
            opt.step()
            for p in params:
                draws[id(p)].append(p.grad.flatten().clone())
    for p, s in zip(params, stds):
        got = torch.cat(draws[id(p)]).std().item()
        n = torch.cat(draws[id(p)]).numel()
        assert abs(got / s - 1) < 5 / math.sqrt(2 * n), (got, s, n)  # 5 standard errors


def test_a_model_that_is_not_lipschitz_is_refused_and_max_grad_norm_is_refused():
    plain = nn.Sequential(nn.Linear(6, 3)).double()
    with pytest.raises(ValueError, match="SpectralLinear"):
        PrivacyEngine().make_private(module=plain, optimizer=torch.optim.SGD(plain.parameters(), lr=0.1),
                                     data_loader=DataLoader(_data(), batch_size=4), noise_multiplier=1.0,
                                     clipping="lipschitz", loss_lipschitz=1.0)
    model = _net()
    with pytest.raises(ValueError, match="drop max_grad_norm"):
        PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                     data_loader=DataLoader(_data(), batch_size=4), noise_multiplier=1.0,
                                     max_grad_norm=1.0, clipping="lipschitz", loss_lipschitz=1.0)


def test_weights_changed_outside_the_projection_refuse_the_step():
    loss = TemperatureCrossEntropy(1.0, reduction="sum")
    model = _net()
    engine = PrivacyEngine(seed=0)
    model, opt, dl = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=DataLoader(_data(), batch_size=4),
        noise_multiplier=1.0, clipping="lipschitz", loss_lipschitz=loss.lipschitz, loss_reduction="sum")
    x, y = next(iter(dl))
    with torch.no_grad():
        model[1].weight.mul_(10.0)  # breaks ||W||_2 <= 1
    loss(model(x), y).backward()
    with pytest.raises(RuntimeError, match="Lipschitz constraints"):
        opt.step()


# ------------------------------------------------------------------ exact float32 arithmetic
def _tight_case(autocast: bool) -> float:
    """max ||per-sample weight gradient|| / its analytic bound on inputs that make the bound tight (a single
    orthogonal layer, inputs of norm 1 whose logits point away from the label, a saturating temperature)."""
    torch.manual_seed(0)
    model = nn.Sequential(InputNormClip(1.0), SpectralLinear(64, 64, bias=False))
    loss = TemperatureCrossEntropy(1e-3)
    bound = per_sample_gradient_bounds(model, math.inf, loss.lipschitz)["1.weight"]
    w = model[1].weight.detach()
    worst = 0.0
    for _ in range(50):
        y = torch.randint(0, 64, (1,))
        e = torch.zeros(1, 64)
        e[0, (y + 1) % 64], e[0, y] = 1.0, -1.0
        x = (e @ w) * 3 + 1e-3 * torch.randn(1, 64)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        loss(out.float(), y).backward()
        worst = max(worst, model[1].weight.grad.double().norm().item() / bound)
    return worst


def test_the_analytic_bound_needs_exact_float32_so_reduced_precision_is_refused(restore_fp32_switches):
    """The bound is tight to float32 rounding (within its 1e-5 slack) in float32, and exceeded by about
    1.7e-3 under bf16 autocast: a private Lipschitz run refuses autocast, reduced-precision float32 math and
    bf16 parameters, with the fix named; evaluation under autocast (no grad) stays allowed."""
    assert 0.999 < _tight_case(autocast=False) <= 1 + 1e-5
    assert _tight_case(autocast=True) > 1 + 1e-4
    loss = TemperatureCrossEntropy(0.5)
    model = _net().float()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt, dl = PrivacyEngine(seed=0).make_private(
        module=model, optimizer=opt, data_loader=DataLoader(TensorDataset(torch.randn(24, 6), torch.randint(0, 3, (24,))),
                                                            batch_size=4),
        noise_multiplier=1.0, clipping="lipschitz", loss_lipschitz=loss.lipschitz)
    x, y = next(x for x in dl if len(x[0]))
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="torch.autocast.*float32"):
        model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        model(x)  # evaluation: nothing is differentiated
    torch.set_float32_matmul_precision("medium")  # oneDNN's bf16 float32 math on CPUs that have it
    with pytest.raises(RuntimeError, match="mkldnn.matmul=bf16.*highest"):
        model(x)
    torch.set_float32_matmul_precision("highest")
    torch.backends.mkldnn.conv.fp32_precision = "bf16"  # only convolutions reduced: a Linear-only model is exact
    loss(model(x), y).backward()
    opt.step()  # exact float32: trains
    half = _net().to(torch.bfloat16)
    half_opt = torch.optim.SGD(half.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="bfloat16 parameters"):
        PrivacyEngine().make_private(module=half, optimizer=half_opt, data_loader=DataLoader(_data(), batch_size=4),
                                     noise_multiplier=1.0, clipping="lipschitz", loss_lipschitz=loss.lipschitz)
    assert not half_opt._optimizer_step_post_hooks and not half._forward_hooks  # refused: nothing attached


def test_a_given_input_bound_is_checked_on_every_differentiated_forward():
    """Without an InputNormClip the bounds rest on the user's input_bound: a batch with a sample above it is
    refused before any gradient exists; inputs within it train; evaluation is not checked."""
    torch.manual_seed(0)
    model = nn.Sequential(SpectralLinear(6, 8, dtype=torch.float64), GroupSort(2), SpectralLinear(8, 3, dtype=torch.float64))
    x = torch.randn(24, 6, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True) * 0.9  # every input norm 0.9 <= 1
    loss = TemperatureCrossEntropy(0.5)
    model, opt, dl = PrivacyEngine(seed=0).make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(x, torch.randint(0, 3, (24,))), batch_size=6), noise_multiplier=1.0,
        clipping="lipschitz", loss_lipschitz=loss.lipschitz, input_bound=1.0)
    xb, yb = next(b for b in dl if len(b[0]))
    loss(model(xb), yb).backward()
    opt.step()
    big = xb.clone()
    big[0] *= 2.0  # norm 1.8 > 1
    with pytest.raises(ValueError, match="input_bound=1.*norm 1.8.*InputNormClip"):
        model(big)
    with pytest.raises(ValueError, match="input_bound=1.*norm 1.8"):
        model(input=big)  # by keyword: found all the same
    with torch.no_grad():
        model(big)


def test_reduced_precision_is_judged_per_layer_kind(restore_fp32_switches):
    """A constrained Linear cares about float32 products, a constrained Conv2d about convolutions: cuDNN's
    default TF32 convolutions do not refuse a Lipschitz MLP on a GPU, and do refuse a conv layer."""
    from dpengine.lipschitz import SpectralConv2d, _check_exact_fp32

    conv, lin = SpectralConv2d(1, 2, 3), SpectralLinear(4, 4)
    torch.backends.mkldnn.conv.fp32_precision = "bf16"
    _check_exact_fp32(lin, (torch.randn(2, 4),))
    with pytest.raises(RuntimeError, match="mkldnn.conv=bf16"):
        _check_exact_fp32(conv, (torch.randn(2, 1, 5, 5),))
    torch.backends.mkldnn.conv.fp32_precision = "ieee"
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    _check_exact_fp32(conv, (torch.randn(2, 1, 5, 5),))
    with pytest.raises(RuntimeError, match="mkldnn.matmul=bf16"):
        _check_exact_fp32(lin, (torch.randn(2, 4),))


@pytest.mark.parametrize("penalty", [
    lambda m: 50.0 * sum((p ** 2).sum() for p in m.parameters()),  # weight decay written into the loss
    lambda m: m[1].weight.abs().sum(),  # one parameter read outside its layer
])
def test_a_parameter_used_outside_its_layer_is_refused_as_in_the_per_sample_modes(penalty):
    """The bounds cover each sample's gradient through the network; a penalty's gradient (the same for every
    sample, released B times over and not covered) came out with the release. The per-sample modes refuse
    it; so does this one, with the same check and message, before anything is released or accounted."""
    loss = TemperatureCrossEntropy(1.0)
    model = _net()
    engine = PrivacyEngine(seed=0)
    model, opt, dl = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=DataLoader(_data(), batch_size=6),
        noise_multiplier=1.0, clipping="lipschitz", loss_lipschitz=loss.lipschitz)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = next(iter(DataLoader(_data(), batch_size=6)))  # a probe batch: the private loader's would be a step
    opt.zero_grad()
    with pytest.raises(PerSampleGradientError, match=r"'1\.weight' received an ordinary \(non-private\) gradient"):
        (loss(model(x), y) + penalty(model)).backward()
    assert engine.controller.peek_clipped_sums() == {}  # nothing summed for the step
    assert engine.accountant.total_steps == 0
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    # the loss alone trains as before
    for x, y in dl:
        opt.zero_grad()
        loss(model(x), y).backward()
        opt.step()
    assert engine.accountant.total_steps == len(dl)

