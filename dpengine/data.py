"""Poisson sampling and virtual steps.

Privacy note: the RDP accountant analyses the Poisson-subsampled Gaussian mechanism: each example
enters each batch independently with probability q. Shuffled fixed-size batches do not match that
analysis; ``make_private(poisson_sampling=False)`` keeps them but warns.
"""

from __future__ import annotations

import collections
import copy
import math
import os
import secrets
import weakref
from fractions import Fraction
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import (BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler, Sampler,
                              SequentialSampler)
from torch.utils.data.dataloader import default_collate

from ._validate import in_range, positive


def _fixed_sample_rate() -> property:
    """q, the rate every record is included at in each batch, read-only: the sampler derives its inclusion
    cutoffs from it once, and the accountant records it at every step."""

    def refuse(self: object, value: float) -> None:
        raise AttributeError(
            "The private loader's sample rate is fixed: its inclusion cutoffs are derived from it once, and the "
            "accountant records it at every step (assigning it would change neither). To train at another q, "
            "engine.detach(), then make_private again with optimizer.original_optimizer and a loader of batch "
            "size q * len(dataset): the engine keeps its accountant.")

    return property(lambda self: self._sample_rate, refuse, doc=_fixed_sample_rate.__doc__)


class PoissonBatchSampler(Sampler[list[int]]):
    """Yields ``steps`` batches; each index is included independently with probability ``sample_rate``.

    Batch sizes vary (binomial, mean ``sample_rate * num_samples``) and can be zero. ``indices`` (default
    ``range(num_samples)``, else exactly ``num_samples`` dataset indices) is the set sampled from.

    Where the randomness comes from, and how exact the inclusion probability q is:

    * default: float64 uniforms from a ``torch.Generator`` (Mersenne Twister; seeded from ``secrets``
      unless ``generator`` is given, which makes runs reproducible). Those uniforms are multiples of
      2**-53, so q is rounded *down* to a multiple of 2**-53: P(include) is in (q - 2**-53, q], never above
      the q the accountant uses. (float32 uniforms rounded q *up* to a multiple of 2**-24: +19% at 1e-7.)
    * ``secure=True``: no torch.Generator at all (its state, or 624 of its outputs, predict every batch).
      Each decision compares 64 bits from the OS CSPRNG (``os.urandom``) with ``floor(q * 2**64)``,
      computed exactly with integers: P(include) is in (q - 2**-64, q]. Not reproducible, and there is
      no sampler state to checkpoint.
    """

    def __init__(self, num_samples: int, sample_rate: float, steps: int, generator: torch.Generator | None = None,
                 *, secure: bool = False, indices: Sequence[int] | None = None):
        positive(num_samples=num_samples)
        in_range(0.0, 1.0, sample_rate=sample_rate)
        positive(steps=steps)
        if secure and generator is not None:
            raise ValueError("secure=True draws from the OS CSPRNG and uses no torch.Generator; pass generator=None, "
                             "or secure=False for reproducible sampling.")
        if indices is not None and len(indices) != num_samples:
            raise ValueError(f"Expected len(indices)={len(indices)} to equal num_samples={num_samples}.")
        self.num_samples, self.steps, self.secure = num_samples, steps, secure
        self._sample_rate = float(sample_rate)
        self.indices = None if indices is None else torch.as_tensor(list(indices), dtype=torch.int64)
        self._cutoff = math.floor(sample_rate * 2**53) / 2**53  # exact in float64: a multiple of 2**-53, <= q
        self._threshold = math.floor(Fraction(sample_rate) * 2**64)  # P(uniform uint64 < threshold) <= q
        if generator is None and not secure:
            generator = torch.Generator()
            generator.manual_seed(secrets.randbits(63))
        self.generator = generator
        #: the generator's state before the batch drawn last (None: nothing drawn yet, or secure)
        self.state_before_draw: torch.Tensor | None = None
        self._size_sink: collections.deque[int] | None = None  # set by DPDataLoader.__iter__

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        """Accepted and ignored, so a data-parallel loop written for ``DistributedSampler`` runs unchanged:
        every batch is a fresh draw from the sampler's randomness, so no epoch needs to reseed it (and every
        rank advances its generator by the same draws, whatever the epoch)."""

    def generator_state(self, rewind: bool) -> torch.Tensor | None:
        """The generator state a resumed run continues from (None in secure mode: there is none). ``rewind``:
        the batch drawn last was never stepped, so the state from before it (the resumed run draws that batch
        again; nothing of it was released). With ``num_workers > 0`` the loader draws batches ahead; those
        are skipped on resume, never repeated."""
        if self.generator is None:
            return None
        if rewind and self.state_before_draw is not None:
            return self.state_before_draw.clone()
        return self.generator.get_state()

    def set_generator_state(self, state: torch.Tensor) -> None:
        """Continue the stream of ``generator_state``."""
        if self.generator is None:
            raise ValueError("a secure sampler has no generator state to restore")
        self.generator.set_state(state)
        self.state_before_draw = None

    sample_rate = _fixed_sample_rate()

    def _mask(self) -> torch.Tensor:
        """One inclusion decision per candidate index (see the class docstring for the probability)."""
        n = self.num_samples
        if not self.secure:
            return torch.rand(n, dtype=torch.float64, generator=self.generator) < self._cutoff
        if self._threshold >= 2**64:  # q == 1
            return torch.ones(n, dtype=torch.bool)
        draws = np.frombuffer(os.urandom(8 * n), dtype=np.uint64)
        return torch.from_numpy(draws < np.uint64(self._threshold))

    def __iter__(self) -> Iterator[list[int]]:
        # Bind the sink now: the DataLoader calls iter() while DPDataLoader.__iter__ has it set.
        return self._batches(self._size_sink)

    def _batches(self, sink: collections.deque[int] | None) -> Iterator[list[int]]:
        for _ in range(self.steps):
            if self.generator is not None:  # a checkpoint taken before this batch is stepped resumes here
                self.state_before_draw = self.generator.get_state()
            mask = self._mask()
            batch = (mask.nonzero().flatten() if self.indices is None else self.indices[mask]).tolist()
            if sink is not None:
                sink.append(len(batch))
            yield batch


