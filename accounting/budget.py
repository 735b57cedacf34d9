"""``dpengine budget``: a privacy budget calculator.

Give all but one of epsilon, noise multiplier, steps/epochs and sample rate/batch size; the one
left out is solved for (conservatively). Comma lists sweep over values and print a table.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import click

from .accountants import ACCOUNTANTS, create_accountant
from .calibration import epochs_to_steps, get_epsilon, get_max_steps, get_noise_multiplier, get_sample_rate
from .rdp import compute_epsilon

__all__ = ["budget", "load_accountant_state", "steps_left"]

ASSUMPTIONS = (
    "Assumptions: Poisson sampling with the given sample rate, add/remove-one adjacency, "
    "Gaussian noise with std sigma*C (C = clipping norm)."
)
EPOCHS_RULE = "steps = ceil(epochs / sample_rate)"
LOADER_RULE = (
    "With --dataset-size N and --batch-size B, q = 1 / ceil(N / B) and one epoch is ceil(N / B) steps, "
    "as make_private defines them for a DataLoader(batch_size=B) over N records (Poisson batches of "
    "expected size N / ceil(N / B) <= B)."
)


def loader_sample_rate(n_data: int, batch: int) -> float:
    """The sample rate ``make_private`` uses for a ``DataLoader(batch_size=batch)`` over ``n_data`` records:
    one over the number of batches per epoch (as Opacus)."""
    if batch <= 0:
        raise ValueError(f"Expected batch_size={batch} > 0.")
    return 1.0 / math.ceil(n_data / batch)


def _floats(text: str | None, name: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"Expected a number or comma list, got {name}={text!r}.") from None


def _ints(text: str | None, name: str) -> list[int] | None:
    vals = _floats(text, name)
    if vals is None:
        return None
    if any(not v.is_integer() or v < 0 for v in vals):
        raise click.BadParameter(f"Expected non-negative integers, got {name}={text!r}.")
    return [int(v) for v in vals]


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("dpengine", "numpy", "scipy", "dp-accounting"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def load_accountant_state(path: str | Path) -> dict[str, Any]:
    """Reads an accountant ``state_dict`` from a JSON file or a torch checkpoint.

    Args:
        path: A JSON file holding a state dict (or a dict with key ``"accountant"`` holding one),
            or a ``torch.save`` file of a dict with key ``"accountant"``.

    Returns:
        The accountant state dict.

    Raises:
        ValueError: If no accountant state is found in the file.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        import torch  # noqa: PLC0415 - only for torch checkpoints

        try:
            with warnings.catch_warnings():  # torch's unpickler warns about foreign files before failing
                warnings.simplefilter("ignore", UserWarning)
                data = torch.load(path, weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file is reported in one line
            raise ValueError(f"path={str(path)!r} is neither a JSON accountant state nor a torch checkpoint "
                             f"({type(err).__name__}); give the file written by PrivacyEngine.save_checkpoint "
                             "or a JSON accountant state_dict.") from None
    if isinstance(data, dict) and "history" not in data and isinstance(data.get("accountant"), dict):
        data = data["accountant"]
    if not isinstance(data, dict) or "history" not in data:
        raise ValueError(f"Expected an accountant state (with 'history') in path={str(path)!r}.")
    return data


def steps_left(
    state: dict[str, Any], target_epsilon: float, delta: float, noise_multiplier: float, sample_rate: float,
    accountant: str | None = None,
) -> int:
    """Largest number of further steps keeping the accountant's epsilon <= target (0 if none).

    Args:
        state: Accountant state dict.
        target_epsilon: Target epsilon.
        delta: Target delta.
        noise_multiplier: Noise multiplier of the future steps.
        sample_rate: Sample rate of the future steps.
        accountant: Accountant name (default: the one in the state).

    Returns:
        Number of steps left.
    """
    name = accountant or state.get("accountant", "rdp")

    def eps_after(t: int) -> float:
        acc = create_accountant(name)
        acc.load_state_dict(state)
        acc.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate, num_steps=t)
        return acc.get_epsilon(delta)

    if eps_after(0) > target_epsilon or eps_after(1) > target_epsilon:
        return 0
    lo, hi = 1, 2
    while eps_after(hi) <= target_epsilon:
        lo, hi = hi, 2 * hi
        if hi > 10**12:
            return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if eps_after(mid) <= target_epsilon else (lo, mid)
    return lo


def _fail(message: str) -> None:
    click.echo(f"Error: {message}", err=True)
    sys.exit(2)


