"""Two CPU processes (gloo DDP) against one: the same corrupted labels, theta, posteriors and accuracy."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import SUBPROCESS_TIMEOUT_S

WORKER = Path(__file__).parent / "ddp_worker.py"

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def run_worker(tmp_path: Path, devices: int, e_step: str, *extra: str) -> list[dict]:
    out = tmp_path / f"result-{devices}-{e_step}-{'-'.join(extra).replace('--', '')}"
    completed = subprocess.run(
        [sys.executable, str(WORKER), "--devices", str(devices), "--e-step", e_step, "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return [torch.load(f"{out}.rank{rank}", weights_only=False) for rank in range(devices)]


@pytest.mark.parametrize(
    ("e_step", "initialisation"),
    [("inference", "hard_confusion"), ("train_pass", "hard_confusion"), ("inference", "balanced")],
)
def test_two_processes_equal_one(tmp_path: Path, e_step: str, initialisation: str) -> None:
    (single,) = run_worker(tmp_path, 1, e_step, "--initialisation", initialisation)
    ranks = run_worker(tmp_path, 2, e_step, "--initialisation", initialisation)
    for result in ranks:
        # the same corrupted labels and split on every rank
        assert torch.equal(result["noisy_labels"], single["noisy_labels"])
        assert torch.equal(result["val_indices"], single["val_indices"])
        # theta after each EM round (each one an M-step) equals the single-process theta within 1e-5
        assert len(result["history"]) == len(single["history"]) == 3
        assert not torch.equal(single["history"][1], single["history"][0])  # the M-steps really moved theta
        for distributed_theta, single_theta in zip(result["history"], single["history"], strict=True):
            assert torch.allclose(distributed_theta.double(), single_theta.double(), atol=1e-5, rtol=0)
        # posteriors are right for every sample, whichever rank scored it
        assert torch.allclose(result["posteriors"], single["posteriors"], atol=1e-5, rtol=0)
        # validation accuracy is computed over the whole split exactly once
        assert result["validation_count_per_epoch"] == result["val_size"] == 401
        assert result["val_acc_clean"] == pytest.approx(single["val_acc_clean"], abs=1e-6)
    assert torch.equal(ranks[0]["noise_matrix"], ranks[1]["noise_matrix"])


def test_training_on_two_processes_follows_one_with_the_same_global_batch(tmp_path: Path) -> None:
    """Real training (Adam, 4 epochs, EM from epoch 1): 2 x 64 per step on gloo against 1 x 128.

    The two runs see the same global batches (the order is DistributedSampler's, split by rank), so they differ
    only by the order of float additions in DDP's gradient all-reduce. Documented tolerances: theta after each
    EM round within 1e-4 per entry, validation and test accuracy within 0.2 percentage points (2 test digits).
    """
    (single,) = run_worker(tmp_path, 1, "inference", "--train")
    ranks = run_worker(tmp_path, 2, "inference", "--train")
    for result in ranks:
        assert torch.equal(result["noisy_labels"], single["noisy_labels"])
        assert len(result["history"]) == len(single["history"]) == 4
        for distributed_theta, single_theta in zip(result["history"], single["history"], strict=True):
            torch.testing.assert_close(distributed_theta, single_theta, rtol=0, atol=1e-4)
        assert result["test_acc"] == pytest.approx(single["test_acc"], abs=0.002)
        validation = result["fit_metrics"]["val/acc_clean"]
        assert validation == pytest.approx(single["fit_metrics"]["val/acc_clean"], abs=0.002)
        assert result["fit_metrics"]["em/round"] == single["fit_metrics"]["em/round"] == 4


@pytest.mark.parametrize("method", ["forward", "nal"])
def test_a_noise_matrix_estimate_is_the_same_on_two_processes(tmp_path: Path, method: str) -> None:
    """Anchor points (forward) and the confusion matrix (nal) from frozen weights: 4000 samples, odd splits, so the
    sampler pads, and a padded sample must not count twice."""
    (single,) = run_worker(tmp_path, 1, "inference", "--method", method)
    ranks = run_worker(tmp_path, 2, "inference", "--method", method)
    assert not torch.equal(single["noise_matrix"], torch.eye(10))
    for result in ranks:
        torch.testing.assert_close(result["noise_matrix"], single["noise_matrix"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["coteaching", "nal", "nal_complex"])
def test_peer_training_on_two_processes_follows_one(tmp_path: Path, method: str) -> None:
    """Co-teaching chooses its small-loss samples from the global batch (gathered across ranks) and estimates its
    forget rate from all ranks' probabilities; the noise adaptation layer's learned theta (and the complex model's
    weights on the hidden features) are synchronised by DDP.
    Tolerances as for EM: theta within 1e-4, accuracies within 0.2 points."""
    (single,) = run_worker(tmp_path, 1, "inference", "--train", "--method", method)
    ranks = run_worker(tmp_path, 2, "inference", "--train", "--method", method)
    for result in ranks:
        (theta,), (single_theta,) = result["history"], single["history"]
        assert not torch.equal(single_theta, torch.eye(10))
        torch.testing.assert_close(theta, single_theta, rtol=0, atol=1e-4)
        assert result["test_acc"] == pytest.approx(single["test_acc"], abs=0.002)
        if method == "nal_complex":
            assert single["noise_weight"].abs().sum() > 0
            torch.testing.assert_close(result["noise_weight"], single["noise_weight"], rtol=0, atol=1e-4)
        if method == "coteaching":
            rate = result["fit_metrics"]["coteaching/forget_rate"]
            assert rate > 0 and rate == pytest.approx(single["fit_metrics"]["coteaching/forget_rate"], abs=1e-4)


def test_em_starts_on_two_processes_follow_one(tmp_path: Path) -> None:
    """Two EM starts tried from one warm-up: the validation scores are reduced across ranks (a padded sample counted
    once), so both processes keep the start a single process keeps, and the fit continues alike (tolerances as
    above; a noisy-label accuracy on the 400 validation digits within 2 digits)."""
    (single,) = run_worker(tmp_path, 1, "inference", "--train", "--method", "em_starts")
    ranks = run_worker(tmp_path, 2, "inference", "--train", "--method", "em_starts")
    assert single["epochs"] == 6 and len(single["trial_scores"]) == 2
    for result in ranks:
        assert result["epochs"] == 6 and result["kept_start"] == single["kept_start"]
        for scores, single_scores in zip(result["trial_scores"], single["trial_scores"], strict=True):
            assert scores["noisy_accuracy"] == pytest.approx(single_scores["noisy_accuracy"], abs=0.0051)
            assert scores["noisy_nll"] == pytest.approx(single_scores["noisy_nll"], abs=1e-3)
        assert len(result["history"]) == len(single["history"])
        for distributed_theta, single_theta in zip(result["history"], single["history"], strict=True):
            torch.testing.assert_close(distributed_theta, single_theta, rtol=0, atol=1e-4)
        assert result["test_acc"] == pytest.approx(single["test_acc"], abs=0.002)
    assert ranks[0]["trial_scores"] == ranks[1]["trial_scores"]
