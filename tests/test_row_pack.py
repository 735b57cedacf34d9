"""Per-sample rows of many layers reduced together (``grad_sample/rows.py``): biases and norm-layer parameters
of one clipping group share one (B, N) matrix, one norm reduction and one matrix-vector product.

The pack must give the per-parameter path's numbers: checked against the float64 vmap oracle (flat and
per-layer clipping with groups across layers), against the same run with packing switched off (virtual
steps, error feedback), and each test first checks that a pack actually formed with the columns it meant
to test (norm columns, sum-only columns of a joint Gram norm, a 2-D parameter)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpengine import PrivacyEngine, VirtualSteps
from dpengine.grad_sample import rows
from test_clipping_modes import PerLayerOracle, _both_sides, run_against_oracle

F64 = torch.float64


class NormNet(nn.Module):
    """Conv bias, GroupNorm, affine InstanceNorm, a token Linear (T = 5), a LayerNorm over (5, 6) (a 2-D
    parameter), an RMSNorm without bias and a Linear head on (B, 30): twelve row-formed parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.inorm = nn.InstanceNorm1d(4, affine=True)
        self.tok = nn.Linear(4, 6)
        self.ln = nn.LayerNorm([5, 6])
        self.rms = nn.RMSNorm(6)
        self.head = nn.Linear(30, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inorm(self.gn(self.conv(x))))  # (B, 4, 5)
        h = self.rms(self.ln(torch.tanh(self.tok(h.transpose(1, 2)))))  # (B, 5, 6)
        return self.head(h.flatten(1))


def _net() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = NormNet().to(F64)
        with torch.no_grad():  # non-trivial affine parameters
            for m in (net.gn, net.inorm, net.ln, net.rms):
                for p in m.parameters():
                    p.add_(0.3 * torch.randn_like(p))
        return net


def _data(n: int = 10) -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 3, 5, dtype=F64, generator=g) * torch.logspace(-1, 1, n, dtype=F64)[:, None, None]
    y = torch.randn(n, 3, dtype=F64, generator=g) * torch.logspace(1.5, -1, n, dtype=F64)[:, None]
    return TensorDataset(x, y)


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, y)


NAMES = [n for n, _ in _net().named_parameters()]
ROWS = [n for n in NAMES if n.endswith("bias") or n.split(".")[0] in ("gn", "inorm", "ln", "rms")]


@pytest.fixture
def packs(monkeypatch: pytest.MonkeyPatch) -> list[list[tuple[str, bool, tuple[int, ...]]]]:
    """Every pack written: (parameter name, norm from the pack, parameter shape) per column block."""
    written: list[list[tuple[str, bool, tuple[int, ...]]]] = []
    real = rows.RowPack.write

    def spy(self: rows.RowPack, *args: Any) -> None:
        real(self, *args)
        written.append([(f"{e.tl.name}.{e.name}", e.norm, tuple(e.param.shape)) for e in self.entries])
    monkeypatch.setattr(rows.RowPack, "write", spy)
    return written


@pytest.mark.parametrize("mode", ["bk", "ghost"])
def test_one_group_pack_matches_the_oracle(mode, packs):
    _, _, applied = run_against_oracle(_net(), _data(), PerLayerOracle([NAMES], [8.0]), mode=mode, loss_fn=_mse,
                                       max_grad_norm=8.0)
    _both_sides(applied)
    cols = {name: (norm, shape) for name, norm, shape in packs[0]}
    assert set(cols) == set(ROWS)
    assert cols["ln.weight"][1] == (5, 6)
    assert cols["head.bias"][0] is False  # one token: inside the head's joint norm, only summed in the pack
    # the token Linear: bk materializes its weight (2 T^2 > p d), so its bias norm comes from the pack;
    # ghost takes the joint Gram form, which covers it
    assert cols["tok.bias"][0] is (mode == "bk")
    assert all(cols[n][0] for n in ROWS if n.split(".")[0] in ("conv", "gn", "inorm", "ln", "rms"))


