"""Gaussian noise for the privatized gradient sum."""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor


def _noise_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the noise is drawn and summed in: float64 stays float64, everything else is float32, so a
    bf16/fp16 tensor never receives draws made (or summed) on a coarse low-precision grid."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


#: most values drawn at once: a draw fills a reused scratch buffer of this many values (16 MiB in float32,
#: twice that in secure mode), so noise for a large model costs two kernels per 4 M parameters rather than
#: a second, parameter-sized buffer that stays allocated
CHUNK = 1 << 22


def _packs(items: list[tuple[Tensor, int]], chunk: int | None = None) -> list[list[tuple[Tensor, int]]]:
    """Group tensors (with their index) into packs of at most ``chunk`` values, one draw each; a contiguous
    tensor larger than ``chunk`` is split into 1-D pieces of its own storage (in-place adds reach it)."""
    chunk = CHUNK if chunk is None else chunk
    packs: list[list[tuple[Tensor, int]]] = [[]]
    room = chunk
    for t, i in items:
        pieces = [t] if t.numel() <= chunk or not t.is_contiguous() else \
            [t.view(-1)[s:s + chunk] for s in range(0, t.numel(), chunk)]
        for piece in pieces:
            if piece.numel() > room and packs[-1]:
                packs.append([])
                room = chunk
            packs[-1].append((piece, i))
            room -= piece.numel()
    return [p for p in packs if p]


