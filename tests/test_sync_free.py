"""The private step makes no host read of a device value (a GPU synchronization), and a non-finite step is
masked on the device and reported at the next ``step()``/``zero_grad()`` (docs/DESIGN.md, "A step without
host synchronization").

CPU proxy for GPU syncs: after warm-up steps, every ``torch.Tensor`` method that copies a value to the host
(``item``, ``__bool__``, ``__float__``, ``__int__``, ``__index__``, ``tolist``, ``cpu``, ``numpy``, and ``to``
with a CPU device) raises while backward + step run. The data loader's batch is drawn before the window
(the loader runs on the host by design); the non-finite flag's host copy is read through a numpy view made
during warm-up, which is host memory (pinned, written by a non-blocking copy on CUDA), not a device read.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpengine import PrivacyEngine
from dpengine import optimizer as dp_optimizer
from dpengine.bench.worker import count_ops
from dpengine.grad_sample.registry import PerSampleGradientError
from models import TinyGPT, seq_ce

SYNC_METHODS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu", "numpy")
CLIPPINGS = {"flat": {}, "per_layer": {}, "automatic": {}, "adaptive": {"unclipped_num_std": 2.0},
             "error_feedback": {}}


pytestmark = pytest.mark.usefixtures("one_thread")


def _is_cpu(device: Any) -> bool:
    return isinstance(device, (str, torch.device)) and torch.device(device).type == "cpu"


@contextlib.contextmanager
def no_host_reads(allow_to_cpu: bool = False) -> Iterator[None]:
    """Make every host read of a tensor raise; ``allow_to_cpu`` lets ``Tensor.to(cpu)`` through (torch's
    fused optimizers move their flag ``.to(param.device)``, a no-op on the CPU and no host read on a GPU)."""
    saved = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}
    original_to = torch.Tensor.to

    def refuse(name: str) -> Any:
        def method(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError(f"host read of a device value: Tensor.{name}")
        return method

    def to(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not allow_to_cpu and (_is_cpu(kwargs.get("device")) or (args and _is_cpu(args[0]))):
            raise AssertionError("host read of a device value: Tensor.to(cpu)")
        return original_to(self, *args, **kwargs)

    shortcut = dp_optimizer.CPU_FLAG_SHORTCUT
    try:
        for name in SYNC_METHODS:
            setattr(torch.Tensor, name, refuse(name))
        torch.Tensor.to = to  # type: ignore[method-assign]
        dp_optimizer.CPU_FLAG_SHORTCUT = False  # run the device path (a CPU flag read is free, a GPU one is not)
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)
        torch.Tensor.to = original_to  # type: ignore[method-assign]
        dp_optimizer.CPU_FLAG_SHORTCUT = shortcut


def _setup(kind: str, mode: str, clipping: str, optimizer: str = "sgd") -> tuple[nn.Module, Any, Any, Any]:
    torch.manual_seed(0)
    if kind == "mlp":
        model: nn.Module = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.LayerNorm(7), nn.Linear(7, 3))
        ds = TensorDataset(torch.randn(32, 5), torch.randn(32, 3))
        loss_fn: Any = F.mse_loss
    else:
        model = TinyGPT(padding_idx=None, tie=False)
        ds = TensorDataset(torch.randint(0, 11, (32, 6)), torch.randint(0, 11, (32, 6)))
        loss_fn = seq_ce("mean")
    fused = {"fused": True} if optimizer.endswith("-fused") else {}
    opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01, **fused)
           if optimizer.startswith("sgd") else torch.optim.Adam(model.parameters(), lr=0.01, **fused))
    model, dpopt, dl = PrivacyEngine(seed=0).make_private(
        module=model, optimizer=opt, data_loader=DataLoader(ds, batch_size=8), noise_multiplier=1.0,
        max_grad_norm=1.0, clipping=clipping, grad_sample_mode=mode, **CLIPPINGS[clipping])
    return model, dpopt, dl, loss_fn


def test_the_proxy_catches_a_host_read():
    with no_host_reads(), pytest.raises(AssertionError, match="host read"):
        bool(torch.ones(()) > 0)
    with no_host_reads(), pytest.raises(AssertionError, match="host read"):
        torch.ones(2).to("cpu")


@pytest.mark.parametrize("kind", ["mlp", "gpt"])
@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk"])
@pytest.mark.parametrize("clipping", list(CLIPPINGS))
def test_steady_state_step_reads_nothing_back(kind, mode, clipping):
    # the wrapped optimizer is SGD: torch's non-capturable Adam reads its step count, a CPU tensor, with
    # .item() (host memory, no device sync, but the proxy cannot tell it apart)
    model, opt, dl, loss_fn = _setup(kind, mode, clipping)
    batches = iter(dl)
    for step in range(4):
        x, y = next(batches)
        before = [p.detach().clone() for p in model.parameters()]
        with no_host_reads() if step >= 2 else contextlib.nullcontext():
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters())), "the step did nothing"
    opt.check_finite()  # nothing was masked


@pytest.mark.parametrize("mode", ["hooks", "bk"])
@pytest.mark.parametrize("clipping", ["flat", "adaptive"])
def test_nonfinite_step_is_masked_and_reported_at_the_next_call(mode, clipping):
    model, opt, dl, loss_fn = _setup("mlp", mode, clipping)  # SGD with momentum and weight decay
    batches = iter(dl)
    x, y = next(batches)
    opt.zero_grad()
    loss_fn(model(x), y).backward()
    opt.step()  # builds momentum: a zero gradient alone would still move the parameters
    before = [p.detach().clone() for p in model.parameters()]
    x, y = next(batches)
    x = x.clone()
    x[0, 0] = float("nan")
    opt.zero_grad()
    with no_host_reads():
        loss_fn(model(x), y).backward()  # no error, no host read: the flag stays on the device
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    with pytest.raises(PerSampleGradientError, match="non-finite"):
        opt.zero_grad()
    # reported once; the user who catches it goes on from the unchanged parameters, and training works
    x, y = next(batches)
    opt.zero_grad()
    loss_fn(model(x), y).backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_masked_steps_stay_masked_until_reported(monkeypatch):
    """On CUDA the flag's host copy may not have arrived at the next call: every step until it does is
    masked too (the flag is sticky), and check_finite() waits for it."""
    model, opt, dl, loss_fn = _setup("mlp", "bk", "flat")
    batches = iter(dl)
    real = opt._raise_if_nonfinite
    monkeypatch.setattr(opt, "_raise_if_nonfinite", lambda wait: real(wait) if wait else None)  # copy "in flight"
    before = [p.detach().clone() for p in model.parameters()]
    x, y = next(batches)
    x = x.clone()
    x[1, 2] = float("inf")
    opt.zero_grad()
    loss_fn(model(x), y).backward()
    opt.step()
    for _ in range(2):  # clean batches, taken before the report: still no update
        x, y = next(batches)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    with pytest.raises(PerSampleGradientError, match="non-finite"):
        opt.check_finite()
    with pytest.raises(PerSampleGradientError, match="non-finite"):  # nor can a checkpoint hide it
        model2, opt2, dl2, _ = _setup("mlp", "bk", "flat")
        x, y = next(iter(dl2))
        x = x.clone()
        x[0, 0] = float("nan")
        loss_fn(model2(x), y).backward()
        opt2.step()
        opt2.state_dict()


def _ops_ratio(kind: str) -> tuple[int, int]:
    torch.manual_seed(0)
    if kind == "mlp":
        def make() -> nn.Module:
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
        x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    else:
        def make() -> nn.Module:
            torch.manual_seed(0)
            return TinyGPT(vocab=32, d=32, heads=2, layers=2, padding_idx=None, tie=False)
        x, y = torch.randint(0, 32, (8, 16)), torch.randint(0, 32, (8, 16))
    loss_fn = F.cross_entropy if kind == "mlp" else seq_ce("mean")
    plain = make()
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1)

    def plain_step() -> None:
        plain_opt.zero_grad()
        loss_fn(plain(x), y).backward()
        plain_opt.step()

    model = make()
    model, opt, dl = PrivacyEngine(seed=0).make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=len(y)), noise_multiplier=1.0, max_grad_norm=1.0,
        poisson_sampling=False)

    def private_step() -> None:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

    plain_step(), private_step()  # warm-up
    return count_ops(private_step), count_ops(plain_step)


#: measured (torch 2.13 CPU, ATen operators of one SGD step, views included): MLP 107 private vs 59 plain (1.81x,
#: 104 before the rank-one norms' underflow pad; 144 before per-sample rows were packed, inputs kept undetached and the one-token Linear path lost its token
#: views; 222 before the clipped sums were written into their slots), TinyGPT 470 vs 310 (1.52x; was 558). The
#: MLP's gap is the fixed cost of a step (factors, noise, the non-finite flag and mask: about 20 operators)
#: and about 10 per layer
OPS_RATIO = {"mlp": 1.85, "gpt": 1.6}


@pytest.mark.parametrize("kind", sorted(OPS_RATIO))
def test_private_step_op_count_stays_close_to_the_non_private_one(kind):
    private, plain = _ops_ratio(kind)
    assert private <= OPS_RATIO[kind] * plain, (private, plain, private / plain)


#: the issue's target (#9): a bk step dispatches at most 1.5x the operators of the non-private one on the
#: bench's GPT-like model (measured 735 vs 495, 1.48x); the CNN misses it (200 vs 93, 2.15x: its plain step is
#: 93 operators, and each convolution's norm alone needs an unfold, a GEMM and a reduction)
BENCH_OPS_RATIO = {("gpt", 8): 1.5, ("cnn", 32): 2.25}


@pytest.mark.parametrize("name,batch", sorted(BENCH_OPS_RATIO))
def test_bench_models_op_count_ratio(name, batch):
    from dpengine.bench.models import build

    def step_of(private: bool) -> Any:
        torch.manual_seed(0)
        work = build(name)
        x, y = work.batch(batch, torch.Generator().manual_seed(0), torch.device("cpu"))
        model = work.model
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        if private:
            model, opt, _ = PrivacyEngine(seed=0).make_private(
                module=model, optimizer=opt, data_loader=DataLoader(TensorDataset(x, y), batch_size=batch),
                noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False)

        def step() -> None:
            opt.zero_grad()
            work.loss(model(x), y).backward()
            opt.step()
        step()  # warm-up (one-time choices: the bk method per layer, the conv implementation)
        return step

    private, plain = count_ops(step_of(True)), count_ops(step_of(False))
    assert private <= BENCH_OPS_RATIO[(name, batch)] * plain, (private, plain, private / plain)


def test_a_run_ending_on_a_masked_step_cannot_report_epsilon_without_the_error():
    """The last step of a run is masked and no step()/zero_grad() follows: reading epsilon raises the error
    instead of reporting a run that silently dropped its last update."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    engine = PrivacyEngine(seed=0)
    model, opt, dl = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(torch.randn(32, 5), torch.randn(32, 3)), batch_size=8),
        noise_multiplier=1.0, max_grad_norm=1.0)
    x, y = next(x for x in dl if len(x[0]))
    x = x.clone()
    x[0, 0] = float("nan")
    F.mse_loss(model(x), y).backward()
    opt.step()
    with pytest.raises(PerSampleGradientError, match="non-finite"):
        engine.get_epsilon(1e-5)
    assert engine.get_epsilon(1e-5) > 0  # reported once; the step was counted (conservative)


