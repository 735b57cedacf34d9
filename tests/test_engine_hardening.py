"""Regressions from an adversarial review of the engine: budget enforcement under schedules and PLD, secure
mode, checkpoint loading, detach, and noise for low-precision tensors."""

from __future__ import annotations

import math
import secrets

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dpengine.accounting as accounting
import dpengine.optimizer as dp_optimizer
from dpengine import PrivacyBudgetExhaustedError, PrivacyEngine
from dpengine.noise import GaussianNoise
from dpengine.grad_sample.registry import PerSampleGradientError

DELTA = 1e-5


def _mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)


def _loader(n: int = 100, batch: int = 10, dtype: torch.dtype = torch.float32) -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(n, 6, dtype=dtype), torch.randint(0, 3, (n,))), batch_size=batch)


def _with_epsilon(target: float, *, accountant: str = "rdp", n: int = 100, batch: int = 10, epochs: int = 2):
    """A private model whose budget ``target`` is planned for ``epochs * n / batch`` steps."""
    engine = PrivacyEngine(accountant=accountant, seed=0)
    model = _mlp()
    model, opt, dl = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=_loader(n, batch),
        target_epsilon=target, target_delta=DELTA, epochs=epochs, max_grad_norm=1.0)
    return engine, model, opt, dl


def _train(model: nn.Module, opt: torch.optim.Optimizer, dl: DataLoader, steps: int, before_step=None) -> int:
    """Up to ``steps`` private steps over the loader (as many epochs as needed); ``before_step(i, opt)``
    runs before step ``i``. Returns the number of steps taken (a refused step raises)."""
    done = 0
    while done < steps:
        for x, y in dl:
            if done == steps:
                break
            if before_step is not None:
                before_step(done, opt)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            done += 1
    return done


def _walk(obj, path: str = ""):
    """Every (path, value) in a nest of dicts, lists and tuples."""
    yield path, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, f"{path}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _walk(v, f"{path}/{i}")


# ---------------------------------------------------------------------------------------- 1. budget vs history
def _scale_noise_at(step: int, factor: float):
    def schedule(i: int, opt) -> None:
        if i == step:
            opt.noise_multiplier *= factor
    return schedule


@pytest.mark.parametrize("start, change", [(0, _scale_noise_at(0, 0.5)), (5, _scale_noise_at(5, 0.8))],
                         ids=["sigma*0.5@0", "sigma*0.8@5"])
def test_budget_holds_when_sigma_changes_after_set_budget(start, change):
    """The budget is planned for 20 steps at the calibrated (sigma, q); from step ``start`` on, sigma changes
    (a schedule that starts at once leaves a history of steps at the new values only)."""
    engine, model, opt, dl = _with_epsilon(2.0)
    planned = 20
    with pytest.raises(PrivacyBudgetExhaustedError, match="epsilon=2"):
        _train(model, opt, dl, planned, before_step=change)
    assert start <= engine.accountant.total_steps < planned  # the change spent the budget before the plan ended
    assert engine.get_epsilon(DELTA) <= 2.0
    # the refused step was the first one that would have exceeded it
    trial = accounting.RDPAccountant()
    trial.load_state_dict(engine.accountant.state_dict())
    trial.step(noise_multiplier=opt.noise_multiplier, sample_rate=opt.sample_rate)
    assert trial.get_epsilon(DELTA) > 2.0


@pytest.mark.parametrize("start", [0, 5])
def test_budget_holds_when_q_changes_through_a_new_private_loader(start):
    """q is the private loader's, so it changes with a new one: detach, then make_private again on the same
    engine with a loader of twice the batch size (q = 0.2). The accountant's history carries over and the
    budget, given again, is checked against all of it."""
    engine, model, opt, dl = _with_epsilon(2.0)
    planned, sigma = 20, opt.noise_multiplier
    assert _train(model, opt, dl, start) == start
    engine.detach()
    model, opt, dl = engine.make_private(module=model, optimizer=opt.original_optimizer,
                                         data_loader=_loader(100, 20), noise_multiplier=sigma, max_grad_norm=1.0,
                                         epsilon_budget=(2.0, DELTA))
    assert opt.sample_rate == dl.sample_rate == pytest.approx(0.2)
    with pytest.raises(PrivacyBudgetExhaustedError, match="epsilon=2"):
        _train(model, opt, dl, planned)
    history = engine.accountant.history
    assert [q for _, q, _ in history] == ([0.1] if start else []) + [pytest.approx(0.2)]
    assert start <= engine.accountant.total_steps < planned
    assert engine.get_epsilon(DELTA) <= 2.0
    trial = accounting.RDPAccountant()
    trial.load_state_dict(engine.accountant.state_dict())
    trial.step(noise_multiplier=sigma, sample_rate=0.2)
    assert trial.get_epsilon(DELTA) > 2.0


