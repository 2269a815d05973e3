"""``NoisyLabelDataModule``: MNIST and its siblings, resident in memory, with reproducibly corrupted labels.

Data flow: the training pool (e.g. MNIST's 60,000 training digits) is read once into one normalised float
tensor ``[N, 784]``; its labels are corrupted once, with ``seed``, by :func:`noisy_lightning.noise.corrupt_labels`;
the pool is then split into train and validation, both carrying *noisy* labels (a real user has no clean
validation labels). The test set keeps its clean labels. Batches are slices of the resident tensor:

- train:   ``(x, noisy_label, index)``, ``index`` = the sample's position in the training pool (EM needs it);
- val:     ``(x, noisy_label, clean_label)``, the clean label is used for evaluation metrics only;
- test:    ``(x, clean_label)``;
- predict: ``(x,)`` over the test set.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch import Tensor

from noisy_lightning.batching import TensorBatches
from noisy_lightning.idx import read_idx
from noisy_lightning.noise import NOISE_TYPES, Corruption, build_transition_matrix, check_labels, corrupt_labels

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


def normalise_images(images: Tensor, mean: float, std: float) -> Tensor:
    """``uint8 [N, H, W]`` -> ``float32 [N, H*W]`` with ``(pixel / 255 - mean) / std``, in one tensor."""
    flat = images.reshape(images.shape[0], -1).float().div_(255.0)
    return flat.sub_(mean).div_(std)


class NoisyLabelDataModule(L.LightningDataModule):
    """MNIST-family data with labels corrupted by a noise model, for training and evaluating noisy-label methods.

    Args:
        dataset: ``"mnist_sample"`` (5,000 real MNIST digits shipped in the package: 4,000 train pool, 1,000
            test), ``"mnist"``, ``"fashion_mnist"`` or ``"kmnist"``.
        data_dir: folder with torchvision's layout (``<data_dir>/MNIST/raw/...``) or the four IDX files directly
            (Debian's ``/usr/share/datasets/fashion-mnist``). Default: ``$NOISY_LIGHTNING_DATA``, else ``./data``.
        download: let torchvision download missing files in :meth:`prepare_data`.
        noise_type: one of ``"none"``, ``"symmetric"``, ``"uniform"``, ``"pair_flip"``, ``"permutation"``,
            ``"custom"`` (see :mod:`noisy_lightning.noise` for the exact matrices).
        noise_rate: the rate ``r`` in ``[0, 1)`` of the noise model.
        transition_matrix: ``K x K`` row-stochastic matrix for ``noise_type="custom"``,
            ``T[i, j] = P(noisy = j | true = i)``.
        seed: seeds the corruption, the train/validation split and the permutation of ``"permutation"`` noise.
        val_fraction: fraction of the training pool held out for validation, in ``(0, 1)``.
        batch_size: samples per training batch (> 0).
        eval_batch_size: samples per validation/test/predict batch; default ``max(batch_size, 1024)``.

    Loaders are :class:`~noisy_lightning.batching.TensorBatches`, not ``DataLoader``: the data is resident, so a
    batch is one gather per tensor, on the Trainer's device (a GPU run keeps the dataset on the GPU and copies
    nothing per batch). The training order depends on ``seed`` and the epoch only, and a checkpoint saved
    mid-epoch resumes at the next unseen batch.
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
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {', '.join(map(repr, DATASETS))}; got {dataset!r}")
        if noise_type not in NOISE_TYPES:
            raise ValueError(f"noise_type must be one of {', '.join(map(repr, NOISE_TYPES))}; got {noise_type!r}")
        if not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.save_hyperparameters()
        self.dataset = dataset
        self.data_dir = data_dir if data_dir is not None else default_data_dir()
        self.download = download
        self.num_classes = DATASETS[dataset].num_classes
        # Build (and so validate) the noise model now: a bad rate or matrix fails at construction, not mid-fit.
        self.true_transition_matrix: Tensor = build_transition_matrix(
            noise_type, self.num_classes, noise_rate, transition_matrix, seed
        )
        self.seed = seed
        self.val_fraction = float(val_fraction)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or max(batch_size, 1024)
        self.corruption: Corruption | None = None
        self._is_set_up = False
        self._device_tensors: dict[tuple[str, str], tuple[Tensor, ...]] = {}

    # ---- data preparation -------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Download (when ``download=True``) and check that the files are there; runs on one process per node."""
        if self.dataset != "mnist_sample" and self.download:
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
        """Load the tensors, corrupt the training pool and split it. Identical on every process."""
        if self._is_set_up:
            return
        info = DATASETS[self.dataset]
        files = locate_idx_files(self.dataset, self.data_dir)
        train_images, train_labels = load_split(files, "train", self.num_classes)
        test_images, test_labels = load_split(files, "test", self.num_classes)
        pool_size = train_labels.numel()
        num_val = round(self.val_fraction * pool_size)
        if not 0 < num_val < pool_size:
            raise ValueError(
                f"val_fraction={self.val_fraction} leaves {num_val} validation and {pool_size - num_val} training "
                f"samples out of {pool_size}; both must be at least 1"
            )

        self.corruption = corrupt_labels(train_labels, self.true_transition_matrix, self.seed)
        self.pool_images = normalise_images(train_images, info.mean, info.std)
        self.train_clean_labels = train_labels
        self.train_noisy_labels = self.corruption.noisy_labels
        # The split gets its own stream, so changing the noise never moves samples between train and val.
        split_generator = torch.Generator().manual_seed(int(self.seed) + 7919)
        order = torch.randperm(pool_size, generator=split_generator)
        self.val_indices = order[:num_val].sort().values
        self.train_indices = order[num_val:].sort().values
        self.test_images = normalise_images(test_images, info.mean, info.std)
        self.test_labels = test_labels
        self._is_set_up = True

    # ---- public views ------------------------------------------------------------------------------------------
    @property
    def is_set_up(self) -> bool:
        """Whether :meth:`setup` has loaded the data (it runs once; later calls return at once)."""
        return self._is_set_up

    @property
    def num_features(self) -> int:
        return self.pool_images.shape[1]

    @property
    def pool_size(self) -> int:
        """Number of samples in the training pool (train + validation); posterior tables have this many rows."""
        return self.train_noisy_labels.numel()

    @property
    def image_shape(self) -> tuple[int, int]:
        side = math.isqrt(self.num_features)
        return (side, side)

    # ---- loaders -----------------------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        trainer = self.trainer
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _split(self, name: str) -> tuple[Tensor, ...]:
        """The tensors of one split on the Trainer's device, built there once: GPU runs never copy per batch."""
        device = self._device()
        key = (name, str(device))
        if key not in self._device_tensors:
            if name == "pool":
                tensors = (self.pool_images, self.train_noisy_labels)
            elif name == "test":
                tensors = (self.test_images, self.test_labels)
            else:
                pool_images, pool_noisy = self._split("pool")
                index = (self.train_indices if name == "train" else self.val_indices).to(device)
                tensors = (pool_images[index], pool_noisy[index], index)
                if name == "val":  # the clean label replaces the index: metrics need it, EM never sees it
                    tensors = (*tensors[:2], self.train_clean_labels.to(device)[index])
            self._device_tensors[key] = tuple(tensor.to(device) for tensor in tensors)
        return self._device_tensors[key]

    def _loader(self, tensors: tuple[Tensor, ...], batch_size: int, training: bool) -> TensorBatches:
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
        )

    def train_dataloader(self) -> TensorBatches:
        """``(x, noisy_label, pool_index)`` batches of the training split, reshuffled every epoch."""
        return self._loader(self._split("train"), self.batch_size, training=True)

    def val_dataloader(self) -> TensorBatches:
        """``(x, noisy_label, clean_label)`` batches of the validation split (the clean label for metrics only)."""
        return self._loader(self._split("val"), self.eval_batch_size, training=False)

    def test_dataloader(self) -> TensorBatches:
        """``(x, clean_label)`` batches of the test set."""
        return self._loader(self._split("test"), self.eval_batch_size, training=False)

    def predict_dataloader(self) -> TensorBatches:
        """``(x,)`` batches of the test set."""
        return self._loader(self._split("test")[:1], self.eval_batch_size, training=False)

    def pool_dataloader(self, indices: Tensor | None = None) -> TensorBatches:
        """``(x, noisy_label, index)`` over the training pool (or ``indices`` of it), in order, for inference.

        Under DDP each rank gets its own unpadded share, so the shares add up to every requested row once.
        """
        if indices is self.train_indices:
            tensors = self._split("train")
        else:
            pool_images, pool_noisy = self._split("pool")
            index = (torch.arange(self.pool_size) if indices is None else indices).to(pool_images.device)
            tensors = (pool_images[index], pool_noisy[index], index)
        return self._loader(tensors, self.eval_batch_size, training=False)

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, object]:
        """What a resumed run must agree with: the noise model, the seed and a fingerprint of the noisy labels."""
        state: dict[str, object] = {
            "dataset": self.dataset,
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "true_transition_matrix": self.true_transition_matrix.clone(),
        }
        if self._is_set_up:
            state["noisy_labels_checksum"] = _checksum(self.train_noisy_labels)
        return state

    def load_state_dict(self, state_dict: dict[str, object]) -> None:
        """Refuse to resume when the checkpoint was made with another noise configuration."""
        mismatches = [
            key
            for key in ("dataset", "seed", "val_fraction")
            if key in state_dict and state_dict[key] != getattr(self, key)
        ]
        saved_matrix = state_dict.get("true_transition_matrix")
        if isinstance(saved_matrix, Tensor) and not torch.equal(saved_matrix, self.true_transition_matrix):
            mismatches.append("noise model (noise_type / noise_rate / transition_matrix)")
        saved_checksum = state_dict.get("noisy_labels_checksum")
        labels_differ = self._is_set_up and saved_checksum not in (None, _checksum(self.train_noisy_labels))
        if not mismatches and labels_differ:
            mismatches.append("noisy labels (the data files differ)")
        if mismatches:
            raise ValueError(
                "the checkpoint was made with a different data configuration: "
                f"{', '.join(mismatches)} differ. Resuming would re-corrupt the labels differently; "
                "resume with the checkpoint's data settings, or start a new run without ckpt_path."
            )


def _checksum(labels: Tensor) -> int:
    positions = torch.arange(1, labels.numel() + 1, dtype=torch.int64)
    return int(((labels.long() + 1) * positions % 1_000_003).sum().item())
