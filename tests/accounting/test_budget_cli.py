"""The ``dpengine budget`` command (click CliRunner plus one real subprocess)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from dpengine.accounting import RDPAccountant, get_epsilon
from dpengine.accounting.budget import budget


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(budget, list(args))
    return result.exit_code, result.output


def test_epsilon_mode() -> None:
    code, out = run("--sample-rate", "0.01", "--noise-multiplier", "1.0", "--steps", "1000", "--delta", "1e-5")
    assert code == 0, out
    assert "epsilon = 2.10132" in out and "best order" in out and "Poisson sampling" in out
    assert "classic RDP conversion" in out


def test_json_output() -> None:
    code, out = run("--sample-rate", "0.01", "--noise-multiplier", "1.0", "--steps", "1000", "--delta", "1e-5", "--json")
    assert code == 0, out
    data = json.loads(out)
    assert data["epsilon"] == pytest.approx(2.10132, abs=1e-5)
    assert data["noise_multiplier"] == 1.0 and data["steps"] == 1000 and data["best_order"] > 1
    assert "dpengine" in data["versions"] and "Poisson" in data["assumptions"]
    # the classic conversion is reported for comparison and is never tighter than Balle et al.'s
    assert data["epsilon_classic"] > data["epsilon"]


def test_solve_noise_multiplier() -> None:
    code, out = run("--epsilon", "3", "--sample-rate", "0.004", "--steps", "2500", "--delta", "1e-5", "--json")
    data = json.loads(out)
    assert code == 0 and data["solved_for"] == "noise_multiplier"
    assert 2.997 <= get_epsilon(data["noise_multiplier"], 0.004, 2500, 1e-5) <= 3.0


def test_solve_steps_with_dataset_size_default_delta() -> None:
    code, out = run("--epsilon", "3", "--dataset-size", "60000", "--batch-size", "256", "--noise-multiplier", "1.1", "--json")
    data = json.loads(out)
    assert code == 0 and data["solved_for"] == "steps"
    assert data["delta"] == pytest.approx(1 / 600000)
    assert data["epsilon_achieved"] <= 3.0


def test_solve_batch_size_from_epochs() -> None:
    code, out = run("--epsilon", "3", "--dataset-size", "60000", "--noise-multiplier", "1.1", "--epochs", "60")
    assert code == 0, out
    assert "max batch size" in out and "ceil(epochs / sample_rate)" in out


def test_solve_sample_rate() -> None:
    code, out = run("--epsilon", "3", "--noise-multiplier", "0.85", "--steps", "2500", "--delta", "1e-5", "--json")
    data = json.loads(out)
    assert code == 0 and data["solved_for"] == "sample_rate" and data["epsilon_achieved"] <= 3


def test_delta_warning_and_required() -> None:
    code, out = run("--sample-rate", "0.01", "--noise-multiplier", "1", "--steps", "10")
    assert code != 0 and "--delta is required" in out
    code, out = run("--dataset-size", "100", "--batch-size", "10", "--noise-multiplier", "1", "--steps", "10", "--delta", "0.05")
    assert code == 0 and "Warning: delta" in out


def test_sweep_table_and_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "eps.png"
    code, out = run("--noise-multiplier", "0.8,1.0,1.2", "--epochs", "1,5,10", "--sample-rate", "0.01", "--delta", "1e-5",
                    "--plot", str(png))
    assert code == 0, out
    assert out.count("0.01 ") >= 9 and png.stat().st_size > 0


def test_infeasible_exits_nonzero() -> None:
    code, out = run("--epsilon", "0.001", "--sample-rate", "1", "--noise-multiplier", "0.1", "--delta", "1e-5")
    assert code != 0 and "exceeds target_epsilon" in out


def test_from_checkpoint_json(tmp_path: Path) -> None:
    acc = RDPAccountant()
    acc.step(noise_multiplier=1.1, sample_rate=256 / 60000, num_steps=5000)
    path = tmp_path / "acc.json"
    path.write_text(json.dumps({"accountant": acc.state_dict()}))
    code, out = run("--from-checkpoint", str(path), "--delta", "1e-5", "--epsilon", "3", "--json")
    assert code == 0, out
    data = json.loads(out)
    assert data["epsilon_spent"] == pytest.approx(acc.get_epsilon(1e-5))
    acc.step(noise_multiplier=1.1, sample_rate=256 / 60000, num_steps=data["steps_left"])
    assert acc.get_epsilon(1e-5) <= 3.0
    acc.step(noise_multiplier=1.1, sample_rate=256 / 60000)
    assert acc.get_epsilon(1e-5) > 3.0


def test_from_checkpoint_torch(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    acc = RDPAccountant()
    acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=100)
    path = tmp_path / "ckpt.pt"
    torch.save({"accountant": acc.state_dict(), "step": 100}, path)
    code, out = run("--from-checkpoint", str(path), "--delta", "1e-5")
    assert code == 0, out
    assert "after 100 steps" in out


def test_console_script_subprocess() -> None:
    exe = Path(sys.executable).parent / "dpengine"
    if not exe.exists():
        found = shutil.which("dpengine")
        if found is None:
            pytest.skip("dpengine console script not installed")
        exe = Path(found)
    proc = subprocess.run(
        [str(exe), "budget", "--sample-rate", "0.01", "--noise-multiplier", "1.0", "--steps", "1000", "--delta", "1e-5", "--json"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["epsilon"] == pytest.approx(2.10132, abs=1e-5)
