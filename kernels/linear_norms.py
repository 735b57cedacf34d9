"""Per-sample squared norms of a linear layer's weight gradient, without writing per-sample tensors.

For one sample the weight gradient is ``G = sum_t g_t a_t^T`` (a: (T, d) inputs, g: (T, p) output
gradients). Two exact forms of ``||G||_F^2``:

* Gram ("ghost", Li et al. 2022): ``sum_{t,s} (a_t . a_s)(g_t . g_s)``. ``_gram_norm_kernel`` computes one
  (BLOCK_T x BLOCK_T) tile of both Gram matrices in registers and adds the sum of their product to the
  sample's norm; the B x T x T Gram matrices are never written. Tiles below the diagonal are skipped and
  the off-diagonal ones counted twice. FLOPs per sample: T^2 (d + p).
* Materialized (FlashDP's blockwise form, Wang et al. 2025): ``_materialized_norm_kernel`` computes one
  (BLOCK_P x BLOCK_D) tile of ``G`` in registers (a GEMM over T) and adds its squared sum; ``G`` is never
  written. FLOPs per sample: T p d.

Inputs may be fp16, bf16, fp32 or fp64; products accumulate in fp32 (fp64 for fp64). Partial sums are
added with an atomic add into a zeroed (B,) buffer, so the last bits may differ between runs on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_operands, configs, dot_args


# ------------------------------------------------------------------------------------------- Gram form
@triton.autotune(
    configs=configs(
        [triton.Config({"BLOCK_T": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)],
        [triton.Config({"BLOCK_T": bt, "BLOCK_K": bk}, num_warps=w, num_stages=s)
         for bt, bk, w, s in ((64, 64, 4, 3), (64, 128, 8, 3), (128, 64, 8, 3), (128, 32, 4, 4), (64, 32, 4, 4))]),
    key=["T", "D", "P"], reset_to_zero=["out_ptr"])
@triton.jit
def _gram_norm_kernel(a_ptr, g_ptr, out_ptr, T, D, P, PAD,
                      s_ab, s_at, s_ad, s_gb, s_gt, s_gp,
                      BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                      ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    active = (pid_j >= pid_i).to(tl.int32)  # tile (i, j) with j < i equals (j, i)^T: skipped (empty loops)
    ti = pid_i * BLOCK_T + tl.arange(0, BLOCK_T)
    tj = pid_j * BLOCK_T + tl.arange(0, BLOCK_T)
    mi, mj = ti < T, tj < T
    kk = tl.arange(0, BLOCK_K)
    aa = tl.zeros((BLOCK_T, BLOCK_T), dtype=ACC)  # a_i a_j^T tile
    for k0 in range(0, D * active, BLOCK_K):
        mk = k0 + kk < D
        x = tl.load(a_ptr + b * s_ab + ti[:, None] * s_at + (k0 + kk)[None, :] * s_ad,
                    mask=mi[:, None] & mk[None, :], other=0.0)  # (BLOCK_T, BLOCK_K)
        y = tl.load(a_ptr + b * s_ab + (k0 + kk)[:, None] * s_ad + tj[None, :] * s_at,
                    mask=mk[:, None] & mj[None, :], other=0.0)  # (BLOCK_K, BLOCK_T)
        if UPCAST:
            x, y = x.to(ACC), y.to(ACC)
        aa = tl.dot(x, y, aa, input_precision=PREC)
    gg = tl.zeros((BLOCK_T, BLOCK_T), dtype=ACC)  # g_i g_j^T tile
    for k0 in range(0, P * active, BLOCK_K):
        mk = k0 + kk < P
        x = tl.load(g_ptr + b * s_gb + ti[:, None] * s_gt + (k0 + kk)[None, :] * s_gp,
                    mask=mi[:, None] & mk[None, :], other=0.0)
        y = tl.load(g_ptr + b * s_gb + (k0 + kk)[:, None] * s_gp + tj[None, :] * s_gt,
                    mask=mk[:, None] & mj[None, :], other=0.0)
        if UPCAST:
            x, y = x.to(ACC), y.to(ACC)
        gg = tl.dot(x, y, gg, input_precision=PREC)
    diag = (ti[:, None] == tj[None, :]) & mi[:, None]  # on diagonal tiles only: the underflow pad
    aa = tl.where(diag, aa + PAD, aa)
    gg = tl.where(diag, gg + PAD, gg)
    part = tl.sum(tl.sum(aa * gg, axis=1), axis=0)
    weight = 2 - (pid_i == pid_j).to(tl.int32)  # off-diagonal tiles stand for themselves and their transpose
    tl.atomic_add(out_ptr + b, part * weight.to(ACC))


def gram_norm_sq(a: torch.Tensor, g: torch.Tensor, pad: float = 0.0) -> torch.Tensor:
    """(B,) ``sum_{t,s} (a_t . a_s + pad [t = s])(g_t . g_s + pad [t = s])`` per sample.

    Args:
        a: (B, T, d) layer inputs.
        g: (B, T, p) output gradients, same dtype as ``a`` (fp16, bf16, fp32 or fp64).
        pad: added to both Grams' diagonals, so that underflow in them cannot make the norm smaller than
            the true one (the caller's ``dpengine.grad_sample.registry.underflow_pad``).

    Returns:
        (B,) squared per-sample weight-gradient norms, fp32 (fp64 for fp64 inputs).
    """
    check_operands(a=a, g=g)
    args = dot_args(a.dtype)
    B, T, D = a.shape
    P = g.shape[2]
    out = torch.zeros(B, dtype=torch.float64 if a.dtype == torch.float64 else torch.float32, device=a.device)
    if B == 0 or T == 0:
        return out
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]), triton.cdiv(T, meta["BLOCK_T"]), B)  # noqa: E731
    _gram_norm_kernel[grid](a, g, out, T, D, P, float(pad), *a.stride(), *g.stride(), **args)
    return out


def gram_norm_sq_reference(a: torch.Tensor, g: torch.Tensor, pad: float = 0.0) -> torch.Tensor:
    """Plain-torch reference of ``gram_norm_sq`` (in the accumulation dtype)."""
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    a, g = a.to(acc), g.to(acc)
    eye = torch.eye(a.shape[1], dtype=acc, device=a.device) * pad
    return ((torch.bmm(a, a.transpose(1, 2)) + eye) * (torch.bmm(g, g.transpose(1, 2)) + eye)).sum((1, 2))


# ----------------------------------------------------------------------------------- materialized form
@triton.autotune(
    configs=configs(
        [triton.Config({"BLOCK_P": 32, "BLOCK_D": 32, "BLOCK_T": 32}, num_warps=4, num_stages=1)],
        [triton.Config({"BLOCK_P": bp, "BLOCK_D": bd, "BLOCK_T": bt}, num_warps=w, num_stages=s)
         for bp, bd, bt, w, s in ((128, 128, 32, 8, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3),
                                  (64, 64, 64, 4, 4), (128, 128, 64, 8, 3))]),
    key=["T", "D", "P"], reset_to_zero=["out_ptr"])
@triton.jit
def _materialized_norm_kernel(a_ptr, g_ptr, out_ptr, T, D, P,
                              s_ab, s_at, s_ad, s_gb, s_gt, s_gp,
                              BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
                              ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    pp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mp, md = pp < P, dd < D
    tt = tl.arange(0, BLOCK_T)
    tile = tl.zeros((BLOCK_P, BLOCK_D), dtype=ACC)  # one tile of G = sum_t g_t a_t^T, never stored
    for t0 in range(0, T, BLOCK_T):
        mt = t0 + tt < T
        gt = tl.load(g_ptr + b * s_gb + pp[:, None] * s_gp + (t0 + tt)[None, :] * s_gt,
                     mask=mp[:, None] & mt[None, :], other=0.0)  # (BLOCK_P, BLOCK_T)
        at = tl.load(a_ptr + b * s_ab + (t0 + tt)[:, None] * s_at + dd[None, :] * s_ad,
                     mask=mt[:, None] & md[None, :], other=0.0)  # (BLOCK_T, BLOCK_D)
        if UPCAST:
            gt, at = gt.to(ACC), at.to(ACC)
        tile = tl.dot(gt, at, tile, input_precision=PREC)
    tl.atomic_add(out_ptr + b, tl.sum(tl.sum(tile * tile, axis=1), axis=0))


def materialized_norm_sq(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(B,) ``||sum_t g_t a_t^T||_F^2`` per sample, the per-sample gradient reduced tile by tile in registers.

    Args and returns as ``gram_norm_sq``.
    """
    check_operands(a=a, g=g)
    args = dot_args(a.dtype)
    B, T, D = a.shape
    P = g.shape[2]
    out = torch.zeros(B, dtype=torch.float64 if a.dtype == torch.float64 else torch.float32, device=a.device)
    if B == 0 or T == 0 or D == 0 or P == 0:
        return out
    grid = lambda meta: (triton.cdiv(P, meta["BLOCK_P"]), triton.cdiv(D, meta["BLOCK_D"]), B)  # noqa: E731
    _materialized_norm_kernel[grid](a, g, out, T, D, P, *a.stride(), *g.stride(), **args)
    return out


def materialized_norm_sq_reference(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Plain-torch reference of ``materialized_norm_sq``: materializes (B, p, d)."""
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    ps = torch.einsum("btp,btd->bpd", g.to(acc), a.to(acc))
    return ps.pow(2).sum((1, 2))
