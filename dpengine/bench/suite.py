"""Benchmark suites: ``configs/bench/NAME.toml`` (package ``dpengine.configs.bench``) loaded with
tomllib into frozen dataclasses that validate themselves.

A suite file::

    name = "default"
    description = "..."
    rounds = 5          # round-robin rounds; every (model, mode, batch) runs once per round in a fresh process
    warmup = 3          # untimed steps at the start of every round
    steps = 10          # timed steps per round (at least)
    min_time_s = 2.0    # ... and more until this much timed step time per round (up to max_steps)
    max_steps = 500
    threads = 2         # torch threads (and OMP/MKL)
    device = "cpu"      # or "cuda"
    clipping = "flat"
    accounting = true   # also run the accounting micro-benchmark
    modes = ["nonprivate", "hooks", "ghost", "bk", "fused", "opacus-hooks", "opacus-ghost"]
    compile = ["eager", "default"]  # optional: torch.compile settings (default ["eager"]); every mode, the
                                    # non-private baseline included, runs under each

    [[model]]
    name = "gpt"
    batch = [16]
    params = { seq_len = 128 }   # optional overrides of the model's defaults
    modes = ["nonprivate", "bk"] # optional, overrides the suite's modes for this model

    [[target]]                   # optional: reported as met / missed, never enforced
    model = "gpt"
    batch = 16
    mode = "bk"
    metric = "time_ratio_vs_nonprivate"
    max = 1.25
    note = "Opacus ghost measured elsewhere: 1.9x"
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from dpengine.bench.models import MODELS
from dpengine.bench.worker import CLIPPING_VARIANTS, COMPILE_MODES, DPENGINE_MODES, MODES, PRECISIONS, known_mode

RATIO_METRICS = ("time_ratio_vs_nonprivate", "mem_ratio_vs_nonprivate", "time_ratio_vs_best_opacus",
                 "mem_ratio_vs_best_opacus", "ops_ratio_vs_nonprivate", "compute_ops_ratio_vs_nonprivate",
                 "kernels_ratio_vs_nonprivate",
                 "time_ratio_vs_eager")


class SuiteError(ValueError):
    """A suite file is malformed: unknown model/mode/key or a bad value."""


def _check_keys(where: str, data: dict[str, Any], allowed: set[str]) -> None:
    unknown = set(data) - allowed
    if unknown:
        raise SuiteError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(allowed))}")


def _check_choices(where: str, key: str, kind: str, values: tuple[str, ...], known: tuple[str, ...],
                   hint: str = "") -> None:
    """``values`` (the suite key ``key``) non-empty and each one of ``known`` (named ``kind``), else a SuiteError."""
    if not values:
        raise SuiteError(f"{where}: {key} must not be empty{hint}")
    bad = [v for v in values if v not in known]
    if bad:
        raise SuiteError(f"{where}: unknown {kind} {', '.join(map(repr, bad))}; known: {', '.join(known)}")


def _check_precisions(where: str, precisions: tuple[str, ...]) -> None:
    _check_choices(where, "precisions", "precision(s)", precisions, PRECISIONS)


def _check_compiles(where: str, compiles: tuple[str, ...]) -> None:
    _check_choices(where, "compile", "compile setting(s)", compiles, COMPILE_MODES,
                   ' (use ["eager"] for no compilation)')


def _check_modes(where: str, modes: tuple[str, ...]) -> None:
    if not modes:
        raise SuiteError(f"{where}: modes must not be empty")
    bad = [m for m in modes if not known_mode(m)]
    if bad:
        raise SuiteError(f"{where}: unknown mode(s) {', '.join(map(repr, bad))}; known: {', '.join(MODES)}, and "
                         f"BACKEND+CLIPPING for a dpengine backend with one of {', '.join(CLIPPING_VARIANTS)}")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    batch: tuple[int, ...]
    params: tuple[tuple[str, Any], ...] = ()  # sorted (key, value) pairs: hashable
    modes: tuple[str, ...] | None = None
    precisions: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.name not in MODELS:
            raise SuiteError(f"unknown model {self.name!r}; known: {', '.join(sorted(MODELS))}")
        if not self.batch or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in self.batch):
            raise SuiteError(f"model {self.name!r}: batch must be a non-empty list of positive integers, got {self.batch!r}")
        if self.modes is not None:
            _check_modes(f"model {self.name!r}", self.modes)
        if self.precisions is not None:
            _check_precisions(f"model {self.name!r}", self.precisions)

    @property
    def params_dict(self) -> dict[str, Any]:
        return dict(self.params)


@dataclass(frozen=True)
class Target:
    model: str
    batch: int
    mode: str
    metric: str
    max: float
    note: str = ""
    precision: str = "fp32"
    compile: str = "eager"

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise SuiteError(f"target: unknown model {self.model!r}; known: {', '.join(sorted(MODELS))}")
        _check_modes("target", (self.mode,))
        _check_precisions("target", (self.precision,))
        _check_compiles("target", (self.compile,))
        if self.metric not in RATIO_METRICS:
            raise SuiteError(f"target: unknown metric {self.metric!r}; known: {', '.join(RATIO_METRICS)}")


@dataclass(frozen=True)
class Suite:
    name: str
    models: tuple[ModelSpec, ...]
    modes: tuple[str, ...] = ("nonprivate", "bk")
    precisions: tuple[str, ...] = ("fp32",)
    compiles: tuple[str, ...] = ("eager",)  # TOML key `compile`
    rounds: int = 3
    warmup: int = 2
    steps: int = 5
    min_time_s: float = 0.0
    max_steps: int = 1000
    threads: int = 2
    device: str = "cpu"
    clipping: str = "flat"
    accounting: bool = False
    worker_timeout_s: float = 1800.0  # one configuration's subprocess is killed (an error row) after this
    description: str = ""
    targets: tuple[Target, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        _check_modes(f"suite {self.name!r}", self.modes)
        _check_precisions(f"suite {self.name!r}", self.precisions)
        _check_compiles(f"suite {self.name!r}", self.compiles)
        if not self.models:
            raise SuiteError(f"suite {self.name!r}: needs at least one [[model]]")
        for key in ("rounds", "steps", "threads", "max_steps"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SuiteError(f"suite {self.name!r}: {key} must be a positive integer, got {v!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise SuiteError(f"suite {self.name!r}: warmup must be a non-negative integer, got {self.warmup!r}")
        if self.warmup < 1 and any(c != "eager" for c in self.compiles):
            raise SuiteError(f"suite {self.name!r}: compiling needs warmup >= 1 (compilation happens in the warm-up "
                             f"steps, so the timed steps exclude it), got warmup={self.warmup!r}")
        if not isinstance(self.min_time_s, (int, float)) or self.min_time_s < 0:
            raise SuiteError(f"suite {self.name!r}: min_time_s must be a non-negative number, got {self.min_time_s!r}")
        if not isinstance(self.worker_timeout_s, (int, float)) or self.worker_timeout_s <= 0:
            raise SuiteError(f"suite {self.name!r}: worker_timeout_s must be a positive number, "
                             f"got {self.worker_timeout_s!r}")
        if self.device not in ("cpu", "cuda"):
            raise SuiteError(f"suite {self.name!r}: device must be 'cpu' or 'cuda', got {self.device!r}")

    def configs(self) -> list[dict[str, Any]]:
        """Every (precision, compile, model, batch, mode) configuration, in a stable order: precision, then
        compile outermost, so a run cut short (a time limit) has finished whole precisions and compile
        settings first, in the suite's order."""
        out = []
        for precision in dict.fromkeys(p for m in self.models for p in (m.precisions or self.precisions)):
            for compile_mode in self.compiles:
                for m in self.models:
                    if precision not in (m.precisions or self.precisions):
                        continue
                    for b in m.batch:
                        for mode in m.modes or self.modes:
                            out.append({"model": m.name, "params": m.params_dict, "batch": b, "mode": mode,
                                        "precision": precision, "compile": compile_mode, "clipping": self.clipping,
                                        "warmup": self.warmup, "steps": self.steps, "min_time_s": self.min_time_s,
                                        "max_steps": self.max_steps, "threads": self.threads,
                                        "device": self.device, "seed": 0})
        return out

    def with_clippings(self, clippings: tuple[str, ...]) -> Suite:
        """A copy in which every dpengine backend also runs with each of ``clippings`` ("bk+per_layer"...)."""
        import dataclasses

        if not clippings:
            return self

        def expand(modes: tuple[str, ...]) -> tuple[str, ...]:
            out: list[str] = []
            for m in modes:
                out.append(m)
                if m in DPENGINE_MODES and m != "fused":  # fused variants are listed explicitly (CUDA only)
                    out += [f"{m}+{c}" for c in clippings if c != "flat"]
            return tuple(out)

        models = tuple(dataclasses.replace(m, modes=expand(m.modes)) if m.modes else m for m in self.models)
        return dataclasses.replace(self, modes=expand(self.modes), models=models)

    def with_overrides(self, **kw: Any) -> Suite:
        """A copy with the given (non-None) fields replaced; ``precisions`` replaces every model's too."""
        import dataclasses

        kw = {k: v for k, v in kw.items() if v is not None}
        if "compiles" in kw:
            kw["compiles"] = tuple(kw["compiles"])
        if "precisions" in kw:
            kw["precisions"] = tuple(kw["precisions"])
            _check_precisions(f"suite {self.name!r}", kw["precisions"])
            kw["models"] = tuple(dataclasses.replace(m, precisions=None) for m in self.models)
        return dataclasses.replace(self, **kw)


