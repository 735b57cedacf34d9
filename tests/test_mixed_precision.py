"""Mixed precision: bf16 autocast and bf16 parameters, every backend, against the float64 oracle.

Per-sample norms, factors and clipped sums are formed in at least float32 whatever the compute dtype
(the controller promotes the captured a and g), so the clipping bound holds for the gradient the
model actually computed; the comparison with the float64 oracle only measures bf16's forward error.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import TinyCNN, TinyGPT, seq_ce
from conftest import fp32_state
from oracle import flat_norms, oracle_per_sample

from dpengine.grad_sample.controller import GradSampleController, GradSampleMode, LossReduction

MODES = ["hooks", "ghost", "bk"]


def _ce(out, y):
    return F.cross_entropy(out.float(), y)


def _mlp():
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5)), torch.randn(6, 12), torch.randint(0, 5, (6,)), _ce


def _cnn():
    return TinyCNN(dim=2), torch.randn(5, 3, 8, 8), torch.randint(0, 3, (5,)), _ce


def _gpt():
    loss = seq_ce("mean")
    return (TinyGPT(vocab=11, d=8, heads=2, layers=2, padding_idx=0, tie=True), torch.randint(0, 11, (4, 9)),
            torch.randint(0, 11, (4, 9)), lambda out, y: loss(out.float(), y))


def _run(model, loss_fn, x, y, mode, factors, *, autocast: bool):
    ctrl = GradSampleController(model, mode=GradSampleMode(mode), clip_factors=factors,
                                loss_reduction=LossReduction.MEAN)
    ctrl.note_batch(x.shape[0])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    loss_fn(out, y).backward()
    sums = ctrl.pop_clipped_sums()
    names = {id(p): n for n, p in model.named_parameters()}
    ctrl.detach()
    return {names[id(p)]: t for p, t in sums.items()}, ctrl.last_norms


def _per_sample_loop(model, loss_fn, x, y, *, autocast: bool) -> list[dict[str, torch.Tensor]]:
    """Each sample's gradient by its own forward/backward in the same precision (no dpengine)."""
    model = copy.deepcopy(model)
    out = []
    for j in range(x.shape[0]):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            o = model(x[j:j + 1])
        loss_fn(o, y[j:j + 1]).backward()
        out.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
    return out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("build", [_mlp, _cnn, _gpt], ids=["mlp", "cnn", "gpt"])
@pytest.mark.parametrize("precision", ["autocast", "bf16-params"])
def test_bf16_clipped_sum_matches_float64_oracle_and_bound_holds(build, mode, precision):
    torch.manual_seed(0)
    model, x, y, loss_fn = build()
    ps = oracle_per_sample(copy.deepcopy(model).double(), loss_fn,
                           x.double() if x.is_floating_point() else x, y)
    true_norms = flat_norms(ps)
    c_max = float(true_norms.median())  # about half the samples are clipped
    factors = lambda n: (c_max / (n + 1e-6)).clamp(max=1.0)  # noqa: E731
    ref = {k: torch.einsum("b,b...->...", factors(true_norms), t) for k, t in ps.items()}

    low = copy.deepcopy(model)
    xin = x
    if precision == "bf16-params":
        low = low.to(torch.bfloat16)
        xin = x.bfloat16() if x.is_floating_point() else x
    sums, norms = _run(low, loss_fn, xin, y, mode, factors, autocast=precision == "autocast")
    assert norms.dtype == torch.float32  # norms are never formed in bf16
    assert all(t.dtype == torch.float32 for t in sums.values())  # nor the clipped sums
    flat = lambda d: torch.cat([d[k].double().flatten() for k in sorted(ref)])  # noqa: E731
    err = float((flat(sums) - flat(ref)).norm() / flat(ref).norm())  # relative, over the whole update
    # the CNN's InstanceNorm on 4x4 maps amplifies bf16's forward error (its conv bias has an exactly zero
    # gradient in float64, not in bf16): there the same-precision per-sample loop below is the oracle
    assert err <= (2e-1 if build is _cnn else 2e-2), err
    loop = _per_sample_loop(low, loss_fn, xin, y, autocast=precision == "autocast")
    w = factors(torch.stack([flat(g).norm() for g in loop]).float())
    ref_same = {k: sum(float(w[j]) * loop[j][k].double() for j in range(len(loop))) for k in ref}
    err_same = float((flat(sums) - flat(ref_same)).norm() / flat(ref_same).norm())
    assert err_same <= 1e-2, err_same

    # a sample's clipped contribution, as the model computed it, is at most C
    for j in true_norms.topk(2).indices.tolist():  # the most clipped samples
        one, _ = _run(copy.deepcopy(low), loss_fn, xin[j:j + 1], y[j:j + 1], mode, factors,
                      autocast=precision == "autocast")
        released = torch.cat([t.double().flatten() for t in one.values()]).norm()
        assert float(released) <= c_max * (1 + 1e-5), (j, float(released) / c_max)


