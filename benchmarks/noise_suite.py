"""A public suite of noise matrices, drawn from seeds, and EM against cross-entropy on each.

    python benchmarks/noise_suite.py --list                                  # print the matrices of the suite
    python benchmarks/noise_suite.py --write-matrices                        # results/noise_suite_matrices.json
    NOISY_LIGHTNING_DATA=../shared/datasets python benchmarks/noise_suite.py --dataset mnist
    NOISY_LIGHTNING_DATA=... python benchmarks/noise_suite.py --dataset fashion_mnist --families dense sparse

Families (``T[i, j] = P(given = j | true = i)``, 10 classes):

- ``dense``: every row has diagonal ``d`` and off-diagonal mass ``1 - d`` spread by a flat Dirichlet draw; ``d`` runs
  evenly from 0.55 to 0.8 over the family;
- ``sparse``: 2 to 5 classes each flip into one other class at a rate from 30% to 45%; the other rows are clean;
- ``named``: the rows of the results table (uniform 50%, permutation 46%, pair-flip 45%, symmetric 50%, 20%, 80%);
- ``column_dominant``: cleanlab's ``generate_noise_matrix_from_trace(K, trace, py=uniform,
  valid_noise_matrix=True, frac_zero_noise_rates=0.5)`` with traces 6 to 7.5, redrawn until the given label stays
  the most likely true class (``P(true = j | given = j)`` is the largest in every column) while some rows have their
  diagonal under an off-diagonal entry. Needs cleanlab (``pip install -e ".[bench]"``).

Each matrix is fitted with cross-entropy and with EM, both with the library's defaults (the recipe of the results
table, 30 epochs), one seed per matrix. Every fit is appended to ``results/noise_suite_<dataset>.csv`` as it
finishes and the ``.md`` is rewritten, so the script can be stopped and started again.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    QUIET_TRAINER,
    RESULTS,
    accuracy,
    add_fit_arguments,
    append_row,
    check_fit_arguments,
    fit_provenance,
    metadata_line,
    provenance,
    read_table,
    run_jobs,
    write_text,
)

from noisy_lightning import (
    MLP,
    NoisyLabelClassifier,
    NoisyLabelDataModule,
    build_transition_matrix,
    find_label_issues,
)
from noisy_lightning.em import noise_matrix_error

NUM_CLASSES = 10
FAMILIES = ("dense", "sparse", "named", "column_dominant")


@dataclass(frozen=True)
class SuiteMatrix:
    name: str
    family: str
    matrix: np.ndarray  # K x K, row-stochastic

    @property
    def min_diagonal(self) -> float:
        return float(self.matrix.diagonal().min())

    @property
    def column_dominant(self) -> bool:
        """Under a uniform class prior, ``P(true = j | given = j)`` is the largest in every column."""
        off = self.matrix - np.diag(self.matrix.diagonal())
        return bool((self.matrix.diagonal() > off.max(axis=0)).all())

    @property
    def diagonally_dominant(self) -> bool:
        """Every row's diagonal is larger than each of its off-diagonal entries."""
        off = self.matrix - np.diag(self.matrix.diagonal())
        return bool((self.matrix.diagonal() > off.max(axis=1)).all())


def dense(index: int, count: int) -> SuiteMatrix:
    diagonal = 0.55 + 0.25 * index / max(count - 1, 1)
    generator = np.random.default_rng(1000 + index)
    matrix = np.zeros((NUM_CLASSES, NUM_CLASSES))
    for row in range(NUM_CLASSES):
        others = [column for column in range(NUM_CLASSES) if column != row]
        matrix[row, others] = (1 - diagonal) * generator.dirichlet(np.ones(NUM_CLASSES - 1))
        matrix[row, row] = diagonal
    return SuiteMatrix(f"dense d={diagonal:.3f} #{index}", "dense", matrix)


def sparse(index: int, count: int) -> SuiteMatrix:
    pairs = 2 + index % 4
    rate = 0.30 + 0.15 * index / max(count - 1, 1)
    generator = np.random.default_rng(2000 + index)
    matrix = np.eye(NUM_CLASSES)
    for source in generator.choice(NUM_CLASSES, size=pairs, replace=False):
        target = generator.choice([column for column in range(NUM_CLASSES) if column != source])
        matrix[source, source], matrix[source, target] = 1 - rate, rate
    return SuiteMatrix(f"sparse {pairs} pairs at {rate:.0%} #{index}", "sparse", matrix)


