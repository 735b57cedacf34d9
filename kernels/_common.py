"""What every kernel file shares: whether Triton runs interpreted, the dtype rules, and autotune configs.

Triton decides at decoration time whether ``@triton.jit`` functions run compiled (CUDA) or under its
CPU interpreter (``TRITON_INTERPRET=1`` set before ``import triton``); ``INTERPRET`` records that choice.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

#: True when the kernels run under Triton's CPU interpreter (tests), False when they are compiled.
INTERPRET: bool = bool(triton.knobs.runtime.interpret)

#: input dtypes the kernels take; products are accumulated in float32 (float64 for float64 inputs)
SUPPORTED = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for inputs of ``dtype``: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dot_args(dtype: torch.dtype) -> dict:
    """Constexpr arguments that fix how ``tl.dot`` treats inputs of ``dtype``.

    * ``ACC``: accumulator dtype (fp32, or fp64 for fp64 inputs).
    * ``PREC``: ``"ieee"`` for fp32/fp64 inputs. Triton's default for fp32 is TF32, whose 10-bit mantissa
      would under-state a per-sample norm by up to ~0.1%: clipping must not depend on that.
    * ``UPCAST``: cast 16-bit tiles to fp32 before the dot. Only under the interpreter, whose bf16 dot is
      wrong (checked with Triton 3.9); the result is the same, since a product of two bf16/fp16 values is
      exact in fp32. Compiled kernels feed 16-bit tiles to the tensor cores with fp32 accumulation.
    """
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    sixteen = dtype in (torch.float16, torch.bfloat16)
    return {"ACC": acc, "PREC": "tf32" if sixteen else "ieee", "UPCAST": sixteen and INTERPRET}


def configs(interpreted: list[triton.Config], compiled: list[triton.Config]) -> list[triton.Config]:
    """One small config under the interpreter (tests stay fast, nothing is benchmarked), the Hopper
    candidates when compiled, unless ``DPENGINE_TRITON_AUTOTUNE=0`` (GPU correctness tests: one config,
    few compilations). Read when the kernel modules are imported."""
    return interpreted if INTERPRET or os.environ.get("DPENGINE_TRITON_AUTOTUNE") == "0" else compiled


def check_operands(**tensors: torch.Tensor) -> None:
    """Shapes and dtypes the launchers accept; a ValueError naming the bad argument otherwise."""
    ref = None
    for name, t in tensors.items():
        if t.dim() != 3:
            raise ValueError(f"Expected {name} of shape (B, T, n). Found shape {tuple(t.shape)}.")
        if t.dtype not in SUPPORTED:
            raise ValueError(f"Expected {name} of dtype in {SUPPORTED}. Found {t.dtype}.")
        if ref is None:
            ref = (name, t)
            continue
        if t.dtype != ref[1].dtype or t.shape[:2] != ref[1].shape[:2] or t.device != ref[1].device:
            raise ValueError(f"Expected {name} to match {ref[0]} in (B, T), dtype and device. Found "
                             f"{tuple(t.shape)} {t.dtype} {t.device} against {tuple(ref[1].shape)} "
                             f"{ref[1].dtype} {ref[1].device}.")
        if not INTERPRET and not t.is_cuda:
            raise ValueError(f"Expected {name} on a CUDA device (the compiled kernels run on CUDA only; set "
                             f"TRITON_INTERPRET=1 before importing triton to run them on the CPU). Found {t.device}.")
