"""EM against the standard methods for noisy labels, under one recipe: the same network, optimiser, epochs,
augmentation, seeds and model-selection rule (the last epoch, so no label of any kind picks the model).

    python benchmarks/compare.py --dataset mnist --seeds 0 1 2
    python benchmarks/compare.py --dataset fashion_mnist --methods ce em gce

Every fit is appended to ``benchmarks/results/compare_<dataset>.csv`` as it finishes and the ``.md`` is rewritten,
so the script can be stopped and started again: fits already in the CSV are skipped. The tables show the fits of
``--table-seeds`` only (default: seed 0; ``--markdown-only --table-seeds 0 1 2`` rewrites them for three seeds), so
the fits of a seed that not every method has reached can be kept out of the means. ``--workers 8 --accelerator gpu``
fits eight at a time on one GPU. Methods:

- ``ce``: cross-entropy on the given labels; ``em``: this library's EM with its defaults;
- ``forward`` / ``backward``: Patrini et al. (CVPR 2017) with anchor-point ``T`` after the same 6-epoch warm-up
  as EM; ``forward_oracle``: forward correction with the true ``T`` from the first step (an oracle, not a method);
- ``nal``: the noise adaptation layer's simple model (Goldberger & Ben-Reuven, ICLR 2017);
- ``gce``: generalised cross-entropy, ``q = 0.7`` (Zhang & Sabuncu, NeurIPS 2018);
- ``coteaching``: Han et al. (NeurIPS 2018), forget rate estimated from anchor points after the first epoch;
- ``cleanlearning``: cleanlab's recipe done with the same network: 5-fold out-of-fold ``pred_probs`` on the
  training split, ``cleanlab.filter.find_label_issues``, then a cross-entropy fit on the labels it keeps. Needs the
  benchmark extra (``pip install -e ".[bench]"``). Its fit time is the sum of its six fits;
- ``em_prune`` ("EM + refit"): an EM fit, this library's ``find_label_issues``, then a cross-entropy fit on the
  same data with ``NoisyLabelDataModule(drop_label_issues=...)``, which leaves the flagged training labels out
  (CleanLearning's last step on EM's flags). Its fit time is the sum of its two fits.

For ``em``, ``em_prune`` and ``cleanlearning`` the CSV also holds the precision and recall of the flagged labels
against the true flips of the training split, and for ``cleanlearning`` the theta error of cleanlab's own estimate
(``estimate_py_and_noise_matrices_from_probabilities``).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
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
    without_label_issues,
    write_table,
    write_text,
)

from noisy_lightning import (
    MLP,
    CoTeachingClassifier,
    LabelIssues,
    NoiseMatrixEstimation,
    NoisyLabelClassifier,
    NoisyLabelDataModule,
    find_label_issues,
)
from noisy_lightning.em import noise_matrix_error


@dataclass(frozen=True)
class Row:
    name: str
    noise_type: str
    noise_rate: float
    transition_matrix: tuple[tuple[float, ...], ...] | None = None  # for noise_type="custom"


# The rows of the README's results table.
ROWS = (
    Row("uniform 50%", "uniform", 0.5),
    Row("permutation 46%", "permutation", 0.46),
    Row("pair-flip 45%", "pair_flip", 0.45),
    Row("symmetric 50%", "symmetric", 0.5),
    Row("symmetric 20%", "symmetric", 0.2),
    Row("symmetric 80%", "symmetric", 0.8),
)
# One matrix of each drawn family of benchmarks/noise_suite.py (its first); --rows suite asks for them.
SUITE_FAMILIES = ("dense", "sparse", "column_dominant")


def suite_rows() -> tuple[Row, ...]:
    import noise_suite

    rows = []
    for family in SUITE_FAMILIES:
        entry = noise_suite.suite("mnist", [family])[0]
        rows.append(Row(entry.name, "custom", 0.0, tuple(map(tuple, entry.matrix.tolist()))))
    return tuple(rows)


# The shared recipe: the library's defaults.
RECIPE = {"epochs": 30, "batch_size": 256, "lr": 1e-3, "hidden_sizes": [500, 300], "dropout": 0.5, "augment_shift": 2}
METHODS = (
    "ce",
    "em",
    "forward",
    "forward_oracle",
    "backward",
    "nal",
    "nal_complex",
    "gce",
    "coteaching",
    "cleanlearning",
    "em_prune",
)
ESTIMATES_T = {"em", "forward", "backward", "nal", "nal_complex", "coteaching", "cleanlearning", "em_prune"}
CV_FOLDS = 5
ACCELERATOR = "cpu"  # every fit's; --accelerator sets it, in each worker process too

COLUMNS = [
    "dataset",
    "row",
    "noise_type",
    "noise_rate",
    "method",
    "seed",
    "test_acc",
    "val_acc_noisy",
    "theta_error",
    "issue_precision",
    "issue_recall",
    "flip_rate",
    "fits",
    "fit_seconds",
    "recipe_json",
    "commit",
    "machine",
    "command",
]


def make_model(method: str) -> tuple[L.LightningModule, list[L.Callback]]:
    """The model and callbacks of ``method`` under the shared recipe; everything else is the library's default."""
    net = MLP(hidden_sizes=RECIPE["hidden_sizes"], dropout=RECIPE["dropout"])
    common = {"lr": RECIPE["lr"], "augment_shift": RECIPE["augment_shift"]}
    if method == "coteaching":
        return CoTeachingClassifier(net=net, **common), []
    if method == "forward_oracle":
        return NoisyLabelClassifier(net=net, method="forward", **common), [NoiseMatrixEstimation(estimator="true")]
    if method == "cleanlearning":
        method = "ce"
    return NoisyLabelClassifier(net=net, method=method, **common), []


