"""Poisson sampling hardening: empty batches hold no record, restricted samplers, exact and secure inclusion
probabilities, and the batch sizes reported to the engine."""

from __future__ import annotations

import collections
import math
import os
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import (BatchSampler, DataLoader, IterableDataset, RandomSampler, SubsetRandomSampler,
                              TensorDataset, WeightedRandomSampler)

from dpengine import DPDataLoader, PrivacyEngine, VirtualSteps
from dpengine.data import PoissonBatchSampler

Pair = collections.namedtuple("Pair", "x tag")


def _gen(seed: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _leaves(batch):
    if isinstance(batch, dict):
        for v in batch.values():
            yield from _leaves(v)
    elif isinstance(batch, (list, tuple)):
        for v in batch:
            yield from _leaves(v)
    else:
        yield batch


def _assert_holds_no_record(batch) -> None:
    assert "rec" not in repr(batch)
    for leaf in _leaves(batch):  # no strings, numbers or objects: only empty tensors whose storage is empty too
        assert isinstance(leaf, torch.Tensor) and leaf.numel() == 0 and leaf.untyped_storage().nbytes() == 0


def _structure(batch):
    """Containers, keys, tensor dtypes and trailing shapes; a list of strings counts as a string field."""
    if isinstance(batch, torch.Tensor):
        return ("tensor", batch.dtype, tuple(batch.shape[1:]))
    if isinstance(batch, dict):
        return (type(batch), {k: _structure(v) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)) and all(isinstance(s, str) for s in batch):
        return (type(batch), "strings")
    return (type(batch), [_structure(v) for v in batch])


CASES = {
    "strings": ([f"rec{i}" for i in range(20)], len),
    "dict_rows": ([{"text": f"rec{i}", "label": i, "w": 0.5 * i, "ok": i % 2 == 0, "x": torch.full((3,), float(i))}
                   for i in range(20)], lambda b: len(b["text"])),
    "tuple_tensor_int_str": ([(torch.full((2, 2), float(i)), i, f"rec{i}") for i in range(20)],
                             lambda b: b[0].shape[0]),
    "namedtuple_numpy": ([Pair(np.full(4, i, dtype=np.int32), f"rec{i}") for i in range(20)],
                         lambda b: b.x.shape[0]),
    "tensors": (TensorDataset(torch.arange(20.0).reshape(20, 1) + 1, torch.arange(20)), lambda b: b[0].shape[0]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_empty_batches_hold_nothing_of_any_record(case):
    ds, size = CASES[case]
    dl = DPDataLoader.from_data_loader(DataLoader(ds, batch_size=1), generator=_gen(3))  # q = 1/20
    empty, full = [], []
    for _ in range(3):
        for batch in dl:
            (full if size(batch) else empty).append(batch)
    assert len(empty) > 5 and len(full) > 5
    for batch in empty:
        _assert_holds_no_record(batch)
        assert _structure(batch) == _structure(full[0])  # same layout as a real batch, just zero records


def test_empty_batch_is_a_fresh_copy():
    dl = DPDataLoader.from_data_loader(DataLoader([{"text": "rec0"}] * 4, batch_size=1))
    a = dl.collate_fn([])
    a["text"].append("rec-planted")
    assert dl.collate_fn([]) == {"text": []}


def test_custom_collate_builds_the_empty_batches():
    def collate(rows):
        return {"text": list(rows), "n": torch.tensor(len(rows))}

    ds = [f"rec{i}" for i in range(20)]
    dl = DPDataLoader.from_data_loader(DataLoader(ds, batch_size=1, collate_fn=collate), generator=_gen(1))
    empties = [b for _ in range(3) for b in dl if b["n"].item() == 0]
    assert len(empties) > 5
    for b in empties:
        assert b["text"] == [] and "rec" not in repr(b)


def test_collate_fn_that_rejects_an_empty_list_is_refused_up_front():
    def collate(rows):
        return torch.stack([r[0] for r in rows])  # raises on []

    loader = DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=2, collate_fn=collate)
    with pytest.raises(ValueError, match="collate_fn that accepts an empty list"):
        DPDataLoader.from_data_loader(loader)


class Row(dict):
    """A dict subclass with extra state: default_collate's copy.copy would carry ``raw`` into every batch."""

    def __init__(self, raw: str):
        super().__init__(x=torch.zeros(2))
        self.raw = raw


@pytest.mark.parametrize("record", [Row("rec0"), {"x": torch.zeros(2), "z": complex(1, 2)},
                                    (torch.zeros(2), object())])
def test_records_default_collate_cannot_empty_safely_are_refused(record):
    with pytest.raises(ValueError, match="collate_fn that accepts an empty list"):
        DPDataLoader.from_data_loader(DataLoader([record] * 4, batch_size=2))


def _drawn(dl, epochs):
    return [int(i) for _ in range(epochs) for (x,) in dl for i in x]


@pytest.mark.parametrize("as_batch_sampler", [False, True])
def test_subset_sampler_is_poisson_sampled_within_its_indices(as_batch_sampler):
    ds = TensorDataset(torch.arange(30))
    subset = [3, 5, 7, 11, 13, 17, 19, 23, 29, 0][:9]  # 9 indices, record 0 excluded
    sampler = SubsetRandomSampler(subset)
    loader = (DataLoader(ds, batch_sampler=BatchSampler(sampler, 2, drop_last=False)) if as_batch_sampler
              else DataLoader(ds, batch_size=2, sampler=sampler))
    dl = DPDataLoader.from_data_loader(loader, generator=_gen(2))
    assert len(dl) == len(loader) == 5
    assert dl.sample_rate == 1 / 5 and dl.expected_batch_size == 9 / 5
    drawn = _drawn(dl, 30)
    assert set(drawn) == set(subset)  # every index of the set appears, nothing outside it ever does
    assert 0 not in drawn and abs(len(drawn) / 150 - 9 / 5) < 0.5


def test_whole_dataset_samplers_keep_q_one_over_len():
    ds = TensorDataset(torch.arange(30))
    for loader in (DataLoader(ds, batch_size=4, shuffle=True), DataLoader(ds, batch_size=4)):
        dl = DPDataLoader.from_data_loader(loader, generator=_gen())
        assert dl.sample_rate == 1 / 8 and dl.expected_batch_size == 30 / 8
        assert set(_drawn(dl, 10)) == set(range(30))


class Stream(IterableDataset):
    def __iter__(self):
        return iter(torch.arange(10))


class SizedStream(Stream):
    def __len__(self):
        return 10


BAD_LOADERS = {
    "weighted_sampler": (lambda ds: DataLoader(ds, batch_size=2, sampler=WeightedRandomSampler([1.0] * 10, 10)),
                         "Subset"),
    "short_random_sampler": (lambda ds: DataLoader(ds, batch_size=2, sampler=RandomSampler(ds, num_samples=4)),
                             "Subset"),
    "custom_batch_sampler": (lambda ds: DataLoader(ds, batch_sampler=[[0, 1], [2, 3]]), "Subset"),
    "batch_sampler_over_weighted": (lambda ds: DataLoader(
        ds, batch_sampler=BatchSampler(WeightedRandomSampler([1.0] * 10, 10), 2, False)), "Subset"),
    "repeated_indices": (lambda ds: DataLoader(ds, batch_size=2, sampler=SubsetRandomSampler([1, 1, 2])),
                         "distinct"),
    "indices_out_of_range": (lambda ds: DataLoader(ds, batch_size=2, sampler=SubsetRandomSampler([1, 10])),
                             "distinct"),
    "no_batching": (lambda ds: DataLoader(ds, batch_size=None), "batch_size"),
    "iterable_dataset": (lambda ds: DataLoader(Stream(), batch_size=2), "map-style"),
    "sized_iterable_dataset": (lambda ds: DataLoader(SizedStream(), batch_size=2), "map-style"),
}


@pytest.mark.parametrize("case", sorted(BAD_LOADERS))
def test_loaders_poisson_sampling_cannot_stand_in_for_are_refused(case):
    make, match = BAD_LOADERS[case]
    with pytest.raises(ValueError, match=match):
        DPDataLoader.from_data_loader(make(TensorDataset(torch.arange(10))))


def test_make_private_refuses_a_weighted_sampler():
    model = nn.Linear(1, 1)
    loader = DataLoader(TensorDataset(torch.randn(10, 1)), batch_size=2,
                        sampler=WeightedRandomSampler([1.0] * 10, 10))
    with pytest.raises(ValueError, match="Subset"):
        PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                     data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0)


def test_inclusion_uses_float64_uniforms_and_never_exceeds_q(monkeypatch):
    # float32 uniforms are multiples of 2**-24: at q = 1e-7 they include with probability ceil(q*2**24)/2**24.
    q = 1e-7
    assert math.ceil(q * 2**24) / 2**24 / q > 1.19
    k = math.floor(Fraction(q) * 2**53)  # float64 uniforms are j / 2**53; those below the cutoff: j < k
    seen = []

    def fake_rand(n, *, dtype=torch.float32, generator=None):
        seen.append(dtype)
        return torch.tensor([(k - 1) / 2**53, k / 2**53, q], dtype=torch.float64).to(dtype)

    monkeypatch.setattr(torch, "rand", fake_rand)
    (batch,) = PoissonBatchSampler(3, q, 1, _gen())
    assert seen == [torch.float64]
    assert batch == [0]  # so P(include) = k / 2**53, in (q - 2**-53, q]
    assert Fraction(q) - Fraction(1, 2**53) < Fraction(k, 2**53) <= Fraction(q)


def test_seeded_sampler_consumes_float64_draws():
    ref = _gen(7)
    expected = [(torch.rand(1000, dtype=torch.float64, generator=ref) < 0.3).nonzero().flatten().tolist()
                for _ in range(3)]
    assert list(PoissonBatchSampler(1000, 0.3, 3, _gen(7))) == expected


def test_secure_threshold_is_floor_q_times_2_pow_64(monkeypatch):
    q = 0.1
    t = math.floor(Fraction(q) * 2**64)
    draws = np.array([t - 1, t, 2**64 - 1, 0], dtype=np.uint64)
    monkeypatch.setattr(os, "urandom", lambda k: draws.tobytes()[:k])
    (batch,) = PoissonBatchSampler(4, q, 1, secure=True)
    assert batch == [0, 3]  # P(include) = t / 2**64, in (q - 2**-64, q]
    assert Fraction(q) - Fraction(1, 2**64) < Fraction(t, 2**64) <= Fraction(q)
    assert list(PoissonBatchSampler(4, 1.0, 1, secure=True)) == [[0, 1, 2, 3]]
    assert list(PoissonBatchSampler(4, 0.0, 1, secure=True)) == [[]]


def test_secure_sampling_uses_no_torch_generator(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("secure mode must not use torch's Mersenne Twister")

    monkeypatch.setattr(torch, "rand", refuse)
    monkeypatch.setattr(torch, "Generator", refuse)
    sampler = PoissonBatchSampler(20000, 0.05, 20, secure=True)
    assert sampler.generator is None  # no state to persist or leak
    sizes = []
    for batch in sampler:
        assert batch == sorted(set(batch)) and 0 <= batch[0] and batch[-1] < 20000
        sizes.append(len(batch))
    assert len(set(sizes)) > 5
    assert abs(sum(sizes) / 20 - 1000) < 50  # mean 1000, standard error ~7


def test_secure_and_a_generator_are_exclusive():
    with pytest.raises(ValueError, match="generator=None"):
        PoissonBatchSampler(10, 0.1, 1, _gen(), secure=True)
    with pytest.raises(ValueError, match="generator=None"):
        DPDataLoader.from_data_loader(DataLoader(TensorDataset(torch.arange(10)), batch_size=2), _gen(), secure=True)
    dl = DPDataLoader.from_data_loader(DataLoader(TensorDataset(torch.arange(10)), batch_size=2), secure=True)
    assert dl.batch_sampler.secure and dl.batch_sampler.generator is None


@pytest.mark.parametrize("num_workers", [0, 2])
def test_on_batch_reports_each_batch_size_before_it_is_yielded(num_workers):
    loader = DataLoader(TensorDataset(torch.arange(10)), batch_size=1, num_workers=num_workers)
    dl = DPDataLoader.from_data_loader(loader, generator=_gen(4))  # q = 0.1: many empty batches
    reported: list[int] = []
    dl.on_batch = reported.append
    for _ in range(3):
        for (x,) in dl:
            assert len(reported) > 0 and reported[-1] == len(x)
    assert len(reported) == 30 and 0 in reported and max(reported) > 1


def test_on_batch_stays_aligned_after_an_abandoned_epoch_with_persistent_workers():
    loader = DataLoader(TensorDataset(torch.arange(10)), batch_size=1, num_workers=2, persistent_workers=True)
    dl = DPDataLoader.from_data_loader(loader, generator=_gen(5))
    reported: list[int] = []
    dl.on_batch = reported.append
    for i, _ in enumerate(dl):
        if i == 2:
            break
    del reported[:]
    lengths = [len(x) for (x,) in dl]
    assert reported == lengths and len(lengths) == 10


def test_on_batch_none_leaves_the_loader_unchanged():
    dl = DPDataLoader.from_data_loader(DataLoader(TensorDataset(torch.arange(10)), batch_size=2))
    assert DPDataLoader.on_batch is None and dl.on_batch is None
    assert len(list(dl)) == 5


class FakeOptimizer:
    def __init__(self):
        self.chunks: list[tuple[bool, bool, int]] = []
        self.ended = 0

    def signal_chunk(self, first: bool, last: bool, size: int, private: bool = True) -> None:
        self.chunks.append((first, last, size))

    def end_virtual_steps(self, logical_batches: int = 0) -> None:
        self.ended += 1


def test_virtual_steps_signal_the_size_of_each_chunk():
    ds = TensorDataset(torch.arange(6))
    dl = DPDataLoader.from_data_loader(DataLoader(ds, batch_size=1), generator=_gen(6))  # q = 1/6
    logical = list(PoissonBatchSampler(6, 1 / 6, 6, _gen(6)))  # the same draws, replayed
    opt = FakeOptimizer()
    got = []
    for (x,) in VirtualSteps(dl, max_physical_batch_size=1, optimizer=opt):
        first, last, size = opt.chunks[-1]
        assert size == len(x)
        if first:
            got.append([])
        got[-1].extend(x.tolist())
    assert opt.ended == 1
    assert got == logical and [] in logical and max(map(len, logical)) > 1
    sizes = [s for _, _, s in opt.chunks]
    assert 0 in sizes and set(sizes) <= {0, 1}


def _private_mlp(n: int = 40, batch: int = 10, shuffle: bool = False, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    original = DataLoader(TensorDataset(torch.randn(n, 6), torch.randint(0, 3, (n,))), batch_size=batch,
                          shuffle=shuffle)
    engine = PrivacyEngine(seed=0)
    model, opt, dl = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                         data_loader=original, noise_multiplier=0.0, max_grad_norm=1.0, **kw)
    return engine, model, opt, dl, original


def test_virtual_steps_refuse_chunks_of_two_logical_batches_in_one_step():
    """Gradient accumulation across logical batches (step every 2nd chunk, each chunk a logical batch): one
    record at q = 1 is in both, so it would contribute 2C to one accounted step."""
    engine, model, opt, dl, _ = _private_mlp(n=1, batch=1, loss_reduction="sum")  # q = 1
    before = [p.detach().clone() for p in model.parameters()]
    chunks = 0
    with pytest.raises(RuntimeError, match=r"chunks of 2 logical batches(.|\n)*2 \* max_grad_norm(.|\n)*"
                                           r"step\(\) at the end of each logical batch"):
        for _ in range(2):
            for x, y in VirtualSteps(dl, max_physical_batch_size=1, optimizer=opt):
                torch.nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
                chunks += 1
                if chunks % 2 == 0:
                    opt.step()
                    opt.zero_grad()
    assert chunks == 2 and engine.accountant.total_steps == 0
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_virtual_steps_over_several_chunks_of_one_logical_batch_still_step():
    engine, model, opt, dl, _ = _private_mlp(n=40, batch=20)  # expected 20 records: several chunks of 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the private loader: no warning either
        for x, y in VirtualSteps(dl, max_physical_batch_size=3, optimizer=opt):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    assert engine.accountant.total_steps == len(dl) == 2


def test_virtual_steps_over_another_loader_warn_like_the_plain_loop():
    """VirtualSteps around the original loader (shuffled, fixed-size batches) instead of the private one: the
    batches are not Poisson samples; the same warning as a plain loop over it."""
    for wrap in (True, False):
        engine, model, opt, _, original = _private_mlp(shuffle=True)
        batches = VirtualSteps(original, max_physical_batch_size=5, optimizer=opt) if wrap else original
        with pytest.warns(UserWarning, match="did not come from the data loader returned by make_private"):
            for x, y in batches:
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()


def test_the_private_loaders_sample_rate_cannot_be_assigned():
    # the sampler derives its inclusion cutoffs from q once: an assigned q would change nothing it samples
    model = nn.Linear(3, 1)
    _, _, dl = PrivacyEngine(seed=0).make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(torch.randn(20, 3)), batch_size=5), noise_multiplier=1.0,
        max_grad_norm=1.0)
    assert dl.sample_rate == dl.batch_sampler.sample_rate == 0.25
    for holder in (dl, dl.batch_sampler):
        with pytest.raises(AttributeError, match="sample rate is fixed"):
            holder.sample_rate = 0.5
    assert dl.sample_rate == dl.batch_sampler.sample_rate == 0.25


def test_leaving_virtual_steps_inside_a_logical_batch_then_a_new_loop_steps():
    """A VirtualSteps loop stopped after N physical chunks (inside a logical batch): nothing of that batch is
    released, and once zero_grad drops its sums the next loop's first step is taken as usual."""
    model = nn.Linear(3, 1)
    engine = PrivacyEngine(seed=0)
    model, opt, dl = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(torch.randn(40, 3)), batch_size=8), noise_multiplier=1.0,
        max_grad_norm=1.0)
    for loop in range(3):
        for i, (x,) in enumerate(VirtualSteps(dl, max_physical_batch_size=2, optimizer=opt)):
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
            if i == 6:  # most logical batches have several chunks: this leaves one inside it, usually
                break
    assert engine.accountant.total_steps >= 3
