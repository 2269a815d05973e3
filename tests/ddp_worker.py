"""Run one EM round with frozen weights on N CPU processes (gloo) and save what every rank ended with.

    python tests/ddp_worker.py --devices 2 --e-step inference [--initialisation balanced] --out result.pt

Used by test_distributed.py: the weights never change (learning rate 0), so theta, the posterior table and the
validation accuracy must be the same on 1 and N processes whatever the sharding and the sampler's padding.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import FrozenClassifier, quiet_trainer

from noisy_lightning import (
    MLP,
    CoTeachingClassifier,
    EMNoiseEstimation,
    EMStart,
    NoiseMatrixEstimation,
    NoisyLabelClassifier,
    NoisyLabelDataModule,
)
from noisy_lightning.cli import close_process_group


class CountValidationSamples(L.Callback):
    """Counts the validation samples each rank scored; the sum over ranks must be the split's size."""

    def __init__(self) -> None:
        self.count = 0
        self.indices: list[torch.Tensor] = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.count += batch[0].shape[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--e-step", default="inference")
    parser.add_argument("--initialisation", default="hard_confusion")
    parser.add_argument("--out", required=True)
    parser.add_argument("--train", action="store_true", help="really train, with the global batch size fixed")
    parser.add_argument(
        "--method", default="em", choices=("em", "em_starts", "forward", "nal", "nal_complex", "coteaching")
    )
    args = parser.parse_args()
    if args.train:
        train(args)
        return
    if args.method != "em":
        estimate_once(args)
        return

    L.seed_everything(0)
    # 4000-sample pool, 401 validation: an odd training split (3599) and an odd validation split, so the
    # distributed sampler must pad, and the padding must not bias theta or the accuracy.
    datamodule = NoisyLabelDataModule(noise_type="uniform", noise_rate=0.5, val_fraction=0.10025, batch_size=128)
    # Stored targets keep the E-step's posterior table in the model, so it can be compared row by row. No held
    # rounds: every round runs the theta M-step, which is what must agree across process counts.
    model = FrozenClassifier(method="em", em_targets="stored")
    callback = EMNoiseEstimation(
        warmup_epochs=1, e_step=args.e_step, initialisation=args.initialisation, hold_initial_rounds=0
    )
    counter = CountValidationSamples()
    trainer = quiet_trainer(
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=3,
        callbacks=[callback, counter],
    )
    trainer.fit(model, datamodule)
    validation_count = trainer.strategy.reduce(torch.tensor(float(counter.count)), reduce_op="sum")
    result = {
        "noise_matrix": model.noise_matrix.cpu(),
        "history": callback.noise_matrix_history,
        "posteriors": model.noise_layer.posterior_table.cpu(),
        "noisy_labels": datamodule.pool.given_labels,
        "val_indices": datamodule.pool.val_indices,
        "val_acc_clean": trainer.callback_metrics["val/acc_clean"].item(),
        "validation_count_per_epoch": validation_count.item() / 3,
        "val_size": len(datamodule.pool.val_indices),
    }
    torch.save(result, f"{args.out}.rank{trainer.global_rank}")


def estimate_once(args: argparse.Namespace) -> None:
    """NoiseMatrixEstimation with frozen weights: the estimate must not depend on the number of processes."""
    L.seed_everything(0)
    datamodule = NoisyLabelDataModule(noise_type="pair_flip", noise_rate=0.45, val_fraction=0.10025, batch_size=128)
    model = FrozenClassifier(method=args.method)
    trainer = quiet_trainer(
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=2,
        callbacks=[NoiseMatrixEstimation(warmup_epochs=1)],
    )
    trainer.fit(model, datamodule)
    torch.save({"noise_matrix": model.noise_matrix.cpu()}, f"{args.out}.rank{trainer.global_rank}")


def make_trained_model(args: argparse.Namespace) -> tuple[L.LightningModule, list[L.Callback]]:
    # No dropout and no shifts: their draws are seeded per rank, so they would differ between 1 and 2 processes.
    net = MLP(hidden_sizes=[64], dropout=0.0)
    if args.method == "coteaching":
        return CoTeachingClassifier(net=net, lr=2e-3, augment_shift=0, num_gradual=2), []
    if args.method in ("nal", "nal_complex"):
        return NoisyLabelClassifier(method=args.method, net=net, lr=2e-3, augment_shift=0), [
            NoiseMatrixEstimation(warmup_epochs=1)
        ]
    model = NoisyLabelClassifier(method="em", net=net, lr=2e-3, augment_shift=0)
    if args.method == "em_starts":  # two starts tried from one warm-up, one kept by the validation split
        starts = [EMStart(0, "hard_confusion"), EMStart(1, "balanced")]
        return model, [EMNoiseEstimation(warmup_epochs=1, hold_initial_rounds=1, starts=starts, trial_epochs=2)]
    return model, [EMNoiseEstimation(warmup_epochs=1, e_step=args.e_step, hold_initial_rounds=1)]


def train(args: argparse.Namespace) -> None:
    """EM training with a global batch of 128 split over the ranks: 3600 training samples, so no padding."""
    L.seed_everything(0)
    datamodule = NoisyLabelDataModule(
        noise_type="pair_flip", noise_rate=0.3, val_fraction=0.1, batch_size=128 // args.devices
    )
    model, callbacks = make_trained_model(args)
    trainer = quiet_trainer(
        devices=args.devices, strategy="ddp" if args.devices > 1 else "auto", max_epochs=4, callbacks=callbacks
    )
    trainer.fit(model, datamodule)
    fit_metrics = {key: value.item() for key, value in trainer.callback_metrics.items()}
    test_accuracy = trainer.test(model, datamodule, verbose=False)[0]["test/acc"]
    history = callbacks[0].noise_matrix_history if args.method.startswith("em") else [model.noise_matrix.cpu()]
    result = {
        "epochs": trainer.current_epoch,
        "trial_scores": getattr(callbacks[0], "trial_scores", None) if callbacks else None,
        "kept_start": getattr(callbacks[0], "kept_start", None) if callbacks else None,
        "noisy_labels": datamodule.pool.given_labels,
        "history": history,
        "fit_metrics": fit_metrics,
        "test_acc": test_accuracy,
        # the complex noise adaptation layer's weights on h(x)
        "noise_weight": getattr(model.noise_layer, "transition_weight", torch.zeros(0)).detach().cpu(),
    }
    torch.save(result, f"{args.out}.rank{trainer.global_rank}")


if __name__ == "__main__":
    main()
    # Without this, gloo's threads can abort a finished rank at interpreter shutdown (exit status -6).
    close_process_group()
