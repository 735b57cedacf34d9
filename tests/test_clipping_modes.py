"""Clipping modes through the public API, against a brute-force oracle.

Every trajectory test builds the private loader with ``batch_size=len(ds)``: the Poisson loader then has
q = 1 and yields the whole data set at every step (deterministic; E[B] = B = N). After each private step
the oracle recomputes float64 per-sample gradients (``oracle_per_sample``: vmap of grad, a batch of one
per sample) at the oracle's own current parameters, applies the mode's definition by hand, steps a plain
copy of the optimizer, and both the released gradient and the parameters must agree to 1e-9 (relative).

Definitions checked (g_i: sample i's gradient, g_{i,l}: its restriction to group l):

* per_layer: c_{l,i} = min(1, C_l / (||g_{i,l}|| + 1e-6)); released grad of group l = sum_i c_{l,i} g_{i,l} / E[B];
  sensitivity sqrt(sum_l C_l^2).
* automatic: c_i = C / (||g_i|| + gamma); sensitivity C.
* adaptive: flat clipping at the step's bound C_t, then C_{t+1} = clamp(C_t exp(-eta (b_t - target)), min, max)
  with b_t = #{||g_i|| <= C_t} / E[B] (the count's noise std is 1e-12 here).
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any, Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import dpengine
from dpengine import PrivacyEngine
from dpengine.accounting import rdp_subsampled_gaussian
from models import TinyGPT, seq_ce
from oracle import oracle_per_sample, rel_err

F64 = torch.float64
MODES = ["hooks", "ghost", "bk"]
TOL = 1e-9
SLACK = 1e-6  # the engine's clipping factor is min(1, C / (norm + 1e-6)), as in Opacus


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Every tensor here is tiny: one intra-op thread is as fast on an idle machine, and on a busy one it avoids
    OpenMP barriers waiting for a second core (a 2x20 @ 20x4 GEMM then takes ~30 ms instead of ~10 us)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _mlp() -> nn.Module:
    """Parameters, in order: 0.weight (7x5), 0.bias, 2.weight, 2.bias (LayerNorm), 3.weight (3x7), 3.bias."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.LayerNorm(7), nn.Linear(7, 3)).to(F64)


MLP_NAMES = ["0.weight", "0.bias", "2.weight", "2.bias", "3.weight", "3.bias"]
MLP_SIZES = [35, 7, 7, 7, 21, 3]


def _regression_data(n: int = 12) -> TensorDataset:
    """Inputs and targets spread over orders of magnitude: per-sample group norms span ~0.02 to ~60, so every
    threshold below clips some (sample, group) pairs and leaves others alone."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 5, dtype=F64, generator=g) * torch.logspace(-1, 1, n, dtype=F64)[:, None]
    y = torch.randn(n, 3, dtype=F64, generator=g) * torch.logspace(1.5, -1, n, dtype=F64)[:, None]
    return TensorDataset(x, y)


def _mse(reduction: str = "mean") -> Callable[[Tensor, Tensor], Tensor]:
    return lambda out, y: F.mse_loss(out, y, reduction=reduction)


def _optimizer(kind: str, params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1) if kind == "sgd" else torch.optim.Adam(params, lr=0.1)


# ----------------------------------------------------------------------------------------------- oracles
def _group_norms(ps: dict[str, Tensor], groups: list[list[str]]) -> Tensor:
    """(K, B) norm of each sample's gradient restricted to each group."""
    b = next(iter(ps.values())).shape[0]
    return torch.stack([sum((ps[n].reshape(b, -1).pow(2).sum(1) for n in g), torch.zeros(b, dtype=F64)).sqrt()
                        for g in groups])


class PerLayerOracle:
    def __init__(self, groups: list[list[str]], thresholds: list[float]):
        self.groups, self.thresholds = groups, thresholds

    def factors(self, norms: Tensor) -> Tensor:
        c = torch.tensor(self.thresholds, dtype=F64).unsqueeze(1)
        return torch.minimum(torch.ones_like(norms), c / (norms + SLACK))

    def after(self, norms: Tensor, expected_batch: float) -> None:
        pass


class AutomaticOracle:
    def __init__(self, names: list[str], c: float, gamma: float):
        self.groups, self.c, self.gamma = [names], c, gamma

    def factors(self, norms: Tensor) -> Tensor:
        return self.c / (norms + self.gamma)

    def after(self, norms: Tensor, expected_batch: float) -> None:
        pass


class AdaptiveOracle:
    def __init__(self, names: list[str], c: float, *, target: float, lr: float, lo: float, hi: float):
        self.groups, self.c, self.target, self.lr, self.lo, self.hi = [names], c, target, lr, lo, hi
        self.bounds = [c]  # the bound before each step, then after the last
        self.clamped = 0

    def factors(self, norms: Tensor) -> Tensor:
        return torch.minimum(torch.ones_like(norms), self.c / (norms + SLACK))

    def after(self, norms: Tensor, expected_batch: float) -> None:
        b = float((norms[0] <= self.c).sum()) / expected_batch  # the plain fraction of unclipped samples
        moved = self.c * math.exp(-self.lr * (b - self.target))
        self.c = min(self.hi, max(self.lo, moved))
        self.clamped += self.c != moved
        self.bounds.append(self.c)


