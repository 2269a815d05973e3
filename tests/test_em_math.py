import pytest
import torch

from noisy_lightning import em, noise


def test_posterior_matches_bayes_rule_by_hand() -> None:
    probs = torch.tensor([[0.6, 0.3, 0.1]])
    theta = torch.tensor([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.0, 0.5, 0.5]])
    # z = 1: joint = [0.6*0.1, 0.3*0.7, 0.1*0.5] = [0.06, 0.21, 0.05], total 0.32
    result = em.posterior(probs.log(), theta, torch.tensor([1]))
    assert torch.allclose(result, torch.tensor([[0.06, 0.21, 0.05]]) / 0.32, atol=1e-6)


def test_posterior_is_stable_for_extreme_log_probs() -> None:
    log_probs = torch.log_softmax(torch.tensor([[200.0, -200.0, 0.0], [-1e4, 0.0, -1e4]]), dim=1)
    theta = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    result = em.posterior(log_probs, theta, torch.tensor([0, 2]))
    assert torch.isfinite(result).all()
    assert torch.allclose(result.sum(dim=1), torch.ones(2))
    # Sample 0, z = 0: theta[0, 0] = 0 so class 0 is impossible though the network is sure of it.
    assert result[0, 0].item() == 0.0
    # Sample 1, z = 2: only class 2 can emit z = 2.
    assert result[1, 2].item() == pytest.approx(1.0)


def test_posterior_falls_back_to_the_network_when_the_label_is_impossible() -> None:
    log_probs = torch.tensor([[0.7, 0.3, 0.0]]).log()
    theta = torch.eye(3)
    result = em.posterior(log_probs, theta, torch.tensor([2]))  # only class 2 emits 2, the network excludes it
    assert torch.allclose(result, torch.tensor([[0.7, 0.3, 0.0]]))


def test_posterior_refuses_nan() -> None:
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        em.posterior(torch.tensor([[float("nan"), 0.0]]), torch.eye(2), torch.tensor([0]))


def test_m_step_by_hand() -> None:
    posterior = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.25, 0.75]])
    noisy = torch.tensor([0, 1, 1, 0])
    # S[0] = [1 + 0.25, 0.5] -> [1.25, 0.5] / 1.75 ; S[1] = [0.75, 0.5 + 1] -> [0.75, 1.5] / 2.25
    theta = em.estimate_noise_matrix(posterior, noisy, 2)
    expected = torch.tensor([[1.25 / 1.75, 0.5 / 1.75], [0.75 / 2.25, 1.5 / 2.25]], dtype=torch.float64)
    assert torch.allclose(theta, expected)


def test_m_step_keeps_previous_row_for_an_empty_class() -> None:
    posterior = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    previous = noise.symmetric(3, 0.3)
    theta = em.estimate_noise_matrix(posterior, torch.tensor([0, 1]), 3, previous=previous)
    assert torch.equal(theta[2], previous[2])
    assert torch.isfinite(theta).all()
    assert torch.allclose(theta.sum(dim=1), torch.ones(3, dtype=torch.float64))


def test_perfect_network_recovers_the_realised_confusion_exactly() -> None:
    torch.manual_seed(0)
    clean = torch.randint(0, 5, (4000,))
    truth = noise.pair_flip(5, 0.35)
    corruption = noise.corrupt_labels(clean, truth, seed=1)
    perfect = torch.nn.functional.one_hot(clean, 5).float()
    # With one-hot p(y|x) the posterior is the one-hot clean label whatever theta is (where theta allows z) ...
    posterior = em.posterior(perfect.clamp_min(1e-45).log(), truth, corruption.noisy_labels)
    assert torch.equal(posterior.argmax(dim=1), clean)
    # ... so both the paper's initialisation and the M-step give exactly the realised confusion matrix.
    assert torch.allclose(
        em.estimate_noise_matrix(perfect, corruption.noisy_labels, 5), corruption.realised_transition_matrix, atol=1e-12
    )
    assert torch.allclose(
        em.estimate_noise_matrix(posterior, corruption.noisy_labels, 5),
        corruption.realised_transition_matrix,
        atol=1e-6,
    )


