"""Co-teaching in its own published setting: MNIST with symmetric 50% noise (pair-flip 45% and symmetric 20% too).

    NOISY_LIGHTNING_DATA=../shared/datasets python benchmarks/reproduce_coteaching.py --accelerator gpu

Han et al.'s official code (github.com/bhanML/Co-teaching: ``main.py``, ``model.py``, ``data/utils.py``) trains two
9-layer CNNs on all 60,000 MNIST training images, scaled to ``[0, 1]`` and not augmented:

- the network of ``model.py``: three 3x3 convolutions of 128 channels, max-pooling, three of 256, max-pooling, then
  3x3 convolutions of 512, 256 and 128 channels without padding, global average pooling and a linear layer, each
  convolution followed by batch normalisation and a leaky ReLU of slope 0.01. Its ``F.dropout2d`` calls pass no
  ``training`` argument, whose default was ``False`` in the PyTorch 0.3 the code was run with: no dropout;
- labels drawn per sample from ``T`` (symmetric: ``1 - r`` on the diagonal and ``r / 9`` elsewhere; pair-flip:
  ``r`` to the next class), which are this library's ``symmetric`` and ``pair_flip`` noise types;
- Adam at 1e-3, batches of 128, 200 epochs of which the first only evaluates the untrained networks: 199 training
  epochs of 401 batches each (``if i > num_iter_per_epoch: break`` lets 401 through); from the code's epoch 80 the
  learning rate falls linearly to 1/120 of its value in the last epoch and Adam's beta1 drops from 0.9 to 0.1;
- the forget rate is the known noise rate, ramped as ``linspace(0, r, 10)`` indexed by the code's 1-based training
  epoch (this library's schedule counts from 0, so the subclass below shifts it by one epoch);
- the official README's "Performance" table gives MNIST 91.68% at symmetric 50%, 87.58% at pair-flip 45% and
  97.71% at symmetric 20%; the paper's tables average the test accuracy over the last ten epochs, and the code
  scores both networks, so both are reported here.

Here the same runs through :class:`~noisy_lightning.CoTeachingClassifier` and a Lightning ``Trainer``. What
differs: 10 training images are held out (the DataModule needs a validation split, which is not used); the
labels come from this library's seeded draw rather than numpy's ``RandomState(0)``; the whole test set is scored
(the code's test loader drops the last partial batch: 9,984 images); ``--precision`` (``bf16-mixed`` on a GPU by
default; the code ran float32 on a K80); and PyTorch's random numbers.

Every epoch appends one row to ``results/reproduce_coteaching_epochs.csv`` (both networks' test accuracy, the
learning rate and forget rate of that epoch), so a run stopped early keeps the epochs it finished;
``results/reproduce_coteaching.md`` summarises each run and says how many of the 199 epochs it completed. A run
that is complete is skipped; the rows of an incomplete one are replaced when it is run again.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    QUIET_TRAINER,
    RESULTS,
    command_line,
    commit,
    machine,
    metadata_line,
    provenance,
    read_table,
    write_table,
    write_text,
)
from reproduce import DividedBy255

from noisy_lightning import CoTeachingClassifier, NoisyLabelDataModule, peers
from noisy_lightning.data import default_data_dir, image_statistics, load_split, locate_idx_files

# The official README's "Performance" table, MNIST column: (noise type, rate) -> test accuracy (%).
PUBLISHED = {("symmetric", 0.5): 91.68, ("pair_flip", 0.45): 87.58, ("symmetric", 0.2): 97.71}
ROWS = {"symmetric50": ("symmetric", 0.5), "pair45": ("pair_flip", 0.45), "symmetric20": ("symmetric", 0.2)}
RECIPE = {
    "lr": 1e-3,
    "batch_size": 128,
    "training_epochs": 199,
    "batches_per_epoch": 401,
    "decay_start_epoch": 80,
    "num_gradual": 10,
    "held_out": 10,
}
LAST_EPOCHS = 10  # the published figure averages the last ten epochs
COLUMNS = [
    "row",
    "seed",
    "epoch",
    "lr",
    "beta1",
    "forget_rate",
    "test_acc_first",
    "test_acc_second",
    "flip_rate",
    "seconds",
    "precision",
    "recipe_json",
    "commit",
    "machine",
    "command",
]


class CoTeachingCNN(nn.Module):
    """The 9-layer CNN of the official code's ``model.py`` (without its inactive dropout), for ``[B, 784]`` or
    ``[B, 1, 28, 28]`` inputs."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()

        def convolution(inputs: int, outputs: int, padding: int) -> list[nn.Module]:
            return [nn.Conv2d(inputs, outputs, 3, padding=padding), nn.BatchNorm2d(outputs), nn.LeakyReLU(0.01)]

        self.features = nn.Sequential(
            *convolution(1, 128, 1),
            *convolution(128, 128, 1),
            *convolution(128, 128, 1),
            nn.MaxPool2d(2),
            *convolution(128, 256, 1),
            *convolution(256, 256, 1),
            *convolution(256, 256, 1),
            nn.MaxPool2d(2),
            *convolution(256, 512, 0),
            *convolution(512, 256, 0),
            *convolution(256, 128, 0),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x.reshape(x.shape[0], 1, 28, 28)))