def fit(model: L.LightningModule, datamodule: L.LightningDataModule, callbacks: list[L.Callback]) -> float:
    trainer = L.Trainer(
        accelerator=ACCELERATOR, devices=1, max_epochs=RECIPE["epochs"], callbacks=callbacks, **QUIET_TRAINER
    )
    started = time.perf_counter()
    trainer.fit(model, datamodule)
    return time.perf_counter() - started


def precision_recall(flagged: torch.Tensor, flipped: torch.Tensor) -> tuple[float, float]:
    hits = (flagged & flipped).sum().item()
    precision = hits / flagged.sum().item() if flagged.any() else float("nan")
    recall = hits / flipped.sum().item() if flipped.any() else float("nan")
    return precision, recall


def run_method(method: str, datamodule: NoisyLabelDataModule) -> dict[str, float]:
    """Fit ``method`` and return its measurements (test accuracy on the clean test set, last epoch)."""
    pool = datamodule.pool
    truth = datamodule.true_transition_matrix
    if method == "cleanlearning":
        return run_cleanlearning(datamodule)
    if method == "em_prune":
        return run_em_prune(datamodule)
    model, callbacks = make_model(method)
    seconds = fit(model, datamodule, callbacks)
    theta = model.noise_matrix
    if method == "nal_complex":  # its theta depends on x: the matrix it implies on the training split
        theta = model.noise_layer.implied_noise_matrix(*model.outputs_of(pool.images[pool.train_indices]))
    result = {
        "test_acc": accuracy(model, datamodule.test_images, datamodule.test_labels),
        "val_acc_noisy": accuracy(model, pool.images[pool.val_indices], pool.given_labels[pool.val_indices]),
        "theta_error": noise_matrix_error(theta, truth) if method in ESTIMATES_T else float("nan"),
        "issue_precision": float("nan"),
        "issue_recall": float("nan"),
        "fits": 1,
        "fit_seconds": seconds,
    }
    if method == "em":
        flagged = flagged_training_labels(find_label_issues(model, datamodule), pool.train_indices)
        _, given, clean = training_split(datamodule)
        result["issue_precision"], result["issue_recall"] = precision_recall(flagged, given != clean)
    return result


def flagged_training_labels(issues: LabelIssues, train_indices: torch.Tensor) -> torch.Tensor:
    """Whether each sample of the training split (in ``train_indices``' order) is flagged by ``issues``, which
    ranks the whole pool (validation split included) in its own order."""
    flagged = torch.zeros(len(issues.index), dtype=torch.bool)
    flagged[issues.index] = issues.is_issue
    return flagged[train_indices]


