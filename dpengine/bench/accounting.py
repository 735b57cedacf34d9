"""Accounting micro-benchmark: dpengine's RDP accountant against Opacus and dp-accounting.

Times (median over ``repeats``, ``time.perf_counter``) epsilon for 1e6 steps (sigma=1.1,
q=256/60000, delta=1e-5) and noise calibration (target eps=3, delta=1e-5, q=0.004, 2500 steps).
dpengine caches the RDP curve per (sigma, q); the cache is cleared before every repeat so the
timings are cold. Providers that cannot be imported are reported with a note instead of timings.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

EPS_SETTING = {"noise_multiplier": 1.1, "sample_rate": 256 / 60000, "steps": 1_000_000, "delta": 1e-5}
CAL_SETTING = {"target_epsilon": 3.0, "delta": 1e-5, "sample_rate": 0.004, "steps": 2500}


def _time(fn: Callable[[], float], repeats: int, setup: Callable[[], None] | None = None) -> tuple[list[float], float]:
    times, value = [], float("nan")
    for _ in range(repeats):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t0)
    return times, value


def _row(task: str, provider: str, key: str, times: list[float], value: float) -> dict[str, Any]:
    qs = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else [times[0]] * 4
    return {"task": task, "provider": provider, "median_s": statistics.median(times), "p20_s": qs[0], "p80_s": qs[3], key: value}


def _dpengine(repeats: int) -> list[dict[str, Any]]:
    from dpengine.accounting import RDPAccountant, get_noise_multiplier  # noqa: PLC0415
    from dpengine.accounting.rdp import _default_grid_rdp  # noqa: PLC0415

    s = EPS_SETTING

    def eps() -> float:
        acc = RDPAccountant()
        acc.step(noise_multiplier=s["noise_multiplier"], sample_rate=s["sample_rate"], num_steps=s["steps"])
        return acc.get_epsilon(s["delta"])

    def cal() -> float:
        c = CAL_SETTING
        return get_noise_multiplier(c["target_epsilon"], c["delta"], c["sample_rate"], steps=c["steps"])

    clear = _default_grid_rdp.cache_clear
    return [
        _row("epsilon_1e6_steps", "dpengine-rdp", "epsilon", *_time(eps, repeats, clear)),
        _row("noise_calibration", "dpengine-rdp", "noise_multiplier", *_time(cal, repeats, clear)),
    ]


def _opacus(repeats: int) -> list[dict[str, Any]]:
    from opacus.accountants import RDPAccountant  # noqa: PLC0415
    from opacus.accountants.utils import get_noise_multiplier  # noqa: PLC0415

    s = EPS_SETTING

    def eps() -> float:
        acc = RDPAccountant()
        acc.history = [(s["noise_multiplier"], s["sample_rate"], s["steps"])]
        return float(acc.get_epsilon(s["delta"]))

    def cal() -> float:
        c = CAL_SETTING
        return float(get_noise_multiplier(target_epsilon=c["target_epsilon"], target_delta=c["delta"],
                                          sample_rate=c["sample_rate"], steps=c["steps"], accountant="rdp"))

    return [
        _row("epsilon_1e6_steps", "opacus-rdp", "epsilon", *_time(eps, repeats)),
        _row("noise_calibration", "opacus-rdp", "noise_multiplier", *_time(cal, repeats)),
    ]


def _dp_accounting(repeats: int) -> list[dict[str, Any]]:
    import dp_accounting  # noqa: PLC0415
    from dp_accounting.rdp import rdp_privacy_accountant  # noqa: PLC0415

    s = EPS_SETTING

    def eps_for(sigma: float, q: float, steps: int, delta: float) -> float:
        acc = rdp_privacy_accountant.RdpAccountant()
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
        return float(acc.get_epsilon(delta))

    def eps() -> float:
        return eps_for(s["noise_multiplier"], s["sample_rate"], s["steps"], s["delta"])

    def cal() -> float:
        c = CAL_SETTING
        # dp-accounting has no calibration helper: its generic bisection over sigma (tolerance 1e-3 in eps).
        lo, hi = 0.1, 100.0
        while hi - lo > 1e-5 * hi:
            mid = 0.5 * (lo + hi)
            if eps_for(mid, c["sample_rate"], c["steps"], c["delta"]) > c["target_epsilon"]:
                lo = mid
            else:
                hi = mid
        return hi

    return [
        _row("epsilon_1e6_steps", "dp-accounting-rdp", "epsilon", *_time(eps, repeats)),
        _row("noise_calibration", "dp-accounting-rdp (bisection)", "noise_multiplier", *_time(cal, repeats)),
    ]


def run_accounting_benchmark(repeats: int = 7) -> list[dict]:
    """Times epsilon for 1e6 steps and noise calibration for each available provider.

    Args:
        repeats: Number of timed repetitions (the median and 20/80 percentiles are reported).

    Returns:
        Rows ``{"task", "provider", "median_s", "p20_s", "p80_s", "epsilon" | "noise_multiplier"}``;
        an unavailable provider gives one row ``{"task": "*", "provider", "note"}``.
    """
    rows: list[dict] = []
    for name, fn in (("dpengine-rdp", _dpengine), ("opacus-rdp", _opacus), ("dp-accounting-rdp", _dp_accounting)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rows.extend(fn(repeats))
        except ImportError as err:
            rows.append({"task": "*", "provider": name, "note": f"skipped: {err}"})
    return rows


def _main() -> None:
    rows = run_accounting_benchmark()
    try:
        from rich.console import Console  # noqa: PLC0415
        from rich.table import Table  # noqa: PLC0415
    except ImportError:  # pragma: no cover
        for r in rows:
            print(r)
        return
    table = Table(title="Accounting micro-benchmark (median of 7)")
    for col in ("task", "provider", "median ms", "p20 ms", "p80 ms", "result"):
        table.add_column(col)
    for r in rows:
        if "note" in r:
            table.add_row(r["task"], r["provider"], "-", "-", "-", r["note"])
            continue
        value = r.get("epsilon", r.get("noise_multiplier"))
        table.add_row(r["task"], r["provider"], f"{1e3 * r['median_s']:.2f}", f"{1e3 * r['p20_s']:.2f}",
                      f"{1e3 * r['p80_s']:.2f}", f"{value:.6g}")
    Console().print(table)


if __name__ == "__main__":
    _main()