class ShardedPoissonBatchSampler(PoissonBatchSampler):
    """Poisson sampling of one rank's shard for data-parallel training: over all ranks, each record of the
    dataset is included in each step with probability ``sample_rate``, independently, by exactly one rank.

    Rank ``rank`` of ``world_size`` owns the records ``rank, rank + world_size, ...`` (disjoint shards that
    cover the dataset, no padding: DistributedSampler's padding would repeat records). Its batches hold the
    included records of its shard only, and may be empty. Every rank yields ``steps`` batches.

    Randomness: with a ``torch.Generator`` (not secure), each rank draws the float64 uniforms of *all*
    ``num_samples`` records and keeps its shard's: with the same seed on every rank the union of the ranks'
    batches is exactly the batch a single-process ``PoissonBatchSampler`` with that seed yields, and with
    different seeds each record is still decided once, by its owner. ``secure=True`` draws only the shard's
    decisions, from the OS CSPRNG of each rank (see ``PoissonBatchSampler`` for the exactness of q).
    """

    def __init__(self, num_samples: int, sample_rate: float, steps: int, generator: torch.Generator | None = None,
                 *, rank: int, world_size: int, secure: bool = False):
        positive(world_size=world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"Expected rank={rank!r} in [0, {world_size}).")
        if num_samples < world_size:
            raise ValueError(f"{num_samples} records cannot be sharded over {world_size} ranks (every rank needs at "
                             "least one record of its own).")
        super().__init__(len(range(rank, num_samples, world_size)), sample_rate, steps, generator, secure=secure,
                         indices=range(rank, num_samples, world_size))
        self.total_samples, self.rank, self.world_size = num_samples, rank, world_size

    def _mask(self) -> torch.Tensor:
        if self.secure:
            return super()._mask()  # this shard's decisions only, from the OS CSPRNG
        uniforms = torch.rand(self.total_samples, dtype=torch.float64, generator=self.generator)
        return uniforms[self.rank::self.world_size] < self._cutoff


