"""Run a suite: every configuration in a fresh subprocess, round-robin over configurations for
several rounds (direction alternating each round) so slow machine drift hits every mode alike.
Then aggregate into long-format rows (one per configuration x metric) with the ratios that matter.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
from typing import Any, Callable

from dpengine.bench.suite import Suite
from dpengine.bench.worker import DPENGINE_MODES, FUSED_NEEDS_CUDA, NOT_IMPLEMENTED, OPACUS_MODES, implemented

CSV_COLUMNS = ("timestamp", "commit", "device", "torch", "triton", "opacus", "suite", "model", "params", "mode",
               "clipping", "batch", "threads", "rounds", "metric", "median", "p20", "p80", "n", "status")


def quantiles(xs: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80) with linear interpolation; NaNs if empty."""
    xs = sorted(x for x in xs if x is not None and math.isfinite(x))
    if not xs:
        return (math.nan, math.nan, math.nan)

    def q(p: float) -> float:
        pos = p * (len(xs) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return (q(0.5), q(0.2), q(0.8))


# ------------------------------------------------------------------------------- environment


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or "unknown" if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_info() -> dict[str, Any]:
    model, cores = platform.processor() or "unknown", os.cpu_count() or 0
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    return {"cpu_model": model, "cores": cores}


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for pkg in ("torch", "triton", "opacus"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "none"
    return out


def device_name(device: str) -> str:
    if device == "cuda":
        try:
            import torch

            if torch.cuda.is_available():
                return f"cuda: {torch.cuda.get_device_name(0)}"
        except Exception:  # noqa: BLE001
            pass
        return "cuda: unavailable"
    info = cpu_info()
    return f"cpu: {info['cpu_model']} ({info['cores']} cores)"


def cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001
        return False


# ------------------------------------------------------------------------------------ running


def run_worker(cfg: dict[str, Any], timeout: float = 1800.0) -> dict[str, Any]:
    """Run one configuration in a fresh interpreter; returns the worker's JSON (or an error status)."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(cfg.get("threads", 2))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        proc = subprocess.run([sys.executable, "-m", "dpengine.bench.worker", "--config", json.dumps(cfg)],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": f"error: timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                break
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"status": f"error: worker exited {proc.returncode}: {tail[0][:300]}"}


def config_key(cfg: dict[str, Any]) -> tuple:
    return (cfg["model"], json.dumps(cfg.get("params", {}), sort_keys=True), cfg["batch"], cfg["mode"])


def run_suite(suite: Suite, progress: bool = True, runner: Callable[[dict[str, Any]], dict[str, Any]] = run_worker,
              accounting: bool | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run ``suite`` and return ``{"meta", "configs", "accounting", "notes"}`` (raw, see :func:`to_rows`)."""
    configs = suite.configs()
    notes: list[str] = []
    results: dict[tuple, dict[str, Any]] = {}
    todo = []
    for cfg in configs:
        entry = {"config": cfg, "rounds": [], "status": "ok"}
        results[config_key(cfg)] = entry
        if not implemented(cfg["mode"]):
            entry["status"] = NOT_IMPLEMENTED.format(mode=cfg["mode"])
        elif cfg["mode"] == "fused" and not (suite.device == "cuda" and cuda_available()):
            entry["status"] = FUSED_NEEDS_CUDA
        elif suite.device == "cuda" and not cuda_available():
            entry["status"] = "skipped: CUDA unavailable"
        else:
            todo.append(cfg)
    if any(e["status"] == FUSED_NEEDS_CUDA for e in results.values()):
        notes.append("mode 'fused' skipped: it needs CUDA (Triton kernels); this run is on " + suite.device)
    for mode in sorted({c["mode"] for c in configs if not implemented(c["mode"])}):
        notes.append(f"mode '{mode}' skipped: not implemented in this dpengine yet")

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo) * suite.rounds, desc=f"bench {suite.name}", unit="run", file=sys.stderr)
    for r in range(suite.rounds):
        order = todo if r % 2 == 0 else list(reversed(todo))
        for cfg in order:
            entry = results[config_key(cfg)]
            if entry["status"] != "ok":  # an error in an earlier round: do not repeat it
                if bar:
                    bar.update(1)
                continue
            if bar:
                bar.set_postfix_str(f"r{r + 1} {cfg['model']}/{cfg['mode']}/b{cfg['batch']}")
            out = runner(cfg)
            if out.get("status") != "ok":
                entry["status"] = out.get("status", "error: no status")
                if log:
                    log(f"{cfg['model']}/{cfg['mode']}/b{cfg['batch']}: {entry['status']}")
            else:
                entry["rounds"].append(out)
            if bar:
                bar.update(1)
    if bar:
        bar.close()

    acc_rows: list[dict[str, Any]] = []
    if suite.accounting if accounting is None else accounting:
        acc_rows, note = run_accounting()
        if note:
            notes.append(note)
    return {"meta": make_meta(suite), "configs": list(results.values()), "accounting": acc_rows, "notes": notes}


def make_meta(suite: Suite) -> dict[str, Any]:
    return {"timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
            "device": device_name(suite.device), "suite": suite.name, "rounds": suite.rounds,
            "warmup": suite.warmup, "steps": suite.steps, "min_time_s": suite.min_time_s, "threads": suite.threads, **versions(), **cpu_info(),
            "python": platform.python_version()}


def run_accounting_only(suite: Suite) -> dict[str, Any]:
    rows, note = run_accounting()
    return {"meta": make_meta(suite), "configs": [], "accounting": rows, "notes": [note] if note else []}


