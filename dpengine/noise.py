"""Gaussian noise for the privatized gradient sum."""

from __future__ import annotations

import secrets

import torch
from torch import Tensor


class GaussianNoise:
    """Adds N(0, std^2) noise from engine-owned generators (one per device).

    Args:
        seed: seed for reproducible runs; ignored in secure mode.
        secure_mode: seed from the OS CSPRNG and draw each coordinate as the scaled sum of four normals,
            which blunts floating-point attacks on the low bits of a single Gaussian sample
            (Mironov 2012; the same mitigation Opacus uses).

    Note on speed: drawing Gaussians is serial on CPU (about 2 ns per value here), a large share of a
    small model's step. A second thread did not help in a training step: the intra-op OpenMP workers
    still spin on the other core right after the backward.
    """

    def __init__(self, seed: int | None = None, secure_mode: bool = False) -> None:
        self.secure_mode = secure_mode
        self.seed = secrets.randbits(63) if (secure_mode or seed is None) else int(seed)
        self._generators: dict[str, torch.Generator] = {}
        self._buffers: dict[tuple[str, torch.dtype], Tensor] = {}

    def _gen(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed)
            self._generators[key] = g
        return self._generators[key]

    def _scratch(self, device: torch.device, dtype: torch.dtype, numel: int) -> Tensor:
        """A reused buffer: fresh large allocations cost page faults on every step."""
        key = (str(device), dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._buffers[key] = torch.empty(numel, device=device, dtype=dtype)
        return buf[:numel]

    def add_(self, tensors: list[Tensor], std: float) -> None:
        """``t += N(0, std^2)`` elementwise, in place, for every contiguous tensor.

        In secure mode each coordinate receives the sum of four independent N(0, std^2 / 4) draws.
        """
        if std == 0:
            return
        draws, s = (4, std / 2) if self.secure_mode else (1, std)
        for t in tensors:
            gen = self._gen(t.device)
            buf = self._scratch(t.device, t.dtype, t.numel()).view_as(t)
            for _ in range(draws):
                t.add_(buf.normal_(0.0, s, generator=gen))

    def state_dict(self) -> dict:
        return {"seed": self.seed, "secure_mode": self.secure_mode,
                "generators": {d: g.get_state() for d, g in self._generators.items()}}

    def load_state_dict(self, sd: dict) -> None:
        self.seed, self.secure_mode = sd["seed"], sd["secure_mode"]
        self._generators = {}
        for device, state in sd["generators"].items():
            self._gen(torch.device(device)).set_state(state)