def test_unchanged_schedule_runs_every_planned_step_then_stops():
    engine, model, opt, dl = _with_epsilon(2.0)
    assert _train(model, opt, dl, 20) == 20
    assert 0.99 * 2.0 <= engine.get_epsilon(DELTA) <= 2.0
    with pytest.raises(PrivacyBudgetExhaustedError):
        _train(model, opt, dl, 1)


def test_budget_check_is_incremental_under_a_changing_schedule(monkeypatch):
    """A schedule that changes sigma every step makes one history segment per step; the check adds this
    step's RDP to a running sum instead of recomputing every segment (or calling the accountant)."""
    engine = PrivacyEngine(seed=0)
    model = _mlp()
    model, opt, dl = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                         data_loader=_loader(), noise_multiplier=1.0, max_grad_norm=1.0,
                                         epsilon_budget=(20.0, DELTA))
    rdp_calls, eps_calls = [], []
    real_rdp, real_eps = accounting.rdp_subsampled_gaussian, accounting.accountants.compute_epsilon

    def counting_rdp(*args, **kwargs):
        rdp_calls.append(args)
        return real_rdp(*args, **kwargs)

    def counting_eps(*args, **kwargs):
        eps_calls.append(args)
        return real_eps(*args, **kwargs)

    dp_optimizer._step_rdp.cache_clear()
    monkeypatch.setattr(accounting, "rdp_subsampled_gaussian", counting_rdp)
    monkeypatch.setattr(accounting.accountants, "compute_epsilon", counting_eps)
    _train(model, opt, dl, 30, before_step=lambda i, o: setattr(o, "noise_multiplier", (1.0, 1.25)[i % 2]))
    assert len(engine.accountant.history) == 30
    assert len(rdp_calls) == 2  # one per distinct (sigma, q), never per segment of the history
    assert eps_calls == []


# ---------------------------------------------------------------------------------------- 2. enforce with PLD
def test_pld_calibrated_budget_is_enforced_with_pld():
    """Calibrated with PLD, the budget must not be enforced with (looser) RDP, which stops early."""
    engine, model, opt, dl = _with_epsilon(0.5, accountant="pld", n=40, batch=10, epochs=2)
    assert _train(model, opt, dl, 8) == 8  # every planned step (RDP would allow 6 at this sigma)
    assert engine.get_epsilon(DELTA) <= 0.5
    assert accounting.get_epsilon(opt.noise_multiplier, opt.sample_rate, 8, DELTA, "rdp") > 0.5
    with pytest.raises(PrivacyBudgetExhaustedError):
        _train(model, opt, dl, 1)


def test_pld_budget_checks_a_heterogeneous_history_with_pld():
    """4 steps at sigma 8 then steps at sigma 5 (q = 1/4), budget 0.43: PLD affords 3 of the latter (RDP 2)."""
    engine = PrivacyEngine(accountant="pld", seed=0)
    model = _mlp()
    model, opt, dl = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                         data_loader=_loader(40, 10), noise_multiplier=8.0, max_grad_norm=1.0)
    engine.accountant.step(noise_multiplier=8.0, sample_rate=0.25, num_steps=4)  # a resumed history
    opt.noise_multiplier = 5.0  # then a noise schedule
    opt.set_budget(0.43, DELTA)
    with pytest.raises(PrivacyBudgetExhaustedError):
        _train(model, opt, dl, 10)
    assert engine.accountant.history == [(8.0, 0.25, 4), (5.0, 0.25, 3)]
    assert engine.get_epsilon(DELTA) <= 0.43
    trial = accounting.PLDAccountant()
    trial.load_state_dict(engine.accountant.state_dict())
    trial.step(noise_multiplier=5.0, sample_rate=0.25)
    assert trial.get_epsilon(DELTA) > 0.43  # refused exactly when PLD says the budget is spent


# ---------------------------------------------------------------------------------------- 3. secure mode
def test_secure_mode_with_a_seed_is_refused():
    with pytest.raises(ValueError, match="seed"):
        PrivacyEngine(secure_mode=True, seed=42)
    with pytest.raises(ValueError, match="seed"):
        GaussianNoise(seed=42, secure_mode=True)


def _secure_private():
    engine = PrivacyEngine(secure_mode=True)
    model = _mlp()
    model, opt, dl = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                         data_loader=_loader(), noise_multiplier=1.0, max_grad_norm=1.0)
    return engine, model, opt, dl


def test_secure_state_and_checkpoint_hold_nothing_that_regenerates_noise(tmp_path):
    engine, model, opt, dl = _secure_private()
    _train(model, opt, dl, 3)
    for state in (engine.state_dict(), engine.noise.state_dict()):
        assert state["secure_mode"] is True
        for path, value in _walk(state):
            assert not path.endswith(("/seed", "/generators")), path
            assert not isinstance(value, torch.Tensor), path  # generator states are byte tensors
    engine.save_checkpoint(str(tmp_path / "c.pt"), module=model, optimizer=opt)
    saved = torch.load(tmp_path / "c.pt", weights_only=True)["engine"]
    assert saved["secure_mode"] is True and set(saved["noise"]) == {"secure_mode"}


