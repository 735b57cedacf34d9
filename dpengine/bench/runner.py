"""Run a suite: every configuration in a fresh subprocess, round-robin over configurations for
several rounds (direction alternating each round) so slow machine drift hits every mode alike.
Then aggregate into long-format rows (one per configuration x metric) with the ratios that matter.

Nothing measured is lost: with ``jsonl``, every worker's result (and every skipped configuration) is
appended to that file the moment it is known, and :func:`load_jsonl` turns it back into a run, also
one that was killed. Ctrl-C / SIGTERM stops the loop and returns what finished.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from dpengine.bench.suite import Suite
from dpengine.bench.worker import (DPENGINE_MODES, FUSED_NEEDS_CUDA, NOT_IMPLEMENTED, OPACUS_MISSING, OPACUS_MODES,
                                   compile_unsupported, implemented, opacus_available, split_mode, unsupported)

CSV_COLUMNS = ("timestamp", "commit", "device", "torch", "triton", "opacus", "suite", "model", "params", "mode",
               "precision", "compile", "clipping", "batch", "threads", "rounds", "metric", "median", "p20", "p80", "n", "status",
               "note")
# per-step launch counts (worker key == metric) and their DP / non-private ratio metric
COUNT_METRICS = {"ops_per_step": "ops_ratio_vs_nonprivate", "compute_ops_per_step": "compute_ops_ratio_vs_nonprivate",
                 "kernels_per_step": "kernels_ratio_vs_nonprivate"}
INTERRUPTED = "not run: interrupted"
# per-round worker keys of compiled rows (torch.compile): warm-up wall time, compilation included, as
# ``compile_s``; dynamo's graph and graph-break counts
COMPILE_METRICS = {"warmup_s": "compile_s", "compiled_graphs": "compiled_graphs", "graph_breaks": "graph_breaks"}


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
    return (cfg["model"], json.dumps(cfg.get("params", {}), sort_keys=True), cfg["batch"], cfg["mode"],
            cfg.get("precision", "fp32"), cfg.get("compile", "eager"))


def _label(cfg: dict[str, Any]) -> str:
    return f"{cfg['model']}/{cfg['mode']}/b{cfg['batch']}/{cfg.get('precision', 'fp32')}/{cfg.get('compile', 'eager')}"


def skip_status(cfg: dict[str, Any], device: str) -> str | None:
    """Why ``cfg`` is not run at all (its row's status), or None."""
    mode = cfg["mode"]
    base = split_mode(mode)[0]
    if not implemented(mode):
        return NOT_IMPLEMENTED.format(mode=mode)
    if base == "fused" and not (device == "cuda" and cuda_available()):
        return FUSED_NEEDS_CUDA
    if device == "cuda" and not cuda_available():
        return "skipped: CUDA unavailable"
    if mode in OPACUS_MODES and not opacus_available():
        return OPACUS_MISSING
    return unsupported(mode, cfg.get("precision", "fp32")) or compile_unsupported(cfg.get("compile", "eager"), device)


def run_notes(entries: list[dict[str, Any]]) -> list[str]:
    """One note per reason a mode was skipped, and each distinct note the workers attached to a row."""
    notes: list[str] = []
    devices = sorted({e["config"].get("device", "cpu") for e in entries})
    if any(e["status"] == FUSED_NEEDS_CUDA for e in entries):
        notes.append("mode 'fused' skipped: it needs CUDA (Triton kernels); this run is on " + ", ".join(devices))
    for mode in sorted({e["config"]["mode"] for e in entries if not implemented(e["config"]["mode"])}):
        notes.append(f"mode '{mode}' skipped: not implemented in this dpengine yet")
    by_reason: dict[str, set[str]] = {}
    for e in entries:
        if e["status"].startswith("not supported") or e["status"] == OPACUS_MISSING:
            c = e["config"]
            compiled = "" if c.get("compile", "eager") == "eager" else f", compile={c['compile']}"
            by_reason.setdefault(e["status"], set()).add(f"{c['mode']} at {c.get('precision', 'fp32')}{compiled}")
    notes += [f"{', '.join(sorted(what))}: {reason}" for reason, what in by_reason.items()]
    notes += list(dict.fromkeys(r["note"] for e in entries for r in e["rounds"] if r.get("note")))
    return notes


class JsonlLog:
    """Appends one JSON line per event to ``path`` (opened, written and closed each time, so a killed run
    keeps every line it wrote): ``start`` (meta), ``result`` (a config, its round or None when it was never
    run, the worker's output), ``accounting`` and ``end``. Every line carries the run's id."""

    def __init__(self, path: Path | None, meta: dict[str, Any]) -> None:
        self.path, self.run = path, f"{meta['timestamp']}-{os.getpid()}"
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        self.write("start", meta=meta)

    def write(self, event: str, **data: Any) -> None:
        if self.path is None:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"event": event, "run": self.run, **data}, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())


