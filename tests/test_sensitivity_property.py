"""Property: for random small models of supported layers, random modes and random supported call
patterns, removing one record changes the private release by at most C.

Every pattern drawn here is one dpengine supports, so a refusal is a failure as much as a sensitivity
above the bound: plain loop, calls to the model's submodules instead of the model, no-grad validation
passes (batch 64) between steps, batches of one record, and VirtualSteps with 2-3 chunks per logical
batch. See tests/sensitivity.py for how the release and the sensitivity are measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from dpengine import VirtualSteps
from sensitivity import BOUND, seeded, sensitivity

F64 = torch.float64
T, D, D_IN, V, K = 4, 6, 5, 9, 3
BLOCKS = ["linear", "conv1d", "layernorm", "groupnorm"]


@dataclass(frozen=True)
class Spec:
    tokens: bool  # integer token ids through an nn.Embedding, else float features through an nn.Linear
    pos: bool  # GPT-2 style position ids of shape (1, T) through an nn.Embedding (tokens only)
    tied: bool  # per-token logits from a head tied to the token embedding (tokens only)
    blocks: tuple[str, ...]


class Body(nn.Module):
    def __init__(self, spec: Spec):
        super().__init__()
        self.spec = spec
        if spec.tokens:
            self.emb = nn.Embedding(V, D)
            if spec.pos:
                self.pos = nn.Embedding(T, D)
        else:
            self.inp = nn.Linear(D_IN, D)
        layers = []
        for kind in spec.blocks:
            layers.append({"linear": lambda: nn.Linear(D, D), "conv1d": lambda: nn.Conv1d(D, D, 3, padding=1),
                           "layernorm": lambda: nn.LayerNorm(D), "groupnorm": lambda: nn.GroupNorm(2, D)}[kind]())
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> Tensor:
        if self.spec.tokens:
            h = self.emb(x)
            if self.spec.pos:
                h = h + self.pos(torch.arange(x.shape[1], device=x.device).unsqueeze(0))  # (1, T) ids
        else:
            h = torch.tanh(self.inp(x))
        for kind, layer in zip(self.spec.blocks, self.layers):
            if kind == "linear":
                h = torch.tanh(layer(h))
            elif kind == "conv1d":
                h = torch.tanh(layer(h.transpose(1, 2))).transpose(1, 2)
            elif kind == "groupnorm":
                h = layer(h.transpose(1, 2)).transpose(1, 2)
            else:
                h = layer(h)
        return h  # (B, T, D)


class PoolHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.out = nn.Linear(D, K)

    def forward(self, h: Tensor) -> Tensor:
        return self.out(h.mean(1))


class Net(nn.Module):
    def __init__(self, spec: Spec):
        super().__init__()
        self.body = Body(spec)
        if spec.tied:
            self.head = nn.Linear(D, V, bias=False)
            self.head.weight = self.body.emb.weight
        else:
            self.head = PoolHead()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def loss_fn(spec: Spec):
    if spec.tied:
        return lambda out, y: F.cross_entropy(out.reshape(-1, V), y.reshape(-1), reduction="sum")
    return lambda out, y: ((out - y) ** 2).sum()


def data(spec: Spec, n: int, seed: int, outlier: int) -> tuple[TensorDataset, Tensor]:
    g = torch.Generator().manual_seed(seed)
    if spec.tokens:
        x, xval = torch.randint(0, V, (n, T), generator=g), torch.randint(0, V, (64, T), generator=g)
    else:
        x, xval = torch.randn(n, T, D_IN, generator=g, dtype=F64), torch.randn(64, T, D_IN, generator=g, dtype=F64)
        x[outlier] *= 1e3  # far above any C
    if spec.tied:
        y = torch.randint(0, V, (n, T), generator=g)
    else:
        y = torch.randn(n, K, generator=g, dtype=F64) * (1e3 if spec.tokens else 1.0)
        y[outlier] *= 1e3
    return TensorDataset(x, y), xval


def step_fn(spec: Spec, *, submodules: bool, validate: bool, chunk: int | None, xval: Tensor):
    loss = loss_fn(spec)

    def call(model, x):
        return model.head(model.body(x)) if submodules else model(x)

    def step(model, opt, loader):
        for _ in range(2):  # two private steps (lr = 0: the same release twice)
            if validate:
                with torch.no_grad():
                    model(xval)  # a validation pass of batch 64 before the step
            it = loader if chunk is None else VirtualSteps(loader, max_physical_batch_size=chunk, optimizer=opt)
            for x, y in it:
                opt.zero_grad()
                loss(call(model, x), y).backward()
                opt.step()

    return step


specs = st.builds(
    lambda tokens, pos, tied, blocks: Spec(tokens, tokens and pos, tokens and tied, tuple(blocks)),
    st.booleans(), st.booleans(), st.booleans(), st.lists(st.sampled_from(BLOCKS), min_size=0, max_size=3))


# No shrinking: a failing example is reported as drawn (every argument is small already), and a failing
# run stays as fast as a passing one (~10 s) instead of spending minutes shrinking.
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          phases=[Phase.explicit, Phase.reuse, Phase.generate])
# a stale batch size from a validation pass, then submodule calls on a batch of one (with (1, T) position ids)
@example(spec=Spec(tokens=True, pos=True, tied=False, blocks=("linear",)), mode="bk", n=1, chunks=None,
         submodules=True, validate=True, C=0.05, seed=0, drop=0)
@given(spec=specs, mode=st.sampled_from(["hooks", "ghost", "bk"]), n=st.sampled_from([1, 1, 2, 3, 5, 6]),
       chunks=st.sampled_from([None, None, 2, 3]), submodules=st.booleans(), validate=st.booleans(),
       C=st.sampled_from([0.05, 1.0]), seed=st.integers(0, 2**16), drop=st.integers(0, 5))
def test_removing_one_record_moves_the_release_by_at_most_C(spec, mode, n, chunks, submodules, validate, C, seed,
                                                           drop):
    drop %= n
    ds, xval = data(spec, n, seed, outlier=drop)
    chunk = None if chunks is None or n < 2 else math.ceil(n / chunks)
    step = step_fn(spec, submodules=submodules, validate=validate, chunk=chunk, xval=xval)
    s = sensitivity(seeded(lambda: Net(spec).to(F64), seed), ds, step_fn=step, mode=mode, C=C, drop=drop)
    assert s <= BOUND, f"sensitivity {s:.6g} C"