def test_fp16_grad_scaler_is_refused_with_a_clear_error():
    from torch.utils.data import DataLoader, TensorDataset

    from dpengine import PrivacyEngine

    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    ds = TensorDataset(torch.randn(16, 6), torch.randint(0, 3, (16,)))
    model, opt, dl = PrivacyEngine(seed=0).make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=DataLoader(ds, batch_size=8),
        noise_multiplier=1.0, max_grad_norm=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = next(iter(dl))
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    with pytest.raises(NotImplementedError, match="skipped steps are driven by single records.*loss_scale=2"):
        scaler.step(opt)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_backward_inside_autocast_reduces_in_float32(mode, clipping):
    """A backward called inside ``torch.autocast`` (autocast is thread-local and the autograd engine carries
    it into the backward) must not form the norms and clipped sums in bf16: they equal, to float32 rounding,
    those of the same forward with the backward outside autocast. bf16 products would differ by about 1e-3
    (2^-8 relative), and could under-state a sample's norm past the clipping bound."""
    from torch.utils.data import DataLoader, TensorDataset

    from dpengine import PrivacyEngine

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 96), nn.Tanh(), nn.Linear(96, 10))
    x, y = torch.randn(16, 8, 64), torch.randint(0, 10, (16, 8))
    results = []
    for inside in (False, True):
        model = copy.deepcopy(base)
        model, opt, _ = PrivacyEngine(seed=0).make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(TensorDataset(x, y), batch_size=16), noise_multiplier=0.0, max_grad_norm=1e-3,
            poisson_sampling=False, grad_sample_mode=mode, clipping=clipping)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).reshape(-1, 10).float(), y.reshape(-1))
            if inside:
                loss.backward()
        if not inside:
            loss.backward()
        sums = opt.clipped_grads_for_debugging()
        results.append((opt.controller.last_norms.clone(), [sums[p] for p in model.parameters()]))
    (n_out, s_out), (n_in, s_in) = results
    assert n_in.dtype == torch.float32
    assert torch.allclose(n_in, n_out, rtol=1e-5, atol=0), float(((n_in - n_out) / n_out).abs().max())
    for a, b in zip(s_in, s_out):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-9), float(((a - b).norm() / b.norm()))


# ------------------------------------------------------------------ reduced-precision float32 math (TF32, oneDNN bf16)
_USER_SETTINGS = {
    "default": lambda: None,
    "legacy high (TF32)": lambda: torch.set_float32_matmul_precision("high"),
    "legacy medium (oneDNN bf16)": lambda: torch.set_float32_matmul_precision("medium"),
    "legacy allow_tf32 flags": lambda: (setattr(torch.backends.cuda.matmul, "allow_tf32", True),
                                        setattr(torch.backends.cudnn, "allow_tf32", True)),
    "new API per op": lambda: (setattr(torch.backends.mkldnn.matmul, "fp32_precision", "bf16"),
                               setattr(torch.backends.mkldnn.conv, "fp32_precision", "tf32")),
    "new API generic tf32": lambda: setattr(torch.backends, "fp32_precision", "tf32"),
}


