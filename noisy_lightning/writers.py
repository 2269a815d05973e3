"""``ResultsWriter``: what ``predict`` writes into the run's folder, as files a user can open."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from noisy_lightning.contract import NoisyLabelData
from noisy_lightning.files import atomic_write
from noisy_lightning.issues import find_label_issues, write_noise_matrix_csv


class ResultsWriter(BasePredictionWriter):
    """At the end of ``predict``, write into ``output_dir`` (default: the run's log folder):

    - ``predictions.csv``: per predicted sample, ``row, predicted_label, probability_0 .. probability_{K-1}``;
    - ``noise_matrix.csv``: the model's ``theta`` (rows = true class, columns = given class);
    - ``label_issues.csv``: :func:`~noisy_lightning.find_label_issues` over the training pool, ranked, when the
      DataModule implements :class:`~noisy_lightning.contract.NoisyLabelData`.

    Files are written on global rank 0, each whole or not at all. The shipped CLI adds this writer to every run.
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = output_dir
        self.written: list[Path] = []

    def _folder(self, trainer: L.Trainer) -> Path:
        return Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)

    def write_on_epoch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        if not trainer.is_global_zero or not predictions:
            return
        folder = self._folder(trainer)
        probabilities = torch.cat([torch.as_tensor(batch) for batch in predictions]).cpu()
        self.written = [self._write_predictions(probabilities, folder / "predictions.csv")]
        self.written.append(write_noise_matrix_csv(pl_module.noise_matrix, folder / "noise_matrix.csv"))
        if isinstance(trainer.datamodule, NoisyLabelData):
            issues = find_label_issues(pl_module, trainer.datamodule)
            self.written.append(issues.to_csv(folder / "label_issues.csv"))
        rank_zero_info("ResultsWriter wrote " + ", ".join(str(path) for path in self.written))

    @staticmethod
    def _write_predictions(probabilities: torch.Tensor, path: Path) -> Path:
        with atomic_write(path, newline="") as stream:
            writer = csv.writer(stream)
            writer.writerow(["row", "predicted_label", *(f"probability_{k}" for k in range(probabilities.shape[1]))])
            for row, values in enumerate(probabilities.tolist()):
                best = max(range(len(values)), key=values.__getitem__)
                writer.writerow([row, best, *(f"{value:.6g}" for value in values)])
        return path