class _EpochSequentialSampler(SequentialSampler):
    """The ``sampler`` attribute of a DPDataLoader: a SequentialSampler over the dataset, as DataLoader
    makes, whose ``set_epoch`` goes to the Poisson batch sampler (which ignores it, see there)."""

    def __init__(self, dataset: Any, batch_sampler: PoissonBatchSampler):
        super().__init__(dataset)
        self.batch_sampler = batch_sampler

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)


def _needs_collate_fn(why: str) -> ValueError:
    return ValueError(f"Poisson sampling yields empty batches, and {why}. Give the DataLoader a collate_fn that "
                      "accepts an empty list and returns an empty batch.")


def _empty_collated(elem: Any, strings: type = list) -> Any:
    """What ``default_collate`` gives for zero records shaped like ``elem``, built from its structure alone:
    fresh zero-length tensors (not slices, whose storage would still hold the record) and empty sequences.

    ``default_collate`` returns a string field as the sequence it was given: a list at the top level and
    in a dict, a tuple inside a tuple or list; ``strings`` is that type."""
    if isinstance(elem, torch.Tensor) and elem.layout == torch.strided:
        return torch.empty((0, *elem.shape), dtype=elem.dtype, device=elem.device)
    if isinstance(elem, (np.ndarray, np.bool_, np.number)) and elem.dtype.kind in "biufc":
        return torch.empty((0, *elem.shape), dtype=torch.from_numpy(np.empty(0, dtype=elem.dtype)).dtype)
    if isinstance(elem, bool):
        return torch.empty(0, dtype=torch.bool)
    if isinstance(elem, int):
        return torch.empty(0, dtype=torch.int64)
    if isinstance(elem, float):
        return torch.empty(0, dtype=torch.float64)
    if isinstance(elem, (str, bytes)):
        return strings()
    if type(elem) in (dict, collections.OrderedDict):
        return type(elem)((k, _empty_collated(v)) for k, v in elem.items())
    if isinstance(elem, tuple) and hasattr(elem, "_fields"):  # namedtuple
        return type(elem)(*(_empty_collated(v, tuple) for v in elem))
    if type(elem) in (tuple, list):
        return [_empty_collated(v, tuple) for v in elem]  # default_collate turns tuples into lists too
    raise _needs_collate_fn(f"default_collate cannot safely build an empty batch of {type(elem).__name__}")


def _holds_no_record(batch: Any) -> bool:
    """True when ``batch`` is containers of empty tensors (with empty storage) and empty sequences only."""
    if isinstance(batch, torch.Tensor):
        return batch.numel() == 0 and batch.untyped_storage().nbytes() == 0
    if isinstance(batch, dict):
        return all(_holds_no_record(v) for v in batch.values())
    if isinstance(batch, (list, tuple)):
        return all(_holds_no_record(v) for v in batch)
    return False


def _same_layout(empty: Any, one: Any) -> bool:
    """Whether an empty batch has the containers, dtypes and trailing shapes of a one-record batch."""
    if isinstance(one, torch.Tensor):
        return isinstance(empty, torch.Tensor) and empty.dtype == one.dtype and empty.shape[1:] == one.shape[1:]
    if type(empty) is not type(one):
        return False
    if isinstance(one, dict):
        return empty.keys() == one.keys() and all(_same_layout(empty[k], one[k]) for k in one)
    if isinstance(one, (list, tuple)):
        if len(empty) == 0 and all(isinstance(s, (str, bytes)) for s in one):
            return True  # a string field: [] versus [s]
        return len(empty) == len(one) and all(map(_same_layout, empty, one))
    return False


