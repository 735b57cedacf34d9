"""``dpengine train``: config-driven private training (the main job).

A job is a classification task: a dataset of ``(input, target)`` samples with integer class targets, a model
mapping a batch of inputs to ``(batch, classes)`` logits, and a per-batch mean loss (cross-entropy unless the
data factory returns its own). Data and model are built-ins (``[data] dataset``, ``[model] kind``) or the
user's own callables named by import path (``[data] factory``, ``[model] factory``); every key is described
in ``configs/reference.toml``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from .config import CLIPPING_MODES, MODEL_INPUT, PRECISIONS, TrainConfig, load_config, packaged_config_path

#: keyword arguments dpengine offers a model factory (passed when its signature names them)
MODEL_FACTORY_ARGS = ("input_shape", "num_classes", "vocab_size")
#: keyword arguments dpengine offers a data factory (passed when its signature names them)
DATA_FACTORY_ARGS = ("seed", "test_fraction")


class ConfigError(ValueError):
    """A config that cannot be turned into a job (a factory not found, or returning the wrong thing).
    The message is one line naming the key and what is expected; the CLI prefixes the config file."""


# ---------------------------------------------------------------------------------------------- data
@dataclass
class Task:
    """What the training loop needs from the data: both splits, the loss, and (lazily) the label and
    vocabulary sizes a model needs."""

    train: Dataset
    test: Dataset
    loss: Callable[[Any, Tensor], Tensor]
    #: input form of a built-in dataset ("vector", "image", "tokens"); None for a user dataset
    form: str | None = None
    known_num_classes: int | None = None
    known_vocab_size: int | None = None
    source: str = ""

    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train[0][0].shape)

    def num_classes(self) -> int:
        if self.known_num_classes is None:  # one pass over both splits (a `num_classes` attribute avoids it)
            self.known_num_classes = 1 + max(int(torch.as_tensor(y).max()) for ds in (self.train, self.test)
                                             for _, y in _samples(ds))
        return self.known_num_classes

    def vocab_size(self) -> int:
        if self.known_vocab_size is None:
            x0 = self.train[0][0]
            if x0.is_floating_point() or x0.is_complex():
                raise ConfigError(f"{self.source} gives {x0.dtype} inputs; vocab_size is offered only for "
                                  "integer token inputs.")
            self.known_vocab_size = 1 + max(int(x.max()) for ds in (self.train, self.test) for x, _ in _samples(ds))
        return self.known_vocab_size


def _samples(ds: Dataset) -> Iterator[tuple[Tensor, Any]]:
    for i in range(len(ds)):  # type: ignore[arg-type]
        yield ds[i]


def _split(x: Tensor, y: Tensor, test_fraction: float, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Stratified split (scikit-learn), as the digits job always did."""
    from sklearn.model_selection import train_test_split

    idx = torch.arange(len(y)).numpy()
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=y.numpy())
    tr_t, te_t = torch.as_tensor(tr), torch.as_tensor(te)
    return x[tr_t], x[te_t], y[tr_t], y[te_t]


def _standardized(x, y, cfg: TrainConfig) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Train/test split, features standardized with statistics of the training split only."""
    x_tr, x_te, y_tr, y_te = _split(torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y),
                                    cfg.data.test_fraction, cfg.data.seed)
    mean, std = x_tr.mean(0), x_tr.std(0, unbiased=False) + 1e-6
    return ((x_tr - mean) / std).float(), ((x_te - mean) / std).float(), y_tr, y_te


def sequence_task(samples: int, seq_len: int, vocab_size: int, seed: int) -> tuple[Tensor, Tensor]:
    """The synthetic sequence task: uniform random tokens in [0, vocab_size); the label (3 classes) is the
    token among 0, 1, 2 that occurs most often in the sequence (the smallest on ties). Deterministic
    given the seed."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab_size, (samples, seq_len), generator=g)
    counts = torch.stack([(x == k).sum(1) for k in range(3)], 1)  # (N, 3)
    return x, counts.argmax(1)  # argmax returns the first maximum


