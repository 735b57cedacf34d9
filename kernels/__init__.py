"""Triton kernels for fused per-sample clipping (installed as ``dpengine.kernels``).

Each kernel file holds the ``@triton.jit`` kernel, its launcher and the plain-torch reference it must
match. Kernels are tested on CPU with ``TRITON_INTERPRET=1`` and used on CUDA.
"""
