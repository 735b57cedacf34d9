"""What every gradient source of the private optimizer keeps about the batches it reduces.

Two sources exist: the per-sample ``GradSampleController`` and Lipschitz clipping's ``LipschitzSums``
(the plain batch gradient, bounded analytically). Both must know the batch the private loader yielded,
allow one reduction per batch (a second backward over it could double a sample's contribution), and
remember the private gradient the optimizer wrote into ``p.grad``; this is that shared part.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .registry import PerSampleGradientError


def nonfinite_flag(t: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool device tensor, True if ``t`` holds a NaN or an infinity: one reduction (the sum is NaN
    or infinite whenever an element is, since NaN and inf propagate through IEEE additions and
    inf + (-inf) is NaN) and no host read. Conservative: a sum of finite values that overflows the dtype's
    range (|sum| above 3e38 in float32) also reads as non-finite."""
    s = t.sum()
    return (s - s).ne(0)  # s - s is 0 for a finite s, NaN for inf or NaN


_WIDEN = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def sum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype per-sample norms and clipped sums are formed and kept in: float32 for the 16-bit floats,
    the dtype itself otherwise. Rounding a sum to bf16 before the noise is not post-processing, and
    low-precision norms could under-state a sample's norm."""
    return _WIDEN.get(dtype, dtype)


def accumulate(into: dict[nn.Parameter, Tensor], p: nn.Parameter, t: Tensor, buckets: SumBuckets | None = None,
               deferred: list[tuple[Tensor, Tensor]] | None = None) -> None:
    """``into[p] += t`` in the sum dtype; a first contribution goes into ``p``'s bucket slot if it has one
    (already there when a handler wrote it into the slot it was offered). With ``deferred``, a copy into a
    slot is appended there as (slot, t) instead, for the caller to do all at once."""
    if p in into:
        into[p].add_(t)
        return
    dtype = sum_dtype(p.dtype)
    slot = buckets.slot(p, dtype) if buckets is not None else None
    if slot is None:
        into[p] = t.to(dtype)
    elif t.data_ptr() == slot.data_ptr() and t.shape == slot.shape and t.dtype == dtype:
        into[p] = t  # written in place by the handler
    elif deferred is not None:
        into[p] = slot
        deferred.append((slot, t))
    else:
        into[p] = slot.copy_(t)


class SumBuckets:
    """Clipped sums as views into one flat buffer per (device, dtype), laid out in a fixed parameter order
    (the optimizer's): the private step then noises, checks, masks and all-reduces each buffer whole, with
    no concatenated copy of the gradients. A fresh buffer per step (the last step's ``p.grad`` are views of
    the previous one). The layout is the same on every rank of a data-parallel run, whatever each touched."""

    def __init__(self) -> None:
        self._order: list[nn.Parameter] = []
        #: per (device, dtype): the parameters with a slot, in order, and the buffer's length
        self._layouts: dict[tuple[torch.device, torch.dtype], tuple[list[nn.Parameter], int]] = {}
        #: this step's buffers, and every slot of each as a view (made once, when the buffer is allocated)
        self._buffers: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self._slots: dict[int, Tensor] = {}

    def set_order(self, params: list[nn.Parameter]) -> None:
        self._order = [p for p in params if p.requires_grad]
        self._layouts, self._buffers, self._slots = {}, {}, {}

    def _layout(self, key: tuple[torch.device, torch.dtype]) -> tuple[list[nn.Parameter], int]:
        if key not in self._layouts:
            members = [q for q in self._order if q.device == key[0] and sum_dtype(q.dtype) == key[1]]
            self._layouts[key] = (members, sum(q.numel() for q in members))
        return self._layouts[key]

    def slot(self, p: nn.Parameter, dtype: torch.dtype) -> Tensor | None:
        """``p``'s view into this step's buffer for ``dtype`` (uninitialised), or None if ``p`` has no slot."""
        view = self._slots.get(id(p))
        if view is not None and view.dtype == dtype:
            return view
        key = (p.device, dtype)
        if key in self._buffers:
            return None  # the buffer exists and p is not in it
        members, total = self._layout(key)
        if not any(q is p for q in members):
            return None
        buf = self._buffers[key] = torch.empty(total, device=p.device, dtype=dtype)
        # one split for all slots, and a view only where a parameter is not 1-D
        for q, piece in zip(members, buf.split([q.numel() for q in members])):
            self._slots[id(q)] = piece if piece.shape == q.shape else piece.view(q.shape)
        return self._slots[id(p)]

    def complete(self, sums: dict[nn.Parameter, Tensor]) -> None:
        """Zero the slots no reduction wrote (a parameter no sample touched) and add them to ``sums``, so
        each buffer is covered by views in order; then start afresh for the next step."""
        for key in self._buffers:
            for q in self._layout(key)[0]:
                if q not in sums:
                    sums[q] = self._slots[id(q)].zero_()
        self.reset()

    def reset(self) -> None:
        """Drop this step's buffers (the next contribution allocates fresh ones)."""
        self._buffers, self._slots = {}, {}