def _builtin_data(cfg: TrainConfig) -> Task:
    d, name = cfg.data, cfg.data.dataset
    ce = nn.CrossEntropyLoss()
    if name in ("digits", "breast_cancer"):
        from sklearn.datasets import load_breast_cancer, load_digits

        x, y = (load_digits if name == "digits" else load_breast_cancer)(return_X_y=True)
        x_tr, x_te, y_tr, y_te = _standardized(x, y, cfg)
        form = "vector"
        if cfg.model.kind is not None and MODEL_INPUT[cfg.model.kind] == "image":  # digits as 1x8x8 images
            x_tr, x_te, form = x_tr.view(-1, 1, 8, 8), x_te.view(-1, 1, 8, 8), "image"
        return Task(TensorDataset(x_tr, y_tr), TensorDataset(x_te, y_te), ce, form, int(y.max()) + 1,
                    source=f"data.dataset = {name!r}")
    x, y = sequence_task(d.samples, d.seq_len, d.vocab_size, d.seed)
    x_tr, x_te, y_tr, y_te = _split(x, y, d.test_fraction, d.seed)
    return Task(TensorDataset(x_tr, y_tr), TensorDataset(x_te, y_te), ce, "tokens", 3, d.vocab_size,
                source="data.dataset = 'sequence'")


def load_data(cfg: TrainConfig) -> Task:
    """The job's data: a built-in dataset, or what ``[data] factory`` returns (checked)."""
    if cfg.data.factory is None:
        return _builtin_data(cfg)
    key = f"data.factory = {cfg.data.factory!r}"
    expected = ("expected (train, test) or (train, test, loss): torch.utils.data.Dataset objects of "
                "(input tensor, integer target) samples, and a loss(output, target) -> scalar mean")
    fn = import_factory("data.factory", cfg.data.factory)
    offered = {"seed": lambda: cfg.data.seed, "test_fraction": lambda: cfg.data.test_fraction}
    out = call_factory("data", cfg.data.factory, fn, offered, cfg.data.options)
    if not isinstance(out, (tuple, list)) or len(out) not in (2, 3):
        raise ConfigError(f"{key} returned {_describe(out)}; {expected}.")
    train, test = out[0], out[1]
    for split, ds in (("train", train), ("test", test)):
        if not isinstance(ds, Dataset) or not hasattr(ds, "__len__"):
            raise ConfigError(f"{key} returned {_describe(ds)} as the {split} split; {expected}.")
        if len(ds) == 0:
            raise ConfigError(f"{key} returned an empty {split} split; {expected}.")
        sample = ds[0]
        if not (isinstance(sample, (tuple, list)) and len(sample) == 2 and isinstance(sample[0], Tensor)):
            raise ConfigError(f"{key}: a {split} sample is {_describe(sample)}; {expected}.")
        target = sample[1]
        if not ((isinstance(target, int) and not isinstance(target, bool)) or (
                isinstance(target, Tensor) and target.ndim == 0 and not target.is_floating_point()
                and not target.is_complex() and target.dtype != torch.bool)):
            raise ConfigError(f"{key}: a {split} target is {_describe(target)}; expected integer class ids "
                              "(an int or a 0-d integer tensor per sample).")
    loss = out[2] if len(out) == 3 else nn.CrossEntropyLoss()
    if not callable(loss):
        raise ConfigError(f"{key} returned {_describe(loss)} as the loss; {expected}.")
    if len(out) == 3 and cfg.model.kind == "lipschitz_mlp":
        raise ConfigError(f"{key} returned a loss, but model kind = 'lipschitz_mlp' trains with its own "
                          "Lipschitz loss (model.temperature); return (train, test) only, or use another model.")
    return Task(train, test, loss, None, getattr(train, "num_classes", None), getattr(train, "vocab_size", None),
                source=key)


