"""dpengine.lipschitz: analytic per-sample gradient bounds of Lipschitz networks (clipless DP-SGD).

The oracle is brute force in float64: each sample's loss differentiated on its own, so the per-sample
gradient norms the bounds must cover are measured, not derived. Models get random (projected) weights,
biases pushed to their norm bound, and inputs at scales far above and below the InputNormClip radius.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from dpengine.lipschitz import (
    GroupSort,
    InputNormClip,
    MulticlassHinge,
    SpectralConv2d,
    SpectralLinear,
    TemperatureCrossEntropy,
    attach_projection,
    check_lipschitz_model,
    constraint_violations,
    conv2d_lipschitz_bound,
    conv_overlap,
    per_sample_gradient_bounds,
    project_,
    spectral_norm_upper_bound,
    total_gradient_bound,
)
from dpengine.lipschitz import _shrink_until

F64 = torch.float64
TOL = 1e-9  # relative: float64 rounding of the forward/backward, far below any real violation


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny float64 problems: a second BLAS thread only adds contention (10x slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------ helpers
def per_sample_grad_norms(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """(B,) gradient norm per trainable parameter, each sample's loss differentiated alone."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(loss_fn(model(x[i:i + 1]), y[i:i + 1]), params, allow_unused=True)
        rows.append([0.0 if g is None else g.norm().item() for g in grads])
    table = torch.tensor(rows, dtype=F64)
    return {n: table[:, j] for j, n in enumerate(names)}


@torch.no_grad()
def randomize_(model: nn.Module, weight_scale: float, bias_scale: float) -> None:
    """Random weights and biases, then projected: large scales put the constraints at their bounds."""
    for m in model.modules():
        if isinstance(m, (SpectralLinear, SpectralConv2d)):
            m.weight.normal_(0.0, weight_scale)
            if m.bias is not None:
                m.bias.normal_(0.0, bias_scale)
    project_(model)


def make_loss(kind: str, param: float) -> nn.Module:
    return MulticlassHinge(margin=param) if kind == "hinge" else TemperatureCrossEntropy(temperature=param)


def assert_within(norms: dict[str, Tensor], bounds: dict[str, float]) -> dict[str, float]:
    """Every per-sample norm <= its bound; returns the largest norm / bound ratio per parameter."""
    assert norms.keys() == bounds.keys()
    ratios = {}
    for name, b in bounds.items():
        worst = norms[name].max().item()
        assert worst <= b * (1 + TOL), f"{name}: per-sample gradient norm {worst} exceeds the bound {b}"
        ratios[name] = worst / b
    return ratios


def spectral_norm64(weight: Tensor) -> float:
    return torch.linalg.matrix_norm(weight.detach().reshape(weight.shape[0], -1).to(F64), ord=2).item()


def conv_matrix(weight: Tensor, shape: tuple[int, int, int], stride: int, padding: int, dilation: int) -> Tensor:
    """The conv (no bias) as an explicit (out_numel, in_numel) matrix, from the images of the unit basis."""
    n = math.prod(shape)
    basis = torch.eye(n, dtype=F64).reshape(n, *shape)
    return F.conv2d(basis, weight, None, stride, padding, dilation).reshape(n, -1).T


def conv_adjoint(u: Tensor, weight: Tensor, in_shape: torch.Size, stride: int, padding: int, dilation: int) -> Tensor:
    """A^T u for A = conv2d: the transposed conv, padded on the far side back to the input's size."""
    k = weight.shape[-2:]
    reached = [(u.shape[2 + i] - 1) * stride - 2 * padding + dilation * (k[i] - 1) + 1 for i in range(2)]
    extra = (in_shape[2] - reached[0], in_shape[3] - reached[1])
    return F.conv_transpose2d(u, weight, None, stride, padding, extra, 1, dilation)


scales = st.sampled_from([1e-3, 0.3, 1.0, 10.0, 1e3])


# ------------------------------------------------------------------------- bounds hold (property)
@settings(max_examples=30, deadline=None)
@given(widths=st.lists(st.sampled_from([2, 4, 6]), min_size=1, max_size=3), d_in=st.integers(1, 7),
       classes=st.integers(2, 5), bias=st.booleans(), act=st.sampled_from(["groupsort", "relu", "tanh"]),
       max_norm=st.floats(0.1, 10.0), x_scale=scales, w_scale=scales, bias_bound=st.floats(0.1, 5.0),
       loss=st.sampled_from(["hinge", "ce"]), loss_param=st.floats(0.05, 20.0), seed=st.integers(0, 2**16))
