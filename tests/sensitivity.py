"""Empirical sensitivity of the private release: the one quantity the DP guarantee rests on.

With sigma = 0, ``loss_reduction="sum"`` and ``torch.optim.SGD(lr=0)``, ``p.grad`` after
``optimizer.step()`` is exactly the released clipped sum ``sum_i c_i grad_i`` (no noise, no scaling, and
the weights never move, so every step of a run releases the same function of the same weights). Flat
clipping promises that adding or removing one record changes that release by at most C in L2 norm.
``sensitivity`` measures the change, in units of C, between a data set and the same data set without
one record; a value above ``BOUND`` means the privacy guarantee does not hold for that call pattern.

The private loader is made deterministic by building it with ``batch_size=len(ds)``: then
q = 1 / len(loader) = 1 and the Poisson loader returned by ``make_private`` yields every record at
every step. Models come from a factory that seeds the RNG, so the two runs start from identical weights.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from dpengine import PrivacyEngine

#: the largest sensitivity, in units of C, that flat clipping allows (1e-6 of float64 slack)
BOUND = 1.0 + 1e-6

StepFn = Callable[[nn.Module, torch.optim.Optimizer, DataLoader], None]


def seeded(factory: Callable[[], nn.Module], seed: int = 0) -> Callable[[], nn.Module]:
    """A model factory that always builds the same weights (without disturbing the global RNG)."""

    def build() -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return factory()

    return build


def with_outlier(*tensors: Tensor, index: int = 0, scale: float = 1e3) -> TensorDataset:
    """A TensorDataset whose record ``index`` has its first (float) tensor scaled by ``scale``: a sample
    whose gradient is far above any reasonable C, so that it is always clipped."""
    x = tensors[0].clone()
    x[index] = x[index] * scale
    return TensorDataset(x, *tensors[1:])


def without(ds: Dataset, index: int) -> Dataset:
    """The neighbouring data set: ``ds`` without record ``index``."""
    return Subset(ds, [i for i in range(len(ds)) if i != index])  # type: ignore[arg-type]


def plain_step(loss_fn: Callable[[Tensor, Tensor], Tensor]) -> StepFn:
    """The ordinary loop: zero_grad, forward, backward, step, for every batch of the private loader."""

    def step(model: nn.Module, opt: torch.optim.Optimizer, loader: DataLoader) -> None:
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()

    return step


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]  # parameters() dedupes tied weights


def released(model_fn: Callable[[], nn.Module], ds: Dataset, *, step_fn: StepFn, mode: str, C: float,
             **make_private_kwargs: Any) -> Tensor:
    """The release (``p.grad`` of every trainable parameter after the last step, flattened, float64) of
    ``step_fn`` on the private loader over ``ds``. An empty data set releases zero (nothing to clip,
    sigma = 0) without running anything."""
    model = model_fn()
    if len(ds) == 0:  # type: ignore[arg-type]
        return torch.cat([torch.zeros(p.numel(), dtype=torch.float64) for p in _trainable(model)])
    opt = torch.optim.SGD(_trainable(model), lr=0.0)
    make_private_kwargs.setdefault("loss_reduction", "sum")
    engine = PrivacyEngine(seed=0)
    model, opt, loader = engine.make_private(
        module=model, optimizer=opt, data_loader=DataLoader(ds, batch_size=len(ds)),  # type: ignore[arg-type]
        noise_multiplier=0.0, max_grad_norm=C, grad_sample_mode=mode, **make_private_kwargs)
    assert loader.sample_rate == 1.0, "the loader must yield every record (q = 1)"
    step_fn(model, opt, loader)
    assert opt.steps_taken >= 1, "step_fn took no private step: nothing was released"
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().double().flatten()
                      for p in _trainable(model)])


def sensitivity(model_fn: Callable[[], nn.Module], ds: Dataset, *, step_fn: StepFn, mode: str, C: float,
                drop: int = 0, **make_private_kwargs: Any) -> float:
    """||release(ds) - release(ds without record ``drop``)|| / C."""
    a = released(model_fn, ds, step_fn=step_fn, mode=mode, C=C, **make_private_kwargs)
    b = released(model_fn, without(ds, drop), step_fn=step_fn, mode=mode, C=C, **make_private_kwargs)
    return float((a - b).norm()) / C


def max_sensitivity(model_fn: Callable[[], nn.Module], ds: Dataset, *, step_fn: StepFn, mode: str, C: float,
                    drops: Sequence[int], **make_private_kwargs: Any) -> float:
    """The largest sensitivity over several removed records (the full release is computed once)."""
    a = released(model_fn, ds, step_fn=step_fn, mode=mode, C=C, **make_private_kwargs)
    worst = 0.0
    for i in drops:
        b = released(model_fn, without(ds, i), step_fn=step_fn, mode=mode, C=C, **make_private_kwargs)
        worst = max(worst, float((a - b).norm()) / C)
    return worst
