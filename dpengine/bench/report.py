"""Outputs of a run: the long-format CSV (appended), a JSON dump of the run, markdown tables
(printed with rich and written), the PNG plot (skipped with a note without matplotlib) and a RESULTS.md
report. The raw JSONL (``results.jsonl``) is written by the runner while the run goes."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

from dpengine.bench.runner import CSV_COLUMNS
from dpengine.bench.suite import Suite
from dpengine.bench.worker import COMPILE_MODES, PRECISIONS

MODE_ORDER = ("nonprivate", "hooks", "ghost", "bk", "fused", "opacus-hooks", "opacus-ghost")


def _migrate_csv(path: Path) -> None:
    """Rewrite ``path`` under the current header if an older version of the bench wrote it (columns added
    since are left empty, except ``precision``, which was always fp32, and ``compile``, which was always
    eager)."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) == CSV_COLUMNS:
            return
        rows = list(reader)
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore", restval="")
        w.writeheader()
        w.writerows({"precision": "fp32", "compile": "eager", **r} for r in rows)
    tmp.replace(path)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """Append ``rows`` to ``path`` (header written when the file is new or empty; a file with an older
    header is first rewritten under the current one)."""
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        _migrate_csv(path)
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) and math.isfinite(v) else
                            ("nan" if isinstance(v, float) else v)) for k, v in r.items()})


def write_json(raw: dict[str, Any], summary: list[dict[str, Any]], path: Path) -> None:
    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    path.write_text(json.dumps(clean({"meta": raw["meta"], "command": raw.get("command", ""), "notes": raw["notes"],
                                      "summary": summary,
                                      "accounting": raw.get("accounting", []), "raw": raw["configs"]}), indent=1))


# ---------------------------------------------------------------------------------- tables


def _f(x: float | None, fmt: str = "{:.3g}") -> str:
    return "–" if x is None or not math.isfinite(x) else fmt.format(x)


def _ratio(m: dict[str, Any], key: str) -> str:
    if key not in m:
        return "–"
    med, p20, p80, _ = m[key]
    return f"{_f(med, '{:.2f}')}× ({_f(p20, '{:.2f}')}–{_f(p80, '{:.2f}')})"


def _model_label(s: dict[str, Any]) -> str:
    params = s.get("params") or {}
    return s["model"] + (" " + ",".join(f"{k}={v}" for k, v in sorted(params.items())) if params else "")


def _launches(m: dict[str, Any]) -> str:
    """CUDA kernels per step where counted, else ATen operators (and, after "/", those that are not views),
    with the DP / non-private ratios."""
    def one(key: str, ratio: str, unit: str) -> str:
        return f"{m[key][0]:.0f} {unit}" + (f" ({m[ratio][0]:.2f}×)" if ratio in m else "")

    if "kernels_per_step" in m:
        return one("kernels_per_step", "kernels_ratio_vs_nonprivate", "kernels")
    if "ops_per_step" in m:
        return one("ops_per_step", "ops_ratio_vs_nonprivate", "ops") + (
            " / " + one("compute_ops_per_step", "compute_ops_ratio_vs_nonprivate", "non-view")
            if "compute_ops_per_step" in m else "")
    return "–"