NAMED = (
    ("uniform", 0.5),
    ("permutation", 0.46),
    ("pair_flip", 0.45),
    ("symmetric", 0.5),
    ("symmetric", 0.2),
    ("symmetric", 0.8),
)


def named(index: int, count: int) -> SuiteMatrix:
    noise_type, rate = NAMED[index]
    matrix = np.asarray(build_transition_matrix(noise_type, NUM_CLASSES, rate), dtype=np.float64)
    return SuiteMatrix(f"{noise_type.replace('_', '-')} {rate:.0%}", "named", matrix)


def column_dominant(index: int, count: int) -> SuiteMatrix:
    """cleanlab's generator, redrawn (next seed) until the matrix is column- but not row-dominant."""
    try:
        from cleanlab.benchmarking.noise_generation import generate_noise_matrix_from_trace
    except ImportError as error:  # a benchmark-only extra
        raise SystemExit('the column_dominant family needs cleanlab: pip install -e ".[bench]"') from error
    trace = 6.0 + 1.5 * index / max(count - 1, 1)
    for attempt in range(1000):
        given_given_true = generate_noise_matrix_from_trace(
            NUM_CLASSES,
            trace,
            py=np.full(NUM_CLASSES, 1 / NUM_CLASSES),
            valid_noise_matrix=True,
            frac_zero_noise_rates=0.5,
            seed=3000 + 1000 * index + attempt,
        )
        # cleanlab's noise_matrix[given, true] = P(given | true): its transpose is T.
        matrix = np.asarray(given_given_true, dtype=np.float64).T
        matrix = matrix / matrix.sum(axis=1, keepdims=True)
        entry = SuiteMatrix(f"column-dominant trace {trace:.1f} #{index}", "column_dominant", matrix)
        if entry.column_dominant and not entry.diagonally_dominant:
            return entry
    raise RuntimeError(f"no column-dominant matrix of trace {trace} in 1000 draws")


BUILDERS: dict[str, Callable[[int, int], SuiteMatrix]] = {
    "dense": dense,
    "sparse": sparse,
    "named": named,
    "column_dominant": column_dominant,
}
# How many matrices of each family a dataset's suite holds (indices into the family; named: the results table rows).
SIZES = {
    "mnist": {
        "dense": (range(8), 8),
        "sparse": (range(6), 6),
        "named": (range(6), 6),
        "column_dominant": (range(4), 4),
    },
    "fashion_mnist": {
        "dense": ((0, 3, 7), 8),
        "sparse": ((0, 2, 5), 6),
        "named": ((2, 3, 5), 6),
        "column_dominant": ((0, 1, 3), 4),
    },
}


def suite(dataset: str, families: Sequence[str] = FAMILIES) -> list[SuiteMatrix]:
    """The matrices of ``dataset``'s suite, in the order they are fitted."""
    matrices = []
    for family in families:
        indices, count = SIZES[dataset][family]
        matrices += [BUILDERS[family](index, count) for index in indices]
    return matrices


# ---- fitting ------------------------------------------------------------------------------------------------------
COLUMNS = [
    "dataset",
    "family",
    "matrix",
    "method",
    "seed",
    "min_diagonal",
    "diagonally_dominant",
    "flip_rate",
    "test_acc",
    "val_acc_noisy",
    "theta_error",
    "label_recovery",
    "fit_seconds",
    "matrix_json",
    "commit",
    "machine",
    "command",
]


ACCELERATOR = "cpu"  # every fit's; --accelerator sets it, in each worker process too


