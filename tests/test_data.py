import gzip
import re
import struct
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from helpers import quiet_trainer

from noisy_lightning import MLP, NoisyLabelClassifier, contract
from noisy_lightning.data import NoisyLabelDataModule, locate_idx_files
from noisy_lightning.idx import read_idx, write_idx


def make_idx_folder(folder: Path, train: int = 60, test: int = 20, num_classes: int = 10) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(0)
    for prefix, count in (("train", train), ("t10k", test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte", generator.integers(0, 256, (count, 28, 28), dtype=np.uint8))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", (np.arange(count) % num_classes).astype(np.uint8))
    return folder


def test_idx_round_trip_plain_and_gzip(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
        write_idx(tmp_path / name, array)
        assert torch.equal(read_idx(tmp_path / name), torch.from_numpy(array))
    assert not list(tmp_path.glob(".*")), "no temporary file is left behind"


def test_truncated_idx_file_gives_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte"
    write_idx(path, np.zeros((10, 28, 28), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"is truncated: header says shape \(10, 28, 28\)"):
        read_idx(path)


def test_truncated_gzip_gives_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "x-idx1-ubyte.gz"
    write_idx(path, np.zeros(1000, dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_idx(path)


def test_wrong_magic_number_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(struct.pack(">I", 0x00000D01) + struct.pack(">I", 1) + b"\x00\x00\x00\x00")
    with pytest.raises(ValueError, match="magic number 0x00000d01"):
        read_idx(path)


def test_wrong_dimension_count_is_named(tmp_path: Path) -> None:
    path = tmp_path / "x-idx1-ubyte"
    write_idx(path, np.zeros((2, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="has 2 dimensions, expected 1"):
        read_idx(path, expected_ndim=1)


def test_missing_directory_says_where_it_looked_and_what_to_do(tmp_path: Path) -> None:
    datamodule = NoisyLabelDataModule(dataset="mnist", data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError) as error:
        datamodule.prepare_data()
    message = str(error.value)
    assert str(tmp_path / "nowhere" / "MNIST" / "raw") in message
    assert "NOISY_LIGHTNING_DATA" in message and "mnist_sample" in message


def test_failed_download_explains_the_offline_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "MNIST", refuse)
    datamodule = NoisyLabelDataModule(dataset="mnist", data_dir=str(tmp_path), download=True)
    with pytest.raises(RuntimeError, match=r"download of dataset='mnist'.*mnist_sample"):
        datamodule.prepare_data()


def gzip_folder(folder: Path) -> Path:
    """Replace each file of ``folder`` by its gzipped copy ``<name>.gz`` (Debian's dataset packages ship these)."""
    for path in list(folder.iterdir()):
        with gzip.open(f"{path}.gz", "wb") as handle:
            handle.write(path.read_bytes())
        path.unlink()
    return folder


def test_flat_layout_and_gzip_are_found(tmp_path: Path) -> None:
    """Debian's layout: the four gzipped files in a flat ``fashion-mnist`` folder, found and read as they are."""
    folder = gzip_folder(make_idx_folder(tmp_path / "fashion-mnist", train=60, test=20))
    files = locate_idx_files("fashion_mnist", tmp_path)
    assert files == {
        "train_images": folder / "train-images-idx3-ubyte.gz",
        "train_labels": folder / "train-labels-idx1-ubyte.gz",
        "test_images": folder / "t10k-images-idx3-ubyte.gz",
        "test_labels": folder / "t10k-labels-idx1-ubyte.gz",
    }
    datamodule = NoisyLabelDataModule(dataset="fashion_mnist", data_dir=str(tmp_path), val_fraction=0.5)
    datamodule.setup("fit")
    assert torch.equal(datamodule.pool.given_labels, torch.arange(60) % 10)  # the values inside the .gz files
    assert torch.equal(datamodule.test_labels, torch.arange(20) % 10)
    # The folder holding the files may also be passed itself.
    assert locate_idx_files("fashion_mnist", folder) == files


def test_image_label_count_mismatch(tmp_path: Path) -> None:
    folder = make_idx_folder(tmp_path / "MNIST" / "raw")
    write_idx(folder / "train-labels-idx1-ubyte", np.zeros(59, dtype=np.uint8))
    datamodule = NoisyLabelDataModule(dataset="mnist", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"holds 60 images but .* holds 59 labels"):
        datamodule.setup("fit")


def test_labels_outside_the_class_range(tmp_path: Path) -> None:
    folder = make_idx_folder(tmp_path / "MNIST" / "raw")
    write_idx(folder / "train-labels-idx1-ubyte", np.full(60, 12, dtype=np.uint8))
    datamodule = NoisyLabelDataModule(dataset="mnist", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"must be in \[0, 10\).*does num_classes=10 match the data"):
        datamodule.setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"noise_type": "symmetric", "noise_rate": 1.5}, r"noise_rate must be in \[0, 1\)"),
        ({"noise_type": "symmetric", "noise_rate": -0.1}, r"noise_rate must be in \[0, 1\)"),
        ({"noise_type": "bogus"}, "noise_type must be one of"),
        ({"dataset": "cifar"}, "dataset must be one of 'mnist_sample', 'mnist', 'fashion_mnist', 'kmnist'"),
        ({"val_fraction": 0.0}, r"val_fraction must be a finite number in \(0, 1\)"),
        ({"val_fraction": 1.0}, r"val_fraction must be a finite number in \(0, 1\)"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"batch_size": -5}, "batch_size must be an integer >= 1"),
        ({"eval_batch_size": 0}, "eval_batch_size must be an integer >= 1, got 0"),
        ({"noise_type": "custom", "transition_matrix": [[0.5, 0.5], [0.5, 0.5]]}, r"expected shape \(10, 10\)"),
        ({"noise_type": "custom", "transition_matrix": [[0.9] * 10] * 10}, "rows must sum to 1"),
    ],
)
def test_bad_configuration_fails_at_construction(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NoisyLabelDataModule(**kwargs)


@pytest.fixture(scope="module")
def sample() -> NoisyLabelDataModule:
    datamodule = NoisyLabelDataModule(noise_type="symmetric", noise_rate=0.4, seed=3, batch_size=64)
    datamodule.setup("fit")
    return datamodule


def test_sample_ships_with_the_package(sample: NoisyLabelDataModule) -> None:
    assert sample.pool.size == 4000
    assert sample.test_labels.numel() == 1000
    assert torch.bincount(sample.pool.clean_labels).tolist() == [400] * 10
    assert sample.pool.images.dtype == torch.float32 and sample.pool.images.shape == (4000, 784)
    assert abs(sample.pool.images.mean().item()) < 0.1  # normalised


def test_setup_runs_once_and_says_so() -> None:
    datamodule = NoisyLabelDataModule(noise_type="symmetric", noise_rate=0.4, seed=3)
    assert not datamodule.is_set_up
    datamodule.setup("fit")
    labels = datamodule.pool.given_labels
    datamodule.setup("test")  # a second call keeps the tensors it has
    assert datamodule.is_set_up and datamodule.pool.given_labels is labels


def test_split_is_a_partition_of_the_noisy_pool(sample: NoisyLabelDataModule) -> None:
    train, val = set(sample.pool.train_indices.tolist()), set(sample.pool.val_indices.tolist())
    assert not train & val
    assert train | val == set(range(4000))
    assert len(val) == 400
    assert sample.corruption is not None and 0.35 < sample.corruption.flip_rate < 0.45


def test_training_batches_carry_noisy_labels_and_pool_indices_never_clean_ones(sample: NoisyLabelDataModule) -> None:
    seen = []
    for x, labels, index in sample.train_dataloader():
        assert x.shape[1] == 784 and x.dtype == torch.float32
        assert torch.equal(labels, sample.pool.given_labels[index])
        assert torch.equal(x, sample.pool.images[index])
        seen.append(index)
    seen_all = torch.cat(seen)
    assert sorted(seen_all.tolist()) == sample.pool.train_indices.tolist()
    flipped = sample.pool.given_labels[seen_all] != sample.pool.clean_labels[seen_all]
    assert flipped.float().mean() > 0.3  # the labels served really are the corrupted ones


def test_validation_is_noisy_and_test_is_clean(sample: NoisyLabelDataModule) -> None:
    _, noisy, clean = next(iter(sample.val_dataloader()))
    assert torch.equal(noisy, sample.pool.given_labels[sample.pool.val_indices][: len(noisy)])
    assert torch.equal(clean, sample.pool.clean_labels[sample.pool.val_indices][: len(clean)])
    _, test_labels = next(iter(sample.test_dataloader()))
    assert torch.equal(test_labels, sample.test_labels[: len(test_labels)])


def test_same_seed_same_labels_and_split_other_seed_differs() -> None:
    def build(seed: int, batch_size: int = 32) -> NoisyLabelDataModule:
        datamodule = NoisyLabelDataModule(noise_type="uniform", noise_rate=0.5, seed=seed, batch_size=batch_size)
        datamodule.setup("fit")
        return datamodule

    first, again, other_batch, other_seed = build(1), build(1), build(1, batch_size=500), build(2)
    assert torch.equal(first.pool.given_labels, again.pool.given_labels)
    assert torch.equal(first.pool.given_labels, other_batch.pool.given_labels)
    assert torch.equal(first.pool.val_indices, again.pool.val_indices)
    assert not torch.equal(first.pool.given_labels, other_seed.pool.given_labels)
    assert not torch.equal(first.pool.val_indices, other_seed.pool.val_indices)


def test_full_mnist_loads(mnist_dir: Path) -> None:
    datamodule = NoisyLabelDataModule(dataset="mnist", data_dir=str(mnist_dir), noise_type="uniform", noise_rate=0.5)
    datamodule.prepare_data()
    datamodule.setup("fit")
    assert datamodule.pool.size == 60_000 and datamodule.test_labels.numel() == 10_000
    assert abs(datamodule.corruption.flip_rate - 0.45) < 0.01


def test_full_fashion_mnist_loads(fashion_mnist_dir: Path) -> None:
    datamodule = NoisyLabelDataModule(dataset="fashion_mnist", data_dir=str(fashion_mnist_dir))
    datamodule.prepare_data()
    datamodule.setup("fit")
    pool = datamodule.pool
    assert pool.size == 60_000 and datamodule.test_labels.numel() == 10_000
    assert torch.bincount(pool.clean_labels).tolist() == [6_000] * 10
    assert torch.bincount(datamodule.test_labels).tolist() == [1_000] * 10
    # The published files' first labels (ankle boot, T-shirt, T-shirt, dress, ...): Fashion-MNIST, not MNIST.
    assert pool.clean_labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert datamodule.test_labels[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    assert torch.equal(pool.given_labels, pool.clean_labels)  # noise_type="none"
    assert (len(pool.train_indices), len(pool.val_indices)) == (54_000, 6_000)
    assert pool.image_shape == (1, 28, 28) and pool.images.shape == (60_000, 784)
    # Normalised with Fashion-MNIST's own pixel statistics (MNIST's would leave a mean of about 0.5).
    assert abs(pool.images.mean().item()) < 0.01 and abs(pool.images.std().item() - 1) < 0.01


def batch_sizes(loader: object) -> list[int]:
    return [len(batch[0]) for batch in loader]  # type: ignore[attr-defined]


def cut(total: int, size: int) -> list[int]:
    """Batch sizes of ``total`` rows in batches of ``size``, the last one smaller."""
    return [size] * (total // size) + ([total % size] if total % size else [])


@pytest.mark.parametrize(
    ("batch_size", "eval_batch_size", "expected"), [(64, 100, 100), (64, None, 1024), (2048, None, 2048)]
)
def test_eval_batch_size_sets_the_evaluation_loaders(
    batch_size: int, eval_batch_size: int | None, expected: int
) -> None:
    """Validation, test, predict and the pool pass of EM use eval_batch_size (default max(batch_size, 1024));
    training keeps batch_size."""
    datamodule = NoisyLabelDataModule(batch_size=batch_size, eval_batch_size=eval_batch_size)
    datamodule.setup("fit")
    assert datamodule.eval_batch_size == expected
    assert batch_sizes(datamodule.val_dataloader()) == cut(400, expected)
    assert batch_sizes(datamodule.test_dataloader()) == cut(1000, expected)
    assert batch_sizes(datamodule.predict_dataloader()) == cut(1000, expected)
    assert batch_sizes(datamodule.pool_dataloader()) == cut(4000, expected)
    assert batch_sizes(datamodule.train_dataloader()) == cut(3600, batch_size)


class EvalBatchSizes(L.Callback):
    def __init__(self) -> None:
        self.sizes: dict[str, list[int]] = {"val": [], "test": []}

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: contract.EvalBatch, batch_idx: int, *args: int
    ) -> None:
        self.sizes["val"].append(len(batch.x))

    def on_test_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: contract.TestBatch, batch_idx: int, *args: int
    ) -> None:
        self.sizes["test"].append(len(batch.x))


def test_eval_batch_size_reaches_the_validation_and_test_steps_of_a_fit() -> None:
    recorder = EvalBatchSizes()
    datamodule = NoisyLabelDataModule(batch_size=32, eval_batch_size=150)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=1, callbacks=[recorder])
    model = NoisyLabelClassifier(net=MLP(hidden_sizes=[32]))
    trainer.fit(model, datamodule)
    trainer.test(model, datamodule, verbose=False)
    assert recorder.sizes == {"val": [150, 150, 100], "test": [150] * 6 + [100]}


def small_classifier() -> NoisyLabelClassifier:
    return NoisyLabelClassifier(net=MLP(hidden_sizes=[32]))


def checkpoint_of(datamodule: NoisyLabelDataModule, folder: Path) -> Path:
    """A checkpoint of one training step on ``datamodule``."""
    L.seed_everything(0)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, default_root_dir=folder)
    trainer.fit(small_classifier(), datamodule)
    path = folder / "data.ckpt"
    trainer.save_checkpoint(path)
    return path


