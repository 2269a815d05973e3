"""A peer in its own published setting: the noise adaptation layer on MNIST with permuted labels.

    NOISY_LIGHTNING_DATA=../shared/datasets python benchmarks/reproduce.py      # five seeds, about 14 min on 2 cores

Goldberger & Ben-Reuven (ICLR 2017) train a 784-500-300-10 MLP (ReLU, dropout 0.5, Adam at 1e-3, batch 256, no
augmentation, no learning-rate schedule) on MNIST whose training labels are moved by one fixed permutation (the one
of Reed et al., 2014: 0->7, 1->9, 2->0, 3->4, 4->2, 5->1, 6->3, 7->5, 8->6, 9->8) for 46% of the samples. Their code
(github.com/udibr/noisy_labels) first trains that network alone with early stopping on the loss of a 10% validation
split with noisy labels (patience 4, at most 40 epochs), then initialises the simple noise layer from the log of the
confusion matrix of that network's predictions against the noisy labels, and trains network and layer together
from the network's weights, with early stopping again. Its complex model starts from the trained simple model's
network, with its bias set from that network's confusion matrix in the same way and its weights on the last hidden
layer at 0, and trains on with early stopping once more. Test accuracy is the network's own (no noise layer) on the
clean test set.

Here the same three stages run with this library: ``NoisyLabelClassifier(method="ce")``, then ``method="nal"`` and
``method="nal_complex"`` on copies of the network before them, each with its noise layer set to the confusion
matrix of the network before it (what ``NoiseMatrixEstimation(estimator="confusion")`` computes), each with
``EarlyStopping(monitor="val/nll_noisy")`` and ``max_epochs=40``.

``--setting paper`` (the default) prepares the data and the network as the paper's code does: all 60,000 training
images, ``round(0.46 n_c)`` of the ``n_c`` labels of each class permuted (its stratified choice of the noisy
samples), inputs divided by 255, Keras's initialisation (Glorot-uniform weights, zero biases), the confusion matrix
counted over all the training images, and early stopping after 5 epochs without improvement (what Keras 1's
``patience=4`` does). What still differs: the validation split is drawn at random rather than stratified by the
noisy label; the confusion matrix's empty cells start at ``log(1e-6)`` rather than ``log(1e-8)``; and PyTorch's
Adam and dropout draw other random numbers than Keras's.

``--setting library`` keeps this library's defaults instead: each label drawn from the noise matrix (about 46%
move), inputs standardised by the dataset's mean and deviation, PyTorch's initialisation, the confusion matrix over
the training split and ``patience=4``. Results go to ``results/reproduce_nal.csv`` and ``.md``; the script resumes
by setting and seed.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping
from torch import Tensor, nn

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

from noisy_lightning import MLP, NoisyLabelClassifier, NoisyLabelDataModule
from noisy_lightning.data import default_data_dir, image_statistics, load_split, locate_idx_files
from noisy_lightning.em import initial_noise_matrix, noise_matrix_error

# Reed et al.'s permutation, as the noise adaptation layer's code uses it: true class i is labelled PERMUTATION[i].
PERMUTATION = (7, 9, 0, 4, 2, 1, 3, 5, 6, 8)
NOISE_RATE = 0.46
PUBLISHED = 94.98  # the noise adaptation layer's simple model on this setting, as its paper reports it
RECIPE = {"hidden_sizes": [500, 300], "dropout": 0.5, "lr": 1e-3, "batch_size": 256, "max_epochs": 40}
# Keras 1's EarlyStopping(patience=4), which the paper's code uses, stops after 5 epochs without improvement, where
# Lightning's stops after ``patience``: the paper setting passes 5 to Lightning. (The library setting was measured
# with 4.)
PATIENCE = {"paper": 5, "library": 4}
SETTINGS = ("paper", "library")
COLUMNS = [
    "setting",
    "seed",
    "baseline_test_acc",
    "baseline_epochs",
    "nal_test_acc",
    "nal_epochs",
    "theta_error",
    "complex_test_acc",
    "complex_epochs",
    "complex_theta_error",
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


def papers_labels(labels: Tensor, seed: int, rate: float = NOISE_RATE) -> Tensor:
    """The paper code's corruption: ``round(rate * n_c)`` of the ``n_c`` labels of each class ``c``, chosen at
    random, moved by :data:`PERMUTATION` (its stratified split of the noisy samples gives each class its share).

    Returns the given labels, in the order of ``labels``.
    """
    generator = torch.Generator().manual_seed(seed)
    given = labels.clone()
    for true_class in range(len(PERMUTATION)):
        members = torch.nonzero(labels == true_class).squeeze(1)
        moved = members[torch.randperm(members.numel(), generator=generator)[: round(rate * members.numel())]]
        given[moved] = PERMUTATION[true_class]
    return given


class DividedBy255(nn.Module):
    """Undo the DataModule's standardisation, so that the network sees ``pixels / 255`` as the paper's code feeds
    it: the DataModule gives ``(pixels / 255 - mean) / std``."""

    def __init__(self, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.reshape(-1).clone())
        self.register_buffer("std", std.reshape(-1).clone())

    def forward(self, x: Tensor) -> Tensor:
        return x * self.std + self.mean


def keras_initialisation(net: nn.Module) -> nn.Module:
    """Keras's ``Dense`` defaults: Glorot-uniform weights, zero biases."""
    for module in net.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    return net


