"""Every per-sample quantity against the torch.func oracle, float64, relative error <= 1e-10."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from models import SharedLayerNet, TinyCNN, TinyGPT, seq_ce
from oracle import flat_norms, oracle_per_sample, rel_err, run_controller

MODES = ["hooks", "ghost", "bk"]
TOL = 1e-10


def _check(model, loss_mean, loss_sum, x, y, mode, reduction):
    model = model.double()
    loss = loss_mean if reduction == "mean" else loss_sum
    ps = oracle_per_sample(model, loss, x, y)
    b = x.shape[0]
    w = torch.rand(b, dtype=torch.float64) + 0.5  # generic weights probe every per-sample gradient
    sums, norms = run_controller(model, loss, x, y, mode=mode, reduction=reduction, factors=lambda n: w)
    assert rel_err(norms, flat_norms(ps)) <= TOL
    assert set(sums) == set(ps)
    ref = {name: torch.einsum("b,b...->...", w, t) for name, t in ps.items()}
    scale = max(float(r.abs().max()) for r in ref.values())
    for name, r in ref.items():
        assert rel_err(sums[name], r, scale) <= TOL, name
    # one-hot factors isolate a single sample's gradient
    j = b - 1
    onehot = torch.zeros(b, dtype=torch.float64)
    onehot[j] = 1.0
    sums, _ = run_controller(model, loss, x, y, mode=mode, reduction=reduction, factors=lambda n: onehot)
    scale = max(float(t[j].abs().max()) for t in ps.values())
    for name, t in ps.items():
        assert rel_err(sums[name], t[j], scale) <= TOL, name


def ce(reduction):
    return lambda out, y: F.cross_entropy(out, y, reduction=reduction)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mlp(mode, reduction):
    model = nn.Sequential(nn.Linear(7, 5), nn.ReLU(inplace=True), nn.Linear(5, 3))
    x, y = torch.randn(6, 7, dtype=torch.float64), torch.randint(0, 3, (6,))
    _check(model, ce("mean"), ce("sum"), x, y, mode, reduction)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gpt_tied_padding_expanded_positions(mode, reduction):
    model = TinyGPT(vocab=11, d=8, heads=2, layers=2, padding_idx=0, tie=True)
    x = torch.randint(0, 11, (4, 9))
    x[:, -2:] = 0  # padding tokens
    y = torch.randint(0, 11, (4, 9))
    _check(model, seq_ce("mean"), seq_ce("sum"), x, y, mode, reduction)


@pytest.mark.parametrize("mode", MODES)
def test_gpt_untied_long_sequence_uses_materialized_norms(mode):
    # T = 20 > sqrt(p*d/2) for the narrow layers: bk materializes there, ghost stays Gram
    model = TinyGPT(vocab=13, d=4, heads=1, layers=1, max_len=24, padding_idx=None, tie=False)
    x, y = torch.randint(0, 13, (3, 20)), torch.randint(0, 13, (3, 20))
    _check(model, seq_ce("mean"), seq_ce("sum"), x, y, mode, "mean")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_cnn_groups_dilation_padding_modes(mode, dim):
    model = TinyCNN(dim=dim)
    spatial = {1: (11,), 2: (9, 7), 3: (5, 6, 5)}[dim]
    x, y = torch.randn(3, 3, *spatial, dtype=torch.float64), torch.randint(0, 3, (3,))
    _check(model, ce("mean"), ce("sum"), x, y, mode, "mean")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_shared_layer_fallback_and_prelu(mode, reduction):
    x, y = torch.randn(5, 5, dtype=torch.float64), torch.randint(0, 3, (5,))
    _check(SharedLayerNet(), ce("mean"), ce("sum"), x, y, mode, reduction)


@pytest.mark.parametrize("mode", MODES)
def test_batch_of_one(mode):
    model = TinyGPT(vocab=7, d=4, heads=1, layers=1)
    x, y = torch.randint(0, 7, (1, 5)), torch.randint(0, 7, (1, 5))
    _check(model, seq_ce("mean"), seq_ce("sum"), x, y, mode, "mean")


@pytest.mark.parametrize("mode", MODES)
def test_frozen_parameters_are_skipped(mode):
    model = TinyGPT(vocab=7, d=4, heads=1, layers=1, tie=False)
    model.tok.requires_grad_(False)
    model.blocks[0].qkv.weight.requires_grad_(False)
    x, y = torch.randint(0, 7, (3, 5)), torch.randint(0, 7, (3, 5))
    _check(model, seq_ce("mean"), seq_ce("sum"), x, y, mode, "mean")


@pytest.mark.parametrize("mode", MODES)
def test_empty_batch(mode):
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2)).double()
    x, y = torch.randn(0, 4, dtype=torch.float64), torch.randint(0, 2, (0,))
    sums, norms = run_controller(model, ce("sum"), x, y, mode=mode, reduction="sum", factors=lambda n: n)
    assert norms.shape == (0,)
    for name, p in model.named_parameters():
        assert torch.equal(sums[name], torch.zeros_like(p))


# ---------------------------------------------------------------------- randomized shapes (hypothesis)
@settings(max_examples=12, deadline=None)
@given(b=st.integers(1, 5), t=st.integers(1, 6), d=st.integers(1, 7), p=st.integers(1, 7),
       extra=st.booleans(), bias=st.booleans(), mode=st.sampled_from(MODES), red=st.sampled_from(["mean", "sum"]))
def test_linear_random_shapes(b, t, d, p, extra, bias, mode, red):
    model = nn.Sequential(nn.Linear(d, p, bias=bias), nn.Tanh(), nn.Linear(p, 3))
    shape = (b, t, 2, d) if extra else (b, t, d)
    x, y = torch.randn(*shape, dtype=torch.float64), torch.randint(0, 3, shape[:-1])
    _check(model, seq_ce("mean"), seq_ce("sum"), x, y, mode, red)


@settings(max_examples=12, deadline=None)
@given(b=st.integers(1, 4), cin=st.sampled_from([2, 4]), groups=st.sampled_from([1, 2]), k=st.integers(1, 3),
       stride=st.integers(1, 2), dil=st.integers(1, 2), pad=st.sampled_from([0, 1, "same", "valid"]),
       h=st.integers(5, 8), w=st.integers(5, 7), mode=st.sampled_from(MODES))
def test_conv2d_random_shapes(b, cin, groups, k, stride, dil, pad, h, w, mode):
    if pad == "same":
        stride = 1  # PyTorch forbids strided 'same'
    model = nn.Sequential(nn.Conv2d(cin, 4, k, stride=stride, padding=pad, dilation=dil, groups=groups),
                          nn.Flatten(2), nn.Tanh())
    x = torch.randn(b, cin, h, w, dtype=torch.float64)
    head = nn.Linear(4, 3)
    net = nn.Sequential(model, _MeanPool(), head)
    y = torch.randint(0, 3, (b,))
    _check(net, ce("mean"), ce("sum"), x, y, mode, "mean")


class _MeanPool(nn.Module):
    def forward(self, x):
        return x.mean(-1)


@settings(max_examples=10, deadline=None)
@given(b=st.integers(1, 4), t=st.integers(1, 7), v=st.integers(2, 9), d=st.integers(1, 5),
       pad=st.booleans(), mode=st.sampled_from(MODES))
def test_embedding_random_shapes(b, t, v, d, pad, mode):
    model = nn.Sequential(nn.Embedding(v, d, padding_idx=0 if pad else None), nn.Linear(d, 3))
    x, y = torch.randint(0, v, (b, t)), torch.randint(0, 3, (b, t))
    _check(model, seq_ce("mean"), seq_ce("sum"), x, y, mode, "sum")


def test_embedding_padding_row_gets_zero_gradient():
    model = nn.Sequential(nn.Embedding(5, 3, padding_idx=2), nn.Linear(3, 2)).double()
    x, y = torch.full((3, 4), 2), torch.randint(0, 2, (3, 4))
    x[0, 0] = 1
    sums, _ = run_controller(model, seq_ce("sum"), x, y, mode="bk", reduction="sum", factors=lambda n: torch.ones_like(n))
    assert torch.equal(sums["0.weight"][2], torch.zeros(3, dtype=torch.float64))
    assert sums["0.weight"][1].abs().sum() > 0


# ---------------------------------------------------------------------- clipping bound (property)
@settings(max_examples=15, deadline=None)
@given(scale=st.floats(1e-3, 1e3), c=st.floats(1e-2, 10.0), mode=st.sampled_from(MODES))
def test_each_clipped_contribution_has_norm_at_most_C(scale, c, mode):
    from dpengine.clipping import FlatClipping

    policy = FlatClipping(c)
    model = TinyGPT(vocab=9, d=4, heads=1, layers=1).double()
    x, y = torch.randint(0, 9, (3, 6)), torch.randint(0, 9, (3, 6))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale ** 0.5)
    for j in range(3):
        def factors(n, j=j):
            f = policy.factors(n)
            mask = torch.zeros_like(f)
            mask[j] = 1.0
            return f * mask
        sums, _ = run_controller(model, seq_ce("mean"), x, y, mode=mode, reduction="mean", factors=factors)
        total = torch.sqrt(sum(t.pow(2).sum() for t in sums.values()))
        assert float(total) <= c * (1 + 1e-9)


@pytest.mark.parametrize("impl", ["grouped", "im2col"])
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_conv_per_sample_implementations_agree_with_oracle(impl, dim):
    from dpengine.grad_sample import conv as conv_mod
    from dpengine.grad_sample.registry import Record

    layer = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim](4, 6, 3, stride=2, padding=1, dilation=1, groups=2,
                                                             padding_mode="circular" if dim < 3 else "zeros").double()
    x = torch.randn(3, 4, *([7] * dim), dtype=torch.float64)
    out = layer(x)
    g = torch.randn_like(out)
    rec = Record((x,), {}, g)
    handler = conv_mod.ConvHandler()
    got = handler._ps_grouped(layer, rec) if impl == "grouped" else handler._ps_im2col(layer, rec)
    from torch.func import functional_call, grad, vmap

    def f(w, xi, gi):
        return (functional_call(layer, {"weight": w, "bias": layer.bias}, (xi[None],)) * gi[None]).sum()

    ref = vmap(grad(f), in_dims=(None, 0, 0))(layer.weight.detach(), x, g)
    assert rel_err(got, ref) <= TOL


@settings(max_examples=12, deadline=None)
@given(b=st.integers(1, 4), dim=st.sampled_from([1, 3]), cin=st.sampled_from([2, 4]), groups=st.sampled_from([1, 2]),
       k=st.integers(1, 3), stride=st.integers(1, 2), dil=st.integers(1, 2), pad=st.sampled_from([0, 1, "same"]),
       size=st.integers(5, 7), mode=st.sampled_from(MODES), red=st.sampled_from(["mean", "sum"]))
def test_conv1d_conv3d_random_shapes(b, dim, cin, groups, k, stride, dil, pad, size, mode, red):
    if pad == "same":
        stride = 1
    conv = {1: nn.Conv1d, 3: nn.Conv3d}[dim](cin, 4, k, stride=stride, padding=pad, dilation=dil, groups=groups)
    net = nn.Sequential(conv, nn.Flatten(2), nn.Tanh(), _MeanPool(), nn.Linear(4, 3))
    x, y = torch.randn(b, cin, *([size] * dim), dtype=torch.float64), torch.randint(0, 3, (b,))
    _check(net, ce("mean"), ce("sum"), x, y, mode, red)


@settings(max_examples=16, deadline=None)
@given(b=st.integers(1, 4), kind=st.sampled_from(["layer", "rms", "group", "instance1", "instance2"]),
       c=st.sampled_from([2, 4, 6]), length=st.integers(1, 5), mode=st.sampled_from(MODES),
       red=st.sampled_from(["mean", "sum"]))
def test_norm_layers_random_shapes(b, kind, c, length, mode, red):
    if kind in ("layer", "rms"):
        norm = nn.LayerNorm(c) if kind == "layer" else nn.RMSNorm(c)
        x = torch.randn(b, length, c, dtype=torch.float64)
        net = nn.Sequential(nn.Linear(c, c), norm, nn.Tanh(), _MeanPool1(), nn.Linear(c, 3))
    else:
        norm = {"group": nn.GroupNorm(2, c), "instance1": nn.InstanceNorm1d(c, affine=True),
                "instance2": nn.InstanceNorm2d(c, affine=True)}[kind]
        shape = (b, c, length + 1) if kind != "instance2" else (b, c, length + 1, 3)
        x = torch.randn(*shape, dtype=torch.float64)
        net = nn.Sequential(norm, nn.Flatten(2), nn.Tanh(), _MeanPool(), nn.Linear(c, 3))
    with torch.no_grad():  # non-trivial affine parameters
        for p in norm.parameters():
            p.normal_()
    y = torch.randint(0, 3, (b,))
    _check(net, ce("mean"), ce("sum"), x, y, mode, red)


class _MeanPool1(nn.Module):
    def forward(self, x):
        return x.mean(1)
