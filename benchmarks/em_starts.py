"""EM with one start against EM that tries several starts in one fit and keeps one by the noisy validation labels.

    NOISY_LIGHTNING_DATA=../shared/datasets python benchmarks/em_starts.py --rows permutation_46 --seeds 5 8
    python benchmarks/em_starts.py --markdown-only

Each run is one ``Trainer.fit`` of the library's recipe (784-500-300-10 MLP, dropout 0.5, 2-pixel shifts, Adam,
cosine schedule, batch 256, 30 epochs, 6-epoch warm-up, 3 held rounds), with the ``EMNoiseEstimation`` of a
configuration of :data:`CONFIGURATIONS`:

- ``one start``: ``starts=[EMStart(0, "hard_confusion")]``, a single EM start after the warm-up;
- ``two starts``: ``starts=[EMStart(0, "hard_confusion"), EMStart(4, "balanced")]``, ``trial_epochs=8``: both
  are fitted 8 epochs from the same warm-up and the one with the higher noisy-label accuracy on the validation split
  is continued (the fit runs 38 epochs, 30 of them for the kept start);
- the same two with ``, eval-mode E-step``: ``e_step="inference"`` (the default E-step reads the training pass).

The table gives clean test accuracy, theta error, which start was kept and the fit time of each configuration, and
the ratio of the two fit times on the same noise and seed. Runs are appended to ``results/em_starts.csv`` as they
finish; a run already there is skipped, so the command resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    QUIET_TRAINER,
    RESULTS,
    accuracy,
    append_row,
    command_line,
    commit,
    machine,
    metadata_line,
    provenance,
    read_table,
    write_text,
)

from noisy_lightning import MLP, EMNoiseEstimation, EMStart, NoisyLabelClassifier, NoisyLabelDataModule
from noisy_lightning.em import noise_matrix_error

ROWS: dict[str, tuple[str, float]] = {
    "uniform_50": ("uniform", 0.5),
    "permutation_46": ("permutation", 0.46),
    "pair_flip_45": ("pair_flip", 0.45),
    "symmetric_50": ("symmetric", 0.5),
    "symmetric_20": ("symmetric", 0.2),
    "symmetric_80": ("symmetric", 0.8),
}
ONE_START: dict[str, object] = {"starts": [EMStart(0, "hard_confusion")]}
TWO_STARTS: dict[str, object] = {"starts": [EMStart(0, "hard_confusion"), EMStart(4, "balanced")], "trial_epochs": 8}
EVAL_MODE = ", eval-mode E-step"  # the E-step of an inference pass at each round's end, the default before 0.3.0
CONFIGURATIONS: dict[str, dict[str, object]] = {
    "one start": ONE_START,
    "two starts": TWO_STARTS,
    f"one start{EVAL_MODE}": ONE_START | {"e_step": "inference"},
    f"two starts{EVAL_MODE}": TWO_STARTS | {"e_step": "inference"},
}
COLUMNS = [
    "dataset",
    "row",
    "seed",
    "configuration",
    "test_acc",
    "val_acc_noisy",
    "theta_error",
    "kept_start",
    "trial_scores",
    "epochs",
    "fit_seconds",
    "commit",
    "machine",
    "command",
]


def fit_one(dataset: str, row: str, seed: int, configuration: str) -> dict[str, object]:
    noise_type, noise_rate = ROWS[row]
    L.seed_everything(seed, verbose=False)
    datamodule = NoisyLabelDataModule(
        dataset=dataset, noise_type=noise_type, noise_rate=noise_rate, seed=seed, batch_size=256
    )
    model = NoisyLabelClassifier(net=MLP(), method="em")
    callback = EMNoiseEstimation(**CONFIGURATIONS[configuration])  # type: ignore[arg-type]
    trainer = L.Trainer(accelerator="cpu", max_epochs=30, callbacks=[callback], **QUIET_TRAINER)
    started = time.perf_counter()
    trainer.fit(model, datamodule)
    seconds = time.perf_counter() - started
    pool = datamodule.pool
    val = pool.val_indices
    return {
        "test_acc": accuracy(model, datamodule.test_images, datamodule.test_labels),
        "val_acc_noisy": accuracy(model, pool.images[val], pool.given_labels[val]),
        "theta_error": noise_matrix_error(model.noise_matrix, datamodule.true_transition_matrix),
        "kept_start": callback.kept_start,
        "trial_scores": json.dumps([round(score["noisy_accuracy"], 5) for score in callback.trial_scores]),
        "epochs": trainer.current_epoch,
        "fit_seconds": seconds,
    }


def write_markdown(csv_path: Path, md_path: Path, metadata: str) -> None:
    runs = read_table(csv_path)
    by_case: dict[tuple[str, str, str, str], dict[str, Mapping[str, str]]] = {}
    for run in runs:
        starts, _, e_step = run["configuration"].partition(", ")
        key = (run["dataset"], run["row"], run["seed"], "eval mode" if e_step else "training pass")
        by_case.setdefault(key, {})[starts] = run
    lines = [
        "# EM with one start against two starts chosen by the noisy validation labels",
        "",
        metadata,
        "",
        *provenance(runs),
        "One `Trainer.fit` per cell, the library's recipe, 30 epochs for the kept start. Clean test accuracy (%) and "
        "theta error (||theta - T||_1 / ||T||_1) at the end; `kept` is the start that the validation split's given "
        "labels chose (0: no extra warm-up, hard-confusion initialisation; 1: 4 extra warm-up epochs, balanced "
        "initialisation), with each trial's noisy-label accuracy; the cost is the two-start fit's wall time over the "
        "one-start fit's, same noise and seed, measured one after the other on the machine named above (a fit that "
        "shared the machine with other work shows it in its time).",
        "",
        "| dataset | noise | seed | E-step | one start (%) | theta error | two starts (%) | theta error | kept | "
        "trial noisy accuracies | cost (x one start) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ordered = sorted(by_case.items(), key=lambda item: (item[0][0], item[0][1], item[0][3], int(item[0][2])))
    for (dataset, row, seed, e_step), configurations in ordered:
        one, two = configurations.get("one start"), configurations.get("two starts")
        ratio = float(two["fit_seconds"]) / float(one["fit_seconds"]) if one and two else None
        cells = [dataset, row.replace("_", " ") + "%", seed, e_step]
        for run in (one, two):
            cells += [f"{100 * float(run['test_acc']):.2f}", f"{float(run['theta_error']):.3f}"] if run else ["-", "-"]
        cells += [two["kept_start"], two["trial_scores"]] if two else ["-", "-"]
        cells.append(f"{ratio:.2f}" if ratio is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    write_text(md_path, lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=("mnist", "fashion_mnist", "mnist_sample"), default="mnist")
    parser.add_argument("--rows", nargs="+", choices=tuple(ROWS), default=list(ROWS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--configurations", nargs="+", choices=tuple(CONFIGURATIONS), default=["one start", "two starts"]
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "em_starts", help="results stem")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the CSV and stop")
    args = parser.parse_args(argv)
    csv_path, md_path = args.out.with_suffix(".csv"), args.out.with_suffix(".md")
    at_commit, on_machine = commit(), machine()
    command = command_line(None if argv is None else ["benchmarks/em_starts.py", *argv])
    if not args.markdown_only:
        done = {(run["dataset"], run["row"], run["seed"], run["configuration"]) for run in read_table(csv_path)}
        for row in args.rows:
            for seed in args.seeds:
                for configuration in args.configurations:
                    if (args.dataset, row, str(seed), configuration) in done:
                        continue
                    result = fit_one(args.dataset, row, seed, configuration)
                    record = {"dataset": args.dataset, "row": row, "seed": seed, "configuration": configuration}
                    record |= result | {"commit": at_commit, "machine": on_machine, "command": command}
                    append_row(csv_path, COLUMNS, record)
                    print(f"{row} seed {seed} {configuration}: {100 * result['test_acc']:.2f}%", flush=True)
    write_markdown(csv_path, md_path, metadata_line(command, at_commit, on_machine))
    print(f"wrote {md_path}")


if __name__ == "__main__":
    main()
