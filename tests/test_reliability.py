"""Faults and bad inputs that once failed silently, late or unclearly; each now fails early with a clear error.

docs/guarantees.md lists these faults next to the guarantees they test.
"""

from __future__ import annotations

import struct
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from helpers import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from test_data import make_idx_folder
from torch import nn

from noisy_lightning import MLP, EMNoiseEstimation, NoisyLabelClassifier, NoisyLabelDataModule, NoisyLabelFigures
from noisy_lightning.batching import TensorBatches
from noisy_lightning.idx import read_idx


def small_model(**kwargs: object) -> NoisyLabelClassifier:
    return NoisyLabelClassifier(net=MLP(hidden_sizes=[32]), **kwargs)


def fit_and_save(tmp_path: Path, datamodule: NoisyLabelDataModule, **trainer_kwargs: object) -> Path:
    L.seed_everything(0)
    trainer = quiet_trainer(default_root_dir=tmp_path, **trainer_kwargs)
    trainer.fit(small_model(method="em"), datamodule)
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_resume_with_another_batch_size_is_refused(tmp_path: Path) -> None:
    path = fit_and_save(tmp_path, NoisyLabelDataModule(batch_size=256))
    with pytest.raises(ValueError, match=r"another data configuration: batch_size \(checkpoint: 256, now: 128\)"):
        quiet_trainer(max_epochs=2).fit(small_model(method="em"), NoisyLabelDataModule(batch_size=128), ckpt_path=path)


def test_resume_with_other_images_but_the_same_labels_is_refused(tmp_path: Path) -> None:
    folder = make_idx_folder(tmp_path / "a")
    path = fit_and_save(tmp_path, NoisyLabelDataModule(dataset="kmnist", data_dir=str(folder), val_fraction=0.5))
    images = read_idx(folder / "train-images-idx3-ubyte").numpy()
    images[0, 0, 0] ^= 0xFF  # one pixel differs; the labels are unchanged
    from noisy_lightning.idx import write_idx

    write_idx(folder / "train-images-idx3-ubyte", images)
    other = NoisyLabelDataModule(dataset="kmnist", data_dir=str(folder), val_fraction=0.5)
    with pytest.raises(ValueError, match=r"images \(the data differs\)"):
        quiet_trainer(max_epochs=2).fit(small_model(method="em"), other, ckpt_path=path)


class NaNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(784, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.layer(x.flatten(1))
        return logits * float("nan") if self.training else logits


@pytest.mark.parametrize("method", ["ce", "em"])
def test_a_network_that_outputs_nan_stops_the_fit_with_the_divergence_message(method: str) -> None:
    trainer = quiet_trainer(max_epochs=3, callbacks=[EMNoiseEstimation(warmup_epochs=2)])
    with pytest.raises(FloatingPointError, match="training loss of epoch 0 is nan: the network has diverged"):
        trainer.fit(NoisyLabelClassifier(net=NaNNet(), method=method), NoisyLabelDataModule())


@pytest.mark.parametrize("width", [5, 12])
def test_a_net_with_the_wrong_output_width_is_named_before_any_stage(width: int) -> None:
    model = NoisyLabelClassifier(net=MLP(hidden_sizes=[8], num_classes=width))
    expected = rf"net returned logits of shape \(2, {width}\); expected \[batch, num_classes\] = \[2, 10\]"
    for stage in ("fit", "validate", "test"):
        trainer = quiet_trainer(fast_dev_run=True)
        with pytest.raises(ValueError, match=expected):
            getattr(trainer, stage)(model, NoisyLabelDataModule())


class TupleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(784, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layer(x), x


@pytest.mark.parametrize(("net", "shown"), [(TupleNet(), "tuple"), (nn.Unflatten(1, (2, 392)), r"\(2, 2, 392\)")])
def test_a_net_returning_a_tuple_or_3d_logits_is_named(net: nn.Module, shown: str) -> None:
    with pytest.raises(ValueError, match=f"net returned logits of shape {shown}"):
        quiet_trainer(fast_dev_run=True).validate(NoisyLabelClassifier(net=net), NoisyLabelDataModule())


def test_custom_noise_with_a_rate_is_refused() -> None:
    with pytest.raises(ValueError, match="noise_rate is not used with noise_type='custom'"):
        NoisyLabelDataModule(noise_type="custom", noise_rate=0.5, transition_matrix=np.eye(10).tolist())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seed": 1.5}, r"seed must be an integer in \[0, \d+\], got 1.5"),
        ({"seed": 2**70}, r"seed must be an integer in \[0, \d+\], got 1180591620717411303424"),
        ({"seed": 2**64 - 7919}, r"seed must be an integer in \[0, \d+\]"),
        ({"seed": None}, r"seed must be an integer in \[0, \d+\], got None"),
        ({"seed": True}, r"seed must be an integer in \[0, \d+\], got True"),
        ({"batch_size": 2.0}, "batch_size must be an integer >= 1, got 2.0"),
        ({"val_fraction": float("nan")}, r"val_fraction must be a finite number in \(0, 1\), got nan"),
    ],
)
def test_numbers_must_be_numbers_of_the_right_kind(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NoisyLabelDataModule(**kwargs)


@pytest.mark.parametrize("precision", ["bf16-true", "64-true"])
def test_em_runs_under_true_precisions_and_theta_stays_float32(precision: str) -> None:
    L.seed_everything(0)
    model = small_model(method="em")
    callback = EMNoiseEstimation(warmup_epochs=1, hold_initial_rounds=0)
    datamodule = NoisyLabelDataModule(noise_type="pair_flip", noise_rate=0.3)
    quiet_trainer(max_epochs=2, precision=precision, callbacks=[callback]).fit(model, datamodule)
    assert callback.rounds == 2
    assert model.noise_matrix.dtype == torch.float32
    assert next(model.net.parameters()).dtype == {"bf16-true": torch.bfloat16, "64-true": torch.float64}[precision]
    torch.testing.assert_close(model.noise_matrix.double().sum(dim=1), torch.ones(10, dtype=torch.float64))
    assert not torch.equal(model.noise_matrix, torch.eye(10))


def test_a_flipped_byte_in_theta_is_detected_on_load(tmp_path: Path) -> None:
    path = fit_and_save(tmp_path, NoisyLabelDataModule(noise_type="symmetric", noise_rate=0.3), max_epochs=1)
    checkpoint = torch.load(path, weights_only=False)
    theta = checkpoint["state_dict"]["noise_layer.noise_matrix"]
    theta[3, 4] = theta[3, 4] + 0.0  # unchanged: loads
    torch.save(checkpoint, tmp_path / "same.ckpt")
    NoisyLabelClassifier.load_from_checkpoint(tmp_path / "same.ckpt")
    raw = theta.view(torch.uint8)
    raw[0, 1] ^= 0x01  # one bit of one entry of theta
    torch.save(checkpoint, tmp_path / "flipped.ckpt")
    with pytest.raises(ValueError, match="does not match its checksum: the file is corrupt"):
        NoisyLabelClassifier.load_from_checkpoint(tmp_path / "flipped.ckpt")


def test_a_nan_theta_in_a_checkpoint_is_refused_on_load(tmp_path: Path) -> None:
    path = fit_and_save(tmp_path, NoisyLabelDataModule(), max_epochs=1)
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["state_dict"]["noise_layer.noise_matrix"][0, 0] = float("nan")
    del checkpoint["noise_layer_checksum"]  # a checkpoint without the checksum is still checked for sense
    torch.save(checkpoint, tmp_path / "nan.ckpt")
    with pytest.raises(ValueError, match="the checkpoint's noise_matrix must contain only finite numbers"):
        NoisyLabelClassifier.load_from_checkpoint(tmp_path / "nan.ckpt")


def test_a_loader_position_past_the_end_of_the_epoch_serves_nothing() -> None:
    loader = TensorBatches((torch.arange(10),), 4)
    loader.load_state_dict({"epoch": 0, "batches_served": 3})
    assert list(loader) == []
    loader.load_state_dict({"epoch": 0, "batches_served": 7})
    assert list(loader) == []
    assert [batch[0].tolist() for batch in loader] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # the next epoch


def test_rectangular_images_keep_their_shape_and_mismatched_splits_are_named(tmp_path: Path) -> None:
    from noisy_lightning.idx import write_idx

    folder = tmp_path / "rect"
    folder.mkdir()
    generator = np.random.default_rng(0)
    for prefix, count, width in (("train", 40, 29), ("t10k", 10, 29)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte", generator.integers(0, 256, (count, 28, width), np.uint8))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", (np.arange(count) % 10).astype(np.uint8))
    datamodule = NoisyLabelDataModule(dataset="kmnist", data_dir=str(folder), val_fraction=0.25)
    datamodule.setup("fit")
    assert datamodule.image_shape == (1, 28, 29) and datamodule.pool.images.shape == (40, 28 * 29)
    with pytest.raises(ValueError, match=r"the net cannot take this data's samples of shape \(812,\)"):
        quiet_trainer(fast_dev_run=True).fit(NoisyLabelClassifier(), datamodule)
    write_idx(folder / "t10k-images-idx3-ubyte", generator.integers(0, 256, (10, 29, 29), np.uint8))
    other = NoisyLabelDataModule(dataset="kmnist", data_dir=str(folder))
    with pytest.raises(ValueError, match=r"the training images are \(28, 29\) but the test images are \(29, 29\)"):
        other.setup("fit")


def test_an_idx_header_whose_size_overflows_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">3I", 2**31, 2**31, 2**31) + bytes(100))
    with pytest.raises(ValueError, match=f"{path} is truncated: header says shape"):
        read_idx(path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"grid_selection": "bogus"}, "grid_selection must be one of 'first', 'random'"),
        ({"dpi": 0}, r"dpi must be an integer in \[30, 600\], got 0"),
        ({"grid_size": 100}, r"grid_size must be an integer in \[1, 30\], got 100"),
        ({"grid_size": "10"}, r"grid_size must be an integer in \[1, 30\], got '10'"),
        ({"track_test_accuracy": "yes"}, "track_test_accuracy must be True or False"),
    ],
)
def test_figure_arguments_are_checked_at_construction(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NoisyLabelFigures(**kwargs)


def test_a_file_where_the_figures_folder_goes_is_named_before_training(tmp_path: Path) -> None:
    trainer = quiet_trainer(max_epochs=1, default_root_dir=tmp_path, callbacks=[NoisyLabelFigures()])
    (tmp_path / "figures").write_text("not a folder")
    with pytest.raises(ValueError, match="which exists and is not a folder"):
        trainer.fit(small_model(), NoisyLabelDataModule())
    assert trainer.global_step == 0


@pytest.mark.slow
def test_checkpointing_every_step_with_the_em_callback_and_figures(tmp_path: Path) -> None:
    """The callbacks together, as a user would combine them, with a checkpoint after each step."""
    L.seed_everything(0)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True, save_top_k=0)
    callbacks = [EMNoiseEstimation(warmup_epochs=1), NoisyLabelFigures(dpi=50), checkpoints]
    trainer = quiet_trainer(max_epochs=2, default_root_dir=tmp_path, callbacks=callbacks, enable_checkpointing=True)
    trainer.fit(small_model(method="em"), NoisyLabelDataModule(noise_type="symmetric", noise_rate=0.3))
    assert (tmp_path / "ckpt" / "last.ckpt").exists()
    assert (tmp_path / "figures" / "correction_grid.png").exists()


@pytest.mark.parametrize(("content", "message"), [(b"", "is empty"), (bytes(range(256)) * 8, "is not a PyTorch")])
def test_an_empty_or_random_checkpoint_file_is_named(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "broken.ckpt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"checkpoint {path} {message}"):
        NoisyLabelClassifier.load_from_checkpoint(path)
