"""The data contract: what the model, the EM callback, the figures and the label-issue finder need from the data.

A DataModule serves batches as named tuples, each field with one meaning:

- training:   :class:`TrainBatch` ``(x, label, index)``: ``label`` is the given (possibly wrong) label, ``index``
  the sample's row in the training pool;
- validation: :class:`EvalBatch` ``(x, label, clean_label)``: ``clean_label`` is ``None`` unless the data knows
  the true labels (a synthetic experiment); it feeds metrics only;
- test:       :class:`TestBatch` ``(x, label)``, with the test set's labels taken as correct;
- predict:    :class:`PredictBatch` ``(x,)``.

After ``setup`` it exposes one :class:`NoisyPool`, the training pool (train and validation splits together), and
a way to iterate over rows of it (:class:`NoisyLabelData`). A hand-written DataModule that implements
:class:`NoisyLabelData` works with :class:`~noisy_lightning.callbacks.EMNoiseEstimation`,
:class:`~noisy_lightning.callbacks.NoisyLabelFigures` and :func:`~noisy_lightning.find_label_issues`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor


class TrainBatch(NamedTuple):
    x: Tensor
    label: Tensor
    index: Tensor


class EvalBatch(NamedTuple):
    x: Tensor
    label: Tensor
    clean_label: Tensor | None = None


class TestBatch(NamedTuple):
    x: Tensor
    label: Tensor


class PredictBatch(NamedTuple):
    x: Tensor


@dataclass(frozen=True)
class NoisyPool:
    """The training pool, as every consumer of the data sees it.

    Attributes:
        images: ``[N, ...]`` model-ready inputs (normalised), on the CPU.
        given_labels: ``[N]`` int64 labels as given: what training sees, possibly wrong.
        train_indices: rows trained on (sorted int64).
        val_indices: rows held out for validation (sorted int64, disjoint from ``train_indices``).
        num_classes: the number of classes ``K``.
        clean_labels: ``[N]`` true labels when known (synthetic noise), else ``None``. Evaluation only.
        true_transition_matrix: the ``K x K`` noise matrix ``T`` that corrupted the labels, when known.
        image_shape: ``(C, H, W)`` of one image (``images`` may hold it flattened), or ``None`` for plain features.
    """

    images: Tensor
    given_labels: Tensor
    train_indices: Tensor
    val_indices: Tensor
    num_classes: int
    clean_labels: Tensor | None = None
    true_transition_matrix: Tensor | None = None
    image_shape: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        size = self.given_labels.shape[0]
        if self.images.shape[0] != size:
            raise ValueError(f"the pool has {self.images.shape[0]} images but {size} labels; the counts must match")
        if self.clean_labels is not None and self.clean_labels.shape != self.given_labels.shape:
            raise ValueError(
                f"clean_labels has shape {tuple(self.clean_labels.shape)}, expected {tuple(self.given_labels.shape)}"
            )
        covered = torch.cat([self.train_indices, self.val_indices])
        if covered.numel() and (covered.min() < 0 or covered.max() >= size):
            raise ValueError(f"train_indices and val_indices must lie in [0, {size})")

    @property
    def size(self) -> int:
        """``N``: posterior tables and label-issue tables have this many rows."""
        return self.given_labels.shape[0]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one input, e.g. ``(784,)`` or ``(3, 32, 32)``."""
        return tuple(self.images.shape[1:])

    @property
    def knows_truth(self) -> bool:
        """Whether ground-truth diagnostics (clean labels and the true ``T``) are available."""
        return self.clean_labels is not None and self.true_transition_matrix is not None


@runtime_checkable
class NoisyLabelData(Protocol):
    """What a DataModule offers to EM, the figures and :func:`~noisy_lightning.find_label_issues` after ``setup``.

    ``pool`` is the :class:`NoisyPool`. ``pool_dataloader(indices)`` yields :class:`TrainBatch` es over those rows
    of the pool (all rows when ``None``), in order, unaugmented, on the Trainer's device; under data parallelism,
    each rank gets its own share and the shares cover every requested row exactly once.
    """

    @property
    def pool(self) -> NoisyPool: ...

    def pool_dataloader(self, indices: Tensor | None = None) -> Iterable[TrainBatch]: ...


def require_noisy_label_data(datamodule: object, user: str) -> NoisyLabelData:
    """Return ``datamodule`` if it implements :class:`NoisyLabelData`; else a ``TypeError`` naming ``user``."""
    if datamodule is None or not isinstance(datamodule, NoisyLabelData):
        raise TypeError(
            f"{user} needs a DataModule that implements noisy_lightning.contract.NoisyLabelData (a `pool` property "
            "returning a NoisyPool and a `pool_dataloader(indices)` method), such as NoisyLabelDataModule, passed "
            f"as Trainer.fit(model, datamodule=...); got {type(datamodule).__name__}"
        )
    return datamodule