def test_mlp_per_sample_gradients_within_bounds(widths, d_in, classes, bias, act, max_norm, x_scale, w_scale,
                                                bias_bound, loss, loss_param, seed):
    torch.manual_seed(seed)
    acts = {"groupsort": GroupSort, "relu": nn.ReLU, "tanh": nn.Tanh}
    layers: list[nn.Module] = [InputNormClip(max_norm)]
    for a, b in zip([d_in, *widths], widths):
        layers += [SpectralLinear(a, b, bias, bias_bound=bias_bound, dtype=F64), acts[act]()]
    layers.append(SpectralLinear(widths[-1], classes, bias, bias_bound=bias_bound, dtype=F64))
    model = nn.Sequential(*layers)
    randomize_(model, w_scale, 10 * bias_bound)
    loss_fn = make_loss(loss, loss_param)
    x = torch.randn(8, d_in, dtype=F64) * x_scale
    y = torch.randint(0, classes, (8,))

    bounds = per_sample_gradient_bounds(model, math.inf, loss_fn.lipschitz)
    assert_within(per_sample_grad_norms(model, loss_fn, x, y), bounds)


@settings(max_examples=30, deadline=None)
@given(c_in=st.sampled_from([1, 2]), hw=st.integers(3, 7), c_mid=st.sampled_from([2, 4]), k=st.integers(1, 3),
       stride=st.integers(1, 3), padding=st.integers(0, 2), dilation=st.integers(1, 2), bias=st.booleans(),
       second_conv=st.booleans(), max_norm=st.floats(0.1, 10.0), x_scale=scales, w_scale=scales,
       loss=st.sampled_from(["hinge", "ce"]), loss_param=st.floats(0.05, 20.0), seed=st.integers(0, 2**16))
def test_conv_per_sample_gradients_within_bounds(c_in, hw, c_mid, k, stride, padding, dilation, bias, second_conv,
                                                 max_norm, x_scale, w_scale, loss, loss_param, seed):
    torch.manual_seed(seed)
    convs: list[nn.Module] = [SpectralConv2d(c_in, c_mid, k, stride, padding, dilation, bias, dtype=F64), GroupSort()]
    if second_conv:
        convs += [SpectralConv2d(c_mid, c_mid, 2, 1, 1, 1, bias, dtype=F64), nn.ReLU()]
    probe = torch.zeros(1, c_in, hw, hw, dtype=F64)
    try:
        flat = nn.Sequential(*convs, nn.Flatten())(probe).shape[1]
    except RuntimeError:  # kernel larger than the (padded) image
        return
    model = nn.Sequential(InputNormClip(max_norm), *convs, nn.Flatten(), SpectralLinear(flat, 3, bias, dtype=F64))
    randomize_(model, w_scale, 10.0)
    loss_fn = make_loss(loss, loss_param)
    x = torch.randn(8, c_in, hw, hw, dtype=F64) * x_scale
    y = torch.randint(0, 3, (8,))

    bounds = per_sample_gradient_bounds(model, math.inf, loss_fn.lipschitz, input_shape=(c_in, hw, hw))
    assert_within(per_sample_grad_norms(model, loss_fn, x, y), bounds)


def test_finite_input_bound_without_clip_layer():
    """The caller's input_bound replaces InputNormClip when the data are known to be bounded."""
    model = nn.Sequential(SpectralLinear(5, 4, dtype=F64), GroupSort(), SpectralLinear(4, 3, dtype=F64))
    randomize_(model, 1.0, 5.0)
    x = torch.randn(16, 5, dtype=F64)
    x = x / x.norm(dim=1, keepdim=True) * 2.5
    loss_fn = MulticlassHinge(margin=5.0)
    bounds = per_sample_gradient_bounds(model, 2.5, loss_fn.lipschitz)
    assert bounds == pytest.approx({"0.weight": math.sqrt(2) * 2.5, "0.bias": math.sqrt(2),
                                    "2.weight": math.sqrt(2) * 3.5, "2.bias": math.sqrt(2)})
    assert_within(per_sample_grad_norms(model, loss_fn, x, torch.randint(0, 3, (16,))), bounds)


