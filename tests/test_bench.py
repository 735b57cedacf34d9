"""dpengine bench: a tiny suite end to end (real subprocess workers), the reports, suite validation."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("opacus")
pytest.importorskip("matplotlib")

from click.testing import CliRunner  # noqa: E402

from dpengine.bench.cli import bench  # noqa: E402
from dpengine.bench.runner import CSV_COLUMNS, run_suite, summarize, to_rows  # noqa: E402
from dpengine.bench.suite import SuiteError, available_suites, load_suite, parse_suite  # noqa: E402

TINY = """
name = "tiny"
rounds = 1
warmup = 1
steps = 2
threads = 1
modes = ["nonprivate", "bk", "fused", "opacus-hooks"]

[[model]]
name = "mlp"
batch = [4]
params = { sizes = [8, 6, 3] }

[[model]]
name = "gpt"
batch = [2]
params = { vocab = 32, seq_len = 8, d = 16, layers = 1, heads = 2 }
modes = ["nonprivate", "opacus-ghost"]

[[target]]
model = "mlp"
batch = 4
mode = "bk"
metric = "time_ratio_vs_nonprivate"
max = 1.3
"""

PER_CONFIG = {"step_time_s", "samples_per_s", "peak_mem_mb", "prestep_rss_mb", "baseline_rss_mb", "step_mem_mb"}
VS_NP = {"time_ratio_vs_nonprivate", "mem_ratio_vs_nonprivate", "step_mem_ratio_vs_nonprivate"}
VS_OPACUS = {"time_ratio_vs_best_opacus", "mem_ratio_vs_best_opacus"}


def test_tiny_suite_end_to_end(tmp_path: Path) -> None:
    suite_file = tmp_path / "tiny.toml"
    suite_file.write_text(TINY)
    out = tmp_path / "out"
    res = CliRunner().invoke(bench, ["--suite", str(suite_file), "--output-dir", str(out), "--no-progress",
                                     "--no-accounting"])
    assert res.exit_code == 0, res.output + repr(res.exception)

    with (out / "results.csv").open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
        rows = list(reader)
    by_cfg: dict[tuple[str, str], dict[str, dict[str, str]]] = {}
    for r in rows:
        by_cfg.setdefault((r["model"], r["mode"]), {})
        assert r["metric"] not in by_cfg[(r["model"], r["mode"])], "one row per configuration x metric"
        by_cfg[(r["model"], r["mode"])][r["metric"]] = r
        assert r["suite"] == "tiny" and r["commit"] and r["device"].startswith("cpu") and r["torch"]
    assert set(by_cfg) == {("mlp", "nonprivate"), ("mlp", "bk"), ("mlp", "fused"), ("mlp", "opacus-hooks"),
                           ("gpt", "nonprivate"), ("gpt", "opacus-ghost")}
    assert set(by_cfg[("mlp", "nonprivate")]) == PER_CONFIG
    assert set(by_cfg[("mlp", "opacus-hooks")]) == PER_CONFIG | VS_NP
    assert set(by_cfg[("mlp", "bk")]) == PER_CONFIG | VS_NP | VS_OPACUS
    assert set(by_cfg[("gpt", "opacus-ghost")]) == PER_CONFIG | VS_NP
    assert list(by_cfg[("mlp", "fused")]) == ["status"]
    assert by_cfg[("mlp", "fused")]["status"]["status"].startswith("skipped")
    # one reason per skipped mode: the notes must not also blame CUDA for a mode that does not exist yet
    notes = json.loads((out / "results.json").read_text())["notes"]
    assert len([n for n in notes if n.startswith("mode 'fused' skipped")]) == 1, notes
    for r in rows:
        if r["status"] == "ok":
            for k in ("median", "p20", "p80"):
                v = float(r[k])
                assert math.isfinite(v) and v > 0, r
            assert float(r["p20"]) <= float(r["median"]) * (1 + 1e-9) <= float(r["p80"]) * (1 + 2e-9), r

    table = (out / "results_table.md").read_text()
    assert "| model | batch | mode |" in table and "opacus-hooks" in table and "time_ratio_vs_nonprivate" in table
    results = (out / "RESULTS.md").read_text()
    assert "dpengine bench" in results and "![plot](bench.png)" in results
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "results.json").stat().st_size > 0

    # the report can be rebuilt from results.json without running anything
    out2 = tmp_path / "out2"
    res = CliRunner().invoke(bench, ["--rebuild-report", str(out / "results.json"), "--output-dir", str(out2)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert (out2 / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "opacus-hooks" in (out2 / "RESULTS.md").read_text() and not (out2 / "results.csv").exists()


def test_failures_become_rows() -> None:
    suite = parse_suite({"name": "fake", "rounds": 2, "modes": ["nonprivate", "bk", "opacus-ghost"],
                         "model": [{"name": "mlp", "batch": [4]}]})
    calls = []

    def fake(cfg: dict) -> dict:
        calls.append(cfg["mode"])
        if cfg["mode"] == "opacus-ghost":
            return {"status": "error: boom"}
        t = 0.01 if cfg["mode"] == "nonprivate" else 0.015
        return {"status": "ok", "step_times": [t, t], "baseline_rss_mb": 100.0, "prestep_rss_mb": 110.0,
                "peak_mem_mb": 150.0 if cfg["mode"] == "nonprivate" else 160.0}

    raw = run_suite(suite, progress=False, runner=fake, accounting=False)
    assert calls.count("opacus-ghost") == 1  # not retried after an error
    assert calls.count("bk") == 2
    rows = to_rows(raw, summarize(raw))
    err = [r for r in rows if r["mode"] == "opacus-ghost"]
    assert len(err) == 1 and err[0]["status"] == "error: boom" and err[0]["metric"] == "status"
    ratio = next(r for r in rows if r["mode"] == "bk" and r["metric"] == "time_ratio_vs_nonprivate")
    assert ratio["median"] == pytest.approx(1.5)
    mem = next(r for r in rows if r["mode"] == "bk" and r["metric"] == "step_mem_ratio_vs_nonprivate")
    assert mem["median"] == pytest.approx(60 / 50)
    assert not any(r["metric"] == "time_ratio_vs_best_opacus" for r in rows)  # no working Opacus mode


@pytest.mark.skipif(importlib.util.find_spec("dpengine.bench.accounting") is None,
                    reason="dpengine.bench.accounting not there yet")
def test_accounting_rows(tmp_path: Path) -> None:
    res = CliRunner().invoke(bench, ["--accounting-only", "--output-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    with (tmp_path / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    timed = [r for r in rows if r["status"] == "ok"]
    assert timed and all(r["metric"] == "accounting_time_s" for r in timed)
    assert all(math.isfinite(float(r["median"])) and float(r["median"]) > 0 for r in timed)
    assert any(r["mode"].startswith("dpengine") for r in timed)


def test_packaged_suites_load() -> None:
    names = available_suites()
    assert {"default", "quick", "gpu", "hf"} <= set(names)
    for name in names:
        load_suite(name)
    default = load_suite("default")
    cfgs = {(c["model"], c["batch"]) for c in default.configs()}
    assert {("mlp", 256), ("cnn", 64), ("gpt", 16)} <= cfgs
    assert default.accounting and {"nonprivate", "bk", "opacus-ghost"} <= set(default.modes)
    assert all(m.name != "gpt2-small" for m in default.models)
    assert any(m.name == "gpt2-small" for m in load_suite("gpu").models)


BASE = {"name": "s", "modes": ["nonprivate"], "model": [{"name": "mlp", "batch": [4]}]}


@pytest.mark.parametrize("change, message", [
    ({"model": [{"name": "resnet9000", "batch": [4]}]}, "unknown model 'resnet9000'"),
    ({"modes": ["nonprivate", "turbo"]}, "unknown mode(s) 'turbo'"),
    ({"model": [{"name": "mlp", "batch": [4], "modes": ["opacus-turbo"]}]}, "unknown mode(s) 'opacus-turbo'"),
    ({"modes": []}, "modes must not be empty"),
    ({"model": []}, "at least one [[model]]"),
    ({"model": [{"name": "mlp", "batch": [0]}]}, "positive integers"),
    ({"model": [{"name": "mlp"}]}, "needs 'name' and 'batch'"),
    ({"model": [{"name": "mlp", "batch": [4], "size": 3}]}, "unknown key(s) size"),
    ({"rounds": 0}, "rounds must be a positive integer"),
    ({"device": "tpu"}, "device must be"),
    ({"repeats": 3}, "unknown key(s) repeats"),
    ({"target": [{"model": "mlp", "batch": 4, "mode": "bk", "metric": "speed", "max": 1}]}, "unknown metric"),
])
def test_suite_validation_errors(change: dict, message: str) -> None:
    with pytest.raises(SuiteError) as e:
        parse_suite({**BASE, **change})
    assert message in str(e.value)


def test_unknown_suite_name_and_cli_error(tmp_path: Path) -> None:
    with pytest.raises(SuiteError, match="unknown suite 'nope'; available: .*default"):
        load_suite("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = 'bad'\nmodes = ['warp']\n[[model]]\nname = 'mlp'\nbatch = [1]\n")
    res = CliRunner().invoke(bench, ["--suite", str(bad), "--output-dir", str(tmp_path)])
    assert res.exit_code == 2 and "unknown mode(s) 'warp'" in res.output
    with pytest.raises(SuiteError, match="invalid TOML"):
        p = tmp_path / "broken.toml"
        p.write_text("name = \n")
        load_suite(str(p))
