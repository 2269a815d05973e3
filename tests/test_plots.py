import inspect
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from helpers import quiet_trainer
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.layout_engine import ConstrainedLayoutEngine
from PIL import Image

from noisy_lightning import (
    MLP,
    EMNoiseEstimation,
    NoisyLabelClassifier,
    NoisyLabelDataModule,
    NoisyLabelFigures,
    plots,
)
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
    assert frames[0] == []  # right and unchanged: no frame
    assert frames[1] == [to_rgba(plots.FRAME_COLOURS["fixed"])]
    assert frames[2] == [to_rgba(plots.FRAME_COLOURS["broken"])]
    assert frames[3] == [to_rgba(plots.FRAME_COLOURS["missed"])]
    assert [ax.get_title() for ax in axes] == ["0→0 (0)", "9→1 (1)", "2→7 (2)", "9→9 (3)"]
    assert len(figure.legends) == 1 and len(figure.legends[0].get_texts()) == 3
    # "missed" is dashed too, so it stays apart from "broken" in greyscale and for colour-blind readers.
    assert axes[3].patches[0].get_linestyle() != axes[2].patches[0].get_linestyle()


@pytest.mark.parametrize(
    ("image_shape", "shown_shape"),
    [((6, 5), (6, 5)), ((1, 6, 5), (6, 5)), ((3, 6, 5), (6, 5, 3))],
)
def test_correction_grid_draws_one_and_three_channel_images(
    image_shape: tuple[int, ...], shown_shape: tuple[int, ...]
) -> None:
    images = torch.arange(2 * int(np.prod(image_shape)), dtype=torch.float32).reshape(2, *image_shape)
    figure = plots.correction_grid_figure(images, [0, 1], [0, 2], rows=1, cols=2, image_shape=image_shape)
    shown = [ax.images[0].get_array() for ax in figure.axes if ax.images]
    assert [image.shape for image in shown] == [shown_shape, shown_shape]
    if len(shown_shape) == 3:  # RGB goes to imshow scaled to [0, 1]
        assert all(image.min() == 0.0 and image.max() == 1.0 for image in shown)
    frame = figure.axes[1].patches[0]
    assert (frame.get_width(), frame.get_height()) == (5, 6)  # the frame follows (H, W), whatever the channels


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
    figure = plots.confusion_matrices_figure(
        {"train: noisy": (true, noisy), "test": (true, true)}, 2, views=("counts", "per_true", "all"), max_panels=6
    )
    heatmaps = [ax for ax in figure.axes if ax.get_title()]
    assert [ax.get_title() for ax in heatmaps] == [
        "train: noisy: counts",
        "train: noisy: % per true class",
        "train: noisy: % of all",
        "test: counts",
        "test: % per true class",
        "test: % of all",
    ]
    assert [t.get_text() for t in heatmaps[0].texts] == ["1", "1", "0", "2"]
    assert [t.get_text() for t in heatmaps[1].texts] == ["50", "50", "0", "100"]
    assert [t.get_text() for t in heatmaps[2].texts] == ["25.0", "25.0", "0.0", "50.0"]
    with pytest.raises(ValueError, match="views must be among"):
        plots.confusion_matrices_figure({"x": (true, true)}, 2, views=["log"])


def image_axes(figure: Figure) -> list:
    return [ax for ax in figure.axes if ax.images]


def test_confusion_matrices_figure_draws_at_most_four_panels_by_default() -> None:
    labels = torch.tensor([0, 1, 2, 2])
    comparisons = {f"set {number}": (labels, labels.flip(0)) for number in range(5)}
    four = plots.confusion_matrices_figure(dict(list(comparisons.items())[:4]), 3)
    assert len(image_axes(four)) == 4
    assert [ax.get_title() for ax in image_axes(four)] == ["set 0", "set 1", "set 2", "set 3"]
    assert len(four.axes) == 5, "the four panels share one colour bar"
    assert {ax.images[0].get_clim() for ax in image_axes(four)} == {(0.0, 100.0)}
    with pytest.raises(ValueError, match="5 panels, more than max_panels=4"):
        plots.confusion_matrices_figure(comparisons, 3)
    with pytest.raises(ValueError, match="6 panels"):
        plots.confusion_matrices_figure(dict(list(comparisons.items())[:2]), 3, views=("counts", "per_true", "all"))
    assert len(image_axes(plots.confusion_matrices_figure(comparisons, 3, max_panels=5))) == 5