class _DefaultCollateWithEmpty:
    """``default_collate``, which raises on an empty list, plus a fresh copy of ``template`` for an empty batch.

    A class rather than a closure so that worker processes started with spawn can pickle it.
    """

    def __init__(self, template: Any):
        self.template = template

    def __call__(self, batch: list[Any]) -> Any:
        if len(batch) == 0:
            return copy.deepcopy(self.template)  # a copy: filling one empty batch in place cannot reach the next
        return default_collate(batch)


def _empty_safe_collate(dataset: Dataset, index: int,
                        collate_fn: Callable[[list[Any]], Any]) -> Callable[[list[Any]], Any]:
    """The private loader's collate function; raises ValueError now rather than at the first empty batch.

    A user's ``collate_fn`` sees every batch, empty ones included, so it must accept ``[]``. For torch's
    ``default_collate`` the empty batch is built from the structure of record ``index``, with every leaf
    emptied, and checked to hold nothing of that record.
    """
    if collate_fn is not default_collate:
        try:
            collate_fn([])
        except Exception as e:
            raise _needs_collate_fn(f"collate_fn([]) raised {type(e).__name__}: {e}") from e
        return collate_fn
    record = dataset[index]
    template = _empty_collated(record)
    try:
        one = default_collate([record])
    except Exception as e:
        raise _needs_collate_fn(f"default_collate cannot collate a record ({type(e).__name__}: {e})") from e
    if not (_holds_no_record(template) and _same_layout(template, one)):
        raise _needs_collate_fn(f"an empty batch of {type(record).__name__} cannot be built to match default_collate")
    return _DefaultCollateWithEmpty(template)


_LOADER_FIX = ("Use a plain DataLoader(dataset, batch_size=..., shuffle=...) over the records to train on; for part "
               "of a dataset, use torch.utils.data.Subset(dataset, indices) or sampler=SubsetRandomSampler(indices).")


def _poisson_domain(data_loader: DataLoader) -> list[int] | None:
    """The dataset indices the loader draws from: None for the whole dataset, else the sorted index set of a
    sampler with ``indices`` (SubsetRandomSampler). Raises ValueError for a loader whose sampling Poisson
    sampling over those indices would not stand in for (it would sample records the loader never yields)."""
    dataset = data_loader.dataset
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        raise ValueError(f"Poisson sampling needs a map-style dataset (with __len__ and __getitem__) to include each "
                         f"record independently; got {type(dataset).__name__}. Load the records into a map-style "
                         "Dataset (e.g. TensorDataset).")
    batch_sampler = data_loader.batch_sampler
    if batch_sampler is None:
        raise ValueError("Poisson sampling needs a loader with a fixed batch_size (the sample rate is "
                         "1 / len(loader)); got batch_size=None. Pass batch_size=... to the DataLoader.")
    if type(batch_sampler) is not BatchSampler:
        raise ValueError(f"Poisson sampling cannot stand in for the batch_sampler {type(batch_sampler).__name__}. "
                         + _LOADER_FIX)
    sampler, n = batch_sampler.sampler, len(dataset)
    if type(sampler) in (RandomSampler, SequentialSampler) and len(sampler) == n:  # type: ignore[arg-type]
        return None
    indices = getattr(sampler, "indices", None)
    if indices is None:
        raise ValueError(f"Poisson sampling cannot stand in for the sampler {type(sampler).__name__} (it draws "
                         f"{len(sampler)} of {n} records). " + _LOADER_FIX)  # type: ignore[arg-type]
    ids = [int(i) for i in indices]
    if not ids or len(set(ids)) != len(ids) or min(ids) < 0 or max(ids) >= n:
        raise ValueError(f"The sampler's indices must be distinct indices in [0, {n}): a repeated index would enter "
                         "a batch twice. " + _LOADER_FIX)
    return sorted(ids)


