"""Data-parallel private training on torch.distributed (gloo, 2 processes on loopback, CPU).

One process group runs every scenario (``_worker`` below, started as ``python tests/test_distributed.py
worker ...``, one process per rank, under a timeout so a hang cannot block CI); the tests compare what each
rank recorded with a float64 single-process DP-SGD oracle on the union of the ranks' batches, with each
other (bit-identical parameters), and with the noise the step must add. Poisson sampling across ranks is
tested in-process (the sharded sampler needs no process group).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

WORLD = 2
N = 24  # records
LOCAL_BATCH = 3  # DistributedSampler batch per rank: len(loader) = 12 / 3 = 4, q = 1/4, E[B_global] = 6
C = 0.7
LR = 0.5
SEED = 11
TIMEOUT_S = 150

# ------------------------------------------------------------------------------------------ shared setup


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _lipschitz_mlp() -> nn.Module:
    from dpengine import lipschitz as lip

    torch.manual_seed(0)
    return nn.Sequential(lip.InputNormClip(1.0), lip.SpectralLinear(5, 8, dtype=torch.float64), lip.GroupSort(2),
                         lip.SpectralLinear(8, 3, dtype=torch.float64))


def _dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=g)
    return TensorDataset(x, y, torch.arange(N))


#: (name, grad_sample_mode, clipping, options); all at sigma = 0, two SGD steps
ORACLE_CASES = [
    ("hooks-flat", "hooks", "flat", {}),
    ("bk-flat", "bk", "flat", {}),
    ("ghost-flat", "ghost", "flat", {}),
    ("bk-per_layer", "bk", "per_layer", {}),
    ("hooks-automatic", "hooks", "automatic", {"stability_constant": 0.05}),
    # a count noise of 1e-12 (it must be > sigma / 2 = 0): the bound's update is then deterministic to ~1e-12
    ("bk-adaptive", "bk", "adaptive", {"unclipped_num_std": 1e-12, "target_unclipped_quantile": 0.5,
                                       "clipbound_learning_rate": 0.5}),
    ("bk-error_feedback", "bk", "error_feedback", {"error_max_grad_norm": 0.05}),
]


# ------------------------------------------------------------------------------------------ the worker (one rank)


def _train(*, mode: str = "bk", clipping: str = "flat", options: dict | None = None, sigma: float = 0.0,
           steps: int = 2, ddp: bool = True, model_fn: Any = _mlp, virtual: int | None = None,
           no_sync_in_virtual: bool = False, secure: bool = False, loss: str = "ce",
           batch: int = LOCAL_BATCH, dataset: Any = None, ddp_kwargs: dict | None = None) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data.distributed import DistributedSampler

    from dpengine import PrivacyEngine, VirtualSteps

    model = model_fn()
    module = DistributedDataParallel(model, **(ddp_kwargs or {})) if ddp else model
    ds = dataset if dataset is not None else _dataset()
    loader = DataLoader(ds, batch_size=batch, sampler=DistributedSampler(ds))
    engine = PrivacyEngine(secure_mode=secure, seed=None if secure else SEED)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    kwargs: dict[str, Any] = dict(options or {})
    if clipping == "lipschitz":
        kwargs["loss_lipschitz"] = math.sqrt(2.0)  # TemperatureCrossEntropy(1.0).lipschitz
    else:
        kwargs["max_grad_norm"] = C
    module, opt, loader = engine.make_private(module=module, optimizer=opt, data_loader=loader,
                                              noise_multiplier=sigma, clipping=clipping, grad_sample_mode=mode,
                                              **kwargs)
    if loss == "ce":
        loss_fn = nn.CrossEntropyLoss()
    elif loss == "lipschitz":
        from dpengine import lipschitz as lip

        loss_fn = lip.TemperatureCrossEntropy(1.0)
    else:  # a zero gradient: the update is the noise alone
        def loss_fn(out: Tensor, y: Tensor) -> Tensor:
            return 0.0 * out.sum()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches: list[list[int]] = []
    bounds: list[float] = []
    chunks = VirtualSteps(loader, virtual, opt) if virtual else loader
    current: list[int] = []
    for x, y, idx in chunks:
        bounds_before = float(getattr(opt.policy, "max_grad_norm", float("nan")))
        opt.zero_grad()
        if virtual and no_sync_in_virtual:
            with module.no_sync():
                loss_fn(module(x), y).backward()
        else:
            loss_fn(module(x), y).backward()
        before = opt.steps_taken
        opt.step()
        current += idx.tolist()
        if opt.steps_taken > before:
            batches.append(current)
            bounds.append(bounds_before)
            current = []
        if len(batches) == steps:
            break
    return {"batches": batches, "bounds": bounds, "start": start,
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "expected_batch_size": opt.expected_batch_size, "sample_rate": opt.sample_rate,
            "epsilon": engine.get_epsilon(1e-5) if sigma > 0 else None, "rank": dist.get_rank()}


def _refusal(fn: Any) -> str:
    try:
        fn()
    except (ValueError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return "not refused"


def _no_sync_outside_virtual_steps() -> None:
    import torch.distributed  # noqa: F401
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data.distributed import DistributedSampler

    from dpengine import PrivacyEngine

    model = _mlp()
    ddp = DistributedDataParallel(model)
    ds = _dataset()
    loader = DataLoader(ds, batch_size=LOCAL_BATCH, sampler=DistributedSampler(ds))
    ddp, opt, loader = PrivacyEngine(seed=SEED).make_private(
        module=ddp, optimizer=torch.optim.SGD(model.parameters(), lr=LR), data_loader=loader,
        noise_multiplier=0.0, max_grad_norm=C)
    x, y, _ = next(iter(loader))
    with ddp.no_sync():
        nn.functional.cross_entropy(ddp(x), y).backward()
    opt.step()


def _different_batch_size_per_rank(rank: int) -> None:
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data.distributed import DistributedSampler

    from dpengine import PrivacyEngine

    model = _mlp()
    ds = _dataset()
    loader = DataLoader(ds, batch_size=LOCAL_BATCH + rank, sampler=DistributedSampler(ds))
    PrivacyEngine(seed=SEED).make_private(module=DistributedDataParallel(model),
                                          optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                          data_loader=loader, noise_multiplier=1.0, max_grad_norm=C)


def _different_noise_per_rank(rank: int) -> str:
    """Rank 1 assigns another noise multiplier between steps: the step is refused on both ranks."""
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data.distributed import DistributedSampler

    from dpengine import PrivacyEngine

    model = _mlp()
    ds = _dataset()
    ddp, opt, loader = PrivacyEngine(seed=SEED).make_private(
        module=DistributedDataParallel(model), optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        data_loader=DataLoader(ds, batch_size=LOCAL_BATCH, sampler=DistributedSampler(ds)), noise_multiplier=1.0,
        max_grad_norm=C)
    batches = iter(loader)
    for step in range(2):
        x, y, _ = next(batches)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        if step == 1 and rank == 1:
            opt.noise_multiplier = 0.5
        try:
            opt.step()
        except RuntimeError as e:
            return f"step {step} refused: {e}; steps accounted {opt.accountant.total_steps}"
    return "not refused"


def _different_parameters(rank: int) -> None:
    from torch.utils.data.distributed import DistributedSampler

    from dpengine import PrivacyEngine

    torch.manual_seed(100 + rank)  # plain module (no DDP broadcast) initialized differently on each rank
    model = nn.Sequential(nn.Linear(5, 3)).double()
    ds = _dataset()
    loader = DataLoader(ds, batch_size=LOCAL_BATCH, sampler=DistributedSampler(ds))
    PrivacyEngine(seed=SEED).make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                          data_loader=loader, noise_multiplier=1.0, max_grad_norm=C)


def _ddp_without_distributed_sampler() -> None:
    from torch.nn.parallel import DistributedDataParallel

    from dpengine import PrivacyEngine

    model = _mlp()
    loader = DataLoader(_dataset(), batch_size=LOCAL_BATCH, shuffle=True)
    PrivacyEngine(seed=SEED).make_private(module=DistributedDataParallel(model),
                                          optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                          data_loader=loader, noise_multiplier=1.0, max_grad_norm=C)


def _fsdp() -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.utils.data.distributed import DistributedSampler

    from dpengine import PrivacyEngine

    model = _mlp()
    fully_shard(model)
    ds = _dataset()
    loader = DataLoader(ds, batch_size=LOCAL_BATCH, sampler=DistributedSampler(ds))
    PrivacyEngine(seed=SEED).make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                          data_loader=loader, noise_multiplier=1.0, max_grad_norm=C)


def _static_graph() -> None:
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data.distributed import DistributedSampler

    from dpengine import PrivacyEngine

    model = _mlp()
    ds = _dataset()
    loader = DataLoader(ds, batch_size=LOCAL_BATCH, sampler=DistributedSampler(ds))
    PrivacyEngine(seed=SEED).make_private(module=DistributedDataParallel(model, static_graph=True),
                                          optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                          data_loader=loader, noise_multiplier=1.0, max_grad_norm=C)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results: dict[str, Any] = {}
    for name, mode, clipping, options in ORACLE_CASES:
        results[name] = _train(mode=mode, clipping=clipping, options=options)
    import dpengine.distributed as dd

    dd._BUCKET_BYTES = 300  # several all-reduce buckets (and a tensor larger than one) in this scenario
    results["plain-module"] = _train(ddp=False)
    dd._BUCKET_BYTES = 25 * 2**20
    results["virtual-no_sync"] = _train(virtual=1, no_sync_in_virtual=True, steps=3)
    results["empty-batches"] = _train(batch=1, steps=4, dataset=TensorDataset(*_dataset()[:8]))
    results["find-unused"] = _train(ddp_kwargs={"find_unused_parameters": True}, steps=3)
    results["lipschitz"] = _train(clipping="lipschitz", mode="bk", model_fn=_lipschitz_mlp, loss="lipschitz")
    big = lambda: nn.Linear(100, 100).double()  # noqa: E731  10100 coordinates
    results["noise"] = _train(model_fn=big, sigma=1.3, steps=1, loss="zero",
                              dataset=TensorDataset(torch.randn(N, 100, dtype=torch.float64),
                                                    torch.zeros(N), torch.arange(N)))
    results["noise-secure"] = _train(model_fn=big, sigma=1.3, steps=1, loss="zero", secure=True,
                                     dataset=TensorDataset(torch.randn(N, 100, dtype=torch.float64),
                                                           torch.zeros(N), torch.arange(N)))
    results["refuse-no_sync"] = _refusal(_no_sync_outside_virtual_steps)
    results["refuse-batch-size"] = _refusal(lambda: _different_batch_size_per_rank(rank))
    results["refuse-parameters"] = _refusal(lambda: _different_parameters(rank))
    results["refuse-noise"] = _different_noise_per_rank(rank)
    results["refuse-ddp-without-sampler"] = _refusal(_ddp_without_distributed_sampler)
    results["refuse-fsdp"] = _refusal(_fsdp)
    results["refuse-static-graph"] = _refusal(_static_graph)
    dist.barrier()
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ launching


#: one thread per rank; gloo on the loopback interface (Linux names it "lo")
_LOOPBACK = {"OMP_NUM_THREADS": "1", **({"GLOO_SOCKET_IFNAME": "lo"} if sys.platform.startswith("linux") else {})}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    """Every rank's results (one process group for all scenarios: each process start costs seconds)."""
    with tempfile.TemporaryDirectory() as out:
        port = _free_port()
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, **_LOOPBACK, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
        procs = [subprocess.Popen([sys.executable, __file__, "worker", str(r), str(WORLD), str(port), out],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
                 for r in range(WORLD)]
        logs = []
        try:
            for p in procs:
                logs.append(p.communicate(timeout=TIMEOUT_S)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"distributed workers did not finish within {TIMEOUT_S} s (a hang in a collective?)")
        for r, p in enumerate(procs):
            assert p.returncode == 0, f"rank {r} failed:\n{logs[r][-6000:]}"
        return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


# ------------------------------------------------------------------------------------------ the oracle


def _per_sample_grads(model: nn.Module, loss_fn: Any, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    from oracle import oracle_per_sample

    if x.shape[0] == 0:
        return {n: torch.zeros((0, *p.shape), dtype=p.dtype) for n, p in model.named_parameters()}
    return oracle_per_sample(model, loss_fn, x, y)


def _oracle(case: str, options: dict, batches: list[list[int]], expected_batch: float) -> dict[str, Tensor]:
    """Single-process DP-SGD at sigma = 0 on the given (union) batches, float64, from the same start."""
    model = _mlp()
    x_all, y_all, _ = _dataset().tensors
    names = [n for n, _ in model.named_parameters()]
    c = C
    error = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for batch in batches:
        idx = torch.tensor(sorted(batch), dtype=torch.int64)
        ps = _per_sample_grads(model, nn.functional.cross_entropy, x_all[idx], y_all[idx])
        b = idx.numel()
        flat = torch.stack([ps[n].reshape(b, -1).pow(2).sum(1) for n in names]).sum(0).sqrt() if b else torch.zeros(0)
        if case == "per_layer":  # one group per parameter tensor, C / sqrt(K) each
            k = len(names)
            factors = {n: (C / math.sqrt(k) / (ps[n].reshape(b, -1).norm(dim=1) + 1e-6)).clamp(max=1.0) for n in names}
        elif case == "automatic":
            factors = {n: C / (flat + options["stability_constant"]) for n in names}
        else:
            factors = {n: (c / (flat + 1e-6)).clamp(max=1.0) for n in names}
        update = {n: torch.einsum("b,b...->...", factors[n], ps[n]) / expected_batch for n in names}
        if case == "error_feedback":
            mean = {n: ps[n].sum(0) / expected_batch for n in names}
            enorm = torch.sqrt(sum(e.pow(2).sum() for e in error.values()))
            kf = min(1.0, options["error_max_grad_norm"] / (float(enorm) + 1e-12))
            for n in names:
                release = update[n] + kf * error[n]
                error[n] = error[n] + mean[n] - release
                update[n] = release
        with torch.no_grad():
            for n, p in model.named_parameters():
                p -= LR * update[n]
        if case == "adaptive":
            unclipped = float((flat <= c).double().sum()) - 0.5 * b  # summed over the union batch
            frac = unclipped / expected_batch + 0.5
            c = c * math.exp(-options["clipbound_learning_rate"] * (frac - options["target_unclipped_quantile"]))
    return {n: p.detach() for n, p in model.named_parameters()}


def _max_err(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    return max(float((a[n] - b[n]).abs().max()) for n in b)


# ------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("name,mode,clipping,options", ORACLE_CASES, ids=[c[0] for c in ORACLE_CASES])
def test_sigma_zero_equals_single_process_oracle_on_the_union_batch(ranks, name, mode, clipping, options):
    r0, r1 = ranks[0][name], ranks[1][name]
    union = [sorted(a + b) for a, b in zip(r0["batches"], r1["batches"])]
    assert r0["expected_batch_size"] == r1["expected_batch_size"] == N / (N / WORLD / LOCAL_BATCH)
    # the accountant's q is the global one, E[B_global] / N (error feedback is accounted at q = 1)
    assert r0["sample_rate"] == r1["sample_rate"] == (1.0 if clipping == "error_feedback" else 0.25)
    for n in r0["params"]:
        assert torch.equal(r0["params"][n], r1["params"][n]), f"{name}: ranks differ in {n}"
    assert any(r0["start"][n].ne(r0["params"][n]).any() for n in r0["params"]), "nothing was trained"
    oracle = _oracle(clipping, options, union, r0["expected_batch_size"])
    assert _max_err(r0["params"], oracle) <= 1e-9, name
    if clipping == "adaptive":  # the bound of step 2 follows the count of the *union* batch
        assert r0["bounds"][1] != pytest.approx(C)


def test_union_batches_are_disjoint_and_a_single_process_sample_with_the_same_seed(ranks):
    from dpengine.data import PoissonBatchSampler

    r0, r1 = ranks[0]["bk-flat"], ranks[1]["bk-flat"]
    single = PoissonBatchSampler(N, 0.25, 4, torch.Generator().manual_seed(SEED + 1))
    for a, b, s in zip(r0["batches"], r1["batches"], single):
        assert set(a).isdisjoint(b)
        assert all(i % WORLD == 0 for i in a) and all(i % WORLD == 1 for i in b)
        assert sorted(a + b) == s


@pytest.mark.parametrize("name", ["plain-module", "find-unused"])
def test_plain_module_and_find_unused_parameters_are_data_parallel_too(ranks, name):
    r0, r1 = ranks[0][name], ranks[1][name]
    union = [sorted(a + b) for a, b in zip(r0["batches"], r1["batches"])]
    assert _max_err(r0["params"], _oracle("flat", {}, union, r0["expected_batch_size"])) <= 1e-9
    assert all(torch.equal(r0["params"][n], r1["params"][n]) for n in r0["params"])


def test_virtual_steps_with_no_sync_inside_match_the_oracle(ranks):
    # physical batches of 1: the ranks run different numbers of chunks per logical step
    r0, r1 = ranks[0]["virtual-no_sync"], ranks[1]["virtual-no_sync"]
    union = [sorted(a + b) for a, b in zip(r0["batches"], r1["batches"])]
    assert any(len(a) != len(b) for a, b in zip(r0["batches"], r1["batches"]))
    assert _max_err(r0["params"], _oracle("flat", {}, union, r0["expected_batch_size"])) <= 1e-9
    assert all(torch.equal(r0["params"][n], r1["params"][n]) for n in r0["params"])


def test_empty_per_rank_batches_are_steps(ranks):
    r0, r1 = ranks[0]["empty-batches"], ranks[1]["empty-batches"]
    assert len(r0["batches"]) == len(r1["batches"]) == 4
    assert any(len(b) == 0 for b in r0["batches"] + r1["batches"]), "pick a seed with an empty per-rank batch"
    union = [sorted(a + b) for a, b in zip(r0["batches"], r1["batches"])]
    assert r0["expected_batch_size"] == pytest.approx(8 / 4)
    assert _max_err(r0["params"], _oracle("flat", {}, union, r0["expected_batch_size"])) <= 1e-9
    assert all(torch.equal(r0["params"][n], r1["params"][n]) for n in r0["params"])


def test_lipschitz_equals_the_single_process_engine_on_the_same_batches(ranks):
    """Clipless (Lipschitz) path: the batch gradient is summed over the ranks once, the projection runs on
    identical parameters. Reference: the single-process engine with the same seed, whose Poisson batches
    are the ranks' unions (tested above)."""
    from torch.utils.data import DataLoader as DL

    from dpengine import PrivacyEngine
    from dpengine import lipschitz as lip

    r0, r1 = ranks[0]["lipschitz"], ranks[1]["lipschitz"]
    assert all(torch.equal(r0["params"][n], r1["params"][n]) for n in r0["params"])
    model = _lipschitz_mlp()
    loader = DL(_dataset(), batch_size=LOCAL_BATCH * WORLD)
    model, opt, loader = PrivacyEngine(seed=SEED).make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), data_loader=loader,
        noise_multiplier=0.0, clipping="lipschitz", loss_lipschitz=math.sqrt(2.0))
    loss_fn = lip.TemperatureCrossEntropy(1.0)
    batches = []
    for step, (x, y, idx) in enumerate(loader):
        if step == 2:
            break
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        batches.append(sorted(idx.tolist()))
    assert batches == [sorted(a + b) for a, b in zip(r0["batches"], r1["batches"])]
    ref = {n: p.detach() for n, p in model.named_parameters()}
    assert any(r0["start"][n].ne(r0["params"][n]).any() for n in r0["params"])
    assert _max_err(r0["params"], ref) <= 1e-9


@pytest.mark.parametrize("name", ["noise", "noise-secure"])
def test_noise_is_drawn_once_for_the_global_batch(ranks, name):
    """Zero gradients: the update is -lr * noise / E[B_global], noise ~ N(0, (sigma C)^2) per coordinate.

    Statistic: T = sum z^2 over n = 10100 coordinates, z = update / (lr sigma C / E[B]), chi-square with n
    degrees of freedom under the right std. Accept T/n in 1 +- 5.3 sqrt(2/n) (false-alarm ~1e-7); the
    band is +-7.5% of the variance, so noise drawn on each rank (variance x2), at sigma C / B_local
    (x4) or halved (x0.25) fails with power ~1."""
    r0, r1 = ranks[0][name], ranks[1][name]
    for n in r0["params"]:
        assert torch.equal(r0["params"][n], r1["params"][n]), f"{name}: ranks differ in {n}"
    update = torch.cat([(r0["params"][n] - r0["start"][n]).flatten() for n in r0["params"]])
    std = LR * 1.3 * C / r0["expected_batch_size"]
    n = update.numel()
    ratio = float((update / std).pow(2).sum()) / n
    band = 5.3 * math.sqrt(2 / n)
    assert abs(ratio - 1) < band, f"measured variance / expected = {ratio:.4f}"
    for wrong in (2.0, 0.5):  # the same test rejects a variance off by the factors a bug would give
        assert abs(ratio / wrong - 1) > band
    assert r0["epsilon"] == r1["epsilon"] and r0["epsilon"] > 0


def test_refusals(ranks):
    for r in range(WORLD):
        res = ranks[r]
        assert res["refuse-no_sync"].startswith("RuntimeError") and "no_sync" in res["refuse-no_sync"]
        assert "VirtualSteps" in res["refuse-no_sync"]
        assert res["refuse-batch-size"].startswith("ValueError") and "batch_size differs" in res["refuse-batch-size"]
        assert "parameters differ between ranks" in res["refuse-parameters"]
        assert "DistributedSampler" in res["refuse-ddp-without-sampler"]
        assert "FSDP" in res["refuse-fsdp"] and "DistributedDataParallel" in res["refuse-fsdp"]
        assert "static_graph" in res["refuse-static-graph"]
        assert res["refuse-noise"].startswith("step 1 refused") and "steps accounted 1" in res["refuse-noise"]
        assert "noise_multiplier (from 0.5 to 1) differ between ranks" in res["refuse-noise"]
    # both ranks refuse with the same message (no rank is left waiting in a collective)
    for key in ("refuse-no_sync", "refuse-batch-size", "refuse-parameters", "refuse-noise"):
        assert ranks[0][key] == ranks[1][key]


# ------------------------------------------------------------------------------------------ sampling, in-process


def _sharded(world: int, n: int, q: float, steps: int, *, secure: bool = False, seed: int | None = 5) -> list:
    from dpengine.data import ShardedPoissonBatchSampler

    return [list(ShardedPoissonBatchSampler(
        n, q, steps, None if (secure or seed is None) else torch.Generator().manual_seed(seed + (0 if seed else r)),
        rank=r, world_size=world, secure=secure)) for r in range(world)]


@pytest.mark.parametrize("secure", [False, True])
def test_distributed_poisson_inclusion_rate_and_disjointness(secure):
    """Over 3 ranks, n = 301 records (shards of 101, 100, 100), q = 0.05, 400 steps: every step's batches
    are disjoint and inside their shards; each record's inclusion count is Binomial(400, q). Per shard, the
    total count is Binomial(400 * |shard|, q) (mean ~2000, sd ~44): accept |z| < 4.5 (false-alarm 7e-6 per
    shard); a rank sampling at 1.15 q (z ~ +6.9) or 0.85 q is rejected with power > 0.99."""
    world, n, q, steps = 3, 301, 0.05, 400
    per_rank = _sharded(world, n, q, steps, secure=secure)
    counts = torch.zeros(n)
    for step in range(steps):
        seen: set[int] = set()
        for r in range(world):
            batch = per_rank[r][step]
            assert all(i % world == r and 0 <= i < n for i in batch)
            assert len(set(batch)) == len(batch) and seen.isdisjoint(batch)
            seen.update(batch)
            counts[batch] += 1
    for r in range(world):
        shard = counts[r::world]
        trials = steps * shard.numel()
        z = (float(shard.sum()) - trials * q) / math.sqrt(trials * q * (1 - q))
        assert abs(z) < 4.5, f"rank {r}: z = {z:.2f}"
        for wrong in (1.15, 0.85):
            z_wrong = (trials * q * wrong - trials * q) / math.sqrt(trials * q * (1 - q))
            assert abs(z_wrong) > 4.5 + 2.33  # a rank at that rate fails with probability > 0.99


def test_distributed_poisson_with_per_rank_seeds_still_decides_each_record_once():
    from dpengine.data import ShardedPoissonBatchSampler

    batches = [list(ShardedPoissonBatchSampler(10, 0.5, 50, torch.Generator().manual_seed(r), rank=r, world_size=2))
               for r in range(2)]
    for a, b in zip(*batches):
        assert set(a).isdisjoint(b) and all(i % 2 == 0 for i in a) and all(i % 2 == 1 for i in b)


def test_sharded_sampler_refuses_more_ranks_than_records():
    from dpengine.data import ShardedPoissonBatchSampler

    with pytest.raises(ValueError, match="cannot be sharded"):
        ShardedPoissonBatchSampler(2, 0.5, 3, rank=0, world_size=3)


def test_distributed_sampler_without_a_process_group_is_refused():
    from torch.utils.data.distributed import DistributedSampler

    from dpengine import PrivacyEngine

    model = _mlp()
    ds = _dataset()
    loader = DataLoader(ds, batch_size=3, sampler=DistributedSampler(ds, num_replicas=2, rank=0))
    with pytest.raises(ValueError, match="init_process_group"):
        PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                     data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0)


