"""Coming from Opacus without surprises: the original optimizer, a second engine, fractional epochs,
help/dir, and the context-manager form of VirtualSteps."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dpengine
from dpengine import PrivacyEngine, VirtualSteps


def _setup(**kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dl = DataLoader(TensorDataset(torch.randn(40, 6), torch.randint(0, 3, (40,))), batch_size=8)
    return model, opt, dl


def test_stepping_the_original_optimizer_is_refused():
    model, opt, dl = _setup()
    engine = PrivacyEngine(seed=0)
    engine.make_private_with_epsilon(module=model, optimizer=opt, data_loader=dl, target_epsilon=3.0,
                                     target_delta=1e-5, epochs=1, max_grad_norm=1.0)  # result not kept
    x, y = next(iter(dl))
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="returned by make_private"):
        opt.step()


def test_the_original_optimizer_works_again_after_detach():
    model, opt, dl = _setup()
    engine = PrivacyEngine(seed=0)
    _, private, _ = engine.make_private(module=model, optimizer=opt, data_loader=dl, noise_multiplier=1.0,
                                        max_grad_norm=1.0)
    engine.detach()
    x, y = next(iter(dl))
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_second_engine_on_a_private_model_is_refused_until_detach():
    model, opt, dl = _setup()
    first = PrivacyEngine(seed=0)
    first.make_private(module=model, optimizer=opt, data_loader=dl, noise_multiplier=1.0, max_grad_norm=1.0)
    with pytest.raises(RuntimeError, match="already private"):
        PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                     data_loader=dl, noise_multiplier=1.0, max_grad_norm=1.0)
    first.detach()
    PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                 data_loader=dl, noise_multiplier=1.0, max_grad_norm=1.0)


def test_fractional_epochs_are_planned_as_given_and_zero_is_refused():
    model, opt, dl = _setup()
    engine = PrivacyEngine(seed=0)
    _, private, loader = engine.make_private_with_epsilon(
        module=model, optimizer=opt, data_loader=dl, target_epsilon=3.0, target_delta=1e-5, epochs=2.5,
        max_grad_norm=1.0)
    steps = 0
    for _ in range(3):  # 2.5 epochs of 5 steps: 13 planned steps (rounded up) all run
        for x, y in loader:
            private.zero_grad()
            F.cross_entropy(model(x), y).backward()
            private.step()
            steps += 1
            if steps == 13:
                break
    assert steps == 13 and engine.get_epsilon(1e-5) <= 3.0
    model, opt, dl = _setup()
    with pytest.raises(ValueError, match="epochs"):
        PrivacyEngine().make_private_with_epsilon(module=model, optimizer=opt, data_loader=dl, target_epsilon=3.0,
                                                  target_delta=1e-5, epochs=0, max_grad_norm=1.0)


def test_help_and_dir_show_the_public_names():
    names = dir(dpengine)
    for n in ("PrivacyEngine", "VirtualSteps", "validate", "fix", "no_capture"):
        assert n in names


def test_virtual_steps_as_a_context_manager():
    model, opt, dl = _setup()
    _, private, loader = PrivacyEngine(seed=0).make_private(module=model, optimizer=opt, data_loader=dl,
                                                            noise_multiplier=0.0, max_grad_norm=1.0)
    with VirtualSteps(loader, max_physical_batch_size=3, optimizer=private) as chunks:
        for x, y in chunks:
            private.zero_grad()
            F.cross_entropy(model(x), y).backward()
            private.step()
    assert not private._in_virtual_steps and private.steps_taken == len(loader)


def test_clipped_grads_for_debugging_is_the_un_noised_update_and_cannot_leak_into_it():
    """Between backward() and step() p.grad is None; clipped_grads_for_debugging() gives copies of the clipped
    sum (equal to the private gradient with sigma = 0), and editing them leaves the release unchanged."""
    model, opt, dl = _setup()
    engine = PrivacyEngine(seed=0)
    model, private, dl = engine.make_private(module=model, optimizer=opt, data_loader=dl, noise_multiplier=0.0,
                                             max_grad_norm=0.5)
    with pytest.warns(UserWarning, match="not differentially private"):
        assert private.clipped_grads_for_debugging() == {}
    x, y = next(iter(dl))
    assert len(x) > 0  # seeded (skipping an empty batch would be refused: every Poisson batch is a step)
    F.cross_entropy(model(x), y).backward()
    assert all(p.grad is None for p in model.parameters())
    debug = private.clipped_grads_for_debugging()
    assert set(debug) == set(model.parameters())
    expected = {p: g.clone() for p, g in debug.items()}
    for g in debug.values():
        g.mul_(1e6)  # a user scribbling on the copies
    before = {p: p.detach().clone() for p in model.parameters()}
    private.step()
    for p in model.parameters():
        assert torch.allclose(p.grad, expected[p], atol=1e-7)  # sigma = 0: the release is the clipped sum
        assert torch.allclose(p.detach(), before[p] - 0.1 * expected[p], atol=1e-7)


def test_prv_accountant_is_accepted_like_opacus():
    model, opt, dl = _setup()
    engine = PrivacyEngine(accountant="prv", seed=0)
    _, private, dl = engine.make_private_with_epsilon(module=model, optimizer=opt, data_loader=dl,
                                                      target_epsilon=3.0, target_delta=1e-5, epochs=1,
                                                      max_grad_norm=1.0)
    for x, y in dl:
        private.zero_grad()
        if len(x):
            F.cross_entropy(model(x), y).backward()
        private.step()
    assert engine.accountant.name == "prv" and 0 < engine.get_epsilon(1e-5) <= 3.0


def test_ghost_warns_once_when_the_gram_form_costs_far_more_than_materializing():
    """A 32x32 convolution under ghost: T (d + p) / (p d) = 1024 * 59 / 864 ~ 70x; bk stays silent, and so
    does ghost on a layer whose Gram form is cheap (a short sequence)."""
    import warnings as _w

    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.Flatten(), nn.Linear(32 * 32 * 32, 2))
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 2, (4,))
    dl = DataLoader(TensorDataset(x, y), batch_size=4)
    for mode, expect in (("ghost", True), ("bk", False)):
        model = copy.deepcopy(conv)
        engine = PrivacyEngine(seed=0)
        model, opt, _ = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                            data_loader=dl, noise_multiplier=0.0, max_grad_norm=1.0,
                                            grad_sample_mode=mode, poisson_sampling=False)
        with _w.catch_warnings(record=True) as got:
            _w.simplefilter("always")
            for _ in range(2):
                F.cross_entropy(model(x), y).backward()
                opt.step()
                opt.zero_grad()
        ghost = [w for w in got if "Gram-form norm of layer '0'" in str(w.message)]
        assert len(ghost) == (1 if expect else 0), [str(w.message) for w in got]
        if expect:
            assert "about 70x" in str(ghost[0].message) and "bk" in str(ghost[0].message)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 2))
    engine = PrivacyEngine(seed=0)
    mlp, opt, _ = engine.make_private(module=mlp, optimizer=torch.optim.SGD(mlp.parameters(), lr=0.1),
                                      data_loader=DataLoader(TensorDataset(torch.randn(4, 8), y), batch_size=4),
                                      noise_multiplier=0.0, max_grad_norm=1.0, grad_sample_mode="ghost",
                                      poisson_sampling=False)
    with _w.catch_warnings(record=True) as got:
        _w.simplefilter("always")
        F.cross_entropy(mlp(torch.randn(4, 8)), y).backward()
    assert not [w for w in got if "Gram-form" in str(w.message)]


def test_batch_size_mismatch_names_the_offending_layer_first_and_briefly():
    """Without the private loader (batch size unknown), a layer whose dimension 0 differs from the others is
    named first, with the likely fixes, instead of a list of every layer."""

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(*[nn.Linear(6, 6) for _ in range(12)])
            self.side = nn.Linear(6, 1)

        def forward(self, x):
            return self.body(x).sum(1) + self.side(x[:2]).sum()

    model = Odd()
    dl = DataLoader(TensorDataset(torch.randn(8, 6)), batch_size=4)
    engine = PrivacyEngine(seed=0)
    model, opt, _ = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                        data_loader=dl, noise_multiplier=0.0, max_grad_norm=1.0)
    with pytest.raises(dpengine.grad_sample.registry.PerSampleGradientError) as err:
        model(torch.randn(4, 6)).sum().backward()
    msg = str(err.value)
    assert msg.startswith("'side' saw 2 (output shape (2, 1)), while the other tracked layers saw a batch of 4")
    assert "batch_first=True" in msg and len(msg) < 500


def test_time_major_error_names_the_layer_and_its_shape_first():
    """With the private loader the batch size is known: the error starts with the offending layer and the
    shape it saw, then the fix (batch_first=True)."""
    torch.manual_seed(0)

    class TimeMajor(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(5, 5)
            self.head = nn.Linear(5, 2)

        def forward(self, x):  # x: (B, T, d) from the loader, run time-major inside
            return self.head(self.proj(x.transpose(0, 1)).mean(0))

    data = TensorDataset(torch.randn(64, 3, 5), torch.randint(0, 2, (64,)))
    model = TimeMajor()
    _, opt, dl = PrivacyEngine(seed=0).make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=16), noise_multiplier=0.0, max_grad_norm=1.0)
    x, y = next(x for x in dl if len(x[0]) not in (0, 3))
    with pytest.raises(dpengine.grad_sample.registry.PerSampleGradientError) as err:
        F.cross_entropy(model(x), y).backward()
    msg = str(err.value)
    assert msg.startswith(f"'proj' saw 3 (output shape (3, {len(x)}, 5)), but the private data loader yielded a "
                          f"batch of {len(x)} records")
    assert "batch_first=True" in msg