def code_epoch(trainer_epoch: int) -> int:
    """The official code's epoch number of a 0-based training epoch: its epoch 0 only evaluates."""
    return trainer_epoch + 1


def learning_rate_and_beta1(trainer_epoch: int, lr: float = RECIPE["lr"]) -> tuple[float, float]:
    """The code's ``alpha_plan`` and ``beta1_plan``: constant, then from epoch 80 a linear fall to ``lr / 120``."""
    epoch, last = code_epoch(trainer_epoch), RECIPE["training_epochs"] + 1
    start = RECIPE["decay_start_epoch"]
    if epoch < start:
        return lr, 0.9
    return lr * (last - epoch) / (last - start), 0.1


class OfficialCoTeaching(CoTeachingClassifier):
    """:class:`~noisy_lightning.CoTeachingClassifier` with the forget rate of the code's 1-based epochs."""

    def current_forget_rate(self) -> float:
        final = self._forget_rate if self._forget_rate is not None else self.final_forget_rate()  # the epoch's cache
        return peers.coteaching_forget_rate(code_epoch(self.current_epoch), final, self.hparams.num_gradual)


class OfficialSchedule(L.Callback):
    """Sets Adam's learning rate and beta1 at each epoch start, as the code's ``adjust_learning_rate``."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        lr, beta1 = learning_rate_and_beta1(trainer.current_epoch)
        for group in trainer.optimizers[0].param_groups:
            group["lr"], group["betas"] = lr, (beta1, group["betas"][1])


@torch.no_grad()
def test_accuracy(net: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 2000) -> float:
    """The share of ``images`` that ``net`` (in eval mode, float32) classifies as ``labels``."""
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        predicted = net(images[start : start + batch_size].to(device)).argmax(dim=1).cpu()
        correct += (predicted == labels[start : start + batch_size]).sum().item()
    net.train(was_training)
    return correct / len(images)


class EpochRows(L.Callback):
    """After each training epoch, both networks' test accuracy, appended as one CSV row (flushed at once)."""

    def __init__(self, data: NoisyLabelDataModule, csv_path: Path, fixed: dict[str, object]) -> None:
        self.data, self.csv_path, self.fixed = data, csv_path, fixed
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        group = trainer.optimizers[0].param_groups[0]
        images, labels = self.data.test_images, self.data.test_labels
        row = {
            **self.fixed,
            "epoch": code_epoch(trainer.current_epoch),
            "lr": group["lr"],
            "beta1": group["betas"][0],
            "forget_rate": pl_module.current_forget_rate(),
            "test_acc_first": test_accuracy(pl_module.net, images, labels),
            "test_acc_second": test_accuracy(pl_module.peer_net, images, labels),
            "seconds": time.perf_counter() - self.started,
        }
        rows = [*read_table(self.csv_path), row] if self.csv_path.exists() else [row]
        write_table(self.csv_path, COLUMNS, rows)
        print(
            f"{row['row']} seed {row['seed']} epoch {row['epoch']}: {100 * row['test_acc_first']:.2f} / "
            f"{100 * row['test_acc_second']:.2f} ({row['seconds']:.0f} s)",
            flush=True,
        )


