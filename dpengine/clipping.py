"""Clipping policies: per-sample norms -> per-sample factors, and the sensitivity noise is scaled to.

A policy decides *what* is clipped; the grad-sample backend decides *how* norms and clipped sums are
computed. The controller hands a policy the per-sample norms of each of its *groups* of parameters,
shape (K, B), and scales each group's per-sample gradients by the factors it returns, shape (K, B):
one group for flat clipping, one per parameter tensor (or module, or user group) for per-layer
clipping. Every policy states its sensitivity (the L2 sensitivity of the clipped sum under add/remove
adjacency, in the units of one sample's gradient), so no caller recomputes it from flags.

Policies with state between steps (adaptive's clip bound) update it in ``after_step``, called by the
optimizer once per logical step after the noise is drawn.
"""

from __future__ import annotations

import enum
import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from ._validate import in_range, positive


class ClippingMode(enum.Enum):
    FLAT = "flat"
    PER_LAYER = "per_layer"
    AUTOMATIC = "automatic"
    ADAPTIVE = "adaptive"
    ERROR_FEEDBACK = "error_feedback"
    LIPSCHITZ = "lipschitz"


def _positive_float(policy: Any, name: str, value: Any) -> float:
    positive(**{name: value})
    return float(value)


class _Setting:
    """A policy setting that enters its factors or its sensitivity (and so the noise): one stored value, read
    by both. An assigned value is validated (``check(policy, name, value)`` returns the value to store), and
    an assignment is refused while clipped sums formed with the old value wait for their step (their noise
    would follow the new one). A ``fixed`` setting is set once, by ``__init__``."""

    def __init__(self, check: Callable[[Any, str, Any], Any] = _positive_float, *, fixed: bool = False) -> None:
        self.check, self.fixed = check, fixed

    def __set_name__(self, owner: type, name: str) -> None:
        self.name, self.slot = name, "_" + name

    def __get__(self, policy: Any, owner: type | None = None) -> Any:
        return self if policy is None else policy.__dict__[self.slot]

    def __set__(self, policy: Any, value: Any) -> None:
        if self.slot in policy.__dict__:
            if self.fixed:
                raise AttributeError(f"{type(policy).__name__}.{self.name} is fixed at make_private (the release "
                                     "and the sensitivity both use it); call make_private again to change it.")
            policy.check_between_steps(self.name)
        policy.__dict__[self.slot] = self.check(policy, self.name, value)
        policy._changed(self.name)