def run_em_prune(datamodule: NoisyLabelDataModule) -> dict[str, float]:
    """ "EM + refit", as the library runs it: an EM fit with its defaults, its ``find_label_issues`` written to a
    ``label_issues.csv``, then a cross-entropy fit of the shared recipe on the same DataModule built again with
    ``drop_label_issues`` set to that file (the flagged training samples left out, the validation split whole).
    The theta error is EM's."""
    pool = datamodule.pool
    model, callbacks = make_model("em")
    seconds = fit(model, datamodule, callbacks)
    issues = find_label_issues(model, datamodule)
    flagged = flagged_training_labels(issues, pool.train_indices)
    _, given, clean = training_split(datamodule)
    precision, recall = precision_recall(flagged, given != clean)
    refit_data = without_label_issues(issues, datamodule)
    refit, refit_callbacks = make_model("ce")
    refit_seconds = fit(refit, refit_data, refit_callbacks)
    kept = refit_data.pool
    return {
        "test_acc": accuracy(refit, refit_data.test_images, refit_data.test_labels),
        "val_acc_noisy": accuracy(refit, kept.images[kept.val_indices], kept.given_labels[kept.val_indices]),
        "theta_error": noise_matrix_error(model.noise_matrix, datamodule.true_transition_matrix),
        "issue_precision": precision,
        "issue_recall": recall,
        "fits": 2,
        "fit_seconds": seconds + refit_seconds,
    }


def refit_without(datamodule: NoisyLabelDataModule, flagged: torch.Tensor) -> tuple[float, float]:
    """A cross-entropy fit of the shared recipe on the training split less its ``flagged`` samples (CleanLearning's
    last step): its test accuracy and fit time."""
    images, given, clean = training_split(datamodule)
    test_images = as_image_batch(datamodule, datamodule.test_images)
    test_probabilities, seconds = fit_ce_on(images[~flagged], given[~flagged], clean[~flagged], test_images)
    return (test_probabilities.argmax(dim=1) == datamodule.test_labels).double().mean().item(), seconds


def as_image_batch(datamodule: NoisyLabelDataModule, images: torch.Tensor) -> torch.Tensor:
    """``images`` in the pool's image shape, so that a fit of them shifts them like the other methods' fits (a
    flat ``[N, D]`` tensor is features, which no augmentation touches)."""
    shape = datamodule.pool.image_shape
    return images.view(-1, *(shape[1:] if shape[0] == 1 else shape))