# ---------------------------------------------------------------------------------------------- models
def _act(name: str) -> type[nn.Module]:
    return {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}[name]


class SmallCNN(nn.Module):
    """3x3 convolutions (the first with stride 1, the rest stride 2, padding 1), then a linear head on the
    flattened feature map. No batch statistics anywhere (each sample's output depends on that sample only)."""

    def __init__(self, input_shape: Sequence[int], classes: int, channels: Sequence[int] = (16, 32),
                 activation: str = "relu") -> None:
        super().__init__()
        c_in, h, w = input_shape
        layers: list[nn.Module] = []
        for i, c in enumerate(channels):
            stride = 1 if i == 0 else 2
            layers += [nn.Conv2d(c_in, c, 3, stride=stride, padding=1), _act(activation)()]
            c_in, h, w = c, (h - 1) // stride + 1, (w - 1) // stride + 1
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in * h * w, classes)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W)
        return self.head(self.features(x).flatten(1))  # (B, c * h * w) -> (B, classes)


class _Block(nn.Module):
    """Pre-norm transformer block: bidirectional self-attention through F.scaled_dot_product_attention
    (projections are plain nn.Linear layers), then a feed-forward block."""

    def __init__(self, d_model: int, heads: int, activation: str) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv, self.proj = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, 2 * d_model), _act(activation)(), nn.Linear(2 * d_model, d_model))

    def forward(self, x: Tensor) -> Tensor:  # (B, T, d)
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)  # 3 x (B, T, d)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))  # (B, h, T, d/h)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, h, T, d/h), attention within each sample only
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.ff(self.ln2(x))