def run_suite(suite: Suite, progress: bool = True, runner: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
              accounting: bool | None = None, log: Callable[[str], None] | None = None,
              jsonl: Path | None = None) -> dict[str, Any]:
    """Run ``suite`` and return ``{"meta", "configs", "accounting", "notes"}`` (raw, see :func:`to_rows`).
    With ``jsonl``, each result is appended there as soon as it is known (see :class:`JsonlLog`)."""
    runner = runner or functools.partial(run_worker, timeout=suite.worker_timeout_s)
    meta = make_meta(suite)
    sink = JsonlLog(jsonl, meta)
    results: dict[tuple, dict[str, Any]] = {}
    todo = []
    for cfg in suite.configs():
        status = skip_status(cfg, suite.device)
        results[config_key(cfg)] = {"config": cfg, "rounds": [], "status": status or "ok"}
        if status is None:
            todo.append(cfg)
        else:
            sink.write("result", config=cfg, round=None, result={"status": status})

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo) * suite.rounds, desc=f"bench {suite.name}", unit="run", file=sys.stderr)
    interrupted = ""
    done = 0
    try:
        for r in range(suite.rounds):
            order = todo if r % 2 == 0 else list(reversed(todo))
            for cfg in order:
                entry = results[config_key(cfg)]
                if entry["status"] == "ok":  # not after an error in an earlier round: do not repeat it
                    if bar:
                        bar.set_postfix_str(f"r{r + 1} {_label(cfg)}")
                    out = runner(cfg)
                    sink.write("result", config=cfg, round=r, result=out)
                    if out.get("status") != "ok":
                        entry["status"] = out.get("status", "error: no status")
                        if log:
                            log(f"{_label(cfg)}: {entry['status']}")
                    else:
                        entry["rounds"].append(out)
                done += 1
                if bar:
                    bar.update(1)
    except KeyboardInterrupt:
        interrupted = f"interrupted after {done} of {len(todo) * suite.rounds} runs: the rest are missing"
        for entry in results.values():
            if entry["status"] == "ok" and not entry["rounds"]:
                entry["status"] = INTERRUPTED
        if log:
            log(interrupted)
    finally:
        if bar:
            bar.close()

    notes = ([interrupted] if interrupted else []) + run_notes(list(results.values()))
    acc_rows: list[dict[str, Any]] = []
    if not interrupted and (suite.accounting if accounting is None else accounting):
        acc_rows, note = run_accounting()
        if note:
            notes.append(note)
        sink.write("accounting", rows=acc_rows)
    sink.write("end", notes=notes)
    return {"meta": meta, "configs": list(results.values()), "accounting": acc_rows, "notes": notes}