def test_secure_mode_samples_batches_from_the_os_csprng():
    """Needs ``DPDataLoader.from_data_loader(..., secure=)``: the Poisson sampler keeps no torch.Generator."""
    _, _, _, dl = _secure_private()
    assert dl.batch_sampler.secure is True


def test_secure_engine_loading_a_seeded_checkpoint_stays_secure(tmp_path):
    seeded = PrivacyEngine(seed=7)
    model = _mlp()
    model, opt, dl = seeded.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                         data_loader=_loader(), noise_multiplier=1.0, max_grad_norm=1.0)
    _train(model, opt, dl, 2)
    path = str(tmp_path / "seeded.pt")
    seeded.save_checkpoint(path, module=model, optimizer=opt)

    replay = PrivacyEngine(seed=123)  # a non-secure engine continues the checkpoint's noise stream exactly
    model_r = _mlp()
    model_r, opt_r, _ = replay.make_private(module=model_r, optimizer=torch.optim.SGD(model_r.parameters(), lr=0.1),
                                            data_loader=_loader(), noise_multiplier=1.0, max_grad_norm=1.0)
    replay.load_checkpoint(path, module=model_r, optimizer=opt_r)

    secure, model_s, opt_s, _ = _secure_private()
    with pytest.warns(UserWarning, match="secure"):
        secure.load_checkpoint(path, module=model_s, optimizer=opt_s)
    assert secure.secure_mode and secure.noise.secure_mode
    assert secure.state_dict()["noise"] == {"secure_mode": True}
    assert secure.accountant.total_steps == 2  # the privacy history is still taken over
    expected, drawn = torch.zeros(2000), torch.zeros(2000)
    replay.noise.add_([expected], 1.0)
    secure.noise.add_([drawn], 1.0)
    assert not torch.allclose(expected, drawn)
    assert abs(drawn.std().item() - 1.0) < 0.1


def test_seeded_engine_refuses_a_secure_checkpoint_and_loads_nothing(tmp_path):
    secure, model_s, opt_s, dl = _secure_private()
    _train(model_s, opt_s, dl, 1)
    path = str(tmp_path / "secure.pt")
    secure.save_checkpoint(path, module=model_s, optimizer=opt_s)
    engine = PrivacyEngine(seed=1)
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    model, opt, _ = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                        data_loader=_loader(), noise_multiplier=1.0, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="secure_mode=True"):
        engine.load_checkpoint(path, module=model, optimizer=opt)
    with pytest.raises(ValueError, match="secure_mode=True"):
        engine.load_state_dict(secure.state_dict())
    assert not engine.secure_mode and engine.accountant.total_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_secure_noise_is_reseeded_from_the_os_csprng_for_every_draw(monkeypatch):
    noise = GaussianNoise(secure_mode=True)
    calls = []

    def fake_randbits(k: int) -> int:
        calls.append(k)
        return 12345  # a constant "CSPRNG": the noise must then be a function of it alone

    monkeypatch.setattr(secrets, "randbits", fake_randbits)
    a, b = torch.zeros(500), torch.zeros(500)
    noise.add_([a], 1.0)
    noise.add_([b], 1.0)
    assert len(calls) == 8 and set(calls) == {64}  # four draws per tensor, each call
    assert torch.equal(a, b)


def test_two_secure_engines_draw_different_noise():
    a, b = torch.zeros(1000), torch.zeros(1000)
    PrivacyEngine(secure_mode=True).noise.add_([a], 1.0)
    PrivacyEngine(secure_mode=True).noise.add_([b], 1.0)
    assert not torch.allclose(a, b)


# ---------------------------------------------------------------------------------------- 4. checkpoint loading
_UNPICKLED: list[str] = []


def _payload_ran(tag: str) -> str:
    _UNPICKLED.append(tag)
    return tag


class _Payload:
    """An object whose unpickling runs code (here: records that it ran)."""

    def __reduce__(self):
        return _payload_ran, ("ran",)


def test_checkpoint_with_an_arbitrary_pickled_object_is_refused(tmp_path):
    engine = PrivacyEngine(seed=0)
    model = _mlp()
    model, opt, _ = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                        data_loader=_loader(), noise_multiplier=1.0, max_grad_norm=1.0)
    path = str(tmp_path / "evil.pt")
    engine.save_checkpoint(path, module=model, optimizer=opt, note=_Payload())
    _UNPICKLED.clear()
    with pytest.raises(ValueError, match="unpickl"):
        engine.load_checkpoint(path, module=model, optimizer=opt)
    assert _UNPICKLED == []