def run_accounting(repeats: int | None = None) -> tuple[list[dict[str, Any]], str]:
    """The accounting micro-benchmark, if ``dpengine.bench.accounting`` is there (lazy import)."""
    try:
        from dpengine.bench import accounting as acc
    except ImportError as e:
        return [], f"accounting micro-benchmark unavailable ({e})"
    try:
        rows = acc.run_accounting_benchmark() if repeats is None else acc.run_accounting_benchmark(repeats=repeats)
    except Exception as e:  # noqa: BLE001
        return [], f"accounting micro-benchmark failed: {type(e).__name__}: {e}"
    return list(rows), ""


# -------------------------------------------------------------------------------- aggregation


def _round_medians(entry: dict[str, Any]) -> list[float]:
    return [quantiles(r["step_times"])[0] for r in entry["rounds"]]


def _paired(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Quantiles of per-round ratios a[i] / b[i] (same round, so drift cancels)."""
    return quantiles([x / y for x, y in zip(a, b) if y and y > 0])


def summarize(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict per configuration: config fields, status and ``metrics: {name: (median, p20, p80, n)}``."""
    entries = raw["configs"]
    by_group: dict[tuple, dict[str, dict[str, Any]]] = {}
    for e in entries:
        c = e["config"]
        by_group.setdefault((c["model"], json.dumps(c.get("params", {}), sort_keys=True), c["batch"]), {})[c["mode"]] = e
    out = []
    for e in entries:
        c = e["config"]
        ok = e["status"] == "ok" and e["rounds"]
        s = {**c, "status": e["status"] if e["rounds"] or e["status"] != "ok" else "error: no rounds", "metrics": {}}
        out.append(s)
        if not ok:
            continue
        m = s["metrics"]
        times = [t for r in e["rounds"] for t in r["step_times"]]
        med, p20, p80 = quantiles(times)
        m["step_time_s"] = (med, p20, p80, len(times))
        m["samples_per_s"] = (c["batch"] / med, c["batch"] / p80, c["batch"] / p20, len(times))
        for key in ("peak_mem_mb", "prestep_rss_mb", "baseline_rss_mb"):
            m[key] = (*quantiles([r[key] for r in e["rounds"]]), len(e["rounds"]))
        m["step_mem_mb"] = (*quantiles([r["peak_mem_mb"] - r["baseline_rss_mb"] for r in e["rounds"]]), len(e["rounds"]))
        if c["mode"] == "nonprivate":
            continue
        group = by_group[(c["model"], json.dumps(c.get("params", {}), sort_keys=True), c["batch"])]
        peaks = [r["peak_mem_mb"] for r in e["rounds"]]
        steps_mem = [r["peak_mem_mb"] - r["baseline_rss_mb"] for r in e["rounds"]]
        np_ = group.get("nonprivate")
        if np_ and np_["status"] == "ok" and np_["rounds"]:
            n = min(len(e["rounds"]), len(np_["rounds"]))
            m["time_ratio_vs_nonprivate"] = (*_paired(_round_medians(e), _round_medians(np_)), n)
            m["mem_ratio_vs_nonprivate"] = (*_paired(peaks, [r["peak_mem_mb"] for r in np_["rounds"]]), n)
            m["step_mem_ratio_vs_nonprivate"] = (
                *_paired(steps_mem, [r["peak_mem_mb"] - r["baseline_rss_mb"] for r in np_["rounds"]]), n)
        if c["mode"] in DPENGINE_MODES:
            ops = [group[o] for o in OPACUS_MODES if o in group and group[o]["status"] == "ok" and group[o]["rounds"]]
            if ops:
                best_t = min(ops, key=lambda o: quantiles([t for r in o["rounds"] for t in r["step_times"]])[0])
                best_m = min(ops, key=lambda o: quantiles([r["peak_mem_mb"] for r in o["rounds"]])[0])
                n = min(len(e["rounds"]), len(best_t["rounds"]))
                m["time_ratio_vs_best_opacus"] = (*_paired(_round_medians(e), _round_medians(best_t)), n)
                m["mem_ratio_vs_best_opacus"] = (*_paired(peaks, [r["peak_mem_mb"] for r in best_m["rounds"]]), n)
                s["best_opacus"] = {"time": best_t["config"]["mode"], "mem": best_m["config"]["mode"]}
    return out


def to_rows(raw: dict[str, Any], summary: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Long-format rows (CSV_COLUMNS): one per configuration x metric; one ``status`` row for a
    configuration that failed or was skipped; accounting rows with metric ``accounting_time_s``."""
    meta = raw["meta"]
    summary = summarize(raw) if summary is None else summary
    base = {k: meta.get(k, "") for k in ("timestamp", "commit", "device", "torch", "triton", "opacus", "suite",
                                          "threads", "rounds")}
    rows = []
    for s in summary:
        common = {**base, "model": s["model"], "params": json.dumps(s.get("params", {}), sort_keys=True),
                  "mode": s["mode"], "clipping": s["clipping"], "batch": s["batch"]}
        if not s["metrics"]:
            rows.append({**common, "metric": "status", "median": math.nan, "p20": math.nan, "p80": math.nan,
                         "n": 0, "status": s["status"]})
            continue
        for metric, (med, p20, p80, n) in s["metrics"].items():
            rows.append({**common, "metric": metric, "median": med, "p20": p20, "p80": p80, "n": n, "status": "ok"})
    for a in raw.get("accounting", []):
        timed = "median_s" in a
        rows.append({**base, "model": a.get("task", ""), "params": "", "mode": a.get("provider", ""),
                     "clipping": "", "batch": "", "metric": "accounting_time_s" if timed else "status",
                     "median": a.get("median_s", math.nan), "p20": a.get("p20_s", math.nan),
                     "p80": a.get("p80_s", math.nan), "n": a.get("repeats", ""),
                     "status": "ok" if timed else str(a.get("note", a.get("status", "error: no timing")))})
    return rows