class ClippingPolicy:
    """Base class: one group holding every parameter. Subclasses set the groups and the factor rule.

    Settings that enter the factors or the sensitivity (``max_grad_norm``, per-layer ``thresholds``, ...) may
    be assigned between steps: both the clipping and the noise read the one stored value. An assignment
    between a backward and its step is refused (``check_between_steps``)."""

    #: the controller also forms the unclipped sum (error feedback needs it)
    needs_unclipped: bool = False
    #: subsampling amplifies this mode's privacy (False: the accountant records sample rate 1)
    amplified: bool = True
    #: a group's factors depend only on that group's norms (and the policy keeps no state in factors)
    separable: bool = False

    def __init__(self) -> None:
        self._group: dict[int, int] = {}
        self.num_groups = 1
        self._source: Callable[[], Any] | None = None  # weak reference to the gradient source (see bind)

    def bind(self, source: Any) -> None:
        """The private optimizer's gradient source (a ``BatchLedger``): while it holds clipped sums that wait
        for a step, the settings cannot change. Held weakly (the source holds the policy)."""
        self._source = weakref.ref(source)

    def check_between_steps(self, name: str) -> None:
        """Refuse changing ``name`` while this step's gradients, clipped with its current value, await noise."""
        source = self._source() if self._source is not None else None
        if source is not None and source.batches_accumulated:
            raise RuntimeError(
                f"{name} cannot change between a backward and its step: this step's gradients were already "
                "clipped with the current value, and the step's noise would follow the new one. Change it after "
                "optimizer.step() (or after optimizer.zero_grad(), which drops this step's gradients).")

    def _changed(self, name: str) -> None:
        """A setting was assigned (a policy drops what it derived from the old value)."""

    def group(self, p: nn.Parameter) -> int:
        """The group index of a tracked parameter."""
        return self._group.get(id(p), 0)

    @property
    def sensitivity(self) -> float:
        raise NotImplementedError

    def factors(self, norms: Tensor) -> Tensor:
        """(K, B) per-group per-sample norms -> (K, B) factors."""
        raise NotImplementedError

    def grad_noise_multiplier(self, noise_multiplier: float) -> float:
        """The noise multiplier of the gradient's Gaussian (adaptive spends part of sigma on its count)."""
        return noise_multiplier

    def noise_stds(self, params: list[nn.Parameter], noise_multiplier: float) -> list[float]:
        """The noise std for each parameter's sum (in the units of one sample's gradient): sigma times the
        sensitivity for all, unless a policy allocates it per parameter (Lipschitz)."""
        return [self.grad_noise_multiplier(noise_multiplier) * self.sensitivity] * len(params)

    def combine(self, sums: list[tuple[nn.Parameter, Tensor]], unclipped: dict[nn.Parameter, Tensor],
                mean_scale: float) -> None:
        """Turn the clipped sums into the released (pre-noise) sums, in place. ``mean_scale`` is the expected
        batch size times the output scale (1 for a mean-reduced loss, E[B] for a sum). Default: unchanged."""

    def after_step(self, noise: Any, expected_batch_size: float) -> None:
        """Update state once per logical step (after the step's noise is drawn)."""

    def discard(self) -> None:
        """The step's clipped sums were dropped (``zero_grad``, a refused or masked step): drop whatever per-step
        statistic ``factors`` formed with them, so that it is never released with a later step."""

    def state_dict(self, params: list[nn.Parameter]) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any], params: list[nn.Parameter]) -> None:
        pass


def _clip(norms: Tensor, c: float | Tensor) -> Tensor:
    """min(1, c / (norm + 1e-6)) as in Opacus: every clipped gradient has norm < c."""
    return (c / (norms + 1e-6)).clamp(max=1.0)


class FlatClipping(ClippingPolicy):
    """Clip each sample's whole gradient (all trainable parameters together) to norm ``max_grad_norm``.

    Factor ``min(1, C / (||g_i|| + 1e-6))`` as in Opacus; every clipped gradient has norm <= C, so the
    L2 sensitivity of the sum under add/remove-one adjacency is C.
    """

    max_grad_norm = _Setting()

    def __init__(self, max_grad_norm: float) -> None:
        super().__init__()
        self.max_grad_norm = max_grad_norm

    @property
    def sensitivity(self) -> float:
        return self.max_grad_norm

    def factors(self, norms: Tensor) -> Tensor:
        return _clip(norms, self.max_grad_norm)


class PerLayerClipping(ClippingPolicy):
    """Clip each group of parameters on its own: sample i's gradient restricted to group l gets norm at
    most C_l. The sum over groups then has norm at most sqrt(sum_l C_l^2): the sensitivity.

    Args:
        groups: one list of parameters per group (every tracked parameter in exactly one).
        thresholds: C_l per group.
    """

    def _check_thresholds(self, name: str, thresholds: Sequence[float]) -> tuple[float, ...]:
        if len(thresholds) != self.num_groups:
            raise ValueError(f"{self.num_groups} groups but {len(thresholds)} thresholds.")
        for t in thresholds:
            positive(max_grad_norm=t)
        return tuple(float(t) for t in thresholds)

    #: C_l per group, a tuple: assign a new sequence to change them (the factors' cached tensor follows)
    thresholds = _Setting(_check_thresholds)

    def __init__(self, groups: list[list[nn.Parameter]], thresholds: Sequence[float]) -> None:
        super().__init__()
        self.num_groups = len(groups)
        self._group = {id(p): k for k, ps in enumerate(groups) for p in ps}
        self._c: Tensor | None = None  # the thresholds as a (K, 1) tensor on the norms' device
        self.thresholds = thresholds

    separable = True

    def _changed(self, name: str) -> None:
        self._c = None

    @property
    def sensitivity(self) -> float:
        return math.sqrt(sum(t * t for t in self.thresholds))

    def factors(self, norms: Tensor) -> Tensor:
        if self._c is None or self._c.device != norms.device or self._c.dtype != norms.dtype:
            self._c = torch.tensor(self.thresholds, device=norms.device, dtype=norms.dtype).unsqueeze(1)
        return _clip(norms, self._c)