def test_clipped_sums_live_in_one_buffer_and_the_step_copies_none():
    """The controller accumulates the clipped sums as views of one flat buffer per device and dtype, laid out
    in the optimizer's parameter order (also for a parameter no sample touched), so the step's noise, check,
    mask and collectives work on that buffer: p.grad are its views, and nothing is concatenated."""
    from dpengine import optimizer as optimizer_module

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.Linear(3, 3))
    unused = model[3]  # never called: its sums are zero slots of the same buffer

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = model

        def forward(self, x):
            return self.body[2](self.body[1](self.body[0](x)))

    net = Net()
    _, opt, dl = PrivacyEngine(seed=0).make_private(
        module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(torch.randn(32, 5), torch.randn(32, 3)), batch_size=8),
        noise_multiplier=1.0, max_grad_norm=1.0)
    copies = []
    real_cat = torch.cat
    optimizer_module.torch.cat = lambda *a, **k: copies.append(1) or real_cat(*a, **k)
    try:
        x, y = next(x for x in dl if len(x[0]))
        F.mse_loss(net(x), y).backward()
        opt.step()
    finally:
        optimizer_module.torch.cat = real_cat
    assert not copies
    bases = {id(p.grad._base) for p in net.parameters()}
    assert len(bases) == 1 and None not in {p.grad._base for p in net.parameters()}
    assert torch.equal(unused.weight.grad.abs() > 0, torch.ones_like(unused.weight, dtype=torch.bool))  # noise only
    offsets = [p.grad.storage_offset() for p in net.parameters()]
    assert offsets == sorted(offsets)  # the optimizer's order


