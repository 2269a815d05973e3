"""``NoisyLabelDataModule``: a training pool with given (possibly wrong) labels, resident in memory.

Where the data comes from:

- a named dataset (``"mnist_sample"``, shipped; ``"mnist"``, ``"fashion_mnist"``, ``"kmnist"`` from IDX files), whose
  clean labels are corrupted on purpose by a noise model;
- :meth:`NoisyLabelDataModule.from_tensors`: the user's images and labels, used as given (the real case: labels
  with mistakes and no clean copy), or corrupted on purpose when clean labels are passed with a noise model;
- :meth:`NoisyLabelDataModule.from_dataset`: any map-style dataset of ``(image, label)``, read once into tensors.

All three go through the same code: the pool is normalised once into one float tensor, its labels are corrupted
once from ``seed`` (when a noise model is set), and it is split into train and validation, both carrying the
given labels (a real user has no clean validation labels). Batches are the named tuples of
:mod:`noisy_lightning.contract`, and :attr:`NoisyLabelDataModule.pool` is the
:class:`~noisy_lightning.contract.NoisyPool` that EM, the figures and :func:`~noisy_lightning.find_label_issues` read.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from noisy_lightning.batching import TensorBatches
from noisy_lightning.checks import check_choice, check_float, check_int
from noisy_lightning.contract import EvalBatch, NoisyPool, PredictBatch, TestBatch, TrainBatch
from noisy_lightning.idx import read_idx
from noisy_lightning.issues import flagged_in_csv
from noisy_lightning.noise import (
    NOISE_TYPES,
    Corruption,
    build_transition_matrix,
    check_labels,
    confusion_counts,
    corrupt_labels,
)

DATA_DIR_ENV = "NOISY_LIGHTNING_DATA"
SAMPLE_DIR = Path(__file__).parent / "data_files" / "mnist_sample"

DatasetName = Literal["mnist_sample", "mnist", "fashion_mnist", "kmnist"]
NoiseType = Literal["none", "symmetric", "uniform", "pair_flip", "permutation", "custom"]


@dataclass(frozen=True)
class _DatasetInfo:
    torchvision_folder: str  # torchvision's <root>/<folder>/raw layout
    mean: float  # pixel statistics of the training set, in [0, 1] units
    std: float
    num_classes: int = 10


DATASETS: dict[str, _DatasetInfo] = {
    "mnist_sample": _DatasetInfo("MNIST", 0.1307, 0.3081),
    "mnist": _DatasetInfo("MNIST", 0.1307, 0.3081),
    "fashion_mnist": _DatasetInfo("FashionMNIST", 0.2860, 0.3530),
    "kmnist": _DatasetInfo("KMNIST", 0.1918, 0.3483),
}
SPLITS = {"train": "train", "test": "t10k"}


def default_data_dir() -> str:
    """``$NOISY_LIGHTNING_DATA`` when set, else ``./data``."""
    return os.environ.get(DATA_DIR_ENV) or "./data"


def _candidate_dirs(dataset: str, data_dir: Path) -> list[Path]:
    """Where a dataset's IDX files may be: torchvision's layout first, then flat folders (Debian's layout)."""
    if dataset == "mnist_sample":
        return [SAMPLE_DIR]
    folder = DATASETS[dataset].torchvision_folder
    flat_names = {"fashion_mnist": ["fashion-mnist", "fashion_mnist"], "mnist": ["mnist"], "kmnist": ["kmnist"]}
    return [data_dir / folder / "raw", data_dir, *(data_dir / name for name in flat_names[dataset])]


def _find_file(directory: Path, stem: str) -> Path | None:
    for name in (stem, f"{stem}.gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def locate_idx_files(dataset: str, data_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Find the four IDX files of ``dataset`` under ``data_dir`` (plain or ``.gz``).

    Raises ``FileNotFoundError`` that lists every folder it looked in and what to do.
    """
    stems = {
        f"{split}_{kind}": f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"
        for split, prefix in SPLITS.items()
        for kind in ("images", "labels")
    }
    candidates = _candidate_dirs(dataset, Path(data_dir).expanduser())
    for directory in candidates:
        found = {key: _find_file(directory, stem) for key, stem in stems.items()}
        if all(found.values()):
            return {key: path for key, path in found.items() if path is not None}
    looked = "\n  ".join(str(directory) for directory in candidates)
    raise FileNotFoundError(
        f"dataset={dataset!r}: could not find the IDX files ({', '.join(stems.values())}, plain or .gz). "
        f"Looked in:\n  {looked}\n"
        f"Point data_dir (or the environment variable {DATA_DIR_ENV}) at the folder that holds "
        f"{DATASETS[dataset].torchvision_folder}/raw/ or the four files, pass download=True where there is internet, "
        "or use dataset='mnist_sample', which ships with the package and needs no download."
    )


def load_split(files: dict[str, Path], split: str, num_classes: int) -> tuple[Tensor, Tensor]:
    """Read one split as ``(uint8 images [N, H, W], int64 labels [N])``, checking that they belong together."""
    images = read_idx(files[f"{split}_images"], expected_ndim=3)
    labels = read_idx(files[f"{split}_labels"], expected_ndim=1)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{files[f'{split}_images']} holds {images.shape[0]} images but {files[f'{split}_labels']} holds "
            f"{labels.shape[0]} labels; the counts must match"
        )
    try:
        labels = check_labels(labels, num_classes, name=f"labels in {files[f'{split}_labels']}")
    except ValueError as error:
        raise ValueError(f"{error}; does num_classes={num_classes} match the data?") from None
    return images, labels


MAX_SEED = 2**63 - 1 - 7919  # the split generator is seeded with seed + 7919


@dataclass(frozen=True)
class RawData:
    """One source's tensors before normalisation and corruption (what a data source hands the DataModule).

    ``labels`` are the training pool's labels as the source has them; ``labels_are_clean`` says whether they are
    the truth (a named dataset) or given labels that may be wrong (user data). ``clean_labels`` are the truth when
    the user knows it. ``mean`` and ``std`` normalise the images (per channel when they have a channel axis).
    """

    images: Tensor
    labels: Tensor
    test_images: Tensor | None
    test_labels: Tensor | None
    mean: Tensor
    std: Tensor
    labels_are_clean: bool
    clean_labels: Tensor | None = None
    image_shape: tuple[int, int, int] | None = None


def normalise(images: Tensor, mean: Tensor, std: Tensor, flatten: bool = False) -> Tensor:
    """``(images / 255 - mean) / std`` for ``uint8`` images, ``(images - mean) / std`` for float ones, as float32.

    ``mean`` and ``std`` broadcast over the channel axis of ``[N, C, H, W]`` images. ``flatten`` gives ``[N, D]``.
    """
    values = images.to(torch.float32, copy=True)  # never normalise the caller's tensor in place
    if images.dtype == torch.uint8:
        values = values.div_(255.0)
    if values.ndim == 4:
        mean, std = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
    values = values.sub_(mean).div_(std)
    return values.reshape(values.shape[0], -1) if flatten else values


def image_statistics(images: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation of training images in model units (``uint8`` scaled to ``[0, 1]``): per
    channel for ``[N, C, H, W]``, one value otherwise."""
    values = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    dims = (0, 2, 3) if values.ndim == 4 else tuple(range(values.ndim))
    mean, std = values.mean(dim=dims), values.std(dim=dims)
    return mean.reshape(-1), std.clamp_min(1e-6).reshape(-1)


def geometry(images: Tensor) -> tuple[int, int, int] | None:
    """``(C, H, W)`` of ``[N, H, W]`` or ``[N, C, H, W]`` images; ``None`` for flat ``[N, D]`` features."""
    if images.ndim == 3:
        return (1, images.shape[1], images.shape[2])
    if images.ndim == 4:
        return (images.shape[1], images.shape[2], images.shape[3])
    return None


def _named_source(dataset: str, data_dir: str, num_classes: int) -> Callable[[], RawData]:
    def load() -> RawData:
        info = DATASETS[dataset]
        files = locate_idx_files(dataset, data_dir)
        train_images, train_labels = load_split(files, "train", num_classes)
        test_images, test_labels = load_split(files, "test", num_classes)
        if train_images.shape[1:] != test_images.shape[1:]:
            raise ValueError(
                f"dataset={dataset!r}: the training images are {tuple(train_images.shape[1:])} but the test images "
                f"are {tuple(test_images.shape[1:])}; both splits must have the same image size"
            )
        statistics = torch.tensor([info.mean]), torch.tensor([info.std])
        return RawData(
            train_images, train_labels, test_images, test_labels, *statistics, True, None, geometry(train_images)
        )

    return load


def _check_images(images: Any, name: str) -> Tensor:
    if not isinstance(images, Tensor):
        raise ValueError(
            f"{name} must be a torch.Tensor of shape [N, D], [N, H, W] or [N, C, H, W]; got {type(images)}"
        )
    if images.ndim not in (2, 3, 4) or images.shape[0] == 0:
        raise ValueError(
            f"{name} must have shape [N, D], [N, H, W] or [N, C, H, W] with N > 0, got {tuple(images.shape)}"
        )
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise ValueError(f"{name} must be uint8 or floating point, got {images.dtype}")
    if images.is_floating_point() and not torch.isfinite(images).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return images.detach().cpu()


class NoisyLabelDataModule(L.LightningDataModule):
    """A training pool with given labels, its train/validation split and a test set, for noisy-label training.

    Args:
        dataset: ``"mnist_sample"`` (5,000 real MNIST digits shipped in the package: 4,000 train pool, 1,000
            test), ``"mnist"``, ``"fashion_mnist"`` or ``"kmnist"``. Your own data: :meth:`from_tensors`,
            :meth:`from_dataset`.
        data_dir: folder with torchvision's layout (``<data_dir>/MNIST/raw/...``) or the four IDX files directly
            (Debian's ``/usr/share/datasets/fashion-mnist``). Default: ``$NOISY_LIGHTNING_DATA``, else ``./data``.
        download: let torchvision download missing files in :meth:`prepare_data`.
        noise_type: one of ``"none"``, ``"symmetric"``, ``"uniform"``, ``"pair_flip"``, ``"permutation"``,
            ``"custom"`` (see :mod:`noisy_lightning.noise` for the exact matrices).
        noise_rate: the rate ``r`` in ``[0, 1)`` of the noise model (0 for ``"none"`` and ``"custom"``).
        transition_matrix: ``K x K`` row-stochastic matrix for ``noise_type="custom"``,
            ``T[i, j] = P(noisy = j | true = i)``.
        seed: seeds the corruption, the train/validation split and the permutation of ``"permutation"`` noise.
        val_fraction: fraction of the training pool held out for validation, in ``(0, 1)``.
        batch_size: samples per training batch (> 0).
        eval_batch_size: samples per validation/test/predict batch; default ``max(batch_size, 1024)``.
        drop_label_issues: a ``label_issues.csv`` written for this same data (by ``predict`` or
            :meth:`~noisy_lightning.LabelIssues.to_csv`): the training samples it flags (``is_issue = 1``) are left
            out of the training split. The validation split keeps all its samples and labels. With a fit on the
            rest this is the "EM + refit" recipe of the results (a file written for other data, another seed or
            another ``val_fraction`` is refused). Label issues found later still list the dropped samples, as
            ``split=train``.

    Loaders are :class:`~noisy_lightning.batching.TensorBatches`, not ``DataLoader``: the data is resident, so a
    batch is one gather per tensor, on the Trainer's device. The training order depends on ``seed`` and the epoch
    only, and a checkpoint saved mid-epoch resumes at the next unseen batch.
    """

    def __init__(
        self,
        dataset: DatasetName = "mnist_sample",
        data_dir: str | None = None,
        download: bool = False,
        noise_type: NoiseType = "none",
        noise_rate: float = 0.0,
        transition_matrix: list[list[float]] | None = None,
        seed: int = 0,
        val_fraction: float = 0.1,
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        drop_label_issues: str | None = None,
    ) -> None:
        super().__init__()
        check_choice("dataset", dataset, DATASETS)
        self.save_hyperparameters()
        self.data_dir = data_dir if data_dir is not None else default_data_dir()
        self.download = download
        num_classes = DATASETS[dataset].num_classes
        self._configure(dataset, _named_source(dataset, self.data_dir, num_classes), num_classes)

    def _configure(self, dataset: str, source: Callable[[], RawData], num_classes: int) -> None:
        """Check and store the settings in ``self.hparams``, shared by every constructor."""
        settings = self.hparams
        noise_type, noise_rate, seed = settings["noise_type"], settings["noise_rate"], settings["seed"]
        transition_matrix, batch_size = settings.get("transition_matrix"), settings["batch_size"]
        val_fraction, eval_batch_size = settings["val_fraction"], settings.get("eval_batch_size")
        check_choice("noise_type", noise_type, NOISE_TYPES)
        if noise_type == "custom" and noise_rate not in (0, 0.0):
            raise ValueError(
                "noise_rate is not used with noise_type='custom' (transition_matrix sets the noise); "
                f"got noise_rate={noise_rate!r}"
            )
        self.seed = check_int("seed", seed, 0, MAX_SEED)
        self.val_fraction = check_float("val_fraction", val_fraction, 0, 1, open_minimum=True, open_maximum=True)
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.eval_batch_size = (
            max(batch_size, 1024) if eval_batch_size is None else check_int("eval_batch_size", eval_batch_size, 1)
        )
        drop_label_issues = settings.get("drop_label_issues")
        if drop_label_issues is not None and not isinstance(drop_label_issues, (str, os.PathLike)):
            raise ValueError(
                "drop_label_issues must be the path of a label_issues.csv or None, got "
                f"{type(drop_label_issues).__name__}"
            )
        self.drop_label_issues = None if drop_label_issues is None else os.fspath(drop_label_issues)
        if self.drop_label_issues is not None:
            if not Path(self.drop_label_issues).is_file():  # fail before a Trainer or run folder is made
                raise ValueError(
                    f"drop_label_issues={self.drop_label_issues!r}: no such file "
                    "(a label_issues.csv written by predict)"
                )
            settings["drop_label_issues"] = self.drop_label_issues  # a str in hparams and configs, not a Path
        self.dataset = dataset
        self.num_classes = num_classes
        self.noise_type = noise_type
        # Built (and so validated) now: a bad rate or matrix fails at construction, not mid-fit.
        self.noise_model: Tensor = build_transition_matrix(noise_type, num_classes, noise_rate, transition_matrix, seed)
        self._source = source
        self.corruption: Corruption | None = None
        self._pool: NoisyPool | None = None
        self._device_tensors: dict[tuple[str, str], tuple[Tensor | None, ...]] = {}

    # ---- your own data -----------------------------------------------------------------------------------------
    @classmethod
    def from_tensors(
        cls,
        images: Tensor,
        labels: Tensor | None = None,
        *,
        test_images: Tensor | None = None,
        test_labels: Tensor | None = None,
        clean_labels: Tensor | None = None,
        num_classes: int | None = None,
        noise_type: NoiseType = "none",
        noise_rate: float = 0.0,
        transition_matrix: Sequence[Sequence[float]] | Tensor | None = None,
        seed: int = 0,
        val_fraction: float = 0.1,
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        drop_label_issues: str | None = None,
    ) -> NoisyLabelDataModule:
        """A DataModule over tensors in memory.

        Args:
            images: ``[N, D]``, ``[N, H, W]`` or ``[N, C, H, W]``, ``uint8`` (0..255) or float. Normalised with the
                training images' mean and standard deviation (per channel for ``[N, C, H, W]``).
            labels: ``[N]`` integer labels, used as given: your labels, mistakes included. Leave out when a noise
                model draws them from ``clean_labels``.
            test_images, test_labels: an optional test set, whose labels are taken as correct.
            clean_labels: ``[N]`` true labels, when known (synthetic experiments). They feed only the evaluation
                metrics, the figures and the ground-truth EM metrics, never training. With a ``noise_type`` other
                than ``"none"``, the training labels are drawn from them by the noise model.
            num_classes: ``K``; default: the largest label + 1.
            The other arguments are those of :class:`NoisyLabelDataModule`.
        """
        images = _check_images(images, "images")
        synthetic = noise_type != "none"
        if synthetic and (clean_labels is None or labels is not None):
            raise ValueError(
                f"noise_type={noise_type!r} draws the training labels from clean_labels: pass clean_labels and "
                "leave labels out (labels are used as given, with noise_type='none')"
            )
        if not synthetic and labels is None:
            raise ValueError("labels is required: the training labels as given (or clean_labels with a noise_type)")
        first_labels = torch.as_tensor(labels if labels is not None else clean_labels)
        if first_labels.ndim != 1 or first_labels.numel() != images.shape[0]:
            which = "labels" if labels is not None else "clean_labels"
            raise ValueError(f"images has {images.shape[0]} samples but {which} has shape {tuple(first_labels.shape)}")
        observed = [torch.as_tensor(t) for t in (labels, clean_labels, test_labels) if t is not None]
        if num_classes is None:
            num_classes = 1 + max(int(t.max()) for t in observed if t.numel())
        check_int("num_classes", num_classes, 2)
        train_labels = check_labels(labels if labels is not None else clean_labels, num_classes, "labels")
        if clean_labels is not None:
            clean_labels = check_labels(clean_labels, num_classes, "clean_labels")
        if train_labels.numel() != images.shape[0]:
            raise ValueError(f"images has {images.shape[0]} samples but labels has {train_labels.numel()}")
        if (test_images is None) != (test_labels is None):
            raise ValueError("test_images and test_labels go together: pass both or neither")
        if test_images is not None:
            test_images = _check_images(test_images, "test_images")
            test_labels = check_labels(test_labels, num_classes, "test_labels")
            if test_images.shape[1:] != images.shape[1:]:
                raise ValueError(
                    f"test_images has per-sample shape {tuple(test_images.shape[1:])} but images has "
                    f"{tuple(images.shape[1:])}; they must match"
                )
            if test_labels.numel() != test_images.shape[0]:
                raise ValueError(
                    f"test_images has {test_images.shape[0]} samples but test_labels has {test_labels.numel()}"
                )
        mean, std = image_statistics(images)
        raw = RawData(
            images, train_labels, test_images, test_labels, mean, std, synthetic, clean_labels, geometry(images)
        )
        datamodule = cls.__new__(cls)
        L.LightningDataModule.__init__(datamodule)
        datamodule.save_hyperparameters(
            {
                "dataset": "tensors",
                "noise_type": noise_type,
                "noise_rate": noise_rate,
                "transition_matrix": transition_matrix,
                "seed": seed,
                "val_fraction": val_fraction,
                "batch_size": batch_size,
                "eval_batch_size": eval_batch_size,
                "num_classes": num_classes,
                "drop_label_issues": None if drop_label_issues is None else os.fspath(drop_label_issues),
            }
        )
        datamodule.data_dir, datamodule.download = "", False
        datamodule._configure("tensors", lambda: raw, num_classes)
        return datamodule

    @classmethod
    def from_dataset(cls, train: Any, test: Any | None = None, **kwargs: Any) -> NoisyLabelDataModule:
        """A DataModule over any map-style dataset of ``(image, label)`` pairs (e.g. torchvision's ``ImageFolder``).

        The datasets are read once into tensors (a progress bar appears when that takes more than two seconds).
        Images may be tensors, numpy arrays or PIL images (converted with ``pil_to_tensor``; all must have the same
        size). ``kwargs`` are those of :meth:`from_tensors`; the labels are used as given.
        """
        images, labels = read_dataset(train, "train")
        if test is not None:
            kwargs["test_images"], kwargs["test_labels"] = read_dataset(test, "test")
        return cls.from_tensors(images, labels, **kwargs)

    # ---- preparing the data ------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Download (when ``download=True``) and check that the files are there; runs on one process per node."""
        if self.dataset not in DATASETS or self.dataset == "mnist_sample":
            return
        if self.download:
            self._download()
        locate_idx_files(self.dataset, self.data_dir)

    def _download(self) -> None:
        from torchvision import datasets

        dataset_class = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST, "kmnist": datasets.KMNIST}
        try:
            for train in (True, False):
                dataset_class[self.dataset](self.data_dir, train=train, download=True)
        except Exception as error:  # torchvision raises RuntimeError/URLError/OSError depending on the failure
            raise RuntimeError(
                f"download of dataset={self.dataset!r} into data_dir={self.data_dir!r} failed ({error}). "
                f"Without internet, put the IDX files under data_dir (or set {DATA_DIR_ENV}), "
                "or use dataset='mnist_sample', which ships with the package."
            ) from error

    def setup(self, stage: str | None = None) -> None:
        """Load the tensors, corrupt the training labels (with a noise model) and split the pool. The same on every
        process; later calls return at once."""
        if self._pool is not None:
            return
        raw = self._source()
        pool_size = raw.labels.numel()
        num_val = round(self.val_fraction * pool_size)
        if not 0 < num_val < pool_size:
            raise ValueError(
                f"val_fraction={self.val_fraction} leaves {num_val} validation and {pool_size - num_val} training "
                f"samples out of {pool_size}; both must be at least 1"
            )
        clean, truth = raw.clean_labels, None
        if raw.labels_are_clean:  # the noise model draws the given labels from the truth
            clean = raw.clean_labels if raw.clean_labels is not None else raw.labels
            self.corruption = corrupt_labels(clean, self.noise_model, self.seed)
            given, truth = self.corruption.noisy_labels, self.noise_model
        else:
            given = raw.labels
            if clean is not None:  # the realised noise is the truth that theta is measured against
                self.corruption = Corruption(
                    given, (given != clean).double().mean().item(), confusion_counts(clean, given, self.num_classes)
                )
                truth = self.corruption.realised_transition_matrix
        # The split gets its own stream, so changing the noise never moves samples between train and val.
        order = torch.randperm(pool_size, generator=torch.Generator().manual_seed(self.seed + 7919))
        train_indices = order[num_val:].sort().values
        if self.drop_label_issues is not None:
            flagged = flagged_in_csv(self.drop_label_issues, given, val_indices=order[:num_val])
            kept = train_indices[~flagged[train_indices]]
            if kept.numel() == 0:
                raise ValueError(f"drop_label_issues={self.drop_label_issues!r} flags every training sample")
            rank_zero_info(
                f"drop_label_issues: left out {train_indices.numel() - kept.numel()} flagged training labels of "
                f"{train_indices.numel()} ({self.drop_label_issues})"
            )
            train_indices = kept
        flat = raw.image_shape is not None and raw.images.ndim == 3  # MNIST-like [N, H, W]: MLP-ready [N, H*W]
        self._pool = NoisyPool(
            images=normalise(raw.images, raw.mean, raw.std, flatten=flat),
            given_labels=given,
            train_indices=train_indices,
            val_indices=order[:num_val].sort().values,
            num_classes=self.num_classes,
            clean_labels=clean,
            true_transition_matrix=truth,
            image_shape=raw.image_shape,
        )
        self.test_images = None if raw.test_images is None else normalise(raw.test_images, raw.mean, raw.std, flat)
        self.test_labels = raw.test_labels

    # ---- public views ------------------------------------------------------------------------------------------
    @property
    def is_set_up(self) -> bool:
        """Whether :meth:`setup` has loaded the data."""
        return self._pool is not None

    @property
    def pool(self) -> NoisyPool:
        """The training pool (train + validation) after :meth:`setup`: what EM and the label-issue finder read."""
        if self._pool is None:
            raise RuntimeError("the DataModule is not set up yet: call setup() or pass it to a Trainer first")
        return self._pool

    @property
    def true_transition_matrix(self) -> Tensor | None:
        """The noise matrix ``T`` behind the given labels when known: the noise model for synthetic noise, the
        realised confusion for given labels with known clean labels, ``None`` otherwise."""
        if self._pool is not None:
            return self._pool.true_transition_matrix
        return self.noise_model if self.dataset in DATASETS else None

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        """``(C, H, W)`` of one image, or ``None`` for flat feature vectors."""
        return self.pool.image_shape

    # ---- loaders -----------------------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        trainer = self.trainer
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _split(self, name: str) -> tuple[Tensor | None, ...]:
        """The tensors of one split on the Trainer's device, built there once: GPU runs never copy per batch."""
        device = self._device()
        key = (name, str(device))
        if key not in self._device_tensors:
            pool = self.pool
            if name == "pool":
                tensors: tuple[Tensor | None, ...] = (pool.images, pool.given_labels, pool.clean_labels)
            elif name == "test":
                if self.test_images is None:
                    raise RuntimeError("this DataModule has no test set: pass test_images and test_labels")
                tensors = (self.test_images, self.test_labels)
            else:
                images, given, clean = self._split("pool")
                index = (pool.train_indices if name == "train" else pool.val_indices).to(device)
                tensors = (
                    images[index],
                    given[index],
                    index if name == "train" else None if clean is None else clean[index],
                )
            self._device_tensors[key] = tuple(None if t is None else t.to(device) for t in tensors)
        return self._device_tensors[key]

    def _loader(
        self, tensors: tuple[Tensor | None, ...], batch_type: type, batch_size: int, training: bool
    ) -> TensorBatches:
        trainer = self.trainer
        world_size, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        return TensorBatches(
            tensors,
            batch_size,
            shuffle=training,
            seed=self.seed,
            num_replicas=world_size,
            rank=rank,
            # Training shards are padded to equal length (DDP needs equal step counts; EM averages the repeats);
            # evaluation shards are not, so every validation and test sample is counted exactly once.
            pad=training,
            batch_type=batch_type,
        )

    def train_dataloader(self) -> TensorBatches:
        """:class:`~noisy_lightning.contract.TrainBatch` es of the training split, reshuffled every epoch."""
        return self._loader(self._split("train"), TrainBatch, self.batch_size, training=True)

    def val_dataloader(self) -> TensorBatches:
        """:class:`~noisy_lightning.contract.EvalBatch` es of the validation split (given and known clean labels)."""
        return self._loader(self._split("val"), EvalBatch, self.eval_batch_size, training=False)

    def test_dataloader(self) -> TensorBatches:
        """:class:`~noisy_lightning.contract.TestBatch` es of the test set."""
        return self._loader(self._split("test"), TestBatch, self.eval_batch_size, training=False)

    def predict_dataloader(self) -> TensorBatches:
        """:class:`~noisy_lightning.contract.PredictBatch` es of the test set, or of the pool when there is none."""
        tensors = self._split("test")[:1] if self.test_images is not None else self._split("pool")[:1]
        return self._loader(tensors, PredictBatch, self.eval_batch_size, training=False)

    def pool_dataloader(self, indices: Tensor | None = None) -> TensorBatches:
        """:class:`~noisy_lightning.contract.TrainBatch` es over the pool (or ``indices`` of it), in order, unpadded."""
        images, given, _ = self._split("pool")
        index = (torch.arange(self.pool.size) if indices is None else indices).to(images.device)
        return self._loader((images[index], given[index], index), TrainBatch, self.eval_batch_size, training=False)

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, object]:
        """What a resumed run must agree with: the noise model, the seed, the split, the batch size and
        fingerprints of the given labels and of the images."""
        state: dict[str, object] = {
            "dataset": self.dataset,
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "batch_size": self.batch_size,
            "noise_model": self.noise_model.clone(),
        }
        if self._pool is not None:
            state["labels_checksum"] = _checksum(self._pool.given_labels)
            state["images_checksum"] = _checksum(self._pool.images)
            state["train_checksum"] = _checksum(self._pool.train_indices)
        return state

    def load_state_dict(self, state_dict: dict[str, object]) -> None:
        """Refuse to resume when the checkpoint was made with other data or another data configuration."""
        mismatches = [
            f"{key} (checkpoint: {state_dict[key]!r}, now: {getattr(self, key)!r})"
            for key in ("dataset", "seed", "val_fraction", "batch_size")
            if key in state_dict and state_dict[key] != getattr(self, key)
        ]
        saved_matrix = state_dict.get("noise_model")
        if isinstance(saved_matrix, Tensor) and not torch.equal(saved_matrix, self.noise_model):
            mismatches.append("noise model (noise_type / noise_rate / transition_matrix)")
        if self._pool is not None:
            for key, tensor, what in (
                ("labels_checksum", self._pool.given_labels, "labels (the data differs)"),
                ("images_checksum", self._pool.images, "images (the data differs)"),
            ):
                if state_dict.get(key) not in (None, _checksum(tensor)):
                    mismatches.append(what)
            # Another seed, val_fraction or data moves the training split too: name it only when nothing else does.
            if not mismatches and state_dict.get("train_checksum") not in (None, _checksum(self._pool.train_indices)):
                mismatches.append("training split (drop_label_issues differs)")
        if mismatches:
            raise ValueError(
                "this checkpoint was trained with another data configuration: "
                f"{'; '.join(mismatches)}. Use the checkpoint's data settings, or start a new run without ckpt_path."
            )


