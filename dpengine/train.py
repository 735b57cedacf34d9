"""``dpengine train``: config-driven private training (the main job)."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from typing import Any

import click
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from .config import CLIPPING_MODES, TrainConfig, load_config


def load_dataset(cfg: TrainConfig) -> tuple[TensorDataset, TensorDataset, int, int]:
    """Train/test split, standardized with statistics of the training split only."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=cfg.data.test_fraction, random_state=cfg.data.seed,
                                              stratify=y)
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-6
    to_t = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    return (TensorDataset(to_t(x_tr), torch.tensor(y_tr)), TensorDataset(to_t(x_te), torch.tensor(y_te)),
            x.shape[1], int(y.max()) + 1)


def build_model(cfg: TrainConfig, d_in: int, classes: int) -> nn.Module:
    if cfg.model.kind == "lipschitz_mlp":
        from .lipschitz import GroupSort, InputNormClip, SpectralLinear

        lip: list[nn.Module] = [InputNormClip(cfg.model.input_norm)]
        for h in cfg.model.hidden:
            lip += [SpectralLinear(d_in, h), GroupSort(2)]
            d_in = h
        return nn.Sequential(*lip, SpectralLinear(d_in, classes))
    act = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}[cfg.model.activation]
    layers: list[nn.Module] = []
    for h in cfg.model.hidden:
        layers += [nn.Linear(d_in, h), act()]
        d_in = h
    layers.append(nn.Linear(d_in, classes))
    return nn.Sequential(*layers)


def _optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    t = cfg.training
    if t.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=t.lr)
    return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum)


@torch.no_grad()
def accuracy(model: nn.Module, ds: TensorDataset) -> float:
    model.eval()
    x, y = ds.tensors
    acc = float((model(x).argmax(1) == y).float().mean())
    model.train()
    return acc


@dataclass
class RunResult:
    private: bool
    test_accuracy: float
    epsilon: float | None
    delta: float | None
    noise_multiplier: float | None
    steps: int
    seconds: float


def run(cfg: TrainConfig, private: bool = True, progress: bool = True) -> RunResult:
    """Train once (privately or not) and evaluate on the held-out split."""
    from .engine import PrivacyEngine

    torch.manual_seed(cfg.training.seed)
    train_ds, test_ds, d_in, classes = load_dataset(cfg)
    model = build_model(cfg, d_in, classes)
    optimizer = _optimizer(cfg, model)
    loader = DataLoader(train_ds, batch_size=cfg.training.batch_size, shuffle=True)
    engine = None
    p = cfg.privacy
    if cfg.model.kind == "lipschitz_mlp":
        from .lipschitz import TemperatureCrossEntropy

        loss_fn: nn.Module = TemperatureCrossEntropy(cfg.model.temperature)
    else:
        loss_fn = nn.CrossEntropyLoss()
    if private:
        engine = PrivacyEngine(accountant=p.accountant, secure_mode=p.secure_mode,
                               seed=None if p.secure_mode else cfg.training.seed)
        options = dict(p.clipping_options)
        if p.clipping == "lipschitz":  # no threshold: the loss's Lipschitz constant bounds every gradient
            options["loss_lipschitz"] = loss_fn.lipschitz
        else:
            options["max_grad_norm"] = p.max_grad_norm
        common = dict(module=model, optimizer=optimizer, data_loader=loader, clipping=p.clipping,
                      grad_sample_mode=p.grad_sample_mode, **options)
        if p.target_epsilon is not None:
            model, optimizer, loader = engine.make_private_with_epsilon(
                **common, target_epsilon=p.target_epsilon, target_delta=p.delta, epochs=cfg.training.epochs)
        else:
            model, optimizer, loader = engine.make_private(**common, noise_multiplier=p.noise_multiplier)
    start, steps = time.perf_counter(), 0
    bar = tqdm(range(cfg.training.epochs), desc="private" if private else "non-private", disable=not progress,
               unit="epoch")
    for _ in bar:
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
            steps += 1
        if engine is not None:
            bar.set_postfix(eps=f"{engine.get_epsilon(p.delta):.3f}")
    seconds = time.perf_counter() - start
    return RunResult(
        private=private, test_accuracy=accuracy(model, test_ds),
        epsilon=engine.get_epsilon(p.delta) if engine else None, delta=p.delta if engine else None,
        noise_multiplier=optimizer.noise_multiplier if engine else None, steps=steps, seconds=seconds)


def default_clipping_options(mode: str, batch_size: int) -> dict[str, Any]:
    """Options a mode needs when the config does not give them (adaptive's count noise: E[B] / 20, as
    Andrew et al. suggest)."""
    return {"unclipped_num_std": batch_size / 20} if mode == "adaptive" else {}


@click.command("train")
@click.argument("config", required=False, type=click.Path(exists=True, dir_okay=False))
@click.option("--compare-nonprivate", is_flag=True, help="Also train the same model without privacy.")
@click.option("--clipping", type=click.Choice(CLIPPING_MODES), default=None,
              help="Override the config's clipping mode (the mode's options come from the config's "
                   "[privacy.clipping_options] when it names the same mode, else the mode's defaults).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def train(config: str | None, compare_nonprivate: bool, clipping: str | None, as_json: bool,
          no_progress: bool) -> None:
    """Train privately as CONFIG says (default: the packaged configs/default.toml) and report
    test accuracy and epsilon at the config's delta."""
    try:
        cfg = load_config(config)
    except (ValueError, TypeError, OSError) as e:  # tomllib.TOMLDecodeError is a ValueError
        raise click.ClickException(f"{config or 'the packaged default config'}: {e}") from None
    if clipping is not None and clipping != cfg.privacy.clipping:
        options = default_clipping_options(clipping, cfg.training.batch_size)
        kind = "lipschitz_mlp" if clipping == "lipschitz" else ("mlp" if cfg.model.kind == "lipschitz_mlp"
                                                                 else cfg.model.kind)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, kind=kind),
                                  privacy=dataclasses.replace(cfg.privacy, clipping=clipping,
                                                              clipping_options=options))
    torch.set_num_threads(min(2, torch.get_num_threads()))
    results = [run(cfg, private=True, progress=not no_progress)]
    if compare_nonprivate:
        results.append(run(cfg, private=False, progress=not no_progress))
    if as_json:
        out: dict[str, Any] = {"config": dataclasses.asdict(cfg), "runs": [dataclasses.asdict(r) for r in results]}
        click.echo(json.dumps(out))
        return
    priv = results[0]
    click.echo(f"private:     test accuracy {priv.test_accuracy:.2%}   epsilon {priv.epsilon:.3f} at delta "
               f"{priv.delta:g}   (noise multiplier {priv.noise_multiplier:.3f}, {priv.steps} steps, "
               f"{priv.seconds:.1f} s)")
    if compare_nonprivate:
        non = results[1]
        click.echo(f"non-private: test accuracy {non.test_accuracy:.2%}   ({non.steps} steps, {non.seconds:.1f} s)")
        click.echo(f"gap:         {100 * (non.test_accuracy - priv.test_accuracy):.1f} points")
    click.echo("Guarantee: (epsilon, delta)-DP for add/remove-one adjacency under Poisson sampling, "
               f"{cfg.privacy.accountant.upper()} accounting.")
