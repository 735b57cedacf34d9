"""The private optimizer step: the one place where clipping, noise and accounting meet.

``loss.backward()`` leaves, per parameter, the clipped sum ``sum_i c_i grad_i`` in the grad-sample
controller. ``step()`` adds Gaussian noise N(0, (sigma * C)^2) once, divides by the *expected* batch size
(mean reduction), writes ``p.grad``, runs the wrapped optimizer, and records the step with the accountant.
"""

from __future__ import annotations

import copy
import functools
import warnings
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.optim import Optimizer

from . import accounting
from ._validate import non_negative
from .clipping import AdaptiveClipping, ClippingPolicy, LipschitzBounds, PerLayerClipping
from .grad_sample.controller import GradSampleController, LossReduction
from .grad_sample.ledger import nonfinite_flag, sum_dtype
from .grad_sample.registry import PerSampleGradientError
from .noise import GaussianNoise

Segment = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps), as the accountants record them

_ORDERS = np.asarray(accounting.DEFAULT_ORDERS, dtype=np.float64)


_GROUPS_FIXED = (
    "A private optimizer cannot take new parameter groups: add every parameter group to the optimizer before "
    "make_private (torch.optim.SGD([{'params': a}, {'params': b, 'lr': 0.1}], ...)); to train more parameters "
    "later, call engine.detach() and make_private again with optimizer.original_optimizer (after adding them "
    "to it): the engine keeps its accountant, so epsilon covers both phases.")


class PrivacyBudgetExhaustedError(RuntimeError):
    """Raised instead of taking a step that would spend more than the privacy budget."""


