"""`dpengine train`: config loading, the CLI, and the default job's privacy/accuracy band."""

from __future__ import annotations

import dataclasses
import json

import pytest
from click.testing import CliRunner

from dpengine.config import load_config, parse_config
from dpengine.train import run, train


def test_default_config_loads_and_is_private():
    cfg = load_config()
    assert cfg.privacy.target_epsilon == 3.0 and cfg.privacy.delta == 1e-5
    assert cfg.privacy.grad_sample_mode == "bk"


def test_config_validation_names_the_bad_field():
    with pytest.raises(ValueError, match="Unknown key"):
        parse_config({"training": {"epochz": 3}})
    with pytest.raises(ValueError, match="lr=-1"):
        parse_config({"training": {"lr": -1}})
    with pytest.raises(ValueError, match="exactly one"):
        parse_config({"privacy": {"target_epsilon": 3.0, "noise_multiplier": 1.0}})


def test_cli_json_on_a_short_config(tmp_path):
    cfg = tmp_path / "short.toml"
    cfg.write_text('[training]\nepochs = 2\n[privacy]\ntarget_epsilon = 1.0\ndelta = 1e-5\n')
    res = CliRunner().invoke(train, [str(cfg), "--json", "--no-progress", "--compare-nonprivate"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    priv, non = out["runs"]
    assert priv["private"] and not non["private"]
    assert 0.99 <= priv["epsilon"] <= 1.0
    assert priv["steps"] == non["steps"] == 2 * 12  # 1437 training examples / 128 -> 12 steps per epoch


@pytest.mark.slow
def test_default_job_reaches_the_accuracy_band():
    cfg = load_config()
    priv = run(cfg, private=True, progress=False)
    non = run(cfg, private=False, progress=False)
    assert priv.epsilon <= 3.0
    assert non.test_accuracy - priv.test_accuracy <= 0.05
    assert 0.88 <= priv.test_accuracy <= non.test_accuracy + 0.01


@pytest.mark.slow
def test_noise_multiplier_config_path():
    cfg = load_config()
    cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, epochs=1),
                              privacy=dataclasses.replace(cfg.privacy, target_epsilon=None, noise_multiplier=1.0))
    res = run(cfg, private=True, progress=False)
    assert res.noise_multiplier == 1.0 and res.epsilon > 0


@pytest.mark.parametrize("mode", ["per_layer", "automatic", "adaptive", "error_feedback", "lipschitz"])
def test_every_mode_config_loads_and_trains_privately(mode, tmp_path):
    from pathlib import Path

    cfg = load_config(Path(__file__).parent.parent / "configs" / f"{mode}.toml")
    assert cfg.privacy.clipping == mode
    short = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, epochs=1))
    res = run(short, private=True, progress=False)
    assert res.steps == 12 and 0 < res.epsilon <= 3.0