def official_data(noise_type: str, rate: float, seed: int) -> tuple[NoisyLabelDataModule, nn.Module]:
    """Full MNIST with labels drawn from ``noise_type`` at ``rate`` (all but ``held_out`` images train), and the
    layer that turns the DataModule's standardised images back into ``pixels / 255`` for the network."""
    files = locate_idx_files("mnist", default_data_dir())
    images, labels = load_split(files, "train", 10)
    test_images, test_labels = load_split(files, "test", 10)
    data = NoisyLabelDataModule.from_tensors(
        images,
        clean_labels=labels,
        noise_type=noise_type,
        noise_rate=rate,
        test_images=test_images,
        test_labels=test_labels,
        num_classes=10,
        seed=seed,
        val_fraction=RECIPE["held_out"] / len(images),
        batch_size=RECIPE["batch_size"],
    )
    data.setup("fit")
    return data, DividedBy255(*image_statistics(images))


def run(row: str, seed: int, args: argparse.Namespace, csv_path: Path, measured_by: dict[str, str]) -> None:
    noise_type, rate = ROWS[row]
    L.seed_everything(seed, verbose=False)
    data, to_unit_range = official_data(noise_type, rate, seed)
    net = nn.Sequential(to_unit_range, CoTeachingCNN())
    model = OfficialCoTeaching(
        net=net,
        forget_rate=rate,
        num_gradual=RECIPE["num_gradual"],
        lr=RECIPE["lr"],
        lr_scheduler="none",
        augment_shift=0,
    )
    fixed = {
        "row": row,
        "seed": seed,
        "flip_rate": data.corruption.flip_rate,
        "precision": args.precision,
        "recipe_json": json.dumps(RECIPE),
        **measured_by,
    }
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        benchmark=args.accelerator == "gpu",
        max_epochs=args.epochs,
        limit_train_batches=args.batches,
        limit_val_batches=0,
        callbacks=[OfficialSchedule(), EpochRows(data, csv_path, fixed)],
        **QUIET_TRAINER,
    )
    trainer.fit(model, data)


def mean_percent(epochs: list[dict[str, str]], column: str) -> float:
    return statistics.mean(100 * float(epoch[column]) for epoch in epochs)


def summary_line(row: str, seed: str, epochs: list[dict[str, str]]) -> str:
    """One run: the mean of its last ten epochs, set against the published figure only when the run is complete
    (an incomplete run's last ten epochs are not the schedule's)."""
    last = epochs[-LAST_EPOCHS:]
    first, second = mean_percent(last, "test_acc_first"), mean_percent(last, "test_acc_second")
    published = PUBLISHED[ROWS[row]]
    complete = len(epochs) >= RECIPE["training_epochs"]
    best = max(epochs, key=lambda epoch: float(epoch["test_acc_first"]))
    return (
        f"| {row} | {seed} | {len(epochs)} of {RECIPE['training_epochs']} | {epochs[-1]['precision']} | "
        f"{100 * float(epochs[0]['flip_rate']):.1f} | {100 * float(best['test_acc_first']):.2f} (epoch "
        f"{best['epoch']}) | {last[0]['epoch']}-{last[-1]['epoch']} | {first:.2f} | {second:.2f} | {published:.2f} | "
        f"{f'{first - published:+.2f}' if complete else 'run incomplete'} | {float(epochs[-1]['seconds']):.0f} |"
    )