class AutomaticClipping(ClippingPolicy):
    """Automatic clipping (normalization; Bu et al., AUTO-S): factor C / (||g_i|| + gamma).

    Every sample's contribution has norm C ||g_i|| / (||g_i|| + gamma) < C, so the sensitivity is C;
    small gradients are scaled up rather than passed through, which removes the threshold as a
    hyperparameter (C only scales the learning rate).
    """

    max_grad_norm = _Setting()
    stability_constant = _Setting()

    def __init__(self, max_grad_norm: float, stability_constant: float = 0.01) -> None:
        super().__init__()
        self.max_grad_norm, self.stability_constant = max_grad_norm, stability_constant

    @property
    def sensitivity(self) -> float:
        return self.max_grad_norm

    def factors(self, norms: Tensor) -> Tensor:
        return self.max_grad_norm / (norms + self.stability_constant)


class AdaptiveClipping(FlatClipping):
    """Quantile-based adaptive clipping (Andrew et al. 2021; Opacus' AdaClip): flat clipping whose bound
    follows the ``target_unclipped_quantile`` of the per-sample norms.

    Each step, b = (sum_i (1[||g_i|| <= C] - 1/2) + N(0, s_b^2)) / E[B] + 1/2 estimates the fraction of
    unclipped samples (centred indicators: adding or removing a sample moves the sum by 1/2), and the
    bound moves geometrically, C <- clamp(C * exp(-eta (b - target)), min, max). The count is a second
    Gaussian mechanism on the same batch: with the gradient noised at sigma_g * C and the count at s_b,
    the pair is exactly one Gaussian mechanism with 1 / sigma^2 = 1 / sigma_g^2 + 1 / (2 s_b)^2. So the
    accountant is told sigma and the gradient gets sigma_g = (sigma^-2 - (2 s_b)^-2)^(-1/2) > sigma.
    """

    def __init__(self, max_grad_norm: float, *, target_unclipped_quantile: float = 0.5,
                 clipbound_learning_rate: float = 0.2, max_clipbound: float = 1e8, min_clipbound: float = 1e-8,
                 unclipped_num_std: float) -> None:
        super().__init__(max_grad_norm)
        in_range(0.0, 1.0, target_unclipped_quantile=target_unclipped_quantile)
        positive(clipbound_learning_rate=clipbound_learning_rate, max_clipbound=max_clipbound,
                 min_clipbound=min_clipbound, unclipped_num_std=unclipped_num_std)
        if not min_clipbound <= max_grad_norm <= max_clipbound:
            raise ValueError(f"max_grad_norm={max_grad_norm} must lie in [min_clipbound, max_clipbound] = "
                             f"[{min_clipbound}, {max_clipbound}].")
        self.target = float(target_unclipped_quantile)
        self.lr = float(clipbound_learning_rate)
        self.max_clipbound, self.min_clipbound = float(max_clipbound), float(min_clipbound)
        self.unclipped_num_std = float(unclipped_num_std)
        self._unclipped: Tensor | None = None  # sum of centred indicators over this step's batches

    def grad_noise_multiplier(self, noise_multiplier: float) -> float:
        if noise_multiplier == 0:
            return 0.0  # no privacy claimed (the accountant reports infinite epsilon)
        rest = noise_multiplier ** -2 - (2 * self.unclipped_num_std) ** -2
        if rest <= 0:
            raise ValueError(
                f"adaptive clipping: the count's noise (unclipped_num_std={self.unclipped_num_std:g}) alone spends "
                f"more than noise_multiplier={noise_multiplier:g} allows (it needs unclipped_num_std > "
                f"noise_multiplier / 2 = {noise_multiplier / 2:g}). "
                "Raise unclipped_num_std (Andrew et al. suggest about expected batch size / 20) or the noise.")
        return rest ** -0.5

    # The bound lives on the device as a 0-dim float64 tensor once the first batch is clipped, so the step
    # never reads it (or the count) back to the host; ``max_grad_norm`` and ``sensitivity`` read it on request.
    @property
    def max_grad_norm(self) -> float:  # type: ignore[override]
        """The current clip bound (a host read of the device bound: for logging, not inside the step)."""
        return float(self._bound) if isinstance(self._bound, Tensor) else self._bound

    @max_grad_norm.setter
    def max_grad_norm(self, value: float) -> None:
        value = _positive_float(self, "max_grad_norm", value)
        if "_bound" in self.__dict__:
            self.check_between_steps("max_grad_norm")
        self._bound: float | Tensor = value

    def _bound_on(self, device: torch.device) -> Tensor:
        if not isinstance(self._bound, Tensor):
            self._bound = torch.tensor(self._bound, dtype=torch.float64, device=device)
        elif self._bound.device != device:
            self._bound = self._bound.to(device)
        return self._bound

    def noise_stds(self, params: list[nn.Parameter], noise_multiplier: float) -> list[Any]:
        """sigma_g times the current bound, as a device tensor once the bound lives there (no host read)."""
        sigma = self.grad_noise_multiplier(noise_multiplier)
        std = sigma * self._bound if isinstance(self._bound, Tensor) else sigma * self.sensitivity
        return [std] * len(params)

    def factors(self, norms: Tensor) -> Tensor:
        bound = self._bound_on(norms.device)
        centred = (norms <= bound).to(torch.float64).sum() - 0.5 * norms.shape[-1]
        self._unclipped = centred if self._unclipped is None else self._unclipped + centred
        return _clip(norms, bound)

    def after_step(self, noise: Any, expected_batch_size: float) -> None:
        """C <- clamp(C exp(-eta (b - target)), min, max), on the bound's device (no host read)."""
        device = self._bound.device if isinstance(self._bound, Tensor) else \
            (self._unclipped.device if self._unclipped is not None else torch.device("cpu"))
        count = torch.zeros(1, dtype=torch.float64, device=device) if self._unclipped is None else \
            self._unclipped.detach().reshape(1)  # float64 on the bound's device (factors put it there)
        noise.add_([count], self.unclipped_num_std)
        frac = count[0] / expected_batch_size + 0.5
        bound = self._bound_on(device) * torch.exp(-self.lr * (frac - self.target))
        self._bound = bound.clamp(self.min_clipbound, self.max_clipbound)
        self._unclipped = None

    def discard(self) -> None:
        # the count of dropped batches would otherwise be noised and released with the next step's (its records
        # moving it by up to 1.5 where the noise split assumes 1/2, for a step the accountant never saw)
        self._unclipped = None

    def state_dict(self, params: list[nn.Parameter]) -> dict[str, Any]:
        return {"max_grad_norm": self.max_grad_norm}

    def load_state_dict(self, state: dict[str, Any], params: list[nn.Parameter]) -> None:
        if "max_grad_norm" in state:
            self.max_grad_norm = float(state["max_grad_norm"])


