"""Train EM on the shipped sample, optionally killing the process at a given step, or resuming from last.ckpt.

    python tests/resume_worker.py --out DIR [--e-step inference] [--kill-at EPOCH:BATCH] [--resume]

Used by test_resume.py. ``--kill-at`` sends SIGKILL to the process itself at the start of that training batch
(nothing is flushed or saved on the way out: a real crash); a checkpoint was written after every step before it.
``--resume`` runs the same script again with ``ckpt_path=DIR/checkpoints/last.ckpt``. The final state is saved to
``DIR/result.pt``.
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from noisy_lightning import MLP, EMNoiseEstimation, EMStart, NoisyLabelClassifier, NoisyLabelDataModule
from noisy_lightning.issues import score_pool


class KillAt(L.Callback):
    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--e-step", default="inference")
    parser.add_argument("--kill-at", default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--two-starts", action="store_true", help="try two EM starts (2-epoch trials, 6 epochs)")
    args = parser.parse_args()

    L.seed_everything(0)
    datamodule = NoisyLabelDataModule(noise_type="pair_flip", noise_rate=0.3, seed=1, batch_size=256)
    model = NoisyLabelClassifier(
        net=MLP(hidden_sizes=[64], dropout=0.2),
        method="em",
        lr=2e-3,
        lr_scheduler="cosine",
        augment_shift=1,
    )
    # One held round, so that the M-steps of rounds 2 and 3 update theta before the later kill points.
    # Two starts: epoch 0 warms up, epochs 1-2 try start 0, epochs 3-4 start 1, epoch 5 continues the kept one.
    starts = {"starts": [EMStart(0, "hard_confusion"), EMStart(1, "balanced")], "trial_epochs": 2}
    em_callback = EMNoiseEstimation(
        warmup_epochs=1,
        e_step=args.e_step,
        hold_initial_rounds=1,
        **(starts if args.two_starts else {"starts": [EMStart()]}),  # type: ignore[arg-type]
    )
    callbacks: list[L.Callback] = [
        em_callback,
        ModelCheckpoint(dirpath=args.out / "checkpoints", every_n_train_steps=1, save_last=True, save_top_k=0),
    ]
    if args.kill_at:
        epoch, batch = map(int, args.kill_at.split(":"))
        callbacks.append(KillAt(epoch, batch))
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=4,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=args.out,
    )
    ckpt_path = args.out / "checkpoints" / "last.ckpt" if args.resume else None
    trainer.fit(model, datamodule, ckpt_path=ckpt_path)
    fit_metrics = {key: value.item() for key, value in trainer.callback_metrics.items()}
    test_accuracy = trainer.test(model, datamodule, verbose=False)[0]["test/acc"]
    torch.save(
        {
            "noisy_labels": datamodule.pool.given_labels,
            "val_indices": datamodule.pool.val_indices,
            "noise_matrix": model.noise_matrix.cpu(),
            "history": em_callback.noise_matrix_history,
            "rounds": em_callback.rounds,
            "trial_scores": em_callback.trial_scores,
            "kept_start": em_callback.kept_start,
            "posteriors": score_pool(model, datamodule.pool)[1],
            "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
            "weights": {key: value.cpu() for key, value in model.state_dict().items()},
            "optimizer": trainer.optimizers[0].state_dict(),
            "fit_metrics": fit_metrics,
            "test_acc": test_accuracy,
            "global_step": trainer.global_step,
        },
        args.out / "result.pt",
    )


if __name__ == "__main__":
    main()
