"""Per-sample gradients that handlers form as rows anyway, reduced together.

A bias, a norm layer's scale and shift: their per-sample gradients are (B, n) rows, materialized by every
method. Reduced one parameter at a time, each costs a norm reduction and a matrix-vector product (and
their views), so the dozens of biases and norm parameters of a transformer make a large share of a private
step's small operators (kernel launches on a GPU). A ``RowPack`` collects such parameters of one clipping
group: the handlers write their rows into column blocks of one (B, N) matrix (``write_rows``), and the
pack then forms all their squared norms in one reduction and all their clipped sums in one matrix-vector
product. The values are those of the per-parameter path up to float rounding (the same sums of squares
and products, added in another order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .ledger import SumBuckets, accumulate
from .registry import Record

#: A pack costs about 9 operators (allocation, two splits, a slice, the norm reduction, the product and one
#: copy into the parameters' slots). It replaces 4 per parameter whose norm it forms (a reduction and a
#: matrix-vector product, two operators each) and 2 per parameter it only sums: formed when that is at
#: least this many, so that a pack never adds operators (one layer's bias alone stays on its own path).
MIN_SAVING = 10


@dataclass
class _Entry:
    tl: Any  # controller.TrackedLayer
    rec: Record
    name: str
    param: nn.Parameter
    norm: bool  # its squared norm comes from the pack (False: the handler's norm_sq covers it)


class RowPack:
    """Parameters of one clipping group (and one dtype and device) whose per-sample rows share a matrix."""

    def __init__(self) -> None:
        self.entries: list[_Entry] = []
        self.matrix: Tensor | None = None
        self.n_norm = 0  # columns whose squared norms the pack forms (they come first)

    def add(self, tl: Any, rec: Record, name: str, param: nn.Parameter, norm: bool) -> None:
        self.entries.append(_Entry(tl, rec, name, param, norm))

    def worth_it(self) -> bool:
        return sum(4 if e.norm else 2 for e in self.entries) >= MIN_SAVING

    def write(self, batch: int, dtype: torch.dtype, device: torch.device) -> None:
        """Allocate the (B, N) matrix and have each handler write its rows into its column blocks."""
        self.entries.sort(key=lambda e: not e.norm)  # stable: the norm columns first, in the order added
        sizes = [e.param.numel() for e in self.entries]
        self.n_norm = sum(s for s, e in zip(sizes, self.entries) if e.norm)
        self.matrix = torch.empty(batch, sum(sizes), dtype=dtype, device=device)
        per_record: dict[int, tuple[Any, Record, dict[str, Tensor]]] = {}
        for e, block in zip(self.entries, self.matrix.split(sizes, 1)):
            view = block if e.param.dim() == 1 else block.view(batch, *e.param.shape)
            per_record.setdefault(id(e.rec), (e.tl, e.rec, {}))[2][e.name] = view
        for tl, rec, out in per_record.values():
            tl.handler.write_rows(tl.module, rec, out)

    def norm_sq(self) -> Tensor | None:
        """(B,) the summed squared norms of the parameters whose norms the pack forms (None if none)."""
        m = self.matrix
        if m is None or self.n_norm == 0:
            return None
        m = m if self.n_norm == m.shape[1] else m[:, :self.n_norm]
        return (m * m).sum(1)

    def sums(self, c: Tensor) -> list[tuple[nn.Parameter, Tensor]]:
        """sum_i c_i row_i for every parameter, as flat (numel,) pieces of one product."""
        assert self.matrix is not None
        flat = torch.mv(self.matrix.t(), c.to(self.matrix.dtype))
        return list(zip((e.param for e in self.entries), flat.split([e.param.numel() for e in self.entries])))


def accumulate_pieces(into: dict[nn.Parameter, Tensor], pieces: list[tuple[nn.Parameter, Tensor]],
                      buckets: SumBuckets | None) -> None:
    """``into[p] += piece`` for flat pieces (``ledger.accumulate``), the copies of first contributions into
    their bucket slots done by one multi-tensor copy."""
    deferred: list[tuple[Tensor, Tensor]] = []
    for p, t in pieces:
        accumulate(into, p, t if p.dim() == 1 else t.view(p.shape), buckets, deferred)
    if deferred:
        torch._foreach_copy_([slot for slot, _ in deferred], [t for _, t in deferred])