def run_against_oracle(model: nn.Module, ds: TensorDataset, oracle: Any, *, mode: str, loss_fn: Callable,
                       optim: str = "sgd", steps: int = 2, reduction: str = "mean",
                       on_step: Callable[[int, Any], None] | None = None, **make_private_kwargs: Any):
    """Train ``steps`` private steps (sigma = 0) and the oracle side by side; compare after every step.

    ``loss_fn`` is the batch loss with reduction ``reduction``; a batch of one gives the per-sample loss.
    Returns (engine, private optimizer, every factor the oracle applied)."""
    ref = copy.deepcopy(model)
    ref_opt = _optimizer(optim, ref.parameters())
    engine = PrivacyEngine(seed=0)
    model, opt, loader = engine.make_private(
        module=model, optimizer=_optimizer(optim, model.parameters()), data_loader=DataLoader(ds, batch_size=len(ds)),
        noise_multiplier=0.0, grad_sample_mode=mode, loss_reduction=reduction, **make_private_kwargs)
    assert loader.sample_rate == 1.0
    n = len(ds)
    denom = float(n) if reduction == "mean" else 1.0
    name_group = {name: k for k, g in enumerate(oracle.groups) for name in g}
    applied = []
    for t in range(steps):
        batches = 0
        for x, y in loader:
            batches += 1
            assert x.shape[0] == n  # q = 1: the whole data set
            if on_step is not None:
                on_step(t, opt)
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()

            ps = oracle_per_sample(ref, loss_fn, x, y)
            assert set(name_group) == set(ps), "the oracle's groups must cover every parameter exactly"
            norms = _group_norms(ps, oracle.groups)
            c = oracle.factors(norms)
            applied.append(c)
            expected = {name: torch.einsum("b,b...->...", c[name_group[name]], ps[name]) / denom for name in ps}
            scale = max(float(e.abs().max()) for e in expected.values())
            ref_opt.zero_grad()
            for name, p in ref.named_parameters():
                p.grad = expected[name].clone()
            ref_opt.step()
            oracle.after(norms, float(n))  # E[B] = N (q = 1)
            for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
                assert rel_err(p.grad, expected[name], scale) <= TOL, f"step {t}: released gradient of {name}"
                assert rel_err(p.detach(), q.detach()) <= TOL, f"step {t}: parameter {name}"
        assert batches == 1
    assert engine.accountant.total_steps == steps
    return engine, opt, applied


def _both_sides(applied: list[Tensor]) -> None:
    """The thresholds are meaningful: some (sample, group) pairs were clipped and some were not."""
    c = torch.cat([a.flatten() for a in applied])
    assert (c < 1).any() and (c == 1).any()


# ----------------------------------------------------------------------------------------------- per_layer
def _per_layer_cases(model: nn.Module) -> dict[str, tuple[dict[str, Any], list[list[str]], list[float]]]:
    """name -> (make_private kwargs, oracle groups by parameter name, oracle thresholds C_l)."""
    p = dict(model.named_parameters())
    user = [["0.weight", "3.bias", "2.weight"], ["0.bias", "2.bias", "3.weight"]]  # groups across modules
    seq = [2.0, 5.0, 1.0, 0.8, 10.0, 1.5]
    by_name = {"0.weight": 3.0, "0.bias": 1.0, "2.weight": 0.5, "2.bias": 2.0, "3.weight": 4.0, "3.bias": 0.7}
    total = 4.0
    return {
        "default_float": (dict(max_grad_norm=4.0), [[n] for n in MLP_NAMES], [4.0 / math.sqrt(6)] * 6),
        "module": (dict(max_grad_norm=4.0, groups="module"),
                   [["0.weight", "0.bias"], ["2.weight", "2.bias"], ["3.weight", "3.bias"]], [4.0 / math.sqrt(3)] * 3),
        "user_groups": (dict(max_grad_norm=4.0, groups=[[p[n] for n in g] for g in user]), user,
                        [4.0 / math.sqrt(2)] * 2),
        "user_groups_sequence": (dict(max_grad_norm=(6.0, 1.5), groups=[[p[n] for n in g] for g in user]), user,
                                 [6.0, 1.5]),
        "sequence": (dict(max_grad_norm=seq), [[n] for n in MLP_NAMES], seq),
        "dict_by_name": (dict(max_grad_norm=by_name), [[n] for n in MLP_NAMES], [by_name[n] for n in MLP_NAMES]),
        "dict_by_index": (dict(max_grad_norm={i: c for i, c in enumerate(seq)}), [[n] for n in MLP_NAMES], seq),
        "dim": (dict(max_grad_norm="dim", total_max_grad_norm=total), [[n] for n in MLP_NAMES],
                [total * math.sqrt(s / sum(MLP_SIZES)) for s in MLP_SIZES]),
    }


PER_LAYER_CASES = list(_per_layer_cases(_mlp()))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", PER_LAYER_CASES)
def test_per_layer_matches_oracle_over_two_sgd_steps(mode, case):
    model = _mlp()
    kwargs, groups, thresholds = _per_layer_cases(model)[case]
    _, opt, applied = run_against_oracle(model, _regression_data(), PerLayerOracle(groups, thresholds), mode=mode,
                                         loss_fn=_mse(), clipping="per_layer", **kwargs)
    assert opt.policy.num_groups == len(groups)
    assert opt.sensitivity == pytest.approx(math.sqrt(sum(c * c for c in thresholds)), rel=1e-12)
    _both_sides(applied)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["default_float", "user_groups_sequence"])