@pytest.mark.parametrize("secure", [False, True])
def test_noise_in_chunks_is_iid_gaussian_with_the_right_std(monkeypatch, secure):
    """Noise is drawn in packs of at most CHUNK values (a bounded scratch buffer): with a tiny CHUNK, tensors
    are packed and a large one split, and every coordinate still gets its own N(0, std^2) draw. 60,000
    coordinates: sample std within 0.03 of 1.5 (7 standard errors) and mean within 0.04 (6.5), neighbouring
    chunks uncorrelated (|r| < 0.04, 6.3), and a per-tensor std reaches the right tensor (8); false alarms
    below 1e-9 in all."""
    from dpengine import noise as noise_module

    monkeypatch.setattr(noise_module, "CHUNK", 1000)
    assert [sum(t.numel() for t, _ in p) for p in noise_module._packs(
        [(torch.zeros(300), 0), (torch.zeros(900), 1), (torch.zeros(2500), 2)])] == [300, 900, 1000, 1000, 500]
    gen = noise_module.GaussianNoise(seed=None if secure else 0, secure_mode=secure)
    ts = [torch.zeros(3, 7), torch.zeros(50_000), torch.zeros(9_979)]
    gen.add_(ts, 1.5)
    flat = torch.cat([t.reshape(-1) for t in ts])
    assert flat.numel() == 60_000 and bool((flat != 0).all())
    assert abs(float(flat.std()) - 1.5) < 0.03 and abs(float(flat.mean())) < 0.04
    a, b = ts[1][:25_000], ts[1][25_000:]
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 0.04
    small, big = torch.zeros(20_000), torch.zeros(20_000)
    gen.add_([small, big], [0.5, 4.0])
    assert abs(float(small.std()) - 0.5) < 0.02 and abs(float(big.std()) - 4.0) < 0.16


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_nonfinite_flag_sees_every_nan_and_inf(dtype):
    """The step's check is one sum: NaN and inf propagate through IEEE additions, inf + (-inf) is NaN. Any
    single bad element, anywhere in a large buffer (past the vectorized and blocked parts of the reduction),
    or opposite infinities together, set the flag; finite buffers do not."""
    from dpengine.grad_sample.ledger import nonfinite_flag

    torch.manual_seed(0)
    x = torch.randn(100_003, dtype=dtype)
    assert not bool(nonfinite_flag(x)) and not bool(nonfinite_flag(x[:0]))
    for where in (0, 1, 17, 4096, 50_000, 100_002):
        for bad in (float("nan"), float("inf"), -float("inf")):
            y = x.clone()
            y[where] = bad
            assert bool(nonfinite_flag(y)), (where, bad)
    y = x.clone()
    y[3], y[99_999] = float("inf"), -float("inf")
    assert bool(nonfinite_flag(y))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run by benchmarks/gpu_check.sh)")