class ErrorFeedbackClipping(FlatClipping):
    """Clipping with error feedback (DiceSGD: Zhang, Bu, Wu and Hong, ICLR 2024).

    Per step, in mean units (a sum-reduced loss multiplies every term by the expected batch size E[B]):
    ``v = (1/E[B]) sum_i clip(g_i, C1) + clip(e, C2)`` is released with Gaussian noise, and the error state
    ``e <- e + (1/E[B]) sum_i g_i - v`` (un-noised) carries what clipping removed into later steps, so the
    clipping bias does not persist. ``e`` starts at 0, is never released, and lives in the optimizer's
    ``state_dict``.

    Privacy, as dpengine accounts it (provable; deliberately not the paper's tighter statement): ``e``
    depends on every past batch's *unclipped* gradients, so between neighbouring datasets it may differ
    arbitrarily, but ``clip(e, C2)`` lies in a ball of radius C2, so the two releases of a step differ by
    at most ``C1 + 2 E[B] C2`` in sum units (C1 from the sample's own clipped gradient, 2 E[B] C2 from the
    fed-back error), whether or not the sample is in this step's batch. That difference is present in
    every step, so subsampling does not amplify it: each step is accounted as a Gaussian mechanism with
    sensitivity ``C1 + 2 E[B] C2`` and sample rate 1 (by quasi-convexity of the Renyi divergence over
    the coupled sampling randomness, conditioning on the released past). The paper's Renyi analysis of
    the hidden state (its Theorem 3.8) claims a constant factor more noise than DP-SGD with subsampling;
    its statement could not be verified here, so it is not used: epsilon is never under-stated, at the
    cost of much more noise. A small ``error_max_grad_norm`` (e.g. C1 / E[B]) keeps it moderate.
    """

    amplified = False  # the accountant records sample rate 1 (see above)

    error_max_grad_norm = _Setting()
    #: the optimizer's expected batch size, which scales the fed-back error in the release
    expected_batch_size = _Setting(fixed=True)

    def __init__(self, max_grad_norm: float, error_max_grad_norm: float, expected_batch_size: float) -> None:
        super().__init__(max_grad_norm)
        self.error_max_grad_norm, self.expected_batch_size = error_max_grad_norm, expected_batch_size
        self.error: dict[nn.Parameter, Tensor] = {}

    needs_unclipped = True

    @property
    def sensitivity(self) -> float:
        return self.max_grad_norm + 2 * self.expected_batch_size * self.error_max_grad_norm

    def combine(self, sums: list[tuple[nn.Parameter, Tensor]], unclipped: dict[nn.Parameter, Tensor],
                mean_scale: float) -> None:
        errors = [self.error.get(p) for p, _ in sums]
        present = [e for e in errors if e is not None]
        k = None  # clip(e, C2) = k * e, a device scalar: no host sync in the step
        if present:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(e.double()) for e in present]))
            k = (self.error_max_grad_norm / (norm + 1e-12)).clamp(max=1.0)
        for (p, v), e in zip(sums, errors):
            u = unclipped.get(p)
            new = (u - v) / mean_scale if u is not None else torch.zeros_like(v)  # (1/B) sum g_i - clipped mean
            if e is not None:
                ke = e * k.to(e.dtype)  # type: ignore[union-attr]
                v.add_(ke, alpha=mean_scale)  # the release gets clip(e, C2)
                new += e - ke  # e + (mean g - clipped mean) - clip(e, C2)
            self.error[p] = new

    def state_dict(self, params: list[nn.Parameter]) -> dict[str, Any]:
        return {"error": [self.error.get(p) for p in params]}

    def load_state_dict(self, state: dict[str, Any], params: list[nn.Parameter]) -> None:
        if "error" in state:
            if len(state["error"]) != len(params):
                raise ValueError(f"error-feedback state for {len(state['error'])} parameters, the optimizer has "
                                 f"{len(params)}.")
            self.error = {p: e.to(p.device) for p, e in zip(params, state["error"]) if e is not None}