def _solve_one(
    *, epsilon: float | None, sigma: float | None, q: float | None, batch: int | None, n_data: int | None,
    steps: int | None, epochs: float | None, delta: float, accountant: str,
) -> dict[str, Any]:
    """Solves for the one missing quantity; returns a row of all values."""
    if q is None and batch is not None:
        q = loader_sample_rate(n_data, batch)  # type: ignore[arg-type]
    if steps is None and epochs is not None and q is not None:
        steps = epochs_to_steps(epochs, q)
    row: dict[str, Any] = {"solved_for": None, "best_order": None}
    if epsilon is None:
        if sigma is None or q is None or steps is None:
            raise ValueError("Give the noise multiplier, the sample rate (or batch size) and steps (or epochs) to compute epsilon.")
        acc = create_accountant(accountant)
        acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
        epsilon, order = acc.get_privacy_spent(delta)
        row.update(solved_for="epsilon", best_order=order)
        # for comparison only: the classic RDP conversion (Mironov 2017), looser than the one reported
        if accountant == "rdp":
            row["epsilon_classic"] = compute_epsilon([(sigma, q, steps)], delta, conversion="classic")[0]
    elif sigma is None:
        if q is None or steps is None:
            raise ValueError("Give the sample rate (or batch size) and steps (or epochs) to solve for the noise multiplier.")
        sigma = get_noise_multiplier(epsilon, delta, q, steps=steps, accountant=accountant)
        row["solved_for"] = "noise_multiplier"
    elif steps is None and epochs is None:
        if q is None:
            raise ValueError("Give the sample rate (or batch size) to solve for steps.")
        steps = get_max_steps(epsilon, delta, q, sigma, accountant=accountant)
        row["solved_for"] = "steps"
    elif q is None:
        q = get_sample_rate(epsilon, delta, sigma, steps=None if epochs is not None else steps, epochs=epochs, accountant=accountant)
        if n_data is not None:
            # the largest loader batch size whose q = 1 / ceil(N / B) (and, with epochs, its step count) fits
            batch = int(math.floor(q * n_data))
            while batch >= 1:
                q_b = loader_sample_rate(n_data, batch)
                steps_b = epochs_to_steps(epochs, q_b) if epochs is not None else steps
                if get_epsilon(sigma, q_b, steps_b, delta, accountant=accountant) <= epsilon:
                    break
                batch -= 1
            if batch < 1:
                raise ValueError(f"The solved sample_rate={q:.3g} gives a batch size below 1 for dataset_size={n_data}.")
            q = loader_sample_rate(n_data, batch)
        if epochs is not None:
            steps = epochs_to_steps(epochs, q)
        row["solved_for"] = "batch_size" if n_data is not None else "sample_rate"
    else:
        raise ValueError("Leave exactly one of --epsilon, --noise-multiplier, --steps/--epochs, --sample-rate/--batch-size out.")
    if row["solved_for"] != "epsilon":
        acc = create_accountant(accountant)
        acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
        eps_check, order = acc.get_privacy_spent(delta)
        row.update(epsilon_achieved=eps_check, best_order=order)
    row.update(
        epsilon=epsilon, noise_multiplier=sigma, sample_rate=q, steps=steps,
        epochs=None if q is None or steps is None else steps * q, batch_size=batch if n_data is not None else None,
    )
    return row