def test_per_layer_matches_oracle_with_adam(mode, case):
    model = _mlp()
    kwargs, groups, thresholds = _per_layer_cases(model)[case]
    _, opt, applied = run_against_oracle(model, _regression_data(), PerLayerOracle(groups, thresholds), mode=mode,
                                         loss_fn=_mse(), optim="adam", steps=3, clipping="per_layer", **kwargs)
    assert opt.sensitivity == pytest.approx(math.sqrt(sum(c * c for c in thresholds)), rel=1e-12)
    _both_sides(applied)


@pytest.mark.parametrize("mode", MODES)
def test_per_layer_sum_reduction(mode):
    model = _mlp()
    kwargs, groups, thresholds = _per_layer_cases(model)["module"]
    _, _, applied = run_against_oracle(model, _regression_data(), PerLayerOracle(groups, thresholds), mode=mode,
                                       loss_fn=_mse("sum"), reduction="sum", clipping="per_layer", **kwargs)
    _both_sides(applied)


def test_per_layer_sensitivity_of_float_and_dim_is_the_total():
    for kwargs in (dict(max_grad_norm=4.0), dict(max_grad_norm=4.0, groups="module"),
                   dict(max_grad_norm="dim", total_max_grad_norm=4.0)):
        model = _mlp()
        _, opt, _ = PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(_regression_data(), batch_size=12), noise_multiplier=1.0, clipping="per_layer",
            **kwargs)
        assert opt.sensitivity == pytest.approx(4.0, rel=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_per_layer_tied_weights_gpt(mode):
    """TinyGPT with its head tied to the token embedding: the tied tensor is ONE group (its per-sample gradient
    is the sum of both uses), mean loss over the tokens of every sequence."""
    with torch.random.fork_rng():
        torch.manual_seed(2)
        model = TinyGPT(vocab=11, d=8, heads=2, layers=1, tie=True).to(F64)
        ds = TensorDataset(torch.randint(0, 11, (6, 5)), torch.randint(0, 11, (6, 5)))
    assert model.head.weight is model.tok.weight
    names = [n for n, _ in model.named_parameters()]  # the tied tensor once, as tok.weight
    assert "head.weight" not in names
    k, c = len(names), 1.0
    _, opt, applied = run_against_oracle(model, ds, PerLayerOracle([[n] for n in names], [c / math.sqrt(k)] * k),
                                         mode=mode, loss_fn=seq_ce("mean"), clipping="per_layer", max_grad_norm=c)
    assert opt.policy.num_groups == k
    assert opt.sensitivity == pytest.approx(c, rel=1e-12)
    _both_sides(applied)


# ---------------------------------------------------- per_layer: the clipped contribution of one sample is bounded
def _bound_mlp() -> nn.Module:
    # ReLU (not tanh or a norm layer) so that scaled inputs give scaled (huge) gradients in every layer
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).to(F64)


def _bound_setting(grouping: str, model: nn.Module) -> tuple[dict[str, Any], list[list[str]], list[float]]:
    p = dict(model.named_parameters())
    names = list(p)
    if grouping == "parameter":
        return dict(max_grad_norm=1.0), [[n] for n in names], [0.5] * 4
    if grouping == "module":
        return dict(max_grad_norm=1.0, groups="module"), [names[:2], names[2:]], [1 / math.sqrt(2)] * 2
    if grouping == "user":
        user = [["0.weight", "2.bias"], ["0.bias", "2.weight"]]
        return dict(max_grad_norm=[0.3, 2.0], groups=[[p[n] for n in g] for g in user]), user, [0.3, 2.0]
    sizes = [p[n].numel() for n in names]
    return (dict(max_grad_norm="dim", total_max_grad_norm=1.0), [[n] for n in names],
            [math.sqrt(s / sum(sizes)) for s in sizes])


def _release(model: nn.Module, ds: TensorDataset, mode: str, kwargs: dict[str, Any]) -> dict[str, Tensor]:
    """p.grad after one private step with sigma 0, sum reduction and SGD lr 0: the clipped sum itself."""
    engine = PrivacyEngine(seed=0)
    model, opt, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=DataLoader(ds, batch_size=len(ds)), noise_multiplier=0.0, clipping="per_layer",
        grad_sample_mode=mode, loss_reduction="sum", **kwargs)
    for x, y in loader:
        assert x.shape[0] == len(ds)
        opt.zero_grad()
        F.mse_loss(model(x), y, reduction="sum").backward()
        opt.step()
    assert opt.steps_taken == 1
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


_scale = st.one_of(st.floats(0.0, 1e4), st.sampled_from([0.0, 5e-324, 1e-300, 1e-8, 1.0, 1e4]))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scales=st.lists(_scale, min_size=1, max_size=4),
       grouping=st.sampled_from(["parameter", "module", "user", "dim"]), seed=st.integers(0, 2**16))