def _distributed_domain(data_loader: DataLoader) -> None:
    """Raises ValueError unless ``data_loader`` is a map-style loader whose batches come from a plain
    BatchSampler over a DistributedSampler (which per-rank Poisson sampling of the whole dataset replaces)."""
    from torch.utils.data.distributed import DistributedSampler

    dataset = data_loader.dataset
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        raise ValueError(f"Poisson sampling needs a map-style dataset (with __len__ and __getitem__); got "
                         f"{type(dataset).__name__}.")
    batch_sampler = data_loader.batch_sampler
    if type(batch_sampler) is not BatchSampler or not isinstance(batch_sampler.sampler, DistributedSampler):
        raise ValueError("Data-parallel Poisson sampling replaces a DataLoader(dataset, batch_size=..., "
                         "sampler=DistributedSampler(dataset)); got another sampler or batch_sampler.")


class _ReportedBatchSampler(Sampler[list[int]]):
    """The batch sampler of a loader kept as given (``poisson_sampling=False``), reporting each batch's size
    like ``PoissonBatchSampler`` does, so the engine checks every layer's batch against it all the same."""

    _size_sink: collections.deque[int] | None = None

    def __init__(self, inner: Any):
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[list[int]]:
        return self._batches(self._size_sink)  # bound now, as PoissonBatchSampler.__iter__

    def _batches(self, sink: collections.deque[int] | None) -> Iterator[list[int]]:
        for batch in self.inner:
            if sink is not None:
                sink.append(len(batch))
            yield batch


def _loading(data_loader: DataLoader) -> dict[str, Any]:
    """How ``data_loader`` loads (workers, pinning, timeout): kept by the loaders made from it."""
    return {"num_workers": data_loader.num_workers, "pin_memory": data_loader.pin_memory,
            "timeout": data_loader.timeout, "worker_init_fn": data_loader.worker_init_fn,
            "multiprocessing_context": data_loader.multiprocessing_context,
            "persistent_workers": data_loader.persistent_workers if data_loader.num_workers > 0 else False}


class WeakCallback:
    """A bound method held weakly: a loader must not keep its engine's controller (and the records it holds)
    alive. Calls the method while its object lives, else does nothing; ``__self__`` is that object (or None)."""

    def __init__(self, method: Callable[..., None]) -> None:
        self._ref = weakref.WeakMethod(method)  # type: ignore[arg-type]

    def __call__(self, *args: Any) -> None:
        method = self._ref()
        if method is not None:
            method(*args)

    @property
    def __self__(self) -> Any:  # noqa: PLE0302  (what VirtualSteps asks a callback for)
        method = self._ref()
        return None if method is None else method.__self__


