"""grad_sample_mode="fused" end to end against the float64 torch.func oracle.

The kernels run under Triton's CPU interpreter without CUDA (TRITON_INTERPRET=1 is set here, before
triton is imported), compiled on a GPU. Models are float32 (the kernels accumulate in fp32; float64
inputs work too but are not what the mode is for), so the tolerance is fp32's.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import require_triton
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

triton = require_triton()  # conftest set TRITON_INTERPRET=1 before collection on a machine without CUDA

from dpengine import PrivacyEngine  # noqa: E402
from dpengine.grad_sample import fused  # noqa: E402
from dpengine.kernels import _common  # noqa: E402
from models import TinyGPT, seq_ce  # noqa: E402
from oracle import oracle_per_sample, rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

TOL = 2e-4  # fp32 model against the float64 oracle


def _mlp():
    return nn.Sequential(nn.Linear(13, 24), nn.ReLU(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 5))


def _step(model, x, y, loss, mode, batch, **kw):
    """One private step with zero noise; returns {name: released gradient}, the engine and the controller."""
    engine = PrivacyEngine(seed=0)
    n = x.shape[0]
    ds = TensorDataset(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fused.FusedFallbackWarning)
        model, opt, _ = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                            data_loader=DataLoader(ds, batch_size=batch), noise_multiplier=0.0,
                                            grad_sample_mode=mode, **kw)
    engine.controller.note_batch(n)
    loss(model(x.to(DEVICE)), y.to(DEVICE)).backward()
    opt.step()
    return {name: p.grad.detach().cpu().double() for name, p in model.named_parameters()}, engine


def _expected(ref, x, y, loss, engine, model_names, expected_batch):
    """The clipped mean the policy defines, from the oracle's per-sample gradients (groups and thresholds
    read from the engine's policy, so flat and per-layer share one check)."""
    dbl = lambda t: t.double() if t.is_floating_point() else t  # noqa: E731
    ps = oracle_per_sample(ref.double(), loss, dbl(x), dbl(y))
    policy = engine.controller.policy
    params = dict(zip(model_names, engine.controller.module.parameters()))
    groups = {n: policy.group(params[n]) for n in ps}
    sq = torch.zeros(policy.num_groups, x.shape[0], dtype=torch.float64)
    for n, t in ps.items():
        sq[groups[n]] += t.reshape(x.shape[0], -1).pow(2).sum(1)
    thr = getattr(policy, "thresholds", None) or [policy.max_grad_norm]
    c = (torch.tensor(thr, dtype=torch.float64).unsqueeze(1) / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    return {n: torch.einsum("b,b...->...", c[groups[n]], t) / expected_batch for n, t in ps.items()}


def _check(got, want):
    scale = max(float(w.abs().max()) for w in want.values())
    assert set(got) == set(want)
    for n, w in want.items():
        assert rel_err(got[n], w, scale) < TOL, n


CLIPPINGS = {"flat": dict(max_grad_norm=0.4), "per_layer": dict(clipping="per_layer", max_grad_norm=0.6),
             "per_layer_module": dict(clipping="per_layer", max_grad_norm=0.6, groups="module")}


@pytest.mark.parametrize("clipping", list(CLIPPINGS))
@pytest.mark.parametrize("tokens", [1, 3])  # (B, d) inputs and (B, T, d) inputs
def test_mlp_matches_oracle(clipping, tokens):
    torch.manual_seed(1)
    model = _mlp()
    ref = copy.deepcopy(model)
    x = torch.randn(12, 13) if tokens == 1 else torch.randn(12, tokens, 13)
    y = torch.randn(12, 5) if tokens == 1 else torch.randn(12, tokens, 5)
    loss = lambda o, t: F.mse_loss(o, t, reduction="sum") / 6  # noqa: E731  (a sum loss, rescaled)
    got, engine = _step(model.to(DEVICE), x, y, loss, "fused", batch=4, loss_reduction="sum",
                        **CLIPPINGS[clipping])
    names = [n for n, _ in ref.named_parameters()]
    _check(got, _expected(ref, x, y, loss, engine, names, expected_batch=1))  # a sum loss: no 1/E[B]


def _gpt(seq):
    torch.manual_seed(3)
    return TinyGPT(vocab=17, d=16, heads=2, layers=2, max_len=max(seq, 16), padding_idx=0, tie=True)


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("seq", [7, 20])  # T < 16 (packed clipped sum) and T >= 16 (per-sample tiles)
def test_tied_gpt_with_padding_idx_matches_oracle(clipping, seq, monkeypatch):
    from dpengine.kernels import fused_clip

    calls = []
    real = fused_clip.fused_clip
    monkeypatch.setattr(fused_clip, "fused_clip", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = _gpt(seq)
    ref = copy.deepcopy(model)
    x = torch.randint(0, 17, (8, seq))
    x[:, -2:] = 0  # padding tokens: the padding row of the tied embedding gets no gradient
    y = torch.randint(0, 17, (8, seq))
    got, engine = _step(model.to(DEVICE), x, y, seq_ce("mean"), "fused", batch=4, **CLIPPINGS[clipping])
    names = [n for n, _ in ref.named_parameters()]
    _check(got, _expected(ref, x, y, seq_ce("mean"), engine, names, expected_batch=4))
    # per-layer clipping: the block layers (their own groups) go through the fused launch pair as soon as
    # their gradient arrives; flat clipping never does (its factors need every layer's norm)
    n_block_linears = 2 * 4
    assert len(calls) == (n_block_linears if clipping == "per_layer" else 0)


def test_fused_equals_bk_on_the_same_model():
    model = _gpt(20)
    x, y = torch.randint(0, 17, (6, 20)), torch.randint(0, 17, (6, 20))
    grads = {mode: _step(copy.deepcopy(model).to(DEVICE), x, y, seq_ce("mean"), mode, batch=3,
                         max_grad_norm=0.05)[0] for mode in ("bk", "fused")}
    scale = max(float(g.abs().max()) for g in grads["bk"].values())
    for n in grads["bk"]:
        assert rel_err(grads["fused"][n], grads["bk"][n], scale) < 1e-5, n


def test_bf16_autocast_runs_fused_in_bf16_and_stays_close_to_bk():
    """Under autocast the kernels take the layer's own bf16 operands (the LayerNorm output a is rounded as
    the layer rounds it); bk promotes to fp32. Both are exact clippings of slightly different gradients."""
    if DEVICE == "cpu" and not hasattr(torch, "autocast"):
        pytest.skip("no autocast")
    model = _gpt(20)
    x, y = torch.randint(1, 17, (6, 20)), torch.randint(0, 17, (6, 20))

    def loss(o, t):
        return seq_ce("mean")(o.float(), t)

    out = {}
    for mode in ("bk", "fused"):
        m = copy.deepcopy(model).to(DEVICE)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            out[mode] = _step(m, x, y, loss, mode, batch=3, max_grad_norm=0.05)
    scale = max(float(g.abs().max()) for g in out["bk"][0].values())
    for n in out["bk"][0]:
        assert rel_err(out["fused"][0][n], out["bk"][0][n], scale) < 3e-2, n
    nb, nf = out["bk"][1].controller.last_norms, out["fused"][1].controller.last_norms
    assert float(((nf - nb).abs() / nb).max()) < 3e-2


def test_hf_gpt2_conv1d_matches_oracle():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=31, n_positions=24, n_embd=16, n_layer=1, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)

    class LogitsOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.hf = transformers.GPT2LMHeadModel(cfg)

        def forward(self, ids):
            return self.hf(input_ids=ids).logits

    torch.manual_seed(0)
    model = LogitsOnly()
    plan = {e.name: e.backend for e in fused.fused_plan(model)}
    assert plan["hf.transformer.h.0.attn.c_attn"] == "fused" and plan["hf.transformer.wte"] == "bk"
    ref = copy.deepcopy(model)
    x, y = torch.randint(1, 31, (4, 18)), torch.randint(0, 31, (4, 18))
    got, engine = _step(model.to(DEVICE), x, y, seq_ce("mean"), "fused", batch=2, max_grad_norm=0.1)
    names = [n for n, _ in ref.named_parameters()]
    _check(got, _expected(ref, x, y, seq_ce("mean"), engine, names, expected_batch=2))


def test_plan_says_which_layers_fall_back_and_make_private_warns():
    model = _gpt(7)
    plan = fused.fused_plan(model)
    backends = {e.name: e.backend for e in plan}
    assert backends["blocks.0.qkv"] == "fused" and backends["head"] == "fused"
    assert backends["tok"] == "bk" and backends["blocks.0.ln1"] == "bk"
    assert "embedding" in next(e.why for e in plan if e.name == "tok")
    ds = TensorDataset(torch.randint(0, 17, (8, 7)), torch.randint(0, 17, (8, 7)))
    with pytest.warns(fused.FusedFallbackWarning, match=r"run on the bk path(.|\n)*tok \(Embedding\)"):
        PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                     data_loader=DataLoader(ds, batch_size=4), noise_multiplier=1.0,
                                     max_grad_norm=1.0, grad_sample_mode="fused")


def test_no_cuda_and_no_interpreter_points_to_bk(monkeypatch):
    monkeypatch.setattr(_common, "INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ds = TensorDataset(torch.randn(8, 13), torch.randn(8, 5))
    model = _mlp()
    with pytest.raises(RuntimeError, match='CUDA GPU.*grad_sample_mode="bk".*TRITON_INTERPRET=1'):
        PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                     data_loader=DataLoader(ds, batch_size=4), noise_multiplier=1.0,
                                     max_grad_norm=1.0, grad_sample_mode="fused")


def test_no_triton_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    with pytest.raises(RuntimeError, match=r'pip install "dpengine\[cuda\]".*grad_sample_mode="bk"'):
        fused.check_runtime()