def test_per_layer_one_sample_contributes_at_most_C_l_per_group(scales, grouping, seed):
    n = len(scales)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, dtype=F64, generator=gen) * torch.tensor(scales, dtype=F64)[:, None]
    y = torch.randn(n, 3, dtype=F64, generator=gen)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        base = _bound_mlp()
    kwargs_of = lambda m: _bound_setting(grouping, m)[0]  # noqa: E731  (groups hold the copy's own parameters)
    _, groups, thresholds = _bound_setting(grouping, base)
    ps = oracle_per_sample(base, _mse("sum"), x, y)
    true_norms = _group_norms(ps, groups)
    for mode in MODES:
        m = copy.deepcopy(base)
        whole = _release(m, TensorDataset(x, y), mode, kwargs_of(m))
        singles = []
        for j in range(n):
            m = copy.deepcopy(base)
            r = _release(m, TensorDataset(x[j:j + 1], y[j:j + 1]), mode, kwargs_of(m))
            singles.append(r)
            released = _group_norms({k: v.unsqueeze(0) for k, v in r.items()}, groups)[:, 0]
            for l, c_l in enumerate(thresholds):
                assert released[l] <= c_l * (1 + 1e-9), (mode, j, l, float(released[l]), c_l)
                # and it is the clipped gradient: min(||g||, C_l ||g|| / (||g|| + 1e-6))
                g = float(true_norms[l, j])
                expected = min(g, c_l * g / (g + SLACK))
                assert abs(float(released[l]) - expected) <= 1e-9 * c_l, (mode, j, l)
        for k in whole:  # the batch releases the sum of the single-sample releases
            total = sum(s[k] for s in singles)
            assert float((whole[k] - total).abs().max()) <= 1e-9 * sum(thresholds), (mode, k)


# ----------------------------------------------------------------------------------------------- automatic
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("gamma", [None, 0.5])
@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_automatic_matches_oracle(mode, gamma, optim):
    model, c = _mlp(), 5.0  # flat norms span ~2.7 to ~90: factors both above and below 1
    options = {} if gamma is None else {"stability_constant": gamma}
    oracle = AutomaticOracle(MLP_NAMES, c, 0.01 if gamma is None else gamma)
    _, opt, applied = run_against_oracle(model, _regression_data(), oracle, mode=mode, loss_fn=_mse(), optim=optim,
                                         clipping="automatic", max_grad_norm=c, **options)
    assert opt.sensitivity == c
    assert opt.policy.stability_constant == (0.01 if gamma is None else gamma)
    fac = torch.cat([a.flatten() for a in applied])
    assert (fac > 1).any() and (fac < 1).any()  # small gradients are scaled up, large ones down


# ----------------------------------------------------------------------------------------------- adaptive
ADAPTIVE_CASES = {
    "free": dict(target_unclipped_quantile=0.3, clipbound_learning_rate=1.0),
    "hits_max": dict(target_unclipped_quantile=0.95, clipbound_learning_rate=0.2, max_clipbound=6.0),
    "hits_min": dict(target_unclipped_quantile=0.05, clipbound_learning_rate=0.3, min_clipbound=4.0),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(ADAPTIVE_CASES))
def test_adaptive_bound_follows_quantile_update_and_is_used_at_its_step(mode, case):
    options = ADAPTIVE_CASES[case]
    c0 = 5.0
    oracle = AdaptiveOracle(MLP_NAMES, c0, target=options["target_unclipped_quantile"],
                            lr=options["clipbound_learning_rate"], lo=options.get("min_clipbound", 1e-8),
                            hi=options.get("max_clipbound", 1e8))
    seen = []

    def before(t: int, opt: Any) -> None:  # the bound the step is about to use
        seen.append(opt.policy.max_grad_norm)
        assert opt.sensitivity == opt.policy.max_grad_norm

    _, opt, applied = run_against_oracle(_mlp(), _regression_data(), oracle, mode=mode, loss_fn=_mse(), steps=3,
                                         on_step=before, clipping="adaptive", max_grad_norm=c0,
                                         unclipped_num_std=1e-12, **options)
    assert len(seen) == 3
    for got, want in zip([*seen, opt.policy.max_grad_norm], oracle.bounds):
        assert got == pytest.approx(want, rel=TOL)
    assert len(set(round(b, 12) for b in oracle.bounds)) > 2, "the bound should move"
    if case != "free":
        assert oracle.clamped > 0
    _both_sides(applied)


def test_adaptive_with_adam_and_ghost():
    oracle = AdaptiveOracle(MLP_NAMES, 5.0, target=0.5, lr=1.0, lo=1e-8, hi=1e8)
    _, opt, _ = run_against_oracle(_mlp(), _regression_data(), oracle, mode="ghost", loss_fn=_mse(), optim="adam",
                                   steps=3, clipping="adaptive", max_grad_norm=5.0, unclipped_num_std=1e-12,
                                   target_unclipped_quantile=0.5, clipbound_learning_rate=1.0)
    assert opt.policy.max_grad_norm == pytest.approx(oracle.c, rel=TOL)
    # the bound is part of the optimizer's state (a resumed run continues from it)
    state = opt.state_dict()
    assert state["dpengine_clipping"] == {"max_grad_norm": opt.policy.max_grad_norm}
    opt.policy.max_grad_norm = 1.0
    opt.load_state_dict(state)
    assert opt.policy.max_grad_norm == pytest.approx(oracle.c, rel=TOL)


def _adaptive(sigma: float, s: float, model: nn.Module | None = None, n: int = 20, c: float = 1.0, seed: int = 0,
              **options: Any):
    model = model if model is not None else nn.Linear(4, 2).to(F64)
    ds = TensorDataset(torch.randn(n, model.in_features, dtype=model.weight.dtype))
    engine = PrivacyEngine(seed=seed)
    model, opt, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), data_loader=DataLoader(ds, batch_size=n),
        noise_multiplier=sigma, max_grad_norm=c, clipping="adaptive", unclipped_num_std=s, **options)
    return engine, model, opt, loader


