"""The public API end to end: one DP-SGD step, noise, sampling, virtual steps, validation, state."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dpengine
from dpengine import PrivacyEngine, VirtualSteps
from dpengine.grad_sample.controller import PerSampleGradientError
from models import TinyGPT, seq_ce
from oracle import oracle_per_sample, rel_err

MODES = ["hooks", "ghost", "bk"]


def _mlp(dtype=torch.float64):
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)


def _loader(n=40, batch=8, dtype=torch.float64):
    ds = TensorDataset(torch.randn(n, 6, dtype=dtype), torch.randint(0, 3, (n,)))
    return DataLoader(ds, batch_size=batch)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_one_step_equals_bruteforce_clipped_mean(mode, reduction):
    model, dl = _mlp(), _loader()
    ref_model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    engine = PrivacyEngine(seed=1)
    model, opt, dl = engine.make_private(module=model, optimizer=opt, data_loader=dl, noise_multiplier=0.0,
                                         max_grad_norm=0.3, grad_sample_mode=mode, loss_reduction=reduction)
    x, y = next(iter(dl))
    assert x.shape[0] > 0
    opt.zero_grad()
    F.cross_entropy(model(x), y, reduction=reduction).backward()
    opt.step()
    ps = oracle_per_sample(ref_model, lambda o, t: F.cross_entropy(o, t, reduction=reduction), x, y)
    norms = torch.stack([t.reshape(t.shape[0], -1).pow(2).sum(1) for t in ps.values()]).sum(0).sqrt()
    c = (0.3 / (norms + 1e-6)).clamp(max=1.0)
    denom = 40 / 5 if reduction == "mean" else 1.0  # expected batch size = N / len(loader) = 8
    for (name, p), (_, p0) in zip(model.named_parameters(), ref_model.named_parameters()):
        expected_grad = torch.einsum("b,b...->...", c, ps[name]) / denom
        assert rel_err(p.grad, expected_grad) < 1e-10
        assert rel_err(p.detach(), p0.detach() - 0.5 * expected_grad) < 1e-10
    assert engine.accountant.total_steps == 1


@pytest.mark.parametrize("mode", MODES)
def test_modes_agree_float32(mode):
    torch.manual_seed(3)
    model = TinyGPT(vocab=17, d=16, heads=2, layers=1, tie=True)
    ds = TensorDataset(torch.randint(0, 17, (32, 10)), torch.randint(0, 17, (32, 10)))
    ref = copy.deepcopy(model)
    engine = PrivacyEngine(seed=0)
    model, opt, dl = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                         data_loader=DataLoader(ds, batch_size=8), noise_multiplier=0.0,
                                         max_grad_norm=0.05, grad_sample_mode=mode)
    x, y = ds.tensors
    seq_ce("mean")(model(x), y).backward()
    opt.step()
    ps = oracle_per_sample(ref.double(), seq_ce("mean"), x, y)
    norms = torch.stack([t.reshape(32, -1).pow(2).sum(1) for t in ps.values()]).sum(0).sqrt()
    c = (0.05 / (norms + 1e-6)).clamp(max=1.0)
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32
        expected = torch.einsum("b,b...->...", c, ps[name]) / 8
        assert rel_err(p.grad.double(), expected) < 1e-4


def _zero_grad_noise(sigma, c, steps=3, seed=0):
    """p.grad after steps on a loss with zero gradient: pure noise, expected std sigma*C/B."""
    model = nn.Linear(60, 50)
    engine = PrivacyEngine(seed=seed)
    model, opt, dl = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                         data_loader=DataLoader(TensorDataset(torch.randn(100, 60)), batch_size=20),
                                         noise_multiplier=sigma, max_grad_norm=c)
    samples = []
    for (x,), _ in zip(dl, range(steps)):
        opt.zero_grad()
        (0.0 * model(x).sum()).backward()
        opt.step()
        samples += [p.grad.flatten() for p in model.parameters()]
    return torch.cat(samples).double().numpy(), opt.expected_batch_size


def test_noise_std_is_sigma_c_over_expected_batch_two_sided():
    sigma, c = 1.3, 0.7
    noise, b = _zero_grad_noise(sigma, c)
    assert b == 20
    n = noise.size  # 9150 values: KS has power ~1 against a 1.5x or 0.67x std at level 1e-3
    assert n > 9000
    std = sigma * c / b
    assert stats.kstest(noise / std, "norm").pvalue > 1e-3
    for wrong in (0.67 * std, 1.5 * std):
        assert stats.kstest(noise / wrong, "norm").pvalue < 1e-6


def test_secure_mode_noise_has_same_law():
    model = nn.Linear(100, 40)
    engine = PrivacyEngine(secure_mode=True)
    model, opt, dl = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                         data_loader=DataLoader(TensorDataset(torch.randn(50, 100)), batch_size=10),
                                         noise_multiplier=2.0, max_grad_norm=1.0)
    (x,) = next(iter(dl))
    (0.0 * model(x).sum()).backward()
    opt.step()
    noise = torch.cat([p.grad.flatten() for p in model.parameters()]).numpy()
    assert stats.kstest(noise / (2.0 / 10), "norm").pvalue > 1e-3
    assert stats.kstest(noise / (1.5 * 2.0 / 10), "norm").pvalue < 1e-6


def test_poisson_batches_vary_and_empty_batches_count_as_steps():
    ds = TensorDataset(torch.randn(4, 6), torch.randint(0, 3, (4,)))
    model = _mlp(torch.float32)
    engine = PrivacyEngine(seed=5)
    model, opt, dl = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                         data_loader=DataLoader(ds, batch_size=1), noise_multiplier=1.0,
                                         max_grad_norm=1.0)
    assert dl.sample_rate == pytest.approx(0.25)
    sizes = []
    for _ in range(10):
        for x, y in dl:
            sizes.append(x.shape[0])
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    assert 0 in sizes and len(set(sizes)) > 2
    assert engine.accountant.total_steps == len(sizes) == 40
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert engine.get_epsilon(1e-5) > 0


def test_non_poisson_loader_warns():
    model = _mlp()
    with pytest.warns(UserWarning, match="Poisson"):
        PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                     data_loader=_loader(), noise_multiplier=1.0, max_grad_norm=1.0,
                                     poisson_sampling=False)


@pytest.mark.parametrize("mode", MODES)
def test_virtual_steps_equal_the_logical_batch(mode):
    results = []
    for physical in (None, 3):
        torch.manual_seed(0)
        model = TinyGPT(vocab=9, d=8, heads=2, layers=1).double()
        ds = TensorDataset(torch.randint(0, 9, (60, 7)), torch.randint(0, 9, (60, 7)))
        engine = PrivacyEngine(seed=11)
        model, opt, dl = engine.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(ds, batch_size=12), noise_multiplier=0.5, max_grad_norm=0.1,
            grad_sample_mode=mode)
        it = dl if physical is None else VirtualSteps(dl, max_physical_batch_size=physical, optimizer=opt)
        n_batches = 0
        for x, y in it:
            n_batches += 1
            opt.zero_grad()
            seq_ce("mean")(model(x), y).backward()
            opt.step()
        results.append(([p.detach().clone() for p in model.parameters()], engine.accountant.total_steps, n_batches))
    (a, steps_a, nb_a), (b, steps_b, nb_b) = results
    assert steps_a == steps_b == 5 and nb_b > nb_a
    for pa, pb in zip(a, b):
        assert rel_err(pb, pa) < 1e-10


def test_make_private_with_epsilon_ends_within_one_percent_below_target():
    model = _mlp(torch.float32)
    ds = TensorDataset(torch.randn(200, 6), torch.randint(0, 3, (200,)))
    engine = PrivacyEngine(seed=0)
    model, opt, dl = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=DataLoader(ds, batch_size=20),
        target_epsilon=2.0, target_delta=1e-5, epochs=3, max_grad_norm=1.0)
    for _ in range(3):
        for x, y in dl:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    eps = engine.get_epsilon(1e-5)
    assert engine.accountant.total_steps == 30
    assert 0.99 * 2.0 <= eps <= 2.0


def test_validate_lists_every_problem_and_fix_repairs_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Embedding(5, 4, max_norm=1.0), nn.BatchNorm1d(4), nn.LSTM(4, 4))
    problems = dpengine.validate(model)
    kinds = [p.layer for p in problems]
    assert kinds.count("BatchNorm2d") == 1 and kinds.count("BatchNorm1d") == 1
    assert "Embedding" in kinds and "LSTM" in kinds
    with pytest.raises(dpengine.UnsupportedModuleError) as err:
        PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                     data_loader=_loader(), noise_multiplier=1.0, max_grad_norm=1.0)
    msg = str(err.value)
    assert "GroupNorm" in msg and "max_norm" in msg and "4 problem(s)" in msg
    fixed = dpengine.fix(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
    assert isinstance(fixed[1], nn.GroupNorm) and dpengine.validate(fixed) == []


def test_module_state_dict_loads_into_original_class_and_outputs_match():
    model = _mlp()
    x = torch.randn(5, 6, dtype=torch.float64)
    before = model(x)
    engine = PrivacyEngine()
    private, opt, _ = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                          data_loader=_loader(), noise_multiplier=1.0, max_grad_norm=1.0)
    assert torch.equal(private(x), before)
    fresh = _mlp()
    fresh.load_state_dict(private.state_dict())
    assert torch.equal(fresh(x), before)


def test_parameter_used_outside_its_module_is_refused():
    class Leaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 3)

        def forward(self, x):
            return self.fc(x) + x[:, :3] @ self.fc.weight[:, :3].t()  # reads fc.weight directly

    model = Leaky().double()
    _, opt, dl = PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                              data_loader=_loader(), noise_multiplier=1.0, max_grad_norm=1.0)
    x, y = next(iter(dl))
    with pytest.raises(PerSampleGradientError, match="fc.weight"):
        F.cross_entropy(model(x), y).backward()


def test_nan_gradient_is_refused():
    model = _mlp()
    _, opt, dl = PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                              data_loader=_loader(), noise_multiplier=1.0, max_grad_norm=1.0)
    x, y = next(iter(dl))
    x = x.clone()
    x[0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x), y).backward()  # flagged on the device, no host read in the backward
    opt.step()  # masked on the device: the parameters stay exactly as they were
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    with pytest.raises(PerSampleGradientError, match="non-finite"):
        opt.zero_grad()  # the next step() or zero_grad() raises (docs/DESIGN.md)


def test_checkpoint_resume_keeps_the_accountant(tmp_path):
    model = _mlp()
    engine = PrivacyEngine(seed=2)
    model, opt, dl = engine.make_private(module=model, optimizer=torch.optim.Adam(model.parameters(), lr=0.01),
                                         data_loader=_loader(), noise_multiplier=1.0, max_grad_norm=1.0)
    for x, y in dl:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    eps = engine.get_epsilon(1e-5)
    path = tmp_path / "ckpt.pt"
    engine.save_checkpoint(str(path), module=model, optimizer=opt)

    model2 = _mlp()
    engine2 = PrivacyEngine()
    model2, opt2, _ = engine2.make_private(module=model2, optimizer=torch.optim.Adam(model2.parameters(), lr=0.01),
                                           data_loader=_loader(), noise_multiplier=1.0, max_grad_norm=1.0)
    engine2.load_checkpoint(str(path), module=model2, optimizer=opt2)
    assert engine2.get_epsilon(1e-5) == eps
    assert engine2.accountant.total_steps == 5
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    assert len(opt2.state) == len(opt.state) > 0


def test_lr_scheduler_and_eval_without_grad_work():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine()
    model, opt, dl = engine.make_private(module=model, optimizer=opt, data_loader=_loader(),
                                         noise_multiplier=1.0, max_grad_norm=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for x, y in dl:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
    assert math.isclose(opt.param_groups[0]["lr"], 0.1 * 0.5 ** 5)
    with torch.no_grad():
        model.eval()
        assert model(torch.randn(3, 6, dtype=torch.float64)).shape == (3, 3)


def test_running_statistics_and_mha_are_reported():
    model = nn.Sequential(nn.InstanceNorm1d(4, track_running_stats=True), nn.MultiheadAttention(4, 2))
    problems = dpengine.validate(model)
    assert [p.layer for p in problems] == ["InstanceNorm1d", "MultiheadAttention"]
    assert "track_running_stats=False" in str(problems[0])


def test_parameter_unfrozen_after_make_private_is_refused():
    model = _mlp()
    model[0].weight.requires_grad_(False)
    _, opt, dl = PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                              data_loader=_loader(), noise_multiplier=1.0, max_grad_norm=1.0)
    model[0].weight.requires_grad_(True)
    x, y = next(iter(dl))
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="not tracked"):
        opt.step()


def test_budget_is_enforced_after_the_planned_epochs():
    model = _mlp(torch.float32)
    ds = TensorDataset(torch.randn(100, 6), torch.randint(0, 3, (100,)))
    engine = PrivacyEngine(seed=0)
    model, opt, dl = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=DataLoader(ds, batch_size=20),
        target_epsilon=1.0, target_delta=1e-5, epochs=2, max_grad_norm=1.0)
    steps = 0
    with pytest.raises(dpengine.PrivacyBudgetExhaustedError, match="epsilon=1"):
        for _ in range(50):
            for x, y in dl:
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                before = [p.detach().clone() for p in model.parameters()]
                opt.step()
                steps += 1
    assert steps >= 10  # the planned 2 epochs always fit
    assert engine.get_epsilon(1e-5) <= 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the refused step changed nothing


def test_budget_check_replays_a_resumed_heterogeneous_history():
    model = _mlp(torch.float32)
    engine = PrivacyEngine(seed=0)
    model, opt, dl = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                         data_loader=_loader(dtype=torch.float32), noise_multiplier=1.0,
                                         max_grad_norm=1.0, epsilon_budget=(6.0, 1e-5))
    # a history spent earlier at another noise level (e.g. restored from a checkpoint)
    engine.accountant.step(noise_multiplier=1.5, sample_rate=0.05, num_steps=5)
    spent = engine.get_epsilon(1e-5)
    assert spent < 6.0
    batches = (batch for _ in range(200) for batch in dl)  # a fresh Poisson batch for every step
    n = 0
    with pytest.raises(dpengine.PrivacyBudgetExhaustedError):
        for x, y in batches:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            n += 1
    assert n > 1 and engine.get_epsilon(1e-5) <= 6.0


def test_two_backward_passes_before_a_step_are_refused():
    model = _mlp()
    _, opt, dl = PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                              data_loader=_loader(), noise_multiplier=1.0, max_grad_norm=1.0)
    x, y = next(iter(dl))
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(model(x), y).backward()  # the same samples again: each could contribute 2C
    with pytest.raises(RuntimeError, match="more than one backward pass"):
        opt.step()
    assert all(p.grad is None for p in model.parameters())


def test_two_backward_passes_on_batches_from_elsewhere_are_refused():
    model = _mlp()
    _, opt, dl = PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                              data_loader=_loader(), noise_multiplier=1.0, max_grad_norm=1.0)
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    with pytest.warns(UserWarning, match="did not come from the data loader"):
        F.cross_entropy(model(x), y).backward()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="2 backward passes"):
        opt.step()


def test_a_batch_reused_for_a_second_step_is_refused():
    # the accountant assumes a fresh Poisson sample for every step; a reused batch is a second backward on it
    model = _mlp()
    _, opt, dl = PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                              data_loader=_loader(), noise_multiplier=1.0, max_grad_norm=1.0)
    x, y = next(iter(dl))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="more than one backward pass"):
        opt.step()


def test_private_step_in_eval_mode_warns():
    model = _mlp()
    _, opt, dl = PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                              data_loader=_loader(), noise_multiplier=1.0, max_grad_norm=1.0)
    model.eval()
    x, y = next(iter(dl))
    F.cross_entropy(model(x), y).backward()
    with pytest.warns(UserWarning, match="eval mode"):
        opt.step()


def test_input_modified_in_place_after_a_layer_is_refused():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x):
            h = x * 1.0
            out = self.fc1(h)
            h.add_(1.0)  # fc1's input changes after fc1 read it; autograd does not save it in bk
            return self.fc2(out + h)

    model = InPlace().double()
    _, opt, dl = PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                              data_loader=_loader(), noise_multiplier=1.0, max_grad_norm=1.0)
    x, y = next(iter(dl))
    with pytest.raises(PerSampleGradientError, match="modified in place"):
        F.cross_entropy(model(x), y).backward()
