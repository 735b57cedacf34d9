"""Training configs: TOML files loaded into frozen, validated dataclasses."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ._validate import in_range, one_of, positive

DATASETS = ["digits"]
MODELS = ["mlp", "lipschitz_mlp"]
OPTIMIZERS = ["sgd", "adam"]
CLIPPING_MODES = ["flat", "per_layer", "automatic", "adaptive", "error_feedback", "lipschitz"]


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"
    test_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        one_of(DATASETS, dataset=self.dataset)
        in_range(0.05, 0.9, test_fraction=self.test_fraction)


@dataclass(frozen=True)
class ModelConfig:
    kind: str = "mlp"
    hidden: tuple[int, ...] = (128,)
    activation: str = "tanh"
    #: lipschitz_mlp only: each input is clipped to this norm, and the loss is softmax cross-entropy at
    #: this temperature (Lipschitz constant sqrt(2) / temperature)
    input_norm: float = 8.0
    temperature: float = 0.125

    def __post_init__(self) -> None:
        one_of(MODELS, kind=self.kind)
        one_of(["relu", "tanh", "gelu"], activation=self.activation)
        positive(input_norm=self.input_norm, temperature=self.temperature)
        for h in self.hidden:
            positive(hidden=h)


@dataclass(frozen=True)
class TrainingConfig:
    epochs: int = 20
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.5
    momentum: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        positive(epochs=self.epochs)
        positive(batch_size=self.batch_size)
        positive(lr=self.lr)
        one_of(OPTIMIZERS, optimizer=self.optimizer)
        in_range(0.0, 0.999, momentum=self.momentum)


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
        one_of(["hooks", "ghost", "bk"], grad_sample_mode=self.grad_sample_mode)


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


def _build(cls: type, raw: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(raw) - set(known)
    if unknown:
        raise ValueError(f"Unknown key(s) {sorted(unknown)} in [{where}]; expected some of {sorted(known)}.")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    if cls is PrivacyConfig and "clipping_options" in kwargs:
        kwargs["clipping_options"] = dict(kwargs["clipping_options"])
    if cls is PrivacyConfig and "noise_multiplier" in kwargs and "target_epsilon" not in kwargs:
        kwargs["target_epsilon"] = None  # a fixed noise multiplier replaces the default target
    return cls(**kwargs)


def parse_config(raw: dict[str, Any]) -> TrainConfig:
    sections = {"data": DataConfig, "model": ModelConfig, "training": TrainingConfig, "privacy": PrivacyConfig}
    unknown = set(raw) - set(sections)
    if unknown:
        raise ValueError(f"Unknown section(s) {sorted(unknown)}; expected some of {sorted(sections)}.")
    return TrainConfig(**{k: _build(cls, raw.get(k, {}), k) for k, cls in sections.items()})


def load_config(path: str | Path | None = None) -> TrainConfig:
    """Load a TOML config; ``None`` loads the packaged ``configs/default.toml``."""
    if path is None:
        text = resources.files("dpengine.configs").joinpath("default.toml").read_text()
    else:
        text = Path(path).read_text()
    return parse_config(tomllib.loads(text))