@pytest.mark.parametrize("discard", ["zero_grad", "refused_step"])
def test_adaptive_count_of_a_dropped_backward_is_never_released(discard):
    """The unclipped count is a second release of the step's batch: a backward whose sums were dropped
    (``zero_grad``, or a refused step) must not leave its count to be noised with the next step's (a record
    would move it by 1 or more where the noise split assumes 1/2, in a step the accountant never saw)."""
    model = nn.Linear(4, 1, bias=False).to(F64)
    x = torch.zeros(20, 4, dtype=F64)
    x[:, 0] = 0.5  # every per-sample gradient (sum loss) has norm 0.5 < C: all unclipped, centred count B/2
    engine = PrivacyEngine(seed=0)
    model, opt, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=DataLoader(TensorDataset(x), batch_size=4), noise_multiplier=0.0, max_grad_norm=1.0,
        clipping="adaptive", unclipped_num_std=1e-12, loss_reduction="sum", poisson_sampling=False)
    batches = iter(loader)
    (xa,) = next(batches)
    opt.zero_grad()
    model(xa).sum().backward()
    if discard == "zero_grad":  # dropped by zero_grad: the step then has no backward and is refused
        opt.zero_grad()
    else:  # two backward passes of one batch: the step is refused
        model(xa).sum().backward()
    with pytest.raises(RuntimeError, match="refused"):
        opt.step()
    (xa,) = next(batches)  # the user goes on with the next batch
    opt.zero_grad()
    model(xa).sum().backward()
    opt.step()
    frac = (len(xa) / 2) / opt.expected_batch_size + 0.5  # this step's batch alone
    assert opt.policy.max_grad_norm == pytest.approx(math.exp(-0.2 * (frac - 0.5)), rel=1e-9)
    assert engine.accountant.total_steps == 1


@pytest.mark.parametrize("s", [0.5000001, 0.6, 1.0, 5.0, 1e3])
def test_adaptive_noise_split(s):
    _, _, opt, _ = _adaptive(1.0, s)
    expected = (1 - (2 * s) ** -2) ** -0.5
    assert opt.policy.grad_noise_multiplier(1.0) == pytest.approx(expected, rel=1e-12)
    assert opt.policy.grad_noise_multiplier(1.0) > 1.0


def _make_adaptive(sigma: float, s: float) -> None:
    model = nn.Linear(4, 2).to(F64)
    PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(torch.randn(8, 4, dtype=F64)), batch_size=8),
        noise_multiplier=sigma, max_grad_norm=1.0, clipping="adaptive", unclipped_num_std=s)


# (2.0, 0.5) and (2.0, 1.0): s > 1 / (2 sigma) but the count alone still spends all of sigma: 1 / (2 s)^2 >= 1 / sigma^2
@pytest.mark.parametrize("sigma,s", [(1.0, 0.5), (1.0, 0.3), (1.0, 0.01), (2.0, 0.25), (4.0, 0.1), (2.0, 0.5),
                                     (2.0, 1.0)])
def test_adaptive_refuses_count_noise_that_spends_all_of_sigma(sigma, s):
    """The split needs sigma^-2 - (2 s)^-2 > 0, i.e. s > sigma / 2 (for sigma = 1: s > 1 / (2 sigma) = 1/2)."""
    assert s <= sigma / 2
    with pytest.raises(ValueError, match="unclipped_num_std"):
        _make_adaptive(sigma, s)


@pytest.mark.parametrize("sigma,s", [(1.0, 0.5000001), (0.5, 0.3), (0.2, 0.11), (2.0, 1.01)])
def test_adaptive_accepts_count_noise_just_above_half_sigma(sigma, s):
    _make_adaptive(sigma, s)


@pytest.mark.parametrize("sigma,s", [(2.0, 0.5), (0.5, 0.2), (4.0, 1.0)])
def test_adaptive_refusal_states_the_threshold_it_applies(sigma, s):
    """The message tells the user the unclipped_num_std they need: sigma / 2 (what the check applies)."""
    with pytest.raises(ValueError) as err:
        _make_adaptive(sigma, s)
    msg = str(err.value)
    stated = re.search(r"needs unclipped_num_std > [^=]*= ?([0-9.eE+-]+)", msg)
    if stated is not None:
        assert float(stated.group(1)) == pytest.approx(sigma / 2), msg
    else:
        assert f"{sigma / 2:g}" in msg, msg


@pytest.mark.parametrize("sigma,s", [(1.0, 0.6), (1.0, 2.0), (0.7, 1.5), (3.0, 1.6)])
def test_adaptive_split_composes_to_one_gaussian_in_rdp(sigma, s):
    """The gradient Gaussian (noise multiplier sigma_g) and the count Gaussian (std s, sensitivity 1/2, i.e.
    noise multiplier 2 s) on the same batch compose to exactly the Gaussian the accountant is told (sigma)."""
    _, _, opt, _ = _adaptive(sigma, s)
    sigma_g = opt.policy.grad_noise_multiplier(sigma)
    alphas = np.array([1.5, 2.0, 8.0, 32.0, 256.0])
    by_hand = alphas / (2 * sigma_g**2) + alphas * 0.5**2 / (2 * s**2)
    np.testing.assert_allclose(alphas / (2 * sigma**2), by_hand, rtol=1e-12)
    composed = rdp_subsampled_gaussian(1.0, sigma_g, alphas) + rdp_subsampled_gaussian(1.0, 2 * s, alphas)
    np.testing.assert_allclose(rdp_subsampled_gaussian(1.0, sigma, alphas), composed, rtol=1e-12)


