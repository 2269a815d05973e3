"""Figures for noisy-label experiments: plain matplotlib on tensors or arrays, no Trainer needed.

Every function returns a :class:`matplotlib.figure.Figure` built with the object API (``Figure()``, not
``pyplot``), so it works headless, in scripts, in notebooks (a returned Figure displays itself) and inside
callbacks, and never calls ``plt.show()``. :func:`save_figure` writes a PNG atomically.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from noisy_lightning.files import atomic_write
from noisy_lightning.noise import confusion_counts

ArrayLike = np.ndarray | torch.Tensor | Sequence[float]

FRAME_COLOURS = {
    "fixed": "#1a9850",  # a wrong label that the correction made right
    "broken": "#d73027",  # a right label that the correction made wrong
    "missed": "#fc8d59",  # a wrong label left wrong (unchanged, or changed to another wrong class)
    "changed": "#d73027",  # truth unknown: the label was changed
}
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


def _heatmap(axes, matrix: np.ndarray, title: str, fmt: str, vmin: float, vmax: float, cmap: str) -> object:
    image = axes.imshow(matrix, cmap=cmap, vmin=vmin, vmax=vmax)
    size = matrix.shape[0]
    font = 7 if size > 8 else 9
    # Dark text on the light end of the colour map, light text on the dark end (viridis); the diverging map is
    # light around 0 where most entries sit, so it always takes dark text.
    light_above = vmin + 0.55 * (vmax - vmin)
    for i in range(size):
        for j in range(size):
            value = matrix[i, j]
            colour = "black" if cmap == "RdBu_r" or value > light_above else "white"
            axes.text(j, i, format(value, fmt), ha="center", va="center", fontsize=font, color=colour)
    axes.set_xticks(range(size))
    axes.set_yticks(range(size))
    axes.set_title(title, fontsize=10)
    return image


CONFUSION_VIEWS = {
    "counts": ("counts", ","),
    "per_true": ("normalised per true class", ".0%"),
    "all": ("normalised over all", ".1%"),
}


def confusion_matrices_figure(
    comparisons: Mapping[str, tuple[ArrayLike, ArrayLike]],
    num_classes: int,
    views: Sequence[str] = ("counts", "per_true", "all"),
    other_name: str = "other label",
) -> Figure:
    """A grid of confusion matrices: one row per comparison, one column per view (the original notebook's 2 x 3).

    Args:
        comparisons: row title -> ``(true_labels, other_labels)``, e.g. ``{"train: noisy": (clean, noisy),
            "train: corrected": (clean, corrected), "test: prediction": (test_labels, predictions)}``.
        num_classes: ``K``.
        views: any of ``"counts"``, ``"per_true"`` (rows sum to 1) and ``"all"`` (the matrix sums to 1).
        other_name: x-axis label.
    """
    unknown = [view for view in views if view not in CONFUSION_VIEWS]
    if unknown:
        raise ValueError(f"views must be among {', '.join(map(repr, CONFUSION_VIEWS))}; got {unknown}")
    if not comparisons:
        raise ValueError("comparisons must name at least one (true_labels, other_labels) pair")
    rows, cols = len(comparisons), len(views)
    figure = Figure(figsize=(4.6 * cols, 4.1 * rows), layout="constrained")
    grid = figure.subplots(rows, cols, squeeze=False)
    for row, (name, (true_labels, other_labels)) in enumerate(comparisons.items()):
        pairs = torch.as_tensor(_numpy(true_labels)), torch.as_tensor(_numpy(other_labels))
        counts = confusion_counts(*pairs, num_classes).numpy().astype(float)
        for col, view in enumerate(views):
            axes = grid[row, col]
            title, fmt = CONFUSION_VIEWS[view]
            if view == "counts":
                matrix, vmax = counts, max(counts.max(), 1.0)
            elif view == "per_true":
                matrix, vmax = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0), 1.0
            else:
                matrix = counts / max(counts.sum(), 1.0)
                vmax = max(matrix.max(), 1e-12)
            image = _heatmap(axes, matrix, f"{name}: {title}", fmt if view != "counts" else ".0f", 0.0, vmax, "viridis")
            figure.colorbar(image, ax=axes, shrink=0.8)
            axes.set_xlabel(other_name)
            axes.set_ylabel("true label")
    return figure


def noise_matrix_figure(true_matrix: ArrayLike | None, estimate: ArrayLike, title: str = "") -> Figure:
    """The true ``T``, the estimate ``theta`` and ``theta - T`` as annotated heatmaps on one colour scale.

    Without ``true_matrix`` (real noisy data) only the estimate is drawn. Rows are the true class, columns the
    noisy class: ``T[i, j] = P(noisy = j | true = i)``.
    """
    estimate = _numpy(estimate).astype(float)
    panels = [("estimate θ̂", estimate)]
    if true_matrix is not None:
        truth = _numpy(true_matrix).astype(float)
        if truth.shape != estimate.shape:
            raise ValueError(f"true_matrix has shape {truth.shape} but estimate has shape {estimate.shape}")
        panels = [("true T", truth), ("estimate θ̂", estimate), ("θ̂ − T", estimate - truth)]
    figure = Figure(figsize=(4.4 * len(panels) + 0.8, 4.3), layout="constrained")
    grid = figure.subplots(1, len(panels), squeeze=False)[0]
    image = None
    for axes, (name, matrix) in zip(grid, panels, strict=True):
        image = _heatmap(axes, matrix, name, ".2f", -1.0, 1.0, "RdBu_r")
        axes.set_xlabel("noisy label")
        axes.set_ylabel("true label")
    figure.colorbar(image, ax=list(grid), shrink=0.8)
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

    figure = Figure(figsize=(cols * 1.05, rows * 1.2 + 0.6), layout="constrained")
    grid = figure.subplots(rows, cols, squeeze=False)
    for axes in grid.flat:
        axes.set_axis_off()
    for axes, index, category in zip(grid.flat, chosen, categories, strict=False):
        axes.imshow(_displayable(images[index], image_shape), cmap="gray")
        title = f"{name(noisy[index])}→{name(corrected[index])}"
        if truth is not None:
            title += f" ({name(truth[index])})"
        axes.set_title(title, fontsize=7, pad=2, color=FRAME_COLOURS[category] if category else "black")
        if category is not None:
            height, width = image_shape[-2:]
            axes.add_patch(
                Rectangle((-0.5, -0.5), width, height, fill=False, edgecolor=FRAME_COLOURS[category], linewidth=3.5)
            )
    shown = ["fixed", "broken", "missed"] if truth is not None else ["changed"]
    handles = [
        Patch(facecolor="none", edgecolor=FRAME_COLOURS[key], linewidth=2.5, label=FRAME_LABELS[key]) for key in shown
    ]
    caption = "title: noisy → corrected (true)" if truth is not None else "title: noisy → corrected"
    figure.legend(handles=handles, loc="outside lower center", ncols=len(handles), title=caption, fontsize=8)
    return figure


CURVE_PANELS: dict[str, tuple[str, ...]] = {
    "loss": ("train/loss", "val/nll_noisy"),
    "accuracy": ("val/acc_noisy", "val/acc_clean", "test/acc"),
    "EM": ("em/theta_error", "em/label_recovery", "em/flip_precision", "em/flip_recall"),
}


def training_curves_figure(
    history: Mapping[str, Sequence[tuple[int, float]]], em_round_epochs: Sequence[int] = ()
) -> Figure:
    """Loss, accuracies and EM metrics against the epoch, with a dashed line where each EM round ran.

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
    figure = Figure(figsize=(5.0 * len(panels), 3.8), layout="constrained")
    grid = figure.subplots(1, len(panels), squeeze=False)[0]
    for axes, (title, names) in zip(grid, panels.items(), strict=True):
        for metric in names:
            epochs, values = zip(*sorted(history[metric]), strict=True)
            axes.plot(epochs, values, marker="o", markersize=3, label=metric)
        for number, epoch in enumerate(em_round_epochs):
            axes.axvline(epoch, color="grey", linestyle="--", linewidth=0.8, label="EM round" if number == 0 else None)
        axes.set_title(title)
        axes.set_xlabel("epoch")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
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
    figure = Figure(figsize=(5.5, 4.0), layout="constrained")
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
    axes.legend()
    return figure


def save_figure(figure: Figure, path: str | os.PathLike[str], dpi: int = 100) -> Path:
    """Save ``figure`` as a PNG; the file appears whole or not at all."""
    path = Path(path)
    with atomic_write(path, "wb") as stream:
        figure.savefig(stream, dpi=dpi, format="png")
    return path