@pytest.mark.parametrize("mode", ["bk", "ghost"])
def test_per_layer_groups_across_layers_get_a_pack_each(mode, packs):
    """Weights of norm layers in one group, biases in another: a pack per group, each clipped by its own
    threshold."""
    model = _net()
    params = dict(model.named_parameters())
    groups = [[n for n in NAMES if n.endswith("bias")], [n for n in NAMES if not n.endswith("bias")]]
    _, _, applied = run_against_oracle(model, _data(), PerLayerOracle(groups, [2.0, 8.0]), mode=mode, loss_fn=_mse,
                                       clipping="per_layer", max_grad_norm=(2.0, 8.0),
                                       groups=[[params[n] for n in g] for g in groups])
    _both_sides(applied)
    assert len(packs) == 4  # two steps, two groups
    firsts = [{name for name, _, _ in p} for p in packs[:2]]
    assert sorted(map(sorted, firsts)) == sorted(sorted(n for n in ROWS if n in g) for g in groups)


def _grads(steps: list[str], clipping: str = "flat", pack: bool = True, mode: str = "bk",
           monkeypatch: pytest.MonkeyPatch | None = None, **kw: Any) -> list[list[torch.Tensor]]:
    """Released gradients (sigma = 0) over two steps of two physical batches each (VirtualSteps)."""
    assert monkeypatch is not None
    monkeypatch.setattr(rows, "MIN_SAVING", rows.MIN_SAVING if pack else 10 ** 9)
    model = _net()
    model, opt, loader = PrivacyEngine(seed=0).make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_data(12), batch_size=12), noise_multiplier=0.0, max_grad_norm=8.0,
        grad_sample_mode=mode, clipping=clipping, poisson_sampling=False, **kw)
    out = []
    for _ in steps:
        with VirtualSteps(loader, max_physical_batch_size=5, optimizer=opt) as chunks:
            for x, y in chunks:
                _mse(model(x), y).backward()
                opt.step()
                opt.zero_grad()
        out.append([p.detach().clone() for p in model.parameters()])
    return out


@pytest.mark.parametrize("clipping,kw", [("flat", {}), ("error_feedback", {"error_max_grad_norm": 0.5})])
def test_virtual_steps_and_error_feedback_give_the_unpacked_numbers(clipping, kw, packs, monkeypatch):
    """Later physical batches of a step add into the first one's sums; error feedback packs the unclipped
    sums too. Same parameters, to rounding, as with packing off."""
    packed = _grads(["a", "b"], clipping, True, monkeypatch=monkeypatch, **kw)
    assert len(packs) == 6  # three physical batches (5, 5, 2) per step
    count = len(packs)
    plain = _grads(["a", "b"], clipping, False, monkeypatch=monkeypatch, **kw)
    assert len(packs) == count  # switched off: no pack formed
    for step_p, step_u in zip(packed, plain):
        for a, b in zip(step_p, step_u):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("make", [lambda: nn.LayerNorm(5), lambda: nn.Linear(4, 5)], ids=["layer_norm", "linear"])
def test_no_pack_where_it_would_not_save_operators(make, packs):
    """One norm layer (8 operators saved) or one layer's bias (2) stays on its own path: a pack costs about 9."""
    torch.manual_seed(0)
    model = make().to(F64)
    x = torch.randn(6, model.normalized_shape[0] if isinstance(model, nn.LayerNorm) else 4, dtype=F64)
    model, opt, loader = PrivacyEngine(seed=0).make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(x), batch_size=6), noise_multiplier=1.0, max_grad_norm=1.0,
        poisson_sampling=False)
    for (xb,) in loader:
        model(xb).pow(3).sum().backward()
        opt.step()
    assert packs == []
    assert all(p.grad is not None for p in model.parameters())
