"""Subclasses of supported layers that override ``forward``: a handler written for the base class must not
be applied to them (it would miss what the override computes). They take the generic torch.func rule when
it qualifies (exact against the float64 oracle), else ``validate`` lists them and ``make_private`` refuses."""

from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dpengine
from dpengine import PrivacyEngine
from dpengine.grad_sample import find_handler
from dpengine.grad_sample.linear import LinearHandler
from dpengine.layers import DPMultiheadAttention
from oracle import flat_norms, oracle_per_sample, rel_err, run_controller

MODES = ["hooks", "ghost", "bk"]
TOL = 1e-10
F64 = torch.float64


class ScaledEmbedding(nn.Embedding):  # transformers' *ScaledWordEmbedding: embedding * sqrt(d)
    def forward(self, x):
        return super().forward(x) * 8.0


class TanhLinear(nn.Linear):
    def forward(self, x):
        return torch.tanh(super().forward(x))


class WScaledLinear(nn.Linear):  # equalized learning rate: the weight scaled inside forward
    def forward(self, x):
        return F.linear(x, self.weight * 5.0, self.bias)


class ScaledLayerNorm(nn.LayerNorm):
    def forward(self, x):
        return super().forward(x) * 3.0


class Conv2dSame(nn.Conv2d):  # timm-style dynamic "same" padding
    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class HalfPadConv(nn.Conv1d):  # overrides only the helper forward calls
    def _conv_forward(self, x, weight, bias):
        return F.conv1d(F.pad(x, (1, 0)), weight * 2.0, bias, self.stride, 0, self.dilation, self.groups)


class PlainSubLinear(nn.Linear):  # a subclass that does not touch forward keeps the dedicated handler
    def extra_repr(self):
        return "plain"


def _instance_patched():
    lin = nn.Linear(5, 3)
    # a forward assigned on the instance (a bound method: a deep copy rebinds it to the copy)
    lin.forward = types.MethodType(lambda self, x: nn.Linear.forward(self, x) * 2.0, lin)
    return lin


def _case(name):
    g = torch.Generator().manual_seed(0)
    if name == "embedding":
        model = nn.Sequential(ScaledEmbedding(10, 4), nn.Flatten(), nn.Linear(12, 2))
        return model, torch.randint(0, 10, (4, 3), generator=g), torch.randn(4, 2, generator=g, dtype=F64)
    if name == "conv":
        model = nn.Sequential(Conv2dSame(2, 3, 3, stride=2), nn.Flatten())
        return model, torch.randn(4, 2, 7, 7, generator=g, dtype=F64), torch.randn(4, 48, generator=g, dtype=F64)
    if name == "conv-helper":
        model = nn.Sequential(HalfPadConv(2, 3, 3), nn.Flatten())
        return model, torch.randn(4, 2, 6, generator=g, dtype=F64), torch.randn(4, 15, generator=g, dtype=F64)
    x, y = torch.randn(4, 5, generator=g, dtype=F64), torch.randn(4, 4, generator=g, dtype=F64)
    layers = {"tanh": lambda: nn.Sequential(TanhLinear(5, 4)),
              "weight-scaled": lambda: nn.Sequential(WScaledLinear(5, 4)),
              "layernorm": lambda: nn.Sequential(nn.Linear(5, 4), ScaledLayerNorm(4)),
              "instance": lambda: nn.Sequential(_instance_patched(), nn.Linear(3, 4))}
    return layers[name](), x, y


def sum_mse(out, y):
    return ((out - y) ** 2).sum()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["embedding", "tanh", "weight-scaled", "layernorm", "conv", "conv-helper", "instance"])
def test_subclass_overriding_forward_is_exact(mode, case):
    torch.manual_seed(0)
    model, x, y = _case(case)
    model = model.to(F64)
    ps = oracle_per_sample(model, sum_mse, x, y)
    w = torch.rand(x.shape[0], dtype=F64) + 0.5
    sums, norms = run_controller(model, sum_mse, x, y, mode=mode, reduction="sum", factors=lambda n: w)
    assert rel_err(norms, flat_norms(ps)) <= TOL
    ref = {n: torch.einsum("b,b...->...", w, t) for n, t in ps.items()}
    scale = max(float(r.abs().max()) for r in ref.values())
    for n, r in ref.items():
        assert rel_err(sums[n], r, scale) <= TOL, n


