"""``NoisyLabelClassifier``: a LightningModule that trains any classifier network on noisy labels."""

from __future__ import annotations

import math
import os
import zlib
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from noisy_lightning.augment import random_shift
from noisy_lightning.checks import check_bool, check_choice, check_float, check_int
from noisy_lightning.contract import EvalBatch, NoisyLabelData, PredictBatch, TestBatch, TrainBatch
from noisy_lightning.models import MLP, build_net, net_spec
from noisy_lightning.noise_layer import METHODS, EMTargets, layer_class, make_noise_layer

Method = Literal["ce", "em", "forward", "backward", "nal", "nal_complex", "gce"]
OPTIMIZERS = ("adam", "adamw", "sgd")


def reseed_for_step(base_seed: int, epoch: int, batch_idx: int, rank: int, device: torch.device) -> None:
    """Seed torch's RNG from ``(base_seed, epoch, batch_idx, rank)``, so that a step draws the same dropout masks and
    shifts whether or not the run was interrupted and resumed (Lightning does not checkpoint RNG states)."""
    # hash() of a tuple of ints is deterministic across processes (no PYTHONHASHSEED salt for ints).
    seed = hash((base_seed, epoch, batch_idx, rank)) & 0x7FFF_FFFF_FFFF_FFFF
    # Not torch.manual_seed: before CUDA is initialised it formats a stack trace per call (~1 ms a step).
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.default_generators[device.index or 0].manual_seed(seed)
    elif device.type != "cpu":
        torch.manual_seed(seed)