def test_checkpoint_resumes_the_seeded_noise_stream_with_weights_only(tmp_path):
    engine = PrivacyEngine(seed=3)
    model = _mlp()
    model, opt, dl = engine.make_private(module=model, optimizer=torch.optim.Adam(model.parameters(), lr=0.01),
                                         data_loader=_loader(), noise_multiplier=1.0, max_grad_norm=1.0)
    _train(model, opt, dl, 3, before_step=lambda i, o: setattr(o, "noise_multiplier", 1.0 + 0.1 * i))
    path = str(tmp_path / "c.pt")
    engine.save_checkpoint(path, module=model, optimizer=opt, epoch=1, tag="run-a")
    engine2 = PrivacyEngine(seed=99)
    model2 = _mlp()
    model2, opt2, _ = engine2.make_private(module=model2, optimizer=torch.optim.Adam(model2.parameters(), lr=0.01),
                                           data_loader=_loader(), noise_multiplier=1.0, max_grad_norm=1.0)
    ckpt = engine2.load_checkpoint(path, module=model2, optimizer=opt2)
    assert ckpt["epoch"] == 1 and ckpt["tag"] == "run-a"
    assert engine2.accountant.history == engine.accountant.history and len(engine2.accountant.history) == 3
    a, b = torch.zeros(100), torch.zeros(100)
    engine.noise.add_([a], 1.0)
    engine2.noise.add_([b], 1.0)
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------- 5. detach
def test_detached_private_optimizer_refuses_to_step_and_cannot_be_wrapped_again():
    engine = PrivacyEngine(seed=0)
    model = _mlp()
    model, opt, dl = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                         data_loader=_loader(), noise_multiplier=1.0, max_grad_norm=1.0)
    _train(model, opt, dl, 1)
    engine.detach()
    x, y = next(iter(dl))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="original_optimizer"):
        opt.step()
    assert engine.accountant.total_steps == 1
    opt.original_optimizer.step()  # non-private training goes on with the real gradient

    with pytest.raises(ValueError, match="original_optimizer"):
        PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=_loader(), noise_multiplier=1.0,
                                     max_grad_norm=1.0)
    _, opt2, dl2 = PrivacyEngine().make_private(module=model, optimizer=opt.original_optimizer,
                                                data_loader=_loader(), noise_multiplier=1.0, max_grad_norm=1.0)
    assert _train(model, opt2, dl2, 2) == 2


def test_make_private_refuses_a_private_optimizer_of_a_live_engine():
    model = _mlp()
    _, opt, _ = PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                             data_loader=_loader(), noise_multiplier=1.0, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="original_optimizer"):
        PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=_loader(), noise_multiplier=1.0,
                                     max_grad_norm=1.0)


# ---------------------------------------------------------------------------------------- 6. low precision
@pytest.mark.parametrize("secure", [False, True])
def test_noise_for_bfloat16_is_drawn_in_float32_and_rounded_once(secure):
    """bf16 has 8 bits of mantissa: near 1.0 its spacing is 2**-8 to 2**-7. Noise of std 2e-3 added in one
    rounding survives as roughly N(0, std) rounded; four separate bf16 additions (secure mode) of N(0,
    std/2) each round back to 1.0 nearly always, and the noise all but vanishes."""
    std, n = 2e-3, 200_000
    t = torch.ones(n, dtype=torch.bfloat16)
    noise = GaussianNoise(secure_mode=True) if secure else GaussianNoise(seed=0)
    noise.add_([t], std)
    g = torch.Generator().manual_seed(0)
    reference = (1.0 + std * torch.randn(n, dtype=torch.float64, generator=g)).to(torch.bfloat16)
    got, want = (t.double() - 1).std().item(), (reference.double() - 1).std().item()
    assert abs(got / want - 1) < 0.05, (got, want)
    zeros = torch.zeros(n, dtype=torch.bfloat16)
    noise.add_([zeros], 0.3)
    assert abs(zeros.double().std().item() / 0.3 - 1) < 0.02


def test_bfloat16_model_gets_a_bfloat16_noisy_gradient_of_the_right_std():
    sigma, c, batch = 2.0, 0.5, 20
    model = nn.Linear(40, 30).to(torch.bfloat16)
    engine = PrivacyEngine(seed=0)
    model, opt, dl = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=DataLoader(TensorDataset(torch.randn(100, 40, dtype=torch.bfloat16)), batch_size=batch),
        noise_multiplier=sigma, max_grad_norm=c)
    (x,) = next(iter(dl))
    opt.zero_grad()
    (0.0 * model(x).sum()).backward()
    opt.step()
    assert all(p.grad.dtype == torch.bfloat16 for p in model.parameters())
    noise = torch.cat([p.grad.double().flatten() for p in model.parameters()])
    assert abs(noise.std().item() / (sigma * c / batch) - 1) < 0.1
    assert math.isfinite(engine.get_epsilon(DELTA))


# ---------------------------------------------------------------------------------------- 7. parameter groups
def _private_first_layer_only():
    """make_private over an optimizer that holds only the first layer (the second is tracked but not trained)."""
    engine = PrivacyEngine(seed=0)
    model = _mlp()
    model, opt, dl = engine.make_private(module=model, optimizer=torch.optim.SGD(model[0].parameters(), lr=1.0),
                                         data_loader=_loader(40, 10), noise_multiplier=1.0, max_grad_norm=1.0)
    return engine, model, opt, dl


