"""Time one configuration in this (fresh) process and print one JSON line.

    python -m dpengine.bench.worker --config '{"model": "mlp", "mode": "bk", "batch": 256, ...}'

Keys: model, params, mode, batch, precision (fp32 | tf32 | bf16 | fp16, see :data:`PRECISIONS`), compile
(eager | default | reduce-overhead, see :data:`COMPILE_MODES`), clipping, warmup, steps (at least),
min_time_s (keep timing until this much step time is collected, up to max_steps), threads, device, seed,
noise_multiplier, max_grad_norm. Output: {"status": "ok", "step_times": [...], "baseline_rss_mb",
"prestep_rss_mb", "peak_mem_mb", "warmup_s", "ops_per_step", "compute_ops_per_step", "kernels_per_step" (CUDA),
"note", ...;
compiled rows add "compiled_graphs", "graph_breaks"}
or {"status": "error: ..." | "not supported: ..." | "skipped: ..."}; the process always exits 0 once it could print.

Compilation: with compile != "eager" the model is wrapped in ``torch.compile(model, mode=..., dynamic=True)``
*after* make_private (dpengine's or Opacus'; the non-private baseline the same way), so ratios compare like
with like. Compilation happens in the warm-up steps: ``warmup_s`` is their wall time (reported as ``compile_s``
for compiled rows) and the timed steps exclude it; a graph compiled during the timed steps (a recompilation)
is named in the row's note. ``reduce-overhead`` (CUDA graphs) is refused on CPU, and on CUDA runs with
inductor's ``cudagraph_or_error`` so a graph that cannot be captured fails the row instead of silently
running as mode "default". Dynamo hitting its recompile limit (later frames then run eagerly) is noted too.

Launch counts come from one extra, untimed step after the timed ones (and after the peak memory is read):
``ops_per_step`` counts the ATen operators dispatched to a backend (a ``TorchDispatchMode`` counter: the
forward, the backward and the optimizer step, after autocast and autograd), ``compute_ops_per_step`` those of
them that are not views (no kernel on a device), ``kernels_per_step`` the CUDA
kernels ``torch.profiler`` saw in one more step (memcpy and memset excluded).

Memory on CPU: ``baseline_rss_mb`` is the RSS after imports and before the model is built (what every
mode shares), ``prestep_rss_mb`` the RSS right before the first step (model + optimizer + wrappers),
``peak_mem_mb`` the process high-water mark (ru_maxrss) after the timed steps. On CUDA, the three are
``torch.cuda`` allocated / allocated / max allocated.
"""

from __future__ import annotations

import json
import os
import re
import resource
import sys
import time
import traceback
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable

DPENGINE_MODES = ("hooks", "ghost", "bk", "fused")
OPACUS_MODES = ("opacus-hooks", "opacus-ghost")
MODES = ("nonprivate", *DPENGINE_MODES, *OPACUS_MODES)
#: clipping modes a dpengine backend can be benchmarked with, as "BACKEND+CLIPPING" (e.g. "bk+per_layer");
#: a plain backend name means flat clipping (or the suite's ``clipping``)
CLIPPING_VARIANTS = ("per_layer", "automatic", "adaptive", "error_feedback")


def split_mode(mode: str) -> tuple[str, str | None]:
    """"bk+per_layer" -> ("bk", "per_layer"); "bk" -> ("bk", None)."""
    base, _, clipping = mode.partition("+")
    return base, clipping or None


def known_mode(mode: str) -> bool:
    base, clipping = split_mode(mode)
    return base in MODES and (clipping is None or (base in DPENGINE_MODES and clipping in CLIPPING_VARIANTS))
NOT_IMPLEMENTED = "skipped: {mode} is not implemented in this dpengine yet"
FUSED_NEEDS_CUDA = "skipped: fused needs CUDA"
OPACUS_MISSING = "skipped: opacus is not installed"
# fp32: TF32 matrix units off; tf32: on (CUDA; the same as fp32 on CPU); bf16 / fp16: torch.autocast of the
# forward and the loss in that dtype, parameters and optimizer in float32; fp16 adds torch.amp.GradScaler for the
# non-private baseline and make_private(loss_scale=FP16_LOSS_SCALE) for dpengine.
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
TF32_ON_CPU = "tf32 = fp32 on CPU: no TF32 matrix units"
#: "eager": not compiled; otherwise the ``torch.compile`` mode ("default" is mode=None)
COMPILE_MODES = ("eager", "default", "reduce-overhead")
REDUCE_OVERHEAD_NEEDS_CUDA = ("not supported: compile=reduce-overhead on {device}: CUDA graphs need a CUDA device "
                              "(on {device} torch.compile would run it as mode 'default', which the compile=default "
                              "rows measure)")
