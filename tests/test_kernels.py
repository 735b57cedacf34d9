"""The Triton kernels of dpengine.kernels against their plain-torch references.

On a machine without CUDA the kernels run under Triton's CPU interpreter: TRITON_INTERPRET=1 is set here,
before triton is imported (no other test imports triton). With CUDA they run compiled, on the GPU.
Tolerances are keyed by dtype: the references are computed in the kernels' accumulation dtype from the
same (rounded) inputs, so only the accumulation order differs (fp32: ~1e-7 relative; fp64: ~1e-16).
"""

from __future__ import annotations


import pytest
import torch
from conftest import require_triton

triton = require_triton()  # conftest set TRITON_INTERPRET=1 before collection on a machine without CUDA

from dpengine.kernels import clipped_sum as cs, fused_clip as fc, linear_norms as ln  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (B, T, d, p): odd sizes; T = 1; T < 16 (packed clipped sum) and T >= 16 with several T-tiles (Gram
# off-diagonal tiles, per-sample clipped sum); a single sample; an empty batch
SHAPES = [(3, 13, 67, 123), (1, 1, 13, 67), (2, 41, 17, 33), (1, 67, 5, 3), (0, 5, 8, 8)]
DTYPES = [torch.float32, torch.bfloat16, torch.float64]
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}


def _operands(shape, dtype, zero_sample=True):
    b, t, d, p = shape
    gen = torch.Generator().manual_seed(b * 1000 + t * 100 + d + p)
    a = torch.randn(b, t, d, generator=gen).to(dtype)
    g = torch.randn(b, t, p, generator=gen).to(dtype)
    if zero_sample and b > 1:
        a[1] = 0  # an all-zero sample: norm exactly 0, contributes nothing
    return a.to(DEVICE), g.to(DEVICE)


def _close(got, want, dtype):
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got.shape == want.shape
    if want.numel() == 0:
        return
    scale = max(float(want.abs().max()), 1e-30)
    err = float((got.cpu().double() - want.cpu().double()).abs().max()) / scale
    assert err < TOL[dtype], f"relative error {err:.3g} for {dtype}"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gram_norm_matches_reference(shape, dtype):
    a, g = _operands(shape, dtype)
    got = ln.gram_norm_sq(a, g)
    _close(got, ln.gram_norm_sq_reference(a, g), dtype)
    if shape[0] > 1:
        assert float(got[1]) == 0.0


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_materialized_norm_matches_reference(shape, dtype):
    a, g = _operands(shape, dtype)
    got = ln.materialized_norm_sq(a, g)
    _close(got, ln.materialized_norm_sq_reference(a, g), dtype)
    if shape[0] > 1:
        assert float(got[1]) == 0.0


@pytest.mark.parametrize("t", [3, 41])  # one diagonal tile; several (off-diagonal tiles carry no pad)
def test_gram_kernel_pad_keeps_an_underflowing_factor_from_reading_zero(t):
    # a huge input token and a tiny gradient: g g^T underflows in float32 while the true norm is 1e-4-ish
    from dpengine.grad_sample.registry import underflow_pad

    a = torch.zeros(2, t, 17)
    a[:, 0, 0] = 1e19
    g = torch.full((2, t, 9), 1e-23)
    g[1] = torch.randn(t, 9)  # an ordinary sample next to it: its norm is not changed by the pad
    a[1] = torch.randn(t, 17)
    a, g = a.to(DEVICE), g.to(DEVICE)
    pad = underflow_pad(a.dtype, t, 17)
    true = torch.einsum("btp,btd->bpd", g.cpu().double(), a.cpu().double()).reshape(2, -1).pow(2).sum(1)
    assert float(ln.gram_norm_sq(a, g)[0]) < 1e-3 * float(true[0])  # unpadded: the norm reads (nearly) 0
    got = ln.gram_norm_sq(a, g, pad)
    _close(got, ln.gram_norm_sq_reference(a, g, pad), torch.float32)
    assert float(got[0]) >= float(true[0])
    assert abs(float(got[1]) - float(true[1])) <= 1e-5 * float(true[1])
    sq, c, _ = fc.fused_clip(g, a, gram=True, clip=1e-5, pad=pad)
    assert float(c[0]) * float(true[0]) ** 0.5 <= 1e-5 * (1 + 1e-5)  # the record's release stays <= C