class BatchLedger:
    """Loader batch, reductions per batch and per step, the clipped sums, and the gradients written."""

    def __init__(self) -> None:
        #: multiplies every clipped sum (the optimizer sets 1 / expected batch size for mean reduction)
        self.output_scale = 1.0
        #: records in the batch the private loader yielded last (None: the batch did not come from it)
        self.loader_batch: int | None = None
        self._batch_reduced = False  # that batch was already reduced by a backward
        #: reductions of a loader batch that had already been reduced, since the last step
        self.repeated_batches = 0
        self.batches_accumulated = 0  # reductions since the last step
        #: logical batches the private loader (or VirtualSteps) yielded since the last step: a step releases
        #: one Poisson batch, so more than one is refused (see ``step_problem``)
        self.batches_drawn = 0
        self._drawn_used = True  # the logical batch drawn last was reduced by a backward (or forgotten)
        self._uncounted = False  # the batch drawn last was drawn with gradients off, and not counted yet
        self._left_reduced = False  # a loop was left after the backward of a batch not yet stepped (left_loop)
        #: the size of the batch drawn before the last one when that one was never reduced (a loop that draws
        #: ahead of its backward: named in the batch-size error), else None
        self.drawn_ahead: int | None = None
        #: a batch was drawn since the last step taken: a checkpoint saves the sampler as it was before it
        self.drawn_unstepped = False
        self._summed: dict[nn.Parameter, Tensor] = {}
        #: where the clipped sums live (the optimizer sets the order; without one, sums are separate tensors)
        self.sum_buckets = SumBuckets()
        self._written: dict[nn.Parameter, tuple[Tensor, int]] = {}
        #: 0-dim bool device tensor, True once a reduction since the last pop saw a non-finite per-sample norm
        #: (None: nothing reduced). Kept on the device: the optimizer masks the step with it (no host read).
        self.nonfinite: Tensor | None = None

    def note_nonfinite(self, bad: Tensor) -> None:
        """OR a reduction's device-side non-finite flag into ``nonfinite`` (no host read)."""
        self.nonfinite = bad if self.nonfinite is None else self.nonfinite | bad

    def pop_nonfinite(self) -> Tensor | None:
        """The non-finite flag of the reductions since the last pop (and forget it)."""
        out, self.nonfinite = self.nonfinite, None
        return out

    def note_batch(self, size: int | None, first: bool = True) -> None:
        """The private loader yielded a batch of ``size`` records: the batch every tracked layer must see
        as dimension 0 of its input, reduced by exactly one backward. ``first``: it starts a logical batch
        (False for the later chunks of one under ``VirtualSteps``). ``size`` None: a chunk of a loader that is
        not the private one (``VirtualSteps`` around another loader): its batch is unverified, as in a
        plain loop over that loader."""
        if first and not self._drawn_used and self.loader_batch is not None:
            self.drawn_ahead = self.loader_batch  # the batch before this one was never reduced (yet)
        elif first:
            self.drawn_ahead = None
        self.loader_batch = None if size is None else int(size)
        self._batch_reduced = False
        # drawn with gradients off (an evaluation pass over the private loader): counted only if a backward
        # reduces it, so evaluating between epochs is not a skipped step
        self._uncounted = first and not torch.is_grad_enabled()
        if first and not self._uncounted:
            self.batches_drawn += 1
            self._drawn_used = False
            self.drawn_unstepped = True

    def left_loop(self, batches_yielded: int) -> None:
        """The loop over the private loader (or ``VirtualSteps``) was left (``break``) after it yielded
        ``batches_yielded`` logical batches. If the last one was never reduced, it is forgotten: leaving an
        epoch early and starting the next one is not a skipped step. Only for a loop that had yielded an
        earlier batch: ``next(iter(loader))`` also leaves its iterator at once, and two such batches summed
        into one backward must still count as two."""
        if batches_yielded > 1 and not self._drawn_used and self.batches_drawn:
            self.batches_drawn -= 1
            self._drawn_used = True
        elif self._drawn_used and self.batches_drawn and self.batches_accumulated:
            # left after its backward (a VirtualSteps loop left inside a logical batch, or a plain loop between
            # backward and step): the batch is forgotten once zero_grad drops its sums (nothing of it released)
            self._left_reduced = True

    def _count_loader_batch(self) -> int | None:
        """Called once per reduction: the loader's batch size (None if the batch did not come from it),
        counting a second reduction of the same batch."""
        if self._uncounted:  # drawn with gradients off, reduced all the same: it is this step's batch
            self._uncounted = False
            self.batches_drawn += 1
            self.drawn_unstepped = True
        self._drawn_used = True
        if self.loader_batch is not None:
            if self._batch_reduced:
                self.repeated_batches += 1
            self._batch_reduced = True
        return self.loader_batch

    def step_problem(self, in_virtual_steps: bool, releasing: bool = True) -> str | None:
        """Why the step about to be taken would break the privacy bound (None if it would not).
        ``releasing``: this step adds noise and is accounted (False for the earlier chunks of a logical
        batch under ``VirtualSteps``, which only accumulate)."""
        if self.repeated_batches:
            return (f"a batch from the private data loader was reduced by more than one backward pass "
                    f"({self.repeated_batches} extra): a second backward over the same batch (in this step or, "
                    "with a batch reused, a later one), two losses with two backward() calls, or reentrant activation "
                    "checkpointing (use torch.utils.checkpoint.checkpoint(..., use_reentrant=False)). Each backward is "
                    "clipped on its own, so a sample in both could contribute up to 2 * max_grad_norm (and the "
                    "accountant assumes a fresh Poisson batch for every step). Add the losses and call backward "
                    "once, take the next batch from the loader for the next step, and run passes that are not the "
                    "training backward (e.g. the input gradient of adversarial training) inside "
                    "dpengine.no_capture().")
        if self.batches_drawn > 1 and in_virtual_steps:
            return (f"chunks of {self.batches_drawn} logical batches were accumulated into one step. A record "
                    "sampled in both could contribute 2 * max_grad_norm to it, while the accountant counts one "
                    "step. Call optimizer.step() at the end of each logical batch, as VirtualSteps signals (call "
                    "it after every chunk: it applies only after the last chunk of each logical batch), and "
                    "raise max_physical_batch_size rather than accumulating several logical batches.")
        if self.batches_drawn > 1:
            return (f"{self.batches_drawn} batches were drawn from the private data loader since the last step. "
                    "Each step must release exactly one Poisson batch: records of two batches summed into one "
                    "backward are paired by row (a record in both contributes 2 * max_grad_norm, at an inclusion "
                    "rate near 2q while q is accounted), and a batch drawn but not stepped is a step the "
                    "accountant never sees. Take one batch per step; to accumulate physical chunks into a larger "
                    "logical batch iterate dpengine.VirtualSteps over the private loader. An empty Poisson batch "
                    "is a step too and must not be skipped: run the model on it, backward and step as for any "
                    "batch. (Leaving a loop with break before a batch's backward forgets that batch, and batches "
                    "drawn with gradients off, for evaluation, count only if a backward reduces them; a loop that "
                    "draws the next batch before this one's step, as prefetching data fetchers do, is refused: "
                    "iterate the returned loader directly.)")
        if self.batches_accumulated > 1 and not in_virtual_steps:
            return (f"{self.batches_accumulated} backward passes were accumulated since the last step. dpengine "
                    "clips each backward on its own, so a sample that took part in two of them would contribute "
                    "up to 2 * max_grad_norm. To split one logical batch into physical chunks iterate "
                    "dpengine.VirtualSteps over the private loader; to combine several losses, add them and call "
                    "backward once.")
        if releasing and not self.batches_accumulated:
            return ("no backward() since the last step, so this step would release noise alone while the "
                    "accountant counts it (and the batch drawn for it would be lost). Call loss.backward() "
                    "before optimizer.step(), also on an empty Poisson batch (run the model on it: its "
                    "backward adds nothing, and the step adds the noise).")
        return None

    def forget_drawn(self) -> None:
        """A refused step: the batches drawn for it are spent; the next batch starts afresh (as after a step)."""
        self.batches_drawn = 0
        self._drawn_used, self.drawn_unstepped, self._left_reduced, self._uncounted = True, False, False, False

    def pop_clipped_sums(self) -> dict[nn.Parameter, Tensor]:
        """The clipped sums accumulated since the last pop (and forget them)."""
        out, self._summed = self._summed, {}
        self.sum_buckets.complete(out)
        self.batches_accumulated = self.repeated_batches = self.batches_drawn = 0
        self._drawn_used, self.drawn_unstepped, self._left_reduced = True, False, False
        return out

    def peek_clipped_sums(self) -> dict[nn.Parameter, Tensor]:
        """Copies of the clipped sums accumulated since the last step (for debugging; nothing is popped)."""
        return {p: t.detach().clone() for p, t in self._summed.items()}

    def pop_unclipped_sums(self) -> dict[nn.Parameter, Tensor]:
        """The unclipped sums (error feedback) since the last pop; none unless the source forms them."""
        return {}

    def mark_written(self, p: nn.Parameter, grad: Tensor) -> None:
        """Remember the private gradient the optimizer wrote (and its version): it is not a leak, and autograd
        accumulating into it in place changes the version."""
        self._written[p] = (grad, grad._version)

    def check_no_leak(self, named: list[tuple[str, nn.Parameter]]) -> None:
        """Raise if autograd wrote an ordinary gradient into a parameter's ``.grad``. Every source swaps the
        tracked parameters for aliases while their own layer runs, so the only gradient ``p.grad`` may hold is
        the private one the optimizer wrote (``mark_written``): anything else reached ``p`` outside its layer
        (a penalty on the weights, a parent module reading it) and carries no per-sample bound."""
        for name, p in named:
            grad = p.grad
            if grad is None:
                continue
            written, version = self._written.get(p, (None, -1))
            if grad is written and grad._version == version:
                continue
            if grad is written and not bool(grad.any()):  # zero_grad(set_to_none=False): zeroed in place
                self._written[p] = (grad, grad._version)
                continue
            # set by autograd, or accumulated into the private gradient the optimizer wrote
            raise PerSampleGradientError(
                f"parameter '{name}' received an ordinary (non-private) gradient from autograd: it was "
                "used outside its own module's forward (e.g. read directly by a parent module, or a penalty on the "
                "weights added to the loss), or a backward ran inside dpengine.no_capture(). dpengine cannot bound "
                "that gradient per sample. Use the parameter only through its module (wrap it in nn.Linear / "
                "nn.Embedding), apply weight decay in the optimizer (weight_decay=) instead of the loss, or freeze "
                "it.")

    def clear(self) -> None:
        if self._left_reduced:  # the left loop's batch: its sums go now, so it is not this step's batch
            self._left_reduced = False
            self.batches_drawn = max(0, self.batches_drawn - 1)
        self._summed = {}
        self.sum_buckets.reset()
        self.nonfinite = None
        self.batches_accumulated = self.repeated_batches = 0
        self._written = {}
