"""Your own data in, label issues out: tensors and datasets of any image shape, given labels, CSV files."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import quiet_trainer

from noisy_lightning import (
    CNN,
    MLP,
    EMNoiseEstimation,
    NoisyLabelClassifier,
    NoisyLabelDataModule,
    ResultsWriter,
    find_label_issues,
)


def coloured_squares(num_per_class: int, num_classes: int = 4, size: int = 16, seed: int = 0) -> tuple:
    """uint8 RGB images [N, 3, size, size]: class k is a bright square in quadrant k on a noisy background."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(num_per_class)
    images = torch.randint(0, 60, (labels.numel(), 3, size, size), generator=generator, dtype=torch.uint8)
    half = size // 2
    for k in range(num_classes):
        rows, cols = divmod(k, 2)
        block = images[labels == k, :, rows * half : (rows + 1) * half, cols * half : (cols + 1) * half]
        images[labels == k, :, rows * half : (rows + 1) * half, cols * half : (cols + 1) * half] = block + 150
    return images, labels


def flip(labels: torch.Tensor, fraction: float, num_classes: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Move ``fraction`` of the labels to the next class; returns the given labels and the mask of flips."""
    generator = torch.Generator().manual_seed(seed)
    flipped = torch.rand(labels.numel(), generator=generator) < fraction
    return torch.where(flipped, (labels + 1) % num_classes, labels), flipped


def test_rgb_tensors_with_given_labels_fit_em_with_the_cnn_and_write_label_issues(tmp_path: Path) -> None:
    L.seed_everything(0)
    images, clean = coloured_squares(60)
    given, _ = flip(clean, 0.2, 4)
    datamodule = NoisyLabelDataModule.from_tensors(images, given, batch_size=32)  # no clean labels anywhere
    model = NoisyLabelClassifier(net=CNN(in_channels=3, num_classes=4, width=8), num_classes=4, method="em")
    writer = ResultsWriter(output_dir=str(tmp_path))
    trainer = quiet_trainer(max_epochs=3, callbacks=[EMNoiseEstimation(warmup_epochs=1, hold_initial_rounds=0), writer])
    trainer.fit(model, datamodule)
    assert datamodule.pool.clean_labels is None and datamodule.true_transition_matrix is None
    assert datamodule.pool.image_shape == (3, 16, 16) and datamodule.pool.images.shape == (240, 3, 16, 16)
    assert "em/theta_error" not in trainer.callback_metrics and "val/acc_clean" not in trainer.callback_metrics
    assert not torch.equal(model.noise_matrix, torch.eye(4))  # EM ran
    trainer.predict(model, datamodule)  # no test set: predicts the pool
    with open(tmp_path / "label_issues.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 240
    assert list(rows[0])[:6] == ["index", "given_label", "corrected_label", "score", "is_issue", "split"]
    scores = [float(row["score"]) for row in rows]
    assert scores == sorted(scores)
    assert sorted(int(row["index"]) for row in rows) == list(range(240))
    assert (tmp_path / "noise_matrix.csv").exists() and (tmp_path / "predictions.csv").exists()


def test_ranking_recovers_planted_flips(tmp_path: Path) -> None:
    """Well-separated clusters with 10% of the labels moved: the 10% lowest scores are (nearly all) the flips."""
    L.seed_everything(0)
    generator = torch.Generator().manual_seed(0)
    clean = torch.arange(3).repeat_interleave(200)
    centres = torch.tensor([[4.0, 0.0], [0.0, 4.0], [-4.0, -4.0]])
    features = centres[clean] + torch.randn(600, 2, generator=generator)
    given, flipped = flip(clean, 0.1, 3, seed=2)
    datamodule = NoisyLabelDataModule.from_tensors(features, given, batch_size=64)
    model = NoisyLabelClassifier(net=MLP(in_features=2, hidden_sizes=[32], num_classes=3), num_classes=3, lr=1e-2)
    quiet_trainer(max_epochs=8).fit(model, datamodule)
    issues = find_label_issues(model, datamodule)
    with open(issues.to_csv(tmp_path / "label_issues.csv"), newline="") as handle:
        ranked = [int(row["index"]) for row in csv.DictReader(handle)]
    planted = int(flipped.sum())
    top = torch.tensor(ranked[:planted])
    precision = flipped[top].double().mean().item()
    assert precision >= 0.9, f"only {precision:.2f} of the {planted} lowest-scored labels were planted flips"
    assert issues.is_issue[:planted].all()
    assert torch.equal(issues.given_label, given[issues.index])
    assert torch.allclose(issues.posterior.sum(dim=1), torch.ones(600), atol=1e-5)


def test_clean_labels_feed_metrics_and_synthetic_noise_only() -> None:
    images, clean = coloured_squares(20)
    given, flipped = flip(clean, 0.3, 4)
    real = NoisyLabelDataModule.from_tensors(images, given, clean_labels=clean)
    real.setup("fit")
    assert torch.equal(real.pool.given_labels, given) and torch.equal(real.pool.clean_labels, clean)
    realised = real.true_transition_matrix  # the realised confusion of given against clean labels
    assert realised[0, 1].item() == pytest.approx(flipped[clean == 0].double().mean().item())
    synthetic = NoisyLabelDataModule.from_tensors(images, clean_labels=clean, noise_type="symmetric", noise_rate=0.5)
    synthetic.setup("fit")
    assert (synthetic.pool.given_labels != clean).double().mean().item() > 0.3
    assert torch.equal(synthetic.true_transition_matrix, synthetic.noise_model)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"labels": torch.zeros(5, dtype=torch.long)}, r"images has 80 samples but labels has shape \(5,\)"),
        ({"labels": None, "noise_type": "symmetric", "noise_rate": 0.2}, "draws the training labels from clean_labels"),
        ({"labels": None}, "labels is required"),
        ({"test_images": torch.zeros(2, 3, 16, 16)}, "test_images and test_labels go together"),
        (
            {"test_images": torch.zeros(2, 3, 8, 8), "test_labels": torch.zeros(2, dtype=torch.long)},
            r"test_images has per-sample shape \(3, 8, 8\) but images has \(3, 16, 16\)",
        ),
        ({"num_classes": 3}, r"labels must be in \[0, 3\)"),
        ({"seed": 1.5}, "seed must be an integer"),
    ],
)
def test_from_tensors_refuses_bad_input(kwargs: dict, message: str) -> None:
    images, labels = coloured_squares(20)
    arguments = {"labels": labels, **kwargs}
    with pytest.raises(ValueError, match=message):
        NoisyLabelDataModule.from_tensors(images, **arguments)


def test_from_dataset_reads_an_image_folder_of_pngs(tmp_path: Path) -> None:
    from PIL import Image
    from torchvision.datasets import ImageFolder

    images, labels = coloured_squares(5, num_classes=2, size=8)
    for position, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = tmp_path / f"class_{int(label)}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{position:03d}.png")
    datamodule = NoisyLabelDataModule.from_dataset(ImageFolder(str(tmp_path)), val_fraction=0.2, batch_size=4)
    datamodule.setup("fit")
    pool = datamodule.pool
    assert pool.images.shape == (10, 3, 8, 8) and pool.num_classes == 2
    assert torch.equal(pool.given_labels, labels)
    assert pool.images.mean(dim=(0, 2, 3)).abs().max() < 1e-5  # per-channel statistics of the training images
    batch = next(iter(datamodule.train_dataloader()))
    assert batch.x.shape[1:] == (3, 8, 8) and batch.index.dtype == torch.long


def test_load_from_checkpoint_rebuilds_a_cnn_with_no_arguments(tmp_path: Path) -> None:
    L.seed_everything(0)
    images, labels = coloured_squares(20)
    datamodule = NoisyLabelDataModule.from_tensors(images, labels, batch_size=32)
    model = NoisyLabelClassifier(net=CNN(in_channels=3, num_classes=4, width=4), num_classes=4)
    trainer = quiet_trainer(max_epochs=1, default_root_dir=tmp_path)
    trainer.fit(model, datamodule)
    trainer.save_checkpoint(tmp_path / "cnn.ckpt")
    restored = NoisyLabelClassifier.load_from_checkpoint(tmp_path / "cnn.ckpt")
    assert isinstance(restored.net, CNN) and restored.net.init_args["width"] == 4
    model.eval()
    restored.eval()
    with torch.no_grad():
        assert torch.equal(restored(datamodule.pool.images[:8]), model(datamodule.pool.images[:8]))


def test_random_shift_on_rectangular_rgb_images_keeps_channels_together() -> None:
    from noisy_lightning.augment import random_shift

    torch.manual_seed(0)
    images = torch.zeros(16, 3, 5, 7)
    images[:, :, 2, 3] = torch.tensor([1.0, 2.0, 3.0]).view(1, 3)  # one coloured pixel in the middle
    shifted = random_shift(images.flatten(1), 1, (3, 5, 7)).reshape(16, 3, 5, 7)
    for channel, value in enumerate((1.0, 2.0, 3.0)):
        positions = (shifted[:, channel] == value).flatten(1).nonzero()[:, 1]
        reference = (shifted[:, 0] == 1.0).flatten(1).nonzero()[:, 1]
        assert torch.equal(positions, reference)  # every channel moved by the same offset
    rows, cols = reference // 7 - 2, reference % 7 - 3
    assert rows.abs().max() <= 1 and cols.abs().max() <= 1 and len(set(reference.tolist())) > 3
