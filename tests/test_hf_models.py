"""Hugging Face GPT-2 (with its Conv1D and tied head) and BERT, built from configs (random weights,
nothing downloaded), against the torch.func oracle, in float64."""

from __future__ import annotations

import pytest
import torch

from models import seq_ce
from oracle import flat_norms, oracle_per_sample, rel_err, run_controller

transformers = pytest.importorskip("transformers")

MODES = ["hooks", "ghost", "bk"]


class LogitsOnly(torch.nn.Module):
    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, ids):
        return self.hf(input_ids=ids).logits


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=31, n_positions=16, n_embd=8, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return LogitsOnly(transformers.GPT2LMHeadModel(cfg))


def _bert():
    cfg = transformers.BertConfig(vocab_size=29, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=16, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, pad_token_id=0)
    return LogitsOnly(transformers.BertForMaskedLM(cfg))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("build", [_gpt2, _bert], ids=["gpt2", "bert"])
def test_hf_model_per_sample_gradients(build, mode):
    model = build().double().train()
    vocab = model.hf.config.vocab_size
    x, y = torch.randint(1, vocab, (3, 7)), torch.randint(0, vocab, (3, 7))
    loss = seq_ce("mean")
    ps = oracle_per_sample(model, loss, x, y)
    w = torch.rand(3, dtype=torch.float64) + 0.5
    sums, norms = run_controller(model, loss, x, y, mode=mode, reduction="mean", factors=lambda n: w)
    assert rel_err(norms, flat_norms(ps)) <= 1e-10
    ref = {n: torch.einsum("b,b...->...", w, t) for n, t in ps.items()}
    scale = max(float(r.abs().max()) for r in ref.values())
    assert set(sums) == set(ref)
    for n, r in ref.items():
        assert rel_err(sums[n], r, scale) <= 1e-10, n


def test_gpt2_trains_under_bk_through_the_engine():
    from torch.utils.data import DataLoader, TensorDataset

    from dpengine import PrivacyEngine

    model = _gpt2().train()
    ds = TensorDataset(torch.randint(0, 31, (24, 8)), torch.randint(0, 31, (24, 8)))
    engine = PrivacyEngine(seed=0)
    model, opt, dl = engine.make_private(module=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
                                         data_loader=DataLoader(ds, batch_size=6), noise_multiplier=0.8,
                                         max_grad_norm=1.0, grad_sample_mode="bk")
    before = [p.detach().clone() for p in model.parameters()]
    for x, y in dl:
        opt.zero_grad()
        seq_ce("mean")(model(x), y).backward()
        opt.step()
    assert engine.accountant.total_steps == 4
    assert all(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