def _token_ce(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _clip_at_one(norms):
    return (1.0 / norms).clamp(max=1.0)


@pytest.mark.skipif(not hasattr(torch._C, "_get_fp32_precision_getter"), reason="torch < 2.9: legacy switches only")
@pytest.mark.parametrize("setting", sorted(_USER_SETTINGS))
@pytest.mark.parametrize("mode", MODES)
def test_reduction_runs_exact_float32_whatever_the_user_switched_on(setting, mode, restore_fp32_switches, monkeypatch):
    """With TF32 (CUDA) or oneDNN's bf16 float32 math (CPU) switched on, norms formed by those units are
    off by about 1e-3 relative. Inside the reduction every float32 switch reads exact, cuBLAS's own
    consistency check passes (it raises on a mix of the legacy and new APIs before every float32 GEMM), and
    afterwards the user's switches are exactly as they set them."""
    from dpengine.grad_sample import linear as linear_mod
    from dpengine.grad_sample.precision import reduced_fp32_math

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(5, 4, 6), torch.randint(0, 3, (5, 4))
    _USER_SETTINGS[setting]()
    before = fp32_state()
    seen = []

    def spied(name):
        original = getattr(linear_mod._LinearLike, name)

        def spy(self, *args, **kwargs):
            seen.append((reduced_fp32_math("cuda") + reduced_fp32_math("cpu"), torch._C._get_cublas_allow_tf32(),
                         torch._C._get_float32_matmul_precision()))
            return original(self, *args, **kwargs)
        return spy

    for name in ("per_sample", "norm_sq", "clipped_sum"):
        monkeypatch.setattr(linear_mod._LinearLike, name, spied(name))
    _run(model, _token_ce, x, y, mode, _clip_at_one, autocast=False)
    assert len(seen) >= 4 and all(s == ([], False, "highest") for s in seen), seen
    assert fp32_state() == before or before[0] is None and fp32_state()[1] == before[1]
    if setting != "default":
        assert reduced_fp32_math("cuda") + reduced_fp32_math("cpu")  # the user's setting is back in force


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run by benchmarks/gpu_check.sh)")
@pytest.mark.parametrize("mode", ["ghost", "bk"])
def test_cuda_norms_are_exact_float32_with_tf32_switched_on(mode, restore_fp32_switches, monkeypatch):
    """On a GPU with TF32 switched on, each Linear's per-sample squared norms equal the float64 ones formed
    from the very a and g the layer captured (to float32 rounding), which norms from TF32 Gram products
    miss: the reduction ran exact float32."""
    from dpengine.grad_sample import linear as linear_mod

    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    dev = torch.device("cuda")
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 10)).to(dev)
    x, y = torch.randn(32, 16, 64, device=dev), torch.randint(0, 10, (32, 16), device=dev)
    seen = []
    original = linear_mod._LinearLike.norm_sq

    def spy(self, layer, rec, names, method, **kwargs):
        a, g = rec.a.double(), rec.g.double()  # before a materialized norm releases them
        out = original(self, layer, rec, names, method, **kwargs)
        seen.append((a, g, sum(t.double() for t in out.values())))
        return out

    monkeypatch.setattr(linear_mod._LinearLike, "norm_sq", spy)
    _run(model, _token_ce, x, y, mode, _clip_at_one, autocast=False)
    assert len(seen) == 2
    for a, g, got in seen:
        exact = torch.einsum("btp,btd->bpd", g, a).square().sum((1, 2)) + g.sum(1).square().sum(1)
        assert torch.allclose(got, exact, rtol=1e-5, atol=0), float(((got - exact) / exact).abs().max())
    # the test has power: the same norms from Gram products formed in TF32 (on here, outside the reduction)
    # miss the tolerance above
    a, g, got = seen[0]
    a32, g32 = a.float(), g.float()
    tf32 = ((torch.bmm(a32, a32.transpose(1, 2)) + 1) * torch.bmm(g32, g32.transpose(1, 2))).sum((1, 2)).double()
    assert float(((tf32 - got) / got).abs().max()) > 2e-5


@pytest.mark.skipif(not hasattr(torch._C, "_get_fp32_precision_getter"), reason="torch < 2.9: legacy switches only")
def test_overlapping_reductions_share_one_exact_setting(restore_fp32_switches):
    """Two reductions in flight at once (threads): the second neither saves the first's exact setting as
    the user's nor sees the user's TF32 restored before it ends; the last to end restores it."""
    import contextlib

    from dpengine.grad_sample.precision import exact_fp32, reduced_fp32_math

    torch.set_float32_matmul_precision("high")
    first, second = contextlib.ExitStack(), contextlib.ExitStack()
    exact_fp32(first)
    exact_fp32(second)
    first.close()  # the first ends while the second still runs: still exact
    assert reduced_fp32_math("cuda") == [] and torch._C._get_float32_matmul_precision() == "highest"
    second.close()
    assert torch._C._get_float32_matmul_precision() == "high" and reduced_fp32_math("cuda")


def test_exact_fp32_with_the_legacy_switches_only(restore_fp32_switches, monkeypatch):
    """torch < 2.9 has only the two legacy CUDA switches: they are turned off inside and restored after."""
    import contextlib

    from dpengine.grad_sample import precision

    monkeypatch.setattr(precision, "_NEW_API", False)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    assert precision.reduced_fp32_math("cuda") == ["cuda.matmul.allow_tf32=True", "cudnn.allow_tf32=True"]
    assert precision.reduced_fp32_math("cuda", ("conv",)) == ["cudnn.allow_tf32=True"]
    with contextlib.ExitStack() as stack:
        precision.exact_fp32(stack)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert precision.reduced_fp32_math("cuda") == []
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
