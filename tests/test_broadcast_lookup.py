"""nanoGPT's position lookup ``wpe(torch.arange(T))`` (shape (T, d), no batch dimension) broadcast against the
token embeddings: exact per-sample gradients whether or not the Poisson batch happens to have T records."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from oracle import flat_norms, oracle_per_sample, rel_err

from dpengine.grad_sample.controller import GradSampleController, GradSampleMode, LossReduction, PerSampleGradientError


class Nano(nn.Module):
    def __init__(self, use: str):
        super().__init__()
        self.tok, self.pos, self.out, self.use = nn.Embedding(10, 4), nn.Embedding(8, 4), nn.Linear(4, 3), use

    def forward(self, x):
        p = self.pos(torch.arange(x.shape[1], device=x.device))  # (T, d)
        h = self.tok(x)
        if self.use == "add":
            h = h + p
        elif self.use == "unsqueeze":
            h = h + p.unsqueeze(0)
        else:  # "sum": not a broadcast against the batch
            h = h + p.sum()
        return self.out(h)


def _loss(o, t):
    return F.cross_entropy(o.reshape(-1, 3), t.reshape(-1), reduction="sum")


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk"])
@pytest.mark.parametrize("use", ["add", "unsqueeze"])
@pytest.mark.parametrize("b,t", [(5, 5), (3, 5)], ids=["B==T", "B!=T"])
def test_rank1_position_lookup_is_exact(mode, use, b, t):
    torch.manual_seed(0)
    model = Nano(use).double()
    x, y = torch.randint(0, 10, (b, t)), torch.randint(0, 3, (b, t))
    ps = oracle_per_sample(model, _loss, x, y)
    w = torch.rand(b, dtype=torch.float64) + 0.5
    m = copy.deepcopy(model)
    ctrl = GradSampleController(m, mode=GradSampleMode(mode), clip_factors=lambda n: w,
                                loss_reduction=LossReduction.SUM)
    ctrl.note_batch(b)  # as the private loader does
    out = m(x)
    assert torch.equal(out, model(x))  # the model computes what it computed before
    _loss(out, y).backward()
    assert rel_err(ctrl.last_norms, flat_norms(ps)) <= 1e-10
    names = {id(p): n for n, p in m.named_parameters()}
    sums = {names[id(p)]: s for p, s in ctrl.pop_clipped_sums().items()}
    for n, g in ps.items():
        assert rel_err(sums[n], torch.einsum("b,b...->...", w, g)) <= 1e-10, n


def test_a_position_lookup_used_otherwise_is_refused_when_the_sizes_differ():
    torch.manual_seed(0)
    model = Nano("sum").double()
    ctrl = GradSampleController(model, mode=GradSampleMode.BK, clip_factors=lambda n: torch.ones_like(n),
                                loss_reduction=LossReduction.SUM)
    ctrl.note_batch(3)
    x, y = torch.randint(0, 10, (3, 5)), torch.randint(0, 3, (3, 5))
    with pytest.raises(PerSampleGradientError, match="'pos' saw 5"):
        _loss(model(x), y).backward()