def test_noise_statistics_add_up_over_shards() -> None:
    torch.manual_seed(0)
    posterior = torch.softmax(torch.randn(101, 4), dim=1)
    noisy = torch.randint(0, 4, (101,))
    whole = em.noise_statistics(posterior, noisy, 4)
    halves = em.noise_statistics(posterior[:50], noisy[:50], 4) + em.noise_statistics(posterior[50:], noisy[50:], 4)
    assert torch.allclose(whole, halves, atol=1e-12)


def test_error_metrics() -> None:
    truth = noise.symmetric(2, 0.2)
    estimate = torch.tensor([[0.7, 0.3], [0.2, 0.8]])
    assert em.noise_matrix_error(estimate, truth) == pytest.approx(0.2 / 2)
    assert em.noise_matrix_max_abs_error(estimate, truth) == pytest.approx(0.1)
    assert em.noise_matrix_error(truth, truth) == 0.0


def test_recovery_and_flip_precision_recall() -> None:
    clean = torch.tensor([0, 0, 1, 1, 2])
    noisy = torch.tensor([0, 1, 1, 0, 2])  # samples 1 and 3 are wrong
    corrected = torch.tensor([0, 0, 0, 1, 2])  # fixes 1 and 3, wrongly changes 2
    probs = torch.nn.functional.one_hot(corrected, 3).float()
    assert em.label_recovery(probs, clean) == pytest.approx(4 / 5)
    precision, recall = em.flip_precision_recall(probs, noisy, clean)
    assert precision == pytest.approx(2 / 3)
    assert recall == pytest.approx(1.0)


def test_hard_initialisation_recovers_t_from_a_network_that_learnt_the_noisy_labels() -> None:
    """A warmed-up network outputs p(z | x) = T[y, :]; the hard statistic gives T, the soft one smears it."""
    truth = noise.pair_flip(5, 0.45).double()
    clean = torch.arange(5).repeat_interleave(20_000)
    noisy = noise.corrupt_labels(clean, truth, seed=0)
    network = truth[clean]  # the best a network trained on noisy labels can do
    hard = em.initial_noise_matrix(network, noisy.noisy_labels, 5, hard=True)
    soft = em.initial_noise_matrix(network, noisy.noisy_labels, 5, hard=False)
    torch.testing.assert_close(hard, noisy.realised_transition_matrix, rtol=0, atol=1e-12)
    assert em.noise_matrix_error(hard, truth) < 0.02
    # soft: about (0.55^2 + 0.45^2) on the diagonal and ~0.25 on both neighbours
    assert em.noise_matrix_error(soft, truth) > 0.4
    assert abs(soft[0, 0].item() - 0.505) < 0.01 and abs(soft[1, 0].item() - 0.2475) < 0.01


def test_balanced_assignment_gives_each_class_its_mass() -> None:
    probs = torch.softmax(torch.randn(2_000, 4, generator=torch.Generator().manual_seed(0)) * 3, dim=1)
    frequencies = torch.tensor([1.0, 0.0, 2.0, 1.0])
    assignment = em.balanced_assignment(probs, frequencies)
    torch.testing.assert_close(assignment.sum(dim=1), torch.ones(2_000, dtype=torch.float64))
    torch.testing.assert_close(
        assignment.sum(dim=0), torch.tensor([500.0, 0.0, 1_000.0, 500.0]).double(), rtol=1e-4, atol=0
    )
    assert assignment[:, 1].max().item() == 0.0


def test_balanced_assignment_of_identical_rows_is_the_class_frequencies() -> None:
    # q[t, i] = a_t b_i p_i^s with identical rows: the only solution with these masses is q[t] = frequencies.
    probs = torch.tensor([[0.7, 0.2, 0.1]]).repeat(300, 1)
    assignment = em.balanced_assignment(probs, torch.tensor([0.2, 0.3, 0.5]))
    torch.testing.assert_close(assignment, torch.tensor([[0.2, 0.3, 0.5]]).double().repeat(300, 1), rtol=0, atol=1e-4)


