"""Which given labels are wrong: the posterior of the true label under the fitted network and ``theta``.

:func:`find_label_issues` scores every sample of the training pool (train and validation splits) with the final
network and the model's noise matrix, and returns a :class:`LabelIssues` table ranked from the most to the least
likely wrong label. It answers the question that cleanlab's ``find_label_issues`` answers, from the EM model
instead of out-of-fold predictions.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from noisy_lightning.contract import NoisyPool, require_noisy_label_data
from noisy_lightning.files import atomic_write


def score_pool(model: L.LightningModule, pool: NoisyPool, batch_size: int = 4096) -> tuple[Tensor, Tensor]:
    """``(p(y | x), posterior c)`` for every row of ``pool``, on the CPU, from ``model`` in eval mode.

    ``c[t, i] ∝ p(y = i | x_t) theta[i, z_t]`` with the model's noise matrix ``theta`` (the identity for a
    cross-entropy model, where ``c = p(y | x)``; the sample's own ``theta(x_t)`` for ``method="nal_complex"``).
    """
    logits, features = model.outputs_of(pool.images, batch_size)
    theta_device = model.noise_layer.noise_matrix.device
    chunks = []
    # batch_size rows at a time: the complex noise adaptation layer builds a K x K matrix per sample
    for start in range(0, len(logits), batch_size):
        rows = slice(start, start + batch_size)
        chunk_features = None if features is None else features[rows].to(theta_device)
        labels = pool.given_labels[rows].to(theta_device)
        chunks.append(model.noise_layer.posterior(logits[rows].to(theta_device), labels, chunk_features).cpu())
    posterior = torch.cat(chunks)
    return torch.softmax(logits, dim=1), posterior


@dataclass(frozen=True)
class LabelIssues:
    """Per-sample verdicts on the given labels of the training pool, ranked by :attr:`score` (lowest first).

    Attributes (one row per pool sample, all in the same ranked order):
        index: the sample's row in the training pool (``datamodule.pool``).
        given_label: the label as given.
        posterior: ``[N, K]`` posterior of the true label, ``c[t, i] = P(y = i | x_t, z_t)``.
        corrected_label: ``argmax_i c[t, i]``.
        score: label quality ``c[t, z_t]`` in ``[0, 1]``, the posterior probability that the given label is the
            true one; lower means more likely wrong. (cleanlab's default ``label_quality`` is the
            "self-confidence" ``p(y = z_t | x_t)`` of out-of-fold predictions; this score also weighs in the
            noise matrix, through ``theta[:, z_t]``.)
        is_issue: ``corrected_label != given_label``: some other class is more probable than the given one.
        in_validation: whether the sample is in the validation split (never trained on).
        noise_matrix: the model's ``theta``, ``theta[i, j] = P(given = j | true = i)``, rows = true class
            (for ``method="nal_complex"``, ``softmax(b)``, its noise at ``h(x) = 0``). cleanlab's ``noise_matrix``
            is its transpose, ``P(given = i | true = j)``.
    """

    index: Tensor
    given_label: Tensor
    posterior: Tensor
    corrected_label: Tensor
    score: Tensor
    is_issue: Tensor
    in_validation: Tensor
    noise_matrix: Tensor

    def __len__(self) -> int:
        return self.index.numel()

    @property
    def num_issues(self) -> int:
        return int(self.is_issue.sum())

    def to_csv(self, path: str | os.PathLike[str]) -> Path:
        """Write one row per sample, ranked: ``index, given_label, corrected_label, score, is_issue, split,
        posterior_0 .. posterior_{K-1}``. The file appears whole or not at all."""
        path = Path(path)
        num_classes = self.posterior.shape[1]
        with atomic_write(path, newline="") as stream:
            writer = csv.writer(stream)
            header = ["index", "given_label", "corrected_label", "score", "is_issue", "split"]
            writer.writerow(header + [f"posterior_{k}" for k in range(num_classes)])
            for row in range(len(self)):
                writer.writerow(
                    [
                        int(self.index[row]),
                        int(self.given_label[row]),
                        int(self.corrected_label[row]),
                        f"{float(self.score[row]):.6g}",
                        int(self.is_issue[row]),
                        "validation" if self.in_validation[row] else "train",
                        *(f"{value:.6g}" for value in self.posterior[row].tolist()),
                    ]
                )
        return path


def flagged_in_csv(path: str | os.PathLike[str], given_labels: Tensor, val_indices: Tensor | None = None) -> Tensor:
    """Which samples of a pool a ``label_issues.csv`` (:meth:`LabelIssues.to_csv`) flags, in pool order.

    The file must have been written for this pool: one row per sample (``index`` covering ``0 .. N-1`` once
    each) with the same ``given_label`` as ``given_labels`` and, when ``val_indices`` is given, ``split =
    validation`` on exactly those rows. Anything else (another dataset, noise setting, seed or ``val_fraction``, a
    truncated file) is refused with a ``ValueError`` naming the file, rather than dropping the wrong samples.

    Returns:
        ``[N]`` bool, ``True`` where the row's ``is_issue`` is 1.
    """
    path = Path(path)
    name = f"drop_label_issues={str(path)!r}"
    size = given_labels.numel()
    if not path.is_file():
        raise ValueError(f"{name}: no such file (a label_issues.csv written by predict)")
    required = ("index", "given_label", "is_issue", "split")
    with path.open(newline="") as stream:
        reader = csv.DictReader(stream)
        missing = [column for column in required if column not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{name} has no column {', '.join(missing)}: not a label_issues.csv")
        try:
            rows = [
                (int(row["index"]), int(row["given_label"]), int(row["is_issue"]), row["split"] == "validation")
                for row in reader
            ]
        except (TypeError, ValueError):
            raise ValueError(
                f"{name}: row {reader.line_num} is not whole (index, given_label and is_issue must be integers); "
                "the file may be truncated"
            ) from None
    if len(rows) != size:
        raise ValueError(
            f"{name} has {len(rows)} rows but this data's training pool has {size} samples: the file was written "
            "for other data (or is truncated)"
        )
    index = torch.tensor([row[0] for row in rows], dtype=torch.long)
    in_range = bool(((index >= 0) & (index < size)).all())
    if not in_range or torch.unique(index).numel() != size:
        raise ValueError(f"{name}: its index column must hold each of 0..{size - 1} once; the file is damaged")
    given = torch.tensor([row[1] for row in rows], dtype=torch.long)
    differ = int((given_labels.long()[index] != given).sum())
    if differ:
        raise ValueError(
            f"{name}: its given_label differs from this data's at {differ} of {size} samples; it was written for "
            "another dataset, noise setting or seed"
        )
    if val_indices is not None:
        in_validation = torch.zeros(size, dtype=torch.bool)
        in_validation[index] = torch.tensor([row[3] for row in rows], dtype=torch.bool)
        expected = torch.zeros(size, dtype=torch.bool)
        expected[val_indices] = True
        if not torch.equal(in_validation, expected):
            raise ValueError(
                f"{name}: its validation split differs from this data's at {int((in_validation != expected).sum())} "
                "samples; it was written with another seed or val_fraction"
            )
    flagged = torch.zeros(size, dtype=torch.bool)
    flagged[index] = torch.tensor([row[2] == 1 for row in rows], dtype=torch.bool)
    return flagged


def write_noise_matrix_csv(noise_matrix: Tensor, path: str | os.PathLike[str]) -> Path:
    """Write ``theta`` as CSV: a header ``true_class, given_0 .. given_{K-1}``, then one row per true class."""
    path = Path(path)
    with atomic_write(path, newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["true_class", *(f"given_{j}" for j in range(noise_matrix.shape[1]))])
        for i, row in enumerate(noise_matrix.double().cpu().tolist()):
            writer.writerow([i, *(f"{value:.6g}" for value in row)])
    return path


def find_label_issues(model: L.LightningModule, datamodule: L.LightningDataModule) -> LabelIssues:
    """Rank the given labels of ``datamodule``'s training pool by how likely they are to be wrong.

    Args:
        model: a fitted :class:`~noisy_lightning.NoisyLabelClassifier` (any method; with ``"ce"`` the posterior is
            the network's ``p(y | x)``).
        datamodule: a DataModule implementing :class:`~noisy_lightning.contract.NoisyLabelData`; set up here if
            it is not yet.

    Returns:
        :class:`LabelIssues`, sorted by ``score`` ascending (ties by pool index), so the first rows are the labels
        most likely wrong.
    """
    data = require_noisy_label_data(datamodule, "find_label_issues")
    if not getattr(datamodule, "is_set_up", True):
        datamodule.setup("fit")
    pool = data.pool
    if model.noise_layer.num_classes != pool.num_classes:
        raise ValueError(f"the model has {model.noise_layer.num_classes} classes but the data has {pool.num_classes}")
    _, posterior = score_pool(model, pool)
    given = pool.given_labels.long()
    score = posterior.gather(1, given.unsqueeze(1)).squeeze(1)
    order = torch.argsort(score, stable=True)
    corrected = posterior.argmax(dim=1)
    in_validation = torch.zeros(pool.size, dtype=torch.bool)
    in_validation[pool.val_indices] = True
    return LabelIssues(
        index=order,
        given_label=given[order],
        posterior=posterior[order],
        corrected_label=corrected[order],
        score=score[order],
        is_issue=(corrected != given)[order],
        in_validation=in_validation[order],
        noise_matrix=model.noise_layer.noise_matrix.detach().cpu().double(),
    )