def test_noise_matrix_figure_with_and_without_truth() -> None:
    truth = pair_flip(3, 0.3)
    figure = plots.noise_matrix_figure(truth, truth + 0.01, title="round 1")
    titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
    assert titles == ["true $T$", r"estimate $\hat{\theta}$", r"$\hat{\theta} - T$"]
    assert [t.get_text() for t in figure.axes[0].texts][:3] == [".70", ".30", "0"]
    assert [t.get_text() for t in figure.axes[2].texts][:2] == ["+.01", "+.01"]
    only_estimate = plots.noise_matrix_figure(None, truth)
    assert [ax.get_title() for ax in only_estimate.axes if ax.get_title()] == [r"estimate $\hat{\theta}$"]
    assert image_axes(only_estimate)[0].images[0].get_clim() == (0.0, 1.0)
    with pytest.raises(ValueError, match="true_matrix has shape"):
        plots.noise_matrix_figure(torch.eye(2), truth)


def test_noise_matrix_figure_scales() -> None:
    truth = pair_flip(4, 0.2)
    estimate = truth.clone()
    estimate[0, 0], estimate[0, 1] = 0.5, 0.5  # the largest error, 0.3, rounds up to a 0.3 limit
    true_image, estimate_image, difference_image = (
        ax.images[0] for ax in image_axes(plots.noise_matrix_figure(truth, estimate))
    )
    # T and the estimate share one sequential 0..1 scale, so equal colours mean equal probabilities.
    assert true_image.get_clim() == estimate_image.get_clim() == (0.0, 1.0)
    assert true_image.get_cmap().name == estimate_image.get_cmap().name == plots.SEQUENTIAL_CMAP
    # The difference has its own diverging scale, symmetric around 0 and just wide enough.
    low, high = difference_image.get_clim()
    assert low == pytest.approx(-high) and high == pytest.approx(0.3)
    assert difference_image.get_cmap().name == plots.DIVERGING_CMAP
    tiny = (ax.images[0] for ax in image_axes(plots.noise_matrix_figure(truth, truth + 0.001)))
    assert list(tiny)[2].get_clim() == pytest.approx((-0.05, 0.05))  # no saturated colours for a near-perfect fit


