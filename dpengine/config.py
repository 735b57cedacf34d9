"""Training configs: TOML files loaded into frozen, validated dataclasses.

Every key, its default and its meaning: ``configs/reference.toml`` (installed as ``dpengine.configs``;
``dpengine train --help`` prints where). A test fails when a field is added here without appearing there.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ._validate import in_range, one_of, positive

#: built-in datasets -> the input forms they can provide ("vector": a 1-D float feature vector,
#: "image": a (C, H, W) float tensor, "tokens": a 1-D integer token sequence)
DATASET_INPUTS: dict[str, tuple[str, ...]] = {
    "digits": ("vector", "image"),  # scikit-learn's 8x8 handwritten digits, 10 classes
    "breast_cancer": ("vector",),  # scikit-learn's Wisconsin breast cancer, 30 features, 2 classes
    "sequence": ("tokens",),  # synthetic: which of tokens 0, 1, 2 occurs most often, 3 classes
}
#: built-in models -> the input form they take
MODEL_INPUT: dict[str, str] = {"mlp": "vector", "lipschitz_mlp": "vector", "cnn": "image", "transformer": "tokens"}
DATASETS = list(DATASET_INPUTS)
MODELS = list(MODEL_INPUT)
OPTIMIZERS = ["sgd", "adam"]
CLIPPING_MODES = ["flat", "per_layer", "automatic", "adaptive", "error_feedback", "lipschitz"]
ACTIVATIONS = ["relu", "tanh", "gelu"]
_INPUT_WORDS = {"vector": "feature vectors", "image": "(C, H, W) images", "tokens": "integer token sequences"}
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_DEVICE = re.compile(r"^(cpu|auto|cuda(:\d+)?)$")
PRECISIONS = ["fp32", "bf16", "fp16"]


def _check_factory(key: str, spec: str | None) -> None:
    if spec is not None and not (isinstance(spec, str) and _FACTORY.match(spec)):
        raise ValueError(f"Expected {key}={spec!r} as 'module.path:function' (e.g. 'mypkg.models:build').")


def _check_options(key: str, options: dict[str, Any], factory: str | None) -> None:
    if not isinstance(options, dict):
        raise ValueError(f"Expected {key} to be a table of keyword arguments, got {options!r}.")
    if options and factory is None:
        raise ValueError(f"{key} are keyword arguments of the {key.split('.')[0]}.factory callable; "
                         f"set {key.split('.')[0]}.factory or remove {key}.")


@dataclass(frozen=True)
class DataConfig:
    dataset: str | None = "digits"
    #: "module.path:function" returning (train, test) or (train, test, loss); replaces ``dataset``
    factory: str | None = None
    #: keyword arguments of ``factory`` (a TOML table [data.options])
    options: dict[str, Any] = field(default_factory=dict)
    test_fraction: float = 0.2
    seed: int = 0
    #: dataset = "sequence" only: number of sequences, their length and the vocabulary size
    samples: int = 2000
    seq_len: int = 16
    vocab_size: int = 12

    def __post_init__(self) -> None:
        if (self.dataset is None) == (self.factory is None):
            raise ValueError("Set exactly one of data.dataset (a built-in) and data.factory (your own).")
        if self.dataset is not None:
            one_of(DATASETS, dataset=self.dataset)
        _check_factory("data.factory", self.factory)
        _check_options("data.options", self.options, self.factory)
        in_range(0.05, 0.9, test_fraction=self.test_fraction)
        positive(samples=self.samples, seq_len=self.seq_len)
        if not (isinstance(self.vocab_size, int) and self.vocab_size >= 4):
            raise ValueError(f"Expected vocab_size={self.vocab_size!r} >= 4 (tokens 0, 1, 2 decide the label).")


@dataclass(frozen=True)
class ModelConfig:
    kind: str | None = "mlp"
    #: "module.path:function" returning a torch.nn.Module; replaces ``kind``
    factory: str | None = None
    #: keyword arguments of ``factory`` (a TOML table [model.options])
    options: dict[str, Any] = field(default_factory=dict)
    #: mlp, lipschitz_mlp: hidden layer widths
    hidden: tuple[int, ...] = (128,)
    #: mlp, cnn, transformer (its feed-forward block)
    activation: str = "tanh"
    #: lipschitz_mlp only: each input is clipped to this norm, and the loss is softmax cross-entropy at
    #: this temperature (Lipschitz constant sqrt(2) / temperature)
    input_norm: float = 8.0
    temperature: float = 0.125
    #: cnn only: output channels of its 3x3 convolutions (each after the first has stride 2)
    channels: tuple[int, ...] = (16, 32)
    #: transformer only: width, attention heads (dividing d_model) and number of blocks
    d_model: int = 32
    heads: int = 2
    layers: int = 1

    def __post_init__(self) -> None:
        if (self.kind is None) == (self.factory is None):
            raise ValueError("Set exactly one of model.kind (a built-in) and model.factory (your own).")
        if self.kind is not None:
            one_of(MODELS, kind=self.kind)
        _check_factory("model.factory", self.factory)
        _check_options("model.options", self.options, self.factory)
        one_of(ACTIVATIONS, activation=self.activation)
        positive(input_norm=self.input_norm, temperature=self.temperature)
        for h in self.hidden:
            positive(hidden=h)
        if not self.channels:
            raise ValueError("Expected channels to list at least one convolution width.")
        for c in self.channels:
            positive(channels=c)
        positive(d_model=self.d_model, heads=self.heads, layers=self.layers)
        if self.d_model % self.heads:
            raise ValueError(f"Expected heads={self.heads!r} to divide d_model={self.d_model!r}.")


@dataclass(frozen=True)
class TrainingConfig:
    epochs: int = 20
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.5
    momentum: float = 0.0
    seed: int = 0
    #: "cpu", "cuda", "cuda:N", or "auto" (CUDA when torch sees a GPU, else the CPU)
    device: str = "cpu"
    #: "fp32", "bf16" or "fp16": the forward and the loss under torch.autocast in that dtype (parameters, norms,
    #: clipped sums and noise stay float32); fp16 with a fixed loss scale (make_private(loss_scale=2**12))
    precision: str = "fp32"

    def __post_init__(self) -> None:
        positive(epochs=self.epochs)
        positive(batch_size=self.batch_size)
        positive(lr=self.lr)
        one_of(OPTIMIZERS, optimizer=self.optimizer)
        in_range(0.0, 0.999, momentum=self.momentum)
        if not (isinstance(self.device, str) and _DEVICE.match(self.device)):
            raise ValueError(f"Expected device={self.device!r} as 'cpu', 'cuda', 'cuda:N' or 'auto'.")
        one_of(PRECISIONS, precision=self.precision)


@dataclass(frozen=True)
class PrivacyConfig:
    target_epsilon: float | None = 3.0
    noise_multiplier: float | None = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    clipping: str = "flat"
    #: the clipping mode's keyword arguments of make_private (a TOML table [privacy.clipping_options])
    clipping_options: dict[str, Any] = field(default_factory=dict)
    grad_sample_mode: str = "bk"
    accountant: str = "rdp"
    secure_mode: bool = False

    def __post_init__(self) -> None:
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("Set exactly one of privacy.target_epsilon and privacy.noise_multiplier.")
        if self.target_epsilon is not None:
            positive(target_epsilon=self.target_epsilon)
        in_range(0.0, 1.0, delta=self.delta)
        positive(max_grad_norm=self.max_grad_norm)
        one_of(CLIPPING_MODES, clipping=self.clipping)
        one_of(["hooks", "ghost", "bk", "fused"], grad_sample_mode=self.grad_sample_mode)


@dataclass(frozen=True)
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def __post_init__(self) -> None:
        if (self.model.kind == "lipschitz_mlp") != (self.privacy.clipping == "lipschitz"):
            raise ValueError("clipping = 'lipschitz' goes with model kind = 'lipschitz_mlp' (a network whose "
                             "per-sample gradients have analytic bounds), and that model with that clipping only.")
        if self.privacy.clipping == "lipschitz" and self.training.precision != "fp32":
            raise ValueError("clipping = 'lipschitz' needs training.precision = 'fp32': its analytic gradient "
                             "bounds hold for exact float32 arithmetic, not 16-bit rounding.")
        kind, dataset = self.model.kind, self.data.dataset
        if kind is not None and dataset is not None and MODEL_INPUT[kind] not in DATASET_INPUTS[dataset]:
            fits = [m for m, form in MODEL_INPUT.items() if form in DATASET_INPUTS[dataset]]
            takes = [d for d, forms in DATASET_INPUTS.items() if MODEL_INPUT[kind] in forms]
            raise ValueError(f"model kind = {kind!r} takes {_INPUT_WORDS[MODEL_INPUT[kind]]}, but dataset = "
                             f"{dataset!r} gives {' or '.join(_INPUT_WORDS[f] for f in DATASET_INPUTS[dataset])}; "
                             f"use kind = one of {fits} or dataset = one of {takes}.")


SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "training": TrainingConfig,
                             "privacy": PrivacyConfig}
#: a key that, given alone, replaces the other's default (both given is an error)
_REPLACES = {PrivacyConfig: ("noise_multiplier", "target_epsilon"), DataConfig: ("factory", "dataset"),
             ModelConfig: ("factory", "kind")}
_TABLES = {"clipping_options", "options"}


def _build(cls: type, raw: dict[str, Any], where: str) -> Any:
    if not isinstance(raw, dict):
        raise ValueError(f"Expected [{where}] to be a table, got {raw!r}.")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(raw) - set(known)
    if unknown:
        raise ValueError(f"Unknown key(s) {sorted(unknown)} in [{where}]; expected some of {sorted(known)}.")
    kwargs = {k: v if k in _TABLES else tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    if cls in _REPLACES:
        given, replaced = _REPLACES[cls]
        if given in kwargs and replaced not in kwargs:
            kwargs[replaced] = None  # e.g. a fixed noise multiplier replaces the default target epsilon
    return cls(**kwargs)


def parse_config(raw: dict[str, Any]) -> TrainConfig:
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise ValueError(f"Unknown section(s) {sorted(unknown)}; expected some of {sorted(SECTIONS)}.")
    return TrainConfig(**{k: _build(cls, raw.get(k, {}), k) for k, cls in SECTIONS.items()})


def packaged_configs() -> list[str]:
    """Names of the configs shipped in the ``dpengine.configs`` package (``dpengine train NAME``)."""
    return sorted(p.name[:-5] for p in resources.files("dpengine.configs").iterdir() if p.name.endswith(".toml"))


def packaged_config_path(name: str = "default") -> str:
    """Where the packaged config ``name`` lives (a file path in an ordinary install)."""
    return str(resources.files("dpengine.configs").joinpath(f"{name}.toml"))


def load_config(path: str | Path | None = None) -> TrainConfig:
    """Load a TOML config: a file path, the name of a packaged config (``"breast_cancer"``), or ``None`` for
    the packaged ``default``."""
    if path is None:
        path = "default"
    if not Path(path).is_file() and str(path) in packaged_configs():
        text = resources.files("dpengine.configs").joinpath(f"{path}.toml").read_text()
    elif not Path(path).exists():
        raise ValueError(f"No config file {str(path)!r} and no packaged config of that name; packaged: "
                         f"{', '.join(packaged_configs())}.")
    else:
        text = Path(path).read_text()
    return parse_config(tomllib.loads(text))
