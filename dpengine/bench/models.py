"""The benchmarked networks. Every model is Opacus-compatible (no tied weights, no in-place ops,
every per-sample-trainable layer is nn.Linear / nn.Conv2d / nn.GroupNorm / nn.LayerNorm / nn.Embedding, or
an nn.LSTM / nn.MultiheadAttention that both libraries swap for their own equivalent: ``swap_layers``).

``build(name, params)`` returns a :class:`Workload`: the model, a batch factory and the loss.
Shapes in comments use B = batch, T = sequence length, D = width, V = vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------------------- MLP


class MLP(nn.Module):
    """784-512-512-10 (by default): x (B, 784) -> logits (B, 10)."""

    def __init__(self, sizes: tuple[int, ...] = (784, 512, 512, 10)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ----------------------------------------------------------------------------------------- CNN


class CNN(nn.Module):
    """3 x (conv3x3 -> GroupNorm -> ReLU -> maxpool 2) then a linear head.

    x (B, 3, 32, 32) -> (B, c1, 16, 16) -> (B, c2, 8, 8) -> (B, c3, 4, 4) -> flatten (B, 16*c3) -> (B, 10)
    """

    def __init__(self, channels: tuple[int, int, int] = (32, 64, 128), groups: int = 8, classes: int = 10,
                 image: int = 32) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        c_in = 3
        for c in channels:
            blocks += [nn.Conv2d(c_in, c, 3, padding=1), nn.GroupNorm(min(groups, c), c), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c
        self.features = nn.Sequential(*blocks)
        side = image // 2 ** len(channels)
        self.head = nn.Linear(c_in * side * side, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


# ---------------------------------------------------------------------------------- GPT-like


class Attention(nn.Module):
    """Causal multi-head self-attention from nn.Linear + F.scaled_dot_product_attention."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        assert d % heads == 0, "d must be divisible by heads"
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)  # (B, T, D) -> (B, T, 3D)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)  # 3 x (B, T, D)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))  # (B, H, T, D/H)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D/H)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))  # (B, T, D)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x)) with a 4D GELU MLP."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)  # (B, T, D) -> (B, T, 4D)
        self.out = nn.Linear(4 * d, d)  # (B, T, 4D) -> (B, T, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """Decoder-only LM: tokens (B, T) -> logits (B, T, V). Learned position embedding (nn.Embedding,
    looked up with a (B, T) index so every layer sees the batch dimension) and an untied lm head."""

    def __init__(self, vocab: int = 8192, seq_len: int = 128, d: int = 256, layers: int = 4, heads: int = 4) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.tok = nn.Embedding(vocab, d)  # (B, T) -> (B, T, D)
        self.pos = nn.Embedding(seq_len, d)  # (B, T) -> (B, T, D)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)  # (B, T, D) -> (B, T, V), not tied to self.tok

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        b, t = idx.shape
        # (B, T), contiguous: Opacus' ghost embedding norm calls .view on the index
        positions = torch.arange(t, device=idx.device).unsqueeze(0).expand(b, t).contiguous()
        x = self.tok(idx) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class HFCausalLM(nn.Module):
    """Hugging Face GPT2LMHeadModel built from a config (random weights, nothing downloaded):
    tokens (B, T) -> logits (B, T, V). Embeddings untied."""

    def __init__(self, vocab: int = 8192, seq_len: int = 128, d: int = 256, layers: int = 4, heads: int = 4) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(vocab_size=vocab, n_positions=seq_len, n_embd=d, n_layer=layers, n_head=heads,
                         tie_word_embeddings=False, bos_token_id=vocab - 1, eos_token_id=vocab - 1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        self.lm = GPT2LMHeadModel(cfg)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=idx, use_cache=False).logits


# ----------------------------------------------------------------- torch attention / recurrent layers


class LSTMClassifier(nn.Module):
    """Text classifier on a plain ``nn.LSTM``: tokens (B, T) -> embedding (B, T, D) -> LSTM (batch-first,
    ``layers`` deep) -> last layer's h_n (B, H) -> logits (B, classes). Private modes train it after a layer
    swap (dpengine.fix -> DPLSTM; Opacus' ModuleValidator.fix -> its DPLSTM)."""

    def __init__(self, vocab: int = 1000, seq_len: int = 50, d: int = 64, hidden: int = 128, layers: int = 1,
                 classes: int = 10) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.emb = nn.Embedding(vocab, d)  # (B, T) -> (B, T, D)
        self.lstm = nn.LSTM(d, hidden, num_layers=layers, batch_first=True)  # -> (B, T, H), h_n (L, B, H)
        self.head = nn.Linear(hidden, classes)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.lstm(self.emb(idx))
        return self.head(h[-1])  # (B, classes)


class MHABlock(nn.Module):
    """Pre-norm block with ``nn.MultiheadAttention`` (batch-first, causal float mask, no weights returned)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]  # (B, T, D)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class MHATransformer(nn.Module):
    """Decoder-only LM built with ``nn.MultiheadAttention``: tokens (B, T) -> logits (B, T, V). Private modes
    train it after a layer swap (dpengine.fix -> DPMultiheadAttention; Opacus -> its DPMultiheadAttention)."""

    def __init__(self, vocab: int = 1000, seq_len: int = 64, d: int = 128, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq_len, d)
        self.blocks = nn.ModuleList(MHABlock(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        b, t = idx.shape
        positions = torch.arange(t, device=idx.device).unsqueeze(0).expand(b, t).contiguous()
        x = self.tok(idx) + self.pos(positions)
        mask = torch.triu(torch.full((t, t), float("-inf"), device=idx.device), diagonal=1)  # (T, T) causal
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln_f(x))


# --------------------------------------------------------------------------------- registry


@dataclass
class Workload:
    """What the worker needs: the model, ``batch(B, generator, device) -> (x, y)`` and
    ``loss(output, y)`` (mean over the batch). ``sequence`` is True for (B, T, V) token-level outputs."""

    model: nn.Module
    batch: Callable[[int, torch.Generator, torch.device], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    sequence: bool = False
    #: the model holds torch layers each library swaps before private training (dpengine.fix, Opacus'
    #: ModuleValidator.fix); non-private runs keep torch's own fused layers
    swap_layers: bool = False


def _classification(model: nn.Module, x_shape: tuple[int, ...], classes: int) -> Workload:
    def batch(b: int, g: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn((b, *x_shape), generator=g)
        y = torch.randint(0, classes, (b,), generator=g)
        return x.to(device), y.to(device)

    return Workload(model, batch, lambda out, y: F.cross_entropy(out, y))


def _language(model: nn.Module, vocab: int, seq_len: int) -> Workload:
    def batch(b: int, g: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.randint(0, vocab, (b, seq_len + 1), generator=g)
        return tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)

    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # (B, T, V), (B, T)
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    return Workload(model, batch, loss, sequence=True)


def _mlp(sizes: list[int] | tuple[int, ...] = (784, 512, 512, 10)) -> Workload:
    sizes = tuple(int(s) for s in sizes)
    return _classification(MLP(sizes), (sizes[0],), sizes[-1])


def _cnn(channels: list[int] | tuple[int, ...] = (32, 64, 128), groups: int = 8, image: int = 32) -> Workload:
    return _classification(CNN(tuple(channels), groups, 10, image), (3, image, image), 10)  # type: ignore[arg-type]


def _gpt(**kw: Any) -> Workload:
    model = GPT(**kw)
    return _language(model, model.tok.num_embeddings, model.seq_len)


def _hf_gpt2(**kw: Any) -> Workload:
    model = HFCausalLM(**kw)
    return _language(model, kw.get("vocab", 8192), kw.get("seq_len", 128))


def _lstm(**kw: Any) -> Workload:
    model = LSTMClassifier(**kw)
    vocab, classes = model.emb.num_embeddings, model.head.out_features

    def batch(b: int, g: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randint(0, vocab, (b, model.seq_len), generator=g)
        return x.to(device), torch.randint(0, classes, (b,), generator=g).to(device)

    return Workload(model, batch, lambda out, y: F.cross_entropy(out, y), swap_layers=True)


def _mha(**kw: Any) -> Workload:
    model = MHATransformer(**kw)
    work = _language(model, model.tok.num_embeddings, model.seq_len)
    work.swap_layers = True
    return work


GPT2_SMALL = dict(vocab=50257, seq_len=1024, d=768, layers=12, heads=12)  # ~124M params with untied head (~163M)

# name -> (factory, default params, description)
MODELS: dict[str, tuple[Callable[..., Workload], dict[str, Any], str]] = {
    "mlp": (_mlp, {}, "MLP 784-512-512-10"),
    "cnn": (_cnn, {}, "CNN 3 conv + GroupNorm, 32x32x3, 10 classes"),
    "gpt": (_gpt, {}, "GPT-like 4 layers, d 256, 4 heads, T 128, vocab 8192"),
    "gpt2-small": (_gpt, GPT2_SMALL, "GPT-2 small shape: 12 layers, d 768, 12 heads, T 1024, vocab 50257 (GPU)"),
    "gpt2-medium": (_gpt, dict(GPT2_SMALL, seq_len=512, d=1024, layers=24, heads=16),
                    "GPT-2 medium shape at T 512: 24 layers, d 1024, 16 heads, vocab 50257 (GPU)"),
    "hf-gpt2": (_hf_gpt2, {}, "transformers GPT2LMHeadModel from a config, 4 layers, d 256, T 128 (untied)"),
    "lstm": (_lstm, {}, "nn.LSTM text classifier: vocab 1000, d 64, hidden 128, T 50 (private: layer swapped)"),
    "mha-transformer": (_mha, {}, "LM from nn.MultiheadAttention, 2 layers, d 128, 4 heads, T 64, vocab 1000 "
                                  "(private: layer swapped)"),
}


def build(name: str, params: dict[str, Any] | None = None) -> Workload:
    """Build model ``name`` with ``params`` overriding its defaults (e.g. ``{"seq_len": 64}``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    factory, defaults, _ = MODELS[name]
    return factory(**{**defaults, **(params or {})})


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def describe(name: str) -> str:
    return MODELS[name][2]


__all__ = ["MLP", "CNN", "GPT", "HFCausalLM", "LSTMClassifier", "MHATransformer", "Workload", "MODELS", "build", "n_params", "describe"]
