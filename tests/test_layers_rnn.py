"""dpengine.fix's nn.RNN / nn.GRU / nn.LSTM replacements: the same outputs and state_dict as torch's modules,
and a private step through them equal to a per-sample float64 oracle run on the *original* torch module."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import dpengine
from dpengine.clipping import PerLayerClipping, _clip
from dpengine.grad_sample.controller import GradSampleController, GradSampleMode, LossReduction
from dpengine.layers import DPGRU, DPLSTM, DPRNN, DPRNNBase

MODES = ["hooks", "ghost", "bk"]
TOL = 1e-9


# ---------------------------------------------------------------------------------------- shared helpers
def fixed_copy(orig: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dpengine.fix(copy.deepcopy(orig))


def oracle(orig: nn.Module, x: tuple, y: Tensor, loss_fn) -> dict[str, Tensor]:
    """{torch state_dict key: (B, *shape)}: each sample's gradient from its own batch of one, by autograd."""
    params = {n: p for n, p in orig.named_parameters() if p.requires_grad}
    rows: dict[str, list[Tensor]] = {n: [] for n in params}
    for i in range(y.shape[0]):
        loss = loss_fn(orig(tuple(t[i:i + 1] for t in x)), y[i:i + 1])
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for n, p, g in zip(params, params.values(), grads):
            rows[n].append(torch.zeros_like(p) if g is None else g)
    return {n: torch.stack(r) if r else p.new_zeros(0, *p.shape) for (n, r), p in zip(rows.items(), params.values())}


def by_torch_key(fixed_template: nn.Module, values: dict[str, Tensor]) -> dict[str, Tensor]:
    """Tensors keyed by the fixed model's parameter names -> keyed by torch's state_dict keys (through the
    replacement's own state_dict renaming)."""
    tmp = copy.deepcopy(fixed_template)
    with torch.no_grad():
        for n, p in tmp.named_parameters():
            p.copy_(values[n]) if n in values else p.zero_()
    return tmp.state_dict()


def private_step(fixed: nn.Module, x: tuple, y: Tensor, loss_fn, *, mode: str, reduction: str, factors=None,
                 policy=None) -> tuple[dict[str, Tensor], Tensor, GradSampleController]:
    """One captured backward; returns the clipped sums by torch key, the per-sample norms and the controller."""
    template = copy.deepcopy(fixed)
    ctrl = GradSampleController(fixed, mode=GradSampleMode(mode), loss_reduction=LossReduction(reduction),
                                clip_factors=factors, policy=policy)
    b = y.shape[0]
    ctrl.note_batch(b)
    loss = loss_fn(fixed(x), y)
    (loss / max(b, 1) if reduction == "mean" else loss).backward()
    for n, p in fixed.named_parameters():
        assert p.grad is None, f"autograd wrote a non-private gradient into {n}"
    names = {id(p): n for n, p in fixed.named_parameters()}
    sums = {names[id(p)]: t for p, t in ctrl.pop_clipped_sums().items()}
    ctrl.detach()
    return by_torch_key(template, sums), ctrl.last_norms, ctrl


def check_against_oracle(orig: nn.Module, x: tuple, y: Tensor, loss_fn, mode: str, reduction: str) -> None:
    """Norms and weighted sums (generic weights, then one sample alone) equal the oracle's."""
    orig = orig.double()
    fixed = fixed_copy(orig)
    ps = oracle(orig, x, y, loss_fn)
    b = y.shape[0]
    norms_ref = torch.stack([t.reshape(b, -1).pow(2).sum(1) for t in ps.values()]).sum(0).sqrt()
    w = torch.rand(b, dtype=torch.float64) + 0.5
    sums, norms, _ = private_step(fixed, x, y, loss_fn, mode=mode, reduction=reduction, factors=lambda n: w)
    assert torch.allclose(norms, norms_ref, rtol=TOL, atol=0)
    scale = max(float(t.abs().max()) for t in ps.values())
    for n, t in ps.items():
        ref = torch.einsum("b,b...->...", w, t)
        assert float((sums[n] - ref).abs().max()) <= TOL * scale, n
    onehot = torch.zeros(b, dtype=torch.float64)
    onehot[-1] = 1.0
    sums, _, _ = private_step(fixed_copy(orig), x, y, loss_fn, mode=mode, reduction=reduction,
                              factors=lambda n: onehot)
    for n, t in ps.items():
        assert float((sums[n] - t[-1]).abs().max()) <= TOL * scale, n


