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