def data_and_net(setting: str, seed: int, dataset: str) -> tuple[NoisyLabelDataModule, nn.Module]:
    """The seed's corrupted data and a fresh network, prepared as ``setting`` says (see the module docstring)."""
    mlp = MLP(hidden_sizes=RECIPE["hidden_sizes"], dropout=RECIPE["dropout"])
    if setting == "library":
        data = NoisyLabelDataModule(
            dataset=dataset,
            noise_type="custom",
            transition_matrix=transition_matrix(),
            seed=seed,
            batch_size=RECIPE["batch_size"],
        )
        data.setup("fit")
        return data, mlp
    if dataset != "mnist":
        raise SystemExit("--setting paper reads the full MNIST; use --setting library with mnist_sample")
    files = locate_idx_files("mnist", default_data_dir())
    images, labels = load_split(files, "train", 10)
    test_images, test_labels = load_split(files, "test", 10)
    data = NoisyLabelDataModule.from_tensors(
        images,
        papers_labels(labels, seed),
        clean_labels=labels,
        test_images=test_images,
        test_labels=test_labels,
        num_classes=10,
        seed=seed,
        batch_size=RECIPE["batch_size"],
    )
    data.setup("fit")
    mean, std = image_statistics(images)
    return data, nn.Sequential(DividedBy255(mean, std), keras_initialisation(mlp))


def paper_model(method: str, net: nn.Module) -> NoisyLabelClassifier:
    return NoisyLabelClassifier(net=net, method=method, lr=RECIPE["lr"], lr_scheduler="none", augment_shift=0)


def trainer_for(setting: str) -> L.Trainer:
    stop = EarlyStopping(monitor="val/nll_noisy", mode="min", patience=PATIENCE[setting])
    return L.Trainer(accelerator="cpu", max_epochs=RECIPE["max_epochs"], callbacks=[stop], **QUIET_TRAINER)


def next_stage(
    method: str, before: NoisyLabelClassifier, data: NoisyLabelDataModule, setting: str
) -> tuple[NoisyLabelClassifier, int]:
    """Train ``method`` from a copy of ``before``'s network, its noise layer set to the confusion matrix of
    ``before``'s argmax predictions against the given labels (the paper's code's initialisation: over the whole
    pool in the paper setting, as its code predicts on all its training images; over the training split in the
    library setting); returns the model and its epochs."""
    model = paper_model(method, copy.deepcopy(before.net))
    pool = data.pool
    rows = pool.train_indices if setting == "library" else torch.arange(pool.size)
    probabilities = before.logits_of(pool.images[rows]).softmax(dim=1).double()
    # Set before the first step: a layer that is already started makes the estimator the method adds do nothing.
    model.noise_layer.update(initial_noise_matrix(probabilities, pool.given_labels[rows], pool.num_classes, hard=True))
    trainer = trainer_for(setting)
    trainer.fit(model, data)
    return model, trainer.current_epoch


def complex_theta_error(model: NoisyLabelClassifier, data: NoisyLabelDataModule) -> float:
    """θ error of the one matrix that the complex model's per-sample matrices imply on the training split."""
    pool = data.pool
    implied = model.noise_layer.implied_noise_matrix(*model.outputs_of(pool.images[pool.train_indices]))
    return noise_matrix_error(implied, data.true_transition_matrix)


def run_seed(setting: str, seed: int, dataset: str = "mnist") -> dict[str, object]:
    """The three stages of the paper's recipe on one seed's corruption."""
    L.seed_everything(seed, verbose=False)
    data, net = data_and_net(setting, seed, dataset)
    started = time.perf_counter()
    baseline = paper_model("ce", net)
    first = trainer_for(setting)
    first.fit(baseline, data)
    simple, simple_epochs = next_stage("nal", baseline, data, setting)
    complex_model, complex_epochs = next_stage("nal_complex", simple, data, setting)
    return {
        "setting": setting,
        "seed": seed,
        "baseline_test_acc": accuracy(baseline, data.test_images, data.test_labels),
        "baseline_epochs": first.current_epoch,
        "nal_test_acc": accuracy(simple, data.test_images, data.test_labels),
        "nal_epochs": simple_epochs,
        "theta_error": noise_matrix_error(simple.noise_matrix, data.true_transition_matrix),
        "complex_test_acc": accuracy(complex_model, data.test_images, data.test_labels),
        "complex_epochs": complex_epochs,
        "complex_theta_error": complex_theta_error(complex_model, data),
        "flip_rate": data.corruption.flip_rate,
        "fit_seconds": time.perf_counter() - started,
        "recipe_json": json.dumps({**RECIPE, "patience": PATIENCE[setting]}),
    }


