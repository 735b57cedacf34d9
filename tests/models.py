"""Small float64 models covering every handler, for the oracle tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TinyGPT(nn.Module):
    """GPT-style: token + position embeddings (expanded position ids), pre-norm attention built from
    nn.Linear, an MLP, and an output head tied to the token embedding."""

    def __init__(self, vocab: int = 11, d: int = 8, heads: int = 2, layers: int = 2, max_len: int = 16,
                 padding_idx: int | None = 0, tie: bool = True):
        super().__init__()
        self.tok = nn.Embedding(vocab, d, padding_idx=padding_idx)
        self.pos = nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList([Block(d, heads) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.head.weight = self.tok.weight

    def forward(self, idx: Tensor) -> Tensor:
        b, t = idx.shape
        pos_ids = torch.arange(t, device=idx.device).unsqueeze(0).expand(b, t)  # non-contiguous
        x = self.tok(idx) + self.pos(pos_ids)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))  # (B, T, vocab)


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.RMSNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))  # (B, nh, T, hs)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(att)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyCNN(nn.Module):
    def __init__(self, dim: int = 2, classes: int = 3):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
        inorm = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dim]
        self.c1 = conv(3, 6, 3, stride=2, padding=1)
        self.n1 = nn.GroupNorm(3, 6)
        self.c2 = conv(6, 6, 3, padding="same", dilation=2, groups=3, padding_mode="reflect" if dim < 3 else "zeros")
        self.n2 = inorm(6, affine=True)
        self.c3 = conv(6, 4, 2, padding=1, padding_mode="circular", bias=False)
        self.c4 = conv(4, 4, 2, padding="same")  # even kernel: asymmetric 'same' padding
        self.fc = nn.Linear(4, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.n1(self.c1(x)), inplace=True)
        x = torch.tanh(self.n2(self.c2(x)))
        x = self.c4(F.relu(self.c3(x)))
        return self.fc(x.flatten(2).mean(2))


class ScaleShift(nn.Module):
    """A layer with no dedicated handler: exercised through the torch.func fallback."""

    def __init__(self, d: int):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(d))
        self.shift = nn.Parameter(torch.randn(d))

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(x * self.scale + self.shift)  # sigmoid saves its output


class SharedLayerNet(nn.Module):
    """One Linear applied twice, plus a fallback layer and a PReLU."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.shared = nn.Linear(6, 6)
        self.ss = ScaleShift(6)
        self.act = nn.PReLU()
        self.out = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.inp(x))
        h = self.shared(self.ss(self.shared(h)))
        return self.out(h)


def seq_ce(reduction: str):
    def loss(logits: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction=reduction)
    return loss
