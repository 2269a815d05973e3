"""Figures for noisy-label experiments: plain matplotlib on tensors or arrays, no Trainer needed.

Every function returns a :class:`matplotlib.figure.Figure` built with the object API (``Figure()``, not
``pyplot``), so it works headless, in scripts, in notebooks (a returned Figure displays itself) and inside
callbacks, and never calls ``plt.show()``. :func:`save_figure` writes each figure twice, as a PNG (150 dpi by
default) and as a PDF with the same stem for papers, each file whole or not at all.

Probabilities are drawn on one sequential scale from 0 to 1 (white to dark blue) and differences on a diverging
scale centred on 0 (blue below, red above), so panels that share a scale can be compared by colour.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import matplotlib
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import MaxNLocator

from noisy_lightning.files import atomic_write
from noisy_lightning.noise import confusion_counts

ArrayLike = np.ndarray | torch.Tensor | Sequence[float]

SEQUENTIAL_CMAP = "Blues"
DIVERGING_CMAP = "RdBu_r"
# Okabe-Ito colours, told apart with the common colour-vision deficiencies; "missed" is also dashed, so the three
# frames stay distinct in greyscale print.
FRAME_COLOURS = {
    "fixed": "#009E73",  # a wrong label that the correction made right
    "broken": "#D55E00",  # a right label that the correction made wrong
    "missed": "#E69F00",  # a wrong label left wrong (unchanged, or changed to another wrong class)
    "changed": "#D55E00",  # truth unknown: the label was changed
}
FRAME_STYLES = {"fixed": "solid", "broken": "solid", "missed": (0, (2, 1)), "changed": "solid"}
FRAME_LABELS = {
    "fixed": "wrong label, corrected",
    "broken": "right label, changed (wrong fix)",
    "missed": "wrong label, missed",
    "changed": "label changed by EM",
}
Selection = Literal["first", "random", "most_confident", "least_confident"]


def _numpy(values: ArrayLike) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _probability_text(value: float) -> str:
    """``0.05`` as ``.05``: probabilities cannot exceed 1, and the shorter text fits a 10 x 10 grid's cells."""
    if abs(value) < 0.005:
        return "0"
    return "1" if value >= 0.995 else f"{value:.2f}".lstrip("0")


def _difference_text(value: float) -> str:
    if abs(value) < 0.005:
        return "0"
    return ("+" if value > 0 else "−") + f"{abs(value):.2f}".lstrip("0")


def _heatmap(
    axes: Axes, matrix: np.ndarray, title: str, text: Callable[[float], str], norm: Normalize, cmap: str
) -> AxesImage:
    image = axes.imshow(matrix, cmap=cmap, norm=norm)
    size = matrix.shape[0]
    font = 7 if size > 6 else 9
    colours = matplotlib.colormaps[cmap](norm(matrix))
    # Text must stay legible on every cell colour: white on dark cells, black on light ones (ITU-R 601 luma).
    luma = colours[..., :3] @ np.array([0.299, 0.587, 0.114])
    for i in range(size):
        for j in range(size):
            colour = "white" if luma[i, j] < 0.5 else "black"
            axes.text(j, i, text(float(matrix[i, j])), ha="center", va="center", fontsize=font, color=colour)
    axes.set_xticks(range(size))
    axes.set_yticks(range(size))
    axes.tick_params(length=0, labelsize=8)
    axes.set_title(title, fontsize=10)
    return image


# Percentages without the sign, which the colour bar's label carries: "100" fits a 10 x 10 grid's cell, "100%" not.
CONFUSION_VIEWS: dict[str, tuple[str, str, Callable[[float], str]]] = {
    "counts": ("counts", "samples", lambda value: f"{value:,.0f}"),
    "per_true": ("% per true class", "% of the true class", lambda value: f"{value:.0f}"),
    "all": ("% of all", "% of all samples", lambda value: f"{value:.1f}"),
}


def _panel_grid(count: int) -> tuple[int, int]:
    """One row up to 3 panels; 4 as 2 x 2, which keeps the figure about as wide as a page."""
    return (1, count) if count <= 3 else (math.ceil(count / 2), 2)