def test_adaptive_gradient_noise_std_is_sigma_g_C_over_expected_batch():
    """Zero loss gradient, sigma = 1, s = 0.6: p.grad is pure noise of std sigma_g * C_t / E[B] at step t, with
    sigma_g = (1 - (2 s)^-2)^-1/2 ~ 1.81 (the accountant is told sigma = 1)."""
    sigma, s, c, n = 1.0, 0.6, 0.7, 20
    engine, model, opt, loader = _adaptive(sigma, s, model=nn.Linear(100, 60).to(F64), n=n, c=c, seed=3)
    sigma_g = (1 - (2 * s) ** -2) ** -0.5
    z = []
    for _ in range(2):
        for (x,) in loader:
            bound = opt.policy.max_grad_norm
            opt.zero_grad()
            (0.0 * model(x).sum()).backward()
            opt.step()
            z.append(torch.cat([p.grad.flatten() for p in model.parameters()]) / (sigma_g * bound / n))
    z = torch.cat(z).numpy()
    assert z.size == 2 * 6060
    # two-sided: the sample std of 12120 standard normals is within 5 standard errors (1/sqrt(2 n) each,
    # ~3.2% in all) of 1; using sigma instead of sigma_g would be off by 45%
    assert abs(z.std() - 1) < 5 / math.sqrt(2 * z.size), z.std()
    assert abs(z.mean()) < 5 / math.sqrt(z.size)
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert engine.accountant.history == [(sigma, 1.0, 2)]


def test_adaptive_count_noise_std_is_unclipped_num_std():
    """With target 1 and every norm 0 <= C, b - target is the count noise / E[B] alone, so each step moves
    log C by -eta * N(0, s^2) / E[B]; recover the draws and check their std (two-sided, 5 standard errors of
    1 / sqrt(2 * 1000), i.e. within 11%: catches a count noised at 2 s, s / 2 or not at all)."""
    s, n, lr, steps = 0.6, 20, 0.2, 1000
    # float32 model: the count is float64 whatever the model, and tiny float64 GEMMs are slow on a busy 2-core CPU
    _, model, opt, loader = _adaptive(0.0, s, model=nn.Linear(4, 2), n=n, seed=4, target_unclipped_quantile=1.0,
                                      clipbound_learning_rate=lr)
    bounds = [opt.policy.max_grad_norm]
    for _ in range(steps):
        for (x,) in loader:
            opt.zero_grad()
            (0.0 * model(x).sum()).backward()
            opt.step()
        bounds.append(opt.policy.max_grad_norm)
    draws = -np.diff(np.log(bounds)) / lr * n
    assert abs(draws.std() / s - 1) < 5 / math.sqrt(2 * steps), draws.std()
    assert abs(draws.mean()) < 5 * s / math.sqrt(steps)


# ----------------------------------------------------------------------------------------------- noise scale
@pytest.mark.parametrize("clipping,options,sens", [
    ("per_layer", dict(max_grad_norm=[3.0, 4.0]), 5.0),  # groups: weight, bias; sqrt(3^2 + 4^2)
    ("per_layer", dict(max_grad_norm="dim", total_max_grad_norm=0.7), 0.7),
    ("automatic", dict(max_grad_norm=0.7, stability_constant=0.1), 0.7),
])
def test_noise_std_is_sigma_times_policy_sensitivity_over_expected_batch(clipping, options, sens):
    """Zero loss gradient: p.grad is pure noise of std sigma * sensitivity / E[B] (mean loss). Two-sided:
    the sample std of 6060 values is within 5 standard errors (1 / sqrt(2 n), ~4.5% in all) of it."""
    sigma, n = 1.3, 20
    model = nn.Linear(100, 60).to(F64)
    engine = PrivacyEngine(seed=7)
    model, opt, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=DataLoader(TensorDataset(torch.randn(n, 100, dtype=F64)), batch_size=n), noise_multiplier=sigma,
        clipping=clipping, **options)
    assert opt.sensitivity == pytest.approx(sens, rel=1e-12)
    for (x,) in loader:
        (0.0 * model(x).sum()).backward()
        opt.step()
    z = (torch.cat([p.grad.flatten() for p in model.parameters()]) / (sigma * sens / n)).numpy()
    assert abs(z.std() - 1) < 5 / math.sqrt(2 * z.size), z.std()
    assert stats.kstest(z, "norm").pvalue > 1e-3


# ----------------------------------------------------------------------------------------------- refusals
def _make(clipping: str, max_grad_norm: Any = 1.0, model: nn.Module | None = None, **options: Any):
    model = model if model is not None else _mlp()
    return PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_regression_data(), batch_size=12), noise_multiplier=1.0, max_grad_norm=max_grad_norm,
        clipping=clipping, **options)


@pytest.mark.parametrize("clipping,options,allowed", [
    ("automatic", dict(groups="module"), ["stability_constant"]),
    ("flat", dict(stability_constant=0.1), []),
    ("per_layer", dict(stability_constant=0.1), ["groups", "total_max_grad_norm"]),
    ("adaptive", dict(unclipped_num_std=5.0, groups="module"),
     ["clipbound_learning_rate", "max_clipbound", "min_clipbound", "target_unclipped_quantile", "unclipped_num_std"]),
])
def test_unknown_clipping_options_are_refused_naming_the_allowed_ones(clipping, options, allowed):
    with pytest.raises(ValueError) as err:
        _make(clipping, **options)
    msg = str(err.value)
    assert "takes no option" in msg
    for name in allowed:
        assert name in msg
    if not allowed:
        assert "none" in msg