def fit_one(dataset: str, entry: SuiteMatrix, method: str, seed: int) -> dict[str, object]:
    """One fit with the library's defaults (30 epochs, batch 256) on ``entry``'s noise."""
    torch.set_float32_matmul_precision("high")
    L.seed_everything(seed, verbose=False)
    datamodule = NoisyLabelDataModule(
        dataset=dataset, noise_type="custom", transition_matrix=entry.matrix.tolist(), seed=seed, batch_size=256
    )
    model = NoisyLabelClassifier(net=MLP(), method=method)
    trainer = L.Trainer(accelerator=ACCELERATOR, devices=1, max_epochs=30, **QUIET_TRAINER)
    started = time.perf_counter()
    trainer.fit(model, datamodule)
    seconds = time.perf_counter() - started
    pool = datamodule.pool
    val = pool.val_indices
    result: dict[str, object] = {
        "test_acc": accuracy(model, datamodule.test_images, datamodule.test_labels),
        "val_acc_noisy": accuracy(model, pool.images[val], pool.given_labels[val]),
        "fit_seconds": seconds,
    }
    result["flip_rate"] = datamodule.corruption.flip_rate
    result["theta_error"] = result["label_recovery"] = float("nan")
    if method == "em":
        result["theta_error"] = noise_matrix_error(model.noise_matrix, datamodule.true_transition_matrix)
        issues = find_label_issues(model, datamodule)
        train = ~issues.in_validation
        result["label_recovery"] = (
            (issues.corrected_label[train] == pool.clean_labels[issues.index[train]]).double().mean().item()
        )
    return result


# ---- the table ----------------------------------------------------------------------------------------------------
def write_markdown(csv_path: Path, md_path: Path, dataset: str, metadata: str) -> None:
    runs = sorted(read_table(csv_path), key=lambda run: FAMILIES.index(run["family"]))  # stable within a family
    by_matrix: dict[str, dict[str, Mapping[str, str]]] = {}
    for run in runs:
        by_matrix.setdefault(run["matrix"], {})[run["method"]] = run
    lines = [
        f"# Noise-matrix suite on {dataset}: EM against cross-entropy",
        "",
        metadata,
        "",
        *provenance(runs),
        "Both methods with the library's defaults (784-500-300-10 MLP, dropout 0.5, 2-pixel shifts, Adam 1e-3, "
        "cosine schedule, batch 256, 30 epochs, the last epoch's model), one seed per matrix. Clean test accuracy "
        "(%); theta error = ||theta - T||_1 / ||T||_1 against the realised corruption; recovered = share of training "
        "labels whose corrected label from `find_label_issues` (an eval-mode pass) is the true label. The "
        "matrices: `python benchmarks/noise_suite.py --list`.",
        "",
        "| family | matrix | min diagonal | diagonally dominant | flip rate (%) | CE | EM | EM - CE | theta error | "
        "recovered (%) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    gaps, errors, misses, under = [], [], [], []
    for name, methods in by_matrix.items():
        first = next(iter(methods.values()))
        ce, em = methods.get("ce"), methods.get("em")
        ce_acc = 100 * float(ce["test_acc"]) if ce else None
        em_acc = 100 * float(em["test_acc"]) if em else None
        gap = em_acc - ce_acc if ce_acc is not None and em_acc is not None else None
        error = float(em["theta_error"]) if em else None
        if gap is not None:
            gaps.append(gap)
            if gap < 0:
                under.append(name)
        if error is not None:
            errors.append(error)
        dominant = first["diagonally_dominant"] == "True"
        if em and dominant and float(first["min_diagonal"]) >= 0.55 and (em_acc < 97.5 or error > 0.05):
            misses.append(name)
        lines.append(
            f"| {first['family']} | {name} | {float(first['min_diagonal']):.3f} | {'yes' if dominant else 'no'} | "
            f"{100 * float(first['flip_rate']):.1f} | {_cell(ce_acc)} | {_cell(em_acc)} | "
            f"{'-' if gap is None else f'{gap:+.2f}'} | {'-' if error is None else f'{error:.3f}'} | "
            f"{'-' if em is None else _cell(100 * float(em['label_recovery']))} |"
        )
    if errors:
        lines += [
            "",
            f"Median theta error over the {len(errors)} matrices with an EM fit: {statistics.median(errors):.3f}. "
            f"EM - CE: smallest {min(gaps):+.2f} points, median {statistics.median(gaps):+.2f} points."
            if gaps
            else "",
            f"Matrices where EM is under cross-entropy: {', '.join(under) if under else 'none'}.",
        ]
        if dataset == "mnist":  # the 97.5% bar is MNIST's; Fashion-MNIST's clean accuracy is near 90%
            lines.append(
                "Diagonally dominant matrices with every diagonal >= 0.55 where EM is under 97.5% or its theta error "
                f"above 0.05: {', '.join(misses) if misses else 'none'}."
            )
    write_text(md_path, lines)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


# ---- running ------------------------------------------------------------------------------------------------------
def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=tuple(SIZES), default="mnist")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--methods", nargs="+", choices=("ce", "em"), default=["ce", "em"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="results stem (default results/noise_suite_<dataset>)")
    parser.add_argument("--list", action="store_true", help="print the suite's matrices and stop")
    parser.add_argument("--write-matrices", action="store_true", help="write results/noise_suite_matrices.json")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the CSV and stop")
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="fit the families' matrices in turn (one of each, then the next of each), so that a run cut short "
        "covers every family",
    )
    add_fit_arguments(parser)
    args = parser.parse_args()
    check_fit_arguments(parser, args)
    return args


