"""dpengine.fix's nn.MultiheadAttention replacement: the same outputs and state_dict as torch's module for every
option and call argument, and a private step through it equal to a per-sample float64 oracle run on the
*original* torch module."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import dpengine
from dpengine.layers import DPMultiheadAttention
from test_layers_rnn import MODES, check_against_oracle, fixed_copy, private_step

E, H = 6, 2


def options():
    return dict(batch_first=st.booleans(), cross=st.sampled_from(["self", "kv", "all"]), kvdim=st.booleans(),
                bias=st.booleans(), bias_kv=st.booleans(), zero_attn=st.booleans(), kpm=st.booleans(),
                mask=st.sampled_from([None, "bool2d", "float2d", "float3d", "causal"]), need_weights=st.booleans(),
                average=st.booleans(), b=st.integers(1, 3), l=st.integers(1, 4), s=st.integers(1, 4))


class AttnNet(nn.Module):
    """Input ``(query (B, L, E), key (B, S, kdim), value (B, S, vdim), kpm (B, S), mask (B, H, L, S))``, batch-first so
    the oracle can slice samples; the attention gets them in its own layout. Output: (head(out), weights)."""

    def __init__(self, mha: nn.Module, cross: str, kpm: bool, mask: str | None, need_weights: bool, average: bool):
        super().__init__()
        self.mha, self.cross, self.kpm, self.mask = mha, cross, kpm, mask
        self.need_weights, self.average = need_weights, average
        self.head = nn.Linear(E, 3)
        # a 2-D mask is shared by all samples: not data (a plain attribute, not in the state_dict)
        self.shared = torch.randn(8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def forward(self, inp: tuple) -> tuple[Tensor, Tensor]:
        q, k, v, kpm, mask = inp
        if self.cross == "self":
            k = v = q
        elif self.cross == "kv":
            v = k
        b, l, s = q.shape[0], q.shape[1], k.shape[1]
        kpm, mask = kpm[:, :s], mask[:, :, :, :s]
        if not self.mha.batch_first:  # time-major, keeping query is key / key is value
            tq = q.transpose(0, 1)
            tk = tq if k is q else k.transpose(0, 1)
            q, k, v = tq, tk, (tk if v is k else v.transpose(0, 1))
        attn_mask, causal = None, False
        if self.mask == "bool2d":
            attn_mask = self.shared[:l, :s] > 0.5
            attn_mask[:, 0] = False  # every query attends somewhere (no NaN rows)
        elif self.mask == "float2d":
            attn_mask = self.shared[:l, :s].to(q.dtype)
        elif self.mask == "float3d":
            attn_mask = mask.reshape(b * H, l, s)  # per sample and head: sliced with the sample
        elif self.mask == "causal":
            attn_mask, causal = nn.Transformer.generate_square_subsequent_mask(max(l, s), dtype=q.dtype)[:l, :s], True
        out, w = self.mha(q, k, v, key_padding_mask=(kpm > 0.5) if self.kpm else None, need_weights=self.need_weights,
                          attn_mask=attn_mask, average_attn_weights=self.average, is_causal=causal)
        if not self.mha.batch_first:
            out = out.transpose(0, 1)
        return self.head(out), (w if w is not None else out.new_zeros(b, 1))


def attn_loss(out: tuple[Tensor, Tensor], y: Tensor) -> Tensor:
    logits, w = out
    return F.cross_entropy(logits.reshape(-1, 3), y.reshape(-1), reduction="sum") + \
        (w.flatten(1) * torch.linspace(-1, 1, w.flatten(1).shape[1], dtype=w.dtype)).sum()


def build(o: dict, dtype=torch.float64, dropout: float = 0.0):
    kdim, vdim = (4, 5) if o["kvdim"] and o["cross"] == "all" else (None, None)
    mha = nn.MultiheadAttention(E, H, dropout=dropout, bias=o["bias"], add_bias_kv=o["bias_kv"],
                                add_zero_attn=o["zero_attn"], kdim=kdim, vdim=vdim, batch_first=o["batch_first"])
    net = AttnNet(mha, o["cross"], o["kpm"], o["mask"], o["need_weights"], o["average"]).to(dtype)
    g = torch.Generator().manual_seed(o["b"] * 31 + o["l"] * 7 + o["s"])
    b, l, s = o["b"], o["l"], o["s"]
    m = max(l, s)  # masks wide enough for self-attention (S = L) too; the model slices them
    kpm = (torch.rand(b, m, generator=g) < 0.3).to(dtype)
    kpm[:, 0] = 0  # never a fully masked row (NaN in torch as well)
    x = (torch.randn(b, l, E, generator=g, dtype=dtype), torch.randn(b, s, kdim or E, generator=g, dtype=dtype),
         torch.randn(b, s, vdim or E, generator=g, dtype=dtype), kpm,
         torch.randn(b, H, l, m, generator=g, dtype=dtype))
    y = torch.randint(0, 3, (b, l), generator=g)
    return net, x, y


@settings(max_examples=30, deadline=None)
@given(**options())
def test_outputs_equal_torch(**o):
    torch.manual_seed(0)
    net, x, _ = build(o, torch.float32)
    fixed = fixed_copy(net)
    assert isinstance(fixed.mha, DPMultiheadAttention)
    for mode in ("train", "eval"):
        getattr(net, mode)(), getattr(fixed, mode)()
        (r_out, r_w), (g_out, g_w) = net(x), fixed(x)
        assert g_out.shape == r_out.shape and torch.allclose(g_out, r_out, atol=1e-6, rtol=0)
        assert g_w.shape == r_w.shape and torch.allclose(g_w, r_w, atol=1e-6, rtol=0)


@pytest.mark.parametrize("need_weights", [True, False])
def test_dropout_uses_the_same_random_numbers(need_weights):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, dropout=0.4, batch_first=True)
    fixed = fixed_copy(mha)
    q, kv = torch.randn(3, 4, E), torch.randn(3, 5, E)
    torch.manual_seed(7)
    r = mha(q, kv, kv, need_weights=need_weights)
    torch.manual_seed(7)
    g = fixed(q, kv, kv, need_weights=need_weights)
    assert torch.allclose(r[0], g[0], atol=1e-6)
    if need_weights:
        assert torch.allclose(r[1], g[1], atol=1e-6)


def test_unbatched_inputs_and_errors():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, add_bias_kv=True)
    fixed = fixed_copy(mha)
    q, k = torch.randn(4, E), torch.randn(5, E)
    kpm = torch.tensor([False, True, False, False, False])
    for kw in (dict(), dict(key_padding_mask=kpm), dict(attn_mask=torch.randn(H, 4, 5))):
        (a, wa), (b, wb) = mha(q, k, k, **kw), fixed(q, k, k, **kw)
        assert torch.allclose(a, b, atol=1e-6) and torch.allclose(wa, wb, atol=1e-6)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        fixed(q, k, k, is_causal=True)
    with pytest.raises(RuntimeError, match="2D attn_mask"):
        fixed(q, k, k, attn_mask=torch.zeros(3, 3))


@pytest.mark.parametrize("kvdim", [False, True])
@pytest.mark.parametrize("extra", [False, True])
def test_state_dict_loads_both_ways(kvdim, extra):
    torch.manual_seed(0)
    kw = dict(kdim=4, vdim=5) if kvdim else {}
    mha = nn.MultiheadAttention(E, H, add_bias_kv=extra, bias=True, **kw)
    fixed = fixed_copy(mha)
    assert list(fixed.state_dict()) == list(mha.state_dict())
    other = nn.MultiheadAttention(E, H, add_bias_kv=extra, **kw)
    fixed.load_state_dict(other.state_dict())  # torch -> dpengine
    for k, v in other.state_dict().items():
        assert torch.equal(fixed.state_dict()[k], v), k
    with torch.no_grad():
        for p in fixed.parameters():
            p.add_(0.5)
    plain = nn.MultiheadAttention(E, H, add_bias_kv=extra, **kw)
    plain.load_state_dict(fixed.state_dict())  # dpengine -> torch (a privately trained model, for inference)
    q, k, v = torch.randn(3, 2, E), torch.randn(4, 2, kw.get("kdim", E)), torch.randn(4, 2, kw.get("vdim", E))
    assert torch.allclose(plain(q, k, v)[0], fixed(q, k, v)[0], atol=1e-6)


def test_validate_and_fix_report():
    model = nn.Sequential(nn.Linear(E, E), nn.TransformerEncoderLayer(E, H, dim_feedforward=8, batch_first=True))
    problems = dpengine.validate(model)
    assert problems and all("dpengine.fix(model)" in p.reason and "DPMultiheadAttention" in p.reason for p in problems)
    with pytest.warns(UserWarning, match=r"1.self_attn: MultiheadAttention -> DPMultiheadAttention"):
        fixed = dpengine.fix(model)
    assert fixed is model and dpengine.validate(model) == []
    x = torch.randn(2, 3, E)
    assert model(x).shape == (2, 3, E)

    class MyAttention(nn.MultiheadAttention):
        def forward(self, *a, **k):
            return super().forward(*a, **k)

    problems = dpengine.validate(nn.Sequential(MyAttention(E, H)))
    assert len(problems) == 1 and "subclasses MultiheadAttention" in problems[0].reason
    frozen = nn.Sequential(nn.MultiheadAttention(E, H).requires_grad_(False))
    assert dpengine.validate(frozen) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(dpengine.fix(frozen)[0], nn.MultiheadAttention)  # nothing to swap: left as it is
    # a bare attention module is returned swapped
    with pytest.warns(UserWarning, match="<root>"):
        assert isinstance(dpengine.fix(nn.MultiheadAttention(E, H)), DPMultiheadAttention)


# ---------------------------------------------------------------------------------------- private step
@settings(max_examples=20, deadline=None)
@given(**options(), mode=st.sampled_from(MODES), red=st.sampled_from(["mean", "sum"]))
def test_private_step_equals_oracle(mode, red, **o):
    torch.manual_seed(1)
    net, x, y = build(o)
    check_against_oracle(net, x, y, attn_loss, mode, red)


@pytest.mark.parametrize("mode", MODES)
def test_all_options_at_once(mode):
    o = dict(batch_first=False, cross="all", kvdim=True, bias=True, bias_kv=True, zero_attn=True, kpm=True,
             mask="float3d", need_weights=True, average=False, b=4, l=3, s=5)
    net, x, y = build(o)
    check_against_oracle(net, x, y, attn_loss, mode, "mean")


@pytest.mark.parametrize("mode", MODES)
def test_empty_batch(mode):
    o = dict(batch_first=True, cross="self", kvdim=False, bias=True, bias_kv=True, zero_attn=False, kpm=False,
             mask=None, need_weights=False, average=True, b=1, l=3, s=3)
    net, x, y = build(o)
    x, y = tuple(t[:0] for t in x), y[:0]
    sums, norms, _ = private_step(fixed_copy(net), x, y, attn_loss, mode=mode, reduction="sum", factors=lambda n: n)
    assert norms.shape == (0,)
    for n, p in net.state_dict().items():
        assert torch.equal(sums[n], torch.zeros_like(p)), n


def test_engine_trains_a_fixed_transformer_time_major():
    """End to end through make_private: a time-major encoder layer is refused before fix and trains after."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(E, H, add_bias_kv=True)  # batch_first=False
            self.head = nn.Linear(E, 3)

        def forward(self, x):
            h = x.transpose(0, 1)  # (L, B, E)
            out, _ = self.mha(h, h, h)
            return self.head(out.mean(0))

    data = TensorDataset(torch.randn(32, 4, E), torch.randint(0, 3, (32,)))
    with pytest.raises(dpengine.UnsupportedModuleError, match="dpengine.fix"):
        m = Net()
        dpengine.PrivacyEngine(seed=0).make_private(module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
                                                    data_loader=DataLoader(data, batch_size=8), noise_multiplier=1.0,
                                                    max_grad_norm=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = dpengine.fix(Net())
    before = copy.deepcopy(model.state_dict())
    model, opt, loader = dpengine.PrivacyEngine(seed=0).make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=DataLoader(data, batch_size=8),
        noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="bk")
    for xb, yb in loader:
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    after = model.state_dict()
    assert list(after) == list(before)
    for k in ("mha.in_proj_weight", "mha.bias_k", "mha.bias_v", "mha.out_proj.weight", "head.weight"):
        assert not torch.equal(after[k], before[k]), k