@click.command(name="budget", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--epsilon", "epsilon", type=float, default=None, help="Target epsilon (omit to compute it).")
@click.option("--delta", type=float, default=None, help="Target delta (default 1/(10 N) with --dataset-size).")
@click.option("--noise-multiplier", "noise", default=None, help="Noise multiplier sigma, or a comma list.")
@click.option("--sample-rate", "sample_rate", default=None, help="Poisson sample rate q, or a comma list.")
@click.option("--dataset-size", "dataset_size", type=int, default=None, help="Dataset size N (with --batch-size).")
@click.option("--batch-size", "batch_size", default=None, help="Expected batch size (q = batch / N), or a comma list.")
@click.option("--steps", default=None, help="Number of steps, or a comma list.")
@click.option("--epochs", default=None, help=f"Number of epochs ({EPOCHS_RULE}), or a comma list.")
@click.option("--accountant", type=click.Choice(sorted(ACCOUNTANTS)), default="rdp", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Save a plot of epsilon against epochs.")
@click.option("--from-checkpoint", "checkpoint", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Accountant state (JSON state_dict or torch checkpoint with key 'accountant').")
def budget(
    epsilon: float | None, delta: float | None, noise: str | None, sample_rate: str | None, dataset_size: int | None,
    batch_size: str | None, steps: str | None, epochs: str | None, accountant: str, as_json: bool,
    plot: str | None, checkpoint: str | None,
) -> None:
    """Privacy budget calculator: solves for whichever of epsilon, noise multiplier,
    steps/epochs or sample rate/batch size is left out.

    Example: dpengine budget --sample-rate 0.01 --noise-multiplier 1.0 --steps 1000 --delta 1e-5
    """
    sigmas, qs, batches = _floats(noise, "noise_multiplier"), _floats(sample_rate, "sample_rate"), _ints(batch_size, "batch_size")
    steps_l, epochs_l = _ints(steps, "steps"), _floats(epochs, "epochs")
    notes: list[str] = []
    if qs is not None and batches is not None:
        _fail("Give either --sample-rate or --dataset-size with --batch-size, not both.")
    if batches is not None and dataset_size is None:
        _fail("--batch-size needs --dataset-size.")
    if dataset_size is not None and dataset_size <= 0:
        _fail(f"Expected dataset_size={dataset_size} > 0.")
    if steps_l is not None and epochs_l is not None:
        _fail("Give either --steps or --epochs, not both.")
    if delta is None:
        if dataset_size is None:
            _fail("--delta is required unless --dataset-size is given (then delta = 1/(10 N)).")
        delta = 1.0 / (10 * dataset_size)
        notes.append(f"delta defaults to 1/(10 N) = {delta:.3g}.")
    if not 0 < delta < 1:
        _fail(f"Expected delta={delta} in (0, 1).")
    if dataset_size is not None and delta >= 1.0 / dataset_size:
        notes.append(f"Warning: delta={delta:.3g} >= 1/N = {1 / dataset_size:.3g}; this permits leaking a whole record.")
    if epochs_l is not None:
        notes.append(f"Epochs to steps: {EPOCHS_RULE}.")
    if dataset_size is not None and (batches is not None or (qs is None and epsilon is not None)):
        notes.append(LOADER_RULE)
    notes.append(ASSUMPTIONS)

    try:
        if checkpoint is not None:
            _report_checkpoint(checkpoint, epsilon, delta, sigmas, qs, batches, dataset_size, accountant, as_json, notes)
            return
        combos = list(itertools.product(
            sigmas or [None], qs or [None], batches or [None], steps_l or [None], epochs_l or [None]
        ))
        rows = []
        for sigma, q, batch, n_steps, n_epochs in combos:
            row = _solve_one(epsilon=epsilon, sigma=sigma, q=q, batch=batch, n_data=dataset_size, steps=n_steps,
                             epochs=n_epochs, delta=delta, accountant=accountant)
            row["epochs_requested"] = n_epochs
            rows.append(row)
    except (ValueError, ImportError) as err:
        _fail(str(err))
        return

    inputs = {"epsilon": epsilon, "delta": delta, "noise_multiplier": noise, "sample_rate": sample_rate,
              "dataset_size": dataset_size, "batch_size": batch_size, "steps": steps, "epochs": epochs,
              "accountant": accountant}
    if as_json:
        payload: dict[str, Any] = {"inputs": inputs, "delta": delta, "accountant": accountant, "assumptions": ASSUMPTIONS, "notes": notes,
                                   "epochs_rule": EPOCHS_RULE, "versions": _versions()}
        if len(rows) == 1:
            payload.update(rows[0])
        else:
            payload["rows"] = rows
        click.echo(json.dumps(payload, default=float))
    else:
        _print_rows(rows, accountant, delta, notes)
    if plot is not None:
        _plot(rows, plot, delta, accountant)


def _print_rows(rows: list[dict[str, Any]], accountant: str, delta: float, notes: list[str]) -> None:
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    # piped output is not wrapped at 80 columns (a terminal still gets rich's layout)
    console = Console(highlight=False, soft_wrap=not sys.stdout.isatty())
    if len(rows) == 1:
        r = rows[0]
        solved = r["solved_for"]
        lines = {
            "epsilon": f"epsilon = {r['epsilon']:.6g} (delta = {delta:.3g}{_order_txt(r['best_order'])})"
                       + (f"\n  classic RDP conversion, for comparison: epsilon = {r['epsilon_classic']:.6g}"
                          if "epsilon_classic" in r else ""),
            "noise_multiplier": f"noise multiplier needed = {r['noise_multiplier']:.6g}",
            "steps": f"max steps = {r['steps']} (= {r['epochs']:.4g} epochs)",
            "sample_rate": f"max sample rate = {r['sample_rate']:.6g}",
            "batch_size": f"max batch size = {r['batch_size']} (sample rate {r['sample_rate']:.6g})",
        }
        console.print(lines[solved])
        if solved != "epsilon":
            console.print(f"  achieves epsilon = {r['epsilon_achieved']:.6g} <= target {r['epsilon']:.6g} "
                          f"(delta = {delta:.3g}{_order_txt(r['best_order'])})")
        console.print(f"  noise multiplier = {r['noise_multiplier']:.6g}, sample rate = {r['sample_rate']:.6g}, "
                      f"steps = {r['steps']}, accountant = {accountant}")
    else:
        table = Table(title=f"Privacy budget ({accountant}, delta = {delta:.3g})")
        with_order = accountant == "rdp"
        for col in ("noise multiplier", "sample rate", "batch size", "steps", "epochs", "epsilon") + \
                (("best order",) if with_order else ()):
            table.add_column(col, justify="right")
        for r in rows:
            table.add_row(
                f"{r['noise_multiplier']:.6g}", f"{r['sample_rate']:.6g}", str(r["batch_size"] or "-"), str(r["steps"]),
                f"{r['epochs']:.4g}", f"{r.get('epsilon_achieved', r['epsilon']):.6g}",
                *((_fmt_order(r["best_order"]),) if with_order else ()),
            )
        console.print(table)
    for note in notes:
        console.print(note)


def _fmt_order(order: float | None) -> str:
    return "-" if order is None else f"{order:.4g}"


def _order_txt(order: float | None) -> str:
    """", best order = a" for RDP; nothing for accountants without orders (PLD, PRV)."""
    return "" if order is None else f", best order = {order:.4g}"


def _curve(sigma: float, q: float, steps: int, delta: float, accountant: str, points: int) -> tuple[list[int], list[float]]:
    """Epsilon after t steps for t up to ``steps`` (a few dozen points, each accounted exactly)."""
    ts = sorted({max(1, round(steps * k / points)) for k in range(1, points + 1)}) if steps > 0 else [0]
    return ts, [get_epsilon(sigma, q, t, delta, accountant=accountant) for t in ts]


def _plot(rows: list[dict[str, Any]], path: str, delta: float, accountant: str) -> None:
    """epsilon against steps, one curve per (noise multiplier, sample rate, steps) row, up to its step count."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        _fail("--plot needs matplotlib: pip install 'dpengine[plot]'")
        return
    points = 40 if accountant == "rdp" else 12  # PLD/PRV compositions cost ~0.1-0.5 s each
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ts, eps = _curve(r["noise_multiplier"], r["sample_rate"], int(r["steps"]), delta, accountant, points)
        ax.plot(ts, eps, label=f"sigma = {r['noise_multiplier']:.4g}, q = {r['sample_rate']:.4g}")
        ax.plot(ts[-1:], eps[-1:], marker="o", color=ax.lines[-1].get_color())
    ax.set_xlabel("steps")
    ax.set_ylabel(f"epsilon (delta = {delta:.3g}, {accountant})")
    if len(rows) <= 10:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    click.echo(f"Saved plot to {path}")


def _report_checkpoint(
    path: str, epsilon: float | None, delta: float, sigmas: list[float] | None, qs: list[float] | None,
    batches: list[int] | None, n_data: int | None, accountant: str, as_json: bool, notes: list[str],
) -> None:
    state = load_accountant_state(path)
    name = state.get("accountant", accountant)
    acc = create_accountant(name)
    acc.load_state_dict(state)
    spent, order = acc.get_privacy_spent(delta)
    out: dict[str, Any] = {"checkpoint": str(path), "accountant": name, "delta": delta, "epsilon_spent": spent,
                           "best_order": order, "steps_taken": acc.total_steps, "history": state["history"]}
    if epsilon is not None:
        last = acc.history[-1] if acc.history else (None, None, 0)
        sigma = sigmas[0] if sigmas else last[0]
        q = qs[0] if qs else (batches[0] / n_data if batches and n_data else last[1])
        if sigma is None or q is None:
            raise ValueError("The checkpoint is empty: give --noise-multiplier and --sample-rate for the future steps.")
        out.update(target_epsilon=epsilon, noise_multiplier=sigma, sample_rate=q,
                   steps_left=steps_left(state, epsilon, delta, sigma, q, name))
    if as_json:
        click.echo(json.dumps({**out, "assumptions": ASSUMPTIONS, "notes": notes, "versions": _versions()}, default=float))
        return
    click.echo(f"epsilon spent = {spent:.6g} after {acc.total_steps} steps (delta = {delta:.3g}"
               f"{_order_txt(order)}, accountant = {name})")
    if epsilon is not None:
        click.echo(f"steps left within epsilon = {epsilon:g}: {out['steps_left']} "
                   f"(noise multiplier {out['noise_multiplier']:.6g}, sample rate {out['sample_rate']:.6g})")
    for note in notes:
        click.echo(note)