_NO_GRAD_SCALER = ("Opacus clips p.grad_sample in optimizer.step, which GradScaler.unscale_ does not unscale, so the "
                   "clipping bound would apply to scaled per-sample gradients; use bf16")
#: dpengine's fp16 rows: make_private(loss_scale=...) (a fixed scale; a GradScaler is refused) instead of a scaler
FP16_LOSS_SCALE = 2.0 ** 12


def unsupported(mode: str, precision: str) -> str | None:
    """Why ``mode`` cannot run at ``precision`` (a row status), or None. Only fp16 is restricted: the
    non-private baseline runs the standard GradScaler loop, dpengine its fixed ``loss_scale`` (not with
    fused), and Opacus cannot clip correctly under a GradScaler."""
    backend = split_mode(mode)[0]
    if precision not in PRECISIONS:
        return f"not supported: unknown precision {precision!r}"
    if precision != "fp16" or backend == "nonprivate":
        return None
    if backend in OPACUS_MODES:
        return "not supported: fp16 + GradScaler: " + _NO_GRAD_SCALER
    if backend == "fused":
        return "not supported: fp16 loss_scale with fused (its kernels clip what they read); use bk or bf16"
    return None


def compile_unsupported(compile_mode: str, device: str) -> str | None:
    """Why a configuration cannot run under ``compile_mode`` on ``device`` ("cpu" / "cuda"), or None."""
    if compile_mode not in COMPILE_MODES:
        return f"not supported: unknown compile mode {compile_mode!r}; known: {', '.join(COMPILE_MODES)}"
    if compile_mode == "reduce-overhead" and device != "cuda":
        return REDUCE_OVERHEAD_NEEDS_CUDA.format(device=device)
    return None


def _compile(model: Any, compile_mode: str) -> Any:
    """``torch.compile(model, dynamic=True)`` in ``compile_mode``; reduce-overhead fails loudly where a graph
    cannot be captured as a CUDA graph (inductor would otherwise skip it and run the graph uncaptured)."""
    import torch

    if compile_mode == "reduce-overhead":
        import torch._inductor.config as inductor_config

        inductor_config.triton.cudagraph_or_error = True
    return torch.compile(model, mode=None if compile_mode == "default" else compile_mode, dynamic=True)


class _RecompileLimitLog:
    """Collects dynamo's "hit config.recompile_limit" warnings (the frame then runs eagerly, silently)."""

    def __enter__(self) -> _RecompileLimitLog:
        import logging

        self.hits: list[str] = []
        outer = self

        class Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                msg = record.getMessage()
                if "hit config." in msg:  # "hit config.recompile_limit (8) ... function: 'hook' (/path/f.py:468)"
                    m = re.search(r"hit config\.(\w+) \((\d+)\).*?function: '([^']*)' \(([^)]*)\)", msg, re.S)
                    outer.hits.append(f"{m[1]} ({m[2]}) in {m[3]} ({os.path.basename(m[4])})" if m
                                      else msg.splitlines()[0].strip())

        self.handler, self.logger = Handler(), logging.getLogger("torch._dynamo.convert_frame")
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.logger.removeHandler(self.handler)


