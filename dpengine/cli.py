"""The ``dpengine`` command line: ``budget``, ``train``, ``bench`` and ``audit``.

Subcommands are imported lazily so that ``dpengine budget`` never pays for importing torch.
"""

from __future__ import annotations

import importlib

import click

# name -> "module:attribute" of a click.Command
_SUBCOMMANDS = {
    "budget": ("dpengine.accounting.budget", "budget", "Privacy budget calculator (RDP/PLD accounting)."),
    "train": ("dpengine.train", "train", "Config-driven private training (the main job)."),
    "bench": ("dpengine.bench.cli", "bench", "Per-sample clipping throughput and memory benchmark."),
    "audit": ("dpengine.audit", "audit", "Empirical privacy audit: an epsilon lower bound from canaries."),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_SUBCOMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in _SUBCOMMANDS:
            return None
        module, attr, _ = _SUBCOMMANDS[cmd_name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_) for name, (_, _, help_) in sorted(_SUBCOMMANDS.items())]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dpengine")
def main() -> None:
    """dpengine: differentially private training for PyTorch."""


if __name__ == "__main__":  # pragma: no cover
    main()