class TinyTransformer(nn.Module):
    """Token and position embeddings, ``layers`` blocks, a final LayerNorm, mean pooling over positions and
    a linear head: a sequence classifier."""

    def __init__(self, vocab_size: int, max_len: int, classes: int, d_model: int = 32, heads: int = 2,
                 layers: int = 1, activation: str = "gelu") -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab_size, d_model), nn.Embedding(max_len, d_model)
        self.blocks = nn.Sequential(*[_Block(d_model, heads, activation) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(d_model), nn.Linear(d_model, classes)

    def forward(self, ids: Tensor) -> Tensor:  # (B, T) integer tokens
        b, t = ids.shape
        pos = torch.arange(t, device=ids.device).expand(b, t)  # (B, T): one row of position ids per sample
        x = self.tok(ids) + self.pos(pos)  # (B, T, d)
        return self.head(self.ln(self.blocks(x)).mean(1))  # (B, d) -> (B, classes)


def _check_form(task: Task, kind: str) -> None:
    """A user dataset with a built-in model: its inputs must have the form the model takes."""
    need = MODEL_INPUT[kind]
    x = task.train[0][0]
    ok = {"vector": x.ndim == 1 and x.is_floating_point(), "image": x.ndim == 3 and x.is_floating_point(),
          "tokens": x.ndim == 1 and not x.is_floating_point() and not x.is_complex()}[need]
    if not ok:
        words = {"vector": "1-D float feature vectors", "image": "(C, H, W) float images",
                 "tokens": "1-D integer token sequences"}[need]
        raise ConfigError(f"model kind = {kind!r} takes {words}, but {task.source} gives inputs of shape "
                          f"{tuple(x.shape)} and dtype {x.dtype}; use a model for these inputs or model.factory.")


def build_model(cfg: TrainConfig, task: Task) -> nn.Module:
    """The built-in model ``[model] kind`` sized for the task, or what ``[model] factory`` returns."""
    m = cfg.model
    if m.factory is not None:
        fn = import_factory("model.factory", m.factory)
        offered = {"input_shape": task.input_shape, "num_classes": task.num_classes, "vocab_size": task.vocab_size}
        model = call_factory("model", m.factory, fn, offered, m.options)
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model.factory = {m.factory!r} returned {_describe(model)}; expected a "
                              "torch.nn.Module.")
        return model
    assert m.kind is not None
    if task.form is None:
        _check_form(task, m.kind)
    classes = task.num_classes()
    if m.kind == "cnn":
        return SmallCNN(task.input_shape(), classes, m.channels, m.activation)
    if m.kind == "transformer":
        return TinyTransformer(task.vocab_size(), task.input_shape()[0], classes, m.d_model, m.heads, m.layers,
                               m.activation)
    d_in = task.input_shape()[0]
    if m.kind == "lipschitz_mlp":
        from .lipschitz import GroupSort, InputNormClip, SpectralLinear

        lip: list[nn.Module] = [InputNormClip(m.input_norm)]
        for h in m.hidden:
            lip += [SpectralLinear(d_in, h), GroupSort(2)]
            d_in = h
        return nn.Sequential(*lip, SpectralLinear(d_in, classes))
    layers: list[nn.Module] = []
    for h in m.hidden:
        layers += [nn.Linear(d_in, h), _act(m.activation)()]
        d_in = h
    layers.append(nn.Linear(d_in, classes))
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------------------------- factories
def _describe(obj: Any) -> str:
    text = repr(obj)
    return f"{type(obj).__name__} {text[:60] + '...' if len(text) > 60 else text}".replace("\n", " ")


@contextlib.contextmanager
def import_path(dirs: Sequence[str | Path]) -> Iterator[None]:
    """Put ``dirs`` at the front of ``sys.path`` for the duration (the user's own packages: the current
    directory and the config file's directory), then take off what was added."""
    added = [str(Path(d).resolve()) for d in dirs]
    added = [d for i, d in enumerate(added) if d not in sys.path and d not in added[:i]]
    sys.path[:0] = added
    try:
        yield
    finally:
        for d in added:
            with contextlib.suppress(ValueError):
                sys.path.remove(d)


def import_factory(key: str, spec: str) -> Callable[..., Any]:
    """Resolve ``"module.path:attr"`` to a callable; one-line ``ConfigError`` otherwise."""
    module_name, attr = spec.split(":", 1)
    where = f"{key} = {spec!r}"
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        parts = module_name.split(".")
        if e.name in {".".join(parts[:i]) for i in range(1, len(parts) + 1)}:
            raise ConfigError(f"{where}: no module named {e.name!r} (searched the current directory, the config "
                              "file's directory and sys.path/PYTHONPATH); expected an importable module with "
                              f"a callable {attr!r}.") from None
        raise ConfigError(f"{where}: importing {module_name!r} failed: {e}.") from None
    except ImportError as e:
        raise ConfigError(f"{where}: importing {module_name!r} failed: {e}.") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None)))
            raise ConfigError(f"{where}: {module_name!r} has no attribute {attr!r}; expected a callable there "
                              f"(callables in the module: {names[:12]}).")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{where}: {attr!r} is {_describe(obj)}, not callable; expected a function or class.")
    return obj


def call_factory(section: str, spec: str, fn: Callable[..., Any], offered: dict[str, Callable[[], Any]],
                 options: dict[str, Any]) -> Any:
    """Call a user factory with the offered arguments its signature names (all of them if it takes
    ``**kwargs``) plus every ``[section.options]`` entry (an option overrides an offered argument of the same
    name). A plain ``def build(): ...`` gets nothing."""
    where = f"{section}.factory = {spec!r}"
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # some builtins have no signature: pass the options alone
        params = None
    takes_all = params is not None and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {name: get() for name, get in offered.items()
              if name not in options and params is not None and (takes_all or name in params)}
    kwargs.update(options)
    if params is not None:
        try:
            inspect.signature(fn).bind(**kwargs)
        except TypeError as e:
            raise ConfigError(f"{where}: cannot call it with keyword arguments {sorted(kwargs)}: {e}; its "
                              f"parameters are {list(params)}. dpengine passes those of {sorted(offered)} it "
                              f"names; give the others in [{section}.options].") from None
    return fn(**kwargs)


