import lightning as L
import pytest
import torch
from helpers import quiet_trainer

from noisy_lightning import MLP, EMNoiseEstimation, NoisyLabelClassifier, NoisyLabelDataModule
from noisy_lightning.augment import random_shift


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hidden_sizes": [500, 0]}, "each of hidden_sizes must be an integer >= 1, got 0"),
        ({"activation": "swishy"}, "activation must be one of 'relu'"),
        ({"dropout": 1.0}, r"dropout must be a finite number in \[0, 1\), got 1.0"),
        ({"num_classes": 1}, "num_classes must be an integer >= 2"),
        ({"in_features": 0}, "in_features must be an integer >= 1"),
    ],
)
def test_mlp_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MLP(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "coteaching"}, "method must be one of 'ce', 'em'"),
        ({"lr": 0.0}, r"lr must be a finite number in \(0, inf\)"),
        ({"lr": True}, r"lr must be a finite number in \(0, inf\), got True"),
        ({"weight_decay": -1.0}, r"weight_decay must be a finite number in \[0, inf\)"),
        ({"weight_decay": float("inf")}, r"weight_decay must be a finite number in \[0, inf\), got inf"),
        ({"optimizer": "lbfgs"}, "optimizer must be one of"),
        ({"augment_shift": -1}, "augment_shift must be an integer >= 0"),
        ({"em_targets": "hard"}, "em_targets must be one of 'online', 'stored'"),
        ({"em_targets": "hard", "method": "ce"}, "em_targets must be one of 'online', 'stored'"),
    ],
)
def test_classifier_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NoisyLabelClassifier(**kwargs)


@pytest.mark.parametrize("hidden_sizes", [[], [32], [64, 32, 16]])
def test_mlp_any_depth(hidden_sizes: list[int]) -> None:
    net = MLP(in_features=12, hidden_sizes=hidden_sizes, num_classes=3, activation="tanh", dropout=0.1, batch_norm=True)
    assert net(torch.randn(5, 3, 4)).shape == (5, 3)
    assert sum(isinstance(m, torch.nn.Linear) for m in net.modules()) == len(hidden_sizes) + 1


def test_random_shift_moves_pixels_and_keeps_background() -> None:
    torch.manual_seed(0)
    images = torch.full((64, 28 * 28), -0.5)
    images[:, 14 * 28 + 14] = 3.0  # one bright pixel in the middle
    shifted = random_shift(images, 2, (28, 28))
    assert shifted.shape == images.shape
    assert torch.equal((shifted == 3.0).sum(dim=1), torch.ones(64, dtype=torch.long))
    positions = (shifted == 3.0).nonzero()[:, 1]
    rows, cols = positions // 28 - 14, positions % 28 - 14
    assert rows.abs().max() <= 2 and cols.abs().max() <= 2 and len(set(positions.tolist())) > 5
    assert set(shifted.unique().tolist()) == {-0.5, 3.0}


def test_fit_on_the_sample_learns_and_logs_the_documented_metrics() -> None:
    L.seed_everything(0)
    datamodule = NoisyLabelDataModule(batch_size=128)
    model = NoisyLabelClassifier(lr=2e-3)
    trainer = quiet_trainer(max_epochs=4)
    trainer.fit(model, datamodule)
    metrics = trainer.callback_metrics
    assert {"train/loss", "val/acc_noisy", "val/acc_clean", "val/nll_noisy"} <= set(metrics)
    # noise rate 0: noisy and clean validation labels are the same
    assert metrics["val/acc_noisy"].item() == pytest.approx(metrics["val/acc_clean"].item())
    result = trainer.test(model, datamodule, verbose=False)[0]
    assert result["test/acc"] > 0.85  # chance is 0.1
    probabilities = torch.cat(trainer.predict(model, datamodule))
    assert probabilities.shape == (1000, 10)
    assert torch.allclose(probabilities.sum(dim=1), torch.ones(1000), atol=1e-5)


def test_noisy_validation_accuracy_is_below_clean_under_noise() -> None:
    L.seed_everything(0)
    datamodule = NoisyLabelDataModule(noise_type="symmetric", noise_rate=0.5, batch_size=128)
    trainer = quiet_trainer(max_epochs=3)
    trainer.fit(NoisyLabelClassifier(lr=2e-3), datamodule)
    metrics = trainer.callback_metrics
    assert metrics["val/acc_clean"] > metrics["val/acc_noisy"] + 0.2


def test_class_count_mismatch_between_model_and_data() -> None:
    trainer = quiet_trainer(fast_dev_run=True)
    with pytest.raises(ValueError, match="num_classes=5 does not match the data, which has 10 classes"):
        trainer.fit(NoisyLabelClassifier(net=MLP(num_classes=5), num_classes=5), NoisyLabelDataModule())


def test_net_with_wrong_output_width_is_named() -> None:
    trainer = quiet_trainer(fast_dev_run=True)
    with pytest.raises(
        ValueError, match=r"net returned logits of shape \(2, 7\); expected \[batch, num_classes\] = \[2, 10\]"
    ):
        trainer.fit(NoisyLabelClassifier(net=MLP(num_classes=7)), NoisyLabelDataModule())


def test_em_method_adds_the_callback_when_missing() -> None:
    model = NoisyLabelClassifier(method="em")
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(model, NoisyLabelDataModule(noise_type="symmetric", noise_rate=0.3, batch_size=256))
    assert any(isinstance(callback, EMNoiseEstimation) for callback in trainer.callbacks)