def percent(run: dict[str, str], column: str) -> str:
    value = run.get(column, "")
    return f"{100 * float(value):.2f}" if value not in ("", None) and not math.isnan(float(value)) else "-"


def summary(runs: list[dict[str, str]], column: str, name: str) -> str:
    values = [100 * float(run[column]) for run in runs if run.get(column, "") not in ("", None)]
    if not values:
        return f"{name}: not run in this setting."
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{name} over {len(values)} seed(s): {statistics.mean(values):.2f} ± {spread:.2f}."


SETTING_TEXT = {
    "paper": "The paper's data and network: all 60,000 training images, round(0.46 n_c) of the n_c labels of each "
    "class permuted, inputs divided by 255, Glorot-uniform weights and zero biases, the confusion matrix over all "
    "training images, early stopping after 5 epochs without improvement (Keras 1's patience=4).",
    "library": "This library's data and network: all 60,000 training images, each label drawn from the noise matrix, "
    "inputs standardised, PyTorch's initialisation, the confusion matrix over the training split, early stopping "
    "after 4 epochs without improvement.",
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
        "with early stopping on the noisy validation loss (at most 40 epochs), then the simple noise "
        "adaptation layer from the baseline's confusion matrix and weights, then the complex model from the simple "
        "model's network and its confusion matrix, each early-stopped the same way "
        f"(`{json.dumps(RECIPE)}`). Clean test accuracy (%) of the network without its noise layer. Theta error: "
        "||theta - T||_1 / ||T||_1 against the realised corruption; for the complex model, of the matrix its "
        "per-sample matrices imply on the training split.",
    ]
    for setting in SETTINGS:
        chosen = [run for run in runs if run.get("setting", "library") == setting]
        if not chosen:
            continue
        lines += [
            "",
            f"## Setting `{setting}`",
            "",
            SETTING_TEXT[setting],
            "",
            "| seed | baseline | epochs | simple model | epochs | theta error | complex model | epochs | theta error "
            "| flip rate (%) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for run in chosen:
            complex_error = run.get("complex_theta_error", "")
            lines.append(
                f"| {run['seed']} | {percent(run, 'baseline_test_acc')} | {run['baseline_epochs']} | "
                f"{percent(run, 'nal_test_acc')} | {run['nal_epochs']} | {float(run['theta_error']):.3f} | "
                f"{percent(run, 'complex_test_acc')} | {run.get('complex_epochs') or '-'} | "
                f"{f'{float(complex_error):.3f}' if complex_error else '-'} | {100 * float(run['flip_rate']):.1f} |"
            )
        simple_values = [100 * float(run["nal_test_acc"]) for run in chosen]
        lines += [
            "",
            f"{summary(chosen, 'nal_test_acc', 'Simple model')} Published: {PUBLISHED:.2f} (difference "
            f"{statistics.mean(simple_values) - PUBLISHED:+.2f} points). "
            f"{summary(chosen, 'complex_test_acc', 'Complex model')} "
            f"{summary(chosen, 'baseline_test_acc', 'Baseline')}",
        ]
    write_text(md_path, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # five, as the paper's code runs (its seeds 42 to 46)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--setting", choices=SETTINGS, default="paper", help="how data and network are prepared")
    parser.add_argument(
        "--dataset", choices=("mnist", "mnist_sample"), default="mnist", help="mnist_sample: a quick check only"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "reproduce_nal", help="results stem")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the CSV and stop")
    args = parser.parse_args()
    csv_path, md_path = args.out.with_suffix(".csv"), args.out.with_suffix(".md")
    measured_by = {"commit": commit(), "machine": machine(), "command": command_line()}
    metadata = metadata_line(measured_by["command"], measured_by["commit"], measured_by["machine"])
    done = {(run.get("setting", "library"), run["seed"]) for run in read_table(csv_path)}
    for seed in args.seeds if not args.markdown_only else []:
        if (args.setting, str(seed)) in done:
            continue
        result = run_seed(args.setting, seed, args.dataset)
        append_row(csv_path, COLUMNS, {**result, **measured_by}, "move it away or pass another --out")
        print(
            f"{args.setting} seed {seed}: baseline {result['baseline_test_acc']:.4f}, simple "
            f"{result['nal_test_acc']:.4f}, complex {result['complex_test_acc']:.4f}",
            flush=True,
        )
        write_markdown(csv_path, md_path, metadata)
    write_markdown(csv_path, md_path, metadata)
    print(f"wrote {csv_path} and {md_path}")


if __name__ == "__main__":
    main()
