"""Can a volume prior on theta stop EM's drift toward the identity? The M-step alone, on exact statistics.

    python benchmarks/volume_prior.py            # writes results/volume_prior.md and .csv in a few seconds

EM's theta M-step maximises ``sum_ij S[i, j] log theta[i, j]`` over row-stochastic ``theta``, where
``S[i, j] = sum_t c[t, i] 1[z_t = j]`` are the posterior-weighted counts. A network that has started to memorise
the given labels puts part of each posterior on the given label, so ``S`` moves toward ``diag(column sums)`` and
the M-step toward the identity. VolMinNet (Li et al., ICML 2021) argues for the transition matrix of smallest volume
that explains the data; in the M-step that is the penalised objective

    maximise  sum_ij S[i, j] log theta[i, j]  -  penalty * N * log |det theta|,     N = sum_ij S[i, j],

which this script solves (:func:`volume_penalised_m_step`) for each row of the results table, on two kinds of
statistics, both exact (no sampling, no network):

- ``truth``: the statistics a perfect posterior gives, ``S = diag(pi) T`` with uniform ``pi``; the plain M-step
  returns ``T`` exactly, so any error is the prior's bias;
- ``drifted``: ``(1 - share) S + share * diag(S's column sums)``, the statistics of posteriors that put ``share``
  of their mass on the given label; the plain M-step returns a matrix between ``T`` and the identity.

A useful penalty would keep the truth where it is and pull the drifted estimate back toward ``T``. The table gives
the theta error ``||theta - T||_1 / ||T||_1`` of every penalty on both.

Without the network in the objective, the penalised M-step has no maximum: a ``theta`` with two equal rows has a
finite likelihood and ``log |det theta| = -inf``. What the table shows is where L-BFGS, started from the plain M-step,
stops; that is deterministic, but it is not a property of the prior alone, which is one more reason the library does
not ship this M-step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, command_line, commit, machine, metadata_line, write_table, write_text

from noisy_lightning.em import noise_matrix_error, normalise_rows
from noisy_lightning.noise import build_transition_matrix

NUM_CLASSES = 10
ROWS = (  # the rows of the results table: (name, noise type, rate)
    ("uniform 50%", "uniform", 0.5),
    ("permutation 46%", "permutation", 0.46),
    ("pair-flip 45%", "pair_flip", 0.45),
    ("symmetric 50%", "symmetric", 0.5),
    ("symmetric 20%", "symmetric", 0.2),
    ("symmetric 80%", "symmetric", 0.8),
)
PENALTIES = (0.0, 1e-3, 3e-3, 1e-2, 3e-2)
DRIFT_SHARE = 0.3
COLUMNS = ("matrix", "penalty", "error_from_truth", "error_from_drifted", "drifted_error_without_prior")


def volume_penalised_m_step(statistics: Tensor, penalty: float, start: Tensor | None = None) -> Tensor:
    """The theta M-step with a volume prior: ``argmax sum S log theta - penalty * N * log|det theta|``.

    ``statistics`` is the ``K x K`` matrix ``S`` of posterior-weighted counts (rows: true class), ``N`` its sum.
    Solved over row-softmax logits by L-BFGS from ``start`` (default: the plain M-step, which is the answer for
    ``penalty = 0``). Returns a float64 row-stochastic matrix.
    """
    plain = normalise_rows(statistics.double())
    if penalty == 0:
        return plain
    total = statistics.sum().double()
    initial = plain if start is None else start.double()
    logits = initial.clamp_min(1e-12).log().clone().requires_grad_(True)
    optimiser = torch.optim.LBFGS([logits], max_iter=500, tolerance_grad=1e-12, line_search_fn="strong_wolfe")

    def negative_objective() -> Tensor:
        optimiser.zero_grad()
        theta = torch.softmax(logits, dim=1)
        log_likelihood = (statistics.double() * theta.clamp_min(1e-300).log()).sum()
        objective = log_likelihood - penalty * total * torch.linalg.slogdet(theta)[1]
        (-objective).backward()
        return -objective

    optimiser.step(negative_objective)  # type: ignore[arg-type]
    return torch.softmax(logits, dim=1).detach()


def population_statistics(transition_matrix: Tensor) -> Tensor:
    """``S = diag(pi) T`` for uniform class priors ``pi``: the statistics of perfect posteriors, per sample."""
    return transition_matrix.double() / transition_matrix.shape[0]


def drifted_statistics(statistics: Tensor, share: float) -> Tensor:
    """Statistics of posteriors that put ``share`` of their mass on the given label (what memorisation does)."""
    return (1 - share) * statistics + share * torch.diag(statistics.sum(dim=0))


def measure(penalties: tuple[float, ...] = PENALTIES, share: float = DRIFT_SHARE) -> list[dict[str, object]]:
    """One table row per (results-table matrix, penalty)."""
    rows: list[dict[str, object]] = []
    for name, noise_type, rate in ROWS:
        truth = build_transition_matrix(noise_type, NUM_CLASSES, rate)
        exact = population_statistics(truth)
        drifted = drifted_statistics(exact, share)
        drifted_plain = normalise_rows(drifted)
        for penalty in penalties:
            rows.append(
                {
                    "matrix": name,
                    "penalty": penalty,
                    "error_from_truth": noise_matrix_error(volume_penalised_m_step(exact, penalty, truth), truth),
                    "error_from_drifted": noise_matrix_error(volume_penalised_m_step(drifted, penalty), truth),
                    "drifted_error_without_prior": noise_matrix_error(drifted_plain, truth),
                }
            )
    return rows


def markdown(rows: list[dict[str, object]], metadata: str, share: float) -> list[str]:
    penalties = sorted({float(row["penalty"]) for row in rows})  # type: ignore[arg-type]
    matrices = list(dict.fromkeys(str(row["matrix"]) for row in rows))
    cell = {(str(row["matrix"]), float(row["penalty"])): row for row in rows}  # type: ignore[arg-type]

    def table(column: str) -> list[str]:
        """One matrix per line, one penalty per column, ``column``'s theta error in each cell."""
        header = "| matrix | " + " | ".join(f"penalty {penalty:g}" for penalty in penalties) + " |"
        rows = [
            f"| {name} | " + " | ".join(f"{cell[name, penalty][column]:.3f}" for penalty in penalties) + " |"
            for name in matrices
        ]
        return [header, "|---|" + "---|" * len(penalties), *rows]

    lines = [
        "# A volume prior in EM's theta M-step, on exact statistics",
        "",
        metadata,
        "",
        "theta error ||theta - T||_1 / ||T||_1 of the M-step with the volume prior "
        "`- penalty * N * log|det theta|` (`benchmarks/volume_prior.py` states the math). No network is trained: "
        "the statistics are exact, so every number is deterministic. The penalised objective has no maximum (a "
        "theta with two equal rows has a finite likelihood and log|det theta| = -inf), so each number is where "
        "L-BFGS, started from the plain M-step, stops.",
        "",
        "From the statistics of perfect posteriors (the plain M-step, penalty 0, returns T exactly; "
        "anything else is the prior's bias):",
        "",
        *table("error_from_truth"),
        "",
        f"From drifted statistics, posteriors that put {share:.0%} of their mass on the given label (penalty 0 is "
        "where the plain M-step goes):",
        "",
        *table("error_from_drifted"),
        "",
    ]
    for penalty in penalties[1:]:
        biased = max(float(cell[name, penalty]["error_from_truth"]) for name in matrices)  # type: ignore[arg-type]
        helped = [
            name
            for name in matrices
            if float(cell[name, penalty]["error_from_drifted"]) < 0.5 * float(cell[name, 0.0]["error_from_drifted"])  # type: ignore[arg-type]
        ]
        lines.append(
            f"- Penalty {penalty:g}: largest bias on the truth {biased:.3f}; drift at least halved on "
            f"{len(helped)} of {len(matrices)} matrices{' (' + ', '.join(helped) + ')' if helped else ''}."
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS / "volume_prior", help="results stem")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a 10 x 10 problem: more threads only add noise
    rows = measure()
    write_table(args.out.with_suffix(".csv"), COLUMNS, rows)
    metadata = metadata_line(command_line(), commit(), machine())
    write_text(args.out.with_suffix(".md"), markdown(rows, metadata, DRIFT_SHARE))
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