def test_heatmap_text_stays_legible_on_dark_cells() -> None:
    figure = plots.noise_matrix_figure(None, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    colours = [text.get_color() for text in figure.axes[0].texts]
    assert colours == ["white", "black", "black", "white"]


def test_training_curves_and_noise_sweep() -> None:
    history = {"train/loss": [(0, 1.0), (1, 0.5)], "val/acc_clean": [(0, 0.8), (1, 0.9)], "em/theta_error": [(1, 0.1)]}
    figure = plots.training_curves_figure(history, em_round_epochs=[1])
    assert [ax.get_ylabel() for ax in figure.axes] == ["loss", "accuracy", "EM metrics"]
    assert any(line.get_linestyle() == "--" for line in figure.axes[0].lines)  # the EM-round marker
    rows = [
        {"noise_type": "none", "noise_rate": 0.0, "recipe": "ce", "test_acc": 0.99},
        {"noise_type": "symmetric", "noise_rate": 0.5, "recipe": "ce", "test_acc": 0.90},
        {"noise_type": "symmetric", "noise_rate": 0.5, "recipe": "em", "test_acc": 0.97},
    ]
    sweep = plots.noise_sweep_figure(rows)
    assert isinstance(sweep, Figure) and sweep.axes[0].get_xlabel() == "symmetric noise rate"
    assert len(sweep.axes[0].containers) == 2  # two error-bar series: baseline and EM


def test_training_curves_share_the_epoch_axis() -> None:
    history = {"train/loss": [(0, 1.0), (5, 0.5)], "val/acc_clean": [(2, 0.8)], "em/theta_error": [(3, 0.1)]}
    top, middle, bottom = plots.training_curves_figure(history).axes
    assert all(top.get_shared_x_axes().joined(top, other) for other in (middle, bottom))
    assert top.get_xlim() == bottom.get_xlim()
    assert [ax.get_xlabel() for ax in (top, middle, bottom)] == ["", "", "epoch"]


def test_save_figure_writes_a_png_and_a_pdf(tmp_path: Path) -> None:
    figure = plots.noise_matrix_figure(None, torch.eye(3))
    path = plots.save_figure(figure, tmp_path / "a" / "matrix.png")
    assert path == tmp_path / "a" / "matrix.png"
    assert plots.vector_path(path) == tmp_path / "a" / "matrix.pdf"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pdf = plots.vector_path(path).read_bytes()
    assert pdf.startswith(b"%PDF")
    assert b"/FontFile2" in pdf and b"/Type3" not in pdf  # TrueType fonts, as journal templates ask
    with Image.open(path) as image:
        assert min(image.info["dpi"]) >= 149.5  # the default resolution, 150 dpi, is in the PNG's metadata
        assert image.size == (round(figure.get_figwidth() * 150), round(figure.get_figheight() * 150))
    assert b"/CreationDate" not in pdf  # redrawing the same figure gives the same bytes, not a spurious diff
    # the PDF is drawn with the PNG's layout; the figure keeps its own layout engine for whatever the caller does next
    assert isinstance(figure.get_layout_engine(), ConstrainedLayoutEngine)
    with pytest.raises(ValueError, match=r"must end in \.png"):
        plots.save_figure(figure, tmp_path / "matrix.pdf")


def test_save_figure_is_atomic(tmp_path: Path) -> None:
    figure = plots.training_curves_figure({"train/loss": [(0, 1.0)]})
    path = plots.save_figure(figure, tmp_path / "a" / "curves.png")
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    assert sorted(before) == ["curves.pdf", "curves.png"]

    class Exploding(Figure):
        explode_on = "png"

        def savefig(self, *args: object, **kwargs: object) -> None:
            args[0].write(b"half")  # type: ignore[attr-defined]
            if kwargs["format"] == self.explode_on:
                raise OSError("disk full")
            super().savefig(*args, **kwargs)

    for explode_on in ("png", "pdf"):
        broken = Exploding()
        broken.explode_on = explode_on
        with pytest.raises(OSError, match="disk full"):
            plots.save_figure(broken, tmp_path / "a" / "broken.png")
        with pytest.raises(OSError, match="disk full"):
            plots.save_figure(broken, path)  # neither file of the previous pair is touched
        assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before


@pytest.mark.slow
def test_figure_callback_writes_pngs_during_a_short_fit(tmp_path: Path) -> None:
    L.seed_everything(0)
    figures = NoisyLabelFigures(grid_size=4)
    trainer = quiet_trainer(
        max_epochs=3, callbacks=[EMNoiseEstimation(warmup_epochs=1), figures], logger=TensorBoardLogger(tmp_path)
    )
    trainer.fit(NoisyLabelClassifier(method="em"), NoisyLabelDataModule(noise_type="symmetric", noise_rate=0.4))
    folder = Path(trainer.log_dir) / "figures"
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png"))
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*.pdf")) == [
        str(Path(name).with_suffix(".pdf")) for name in names
    ]
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
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(trainer.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == sorted(str(Path(name).with_suffix("")) for name in names)
    (grid,) = events.Images("correction_grid")  # TensorBoard holds the PNG as drawn, at its size
    assert (grid.width, grid.height) == Image.open(folder / "correction_grid.png").size


@pytest.mark.parametrize("track_test_accuracy", [True, False])
def test_figure_callback_options_reach_the_grid_and_the_curves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, track_test_accuracy: bool
) -> None:
    """grid_selection and grid_size decide which samples the correction grid shows; track_test_accuracy decides
    whether the curves get a test/acc series (the accuracy of the model on the test set after each epoch)."""
    drawn = []
    draw_grid = plots.correction_grid_figure

    def spy(*args: object, **kwargs: object) -> Figure:
        figure = draw_grid(*args, **kwargs)
        drawn.append((inspect.signature(draw_grid).bind(*args, **kwargs).arguments, figure))
        return figure

    monkeypatch.setattr(plots, "correction_grid_figure", spy)
    L.seed_everything(0)
    figures = NoisyLabelFigures(
        grid_size=3, grid_selection="least_confident", track_test_accuracy=track_test_accuracy, dpi=30
    )
    callbacks = [EMNoiseEstimation(warmup_epochs=1, hold_initial_rounds=0), figures]
    trainer = quiet_trainer(max_epochs=2, default_root_dir=tmp_path, callbacks=callbacks)
    model = NoisyLabelClassifier(net=MLP(hidden_sizes=[32]), method="em")
    datamodule = NoisyLabelDataModule(noise_type="symmetric", noise_rate=0.4)
    trainer.fit(model, datamodule)

    assert [epoch for epoch, _ in figures.history["val/acc_clean"]] == [0, 1]  # the curves are recorded either way
    if track_test_accuracy:
        final_accuracy = (model.logits_of(datamodule.test_images).argmax(dim=1) == datamodule.test_labels).double()
        assert [epoch for epoch, _ in figures.history["test/acc"]] == [0, 1]
        assert figures.history["test/acc"][-1][1] == pytest.approx(final_accuracy.mean().item())
    else:
        assert "test/acc" not in figures.history

    ((arguments, grid),) = drawn
    assert (arguments["selection"], arguments["rows"], arguments["cols"]) == ("least_confident", 3, 3)
    # The 9 changed labels with the lowest confidence, least confident first, as "given→corrected (true)".
    given, corrected, truth, confidence = (
        np.asarray(arguments[key]) for key in ("noisy_labels", "corrected_labels", "true_labels", "confidence")
    )
    changed = np.flatnonzero(given != corrected)
    assert len(changed) >= 9
    chosen = changed[np.argsort(confidence[changed], kind="stable")[:9]]
    assert [ax.get_title() for ax in image_axes(grid)] == [f"{given[i]}→{corrected[i]} ({truth[i]})" for i in chosen]
