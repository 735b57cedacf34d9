"""Data-parallel private training on ``torch.distributed``: one private step over the ranks' union batch.

Each rank clips its own samples (its backward, as in single-process training). At ``optimizer.step()``
the ranks first agree that every one of them may step (a refusal on one rank is raised on all, so no rank
waits forever in a collective), then rank 0 adds the step's Gaussian noise to *its* clipped sums and one
sum all-reduce gives every rank the same noisy sum of all ranks' clipped sums. Dividing by the *global*
expected batch size q * N (mean reduction) and the same inner optimizer step leave the ranks with
identical parameters. The accountant on every rank records the global sample rate q.

Why rank 0 draws the noise (the "one rank draws, the all-reduce broadcasts it" option), rather than every
rank drawing from a shared seed: secure mode reseeds its generator from the OS CSPRNG before every draw
(``dpengine.noise``), so ranks cannot share a stream, and folding the noise into the all-reduce costs no
communication beyond the sum itself. Error feedback, whose release depends on the *global* clipped and
unclipped sums, all-reduces those first, combines them identically on every rank, and then broadcasts
rank 0's noisy release (one more collective, only in that mode).

What ``PrivacyEngine.make_private`` does with a ``DistributedDataParallel`` model: capture is attached to
``ddp.module``; DDP's reducer is made inert (its autograd hooks removed), because dpengine's capture
never lets autograd write ``p.grad`` and the reducer must never average raw, unclipped gradients (the
Lipschitz path computes ordinary gradients, which the reducer would otherwise average). The ``ddp``
object keeps working as the forward wrapper. ``no_sync()`` outside ``VirtualSteps`` is refused at the
step; FSDP, ``nn.DataParallel`` and DDP modes that move gradients themselves (``static_graph``, DDP mixed
precision, delayed all-reduce, optimizers in backward, the compiled python reducer) are refused.

Privacy note: the trust boundary is the set of ranks (each sees its own shard's raw data, and during the
all-reduce partial sums of other ranks' clipped gradients); the guarantee covers what leaves the job,
the sequence of noisy updates (and so the model), exactly as for single-process DP-SGD on the union batch.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

#: bytes per all-reduce bucket (DDP's default bucket size)
_BUCKET_BYTES = 25 * 2**20


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def is_active() -> bool:
    """True when ``torch.distributed`` is initialized with more than one rank."""
    dist = _dist()
    return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def _fsdp_types() -> tuple[type, ...]:
    types: list[type] = []
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        types.append(FullyShardedDataParallel)
    except ImportError:  # pragma: no cover - torch without distributed
        pass
    try:
        from torch.distributed.fsdp import FSDPModule  # fully_shard (FSDP2)

        types.append(FSDPModule)
    except ImportError:  # pragma: no cover - older torch
        pass
    return tuple(types)


def _refuse_unsupported_wrappers(module: nn.Module) -> None:
    fsdp = _fsdp_types()
    for name, m in module.named_modules():
        if fsdp and isinstance(m, fsdp):
            raise ValueError(
                f"make_private does not support FSDP (module '{name or '<root>'}' is {type(m).__name__}): FSDP "
                "all-gathers sharded parameters and reduce-scatters their gradients itself, around the parameter "
                "swap that per-sample clipping relies on, so dpengine cannot vouch for the update. For data-parallel private training wrap the "
                "model in torch.nn.parallel.DistributedDataParallel (or pass the plain model with a "
                "DistributedSampler loader); every rank then holds the whole model.")
        if isinstance(m, nn.DataParallel):
            raise ValueError(
                f"make_private does not support nn.DataParallel (module '{name or '<root>'}'): its replicas run "
                "copies of the layers in threads, outside the capture hooks. Use one process per device with "
                "torch.nn.parallel.DistributedDataParallel (torchrun), or the plain model on one device.")


def _ddp_problems(ddp: nn.Module) -> list[str]:
    """Settings under which DDP moves or rescales gradients itself, outside what dpengine can make inert."""
    out = []
    if getattr(ddp, "static_graph", False):
        out.append("static_graph=True (its first backward all-reduces every parameter's gradient on its own)")
    if getattr(ddp, "mixed_precision", None) is not None:
        out.append("DDP's mixed_precision (it trains low-precision copies of the parameters); use bf16 autocast")
    if getattr(ddp, "_delay_all_reduce_params", None):
        out.append("delay_all_reduce_named_params (a separate gradient all-reduce hook)")
    if getattr(ddp, "_use_python_reducer", False):
        out.append("the compiled-autograd python reducer (torch._dynamo optimize_ddp='python_reducer')")
    if any(hasattr(p, "_in_backward_optimizers") for p in ddp.parameters()):
        out.append("optimizers applied in backward (they would step on raw gradients)")
    reducer = getattr(ddp, "reducer", None)
    if reducer is None or not hasattr(reducer, "_remove_autograd_hooks"):
        out.append("this torch version's DDP reducer (it cannot be detached; torch >= 2.2 can)")
    return out


def _distributed_sampler(data_loader: Any) -> Any:
    from torch.utils.data.distributed import DistributedSampler

    batch_sampler = getattr(data_loader, "batch_sampler", None)
    sampler = getattr(batch_sampler, "sampler", None) if batch_sampler is not None else getattr(data_loader, "sampler",
                                                                                               None)
    return sampler if isinstance(sampler, DistributedSampler) else None


def _fingerprint(module: nn.Module) -> str:
    """SHA-256 of every parameter's name, shape, dtype, requires_grad and exact bytes."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in module.named_parameters():
            h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|{p.requires_grad}|".encode())
            t = p.detach().to("cpu").contiguous().reshape(-1)
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _buckets(tensors: list[Tensor], cap: int | None = None) -> Iterator[list[Tensor]]:
    """Tensors grouped by (device, dtype), in order, into buckets of at most ``cap`` bytes (default
    ``_BUCKET_BYTES``) or of one larger tensor."""
    cap = _BUCKET_BYTES if cap is None else cap
    groups: dict[tuple[str, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((str(t.device), t.dtype), []).append(t)
    for ts in groups.values():
        bucket: list[Tensor] = []
        size = 0
        for t in ts:
            nbytes = t.numel() * t.element_size()
            if bucket and size + nbytes > cap:
                yield bucket
                bucket, size = [], 0
            bucket.append(t)
            size += nbytes
        if bucket:
            yield bucket


@dataclass(eq=False)
class DistributedContext:
    """The process group a private optimizer reduces over, and what it knows about the DDP wrapper.

    Built by ``prepare``; ``PrivacyEngine.make_private`` hands it to the ``DPOptimizer``.
    """

    rank: int
    world_size: int
    group: Any = None
    _ddp: Any = None  # weakref to the DistributedDataParallel wrapper, if the user gave one
    #: forward passes (with grad, capture on) run under DDP's no_sync() since the last step
    no_sync_forwards: int = 0
    _handles: list[Any] = field(default_factory=list)

    # ------------------------------------------------------------------ collectives
    def _comm_device(self) -> torch.device:
        dist = _dist()
        backend = str(dist.get_backend(self.group))
        if "nccl" in backend:
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def all_reduce_(self, tensors: list[Tensor]) -> None:
        """Sum every tensor over the ranks, in place (contiguous tensors; bucketed, one collective a bucket)."""
        dist = _dist()
        comm = self._comm_device()
        pending = []
        for bucket in _buckets(tensors):
            if len(bucket) == 1 and bucket[0].is_contiguous() and bucket[0].device.type == comm.type:
                flat = bucket[0]
            else:
                flat = torch.cat([t.reshape(-1) for t in bucket]).to(comm)
            pending.append((dist.all_reduce(flat, group=self.group, async_op=True), bucket, flat))
        for work, bucket, flat in pending:
            work.wait()
            if flat is bucket[0]:
                continue
            offset = 0
            for t in bucket:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()

    def broadcast_(self, tensors: list[Tensor], src: int = 0) -> None:
        """Overwrite every rank's tensors with rank ``src``'s, in place."""
        dist = _dist()
        comm = self._comm_device()
        root = src if self.group is None else dist.get_global_rank(self.group, src)  # broadcast takes a global rank
        for bucket in _buckets(tensors):
            flat = torch.cat([t.reshape(-1) for t in bucket]).to(comm)
            dist.broadcast(flat, src=root, group=self.group)
            offset = 0
            for t in bucket:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()

    def noisy_sum_(self, tensors: list[Tensor], add_noise: Callable[[], None]) -> None:
        """Rank 0 runs ``add_noise`` (noise into its own tensors), then the sum all-reduce: every rank ends
        with sum over ranks + one draw of noise."""
        if self.rank == 0:
            add_noise()
        self.all_reduce_(tensors)

    def agree(self, problem: str | None, settings: dict[str, float] | None = None) -> str | None:
        """Collective: None when no rank has a problem and every rank has the same ``settings`` (the values the
        step's release and its accounting read, e.g. the noise multiplier: a rank that was given another one
        would account its own epsilon for rank 0's noise), else every rank's problem, named by rank. All ranks
        get the same answer, so they refuse (or step) together. One all-reduce (max of the flag, of each setting
        and of its negation) in the common case."""
        dist = _dist()
        names = list(settings or {})
        values = [float(settings[n]) for n in names] if settings else []
        flag = torch.tensor([0.0 if problem is None else 1.0, *values, *(-v for v in values)], dtype=torch.float64,
                            device=self._comm_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        host = flag.tolist()
        differ = [f"{n} (from {-host[1 + len(names) + i]:g} to {host[1 + i]:g})" for i, n in enumerate(names)
                  if host[1 + i] != -host[1 + len(names) + i]]
        if host[0] == 0 and not differ:
            return None
        if host[0] == 0:  # every rank sees the same maxima and minima: the same message, no second collective
            return (f"{', '.join(differ)} differ between ranks: each rank accounts its own value while rank 0's "
                    "noise is released, so their epsilons would disagree with what was released. Set them to the "
                    "same value on every rank (between steps).")
        problems: list[Any] = [None] * self.world_size
        dist.all_gather_object(problems, problem, group=self.group)
        return " | ".join(f"rank {r}: {p}" if p is not None else f"rank {r}: refused because another rank did"
                          for r, p in enumerate(problems))

    def count_noise(self, noise: Any) -> "_SummedNoise":
        """A stand-in for ``GaussianNoise`` whose ``add_`` sums its tensors over the ranks with one noise draw
        (rank 0's): what a policy's per-step statistic (adaptive clipping's count) needs."""
        return _SummedNoise(self, noise)

    # ------------------------------------------------------------------ setup checks
    def check_consistent(self, module: nn.Module, settings: dict[str, Any]) -> None:
        """Collective: every rank must run the same world, rank layout, settings and initial parameters.

        Raises (on every rank, with the same message):
            ValueError: listing each setting that differs between ranks, and whether the parameters do.
        """
        dist = _dist()
        mine = {"world_size": self.world_size, "rank": self.rank, **settings, "parameters": _fingerprint(module)}
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, mine, group=self.group)
        problems = []
        ranks = sorted(e["rank"] for e in everyone)
        if ranks != list(range(self.world_size)):
            problems.append(f"the ranks are {ranks}, expected each of 0..{self.world_size - 1} once")
        for key in mine:
            if key in ("rank", "parameters"):
                continue
            values = [e.get(key) for e in everyone]
            if any(v != values[0] for v in values):
                problems.append(f"{key} differs between ranks: " + ", ".join(
                    f"rank {e['rank']}: {v!r}" for e, v in zip(everyone, values)))
        if any(e["parameters"] != everyone[0]["parameters"] for e in everyone):
            differ = [e["rank"] for e in everyone if e["parameters"] != everyone[0]["parameters"]]
            problems.append(
                f"the model's parameters differ between ranks (rank(s) {differ} differ from rank 0's): every rank "
                "must start from the same parameters, or the ranks would train different models and the union "
                "batch would not be one DP-SGD step. Wrap the model in DistributedDataParallel before make_private "
                "(it broadcasts rank 0's parameters), or seed the initialization identically on every rank.")
        if problems:
            raise ValueError("Data-parallel private training needs every rank to agree: " + "; ".join(problems))

    # ------------------------------------------------------------------ DDP
    @property
    def ddp(self) -> Any:
        return self._ddp() if self._ddp is not None else None

    def attach(self, inner: nn.Module) -> None:
        """Make DDP's reducer inert and watch for ``no_sync()`` (called last in make_private, after every
        check passed, so a refused make_private leaves the user's DDP as it was)."""
        ddp = self.ddp
        if ddp is None:
            return
        ddp.reducer._remove_autograd_hooks()  # it must never average raw gradients (see the module docstring)
        from .grad_sample.controller import _capture_on

        def watch(module: nn.Module, args: Any) -> None:
            wrapper = self.ddp
            if wrapper is not None and torch.is_grad_enabled() and _capture_on() and \
                    not wrapper.require_backward_grad_sync:
                self.no_sync_forwards += 1

        self._handles.append(inner.register_forward_pre_hook(watch))

    def step_problem(self, in_virtual_steps: bool) -> str | None:
        """Why this rank's step must be refused for distributed reasons (None if it need not)."""
        if self.no_sync_forwards and not in_virtual_steps:
            return (f"{self.no_sync_forwards} forward pass(es) ran inside DistributedDataParallel.no_sync(). dpengine "
                    "all-reduces the clipped sums itself, once per step, so no_sync changes nothing about "
                    "communication; gradient accumulation with it (several backward passes per step) would clip "
                    "each backward on its own. Drop no_sync, and to split a logical batch into physical chunks "
                    "iterate dpengine.VirtualSteps over the private loader (no_sync is allowed, and inert, there).")
        return None

    def reset(self) -> None:
        self.no_sync_forwards = 0

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        ddp = self.ddp
        if ddp is not None:  # its reducer stays inert: refuse, from now on, a backward that would not all-reduce
            ddp.register_forward_pre_hook(_refuse_inert_ddp)


def _refuse_inert_ddp(ddp: nn.Module, args: Any) -> None:
    """Forward pre-hook left on a DDP wrapper after ``PrivacyEngine.detach()``: its reducer's autograd hooks
    were removed by make_private and cannot be put back, so a backward through it would silently train
    each rank on its own gradient. Evaluation (grad disabled, or eval mode) stays allowed."""
    if torch.is_grad_enabled() and ddp.training:
        raise RuntimeError("This DistributedDataParallel no longer averages gradients across ranks: make_private "
                           "removed its reducer's gradient hooks (dpengine all-reduces the clipped sums itself), and "
                           "detach() cannot restore them. To train non-privately, wrap the module in a new "
                           "DistributedDataParallel(ddp.module, ...); for evaluation, use torch.no_grad() or "
                           "ddp.eval().")


class _SummedNoise:
    """``add_(tensors, std)``: rank 0 adds N(0, std^2) to its tensors, then they are summed over the ranks
    (always, also for std == 0: the sum is the statistic)."""

    def __init__(self, ctx: DistributedContext, noise: Any) -> None:
        self.ctx, self.noise = ctx, noise

    def add_(self, tensors: list[Tensor], std: float) -> None:
        self.ctx.noisy_sum_(tensors, lambda: self.noise.add_(tensors, std))


def prepare(module: nn.Module, data_loader: Any) -> tuple[nn.Module, DistributedContext | None]:
    """The module to attach capture to, and the distributed context (None for single-process training).

    Distributed mode is on when the model is a ``DistributedDataParallel`` wrapper or the loader samples
    with a ``DistributedSampler`` (a process group of one rank works too: its all-reduce is the identity).

    Raises:
        ValueError: FSDP or ``nn.DataParallel``; a DDP setting that moves gradients itself; DDP without a
            DistributedSampler loader; a DistributedSampler whose rank or world size is not the process
            group's; DDP or a DistributedSampler without an initialized process group.
    """
    from torch.nn.parallel import DistributedDataParallel

    _refuse_unsupported_wrappers(module)
    ddp = module if isinstance(module, DistributedDataParallel) else None
    inner = ddp.module if ddp is not None else module
    if ddp is not None:
        _refuse_unsupported_wrappers(inner)
        problems = _ddp_problems(ddp)
        if problems:
            raise ValueError("make_private cannot make this DistributedDataParallel sound: " + "; ".join(problems)
                             + ". Construct DDP with its defaults (find_unused_parameters may be either), or pass "
                             "the plain model with a DistributedSampler loader: dpengine all-reduces the clipped "
                             "sums itself.")
    sampler = _distributed_sampler(data_loader)
    if ddp is None and sampler is None:
        if is_active():
            import warnings

            warnings.warn(
                f"torch.distributed is initialized with {_dist().get_world_size()} ranks, but the model is not "
                "DistributedDataParallel and the loader has no DistributedSampler: every rank trains its own private "
                "model on the whole dataset. Releasing several of them spends their privacy budgets together. For "
                "data-parallel private training wrap the model in DDP and give the loader a DistributedSampler.",
                stacklevel=3)
        return module, None
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("A DistributedDataParallel model or a DistributedSampler loader needs torch.distributed "
                         "initialized (init_process_group, e.g. under torchrun) before make_private; for "
                         "single-process training pass the plain model and loader.")
    group = ddp.process_group if ddp is not None else None
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if sampler is None:
        raise ValueError(
            "The model is DistributedDataParallel but the loader has no DistributedSampler: every rank would sample "
            "from the whole dataset, so a record could enter the step on two ranks (twice the sensitivity the "
            "accountant assumes). Give each rank's DataLoader sampler=DistributedSampler(dataset); make_private "
            "replaces it by Poisson sampling over this rank's disjoint shard.")
    if (sampler.num_replicas, sampler.rank) != (world, rank):
        raise ValueError(f"The loader's DistributedSampler has num_replicas={sampler.num_replicas}, "
                         f"rank={sampler.rank}, but this process is rank {rank} of {world} in the process group; use "
                         "DistributedSampler(dataset) with its defaults, which read them from the group.")
    return inner, DistributedContext(rank=rank, world_size=world, group=group,
                                     _ddp=weakref.ref(ddp) if ddp is not None else None)


__all__ = ["DistributedContext", "is_active", "prepare"]