def trajectory(row: str, seed: str, epochs: list[dict[str, str]]) -> list[str]:
    """The first network's mean test accuracy in each window of ten epochs, to show where the run was heading."""
    windows = [epochs[start : start + LAST_EPOCHS] for start in range(0, len(epochs), LAST_EPOCHS)]
    header = " | ".join(f"{window[0]['epoch']}-{window[-1]['epoch']}" for window in windows)
    values = " | ".join(f"{mean_percent(window, 'test_acc_first'):.2f}" for window in windows)
    return [
        "",
        f"`{row}`, seed {seed}: the first network's mean test accuracy (%) by window of epochs.",
        "",
        f"| epochs | {header} |",
        f"|---|{'---|' * len(windows)}",
        f"| accuracy | {values} |",
    ]


def write_markdown(csv_path: Path, md_path: Path, metadata: str) -> None:
    rows = read_table(csv_path)
    runs: dict[tuple[str, str], list[dict[str, str]]] = {}
    for epoch in rows:
        runs.setdefault((epoch["row"], epoch["seed"]), []).append(epoch)
    lines = [
        "# Co-teaching in its own setting: MNIST, the official code's network and schedule",
        "",
        metadata,
        "",
        *provenance(rows),
        "Two 9-layer CNNs (the official `model.py`, no dropout), inputs in [0, 1], no augmentation, Adam 1e-3, "
        "batch 128, 199 training epochs of 401 batches, learning rate falling linearly from epoch 80 (beta1 0.1), "
        "forget rate = the noise rate, ramped over 10 epochs; all 60,000 training images but 10. "
        f"`{json.dumps(RECIPE)}`. Test accuracy (%) on the 10,000 clean test images. Published: the official "
        f"README's MNIST column; the paper averages the last {LAST_EPOCHS} epochs, so it is compared only with a run "
        "that completed all 199.",
        "",
        "| noise | seed | epochs run | precision | flip rate (%) | best epoch | last ten run | first network | "
        "second network | published | difference | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(summary_line(row, seed, epochs) for (row, seed), epochs in runs.items()),
    ]
    for (row, seed), epochs in runs.items():
        lines += trajectory(row, seed, epochs)
    write_text(md_path, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", choices=tuple(ROWS), default=["symmetric50"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])  # the official code's default seed
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--precision", default=None, help="Trainer precision; default bf16-mixed on a GPU, else 32")
    parser.add_argument("--epochs", type=int, default=RECIPE["training_epochs"], help="a quick check only")
    parser.add_argument("--batches", type=int, default=RECIPE["batches_per_epoch"], help="a quick check only")
    parser.add_argument("--out", type=Path, default=RESULTS / "reproduce_coteaching", help="results stem")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the CSV and stop")
    args = parser.parse_args()
    args.precision = args.precision or ("bf16-mixed" if args.accelerator == "gpu" else "32-true")
    csv_path = args.out.parent / f"{args.out.name}_epochs.csv"
    md_path = args.out.with_suffix(".md")
    measured_by = {"commit": commit(), "machine": machine(args.accelerator), "command": command_line()}
    metadata = metadata_line(measured_by["command"], measured_by["commit"], measured_by["machine"])
    for row in args.rows if not args.markdown_only else []:
        for seed in args.seeds:
            previous = read_table(csv_path) if csv_path.exists() else []
            done = [epoch for epoch in previous if (epoch["row"], epoch["seed"]) == (row, str(seed))]
            if len(done) >= args.epochs:
                continue
            if done:  # an incomplete run: start it again
                kept = [epoch for epoch in previous if (epoch["row"], epoch["seed"]) != (row, str(seed))]
                write_table(csv_path, COLUMNS, kept)
            run(row, seed, args, csv_path, measured_by)
            write_markdown(csv_path, md_path, metadata)
    write_markdown(csv_path, md_path, metadata)
    print(f"wrote {csv_path} and {md_path}")


if __name__ == "__main__":
    main()