def _dynamo_counts() -> tuple[int, int]:
    """(graphs compiled, graph breaks) so far in this process."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"]), int(sum(counters["graph_break"].values()))


def opacus_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("opacus") is not None


def implemented(mode: str) -> bool:
    """Modes of other providers are always runnable; a dpengine backend only once it exists."""
    from dpengine.grad_sample.controller import GradSampleMode

    mode = split_mode(mode)[0]
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


def _precision(precision: str, device: Any) -> tuple[Callable[[], AbstractContextManager[Any]], Any, str]:
    """(autocast context factory, GradScaler or None, note) for ``precision`` on ``device``; sets TF32."""
    import torch

    cuda = device.type == "cuda"
    if cuda:  # fp32 means full float32 matrix products; tf32 lets cuBLAS / cuDNN use the TF32 units
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    if precision in ("fp32", "tf32"):
        return nullcontext, None, TF32_ON_CPU if precision == "tf32" and not cuda else ""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    with torch.autocast(device.type, dtype=dtype):  # some builds have no fp16 autocast on CPU: check once
        probe = torch.ones(2, 2, device=device) @ torch.ones(2, 2, device=device)
    if probe.dtype != dtype:
        raise NotImplementedError(f"{precision} autocast on {device.type} does nothing in torch {torch.__version__}")
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler, ""


def count_ops(step: Callable[[], None], views: bool = True) -> int:
    """ATen operators dispatched by one ``step`` (forward, backward, optimizer), counted by a dispatch mode;
    without ``views``, only those that compute (an operator whose output aliases its input, a view or a
    ``detach``, launches no kernel on a device)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            if views or not func.is_view:
                self.n += 1
            return func(*args, **(kwargs or {}))

    with Counter() as counter:
        step()
    return counter.n


def count_compute_ops(step: Callable[[], None]) -> int:
    """``count_ops`` without views: the operators of one ``step`` that compute."""
    return count_ops(step, views=False)


