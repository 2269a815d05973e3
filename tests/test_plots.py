from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from helpers import quiet_trainer
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure

from noisy_lightning import EMNoiseEstimation, NoisyLabelClassifier, NoisyLabelDataModule, NoisyLabelFigures, plots
from noisy_lightning.noise import pair_flip


def test_frame_categories_on_a_hand_made_case() -> None:
    true = [0, 1, 2, 3, 4, 5]
    noisy = [0, 9, 2, 9, 9, 5]  # samples 1, 3 and 4 are wrong
    corrected = [0, 1, 7, 9, 8, 5]  # 1 fixed, 2 broken, 3 missed (unchanged), 4 missed (changed to another wrong)
    assert plots.frame_categories(noisy, corrected, true) == [None, "fixed", "broken", "missed", "missed", None]
    assert plots.frame_categories(noisy, corrected) == [None, "changed", "changed", None, "changed", None]


def test_correction_grid_frames_have_the_category_colours() -> None:
    images = np.zeros((4, 28 * 28))
    figure = plots.correction_grid_figure(images, [0, 9, 2, 9], [0, 1, 7, 9], [0, 1, 2, 3], rows=2, cols=2)
    axes = figure.axes[:4]
    frames = [[patch.get_edgecolor() for patch in ax.patches] for ax in axes]
    from matplotlib.colors import to_rgba

    assert frames[0] == []  # right and unchanged: no frame
    assert frames[1] == [to_rgba(plots.FRAME_COLOURS["fixed"])]
    assert frames[2] == [to_rgba(plots.FRAME_COLOURS["broken"])]
    assert frames[3] == [to_rgba(plots.FRAME_COLOURS["missed"])]
    assert [ax.get_title() for ax in axes] == ["0→0 (0)", "9→1 (1)", "2→7 (2)", "9→9 (3)"]
    assert len(figure.legends) == 1 and len(figure.legends[0].get_texts()) == 3


def test_sample_selection() -> None:
    noisy, corrected = np.array([0, 1, 2, 3, 4]), np.array([0, 2, 2, 0, 4])  # samples 1 and 3 changed
    confidence = np.array([0.9, 0.6, 0.8, 0.99, 0.5])
    assert plots.select_samples(3, "first", noisy, corrected).tolist() == [0, 1, 2]
    assert plots.select_samples(2, "most_confident", noisy, corrected, confidence).tolist() == [3, 1]
    assert plots.select_samples(3, "least_confident", noisy, corrected, confidence).tolist() == [1, 3, 4]
    random = plots.select_samples(3, "random", noisy, corrected, seed=1)
    assert len(set(random.tolist())) == 3
    with pytest.raises(ValueError, match="needs confidence"):
        plots.select_samples(2, "most_confident", noisy, corrected)
    with pytest.raises(ValueError, match="selection must be"):
        plots.select_samples(2, "best", noisy, corrected)  # type: ignore[arg-type]


def test_confusion_matrices_figure_layout_and_values() -> None:
    true, noisy = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1])
    figure = plots.confusion_matrices_figure({"train: noisy": (true, noisy), "test": (true, true)}, 2)
    heatmaps = [ax for ax in figure.axes if ax.get_title()]
    assert [ax.get_title() for ax in heatmaps] == [
        "train: noisy: counts",
        "train: noisy: normalised per true class",
        "train: noisy: normalised over all",
        "test: counts",
        "test: normalised per true class",
        "test: normalised over all",
    ]
    assert [t.get_text() for t in heatmaps[0].texts] == ["1", "1", "0", "2"]
    assert [t.get_text() for t in heatmaps[1].texts] == ["50%", "50%", "0%", "100%"]
    with pytest.raises(ValueError, match="views must be among"):
        plots.confusion_matrices_figure({"x": (true, true)}, 2, views=["log"])


def test_noise_matrix_figure_with_and_without_truth() -> None:
    truth = pair_flip(3, 0.3)
    figure = plots.noise_matrix_figure(truth, truth + 0.01, title="round 1")
    titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
    assert titles == ["true T", "estimate θ̂", "θ̂ − T"]
    assert [t.get_text() for t in figure.axes[2].texts][:2] == ["0.01", "0.01"]
    only_estimate = plots.noise_matrix_figure(None, truth)
    assert [ax.get_title() for ax in only_estimate.axes if ax.get_title()] == ["estimate θ̂"]
    with pytest.raises(ValueError, match="true_matrix has shape"):
        plots.noise_matrix_figure(torch.eye(2), truth)


def test_training_curves_and_noise_sweep() -> None:
    history = {"train/loss": [(0, 1.0), (1, 0.5)], "val/acc_clean": [(0, 0.8), (1, 0.9)], "em/theta_error": [(1, 0.1)]}
    figure = plots.training_curves_figure(history, em_round_epochs=[1])
    assert [ax.get_title() for ax in figure.axes] == ["loss", "accuracy", "EM"]
    assert any(line.get_linestyle() == "--" for line in figure.axes[0].lines)  # the EM-round marker
    rows = [
        {"noise_type": "none", "noise_rate": 0.0, "recipe": "ce", "test_acc": 0.99},
        {"noise_type": "symmetric", "noise_rate": 0.5, "recipe": "ce", "test_acc": 0.90},
        {"noise_type": "symmetric", "noise_rate": 0.5, "recipe": "em", "test_acc": 0.97},
    ]
    sweep = plots.noise_sweep_figure(rows)
    assert isinstance(sweep, Figure) and sweep.axes[0].get_xlabel() == "symmetric noise rate"
    assert len(sweep.axes[0].containers) == 2  # two error-bar series: baseline and EM


def test_save_figure_is_atomic(tmp_path: Path) -> None:
    figure = plots.training_curves_figure({"train/loss": [(0, 1.0)]})
    path = plots.save_figure(figure, tmp_path / "a" / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    class Exploding(Figure):
        def savefig(self, *args: object, **kwargs: object) -> None:
            Path(str(args[0])).write_bytes(b"half")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        plots.save_figure(Exploding(), tmp_path / "a" / "broken.png")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["curves.png"]


def test_figure_callback_writes_pngs_during_a_short_fit(tmp_path: Path) -> None:
    L.seed_everything(0)
    figures = NoisyLabelFigures(grid_size=4)
    trainer = quiet_trainer(
        max_epochs=3, callbacks=[EMNoiseEstimation(warmup_epochs=1), figures], logger=TensorBoardLogger(tmp_path)
    )
    trainer.fit(NoisyLabelClassifier(method="em"), NoisyLabelDataModule(noise_type="symmetric", noise_rate=0.4))
    folder = Path(trainer.log_dir) / "figures"
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png"))
    assert names == [
        "confusion_matrices.png",
        "correction_grid.png",
        "noise_matrix/round_001.png",
        "noise_matrix/round_002.png",
        "noise_matrix/round_003.png",
        "training_curves.png",
    ]
    assert figures.em_round_epochs == [0, 1, 2]
    assert [epoch for epoch, _ in figures.history["test/acc"]] == [0, 1, 2]
    assert list(Path(trainer.log_dir).glob("events.out.tfevents.*")), "figures also go to TensorBoard"
