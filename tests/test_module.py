import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import quiet_trainer

from noisy_lightning import MLP, EMNoiseEstimation, NoisyLabelClassifier, NoisyLabelDataModule
from noisy_lightning.augment import random_shift
from noisy_lightning.noise import pair_flip


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


def test_val_nll_noisy_is_the_given_label_likelihood_under_theta() -> None:
    """val/nll_noisy = mean over the validation split of -log sum_i p(i | x) theta[i, z], computed here by hand: with
    theta = I during a cross-entropy fit, then with a theta set on the noise layer. 400 validation rows in batches of
    128 (the last one 16): the mean is over samples, not over batches."""
    L.seed_everything(0)
    datamodule = NoisyLabelDataModule(noise_type="pair_flip", noise_rate=0.3, batch_size=128, eval_batch_size=128)
    model = NoisyLabelClassifier(net=MLP(hidden_sizes=[32]), lr=2e-3)
    trainer = quiet_trainer(max_epochs=2)
    trainer.fit(model, datamodule)

    index = datamodule.pool.val_indices
    given = datamodule.pool.given_labels[index]
    probabilities = torch.softmax(model.logits_of(datamodule.pool.images[index]).double(), dim=1)

    def nll_by_hand(theta: torch.Tensor) -> float:
        return -(probabilities * theta.double()[:, given].t()).sum(dim=1).log().mean().item()

    # The last validation of the fit ran with the final weights and theta = I (the given labels' cross-entropy).
    assert trainer.callback_metrics["val/nll_noisy"].item() == pytest.approx(nll_by_hand(torch.eye(10)), rel=1e-5)
    theta = pair_flip(10, 0.3)
    model.noise_layer.update(theta)
    logged = trainer.validate(model, datamodule, verbose=False)[0]["val/nll_noisy"]
    assert logged == pytest.approx(nll_by_hand(theta), rel=1e-5)
    assert abs(nll_by_hand(theta) - nll_by_hand(torch.eye(10))) > 0.05  # theta really changes the value


@pytest.mark.parametrize(
    ("name", "optimizer_class", "settings"),
    [
        ("adam", torch.optim.Adam, {"betas": (0.9, 0.999), "decoupled_weight_decay": False}),
        ("adamw", torch.optim.AdamW, {"betas": (0.9, 0.999), "decoupled_weight_decay": True}),
        ("sgd", torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
    ],
)
@pytest.mark.parametrize("lr_scheduler", ["cosine", "none"])
def test_the_configured_optimiser_and_schedule_reach_the_trainer(
    name: str, optimizer_class: type, settings: dict, lr_scheduler: str
) -> None:
    model = NoisyLabelClassifier(
        net=MLP(hidden_sizes=[32]), optimizer=name, lr=0.05, weight_decay=0.01, lr_scheduler=lr_scheduler
    )
    trainer = quiet_trainer(max_epochs=3, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(model, NoisyLabelDataModule())
    (optimizer,) = trainer.optimizers
    assert type(optimizer) is optimizer_class
    (group,) = optimizer.param_groups
    assert {id(parameter) for parameter in group["params"]} == {id(parameter) for parameter in model.parameters()}
    assert group["weight_decay"] == 0.01
    assert {key: group[key] for key in settings} == settings
    if lr_scheduler == "none":
        assert trainer.lr_scheduler_configs == [] and group["lr"] == 0.05
    else:
        (config,) = trainer.lr_scheduler_configs
        assert isinstance(config.scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)
        assert (config.scheduler.T_max, config.interval) == (3, "epoch")  # annealed over Trainer(max_epochs)
        assert group["initial_lr"] == 0.05 and group["lr"] == pytest.approx(0.0, abs=1e-12)  # after 3 of 3 epochs


def expected_first_step(name: str, weight: torch.Tensor, grad: torch.Tensor, lr: float, decay: float) -> torch.Tensor:
    """A parameter after the optimiser's first step, written out from the update rules (eps = 1e-8).

    On the first step Adam's bias-corrected moments are ``g`` and ``g**2``, so its step is ``lr * g / (|g| + eps)``.
    """
    if name == "sgd":  # L2 in the gradient; Nesterov with momentum 0.9 and an empty buffer: (1 + 0.9) * d
        return weight - lr * 1.9 * (grad + decay * weight)
    if name == "adam":  # L2 in the gradient, so the decay goes through the adaptive normalisation
        # grad + decay * weight, rounded as torch rounds it: where the two nearly cancel, the step g / (|g| + eps)
        # hangs on the last bit of g.
        coupled = grad.add(weight, alpha=decay)
        return weight - lr * coupled / (coupled.abs() + 1e-8)
    return weight * (1 - lr * decay) - lr * grad / (grad.abs() + 1e-8)  # adamw: decoupled, outside the adaptive step


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_weight_decay_enters_the_first_update_as_each_optimiser_defines_it(name: str) -> None:
    """One training step from the same weights on the same batch, with weight_decay 0 and 0.1: each result equals
    the update rule applied by hand to the gradient of that batch, so the decay changes the update as it should."""
    lr = 0.1
    after = {}
    for decay in (0.0, 0.1):
        L.seed_everything(0)
        net = MLP(hidden_sizes=[32], dropout=0.0)
        model = NoisyLabelClassifier(
            net=net, optimizer=name, lr=lr, weight_decay=decay, lr_scheduler="none", augment_shift=0
        )
        datamodule = NoisyLabelDataModule(noise_type="symmetric", noise_rate=0.3, batch_size=64)
        datamodule.setup("fit")
        # The gradient of the first training batch (epoch 0's order depends on the seed only), computed here.
        batch = next(iter(datamodule.train_dataloader()))
        before = {key: value.detach().clone() for key, value in net.named_parameters()}
        grads = torch.autograd.grad(F.cross_entropy(net(batch.x), batch.label), list(net.parameters()))
        quiet_trainer(max_steps=1, limit_val_batches=0).fit(model, datamodule)
        after[decay] = {key: value.detach().clone() for key, value in net.named_parameters()}
        for (key, weight), grad in zip(before.items(), grads, strict=True):
            torch.testing.assert_close(
                after[decay][key], expected_first_step(name, weight, grad, lr, decay), rtol=0, atol=1e-6, msg=key
            )
    for key in after[0.0]:
        assert not torch.equal(after[0.0][key], after[0.1][key]), key


def test_logits_of_follows_the_weights_not_the_reported_device() -> None:
    """In the setup hook Lightning already reports the accelerator (``self.device``) while the weights are still on
    the CPU; the shape check run there must feed the inputs to where the weights are."""
    model = NoisyLabelClassifier(net=MLP(hidden_sizes=[8]))
    model._device = torch.device("meta")  # what Lightning sets before setup on a GPU, here a device with no data
    logits = model.logits_of(torch.rand(3, 784))
    assert logits.shape == (3, 10) and logits.device.type == "cpu"
