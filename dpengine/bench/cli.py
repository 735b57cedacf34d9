"""``dpengine bench``: per-sample clipping throughput and memory benchmark."""

from __future__ import annotations

import dataclasses
import shlex
import signal
import sys
import time
from pathlib import Path
from types import FrameType

import click

from dpengine.bench.worker import CLIPPING_VARIANTS, COMPILE_MODES, PRECISIONS

HELP = """Benchmark private training steps: models x modes x batch sizes, every configuration in a fresh
subprocess, round-robin over several rounds; reports median/p20/p80 step time, samples/s, peak memory
and the ratios DP / non-private and dpengine / best Opacus mode, plus an accounting micro-benchmark.

\b
Suites (configs/bench/NAME.toml, installed as dpengine.configs.bench):
  default  MLP 784-512-512-10 b256, CNN 3conv+GroupNorm 32x32 b64, GPT-like 4x256 T128 b16;
           modes nonprivate, hooks, ghost, bk, fused (CUDA: Triton kernels), opacus-hooks, opacus-ghost;
           5 rounds x (3 warm-up + >=10 timed steps, >=3 s); accounting micro-benchmark.
           About 30-50 minutes on 2 cores (use --rounds 2 --min-time 1 for ~15).
  quick    the same models, smaller (b64 / b16 / b4, T 64), 2 rounds: about 3 minutes on 2 cores.
  gpu      GPT-2 small shape (12 x 768, T 1024) and the default models at GPU batch sizes; CUDA.
  gpu_check  the lent-GPU check (benchmarks/gpu_check.sh): GPT-2 small bf16 and the default models
           at GPU batches in bf16 and tf32, 1 round, each worker killed after 100 s.
  hf       transformers GPT2LMHeadModel from a config (random weights, nothing downloaded).
  compile  GPT-like and MLP, nonprivate / hooks / bk, eager and torch.compile (CPU).
  (--suite also takes a path to a .toml file; --list lists the suites)

\b
Precision (--precision, repeatable; replaces the suite's): fp32 (TF32 off on CUDA), tf32 (= fp32 on
CPU), bf16 (torch.autocast), fp16 (autocast + GradScaler; private modes report "not supported").
Each row also counts launches per step in one extra untimed step: ATen operators dispatched, and CUDA
kernels on CUDA, with the DP / non-private ratio.

\b
Compilation (--compile, repeatable; replaces the suite's, default eager): eager, default,
reduce-overhead: torch.compile(model, mode=..., dynamic=True) after make_private, the non-private
baseline compiled alike (x NP compares like with like); compile time (the warm-up's wall time) is
reported apart as compile_s; reduce-overhead (CUDA graphs) is refused on CPU.

\b
Writes into --output-dir: results.jsonl (raw, appended as each configuration finishes, kept if the
run is interrupted or killed; --rebuild-report takes it), results.csv (long format, appended),
results.json, results_table.md, bench.png (skipped with a note without matplotlib) and RESULTS.md.

Example: dpengine bench --quick --precision fp32 --precision bf16 --output-dir /tmp/bq
"""


def default_output_dir() -> Path:
    """A fresh directory per run: bench-out/YYYYmmdd-HHMMSS (with a suffix if two runs start in one second)."""
    base = Path("bench-out") / time.strftime("%Y%m%d-%H%M%S")
    out, k = base, 1
    while out.exists():
        out, k = base.with_name(f"{base.name}-{k}"), k + 1
    return out


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@click.command("bench", help=HELP)
@click.option("--suite", "suite_name", default="default", show_default=True,
              help="Suite name (configs/bench/NAME.toml) or a path to a .toml file.")
@click.option("--quick", is_flag=True, help="Run the quick suite (same as --suite quick).")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the CSV, tables, plot and RESULTS.md go (default: a fresh bench-out/YYYYmmdd-HHMMSS, so "
                   "a run never appends to results committed in benchmarks/; pass --output-dir benchmarks to "
                   "update them deliberately).")
@click.option("--rounds", type=click.IntRange(min=1), help="Override the suite's number of rounds.")
@click.option("--steps", type=click.IntRange(min=1), help="Override the (minimum) timed steps per round.")
@click.option("--min-time", "min_time_s", type=click.FloatRange(min=0),
              help="Override the minimum timed seconds per round (more steps until reached).")