def refusal(what: str) -> str:
    """The whole refusal message, up to its advice: ``what`` must be the only mismatch named."""
    return re.escape(f"this checkpoint was trained with another data configuration: {what}. Use the checkpoint's")


@pytest.fixture(scope="module")
def sample_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checkpoint_of(NoisyLabelDataModule(), tmp_path_factory.mktemp("sample"))


def test_resume_with_another_val_fraction_is_refused(sample_checkpoint: Path) -> None:
    other = NoisyLabelDataModule(val_fraction=0.2)
    with pytest.raises(ValueError, match=refusal("val_fraction (checkpoint: 0.1, now: 0.2)")):
        quiet_trainer(max_epochs=2).fit(small_classifier(), other, ckpt_path=sample_checkpoint)


def test_resume_with_another_dataset_is_refused(sample_checkpoint: Path, tmp_path: Path) -> None:
    other = NoisyLabelDataModule(dataset="kmnist", data_dir=str(make_idx_folder(tmp_path / "KMNIST" / "raw")))
    # Another dataset also has other labels and images; the dataset's name comes first.
    first = re.escape("another data configuration: dataset (checkpoint: 'mnist_sample', now: 'kmnist'); labels")
    with pytest.raises(ValueError, match=first):
        quiet_trainer(max_epochs=2).fit(small_classifier(), other, ckpt_path=sample_checkpoint)


