"""Draw the README's figures into docs/, each as a PNG (150 dpi) and a PDF with the same stem.

    MPLBACKEND=Agg python scripts/make_readme_figures.py

It runs offline, seeded, in about a minute on 2 CPU cores.

- docs/noise_sweep.{png,pdf}: clean test accuracy against the symmetric noise rate, cross-entropy on the noisy
  labels against EM, mean ± std over seeds, read from benchmarks/results/quality_mnist.csv (written by
  benchmarks/quality.py on full MNIST).
- docs/noise_matrix.{png,pdf}: the true noise matrix T, EM's estimate θ̂ and θ̂ − T after an EM run (15 epochs,
  the first 3 a warm-up) on the shipped mnist_sample (4,000 training-pool and 1,000 test digits), each
  training-pool label redrawn uniformly over the 10 classes with probability 0.5 (the original notebook's noise).
- docs/correction_grid.{png,pdf}: 72 random training-pool digits of that run, titled noisy label → EM's
  corrected label (true label) and framed by what the correction did.
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
    plots.save_figure(plots.noise_sweep_figure(rows, "symmetric"), DOCS / "noise_sweep.png")

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
    plots.save_figure(figure, DOCS / "noise_matrix.png")
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
    plots.save_figure(grid, DOCS / "correction_grid.png")
    print("wrote", *sorted(str(p.relative_to(ROOT)) for p in DOCS.glob("*.p[nd][gf]")))


if __name__ == "__main__":
    main()