def confusion_matrices_figure(
    comparisons: Mapping[str, tuple[ArrayLike, ArrayLike]],
    num_classes: int,
    views: Sequence[str] = ("per_true",),
    other_name: str = "other label",
    max_panels: int = 4,
) -> Figure:
    """Confusion matrices, one panel per comparison and view; by default at most 4 panels.

    The default view is the matrix normalised per true class (each row sums to 100%): unlike counts, it can be compared
    between a train and a test set of different sizes and between frequent and rare classes, and for given vs
    clean labels it is the realised noise matrix. With one view, the panels are laid out in one row (up to 3)
    or 2 x 2 (4); with several views, one row per comparison and one column per view. A figure of more than
    ``max_panels`` panels is refused rather than drawn too small to read: pass fewer comparisons or views, or a
    larger ``max_panels``. Cells show counts or percentages (without the % sign, which the colour bar's label
    carries). Panels normalised per true class share one colour bar from 0 to 100%; the other views have one each.

    Args:
        comparisons: panel title -> ``(true_labels, other_labels)``, e.g. ``{"train: noisy": (clean, noisy),
            "train: corrected": (clean, corrected), "test: prediction": (test_labels, predictions)}``.
        num_classes: ``K``.
        views: any of ``"counts"``, ``"per_true"`` (rows sum to 100%) and ``"all"`` (the matrix sums to 100%).
        other_name: x-axis label.
        max_panels: the most panels drawn, ``len(comparisons) * len(views)``.
    """
    unknown = [view for view in views if view not in CONFUSION_VIEWS]
    if unknown:
        raise ValueError(f"views must be among {', '.join(map(repr, CONFUSION_VIEWS))}; got {unknown}")
    if not comparisons or not views:
        raise ValueError("comparisons must name at least one (true_labels, other_labels) pair, and views one view")
    panels = [(name, pair, view) for name, pair in comparisons.items() for view in views]
    if len(panels) > max_panels:
        raise ValueError(
            f"{len(comparisons)} comparisons x {len(views)} views make {len(panels)} panels, more than "
            f"max_panels={max_panels}; pass fewer, or raise max_panels"
        )
    rows, cols = _panel_grid(len(panels)) if len(views) == 1 else (len(comparisons), len(views))
    figure = Figure(figsize=(3.5 * cols + 1.0, 3.3 * rows), layout="constrained")
    grid = figure.subplots(rows, cols, squeeze=False)
    shared: list[tuple[Axes, AxesImage]] = []
    for axes, (name, (true_labels, other_labels), view) in zip(grid.flat, panels, strict=False):
        pairs = torch.as_tensor(_numpy(true_labels)), torch.as_tensor(_numpy(other_labels))
        counts = confusion_counts(*pairs, num_classes).numpy().astype(float)
        title, bar_label, text = CONFUSION_VIEWS[view]
        if view == "counts":
            matrix, vmax = counts, max(counts.max(), 1.0)
        elif view == "per_true":
            matrix, vmax = 100 * counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0), 100.0
        else:
            matrix = 100 * counts / max(counts.sum(), 1.0)
            vmax = max(matrix.max(), 1e-12)
        panel_title = name if len(views) == 1 else f"{name}: {title}"
        image = _heatmap(axes, matrix, panel_title, text, Normalize(0.0, vmax), SEQUENTIAL_CMAP)
        axes.set_xlabel(other_name)
        axes.set_ylabel("true label")
        if view == "per_true":
            shared.append((axes, image))
        else:
            figure.colorbar(image, ax=axes, shrink=0.8, label=bar_label)
    for axes in grid.flat[len(panels) :]:
        axes.remove()
    if shared:
        figure.colorbar(shared[0][1], ax=[axes for axes, _ in shared], shrink=0.8, label=CONFUSION_VIEWS["per_true"][1])
    return figure