@pytest.mark.parametrize("clipping,options", [("flat", {}), ("automatic", {}),
                                              ("adaptive", dict(unclipped_num_std=5.0))])
@pytest.mark.parametrize("max_grad_norm", [[1.0, 1.0], (1.0,), {"0.weight": 1.0}, "dim"])
def test_non_float_max_grad_norm_needs_per_layer(clipping, options, max_grad_norm):
    with pytest.raises(ValueError, match="float max_grad_norm"):
        _make(clipping, max_grad_norm, **options)


def test_unknown_clipping_mode_is_refused():
    with pytest.raises(ValueError, match="supported"):
        _make("per_sample")


def test_adaptive_needs_unclipped_num_std():
    with pytest.raises(ValueError, match="unclipped_num_std"):
        _make("adaptive")


def test_per_layer_groups_missing_a_parameter_are_refused():
    model = _mlp()
    p = dict(model.named_parameters())
    engine = dpengine.PrivacyEngine()
    args = dict(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                data_loader=DataLoader(_regression_data(), batch_size=12), noise_multiplier=1.0, max_grad_norm=1.0,
                clipping="per_layer")
    with pytest.raises(ValueError, match="every trainable parameter"):
        engine.make_private(**args, groups=[[p["0.weight"], p["0.bias"]], [p["3.weight"], p["3.bias"]]])  # LN missing
    # refused before anything was attached: the same engine and model still make a private run
    model, opt, loader = engine.make_private(**args, groups=[[p["0.weight"], p["0.bias"]], [p["2.weight"], p["2.bias"]],
                                                            [p["3.weight"], p["3.bias"]]])
    assert opt.policy.num_groups == 3
    for x, y in loader:
        F.mse_loss(model(x), y).backward()
        opt.step()
    assert engine.accountant.total_steps == 1


@pytest.mark.parametrize("groups", [
    lambda p, o: [[p["0.weight"], p["0.bias"], p["2.weight"]], [p["2.bias"], p["3.weight"], p["3.bias"], p["0.bias"]]],
    lambda p, o: [[p["0.weight"], p["0.bias"], p["2.weight"], p["2.bias"]], [p["3.weight"], p["3.bias"], o]],
])
def test_per_layer_groups_repeating_or_foreign_parameters_are_refused(groups):
    model = _mlp()
    foreign = nn.Parameter(torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError, match="every trainable parameter"):
        _make("per_layer", model=model, groups=groups(dict(model.named_parameters()), foreign))


@pytest.mark.parametrize("options,match", [
    (dict(max_grad_norm=[1.0, 2.0]), "thresholds for 6 groups"),
    (dict(max_grad_norm={"0.weight": 1.0}), "1 of 6"),
    (dict(max_grad_norm={"nope": 1.0}), "neither"),
    (dict(max_grad_norm={"0.weight": 1.0}, groups="module"), "neither"),
    (dict(max_grad_norm="dim"), "total_max_grad_norm"),
    (dict(max_grad_norm="size", total_max_grad_norm=1.0), "dim"),
    (dict(max_grad_norm=[1.0, 1.0, 1.0, 1.0, 1.0, -1.0]), "> 0"),
    (dict(max_grad_norm=1.0, groups="layer"), "groups="),
])
def test_per_layer_bad_thresholds_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        _make("per_layer", **options)


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk"])
def test_per_layer_reduces_each_layer_as_its_gradient_arrives(mode):
    """Separable groups: each layer's clipped sum is formed in its own tap and its captures freed there;
    layers sharing a parameter (tied) or a group wait for the end of the backward. Same result either way."""
    from models import TinyGPT, seq_ce

    torch.manual_seed(0)
    model = TinyGPT(vocab=11, d=8, heads=2, layers=1, padding_idx=0, tie=True).double()
    x, y = torch.randint(0, 11, (5, 6)), torch.randint(0, 11, (5, 6))
    ds = torch.utils.data.TensorDataset(x, y)
    engine = PrivacyEngine(seed=0)
    model, opt, dl = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=torch.utils.data.DataLoader(ds, batch_size=5), noise_multiplier=0.0, max_grad_norm=0.7,
        clipping="per_layer", groups="module", grad_sample_mode=mode)
    ctrl = engine.controller
    for xb, yb in dl:
        seq_ce("mean")(model(xb), yb).backward()
        early = ctrl.early_reductions
        # every layer but the tied embedding/head pair is reduced early
        assert early == len(ctrl.layers) - 2, (early, len(ctrl.layers))
        assert not ctrl._staged and not ctrl._pending
        got = {id(p): t.clone() for p, t in ctrl._summed.items()}
        norms = ctrl.last_group_norms.clone()
    # the same step without early reduction gives the same sums and norms
    ctrl._own_groups = {}
    ctrl.clear()
    ctrl._batch_reduced = False
    seq_ce("mean")(model(xb), yb).backward()
    assert ctrl.early_reductions == early
    for p, t in ctrl._summed.items():
        assert torch.allclose(t, got[id(p)], rtol=1e-12, atol=1e-15)
    assert torch.allclose(ctrl.last_group_norms, norms, rtol=1e-12)