class LipschitzBounds(ClippingPolicy):
    """No clipping: each sample's gradient w.r.t. parameter p has norm at most b_p, analytically
    (``dpengine.lipschitz.per_sample_gradient_bounds``; Bethune et al. 2024). The sum's sensitivity is
    sqrt(sum_p b_p^2) (inflated by 1e-5 for float rounding of the bound's assumptions).

    Noise is per parameter tensor: std s_p = sigma * sqrt(b_p * S / sqrt(d_p)), S = sum_q b_q sqrt(d_q), which
    minimises the total noise energy sum_p d_p s_p^2 subject to sum_p b_p^2 / s_p^2 = 1 / sigma^2: the
    step is then exactly a Gaussian mechanism with noise multiplier sigma (whitened, the sensitivity is
    1 / sigma), which is what the accountant records.
    """

    #: b_p per parameter (by id) and d_p, analytic, from the model at make_private: read-only mappings
    bounds = _Setting(lambda policy, name, v: MappingProxyType({k: float(b) * (1 + 1e-5) for k, b in v.items()}),
                      fixed=True)
    sizes = _Setting(lambda policy, name, v: MappingProxyType(dict(v)), fixed=True)

    def __init__(self, bounds: Mapping[int, float], sizes: Mapping[int, int]) -> None:
        super().__init__()
        self.bounds, self.sizes = bounds, sizes

    @property
    def sensitivity(self) -> float:
        return math.sqrt(sum(b * b for b in self.bounds.values()))

    def noise_stds(self, params: list[nn.Parameter], noise_multiplier: float) -> list[float]:
        total = sum(self.bounds[id(p)] * math.sqrt(self.sizes[id(p)]) for p in params)
        return [noise_multiplier * math.sqrt(self.bounds[id(p)] * total / math.sqrt(self.sizes[id(p)]))
                for p in params]