class DPDataLoader(DataLoader):
    """A DataLoader over the same dataset with Poisson sampling; one epoch = ``len(original)`` steps."""

    _sample_rate: float
    sample_rate = _fixed_sample_rate()

    expected_batch_size: float
    on_batch: Callable[[int], None] | None = None
    """Called with the number of records in each batch just before it is yielded (0 for an empty batch);
    the engine checks it against the batch dimension every layer sees, and counts the batches per step."""
    on_leave: Callable[[int], None] | None = None
    """Called when an iteration is left before its end (``break``, or the iterator dropped), with the number
    of batches it yielded (``BatchLedger.left_loop``)."""

    @classmethod
    def from_data_loader(cls, data_loader: DataLoader, generator: torch.Generator | None = None,
                         secure: bool = False, shard: tuple[int, int] | None = None) -> "DPDataLoader":
        """Replace ``data_loader``'s sampling with Poisson sampling at q = 1 / len(data_loader).

        A loader with a SubsetRandomSampler (or any sampler with ``indices``) is Poisson-sampled within those
        indices; a RandomSampler or SequentialSampler over the whole dataset, over all of it. ``secure`` draws
        from the OS CSPRNG (see ``PoissonBatchSampler``).

        ``shard=(rank, world_size)`` (data-parallel training; the loader samples with a DistributedSampler):
        this rank Poisson-samples its own disjoint shard of the whole dataset (``ShardedPoissonBatchSampler``)
        at the same q = 1 / len(data_loader), so over all ranks each record is included with probability q,
        once. ``expected_batch_size`` is then the *global* q * len(dataset), summed over the ranks.

        Raises:
            ValueError: for an iterable dataset, ``batch_size=None``, another sampler or batch_sampler, or a
                collate function that cannot build an empty batch; each message names the fix.
        """
        dataset = data_loader.dataset
        if shard is None:
            indices = _poisson_domain(data_loader)
            n = len(dataset) if indices is None else len(indices)  # type: ignore[arg-type]
        else:
            _distributed_domain(data_loader)
            indices, n = None, len(dataset)  # type: ignore[arg-type]
        steps = len(data_loader)
        if steps == 0:
            raise ValueError("The data loader has no batches (drop_last=True with batch_size > len(dataset)?).")
        sample_rate = 1.0 / steps  # as Opacus: expected batch size n / len(loader)
        if shard is None:
            batch_sampler: PoissonBatchSampler = PoissonBatchSampler(n, sample_rate, steps, generator, secure=secure,
                                                                     indices=indices)
        else:
            batch_sampler = ShardedPoissonBatchSampler(n, sample_rate, steps, generator, rank=shard[0],
                                                       world_size=shard[1], secure=secure)
            indices = [shard[0]]  # the first record of this rank's shard: the empty batch's template
        loader = cls(
            dataset,
            batch_sampler=batch_sampler,
            collate_fn=_empty_safe_collate(dataset, 0 if indices is None else indices[0], data_loader.collate_fn),
            **_loading(data_loader),
        )
        loader._sample_rate = sample_rate
        loader.expected_batch_size = sample_rate * n
        # ``loader.sampler`` (unused: the batch sampler decides) answers ``set_epoch`` like the
        # DistributedSampler it replaces; DataLoader forbids assigning it after __init__
        object.__setattr__(loader, "sampler", _EpochSequentialSampler(dataset, batch_sampler))
        return loader

    @classmethod
    def reporting(cls, data_loader: DataLoader, sample_rate: float, expected_batch_size: float) -> "DPDataLoader":
        """``data_loader``'s own batches, in its own order (``poisson_sampling=False``), from a loader that reports
        each batch's size to the engine as the Poisson one does: every layer's batch is checked against it, and
        one batch per step. ``sampler`` is the original's (``set_epoch`` reaches a DistributedSampler)."""
        if data_loader.batch_sampler is None:
            raise ValueError("poisson_sampling=False needs a loader with a fixed batch_size.")
        loader = cls(
            data_loader.dataset,
            batch_sampler=_ReportedBatchSampler(data_loader.batch_sampler),
            collate_fn=data_loader.collate_fn,
            generator=data_loader.generator,
            **_loading(data_loader),
        )
        loader._sample_rate, loader.expected_batch_size = sample_rate, expected_batch_size
        object.__setattr__(loader, "sampler", data_loader.sampler)
        return loader

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        callback = self.on_batch
        if callback is None:
            return super().__iter__()
        sampler = self.batch_sampler
        if not isinstance(sampler, (PoissonBatchSampler, _ReportedBatchSampler)) or not getattr(self, "in_order", True):
            raise ValueError("on_batch needs a loader made by DPDataLoader.from_data_loader (a PoissonBatchSampler, "
                             "batches yielded in order).")
        sizes: collections.deque[int] = collections.deque()
        sampler._size_sink = sizes  # every iter(sampler) inside super().__iter__() records into this epoch's deque
        try:
            batches = super().__iter__()
        finally:
            sampler._size_sink = None
        return self._reported(batches, sizes, callback, self.on_leave)

    @staticmethod
    def _reported(batches: Iterator[Any], sizes: collections.deque[int], callback: Callable[[int], None],
                  on_leave: Callable[[int], None] | None) -> Iterator[Any]:
        yielded = 0
        try:
            for batch in batches:  # yielded in sampler order, also with workers, so popleft stays aligned
                callback(sizes.popleft())
                yielded += 1
                yield batch
        except GeneratorExit:  # the loop was left at the last yield
            if on_leave is not None:
                on_leave(yielded)
            raise


