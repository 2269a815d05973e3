"""What each method costs against cross-entropy: fits of the same length, interleaved in one process.

    NOISY_LIGHTNING_DATA=../shared/datasets python benchmarks/method_cost.py
    NOISY_LIGHTNING_DATA=../shared/datasets python benchmarks/method_cost.py --library-defaults --epochs 30 \
        --methods ce em em_refit --out benchmarks/results/method_cost_30_epochs
    python benchmarks/method_cost.py --dataset mnist_sample --epochs 3 --rounds 2     # a quick run on the sample

Every method fits ``--epochs`` epochs of the shared recipe of ``benchmarks/compare.py`` (784-500-300-10 MLP, dropout
0.5, 2-pixel shifts, Adam, batch 256) with its noise matrix estimated after the first epoch (EM: a round at the end
of every epoch from then on), so that all but one epoch run each method's own loss. ``--library-defaults`` keeps
each method's own default schedule instead: EM's six warm-up epochs and its two starts, which add 8 epochs to a fit
long enough to try both (30 epochs, as in ``compare.py``). The methods take turns, round after round, so that the
machine's noise hits all alike; the table gives each method's median fit time over the rounds and its ratio to the
median cross-entropy fit. Validation, logging and checkpoints are off, so a fit is training plus the method's own
passes over the data. ``em_refit`` ("EM + refit") is the whole two-fit recipe as a user runs it: the EM fit,
``find_label_issues`` written to a ``label_issues.csv``, the DataModule built again with ``drop_label_issues``, and a
cross-entropy fit of the same length on the labels kept. Results go to ``benchmarks/results/method_cost.md`` and
``.csv`` (``--out`` for another stem).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    QUIET_TRAINER,
    RESULTS,
    command_line,
    commit,
    machine,
    metadata_line,
    without_label_issues,
    write_table,
    write_text,
)

from noisy_lightning import (
    MLP,
    CoTeachingClassifier,
    EMNoiseEstimation,
    NoiseMatrixEstimation,
    NoisyLabelClassifier,
    NoisyLabelDataModule,
    find_label_issues,
)

METHODS = ("ce", "em", "em_refit", "forward", "backward", "nal", "nal_complex", "gce", "coteaching")


def make(method: str, library_defaults: bool) -> tuple[L.LightningModule, list[L.Callback]]:
    """``method``'s model, and the estimation callback that starts its own loss after one epoch (none with
    ``library_defaults``: the model then brings its default one)."""
    net = MLP(hidden_sizes=[500, 300], dropout=0.5)
    if method == "coteaching":
        model = CoTeachingClassifier(net=net)
        return model, [] if library_defaults else [NoiseMatrixEstimation(estimator="anchor", warmup_epochs=1)]
    model = NoisyLabelClassifier(net=net, method=method)
    if library_defaults:
        return model, []
    if method == "em":
        return model, [EMNoiseEstimation(warmup_epochs=1)]
    if method in ("forward", "backward", "nal", "nal_complex"):
        return model, [NoiseMatrixEstimation(warmup_epochs=1)]
    return model, []


def time_fit(method: str, datamodule: NoisyLabelDataModule, epochs: int, library_defaults: bool = False) -> float:
    if method == "em_refit":
        return time_em_refit(datamodule, epochs, library_defaults)
    model, callbacks = make(method, library_defaults)
    started = time.perf_counter()
    fit(model, callbacks, datamodule, epochs)
    return time.perf_counter() - started


def time_em_refit(datamodule: NoisyLabelDataModule, epochs: int, library_defaults: bool) -> float:
    """The EM fit, its label issues to a file, the DataModule again without them, and a cross-entropy fit: all timed,
    since a user of the recipe waits for all of it."""
    model, callbacks = make("em", library_defaults)
    started = time.perf_counter()  # from the EM fit on, as the other rows' timers start at their fit
    fit(model, callbacks, datamodule, epochs)
    refit_data = without_label_issues(find_label_issues(model, datamodule), datamodule)
    refit, refit_callbacks = make("ce", library_defaults)
    fit(refit, refit_callbacks, refit_data, epochs)
    return time.perf_counter() - started


def fit(model: L.LightningModule, callbacks: list[L.Callback], datamodule: NoisyLabelDataModule, epochs: int) -> None:
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, callbacks=callbacks, limit_val_batches=0, **QUIET_TRAINER)
    trainer.fit(model, datamodule)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument(
        "--library-defaults", action="store_true", help="each method's default schedule (EM: its warm-up and starts)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "method_cost")
    args = parser.parse_args()
    if "ce" not in args.methods:
        parser.error("--methods must include ce, the reference of the ratios")
    em_defaults = EMNoiseEstimation()
    # The trials of EM's starts all begin after the warm-up (the fit is rewound for each): a fit shorter than the
    # warm-up and one trial tries the first start only, and would time less than EM's default schedule.
    em_epochs = em_defaults.schedule.warmup_epochs + em_defaults.trial_epochs
    if args.library_defaults and args.epochs < em_epochs:
        parser.error(f"--library-defaults needs --epochs >= {em_epochs}, so that EM runs all its default schedule")
    at_commit, on_machine, command = commit(), machine(), command_line()
    torch.set_float32_matmul_precision("high")
    datamodule = NoisyLabelDataModule(dataset=args.dataset, noise_type="symmetric", noise_rate=0.5, batch_size=256)
    time_fit("ce", datamodule, 1)  # not measured: loads the data and warms up the allocator and the kernels
    times: dict[str, list[float]] = {method: [] for method in args.methods}
    for round_index in range(args.rounds):
        for method in args.methods:
            L.seed_everything(round_index, verbose=False)
            times[method].append(time_fit(method, datamodule, args.epochs, args.library_defaults))
            print(f"round {round_index} | {method:>10} | {times[method][-1]:.1f} s", flush=True)
    reference = statistics.median(times["ce"])
    rows = [
        {
            "method": method,
            "median_fit_seconds": statistics.median(times[method]),
            "ratio_to_ce": statistics.median(times[method]) / reference,
            "fit_seconds": " ".join(f"{value:.2f}" for value in times[method]),
        }
        for method in args.methods
    ]
    columns = ["method", "median_fit_seconds", "ratio_to_ce", "fit_seconds"]
    schedule = (
        f"each method's default schedule: EM warms up for {em_defaults.schedule.warmup_epochs} epochs and tries "
        f"{len(em_defaults.starts)} starts for {em_defaults.trial_epochs} epochs each"
        if args.library_defaults
        else "noise matrix estimated after the first"
    )
    write_table(args.out.with_suffix(".csv"), columns, rows)
    lines = [
        f"# Cost of each method against cross-entropy ({args.dataset})",
        "",
        metadata_line(command, at_commit, on_machine),
        "",
        f"Fits of {args.epochs} epochs ({schedule}) on {args.dataset} with symmetric 50% noise, median over "
        f"{args.rounds} interleaved rounds; the ratio is to "
        "the median cross-entropy fit of the same run. em_refit: the EM fit, its label issues, and a cross-entropy "
        "fit of the same length on the training labels it does not flag.",
        "",
        "| method | median fit (s) | ratio to CE |",
        "|---|---|---|",
        *(f"| {row['method']} | {row['median_fit_seconds']:.1f} | {row['ratio_to_ce']:.2f} |" for row in rows),
    ]
    write_text(args.out.with_suffix(".md"), lines)
    print(f"wrote {args.out.with_suffix('.csv')} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