class GaussianNoise:
    """Adds N(0, std^2) noise, in place, from engine-owned generators (one per device).

    Where the randomness comes from:

    * default (``secure_mode=False``): one ``torch.Generator`` per device (Mersenne Twister on CPU, Philox
      on CUDA), seeded once with ``seed`` (or 63 bits from ``secrets`` when ``seed`` is None). Its state
      is in ``state_dict``, so a resumed run draws exactly what an uninterrupted one would. Anyone with
      the seed or a checkpoint can regenerate all noise: for research, not for deployment.
    * ``secure_mode=True``: every coordinate receives the sum of four independent N(0, std^2 / 4) draws,
      which blunts floating-point attacks on the low bits of a single Gaussian sample (Mironov 2012; the
      mitigation Opacus uses). Before *each* of the four draws of each flat buffer (all tensors of one
      device and noise dtype are drawn together), in every ``add_`` call, the
      device's generator is reseeded with ``secrets.randbits(64)``, i.e. from the OS CSPRNG
      (``os.urandom``). The torch generators themselves are not cryptographic, and the CPU one keeps only
      the low 32 bits of a seed (CUDA's Philox keeps 64), so the four fresh seeds per buffer and step are
      what makes the noise unpredictable: at least 128 bits, and nothing links one step's noise to
      another's. No seed or generator state exists to be saved; ``state_dict`` holds only
      ``{"secure_mode": True}``.

    Draws are standard normals made in float32 (float64 for float64 tensors) into one reused flat buffer per
    device and noise dtype, scaled, and added once with ``torch._foreach_add_``, whatever the tensor's dtype.

    Args:
        seed: seed for reproducible runs; must be None in secure mode.
        secure_mode: draw as described above, never from a seed.

    Raises:
        ValueError: a seed together with ``secure_mode=True``.

    Note on speed: drawing Gaussians is serial on CPU (about 2 ns per value here), a large share of a
    small model's step. A second thread did not help in a training step: the intra-op OpenMP workers
    still spin on the other core right after the backward.
    """

    def __init__(self, seed: int | None = None, secure_mode: bool = False) -> None:
        if secure_mode and seed is not None:
            raise ValueError(f"secure_mode=True draws its noise from the OS CSPRNG and cannot be seeded, so "
                             f"seed={seed!r} would be ignored. Drop the seed, or use secure_mode=False for a "
                             "reproducible (research, not deployment) run.")
        self.secure_mode = secure_mode
        self.seed: int | None = None if secure_mode else (secrets.randbits(63) if seed is None else int(seed))
        self._generators: dict[str, torch.Generator] = {}
        self._buffers: dict[tuple[str, torch.dtype, int], Tensor] = {}

    def _gen(self, device: torch.device) -> torch.Generator:
        """The device's generator; in secure mode freshly reseeded from the OS CSPRNG on every call."""
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = self._generators[key] = torch.Generator(device=device)
            if self.seed is not None:
                gen.manual_seed(self.seed)
        if self.secure_mode:
            gen.manual_seed(secrets.randbits(64))
        return gen

    def _scratch(self, device: torch.device, dtype: torch.dtype, numel: int, slot: int = 0) -> Tensor:
        """A reused buffer: fresh large allocations cost page faults on every step."""
        key = (str(device), dtype, slot)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._buffers[key] = torch.empty(numel, device=device, dtype=dtype)
        return buf[:numel]

    def _standard(self, device: torch.device, dtype: torch.dtype, numel: int) -> Tensor:
        """``numel`` standard normal values in a reused flat buffer: one draw, or in secure mode the sum of
        four draws (each from a freshly OS-seeded generator) halved, which is again N(0, 1)."""
        out = self._scratch(device, dtype, numel)
        out.normal_(0.0, 1.0, generator=self._gen(device))
        if self.secure_mode:
            extra = self._scratch(device, dtype, numel, slot=1)
            for _ in range(3):
                out.add_(extra.normal_(0.0, 1.0, generator=self._gen(device)))
            out.mul_(0.5)
        return out

    def add_(self, tensors: Sequence[Tensor], std: float | Tensor | Sequence[float]) -> None:
        """``t += N(0, std^2)`` elementwise, in place, for every tensor.

        ``std`` is a float, a 0-dim tensor (adaptive clipping's bound stays on the device: no host read), or
        one float per tensor. All tensors of one device and noise dtype get their noise from one draw into one
        flat buffer, added with one ``torch._foreach_add_``: a fixed number of kernels whatever the number of
        tensors. In secure mode each coordinate receives the sum of four independent N(0, std^2 / 4) draws.
        """
        per_tensor = isinstance(std, Sequence)
        if per_tensor and len(std) != len(tensors):
            raise ValueError(f"{len(std)} noise stds for {len(tensors)} tensors.")
        if not isinstance(std, Tensor) and (all(s == 0 for s in std) if per_tensor else std == 0):
            return
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, t in enumerate(tensors):
            groups.setdefault((t.device, _noise_dtype(t.dtype)), []).append(i)
        for (device, work), idx in groups.items():
            for pack in _packs([(tensors[i], i) for i in idx]):
                flat = self._standard(device, work, sum(t.numel() for t, _ in pack))
                views, offset = [], 0
                for t, _ in pack:
                    views.append(flat[offset:offset + t.numel()].view(t.shape))
                    offset += t.numel()
                ts = [t for t, _ in pack]
                if per_tensor:
                    torch._foreach_mul_(views, [float(std[i]) for _, i in pack])  # type: ignore[index]
                    torch._foreach_add_(ts, views)
                elif isinstance(std, Tensor):
                    flat.mul_(std.to(dtype=work) if std.device == device else std.to(device=device, dtype=work))
                    torch._foreach_add_(ts, views)
                else:
                    torch._foreach_add_(ts, views, alpha=float(std))

    def state_dict(self) -> dict:
        """Seed and generator states, so a resumed run continues the same noise stream; in secure mode
        only ``{"secure_mode": True}``: there is nothing that could regenerate past noise."""
        if self.secure_mode:
            return {"secure_mode": True}
        return {"seed": self.seed, "secure_mode": False,
                "generators": {d: g.get_state() for d, g in self._generators.items()}}

    def load_state_dict(self, sd: dict) -> None:
        """Restore a non-secure stream. Secure mode is never downgraded: a secure instance ignores a
        non-secure state (with a warning) and keeps drawing from the OS CSPRNG; a non-secure instance
        refuses a secure state, which has no stream to continue.

        Raises:
            ValueError: ``sd`` comes from secure mode and this instance is not.
        """
        if self.secure_mode:
            if not sd.get("secure_mode", False):
                warnings.warn("The noise state comes from a run without secure_mode; its seed and generator "
                              "states are ignored, and noise stays drawn from the OS CSPRNG.", stacklevel=2)
            return
        if sd.get("secure_mode", False):
            raise ValueError("This noise state comes from a secure_mode run; a non-secure engine would continue "
                             "it with predictable, seeded noise. Load it into PrivacyEngine(secure_mode=True) "
                             "(without a seed).")
        self.seed = int(sd["seed"])
        self._generators = {}
        for device, state in sd["generators"].items():
            self._gen(torch.device(device)).set_state(state)