# ----------------------------------------------------------------------------------------------- settings changed mid-run
def _one_record_run(mode: str, **kwargs: Any):
    """A private per_layer run over one record (q = 1), sum loss, sigma 0, lr 0: p.grad is that record's clipped
    contribution; ``step()`` takes one step on a loss 1e4 times too large (every group far above its threshold)."""
    model = _bound_mlp()
    x, y = torch.randn(1, 4, dtype=F64), torch.randn(1, 3, dtype=F64)
    engine = PrivacyEngine(seed=0)
    model, opt, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=1), noise_multiplier=0.0,
        grad_sample_mode=mode, loss_reduction="sum", **kwargs)

    def step() -> dict[str, Tensor]:
        for xb, yb in loader:
            opt.zero_grad()
            (1e4 * F.mse_loss(model(xb), yb, reduction="sum")).backward()
            opt.step()
        return {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return model, opt, step


@pytest.mark.parametrize("mode", MODES)
def test_per_layer_thresholds_changed_between_steps_clip_at_the_thresholds_the_noise_uses(mode):
    """The policy caches its thresholds as a tensor for the factors; a change must reach that cache (the noise
    follows the new thresholds at once: with the old cache the record kept 0.5 per group against noise for 0.02)."""
    model, opt, step = _one_record_run(mode, clipping="per_layer", max_grad_norm=1.0)
    groups = [[n] for n, _ in model.named_parameters()]
    first = _group_norms({k: v.unsqueeze(0) for k, v in step().items()}, groups)[:, 0]
    assert torch.allclose(first, torch.full((4,), 0.5, dtype=F64), rtol=1e-6)
    new = (0.01, 0.02, 0.03, 0.04)
    opt.policy.thresholds = list(new)
    assert opt.policy.thresholds == new
    assert opt.sensitivity == pytest.approx(math.sqrt(sum(t * t for t in new)), rel=1e-12)  # what the noise uses
    released = _group_norms({k: v.unsqueeze(0) for k, v in step().items()}, groups)[:, 0]
    for l, c_l in enumerate(new):
        assert released[l] <= c_l * (1 + 1e-9), (l, float(released[l]), c_l)
        assert released[l] == pytest.approx(c_l, rel=1e-6)  # clipped to it, not below


def test_per_layer_thresholds_are_one_validated_value():
    _, opt, _ = _one_record_run("bk", clipping="per_layer", max_grad_norm=1.0)
    with pytest.raises(TypeError):
        opt.policy.thresholds[0] = 0.01  # a tuple: no change behind the setter's back
    with pytest.raises(ValueError, match="4 groups"):
        opt.policy.thresholds = [0.1, 0.1]
    with pytest.raises(ValueError, match="> 0"):
        opt.policy.thresholds = [0.1, 0.1, 0.1, -0.1]
    assert opt.policy.thresholds == (0.5,) * 4


_SETTINGS = [
    ("flat", {}, "max_grad_norm", 0.01),
    ("automatic", {}, "max_grad_norm", 0.01),
    ("automatic", {}, "stability_constant", 0.5),
    ("adaptive", dict(unclipped_num_std=5.0), "max_grad_norm", 0.01),
    ("error_feedback", dict(error_max_grad_norm=0.1), "max_grad_norm", 0.01),
    ("error_feedback", dict(error_max_grad_norm=0.1), "error_max_grad_norm", 0.01),
    ("per_layer", {}, "thresholds", (0.01,) * 4),
]


@pytest.mark.parametrize("clipping,options,name,value", _SETTINGS, ids=[f"{c}-{n}" for c, _, n, _ in _SETTINGS])
def test_a_clipping_setting_cannot_change_between_backward_and_step(clipping, options, name, value):
    """The backward clips with the current settings; the step's noise would follow a setting changed in
    between. Refused there; after the step (or a zero_grad that drops the clipped sums) it applies to both."""
    model, opt, step = _one_record_run("bk", clipping=clipping, max_grad_norm=1.0, **options)
    step()
    x, y = next(iter(DataLoader(TensorDataset(torch.randn(1, 4, dtype=F64), torch.randn(1, 3, dtype=F64)))))
    opt.zero_grad()
    F.mse_loss(model(x), y, reduction="sum").backward()
    before = getattr(opt.policy, name)
    with pytest.raises(RuntimeError, match=f"{name} cannot change between a backward and its step"):
        setattr(opt.policy, name, value)
    assert getattr(opt.policy, name) == before
    opt.zero_grad()  # the clipped sums are dropped: nothing was clipped with the old value any more
    setattr(opt.policy, name, value)
    assert getattr(opt.policy, name) == pytest.approx(value)


@pytest.mark.parametrize("clipping,options,name", [
    ("flat", {}, "max_grad_norm"), ("automatic", {}, "max_grad_norm"), ("automatic", {}, "stability_constant"),
    ("adaptive", dict(unclipped_num_std=5.0), "max_grad_norm"),
    ("error_feedback", dict(error_max_grad_norm=0.1), "error_max_grad_norm")])
@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_a_clipping_setting_is_validated_when_assigned(clipping, options, name, bad):
    _, opt, _ = _one_record_run("bk", clipping=clipping, max_grad_norm=1.0, **options)
    with pytest.raises(ValueError, match="> 0"):
        setattr(opt.policy, name, bad)


def test_error_feedback_expected_batch_size_is_fixed():
    """It is in the sensitivity, while the release is scaled by the optimizer's own: they cannot diverge."""
    _, opt, _ = _one_record_run("bk", clipping="error_feedback", max_grad_norm=1.0)
    with pytest.raises(AttributeError, match="fixed at make_private"):
        opt.policy.expected_batch_size = 0.5
    assert opt.policy.expected_batch_size == 1.0