def count_cuda_kernels(step: Callable[[], None]) -> int:
    """CUDA kernels launched by one ``step``, from torch.profiler (memcpy and memset not counted)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = prof.events()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))]
    if kernels:
        return len(kernels)
    # no device activity recorded (CUPTI unavailable): count the host-side launch calls instead
    return sum(1 for e in events if "LaunchKernel" in e.name)


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    threads = int(cfg.get("threads", 2))
    import warnings

    warnings.filterwarnings("ignore")  # Opacus' secure-RNG and full-backward-hook warnings, once per process
    import torch

    torch.set_num_threads(threads)
    mode, precision, compile_mode = cfg["mode"], cfg.get("precision", "fp32"), cfg.get("compile", "eager")
    device = torch.device(cfg.get("device", "cpu"))
    cuda = device.type == "cuda"
    if (why := compile_unsupported(compile_mode, device.type)) is not None:
        return {"status": why}
    # On CPU, import what any mode may need up front so the baseline RSS is the same for every mode (on
    # CUDA the baseline is GPU memory: Opacus' slow import is only paid by its own modes).
    import dpengine.engine  # noqa: F401
    from torch.utils.data import DataLoader, TensorDataset

    if mode in OPACUS_MODES and not opacus_available():
        return {"status": OPACUS_MISSING}
    if mode in OPACUS_MODES or (not cuda and opacus_available()):
        import opacus  # noqa: F401

    from dpengine.bench import models
    from dpengine.train import backward_and_step

    if not implemented(mode):
        return {"status": NOT_IMPLEMENTED.format(mode=mode)}
    if split_mode(mode)[0] == "fused" and not cuda:
        return {"status": FUSED_NEEDS_CUDA}
    if (why := unsupported(mode, precision)) is not None:
        return {"status": why}
    try:
        autocast, scaler, note = _precision(precision, device)
    except Exception as e:  # noqa: BLE001 - e.g. no fp16 autocast or GradScaler on this device
        return {"status": f"not supported: {precision} on {device.type}: {type(e).__name__}: {e}"[:400]}
    torch.manual_seed(int(cfg.get("seed", 0)))
    baseline = torch.cuda.memory_allocated() / 2**20 if cuda else _rss_mb()

    with device:  # parameters made where they train (GPT-2 small initializes in a blink on the GPU)
        work = models.build(cfg["model"], cfg.get("params"))
    model = work.model.to(device)
    if work.swap_layers and mode != "nonprivate":  # each library's own equivalents of nn.LSTM / nn.MultiheadAttention
        if mode in OPACUS_MODES:
            from opacus.validators import ModuleValidator

            model = ModuleValidator.fix(model)
        else:
            import dpengine

            model = dpengine.fix(model)
    batch = int(cfg["batch"])
    g = torch.Generator().manual_seed(int(cfg.get("seed", 0)))
    x, y = work.batch(batch, g, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    # make_private only sees this loader to learn the (expected) batch size; every step reuses (x, y).
    loader = DataLoader(TensorDataset(x.cpu(), y.cpu()), batch_size=batch)
    sigma, clip = float(cfg.get("noise_multiplier", 1.0)), float(cfg.get("max_grad_norm", 1.0))
    criterion = None
    backend, clipping = split_mode(mode)
    if backend in DPENGINE_MODES:
        from dpengine import PrivacyEngine
        from dpengine.train import default_clipping_options

        clipping = clipping or cfg.get("clipping", "flat")
        engine = PrivacyEngine(seed=int(cfg.get("seed", 0)))
        fp16 = {"loss_scale": FP16_LOSS_SCALE} if precision == "fp16" else {}
        scaler = None  # dpengine scales the backward itself (a GradScaler's dynamic scale is refused)
        model, optimizer, _ = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma, max_grad_norm=clip,
            clipping=clipping, grad_sample_mode=backend, poisson_sampling=True, loss_reduction="mean",
            **fp16, **default_clipping_options(clipping, batch))
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
    if compile_mode != "eager":  # after make_private, so the capture hooks run inside the compiled forward
        model = _compile(model, compile_mode)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            out = model(x)
            if criterion is not None:
                if work.sequence:  # token-level loss; Opacus needs (B, T) to form the per-sequence loss
                    loss = criterion(out.reshape(-1, out.shape[-1]), y.reshape(-1), shape=tuple(out.shape[:2]))
                else:
                    loss = criterion(out, y)
            else:
                loss = work.loss(out, y)
        backward_and_step(loss, optimizer, scaler)

    if cuda:
        torch.cuda.synchronize()
    prestep = torch.cuda.memory_allocated() / 2**20 if cuda else _rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times: list[float] = []
    n_min, min_time, n_max = int(cfg.get("steps", 5)), float(cfg.get("min_time_s", 0.0)), int(cfg.get("max_steps", 1000))
    phase = "in the warm-up (compilation)"
    with _RecompileLimitLog() as limit_log:
        try:
            # warm-up: compilation (if any) happens here, so its wall time is the compile time
            t0 = time.perf_counter()
            for _ in range(int(cfg.get("warmup", 2))):
                step()
            if cuda:
                torch.cuda.synchronize()
            warmup_s = time.perf_counter() - t0
            graphs_warm, phase = _dynamo_counts()[0], "in the timed steps"
            # At least `steps` timed steps; more while under `min_time_s` (so fast steps get a stable median).
            while len(times) < n_min or (sum(times) < min_time and len(times) < n_max):
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                step()
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        except Exception as e:
            if compile_mode == "eager":
                raise
            raise RuntimeError(f"compile={compile_mode}: {mode} failed {phase}: {type(e).__name__}: {e}") from e
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _maxrss_mb()
    out: dict[str, Any] = {"status": "ok", "step_times": times, "baseline_rss_mb": baseline, "prestep_rss_mb": prestep,
                           "peak_mem_mb": peak, "warmup_s": warmup_s, "n_params": models.n_params(work.model),
                           "threads": torch.get_num_threads(), "precision": precision, "compile": compile_mode,
                           "note": note}
    if compile_mode != "eager":
        graphs, breaks = _dynamo_counts()
        out["compiled_graphs"], out["graph_breaks"] = graphs, breaks
        notes = [note] if note else []
        if graphs > graphs_warm:
            notes.append(f"{graphs - graphs_warm} graph(s) compiled during the timed steps (recompilation): "
                         "their compile time is in the step times")
        if limit_log.hits:
            notes.append("dynamo hit " + ", ".join(dict.fromkeys(limit_log.hits)) + ": later calls of those frames "
                         "ran eagerly")
        out["note"] = "; ".join(notes)
    # launch counts: extra untimed steps, after the timing and the peak memory (a count never fails the row)
    # ATen operators are not counted under compile: inductor's generated kernels are not ATen operators, so
    # the count would not be comparable with eager (CUDA kernels, from the profiler, are)
    counters = ([("ops_per_step", count_ops), ("compute_ops_per_step", count_compute_ops)]
                if compile_mode == "eager" else []) \
        + ([("kernels_per_step", count_cuda_kernels)] if cuda else [])
    for key, counter in counters:
        try:
            out[key] = counter(step)
        except Exception as e:  # noqa: BLE001
            out["note"] = "; ".join(filter(None, [out["note"], f"{key} failed: {type(e).__name__}: {e}"[:200]]))
    return out


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
