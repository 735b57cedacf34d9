"""The private optimizer step: the one place where clipping, noise and accounting meet.

``loss.backward()`` leaves, per parameter, the clipped sum ``sum_i c_i grad_i`` in the grad-sample
controller. ``step()`` adds Gaussian noise N(0, (sigma * C)^2) once, divides by the *expected* batch size
(mean reduction), writes ``p.grad``, runs the wrapped optimizer, and records the step with the accountant.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import nn
from torch.optim import Optimizer

from .grad_sample.controller import GradSampleController, LossReduction
from .noise import GaussianNoise


class PrivacyBudgetExhaustedError(RuntimeError):
    """Raised instead of taking a step that would spend more than the privacy budget."""


class DPOptimizer(Optimizer):
    """Wraps a torch optimizer; shares its ``param_groups`` and ``state`` (LR schedulers keep working).

    Args:
        optimizer: the user's optimizer over the model's trainable parameters.
        controller: the grad-sample controller of the private module.
        noise_multiplier: sigma; noise std is ``sigma * policy.sensitivity``.
        sensitivity: L2 sensitivity of the clipped sum (the clipping policy's).
        expected_batch_size: q * N, fixed at ``make_private`` (divides the noisy sum for mean reduction).
        sample_rate: q, recorded with the accountant each step.
        accountant: an accountant from ``dpengine.accounting`` (``step(noise_multiplier=, sample_rate=)``).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        controller: GradSampleController,
        noise_multiplier: float,
        sensitivity: float,
        expected_batch_size: float,
        sample_rate: float,
        loss_reduction: LossReduction,
        noise: GaussianNoise,
        accountant: Any,
    ) -> None:
        # Optimizer.__init__ registers the same param-group dicts (no copies) and sets up hook dicts.
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.original_optimizer = optimizer
        self.state = optimizer.state
        self.controller = controller
        self.noise_multiplier = float(noise_multiplier)
        self.sensitivity = float(sensitivity)
        self.expected_batch_size = float(expected_batch_size)
        self.sample_rate = float(sample_rate)
        self.loss_reduction = loss_reduction
        controller.output_scale = 1.0 / self.expected_batch_size if loss_reduction is LossReduction.MEAN else 1.0
        self.noise = noise
        self.accountant = accountant
        self._skip_next = False
        self._keep_grads = False
        self._in_virtual_steps = False  # chunks of one logical batch are being accumulated
        self._warned_eval = False
        self.steps_taken = 0
        self.budget: tuple[float, float] | None = None  # (epsilon, delta) never to be exceeded
        self._max_steps: int | None = None

    def set_budget(self, epsilon: float, delta: float) -> None:
        """Refuse any step after which epsilon at ``delta`` would exceed ``epsilon``."""
        from . import accounting

        self.budget = (float(epsilon), float(delta))
        # Enforced with RDP whatever the reporting accountant: its epsilon is never below PLD's, so the
        # check is conservative, and it is fast. Steps affordable from scratch at this (sigma, q):
        try:
            self._max_steps = accounting.get_max_steps(
                target_epsilon=epsilon, target_delta=delta, sample_rate=self.sample_rate,
                noise_multiplier=self.noise_multiplier)
        except ValueError:  # not even one step fits, or it never runs out (sigma large, q = 0)
            self._max_steps = None

    def _check_budget(self) -> None:
        if self.budget is None:
            return
        eps, delta = self.budget
        history = self.accountant.history
        homogeneous = all(s[0] == self.noise_multiplier and s[1] == self.sample_rate for s in history)
        if homogeneous and self._max_steps is not None:
            exceeded = self.accountant.total_steps + 1 > self._max_steps
        else:  # a resumed or heterogeneous history: replay it with RDP plus this step
            from . import accounting

            trial = accounting.RDPAccountant()
            for sigma, q, n in history:
                trial.step(noise_multiplier=sigma, sample_rate=q, num_steps=n)
            trial.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
            exceeded = trial.get_epsilon(delta) > eps
        if exceeded:
            raise PrivacyBudgetExhaustedError(
                f"The privacy budget epsilon={eps:g} at delta={delta:g} is spent after "
                f"{self.accountant.total_steps} steps (now epsilon={self.accountant.get_epsilon(delta):.4g}); this step "
                "was refused and the model is unchanged. Stop training here, or plan a larger budget "
                "(make_private_with_epsilon with more epochs) from the start.")

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for group in self.param_groups for p in group["params"]]

    def signal_chunk(self, first: bool, last: bool) -> None:
        """Virtual steps (used by ``VirtualSteps``): within one logical batch, ``zero_grad`` clears only
        before the first physical chunk and ``step`` applies only after the last one."""
        self._keep_grads = not first
        self._skip_next = not last
        self._in_virtual_steps = True

    def end_virtual_steps(self) -> None:
        self._keep_grads = self._skip_next = self._in_virtual_steps = False

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._keep_grads:
            return
        self.controller.clear()
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def _privatize(self) -> None:
        sums = self.controller.pop_clipped_sums()
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
                grad = torch.zeros_like(p)
            grads.append((p, grad.contiguous()))
        # the sums are engine-owned buffers: noise goes in place, added once per logical step
        # the clipped sums already carry the 1 / expected batch size of a mean reduction (the controller
        # folds it into the per-sample factors), so the noise is scaled the same way: no extra pass
        self.noise.add_([g for _, g in grads], self.noise_multiplier * self.sensitivity * self.controller.output_scale)
        for p, grad in grads:
            p.grad = grad
            self.controller.mark_written(p, grad)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._skip_next:
            self._skip_next = False
            return loss
        if self.controller.batches_accumulated > 1 and not self._in_virtual_steps:
            n = self.controller.batches_accumulated
            self.controller.clear()
            raise RuntimeError(
                f"{n} backward passes were accumulated since the last step. dpengine clips each backward on "
                "its own, so a sample that took part in two of them would contribute up to 2 * max_grad_norm "
                "and break the privacy guarantee; the step was refused. To split one logical batch into "
                "physical chunks use dpengine.VirtualSteps; to combine several losses, add them and call "
                "backward once.")
        if not self.controller.module.training and not self._warned_eval:
            self._warned_eval = True
            warnings.warn("A private step was taken with the model in eval mode (dropout off, and layers that "
                          "behave differently in training act as at inference). Call model.train() before "
                          "training; the step itself is still private.", stacklevel=2)
        self._check_budget()
        self._privatize()
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        self.steps_taken += 1
        self.original_optimizer.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.original_optimizer.load_state_dict(state_dict)
        self.param_groups = self.original_optimizer.param_groups
        self.state = self.original_optimizer.state

    def __repr__(self) -> str:
        return (f"DPOptimizer(noise_multiplier={self.noise_multiplier}, sensitivity={self.sensitivity}, "
                f"expected_batch_size={self.expected_batch_size}, wraps={self.original_optimizer!r})")
