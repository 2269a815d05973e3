"""The standard methods next to EM: their loss and selection mathematics without a Trainer, their layers, their
bad-input messages and a short fit of each on the shipped sample."""

import math
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from noisy_lightning import (
    MLP,
    CoTeachingClassifier,
    NoiseMatrixEstimation,
    NoisyLabelClassifier,
    NoisyLabelDataModule,
    build_transition_matrix,
    em,
)
from noisy_lightning.noise_layer import NoiseAdaptationLayer, make_noise_layer
from noisy_lightning.peers import (
    anchor_noise_matrix,
    backward_corrected_ce,
    coteaching_forget_rate,
    coteaching_losses,
    forward_corrected_nll,
    generalized_cross_entropy,
    noise_rate_of,
    small_loss_mask,
)


def random_stochastic(num_classes: int, seed: int, diagonal: float = 0.6) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    off = torch.rand(num_classes, num_classes, generator=generator, dtype=torch.float64)
    off.fill_diagonal_(0)
    off = off / off.sum(dim=1, keepdim=True) * (1 - diagonal)
    return off + torch.eye(num_classes, dtype=torch.float64) * diagonal


# ---- losses -------------------------------------------------------------------------------------------------------
def test_forward_correction_is_the_given_label_likelihood_through_theta() -> None:
    logits, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 2])
    theta = random_stochastic(4, 0)
    expected = -torch.log((logits.softmax(dim=1).double() @ theta)[torch.arange(6), labels])
    torch.testing.assert_close(forward_corrected_nll(logits, theta, labels).double(), expected, rtol=1e-5, atol=1e-6)
    # with theta = I it is the cross-entropy
    torch.testing.assert_close(
        forward_corrected_nll(logits, torch.eye(4), labels), F.cross_entropy(logits, labels, reduction="none")
    )


def test_backward_correction_is_unbiased_for_the_clean_loss() -> None:
    logits = torch.randn(5, 3)
    theta = random_stochastic(3, 1, diagonal=0.7)
    for true_class in range(3):
        # E over z ~ theta[y, :] of the corrected loss = -log p(y | x)
        expected_loss = sum(
            theta[true_class, z].item() * backward_corrected_ce(logits, theta, torch.full((5,), z)) for z in range(3)
        )
        clean = F.cross_entropy(logits, torch.full((5,), true_class), reduction="none")
        torch.testing.assert_close(expected_loss, clean, rtol=1e-4, atol=1e-5)


def test_backward_correction_is_bounded_below_as_in_the_papers_code() -> None:
    theta = torch.tensor([[0.6, 0.4], [0.4, 0.6]])  # its inverse has negative entries
    logits = torch.tensor([[60.0, -60.0]], requires_grad=True)  # p(1 | x) = exp(-120)
    loss = backward_corrected_ce(logits, theta, torch.tensor([0]))
    inverse = torch.linalg.inv(theta)
    floor = inverse[0, 0] * -math.log1p(-1e-7) + inverse[0, 1] * -math.log(1e-7)
    assert loss.item() == pytest.approx(floor.item(), rel=1e-5)  # not -120 * 2: the clip holds
    loss.backward()
    assert logits.grad.abs().max() < 1e-6  # nothing left to gain by pushing further


def test_backward_correction_refuses_a_singular_noise_matrix() -> None:
    layer = make_noise_layer("backward", 3)
    singular = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])  # two classes with one anchor
    with pytest.raises(ValueError, match="method='backward' needs an invertible noise matrix"):
        layer.update(singular)
    assert not layer.is_started


def test_generalized_cross_entropy_limits() -> None:
    logits, labels = torch.randn(7, 5), torch.randint(0, 5, (7,))
    given_probability = logits.softmax(dim=1)[torch.arange(7), labels]
    torch.testing.assert_close(generalized_cross_entropy(logits, labels, q=1.0), 1 - given_probability)
    cross_entropy = F.cross_entropy(logits, labels, reduction="none")
    torch.testing.assert_close(generalized_cross_entropy(logits, labels, q=1e-4), cross_entropy, rtol=1e-3, atol=1e-3)