def test_balanced_initialisation_separates_a_two_cycle_that_the_argmax_merges() -> None:
    """Classes 1 and 2 swap 46% of their labels. The network ranks them right but prefers class 1 for both
    (0.56 and 0.52), so its argmax never says 2: the hard initialisation has no row for class 2 and mixes both
    into row 1. The balanced assignment uses the ranking only, and gives back the realised confusion exactly.
    """
    truth = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.54, 0.46], [0.0, 0.46, 0.54]], dtype=torch.float64)
    clean = torch.arange(3).repeat_interleave(5_000)
    corruption = noise.corrupt_labels(clean, truth, seed=0)
    network = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.56, 0.44], [0.0, 0.52, 0.48]], dtype=torch.float64)[clean]
    frequencies = torch.bincount(corruption.noisy_labels, minlength=3)
    balanced = em.balanced_assignment(network, frequencies)
    assert (balanced.argmax(dim=1) == clean).all()
    theta = em.initial_noise_matrix(balanced, corruption.noisy_labels, 3, hard=True)
    torch.testing.assert_close(theta, corruption.realised_transition_matrix.double(), rtol=0, atol=1e-12)
    merged = em.initial_noise_matrix(network, corruption.noisy_labels, 3, hard=True)
    assert merged[2].tolist() == [0.0, 0.0, 1.0]  # the empty row's identity fallback
    assert em.noise_matrix_error(merged, truth) > 10 * em.noise_matrix_error(theta, truth)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sharpness": 0.0}, r"sharpness must be a finite number in \(0"),
        ({"max_iterations": 0}, "max_iterations must be an integer >= 1"),
        ({"tolerance": 0.0}, r"tolerance must be a finite number in \(0"),
        ({"class_frequencies": torch.ones(4)}, "class_frequencies must be 3 non-negative numbers"),
        ({"class_frequencies": torch.tensor([1.0, -1.0, 1.0])}, "class_frequencies must be 3 non-negative numbers"),
        ({"class_frequencies": torch.zeros(3)}, "with a positive sum"),
    ],
)
def test_balanced_assignment_rejects_bad_input(kwargs: dict, message: str) -> None:
    arguments = {"class_probs": torch.full((5, 3), 1 / 3), "class_frequencies": torch.ones(3)} | kwargs
    with pytest.raises(ValueError, match=message):
        em.balanced_assignment(**arguments)


def test_balanced_assignment_warns_when_it_stops_before_converging() -> None:
    probs = torch.softmax(torch.randn(500, 3, generator=torch.Generator().manual_seed(1)) * 3, dim=1)
    with pytest.warns(RuntimeWarning, match="did not converge in max_iterations=1"):
        assignment = em.balanced_assignment(probs, torch.tensor([0.8, 0.1, 0.1]), max_iterations=1)
    torch.testing.assert_close(assignment.sum(dim=1), torch.ones(500, dtype=torch.float64))


def test_a_judged_m_step_is_kept_only_if_held_out_labels_prefer_it() -> None:
    """Training posteriors that follow the given labels propose the identity; held-out samples whose labels were
    drawn through T refuse it. Posteriors from the truth propose T, which the same held-out samples accept."""
    generator = torch.Generator().manual_seed(0)
    truth = noise.build_transition_matrix("symmetric", 4, 0.4)
    true_labels = torch.randint(0, 4, (4000,), generator=generator)
    given = torch.multinomial(truth[true_labels], 1, generator=generator).squeeze(1)
    held_out = torch.arange(4000) >= 3000
    knows_truth = torch.nn.functional.one_hot(true_labels, 4).double() * 0.97 + 0.0075
    memorised = torch.where(held_out.unsqueeze(1), knows_truth, torch.nn.functional.one_hot(given, 4).double())

    drifting = em.em_round(memorised, given, truth, for_noise_matrix=~held_out, judged_by=held_out)
    plain = em.em_round(memorised, given, truth, for_noise_matrix=~held_out)
    assert drifting.m_step_kept is False and torch.equal(drifting.noise_matrix, truth.double())
    assert em.noise_matrix_error(plain.noise_matrix, truth) > 0.3  # what the judge refused

    start = em.normalise_rows(torch.eye(4, dtype=torch.float64) + 0.05)
    improving = em.em_round(knows_truth, given, start, for_noise_matrix=~held_out, judged_by=held_out)
    unjudged = em.em_round(knows_truth, given, start, for_noise_matrix=~held_out)
    assert improving.m_step_kept is True and torch.equal(improving.noise_matrix, unjudged.noise_matrix)
    assert em.em_round(knows_truth, given, start).m_step_kept is None
