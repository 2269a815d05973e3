"""``CoTeachingClassifier``: Han et al.'s co-teaching (NeurIPS 2018) as a LightningModule."""

from __future__ import annotations

import copy
from typing import Literal

import lightning as L
import torch
from torch import Tensor, nn

from noisy_lightning import peers
from noisy_lightning.checks import check_float, check_int
from noisy_lightning.contract import NoisyLabelData, TrainBatch
from noisy_lightning.models import build_net
from noisy_lightning.module import NoisyLabelClassifier


def fresh_copy(net: nn.Module) -> nn.Module:
    """A copy of ``net`` with every layer that can re-initialise itself re-initialised (a second, independent
    network of the same architecture, drawn from the current RNG)."""
    twin = copy.deepcopy(net)
    for module in twin.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
    return twin


class CoTeachingClassifier(NoisyLabelClassifier):
    """Co-teaching: two networks of the same architecture teach each other with their small-loss samples.

    In each training step both networks score the batch with the cross-entropy on the given labels; each keeps the
    ``1 - R(e)`` fraction with the smallest loss, and the *other* network is updated on the samples it kept
    (:func:`noisy_lightning.peers.coteaching_losses`). ``R(e) = forget_rate * min(e / num_gradual, 1)`` in epoch
    ``e`` (the paper's schedule with ``T_k = 10``, ``c = 1``). Validation, test, prediction, figures and label
    issues use the first network.

    ``forget_rate=None`` (the default) estimates it, since real data does not come with its noise rate: at the end
    of the first epoch :class:`~noisy_lightning.callbacks.NoiseMatrixEstimation` sets ``theta`` from anchor points
    (added when the Trainer has none), and the forget rate is the share of wrong labels that ``theta`` and the
    given-label frequencies imply (:func:`noisy_lightning.peers.noise_rate_of`). The paper sets it to the known
    noise rate; pass that number to do the same.

    Both networks train with one optimiser over both parameter sets; the losses do not share parameters, so this
    is the same as the paper's two optimisers for Adam and SGD. A fit costs about twice a cross-entropy fit.

    Args:
        net: the first network; the second is a re-initialised copy. Default ``MLP(num_classes=num_classes)``.
        forget_rate: the final share of each batch dropped, in ``[0, 1)``; ``None`` estimates it.
        num_gradual: epochs over which the forget rate grows linearly to its final value (>= 1).
        Other arguments: as :class:`~noisy_lightning.NoisyLabelClassifier` (``method`` is ``"ce"``).
    """

    def __init__(
        self,
        net: nn.Module | None = None,
        num_classes: int = 10,
        forget_rate: float | None = None,
        num_gradual: int = 10,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: Literal["adam", "adamw", "sgd"] = "adam",
        lr_scheduler: Literal["none", "cosine"] = "cosine",
        augment_shift: int = 2,
        reseed_every_step: bool = True,
    ) -> None:
        if forget_rate is not None:
            check_float("forget_rate", forget_rate, 0, 1, open_maximum=True)
        check_int("num_gradual", num_gradual, 1)
        if isinstance(net, dict):
            net = build_net(net)
        super().__init__(
            net=net,
            method="ce",
            num_classes=num_classes,
            lr=lr,
            weight_decay=weight_decay,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            augment_shift=augment_shift,
            reseed_every_step=reseed_every_step,
        )
        self.peer_net = fresh_copy(self.net)
        self.given_label_frequencies: Tensor | None = None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if isinstance(datamodule, NoisyLabelData) and getattr(datamodule, "is_set_up", True):
            pool = datamodule.pool
            given = pool.given_labels[pool.train_indices]
            self.given_label_frequencies = torch.bincount(given, minlength=self.num_classes).double()

    def configure_callbacks(self) -> list[L.Callback]:
        if self.hparams.forget_rate is not None:
            return []
        from noisy_lightning.callbacks import NoiseMatrixEstimation

        if any(isinstance(callback, NoiseMatrixEstimation) for callback in self.trainer.callbacks):
            return []
        return [NoiseMatrixEstimation(estimator="anchor", warmup_epochs=1)]

    def final_forget_rate(self) -> float:
        """The forget rate that the schedule ramps up to: given, or estimated from ``theta`` (0 before that)."""
        if self.hparams.forget_rate is not None:
            return self.hparams.forget_rate
        if not self.noise_layer.is_started or self.given_label_frequencies is None:
            return 0.0
        return peers.noise_rate_of(self.noise_layer.noise_matrix.cpu(), self.given_label_frequencies)

    def current_forget_rate(self) -> float:
        """``R(e)`` of the current epoch."""
        return peers.coteaching_forget_rate(self.current_epoch, self.final_forget_rate(), self.hparams.num_gradual)

    def training_step(self, batch: TrainBatch, batch_idx: int) -> dict[str, Tensor]:
        x, label, _ = batch
        x = self.augment(x)
        logits = self.net(x)
        if batch_idx == 0:
            self._check_logits(logits, x.shape[0])
        peer_logits = self.peer_net(x)
        # Over several processes the small-loss samples are chosen from the global batch, as one process would.
        gather = self.all_gather if self.trainer.world_size > 1 else None
        loss_first, loss_second = peers.coteaching_losses(
            logits, peer_logits, label, self.current_forget_rate(), gather
        )
        loss = loss_first + loss_second
        self.train_loss.update(loss.detach(), weight=x.shape[0])
        return {"loss": loss, "logits": logits.detach()}

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        self.log("coteaching/forget_rate", self.current_forget_rate(), on_step=False, on_epoch=True, sync_dist=True)