def noise_matrix_figure(true_matrix: ArrayLike | None, estimate: ArrayLike, title: str = "") -> Figure:
    """The true ``T``, the estimate ``θ̂`` and ``θ̂ − T`` as annotated heatmaps.

    ``T`` and ``θ̂`` share one sequential colour scale from 0 to 1; the difference has its own diverging scale,
    symmetric around 0, from ``−m`` to ``m`` where ``m`` is the largest absolute difference rounded up to a
    multiple of 0.05 (at least 0.05, so that an estimate within 0.01 everywhere does not look saturated).
    Without ``true_matrix`` (real noisy data) only the estimate is drawn. Rows are the true class, columns the
    noisy class: ``T[i, j] = P(noisy = j | true = i)``.
    """
    estimate = _numpy(estimate).astype(float)
    probabilities = [(r"estimate $\hat{\theta}$", estimate)]
    difference = None
    if true_matrix is not None:
        truth = _numpy(true_matrix).astype(float)
        if truth.shape != estimate.shape:
            raise ValueError(f"true_matrix has shape {truth.shape} but estimate has shape {estimate.shape}")
        probabilities.insert(0, ("true $T$", truth))
        difference = estimate - truth
    count = len(probabilities) + (difference is not None)
    figure = Figure(figsize=(3.6 * count + 1.2, 4.0 if title else 3.7), layout="constrained")
    grid = figure.subplots(1, count, squeeze=False)[0]
    image = None
    for axes, (name, matrix) in zip(grid, probabilities, strict=False):
        image = _heatmap(axes, matrix, name, _probability_text, Normalize(0.0, 1.0), SEQUENTIAL_CMAP)
    figure.colorbar(image, ax=list(grid[: len(probabilities)]), shrink=0.8, label="probability")
    if difference is not None:
        limit = max(0.05, math.ceil(np.abs(difference).max() * 20 - 1e-9) / 20)
        image = _heatmap(
            grid[-1], difference, r"$\hat{\theta} - T$", _difference_text, Normalize(-limit, limit), DIVERGING_CMAP
        )
        figure.colorbar(image, ax=grid[-1], shrink=0.8, label="difference")
    for number, axes in enumerate(grid):
        axes.set_xlabel("noisy label")
        # The estimate sits right of T on the same rows, so one "true label" serves both.
        axes.set_ylabel("" if number == 1 and difference is not None else "true label")
    if title:
        figure.suptitle(title)
    return figure


def frame_categories(
    noisy_labels: ArrayLike, corrected_labels: ArrayLike, true_labels: ArrayLike | None = None
) -> list[str | None]:
    """What happened to each label: ``"fixed"``, ``"broken"``, ``"missed"`` or ``None`` (right and unchanged).

    Without ``true_labels`` the only category is ``"changed"`` (the original notebook's red frame).
    """
    noisy, corrected = _numpy(noisy_labels), _numpy(corrected_labels)
    if true_labels is None:
        return ["changed" if n != c else None for n, c in zip(noisy, corrected, strict=True)]
    categories: list[str | None] = []
    for n, c, t in zip(noisy, corrected, _numpy(true_labels), strict=True):
        if n != t:
            categories.append("fixed" if c == t else "missed")
        else:
            categories.append("broken" if c != t else None)
    return categories