class _ChunkingBatchSampler(Sampler[list[int]]):
    """Splits each logical batch of indices into physical chunks; records (first, last, size) of each chunk."""

    def __init__(self, inner: Sampler[list[int]], max_physical: int, ends: collections.deque):
        self.inner, self.max_physical, self.ends = inner, max_physical, ends

    def __len__(self) -> int:
        return len(self.inner)  # a lower bound; the exact count depends on the sampled sizes

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.inner:
            pieces = max(1, math.ceil(len(batch) / self.max_physical))
            for i in range(pieces):
                chunk = batch[i * self.max_physical:(i + 1) * self.max_physical]
                self.ends.append((i == 0, i == pieces - 1, len(chunk)))
                yield chunk


class VirtualSteps:
    """Iterate a private loader in physical chunks of at most ``max_physical_batch_size`` examples.

    The optimizer steps (adds noise, counts a privacy step) only after the last chunk of each logical
    batch; clipped sums accumulate exactly, so the result equals that of the whole logical batch.
    Before each chunk it calls ``optimizer.signal_chunk(first, last, size)``, ``size`` being the number of
    records in that chunk (0 for an empty logical batch). Equivalent to Opacus' ``BatchMemoryManager``.
    Iterate it over the loader ``make_private`` returned: around another loader the chunks are unverified
    (no Poisson sampling, batch unchecked), with the warning a plain loop over that loader gives. Call
    ``step()`` after every chunk: a step holding chunks of two logical batches is refused.
    Use as::

        for x, y in VirtualSteps(loader, max_physical_batch_size=32, optimizer=optimizer):
            optimizer.zero_grad(); loss_fn(model(x), y).backward(); optimizer.step()
    """

    def __init__(self, data_loader: DataLoader, max_physical_batch_size: int, optimizer: Any):
        positive(max_physical_batch_size=max_physical_batch_size)
        if not hasattr(optimizer, "end_virtual_steps"):
            raise TypeError("VirtualSteps needs the optimizer returned by make_private.")
        self.data_loader, self.optimizer = data_loader, optimizer
        self.max_physical = int(max_physical_batch_size)

    def __len__(self) -> int:
        return len(self.data_loader)

    def __enter__(self) -> "VirtualSteps":
        """``with VirtualSteps(loader, n, optimizer) as chunks: for x, y in chunks: ...`` (Opacus'
        ``BatchMemoryManager`` form); leaving the block ends the virtual steps."""
        return self

    def __exit__(self, *exc: Any) -> None:
        self.optimizer.end_virtual_steps()

    def __iter__(self) -> Iterator[Any]:
        dl = self.data_loader
        # the loader make_private returned reports its batches to the optimizer's gradient source; the chunks
        # of any other loader (e.g. the original one) are unverified, as in a plain loop over it
        source = getattr(getattr(dl, "on_batch", None), "__self__", None)
        private = source is not None and source is getattr(self.optimizer, "controller", None)
        ends: collections.deque = collections.deque()
        chunked = DataLoader(
            dl.dataset,
            batch_sampler=_ChunkingBatchSampler(dl.batch_sampler, self.max_physical, ends),
            collate_fn=dl.collate_fn,
            **_loading(dl),
        )
        logical, left = 0, False
        try:
            for batch in chunked:  # DataLoader yields in sampler order, so the flags stay aligned
                first, last, size = ends.popleft()
                logical += first
                self.optimizer.signal_chunk(first, last, size, private)
                yield batch
        except GeneratorExit:  # the loop was left at the last yield
            left = True
            raise
        finally:
            self.optimizer.end_virtual_steps(logical if left else 0)
