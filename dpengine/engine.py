"""``PrivacyEngine``: the only place that combines sampler, grad-sample backend, clipping, noise and accountant."""

from __future__ import annotations

import math
import pickle
import secrets
import warnings
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader, IterableDataset

from . import accounting
from ._validate import non_negative, one_of
from .clipping import ClippingMode, ClippingPolicy, LipschitzBounds, amplified, make_policy
from . import distributed
from .data import DPDataLoader, PoissonBatchSampler, WeakCallback
from .grad_sample.controller import (GradSampleController, GradSampleMode, LossReduction, check_loss_scale,
                                      trainable_layers)
from .noise import GaussianNoise
from .optimizer import DPOptimizer
from .validation import UnsupportedModuleError, validate


#: models with a private engine attached (weakly held: the registry never keeps a model alive)
_PRIVATE_MODULES: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _uncompiled(module: nn.Module) -> nn.Module:
    """The module that ``torch.compile(module)`` wraps (an ``OptimizedModule``), else ``module`` itself.

    Capture is attached to the wrapped module, and the compiled wrapper is returned to the user as given:
    the hooks run inside the compiled forward exactly as they do when the model is compiled after
    ``make_private`` (dynamo guards on a module's hooks and recompiles once). Parameter and layer names
    are those of the user's model, without the wrapper's ``_orig_mod.`` prefix. See DESIGN.md,
    "torch.compile"."""
    inner = getattr(module, "_orig_mod", None)
    if isinstance(inner, nn.Module) and type(module).__name__ == "OptimizedModule":
        return inner
    return module