def test_handler_reaches_only_subclasses_that_keep_forward():
    assert isinstance(find_handler(PlainSubLinear(3, 2)), LinearHandler)
    assert isinstance(find_handler(nn.modules.linear.NonDynamicallyQuantizableLinear(3, 2)), LinearHandler)
    assert find_handler(TanhLinear(3, 2)) is None
    assert find_handler(_instance_patched()) is None
    assert find_handler(HalfPadConv(2, 3, 3)) is None


def test_registered_by_name_subclass_overriding_forward_gets_no_handler():
    transformers = pytest.importorskip("transformers")
    conv1d = transformers.pytorch_utils.Conv1D

    class TanhConv1D(conv1d):
        def forward(self, x):
            return torch.tanh(super().forward(x))

    assert find_handler(conv1d(4, 3)) is not None
    assert find_handler(TanhConv1D(4, 3)) is None
    model = nn.Sequential(TanhConv1D(4, 5)).to(F64)
    x, y = torch.randn(4, 5, dtype=F64), torch.randn(4, 4, dtype=F64)
    ps = oracle_per_sample(model, sum_mse, x, y)
    sums, norms = run_controller(model, sum_mse, x, y, mode="bk", reduction="sum", factors=lambda n: torch.ones_like(n))
    assert rel_err(norms, flat_norms(ps)) <= TOL
    for n, t in ps.items():
        assert rel_err(sums[n], t.sum(0)) <= TOL, n


class BufferedLinear(nn.Linear):
    """Overrides forward and holds a buffer: the torch.func rule does not qualify either."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.register_buffer("gain", torch.tensor(2.0))

    def forward(self, x):
        return super().forward(x) * self.gain


def test_subclass_the_fallback_cannot_take_is_listed_and_refused():
    model = nn.Sequential(BufferedLinear(5, 3), nn.Linear(3, 2))
    problems = dpengine.validate(model)
    assert len(problems) == 1 and problems[0].module == "0"
    reason = problems[0].reason
    assert "subclasses Linear but overrides forward" in reason
    assert "dpengine.grad_sample.register" in reason and "do not override forward" in reason
    ds = TensorDataset(torch.randn(8, 5), torch.randn(8, 2))
    with pytest.raises(dpengine.UnsupportedModuleError, match="overrides forward"):
        PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                     data_loader=DataLoader(ds, batch_size=4), noise_multiplier=1.0,
                                     max_grad_norm=1.0)


def test_engine_trains_a_subclass_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(TanhLinear(5, 3)).to(F64)
    ref = nn.Sequential(TanhLinear(5, 3)).to(F64)
    ref.load_state_dict(model.state_dict())
    x, y = torch.randn(6, 5, dtype=F64), torch.randn(6, 3, dtype=F64)
    assert dpengine.validate(model) == []
    C = 0.7
    model, opt, dl = PrivacyEngine(seed=0).make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=6), noise_multiplier=0.0, max_grad_norm=C,
        clipping="flat", grad_sample_mode="bk", poisson_sampling=False, loss_reduction="sum")
    for xb, yb in dl:
        sum_mse(model(xb), yb).backward()
        opt.step()
    ps = oracle_per_sample(ref, sum_mse, x, y)
    c = (C / (flat_norms(ps) + 1e-6)).clamp(max=1.0)
    for n, p in model.named_parameters():
        assert rel_err(p.grad, torch.einsum("b,b...->...", c, ps[n])) <= TOL, n


def test_attention_subclass_is_swapped_only_if_it_keeps_forward():
    class Tagged(nn.MultiheadAttention):
        tag = "mine"

    class Overriding(nn.MultiheadAttention):
        def forward(self, *a, **k):
            out, w = super().forward(*a, **k)
            return out * 2, w

    assert dpengine.validate(nn.Sequential(Tagged(4, 2))) and "dpengine.fix(model)" in \
        dpengine.validate(nn.Sequential(Tagged(4, 2)))[0].reason
    with pytest.warns(UserWarning, match="Tagged -> DPMultiheadAttention"):
        fixed = dpengine.fix(nn.Sequential(Tagged(4, 2)))
    assert isinstance(fixed[0], DPMultiheadAttention)
    problems = dpengine.validate(nn.Sequential(Overriding(4, 2)))
    assert len(problems) == 1 and "subclasses MultiheadAttention and overrides forward" in problems[0].reason
    for cls in (nn.LSTM, nn.GRU):
        sub = type("Sub" + cls.__name__, (cls,), {"forward": lambda self, x, h=None: cls.forward(self, x, h)})
        problems = dpengine.validate(nn.Sequential(sub(3, 4, batch_first=True)))
        assert len(problems) == 1 and f"subclasses {cls.__name__} and overrides forward" in problems[0].reason