def _checksum(tensor: Tensor) -> int:
    """CRC32 of the tensor's bytes (about 50 ms for full MNIST's images)."""
    return zlib.crc32(tensor.detach().cpu().contiguous().numpy().tobytes())


def read_dataset(dataset: Any, name: str) -> tuple[Tensor, Tensor]:
    """Read a map-style dataset of ``(image, label)`` into ``(images [N, ...], labels [N])`` tensors."""
    from tqdm.auto import tqdm

    try:
        size = len(dataset)
    except TypeError:
        raise ValueError(f"{name} must be a map-style dataset with a length, got {type(dataset).__name__}") from None
    if size == 0:
        raise ValueError(f"{name} dataset is empty")
    images, labels = [], []
    for position in tqdm(range(size), desc=f"reading the {name} dataset", delay=2.0, leave=False):
        item = dataset[position]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise ValueError(f"{name} dataset item {position} is not an (image, label) pair: {type(item).__name__}")
        images.append(_as_tensor_image(item[0], name, position))
        labels.append(int(item[1]))
    shapes = {tuple(image.shape) for image in images}
    if len(shapes) > 1:
        raise ValueError(f"{name} dataset images have different shapes {sorted(shapes)[:3]}; resize them to one size")
    return torch.stack(images), torch.tensor(labels)


def _as_tensor_image(image: Any, name: str, position: int) -> Tensor:
    if isinstance(image, Tensor):
        return image
    if hasattr(image, "getbands"):  # a PIL image
        from torchvision.transforms.functional import pil_to_tensor

        return pil_to_tensor(image)
    try:
        return torch.as_tensor(image)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(
            f"{name} dataset item {position}: cannot turn a {type(image).__name__} into a tensor"
        ) from None
