"""A peer in its own published setting: the noise adaptation layer on MNIST with permuted labels.

    NOISY_LIGHTNING_DATA=../shared/datasets python benchmarks/reproduce.py      # five seeds, about 20 min on 2 cores

Goldberger & Ben-Reuven (ICLR 2017) train a 784-500-300-10 MLP (ReLU, dropout 0.5, Adam at 1e-3, batch 256, no
augmentation, no learning-rate schedule) on MNIST whose training labels are moved by one fixed permutation (the one
of Reed et al., 2014: 0->7, 1->9, 2->0, 3->4, 4->2, 5->1, 6->3, 7->5, 8->6, 9->8) for 46% of the samples. Their code
(github.com/udibr/noisy_labels) first trains that network alone with early stopping on the loss of a 10% validation
split with noisy labels (patience 4, at most 40 epochs), then initialises the simple noise layer from the log of the
confusion matrix of that network's predictions against the noisy labels, and trains network and layer together
from the network's weights, with early stopping again. Test accuracy is the network's own (no noise layer) on the
clean test set.

Here the same two stages run with this library:

1. ``NoisyLabelClassifier(method="ce")`` with the network and optimiser above, ``Trainer`` with
   ``EarlyStopping(monitor="val/nll_noisy", patience=4)`` and ``max_epochs=40``;
2. ``NoisyLabelClassifier(method="nal")`` on a copy of that network, its noise layer set to the confusion matrix of
   the baseline's argmax predictions against the given labels of the training split (what
   ``NoiseMatrixEstimation(estimator="confusion")`` computes), and the same early stopping.

Differences from the paper's code: the corruption draws each sample's label from the noise matrix (about 46% move,
not exactly 46% of each class), and the inputs are standardised by the dataset's mean and deviation rather than
divided by 255. Results go to ``results/reproduce_nal.csv`` and ``.md``; the script resumes by seed.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    QUIET_TRAINER,
    RESULTS,
    append_row,
    command_line,
    commit,
    machine,
    metadata_line,
    provenance,
    read_table,
    write_text,
)

from noisy_lightning import MLP, NoisyLabelClassifier, NoisyLabelDataModule
from noisy_lightning.em import initial_noise_matrix, noise_matrix_error

# Reed et al.'s permutation, as the noise adaptation layer's code uses it: true class i is labelled PERMUTATION[i].
PERMUTATION = (7, 9, 0, 4, 2, 1, 3, 5, 6, 8)
NOISE_RATE = 0.46
PUBLISHED = 94.98  # the noise adaptation layer's simple model on this setting, as its paper reports it
RECIPE = {"hidden_sizes": [500, 300], "dropout": 0.5, "lr": 1e-3, "batch_size": 256, "max_epochs": 40, "patience": 4}
COLUMNS = [
    "seed",
    "baseline_test_acc",
    "baseline_epochs",
    "nal_test_acc",
    "nal_epochs",
    "theta_error",
    "flip_rate",
    "fit_seconds",
    "recipe_json",
    "commit",
    "machine",
    "command",
]


def transition_matrix(rate: float = NOISE_RATE) -> list[list[float]]:
    """``T = (1 - rate) I + rate P`` for the permutation matrix ``P`` of :data:`PERMUTATION`."""
    size = len(PERMUTATION)
    matrix = [[0.0] * size for _ in range(size)]
    for true_class, noisy_class in enumerate(PERMUTATION):
        matrix[true_class][true_class] = 1 - rate
        matrix[true_class][noisy_class] = rate
    return matrix


def paper_model(method: str, net: torch.nn.Module) -> NoisyLabelClassifier:
    return NoisyLabelClassifier(net=net, method=method, lr=RECIPE["lr"], lr_scheduler="none", augment_shift=0)


def trainer_for(callbacks: list[L.Callback]) -> L.Trainer:
    stop = EarlyStopping(monitor="val/nll_noisy", mode="min", patience=RECIPE["patience"])
    return L.Trainer(accelerator="cpu", max_epochs=RECIPE["max_epochs"], callbacks=[*callbacks, stop], **QUIET_TRAINER)


def accuracy(model: NoisyLabelClassifier, data: NoisyLabelDataModule) -> float:
    return (model.logits_of(data.test_images).argmax(dim=1) == data.test_labels).double().mean().item()


def run_seed(seed: int, dataset: str = "mnist") -> dict[str, object]:
    """The two stages of the paper's recipe on one seed's corruption."""
    L.seed_everything(seed, verbose=False)
    data = NoisyLabelDataModule(
        dataset=dataset,
        noise_type="custom",
        transition_matrix=transition_matrix(),
        seed=seed,
        batch_size=RECIPE["batch_size"],
    )
    started = time.perf_counter()
    baseline = paper_model("ce", MLP(hidden_sizes=RECIPE["hidden_sizes"], dropout=RECIPE["dropout"]))
    first = trainer_for([])
    first.fit(baseline, data)
    adapted = paper_model("nal", copy.deepcopy(baseline.net))
    # The paper's initialisation from the trained baseline, before any step of the second stage: a layer that is
    # already started makes the estimator that the method adds by itself do nothing.
    pool = data.pool
    probabilities = baseline.logits_of(pool.images[pool.train_indices]).softmax(dim=1).double()
    given = pool.given_labels[pool.train_indices]
    adapted.noise_layer.update(initial_noise_matrix(probabilities, given, pool.num_classes, hard=True))
    second = trainer_for([])
    second.fit(adapted, data)
    return {
        "seed": seed,
        "baseline_test_acc": accuracy(baseline, data),
        "baseline_epochs": first.current_epoch,
        "nal_test_acc": accuracy(adapted, data),
        "nal_epochs": second.current_epoch,
        "theta_error": noise_matrix_error(adapted.noise_matrix, data.true_transition_matrix),
        "flip_rate": data.corruption.flip_rate,
        "fit_seconds": time.perf_counter() - started,
        "recipe_json": json.dumps(RECIPE),
    }


def write_markdown(csv_path: Path, md_path: Path, metadata: str) -> None:
    runs = read_table(csv_path)
    lines = [
        "# The noise adaptation layer in its own setting: MNIST, permutation noise 46%",
        "",
        metadata,
        "",
        *provenance(runs),
        "784-500-300-10 MLP, dropout 0.5, Adam 1e-3, batch 256, no augmentation or schedule; a cross-entropy baseline "
        "with early stopping on the noisy validation loss (patience 4, at most 40 epochs), then the simple noise "
        "adaptation layer from the baseline's confusion matrix and weights, early-stopped the same way "
        f"(`{json.dumps(RECIPE)}`). Clean test accuracy (%) of the network without its noise layer.",
        "",
        "| seed | baseline | baseline epochs | noise adaptation layer | its epochs | theta error | flip rate (%) |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        lines.append(
            f"| {run['seed']} | {100 * float(run['baseline_test_acc']):.2f} | {run['baseline_epochs']} | "
            f"{100 * float(run['nal_test_acc']):.2f} | {run['nal_epochs']} | {float(run['theta_error']):.3f} | "
            f"{100 * float(run['flip_rate']):.1f} |"
        )
    if runs:
        values = [100 * float(run["nal_test_acc"]) for run in runs]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        mean = statistics.mean(values)
        lines += [
            "",
            f"Noise adaptation layer over {len(values)} seed(s): {mean:.2f} ± {spread:.2f}; published: {PUBLISHED:.2f} "
            f"(difference {mean - PUBLISHED:+.2f} points).",
        ]
    write_text(md_path, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # five, as the paper's code runs (its seeds 42 to 46)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument(
        "--dataset", choices=("mnist", "mnist_sample"), default="mnist", help="mnist_sample: a quick check only"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "reproduce_nal", help="results stem")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the CSV and stop")
    args = parser.parse_args()
    csv_path, md_path = args.out.with_suffix(".csv"), args.out.with_suffix(".md")
    measured_by = {"commit": commit(), "machine": machine(), "command": command_line()}
    metadata = metadata_line(measured_by["command"], measured_by["commit"], measured_by["machine"])
    done = {run["seed"] for run in read_table(csv_path)}
    for seed in args.seeds if not args.markdown_only else []:
        if str(seed) in done:
            continue
        result = run_seed(seed, args.dataset)
        append_row(csv_path, COLUMNS, {**result, **measured_by}, "move it away or pass another --out")
        print(
            f"seed {seed}: baseline {result['baseline_test_acc']:.4f} ({result['baseline_epochs']} epochs), "
            f"noise adaptation layer {result['nal_test_acc']:.4f} ({result['nal_epochs']} epochs)",
            flush=True,
        )
        write_markdown(csv_path, md_path, metadata)
    write_markdown(csv_path, md_path, metadata)
    print(f"wrote {csv_path} and {md_path}")


if __name__ == "__main__":
    main()