@pytest.mark.parametrize("mode,clipping,precision,optimizer", [
    *((m, c, p, "sgd") for m in ("hooks", "ghost", "bk", "fused") for c in ("flat", "per_layer", "adaptive")
      for p in ("fp32", "bf16")),
    ("bk", "flat", "fp32", "adam-fused"), ("bk", "flat", "bf16", "adam-fused"),
    ("ghost", "flat", "fp16", "sgd"), ("bk", "per_layer", "fp16", "sgd")])
def test_cuda_step_never_synchronizes(mode, clipping, precision, optimizer):
    """On a GPU, steady-state backward() + step() make no host-device synchronization: CUDA's own sync
    detector (torch.cuda.set_sync_debug_mode("error")) raises on any blocking copy or stream sync. A fused
    Adam masks through its own ``found_inf``; fp16 runs with make_private(loss_scale=...)."""
    if mode == "fused":
        from conftest import require_triton
        require_triton()
    torch.manual_seed(0)
    model = TinyGPT(padding_idx=0, tie=True).cuda()
    ds = TensorDataset(torch.randint(0, 11, (64, 6)), torch.randint(0, 11, (64, 6)))
    inner = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if optimizer == "sgd"
             else torch.optim.Adam(model.parameters(), lr=0.01, fused=True))
    model, opt, dl = PrivacyEngine(seed=0).make_private(
        module=model, optimizer=inner,
        data_loader=DataLoader(ds, batch_size=16), noise_multiplier=1.0, max_grad_norm=1.0, clipping=clipping,
        grad_sample_mode=mode, loss_scale=2.0 ** 10 if precision == "fp16" else 1.0, **CLIPPINGS[clipping])
    loss_fn = seq_ce("mean")
    batches = iter(dl)
    for step in range(4):
        x, y = (t.cuda() for t in next(batches))
        torch.cuda.synchronize()
        before = [p.detach().clone() for p in model.parameters()]
        if step >= 2:
            torch.cuda.set_sync_debug_mode("error")
        try:
            opt.zero_grad()
            with torch.autocast("cuda", dtype=torch.float16 if precision == "fp16" else torch.bfloat16,
                                enabled=precision != "fp32"):
                out = model(x)
            loss_fn(out.float(), y).backward()
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    opt.check_finite()


