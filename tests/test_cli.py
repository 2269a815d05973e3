"""The ``noisy-lightning`` console script, end to end, in fresh processes (as a user runs it)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import SUBPROCESS_TIMEOUT_S

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    executable = shutil.which("noisy-lightning", path=str(Path(sys.executable).parent))
    command = [executable] if executable else [sys.executable, "-m", "noisy_lightning.cli"]
    return subprocess.run([*command, *args], cwd=cwd, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)


def test_print_config_shows_every_section(tmp_path: Path) -> None:
    result = cli("fit", "--config", str(QUICKSTART), "--print_config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    config = yaml.safe_load(result.stdout)
    # a config without a class_path gets NoisyLabelClassifier (the CLI takes any subclass of it)
    assert config["model"]["class_path"] == "noisy_lightning.NoisyLabelClassifier"
    assert config["model"]["init_args"]["method"] == "em"
    assert config["data"]["dataset"] == "mnist_sample"
    assert config["model"]["init_args"]["net"] is None  # the default network, MLP 784-500-300-10, dropout 0.5


@pytest.mark.slow
def test_fast_dev_run_end_to_end(tmp_path: Path) -> None:
    result = cli("fit", "--config", str(QUICKSTART), "--trainer.fast_dev_run", "true", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_fit_then_test_and_resume_from_last(tmp_path: Path) -> None:
    # 7 epochs: the quickstart's first EM round ends epoch 6, so theta is estimated before the checkpoint.
    args = ["--config", str(QUICKSTART), "--trainer.max_epochs", "7", "--trainer.enable_progress_bar", "false"]
    fit = cli("fit", *args, cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    run = tmp_path / "lightning_logs" / "quickstart" / "version_0"
    assert (run / "config.yaml").exists(), "every run saves its config"
    assert list(run.glob("events.out.tfevents.*")), "TensorBoard logs are written"
    metrics = (run / "metrics.csv").read_text().splitlines()
    assert "val/acc_noisy" in metrics[0] and len(metrics) >= 4, "the CSV logger shares the run folder"
    assert {"training_curves.png", "training_curves.pdf"} <= {path.name for path in (run / "figures").iterdir()}
    last = run / "checkpoints" / "last.ckpt"
    assert last.exists()
    test = cli("test", *args, "--ckpt_path", "last", cwd=tmp_path)
    assert test.returncode == 0, test.stderr[-3000:]
    assert "test/acc" in test.stdout
    assert sorted(path.name for path in (tmp_path / "lightning_logs" / "quickstart").iterdir()) == ["version_0"]
    # --ckpt_path last resumes the latest run and trains on to the new max_epochs
    resumed = cli(
        "fit",
        *args[:2],
        "--trainer.max_epochs",
        "9",
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

    newest = tmp_path / "lightning_logs" / "quickstart" / "version_1" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(newest, weights_only=False)
    assert checkpoint["epoch"] == 8  # continued from epoch 7 to the new max_epochs=9

    # predict writes the predictions, theta and the ranked label issues into the run's folder
    predict = cli("predict", *args, "--ckpt_path", "last", cwd=tmp_path)
    assert predict.returncode == 0, predict.stderr[-3000:]
    written = {path.name for path in newest.parent.parent.iterdir()}
    assert {"predictions.csv", "noise_matrix.csv", "label_issues.csv"} <= written
    issues = (newest.parent.parent / "label_issues.csv").read_text().splitlines()
    assert len(issues) == 1 + 4000 and issues[0].startswith("index,given_label,corrected_label,score")

    # a CLI-trained checkpoint loads with no arguments: the same net (from its class_path), theta and weights
    from noisy_lightning import NoisyLabelClassifier

    restored = NoisyLabelClassifier.load_from_checkpoint(newest)
    assert torch.equal(restored.noise_matrix, checkpoint["state_dict"]["noise_layer.noise_matrix"])
    assert not torch.equal(restored.noise_matrix, torch.eye(10))

    # test never takes another configuration's checkpoint, and says which setting differs
    other = cli("test", *args, "--data.noise_rate", "0.3", "--ckpt_path", "last", cwd=tmp_path)
    assert other.returncode == 2
    assert "no checkpoint of this configuration" in other.stderr and "data.noise_rate=0.45 (now 0.3)" in other.stderr
    assert "Traceback" not in other.stderr


@pytest.mark.slow
def test_evaluating_needs_a_checkpoint_or_an_explicit_untrained_choice(tmp_path: Path) -> None:
    refused = cli("test", "--config", str(QUICKSTART), cwd=tmp_path)
    assert refused.returncode == 2 and "test needs a checkpoint" in refused.stderr
    untrained = cli("validate", "--config", str(QUICKSTART), "--ckpt_path", "untrained", cwd=tmp_path)
    assert untrained.returncode == 0, untrained.stderr[-3000:]
    assert "val/acc_noisy" in untrained.stdout


@pytest.mark.slow
def test_one_flag_gives_the_cross_entropy_baseline_and_the_noise_changes_from_the_command_line(
    tmp_path: Path,
) -> None:
    overrides = ["--model.method", "ce", "--data.noise_type", "permutation", "--data.noise_rate", "0.4"]
    result = cli("fit", "--config", str(QUICKSTART), *overrides, "--trainer.max_epochs", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "EMNoiseEstimation is off for this fit" in result.stderr
    saved = yaml.safe_load((tmp_path / "lightning_logs" / "quickstart" / "version_0" / "config.yaml").read_text())
    assert saved["model"]["init_args"]["method"] == "ce"
    assert (saved["data"]["noise_type"], saved["data"]["noise_rate"]) == ("permutation", 0.4)


@pytest.mark.slow
def test_a_refit_without_the_labels_that_predict_flags(tmp_path: Path) -> None:
    """The README's "EM + refit" from the command line: fit, predict (label_issues.csv), fit again without the
    flagged labels. (The first fit is cross-entropy for speed: predict writes the same file for any method.)"""
    args = ["--config", str(QUICKSTART), "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"]
    first = [*args, "--model.method", "ce"]
    assert cli("fit", *first, cwd=tmp_path).returncode == 0
    predicted = cli("predict", *first, "--ckpt_path", "last", cwd=tmp_path)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    issues = tmp_path / "lightning_logs" / "quickstart" / "version_0" / "label_issues.csv"
    flagged = [row for row in issues.read_text().splitlines()[1:] if row.split(",")[4:6] == ["1", "train"]]
    assert flagged, "one epoch on 45% pair-flip noise leaves some given labels that the network disagrees with"
    refit = cli("fit", *first, "--data.drop_label_issues", str(issues), cwd=tmp_path)
    assert refit.returncode == 0, refit.stderr[-3000:]
    saved = yaml.safe_load((tmp_path / "lightning_logs" / "quickstart" / "version_1" / "config.yaml").read_text())
    assert saved["data"]["drop_label_issues"] == str(issues)
    assert f"left out {len(flagged)} flagged training labels" in refit.stderr + refit.stdout


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--data.noise_rate", "1.2"], "noise_rate must be in [0, 1), got 1.2"),
        (["--data.noise_type", "pairflip"], 'Parser key "data.noise_type"'),
        (["--model.lr", "-1"], "lr must be a finite number in (0, inf), got -1.0"),
        (["--ckpt_path", "missing.ckpt"], "checkpoint missing.ckpt does not exist"),
        (["--data.drop_label_issues", "missing.csv"], "drop_label_issues='missing.csv': no such file"),
    ],
)
def test_a_bad_value_is_a_few_lines_naming_the_parameter(tmp_path: Path, override: list[str], message: str) -> None:
    result = cli("fit", "--config", str(QUICKSTART), *override, "--trainer.fast_dev_run", "true", cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr and "usage:" not in result.stderr
    assert f"config: {QUICKSTART}" in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 8


@pytest.mark.slow
def test_fit_help_lists_the_optimizer_once(tmp_path: Path) -> None:
    result = cli("fit", "--help", cwd=tmp_path)
    assert result.returncode == 0
    # no top-level optimizer or scheduler: the model's own arguments are the only ones
    assert "  --optimizer " not in result.stdout and "  --lr_scheduler " not in result.stdout
    assert "--model CONFIG | CLASS_PATH_OR_NAME" in result.stdout
    model_help = cli("fit", "--model.help", "NoisyLabelClassifier", cwd=tmp_path)
    assert model_help.returncode == 0
    assert "--model.optimizer {adam,adamw,sgd}" in model_help.stdout
    assert "--model.method {ce,em,forward,backward,nal,nal_complex,gce}" in model_help.stdout


def test_coteaching_is_chosen_by_its_class_path(tmp_path: Path) -> None:
    config = ROOT / "configs" / "mnist_coteaching.yaml"
    result = cli("fit", "--config", str(config), "--model.forget_rate", "0.3", "--print_config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = yaml.safe_load(result.stdout)["model"]
    assert printed["class_path"] == "noisy_lightning.CoTeachingClassifier"
    assert printed["init_args"]["forget_rate"] == 0.3


# The quickstart config stays in the fast subset; the full-MNIST ones (a subprocess each) are marked slow.
@pytest.mark.parametrize(
    "config",
    [
        pytest.param(path, id=path.name, marks=() if path.name == "quickstart.yaml" else pytest.mark.slow)
        for path in sorted((ROOT / "configs").glob("*.yaml"))
    ],
)
def test_every_shipped_config_parses_and_logs_to_csv_with_figures(config: Path, tmp_path: Path) -> None:
    result = cli("fit", "--config", str(config), "--print_config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = yaml.safe_load(result.stdout)
    loggers = {entry["class_path"].rsplit(".", 1)[1] for entry in printed["trainer"]["logger"]}
    assert loggers == {"TensorBoardLogger", "CSVLogger"}
    callbacks = {entry["class_path"].rsplit(".", 1)[1] for entry in printed["trainer"]["callbacks"]}
    assert "NoisyLabelFigures" in callbacks


def test_a_successful_run_destroys_the_process_group_it_leaves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A DDP run leaves the default group open; at interpreter shutdown gloo can then abort the finished process.
    import torch.distributed as dist

    from noisy_lightning import cli as cli_module

    def fit_that_leaves_a_group() -> None:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)

    monkeypatch.setattr(cli_module, "build_cli", fit_that_leaves_a_group)
    try:
        cli_module.main()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_a_run_saved_before_an_option_existed_matches_the_option_left_at_none() -> None:
    from noisy_lightning.cli import _first_difference, _same_settings

    saved = {"data": {"seed": 0}, "model": {"lr": 0.001}}
    assert _same_settings(saved, {"data": {"seed": 0, "drop_label_issues": None}, "model": {"lr": 0.001}})
    changed = {"data": {"seed": 0, "drop_label_issues": "label_issues.csv"}, "model": {"lr": 0.001}}
    assert not _same_settings(saved, changed)
    assert _first_difference(saved, changed) == ("data.drop_label_issues", None, "label_issues.csv")