# ---- estimators ---------------------------------------------------------------------------------------------------
def test_anchor_points_recover_theta_from_exact_noisy_class_probabilities() -> None:
    theta = random_stochastic(4, 2)
    # p(z | x) = sum_i p(y = i | x) theta[i, :], with one pure sample (an anchor) per class among mixtures
    mixtures = torch.distributions.Dirichlet(torch.ones(4, dtype=torch.float64)).sample((200,)) * 0.5
    mixtures[:, 0] += 0.5  # mixed samples are never pure
    clean_probabilities = torch.cat([torch.eye(4, dtype=torch.float64), mixtures])
    noisy_probabilities = clean_probabilities @ theta
    torch.testing.assert_close(anchor_noise_matrix(noisy_probabilities, percentile=100), theta)


def test_anchor_percentile_skips_the_most_confident_samples() -> None:
    # p(z = 0 | x) = 0.01, 0.02, ..., 1.00: the 97th percentile ("higher") is 0.98, and the anchor is the largest
    # value below it, so the three most confident samples (possibly memorised) are never anchors.
    first = torch.arange(1, 101, dtype=torch.float64) / 100
    probabilities = torch.stack([first, 1 - first], dim=1)
    assert anchor_noise_matrix(probabilities, percentile=97)[0].tolist() == pytest.approx([0.97, 0.03])
    assert anchor_noise_matrix(probabilities, percentile=100)[0].tolist() == pytest.approx([1.0, 0.0])


def test_anchor_threshold_is_torch_quantile_higher() -> None:
    generator = torch.Generator().manual_seed(0)
    for size in (7, 100, 1001):
        probabilities = torch.rand(size, 3, generator=generator, dtype=torch.float64).softmax(dim=1)
        for percentile in (50.0, 90.0, 97.0, 99.9):
            expected = []
            for column in probabilities.t():
                threshold = torch.quantile(column, percentile / 100, interpolation="higher")
                expected.append(probabilities[torch.where(column < threshold, column, -1.0).argmax()])
            expected = torch.stack(expected)
            torch.testing.assert_close(anchor_noise_matrix(probabilities, percentile), expected / expected.sum(1, True))


def test_anchor_points_of_a_diverged_network_say_so() -> None:
    probabilities = torch.full((10, 3), 1 / 3)
    probabilities[4, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="the network has diverged"):
        anchor_noise_matrix(probabilities)


def test_noise_rate_of_theta_and_the_given_label_frequencies() -> None:
    theta = random_stochastic(3, 3, diagonal=0.7)
    prior = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    given = prior @ theta  # P(z)
    assert noise_rate_of(theta, given * 1000) == pytest.approx(0.3, abs=1e-9)
    symmetric = build_transition_matrix("symmetric", 10, 0.4)
    assert noise_rate_of(symmetric, torch.ones(10)) == pytest.approx(0.4, abs=1e-9)


# ---- co-teaching --------------------------------------------------------------------------------------------------
def test_forget_rate_ramps_linearly_then_stays() -> None:
    # the paper's code: linspace(0, tau, T_k) over the first T_k epochs, then tau
    rates = [coteaching_forget_rate(epoch, 0.5, num_gradual=10) for epoch in (0, 5, 9, 10, 25)]
    assert rates == pytest.approx([0.0, 0.5 * 5 / 9, 0.5, 0.5, 0.5])
    assert coteaching_forget_rate(0, 0.5, num_gradual=1) == 0.0 and coteaching_forget_rate(1, 0.5, 1) == 0.5


def test_small_loss_mask_counts_like_the_papers_code_without_float_slips() -> None:
    assert small_loss_mask(torch.arange(20.0), 0.9)[1] == 2  # int((1 - 0.9) * 20) is 1 in floating point
    assert small_loss_mask(torch.arange(10.0), 0.25)[1] == 7


def test_small_loss_mask_keeps_the_smallest_share() -> None:
    losses = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7])
    mask, kept = small_loss_mask(losses, forget_rate=0.4)
    assert kept == 3 and mask.tolist() == [False, True, True, True, False]
    # over a global batch gathered from two ranks, this rank keeps only what is small globally
    other_rank = torch.tensor([0.2, 0.4, 0.6, 0.8, 1.0])
    mask, kept = small_loss_mask(losses, 0.7, all_losses=torch.stack([losses, other_rank]))
    assert kept == 3 and mask.tolist() == [False, True, False, True, False]


