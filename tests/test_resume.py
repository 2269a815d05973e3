"""Kill a real training process, resume it from its last checkpoint, and compare with a run never interrupted.

Each run is a subprocess (tests/resume_worker.py) that trains EM on the shipped sample with dropout, batched
shifts, a cosine schedule and a checkpoint after every step. The interrupted run is killed with SIGKILL at the
start of a chosen batch, so nothing is flushed on the way out. On the CPU the resumed run must end bit for bit
where the uninterrupted one ends: the same theta, EM history, posteriors, weights, optimiser state and metrics.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import SUBPROCESS_TIMEOUT_S

WORKER = Path(__file__).parent / "resume_worker.py"

pytestmark = pytest.mark.slow


def run_worker(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(WORKER), "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )


def load(out: Path) -> dict:
    return torch.load(out / "result.pt", weights_only=False)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    results = {}
    for e_step in ("inference", "train_pass"):
        out = tmp_path_factory.mktemp(f"uninterrupted-{e_step}")
        completed = run_worker(out, "--e-step", e_step)
        assert completed.returncode == 0, completed.stderr[-4000:]
        results[e_step] = load(out)
    out = tmp_path_factory.mktemp("uninterrupted-two-starts")
    completed = run_worker(out, "--e-step", "inference", "--two-starts")
    assert completed.returncode == 0, completed.stderr[-4000:]
    results["two_starts"] = load(out)
    return results


def assert_same_run(resumed: dict, reference: dict) -> None:
    """Bit for bit: every tensor with torch.equal, every number with ==."""
    assert resumed["global_step"] == reference["global_step"]
    assert torch.equal(resumed["noisy_labels"], reference["noisy_labels"])
    assert torch.equal(resumed["val_indices"], reference["val_indices"])
    assert resumed["rounds"] == reference["rounds"]
    assert resumed["trial_scores"] == reference["trial_scores"]
    assert resumed["kept_start"] == reference["kept_start"]
    assert len(resumed["history"]) == len(reference["history"])
    for theta, reference_theta in zip(resumed["history"], reference["history"], strict=True):
        assert torch.equal(theta, reference_theta)
    assert torch.equal(resumed["noise_matrix"], reference["noise_matrix"])
    assert torch.equal(resumed["posteriors"], reference["posteriors"])
    assert resumed["weights"].keys() == reference["weights"].keys()
    for name, weight in reference["weights"].items():
        assert torch.equal(resumed["weights"][name], weight), name
    for state, reference_state in zip(
        resumed["optimizer"]["state"].values(), reference["optimizer"]["state"].values(), strict=True
    ):
        assert state.keys() == reference_state.keys() == {"step", "exp_avg", "exp_avg_sq"}
        for key in state:
            assert torch.equal(state[key], reference_state[key]), key
    assert resumed["optimizer"]["param_groups"] == reference["optimizer"]["param_groups"]
    assert resumed["scheduler"] == reference["scheduler"]
    assert resumed["fit_metrics"] == reference["fit_metrics"]
    assert resumed["test_acc"] == reference["test_acc"]


@pytest.mark.parametrize(
    ("e_step", "kill_at"),
    [
        ("inference", "2:5"),  # mid-epoch, while training on the posteriors
        ("inference", "3:0"),  # between EM rounds: the last checkpoint precedes the round at the end of epoch 2
        ("train_pass", "2:5"),  # mid-epoch with half-collected E-step sums
        ("train_pass", "3:0"),
    ],
)
def test_killed_run_resumes_to_the_same_end(
    tmp_path: Path, uninterrupted: dict[str, dict], e_step: str, kill_at: str
) -> None:
    killed = run_worker(tmp_path, "--e-step", e_step, "--kill-at", kill_at)
    assert killed.returncode == -signal.SIGKILL, "the worker was meant to die by SIGKILL"
    assert not (tmp_path / "result.pt").exists()
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()

    resumed = run_worker(tmp_path, "--e-step", e_step, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "Restored all states from the checkpoint" in resumed.stderr + resumed.stdout
    assert_same_run(load(tmp_path), uninterrupted[e_step])


@pytest.mark.parametrize(
    "kill_at",
    [
        "2:5",  # in the first start's trial
        "3:0",  # after the switch to the second start, before its first step
        "4:7",  # in the second start's trial, after its first round
        "5:3",  # after the choice, continuing the kept start
    ],
)
def test_a_run_killed_during_or_after_the_trials_of_two_starts_resumes_to_the_same_end(
    tmp_path: Path, uninterrupted: dict[str, dict], kill_at: str
) -> None:
    killed = run_worker(tmp_path, "--two-starts", "--kill-at", kill_at)
    assert killed.returncode == -signal.SIGKILL, "the worker was meant to die by SIGKILL"
    resumed = run_worker(tmp_path, "--two-starts", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    reference = uninterrupted["two_starts"]
    assert len(reference["trial_scores"]) == 2 and reference["global_step"] == 6 * 15
    assert_same_run(load(tmp_path), reference)


def kill_chains(count: int, seed: int = 0) -> list[list[str]]:
    """Chains of 2 or 3 kill points ``epoch:batch``, each later than the one before, drawn from a seeded RNG."""
    generator = random.Random(seed)
    chains = []
    for _ in range(count):
        points = sorted(generator.sample(range(4 * 15), generator.choice((2, 3))))
        chains.append([f"{point // 15}:{point % 15}" for point in points])
    return chains


@pytest.mark.parametrize("chain", [["2:0", "2:5"], *kill_chains(2)], ids=lambda chain: "then".join(chain))
def test_chains_of_kills_resume_to_the_same_end(
    tmp_path: Path, uninterrupted: dict[str, dict], chain: list[str]
) -> None:
    """Kill, resume, kill again while resumed, ... then resume to the end: the same end state as one run."""
    for position, kill_at in enumerate(chain):
        resume = ["--resume"] if position else []
        killed = run_worker(tmp_path, "--e-step", "inference", *resume, "--kill-at", kill_at)
        assert killed.returncode == -signal.SIGKILL, f"kill {position + 1} at {kill_at} did not happen"
    finished = run_worker(tmp_path, "--e-step", "inference", "--resume")
    assert finished.returncode == 0, finished.stderr[-4000:]
    assert_same_run(load(tmp_path), uninterrupted["inference"])


def test_resuming_a_finished_run_trains_no_more(tmp_path: Path) -> None:
    first = run_worker(tmp_path, "--e-step", "inference")
    assert first.returncode == 0, first.stderr[-4000:]
    before = load(tmp_path)
    again = run_worker(tmp_path, "--e-step", "inference", "--resume")
    assert again.returncode == 0, again.stderr[-4000:]
    after = load(tmp_path)
    assert after["global_step"] == before["global_step"] and after["rounds"] == before["rounds"]
    assert torch.equal(after["noise_matrix"], before["noise_matrix"])