# ------------------------------------------------------------------------- bounds are tight
def test_mlp_bounds_are_attained_by_orthogonal_network():
    """Orthogonal weights, zero biases, GroupSort and an active hinge preserve the gradient norm exactly,
    so the first layer's bound is reached (up to the projection's 1e-6 margin)."""
    torch.manual_seed(1)
    model = nn.Sequential(InputNormClip(3.0), SpectralLinear(6, 6, dtype=F64), GroupSort(),
                          SpectralLinear(6, 4, dtype=F64))  # orthogonal init, zero bias
    loss_fn = MulticlassHinge(margin=100.0)  # always active: gradient e_k - e_y, norm sqrt(2)
    x = torch.randn(8, 6, dtype=F64) * 100
    ratios = assert_within(per_sample_grad_norms(model, loss_fn, x, torch.randint(0, 4, (8,))),
                           per_sample_gradient_bounds(model, math.inf, loss_fn.lipschitz))
    assert ratios["1.weight"] > 0.999 and ratios["1.bias"] > 0.999 and ratios["3.bias"] > 0.999
    assert ratios["3.weight"] > 0.7  # 3 / (3 + bias_bound): the bias bound is counted, the bias is zero


def test_conv_weight_bound_is_attained_by_full_image_kernel():
    """A kernel as large as the image (stride = kernel, overlap 1) has one patch, the image, so dL/dK = g x^T."""
    torch.manual_seed(2)
    model = nn.Sequential(InputNormClip(2.0), SpectralConv2d(2, 8, 3, stride=3, bias=False, dtype=F64), nn.Flatten(),
                          SpectralLinear(8, 4, dtype=F64))
    loss_fn = MulticlassHinge(margin=100.0)
    x = torch.randn(8, 2, 3, 3, dtype=F64) * 100
    ratios = assert_within(per_sample_grad_norms(model, loss_fn, x, torch.randint(0, 4, (8,))),
                           per_sample_gradient_bounds(model, math.inf, loss_fn.lipschitz, input_shape=(2, 3, 3)))
    assert ratios["1.weight"] > 0.999


def test_conv_overlap_factor_is_needed_and_nearly_attained():
    """A constant image and a gradient constant over positions make every patch add up in dL/dK, which then
    exceeds ||G|| ||x|| by nearly sqrt(overlap) = 3: the factor is needed, and the bound is within 80%."""
    model = nn.Sequential(InputNormClip(1.0), SpectralConv2d(1, 1, 3, bias=False, dtype=F64),
                          SpectralConv2d(1, 2, 8, stride=8, bias=False, dtype=F64), nn.Flatten())
    with torch.no_grad():  # logits +-(mean of the 8x8 map) / sqrt(2): ||K_mat||_2 = 1, G constant, ||G|| = sqrt(2)
        model[2].weight.copy_(torch.stack([torch.ones(1, 8, 8), -torch.ones(1, 8, 8)]) / (8 * math.sqrt(2)))
    project_(model)
    loss_fn = MulticlassHinge(margin=10.0)
    x = torch.ones(2, 1, 10, 10, dtype=F64) * torch.tensor([1.0, -1.0], dtype=F64).view(2, 1, 1, 1)
    norms = per_sample_grad_norms(model, loss_fn, x, torch.zeros(2, dtype=torch.long))
    bounds = per_sample_gradient_bounds(model, math.inf, loss_fn.lipschitz, input_shape=(1, 10, 10))
    ratio = assert_within(norms, bounds)["1.weight"]
    assert ratio > 0.79 and ratio * 3 > 1  # without sqrt(overlap) the bound would be exceeded