def _per_layer_groups(how: str | Sequence[Sequence[nn.Parameter]], params: list[nn.Parameter],
                      layers: list[tuple[str, list[nn.Parameter]]]) -> list[list[nn.Parameter]]:
    tracked = {id(p) for p in params}
    if how == "parameter":
        return [[p] for p in params]
    if how == "module":
        seen: set[int] = set()
        out = []
        for _, ps in layers:
            group = [p for p in ps if id(p) not in seen]
            seen.update(id(p) for p in group)
            if group:
                out.append(group)
        return out
    if isinstance(how, str):
        raise ValueError(f"groups={how!r}: use 'parameter', 'module', or a list of parameter lists.")
    groups = [list(g) for g in how]
    ids = [id(p) for g in groups for p in g]
    if len(ids) != len(set(ids)) or set(ids) != tracked:
        raise ValueError("groups must put every trainable parameter of the model in exactly one group "
                         f"({len(set(ids) & tracked)} of {len(tracked)} covered, {len(ids) - len(set(ids))} repeated, "
                         f"{len(set(ids) - tracked)} not trainable in the model).")
    return groups


def _thresholds(max_grad_norm: Any, groups: list[list[nn.Parameter]], names: dict[int, str],
                total_max_grad_norm: float | None) -> list[float]:
    k = len(groups)
    if isinstance(max_grad_norm, str):
        if max_grad_norm != "dim":
            raise ValueError(f"max_grad_norm={max_grad_norm!r}: use a float, a sequence or dict of floats, or 'dim'.")
        if total_max_grad_norm is None:
            raise ValueError("max_grad_norm='dim' sets C_l proportional to sqrt(numel of group l); give the total "
                             "as total_max_grad_norm=C (then sqrt(sum C_l^2) = C).")
        sizes = [sum(p.numel() for p in g) for g in groups]
        return [total_max_grad_norm * math.sqrt(s / sum(sizes)) for s in sizes]
    if isinstance(max_grad_norm, Mapping):
        by_name = {names[id(g[0])]: i for i, g in enumerate(groups) if len(g) == 1}
        out: list[float | None] = [None] * k
        for key, c in max_grad_norm.items():
            i = key if isinstance(key, int) else by_name.get(key)
            if i is None or not 0 <= i < k:
                raise ValueError(f"max_grad_norm key {key!r} is neither a group index in [0, {k}) nor the name of a "
                                 "one-parameter group.")
            out[i] = float(c)
        if any(c is None for c in out):
            raise ValueError(f"max_grad_norm dict gives {sum(c is not None for c in out)} of {k} group thresholds.")
        return [float(c) for c in out]  # type: ignore[arg-type]
    if isinstance(max_grad_norm, Sequence):
        if len(max_grad_norm) != k:
            raise ValueError(f"max_grad_norm has {len(max_grad_norm)} thresholds for {k} groups.")
        return [float(c) for c in max_grad_norm]
    positive(max_grad_norm=max_grad_norm)
    return [float(max_grad_norm) / math.sqrt(k)] * k  # C_l = C / sqrt(K): total sensitivity C