def check_checkpoint_file(path: str | os.PathLike[str]) -> None:
    """Raise ``ValueError`` naming ``path`` when it cannot be a PyTorch checkpoint: missing, empty, or not the zip
    archive that ``torch.save`` writes (``torch.load`` would fail with an ``EOFError`` with no message, or a
    misleading ``weights_only`` error)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    with path.open("rb") as handle:
        head = handle.read(4)
    if not head:
        raise ValueError(f"checkpoint {path} is empty (0 bytes): it was not written completely")
    if head != b"PK\x03\x04":
        raise ValueError(f"checkpoint {path} is not a PyTorch checkpoint (torch.save writes a zip archive)")


def state_checksum(state_dict: dict[str, Any], prefix: str) -> int:
    """CRC32 over the bytes of the tensors in ``state_dict`` whose names start with ``prefix``."""
    checksum = 0
    for name in sorted(key for key in state_dict if key.startswith(prefix)):
        tensor = state_dict[name].detach().cpu().contiguous()
        checksum = zlib.crc32(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"", checksum)
    return checksum


def image_shape_of(x: Tensor) -> tuple[int, ...] | None:
    """``(C, H, W)`` of a batch ``[B, C, H, W]`` or ``[B, H, W]``, ``(1, s, s)`` of flat square images
    ``[B, s * s]``, else ``None``."""
    if x.ndim == 4:
        return tuple(x.shape[1:])
    if x.ndim == 3:
        return (1, *x.shape[1:])
    side = math.isqrt(x.shape[1]) if x.ndim == 2 else 0
    return (1, side, side) if side > 1 and side * side == x.shape[1] else None


def feature_layer_name(net: nn.Module, num_classes: int) -> str:
    """The name of ``net``'s last ``nn.Linear`` (in registration order), whose input is the hidden features ``h(x)``
    of the complex noise adaptation layer; it must output the ``num_classes`` logits."""
    linear = [(name, module) for name, module in net.named_modules() if isinstance(module, nn.Linear)]
    if linear and linear[-1][1].in_features == 0:  # an nn.LazyLinear, whose width is known only after a call
        raise ValueError(
            f"method='nal_complex' needs the width of h(x), the input of the net's last nn.Linear "
            f"({linear[-1][0]!r}), but it is an nn.LazyLinear that has not run yet: run one batch through the net "
            "first, or give it a sized nn.Linear"
        )
    if not linear or linear[-1][1].out_features != num_classes:
        found = f"its last nn.Linear has {linear[-1][1].out_features} outputs" if linear else "it has no nn.Linear"
        raise ValueError(
            f"method='nal_complex' reads the hidden features at the input of the net's last nn.Linear layer, which "
            f"must output the num_classes={num_classes} logits; {found}"
        )
    return linear[-1][0]


class NoisyLabelClassifier(L.LightningModule):
    """Train ``net`` on noisy labels with the chosen ``method``; evaluate against noisy and clean labels.

    The model is ``net`` (any ``nn.Module`` from inputs to ``num_classes`` logits) followed by a noise layer
    (:mod:`noisy_lightning.noise_layer`) that owns the noise matrix ``theta`` and gives the training loss:

    - ``"ce"``: cross-entropy against the given labels (the baseline);
    - ``"em"``: Bekker & Goldberger's EM: cross-entropy until the
      :class:`~noisy_lightning.callbacks.EMNoiseEstimation` callback (added when the Trainer has none) sets
      ``theta``, then training on the posteriors of the true labels;
    - ``"forward"`` / ``"backward"``: Patrini et al.'s loss corrections, with ``theta`` set once by
      :class:`~noisy_lightning.callbacks.NoiseMatrixEstimation` (added when the Trainer has none: anchor points
      after a 6-epoch warm-up);
    - ``"nal"``: the noise adaptation layer (a learned ``theta``, initialised from the confusion matrix by
      ``NoiseMatrixEstimation``);
    - ``"nal_complex"``: its complex model, a noise matrix that depends on the sample through the input of the
      net's last ``nn.Linear`` layer (the last hidden layer of an ``MLP``), initialised the same way;
    - ``"gce"``: the generalised cross-entropy ``(1 - p(z | x)^q) / q``.

    Co-teaching, which trains two networks, is :class:`~noisy_lightning.coteaching.CoTeachingClassifier`.

    The defaults are the recipe of the results table: ``MLP(784, [500, 300], 10)`` with dropout 0.5, Adam at 1e-3
    with a cosine schedule, and 2-pixel random shifts. The paper's plain recipe is
    ``net=MLP(dropout=0.0), lr_scheduler="none", augment_shift=0, em_targets="stored"``.

    Logged per epoch: ``train/loss``, ``val/acc_noisy``, ``val/nll_noisy`` (the given-label negative
    log-likelihood under ``theta``, usable for early stopping without clean labels), ``val/acc_clean`` when the
    data knows the clean labels, and ``test/acc``.

    Args:
        net: the network; default ``MLP(num_classes=num_classes)``. A net built by this library (``MLP``,
            ``CNN``) is saved in the hyperparameters, so ``load_from_checkpoint(path)`` rebuilds it.
        method: one of ``"ce"``, ``"em"``, ``"forward"``, ``"backward"``, ``"nal"``, ``"nal_complex"``, ``"gce"``.
        num_classes: number of classes ``K`` (>= 2).
        lr: learning rate (> 0).
        weight_decay: L2 penalty (decoupled for ``adamw``), >= 0.
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"`` (with Nesterov momentum 0.9).
        lr_scheduler: ``"cosine"`` (annealed to 0 over ``Trainer(max_epochs)``) or ``"none"``.
        augment_shift: random translation of each training image by up to this many pixels (0 = off); needs data
            that knows its image shape.
        em_targets: ``"online"`` or ``"stored"`` posteriors for ``"em"``
            (:class:`~noisy_lightning.noise_layer.EMLayer`).
        gce_q: the exponent ``q`` in ``(0, 1]`` of ``method="gce"`` (0.7, the paper's).
        reseed_every_step: seed the RNG from ``(the seed at the start of the first fit, epoch, batch, rank)`` before
            each training step, so a resumed run draws the same random numbers as an uninterrupted one.
    """

    def __init__(
        self,
        net: nn.Module | None = None,
        method: Method = "ce",
        num_classes: int = 10,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: Literal["adam", "adamw", "sgd"] = "adam",
        lr_scheduler: Literal["none", "cosine"] = "cosine",
        augment_shift: int = 2,
        em_targets: EMTargets = "online",
        gce_q: float = 0.7,
        reseed_every_step: bool = True,
    ) -> None:
        super().__init__()
        check_choice("method", method, METHODS)
        check_int("num_classes", num_classes, 2)
        check_float("lr", lr, 0, open_minimum=True)
        check_float("weight_decay", weight_decay, 0)
        check_choice("optimizer", optimizer, OPTIMIZERS)
        check_choice("lr_scheduler", lr_scheduler, ("none", "cosine"))
        check_int("augment_shift", augment_shift, 0)
        check_bool("reseed_every_step", reseed_every_step)
        if isinstance(net, dict):  # the description saved in a checkpoint's hyperparameters
            net = build_net(net)
        if net is not None and not isinstance(net, nn.Module):
            raise ValueError(f"net must be an nn.Module, got {type(net).__name__}")
        self.net = net if net is not None else MLP(num_classes=num_classes)
        self.save_hyperparameters(ignore=["net"])
        # LightningCLI saves the net as its class_path/init_args; otherwise record the net's own description.
        given = _given_hyperparameters.get()
        if not (given and isinstance(given.get("net"), dict)):
            self.hparams["net"] = net_spec(self.net)
        self.method = method
        self.num_classes = num_classes
        # The complex noise adaptation layer reads h(x), the input of the net's last nn.Linear; by name, so that
        # copies and pickles of the model find it in their own net.
        needs_features = layer_class(method).needs_features
        self.feature_layer_name = feature_layer_name(self.net, num_classes) if needs_features else None
        feature_size = self.net.get_submodule(self.feature_layer_name).in_features if self.feature_layer_name else None
        self.noise_layer = make_noise_layer(method, num_classes, em_targets, gce_q, feature_size)
        self.image_shape: tuple[int, ...] | None = None
        self.image_shape_from_data = False  # True once the data said what its samples are (images or features)
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

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> NoisyLabelClassifier:  # type: ignore[override]
        """Lightning's ``load_from_checkpoint``, after checking that the file is a checkpoint at all. With no other
        arguments it rebuilds the network (saved as ``class_path``/``init_args``), theta and the EM state."""
        if isinstance(checkpoint_path, (str, os.PathLike)) and "://" not in str(checkpoint_path):
            check_checkpoint_file(checkpoint_path)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    @property
    def noise_matrix(self) -> Tensor:
        """``theta``, ``theta[i, j] = P(given = j | true = i)``: the identity until a method sets it."""
        return self.noise_layer.noise_matrix

    # ---- set-up ------------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        data_classes = getattr(datamodule, "num_classes", None)
        if data_classes is not None and data_classes != self.num_classes:
            raise ValueError(
                f"num_classes={self.num_classes} does not match the data, which has {data_classes} classes"
            )
        if isinstance(datamodule, NoisyLabelData) and getattr(datamodule, "is_set_up", True):
            self.image_shape = datamodule.pool.image_shape
            self.image_shape_from_data = True
            self._check_output_width(datamodule.pool.images[:2])
        if self.hparams.augment_shift > 0 and stage == "fit" and datamodule is not None and self.image_shape is None:
            rank_zero_warn(
                f"augment_shift={self.hparams.augment_shift} is off for this data: its samples are flat features, "
                "not images. Pass image-shaped tensors ([N, H, W] or [N, C, H, W]) to shift them."
            )

    def _check_output_width(self, sample: Tensor) -> None:
        """Run two samples through the net once, so that a wrong input or output shape is named before training."""
        try:
            self.logits_of(sample)
        except RuntimeError as error:  # from inside torch: a layer that does not fit the input
            raise ValueError(
                f"the net cannot take this data's samples of shape {tuple(sample.shape[1:])}: {error}"
            ) from error

    def net_outputs(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """The net's logits for the batch ``x`` and, when the noise layer
        :attr:`~noisy_lightning.noise_layer.NoiseLayer.needs_features`, the hidden features ``h(x)`` at the input of
        the net's last ``nn.Linear`` (else ``None``)."""
        if not self.noise_layer.needs_features:
            return self.net(x), None
        captured: list[Tensor] = []
        # A hook for this one call: a persistent one would be copied along with the net and fire into this model.
        handle = self.net.get_submodule(self.feature_layer_name).register_forward_pre_hook(
            lambda module, args, kwargs: captured.append(args[0] if args else next(iter(kwargs.values()), None)),
            with_kwargs=True,
        )
        try:
            logits = self.net(x)
        finally:
            handle.remove()
        if len(captured) != 1 or not isinstance(captured[0], Tensor) or captured[0].shape[0] != logits.shape[0]:
            raise ValueError(
                f"method='nal_complex' reads h(x) at the input of the net's layer {self.feature_layer_name!r} (its "
                "last nn.Linear), which must run once per forward pass, on the whole batch, and give the logits; it "
                f"ran {len(captured)} time(s) in this one"
            )
        return logits, captured[0].reshape(captured[0].shape[0], -1)

    @torch.no_grad()
    def logits_of(self, inputs: Tensor, batch_size: int = 4096) -> Tensor:
        """The net's logits for ``inputs`` (any number of samples), in eval mode, as float32 on the CPU.

        Inputs are moved to the device and dtype of the net's weights (so a ``bf16-true`` or ``64-true`` model takes
        float32 data); the module's train/eval mode is restored afterwards.
        """
        return self.outputs_of(inputs, batch_size)[0]

    @torch.no_grad()
    def outputs_of(self, inputs: Tensor, batch_size: int = 4096) -> tuple[Tensor, Tensor | None]:
        """:meth:`logits_of`, with the hidden features of :meth:`net_outputs` (float32, CPU) or ``None``."""
        parameter = next(self.net.parameters(), None)
        dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else inputs.dtype
        # The weights' device, not self.device: in the setup hook Lightning already reports the accelerator while
        # the weights are still on the CPU.
        device = parameter.device if parameter is not None else self.device
        was_training = self.training
        self.eval()
        chunks, feature_chunks = [], []
        try:
            for chunk in inputs.split(batch_size):
                logits, features = self.net_outputs(chunk.to(device, dtype))
                self._check_logits(logits, chunk.shape[0])
                chunks.append(logits.float().cpu())
                if features is not None:
                    feature_chunks.append(features.float().cpu())
        finally:
            self.train(was_training)
        return torch.cat(chunks), torch.cat(feature_chunks) if feature_chunks else None

    def _check_logits(self, logits: Any, batch: int) -> None:
        if not isinstance(logits, Tensor) or logits.shape != (batch, self.num_classes):
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(
                f"net returned logits of shape {shape}; expected [batch, num_classes] = [{batch}, {self.num_classes}]"
            )

    def configure_callbacks(self) -> list[L.Callback]:
        """The callback that sets ``theta`` for this method, unless the Trainer has one of its kind already."""
        from noisy_lightning.callbacks import EMNoiseEstimation, NoiseMatrixEstimation

        if self.noise_layer.estimated_by_em:
            wanted: type[L.Callback] = EMNoiseEstimation
        elif self.noise_layer.noise_matrix_estimator is not None:
            wanted = NoiseMatrixEstimation
        else:
            return []
        present = any(isinstance(callback, wanted) for callback in self.trainer.callbacks)
        return [] if present else [wanted()]

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
            reseed_for_step(base, self.current_epoch, batch_idx, self.global_rank, self.device)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Right after the step, so that any checkpoint holds the learned theta of a noise adaptation layer.
        self.noise_layer.refresh()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["step_seed_base"] = self.step_seed_base
        checkpoint["noise_layer_checksum"] = state_checksum(checkpoint["state_dict"], "noise_layer.")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.step_seed_base = checkpoint.get("step_seed_base")
        # torch.load does not check the zip's CRCs: a flipped byte in theta would load silently.
        saved = checkpoint.get("noise_layer_checksum")
        if saved is not None and saved != state_checksum(checkpoint["state_dict"], "noise_layer."):
            raise ValueError(
                "the checkpoint's noise matrix or posterior table does not match its checksum: the file is corrupt"
            )

    # ---- training ----------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: TrainBatch, batch_idx: int) -> dict[str, Tensor]:
        x, label, index = batch
        x = self.augment(x)
        logits, features = self.net_outputs(x)
        if batch_idx == 0:
            self._check_logits(logits, x.shape[0])
        loss = self.noise_layer.loss(logits, label, index, features)
        self.train_loss.update(loss.detach(), weight=x.shape[0])
        # The EM callback's train_pass E-step reads the logits of the step.
        return {"loss": loss, "logits": logits.detach()}

    def augment(self, x: Tensor) -> Tensor:
        """``x`` shifted at random by up to ``augment_shift`` pixels, when its samples are images.

        Data that implements :class:`~noisy_lightning.contract.NoisyLabelData` says whether they are; for other
        data, ``[B, H, W]``, ``[B, C, H, W]`` and flat square samples are taken as images.
        """
        if self.hparams.augment_shift == 0:
            return x
        if self.image_shape is None and not self.image_shape_from_data:
            self.image_shape = image_shape_of(x)
        return x if self.image_shape is None else random_shift(x, self.hparams.augment_shift, self.image_shape)

    def on_train_epoch_end(self) -> None:
        # MeanMetric.compute() all-reduces its sums across ranks, so every rank logs the global mean.
        mean_loss = self.train_loss.compute()
        # One divergence check for every method, once an epoch (a per-step check would sync the GPU every step).
        if not torch.isfinite(mean_loss):
            raise FloatingPointError(
                f"the training loss of epoch {self.current_epoch} is {mean_loss.item()}: the network has diverged. "
                "Lower the learning rate or use gradient clipping (Trainer(gradient_clip_val=...))."
            )
        self.log("train/loss", mean_loss, on_step=False, on_epoch=True)
        self._end_restart()

    def on_train_start(self) -> None:
        fit_loop = self.trainer.fit_loop
        progress = fit_loop.epoch_progress.current
        if progress.completed == progress.started:  # resumed after an epoch's last step: that epoch is complete
            fit_loop.reset_restart_stage()

    def _end_restart(self) -> None:
        # Lightning keeps the fit loop's "restarted mid-epoch" stage for the whole of a resumed fit, so every later
        # epoch skips its epoch-start bookkeeping, and a checkpoint saved in one of them resumes at its batch 0
        # (two kills in a row replayed an epoch). The restart is over once the restarted epoch has ended (and, in
        # on_train_start, when the checkpoint's epoch had already ended).
        fit_loop = self.trainer.fit_loop
        fit_loop.reset_restart_stage()
        fit_loop.epoch_loop.reset_restart_stage()

    # ---- evaluation --------------------------------------------------------------------------------------------
    def validation_step(self, batch: EvalBatch, batch_idx: int) -> None:
        logits, features = self.net_outputs(batch.x)
        self._check_logits(logits, batch.x.shape[0])
        predictions = logits.argmax(dim=1)
        self.val_acc_noisy.update(predictions, batch.label)
        self.val_nll_noisy.update(self.noise_layer.noisy_label_nll(logits, batch.label, features))
        self.log("val/acc_noisy", self.val_acc_noisy, on_step=False, on_epoch=True)
        self.log("val/nll_noisy", self.val_nll_noisy, on_step=False, on_epoch=True)
        if batch.clean_label is not None:
            self.val_acc_clean.update(predictions, batch.clean_label)
            self.log("val/acc_clean", self.val_acc_clean, on_step=False, on_epoch=True)

    def test_step(self, batch: TestBatch, batch_idx: int) -> None:
        logits = self.net(batch.x)
        self._check_logits(logits, batch.x.shape[0])
        self.test_acc.update(logits.argmax(dim=1), batch.label)
        self.log("test/acc", self.test_acc, on_step=False, on_epoch=True)

    def predict_step(self, batch: PredictBatch, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
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