def test_random_conv_network_reaches_a_percent_of_its_bounds():
    torch.manual_seed(3)
    model = nn.Sequential(InputNormClip(1.0), SpectralConv2d(1, 4, 3, padding=1, dtype=F64), GroupSort(),
                          SpectralConv2d(4, 4, 3, stride=2, dtype=F64), nn.Flatten(),
                          SpectralLinear(144, 5, dtype=F64))
    randomize_(model, 1.0, 10.0)
    loss_fn = TemperatureCrossEntropy(0.01)  # saturated softmax: gradient norm near sqrt(2) / T
    x = torch.randn(16, 1, 14, 14, dtype=F64)
    ratios = assert_within(per_sample_grad_norms(model, loss_fn, x, torch.randint(0, 5, (16,))),
                           per_sample_gradient_bounds(model, math.inf, loss_fn.lipschitz, input_shape=(1, 14, 14)))
    assert all(r > 0.01 for r in ratios.values()), ratios


# ------------------------------------------------------------------------------------------ losses
def logit_cases(seed: int, classes: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(64, classes, dtype=F64, generator=gen)
    return torch.cat([z * s for s in (1e-6, 1.0, 1e2, 1e6, 1e12)])


@settings(max_examples=30, deadline=None)
@given(classes=st.integers(2, 10), loss=st.sampled_from(["hinge", "ce"]), param=st.floats(1e-3, 1e3),
       seed=st.integers(0, 2**16))
def test_loss_gradient_norm_within_lipschitz_constant(classes, loss, param, seed):
    loss_fn = make_loss(loss, param)
    z = logit_cases(seed, classes).requires_grad_(True)
    y = torch.randint(0, classes, (z.shape[0],), generator=torch.Generator().manual_seed(seed))
    (grad,) = torch.autograd.grad(loss_fn(z, y) * z.shape[0], z)  # mean -> sum: rows are per-sample gradients
    assert grad.norm(dim=1).max().item() <= loss_fn.lipschitz * (1 + TOL)
    # and as a Lipschitz statement on pairs, the losses per sample
    per = make_loss(loss, param)
    per.reduction = "none"
    z2 = z.detach() + torch.randn_like(z) * z.detach().abs().mean(dim=1, keepdim=True)
    diff = (per(z.detach(), y) - per(z2, y)).abs()
    assert (diff <= loss_fn.lipschitz * (z.detach() - z2).norm(dim=1) * (1 + TOL) + 1e-300).all()


def test_loss_constants_are_attained():
    """Extreme wrong logits: hinge gradient e_k - e_y and softmax gradient -> (e_k - e_y) / T, both sqrt(2)·."""
    y = torch.tensor([0, 1])
    z = torch.tensor([[-1e6, 1e6, 0.0], [0.0, -1e6, 1e6]], dtype=F64, requires_grad=True)
    losses = (MulticlassHinge(1.0, "sum"), TemperatureCrossEntropy(0.5, "sum"), TemperatureCrossEntropy(7.0, "sum"))
    for loss_fn in losses:
        (grad,) = torch.autograd.grad(loss_fn(z, y), z)
        assert grad.norm(dim=1).min().item() == pytest.approx(loss_fn.lipschitz, rel=1e-9)
    assert TemperatureCrossEntropy(4.0).lipschitz == pytest.approx(math.sqrt(2) / 4)


def test_losses_match_their_definitions():
    torch.manual_seed(4)
    z, y = torch.randn(10, 4, dtype=F64), torch.randint(0, 4, (10,))
    rival = torch.stack([torch.cat([z[i, :y[i]], z[i, y[i] + 1:]]).max() for i in range(10)])
    hinge = (0.7 - (z[torch.arange(10), y] - rival)).clamp(min=0)
    assert torch.allclose(MulticlassHinge(0.7, "none")(z, y), hinge)
    assert torch.allclose(MulticlassHinge(0.7)(z, y), hinge.mean())
    assert torch.allclose(MulticlassHinge(0.7, "sum")(z, y), hinge.sum())
    assert torch.allclose(TemperatureCrossEntropy(3.0, "none")(z, y), F.cross_entropy(z / 3.0, y, reduction="none"))
    with pytest.raises(ValueError, match="classes >= 2"):
        MulticlassHinge()(z[:, :1], torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction"):
        TemperatureCrossEntropy(1.0, reduction="max")


# -------------------------------------------------------------------------------- conv Lipschitz
@settings(max_examples=30, deadline=None)
@given(c_in=st.integers(1, 3), c_out=st.integers(1, 4), kh=st.integers(1, 4), kw=st.integers(1, 4),
       stride=st.integers(1, 3), padding=st.integers(0, 2), dilation=st.integers(1, 3), h=st.integers(4, 8),
       w=st.integers(4, 8), seed=st.integers(0, 2**16))
def test_conv_lipschitz_bound_covers_exact_operator_norm(c_in, c_out, kh, kw, stride, padding, dilation, h, w,
                                                         seed):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(c_out, c_in, kh, kw, dtype=F64, generator=gen)
    if min(h - dilation * (kh - 1), w - dilation * (kw - 1)) + 2 * padding < 1:
        return  # the kernel does not fit the padded image
    matrix = conv_matrix(weight, (c_in, h, w), stride, padding, dilation)
    exact = torch.linalg.matrix_norm(matrix, ord=2).item()
    bound = conv2d_lipschitz_bound(weight, stride, dilation)
    assert exact <= bound * (1 + TOL)
    # power iteration on the conv operator (a lower estimate of the same norm) agrees
    v = torch.randn(1, c_in, h, w, dtype=F64, generator=gen)
    for _ in range(100):
        v = conv_adjoint(F.conv2d(v, weight, None, stride, padding, dilation), weight, v.shape, stride, padding,
                         dilation)  # A^T A v
        v = v / v.norm()
    estimate = F.conv2d(v, weight, None, stride, padding, dilation).norm().item()
    assert estimate <= exact * (1 + 1e-9) and estimate <= bound


def test_conv_overlap_counts_the_worst_pixel():
    """The overlap formula equals the largest count of (patch, offset) pairs any pixel actually has."""
    for k in range(1, 5):
        for s in range(1, 4):
            for d in range(1, 4):
                ones = torch.ones(1, 1, k, k, dtype=F64)
                counts = F.conv_transpose2d(torch.ones(1, 1, 12, 12, dtype=F64), ones, stride=s, dilation=d)
                assert counts.max().item() == conv_overlap(k, s, d), (k, s, d)


@settings(max_examples=30, deadline=None)
@given(k=st.integers(1, 3), stride=st.integers(1, 3), dilation=st.integers(1, 2), scale=scales,
       seed=st.integers(0, 2**16))
def test_projected_conv_is_one_lipschitz_on_random_pairs(k, stride, dilation, scale, seed):
    torch.manual_seed(seed)
    layer = SpectralConv2d(2, 3, k, stride, k // 2, dilation, bias=True, dtype=F64)
    randomize_(layer, scale, scale)
    x, y = torch.randn(32, 2, 7, 7, dtype=F64), torch.randn(32, 2, 7, 7, dtype=F64) * 3
    ratio = (layer(x) - layer(y)).flatten(1).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
    assert ratio.max().item() <= 1 + TOL
    assert conv2d_lipschitz_bound(layer.weight, stride, dilation) <= 1.0


# ------------------------------------------------------------------------ activations and clipping
def test_groupsort_preserves_norms_and_is_one_lipschitz():
    torch.manual_seed(5)
    for shape in [(16, 6), (16, 4, 3, 3)]:
        x, y = torch.randn(*shape, dtype=F64), torch.randn(*shape, dtype=F64)
        for g in (1, 2):
            out_x, out_y = GroupSort(g)(x), GroupSort(g)(y)
            assert torch.allclose(out_x.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1))
            assert ((out_x - out_y).flatten(1).norm(dim=1) <= (x - y).flatten(1).norm(dim=1) * (1 + TOL)).all()
    assert torch.equal(GroupSort(2)(torch.tensor([[3.0, 1.0, -1.0, 2.0]])), torch.tensor([[1.0, 3.0, -1.0, 2.0]]))
    with pytest.raises(ValueError, match="multiple"):
        GroupSort(4)(torch.randn(2, 6))


def test_input_norm_clip_is_per_sample():
    torch.manual_seed(6)
    x = torch.randn(8, 3, 4, dtype=F64) * torch.logspace(-2, 2, 8, dtype=F64).view(8, 1, 1)
    out = InputNormClip(1.5)(x)
    norms = x.flatten(1).norm(dim=1)
    assert (out.flatten(1).norm(dim=1) <= 1.5 * (1 + TOL)).all()
    assert torch.equal(out[norms <= 1.5], x[norms <= 1.5])
    assert torch.allclose(out[norms > 1.5].flatten(1).norm(dim=1), torch.full(((norms > 1.5).sum(),), 1.5, dtype=F64))
    x2 = x.clone()
    x2[0] *= 1e3
    assert torch.equal(InputNormClip(1.5)(x2)[1:], out[1:])  # one sample never moves another
    assert torch.equal(InputNormClip(1.0)(torch.zeros(2, 3)), torch.zeros(2, 3))


# ------------------------------------------------------------------------------------ projection
def layer_constraints_hold(model: nn.Module) -> bool:
    for m in model.modules():
        if isinstance(m, (SpectralLinear, SpectralConv2d)):
            if spectral_norm64(m.weight) > m.spectral_target:
                return False
            if m.bias is not None and m.bias.detach().to(F64).norm().item() > m.bias_bound:
                return False
    return True


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_projection_after_every_step_keeps_constraints(dtype):
    torch.manual_seed(7)
    model = nn.Sequential(InputNormClip(1.0), SpectralConv2d(1, 4, 3, stride=2, dtype=dtype), GroupSort(),
                          nn.Flatten(), SpectralLinear(144, 16, bias_bound=0.5, dtype=dtype), GroupSort(),
                          SpectralLinear(16, 3, dtype=dtype))
    opt = torch.optim.SGD(model.parameters(), lr=50.0)  # big steps: every constraint is violated before projection
    handle = attach_projection(opt, model)
    for _ in range(5):
        x = torch.randn(8, 1, 13, 13, dtype=dtype)
        loss = TemperatureCrossEntropy(0.1)(model(x), torch.randint(0, 3, (8,))) + model[4].bias.sum() * 100
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert constraint_violations(model) == []
        assert layer_constraints_hold(model)
    assert spectral_norm64(model[6].weight) > 0.99  # projected onto the ball's boundary, not shrunk far inside
    handle.remove()
    opt.step()
    assert [v.split(" ")[0] for v in constraint_violations(model)] == ["1", "4", "6"]


def test_constraint_violations_catch_every_kind_of_change():
    model = nn.Sequential(SpectralLinear(4, 4), GroupSort(), SpectralLinear(4, 2, bias=False))
    assert constraint_violations(model) == [] and project_(model) == []  # certified at construction; no-op
    with torch.no_grad():
        model[2].weight.data.mul_(3.0)  # through .data: no autograd version bump, still caught
    assert [v.split(" ")[0] for v in constraint_violations(model)] == ["2"]
    assert project_(model) == ["2"] and constraint_violations(model) == [] and layer_constraints_hold(model)

    state = {k: v * 10 for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    assert len(constraint_violations(model)) == 2
    project_(model)
    assert layer_constraints_hold(model)

    model.double()  # a dtype change re-rounds the weights
    assert len(constraint_violations(model)) == 2
    project_(model)
    assert constraint_violations(model) == [] and layer_constraints_hold(model)
    assert "project_(model)" in (constraint_violations(nn.Sequential(_changed(SpectralLinear(3, 3))))[0])


def _changed(layer: SpectralLinear) -> SpectralLinear:
    with torch.no_grad():
        layer.weight.add_(1.0)
    return layer


def test_projection_certifies_float32_storage():
    """The certificate is on the stored float32 values (a float64 SVD of them), not on the float64 result."""
    torch.manual_seed(8)
    for shape in [(64, 48), (48, 64), (200, 3), (1, 100), (33, 33)]:
        layer = SpectralLinear(*shape)
        with torch.no_grad():
            layer.weight.normal_(0, 5.0)
        layer.project_()
        assert spectral_norm64(layer.weight) <= 1.0
        assert spectral_norm_upper_bound(layer.weight) <= 1.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_projection_certifies_half_precision_storage(dtype):
    """Rounding a projected matrix to 8-11 mantissa bits can push it outside the ball: the margin and the
    re-measured certificate keep the stored values inside."""
    torch.manual_seed(9)
    for shape in [(64, 48), (200, 3), (33, 33)]:
        layer = SpectralLinear(*shape, dtype=dtype)
        with torch.no_grad():
            layer.weight.normal_(0, 5.0)
            layer.bias.normal_(0, 5.0)
        layer.project_()
        assert spectral_norm64(layer.weight) <= 1.0 and layer.bias.to(F64).norm().item() <= 1.0


def test_certificate_retries_with_a_growing_margin_then_refuses():
    t = torch.ones(4)
    readings = iter([2.0, 1.0 + 1e-12, 0.5])  # the first shrink rounds back just outside the bound
    _shrink_until(t, lambda: next(readings), 1.0)
    assert torch.all(t < 0.5)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        _shrink_until(torch.ones(4), lambda: 2.0, 1.0)  # rounding that never lets it in


def test_nonfinite_weights_are_refused():
    layer = SpectralLinear(3, 3)
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="learning rate"):
        layer.project_()


# ------------------------------------------------------------------------------- model checks
def test_check_lipschitz_model_reports_every_unsupported_layer_with_its_fix():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(), nn.GELU(), nn.LeakyReLU(2.0),
                          nn.Flatten(0), nn.Conv2d(1, 1, 1), nn.Hardtanh(0.5, 1.0), SpectralLinear(4, 2), nn.ReLU())
    problems = check_lipschitz_model(model)
    assert [p.split(" ")[0] for p in problems] == ["0", "1", "2", "3", "4", "5", "6", "7"]
    for p, word in zip(problems, ["SpectralLinear", "remove", "1 / (1 - p)", "GroupSort", "slope", "start_dim",
                                  "SpectralConv2d", "excludes 0"]):
        assert word in p, p
    with pytest.raises(ValueError, match=r"(?s)0 \(Linear\).*SpectralLinear.*6 \(Conv2d\).*7 \(Hardtanh\)"):
        per_sample_gradient_bounds(model, 1.0, 1.0)


def test_check_lipschitz_model_structure():
    good = nn.Sequential(InputNormClip(1.0), nn.Sequential(SpectralLinear(3, 4), GroupSort()), nn.Identity(),
                         SpectralLinear(4, 2), nn.Tanh(), nn.LeakyReLU(0.3), nn.ReLU6(), nn.Hardtanh())
    assert check_lipschitz_model(good) == []
    assert list(per_sample_gradient_bounds(good, math.inf, 1.0)) == [n for n, _ in good.named_parameters()]

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = good

        def forward(self, x):
            return self.body(x) * 2

    assert "nn.Sequential" in check_lipschitz_model(Wrapper())[0]

    shared = SpectralLinear(3, 3)
    assert "same module object" in check_lipschitz_model(nn.Sequential(shared, GroupSort(), shared))[0]
    twin = SpectralLinear(3, 3)
    twin.weight = shared.weight
    assert "shared" in check_lipschitz_model(nn.Sequential(shared, GroupSort(), twin))[0]
    stray = nn.Sequential(SpectralLinear(3, 3))
    stray.register_parameter("scale", nn.Parameter(torch.ones(1)))
    assert check_lipschitz_model(stray)[0].startswith("scale:")


def test_bounds_argument_errors_name_the_fix():
    conv = nn.Sequential(SpectralConv2d(1, 2, 3), nn.Flatten(), SpectralLinear(8, 2))
    with pytest.raises(ValueError, match="input_shape"):
        per_sample_gradient_bounds(conv, 1.0, 1.0)
    with pytest.raises(ValueError, match=r"input_shape=\(1, 5, 5\) does not fit layer 2"):
        per_sample_gradient_bounds(conv, 1.0, 1.0, input_shape=(1, 5, 5))
    assert per_sample_gradient_bounds(conv, 1.0, 1.0, input_shape=(1, 4, 4))["0.bias"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="InputNormClip"):
        per_sample_gradient_bounds(nn.Sequential(SpectralLinear(3, 2)), math.inf, 1.0)
    with pytest.raises(ValueError, match="flatten"):
        SpectralLinear(3, 2)(torch.randn(2, 5, 3))


def test_frozen_parameters_get_no_bound_but_still_count_forward():
    model = nn.Sequential(SpectralLinear(3, 3, bias_bound=2.0), GroupSort(), SpectralLinear(3, 2))
    model[0].requires_grad_(False)
    bounds = per_sample_gradient_bounds(model, 1.0, 1.0)
    assert bounds == pytest.approx({"2.weight": 3.0, "2.bias": 1.0})  # input bound 1 + frozen bias bound 2
    assert total_gradient_bound(bounds) == pytest.approx(math.sqrt(10.0))