@pytest.mark.parametrize("sigma", [0.0, 1.3])
def test_one_rank_ddp_is_the_single_process_run(tmp_path, sigma):
    """torchrun --nproc_per_node 1: DDP + DistributedSampler in a process group of one rank takes exactly the
    single-process steps (same seed: same Poisson batches, same noise draw, same scale)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data.distributed import DistributedSampler

    from dpengine import PrivacyEngine

    def run(distributed: bool) -> dict[str, Tensor]:
        model = _mlp()
        ds = _dataset()
        module = DistributedDataParallel(model) if distributed else model
        loader = DataLoader(ds, batch_size=6, sampler=DistributedSampler(ds) if distributed else None)
        module, opt, loader = PrivacyEngine(seed=SEED).make_private(
            module=module, optimizer=torch.optim.SGD(model.parameters(), lr=LR), data_loader=loader,
            noise_multiplier=sigma, max_grad_norm=C)
        assert opt.expected_batch_size == 6 and opt.sample_rate == 0.25
        for step, (x, y, _) in enumerate(loader):
            if step == 2:
                break
            opt.zero_grad()
            nn.functional.cross_entropy(module(x), y).backward()
            opt.step()
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = run(True)
    finally:
        dist.destroy_process_group()
    single = run(False)
    assert _max_err(ddp, single) <= 1e-12
    assert any(single[n].ne(_mlp().state_dict()[n]).any() for n in single)


def test_set_epoch_is_accepted_and_a_detached_ddp_refuses_to_train(tmp_path):
    """A DistributedSampler loop calls ``loader.sampler.set_epoch(epoch)``: accepted, and it changes no batch
    (each is a fresh Poisson draw). After ``engine.detach()`` the DDP wrapper's reducer stays inert, so a
    training forward through it is refused (it would train each rank alone); evaluation still runs, and a
    new DistributedDataParallel around the module trains."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data.distributed import DistributedSampler

    from dpengine import PrivacyEngine

    def batches(set_epoch: bool) -> tuple[list[list[int]], Any, Any]:
        ds = _dataset()
        module = DistributedDataParallel(_mlp())
        engine = PrivacyEngine(seed=SEED)
        module, _, loader = engine.make_private(
            module=module, optimizer=torch.optim.SGD(module.parameters(), lr=LR),
            data_loader=DataLoader(ds, batch_size=6, sampler=DistributedSampler(ds)), noise_multiplier=1.0,
            max_grad_norm=C)
        seen = []
        for epoch in range(2):
            if set_epoch:
                loader.sampler.set_epoch(epoch)
            seen += [idx.tolist() for _, _, idx in loader]
        return seen, engine, module

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with_epochs, engine, ddp = batches(True)
        assert with_epochs == batches(False)[0] and len(with_epochs) == 8
        engine.detach()
        x = _dataset().tensors[0][:4]
        with pytest.raises(RuntimeError, match="no longer averages gradients.*new DistributedDataParallel"):
            ddp(x)
        with torch.no_grad():
            ddp(x)
        fresh = DistributedDataParallel(ddp.module)
        fresh(x).sum().backward()
        assert all(p.grad is not None for p in fresh.parameters())
    finally:
        dist.destroy_process_group()


def test_buckets_group_by_dtype_and_cap_size():
    from dpengine.distributed import _buckets

    ts = [torch.zeros(10), torch.zeros(30), torch.zeros(5, dtype=torch.float64), torch.zeros(3), torch.zeros(2)]
    got = [[id(t) for t in b] for b in _buckets(ts, cap=100)]  # float32: 40, 120, 12, 8 bytes
    assert got == [[id(ts[0])], [id(ts[1])], [id(ts[3]), id(ts[4])], [id(ts[2])]]


def test_data_parallel_is_refused():
    from dpengine import PrivacyEngine

    model = nn.DataParallel(_mlp())
    with pytest.raises(ValueError, match="DataParallel"):
        PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                     data_loader=DataLoader(_dataset(), batch_size=4), noise_multiplier=1.0,
                                     max_grad_norm=1.0)


@pytest.mark.slow
def test_torchrun_example(tmp_path):
    """examples/ddp_train.py under torchrun with 2 CPU processes (gloo) trains and reports epsilon."""
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(root / "examples" / "ddp_train.py"), "--epochs", "1"]
    env = {**os.environ, **_LOOPBACK}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["epsilon"] > 0 and summary["test_accuracy"] > 0.5


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    _worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