# ---------------------------------------------------------------------------------------- the test model
class RNNNet(nn.Module):
    """Input ``(x (B, T, in), h0 (B, L*D, H_out), c0 (B, L*D, H), lengths (B,))``, all batch-first so the
    oracle can slice samples; the recurrent layer gets them in its own layout (time-major, packed ...).
    Output: (padded output (B, T, D*H_out), final states (B, -1))."""

    def __init__(self, rnn: nn.Module, packed: bool, give_h0: bool) -> None:
        super().__init__()
        self.rnn, self.packed, self.give_h0 = rnn, packed, give_h0
        out = (rnn.proj_size or rnn.hidden_size) * (2 if rnn.bidirectional else 1)
        self.head = nn.Linear(out, 3)

    def forward(self, inp: tuple) -> tuple[Tensor, Tensor]:
        x, h0, c0, lengths = inp
        t = x.shape[1]
        bf = self.rnn.batch_first
        seq = x if bf else x.transpose(0, 1)
        if self.packed:
            seq = pack_padded_sequence(seq, lengths, batch_first=bf, enforce_sorted=False)
        hx = None
        if self.give_h0:
            hx = (h0.transpose(0, 1), c0.transpose(0, 1)) if self.rnn.mode == "LSTM" else h0.transpose(0, 1)
        out, hn = self.rnn(seq, hx)
        if self.packed:
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=t)
        elif not bf:
            out = out.transpose(0, 1)
        states = torch.cat([s.transpose(0, 1).reshape(x.shape[0], s.shape[0] * s.shape[2]) for s in (hn if isinstance(hn, tuple) else (hn,))], 1)
        return self.head(out), states


def rnn_loss(out: tuple[Tensor, Tensor], y: Tensor) -> Tensor:
    """Per-sample losses summed over the batch: token cross-entropy (padding ignored) + a term on h_n/c_n."""
    logits, states = out
    return F.cross_entropy(logits.reshape(-1, 3), y.reshape(-1), ignore_index=-100, reduction="sum") + \
        (states * torch.linspace(-1, 1, states.shape[1], dtype=states.dtype)).sum()


def make_rnn(kind: str, inp: int, hid: int, **kw) -> nn.Module:
    if kind == "lstm":
        return nn.LSTM(inp, hid, **kw)
    kw.pop("proj_size", None)
    if kind == "gru":
        return nn.GRU(inp, hid, **kw)
    return nn.RNN(inp, hid, nonlinearity=kind.split("_")[1], **kw)


def make_batch(rnn: nn.Module, b: int, t: int, packed: bool, seed: int = 0) -> tuple[tuple, Tensor]:
    g = torch.Generator().manual_seed(seed)
    d = (2 if rnn.bidirectional else 1) * rnn.num_layers
    h_out = rnn.proj_size or rnn.hidden_size
    x = torch.randn(b, t, rnn.input_size, generator=g, dtype=torch.float64)
    h0 = torch.randn(b, d, h_out, generator=g, dtype=torch.float64)
    c0 = torch.randn(b, d, rnn.hidden_size, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, t + 1, (b,), generator=g) if packed else torch.full((b,), t)
    y = torch.randint(0, 3, (b, t), generator=g)
    y[torch.arange(t).unsqueeze(0) >= lengths.unsqueeze(1)] = -100
    return (x, h0, c0, lengths), y


# ---------------------------------------------------------------------------------------- equivalence
KINDS = ["rnn_tanh", "rnn_relu", "gru", "lstm"]


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(KINDS), layers=st.integers(1, 3), bidir=st.booleans(), bf=st.booleans(),
       bias=st.booleans(), proj=st.booleans(), packed=st.booleans(), h0=st.booleans(), b=st.integers(1, 4),
       t=st.integers(1, 6), seed=st.integers(0, 100))