class PrivacyEngine:
    """Turns a model, optimizer and data loader into their differentially private counterparts.

    Args:
        accountant: name of the accountant in ``dpengine.accounting``: "rdp", "pld", or "prv" (Opacus'
            default name; computed by dp-accounting's PLD, see ``dpengine.accounting.accountants``).
        secure_mode: draw noise and Poisson sampling from the OS CSPRNG (see ``GaussianNoise``), and harden
            noise sampling against floating-point attacks; nothing that could regenerate the noise is kept
            or checkpointed. Use it for real deployments; leave it off for reproducible research.
        seed: seed for noise and sampling, for reproducible runs; must be None in secure mode.

    Raises:
        ValueError: a seed together with ``secure_mode=True`` (it could not be honoured).

    Example::

        engine = PrivacyEngine()
        model, optimizer, loader = engine.make_private(module=model, optimizer=optimizer,
            data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0)
        for x, y in loader:
            optimizer.zero_grad(); loss_fn(model(x), y).backward(); optimizer.step()
        engine.get_epsilon(delta=1e-5)
    """

    def __init__(self, accountant: str = "rdp", secure_mode: bool = False, seed: int | None = None) -> None:
        if secure_mode and seed is not None:
            raise ValueError(f"secure_mode=True draws noise and sampling from the OS CSPRNG and cannot be seeded, "
                             f"so seed={seed!r} would be silently ignored. Drop the seed for a deployment, or use "
                             "secure_mode=False for a reproducible research run.")
        self.accountant_name = accountant
        self.accountant = accounting.create_accountant(accountant)
        self.secure_mode = secure_mode
        self.noise = GaussianNoise(seed=seed, secure_mode=secure_mode)
        self._sampling_seed = None if (secure_mode or seed is None) else int(seed) + 1
        self._sampler: PoissonBatchSampler | None = None  # the private loader's (None: not Poisson, or not yet)
        #: a sampler state loaded before make_private built the sampler ("reseed": see ``_load_sampling``)
        self._sampling_pending: torch.Tensor | str | None = None
        self.controller: GradSampleController | None = None
        self.optimizer: DPOptimizer | None = None

    # ------------------------------------------------------------------------------------------ setup
    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: Optimizer,
        data_loader: DataLoader,
        noise_multiplier: float,
        max_grad_norm: float | Sequence[float] | Mapping[str | int, float] | str | None = None,
        clipping: str = "flat",
        grad_sample_mode: str = "bk",
        poisson_sampling: bool = True,
        loss_reduction: str = "mean",
        epsilon_budget: tuple[float, float] | None = None,
        loss_scale: float = 1.0,
        **clipping_options: Any,
    ) -> tuple[nn.Module, DPOptimizer, DataLoader]:
        """Attach per-sample clipping, noise and accounting. Always returns ``(module, optimizer, data_loader)``.

        The returned module is the same object (with capture hooks): same outputs, same ``state_dict``.

        ``p.grad`` stays None between ``loss.backward()`` and ``optimizer.step()``: the backward clips each
        sample's gradient as it goes, and ``step()`` writes the noised, private gradient into ``p.grad``
        before the wrapped optimizer runs (so ``clip_grad_norm_`` or logging ``p.grad`` there sees nothing;
        clipping is dpengine's job). To inspect the clipped, un-noised sum while debugging, call
        ``optimizer.clipped_grads_for_debugging()`` (copies; not private).

        Args:
            module: the model; every trainable layer must have a handler (see ``dpengine.validate``). For
                data-parallel training, a ``DistributedDataParallel`` wrapper (returned as given) or the plain
                model, with a ``DistributedSampler`` loader; see ``dpengine.distributed``.
            optimizer: any torch optimizer over the model's trainable parameters.
            data_loader: the training loader; with ``poisson_sampling`` it is replaced by a loader that
                includes each example independently with probability q = 1 / len(data_loader).
            noise_multiplier: sigma; Gaussian noise of std sigma * max_grad_norm is added to the clipped sum.
            max_grad_norm: C, the per-sample clipping threshold. For ``clipping="per_layer"`` also a
                sequence or dict (group index or parameter name) of per-group thresholds, or ``"dim"``
                (C_l proportional to sqrt(numel), with ``total_max_grad_norm=C``).
            clipping: what is clipped: "flat" (the whole per-sample gradient), "per_layer" (each group on its
                own; ``groups="parameter"`` (default), ``"module"`` or a list of parameter lists),
                "automatic" (normalization C / (||g_i|| + stability_constant)), "adaptive" (quantile-tracking
                bound; ``target_unclipped_quantile``, ``clipbound_learning_rate``, ``max_clipbound``,
                ``min_clipbound``, ``unclipped_num_std``) or "error_feedback" (DiceSGD;
                ``error_max_grad_norm``) or "lipschitz" (no clipping: a network of ``dpengine.lipschitz``
                layers whose per-sample gradients are bounded analytically; ``loss_lipschitz``,
                ``input_bound``, ``input_shape``; no max_grad_norm). See ``dpengine.clipping``.
            grad_sample_mode: "hooks" (materialized reference), "ghost" (Gram norms), "bk" (book-keeping) or
                "fused" (bk with Triton kernels for Linear/Conv1D layers, CUDA; the others stay on bk and are
                listed in a ``FusedFallbackWarning``; see ``dpengine.grad_sample.fused.fused_plan``).
            poisson_sampling: replace the loader's sampling by Poisson sampling (what the accountant assumes).
            loss_reduction: "mean" or "sum", how the loss reduces over the batch.
            epsilon_budget: optional ``(epsilon, delta)``: any step after which epsilon would exceed the
                budget raises ``PrivacyBudgetExhaustedError`` instead (``make_private_with_epsilon``
                sets it to the target).

        Raises:
            UnsupportedModuleError: listing every layer that cannot be trained privately, with the fix.
            ValueError: ``optimizer`` is already private (returned by an earlier ``make_private``).
        """
        if isinstance(optimizer, DPOptimizer):
            raise ValueError("The optimizer is already a private DPOptimizer from an earlier make_private; wrapping "
                             "it again would nest two private steps (the gradient lost, every step counted twice). "
                             "Pass its .original_optimizer instead.")
        non_negative(noise_multiplier=noise_multiplier)
        one_of([m.value for m in GradSampleMode], grad_sample_mode=grad_sample_mode)
        one_of([r.value for r in LossReduction], loss_reduction=loss_reduction)
        if self.controller is not None:
            raise RuntimeError("This PrivacyEngine is already attached to a model; use one engine per model.")
        # data-parallel training (dpengine/distributed.py): capture goes on ddp.module, the ranks must agree
        user_module = module
        module, dctx = distributed.prepare(_uncompiled(user_module), data_loader)
        module = _uncompiled(module)  # DistributedDataParallel(torch.compile(model))
        if dctx is not None:
            dctx.check_consistent(module, {
                "dataset_size": len(data_loader.dataset), "batches_per_epoch": len(data_loader),  # type: ignore
                "sample_rate": 1.0 / len(data_loader) if poisson_sampling else None,
                "batch_size": data_loader.batch_size, "noise_multiplier": float(noise_multiplier),
                "max_grad_norm": repr(max_grad_norm), "clipping": clipping, "grad_sample_mode": grad_sample_mode,
                "clipping_options": {k: v if isinstance(v, (int, float, str, bool, type(None))) else type(v).__name__
                                     for k, v in sorted(clipping_options.items())},
                "loss_reduction": loss_reduction, "poisson_sampling": poisson_sampling, "loss_scale": loss_scale,
                "secure_mode": self.secure_mode, "accountant": self.accountant_name,
                "epsilon_budget": epsilon_budget, "ddp": module is not user_module})
        if module in _PRIVATE_MODULES:
            raise RuntimeError("This model is already private (an earlier make_private attached its capture to it); "
                               "a second engine would stack another set of hooks. Use the first engine's "
                               "optimizer and loader, or call that engine's detach() first.")
        lipschitz = clipping == ClippingMode.LIPSCHITZ.value
        check_loss_scale(loss_scale)
        if lipschitz and loss_scale != 1:
            raise ValueError("clipping='lipschitz' needs exact float32 arithmetic (no fp16), so it takes no loss_scale.")
        if lipschitz:
            from . import lipschitz as lip

            if max_grad_norm is not None:
                raise ValueError("clipping='lipschitz' clips nothing (each sample's gradient is bounded by the "
                                 "network's Lipschitz constants); drop max_grad_norm.")

            broken = lip.check_lipschitz_model(module)
            if broken:
                raise ValueError("clipping='lipschitz' needs a network of dpengine.lipschitz layers, whose per-sample "
                                 "gradients have analytic bounds:\n  - " + "\n  - ".join(broken))
        else:
            problems = validate(module)
            if problems:
                raise UnsupportedModuleError(problems)
        self._check_optimizer(module, optimizer)
        if poisson_sampling:
            gen = None
            if self._sampling_seed is not None:
                # one stream per engine: a second make_private (after detach) continues it, never replays the
                # first phase's batch memberships (which the accountant would count as fresh samples)
                if self._sampler is not None and self._sampler.generator is not None:
                    gen = self._sampler.generator
                else:
                    gen = torch.Generator()
                    gen.manual_seed(self._sampling_seed)
            data_loader = DPDataLoader.from_data_loader(
                data_loader, generator=gen, secure=self.secure_mode,
                shard=None if dctx is None else (dctx.rank, dctx.world_size))
            self._sampler = data_loader.batch_sampler  # type: ignore[assignment]
            pending, self._sampling_pending = self._sampling_pending, None
            if pending is not None:
                self._restore_sampling(pending)
            # with shard=, the global expected batch: q times the whole dataset, summed over the ranks
            sample_rate, expected_batch_size = data_loader.sample_rate, data_loader.expected_batch_size
        else:
            sample_rate, expected_batch_size = _fixed_batch_rate(data_loader, 1 if dctx is None else dctx.world_size)
            warnings.warn("poisson_sampling=False: the accountant assumes Poisson sampling, which shuffled "
                          "fixed-size batches do not provide; the reported epsilon is not a proven guarantee "
                          "for this loader.", stacklevel=2)
            if not isinstance(data_loader.dataset, IterableDataset):  # a stream has no batch sampler to report
                # its own batches, reported as the Poisson loader's are (each layer's batch checked, one per step)
                data_loader = DPDataLoader.reporting(data_loader, sample_rate, expected_batch_size)

        if lipschitz:
            policy, self.controller = self._lipschitz(module, optimizer, loss_reduction, clipping_options)
        else:
            policy = self._policy(module, clipping, max_grad_norm, expected_batch_size, clipping_options)
            self.controller = GradSampleController(
                module, mode=GradSampleMode(grad_sample_mode), policy=policy,
                loss_reduction=LossReduction(loss_reduction), loss_scale=loss_scale)
        policy.grad_noise_multiplier(noise_multiplier)  # refuses a setting that cannot be split (adaptive)
        if not policy.amplified:  # see the policy's docstring: each step accounted at sample rate 1
            sample_rate = 1.0
        _PRIVATE_MODULES.add(module)
        self._module = module
        if isinstance(data_loader, DPDataLoader):
            # every batch the loader yields tells the controller its size: the batch every tracked layer
            # must see as dimension 0, reduced by exactly one backward
            data_loader.on_batch = WeakCallback(self.controller.note_batch)
            data_loader.on_leave = WeakCallback(self.controller.left_loop)
        self.optimizer = DPOptimizer(
            optimizer, controller=self.controller, noise_multiplier=noise_multiplier,
            policy=policy, expected_batch_size=expected_batch_size, sample_rate=sample_rate,
            loss_reduction=LossReduction(loss_reduction), noise=self.noise, accountant=self.accountant,
            distributed=dctx)
        if dctx is not None:
            dctx.attach(module)  # DDP's reducer made inert, no_sync watched (after every check passed)
        self._distributed = dctx
        if epsilon_budget is not None:
            self.optimizer.set_budget(*epsilon_budget)
        return user_module, self.optimizer, data_loader

    @staticmethod
    def _policy(module: nn.Module, clipping: str, max_grad_norm: Any, expected_batch_size: float,
                options: dict[str, Any]) -> ClippingPolicy:
        layers = trainable_layers(module)
        params = list({id(p): p for _, _, ps in layers for _, p in ps}.values())
        return make_policy(clipping, max_grad_norm, params=params,
                           layers=[(name, [p for _, p in ps]) for name, _, ps in layers],
                           names={id(p): n for n, p in module.named_parameters()},
                           expected_batch_size=expected_batch_size, **options)

    @staticmethod
    def _lipschitz(module: nn.Module, optimizer: Optimizer, loss_reduction: str,
                   options: dict[str, Any]) -> tuple[ClippingPolicy, Any]:
        """Bounds, gradient source and projection of ``clipping="lipschitz"`` (see ``dpengine.lipschitz``)."""
        from . import lipschitz as lip

        allowed = {"loss_lipschitz", "input_bound", "input_shape"}
        if set(options) - allowed or "loss_lipschitz" not in options:
            raise ValueError(f"clipping='lipschitz' takes loss_lipschitz= (required: the per-sample loss's Lipschitz "
                             "constant in the logits, e.g. TemperatureCrossEntropy(...).lipschitz), input_bound= "
                             "(a bound on each sample's input norm; default inf, for a model that starts with "
                             f"InputNormClip) and input_shape= (for conv biases); got {sorted(options)}.")
        bounds = lip.per_sample_gradient_bounds(module, options.get("input_bound", math.inf),
                                                options["loss_lipschitz"], input_shape=options.get("input_shape"))
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        policy = LipschitzBounds({id(p): bounds[n] for n, p in named}, {id(p): p.numel() for _, p in named})
        sums = lip.LipschitzSums(module, [p for _, p in named], mean_reduction=loss_reduction == LossReduction.MEAN.value,
                                 input_bound=options.get("input_bound", math.inf))
        lip.attach_projection(optimizer, module)  # after every check: a refused make_private attaches nothing
        return policy, sums

    def make_private_with_epsilon(
        self,
        *,
        module: nn.Module,
        optimizer: Optimizer,
        data_loader: DataLoader,
        target_epsilon: float,
        target_delta: float,
        epochs: float,
        max_grad_norm: float | None = None,
        poisson_sampling: bool = True,
        **kwargs: Any,
    ) -> tuple[nn.Module, DPOptimizer, DataLoader]:
        """Like ``make_private`` with the smallest noise multiplier that keeps epsilon <= target after
        ``epochs`` epochs (``epochs * len(data_loader)`` steps). Calibration is conservative, and the
        target becomes the budget, enforced by the same accountant that calibrated: a step that would exceed
        it raises ``PrivacyBudgetExhaustedError``, and on a fresh engine the planned steps always fit. After an
        earlier phase (``detach`` then this) the calibration is for the new steps alone while the budget counts
        the whole history, so the plan may stop short: the refusal says so."""
        if not (isinstance(epochs, (int, float)) and not isinstance(epochs, bool) and epochs > 0):
            raise ValueError(f"Expected epochs={epochs!r} > 0 (fractional epochs are planned as given).")
        steps = math.ceil(epochs * len(data_loader))  # 2.5 epochs plan 2.5 epochs of steps, rounded up
        if poisson_sampling:
            sample_rate = 1.0 / len(data_loader)
        else:
            sample_rate = _fixed_batch_rate(data_loader, 1 if not distributed.is_active() else _world())[0]
        if not amplified(kwargs.get("clipping", "flat")):
            sample_rate = 1.0
        sigma = accounting.get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=target_delta, sample_rate=sample_rate, steps=steps,
            accountant=self.accountant_name)
        out = self.make_private(module=module, optimizer=optimizer, data_loader=data_loader,
                                noise_multiplier=sigma, max_grad_norm=max_grad_norm,
                                poisson_sampling=poisson_sampling, epsilon_budget=None, **kwargs)
        out[1].set_budget(target_epsilon, target_delta, planned_steps=steps)
        return out

    @staticmethod
    def _check_optimizer(module: nn.Module, optimizer: Optimizer) -> None:
        trainable = {id(p) for p in module.parameters() if p.requires_grad}
        frozen = {id(p) for p in module.parameters() if not p.requires_grad}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) in trainable or id(p) in frozen:
                    continue
                raise ValueError("The optimizer holds a parameter that is not in the module; make_private can "
                                 "only privatize gradients of the module it is given.")

    # ------------------------------------------------------------------------------------------ privacy
    def get_epsilon(self, delta: float) -> float:
        """Epsilon spent so far at this delta (0 before the first step).

        Raises ``PerSampleGradientError`` if a step since the last check was masked for a non-finite
        gradient (``optimizer.check_finite()``: a host synchronization on a GPU), so a run that ends on such
        a step and reports its epsilon cannot miss it."""
        if self.optimizer is not None and hasattr(self.optimizer, "check_finite"):
            self.optimizer.check_finite()
        return float(self.accountant.get_epsilon(delta=delta))

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Accountant history, secure mode, and (outside secure mode) the noise seed and generator states and
        the Poisson sampler's generator state (``"sampling"``; None in secure mode or without Poisson
        sampling); save it with the model and optimizer. Plain types and tensors only
        (``torch.load(weights_only=True)``).

        A resumed run continues the sampling stream exactly where this run is: if a batch was drawn since
        the last step, the state from before it (the resumed run draws that batch for its first step)."""
        sampling = None
        if self._sampler is not None:
            sampling = self._sampler.generator_state(
                rewind=bool(getattr(self.controller, "drawn_unstepped", False)))
        elif isinstance(self._sampling_pending, torch.Tensor):
            sampling = self._sampling_pending.clone()
        return {"accountant": self.accountant.state_dict(), "noise": self.noise.state_dict(),
                "secure_mode": self.secure_mode, "steps_taken": self.optimizer.steps_taken if self.optimizer else 0,
                "sampling": sampling}

    def _restore_sampling(self, state: torch.Tensor | str) -> None:
        """Continue a saved sampling stream, or ("reseed") draw a fresh seed for a seeded sampler."""
        sampler = self._sampler
        if sampler is None or sampler.generator is None:
            return
        if isinstance(state, str):
            sampler.generator.manual_seed(secrets.randbits(63))
            sampler.state_before_draw = None
        else:
            sampler.set_generator_state(state)

    def _load_sampling(self, state: dict[str, Any]) -> None:
        """The sampler's part of ``load_state_dict``. A secure engine keeps drawing from the OS CSPRNG.

        A state without the key (a checkpoint written before dpengine saved the sampler) cannot continue
        the stream. A seeded sampler would then start its stream again from the seed and replay the batch
        memberships of the run's first steps, which the accountant would count as fresh, independent
        samples: it is reseeded from the OS CSPRNG instead, with a warning (the run stays private, but the
        rest of it is not reproducible). An unseeded sampler is already fresh."""
        if self.secure_mode:
            return
        if "sampling" not in state:
            if self._sampling_seed is None:
                return
            warnings.warn("This state holds no Poisson sampler state (it was written before dpengine saved it). "
                          "This engine's sampler is seeded, so resuming would replay the batch memberships of the "
                          "run's first steps, which the accountant would count as fresh samples; the sampler was "
                          "reseeded from the OS CSPRNG instead, and the rest of this run is not reproducible. "
                          "Checkpoints written now hold the sampler state and resume it exactly.", stacklevel=3)
            pending: torch.Tensor | str | None = "reseed"
        else:
            pending = state["sampling"]
            if pending is None:
                return  # secure, or no Poisson sampling: no stream to continue
        if self._sampler is None:
            self._sampling_pending = pending  # applied when make_private builds the sampler
        else:
            self._restore_sampling(pending)

    def _check_loadable(self, state: dict[str, Any]) -> None:
        """Secure mode is never downgraded. A secure engine keeps it whatever it loads (the noise state's
        seed and generators are ignored). A non-secure engine refuses a secure run's state rather than
        switching to secure mode: its data loader was already built with seeded sampling, so it could not
        honour the secure mode the run was started with."""
        secure_state = bool(state.get("secure_mode", False)) or bool(state.get("noise", {}).get("secure_mode", False))
        if secure_state and not self.secure_mode:
            raise ValueError("This state comes from a secure_mode run; continuing it without secure mode would make "
                             "the rest of its noise and sampling predictable. Load it into "
                             "PrivacyEngine(secure_mode=True) (without a seed), then make_private as before.")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` output; the accountant resumes from its history, noise and Poisson
        sampling from their generator states (before or after ``make_private``; see ``_load_sampling`` for a
        state without the sampler's).

        Raises:
            ValueError: ``state`` comes from a secure-mode run and this engine is not in secure mode.
        """
        self._check_loadable(state)
        self.accountant.load_state_dict(state["accountant"])
        self.noise.load_state_dict(state["noise"])
        self._load_sampling(state)
        if self.optimizer is not None:
            self.optimizer.steps_taken = int(state.get("steps_taken", 0))

    def save_checkpoint(self, path: str, *, module: nn.Module, optimizer: Optimizer | None = None, **extra: Any) -> None:
        """One file with model, optimizer and privacy state; ``dpengine budget --from-checkpoint`` reads it."""
        ckpt = {"model": module.state_dict(), "accountant": self.accountant.state_dict(), "engine": self.state_dict(), **extra}
        if optimizer is not None:
            ckpt["optimizer"] = optimizer.state_dict()
        torch.save(ckpt, path)

    def load_checkpoint(self, path: str, *, module: nn.Module, optimizer: Optimizer | None = None) -> dict[str, Any]:
        """Restore model, optimizer and privacy state written by ``save_checkpoint``; returns the checkpoint.

        Only tensors, numbers, strings and containers of them are unpickled (``weights_only=True``):
        unpickling anything else can run code, so values passed to ``save_checkpoint`` as ``extra`` must
        be of those types.

        Raises:
            ValueError: the file holds other objects, or comes from a secure-mode run and this engine is
                not in secure mode (then nothing is loaded).
        """
        try:
            ckpt = torch.load(path, weights_only=True)
        except pickle.UnpicklingError as err:
            raise ValueError(
                f"{path} holds objects other than tensors, numbers, strings and containers of them, and "
                "load_checkpoint does not unpickle those (unpickling can run code). Load checkpoints written by "
                "save_checkpoint, with extra values of plain types only.") from err
        self._check_loadable(ckpt["engine"])
        module.load_state_dict(ckpt["model"])
        if optimizer is not None and "optimizer" in ckpt:
            optimizer.load_state_dict(ckpt["optimizer"])
        self.load_state_dict(ckpt["engine"])
        return ckpt

    def detach(self) -> None:
        """Remove capture hooks from the model. Train it non-privately afterwards with
        ``optimizer.original_optimizer``: the private optimizer refuses to step once detached (it would
        release noise in place of the gradient while still counting privacy)."""
        if self.controller is not None:
            self.controller.detach()
            self.controller = None
            _PRIVATE_MODULES.discard(self._module)
        if getattr(self, "_distributed", None) is not None:
            self._distributed.detach()  # DDP's reducer stays inert: wrap the model in a new DDP to train it
        if self.optimizer is not None:
            self.optimizer.detached = True


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size()