def test_cli_clipping_override_uses_the_mode():
    res = CliRunner().invoke(train, ["--clipping", "automatic", "--json", "--no-progress"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["config"]["privacy"]["clipping"] == "automatic"
    assert out["runs"][0]["epsilon"] <= 3.0


def test_noise_multiplier_alone_replaces_the_default_target():
    cfg = parse_config({"privacy": {"noise_multiplier": 1.2}})
    assert cfg.privacy.noise_multiplier == 1.2 and cfg.privacy.target_epsilon is None


def test_config_errors_are_one_clean_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[training]\nepochs = -2\n")
    res = CliRunner().invoke(train, [str(bad), "--no-progress"])
    assert res.exit_code != 0
    assert "Traceback" not in res.output and "epochs=-2" in res.output and str(bad) in res.output
    broken = tmp_path / "broken.toml"
    broken.write_text("[training\n")
    res = CliRunner().invoke(train, [str(broken), "--no-progress"])
    assert res.exit_code != 0 and "Traceback" not in res.output and str(broken) in res.output


# ------------------------------------------------------------------ issue #15: built-ins, user factories, docs
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from dpengine.config import SECTIONS, TrainConfig, packaged_config_path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _one_line_error(res, *needles: str) -> None:
    assert res.exit_code != 0, res.output
    assert "Traceback" not in res.output, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1, res.output
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_reference_config_is_the_defaults_and_documents_every_key():
    text = (ROOT / "configs" / "reference.toml").read_text()
    assert load_config(ROOT / "configs" / "reference.toml") == TrainConfig()
    documented: dict[str, set[str]] = {}
    section = None
    for line in text.splitlines():
        if m := re.match(r"^\[(\w+)\]\s*$", line):
            section = m.group(1)
            documented[section] = set()
        elif section and (m := re.match(r"^#?\s*(\w+)\s*=", line)):
            documented[section].add(m.group(1))
    for name, cls in SECTIONS.items():
        fields = {f.name for f in dataclasses.fields(cls)}
        assert fields - documented.get(name, set()) == set(), f"[{name}] keys missing from configs/reference.toml"
        assert documented[name] - fields == set(), f"[{name}] documents keys that do not exist"


def test_help_names_the_packaged_default_and_reference():
    res = CliRunner().invoke(train, ["--help"])
    assert res.exit_code == 0
    flat = " ".join(res.output.split())
    assert packaged_config_path("default") in flat and packaged_config_path("reference") in flat
    assert "factory" in flat and "sequence_transformer" in flat


_N_TRAIN = {"digits": 1437, "breast_cancer": 455, "sequence": 320}


def _tiny(dataset: str, kind: str, mode: str, clipping: str = "flat") -> TrainConfig:
    """One epoch of three steps (each new Poisson batch size costs the conv handler a timing run)."""
    data = {"dataset": dataset}
    if dataset == "sequence":
        data["samples"] = 400
    return parse_config({"data": data, "model": {"kind": kind},
                         "training": {"epochs": 1, "batch_size": math.ceil(_N_TRAIN[dataset] / 3)},
                         "privacy": {"grad_sample_mode": mode, "clipping": clipping}})


@pytest.mark.filterwarnings("ignore:grad_sample_mode='ghost'")  # ghost warns that a conv costs more than bk
@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk"])
@pytest.mark.parametrize("dataset,kind", [("digits", "mlp"), ("digits", "cnn"), ("breast_cancer", "mlp"),
                                          ("sequence", "transformer")])
def test_every_builtin_combination_trains(dataset, kind, mode):
    res = run(_tiny(dataset, kind, mode), private=True, progress=False)
    assert res.steps == 3
    assert 2.5 < res.epsilon <= 3.0 and res.noise_multiplier > 0.5
    assert 0.0 <= res.test_accuracy <= 1.0


def test_lipschitz_mlp_on_breast_cancer_trains():
    res = run(_tiny("breast_cancer", "lipschitz_mlp", "bk", clipping="lipschitz"), private=True, progress=False)
    assert res.steps == 3 and 0 < res.epsilon <= 3.0


def test_sequence_task_is_deterministic_and_its_label_is_the_most_frequent_token():
    from dpengine.train import sequence_task

    x, y = sequence_task(300, 16, 12, seed=3)
    x2, y2 = sequence_task(300, 16, 12, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2) and not torch.equal(x, sequence_task(300, 16, 12, 4)[0])
    for row, label in zip(x.tolist(), y.tolist()):
        counts = [row.count(k) for k in range(3)]
        assert label == counts.index(max(counts))
    assert set(y.tolist()) == {0, 1, 2}


@pytest.mark.parametrize("dataset,kind", [("breast_cancer", "cnn"), ("digits", "transformer"),
                                          ("sequence", "mlp"), ("sequence", "cnn")])
def test_incompatible_builtins_are_refused_at_load(dataset, kind, tmp_path):
    with pytest.raises(ValueError, match=f"model kind = '{kind}' takes"):
        parse_config({"data": {"dataset": dataset}, "model": {"kind": kind}})
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f'[data]\ndataset = "{dataset}"\n[model]\nkind = "{kind}"\n')
    _one_line_error(CliRunner().invoke(train, [str(cfg), "--no-progress"]), str(cfg), kind, dataset)


def test_shipped_example_configs_load():
    for name, (dataset, kind) in {"breast_cancer": ("breast_cancer", "mlp"), "cnn_digits": ("digits", "cnn"),
                                  "sequence_transformer": ("sequence", "transformer")}.items():
        cfg = load_config(name)  # by packaged name
        assert cfg == load_config(ROOT / "configs" / f"{name}.toml")
        assert (cfg.data.dataset, cfg.model.kind) == (dataset, kind)


@pytest.mark.slow
@pytest.mark.parametrize("name,band", [("breast_cancer", 0.90), ("cnn_digits", 0.85),
                                       ("sequence_transformer", 0.75)])
def test_shipped_example_configs_learn(name, band):
    res = run(load_config(name), private=True, progress=False)
    assert res.epsilon <= 3.0 and res.test_accuracy >= band


def test_unknown_config_name_is_one_line():
    _one_line_error(CliRunner().invoke(train, ["no_such_config", "--no-progress"]), "no_such_config",
                    "breast_cancer")


def test_clipping_override_to_lipschitz_refuses_a_cnn():
    _one_line_error(CliRunner().invoke(train, ["cnn_digits", "--clipping", "lipschitz", "--no-progress"]),
                    "--clipping lipschitz", "lipschitz_mlp")


@pytest.fixture
def user_pkg(tmp_path, monkeypatch):
    """A fresh, uniquely named user package under tmp_path/project (the cwd), configs in tmp_path/cfg."""
    name = f"userpkg_{uuid.uuid4().hex[:8]}"
    project = tmp_path / "project"
    (project / name).mkdir(parents=True)
    (project / name / "__init__.py").write_text("")
    (project / name / "models.py").write_text(
        "from torch import nn\n"
        "CONST = 3\n"
        "def build():\n"
        "    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))\n"
        "def sized(input_shape, num_classes, width=8):\n"
        "    return nn.Sequential(nn.Linear(input_shape[0], width), nn.Tanh(), nn.Linear(width, num_classes))\n"
        "def not_a_module():\n"
        "    return 'model'\n")
    (project / name / "data.py").write_text(
        "import torch\n"
        "from torch.utils.data import TensorDataset\n"
        "def load(seed, n=600):\n"
        "    g = torch.Generator().manual_seed(seed)\n"
        "    y = torch.randint(0, 3, (n,), generator=g)\n"
        "    x = torch.randn(n, 10, generator=g) + torch.nn.functional.one_hot(y, 10).float() * 3\n"
        "    return TensorDataset(x[:500], y[:500]), TensorDataset(x[500:], y[500:])\n"
        "def one_split():\n"
        "    return load(0)[0]\n"
        "def float_targets():\n"
        "    tr, te = load(0)\n"
        "    return TensorDataset(tr.tensors[0], tr.tensors[1].float()), te\n")
    (tmp_path / "cfg").mkdir()
    monkeypatch.chdir(project)
    yield name, tmp_path / "cfg"
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[mod]


def _write(cfg_dir: Path, body: str) -> str:
    path = cfg_dir / f"job_{uuid.uuid4().hex[:6]}.toml"
    path.write_text(body)
    return str(path)


def test_user_factories_train_through_the_cli(user_pkg):
    name, cfg_dir = user_pkg
    cfg = _write(cfg_dir, f'[data]\nfactory = "{name}.data:load"\noptions = {{ n = 600 }}\n'
                          f'[model]\nfactory = "{name}.models:build"\n'
                          '[training]\nepochs = 1\nbatch_size = 100\n[privacy]\ntarget_epsilon = 2.0\n')
    res = CliRunner().invoke(train, [cfg, "--json", "--no-progress"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["config"]["model"]["factory"] == f"{name}.models:build" and out["config"]["model"]["kind"] is None
    (priv,) = out["runs"]
    assert priv["steps"] == 5 and 1.9 < priv["epsilon"] <= 2.0
    text = CliRunner().invoke(train, ["--config", cfg, "--no-progress"])
    assert text.exit_code == 0 and re.search(r"epsilon 1\.9\d\d at delta 1e-05", text.output), text.output


def test_user_model_gets_the_arguments_it_names_and_its_options(user_pkg):
    name, _ = user_pkg
    cfg = parse_config({"data": {"factory": f"{name}.data:load"},
                        "model": {"factory": f"{name}.models:sized", "options": {"width": 5}},
                        "training": {"epochs": 1, "batch_size": 100}})
    from dpengine.train import build_model, load_data, import_path

    with import_path([Path.cwd()]):
        task = load_data(cfg)
        model = build_model(cfg, task)  # num_classes found by a pass over the labels (no attribute)
    assert [tuple(p.shape) for p in model.parameters()] == [(5, 10), (5,), (3, 5), (3,)]
    res = run(cfg, private=True, progress=False)
    assert res.steps == 5 and 0 < res.epsilon <= 3.0


def test_builtin_model_on_user_data_and_user_model_on_builtin_data(user_pkg):
    name, _ = user_pkg
    mixed = parse_config({"data": {"factory": f"{name}.data:load"}, "model": {"kind": "mlp", "hidden": [8]},
                          "training": {"epochs": 1, "batch_size": 100}})
    assert run(mixed, private=True, progress=False).steps == 5
    own = parse_config({"data": {"dataset": "breast_cancer"},
                        "model": {"factory": f"{name}.models:sized", "options": {"width": 4}},
                        "training": {"epochs": 1}})
    assert run(own, private=True, progress=False).steps == 4
    wrong_form = parse_config({"data": {"factory": f"{name}.data:load"}, "model": {"kind": "transformer"}})
    with pytest.raises(ValueError, match="model kind = 'transformer' takes 1-D integer token sequences"):
        run(wrong_form, private=True, progress=False)


@pytest.mark.parametrize("section,body,needles", [
    ("model", 'factory = "nosuchmodule_dpe:build"', ["model.factory", "no module named 'nosuchmodule_dpe'"]),
    ("model", 'factory = "{pkg}.models:buld"', ["model.factory", "has no attribute 'buld'", "build"]),
    ("model", 'factory = "{pkg}.models:CONST"', ["model.factory", "not callable"]),
    ("model", 'factory = "{pkg}.models:not_a_module"', ["model.factory", "expected a torch.nn.Module"]),
    ("model", 'factory = "{pkg}.models:build"\noptions = {{ width = 3 }}',
     ["model.factory", "unexpected keyword argument 'width'", "[model.options]"]),
    ("model", 'factory = "{pkg}.models.build"', ["model.factory", "'module.path:function'"]),
    ("model", 'factory = "{pkg}.models:build"\nkind = "mlp"', ["exactly one of model.kind"]),
    ("model", 'kind = "mlp"\noptions = {{ width = 3 }}', ["model.options", "set model.factory"]),
    ("data", 'factory = "{pkg}.data:one_split"', ["data.factory", "expected (train, test)"]),
    ("data", 'factory = "{pkg}.data:float_targets"', ["data.factory", "integer class ids"]),
    ("data", 'factory = "{pkg}.missing:load"', ["data.factory", "no module named '{pkg}.missing'"]),
])
def test_factory_errors_are_one_line_naming_file_and_key(user_pkg, section, body, needles):
    name, cfg_dir = user_pkg
    other = ('[data]\nfactory = "{pkg}.data:load"\n' if section == "model" else "")
    cfg = _write(cfg_dir, (f"[{section}]\n{body}\n" + other).format(pkg=name))
    res = CliRunner().invoke(train, [cfg, "--no-progress"])
    _one_line_error(res, cfg, *(n.format(pkg=name) for n in needles))


def test_the_shipped_custom_train_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # found through the config file's directory, not the cwd
    example = ROOT / "examples" / "custom_train" / "train.toml"
    cfg = load_config(example)
    cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, epochs=1))
    try:
        res = run(cfg, private=True, progress=False, search_path=[example.parent])
    finally:
        for mod in [m for m in sys.modules if m == "mypkg" or m.startswith("mypkg.")]:
            del sys.modules[mod]
    assert res.steps == math.ceil(1600 / 128) and 0 < res.epsilon <= 3.0
    assert str(example.parent.resolve()) not in sys.path  # the search path is taken off again


@pytest.mark.parametrize("kind,precision", [("mlp", "bf16"), ("cnn", "bf16"), ("mlp", "fp16")])
def test_16_bit_precision_trains_under_autocast_and_learns(kind, precision):
    """training.precision = "bf16" / "fp16": the forward runs under autocast (the layers' outputs are 16-bit),
    the parameters stay float32, and a short private run on digits still learns (accuracy well above
    chance); fp16 with dpengine's fixed loss scale."""
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    cfg = parse_config({"model": {"kind": kind}, "training": {"epochs": 4, "precision": precision},
                        "privacy": {"target_epsilon": 3.0}})
    dtypes = set()

    def spy(module, args, out):
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and torch.is_grad_enabled():
            dtypes.add(out.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(spy)
    try:
        res = run(cfg, private=True, progress=False)
    finally:
        handle.remove()
    assert dtypes == {dtype}
    assert res.epsilon <= 3.0 and res.test_accuracy >= 0.6, res
    if precision == "fp16":  # the non-private comparison runs the standard GradScaler loop
        assert run(cfg, private=False, progress=False).test_accuracy >= 0.8


def test_device_and_precision_are_checked():
    import torch

    from dpengine.train import ConfigError, resolve_device

    with pytest.raises(ValueError, match="'cpu', 'cuda', 'cuda:N' or 'auto'"):
        parse_config({"training": {"device": "gpu"}})
    with pytest.raises(ValueError, match="precision"):
        parse_config({"training": {"precision": "fp8"}})
    with pytest.raises(ValueError, match="lipschitz.*precision = 'fp32'"):
        parse_config({"model": {"kind": "lipschitz_mlp"}, "training": {"precision": "bf16"},
                      "privacy": {"clipping": "lipschitz"}})
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device.*'auto'"):
            resolve_device("cuda")


def test_cli_device_and_precision_overrides(tmp_path):
    cfg = tmp_path / "short.toml"
    cfg.write_text('[training]\nepochs = 1\n')
    res = CliRunner().invoke(train, [str(cfg), "--json", "--no-progress", "--precision", "bf16", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["config"]["training"]["precision"] == "bf16" and out["config"]["training"]["device"] == "cpu"
    res = CliRunner().invoke(train, ["lipschitz", "--no-progress", "--precision", "bf16"])
    assert res.exit_code == 1 and "with --precision bf16" in res.output and "fp32" in res.output