def test_add_param_group_on_the_private_optimizer_is_refused():
    """The private optimizer shares the wrapped one's groups but not its list: a group added to it would get a
    private gradient that the wrapped optimizer never applies, while every step is accounted."""
    engine, model, opt, dl = _private_first_layer_only()
    with pytest.raises(RuntimeError, match="add every parameter group .*before make_private"):
        opt.add_param_group({"params": list(model[2].parameters())})
    assert len(opt.param_groups) == len(opt.original_optimizer.param_groups) == 1
    assert _train(model, opt, dl, 1) == 1  # the optimizer is still usable as it was


def test_a_group_added_to_the_wrapped_optimizer_refuses_the_step():
    engine, model, opt, dl = _private_first_layer_only()
    opt.original_optimizer.add_param_group({"params": list(model[2].parameters())})
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="param groups .*changed after make_private.*before make_private"):
        _train(model, opt, dl, 1)
    assert engine.accountant.total_steps == 0
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_replacing_the_wrapped_optimizers_groups_by_load_state_dict_keeps_stepping():
    """load_state_dict rebuilds the group dicts: the private optimizer takes them over, so that is no change."""
    engine, model, opt, dl = _private_first_layer_only()
    assert _train(model, opt, dl, 1) == 1
    opt.load_state_dict(opt.state_dict())
    assert _train(model, opt, dl, 1) == 1
    opt.original_optimizer.load_state_dict(opt.original_optimizer.state_dict())  # the wrapped one alone
    assert _train(model, opt, dl, 1) == 1
    assert engine.accountant.total_steps == 3


# ---------------------------------------------------------------------------------------- 8. privacy knobs
def test_sample_rate_is_the_loaders_and_cannot_be_assigned():
    """Assigning q was recorded by the accountant while the loader kept sampling at its own q (epsilon 0.61
    reported for 3.44 spent): q is read-only, and the error names the way to change it."""
    engine = PrivacyEngine(seed=0)
    model = _mlp()
    model, opt, dl = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                         data_loader=_loader(100, 10), noise_multiplier=1.0, max_grad_norm=1.0)
    with pytest.raises(AttributeError, match="sample_rate is the private data loader's.*engine.detach().*make_private"):
        opt.sample_rate = 0.001
    with pytest.raises(AttributeError, match="expected_batch_size is fixed at make_private"):
        opt.expected_batch_size = 1000.0
    _train(model, opt, dl, 3)
    assert engine.accountant.history == [(1.0, dl.sample_rate, 3)] and dl.sample_rate == opt.sample_rate == 0.1


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "1.0"])
def test_noise_multiplier_assignment_is_validated(bad):
    _, model, opt, dl = _private_first_layer_only()
    with pytest.raises(ValueError, match="noise_multiplier"):
        opt.noise_multiplier = bad
    assert opt.noise_multiplier == 1.0


def test_noise_multiplier_that_adaptive_cannot_split_is_refused_when_assigned():
    engine = PrivacyEngine(seed=0)
    model = _mlp()
    model, opt, dl = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                         data_loader=_loader(40, 10), noise_multiplier=1.0, max_grad_norm=1.0,
                                         clipping="adaptive", unclipped_num_std=1.0)
    with pytest.raises(ValueError, match="unclipped_num_std"):
        opt.noise_multiplier = 2.5  # the count's noise (std 1) alone would spend more than sigma 2.5 allows
    assert opt.noise_multiplier == 1.0
    _train(model, opt, dl, 1)
    assert engine.accountant.history == [(1.0, 0.25, 1)]


def test_assigned_noise_multiplier_sets_noise_and_accounting_together():
    """Zero loss gradient, mean loss: p.grad is pure noise of std sigma * C / E[B] at the assigned sigma."""
    engine = PrivacyEngine(seed=0)
    model = nn.Linear(200, 50)
    data = DataLoader(TensorDataset(torch.randn(40, 200)), batch_size=10)
    model, opt, dl = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                         data_loader=data, noise_multiplier=1.0, max_grad_norm=0.5)
    opt.noise_multiplier = 3.0
    (x,) = next(iter(dl))
    opt.zero_grad()
    (0.0 * model(x).sum()).backward()
    opt.step()
    z = torch.cat([p.grad.flatten() for p in model.parameters()]) / (3.0 * 0.5 / 10)
    assert abs(float(z.std()) - 1) < 5 / math.sqrt(2 * z.numel())
    assert engine.accountant.history == [(3.0, 0.25, 1)]


@pytest.mark.parametrize("clipping, options", [("flat", {}), ("automatic", {}), ("adaptive", dict(unclipped_num_std=5.0)),
                                               ("error_feedback", {})])