def main_table(summary: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    head = ["model", "batch", "precision", "compile", "mode", "status", "step ms (p20–p80)", "samples/s", "compile s",
            "peak MB", "peak−base MB", "time ×NP", "time ×eager", "peak mem ×NP", "launches/step (×NP)",
            "time ×best Opacus"]
    rows = []
    order = {m: i for i, m in enumerate(MODE_ORDER)}
    for s in sorted(summary, key=lambda s: (s["model"], json.dumps(s.get("params", {})), s["batch"],
                                            _precision_rank(s), _compile_rank(s), order.get(s["mode"], 99))):
        m, precision, compiled = s["metrics"], s.get("precision", "fp32"), s.get("compile", "eager")
        if not m:
            rows.append([_model_label(s), str(s["batch"]), precision, compiled, s["mode"], _short(s["status"])]
                        + ["–"] * (len(head) - 6))
            continue
        med, p20, p80, _ = m["step_time_s"]
        best = s.get("best_opacus", {}).get("time")
        rows.append([
            _model_label(s), str(s["batch"]), precision, compiled, s["mode"],
            "ok" + (f" ({s['note']})" if s.get("note") else ""),
            f"{med * 1e3:.1f} ({p20 * 1e3:.1f}–{p80 * 1e3:.1f})", f"{m['samples_per_s'][0]:.0f}",
            _f(m["compile_s"][0], "{:.1f}") if "compile_s" in m else "–",
            f"{m['peak_mem_mb'][0]:.0f}", f"{m['step_mem_mb'][0]:.0f}", _ratio(m, "time_ratio_vs_nonprivate"),
            _ratio(m, "time_ratio_vs_eager"), _ratio(m, "mem_ratio_vs_nonprivate"), _launches(m),
            _ratio(m, "time_ratio_vs_best_opacus") + (f" [{best}]" if best else "")])
    return head, rows


def _short(status: str) -> str:
    """A "not supported: what: why" status without its why (the notes and the CSV keep it)."""
    parts = status.split(": ", 2)
    return f"{parts[0]}: {parts[1]} (see notes)" if parts[0] == "not supported" and len(parts) == 3 else status


def _precision_rank(s: dict[str, Any]) -> int:
    p = s.get("precision", "fp32")
    return PRECISIONS.index(p) if p in PRECISIONS else 99


def _compile_rank(s: dict[str, Any]) -> int:
    c = s.get("compile", "eager")
    return COMPILE_MODES.index(c) if c in COMPILE_MODES else 99


def accounting_table(acc: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    head = ["task", "provider", "median ms", "p20 ms", "p80 ms", "result"]

    def result(a: dict[str, Any]) -> str:
        for k in ("epsilon", "noise_multiplier"):
            if k in a:
                return f"{k} {_f(a[k], '{:.5g}')}"
        return str(a.get("note", ""))

    rows = [[str(a.get("task", "")), str(a.get("provider", "")), _f(a.get("median_s", math.nan) * 1e3),
             _f(a.get("p20_s", math.nan) * 1e3), _f(a.get("p80_s", math.nan) * 1e3), result(a)] for a in acc]
    return head, rows


def targets_table(suite: Suite, summary: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    head = ["model", "batch", "precision", "compile", "mode", "metric", "measured (p20–p80)", "target", "met",
            "reference"]
    rows = []
    for t in suite.targets:
        hit = [s for s in summary if s["model"] == t.model and s["batch"] == t.batch and s["mode"] == t.mode
               and s.get("precision", "fp32") == t.precision and s.get("compile", "eager") == t.compile]
        val = hit[0]["metrics"].get(t.metric) if hit and hit[0]["metrics"] else None
        met = "–" if val is None else ("yes" if val[0] <= t.max else "no")
        rows.append([t.model, str(t.batch), t.precision, t.compile, t.mode, t.metric, _ratio({t.metric: val}, t.metric) if val else
                     (hit[0]["status"] if hit else "not run"), f"≤ {t.max:g}×", met, t.note])
    return head, rows


def markdown(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def print_tables(tables: list[tuple[str, list[str], list[list[str]]]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)
    for title, head, rows in tables:
        if not rows:
            continue
        t = Table(title=title, show_lines=False)
        for h in head:
            t.add_column(h, overflow="fold")
        for r in rows:
            t.add_row(*r)
        console.print(t)


# ------------------------------------------------------------------------------------ plot


PLOT_SKIPPED = "plot skipped: matplotlib is not installed (pip install 'dpengine[plot]')"


def plot(summary: list[dict[str, Any]], path: Path, title: str = "") -> bool:
    """Three panels: throughput per mode per model (log), step-time (log) and peak-memory overhead vs
    non-private. Returns False (and draws nothing) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False

    def group(s: dict[str, Any]) -> tuple[str, int, str, str]:
        return _model_label(s), s["batch"], s.get("precision", "fp32"), s.get("compile", "eager")

    several = len({s.get("precision", "fp32") for s in summary}) > 1
    several_c = len({s.get("compile", "eager") for s in summary}) > 1
    groups = sorted({group(s) for s in summary}, key=lambda g: (g[0], g[1], _precision_rank({"precision": g[2]}),
                                                                 _compile_rank({"compile": g[3]})))
    modes = [m for m in MODE_ORDER if any(s["mode"] == m and s["metrics"] for s in summary)]
    fig, axes = plt.subplots(1, 3, figsize=(6 + 2.2 * max(len(groups), 1) * 1.5, 4.5))
    panels = [("samples_per_s", "samples / s (log)", True), ("time_ratio_vs_nonprivate", "step time × non-private (log)", True),
              ("mem_ratio_vs_nonprivate", "peak memory × non-private", False)]
    width = 0.8 / max(len(modes), 1)
    for ax, (metric, label, log) in zip(axes, panels):
        for j, mode in enumerate(modes):
            xs, ys, lo, hi = [], [], [], []
            for i, g in enumerate(groups):
                hit = [s for s in summary if group(s) == g and s["mode"] == mode and metric in s["metrics"]]
                if hit:
                    med, p20, p80, _ = hit[0]["metrics"][metric]
                    xs.append(i + (j - (len(modes) - 1) / 2) * width)
                    ys.append(med)
                    lo.append(max(med - min(p20, p80), 0))
                    hi.append(max(max(p20, p80) - med, 0))
            if xs:
                ax.bar(xs, ys, width, yerr=[lo, hi], label=mode, capsize=2,
                       color=plt.get_cmap("tab10")(MODE_ORDER.index(mode) % 10))
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{lab}\nb={b}" + (f" {p}" if several else "") + (f"\n{c}" if several_c else "")
                            for lab, b, p, c in groups], fontsize=7)
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
        if metric != "samples_per_s":
            ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------ RESULTS.md

FULL_SUITE_DOC = """\
## How to run

```
dpengine bench                      # the default suite (configs/bench/default.toml) + accounting micro-benchmark
dpengine bench --quick              # the quick suite, about 3 minutes on 2 CPU cores
dpengine bench --suite gpu          # GPU-sized models (GPT-2 small shape), CUDA only; adds the fused mode
dpengine bench --suite hf           # Hugging Face GPT2LMHeadModel built from a config
dpengine bench --accounting-only    # only the accounting micro-benchmark
dpengine bench --rounds 7 --steps 20 --threads 2 --output-dir benchmarks   # results you mean to commit
```

Every (model, mode, batch, precision, compile) configuration runs in a fresh subprocess (`python -m dpengine.bench.worker
--config JSON`), so its peak memory is its own. Rounds go round-robin over the configurations (the order
reverses every round), each round doing `warmup` untimed then at least `steps` timed steps (more until `min_time_s`
of step time) on a fixed batch.
Step time median/p20/p80 pool all timed steps of all rounds; ratios (×NP = DP / non-private of the same
model and batch; ×best Opacus = dpengine / the fastest (or, for memory, leanest) Opacus mode) are the
median/p20/p80 of the *per-round* ratios, so drift between rounds cancels. On CPU, peak memory is the
process RSS high-water mark (ru_maxrss), which includes the shared import baseline (`baseline_rss_mb`,
RSS after importing torch, dpengine and Opacus, before the model is built; identical across modes);
`peak−base` subtracts it (`step_mem_mb`, `step_mem_ratio_vs_nonprivate` in the CSV). On GPU it is
`torch.cuda.max_memory_allocated`.

Precision (`--precision`, several allowed; default fp32): `fp32` (on CUDA with TF32 off), `tf32` (TF32
matrix units on; the same as fp32 on CPU, which the row's note says), `bf16` (`torch.autocast` bf16 of the
forward and loss, float32 parameters), `fp16` (autocast fp16: the non-private row with `torch.amp.GradScaler`,
dpengine's with `make_private(..., loss_scale=2**12)`, a fixed scale, since a GradScaler is refused; Opacus
and `fused` rows say why they cannot run it). Ratios compare modes at the same precision. Launches per step come from one extra, untimed step after the timed ones: ATen
operators dispatched (a `TorchDispatchMode` counter: forward, backward and optimizer, `ops_per_step`; after
"/", those that are not views, `compute_ops_per_step`: a view or `detach` launches no kernel on a device)
and, on CUDA, kernels seen by `torch.profiler` (`kernels_per_step`); the table shows kernels where counted,
else operators, with DP / non-private (`ops_ratio_vs_nonprivate`, `compute_ops_ratio_vs_nonprivate`,
`kernels_ratio_vs_nonprivate`).

Compilation (`--compile`, several allowed; suite key `compile`, default `eager`): `eager` (not compiled),
`default` and `reduce-overhead` (`torch.compile(model, mode=..., dynamic=True)`, applied *after*
`make_private` for dpengine and Opacus modes, and to the non-private baseline alike, so ×NP divides by the
non-private row of the same model, batch, precision *and* compile setting). Compilation happens in the
warm-up steps: `compile s` (`compile_s`) is their wall time, compilation included, and the timed steps
exclude it (a recompilation during them is named in the row's note); `compiled_graphs` and `graph_breaks`
are dynamo's counts (ATen operators per step are not counted for compiled rows: inductor's kernels are
not ATen operators; CUDA kernels are); `time ×eager` (`time_ratio_vs_eager`) is a compiled row's step time over the eager
row of the same mode, model, batch and precision (per-round ratios, as ×NP). A mode that fails to compile is an error row with torch's reason. Dynamo reaching its
recompile limit (it then runs that frame eagerly, silently) is named in the note. On CPU a compiled row's peak
memory (RSS high-water mark) includes inductor's own memory while it compiled in the warm-up, so its
`peak mem ×NP` is not the training step's alone. `reduce-overhead`
(CUDA graphs) is refused on CPU; on CUDA it runs with inductor's `cudagraph_or_error`, so a graph that
cannot be captured fails the row rather than running as mode `default`.

Files: `results.jsonl` (raw: one line per worker run, appended as each finishes, so an interrupted or
killed run keeps what it measured; `dpengine bench --rebuild-report results.jsonl` reports its last run),
`results.csv` (long format, appended by every run: timestamp, commit, device, versions, suite, model,
params, mode, precision, compile, clipping, batch, metric, median, p20, p80, n, status, note), `results.json` (the
latest run, raw per-round numbers included), `results_table.md`, `bench.png` (needs matplotlib).
"""


def results_md(raw: dict[str, Any], suite: Suite, summary: list[dict[str, Any]], command: str,
               plot_name: str = "bench.png", extra: str = "") -> str:
    meta = raw["meta"]
    parts = [f"# dpengine benchmark results — suite `{suite.name}`\n",
             f"Command: `{command}`\n",
             f"- date: {meta['timestamp']}, commit `{meta['commit']}`",
             f"- machine: {meta.get('cpu_model', '?')}, {meta.get('cores', '?')} cores; device `{meta['device']}`",
             f"- torch {meta['torch']}, triton {meta['triton']}, opacus {meta['opacus']}, python {meta['python']}",
             f"- torch threads {meta['threads']}, rounds {meta['rounds']}, warm-up {meta['warmup']} + "
             f"≥{meta['steps']} timed steps (and ≥{meta.get('min_time_s', 0)} s of them) per round",
             ""]
    if suite.description:
        parts += [suite.description.strip(), ""]
    if suite.targets:
        parts += ["## Targets (ratios from the same run)\n", markdown(*targets_table(suite, summary))]
    parts += ["## Step time, throughput, memory\n", markdown(*main_table(summary))]
    if plot_name:
        parts.append(f"![plot]({plot_name})\n")
    if raw.get("accounting"):
        parts += ["## Accounting micro-benchmark\n", markdown(*accounting_table(raw["accounting"]))]
    if raw.get("notes"):
        parts += ["## Notes\n", *[f"- {n}" for n in raw["notes"]], ""]
    if extra:
        parts += [extra, ""]
    parts += [FULL_SUITE_DOC]
    return "\n".join(parts)


def load_raw(path: Path) -> dict[str, Any]:
    """The raw run back from a ``results.json`` written by :func:`write_json`, or the last run of a
    ``results.jsonl`` written while running (see :func:`dpengine.bench.runner.load_jsonl`)."""
    if path.suffix == ".jsonl":
        from dpengine.bench.runner import load_jsonl

        return load_jsonl(path)
    d = json.loads(path.read_text())

    def nan(x: Any) -> Any:
        if x is None:
            return math.nan
        if isinstance(x, dict):
            return {k: nan(v) for k, v in x.items()}
        if isinstance(x, list):
            return [nan(v) for v in x]
        return x

    return {"meta": d["meta"], "configs": nan(d["raw"]), "accounting": nan(d.get("accounting", [])),
            "notes": d.get("notes", []), "command": d.get("command", "")}


def write_all(raw: dict[str, Any], suite: Suite, out_dir: Path, command: str, echo: bool = True,
              rebuild: bool = False) -> dict[str, Path]:
    """Write CSV (append), JSON, markdown table, plot and RESULTS.md into ``out_dir``; print the tables.
    With ``rebuild`` (a run loaded back from results.json), only the table, plot and RESULTS.md."""
    from dpengine.bench.runner import summarize, to_rows

    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(raw)
    paths = {"csv": out_dir / "results.csv", "json": out_dir / "results.json", "table": out_dir / "results_table.md",
             "plot": out_dir / "bench.png", "results": out_dir / "RESULTS.md"}
    if rebuild:
        command = raw.get("command") or command
        paths.pop("csv")
        paths.pop("json")
    else:
        raw["command"] = command
        write_csv(to_rows(raw, summary), paths["csv"])
        write_json(raw, summary, paths["json"])
    tables = [("Targets", *targets_table(suite, summary))] if suite.targets else []
    if summary:
        tables.append((f"dpengine bench — {suite.name}", *main_table(summary)))
    if raw.get("accounting"):
        tables.append(("Accounting micro-benchmark", *accounting_table(raw["accounting"])))
    paths["table"].write_text("\n".join(f"### {t}\n\n{markdown(h, r)}" for t, h, r in tables))
    notes = list(raw.get("notes", []))
    meta = raw["meta"]
    title = f"dpengine bench {suite.name} — {meta['device']}, {meta['threads']} threads, commit {meta['commit']}"
    plotted = bool(summary) and plot(summary, paths["plot"], title=title)
    if summary and not plotted:
        notes.append(PLOT_SKIPPED)
        print(PLOT_SKIPPED, file=sys.stderr)
    if not plotted:
        paths.pop("plot")
    paths["results"].write_text(results_md({**raw, "notes": notes}, suite, summary, command,
                                           plot_name=paths["plot"].name if plotted else ""))
    if echo:
        print_tables(tables)
        for n in notes:
            print(f"note: {n}")
    return paths


__all__ = ["write_all", "write_csv", "plot", "markdown", "main_table", "results_md"]