def amplified(mode: str | ClippingMode) -> bool:
    """Whether the accountant may use the sample rate for this mode (error feedback: no, it records 1)."""
    return ClippingMode(mode) is not ClippingMode.ERROR_FEEDBACK


def make_policy(mode: str | ClippingMode, max_grad_norm: Any, *, params: list[nn.Parameter] | None = None,
                layers: list[tuple[str, list[nn.Parameter]]] | None = None, names: dict[int, str] | None = None,
                expected_batch_size: float | None = None, **options: Any) -> ClippingPolicy:
    """Build the policy named at the user-facing boundary (strings and options are validated here, once).

    ``params`` are the tracked trainable parameters and ``layers`` the tracked layers with their parameters
    (per-layer groups need them); ``options`` are the mode's keyword arguments of ``make_private``.
    """
    try:
        mode = ClippingMode(mode)
    except ValueError:
        raise ValueError(f"Unknown clipping={mode!r}; supported: {[m.value for m in ClippingMode]}.") from None
    allowed = {
        ClippingMode.FLAT: set(),
        ClippingMode.PER_LAYER: {"groups", "total_max_grad_norm"},
        ClippingMode.AUTOMATIC: {"stability_constant"},
        ClippingMode.ADAPTIVE: {"target_unclipped_quantile", "clipbound_learning_rate", "max_clipbound",
                                "min_clipbound", "unclipped_num_std"},
        ClippingMode.ERROR_FEEDBACK: {"error_max_grad_norm"},
        ClippingMode.LIPSCHITZ: set(),
    }[mode]
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(f"clipping={mode.value!r} takes no option(s) {sorted(unknown)}; its options are "
                         f"{sorted(allowed) or 'none'}.")
    if "total_max_grad_norm" in options and max_grad_norm != "dim":
        raise ValueError("total_max_grad_norm is the total of max_grad_norm='dim' thresholds; with other "
                         "thresholds it would be ignored. Drop it, or set max_grad_norm='dim'.")
    if isinstance(max_grad_norm, bool) or (
            mode is not ClippingMode.PER_LAYER and not isinstance(max_grad_norm, (int, float))):
        raise ValueError(f"clipping={mode.value!r} needs a float max_grad_norm (per-group thresholds are for "
                         "clipping='per_layer').")
    if mode is ClippingMode.FLAT:
        return FlatClipping(max_grad_norm)
    if mode is ClippingMode.LIPSCHITZ:
        raise ValueError("clipping='lipschitz' has no per-sample clipping policy; PrivacyEngine.make_private "
                         "builds its bounds from the model (dpengine.lipschitz).")
    if mode is ClippingMode.AUTOMATIC:
        return AutomaticClipping(max_grad_norm, **options)
    if mode is ClippingMode.ADAPTIVE:
        if "unclipped_num_std" not in options:
            raise ValueError("clipping='adaptive' needs unclipped_num_std (the noise of the unclipped count; "
                             "Andrew et al. suggest about expected batch size / 20).")
        return AdaptiveClipping(max_grad_norm, **options)
    if mode is ClippingMode.ERROR_FEEDBACK:
        if expected_batch_size is None:
            raise ValueError("clipping='error_feedback' needs the expected batch size (its sensitivity uses it).")
        return ErrorFeedbackClipping(max_grad_norm, options.get("error_max_grad_norm", max_grad_norm),
                                     expected_batch_size)
    if params is None or layers is None:
        raise ValueError("clipping='per_layer' needs the model's parameters to form its groups.")
    groups = _per_layer_groups(options.get("groups", "parameter"), params, layers)
    thresholds = _thresholds(max_grad_norm, groups, names or {}, options.get("total_max_grad_norm"))
    return PerLayerClipping(groups, thresholds)


__all__ = ["AdaptiveClipping", "AutomaticClipping", "ClippingMode", "ClippingPolicy", "ErrorFeedbackClipping",
           "FlatClipping", "LipschitzBounds", "PerLayerClipping", "amplified", "make_policy"]
