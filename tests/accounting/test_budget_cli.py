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


def test_batch_size_uses_make_privates_sample_rate_and_steps() -> None:
    """q = 1 / len(loader) and one epoch = len(loader) steps, as make_private_with_epsilon plans them."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from dpengine import PrivacyEngine

    code, out = run("--epsilon", "3", "--dataset-size", "1437", "--batch-size", "128", "--epochs", "20",
                    "--delta", "1e-5", "--json")
    assert code == 0, out
    data = json.loads(out)
    assert data["sample_rate"] == pytest.approx(1 / 12) and data["steps"] == 240
    assert any("ceil(N / B)" in n for n in data["notes"])
    model = torch.nn.Linear(3, 2)
    loader = DataLoader(TensorDataset(torch.randn(1437, 3), torch.zeros(1437, dtype=torch.long)), batch_size=128)
    _, opt, dl = PrivacyEngine().make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
        target_epsilon=3.0, target_delta=1e-5, epochs=20, max_grad_norm=1.0)
    assert dl.sample_rate == pytest.approx(data["sample_rate"])
    assert opt.noise_multiplier == pytest.approx(data["noise_multiplier"], rel=1e-6)


def test_solved_batch_size_fits_with_loader_definition() -> None:
    code, out = run("--epsilon", "3", "--dataset-size", "60000", "--noise-multiplier", "1.1", "--epochs", "60", "--json")
    assert code == 0, out
    data = json.loads(out)
    b = data["batch_size"]
    assert data["sample_rate"] == pytest.approx(1 / -(-60000 // b))
    assert get_epsilon(1.1, data["sample_rate"], data["steps"], data["delta"]) <= 3.0
    # one more record per batch would not fit (the answer is the largest batch, not merely a safe one)
    q1 = 1 / -(-60000 // (b + 1))
    assert q1 == data["sample_rate"] or get_epsilon(1.1, q1, -(-60 * round(1 / q1)), data["delta"]) > 3.0


def test_pld_prints_only_what_applies() -> None:
    code, out = run("--sample-rate", "0.01", "--noise-multiplier", "1.0", "--steps", "1000", "--delta", "1e-5",
                    "--accountant", "pld")
    assert code == 0, out
    assert "epsilon = 1.82" in out and "classic" not in out and "best order" not in out
    code, out = run("--sample-rate", "0.01,0.02", "--noise-multiplier", "1.0", "--steps", "1000", "--delta", "1e-5",
                    "--accountant", "prv")
    assert code == 0 and "best order" not in out and "prv" in out


def test_plot_single_value_draws_epsilon_against_steps(tmp_path: Path) -> None:
    from dpengine.accounting.budget import _curve

    ts, eps = _curve(1.0, 0.01, 1000, 1e-5, "rdp", 40)
    assert len(ts) == 40 and ts[-1] == 1000 and all(a < b for a, b in zip(eps, eps[1:]))
    assert eps[-1] == pytest.approx(get_epsilon(1.0, 0.01, 1000, 1e-5))
    code, out = run("--sample-rate", "0.01", "--noise-multiplier", "1.0", "--steps", "1000", "--delta", "1e-5",
                    "--plot", str(tmp_path / "p.png"))
    assert code == 0 and (tmp_path / "p.png").stat().st_size > 1000, out


def test_from_checkpoint_not_a_checkpoint_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"\x80\x04garbage that is neither json nor a checkpoint")
    code, out = run("--from-checkpoint", str(bad), "--delta", "1e-5")
    assert code == 2 and "Traceback" not in out
    assert out.strip().count("\n") == 0 and "neither a JSON accountant state nor a torch checkpoint" in out


def test_piped_output_is_not_wrapped() -> None:
    code, out = run("--epsilon", "3", "--dataset-size", "1437", "--batch-size", "128", "--epochs", "20")
    assert code == 0
    assert any(line.startswith("With --dataset-size N") and line.rstrip().endswith("<= B).")
               for line in out.splitlines()), out
