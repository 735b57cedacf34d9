"""Poisson sampling and virtual steps.

Privacy note: the RDP accountant analyses the Poisson-subsampled Gaussian mechanism: each example
enters each batch independently with probability q. Shuffled fixed-size batches do not match that
analysis; ``make_private(poisson_sampling=False)`` keeps them but warns.
"""

from __future__ import annotations

import collections
import math
import secrets
from typing import Any, Iterator

import torch
from torch.utils._pytree import tree_map
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.dataloader import default_collate

from ._validate import in_range, positive


class PoissonBatchSampler(Sampler[list[int]]):
    """Yields ``steps`` batches; each index is included independently with probability ``sample_rate``.

    Batch sizes vary (binomial, mean ``sample_rate * num_samples``) and can be zero.
    """

    def __init__(self, num_samples: int, sample_rate: float, steps: int, generator: torch.Generator | None = None):
        positive(num_samples=num_samples)
        in_range(0.0, 1.0, sample_rate=sample_rate)
        positive(steps=steps)
        self.num_samples, self.sample_rate, self.steps = num_samples, sample_rate, steps
        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(secrets.randbits(63))
        self.generator = generator

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            mask = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
            yield mask.nonzero().flatten().tolist()


def _empty_batch_collate(dataset: Dataset, collate_fn: Any) -> Any:
    """A collate function that turns an empty index list into correctly shaped empty tensors."""
    template = tree_map(lambda t: t[:0] if isinstance(t, torch.Tensor) else t, default_collate([dataset[0]]))

    def collate(batch: list[Any]) -> Any:
        if len(batch) == 0:
            return template
        return collate_fn(batch)

    return collate


class DPDataLoader(DataLoader):
    """A DataLoader over the same dataset with Poisson sampling; one epoch = ``len(original)`` steps."""

    sample_rate: float
    expected_batch_size: float

    @classmethod
    def from_data_loader(cls, data_loader: DataLoader, generator: torch.Generator | None = None) -> "DPDataLoader":
        dataset = data_loader.dataset
        n = len(dataset)  # type: ignore[arg-type]
        steps = len(data_loader)
        sample_rate = 1.0 / steps  # as Opacus: expected batch size n / len(loader)
        loader = cls(
            dataset,
            batch_sampler=PoissonBatchSampler(n, sample_rate, steps, generator),
            collate_fn=_empty_batch_collate(dataset, data_loader.collate_fn),
            num_workers=data_loader.num_workers,
            pin_memory=data_loader.pin_memory,
            timeout=data_loader.timeout,
            worker_init_fn=data_loader.worker_init_fn,
            multiprocessing_context=data_loader.multiprocessing_context,
            persistent_workers=data_loader.persistent_workers if data_loader.num_workers > 0 else False,
        )
        loader.sample_rate = sample_rate
        loader.expected_batch_size = sample_rate * n
        return loader


class _ChunkingBatchSampler(Sampler[list[int]]):
    """Splits each logical batch of indices into physical chunks; records (first, last) of each chunk."""

    def __init__(self, inner: Sampler[list[int]], max_physical: int, ends: collections.deque):
        self.inner, self.max_physical, self.ends = inner, max_physical, ends

    def __len__(self) -> int:
        return len(self.inner)  # a lower bound; the exact count depends on the sampled sizes

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.inner:
            pieces = max(1, math.ceil(len(batch) / self.max_physical))
            for i in range(pieces):
                self.ends.append((i == 0, i == pieces - 1))
                yield batch[i * self.max_physical:(i + 1) * self.max_physical]


class VirtualSteps:
    """Iterate a private loader in physical chunks of at most ``max_physical_batch_size`` examples.

    The optimizer steps (adds noise, counts a privacy step) only after the last chunk of each logical
    batch; clipped sums accumulate exactly, so the result equals that of the whole logical batch.
    Equivalent to Opacus' ``BatchMemoryManager``. Use as::

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

    def __iter__(self) -> Iterator[Any]:
        dl = self.data_loader
        ends: collections.deque = collections.deque()
        chunked = DataLoader(
            dl.dataset,
            batch_sampler=_ChunkingBatchSampler(dl.batch_sampler, self.max_physical, ends),
            collate_fn=dl.collate_fn,
            num_workers=dl.num_workers,
            pin_memory=dl.pin_memory,
            worker_init_fn=dl.worker_init_fn,
        )
        try:
            for batch in chunked:  # DataLoader yields in sampler order, so the flags stay aligned
                first, last = ends.popleft()
                self.optimizer.signal_chunk(first, last)
                yield batch
        finally:
            self.optimizer.end_virtual_steps()