@functools.lru_cache(maxsize=1024)
def _step_rdp(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """RDP of one step at each default order; cached, since a schedule revisits few (sigma, q) pairs."""
    rdp = accounting.rdp_subsampled_gaussian(sample_rate, noise_multiplier, _ORDERS)
    rdp.flags.writeable = False
    return rdp


#: whether a clean CPU step skips the masking passes (``_clean_on_cpu``); the CPU tests of the device path,
#: which refuse every host read, turn it off to run exactly what a GPU runs
CPU_FLAG_SHORTCUT = True


def _clean_on_cpu(bad: torch.Tensor, tensors: list[torch.Tensor]) -> bool:
    """True when the step's non-finite flag and every tensor are on the CPU and the flag is False. Reading a
    CPU flag waits for nothing (CPU ops are synchronous), so a clean CPU step skips the masking passes over
    every parameter (the fill, and for stateful optimizers a copy and a lerp); on a device the flag is never
    read and the masking is done there."""
    return CPU_FLAG_SHORTCUT and bad.device.type == "cpu" and all(t.device.type == "cpu" for t in tensors) \
        and not bool(bad)


#: torch optimizers whose fused implementation skips the whole update, parameters and state, on the device
#: where ``optimizer.found_inf`` is 1 (the flag GradScaler hands them); checked: SGD with momentum, Adam, AdamW
_FUSED_SKIP = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def _fused_skip_flag(opt: Optimizer) -> bool:
    """Whether a masked step can be left to ``opt`` itself: a fused SGD/Adam/AdamW given ``found_inf`` skips
    the update in its kernel, on the device (no copy of the parameters, no lerp, and its state does not
    advance either)."""
    return type(opt) in _FUSED_SKIP and bool(opt.param_groups) and all(g.get("fused") for g in opt.param_groups)


def _one_std(stds: list[Any]) -> bool:
    """Whether every parameter gets the same noise std. Device-tensor stds (adaptive clipping's bound) are
    compared by identity: comparing their values would read them to the host, a sync every step."""
    if any(isinstance(s, torch.Tensor) for s in stds):
        if all(s is stds[0] for s in stds):
            return True
        raise TypeError("internal: a clipping policy's noise_stds returned different device tensors; return one "
                        "tensor for all parameters, or floats.")
    return all(s == stds[0] for s in stds)


def _flat_buffer(ts: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The 1-D buffer that ``ts`` tile exactly, in order, with ``ts`` themselves as its views (the
    controller's sum buckets: no copy); else their concatenation (a copy) and views of it."""
    base = ts[0]._base
    if base is not None and base.dim() == 1 and base.is_contiguous():
        offset = base.storage_offset()
        for t in ts:
            if t._base is not base or not t.is_contiguous() or t.storage_offset() != offset:
                break
            offset += t.numel()
        else:
            if offset == base.storage_offset() + base.numel():
                return base, ts
    flat = torch.cat([t.reshape(-1) for t in ts])
    views, offset = [], 0
    for t in ts:
        views.append(flat[offset:offset + t.numel()].view(t.shape))
        offset += t.numel()
    return flat, views


def _layout(param_groups: list[dict[str, Any]]) -> tuple[tuple[int, ...], ...]:
    """Which parameters each group holds (by identity): what ``make_private`` saw, checked at every step."""
    return tuple(tuple(id(p) for p in group["params"]) for group in param_groups)


def _segments(accountant: Any) -> list[Segment]:
    """The accountant's live list of segments, only read. ``Accountant.history`` returns a copy, linear in
    the number of segments (up to one per step under a noise schedule); the budget check runs every step,
    so it reads the list that ``dpengine.accounting.Accountant`` keeps in ``_history``."""
    live = getattr(accountant, "_history", None)
    return live if isinstance(live, list) else list(accountant.history)


class DPOptimizer(Optimizer):
    """Wraps a torch optimizer; shares its ``param_groups`` and ``state`` (LR schedulers keep working).

    Args:
        optimizer: the user's optimizer over the model's trainable parameters.
        controller: the grad-sample controller of the private module.
        noise_multiplier: sigma, told to the accountant; the gradient's noise std is
            ``policy.grad_noise_multiplier(sigma) * policy.sensitivity``.
        policy: the clipping policy (its groups, factors, sensitivity and state between steps).
        expected_batch_size: q * N, fixed at ``make_private`` (divides the noisy sum for mean reduction).
        sample_rate: q, recorded with the accountant each step.
        accountant: an accountant from ``dpengine.accounting`` (``step(noise_multiplier=, sample_rate=)``).

    ``noise_multiplier`` may be assigned between steps (a noise schedule): the step's noise and the accountant
    both read it. ``max_grad_norm`` (the policy's, where it has one) may be assigned between steps too.
    ``sample_rate`` and ``expected_batch_size`` are the private loader's and read-only: the accounted q must be
    the q the loader samples at (to change it, see the error that assigning raises). Each step is recorded
    with the values it used, and a budget (``set_budget``) is enforced against that history.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        controller: GradSampleController,
        noise_multiplier: float,
        policy: ClippingPolicy,
        expected_batch_size: float,
        sample_rate: float,
        loss_reduction: LossReduction,
        noise: GaussianNoise,
        accountant: Any,
        distributed: Any = None,
    ) -> None:
        # Optimizer.__init__ registers the same param-group dicts (no copies) and sets up hook dicts.
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.original_optimizer = optimizer
        self.state = optimizer.state
        self.controller = controller
        self.policy = policy
        policy.bind(controller)  # its settings cannot change while the controller holds sums clipped with them
        self.noise_multiplier = noise_multiplier
        self._expected_batch_size = float(expected_batch_size)
        self._sample_rate = float(sample_rate)
        self.loss_reduction = loss_reduction
        controller.output_scale = 1.0 / self.expected_batch_size if loss_reduction is LossReduction.MEAN else 1.0
        controller.sum_buckets.set_order(self.params)  # clipped sums laid out in this optimizer's order
        self.noise = noise
        self.accountant = accountant
        #: ``dpengine.distributed.DistributedContext`` for data-parallel training (None: one process)
        self.distributed = distributed
        self._skip_next = False
        self._keep_grads = False
        self._warned_debug = False
        self._in_virtual_steps = False  # chunks of one logical batch are being accumulated
        self._warned_eval = False
        self.steps_taken = 0
        #: set by ``PrivacyEngine.detach``: the capture hooks are gone, and every later step is refused
        self.detached = False
        self._inner_step = False
        self._guard = optimizer.register_step_pre_hook(self._guard_original)
        #: the parameters of each group at make_private: the groups the private step writes and the wrapped
        #: optimizer applies must stay these (``add_param_group`` is refused)
        self._groups_seen = _layout(optimizer.param_groups)
        self.budget: tuple[float, float] | None = None  # (epsilon, delta) never to be exceeded
        self._planned: tuple[float, float] | None = None  # the (sigma, q) that _max_steps was computed for
        self._max_steps: int | None = None
        # RDP of the accountant's history at _ORDERS, and (list, length, last segment) of the history it covers
        self._rdp_total = np.zeros_like(_ORDERS)
        self._rdp_seen: tuple[object, int, Segment | None] = (None, 0, None)
        # non-finite steps (docs/DESIGN.md, "A step without host synchronization"): a sticky device flag that
        # masks every update once set, and its copy on the host (pinned on CUDA, copied without blocking)
        self._nonfinite: torch.Tensor | None = None
        self._flag_host: torch.Tensor | None = None
        self._flag_view: Any = None  # numpy view of _flag_host: read without a torch call
        self._flag_event: Any = None  # CUDA event recorded after the copy (None on CPU: copies are synchronous)
        self._flag_step = 0

    # ------------------------------------------------------------------------------------------ knobs
    @property
    def noise_multiplier(self) -> float:
        """sigma: the noise of each step (``policy.noise_stds``) and what the accountant records for it."""
        return self._noise_multiplier

    @noise_multiplier.setter
    def noise_multiplier(self, value: float) -> None:
        non_negative(noise_multiplier=value)
        self.policy.grad_noise_multiplier(float(value))  # refuses a sigma adaptive clipping cannot split
        self._noise_multiplier = float(value)

    @property
    def sample_rate(self) -> float:
        """q, recorded with the accountant at every step: the rate the private loader samples at (1 for error
        feedback, whose steps are not amplified by subsampling)."""
        return self._sample_rate

    @sample_rate.setter
    def sample_rate(self, value: float) -> None:
        raise AttributeError(
            f"sample_rate is the private data loader's (q = {self._sample_rate:g}; its batches keep being drawn at "
            "it), so assigning it would only change what the accountant records, not the sampling. To train at "
            "another q, start a new private loader on the same engine: engine.detach(), then model, optimizer, "
            "loader = engine.make_private(module=model, optimizer=optimizer.original_optimizer, "
            "data_loader=DataLoader(dataset, batch_size=q * len(dataset)), ...). The engine keeps its accountant, "
            "so epsilon (and epsilon_budget, given again) covers both phases.")

    @property
    def expected_batch_size(self) -> float:
        """q * N of the private loader: the divisor of a mean-reduced loss's noisy sum (and in error feedback's
        sensitivity)."""
        return self._expected_batch_size

    @expected_batch_size.setter
    def expected_batch_size(self, value: float) -> None:
        raise AttributeError("expected_batch_size is fixed at make_private (q * N of the private loader: it scales "
                             "the release, and error feedback's sensitivity uses it); it changes with the loader, "
                             "see optimizer.sample_rate.")

    @property
    def max_grad_norm(self) -> float:
        """The clipping policy's ``max_grad_norm`` (flat, automatic, adaptive, error_feedback): assigning it sets
        the policy's, the one value its clipping and its noise read."""
        if not hasattr(type(self.policy), "max_grad_norm"):
            raise AttributeError(self._no_max_grad_norm())
        return self.policy.max_grad_norm  # type: ignore[attr-defined]

    @max_grad_norm.setter
    def max_grad_norm(self, value: float) -> None:
        if not hasattr(type(self.policy), "max_grad_norm"):
            raise AttributeError(self._no_max_grad_norm())
        self.policy.max_grad_norm = value  # type: ignore[attr-defined]

    def _no_max_grad_norm(self) -> str:
        if isinstance(self.policy, PerLayerClipping):
            return ("clipping='per_layer' has one threshold per group, and no max_grad_norm: read or assign "
                    "optimizer.policy.thresholds (one value per group).")
        if isinstance(self.policy, LipschitzBounds):
            return ("clipping='lipschitz' clips nothing: each sample's gradient is bounded analytically "
                    "(optimizer.policy.bounds), so there is no max_grad_norm.")
        return f"the clipping policy {type(self.policy).__name__} has no max_grad_norm."

    def _release_settings(self) -> dict[str, float]:
        """What every data-parallel rank's step must agree on: the noise multiplier and the sensitivity (adaptive
        clipping's moves on the device, identically on every rank, from the all-reduced count: not read here)."""
        out = {"noise_multiplier": self.noise_multiplier}
        if not isinstance(self.policy, AdaptiveClipping):
            out["sensitivity"] = float(self.policy.sensitivity)
        return out

    # ------------------------------------------------------------------------------------------ budget
    def set_budget(self, epsilon: float, delta: float, *, planned_steps: int | None = None) -> None:
        """Refuse any step after which epsilon at ``delta``, by the engine's own accountant, would exceed
        ``epsilon``.

        The check is against the history actually recorded, so it holds when ``noise_multiplier`` or
        ``sample_rate`` change later (a noise schedule). While every step is taken at the (sigma, q) of this
        call it is only a comparison with the number of steps affordable at them, computed here; with a
        slow accountant (PLD) that search costs seconds, so ``planned_steps``, the step count a calibration
        planned for (``make_private_with_epsilon``), is tried first: it is usually the answer.

        Raises:
            ValueError: ``epsilon`` not positive, or ``delta`` not in (0, 1).
        """
        if not float(epsilon) > 0:
            raise ValueError(f"Expected epsilon={epsilon!r} > 0 for the budget.")
        self.budget = (float(epsilon), float(delta))
        self._planned = (float(self.noise_multiplier), float(self.sample_rate))
        self._max_steps = self._affordable_steps(planned_steps)

    def _accountant_name(self) -> str | None:
        """The registry name that rebuilds this accountant for ``dpengine.accounting``'s solvers, if any."""
        name = getattr(self.accountant, "name", None)
        factory = accounting.ACCOUNTANTS.get(name) if isinstance(name, str) else None
        return name if factory is not None and type(factory()) is type(self.accountant) else None

    def _affordable_steps(self, hint: int | None) -> int | None:
        """Steps affordable from an empty history at the planned (sigma, q), by the engine's accountant; None
        when there is no finite count (q = 0) or no solver for the accountant: every step is then checked
        against the history."""
        name = self._accountant_name()
        if name is None or self.budget is None or self._planned is None:
            return None
        eps, delta = self.budget
        sigma, q = self._planned

        def eps_of(steps: int) -> float:
            return accounting.get_epsilon(sigma, q, steps, delta, accountant=name)

        if hint is not None and hint >= 1 and eps_of(hint) <= eps < eps_of(hint + 1):
            return int(hint)
        try:
            return accounting.get_max_steps(target_epsilon=eps, target_delta=delta, sample_rate=q,
                                            noise_multiplier=sigma, accountant=name)
        except ValueError:  # not even one step fits, or the budget never runs out
            return 0 if eps_of(1) > eps else None

    def _history_rdp(self) -> np.ndarray:
        """RDP of the accountant's history at ``_ORDERS``, updated incrementally: only steps recorded since
        the last call are added. A history replaced (``load_state_dict``) or rewritten is summed afresh."""
        segs = _segments(self.accountant)
        seen, n, last = self._rdp_seen
        if seen is segs and (n == 0 or (last is not None and len(segs) >= n and segs[n - 1][:2] == last[:2]
                                        and segs[n - 1][2] >= last[2])):
            total, start = self._rdp_total.copy(), n
            if last is not None and segs[n - 1][2] > last[2]:  # more steps merged into the last segment
                total += (segs[n - 1][2] - last[2]) * _step_rdp(last[0], last[1])
        else:
            total, start = np.zeros_like(_ORDERS), 0
        for sigma, q, steps in segs[start:]:
            if steps:
                total += steps * _step_rdp(float(sigma), float(q))
        self._rdp_total, self._rdp_seen = total, (segs, len(segs), segs[-1] if segs else None)
        return total

    def _epsilon_after_step(self, sigma: float, q: float, delta: float) -> float:
        """Epsilon of the recorded history plus one step at (sigma, q), by the engine's accountant or an
        upper bound on it (never below what the accountant will report)."""
        if type(self.accountant) is accounting.RDPAccountant:
            # RDP adds up over steps: a running sum plus this step, converted at the default orders. The
            # accountant also tries orders between them, so what it reports is never above this; the 1e-9
            # covers rounding from summing in another order than it does.
            rdp = (self._history_rdp() + _step_rdp(sigma, q)) * (1 + 1e-9)
            return float(np.min(accounting.epsilon_from_rdp(_ORDERS, rdp, delta)))
        trial = copy.deepcopy(self.accountant)  # e.g. PLD: compose the whole history again (slow, exact)
        trial.step(noise_multiplier=sigma, sample_rate=q)
        return float(trial.get_epsilon(delta))

    def _check_budget(self) -> None:
        if self.budget is None:
            return
        eps, delta = self.budget
        sigma, q = float(self.noise_multiplier), float(self.sample_rate)
        segs = _segments(self.accountant)
        planned = self._planned
        if self._max_steps is not None and (sigma, q) == planned and (
                not segs or (len(segs) == 1 and tuple(segs[0][:2]) == planned)):
            # every step so far and this one at the (sigma, q) the affordable count was computed for
            exceeded = (segs[0][2] if segs else 0) + 1 > self._max_steps
        else:
            exceeded = self._epsilon_after_step(sigma, q, delta) > eps
        if exceeded:
            raise PrivacyBudgetExhaustedError(
                f"The privacy budget epsilon={eps:g} at delta={delta:g} is spent after "
                f"{self.accountant.total_steps} steps (now epsilon={self.accountant.get_epsilon(delta):.4g}, and this "
                f"step at noise_multiplier={sigma:g}, sample_rate={q:g} would exceed it); the step was refused and "
                "the model is unchanged. Stop training here, or plan a larger budget (make_private_with_epsilon "
                "with more epochs) from the start; a lower noise multiplier or higher sample rate than planned "
                "spends it faster.")

    @property
    def sensitivity(self) -> float:
        """The clipping policy's sensitivity at this step (adaptive clipping moves it)."""
        return self.policy.sensitivity

    def clipped_grads_for_debugging(self) -> dict[nn.Parameter, torch.Tensor]:
        """The clipped, un-noised gradient of this step so far, per parameter: what ``step()`` will add
        noise to, in the same scale (divided by the expected batch size for a mean-reduced loss). For
        reading between ``backward()`` and ``step()``, where ``p.grad`` is None in dpengine (the private
        gradient is written into ``p.grad`` by ``step()``).

        Returns detached copies: changing them cannot change what ``step()`` releases. They are NOT
        differentially private (no noise yet): print or assert on them while debugging, but do not log
        them where the model's users can read them, and do not feed them back into training. Per-sample
        norms of the last backward are in ``optimizer.controller.last_norms``. Empty before the first
        backward of a step."""
        if not self._warned_debug:
            self._warned_debug = True
            warnings.warn("clipped_grads_for_debugging() returns gradients before noise: they are not "
                          "differentially private; keep them out of logs others can read.", stacklevel=2)
        return self.controller.peek_clipped_sums()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not hasattr(self, "_groups_seen"):  # Optimizer.__init__ registering the wrapped optimizer's groups
            super().add_param_group(param_group)
            return
        raise RuntimeError(_GROUPS_FIXED)

    def _groups_problem(self) -> str | None:
        """Why the parameter groups no longer match those of make_private (None if they do)."""
        if _layout(self.original_optimizer.param_groups) == _layout(self.param_groups) == self._groups_seen:
            return None
        return ("the optimizer's param groups changed after make_private (add_param_group, or a group list edited): "
                "the private gradient of a new group's parameters would be written but never applied, or not "
                "written at all, while the step is still accounted. " + _GROUPS_FIXED)

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for group in self.param_groups for p in group["params"]]

    def signal_chunk(self, first: bool, last: bool, size: int, private: bool = True) -> None:
        """Virtual steps (used by ``VirtualSteps``): within one logical batch, ``zero_grad`` clears only
        before the first physical chunk and ``step`` applies only after the last one. ``size`` is the
        number of records in the chunk: the batch every tracked layer must see, reduced once. ``private``:
        the chunk comes from the loader ``make_private`` returned (else its batch is unverified, with the
        warning a plain loop over that loader gives)."""
        self._keep_grads = not first
        self._skip_next = not last
        self._in_virtual_steps = True
        self.controller.note_batch(size if private else None, first)

    def end_virtual_steps(self, logical_batches: int = 0) -> None:
        """The ``VirtualSteps`` loop ended; ``logical_batches``: it was left early (``break``) after yielding
        chunks of that many logical batches (see ``BatchLedger.left_loop``)."""
        self._keep_grads = self._skip_next = self._in_virtual_steps = False
        if logical_batches:
            self.controller.left_loop(logical_batches)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._raise_if_nonfinite(wait=False)
        if self._keep_grads:
            return
        self.controller.clear()
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def _privatize(self) -> torch.Tensor:
        """Write the private gradient into ``p.grad``; returns the step's sticky non-finite flag (a 0-dim bool
        device tensor): where it is set, every released gradient is zero and ``step`` restores the parameters."""
        sums = self.controller.pop_clipped_sums()
        unclipped = self.controller.pop_unclipped_sums()
        bad = self.controller.pop_nonfinite()
        tracked = self.controller.param_ids
        grads: list[tuple[nn.Parameter, torch.Tensor]] = []
        for p in self.params:
            if not p.requires_grad:
                continue
            if id(p) not in tracked:
                raise RuntimeError(
                    "The optimizer holds a trainable parameter whose per-sample gradients are not tracked (it was "
                    "frozen at make_private time, or added to the optimizer later). Freeze it again, or call "
                    "make_private after setting requires_grad on every parameter you want to train.")
            grad = sums.get(p)
            if grad is None:  # no sample touched it (e.g. an empty Poisson batch): noise only
                grad = torch.zeros_like(p, dtype=sum_dtype(p.dtype))
            grads.append((p, grad.contiguous()))
        # the sums are engine-owned buffers: noise goes in place, added once per logical step
        # the clipped sums already carry the 1 / expected batch size of a mean reduction (the controller
        # folds it into the per-sample factors), so the noise is scaled the same way: no extra pass
        # error feedback adds its clipped error state to the release here (and updates it, un-noised)
        # data-parallel (dpengine/distributed.py): rank 0 adds the noise to its own sums and one sum all-reduce
        # releases sum over ranks + one draw to every rank; error feedback's release needs the global sums, so
        # they are reduced first, combined identically on every rank, and rank 0's noisy release broadcast
        dist = self.distributed
        if dist is not None and bad is not None and grads:
            # a rank's non-finite flag becomes a NaN in its sums, so the reduced release (and with it the flag
            # checked below) is non-finite on every rank: the ranks mask the same step
            first = grads[0][1].view(-1)[:1]
            first.add_(torch.where(bad.to(first.device), float("nan"), 0.0))
        tensors = [g for _, g in grads]
        if dist is not None and self.policy.needs_unclipped:
            unclipped = {p: unclipped[p].contiguous() if p in unclipped else torch.zeros_like(g) for p, g in grads}
            dist.all_reduce_(tensors + [unclipped[p] for p, _ in grads])
        self.policy.combine(grads, unclipped, self.expected_batch_size * self.controller.output_scale)
        stds = self.policy.noise_stds([p for p, _ in grads], self.noise_multiplier)
        # one flat buffer per device and dtype: noise, the finiteness check and the mask are a few kernels
        # whatever the number of parameters (and a collective is one tensor per buffer)
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, g in enumerate(tensors):
            groups.setdefault((g.device, g.dtype), []).append(i)
        flats: list[torch.Tensor] = []
        views: list[torch.Tensor] = [torch.empty(0)] * len(tensors)
        for idx in groups.values():
            flat, vs = _flat_buffer([tensors[i] for i in idx])
            flats.append(flat)
            for i, v in zip(idx, vs):
                views[i] = v
        scale = self.controller.output_scale

        def add_noise() -> None:
            if _one_std(stds):  # one std (a float, or adaptive's device bound)
                self.noise.add_(flats, (stds[0] if stds else 0.0) * scale)
            else:  # per-parameter noise (Lipschitz): still one draw per flat buffer
                self.noise.add_(views, [std * scale for std in stds])

        if dist is None:
            add_noise()
        elif self.policy.needs_unclipped:
            if dist.rank == 0:
                add_noise()
            dist.broadcast_(flats)
        else:
            dist.noisy_sum_(flats, add_noise)
        # a non-finite released gradient (the norms were checked in the backward; this also covers sums a
        # policy combined, and other ranks) masks the step, on the device: no host read
        for flat in flats:
            flat_bad = nonfinite_flag(flat)
            bad = flat_bad if bad is None else bad | (flat_bad if flat_bad.device == bad.device
                                                      else flat_bad.to(bad.device))
        if bad is None:  # no trainable parameter
            bad = torch.zeros((), dtype=torch.bool)
        if self._nonfinite is not None:
            bad = bad | self._nonfinite  # sticky: no later update applies until the error is raised
        self._nonfinite = bad
        if not _clean_on_cpu(bad, flats):  # on a device: mask without reading the flag
            for flat in flats:
                flat.masked_fill_(bad if bad.device == flat.device else bad.to(flat.device), 0.0)
        # sums of low-precision parameters are kept and noised in float32; rounding the noisy sum to the
        # parameter's dtype is post-processing (done by the same copy)
        # same dtype: p.grad is the view into the flat buffer (no copy); lower precision: one rounding copy
        outs = [v if v.dtype == p.dtype else torch.empty_like(p, memory_format=torch.contiguous_format)
                for (p, _), v in zip(grads, views)]
        low = [(o, v) for o, v in zip(outs, views) if o is not v]
        if low:
            torch._foreach_copy_([o for o, _ in low], [v for _, v in low])
        for (p, _), out in zip(grads, outs):
            p.grad = out
            self.controller.mark_written(p, out)
        return bad

    def _note_nonfinite_on_host(self, bad: torch.Tensor) -> None:
        """Copy the sticky flag to the host without blocking (pinned memory and an event on CUDA)."""
        if self._flag_host is None or self._flag_host.device.type != "cpu":
            pin = bad.device.type == "cuda"
            self._flag_host = torch.zeros((), dtype=torch.bool, pin_memory=pin)
            self._flag_view = self._flag_host.numpy()
        self._flag_host.copy_(bad, non_blocking=True)
        self._flag_step = self.steps_taken
        if bad.device.type == "cuda":
            if self._flag_event is None:
                self._flag_event = torch.cuda.Event()
            self._flag_event.record()
        else:
            self._flag_event = None

    def _raise_if_nonfinite(self, wait: bool) -> None:
        """Raise if a step was masked for a non-finite gradient, as soon as the host copy of the flag has
        arrived (at once on CPU; on CUDA when its event is done, or after waiting if ``wait``). The flag is
        sticky, so a value read late can only be True if some masked step happened."""
        if self._flag_view is None or self._nonfinite is None:
            return
        event = self._flag_event
        if event is not None and not wait and not event.query() and not bool(self._flag_view):
            return  # the copy is still in flight: checked again at the next step() or zero_grad()
        if event is not None:
            event.synchronize()
        if not bool(self._flag_view):  # a numpy read of host memory, not a device sync
            return
        self._nonfinite = None
        self._flag_view[()] = False
        scale = getattr(self.controller, "loss_scale", 1.0)
        self.controller.clear()
        for p in self.params:
            p.grad = None
        raise PerSampleGradientError(
            f"non-finite per-sample gradient norm or released gradient (NaN or inf) at step {self._flag_step} "
            "(counting from 1); that step, and any step taken after it before this error, was not applied: the "
            "parameters are as they were before it (the wrapped optimizer's state, e.g. momentum, advanced as "
            "for a zero gradient, except in a fused SGD/Adam/AdamW, which skipped the step; the accountant counts "
            "those steps). Check the loss and inputs (lower the "
            "learning rate, or clamp logits" + (f"; with loss_scale={scale:g}, an fp16 gradient may have overflowed: "
                                               "lower loss_scale" if scale != 1 else "") +
            "); to go on, catch this error and continue, or load a checkpoint.")

    def check_finite(self) -> None:
        """Wait for the last step's non-finite flag and raise ``PerSampleGradientError`` if any step since
        the last check was masked. ``step()`` and ``zero_grad()`` check without waiting; call this (a host
        synchronization) before reading results you rely on, e.g. at the end of training."""
        self._raise_if_nonfinite(wait=True)

    #: torch.amp.GradScaler.step hands itself to optimizers that say this (see ``step``)
    _step_supports_amp_scaling = True

    def step(self, closure: Callable[[], Any] | None = None, grad_scaler: Any = None) -> Any:
        if grad_scaler is not None:
            self.controller.clear()
            raise NotImplementedError(
                "torch.amp.GradScaler cannot be used with DP-SGD: its scale and its skipped steps are driven by "
                "single records (a step skipped because one sample's gradient overflowed reveals that sample). For "
                "fp16 pass a fixed loss_scale=2**k to make_private (dpengine applies it where gradients enter the "
                "model and divides it out before clipping) and keep loss.backward(); optimizer.step(). Or use bf16 "
                "autocast (torch.autocast(device, dtype=torch.bfloat16)), which needs no scale.")
        if self.detached:
            raise RuntimeError(
                "This private optimizer was detached (PrivacyEngine.detach() removed the per-sample capture), so "
                "a step would release noise in place of the gradient while still counting privacy; it was "
                "refused. For non-private training use optimizer.original_optimizer; to train privately again, "
                "call make_private with optimizer.original_optimizer.")
        self._raise_if_nonfinite(wait=False)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        problem = (None if self._skip_next else self._groups_problem()) or self.controller.step_problem(
            in_virtual_steps=self._in_virtual_steps, releasing=not self._skip_next)
        if self.distributed is not None:
            problem = problem or self.distributed.step_problem(self._in_virtual_steps)
            if not self._skip_next:  # each rank's last chunk of the logical batch: the ranks refuse or step together
                problem = self.distributed.agree(problem, self._release_settings())
        if problem is not None:  # checked on every chunk: a repeated chunk is refused before it accumulates
            if self.distributed is not None:
                self.distributed.reset()
            self.controller.clear()
            self.controller.forget_drawn()
            self._skip_next = False
            raise RuntimeError(f"The private step was refused and the model is unchanged: {problem}")
        if self._skip_next:
            self._skip_next = False
            return loss
        if not self.controller.module.training and not self._warned_eval:
            self._warned_eval = True
            warnings.warn("A private step was taken with the model in eval mode (dropout off, and layers that "
                          "behave differently in training act as at inference). Call model.train() before "
                          "training; the step itself is still private.", stacklevel=2)
        try:
            self._check_budget()
        except PrivacyBudgetExhaustedError:
            self.controller.forget_drawn()  # the batch is spent with the refused step
            raise
        bad = self._privatize()
        self.policy.after_step(self.noise if self.distributed is None else self.distributed.count_noise(self.noise),
                               self.expected_batch_size)
        if self.distributed is not None:
            self.distributed.reset()
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        self.steps_taken += 1
        self._inner_step = True
        skip_flag = _fused_skip_flag(self.original_optimizer)
        try:
            with torch.no_grad():  # a masked step leaves the parameters exactly as they were (lerp weight 1)
                kept = [] if skip_flag or _clean_on_cpu(bad, self.params) else self._masked_update_start()
            if skip_flag:
                self.original_optimizer.found_inf = bad.to(torch.float32)  # type: ignore[attr-defined]
            self.original_optimizer.step()
            with torch.no_grad():
                self._masked_update_end(kept, bad)
        finally:
            self._inner_step = False
            if skip_flag:
                del self.original_optimizer.found_inf  # type: ignore[attr-defined]
        self._note_nonfinite_on_host(bad)
        return loss

    def _masked_update_start(self) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
        """The trainable parameters, per device and dtype, with copies of their values (one foreach op).
        None needed for plain SGD (no momentum, no weight decay): a zero gradient leaves it unchanged."""
        if type(self.original_optimizer) is torch.optim.SGD and all(
                not g.get("momentum") and not g.get("weight_decay") for g in self.original_optimizer.param_groups):
            return []
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for p in self.params:
            if p.requires_grad:
                groups.setdefault((p.device, p.dtype), []).append(p)
        return [(ps, torch._foreach_clone(ps)) for ps in groups.values()]

    def _masked_update_end(self, kept: list[tuple[list[torch.Tensor], list[torch.Tensor]]], bad: torch.Tensor) -> None:
        """p <- lerp(p, kept, bad): exactly p where the step is fine, exactly the kept value where it was
        masked (torch's lerp computes ``end - (end - start) * (1 - w)`` for w >= 0.5), in one foreach op."""
        for ps, olds in kept:
            w = bad.to(device=ps[0].device, dtype=ps[0].dtype) if bad.device != ps[0].device else bad.to(ps[0].dtype)
            torch._foreach_lerp_(ps, olds, [w] * len(ps))

    def _guard_original(self, opt: Optimizer, args: Any, kwargs: Any) -> None:
        """A step pre-hook on the user's own optimizer: stepping it directly would apply no private
        gradient at all (capture leaves ``p.grad`` empty), silently training nothing."""
        if not self._inner_step and not self.detached:
            raise RuntimeError(
                "This optimizer was made private: step the optimizer returned by make_private (or "
                "make_private_with_epsilon) instead; this one sees no gradients, so its step would train nothing "
                "and spend no privacy. model, optimizer, loader = engine.make_private(...) keeps the returned ones.")

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state, plus the clipping policy's (error feedback's e, adaptive's bound)."""
        self._raise_if_nonfinite(wait=True)  # never checkpoint past a masked step without saying so
        return {**self.original_optimizer.state_dict(), "dpengine_clipping": self.policy.state_dict(self.params)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self.policy.load_state_dict(state_dict.pop("dpengine_clipping", {}), self.params)
        self.original_optimizer.load_state_dict(state_dict)
        self.param_groups = self.original_optimizer.param_groups
        self.state = self.original_optimizer.state

    def __repr__(self) -> str:
        return (f"DPOptimizer(noise_multiplier={self.noise_multiplier}, sensitivity={self.sensitivity}, "
                f"expected_batch_size={self.expected_batch_size}, wraps={self.original_optimizer!r})")
