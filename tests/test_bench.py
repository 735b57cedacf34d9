"""dpengine bench: a tiny suite end to end (real subprocess workers), the precision axis and launch
counts (workers run in this process), incremental raw results, the reports, suite validation."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from click.testing import CliRunner

from dpengine.bench import runner as runner_mod
from dpengine.bench import worker
from dpengine.bench.cli import bench
from dpengine.bench.report import PLOT_SKIPPED, write_all, write_csv
from dpengine.bench.runner import CSV_COLUMNS, INTERRUPTED, load_jsonl, run_suite, summarize, to_rows
from dpengine.bench.suite import SuiteError, available_suites, load_suite, parse_suite

needs_opacus = pytest.mark.skipif(importlib.util.find_spec("opacus") is None, reason="opacus not installed")
needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed")

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

PER_CONFIG = {"step_time_s", "samples_per_s", "peak_mem_mb", "prestep_rss_mb", "baseline_rss_mb", "step_mem_mb",
              "ops_per_step", "compute_ops_per_step"}
VS_NP = {"time_ratio_vs_nonprivate", "mem_ratio_vs_nonprivate", "step_mem_ratio_vs_nonprivate",
         "ops_ratio_vs_nonprivate", "compute_ops_ratio_vs_nonprivate"}
VS_OPACUS = {"time_ratio_vs_best_opacus", "mem_ratio_vs_best_opacus"}


def _run_suite(tmp_path: Path, text: str) -> tuple[Path, list[dict[str, str]]]:
    """Run the suite ``text`` through the CLI (no accounting) into tmp_path/out; its output dir and CSV rows."""
    suite_file = tmp_path / "suite.toml"
    suite_file.write_text(text)
    out = tmp_path / "out"
    res = CliRunner().invoke(bench, ["--suite", str(suite_file), "--output-dir", str(out), "--no-progress",
                                     "--no-accounting"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    with (out / "results.csv").open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
        return out, list(reader)


@needs_opacus
@needs_matplotlib
def test_tiny_suite_end_to_end(tmp_path: Path) -> None:
    out, rows = _run_suite(tmp_path, TINY)
    by_cfg: dict[tuple[str, str], dict[str, dict[str, str]]] = {}
    for r in rows:
        by_cfg.setdefault((r["model"], r["mode"]), {})
        assert r["metric"] not in by_cfg[(r["model"], r["mode"])], "one row per configuration x metric"
        by_cfg[(r["model"], r["mode"])][r["metric"]] = r
        assert r["suite"] == "tiny" and r["commit"] and r["device"].startswith("cpu") and r["torch"]
        assert r["precision"] == "fp32"
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
    assert "| model | batch | precision | compile | mode |" in table and "opacus-hooks" in table
    assert "time_ratio_vs_nonprivate" in table and " ops (" in table
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
    # ... and from the raw JSONL written while it ran
    out3 = tmp_path / "out3"
    res = CliRunner().invoke(bench, ["--rebuild-report", str(out / "results.jsonl"), "--output-dir", str(out3)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert (out3 / "RESULTS.md").read_text().count("| mlp sizes=[8, 6, 3] | 4 | fp32 |") == 4


# ------------------------------------------------------------------ precision axis, launch counts

TINY_MLP = {"name": "mlp", "batch": [4], "params": {"sizes": [8, 6, 3]}}
TINY_GPT = {"name": "gpt", "batch": [2], "params": {"vocab": 32, "seq_len": 8, "d": 16, "layers": 1, "heads": 2}}


@pytest.fixture
def in_process() -> Iterator[Any]:
    """Run workers in this process (fast; the end-to-end test covers the subprocesses), restoring the
    torch thread count a worker sets."""
    threads = torch.get_num_threads()
    yield lambda cfg: worker.run({**cfg, "threads": threads})
    torch.set_num_threads(threads)


def test_bf16_rows_for_every_dpengine_mode_with_op_counts(tmp_path: Path, in_process: Any) -> None:
    suite = parse_suite({"name": "bf16", "rounds": 1, "warmup": 1, "steps": 2, "precisions": ["bf16"],
                         "modes": ["nonprivate", "hooks", "ghost", "bk"], "model": [TINY_MLP, TINY_GPT]})
    raw = run_suite(suite, progress=False, runner=in_process, accounting=False, jsonl=tmp_path / "r.jsonl")
    summary = summarize(raw)
    assert len(summary) == 8
    for s in summary:
        assert s["status"] == "ok" and s["precision"] == "bf16", (s["model"], s["mode"], s["status"])
        assert s["metrics"]["ops_per_step"][0] > 0
    for model in ("mlp", "gpt"):
        by_mode = {s["mode"]: s["metrics"] for s in summary if s["model"] == model}
        for mode in ("hooks", "ghost", "bk"):
            ops, ops_np = by_mode[mode]["ops_per_step"][0], by_mode["nonprivate"]["ops_per_step"][0]
            assert ops > ops_np  # clipping adds work
            assert by_mode[mode]["ops_ratio_vs_nonprivate"][0] == pytest.approx(ops / ops_np)
    rows = to_rows(raw, summary)
    assert {r["precision"] for r in rows} == {"bf16"}
    assert any(r["metric"] == "ops_ratio_vs_nonprivate" and r["mode"] == "bk" for r in rows)


def test_fp16_and_tf32_on_cpu_are_handled(in_process: Any) -> None:
    suite = parse_suite({"name": "p", "rounds": 1, "warmup": 1, "steps": 2, "precisions": ["tf32", "fp16"],
                         "modes": ["nonprivate", "bk", "opacus-ghost"], "model": [TINY_MLP]})
    called = []

    def runner(cfg: dict) -> dict:
        called.append((cfg["mode"], cfg["precision"]))
        return in_process(cfg)

    raw = run_suite(suite, progress=False, runner=runner, accounting=False)
    by = {(s["mode"], s["precision"]): s for s in summarize(raw)}
    assert ("opacus-ghost", "fp16") not in called  # never started
    assert by[("opacus-ghost", "fp16")]["status"].startswith("not supported: fp16 + GradScaler: Opacus")
    # non-private fp16 (autocast + GradScaler) and dpengine's (autocast + its fixed loss_scale) run where this
    # torch has CPU fp16 autocast, else say why
    for mode in ("nonprivate", "bk"):
        status = by[(mode, "fp16")]["status"]
        assert status == "ok" or status.startswith("not supported: fp16 on cpu"), (mode, status)
    assert by[("nonprivate", "tf32")]["status"] == "ok"
    assert by[("nonprivate", "tf32")]["note"] == worker.TF32_ON_CPU
    assert any("GradScaler" in n for n in raw["notes"]) and worker.TF32_ON_CPU in raw["notes"]


def test_count_ops_counts_forward_and_backward() -> None:
    model = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    forward = worker.count_ops(lambda: model(x))
    both = worker.count_ops(lambda: model(x).sum().backward())
    assert 0 < forward < both


def test_compute_ops_leave_out_exactly_the_views() -> None:
    """A step of three views and two computing operators: 5 operators, 2 of them compute."""
    x = torch.randn(4, 6)

    def step() -> None:
        y = x.view(6, 4).t().detach()  # three views
        (y * 2).sum()  # two that compute
    assert worker.count_ops(step) == 5
    assert worker.count_compute_ops(step) == 2


# ---------------------------------------------------------------- nothing measured is lost

def _ok(t: float, ops: int = 100) -> dict:
    return {"status": "ok", "step_times": [t, t], "baseline_rss_mb": 100.0, "prestep_rss_mb": 110.0,
            "peak_mem_mb": 150.0, "ops_per_step": ops}


TWO = {"name": "two", "rounds": 1, "modes": ["nonprivate", "bk"], "model": [{"name": "mlp", "batch": [4]}]}


def test_rows_are_on_disk_as_each_configuration_finishes(tmp_path: Path) -> None:
    jsonl = tmp_path / "results.jsonl"

    def crash_after_first(cfg: dict) -> dict:
        if cfg["mode"] != "nonprivate":
            raise RuntimeError("machine fell over")
        return _ok(0.01)

    with pytest.raises(RuntimeError, match="fell over"):
        run_suite(parse_suite(TWO), progress=False, runner=crash_after_first, accounting=False, jsonl=jsonl)
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [e["event"] for e in lines] == ["start", "result"]
    assert lines[1]["config"]["mode"] == "nonprivate" and lines[1]["result"]["step_times"] == [0.01, 0.01]
    raw = load_jsonl(jsonl)  # the report can still be made from what was measured
    assert [e["config"]["mode"] for e in raw["configs"]] == ["nonprivate"]
    assert raw["notes"][0].startswith("the run did not finish")
    assert summarize(raw)[0]["metrics"]["step_time_s"][0] == pytest.approx(0.01)


def test_interrupt_keeps_what_finished(tmp_path: Path) -> None:
    def interrupted_after_first(cfg: dict) -> dict:
        if cfg["mode"] != "nonprivate":
            raise KeyboardInterrupt
        return _ok(0.01)

    raw = run_suite(parse_suite(TWO), progress=False, runner=interrupted_after_first, accounting=False,
                    jsonl=tmp_path / "r.jsonl")
    status = {e["config"]["mode"]: e["status"] for e in raw["configs"]}
    assert status == {"nonprivate": "ok", "bk": INTERRUPTED}
    assert raw["notes"][0].startswith("interrupted after 1 of 2 runs")
    assert load_jsonl(tmp_path / "r.jsonl")["notes"] == raw["notes"]  # the run's end was recorded


def test_missing_matplotlib_skips_the_plot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    suite = parse_suite(TWO)
    raw = run_suite(suite, progress=False, runner=lambda cfg: _ok(0.01 if cfg["mode"] == "nonprivate" else 0.02),
                    accounting=False)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    paths = write_all(raw, suite, tmp_path, "dpengine bench", echo=False)
    assert "plot" not in paths and not (tmp_path / "bench.png").exists()
    assert PLOT_SKIPPED in capsys.readouterr().err
    results = (tmp_path / "RESULTS.md").read_text()
    assert PLOT_SKIPPED in results and "![plot]" not in results
    assert (tmp_path / "results.csv").exists() and (tmp_path / "results_table.md").exists()


def test_csv_written_by_an_older_bench_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    old = [c for c in CSV_COLUMNS if c not in ("precision", "note")]
    path.write_text(",".join(old) + "\n" + ",".join("old" if c == "model" else "" for c in old) + "\n")
    write_csv([{"model": "new", "precision": "bf16", "metric": "step_time_s", "median": 0.5}], path)
    with path.open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
        rows = list(reader)
    assert [(r["model"], r["precision"]) for r in rows] == [("old", "fp32"), ("new", "bf16")]


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
    assert {"default", "quick", "gpu", "hf", "gpu_check"} <= set(names)
    for name in names:
        load_suite(name)
    default = load_suite("default")
    cfgs = {(c["model"], c["batch"]) for c in default.configs()}
    assert {("mlp", 256), ("cnn", 64), ("gpt", 16)} <= cfgs
    assert default.accounting and {"nonprivate", "bk", "opacus-ghost"} <= set(default.modes)
    assert all(m.name != "gpt2-small" for m in default.models)
    assert any(m.name == "gpt2-small" for m in load_suite("gpu").models)
    check = load_suite("gpu_check")
    cfgs = {(c["model"], c["batch"], c["precision"], c["mode"]) for c in check.configs()}
    assert check.device == "cuda" and check.worker_timeout_s <= 120
    modes = ("nonprivate", "bk", "fused", "fused+per_layer", "opacus-ghost")
    assert {("gpt2-small", b, "bf16", m) for b in (8, 32) for m in modes} <= cfgs
    assert {("gpt2-medium", 8, "bf16", m) for m in ("nonprivate", "bk", "fused")} <= cfgs
    assert not any(c[0].startswith("gpt2-") and c[2] != "bf16" for c in cfgs)
    assert check.configs()[0]["model"] == "gpt2-small"  # the headline rows first, should time run out
    assert all(c["precision"] == "fp16" for c in check.with_overrides(precisions=["fp16"]).configs())


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
    ({"precisions": ["fp8"]}, "unknown precision(s) 'fp8'"),
    ({"model": [{"name": "mlp", "batch": [4], "precisions": []}]}, "precisions must not be empty"),
    ({"worker_timeout_s": 0}, "worker_timeout_s must be a positive number"),
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


def test_clipping_variants_expand_every_dpengine_backend_and_are_validated():
    from dpengine.bench.suite import SuiteError, load_suite
    from dpengine.bench.worker import known_mode, split_mode

    suite = load_suite("quick").with_clippings(("per_layer", "adaptive"))
    modes = {c["mode"] for c in suite.configs()}
    for backend in {"hooks", "ghost", "bk"} & {split_mode(m)[0] for m in modes}:
        assert {f"{backend}+per_layer", f"{backend}+adaptive"} <= modes
    assert not any(m.startswith(("nonprivate+", "opacus-", "fused+")) and "+" in m for m in modes)
    assert split_mode("bk+per_layer") == ("bk", "per_layer") and split_mode("bk") == ("bk", None)
    assert known_mode("ghost+automatic") and not known_mode("opacus-ghost+automatic") and not known_mode("bk+nope")
    with pytest.raises(SuiteError, match="BACKEND\\+CLIPPING"):
        suite.with_overrides(modes=("bk+nope",))


def test_cuda_device_without_cuda_fails_with_one_line(tmp_path):
    from click.testing import CliRunner

    from dpengine.bench.cli import bench

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    res = CliRunner().invoke(bench, ["--quick", "--device", "cuda", "--output-dir", str(tmp_path)])
    assert res.exit_code != 0 and "no CUDA device" in res.output and "Traceback" not in res.output
    assert not any(tmp_path.iterdir())  # nothing ran, nothing written


def test_default_output_dir_is_fresh_and_never_the_committed_results(tmp_path, monkeypatch):
    """Without --output-dir a run writes to a new bench-out/<timestamp> directory, never into benchmarks/."""
    from click.testing import CliRunner

    from dpengine.bench.cli import bench, default_output_dir

    monkeypatch.chdir(tmp_path)
    (tmp_path / "benchmarks").mkdir()
    first = default_output_dir()
    first.mkdir(parents=True)
    second = default_output_dir()
    assert first.parent == second.parent == Path("bench-out") and first != second
    res = CliRunner().invoke(bench, ["--accounting-only"])
    assert res.exit_code == 0, res.output
    written = [p for p in (tmp_path / "bench-out").iterdir() if (p / "RESULTS.md").exists()]
    assert len(written) == 1 and not any((tmp_path / "benchmarks").iterdir())
    text = (written[0] / "RESULTS.md").read_text()
    assert "--accounting-only    # only the accounting" in text and "--accounting         #" not in text


# ------------------------------------------------------------------------------ compile axis

COMPILED = {"name": "c", "rounds": 2, "warmup": 1, "modes": ["nonprivate", "bk"], "compile": ["eager", "default"],
            "model": [{"name": "mlp", "batch": [4]}]}


def test_compile_axis_expands_configurations_and_is_validated() -> None:
    suite = parse_suite(COMPILED)
    cfgs = suite.configs()
    assert [(c["compile"], c["mode"]) for c in cfgs] == [("eager", "nonprivate"), ("eager", "bk"),
                                                         ("default", "nonprivate"), ("default", "bk")]
    assert len({runner_mod.config_key(c) for c in cfgs}) == 4  # the compile setting is part of the key
    assert {c["compile"] for c in parse_suite({**COMPILED, "compile": ["eager"]}).configs()} == {"eager"}
    assert {c["compile"] for c in parse_suite({k: v for k, v in COMPILED.items() if k != "compile"}).configs()} \
        == {"eager"}  # the default
    over = suite.with_overrides(compiles=("default", "reduce-overhead"))
    assert [c["compile"] for c in over.configs()] == ["default"] * 2 + ["reduce-overhead"] * 2
    with pytest.raises(SuiteError, match="unknown compile setting\\(s\\) 'max-autotune-ish'"):
        parse_suite({**COMPILED, "compile": ["max-autotune-ish"]})
    with pytest.raises(SuiteError, match="compile must not be empty"):
        parse_suite({**COMPILED, "compile": []})
    with pytest.raises(SuiteError, match="compiling needs warmup >= 1"):
        parse_suite({**COMPILED, "warmup": 0})
    with pytest.raises(SuiteError, match="compiling needs warmup >= 1"):
        parse_suite({**COMPILED, "compile": ["eager"], "warmup": 0}).with_overrides(compiles=("default",))
    assert {c["compile"] for c in load_suite("compile").configs()} == {"eager", "default"}


def _timed(times: dict[tuple[str, str], float], warmup_s: float = 3.0) -> Any:
    def fake(cfg: dict) -> dict:
        out = _ok(times[(cfg["mode"], cfg["compile"])])
        out["warmup_s"] = warmup_s if cfg["compile"] != "eager" else 0.05
        if cfg["compile"] != "eager":
            out.update(compiled_graphs=7, graph_breaks=3)
        return out
    return fake


def test_compiled_row_is_divided_by_the_compiled_nonprivate_row(tmp_path: Path) -> None:
    suite = parse_suite(COMPILED)
    times = {("nonprivate", "eager"): 0.010, ("bk", "eager"): 0.020,
             ("nonprivate", "default"): 0.005, ("bk", "default"): 0.015}
    raw = run_suite(suite, progress=False, runner=_timed(times), accounting=False)
    by = {(s["mode"], s["compile"]): s["metrics"] for s in summarize(raw)}
    assert by[("bk", "eager")]["time_ratio_vs_nonprivate"][0] == pytest.approx(2.0)
    assert by[("bk", "default")]["time_ratio_vs_nonprivate"][0] == pytest.approx(3.0)  # 15 / 5, not 15 / 10
    assert by[("bk", "default")]["time_ratio_vs_eager"][0] == pytest.approx(0.75)
    assert by[("nonprivate", "default")]["time_ratio_vs_eager"][0] == pytest.approx(0.5)
    assert by[("bk", "default")]["compile_s"][0] == pytest.approx(3.0)
    assert by[("bk", "default")]["graph_breaks"][0] == 3 and by[("bk", "default")]["compiled_graphs"][0] == 7
    assert not {"compile_s", "time_ratio_vs_eager", "graph_breaks"} & set(by[("bk", "eager")])  # eager: none
    # CSV, table, targets carry the setting
    paths = write_all(raw, suite, tmp_path, "dpengine bench --compile eager --compile default", echo=False)
    with paths["csv"].open() as f:
        rows = list(csv.DictReader(f))
    ratio = {(r["mode"], r["compile"]): float(r["median"]) for r in rows if r["metric"] == "time_ratio_vs_nonprivate"}
    assert ratio == {("bk", "eager"): pytest.approx(2.0), ("bk", "default"): pytest.approx(3.0)}
    assert any(r["metric"] == "compile_s" and r["compile"] == "default" for r in rows)
    table = paths["table"].read_text()
    assert "| model | batch | precision | compile | mode |" in table and "compile s" in table
    assert "| mlp | 4 | fp32 | default | bk | ok |" in table and "0.75×" in table
    # --rebuild-report from the JSON keeps the compile column
    res = CliRunner().invoke(bench, ["--rebuild-report", str(paths["json"]), "--output-dir", str(tmp_path / "re")])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "| mlp | 4 | fp32 | default | bk | ok |" in (tmp_path / "re" / "RESULTS.md").read_text()


def test_compile_target_against_eager() -> None:
    suite = parse_suite({**COMPILED, "target": [{"model": "mlp", "batch": 4, "mode": "bk", "compile": "default",
                                                 "metric": "time_ratio_vs_eager", "max": 1.0}]})
    raw = run_suite(suite, progress=False, accounting=False, runner=_timed(
        {("nonprivate", "eager"): 0.01, ("bk", "eager"): 0.02, ("nonprivate", "default"): 0.01,
         ("bk", "default"): 0.03}))
    from dpengine.bench.report import targets_table

    (row,) = targets_table(suite, summarize(raw))[1]
    assert row[3] == "default" and row[5] == "time_ratio_vs_eager" and row[6].startswith("1.50×") and row[8] == "no"


def test_reduce_overhead_on_cpu_is_an_explicit_row_never_run(in_process: Any) -> None:
    suite = parse_suite({**COMPILED, "rounds": 1, "compile": ["eager", "reduce-overhead"]})
    called = []

    def runner(cfg: dict) -> dict:
        called.append((cfg["mode"], cfg["compile"]))
        return _ok(0.01)

    raw = run_suite(suite, progress=False, runner=runner, accounting=False)
    assert called == [("nonprivate", "eager"), ("bk", "eager")]  # never started, never run as "default"
    by = {(s["mode"], s["compile"]): s for s in summarize(raw)}
    for mode in ("nonprivate", "bk"):
        status = by[(mode, "reduce-overhead")]["status"]
        assert status.startswith("not supported: compile=reduce-overhead on cpu") and "CUDA graphs" in status
        assert not by[(mode, "reduce-overhead")]["metrics"]
    assert any("compile=reduce-overhead" in n and "CUDA graphs" in n for n in raw["notes"])
    rows = [r for r in to_rows(raw) if r["compile"] == "reduce-overhead"]
    assert len(rows) == 2 and all(r["metric"] == "status" and "CUDA graphs" in r["status"] for r in rows)
    # the worker refuses it too when started directly (before building anything)
    out = in_process({"model": "mlp", "params": {"sizes": [8, 6, 3]}, "mode": "bk", "batch": 4,
                      "compile": "reduce-overhead", "device": "cpu"})
    assert out == {"status": worker.REDUCE_OVERHEAD_NEEDS_CUDA.format(device="cpu")}


def test_results_without_compile_setting_still_load(tmp_path: Path) -> None:
    # an older CSV: precision, no compile column
    path = tmp_path / "results.csv"
    old = [c for c in CSV_COLUMNS if c != "compile"]
    path.write_text(",".join(old) + "\n" + ",".join({"model": "old", "precision": "bf16", "params": "{}"}.get(c, "")
                                                    for c in old) + "\n")
    write_csv([{"model": "new", "precision": "fp32", "compile": "default", "metric": "step_time_s", "median": 0.5}],
              path)
    with path.open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
        rows = list(reader)
    assert [(r["model"], r["precision"], r["compile"]) for r in rows] == [("old", "bf16", "eager"),
                                                                         ("new", "fp32", "default")]
    # an older raw run (results.jsonl / results.json): configurations without a "compile" key are eager
    run_suite(parse_suite(TWO), progress=False, accounting=False,
              runner=lambda cfg: _ok(0.01 if cfg["mode"] == "nonprivate" else 0.02),
              jsonl=tmp_path / "r.jsonl")
    lines = []
    for line in (tmp_path / "r.jsonl").read_text().splitlines():
        e = json.loads(line)
        if "config" in e:
            e["config"].pop("compile")
        lines.append(json.dumps(e))
    (tmp_path / "old.jsonl").write_text("\n".join(lines) + "\n")
    summary = summarize(load_jsonl(tmp_path / "old.jsonl"))
    assert {s["compile"] for s in summary} == {"eager"}
    bk = next(s for s in summary if s["mode"] == "bk")
    assert bk["metrics"]["time_ratio_vs_nonprivate"][0] == pytest.approx(2.0)
    res = CliRunner().invoke(bench, ["--rebuild-report", str(tmp_path / "old.jsonl"), "--output-dir",
                                     str(tmp_path / "re")])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "| mlp | 4 | fp32 | eager | bk | ok |" in (tmp_path / "re" / "RESULTS.md").read_text()


TINY_COMPILED = """
name = "tinyc"
rounds = 1
warmup = 2
steps = 2
threads = 1
modes = ["nonprivate", "bk"]
compile = ["default"]

[[model]]
name = "mlp"
batch = [4]
params = { sizes = [8, 6, 3] }
"""


@pytest.mark.slow  # ~35 s on 2 busy cores: inductor compiles in each worker subprocess
def test_tiny_compiled_suite_end_to_end(tmp_path: Path) -> None:
    """Real subprocess workers under torch.compile(mode=None, dynamic=True): both rows run, bk compiled after
    make_private, compile time reported apart from the step times."""
    _, rows = _run_suite(tmp_path, TINY_COMPILED)
    assert {r["status"] for r in rows} == {"ok"}, [r["status"] for r in rows]
    assert {r["compile"] for r in rows} == {"default"}
    metric = {(r["mode"], r["metric"]): float(r["median"]) for r in rows}
    assert ("bk", "time_ratio_vs_nonprivate") in metric
    for mode in ("nonprivate", "bk"):
        assert metric[(mode, "compiled_graphs")] >= 1
        assert metric[(mode, "compile_s")] > metric[(mode, "step_time_s")]  # compilation is in the warm-up
    # dpengine's capture goes through custom ops: no graph break beyond the plain model's (none here)
    assert metric[("bk", "graph_breaks")] == metric[("nonprivate", "graph_breaks")] == 0