def _fixed_batch_rate(data_loader: DataLoader, world: int) -> tuple[float, float]:
    """(q, expected batch) a loader kept as given (``poisson_sampling=False``) is accounted at: its batch size
    over the records one epoch draws from, the larger of the dataset's size over the ranks and its sampler's
    length (a ``SubsetRandomSampler`` draws from its indices only: 100 of 1000 records at batch 10 is q = 0.1,
    not 0.01). Never below the real rate: a smaller q would under-state epsilon."""
    if data_loader.batch_size is None:
        raise ValueError("poisson_sampling=False needs a loader with a fixed batch_size.")
    expected = float(data_loader.batch_size) * world
    sizes = []
    for what in (data_loader.dataset, data_loader.sampler):
        try:
            sizes.append(len(what))  # type: ignore[arg-type]
        except TypeError:
            pass
    if not sizes or not sizes[0]:
        raise ValueError("poisson_sampling=False needs a non-empty dataset (or sampler) with a length: q is the batch size over "
                         "the number of records an epoch draws from, which a stream without len() does not say. "
                         "Give the dataset a __len__, or use a map-style dataset with Poisson sampling.")
    rate = max([expected / sizes[0], *(float(data_loader.batch_size) / n for n in sizes[1:] if n)])
    return min(rate, 1.0), expected
