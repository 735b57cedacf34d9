"""Gaussian noise for the privatized gradient sum."""

from __future__ import annotations

import secrets

import torch
from torch import Tensor


class GaussianNoise:
    """Draws N(0, std^2) noise from engine-owned generators (one per device).

    Args:
        seed: seed for reproducible runs; ignored in secure mode.
        secure_mode: seed from the OS CSPRNG and draw each coordinate as the scaled sum of four normals,
            which blunts floating-point attacks on the low bits of a single Gaussian sample
            (Mironov 2012; the same mitigation Opacus uses).
    """

    def __init__(self, seed: int | None = None, secure_mode: bool = False) -> None:
        self.secure_mode = secure_mode
        self.seed = secrets.randbits(63) if (secure_mode or seed is None) else int(seed)
        self._generators: dict[torch.device, torch.Generator] = {}

    def _gen(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed)
            self._generators[device] = g
        return self._generators[device]

    def add_to(self, t: Tensor, std: float) -> Tensor:
        """``t += N(0, std^2)`` elementwise, in place; returns ``t``."""
        if std == 0:
            return t
        gen = self._gen(t.device)
        if self.secure_mode:
            n = torch.empty_like(t)
            for _ in range(4):  # sum of four N(0, std^2 / 4)
                t.add_(n.normal_(0.0, std / 2, generator=gen))
            return t
        return t.add_(torch.empty_like(t).normal_(0.0, std, generator=gen))

    def state_dict(self) -> dict:
        return {"seed": self.seed, "secure_mode": self.secure_mode,
                "generators": {str(d): g.get_state() for d, g in self._generators.items()}}

    def load_state_dict(self, sd: dict) -> None:
        self.seed, self.secure_mode = sd["seed"], sd["secure_mode"]
        self._generators = {}
        for d, state in sd["generators"].items():
            self._gen(torch.device(d)).set_state(state)
