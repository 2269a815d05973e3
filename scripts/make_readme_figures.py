"""Regenerate the README's figures under docs/ (about a minute on 2 CPU cores, offline).

    python scripts/make_readme_figures.py

- docs/noise_sweep.png: test accuracy against the symmetric noise rate, from benchmarks/results/quality_mnist.csv.
- docs/noise_matrix.png and docs/correction_grid.png: from an EM run on the shipped mnist_sample (50% uniform
  redraw, the original notebook's noise).
"""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L

from noisy_lightning import EMNoiseEstimation, NoisyLabelClassifier, NoisyLabelDataModule, find_label_issues, plots

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def main() -> None:
    with (ROOT / "benchmarks" / "results" / "quality_mnist.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    plots.save_figure(plots.noise_sweep_figure(rows, "symmetric"), DOCS / "noise_sweep.png", dpi=80)

    L.seed_everything(0)
    data = NoisyLabelDataModule(noise_type="uniform", noise_rate=0.5, batch_size=128)
    model = NoisyLabelClassifier(method="em")
    callback = EMNoiseEstimation(warmup_epochs=3)
    trainer = L.Trainer(
        max_epochs=15,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, data)
    title = f"mnist_sample, 50% uniform redraw, after {callback.rounds} EM rounds"
    figure = plots.noise_matrix_figure(data.true_transition_matrix, model.noise_matrix, title)
    plots.save_figure(figure, DOCS / "noise_matrix.png", dpi=70)
    issues = find_label_issues(model, data)
    grid = plots.correction_grid_figure(
        data.pool.images[issues.index],
        issues.given_label,
        issues.corrected_label,
        data.pool.clean_labels[issues.index],
        rows=6,
        cols=12,
        selection="random",
    )
    plots.save_figure(grid, DOCS / "correction_grid.png", dpi=70)
    print("wrote", *sorted(str(p.relative_to(ROOT)) for p in DOCS.glob("*.png")))


if __name__ == "__main__":
    main()