def test_max_grad_norm_on_the_optimizer_is_the_policys(clipping, options):
    """Opacus users assign optimizer.max_grad_norm: it was a new attribute that nothing read. It is the
    policy's bound now, which clipping and noise both read."""
    engine = PrivacyEngine(seed=0)
    model = _mlp()
    model, opt, dl = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                         data_loader=_loader(40, 10), noise_multiplier=1.0, max_grad_norm=1.0,
                                         clipping=clipping, **options)
    assert opt.max_grad_norm == 1.0
    opt.max_grad_norm = 0.25
    assert opt.policy.max_grad_norm == opt.max_grad_norm == 0.25
    if clipping != "error_feedback":
        assert opt.sensitivity == 0.25
    with pytest.raises(ValueError, match="> 0"):
        opt.max_grad_norm = -1.0


def test_max_grad_norm_on_the_optimizer_is_refused_where_the_policy_has_none():
    engine = PrivacyEngine(seed=0)
    model = _mlp()
    model, opt, dl = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                         data_loader=_loader(40, 10), noise_multiplier=1.0, max_grad_norm=1.0,
                                         clipping="per_layer")
    with pytest.raises(AttributeError, match="policy.thresholds"):
        opt.max_grad_norm = 0.5
    with pytest.raises(AttributeError, match="policy.thresholds"):
        opt.max_grad_norm
    assert opt.policy.thresholds == (0.5,) * 4  # C / sqrt(4 groups), unchanged


# ---------------------------------------------------------------------------------------- 6. one batch per step
def _private(seed: int = 0, n: int = 40, batch: int = 4, sigma: float = 0.0, reduction: str = "sum", **kw):
    """A private MLP over ``n`` records (x, y, id) at q = batch / n; the id is each record's index."""
    engine = PrivacyEngine(seed=seed, **kw)
    model = _mlp()
    g = torch.Generator().manual_seed(1)
    ds = TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g), torch.arange(n))
    model, opt, dl = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                         data_loader=DataLoader(ds, batch_size=batch), noise_multiplier=sigma,
                                         max_grad_norm=1.0, loss_reduction=reduction)
    return engine, model, opt, dl


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _unchanged(model, before) -> bool:
    return all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_two_loader_batches_of_equal_size_in_one_backward_are_refused():
    """Two Poisson batches summed into one backward pair their records by row: a record in both contributes 2C
    to one accounted step. Refused whatever the sizes (the sizes matching made it pass the batch check)."""
    engine, model, opt, dl = _private()
    for _ in range(500):
        it = iter(dl)
        (x1, y1, _), (x2, y2, _) = next(it), next(it)
        if len(x1) == len(x2) > 0:
            break
        opt.zero_grad()
        F.cross_entropy(model(x2), y2, reduction="sum").backward()  # step the batches drawn, one each
        with pytest.raises(RuntimeError, match="2 batches were drawn"):
            opt.step()
    else:
        pytest.fail("no two batches of equal size")
    before = _params(model)
    opt.zero_grad()
    (F.cross_entropy(model(x1), y1, reduction="sum") + F.cross_entropy(model(x2), y2, reduction="sum")).backward()
    with pytest.raises(RuntimeError, match=r"2 batches were drawn from the private data loader since the last step"
                                           r"(.|\n)*VirtualSteps(.|\n)*empty Poisson batch is a step too"):
        opt.step()
    assert _unchanged(model, before) and engine.accountant.total_steps == 0
    x, y, _ = next(it)  # the refusal forgot those batches: the next one is a step as usual
    opt.zero_grad()
    F.cross_entropy(model(x), y, reduction="sum").backward()
    opt.step()
    assert engine.accountant.total_steps == 1


def test_a_batch_skipped_inside_the_loop_is_refused_at_the_next_step():
    """Skipping a batch (e.g. an empty one) changes the sampling the accountant assumes."""
    engine, model, opt, dl = _private(n=20, batch=1)  # q = 1/20: most batches are empty
    with pytest.raises(RuntimeError, match="empty Poisson batch is a step too"):
        for x, y, _ in dl:
            if len(x) == 0:
                continue  # the mistake
            opt.zero_grad()
            F.cross_entropy(model(x), y, reduction="sum").backward()
            opt.step()


def test_an_evaluation_pass_over_the_private_loader_is_not_a_skipped_step():
    """Batches drawn with gradients off (train accuracy between epochs) count only if a backward reduces them."""
    engine, model, opt, dl = _private()
    for epoch in range(2):
        for x, y, _ in dl:
            opt.zero_grad()
            F.cross_entropy(model(x), y, reduction="sum").backward()
            opt.step()
        with torch.no_grad():
            correct = sum(int((model(x).argmax(1) == y).sum()) for x, y, _ in dl)
        assert 0 <= correct <= 40
    assert engine.accountant.total_steps == 2 * len(dl)
    # a batch drawn with gradients off and then trained on is this step's batch: one more is refused
    with torch.no_grad():
        it = iter(dl)
        x1, y1, _ = next(it)
    x2, y2, _ = next(it)
    opt.zero_grad()
    F.cross_entropy(model(x2), y2, reduction="sum").backward()
    opt.step()  # x2 is the step's batch (x1 was never reduced)
    with torch.no_grad():
        x3, y3, _ = next(it)
    opt.zero_grad()
    F.cross_entropy(model(x3), y3, reduction="sum").backward()  # counted when reduced
    x4, y4, _ = next(it)
    with pytest.raises(RuntimeError, match="2 batches were drawn"):
        opt.step()
    assert engine.accountant.total_steps == 2 * len(dl) + 1