def test_two_norm_forms_agree_with_materialized_einsum_in_float64():
    a, g = _operands((3, 13, 67, 123), torch.float64)
    ps = torch.einsum("btp,btd->bpd", g.cpu(), a.cpu())
    want = ps.reshape(3, -1).pow(2).sum(1)
    _close(ln.gram_norm_sq(a, g), want, torch.float64)
    _close(ln.materialized_norm_sq(a, g), want, torch.float64)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_clipped_sum_matches_reference(shape, dtype):
    a, g = _operands(shape, dtype)
    c = torch.rand(shape[0], generator=torch.Generator().manual_seed(1)).to(DEVICE)
    _close(cs.clipped_sum(g, a, c), cs.clipped_sum_reference(g, a, c), dtype)  # Linear's (out, in) layout
    _close(cs.clipped_sum(a, g, c), cs.clipped_sum_reference(a, g, c), dtype)  # Conv1D's (in, out) layout


@pytest.mark.parametrize("t", [5, 41])  # packed rows and per-sample tiles
def test_clipped_sum_factors_are_applied_in_fp32_not_to_a_bf16_copy(t):
    """Scaling g by c and rounding to bf16 would err by ~2^-9 relative: far above the tolerance here."""
    a, g = _operands((4, t, 24, 40), torch.bfloat16, zero_sample=False)
    c = torch.tensor([0.3337, 0.71, 0.0123, 1.0], device=DEVICE)
    got = cs.clipped_sum(g, a, c)
    exact = torch.einsum("b,btp,btd->pd", c.double().cpu(), g.double().cpu(), a.double().cpu())
    copy = torch.einsum("btp,btd->pd", (g.float() * c.view(-1, 1, 1)).bfloat16().double().cpu(), a.double().cpu())
    scale = float(exact.abs().max())
    assert float((got.double().cpu() - exact).abs().max()) / scale < 2e-6
    assert float((copy - exact).abs().max()) / scale > 1e-4  # the test can tell the two apart


def test_float16_inputs():
    a, g = _operands((3, 19, 33, 21), torch.float16)
    c = torch.rand(3).to(DEVICE)
    _close(ln.gram_norm_sq(a, g), ln.gram_norm_sq_reference(a, g), torch.float16)
    _close(ln.materialized_norm_sq(a, g), ln.materialized_norm_sq_reference(a, g), torch.float16)
    _close(cs.clipped_sum(g, a, c), cs.clipped_sum_reference(g, a, c), torch.float16)


@pytest.mark.parametrize("shape", [(3, 13, 67, 123), (2, 41, 17, 33), (1, 1, 13, 67), (0, 5, 8, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gram", [True, False])
def test_fused_clip_matches_reference(shape, dtype, gram):
    a, g = _operands(shape, dtype)
    extra = torch.rand(shape[0]).to(DEVICE)
    kw = dict(gram=gram, clip=0.7 * shape[2] ** 0.5, scale=1.5, mult=0.25, extra_sq=extra)
    got = fc.fused_clip(g, a, **kw)
    want = fc.fused_clip_reference(g, a, **kw)
    for x, y in zip(got, want):
        _close(x, y, dtype)
    if shape[0] > 1:  # clipped and unclipped samples both present, and the zero sample has factor mult
        c = want[1]
        assert float(c.min()) < 0.25 and float(c[1]) == pytest.approx(0.25)


def test_fused_clip_float64():
    a, g = _operands((3, 13, 67, 123), torch.float64)
    got = fc.fused_clip(a, g, gram=False, clip=1.0)
    for x, y in zip(got, fc.fused_clip_reference(a, g, gram=False, clip=1.0)):
        _close(x, y, torch.float64)


def test_bad_operands_are_refused_with_the_value():
    a, g = _operands((2, 3, 4, 5), torch.float32)
    with pytest.raises(ValueError, match="Expected g to match a"):
        ln.gram_norm_sq(a, g.double())
    with pytest.raises(ValueError, match=r"Expected a of shape \(B, T, n\)"):
        ln.materialized_norm_sq(a[0], g)
    with pytest.raises(ValueError, match=r"Expected c of shape \(2,\)"):
        cs.clipped_sum(g, a, torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match="Expected clip > 0"):
        fc.fused_clip(g, a, gram=True, clip=0.0)