def test_resume_with_other_labels_is_refused(tmp_path: Path) -> None:
    """The same images, dataset name, seed and split; one given label differs: the labels' checksum tells."""
    images = torch.randint(0, 256, (200, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(200) % 10
    path = checkpoint_of(NoisyLabelDataModule.from_tensors(images, labels), tmp_path)
    relabelled = labels.clone()
    relabelled[7] = 3
    other = NoisyLabelDataModule.from_tensors(images, relabelled)
    with pytest.raises(ValueError, match=refusal("labels (the data differs)")):
        quiet_trainer(max_epochs=2).fit(small_classifier(), other, ckpt_path=path)
    # The same data resumes (the check compares, it does not refuse everything).
    quiet_trainer(max_epochs=2, limit_train_batches=1, limit_val_batches=0).fit(
        small_classifier(), NoisyLabelDataModule.from_tensors(images, labels), ckpt_path=path
    )


def test_gzip_only_folder_loads(tmp_path: Path) -> None:
    folder = gzip_folder(make_idx_folder(tmp_path / "raw_gz"))
    datamodule = NoisyLabelDataModule(dataset="kmnist", data_dir=str(folder), val_fraction=0.5)
    datamodule.setup("fit")
    assert datamodule.pool.size == 60


def _issues_file(data: NoisyLabelDataModule, flagged: torch.Tensor, path: Path) -> Path:
    """A label_issues.csv for ``data``'s pool (in a shuffled order, as a ranking would be) flagging ``flagged``."""
    from noisy_lightning import LabelIssues

    pool = data.pool
    order = torch.randperm(pool.size, generator=torch.Generator().manual_seed(1))
    posterior = torch.full((pool.size, pool.num_classes), 1 / pool.num_classes)
    in_validation = torch.zeros(pool.size, dtype=torch.bool)
    in_validation[pool.val_indices] = True
    issues = LabelIssues(
        index=order,
        given_label=pool.given_labels[order],
        posterior=posterior,
        corrected_label=pool.given_labels[order],
        score=posterior[:, 0],
        is_issue=flagged[order],
        in_validation=in_validation[order],
        noise_matrix=torch.eye(pool.num_classes),
    )
    return issues.to_csv(path)


def test_drop_label_issues_leaves_the_flagged_training_samples_out(tmp_path: Path) -> None:
    settings = {"noise_type": "symmetric", "noise_rate": 0.4, "seed": 3}
    data = NoisyLabelDataModule(**settings)
    data.setup("fit")
    pool = data.pool
    flagged = torch.zeros(pool.size, dtype=torch.bool)
    flagged[pool.train_indices[::3]] = True  # a third of the training split
    flagged[pool.val_indices[:5]] = True  # flags in the validation split change nothing
    path = _issues_file(data, flagged, tmp_path / "label_issues.csv")
    refit = NoisyLabelDataModule(**settings, drop_label_issues=str(path))
    refit.setup("fit")
    expected = [index for index in pool.train_indices.tolist() if not flagged[index]]
    assert refit.pool.train_indices.tolist() == expected
    assert torch.equal(refit.pool.val_indices, pool.val_indices)
    assert torch.equal(refit.pool.given_labels, pool.given_labels)
    assert refit.hparams["drop_label_issues"] == str(path)
    # A checkpoint of the refit does not resume on the full training split (or another file's).
    with pytest.raises(ValueError, match="training split"):
        data.load_state_dict(refit.state_dict())


def test_drop_label_issues_refuses_a_file_written_for_other_data(tmp_path: Path) -> None:
    data = NoisyLabelDataModule(noise_type="symmetric", noise_rate=0.4, seed=3)
    data.setup("fit")
    path = _issues_file(data, torch.zeros(data.pool.size, dtype=torch.bool), tmp_path / "label_issues.csv")
    lines = path.read_text().splitlines()
    cases = {
        "another seed": (None, {"seed": 4}, "its given_label differs from this data's"),
        "truncated": ("\n".join(lines[:100]) + "\n", {}, "has 99 rows but this data's training pool has 4000"),
        "cut mid-row": ("\n".join(lines[:100]) + "\n12", {}, "row 101 is not whole"),
        "an index twice": ("\n".join([*lines[:-1], lines[1]]) + "\n", {}, "must hold each of 0..3999 once"),
        "not a label_issues.csv": ("a,b\n1,2\n", {}, "has no column index, given_label, is_issue"),
        "missing": ("", {}, "no such file"),
    }
    for name, (text, change, message) in cases.items():
        target = tmp_path / f"{name}.csv"
        if text is None:
            target = path
        elif name != "missing":
            target.write_text(text)
        settings = {"noise_type": "symmetric", "noise_rate": 0.4, "seed": 3, **change}
        with pytest.raises(ValueError, match=re.escape(message)) as raised:
            NoisyLabelDataModule(**settings, drop_label_issues=str(target)).setup("fit")
        assert "drop_label_issues=" in str(raised.value), name
    expected = "drop_label_issues must be the path of a label_issues.csv or None, got bool"
    with pytest.raises(ValueError, match=re.escape(expected)):
        NoisyLabelDataModule(drop_label_issues=True)  # type: ignore[arg-type]


def test_drop_label_issues_refuses_a_file_of_another_split_of_the_same_labels(tmp_path: Path) -> None:
    """Labels used as given (your own data) are the same under any seed: the split column tells the files apart."""
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.rand(200, 8, generator=generator), torch.randint(0, 3, (200,), generator=generator)
    data = NoisyLabelDataModule.from_tensors(images, labels, seed=1)
    data.setup("fit")
    path = _issues_file(data, torch.zeros(200, dtype=torch.bool), tmp_path / "label_issues.csv")
    NoisyLabelDataModule.from_tensors(images, labels, seed=1, drop_label_issues=str(path)).setup("fit")
    for change in ({"seed": 2}, {"val_fraction": 0.5}):
        other = NoisyLabelDataModule.from_tensors(images, labels, **change, drop_label_issues=str(path))
        with pytest.raises(ValueError, match=r"its validation split differs .* another seed or val_fraction"):
            other.setup("fit")