def test_outputs_equal_torch(kind, layers, bidir, bf, bias, proj, packed, h0, b, t, seed):
    torch.manual_seed(seed)
    rnn = make_rnn(kind, 3, 4, num_layers=layers, bidirectional=bidir, batch_first=bf, bias=bias,
                   proj_size=2 if proj else 0, dropout=0.3 if layers > 1 else 0.0).eval()  # eval: no dropout
    net = RNNNet(rnn, packed, h0).eval()
    x, _ = make_batch(rnn, b, t, packed, seed)
    x = tuple(z.float() if z.is_floating_point() else z for z in x)
    fixed = fixed_copy(net)
    assert isinstance(fixed.rnn, DPRNNBase)
    # the raw module outputs too: packed data, batch_sizes, indices, h_n and c_n
    seq = x[0] if bf else x[0].transpose(0, 1)
    if packed:
        seq = pack_padded_sequence(seq, x[3], batch_first=bf, enforce_sorted=False)
    ref_out, ref_h = rnn(seq)
    got_out, got_h = fixed.rnn(seq)
    if packed:
        for f in ("batch_sizes", "sorted_indices", "unsorted_indices"):
            assert torch.equal(getattr(ref_out, f), getattr(got_out, f)), f
        ref_out, got_out = ref_out.data, got_out.data
    assert got_out.shape == ref_out.shape and torch.allclose(got_out, ref_out, atol=1e-6, rtol=0)
    for r, g in zip(ref_h if isinstance(ref_h, tuple) else (ref_h,), got_h if isinstance(got_h, tuple) else (got_h,)):
        assert g.shape == r.shape and torch.allclose(g, r, atol=1e-6, rtol=0)
    for r, g in zip(net(x), fixed(x)):
        assert torch.allclose(g, r, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_unbatched_input_and_errors(kind):
    rnn = make_rnn(kind, 3, 4, num_layers=2, bidirectional=True, proj_size=2)
    fixed = fixed_copy(rnn)
    x = torch.randn(5, 3)
    d = 4
    h_out = rnn.proj_size or 4
    hx = (torch.randn(d, h_out), torch.randn(d, 4)) if kind == "lstm" else torch.randn(d, h_out)
    for args in ((x,), (x, hx)):
        (o1, h1), (o2, h2) = rnn(*args), fixed(*args)
        assert torch.allclose(o1, o2, atol=1e-6)
        for a, b in zip(h1 if isinstance(h1, tuple) else (h1,), h2 if isinstance(h2, tuple) else (h2,)):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-6)
    with pytest.raises(RuntimeError, match="input_size"):
        fixed(torch.randn(5, 2, 7))
    with pytest.raises(RuntimeError, match="Expected hidden size"):
        bad = torch.randn(d, 3, h_out)
        fixed(torch.randn(5, 2, 3), (bad, torch.randn(d, 3, 4)) if kind == "lstm" else bad)


def test_state_dict_loads_both_ways_and_same_parameter_objects():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2)
    fixed = fixed_copy(nn.Sequential(lstm))[0]
    assert list(fixed.state_dict()) == list(lstm.state_dict())
    # fix reuses the parameter objects of a module it swaps (an optimizer made before keeps working)
    lstm2 = nn.Sequential(nn.LSTM(3, 5, proj_size=2))
    before = set(map(id, lstm2.parameters()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert set(map(id, dpengine.fix(lstm2).parameters())) == before
    # torch -> dpengine and dpengine -> torch, strict
    other = nn.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2)
    fixed.load_state_dict(other.state_dict())
    for n, p in other.named_parameters():
        assert torch.equal(fixed.state_dict()[n], p)
    with torch.no_grad():
        for p in fixed.parameters():
            p.add_(1.0)
    plain = nn.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2)
    plain.load_state_dict(fixed.state_dict())
    x = torch.randn(4, 2, 3)
    assert torch.allclose(plain(x)[0], fixed(x)[0], atol=1e-6)
    # picklable (torch.save of a whole model)
    again = pickle.loads(pickle.dumps(fixed))
    assert list(again.state_dict()) == list(lstm.state_dict())
    with pytest.raises(RuntimeError, match="Missing key"):
        fixed.load_state_dict({k: v for k, v in other.state_dict().items() if k != "weight_hr_l1_reverse"})


def test_constructors_match_torch_signature():
    torch.manual_seed(0)
    for cls, ref in ((DPLSTM, nn.LSTM), (DPGRU, nn.GRU), (DPRNN, nn.RNN)):
        m = cls(3, 4, num_layers=2, batch_first=True)
        assert list(m.state_dict()) == list(ref(3, 4, num_layers=2).state_dict())
        assert m(torch.randn(2, 5, 3))[0].shape == (2, 5, 4)
    assert DPRNN(3, 4, nonlinearity="relu").mode == "RNN_RELU"


