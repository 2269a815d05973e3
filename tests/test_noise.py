import math

import pytest
import torch

from noisy_lightning import noise

K = 10
N = 60_000


@pytest.mark.parametrize(
    ("noise_type", "rate", "expected_flip"),
    [
        ("symmetric", 0.2, 0.2),
        ("symmetric", 0.5, 0.5),
        ("uniform", 0.5, 0.5 * (K - 1) / K),
        ("pair_flip", 0.45, 0.45),
        ("permutation", 0.46, 0.46),
        ("none", 0.0, 0.0),
    ],
)
def test_builders_are_row_stochastic_and_realise_the_rate(noise_type: str, rate: float, expected_flip: float) -> None:
    matrix = noise.build_transition_matrix(noise_type, K, rate, seed=3)
    assert matrix.shape == (K, K)
    assert torch.allclose(matrix.sum(dim=1), torch.ones(K, dtype=torch.float64), atol=1e-12)
    assert (matrix >= 0).all()
    assert math.isclose(1 - matrix.diagonal().mean().item(), expected_flip, abs_tol=1e-12)
    labels = torch.arange(N) % K
    result = noise.corrupt_labels(labels, matrix, seed=0)
    # 60k Bernoulli draws: the standard error of the rate is below 0.0021, so 0.01 is a > 4.5 sigma band.
    assert abs(result.flip_rate - expected_flip) < 0.01
    assert torch.allclose(result.realised_transition_matrix, matrix, atol=0.03)


def test_symmetric_and_uniform_differ_as_documented() -> None:
    symmetric, uniform = noise.symmetric(K, 0.5), noise.uniform(K, 0.5)
    assert symmetric[0, 0].item() == pytest.approx(0.5)
    assert symmetric[0, 1].item() == pytest.approx(0.5 / 9)
    assert uniform[0, 0].item() == pytest.approx(0.55)
    assert uniform[0, 1].item() == pytest.approx(0.05)


def test_pair_flip_targets_the_next_class() -> None:
    matrix = noise.pair_flip(4, 0.3)
    expected = torch.tensor(
        [[0.7, 0.3, 0, 0], [0, 0.7, 0.3, 0], [0, 0, 0.7, 0.3], [0.3, 0, 0, 0.7]], dtype=torch.float64
    )
    assert torch.allclose(matrix, expected)


def test_permutation_is_a_seeded_derangement() -> None:
    first, again, other = (noise.permutation(K, 0.4, seed=s) for s in (1, 1, 2))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    off_diagonal = first - torch.diag(first.diagonal())
    partners = off_diagonal.argmax(dim=1)
    assert (partners != torch.arange(K)).all()
    assert sorted(partners.tolist()) == list(range(K))  # a permutation: every class is some class's partner


def test_corrupt_labels_is_deterministic_and_independent_of_global_rng() -> None:
    labels = torch.arange(5000) % K
    matrix = noise.symmetric(K, 0.4)
    torch.manual_seed(123)
    first = noise.corrupt_labels(labels, matrix, seed=7).noisy_labels
    torch.manual_seed(999)
    torch.rand(1000)
    second = noise.corrupt_labels(labels, matrix, seed=7).noisy_labels
    third = noise.corrupt_labels(labels, matrix, seed=8).noisy_labels
    assert torch.equal(first, second)
    assert not torch.equal(first, third)


def test_corrupt_labels_prefix_does_not_depend_on_pool_length() -> None:
    # One draw per sample in order: the first samples' noisy labels do not depend on how many follow, which is
    # what makes the result independent of how a pool is later sharded.
    labels = torch.arange(3000) % K
    matrix = noise.uniform(K, 0.5)
    assert torch.equal(
        noise.corrupt_labels(labels, matrix, 5).noisy_labels[:1000],
        noise.corrupt_labels(labels[:1000], matrix, 5).noisy_labels,
    )


def test_zero_probability_transitions_never_happen() -> None:
    matrix = noise.pair_flip(K, 0.5)
    labels = torch.arange(20_000) % K
    noisy = noise.corrupt_labels(labels, matrix, seed=0).noisy_labels
    assert ((noisy == labels) | (noisy == (labels + 1) % K)).all()


def test_confusion_counts() -> None:
    counts = noise.confusion_counts(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 0]), 3)
    assert counts.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, float("nan"), "high"])
def test_bad_rate_is_refused_with_its_range(rate: object) -> None:
    with pytest.raises(ValueError, match=r"noise_rate must be .*\[0, 1\)"):
        noise.build_transition_matrix("symmetric", K, rate)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("matrix", "num_classes", "message"),
    [
        ([[0.5, 0.5, 0.0]], 3, "square"),
        ([[1.0]], 1, "at least 2 classes"),
        ([[0.9, 0.2], [0.0, 1.0]], 2, "rows must sum to 1"),
        ([[1.1, -0.1], [0.0, 1.0]], 2, ">= 0"),
        ([[float("nan"), 1.0], [0.0, 1.0]], 2, "finite"),
        ([[1.0, 0.0], [0.0, 1.0]], 10, r"num_classes=10"),
        ([["a", "b"], ["c", "d"]], 2, "matrix of numbers"),
    ],
)
def test_bad_transition_matrix_is_refused(matrix: list, num_classes: int, message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        noise.check_transition_matrix(matrix, num_classes=num_classes if num_classes >= 2 else None)
    assert "transition_matrix" in str(error.value)


def test_custom_matrix_within_tolerance_is_accepted() -> None:
    matrix = noise.symmetric(3, 0.3).tolist()
    matrix[0][0] += 5e-7
    assert noise.build_transition_matrix("custom", 3, transition_matrix=matrix).shape == (3, 3)


def test_unknown_noise_type_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"noise_type must be one of 'none', 'symmetric'.*'custom'; got 'gaussian'"):
        noise.build_transition_matrix("gaussian", K, 0.2)


def test_matrix_given_to_a_named_noise_type_is_refused() -> None:
    with pytest.raises(ValueError, match="only used with noise_type='custom'"):
        noise.build_transition_matrix("symmetric", 3, 0.2, transition_matrix=noise.symmetric(3, 0.2))


def test_labels_outside_the_class_range_are_refused() -> None:
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        noise.corrupt_labels(torch.tensor([0, 1, 3]), noise.symmetric(3, 0.2), seed=0)