def test_a_loop_that_draws_ahead_is_told_so():
    """A prefetching loop (the next batch drawn before this one's backward) gets an error naming it."""
    engine, model, opt, dl = _private(n=40, batch=10)

    def ahead(loader):
        it = iter(loader)
        current = next(it)
        for following in it:
            yield current
            current = following
        yield current

    with pytest.raises(PerSampleGradientError, match="draws the next batch before this one's backward"):
        for _ in range(20):  # until two consecutive batches differ in size
            for x, y, _ in ahead(dl):
                opt.zero_grad()
                F.cross_entropy(model(x), y, reduction="sum").backward()
                opt.step()


def test_batches_from_two_fresh_iterators_in_one_backward_are_refused():
    engine, model, opt, dl = _private(n=8, batch=8)  # q = 1: every batch holds every record
    x1, y1, _ = next(iter(dl))
    x2, y2, _ = next(iter(dl))
    (F.cross_entropy(model(x1), y1, reduction="sum") + F.cross_entropy(model(x2), y2, reduction="sum")).backward()
    with pytest.raises(RuntimeError, match="2 batches were drawn"):
        opt.step()


def test_leaving_an_epoch_early_and_the_last_unstepped_batch_are_fine():
    engine, model, opt, dl = _private(n=20, batch=2)  # 10 batches per epoch
    for i, (x, y, _) in enumerate(dl):
        if i == 3:
            break  # drawn, never used: left with the loop
        opt.zero_grad()
        F.cross_entropy(model(x), y, reduction="sum").backward()
        opt.step()
    for x, y, _ in dl:  # the next epoch
        opt.zero_grad()
        F.cross_entropy(model(x), y, reduction="sum").backward()
        opt.step()
        if opt.steps_taken == 5:
            break  # after the step
    x, y, _ = next(iter(dl))  # a fresh epoch; its first batch is used
    opt.zero_grad()
    F.cross_entropy(model(x), y, reduction="sum").backward()
    opt.step()
    for x, y, _ in dl:  # the last batch of a run is drawn and never stepped: nothing follows it
        F.cross_entropy(model(x), y, reduction="sum").backward()
        break
    assert engine.accountant.total_steps == 6


def test_step_without_a_backward_is_refused():
    engine, model, opt, dl = _private(sigma=1.0)
    x, y, _ = next(iter(dl))
    opt.zero_grad()
    F.cross_entropy(model(x), y)  # the backward forgotten
    before = _params(model)
    with pytest.raises(RuntimeError, match=r"no backward\(\) since the last step(.|\n)*loss.backward\(\)"):
        opt.step()
    assert _unchanged(model, before) and engine.accountant.total_steps == 0
    with pytest.raises(RuntimeError, match="no backward"):
        opt.step()  # nothing at all since the last step: pure noise, refused as well


def test_empty_batches_still_step_with_their_backward():
    engine, model, opt, dl = _private(n=20, batch=1, sigma=1.0)  # q = 1/20
    sizes = []
    for x, y, _ in dl:
        sizes.append(len(x))
        opt.zero_grad()
        F.cross_entropy(model(x), y, reduction="sum").backward()
        opt.step()
    assert 0 in sizes and engine.accountant.total_steps == 20


# ---------------------------------------------------------------------------------------- 7. resumed sampling
def _run(engine, model, opt, dl, steps: int, break_before_step: bool = False) -> list[list[int]]:
    """``steps`` steps; the records (ids) of each. ``break_before_step``: the loop then draws one more batch
    and leaves it (``if i == steps: break`` at the top of the loop)."""
    seen = []
    while len(seen) < steps:
        for x, y, ids in dl:
            if len(seen) == steps:
                break
            seen.append(sorted(ids.tolist()))
            opt.zero_grad()
            F.cross_entropy(model(x), y, reduction="sum").backward()
            opt.step()
            if len(seen) == steps and not break_before_step:
                break
    return seen


@pytest.mark.parametrize("break_before_step", [False, True])
def test_a_resumed_seeded_run_continues_the_sampling_stream(tmp_path, break_before_step):
    full = _run(*_private(seed=7, sigma=1.0), 13)
    engine, model, opt, dl = _private(seed=7, sigma=1.0)
    first = _run(engine, model, opt, dl, 5, break_before_step)
    path = str(tmp_path / "c.pt")
    engine.save_checkpoint(path, module=model, optimizer=opt)
    assert isinstance(torch.load(path, weights_only=True)["engine"]["sampling"], torch.Tensor)
    engine2, model2, opt2, dl2 = _private(seed=7, sigma=1.0)
    engine2.load_checkpoint(path, module=model2, optimizer=opt2)
    resumed = _run(engine2, model2, opt2, dl2, 8)
    assert first == full[:5] and resumed == full[5:]
    assert resumed[:5] != first  # not the first steps' memberships again