# ---------------------------------------------------------------------------------------- private step
@settings(max_examples=12, deadline=None)
@given(kind=st.sampled_from(KINDS), layers=st.integers(1, 2), bidir=st.booleans(), bf=st.booleans(),
       proj=st.booleans(), packed=st.booleans(), h0=st.booleans(), b=st.integers(1, 4), t=st.integers(1, 5),
       mode=st.sampled_from(MODES), red=st.sampled_from(["mean", "sum"]))
def test_private_step_equals_oracle(kind, layers, bidir, bf, proj, packed, h0, b, t, mode, red):
    torch.manual_seed(b * 7 + t)
    rnn = make_rnn(kind, 3, 4, num_layers=layers, bidirectional=bidir, batch_first=bf, proj_size=2 if proj else 0)
    net = RNNNet(rnn, packed, h0)
    x, y = make_batch(rnn, b, t, packed)
    check_against_oracle(net, x, y, rnn_loss, mode, red)


@pytest.mark.parametrize("mode", MODES)
def test_bidirectional_multilayer_lstm_packed_different_lengths(mode):
    torch.manual_seed(1)
    rnn = nn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=3)
    net = RNNNet(rnn, packed=True, give_h0=True)
    x, y = make_batch(rnn, 5, 7, packed=True, seed=3)
    x[3][:] = torch.tensor([7, 2, 5, 1, 3])
    y[torch.arange(7).unsqueeze(0) >= x[3].unsqueeze(1)] = -100
    check_against_oracle(net, x, y, rnn_loss, mode, "mean")


@pytest.mark.parametrize("mode", MODES)
def test_empty_batch(mode):
    net = RNNNet(nn.LSTM(3, 4), packed=False, give_h0=False).double()
    x, y = make_batch(net.rnn, 0, 4, packed=False)
    sums, norms, _ = private_step(fixed_copy(net), x, y, rnn_loss, mode=mode, reduction="sum", factors=lambda n: n)
    assert norms.shape == (0,)
    for n, p in net.state_dict().items():
        assert torch.equal(sums[n], torch.zeros_like(p)), n


def test_per_layer_clipping_with_repeated_calls():
    """The hidden-to-hidden Linear runs once per step, so it is never reduced early; the input-to-hidden
    Linear and the head are (their own groups): both paths together equal the oracle's per-group clipping."""
    torch.manual_seed(2)
    net = RNNNet(nn.GRU(3, 4, num_layers=2), packed=True, give_h0=False).double()
    x, y = make_batch(net.rnn, 4, 6, packed=True, seed=5)
    fixed = fixed_copy(net)
    named = list(fixed.named_parameters())
    tagged = by_torch_key(fixed, {n: torch.full_like(p, float(i)) for i, (n, p) in enumerate(named)})
    key_of = {named[int(v.flatten()[0])][0]: k for k, v in tagged.items()}  # fixed name -> torch key
    thresholds = [0.05 * (i + 1) for i in range(len(named))]
    policy = PerLayerClipping([[p] for _, p in named], thresholds)
    sums, _, ctrl = private_step(fixed, x, y, rnn_loss, mode="bk", reduction="sum", policy=policy)
    assert ctrl.early_reductions > 0  # ih and head were reduced inside their taps
    ps = oracle(net, x, y, rnn_loss)
    for i, (n, _) in enumerate(named):
        key = key_of[n]
        c = _clip(ps[key].reshape(4, -1).norm(dim=1), thresholds[i])
        ref = torch.einsum("b,b...->...", c, ps[key])
        assert torch.allclose(sums[key], ref, rtol=1e-9, atol=1e-12), key


@pytest.mark.slow
def test_long_sequence_has_no_pairwise_cross_terms(monkeypatch):
    """T = 50: the per-step records of the hidden-to-hidden Linear are stacked into one, so ghost and bk
    never form the T^2 cross terms between calls."""
    import dpengine.grad_sample.controller as controller

    def forbidden(*a, **k):
        raise AssertionError("pairwise cross terms between the calls of one layer")

    monkeypatch.setattr(controller, "cross_term", forbidden)
    torch.manual_seed(0)
    net = RNNNet(nn.LSTM(8, 16, num_layers=2, bidirectional=True), packed=True, give_h0=False)
    x, y = make_batch(net.rnn, 6, 50, packed=True, seed=1)
    for mode in ("ghost", "bk"):
        check_against_oracle(net, x, y, rnn_loss, mode, "mean")