def test_coteaching_exchange_updates_each_network_with_the_other_ones_choice() -> None:
    labels = torch.tensor([0, 0, 0, 0])
    logits_first = torch.tensor([[5.0, 0.0], [0.0, 5.0], [2.0, 0.0], [0.0, 2.0]])  # small loss on samples 0, 2
    logits_second = torch.tensor([[0.0, 2.0], [5.0, 0.0], [0.0, 5.0], [2.0, 0.0]])  # small loss on samples 1, 3
    first, second = coteaching_losses(logits_first, logits_second, labels, forget_rate=0.5)
    per_sample_first = F.cross_entropy(logits_first, labels, reduction="none")
    per_sample_second = F.cross_entropy(logits_second, labels, reduction="none")
    assert first.item() == pytest.approx(per_sample_first[[1, 3]].mean().item())
    assert second.item() == pytest.approx(per_sample_second[[0, 2]].mean().item())


def test_split_batch_gradients_average_to_the_single_process_gradient() -> None:
    torch.manual_seed(0)
    logits_first, logits_second = torch.randn(8, 3, requires_grad=True), torch.randn(8, 3, requires_grad=True)
    labels = torch.randint(0, 3, (8,))
    first, second = coteaching_losses(logits_first, logits_second, labels, 0.25)
    (first + second).backward()
    single = (logits_first.grad.clone(), logits_second.grad.clone())
    logits_first.grad = logits_second.grad = None
    losses = [F.cross_entropy(logits, labels, reduction="none").detach() for logits in (logits_first, logits_second)]
    for rank in (0, 1):  # two ranks of 4; DDP averages their gradients
        part = slice(4 * rank, 4 * rank + 4)
        gathered = iter([loss.view(2, 4) for loss in losses])

        def gather(_: torch.Tensor, answers=gathered) -> torch.Tensor:
            return next(answers)

        first, second = coteaching_losses(logits_first[part], logits_second[part], labels[part], 0.25, gather=gather)
        ((first + second) / 2).backward()
    torch.testing.assert_close(logits_first.grad, single[0])
    torch.testing.assert_close(logits_second.grad, single[1])


# ---- layers and arguments -----------------------------------------------------------------------------------------
def test_noise_adaptation_layer_learns_theta_from_its_initialisation() -> None:
    layer = NoiseAdaptationLayer(3)
    theta = random_stochastic(3, 4, diagonal=0.8).float()
    layer.update(theta)
    torch.testing.assert_close(torch.softmax(layer.transition_logits, dim=1), theta)
    logits, labels = torch.randn(16, 3), torch.randint(0, 3, (16,))
    layer.loss(logits, labels, torch.arange(16)).backward()
    assert layer.transition_logits.grad.abs().sum() > 0
    with torch.no_grad():
        layer.transition_logits -= layer.transition_logits.grad
    layer.refresh()
    torch.testing.assert_close(layer.noise_matrix, torch.softmax(layer.transition_logits, dim=1))
    assert not torch.allclose(layer.noise_matrix, theta)


def test_correction_layers_train_with_cross_entropy_until_theta_is_set() -> None:
    logits, labels = torch.randn(8, 3), torch.randint(0, 3, (8,))
    for method in ("forward", "backward", "nal"):
        layer = make_noise_layer(method, 3)
        torch.testing.assert_close(layer.loss(logits, labels, torch.arange(8)), F.cross_entropy(logits, labels))
        layer.update(random_stochastic(3, 5, diagonal=0.7).float())
        assert not torch.allclose(layer.loss(logits, labels, torch.arange(8)), F.cross_entropy(logits, labels))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: NoisyLabelClassifier(method="mae"), "method must be one of"),
        (lambda: NoisyLabelClassifier(method="gce", gce_q=0.0), r"gce_q must be a finite number in \(0, 1\]"),
        (lambda: CoTeachingClassifier(forget_rate=1.0), r"forget_rate must be a finite number in \[0, 1\)"),
        (lambda: CoTeachingClassifier(num_gradual=0), "num_gradual must be an integer >= 1"),
        (lambda: NoiseMatrixEstimation(estimator="oracle"), "estimator must be one of"),
        (lambda: NoiseMatrixEstimation(anchor_percentile=0), r"anchor_percentile must be a finite number in \(0, 100"),
        (lambda: NoiseMatrixEstimation(warmup_epochs=0), "warmup_epochs must be an integer >= 1"),
    ],
)
def test_bad_arguments_name_the_parameter(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.slow
def test_the_true_noise_matrix_needs_data_that_knows_it() -> None:
    images, labels = torch.rand(200, 8, 8), torch.randint(0, 3, (200,))
    data = NoisyLabelDataModule.from_tensors(images, labels, num_classes=3)
    model = NoisyLabelClassifier(net=MLP(64, [16], 3), num_classes=3, method="forward")
    trainer = quiet_trainer(callbacks=[NoiseMatrixEstimation(estimator="true")])
    with pytest.raises(ValueError, match="needs data that knows its true transition matrix"):
        trainer.fit(model, data)


# ---- short fits on the shipped sample ------------------------------------------------------------------------------
def sample_data() -> NoisyLabelDataModule:
    return NoisyLabelDataModule(noise_type="pair_flip", noise_rate=0.45, batch_size=128)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["forward", "backward", "nal"])