# ---------------------------------------------------------------------------------------------- training
def _optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    t = cfg.training
    if t.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=t.lr)
    return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum)


def resolve_device(spec: str) -> torch.device:
    """``training.device`` as a torch device: "auto" is CUDA when torch sees a GPU, else the CPU.

    Raises:
        ConfigError: CUDA asked for where torch has none (a CPU build, or no GPU visible), or a GPU index
            past the last one.
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"training.device = {spec!r}, but torch sees no CUDA device (a CPU build of torch, or "
                              "no GPU visible); use device = 'cpu', or 'auto' to take a GPU only when there is one.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"training.device = {spec!r}, but torch sees {torch.cuda.device_count()} GPU(s).")
    return device


#: fp16's fixed loss scale: make_private(loss_scale=...) in private runs, a GradScaler's starting scale in
#: non-private ones (a GradScaler cannot be used privately: its skipped steps depend on single records)
FP16_LOSS_SCALE = 2.0 ** 12


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The forward's precision context: bf16 or fp16 autocast, or nothing for fp32."""
    if precision in ("bf16", "fp16"):
        return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


def backward_and_step(loss: Tensor, optimizer: torch.optim.Optimizer, scaler: Any = None) -> None:
    """``loss.backward(); optimizer.step()``, or the GradScaler loop when ``scaler`` is given (non-private
    fp16 only: a private optimizer refuses a GradScaler)."""
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()


@torch.no_grad()
def accuracy(model: nn.Module, ds: Dataset, batch_size: int = 1024, device: torch.device | None = None,
             precision: str = "fp32") -> float:
    """Top-1 accuracy of ``(batch, classes)`` logits against integer targets."""
    device = device or torch.device("cpu")
    model.eval()
    correct = total = 0
    for x, y in DataLoader(ds, batch_size=batch_size):
        x, y = x.to(device), y.to(device)
        with autocast(device, precision):
            out = model(x)
        correct += int((out.argmax(1) == y).sum())
        total += len(y)
    model.train()
    return correct / total


@torch.no_grad()
def _probe(model: nn.Module, task: Task, where: str, device: torch.device) -> None:
    """One forward on two test samples before training: the output must be (batch, classes) logits."""
    x, y = next(iter(DataLoader(task.test, batch_size=2)))
    model.eval()
    out = model(x.to(device))
    model.train()
    if not (isinstance(out, Tensor) and out.ndim == 2 and out.shape[0] == len(y)):
        raise ConfigError(f"{where}: the model's output for a batch of {len(y)} is {_describe(out)}; dpengine "
                          "train reports classification accuracy and expects (batch, classes) logits.")
    if not (isinstance(y, Tensor) and y.ndim == 1 and not y.is_floating_point()):
        raise ConfigError(f"{task.source}: targets batch to {_describe(y)}; expected integer class ids.")


@dataclass
class RunResult:
    private: bool
    test_accuracy: float
    epsilon: float | None
    delta: float | None
    noise_multiplier: float | None
    steps: int
    seconds: float


def run(cfg: TrainConfig, private: bool = True, progress: bool = True,
        search_path: Sequence[str | Path] = ()) -> RunResult:
    """Train once (privately or not) and evaluate on the held-out split.

    User factories are imported with the current directory and ``search_path`` (the CLI passes the config
    file's directory) in front of ``sys.path``.

    Raises:
        ConfigError: a factory cannot be imported or returns the wrong thing, or data and model do not fit.
    """
    with import_path([os.getcwd(), *search_path]):
        return _run(cfg, private, progress)


