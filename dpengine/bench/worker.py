"""Time one configuration in this (fresh) process and print one JSON line.

    python -m dpengine.bench.worker --config '{"model": "mlp", "mode": "bk", "batch": 256, ...}'

Keys: model, params, mode, batch, clipping, warmup, steps (at least), min_time_s (keep timing until
this much step time is collected, up to max_steps), threads, device, seed, noise_multiplier, max_grad_norm. Output: {"status": "ok", "step_times": [...], "baseline_rss_mb", "prestep_rss_mb",
"peak_mem_mb", ...} or {"status": "error: ..."}; the process always exits 0 once it could print.

Memory on CPU: ``baseline_rss_mb`` is the RSS after imports and before the model is built (what every
mode shares), ``prestep_rss_mb`` the RSS right before the first step (model + optimizer + wrappers),
``peak_mem_mb`` the process high-water mark (ru_maxrss) after the timed steps. On CUDA, the three are
``torch.cuda`` allocated / allocated / max allocated.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from typing import Any

DPENGINE_MODES = ("hooks", "ghost", "bk", "fused")
OPACUS_MODES = ("opacus-hooks", "opacus-ghost")
MODES = ("nonprivate", *DPENGINE_MODES, *OPACUS_MODES)
NOT_IMPLEMENTED = "skipped: {mode} is not implemented in this dpengine yet"
FUSED_NEEDS_CUDA = "skipped: fused needs CUDA"


def implemented(mode: str) -> bool:
    """Modes of other providers are always runnable; a dpengine backend only once it exists."""
    from dpengine.grad_sample.controller import GradSampleMode

    return mode not in DPENGINE_MODES or mode in {m.value for m in GradSampleMode}


def _rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return _maxrss_mb()


def _maxrss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024.0 * 1024.0) if sys.platform == "darwin" else r / 1024.0


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    threads = int(cfg.get("threads", 2))
    import warnings

    warnings.filterwarnings("ignore")  # Opacus' secure-RNG and full-backward-hook warnings, once per process
    import torch

    torch.set_num_threads(threads)
    mode = cfg["mode"]
    # Import what any mode may need up front so the baseline RSS is the same for every mode.
    import dpengine.engine  # noqa: F401
    import opacus  # noqa: F401
    from torch.utils.data import DataLoader, TensorDataset

    from dpengine.bench import models

    device = torch.device(cfg.get("device", "cpu"))
    cuda = device.type == "cuda"
    if not implemented(mode):
        return {"status": NOT_IMPLEMENTED.format(mode=mode)}
    if mode == "fused" and not cuda:
        return {"status": FUSED_NEEDS_CUDA}
    torch.manual_seed(int(cfg.get("seed", 0)))
    baseline = torch.cuda.memory_allocated() / 2**20 if cuda else _rss_mb()

    work = models.build(cfg["model"], cfg.get("params"))
    model = work.model.to(device)
    batch = int(cfg["batch"])
    g = torch.Generator().manual_seed(int(cfg.get("seed", 0)))
    x, y = work.batch(batch, g, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    # make_private only sees this loader to learn the (expected) batch size; every step reuses (x, y).
    loader = DataLoader(TensorDataset(x.cpu(), y.cpu()), batch_size=batch)
    sigma, clip = float(cfg.get("noise_multiplier", 1.0)), float(cfg.get("max_grad_norm", 1.0))
    criterion = None
    if mode in DPENGINE_MODES:
        from dpengine import PrivacyEngine

        engine = PrivacyEngine(seed=int(cfg.get("seed", 0)))
        model, optimizer, _ = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma, max_grad_norm=clip,
            clipping=cfg.get("clipping", "flat"), grad_sample_mode=mode, poisson_sampling=True,
            loss_reduction="mean")
    elif mode == "opacus-hooks":
        from opacus import PrivacyEngine as OpacusEngine

        model, optimizer, _ = OpacusEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma, max_grad_norm=clip,
            grad_sample_mode="hooks")
    elif mode == "opacus-ghost":
        from opacus import PrivacyEngine as OpacusEngine

        class _Loss(torch.nn.Module):  # a criterion with .reduction, as Opacus' ghost wrapper requires
            reduction = "mean"

            def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
                return torch.nn.functional.cross_entropy(out, target, reduction=self.reduction)

        model, optimizer, criterion, _ = OpacusEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader, criterion=_Loss(), noise_multiplier=sigma,
            max_grad_norm=clip, grad_sample_mode="ghost")
    elif mode != "nonprivate":
        raise ValueError(f"unknown mode {mode!r}")
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        out = model(x)
        if criterion is not None:
            if work.sequence:  # token-level loss; Opacus needs (B, T) to form the per-sequence loss
                loss = criterion(out.reshape(-1, out.shape[-1]), y.reshape(-1), shape=tuple(out.shape[:2]))
            else:
                loss = criterion(out, y)
        else:
            loss = work.loss(out, y)
        loss.backward()
        optimizer.step()

    if cuda:
        torch.cuda.synchronize()
    prestep = torch.cuda.memory_allocated() / 2**20 if cuda else _rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(int(cfg.get("warmup", 2))):
        step()
    # At least `steps` timed steps; more while under `min_time_s` (so fast steps get a stable median).
    times: list[float] = []
    n_min, min_time, n_max = int(cfg.get("steps", 5)), float(cfg.get("min_time_s", 0.0)), int(cfg.get("max_steps", 1000))
    while len(times) < n_min or (sum(times) < min_time and len(times) < n_max):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _maxrss_mb()
    return {"status": "ok", "step_times": times, "baseline_rss_mb": baseline, "prestep_rss_mb": prestep,
            "peak_mem_mb": peak, "n_params": models.n_params(work.model), "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="JSON object describing the configuration")
    args = p.parse_args(argv)
    try:
        cfg = json.loads(args.config)
        threads = str(cfg.get("threads", 2))
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, threads)
        result = run(cfg)
    except Exception as e:  # noqa: BLE001 - a failing configuration is a result, not a crash
        msg = f"{type(e).__name__}: {e}".replace("\n", " ")
        result = {"status": f"error: {msg[:300]}", "traceback": traceback.format_exc()[-2000:]}
    sys.stdout.flush()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
