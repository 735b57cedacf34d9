"""The clipped sum ``sum_i c_i G_i = sum_i c_i x_i^T y_i`` of a linear layer as one GEMM over (B*T).

``x`` is the operand on the rows of the result and ``y`` on its columns: for ``nn.Linear`` (weight
(out, in)) ``x = g``, ``y = a``; for GPT-2's ``Conv1D`` (weight (in, out)) ``x = a``, ``y = g``.

The per-sample factors are applied while the operands are used, never to a scaled copy of ``x`` in
memory, and always in fp32 (fp64): scaling a bf16 operand and rounding it back to bf16 would change each
sample's contribution by up to 2^-9 relative, enough to push a clipped gradient past C. So

* for T >= 16 (``PACKED = False``) each program walks the samples, computes the sample's tile
  ``x_i^T y_i`` with the tensor cores (16-bit inputs, fp32 accumulation) and adds ``c_i`` times it to the
  fp32 accumulator;
* for T < 16 (``PACKED = True``: one sample is too short for a tensor-core tile) rows of several samples
  share a K-block; the ``x`` tile is cast to fp32 and scaled row by row, and the dot runs in IEEE fp32.

``FROM_NORMS`` (used by ``fused_clip``) computes the factors in the kernel from the per-sample squared
norms: ``c_i = min(1, C / (sqrt(sq_i) * scale + 1e-6)) * mult``, the formula of
``dpengine.clipping._clip``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, check_operands, configs, dot_args

#: below this many tokens per sample, rows of several samples share one K-block (see module docstring)
PACK_BELOW = 16


@triton.jit
def _factor(c_ptr, sq_ptr, idx, mask, clip, scale, mult, FROM_NORMS: tl.constexpr, ACC: tl.constexpr):
    """The factor of the samples ``idx``: loaded from ``c_ptr``, or clip's formula on ``sq_ptr``."""
    if FROM_NORMS:
        sq = tl.load(sq_ptr + idx, mask=mask, other=0.0).to(ACC)
        c = tl.minimum(clip / (tl.sqrt(sq) * scale + 1e-6), 1.0) * mult
    else:
        c = tl.load(c_ptr + idx, mask=mask, other=0.0).to(ACC)
    return c


@triton.autotune(
    configs=configs(
        [triton.Config({"BLOCK_P": 32, "BLOCK_D": 32, "BLOCK_T": 32}, num_warps=4, num_stages=1)],
        [triton.Config({"BLOCK_P": bp, "BLOCK_D": bd, "BLOCK_T": bt}, num_warps=w, num_stages=s)
         for bp, bd, bt, w, s in ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
                                  (128, 128, 32, 4, 4), (64, 128, 64, 4, 4))]),
    key=["T", "D", "P", "PACKED"])
@triton.jit
def _clipped_sum_kernel(x_ptr, y_ptr, c_ptr, sq_ptr, out_ptr, B, T, P, D,
                        s_xb, s_xt, s_xp, s_yb, s_yt, s_yd, s_op, s_od,
                        clip, scale, mult,
                        BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
                        PACKED: tl.constexpr, FROM_NORMS: tl.constexpr,
                        ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_d = tl.program_id(1)
    pp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mp, md = pp < P, dd < D
    kk = tl.arange(0, BLOCK_T)
    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=ACC)
    if PACKED:
        n = B * T
        for k0 in range(0, n, BLOCK_T):
            k = k0 + kk
            mk = k < n
            bk = (k // T).to(tl.int64)
            tk = k % T
            c = _factor(c_ptr, sq_ptr, bk, mk, clip, scale, mult, FROM_NORMS, ACC)  # (BLOCK_T,)
            xt = tl.load(x_ptr + bk[None, :] * s_xb + tk[None, :] * s_xt + pp[:, None] * s_xp,
                         mask=mp[:, None] & mk[None, :], other=0.0).to(ACC)  # (BLOCK_P, BLOCK_T)
            yt = tl.load(y_ptr + bk[:, None] * s_yb + tk[:, None] * s_yt + dd[None, :] * s_yd,
                         mask=mk[:, None] & md[None, :], other=0.0).to(ACC)  # (BLOCK_T, BLOCK_D)
            acc = tl.dot(xt * c[None, :], yt, acc, input_precision="ieee")
    else:
        for b in range(0, B):
            b64 = tl.cast(b, tl.int64)
            part = tl.zeros((BLOCK_P, BLOCK_D), dtype=ACC)  # x_b^T y_b tile
            for t0 in range(0, T, BLOCK_T):
                mt = t0 + kk < T
                xt = tl.load(x_ptr + b64 * s_xb + (t0 + kk)[None, :] * s_xt + pp[:, None] * s_xp,
                             mask=mp[:, None] & mt[None, :], other=0.0)
                yt = tl.load(y_ptr + b64 * s_yb + (t0 + kk)[:, None] * s_yt + dd[None, :] * s_yd,
                             mask=mt[:, None] & md[None, :], other=0.0)
                if UPCAST:
                    xt, yt = xt.to(ACC), yt.to(ACC)
                part = tl.dot(xt, yt, part, input_precision=PREC)
            c = _factor(c_ptr, sq_ptr, b64, True, clip, scale, mult, FROM_NORMS, ACC)
            acc += c * part
    tl.store(out_ptr + pp[:, None] * s_op + dd[None, :] * s_od, acc, mask=mp[:, None] & md[None, :])


def _launch(x: torch.Tensor, y: torch.Tensor, c: torch.Tensor | None, sq: torch.Tensor | None,
            clip: float = 0.0, scale: float = 1.0, mult: float = 1.0) -> torch.Tensor:
    check_operands(x=x, y=y)
    B, T, P = x.shape
    D = y.shape[2]
    out = torch.zeros(P, D, dtype=acc_dtype(x.dtype), device=x.device)
    if B == 0 or T == 0 or P == 0 or D == 0:
        return out
    vec = c if c is not None else sq
    vec = vec.to(device=x.device, dtype=acc_dtype(x.dtype)).contiguous()
    grid = lambda meta: (triton.cdiv(P, meta["BLOCK_P"]), triton.cdiv(D, meta["BLOCK_D"]))  # noqa: E731
    _clipped_sum_kernel[grid](x, y, vec, vec, out, B, T, P, D, *x.stride(), *y.stride(), *out.stride(),
                              float(clip), float(scale), float(mult),
                              PACKED=T < PACK_BELOW, FROM_NORMS=c is None, **dot_args(x.dtype))
    return out


def clipped_sum(x: torch.Tensor, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(p, d) ``sum_i c_i x_i^T y_i``.

    Args:
        x: (B, T, p), y: (B, T, d), same dtype (fp16, bf16, fp32 or fp64).
        c: (B,) per-sample factors, applied in fp32 (fp64 for fp64 inputs).

    Returns:
        (p, d) in fp32 (fp64 for fp64 inputs).
    """
    if c.shape != (x.shape[0],):
        raise ValueError(f"Expected c of shape ({x.shape[0]},). Found {tuple(c.shape)}.")
    return _launch(x, y, c, None)


def clipped_sum_reference(x: torch.Tensor, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Plain-torch reference of ``clipped_sum`` (in the accumulation dtype)."""
    acc = acc_dtype(x.dtype)
    return torch.einsum("b,btp,btd->pd", c.to(acc), x.to(acc), y.to(acc))