@dataclass(frozen=True)
class Job:
    dataset: str
    entry: SuiteMatrix
    method: str
    seed: int
    accelerator: str


def measure(job: Job, fit: Callable[[str, SuiteMatrix, str, int], dict[str, object]] = fit_one) -> dict[str, object]:
    """One fit of ``job`` by ``fit``, on the job's accelerator (set here, since this may be a worker process)."""
    global ACCELERATOR
    ACCELERATOR = job.accelerator
    return fit(job.dataset, job.entry, job.method, job.seed)


def main(fit: Callable[[str, SuiteMatrix, str, int], dict[str, object]] = fit_one) -> None:
    args = parse_arguments()
    matrices = suite(args.dataset, args.families)
    if args.list:
        for entry in matrices:
            print(
                f"{entry.family:>16} | {entry.name}\n{np.array2string(entry.matrix, precision=3, suppress_small=True)}"
            )
        return
    if args.write_matrices:
        path = RESULTS / "noise_suite_matrices.json"
        everything = {
            dataset: [{"name": m.name, "family": m.family, "matrix": m.matrix.tolist()} for m in suite(dataset)]
            for dataset in SIZES
        }
        write_text(path, [json.dumps(everything, indent=1)])
        print(f"wrote {path}")
        return
    stem = args.out or RESULTS / f"noise_suite_{args.dataset}"
    csv_path, md_path = stem.with_suffix(".csv"), stem.with_suffix(".md")
    measured_by = fit_provenance(args)
    metadata = metadata_line(measured_by["command"], measured_by["commit"], measured_by["machine"])
    if args.markdown_only:
        write_markdown(csv_path, md_path, args.dataset, metadata)
        return
    done = {(run["matrix"], run["method"], run["seed"]) for run in read_table(csv_path)}
    if args.interleave:
        by_family = [[entry for entry in matrices if entry.family == family] for family in args.families]
        matrices = [entry for group in itertools.zip_longest(*by_family) for entry in group if entry is not None]
    jobs = [
        Job(args.dataset, entry, method, args.seed, args.accelerator)
        for entry in matrices
        for method in args.methods
        if (entry.name, method, str(args.seed)) not in done
    ]
    for job, result in run_jobs(jobs, functools.partial(measure, fit=fit), args.workers, args.threads):
        entry = job.entry
        record = {
            "dataset": job.dataset,
            "family": entry.family,
            "matrix": entry.name,
            "method": job.method,
            "seed": job.seed,
            "min_diagonal": entry.min_diagonal,
            "diagonally_dominant": entry.diagonally_dominant,
            "matrix_json": json.dumps(np.round(entry.matrix, 6).tolist()),
            **result,
            **measured_by,
        }
        append_row(csv_path, COLUMNS, record, "move it away or pass another --out")
        print(f"{entry.name:>36} | {job.method} | test {float(result['test_acc']):.4f}", flush=True)
        write_markdown(csv_path, md_path, args.dataset, metadata)
    write_markdown(csv_path, md_path, args.dataset, metadata)
    print(f"wrote {csv_path} and {md_path}")


if __name__ == "__main__":
    main()
