import os
import sys
from pathlib import Path

import pytest

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def full_mnist_dir() -> Path | None:
    """Where full MNIST is: $NOISY_LIGHTNING_DATA if it holds MNIST/raw, else ../shared/datasets, else None."""
    for candidate in (os.environ.get("NOISY_LIGHTNING_DATA"), SHARED_DATASETS):
        if candidate and (Path(candidate) / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
            return Path(candidate)
    return None


def full_fashion_mnist_dir() -> Path | None:
    """Where full Fashion-MNIST is (plain or gzipped IDX files under FashionMNIST/raw): $NOISY_LIGHTNING_DATA,
    else ../shared/datasets, else None."""
    for candidate in (os.environ.get("NOISY_LIGHTNING_DATA"), SHARED_DATASETS):
        raw = Path(candidate) / "FashionMNIST" / "raw" if candidate else None
        if raw and any((raw / name).exists() for name in ("train-images-idx3-ubyte", "train-images-idx3-ubyte.gz")):
            return Path(candidate)
    return None


@pytest.fixture
def mnist_dir() -> Path:
    directory = full_mnist_dir()
    if directory is None:
        pytest.skip("full MNIST not found: set NOISY_LIGHTNING_DATA to a folder holding MNIST/raw/")
    return directory


@pytest.fixture
def fashion_mnist_dir() -> Path:
    directory = full_fashion_mnist_dir()
    if directory is None:
        pytest.skip(
            "full Fashion-MNIST not found: set NOISY_LIGHTNING_DATA to a folder holding FashionMNIST/raw/ "
            "(the four IDX files, plain or .gz)"
        )
    return directory


@pytest.fixture(autouse=True)
def _headless(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPLBACKEND", "Agg")


PYTHON = sys.executable
