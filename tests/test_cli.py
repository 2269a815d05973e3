"""The ``noisy-lightning`` console script, end to end, in fresh processes (as a user runs it)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    executable = shutil.which("noisy-lightning", path=str(Path(sys.executable).parent))
    command = [executable] if executable else [sys.executable, "-m", "noisy_lightning.cli"]
    return subprocess.run([*command, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_print_config_shows_every_section(tmp_path: Path) -> None:
    result = cli("fit", "--config", str(QUICKSTART), "--print_config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    config = yaml.safe_load(result.stdout)
    assert config["model"]["method"] == "em"
    assert config["data"]["dataset"] == "mnist_sample"
    assert config["model"]["net"]["class_path"] == "noisy_lightning.MLP"


def test_fast_dev_run_end_to_end(tmp_path: Path) -> None:
    result = cli("fit", "--config", str(QUICKSTART), "--trainer.fast_dev_run", "true", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


def test_fit_then_test_and_resume_from_last(tmp_path: Path) -> None:
    args = ["--config", str(QUICKSTART), "--trainer.max_epochs", "3", "--trainer.enable_progress_bar", "false"]
    fit = cli("fit", *args, cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    version = tmp_path / "lightning_logs" / "version_0"
    assert (version / "config.yaml").exists(), "every run saves its config"
    assert list(version.glob("events.out.tfevents.*")), "TensorBoard logs are written"
    last = tmp_path / "lightning_logs" / "checkpoints" / "quickstart" / "last.ckpt"
    assert last.exists()
    test = cli("test", *args, "--ckpt_path", "last", cwd=tmp_path)
    assert test.returncode == 0, test.stderr[-3000:]
    assert "test/acc" in test.stdout
    assert "No checkpoint will be loaded" not in test.stdout + test.stderr
    # --ckpt_path last resumes the latest run and trains on to the new max_epochs
    resumed = cli(
        "fit",
        *args[:2],
        "--trainer.max_epochs",
        "5",
        "--trainer.enable_progress_bar",
        "false",
        "--ckpt_path",
        "last",
        cwd=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    output = resumed.stdout + resumed.stderr
    assert "Restoring states from the checkpoint" in output and "No checkpoint will be loaded" not in output
    import torch

    checkpoint = torch.load(last, weights_only=False)
    assert checkpoint["epoch"] == 4  # continued from epoch 3 to the new max_epochs=5

    # predict writes the predictions, theta and the ranked label issues into the run's folder
    predict = cli("predict", *args, "--ckpt_path", "last", cwd=tmp_path)
    assert predict.returncode == 0, predict.stderr[-3000:]
    folders = sorted((tmp_path / "lightning_logs").glob("version_*"), key=lambda path: int(path.name.split("_")[1]))
    written = {path.name for path in folders[-1].iterdir()}
    assert {"predictions.csv", "noise_matrix.csv", "label_issues.csv"} <= written
    issues = (folders[-1] / "label_issues.csv").read_text().splitlines()
    assert len(issues) == 1 + 4000 and issues[0].startswith("index,given_label,corrected_label,score")

    # a CLI-trained checkpoint loads with no arguments: the same net (from its class_path), theta and weights
    from noisy_lightning import NoisyLabelClassifier

    restored = NoisyLabelClassifier.load_from_checkpoint(last)
    assert torch.equal(restored.noise_matrix, checkpoint["state_dict"]["noise_layer.noise_matrix"])
    assert not torch.equal(restored.noise_matrix, torch.eye(10))


def test_bad_value_is_reported_with_its_name(tmp_path: Path) -> None:
    result = cli(
        "fit", "--config", str(QUICKSTART), "--data.noise_rate", "1.5", "--trainer.fast_dev_run", "true", cwd=tmp_path
    )
    assert result.returncode != 0
    assert "noise_rate must be in [0, 1)" in result.stderr


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_parses(config: Path, tmp_path: Path) -> None:
    result = cli("fit", "--config", str(config), "--print_config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
