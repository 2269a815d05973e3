"""Speed benchmark: our Lightning epoch against a bare PyTorch loop and the usual torchvision pipeline.

    NOISY_LIGHTNING_DATA=../shared/datasets python benchmarks/speed.py            # CPU table + scale + memory
    NOISY_LIGHTNING_DATA=... python benchmarks/speed.py --accelerator gpu        # the same on a GPU
    python benchmarks/speed.py --dataset mnist_sample --skip torchvision         # a quick run on the shipped sample

Contenders, all with the same 784-500-10 MLP, Adam, the same training split (MNIST's training digits less the
validation split that ``NoisyLabelDataModule`` holds out; the bare loop and the torchvision pipeline train on the same
digits) and the same batch size, on one device:

1. ``bare``: a hand-written loop over tensors already in memory (``randperm``, index, forward, backward, step);
2. ``torchvision``: the usual recipe, ``torchvision.datasets.MNIST`` with ``ToTensor``/``Normalize`` through a
   default ``DataLoader`` into a plain ``LightningModule``;
3. ``ours_ce``: ``NoisyLabelClassifier(method="ce")`` + ``NoisyLabelDataModule`` under ``Trainer.fit``;
4. ``ours_em``: the same with ``method="em"`` and ``e_step="inference"``; every measured epoch ends with an EM
   round (an eval-mode E-step pass over the training split, theta M-step) and trains on online posteriors;
5. ``ours_em_train_pass``: EM with the default ``e_step="train_pass"``, which reuses the training step's outputs
   instead of an extra forward pass over the training split.

The contenders are interleaved in one process, round after round, so that the machine's noise hits all alike;
each reported epoch time is the median over the measured epochs (the first epoch of every run is a warm-up and
is not measured). The Trainers run without validation, logger, checkpointing or progress bar, so the epoch is the
training loop itself (plus, for EM, its E-step). Peak resident memory is measured per contender in a fresh
subprocess (``VmHWM`` of ``/proc/self/status`` after its two epochs). Results go to ``benchmarks/results/speed.md``
and ``speed.csv`` (``speed_gpu.*`` with ``--accelerator gpu``).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import lightning as L
import torch
import torch.nn.functional as F
from common import QUIET_TRAINER, RESULTS, command_line, commit, machine, metadata_line, write_table, write_text
from torch import nn

from noisy_lightning import MLP, EMNoiseEstimation, NoisyLabelClassifier, NoisyLabelDataModule

HIDDEN = [500]
FEATURES, CLASSES = 784, 10
CONTENDERS = ("bare", "torchvision", "ours_ce", "ours_em", "ours_em_train_pass")
RAM_GIB = 24  # the memory of a typical workstation, for the extrapolation of the largest pool


# ---- the network and the FLOP floor -------------------------------------------------------------------------------
def make_net() -> nn.Module:
    return MLP(FEATURES, HIDDEN, CLASSES, dropout=0.0)


def flops_per_sample() -> int:
    """Forward 2*sum(in*out) multiply-adds, backward twice that (input and weight gradients)."""
    sizes = [FEATURES, *HIDDEN, CLASSES]
    forward = sum(2 * a * b for a, b in itertools.pairwise(sizes))
    return 3 * forward


def matmul_rate(device: torch.device, batch_size: int, seconds: float = 1.0) -> float:
    """Measured FLOP/s of the layer's own matrix product shape ``[B, 784] @ [784, 500]``."""
    a = torch.randn(batch_size, FEATURES, device=device)
    b = torch.randn(FEATURES, HIDDEN[0], device=device)
    for _ in range(5):
        a @ b
    synchronize(device)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(20):
            a @ b
        count += 20
        synchronize(device)
    return count * 2 * batch_size * FEATURES * HIDDEN[0] / (time.perf_counter() - started)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- data ---------------------------------------------------------------------------------------------------------