def _run(cfg: TrainConfig, private: bool, progress: bool) -> RunResult:
    from .engine import PrivacyEngine

    device = resolve_device(cfg.training.device)
    precision = cfg.training.precision
    torch.manual_seed(cfg.training.seed)
    task = load_data(cfg)
    model = build_model(cfg, task).to(device)
    _probe(model, task, f"model.factory = {cfg.model.factory!r}" if cfg.model.factory else
           f"model kind = {cfg.model.kind!r}", device)
    optimizer = _optimizer(cfg, model)
    loader = DataLoader(task.train, batch_size=cfg.training.batch_size, shuffle=True,
                        pin_memory=device.type == "cuda")
    engine = None
    p = cfg.privacy
    loss_fn = task.loss
    if cfg.model.kind == "lipschitz_mlp":
        from .lipschitz import TemperatureCrossEntropy

        loss_fn = TemperatureCrossEntropy(cfg.model.temperature)
    if private:
        engine = PrivacyEngine(accountant=p.accountant, secure_mode=p.secure_mode,
                               seed=None if p.secure_mode else cfg.training.seed)
        options = dict(p.clipping_options)
        if p.clipping == "lipschitz":  # no threshold: the loss's Lipschitz constant bounds every gradient
            options["loss_lipschitz"] = loss_fn.lipschitz  # type: ignore[union-attr]
        else:
            options["max_grad_norm"] = p.max_grad_norm
        if precision == "fp16":
            options["loss_scale"] = FP16_LOSS_SCALE
        common = dict(module=model, optimizer=optimizer, data_loader=loader, clipping=p.clipping,
                      grad_sample_mode=p.grad_sample_mode, **options)
        if p.target_epsilon is not None:
            model, optimizer, loader = engine.make_private_with_epsilon(
                **common, target_epsilon=p.target_epsilon, target_delta=p.delta, epochs=cfg.training.epochs)
        else:
            model, optimizer, loader = engine.make_private(**common, noise_multiplier=p.noise_multiplier)
    # non-private fp16: the standard GradScaler loop
    scaler = torch.amp.GradScaler(device.type, init_scale=FP16_LOSS_SCALE) \
        if precision == "fp16" and not private else None
    start, steps = time.perf_counter(), 0
    bar = tqdm(range(cfg.training.epochs), desc="private" if private else "non-private", disable=not progress,
               unit="epoch")
    for _ in bar:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimizer.zero_grad()
            with autocast(device, precision):
                loss = loss_fn(model(x), y)
            backward_and_step(loss, optimizer, scaler)
            steps += 1
        if engine is not None:
            bar.set_postfix(eps=f"{engine.get_epsilon(p.delta):.3f}")
    seconds = time.perf_counter() - start
    return RunResult(
        private=private, test_accuracy=accuracy(model, task.test, device=device, precision=precision),
        epsilon=engine.get_epsilon(p.delta) if engine else None, delta=p.delta if engine else None,
        noise_multiplier=optimizer.noise_multiplier if engine else None, steps=steps, seconds=seconds)


def default_clipping_options(mode: str, batch_size: int) -> dict[str, Any]:
    """Options a mode needs when the config does not give them (adaptive's count noise: E[B] / 20, as
    Andrew et al. suggest)."""
    return {"unclipped_num_std": batch_size / 20} if mode == "adaptive" else {}


def _with_clipping(cfg: TrainConfig, clipping: str) -> TrainConfig:
    """``--clipping MODE``: the config with another clipping mode (and that mode's default options). An MLP
    becomes a Lipschitz MLP for ``lipschitz`` and back; other models cannot switch to ``lipschitz``."""
    kind = cfg.model.kind
    if clipping == "lipschitz" and kind == "mlp":
        kind = "lipschitz_mlp"
    elif clipping != "lipschitz" and kind == "lipschitz_mlp":
        kind = "mlp"
    return dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, kind=kind),
        privacy=dataclasses.replace(cfg.privacy, clipping=clipping,
                                    clipping_options=default_clipping_options(clipping, cfg.training.batch_size)))