def select_samples(
    count: int,
    selection: Selection,
    noisy_labels: ArrayLike,
    corrected_labels: ArrayLike,
    confidence: ArrayLike | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Indices of ``count`` samples: the first ones, random ones, or the most / least confident *changes*.

    ``confidence`` (e.g. ``posterior.max(dim=1)``) is needed for the two confidence orders; when fewer labels
    changed than ``count``, the rest is filled with unchanged samples in the same order.
    """
    noisy, corrected = _numpy(noisy_labels), _numpy(corrected_labels)
    total = len(noisy)
    count = min(count, total)
    if selection == "first":
        return np.arange(count)
    if selection == "random":
        return np.sort(np.random.default_rng(seed).choice(total, size=count, replace=False))
    if selection not in ("most_confident", "least_confident"):
        raise ValueError(
            f"selection must be 'first', 'random', 'most_confident' or 'least_confident'; got {selection!r}"
        )
    if confidence is None:
        raise ValueError(f"selection={selection!r} needs confidence (e.g. the posterior's max per sample)")
    score = _numpy(confidence).astype(float)
    order = np.argsort(-score if selection == "most_confident" else score, kind="stable")
    changed = noisy[order] != corrected[order]
    return np.concatenate([order[changed], order[~changed]])[:count]


def _displayable(image: np.ndarray, image_shape: tuple[int, ...]) -> np.ndarray:
    """One image as ``imshow`` takes it: ``[H, W]`` for one channel, ``[H, W, 3]`` scaled to [0, 1] for RGB."""
    if len(image_shape) == 3 and image_shape[0] == 1:
        image_shape = image_shape[1:]
    if len(image_shape) == 2:
        return image.reshape(image_shape)
    planes = image.reshape(image_shape)[:3].transpose(1, 2, 0)
    low, high = planes.min(), planes.max()
    return (planes - low) / (high - low) if high > low else np.zeros_like(planes)


def correction_grid_figure(
    images: ArrayLike,
    noisy_labels: ArrayLike,
    corrected_labels: ArrayLike,
    true_labels: ArrayLike | None = None,
    rows: int = 10,
    cols: int = 10,
    selection: Selection = "first",
    confidence: ArrayLike | None = None,
    image_shape: tuple[int, ...] = (28, 28),
    class_names: Sequence[str] | None = None,
    seed: int = 0,
) -> Figure:
    """A grid of training images titled ``noisy -> corrected (true)`` with frames that say what the correction did.

    With the truth known, a frame marks a correct fix (green), a wrong change (red) or a missed flip (orange);
    unchanged correct labels get no frame. Without the truth, changed labels get a red frame. See
    :func:`select_samples` for ``selection``.
    """
    images = _numpy(images)
    noisy, corrected = _numpy(noisy_labels), _numpy(corrected_labels)
    truth = None if true_labels is None else _numpy(true_labels)
    chosen = select_samples(rows * cols, selection, noisy, corrected, confidence, seed)
    categories = frame_categories(noisy[chosen], corrected[chosen], None if truth is None else truth[chosen])

    def name(label: int) -> str:
        return class_names[label] if class_names is not None else str(int(label))

    figure_width = max(cols * 0.8, 3.0)
    figure = Figure(figsize=(figure_width, rows * 0.92 + 0.5), layout="constrained")
    grid = figure.subplots(rows, cols, squeeze=False)
    for axes in grid.flat:
        axes.set_axis_off()
    for axes, index, category in zip(grid.flat, chosen, categories, strict=False):
        axes.imshow(_displayable(images[index], image_shape), cmap="gray")
        title = f"{name(noisy[index])}→{name(corrected[index])}"
        if truth is not None:
            title += f" ({name(truth[index])})"
        axes.set_title(title, fontsize=7, pad=2)
        if category is not None:
            height, width = image_shape[-2:]
            frame = Rectangle(
                (-0.5, -0.5),
                width,
                height,
                fill=False,
                edgecolor=FRAME_COLOURS[category],
                linestyle=FRAME_STYLES[category],
                linewidth=2.5,
            )
            axes.add_patch(frame)
    shown = ["fixed", "broken", "missed"] if truth is not None else ["changed"]
    handles = [
        Patch(
            facecolor="none",
            edgecolor=FRAME_COLOURS[key],
            linestyle=FRAME_STYLES[key],
            linewidth=2.0,
            label=FRAME_LABELS[key],
        )
        for key in shown
    ]
    caption = "title: noisy → corrected (true)" if truth is not None else "title: noisy → corrected"
    figure.legend(
        handles=handles,
        loc="outside lower center",
        # Side by side the three entries need about 7.5 inches; a narrower grid stacks them.
        ncols=len(handles) if figure_width >= 7.5 else 1,
        title=caption,
        fontsize=8,
        title_fontsize=8,
        frameon=False,
    )
    return figure


CURVE_PANELS: dict[str, tuple[str, ...]] = {
    "loss": ("train/loss", "val/nll_noisy"),
    "accuracy": ("val/acc_noisy", "val/acc_clean", "test/acc"),
    "EM metrics": ("em/theta_error", "em/label_recovery", "em/flip_precision", "em/flip_recall"),
}


def training_curves_figure(
    history: Mapping[str, Sequence[tuple[int, float]]], em_round_epochs: Sequence[int] = ()
) -> Figure:
    """Loss, accuracies and EM metrics against the epoch, stacked on one shared epoch axis, with a dashed line
    where each EM round ran.

    Args:
        history: metric name -> ``[(epoch, value), ...]`` (e.g. from :func:`read_metrics_csv`). Panels whose
            metrics are all absent are left out.
        em_round_epochs: epochs at whose end an EM round ran.
    """
    panels = {title: [m for m in names if history.get(m)] for title, names in CURVE_PANELS.items()}
    panels = {title: names for title, names in panels.items() if names}
    if not panels:
        raise ValueError(
            f"history has none of the plotted metrics: {sorted({m for v in CURVE_PANELS.values() for m in v})}"
        )
    figure = Figure(figsize=(6.5, 1.9 * len(panels) + 0.5), layout="constrained")
    grid = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for axes, (title, names) in zip(grid, panels.items(), strict=True):
        for metric in names:
            epochs, values = zip(*sorted(history[metric]), strict=True)
            axes.plot(epochs, values, marker="o", markersize=3, label=metric)
        for number, epoch in enumerate(em_round_epochs):
            axes.axvline(epoch, color="grey", linestyle="--", linewidth=0.8, label="EM round" if number == 0 else None)
        axes.set_ylabel(title)
        axes.grid(alpha=0.3)
        # Outside the axes, so the legend never hides a curve.
        axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    grid[-1].set_xlabel("epoch")
    grid[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    return figure


def read_metrics_csv(path: str | os.PathLike[str]) -> dict[str, list[tuple[int, float]]]:
    """Read a ``CSVLogger`` ``metrics.csv`` into ``{metric: [(epoch, value), ...]}`` (epoch-level rows only)."""
    import csv

    history: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            if not row.get("epoch"):
                continue
            epoch = int(float(row["epoch"]))
            for key, value in row.items():
                if key not in ("epoch", "step") and value not in ("", None):
                    history.setdefault(key, []).append((epoch, float(value)))
    return history


def noise_sweep_figure(rows: Sequence[Mapping[str, object]], noise_type: str = "symmetric") -> Figure:
    """Clean test accuracy against the noise rate, baseline (CE) against EM, mean ± std over seeds.

    ``rows`` are records with ``noise_type``, ``noise_rate``, ``recipe`` (``"ce"`` or ``"em"``) and ``test_acc``,
    such as the lines of ``benchmarks/results/quality_mnist.csv``; the clean run (``noise_type="none"``) is
    drawn at rate 0 for both curves.
    """
    figure = Figure(figsize=(5.0, 3.5), layout="constrained")
    axes = figure.subplots()
    for recipe, label, marker in (("ce", "cross-entropy on noisy labels", "s"), ("em", "EM (noisy-lightning)", "o")):
        by_rate: dict[float, list[float]] = {}
        for row in rows:
            kind = str(row["noise_type"])
            if kind == "none" or (kind == noise_type and row["recipe"] == recipe):
                rate = 0.0 if kind == "none" else float(row["noise_rate"])  # type: ignore[arg-type]
                by_rate.setdefault(rate, []).append(100 * float(row["test_acc"]))  # type: ignore[arg-type]
        if not by_rate:
            continue
        rates = sorted(by_rate)
        means = [float(np.mean(by_rate[r])) for r in rates]
        spreads = [float(np.std(by_rate[r])) for r in rates]
        axes.errorbar(rates, means, yerr=spreads, marker=marker, capsize=3, label=label)
    axes.set_xlabel(f"{noise_type} noise rate")
    axes.set_ylabel("clean test accuracy (%)")
    axes.grid(alpha=0.3)
    axes.legend(title="mean ± std over seeds", fontsize=8, title_fontsize=8)
    return figure


def vector_path(path: str | os.PathLike[str]) -> Path:
    """Where :func:`save_figure` writes the PDF that goes with the PNG ``path``: the same stem, ``.pdf``."""
    return Path(path).with_suffix(".pdf")


def save_figure(figure: Figure, path: str | os.PathLike[str], dpi: int = 150) -> Path:
    """Save ``figure`` as the PNG ``path`` at ``dpi`` and as a PDF next to it (:func:`vector_path`).

    Both files are written in full before either replaces a previous version, so a failure while drawing leaves
    both as they were. The PDF embeds its fonts as TrueType (``pdf.fonttype`` 42), which journals and conference
    templates ask for, and carries no creation date, so redrawing the same figure gives the same bytes. Returns
    the PNG's path.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"save_figure writes a PNG and a PDF next to it; path must end in .png, got {path}")
    with (
        matplotlib.rc_context({"pdf.fonttype": 42}),
        atomic_write(path, "wb") as png,
        atomic_write(vector_path(path), "wb") as pdf,
    ):
        figure.savefig(png, dpi=dpi, format="png")
        # Positions from a layout engine are fractions of the figure, the same at any dpi: the PDF keeps the PNG's
        # instead of solving the layout again (the costly part of drawing a figure of many axes).
        engine = figure.get_layout_engine()
        if engine is not None:
            figure.set_layout_engine("none")
        try:
            figure.savefig(pdf, format="pdf", metadata={"CreationDate": None})
        finally:
            if engine is not None:
                figure.set_layout_engine(engine)
    return path
