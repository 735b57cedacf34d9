"""Where a private step's extra time goes: non-private, bk, bk with sigma = 0 (no noise drawn), bk with the
device path's masking on the CPU too (no clean-step shortcut) and the noise draw alone, timed side by side in
one process on a bench model (interleaved rounds, medians).

Run: python benchmarks/step_breakdown.py mlp 256 [--optimizer adam]   (model name and batch from `dpengine
bench`'s models; prints milliseconds per step and each row over the non-private step, the median of the
per-round ratios).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Callable

import torch
from torch.utils.data import DataLoader, TensorDataset

from dpengine import PrivacyEngine
from dpengine import optimizer as dp_optimizer
from dpengine.bench.models import build


def _step(name: str, batch: int, mode: str | None, sigma: float = 1.0, optimizer: str = "sgd",
          shortcut: bool = True) -> tuple[Callable[[], None], int]:
    """One optimizer step of model ``name`` on a fixed batch: non-private (mode None) or private; without
    ``shortcut`` a clean CPU step masks as on a device (``dpengine.optimizer.CPU_FLAG_SHORTCUT``)."""
    torch.manual_seed(0)
    work = build(name)
    x, y = work.batch(batch, torch.Generator().manual_seed(0), torch.device("cpu"))
    params = work.model.parameters()
    model = work.model
    opt = torch.optim.SGD(params, lr=1e-3) if optimizer == "sgd" else torch.optim.Adam(params, lr=1e-3)
    if mode is not None:
        model, opt, _ = PrivacyEngine(seed=0).make_private(
            module=model, optimizer=opt, data_loader=DataLoader(TensorDataset(x, y), batch_size=batch),
            noise_multiplier=sigma, max_grad_norm=1.0, grad_sample_mode=mode, poisson_sampling=False)

    def step() -> None:
        dp_optimizer.CPU_FLAG_SHORTCUT = shortcut
        try:
            opt.zero_grad()
            work.loss(model(x), y).backward()
            opt.step()
        finally:
            dp_optimizer.CPU_FLAG_SHORTCUT = True
    return step, sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("batch", type=int)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # poisson_sampling=False: a fixed batch, timing only
    torch.set_num_threads(args.threads)
    m, b, o = args.model, args.batch, args.optimizer
    rows = {"non-private": _step(m, b, None, optimizer=o), "bk": _step(m, b, "bk", optimizer=o),
            "bk, sigma 0": _step(m, b, "bk", 0.0, optimizer=o),
            "bk, device mask": _step(m, b, "bk", optimizer=o, shortcut=False)}
    n = rows["non-private"][1]
    buf, gen = torch.empty(n), torch.Generator().manual_seed(0)
    rows["noise draw only"] = (lambda: buf.normal_(0.0, 1.0, generator=gen), n)
    times: dict[str, list[float]] = {k: [] for k in rows}
    for _ in range(args.rounds):
        for key, (fn, _) in rows.items():
            fn(), fn()  # warm-up
            ts = []
            for _ in range(args.steps):
                start = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - start)
            times[key].append(statistics.median(ts))
    base = times["non-private"]
    print(f"{m}, batch {b}, {o}, {n} parameters, {args.threads} threads, {args.rounds} rounds")
    for key, ts in times.items():
        ratio = statistics.median(t / b for t, b in zip(ts, base))
        print(f"  {key:16s} {1000 * statistics.median(ts):9.2f} ms   x non-private {ratio:.2f}")


if __name__ == "__main__":
    main()