@click.option("--warmup", type=click.IntRange(min=0), help="Override the warm-up steps per round.")
@click.option("--threads", type=click.IntRange(min=1), help="Override torch threads (default from the suite: 2).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="Override the suite's device.")
@click.option("--precision", "precisions", type=click.Choice(PRECISIONS), multiple=True,
              help="Precision(s) to run (repeatable); default: the suite's (fp32 unless it says otherwise).")
@click.option("--compile", "compiles", type=click.Choice(COMPILE_MODES), multiple=True,
              help="torch.compile setting(s) to run (repeatable): eager (not compiled), default, reduce-overhead "
                   "(CUDA only); default: the suite's (eager unless it says otherwise).")
@click.option("--clipping", "clippings", type=click.Choice(CLIPPING_VARIANTS), multiple=True,
              help="Also run every dpengine backend with this clipping mode (repeatable); rows are labelled "
                   "BACKEND+MODE, e.g. bk+per_layer, next to the flat rows.")
@click.option("--accounting/--no-accounting", default=None,
              help="Include (or not) the accounting micro-benchmark; default: as the suite says.")
@click.option("--accounting-only", is_flag=True, help="Run only the accounting micro-benchmark.")
@click.option("--rebuild-report", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Rebuild the table, plot and RESULTS.md in --output-dir from a results.json, or from the "
                   "last run in a results.jsonl (also an interrupted one); nothing is run.")
@click.option("--list", "list_suites", is_flag=True, help="List the available suites and exit.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
def bench(suite_name: str, quick: bool, output_dir: Path | None, rounds: int | None, steps: int | None,
          min_time_s: float | None, warmup: int | None, threads: int | None, device: str | None,
          precisions: tuple[str, ...], compiles: tuple[str, ...], clippings: tuple[str, ...], accounting: bool | None, accounting_only: bool, rebuild_report: Path | None,
          list_suites: bool, progress: bool) -> None:
    from dpengine.bench.report import write_all
    from dpengine.bench.runner import run_suite
    from dpengine.bench.suite import SuiteError, available_suites, load_suite

    if output_dir is None:
        output_dir = default_output_dir()
    if list_suites:
        for name in available_suites():
            s = load_suite(name)
            click.echo(f"{name}: {len(s.configs())} configurations x {s.rounds} rounds"
                       f"{' + accounting' if s.accounting else ''}")
        return
    try:
        suite = load_suite("quick" if quick else suite_name)
        suite = suite.with_overrides(rounds=rounds, steps=steps, min_time_s=min_time_s, warmup=warmup, threads=threads,
                                     device=device, precisions=precisions or None,
                                     compiles=compiles or None).with_clippings(clippings)
    except SuiteError as e:
        raise click.UsageError(str(e)) from None
    if suite.device == "cuda" and rebuild_report is None and not accounting_only:
        import torch

        if not torch.cuda.is_available():  # every row would be "skipped" and the run would still exit 0
            raise click.ClickException("--device cuda (or a CUDA suite) but torch sees no CUDA device here; run it "
                                       "on a GPU machine (benchmarks/gpu_check.sh), or use --device cpu.")
    command = "dpengine bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 1 else "dpengine bench"
    t0 = time.perf_counter()
    if rebuild_report is not None:
        from dpengine.bench.report import load_raw

        raw = load_raw(rebuild_report)
        if "suite" in raw["meta"] and not quick and suite_name == "default":
            try:
                suite = load_suite(raw["meta"]["suite"])
            except SuiteError:  # a suite from a file that is gone: its name, none of the default's targets
                suite = dataclasses.replace(suite, name=raw["meta"]["suite"], targets=(), description="")
        paths = write_all(raw, suite, output_dir, command, rebuild=True)
        click.echo("rebuilt " + ", ".join(str(p) for p in paths.values()))
        return
    if accounting_only:
        from dpengine.bench.runner import run_accounting_only

        suite = dataclasses.replace(suite, targets=())
        raw = run_accounting_only(suite)
    else:
        jsonl = output_dir / "results.jsonl"
        signal.signal(signal.SIGTERM, _interrupt)  # `timeout`, `kill`: stop like Ctrl-C and report what finished
        raw = run_suite(suite, progress=progress, accounting=accounting, log=lambda m: click.echo(m, err=True),
                        jsonl=jsonl)
        click.echo(f"raw results appended to {jsonl}", err=True)
    paths = write_all(raw, suite, output_dir, command)
    click.echo(f"done in {time.perf_counter() - t0:.0f} s; wrote " + ", ".join(str(p) for p in paths.values()))
    if any(n.startswith("interrupted") for n in raw["notes"]):
        sys.exit(130)
