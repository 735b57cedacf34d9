"""Error feedback (DiceSGD) against its definition on the float64 oracle, over several steps."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from oracle import oracle_per_sample

from dpengine import PrivacyEngine

MODES = ["hooks", "ghost", "bk"]


def _setup(mode, reduction="mean", c1=0.3, c2=0.05, n=6):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    ds = TensorDataset(torch.randn(n, 5, dtype=torch.float64) * 3, torch.randint(0, 3, (n,)))
    ref = copy.deepcopy(model)
    engine = PrivacyEngine(seed=0)
    model, opt, dl = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=DataLoader(ds, batch_size=n),
        noise_multiplier=0.0, max_grad_norm=c1, clipping="error_feedback", error_max_grad_norm=c2,
        grad_sample_mode=mode, loss_reduction=reduction)
    return engine, model, opt, dl, ref, ds


def _oracle_step(ref, ds, e, c1, c2, lr=0.1):
    x, y = ds.tensors
    ps = oracle_per_sample(ref, lambda o, t: F.cross_entropy(o, t), x, y)
    names = list(ps)
    flat = torch.cat([ps[k].reshape(x.shape[0], -1) for k in names], 1)
    factors = (c1 / (flat.norm(dim=1) + 1e-6)).clamp(max=1.0)
    clipped_mean = (factors[:, None] * flat).mean(0)
    mean = flat.mean(0)
    k = min(1.0, c2 / (float(e.norm()) + 1e-12))
    v = clipped_mean + k * e
    e = e + mean - v
    with torch.no_grad():
        off = 0
        for name, p in ref.named_parameters():
            p -= lr * v[off:off + p.numel()].view_as(p)
            off += p.numel()
    return e


@pytest.mark.parametrize("mode", MODES)
def test_error_feedback_follows_its_definition_over_three_steps(mode):
    c1, c2 = 0.3, 0.05
    engine, model, opt, dl, ref, ds = _setup(mode, c1=c1, c2=c2)
    e = torch.zeros(sum(p.numel() for p in ref.parameters()), dtype=torch.float64)
    for step in range(3):
        for x, y in dl:  # q = 1: the whole dataset every step
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        e = _oracle_step(ref, ds, e, c1, c2)
        for (n, p), (_, r) in zip(model.named_parameters(), ref.named_parameters()):
            assert torch.allclose(p, r, rtol=1e-9, atol=1e-12), (step, n, float((p - r).abs().max()))
        assert float(e.norm()) > 0  # from step 2 on the fed-back error matters


def test_error_feedback_privacy_accounting_is_the_conservative_one():
    engine, model, opt, dl, *_ = _setup("bk", c1=0.3, c2=0.05, n=6)
    # sensitivity C1 + 2 E[B] C2 (sum units), no amplification by subsampling: the accountant sees q = 1
    assert opt.sensitivity == pytest.approx(0.3 + 2 * 6 * 0.05)
    assert opt.sample_rate == 1.0


def test_error_state_is_checkpointed_and_resumed():
    engine, model, opt, dl, ref, ds = _setup("bk")
    x, y = next(iter(dl))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    state = opt.state_dict()
    assert any(e is not None and float(e.abs().sum()) > 0 for e in state["dpengine_clipping"]["error"])
    engine2, model2, opt2, *_ = _setup("bk")
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(state)
    for p, p2 in zip(opt.params, opt2.params):
        assert torch.equal(opt.policy.error[p], opt2.policy.error[p2])
