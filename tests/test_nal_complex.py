"""The noise adaptation layer's complex model: its per-sample noise mathematics without a Trainer, the layer, how
the classifier finds the hidden features, bad input, and a short fit on the shipped sample."""

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from noisy_lightning import CNN, MLP, NoiseMatrixEstimation, NoisyLabelClassifier, NoisyLabelDataModule, em
from noisy_lightning.issues import find_label_issues
from noisy_lightning.noise_layer import ComplexNoiseAdaptationLayer, make_noise_layer
from noisy_lightning.peers import (
    forward_corrected_nll,
    implied_noise_matrix,
    instance_forward_nll,
    instance_log_noise_matrices,
    instance_posterior,
)


def random_stochastic(num_classes: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.rand(num_classes, num_classes, generator=generator) + 2 * torch.eye(num_classes)
    return matrix / matrix.sum(dim=1, keepdim=True)


# ---- the mathematics ----------------------------------------------------------------------------------------------
def test_per_sample_noise_matrices_are_a_softmax_over_the_given_label_of_u_h_plus_b() -> None:
    torch.manual_seed(0)
    features, weight, bias = torch.randn(5, 4), torch.randn(9, 4), torch.randn(3, 3)
    log_matrices = instance_log_noise_matrices(features, weight, bias)
    assert log_matrices.shape == (5, 3, 3)
    for t in range(5):
        for i in range(3):
            scores = torch.stack([weight[3 * i + j] @ features[t] + bias[i, j] for j in range(3)])
            torch.testing.assert_close(log_matrices[t, i], torch.log_softmax(scores, dim=0))


def test_with_zero_weights_the_complex_model_is_the_simple_one() -> None:
    torch.manual_seed(1)
    theta = random_stochastic(3, 1)
    logits, labels = torch.randn(6, 3), torch.randint(0, 3, (6,))
    log_matrices = instance_log_noise_matrices(torch.randn(6, 4), torch.zeros(9, 4), theta.log())
    torch.testing.assert_close(log_matrices.exp(), theta.expand(6, 3, 3))
    torch.testing.assert_close(
        instance_forward_nll(logits, log_matrices, labels), forward_corrected_nll(logits, theta, labels)
    )
    torch.testing.assert_close(
        instance_posterior(logits, log_matrices, labels), em.posterior(F.log_softmax(logits, dim=1), theta, labels)
    )


def test_the_per_sample_loss_and_posterior_read_each_samples_own_matrix() -> None:
    torch.manual_seed(2)
    logits, labels = torch.randn(4, 3), torch.tensor([0, 2, 1, 2])
    matrices = torch.stack([random_stochastic(3, seed) for seed in range(4)])
    loss = instance_forward_nll(logits, matrices.log(), labels)
    posterior = instance_posterior(logits, matrices.log(), labels)
    for t in range(4):
        probabilities = logits[t].softmax(dim=0)
        joint = probabilities * matrices[t, :, labels[t]]
        torch.testing.assert_close(loss[t], -joint.sum().log())
        torch.testing.assert_close(posterior[t], joint / joint.sum())


def test_the_implied_matrix_weights_each_samples_rows_by_its_class_probability() -> None:
    first, second = random_stochastic(2, 0).double(), random_stochastic(2, 1).double()
    probabilities = torch.tensor([[1.0, 0.0], [0.25, 0.75]], dtype=torch.float64)
    implied = implied_noise_matrix(probabilities, torch.stack([first, second]))
    torch.testing.assert_close(implied[0], (1.0 * first[0] + 0.25 * second[0]) / 1.25)
    torch.testing.assert_close(implied[1], second[1])  # the first sample has no mass in class 1
    torch.testing.assert_close(implied.sum(dim=1), torch.ones(2, dtype=torch.float64))


# ---- the layer -----------------------------------------------------------------------------------------------------
def test_the_layer_starts_from_theta_and_learns_u_and_b_together() -> None:
    layer = ComplexNoiseAdaptationLayer(3, feature_size=4)
    logits, labels, features = torch.randn(8, 3), torch.randint(0, 3, (8,)), torch.randn(8, 4, requires_grad=True)
    torch.testing.assert_close(layer.loss(logits, labels, torch.arange(8), features), F.cross_entropy(logits, labels))
    theta = random_stochastic(3, 3)
    layer.update(theta)
    torch.testing.assert_close(layer.noise_matrix, theta)
    assert torch.count_nonzero(layer.transition_weight) == 0
    torch.testing.assert_close(
        layer.loss(logits, labels, torch.arange(8), features), forward_corrected_nll(logits, theta, labels).mean()
    )
    layer.loss(logits, labels, torch.arange(8), features).backward()
    assert layer.transition_weight.grad.abs().sum() > 0 and layer.transition_logits.grad.abs().sum() > 0
    assert features.grad.abs().sum() == 0  # u = 0: the noise does not depend on h(x) yet
    with torch.no_grad():
        layer.transition_weight -= layer.transition_weight.grad
    layer.loss(logits, labels, torch.arange(8), features).backward()
    assert features.grad.abs().sum() > 0  # now h(x) learns through the noise too
    posterior = layer.posterior(logits, labels, features)
    simple = em.posterior(F.log_softmax(logits, dim=1), theta, labels)
    assert not torch.allclose(posterior, simple)  # the posterior now depends on h(x)


def test_the_layer_names_what_is_missing() -> None:
    layer = ComplexNoiseAdaptationLayer(3, feature_size=4)
    layer.update(random_stochastic(3, 0))
    logits, labels = torch.randn(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="needs the hidden features"):
        layer.loss(logits, labels, torch.arange(2))
    with pytest.raises(ValueError, match="hidden features of width 4, got features of shape"):
        layer.posterior(logits, labels, torch.randn(2, 5))
    with pytest.raises(ValueError, match="needs feature_size"):
        make_noise_layer("nal_complex", 3)
    with pytest.raises(ValueError, match="feature_size must be an integer >= 1"):
        ComplexNoiseAdaptationLayer(3, feature_size=0)


# ---- the classifier ------------------------------------------------------------------------------------------------
def test_the_classifier_reads_the_input_of_the_nets_last_linear_layer() -> None:
    assert NoisyLabelClassifier(method="nal_complex").feature_layer_name == "layers.6"
    assert NoisyLabelClassifier(method="nal_complex", net=CNN()).feature_layer_name == "head.2"
    model = NoisyLabelClassifier(method="nal_complex", net=MLP(16, [8, 5], 3), num_classes=3).eval()
    assert model.noise_layer.transition_weight.shape == (9, 5)
    x = torch.randn(4, 16)
    logits, features = model.net_outputs(x)
    hidden = model.net.layers[:-1](x)
    torch.testing.assert_close(features, hidden)
    torch.testing.assert_close(logits, model.net.layers[-1](hidden))
    assert len(model.net.get_submodule("layers.6")._forward_pre_hooks) == 0  # the hook lives for one call
    assert NoisyLabelClassifier(method="nal", net=MLP(16, [8], 3), num_classes=3).net_outputs(x)[1] is None


@pytest.mark.parametrize(
    ("net", "message"),
    [
        (nn.Sequential(nn.Flatten(), nn.Conv1d(1, 10, 1)), "it has no nn.Linear"),
        (nn.Sequential(nn.Linear(16, 10), nn.ReLU(), nn.Linear(10, 12)), "its last nn.Linear has 12 outputs"),
    ],
)
def test_a_net_without_a_last_linear_layer_is_refused(net: nn.Module, message: str) -> None:
    with pytest.raises(ValueError, match=f"method='nal_complex' reads the hidden features.*{message}"):
        NoisyLabelClassifier(method="nal_complex", net=net)


@pytest.mark.slow
def test_a_short_fit_learns_the_complex_noise_and_resumes_with_it(tmp_path: Path) -> None:
    L.seed_everything(0)
    data = NoisyLabelDataModule(noise_type="pair_flip", noise_rate=0.45, batch_size=128)
    model = NoisyLabelClassifier(method="nal_complex")
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = quiet_trainer(
        max_epochs=3, callbacks=[NoiseMatrixEstimation(warmup_epochs=1), checkpoint], enable_checkpointing=True
    )
    trainer.fit(model, data)
    assert model.noise_layer.is_started and model.noise_layer.transition_weight.abs().sum() > 0
    assert trainer.test(model, data, verbose=False)[0]["test/acc"] > 0.3  # chance is 0.1
    issues = find_label_issues(model, data)
    assert len(issues.score) == data.pool.size
    loaded = NoisyLabelClassifier.load_from_checkpoint(tmp_path / "last.ckpt")
    assert loaded.method == "nal_complex"
    torch.testing.assert_close(loaded.noise_layer.transition_weight, model.noise_layer.transition_weight)
    torch.testing.assert_close(loaded.noise_matrix, model.noise_matrix)


def test_the_implied_matrix_falls_back_to_the_average_for_a_class_no_sample_is_in() -> None:
    first, second = random_stochastic(2, 2).double(), random_stochastic(2, 3).double()
    probabilities = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    implied = implied_noise_matrix(probabilities, torch.stack([first, second]))
    torch.testing.assert_close(implied[1], (first[1] + second[1]) / 2)


def test_the_layers_implied_matrix_in_chunks_is_the_one_of_the_whole_set() -> None:
    torch.manual_seed(3)
    layer = ComplexNoiseAdaptationLayer(3, feature_size=4)
    layer.update(random_stochastic(3, 1))
    with torch.no_grad():
        layer.transition_weight.normal_()
    logits, features = torch.randn(10, 3), torch.randn(10, 4)
    whole = implied_noise_matrix(logits.softmax(dim=1), layer.log_noise_matrices(features).exp())
    torch.testing.assert_close(layer.implied_noise_matrix(logits, features, batch_size=3), whole)


class TwoHeads(nn.Module):
    """A net whose last registered nn.Linear is an auxiliary head that eval mode skips."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head, self.aux = nn.Linear(16, 8), nn.Linear(8, 10), nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.body(x).relu()
        return self.head(hidden) + (self.aux(hidden) if self.training else 0)


def test_a_feature_layer_that_does_not_run_once_per_pass_is_named() -> None:
    model = NoisyLabelClassifier(method="nal_complex", net=TwoHeads()).eval()
    assert model.feature_layer_name == "aux"
    with pytest.raises(ValueError, match=r"layer 'aux' \(its last nn.Linear\), which must run once .* ran 0 time"):
        model.net_outputs(torch.randn(2, 16))


def test_a_lazy_last_layer_is_refused_with_what_to_do() -> None:
    net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.LazyLinear(10))
    with pytest.raises(ValueError, match=r"nn\.LazyLinear that has not run yet"):
        NoisyLabelClassifier(method="nal_complex", net=net)


def test_the_noise_is_float32_under_mixed_precision() -> None:
    features, weight, bias = torch.randn(4, 8), torch.randn(9, 8), torch.randn(3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        log_matrices = instance_log_noise_matrices(features, weight, bias)
    assert log_matrices.dtype == torch.float32
    torch.testing.assert_close(log_matrices, instance_log_noise_matrices(features, weight, bias))


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_the_complex_model_trains_under_bfloat16(precision: str) -> None:
    L.seed_everything(0)
    data = NoisyLabelDataModule(noise_type="pair_flip", noise_rate=0.3, batch_size=128)
    model = NoisyLabelClassifier(method="nal_complex", net=MLP(hidden_sizes=[64]))
    trainer = quiet_trainer(max_epochs=2, precision=precision, callbacks=[NoiseMatrixEstimation(warmup_epochs=1)])
    trainer.fit(model, data)
    assert model.noise_layer.is_started and model.noise_matrix.dtype == torch.float32
    assert (
        torch.isfinite(trainer.callback_metrics["train/loss"]) and model.noise_layer.transition_weight.abs().sum() > 0
    )
    torch.testing.assert_close(model.noise_matrix.double().sum(dim=1), torch.ones(10, dtype=torch.float64))
