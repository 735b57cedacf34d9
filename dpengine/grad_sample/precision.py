"""Exact float32 arithmetic for the reduction, whatever reduced-precision float32 math the user switched on.

torch lets float32 matrix products and convolutions run on reduced-precision units: TF32 on CUDA (cuBLAS
with ``torch.set_float32_matmul_precision("high")`` or ``torch.backends.cuda.matmul.allow_tf32``; cuDNN
convolutions by default), and bf16 or TF32 in oneDNN on CPUs that have them (``"medium"``). A TF32 product
rounds its inputs to 10 mantissa bits: per-sample norms formed that way are off by about 1e-3 relative, so a
sample's clipped contribution could exceed C by as much. The reduction therefore runs with every float32
switch at ``"ieee"`` (:func:`exact_fp32`), and a model whose privacy rests on its forward and backward
being exact float32 (Lipschitz training) can ask which switches are not (:func:`reduced_fp32_math`).

The switches are process-wide (torch has no thread-local override in Python), so they are set on entry and
restored on exit, exactly: the per-(backend, op) values of torch >= 2.9's ``fp32_precision`` API and the
legacy ``float32_matmul_precision``, which cuBLAS checks against the new value before every float32 GEMM
(a mix raises there). Setting and restoring them costs about 4 microseconds. Reductions running at the same
time (threads) share one setting: the first sets it, the last restores the user's.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable

import torch

#: the (backend, op) switches a reduction's products and convolutions go through
OPS = (("cuda", "matmul"), ("cuda", "conv"), ("mkldnn", "matmul"), ("mkldnn", "conv"))
_REDUCED = frozenset({"tf32", "bf16"})
_C: Any = torch._C
_NEW_API = hasattr(_C, "_get_fp32_precision_getter")


def _effective(backend: str, op: str) -> str:
    """The precision an op of ``backend`` runs at: its own value, else its backend's, else the generic one."""
    for b, o in ((backend, op), (backend, "all"), ("generic", "all")):
        value = _C._get_fp32_precision_getter(b, o)
        if value != "none":
            return value
    return "ieee"


def _legacy() -> str:
    """``float32_matmul_precision``, also where the user mixed the two APIs (its getter then raises): the
    value consistent with cuBLAS's own check, which is what a restore must keep."""
    try:
        return _C._get_float32_matmul_precision()
    except RuntimeError:
        if _effective("cuda", "matmul") != "tf32":
            return "highest"
        return "medium" if _C._get_fp32_precision_getter("mkldnn", "matmul") == "bf16" else "high"


def reduced_fp32_math(device_type: str, ops: tuple[str, ...] = ("matmul", "conv")) -> list[str]:
    """The switches that let float32 ``ops`` (products, convolutions) on ``device_type`` ("cuda" or "cpu") run
    at reduced precision, as ``"backend.op=value"`` strings (empty when all of them are exact)."""
    backend = "cuda" if device_type == "cuda" else "mkldnn"
    if not _NEW_API:
        if backend != "cuda":
            return []
        flags = [("cuda.matmul.allow_tf32", "matmul", torch.backends.cuda.matmul.allow_tf32),
                 ("cudnn.allow_tf32", "conv", torch.backends.cudnn.allow_tf32)]
        return [f"{name}=True" for name, op, on in flags if on and op in ops]
    return [f"{b}.{o}={v}" for b, o in OPS if b == backend and o in ops and (v := _effective(b, o)) in _REDUCED]


#: reductions in flight (threads, or nested), and how to restore the user's switches when the last ends:
#: a second thread must neither save the switches the first set nor see them restored mid-reduction
_LOCK = threading.Lock()
_DEPTH = 0
_RESTORE: Callable[[], None] | None = None


def exact_fp32(stack: contextlib.ExitStack) -> None:
    """Switch every float32 product and convolution to exact float32 until ``stack`` closes (the switches
    are set by the first reduction in flight and restored when the last one ends)."""
    global _DEPTH, _RESTORE
    with _LOCK:
        if _DEPTH == 0:
            _RESTORE = _switch()
        _DEPTH += 1
    stack.callback(_leave)


def _leave() -> None:
    global _DEPTH, _RESTORE
    with _LOCK:
        _DEPTH -= 1
        if _DEPTH == 0 and _RESTORE is not None:
            restore, _RESTORE = _RESTORE, None
            restore()


def _switch() -> Callable[[], None] | None:
    """Set every float32 switch to exact; returns what puts the user's back (None when all already were)."""
    if not _NEW_API:  # torch < 2.9: the two legacy CUDA switches
        modules = [m for m in (torch.backends.cuda.matmul, torch.backends.cudnn) if m.allow_tf32]
        for module in modules:
            module.allow_tf32 = False

        def restore_legacy() -> None:
            for module in modules:
                module.allow_tf32 = True
        return restore_legacy if modules else None
    reduced = [k for k in OPS if _effective(*k) in _REDUCED]
    legacy = _legacy()
    if not reduced and legacy == "highest":
        return None
    saved = {k: _C._get_fp32_precision_getter(*k) for k in OPS}

    def restore() -> None:
        if legacy != "highest":
            _C._set_float32_matmul_precision(legacy)  # rewrites the two matmul values: set them back after
        for k, value in saved.items():
            _C._set_fp32_precision_setter(*k, value)

    if legacy != "highest":
        _C._set_float32_matmul_precision("highest")  # legacy and both matmul values, consistently
    for k in reduced:
        _C._set_fp32_precision_setter(*k, "ieee")
    return restore
