"""The package installs as a regular wheel with the user's layout mapped into ``dpengine.*``."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_contains_mapped_packages_and_configs(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True)
    (wheel,) = tmp_path.glob("dpengine-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ["dpengine/engine.py", "dpengine/grad_sample/controller.py", "dpengine/accounting/rdp.py",
                     "dpengine/kernels/__init__.py", "dpengine/configs/default.toml", "dpengine/bench/cli.py"]:
        assert required in names, required
    assert not any(n.startswith(("accounting/", "kernels/", "configs/")) for n in names)
    assert any(n.startswith("dpengine/configs/bench/") and n.endswith(".toml") for n in names)


def test_console_script_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "dpengine.cli", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("budget", "train", "bench"):
        assert cmd in out.stdout