def load_jsonl(path: Path) -> dict[str, Any]:
    """The last run recorded in a JSONL written by :func:`run_suite` (finished or not), as its raw dict."""
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    starts = [e for e in events if e.get("event") == "start"]
    if not starts:
        raise ValueError(f"{path}: no run recorded (no 'start' line)")
    run = starts[-1]["run"]
    results: dict[tuple, dict[str, Any]] = {}
    acc_rows: list[dict[str, Any]] = []
    end = None
    for e in (e for e in events if e.get("run") == run):
        if e["event"] == "result":
            entry = results.setdefault(config_key(e["config"]), {"config": e["config"], "rounds": [], "status": "ok"})
            if e["result"].get("status") == "ok":
                entry["rounds"].append(e["result"])
            else:
                entry["status"] = e["result"].get("status", "error: no status")
        elif e["event"] == "accounting":
            acc_rows = e["rows"]
        elif e["event"] == "end":
            end = e
    if end is not None:
        notes = list(end.get("notes", []))
    else:
        notes = [f"the run did not finish ({path.name} has no 'end' line): only the runs recorded are reported",
                 *run_notes(list(results.values()))]
    return {"meta": starts[-1]["meta"], "configs": list(results.values()), "accounting": acc_rows, "notes": notes}


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
    def group_key(c: dict[str, Any]) -> tuple:
        return (c["model"], json.dumps(c.get("params", {}), sort_keys=True), c["batch"], c.get("precision", "fp32"),
                c.get("compile", "eager"))

    by_group: dict[tuple, dict[str, dict[str, Any]]] = {}
    eager: dict[tuple, dict[str, Any]] = {}  # the eager entry of each (model, params, batch, precision, mode)
    for e in entries:
        by_group.setdefault(group_key(e["config"]), {})[e["config"]["mode"]] = e
        if e["config"].get("compile", "eager") == "eager":
            eager[(*group_key(e["config"])[:-1], e["config"]["mode"])] = e
    out = []
    for e in entries:
        c = e["config"]
        ok = e["status"] == "ok" and e["rounds"]
        s = {**c, "precision": c.get("precision", "fp32"), "compile": c.get("compile", "eager"), "metrics": {},
             "status": e["status"] if e["rounds"] or e["status"] != "ok" else "error: no rounds",
             "note": "; ".join(dict.fromkeys(r["note"] for r in e["rounds"] if r.get("note")))}
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
        for key in COUNT_METRICS:
            counts = [r[key] for r in e["rounds"] if r.get(key) is not None]
            if counts:
                m[key] = (*quantiles(counts), len(counts))
        if s["compile"] != "eager":
            for key, metric in COMPILE_METRICS.items():
                vals = [r[key] for r in e["rounds"] if r.get(key) is not None]
                if vals:
                    m[metric] = (*quantiles(vals), len(vals))
            ref = eager.get((*group_key(c)[:-1], c["mode"]))
            if ref and ref["status"] == "ok" and ref["rounds"]:  # compiled / eager step time, same mode and round
                m["time_ratio_vs_eager"] = (*_paired(_round_medians(e), _round_medians(ref)),
                                            min(len(e["rounds"]), len(ref["rounds"])))
        if c["mode"] == "nonprivate":
            continue
        group = by_group[group_key(c)]
        peaks = [r["peak_mem_mb"] for r in e["rounds"]]
        steps_mem = [r["peak_mem_mb"] - r["baseline_rss_mb"] for r in e["rounds"]]
        np_ = group.get("nonprivate")
        if np_ and np_["status"] == "ok" and np_["rounds"]:
            n = min(len(e["rounds"]), len(np_["rounds"]))
            m["time_ratio_vs_nonprivate"] = (*_paired(_round_medians(e), _round_medians(np_)), n)
            m["mem_ratio_vs_nonprivate"] = (*_paired(peaks, [r["peak_mem_mb"] for r in np_["rounds"]]), n)
            m["step_mem_ratio_vs_nonprivate"] = (
                *_paired(steps_mem, [r["peak_mem_mb"] - r["baseline_rss_mb"] for r in np_["rounds"]]), n)
            for key, ratio in COUNT_METRICS.items():
                pairs = [(a[key], b[key]) for a, b in zip(e["rounds"], np_["rounds"])
                         if a.get(key) is not None and b.get(key) is not None]
                if pairs:
                    m[ratio] = (*_paired([a for a, _ in pairs], [b for _, b in pairs]), len(pairs))
        if split_mode(c["mode"])[0] in DPENGINE_MODES:
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
                  "mode": s["mode"], "precision": s.get("precision", "fp32"), "compile": s.get("compile", "eager"),
                  "clipping": s["clipping"],
                  "batch": s["batch"], "note": s.get("note", "")}
        if not s["metrics"]:
            rows.append({**common, "metric": "status", "median": math.nan, "p20": math.nan, "p80": math.nan,
                         "n": 0, "status": s["status"]})
            continue
        for metric, (med, p20, p80, n) in s["metrics"].items():
            rows.append({**common, "metric": metric, "median": med, "p20": p20, "p80": p80, "n": n, "status": "ok"})
    for a in raw.get("accounting", []):
        timed = "median_s" in a
        rows.append({**base, "model": a.get("task", ""), "params": "", "mode": a.get("provider", ""),
                     "precision": "", "compile": "", "clipping": "", "batch": "", "note": "",
                     "metric": "accounting_time_s" if timed else "status",
                     "median": a.get("median_s", math.nan), "p20": a.get("p20_s", math.nan),
                     "p80": a.get("p80_s", math.nan), "n": a.get("repeats", ""),
                     "status": "ok" if timed else str(a.get("note", a.get("status", "error: no timing")))})
    return rows
