"""``NoisyLabelClassifier``: a LightningModule that trains any classifier network on noisy labels."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from noisy_lightning.augment import random_shift
from noisy_lightning.em import posterior
from noisy_lightning.models import MLP

Method = Literal["ce", "em"]
METHODS: tuple[str, ...] = ("ce", "em")


class NoisyLabelClassifier(L.LightningModule):
    """Train ``net`` on noisy labels with the chosen ``method``; evaluate against noisy and clean labels.

    Methods (the loss of ``training_step``):
        ``"ce"``: cross-entropy against the noisy labels (the baseline; with noise rate 0, the clean baseline).
        ``"em"``: Bekker & Goldberger's EM. Before EM starts it is ``"ce"``; afterwards the network trains on the
            posteriors of the true labels (the M-step for the weights), with theta kept up to date by the
            :class:`~noisy_lightning.callbacks.EMNoiseEstimation` callback (added automatically when the Trainer
            has none).
        More methods (forward correction, a noise adaptation layer) slot in as new :meth:`training_targets`
        / loss branches keyed by ``method``; the data, callback and metrics do not change.

    State used by EM:
        ``noise_matrix``: the ``K x K`` buffer ``theta``, ``theta[i, j] = P(noisy = j | true = i)``; identity until
            EM initialises it. It moves with the module's device and is saved in checkpoints.
        ``posteriors``: ``None`` or the ``N x K`` table of posteriors over the training pool, set by the callback.

    Logged per epoch: ``train/loss``, ``val/acc_noisy``, ``val/acc_clean``, ``val/nll_noisy`` (the noisy-label
    negative log-likelihood ``-log sum_i p(i | x) theta[i, z]``, usable for early stopping without clean labels)
    and ``test/acc``.

    Args:
        net: any ``nn.Module`` mapping a batch of flat images to ``num_classes`` logits; default
            ``MLP(784, [500, 300], 10)``.
        method: ``"ce"`` or ``"em"``.
        num_classes: number of classes ``K``.
        lr: learning rate (> 0).
        weight_decay: L2 penalty (decoupled for ``adamw``), >= 0.
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"`` (with Nesterov momentum 0.9).
        lr_scheduler: ``"none"`` or ``"cosine"`` (annealed to 0 over ``Trainer(max_epochs)``).
        augment_shift: random translation of each training image by up to this many pixels (0 = off).
        em_targets: which posteriors the weights train on once EM has started. ``"online"`` (default):
            ``c ∝ p(y | x; w) theta[:, z]`` recomputed in each training step from the current network and theta
            (detached), whose gradient is that of the noisy-label log-likelihood ``log sum_i p(i | x) theta[i, z]``;
            a wrong label can then pull the network by at most ``log(theta[z, z] / theta[y, z])``, which keeps it
            from memorising its own targets. ``"stored"``: the table ``c[index]`` from the last E-step, the
            paper's literal M-step; it memorises (theta drifts to the identity), see
            ``benchmarks/results/em_variants.md``.
        reseed_every_step: before each training batch, seed torch's RNG from ``(the seed at the start of the
            first fit, epoch, batch index, rank)``. Dropout and augmentation then depend on the step only, so a run
            resumed from any checkpoint, even one saved mid-epoch, draws the same random numbers as a run that was
            never interrupted (Lightning does not save RNG states in checkpoints). The base seed is saved in the
            checkpoint.
    """

    def __init__(
        self,
        net: nn.Module | None = None,
        method: Method = "ce",
        num_classes: int = 10,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: Literal["adam", "adamw", "sgd"] = "adam",
        lr_scheduler: Literal["none", "cosine"] = "none",
        augment_shift: int = 0,
        em_targets: Literal["stored", "online"] = "online",
        reseed_every_step: bool = True,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}; got {method!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        if optimizer not in ("adam", "adamw", "sgd"):
            raise ValueError(f"optimizer must be one of 'adam', 'adamw', 'sgd'; got {optimizer!r}")
        if lr_scheduler not in ("none", "cosine"):
            raise ValueError(f"lr_scheduler must be 'none' or 'cosine'; got {lr_scheduler!r}")
        if isinstance(augment_shift, bool) or not isinstance(augment_shift, int) or augment_shift < 0:
            raise ValueError(f"augment_shift must be an integer >= 0, got {augment_shift!r}")
        if em_targets not in ("stored", "online"):
            raise ValueError(f"em_targets must be 'stored' or 'online'; got {em_targets!r}")
        # The net is a module, saved in the state dict; keeping it out of hparams keeps hparams.yaml readable.
        self.save_hyperparameters(ignore=["net"])
        self.net = net if net is not None else MLP(num_classes=num_classes)
        self.method = method
        self.num_classes = num_classes
        self.register_buffer("noise_matrix", torch.eye(num_classes))
        self.posteriors: Tensor | None = None
        self.image_shape: tuple[int, int] | None = None
        self.step_seed_base: int | None = None

        def accuracy() -> MulticlassAccuracy:
            return MulticlassAccuracy(num_classes=num_classes, average="micro")

        self.val_acc_noisy = accuracy()
        self.val_acc_clean = accuracy()
        self.test_acc = accuracy()
        self.val_nll_noisy = MeanMetric()
        # The epoch's mean training loss, logged once per epoch: self.log on every step costs ~1 ms of Lightning
        # bookkeeping per step (10% of an MLP epoch on CPU). nan_strategy="disable" keeps update() free of host
        # syncs; persistent states go into checkpoints, so a run resumed mid-epoch logs the same mean.
        self.train_loss = MeanMetric(nan_strategy="disable")
        self.train_loss.persistent(True)

    # ---- set-up ------------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_classes = getattr(datamodule, "num_classes", None)
        if data_classes is not None and data_classes != self.num_classes:
            raise ValueError(
                f"num_classes={self.num_classes} does not match the data, which has {data_classes} classes"
            )
        if datamodule is not None and hasattr(datamodule, "image_shape") and getattr(datamodule, "is_set_up", False):
            self.image_shape = datamodule.image_shape

    def configure_callbacks(self) -> list[L.Callback]:
        from noisy_lightning.callbacks import EMNoiseEstimation

        has_em = any(isinstance(callback, EMNoiseEstimation) for callback in self.trainer.callbacks)
        return [EMNoiseEstimation()] if self.method == "em" and not has_em else []

    # ---- reproducible randomness -------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        if self.step_seed_base is None:
            self.step_seed_base = torch.initial_seed()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            # Here rather than in on_train_epoch_start, which Lightning skips for the epoch after a checkpoint
            # saved at an epoch's last step; a run resumed mid-epoch starts at batch_idx > 0 and keeps its sums.
            self.train_loss.reset()
        if self.hparams.reseed_every_step:
            base = self.step_seed_base if self.step_seed_base is not None else torch.initial_seed()
            # hash() of a tuple of ints is deterministic across processes (no PYTHONHASHSEED salt for ints).
            seed = hash((base, self.current_epoch, batch_idx, self.global_rank)) & 0x7FFF_FFFF_FFFF_FFFF
            # Not torch.manual_seed: before CUDA is initialised it formats a stack trace per call (~1 ms a step).
            torch.default_generator.manual_seed(seed)
            if self.device.type == "cuda":
                torch.cuda.default_generators[self.device.index or 0].manual_seed(seed)
            elif self.device.type != "cpu":
                torch.manual_seed(seed)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["step_seed_base"] = self.step_seed_base

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.step_seed_base = checkpoint.get("step_seed_base")
        # Checkpoints written before the loss accumulator was saved: start it empty rather than fail strict loading.
        state = checkpoint.get("state_dict", {})
        for name, value in self.train_loss.state_dict(prefix="train_loss.").items():
            state.setdefault(name, torch.zeros_like(value))

    # ---- training ----------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def _augment(self, x: Tensor) -> Tensor:
        if self.hparams.augment_shift == 0:
            return x
        if self.image_shape is None:
            side = math.isqrt(x.shape[1])
            if side * side != x.shape[1]:
                raise ValueError(f"augment_shift needs square images; got {x.shape[1]} features per sample")
            self.image_shape = (side, side)
        return random_shift(x, self.hparams.augment_shift, self.image_shape)

    def training_targets(self, logits: Tensor, noisy_labels: Tensor, index: Tensor) -> Tensor:
        """Hard noisy labels, or the EM posteriors once EM has started (stored ``c[index]``, or online)."""
        if self.method != "em" or self.posteriors is None:
            return noisy_labels
        if self.hparams.em_targets == "online":
            return posterior(F.log_softmax(logits.detach().float(), dim=1), self.noise_matrix, noisy_labels)
        return self.posteriors[index]

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        x, noisy_labels, index = batch
        logits = self.net(self._augment(x))
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"net returned logits of shape {tuple(logits.shape)}; expected [batch, {self.num_classes}]"
            )
        # cross_entropy takes class indices or class probabilities alike (soft targets after EM starts).
        loss = F.cross_entropy(logits, self.training_targets(logits, noisy_labels, index))
        self.train_loss.update(loss.detach(), weight=x.shape[0])
        # The EM callback can collect these for an E-step from the training pass itself.
        return {"loss": loss, "logits": logits.detach()}

    def on_train_epoch_end(self) -> None:
        # MeanMetric.compute() all-reduces its sums across ranks, so every rank logs the global mean.
        self.log("train/loss", self.train_loss.compute(), on_step=False, on_epoch=True)

    # ---- evaluation --------------------------------------------------------------------------------------------
    def noisy_label_nll(self, logits: Tensor, noisy_labels: Tensor) -> Tensor:
        """Per-sample ``-log p(z | x) = -log sum_i p(i | x) theta[i, z]`` under the current ``noise_matrix``."""
        log_probs = F.log_softmax(logits.float(), dim=1)
        log_theta = self.noise_matrix.clamp_min(1e-12).log()
        return -(log_probs + log_theta.t()[noisy_labels]).logsumexp(dim=1)

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        x, noisy_labels, *rest = batch
        logits = self.net(x)
        predictions = logits.argmax(dim=1)
        self.val_acc_noisy.update(predictions, noisy_labels)
        self.val_nll_noisy.update(self.noisy_label_nll(logits, noisy_labels))
        self.log("val/acc_noisy", self.val_acc_noisy, on_step=False, on_epoch=True)
        self.log("val/nll_noisy", self.val_nll_noisy, on_step=False, on_epoch=True)
        if rest:
            self.val_acc_clean.update(predictions, rest[0])
            self.log("val/acc_clean", self.val_acc_clean, on_step=False, on_epoch=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, labels = batch
        self.test_acc.update(self.net(x).argmax(dim=1), labels)
        self.log("test/acc", self.test_acc, on_step=False, on_epoch=True)

    def predict_step(self, batch: tuple[Tensor, ...], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Class probabilities ``p(y | x)`` for each input of the batch."""
        return torch.softmax(self.net(batch[0]).float(), dim=1)

    # ---- optimisation ------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        hparams = self.hparams
        if hparams.optimizer == "sgd":
            optimizer = torch.optim.SGD(
                self.parameters(), lr=hparams.lr, momentum=0.9, nesterov=True, weight_decay=hparams.weight_decay
            )
        else:
            optimizer_class = torch.optim.AdamW if hparams.optimizer == "adamw" else torch.optim.Adam
            optimizer = optimizer_class(self.parameters(), lr=hparams.lr, weight_decay=hparams.weight_decay)
        if hparams.lr_scheduler == "none":
            return optimizer
        max_epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
