"""``CoTeachingClassifier``: Han et al.'s co-teaching (NeurIPS 2018) as a LightningModule."""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from noisy_lightning import peers
from noisy_lightning.checks import check_float, check_int
from noisy_lightning.contract import NoisyLabelData, TrainBatch
from noisy_lightning.models import build_net
from noisy_lightning.module import NoisyLabelClassifier
from noisy_lightning.noise_layer import CrossEntropyLayer


def fresh_copy(net: nn.Module) -> nn.Module:
    """A copy of ``net`` with every layer that can re-initialise itself re-initialised (a second, independent
    network of the same architecture, drawn from the current RNG)."""
    twin = copy.deepcopy(net)
    unchanged = []
    for (name, original), copied in zip(net.named_modules(), twin.modules(), strict=True):
        reset = getattr(copied, "reset_parameters", None)
        if callable(reset):
            reset()  # a layer with a fixed initialisation (batch norm's ones and zeros) rightly stays the same
            continue
        unchanged += [
            f"{name}.{parameter}" if name else parameter
            for (parameter, first), (_, second) in zip(
                original.named_parameters(recurse=False), copied.named_parameters(recurse=False), strict=True
            )
            if first.numel() > 1 and torch.equal(first, second)
        ]
    if unchanged:
        rank_zero_warn(
            f"co-teaching's second network starts with the same {', '.join(unchanged)} as the first: their modules "
            "have no reset_parameters(). Initialise them in reset_parameters() so that the two networks differ."
        )
    return twin


class ForgetRateLayer(CrossEntropyLayer):
    """Co-teaching's noise layer when the forget rate is estimated: cross-entropy, with a ``theta`` set once from
    anchor points by :class:`~noisy_lightning.callbacks.NoiseMatrixEstimation` (it sets the forget rate only)."""

    noise_matrix_estimator: ClassVar[str | None] = "anchor"


class CoTeachingClassifier(NoisyLabelClassifier):
    """Co-teaching: two networks of the same architecture teach each other with their small-loss samples.

    In each training step both networks score the batch with the cross-entropy on the given labels; each drops the
    share ``R(e)`` with the largest loss, and the *other* network is updated on the samples it kept
    (:func:`noisy_lightning.peers.coteaching_losses`). ``R(e)`` ramps linearly from 0 in the first epoch to
    ``forget_rate`` in epoch ``num_gradual`` and stays there (the paper's schedule with ``T_k = 10``, ``c = 1``;
    :func:`noisy_lightning.peers.coteaching_forget_rate`). Validation, test, prediction, figures and label issues use
    the first network. Logged each epoch: ``coteaching/forget_rate``, besides the metrics of the base class.

    ``forget_rate=None`` (the default) estimates it, since real data does not come with its noise rate: at the end
    of the first epoch :class:`~noisy_lightning.callbacks.NoiseMatrixEstimation` sets ``theta`` from anchor points
    (added when the Trainer has none; a Trainer's own is used with its ``warmup_epochs``), and the forget rate is
    the share of wrong labels that ``theta`` and the given-label frequencies imply
    (:func:`noisy_lightning.peers.noise_rate_of`). That ``theta`` also gives ``val/nll_noisy`` and the posteriors of
    the label issues. The paper sets the rate to the known noise rate; pass that number to do the same (``theta``
    then stays the identity).

    Both networks train with one optimiser over both parameter sets; the losses do not share parameters, so this
    is the same as the paper's two optimisers for Adam and SGD (but not with a norm-based ``gradient_clip_val``,
    which then clips the two networks' gradients together). A fit costs about twice a cross-entropy fit.

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
        if forget_rate is None:
            self.noise_layer = ForgetRateLayer(num_classes)
        self.given_label_frequencies: Tensor | None = None
        self._forget_rate: float | None = None  # final_forget_rate(), computed once an epoch

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if isinstance(datamodule, NoisyLabelData) and getattr(datamodule, "is_set_up", True):
            pool = datamodule.pool
            given = pool.given_labels[pool.train_indices]
            self.given_label_frequencies = torch.bincount(given, minlength=self.num_classes).double()

    def configure_callbacks(self) -> list[L.Callback]:
        """``NoiseMatrixEstimation(warmup_epochs=1)`` when the forget rate is estimated and the Trainer has none (a
        Trainer's own, e.g. from a config, is used as it is)."""
        if self.hparams.forget_rate is not None:
            return []
        from noisy_lightning.callbacks import NoiseMatrixEstimation

        if any(isinstance(callback, NoiseMatrixEstimation) for callback in self.trainer.callbacks):
            return []
        return [NoiseMatrixEstimation(warmup_epochs=1)]

    def final_forget_rate(self) -> float:
        """The forget rate that the schedule ramps up to: given, or estimated from ``theta`` (0 before that)."""
        if self.hparams.forget_rate is not None:
            return self.hparams.forget_rate
        if not self.noise_layer.is_started or self.given_label_frequencies is None:
            return 0.0
        return peers.noise_rate_of(self.noise_layer.noise_matrix.cpu(), self.given_label_frequencies)

    def current_forget_rate(self) -> float:
        """The share of each batch dropped in this epoch (:func:`~noisy_lightning.peers.coteaching_forget_rate`)."""
        final = self._forget_rate if self._forget_rate is not None else self.final_forget_rate()
        return peers.coteaching_forget_rate(self.current_epoch, final, self.hparams.num_gradual)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        if batch_idx == 0 or self._forget_rate is None:  # theta changes only between epochs: one host sync an epoch
            self._forget_rate = self.final_forget_rate()

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