class TiledDataModule(NoisyLabelDataModule):
    """``NoisyLabelDataModule`` whose training pool is repeated ``tile`` times (for the scale measurements)."""

    def __init__(self, tile: int = 1, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.tile = tile

    def setup(self, stage: str | None = None) -> None:
        if self.is_set_up:
            return
        super().setup(stage)
        if self.tile == 1:
            return
        pool = self.pool
        size = pool.size

        def tiled_indices(indices: torch.Tensor) -> torch.Tensor:
            # copy k of sample i is pool row i + k * size
            return torch.cat([indices + copy * size for copy in range(self.tile)])

        self._pool = dataclasses.replace(
            pool,
            images=pool.images.repeat(self.tile, 1),
            given_labels=pool.given_labels.repeat(self.tile),
            clean_labels=pool.clean_labels.repeat(self.tile),
            train_indices=tiled_indices(pool.train_indices),
            val_indices=tiled_indices(pool.val_indices),
        )


def build_datamodule(args: argparse.Namespace, batch_size: int, tile: int = 1) -> TiledDataModule:
    datamodule = TiledDataModule(tile=tile, dataset=args.dataset, data_dir=args.data_dir, batch_size=batch_size)
    datamodule.setup("fit")
    return datamodule


class Sizes(NamedTuple):
    """What one epoch covers, read from the data module rather than assumed."""

    train: int  # samples in the training split: one epoch
    pool: int  # the training pool: the training split plus the validation split
    image_bytes: int  # one float32 image as the pool holds it

    @classmethod
    def of(cls, datamodule: NoisyLabelDataModule) -> Sizes:
        pool = datamodule.pool
        return cls(len(pool.train_indices), pool.size, pool.images[0].numel() * pool.images.element_size())


# ---- contenders ---------------------------------------------------------------------------------------------------
class EpochTimer(L.Callback):
    """Wall time from one training epoch's start to the next one's (so epoch-end work such as EM counts)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.starts: list[float] = []
        self.end = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        synchronize(self.device)
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        synchronize(self.device)
        self.end = time.perf_counter()

    def epoch_times(self) -> list[float]:
        marks = [*self.starts, self.end]
        return [b - a for a, b in itertools.pairwise(marks)]


def trainer_for(args: argparse.Namespace, epochs: int, callbacks: list[L.Callback]) -> L.Trainer:
    return L.Trainer(
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        max_epochs=epochs,
        limit_val_batches=0,
        callbacks=callbacks,
        **QUIET_TRAINER,
    )


def run_ours(
    args: argparse.Namespace, method: str, batch_size: int, epochs: int, tile: int = 1, e_step: str = "inference"
) -> list[float]:
    datamodule = build_datamodule(args, batch_size, tile)
    model = NoisyLabelClassifier(net=make_net(), method=method, augment_shift=0, lr_scheduler="none")
    timer = EpochTimer(torch.device("cuda" if args.accelerator == "gpu" else "cpu"))
    callbacks: list[L.Callback] = [timer]
    if method == "em":
        # warm-up of 1 and no held rounds: every measured epoch pays for a full EM round
        callbacks.insert(0, EMNoiseEstimation(warmup_epochs=1, hold_initial_rounds=0, e_step=e_step))
    trainer_for(args, epochs, callbacks).fit(model, datamodule)
    return timer.epoch_times()[1:]


def run_bare(args: argparse.Namespace, batch_size: int, epochs: int) -> list[float]:
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    datamodule = build_datamodule(args, batch_size)
    images = datamodule.pool.images[datamodule.pool.train_indices].to(device)
    labels = datamodule.pool.given_labels[datamodule.pool.train_indices].to(device)
    net = make_net().to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    times = []
    for _ in range(epochs):
        synchronize(device)
        started = time.perf_counter()
        for index in torch.randperm(len(labels), device=device).split(batch_size):
            loss = F.cross_entropy(net(images[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return times[1:]


class PlainClassifier(L.LightningModule):
    """What a Lightning MNIST example looks like: a net, cross-entropy, Adam."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_net()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x.flatten(1)), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def run_torchvision(args: argparse.Namespace, batch_size: int, epochs: int) -> list[float]:
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    dataset = datasets.MNIST(args.data_dir, train=True, transform=transform)
    train = Subset(dataset, build_datamodule(args, batch_size).pool.train_indices.tolist())
    loader = DataLoader(train, batch_size=batch_size, shuffle=True)
    timer = EpochTimer(torch.device("cuda" if args.accelerator == "gpu" else "cpu"))
    trainer_for(args, epochs, [timer]).fit(PlainClassifier(), loader)
    return timer.epoch_times()[1:]


def run_contender(args: argparse.Namespace, name: str, batch_size: int, epochs: int) -> list[float]:
    runners: dict[str, Callable[[], list[float]]] = {
        "bare": lambda: run_bare(args, batch_size, epochs),
        "torchvision": lambda: run_torchvision(args, batch_size, epochs),
        "ours_ce": lambda: run_ours(args, "ce", batch_size, epochs),
        "ours_em": lambda: run_ours(args, "em", batch_size, epochs),
        "ours_em_train_pass": lambda: run_ours(args, "em", batch_size, epochs, e_step="train_pass"),
    }
    return runners[name]()


# ---- memory, each in its own process -------------------------------------------------------------------------------
def peak_rss_mib() -> float:
    """This process's peak resident memory: ``VmHWM`` (not ``ru_maxrss``, which a child inherits from its parent)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure_in_subprocess(args: argparse.Namespace, name: str, batch_size: int, tile: int) -> dict[str, float]:
    command = [
        sys.executable,
        __file__,
        "--child",
        json.dumps({"name": name, "batch_size": batch_size, "tile": tile}),
        "--dataset",
        args.dataset,
        "--data-dir",
        args.data_dir,
        "--accelerator",
        args.accelerator,
        "--precision",
        args.precision,
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if completed.returncode != 0:
        raise RuntimeError(f"memory run of {name} (tile {tile}) failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def child(args: argparse.Namespace) -> None:
    spec = json.loads(args.child)
    name, batch_size, tile = spec["name"], spec["batch_size"], spec["tile"]
    if tile == 1:
        times = run_contender(args, name, batch_size, epochs=2)
    else:
        times = run_ours(args, name.removeprefix("ours_"), batch_size, epochs=2, tile=tile)
    print(json.dumps({"peak_rss_mib": peak_rss_mib(), "epoch_seconds": times[-1]}))


# ---- report -------------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="mnist", choices=["mnist", "mnist_sample"])
    parser.add_argument("--data-dir", default=os.environ.get("NOISY_LIGHTNING_DATA", "./data"))
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[512, 128])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per batch size")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (the first is not measured)")
    parser.add_argument("--tiles", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--skip", nargs="*", default=[], help="contenders to leave out (e.g. torchvision)")
    parser.add_argument("--out", type=Path, default=None, help="results stem (default results/speed, or speed_gpu)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out = args.out or RESULTS / ("speed" if args.accelerator == "cpu" else "speed_gpu")
    torch.set_float32_matmul_precision("high")
    if args.child:
        child(args)
        return
    contenders = [name for name in CONTENDERS if name not in args.skip]
    if args.dataset != "mnist" and "torchvision" in contenders:
        parser.error("the torchvision contender reads MNIST's own files: add --skip torchvision")
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        raise SystemExit("--accelerator gpu: no CUDA device is visible")
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    # Built first so that missing data fails early, with the data module's message.
    sizes = Sizes.of(build_datamodule(args, 512))
    samples = sizes.train

    rows: list[dict[str, object]] = []
    for batch_size in args.batch_sizes:
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for round_index in range(args.rounds):
            for name in contenders:
                # the torchvision pipeline is ~10x slower: one measured epoch per round is plenty
                epochs = 2 if name == "torchvision" else args.epochs
                times[name] += run_contender(args, name, batch_size, epochs)
                print(f"batch {batch_size} round {round_index} {name}: {times[name][-1]:.3f} s", flush=True)
        for name in contenders:
            median = statistics.median(times[name])
            rows.append(
                {
                    "batch_size": batch_size,
                    "contender": name,
                    "median_epoch_s": median,
                    "samples_per_s": samples / median,
                    "epochs_measured": len(times[name]),
                    "all_epochs_s": " ".join(f"{t:.3f}" for t in times[name]),
                }
            )
    floor_rate = matmul_rate(device, 512)
    floor_seconds = flops_per_sample() * samples / floor_rate

    memory = {}
    for name in contenders:
        memory[name] = measure_in_subprocess(args, name, 512, 1)["peak_rss_mib"]
    scale = []
    for tile in args.tiles:
        for method in ("ours_ce", "ours_em"):
            result = measure_in_subprocess(args, method, 512, tile)
            scale.append(
                {"tile": tile, "contender": method, "samples": samples * tile, "pool": sizes.pool * tile, **result}
            )
            print(f"tile {tile} {method}: {result}", flush=True)

    metadata = metadata_line(command_line(), commit(), machine(args.accelerator))
    write_table(args.out.with_suffix(".csv"), list(rows[0]), rows)
    write_text(
        args.out.with_suffix(".md"), report(args, sizes, rows, memory, scale, floor_rate, floor_seconds, metadata)
    )
    print(args.out.with_suffix(".md").read_text())


def report(
    args: argparse.Namespace,
    sizes: Sizes,
    rows: list[dict[str, object]],
    memory: dict[str, float],
    scale: list[dict[str, object]],
    floor_rate: float,
    floor_seconds: float,
    metadata: str,
) -> list[str]:
    """The lines of ``speed.md``."""

    def median(batch_size: int, name: str) -> float | None:
        for row in rows:
            if row["batch_size"] == batch_size and row["contender"] == name:
                return float(row["median_epoch_s"])
        return None

    def ratio(batch_size: int, top: str, bottom: str) -> str:
        a, b = median(batch_size, top), median(batch_size, bottom)
        return "-" if a is None or b is None else f"{a / b:.2f}"

    lines = [
        f"# Speed: one epoch of {args.dataset} ({args.accelerator}, {args.precision})",
        "",
        metadata,
        "",
        f"784-500-10 MLP, Adam, {sizes.train:,} training samples, no validation during the timed epochs. Median "
        f"epoch time over {args.rounds} interleaved rounds (first epoch of each run not measured).",
        "",
        "| batch | contender | median epoch (s) | samples/s | peak RSS (MiB) |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        rss = memory.get(str(row["contender"])) if row["batch_size"] == 512 else None
        lines.append(
            f"| {row['batch_size']} | {row['contender']} | {float(row['median_epoch_s']):.3f} | "
            f"{float(row['samples_per_s']):,.0f} | {'-' if rss is None else f'{rss:,.0f}'} |"
        )
    lines += [
        "",
        "Ratios of median epoch times, measured side by side in this run:",
        "",
        "| batch | ours_ce / bare | ours_em / ours_ce | ours_em_train_pass / ours_ce | torchvision / ours_ce |",
        "|---|---|---|---|---|",
    ]
    for batch_size in args.batch_sizes:
        lines.append(
            f"| {batch_size} | {ratio(batch_size, 'ours_ce', 'bare')} | {ratio(batch_size, 'ours_em', 'ours_ce')} | "
            f"{ratio(batch_size, 'ours_em_train_pass', 'ours_ce')} | {ratio(batch_size, 'torchvision', 'ours_ce')} |"
        )
    ours_512 = median(512, "ours_ce")
    lines += [
        "",
        f"FLOP floor: {flops_per_sample() * sizes.train / 1e9:.0f} GFLOP per epoch (forward + backward) at the "
        f"measured {floor_rate / 1e9:.0f} GFLOP/s of a `[512, 784] @ [784, 500]` product = {floor_seconds:.2f} s; "
        + (f"ours_ce at batch 512 is {ours_512 / floor_seconds:.2f}x the floor." if ours_512 else ""),
        "",
        f"## Scale: the training pool tiled {', '.join(f'{tile}x' for tile in args.tiles)} (batch 512, one epoch "
        "each, fresh process each)",
        "",
        "| tile | samples | contender | epoch (s) | s per 100k samples | peak RSS (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for entry in scale:
        per_100k = float(entry["epoch_seconds"]) / (int(entry["samples"]) / 1e5)
        lines.append(
            f"| {entry['tile']}x | {int(entry['samples']):,} | {entry['contender']} | "
            f"{float(entry['epoch_seconds']):.2f} | {per_100k:.2f} | {float(entry['peak_rss_mib']):,.0f} |"
        )
    em_points = [(int(e["pool"]), float(e["peak_rss_mib"])) for e in scale if e["contender"] == "ours_em"]
    if len(em_points) >= 2 and em_points[-1][1] > em_points[0][1]:
        (n0, m0), (n1, m1) = em_points[0], em_points[-1]
        slope = (m1 - m0) / (n1 - n0)  # MiB per pool sample
        intercept = m0 - slope * n0
        largest = (RAM_GIB * 1024 - intercept) / slope
        lines += [
            "",
            f"Memory grows by {slope * 1024 * 1024:,.0f} bytes per pool sample with EM (a line through the "
            f"{args.tiles[0]}x and {args.tiles[-1]}x points; intercept {intercept:,.0f} MiB): the float32 "
            f"image ({sizes.image_bytes:,} bytes), its copy in the training split, labels and indices, and the "
            f"N x K E-step sums. Nothing is N x N. Extrapolated, the largest pool that fits in "
            f"{RAM_GIB} GiB of RAM is about {largest / 1e6:.1f} million samples of this size.",
        ]
    return lines


if __name__ == "__main__":
    main()