def test_correction_methods_get_their_estimate_at_the_end_of_the_warm_up(method: str) -> None:
    L.seed_everything(0)
    data = sample_data()
    model = NoisyLabelClassifier(method=method)
    seen: list[bool] = []
    at_estimate: dict[str, torch.Tensor] = {}

    class Watch(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            seen.append(pl_module.noise_layer.is_started)
            if trainer.current_epoch == 2:  # the weights that the estimate at the end of epoch 1 saw
                pool = data.pool
                probabilities = pl_module.logits_of(pool.images[pool.train_indices]).softmax(dim=1).double()
                if method == "nal":
                    given = pool.given_labels[pool.train_indices]
                    expected = em.initial_noise_matrix(probabilities, given, 10, hard=True)  # the paper code's
                else:
                    expected = anchor_noise_matrix(probabilities, 97.0)
                at_estimate["expected"], at_estimate["theta"] = expected, pl_module.noise_matrix.clone()

    trainer = quiet_trainer(max_epochs=4, callbacks=[NoiseMatrixEstimation(warmup_epochs=2), Watch()])
    trainer.fit(model, data)
    assert seen == [False, False, True, True]
    torch.testing.assert_close(at_estimate["theta"].double(), at_estimate["expected"], atol=1e-5, rtol=0)
    # forward and backward keep theta fixed; the noise adaptation layer learns it on
    assert torch.equal(model.noise_matrix, at_estimate["theta"]) is (method != "nal")
    assert trainer.test(model, data, verbose=False)[0]["test/acc"] > 0.3  # chance is 0.1


@pytest.mark.slow
def test_methods_add_their_estimator_and_the_oracle_uses_the_truth() -> None:
    L.seed_everything(0)
    data = sample_data()
    model = NoisyLabelClassifier(method="forward")
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(model, data)
    (estimation,) = [callback for callback in trainer.callbacks if isinstance(callback, NoiseMatrixEstimation)]
    assert estimation.active_estimator == "anchor" and estimation.warmup_epochs == 6
    oracle = NoisyLabelClassifier(method="forward")
    quiet_trainer(max_epochs=1, callbacks=[NoiseMatrixEstimation(estimator="true")]).fit(oracle, data)
    torch.testing.assert_close(oracle.noise_matrix.double(), data.true_transition_matrix.double(), atol=1e-6, rtol=0)


@pytest.mark.slow
def test_gce_fits_without_a_noise_matrix() -> None:
    L.seed_everything(0)
    data = sample_data()
    model = NoisyLabelClassifier(method="gce")
    trainer = quiet_trainer(max_epochs=3)
    trainer.fit(model, data)
    assert not model.noise_layer.is_started
    assert not any(isinstance(callback, NoiseMatrixEstimation) for callback in trainer.callbacks)
    assert trainer.test(model, data, verbose=False)[0]["test/acc"] > 0.5


@pytest.mark.slow
def test_coteaching_estimates_its_forget_rate_and_trains_two_different_networks() -> None:
    L.seed_everything(0)
    data = sample_data()
    model = CoTeachingClassifier(num_gradual=2)
    trainer = quiet_trainer(max_epochs=3)
    trainer.fit(model, data)
    assert model.noise_layer.is_started  # anchor-point theta after the first epoch
    estimated = model.final_forget_rate()
    frequencies = torch.bincount(data.pool.given_labels[data.pool.train_indices], minlength=10)
    assert estimated == pytest.approx(noise_rate_of(model.noise_matrix, frequencies)) and 0 < estimated < 0.9
    assert trainer.callback_metrics["coteaching/forget_rate"].item() == pytest.approx(estimated, rel=1e-5)
    first = torch.cat([parameter.flatten() for parameter in model.net.parameters()])
    second = torch.cat([parameter.flatten() for parameter in model.peer_net.parameters()])
    assert not torch.allclose(first, second)
    assert trainer.test(model, data, verbose=False)[0]["test/acc"] > 0.3  # chance is 0.1
    given = CoTeachingClassifier(forget_rate=0.45)
    assert given.final_forget_rate() == 0.45 and given.configure_callbacks() == []


@pytest.mark.slow
def test_a_resumed_fit_keeps_the_estimated_theta(tmp_path: Path) -> None:
    L.seed_everything(0)
    data = sample_data()
    model = NoisyLabelClassifier(method="forward")
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = quiet_trainer(
        max_epochs=2, callbacks=[NoiseMatrixEstimation(warmup_epochs=1), checkpoint], enable_checkpointing=True
    )
    trainer.fit(model, data)
    estimated = model.noise_matrix.clone()
    resumed = NoisyLabelClassifier(method="forward")
    trainer = quiet_trainer(
        max_epochs=3, callbacks=[NoiseMatrixEstimation(warmup_epochs=1)], enable_checkpointing=False
    )
    trainer.fit(resumed, data, ckpt_path=str(tmp_path / "last.ckpt"))
    assert torch.equal(resumed.noise_matrix, estimated)  # forward correction's theta is fixed once estimated
    loaded = NoisyLabelClassifier.load_from_checkpoint(tmp_path / "last.ckpt")
    assert loaded.method == "forward" and torch.equal(loaded.noise_matrix, estimated)


@pytest.mark.slow
def test_the_noise_adaptation_layer_starts_adam_afresh_when_theta_is_set() -> None:
    L.seed_everything(0)
    data = sample_data()
    model = NoisyLabelClassifier(method="nal")
    steps: dict[str, object] = {}

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.current_epoch == 1 and batch_idx == 0:
                state = trainer.optimizers[0].state.get(pl_module.noise_layer.transition_logits)
                steps["at the estimate"] = state
            if trainer.current_epoch == 1 and batch_idx == 1:
                state = trainer.optimizers[0].state[pl_module.noise_layer.transition_logits]
                steps["one step later"] = int(state["step"])

    trainer = quiet_trainer(max_epochs=2, callbacks=[NoiseMatrixEstimation(warmup_epochs=1), Watch()])
    trainer.fit(model, data)
    # without the reset Adam would have counted every warm-up step (with zero gradients) for B
    assert steps == {"at the estimate": None, "one step later": 1}


@pytest.mark.slow
def test_coteaching_takes_a_configs_estimation_callback_as_its_own() -> None:
    L.seed_everything(0)
    data = sample_data()
    model = CoTeachingClassifier(num_gradual=2)
    trainer = quiet_trainer(max_epochs=3, callbacks=[NoiseMatrixEstimation(warmup_epochs=1)])  # estimator=None
    trainer.fit(model, data)
    assert model.noise_layer.is_started and model.final_forget_rate() > 0


@pytest.mark.slow
def test_an_estimation_callback_is_off_for_methods_that_ignore_theta_and_warns_on_a_short_fit() -> None:
    data = sample_data()
    model = NoisyLabelClassifier(method="gce")
    with pytest.warns(UserWarning, match="NoiseMatrixEstimation is off for this fit"):
        quiet_trainer(max_epochs=1, callbacks=[NoiseMatrixEstimation(estimator="anchor", warmup_epochs=1)]).fit(
            model, data
        )
    assert not model.noise_layer.is_started
    with pytest.warns(UserWarning, match=r"stops there or before, so this fit trains on the given labels only"):
        quiet_trainer(max_epochs=2).fit(NoisyLabelClassifier(method="forward"), data)


def test_fresh_copy_warns_only_for_parameters_it_cannot_draw_again() -> None:
    from noisy_lightning.coteaching import fresh_copy

    class Scale(torch.nn.Module):  # a parameter without reset_parameters(): the copy would start identical
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(4))

    convolutional = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # batch norm's fixed ones and zeros are no reason to warn
        twin = fresh_copy(convolutional)
    assert not torch.equal(twin[0].weight, convolutional[0].weight)
    with pytest.warns(UserWarning, match=r"the same 1\.weight as the first"):
        fresh_copy(torch.nn.Sequential(torch.nn.Linear(4, 4), Scale()))