def test_state_loaded_before_make_private_also_resumes_sampling():
    full = _run(*_private(seed=7), 10)
    engine, model, opt, dl = _private(seed=7)
    _run(engine, model, opt, dl, 4)
    state = engine.state_dict()
    engine2 = PrivacyEngine(seed=7)
    engine2.load_state_dict(state)
    model2 = _mlp()
    _, _, _, dl2 = _private(seed=7)  # the same records
    model2, opt2, dl2 = engine2.make_private(module=model2, optimizer=torch.optim.SGD(model2.parameters(), lr=0.1),
                                             data_loader=DataLoader(dl2.dataset, batch_size=4), noise_multiplier=0.0,
                                             max_grad_norm=1.0, loss_reduction="sum")
    assert _run(engine2, model2, opt2, dl2, 6) == full[4:]


def test_a_checkpoint_without_sampler_state_reseeds_the_sampler_with_a_warning(tmp_path):
    engine, model, opt, dl = _private(seed=7)
    first = _run(engine, model, opt, dl, 6)
    ckpt_path = str(tmp_path / "old.pt")
    engine.save_checkpoint(ckpt_path, module=model, optimizer=opt)
    ckpt = torch.load(ckpt_path, weights_only=True)
    del ckpt["engine"]["sampling"]  # as dpengine wrote checkpoints before it saved the sampler
    torch.save(ckpt, ckpt_path)
    engine2, model2, opt2, dl2 = _private(seed=7)
    with pytest.warns(UserWarning, match="no Poisson sampler state(.|\n)*replay(.|\n)*reseeded"):
        engine2.load_checkpoint(ckpt_path, module=model2, optimizer=opt2)
    assert _run(engine2, model2, opt2, dl2, 6) != first  # not the seeded stream from its start again


def test_secure_state_holds_no_sampler_state():
    engine, model, opt, dl = _secure_private()
    _train(model, opt, dl, 2)
    assert engine.state_dict()["sampling"] is None


def test_make_private_again_on_a_seeded_engine_continues_the_sampling_stream():
    """detach() and make_private again (how q is changed) must not restart the seeded sampler: the second
    phase would replay the first phase's memberships, counted by the accountant as fresh samples."""
    def memberships(engine, dl, opt, model, steps):
        out = []
        for _, (x, y, ids) in zip(range(steps), dl):
            out.append(ids.tolist())
            opt.zero_grad()
            F.cross_entropy(model(x), y, reduction="sum").backward()
            opt.step()
        return out

    engine, model, opt, dl = _private(seed=7)
    first = memberships(engine, dl, opt, model, 5)
    engine.detach()
    model, opt, dl = engine.make_private(
        module=model, optimizer=opt.original_optimizer, data_loader=DataLoader(dl.dataset, batch_size=4),
        noise_multiplier=0.0, max_grad_norm=1.0, loss_reduction="sum")
    second = memberships(engine, dl, opt, model, 5)
    _, model2, opt2, dl2 = _private(seed=7)  # one uninterrupted run of the same stream
    whole = memberships(None, dl2, opt2, model2, 10)
    assert first + second == whole
    assert engine.accountant.total_steps == 10


def test_a_fixed_size_loader_over_a_subset_is_accounted_at_its_own_rate():
    """poisson_sampling=False: q is the batch over the records an epoch draws from (a SubsetRandomSampler's
    100 of 1000 at batch 10 is q = 0.1; batch / len(dataset) = 0.01 under-stated epsilon about 3x)."""
    from torch.utils.data import SubsetRandomSampler

    ds = TensorDataset(torch.randn(1000, 6), torch.randint(0, 3, (1000,)))
    loader = DataLoader(ds, batch_size=10, sampler=SubsetRandomSampler(range(100)))
    model = _mlp()
    with pytest.warns(UserWarning, match="poisson_sampling=False"):
        _, opt, _ = PrivacyEngine(seed=0).make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
            noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False)
    assert opt.sample_rate == pytest.approx(0.1)
    model = _mlp()
    with pytest.warns(UserWarning, match="poisson_sampling=False"):
        _, opt, _ = PrivacyEngine(seed=0).make_private_with_epsilon(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
            target_epsilon=1.0, target_delta=1e-5, epochs=5, max_grad_norm=1.0, poisson_sampling=False)
    assert opt.sample_rate == pytest.approx(0.1) and opt.noise_multiplier > 3.0  # 1.05 at q = 0.01


def test_a_stream_without_a_length_is_refused_clearly():
    from torch.utils.data import IterableDataset

    class Stream(IterableDataset):
        def __iter__(self):
            for _ in range(40):
                yield torch.randn(6), torch.tensor(0)

    model = _mlp()
    with pytest.raises(ValueError, match="needs a non-empty dataset \\(or sampler\\) with a length"):
        PrivacyEngine(seed=0).make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(Stream(), batch_size=4), noise_multiplier=1.0, max_grad_norm=1.0,
            poisson_sampling=False)