def training_split(datamodule: NoisyLabelDataModule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training split's images (as :func:`as_image_batch`), given labels and clean labels."""
    pool = datamodule.pool
    train = pool.train_indices
    return as_image_batch(datamodule, pool.images[train]), pool.given_labels[train], pool.clean_labels[train]


def stratified_folds(labels: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """Each sample's fold, ``0..folds-1``, with every class spread evenly over the folds (as ``StratifiedKFold``)."""
    generator = torch.Generator().manual_seed(seed)
    assignment = torch.empty_like(labels)
    for label in labels.unique():
        members = (labels == label).nonzero().squeeze(1)
        shuffled = members[torch.randperm(len(members), generator=generator)]
        assignment[shuffled] = torch.arange(len(members)) % folds
    return assignment


def fit_ce_on(images: torch.Tensor, labels: torch.Tensor, clean: torch.Tensor, evaluate: torch.Tensor):
    """A cross-entropy fit of the shared recipe on ``images`` (all of them: no validation split to speak of), and
    the softmax of ``evaluate``, normalised as the fit's own images are."""
    data = NoisyLabelDataModule.from_tensors(
        images,
        labels,
        clean_labels=clean,
        test_images=evaluate,
        test_labels=torch.zeros(len(evaluate), dtype=torch.long),
        num_classes=10,
        val_fraction=10 / len(images),  # the DataModule needs a validation split; 10 samples cost nothing
        batch_size=RECIPE["batch_size"],
    )
    model, callbacks = make_model("ce")
    seconds = fit(model, data, callbacks)
    return torch.softmax(model.logits_of(data.test_images), dim=1), seconds


def run_cleanlearning(datamodule: NoisyLabelDataModule) -> dict[str, float]:
    """cleanlab's ``CleanLearning`` with this library's network and recipe, its steps done one by one as
    ``CleanLearning.fit`` does them with its defaults: stratified 5-fold out-of-fold ``pred_probs``,
    ``estimate_py_and_noise_matrices_from_probabilities(converge_latent_estimates=False)``, then
    ``filter.find_label_issues`` with that confident joint and ``min_examples_per_class=10``, then a fit on the
    labels kept. (``CleanLearning`` also weights the final fit by ``1 / noise_matrix[k][k]`` per class when the
    classifier's ``fit`` takes ``sample_weight``; a Lightning module's does not, so there is no weighting here.)"""
    from cleanlab.count import estimate_py_and_noise_matrices_from_probabilities
    from cleanlab.filter import find_label_issues as cleanlab_find_label_issues

    pool = datamodule.pool
    as_images, given, clean = training_split(datamodule)
    folds = stratified_folds(given, CV_FOLDS, datamodule.seed)
    pred_probs = torch.zeros(len(given), pool.num_classes)
    seconds = 0.0
    for fold in range(CV_FOLDS):
        held_out = folds == fold
        probabilities, fold_seconds = fit_ce_on(
            as_images[~held_out], given[~held_out], clean[~held_out], as_images[held_out]
        )
        pred_probs[held_out] = probabilities
        seconds += fold_seconds
    labels, probs = given.numpy(), pred_probs.double().numpy()
    _, noise_matrix, _, confident_joint = estimate_py_and_noise_matrices_from_probabilities(
        labels, probs, converge_latent_estimates=False
    )
    flagged = torch.from_numpy(
        cleanlab_find_label_issues(labels, probs, confident_joint=confident_joint, min_examples_per_class=10)
    )
    precision, recall = precision_recall(flagged, given != clean)
    # cleanlab's noise_matrix[given, true] = P(given | true): the transpose of theta.
    theta = torch.from_numpy(noise_matrix).t()
    test_accuracy, final_seconds = refit_without(datamodule, flagged)
    seconds += final_seconds
    return {
        "test_acc": test_accuracy,
        "val_acc_noisy": float("nan"),  # its validation labels are not held out of the cross-validation
        "theta_error": noise_matrix_error(theta, datamodule.true_transition_matrix),
        "issue_precision": precision,
        "issue_recall": recall,
        "fits": CV_FOLDS + 1,
        "fit_seconds": seconds,
    }


# ---- the tables ---------------------------------------------------------------------------------------------------
def numbers(runs: Sequence[Mapping[str, str]], key: str) -> list[float]:
    return [float(run[key]) for run in runs if run[key] not in ("", "nan")]


def accuracy_cell(runs: Sequence[Mapping[str, str]], row_seeds: Sequence[str] = ()) -> str:
    """Mean ± std (worst seed) of the test accuracy; ``row_seeds`` are the seeds that the row's methods reached
    together, and a method with fewer says which it has."""
    values = [100 * value for value in numbers(runs, "test_acc")]
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    worst = f" (worst {min(values):.2f})" if len(values) > 1 else ""
    seeds = sorted({run["seed"] for run in runs}, key=int)
    fewer = len(seeds) < len(row_seeds)
    only = f" (seed{'s' if len(seeds) > 1 else ''} {', '.join(seeds)} only)" if fewer else ""
    return f"{statistics.mean(values):.2f} ± {spread:.2f}{worst}{only}"


def mean_cell(runs: Sequence[Mapping[str, str]], key: str, digits: int = 3, scale: float = 1.0) -> str:
    values = numbers(runs, key)
    return f"{scale * statistics.mean(values):.{digits}f}" if values else "-"


def time_ratio_cell(runs: Sequence[Mapping[str, str]], baseline: Sequence[Mapping[str, str]]) -> str:
    """Mean over seeds of a method's fit time over the CE fit's, pairing only fits of one seed on one machine."""
    base = {(run["seed"], run["machine"]): float(run["fit_seconds"]) for run in baseline}
    ratios = [float(run["fit_seconds"]) / base[key] for run in runs if (key := (run["seed"], run["machine"])) in base]
    return f"{statistics.mean(ratios):.2f}" if ratios else "-"


def write_markdown(
    csv_path: Path, md_path: Path, dataset: str, metadata: str, seeds: Sequence[int] | None = None
) -> None:
    """The tables of the CSV's fits of ``seeds`` (all its fits when None), so that a seed measured for only some
    methods so far does not enter their means."""
    runs = [run for run in read_table(csv_path) if seeds is None or int(run["seed"]) in seeds]
    methods = [method for method in METHODS if any(run["method"] == method for run in runs)]
    rows = list(dict.fromkeys(run["row"] for run in runs))

    def of(row: str, method: str) -> list[dict[str, str]]:
        return [run for run in runs if run["row"] == row and run["method"] == method]

    lines = [
        f"# {dataset}: EM against the standard methods under one recipe",
        "",
        metadata,
        "",
        *provenance(runs),
        f"Recipe for every method: `{json.dumps(RECIPE)}`, Adam, cosine schedule, the last epoch's model. "
        "Test accuracy (%) on the clean test set, mean ± std over seeds and the worst seed. `forward_oracle` is given "
        "the true noise matrix: an upper reference, not a method. Machines: the `machine` column of the CSV.",
        "",
        "| noise | seeds | " + " | ".join(methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for row in rows:
        row_seeds = sorted({run["seed"] for run in runs if run["row"] == row}, key=int)
        cells = " | ".join(accuracy_cell(of(row, m), row_seeds) for m in methods)
        lines.append(f"| {row} | {len(row_seeds)} | {cells} |")
    estimating = [method for method in methods if method in ESTIMATES_T]
    lines += [
        "",
        "Theta error, ||theta - T||_1 / ||T||_1 against the realised corruption, mean over seeds (cleanlearning: "
        "cleanlab's `estimate_py_and_noise_matrices_from_probabilities` on the out-of-fold probabilities; em_prune: "
        "the theta of its EM fit):",
        "",
        "| noise | " + " | ".join(estimating) + " |",
        "|---|" + "---|" * len(estimating),
    ]
    for row in rows:
        lines.append(f"| {row} | " + " | ".join(mean_cell(of(row, m), "theta_error") for m in estimating) + " |")
    lines += [
        "",
        "Wall time of each method's fit as a ratio to the cross-entropy fit of the same noise and seed on the same "
        "machine, mean over those seeds (cleanlearning: its five cross-validation fits and its final fit together; "
        "em_prune: its EM fit and its refit). "
        "The fits ran one after another, or several at a time where the `machine` column says so, on machines that "
        "other work shared at times, so compare these loosely; `method_cost.md` times the methods side by side.",
        "",
        "| noise | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for row in rows:
        cells = [time_ratio_cell(of(row, method), of(row, "ce")) for method in methods]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    if any(of(row, "cleanlearning") for row in rows):
        lines += [
            "",
            "Label issues on the training split against the true flips (precision / recall of the flagged labels), "
            "EM's `find_label_issues` (one fit) against cleanlab's `find_label_issues` on 5-fold out-of-fold "
            "probabilities (five fits, and a sixth for CleanLearning's final model), on the seeds that both have; "
            "with each one's theta error and test accuracy (%, mean) on those seeds:",
            "",
            "| noise | seeds | EM precision | EM recall | cleanlab precision | cleanlab recall | EM theta error | "
            "cleanlab theta error | EM | CleanLearning |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            cl_runs = of(row, "cleanlearning")
            paired = {run["seed"] for run in cl_runs}
            em_runs = [run for run in of(row, "em") if run["seed"] in paired]
            if not em_runs:
                continue
            lines.append(
                f"| {row} | {', '.join(sorted(paired, key=int))} | {mean_cell(em_runs, 'issue_precision', 4)} | "
                f"{mean_cell(em_runs, 'issue_recall', 4)} | {mean_cell(cl_runs, 'issue_precision', 4)} | "
                f"{mean_cell(cl_runs, 'issue_recall', 4)} | {mean_cell(em_runs, 'theta_error')} | "
                f"{mean_cell(cl_runs, 'theta_error')} | {mean_cell(em_runs, 'test_acc', 2, 100)} | "
                f"{mean_cell(cl_runs, 'test_acc', 2, 100)} |"
            )
    write_text(md_path, lines)


# ---- running ------------------------------------------------------------------------------------------------------
def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=("mnist", "fashion_mnist"), default="mnist")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="the seeds to fit")
    parser.add_argument("--table-seeds", type=int, nargs="+", default=[0], help="the seeds whose fits the tables show")
    parser.add_argument(
        "--rows",
        nargs="+",
        default=[row.name for row in ROWS],
        metavar="ROW",
        help="rows of the results table by name; 'suite' adds the first matrix of each drawn family of the noise suite",
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--out", type=Path, default=None, help="results stem (default results/compare_<dataset>)")
    parser.add_argument(
        "--markdown-only", action="store_true", help="rewrite the .md from the CSV's fits of --table-seeds and stop"
    )
    parser.add_argument(
        "--refit",
        action="store_true",
        help="replace the CSV's fits of the chosen rows, methods and seeds by new ones (after a method changed)",
    )
    add_fit_arguments(parser)
    args = parser.parse_args()
    check_fit_arguments(parser, args)
    known = {row.name for row in ROWS} | {"suite"}
    unknown = set(args.rows) - known
    if unknown:
        parser.error(f"--rows: unknown row(s) {sorted(unknown)}; known: {[row.name for row in ROWS]}")
    return args


@dataclass(frozen=True)
class Job:
    dataset: str
    row: Row
    method: str
    seed: int
    accelerator: str


def measure(job: Job, run: Callable[[str, NoisyLabelDataModule], dict[str, float]] = run_method) -> dict[str, object]:
    """One fit of ``job``: its seed, its noisy DataModule, then ``run``'s measurements and the realised flip rate."""
    global ACCELERATOR
    ACCELERATOR = job.accelerator
    torch.set_float32_matmul_precision("high")
    L.seed_everything(job.seed, verbose=False)
    datamodule = NoisyLabelDataModule(
        dataset=job.dataset,
        noise_type=job.row.noise_type,
        noise_rate=job.row.noise_rate,
        transition_matrix=job.row.transition_matrix,
        seed=job.seed,
        batch_size=RECIPE["batch_size"],
    )
    datamodule.setup("fit")
    return {"flip_rate": datamodule.corruption.flip_rate, **run(job.method, datamodule)}


def main(run: Callable[[str, NoisyLabelDataModule], dict[str, float]] = run_method) -> None:
    args = parse_arguments()
    stem = args.out or RESULTS / f"compare_{args.dataset}"
    csv_path, md_path = stem.with_suffix(".csv"), stem.with_suffix(".md")
    measured_by = fit_provenance(args)
    metadata = metadata_line(measured_by["command"], measured_by["commit"], measured_by["machine"])
    if args.markdown_only:
        write_markdown(csv_path, md_path, args.dataset, metadata, args.table_seeds)
        return
    chosen = [row for row in ROWS if row.name in args.rows]
    chosen += list(suite_rows()) if "suite" in args.rows else []
    if args.refit:  # a method changed: its old fits of these rows and seeds leave the CSV, and are fitted again
        asked = {(row.name, method, str(seed)) for row in chosen for method in args.methods for seed in args.seeds}
        kept = [run for run in read_table(csv_path) if (run["row"], run["method"], run["seed"]) not in asked]
        write_table(csv_path, COLUMNS, kept)
    done = {(run["row"], run["method"], run["seed"]) for run in read_table(csv_path)}
    jobs = [
        Job(args.dataset, row, method, seed, args.accelerator)
        for seed in args.seeds
        for row in chosen
        for method in args.methods
        if (row.name, method, str(seed)) not in done
    ]
    for job, result in run_jobs(jobs, functools.partial(measure, run=run), args.workers, args.threads):
        record = {
            "dataset": job.dataset,
            "row": job.row.name,
            "noise_type": job.row.noise_type,
            "noise_rate": job.row.noise_rate,
            "method": job.method,
            "seed": job.seed,
            "recipe_json": json.dumps(RECIPE),
            **result,
            **measured_by,
        }
        append_row(csv_path, COLUMNS, record, "move it away or pass another --out")
        theta = "" if math.isnan(result["theta_error"]) else f" | theta err {result['theta_error']:.3f}"
        print(
            f"{job.row.name:>16} | {job.method:>14} | seed {job.seed} | test {result['test_acc']:.4f}{theta} | "
            f"{result['fit_seconds']:.0f} s",
            flush=True,
        )
        write_markdown(csv_path, md_path, args.dataset, metadata, args.table_seeds)
    write_markdown(csv_path, md_path, args.dataset, metadata, args.table_seeds)
    print(f"wrote {csv_path} and {md_path}")


if __name__ == "__main__":
    main()