_HELP = f"""Train privately as CONFIG says and report test accuracy and epsilon at the config's delta.

CONFIG is a TOML file, or the name of a config shipped in the dpengine.configs package ({{names}}). Without
it the packaged default runs: {packaged_config_path("default")}

Every key, with its default and meaning: {packaged_config_path("reference")}

Your own model and data: set [model] factory = "mypkg.models:build" and/or [data] factory =
"mypkg.data:load" (modules are imported from the current directory, the config file's directory and
PYTHONPATH); see the reference config for what they are called with and must return.
"""


def _help() -> str:
    from .config import packaged_configs

    return _HELP.replace("{names}", ", ".join(packaged_configs()))


@click.command("train", help=_help())
@click.argument("config", required=False)
@click.option("-c", "--config", "config_option", default=None, metavar="CONFIG",
              help="The config (same as the CONFIG argument).")
@click.option("--compare-nonprivate", is_flag=True, help="Also train the same model without privacy.")
@click.option("--clipping", type=click.Choice(CLIPPING_MODES), default=None,
              help="Override the config's clipping mode (the mode's options come from the config's "
                   "[privacy.clipping_options] when it names the same mode, else the mode's defaults).")
@click.option("--device", default=None, metavar="DEVICE",
              help="Override training.device: cpu, cuda, cuda:N or auto (CUDA when torch sees a GPU).")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="Override training.precision (bf16 / fp16: the forward under autocast; fp16 with a fixed loss "
                   "scale).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def train(config: str | None, config_option: str | None, compare_nonprivate: bool, clipping: str | None,
          device: str | None, precision: str | None, as_json: bool, no_progress: bool) -> None:
    if config is not None and config_option is not None:
        raise click.UsageError("Give the config once: as the CONFIG argument or with --config, not both.")
    config = config if config is not None else config_option
    source = config or "the packaged default config"
    try:
        cfg = load_config(config)
    except (ValueError, TypeError, OSError) as e:  # tomllib.TOMLDecodeError is a ValueError
        raise click.ClickException(f"{source}: {e}") from None
    if clipping is not None and clipping != cfg.privacy.clipping:
        try:
            cfg = _with_clipping(cfg, clipping)
        except ValueError as e:
            raise click.ClickException(f"{source} with --clipping {clipping}: {e}") from None
    overrides = {k: v for k, v in (("device", device), ("precision", precision)) if v is not None}
    if overrides:
        try:
            cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, **overrides))
        except ValueError as e:
            flags = " ".join(f"--{k} {v}" for k, v in overrides.items())
            raise click.ClickException(f"{source} with {flags}: {e}") from None
    search_path = [Path(config).parent] if config is not None and Path(config).is_file() else []
    torch.set_num_threads(min(2, torch.get_num_threads()))
    try:
        results = [run(cfg, private=True, progress=not no_progress, search_path=search_path)]
        if compare_nonprivate:
            results.append(run(cfg, private=False, progress=not no_progress, search_path=search_path))
    except ConfigError as e:
        raise click.ClickException(f"{source}: {e}") from None
    if as_json:
        out: dict[str, Any] = {"config": dataclasses.asdict(cfg), "runs": [dataclasses.asdict(r) for r in results]}
        click.echo(json.dumps(out))
        return
    priv = results[0]
    click.echo(f"private:     test accuracy {priv.test_accuracy:.2%}   epsilon {priv.epsilon:.3f} at delta "
               f"{priv.delta:g}   (noise multiplier {priv.noise_multiplier:.3f}, {priv.steps} steps, "
               f"{priv.seconds:.1f} s)")
    if compare_nonprivate:
        non = results[1]
        click.echo(f"non-private: test accuracy {non.test_accuracy:.2%}   ({non.steps} steps, {non.seconds:.1f} s)")
        click.echo(f"gap:         {100 * (non.test_accuracy - priv.test_accuracy):.1f} points")
    click.echo("Guarantee: (epsilon, delta)-DP for add/remove-one adjacency under Poisson sampling, "
               f"{cfg.privacy.accountant.upper()} accounting.")