_SCALARS = ("rounds", "warmup", "steps", "min_time_s", "max_steps", "threads", "device", "clipping", "accounting",
            "worker_timeout_s", "description")
_SUITE_KEYS = {"name", *_SCALARS, "modes", "precisions", "compile", "model", "target"}
_MODEL_KEYS = {"name", "batch", "params", "modes", "precisions"}
_TARGET_KEYS = {"model", "batch", "mode", "metric", "max", "note", "precision", "compile"}


def parse_suite(data: dict[str, Any], default_name: str = "suite") -> Suite:
    """Build a :class:`Suite` from parsed TOML."""
    name = str(data.get("name", default_name))
    _check_keys(f"suite {name!r}", data, _SUITE_KEYS)
    models = []
    for i, m in enumerate(data.get("model", [])):
        if not isinstance(m, dict) or "name" not in m or "batch" not in m:
            raise SuiteError(f"suite {name!r}: [[model]] #{i + 1} needs 'name' and 'batch'")
        _check_keys(f"suite {name!r}, model {m['name']!r}", m, _MODEL_KEYS)
        batch = m["batch"] if isinstance(m["batch"], list) else [m["batch"]]
        models.append(ModelSpec(name=m["name"], batch=tuple(batch), params=tuple(sorted(m.get("params", {}).items())),
                                modes=tuple(m["modes"]) if "modes" in m else None,
                                precisions=tuple(m["precisions"]) if "precisions" in m else None))
    targets = []
    for t in data.get("target", []):
        _check_keys(f"suite {name!r}, [[target]]", t, _TARGET_KEYS)
        try:
            targets.append(Target(**t))
        except TypeError as e:
            raise SuiteError(f"suite {name!r}, [[target]]: {e}") from None
    kw: dict[str, Any] = {k: data[k] for k in _SCALARS if k in data}
    for key in ("modes", "precisions"):
        if key in data:
            kw[key] = tuple(data[key])
    if "compile" in data:
        kw["compiles"] = tuple(data["compile"]) if isinstance(data["compile"], list) else (data["compile"],)
    return Suite(name=name, models=tuple(models), targets=tuple(targets), **kw)


def available_suites() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("dpengine.configs.bench").iterdir() if p.name.endswith(".toml"))


def load_suite(name_or_path: str) -> Suite:
    """Load a suite by name (``configs/bench/NAME.toml`` from the installed package) or by file path."""
    if name_or_path.endswith(".toml") or "/" in name_or_path:
        path = Path(name_or_path)
        if not path.is_file():
            raise SuiteError(f"suite file {str(path)!r} does not exist")
        text, default = path.read_text(), path.stem
    else:
        res = resources.files("dpengine.configs.bench").joinpath(f"{name_or_path}.toml")
        if not res.is_file():
            raise SuiteError(f"unknown suite {name_or_path!r}; available: {', '.join(available_suites())}")
        text, default = res.read_text(), name_or_path
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SuiteError(f"suite {name_or_path!r}: invalid TOML: {e}") from None
    return parse_suite(data, default)