def test_one_noise_std_is_decided_without_reading_a_device_std():
    """Adaptive clipping's std is a device tensor: the one-std test compares it by identity (a value
    comparison would read it to the host every step), and refuses two different device tensors."""
    from dpengine.optimizer import _one_std

    bound = torch.tensor(0.7)
    assert _one_std([1.0, 1.0]) and not _one_std([1.0, 2.0]) and _one_std([])
    assert _one_std([bound, bound, bound])
    with pytest.raises(TypeError, match="different device tensors"):
        _one_std([bound, torch.tensor(0.7)])


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_cpu_shortcut_for_clean_steps_changes_nothing(optimizer, monkeypatch):
    """On the CPU a clean step skips the masking passes (a flag read there waits for nothing): the parameters
    and the optimizer state after clean steps and a masked step are bitwise those of the device path."""
    def run(shortcut: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        monkeypatch.setattr(dp_optimizer, "CPU_FLAG_SHORTCUT", shortcut)
        model, opt, dl, loss_fn = _setup("mlp", "bk", "flat", optimizer)
        batches = iter(dl)
        for step in range(4):
            x, y = next(batches)
            if step == 3:  # the last: the sticky flag masks every later step until it is reported
                x = x.clone()
                x[0, 0] = float("nan")
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            before = [p.detach().clone() for p in model.parameters()]
            opt.step()
            assert all(torch.equal(a, p) for a, p in zip(before, model.parameters())) == (step == 3)
        with pytest.raises(PerSampleGradientError, match="non-finite"):
            opt.check_finite()
        state = [v for s in opt.original_optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        return [p.detach().clone() for p in model.parameters()], state

    (p_fast, s_fast), (p_dev, s_dev) = run(True), run(False)
    assert all(torch.equal(a, b) for a, b in zip(p_fast, p_dev)) and len(s_fast) == len(s_dev) > 0
    assert all(torch.equal(a, b) for a, b in zip(s_fast, s_dev))


@pytest.mark.parametrize("optimizer", ["sgd-fused", "adam-fused"])
def test_fused_optimizer_skips_a_masked_step_itself(optimizer, monkeypatch):
    """A fused SGD/Adam gets the step's flag as ``found_inf`` and skips the update in its kernel: no copy of
    the parameters (the copy-and-lerp path is never entered), no host read, and on a masked step neither the
    parameters nor the optimizer state change; clean steps train."""
    model, opt, dl, loss_fn = _setup("mlp", "bk", "flat", optimizer)

    def no_copy(*args, **kwargs):
        raise AssertionError("the copy-and-lerp masking ran for a fused optimizer")

    monkeypatch.setattr(type(opt), "_masked_update_start", no_copy)
    batches = iter(dl)
    for step in range(3):
        x, y = next(batches)
        if step == 2:
            x = x.clone()
            x[0, 0] = float("nan")
        params = [p.detach().clone() for p in model.parameters()]
        state = [v.clone() for s in opt.original_optimizer.state.values() for v in s.values()
                 if isinstance(v, torch.Tensor)]
        with no_host_reads(allow_to_cpu=True) if step else contextlib.nullcontext():  # step 0 sets up host buffers
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        after = [v for s in opt.original_optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        unchanged = all(torch.equal(a, p) for a, p in zip(params, model.parameters()))
        assert unchanged == (step == 2)
        if step == 2:
            assert len(state) == len(after) > 0 and all(torch.equal(a, b) for a, b in zip(state, after))
        assert not hasattr(opt.original_optimizer, "found_inf")  # handed over for the step only
    with pytest.raises(PerSampleGradientError, match="non-finite"):
        opt.check_finite()
