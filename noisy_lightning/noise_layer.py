"""Noise layers: the ``nn.Module`` inside :class:`~noisy_lightning.NoisyLabelClassifier` that owns ``theta``.

A noise layer holds the ``K x K`` noise matrix ``theta[i, j] = P(given = j | true = i)`` and everything computed
from it: the posterior of the true label, the likelihood of the given label, and the training loss of its method.
The classifier asks it for the loss; a callback (EM) or the user updates ``theta`` through :meth:`update`.

Methods, keyed by :data:`METHODS`:

- ``"ce"`` (:class:`CrossEntropyLayer`): cross-entropy on the given labels; ``theta`` stays the identity.
- ``"em"`` (:class:`EMLayer`): Bekker & Goldberger's EM. Cross-entropy until ``theta`` is first set, then the
  network trains on the posteriors ``c[t, i] ∝ p(y = i | x_t) theta[i, z_t]``.

``theta`` and the layer's state are buffers: they move with the module, are saved in checkpoints, and stay
float32 whatever precision the Trainer runs the network in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from noisy_lightning import em
from noisy_lightning.checks import check_choice
from noisy_lightning.noise import check_transition_matrix

EMTargets = Literal["online", "stored"]


class NoiseLayer(nn.Module):
    """Base class: owns ``noise_matrix`` (``theta``) and a ``started`` flag; the loss is plain cross-entropy.

    Subclasses override :meth:`loss`. Set :attr:`estimated_by_em` to ``True`` for a layer whose ``theta`` the
    :class:`~noisy_lightning.callbacks.EMNoiseEstimation` callback should estimate.
    """

    estimated_by_em: ClassVar[bool] = False

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("noise_matrix", torch.eye(num_classes))
        self.register_buffer("started", torch.tensor(False))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        saved = state_dict.get(prefix + "noise_matrix")
        if saved is not None:  # a NaN or non-stochastic theta would surface later as a misleading divergence
            check_transition_matrix(saved, self.num_classes, "the checkpoint's noise_matrix")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def is_started(self) -> bool:
        """Whether ``theta`` has been set since construction (for EM: whether the first round has run)."""
        return bool(self.started)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> NoiseLayer:
        # Trainer(precision="bf16-true" / "64-true") casts every floating buffer; theta must stay float32 so that its
        # rows keep summing to 1, so only the device change is kept.
        kept = {name: buffer for name, buffer in self._buffers.items() if buffer is not None}
        super()._apply(fn, recurse)
        for name, original in kept.items():
            moved = self._buffers[name]
            if moved is not None and moved.dtype != original.dtype:
                self._buffers[name] = original.to(moved.device)
        return self

    # ---- what theta gives -------------------------------------------------------------------------------------
    def posterior(self, logits: Tensor, labels: Tensor) -> Tensor:
        """``c[t, i] = p(y = i | x_t) theta[i, z_t] / sum_k p(y = k | x_t) theta[k, z_t]`` (float32, detached).

        Before ``theta`` is set (a cross-entropy model, or EM before its first round) there is no noise model, and
        the posterior is the network's ``p(y | x)``.
        """
        log_probs = F.log_softmax(logits.detach().float(), dim=1)
        if not self.is_started:
            return log_probs.exp()
        return em.posterior(log_probs, self.noise_matrix, labels)

    def noisy_label_nll(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Per-sample ``-log p(z | x) = -log sum_i p(i | x) theta[i, z]``."""
        log_probs = F.log_softmax(logits.float(), dim=1)
        log_theta = self.noise_matrix.clamp_min(1e-12).log()
        return -(log_probs + log_theta.t()[labels]).logsumexp(dim=1)

    def loss(self, logits: Tensor, labels: Tensor, index: Tensor) -> Tensor:
        """The training loss of a batch; ``index`` is each sample's row in the training pool."""
        return F.cross_entropy(logits, labels)

    # ---- changing theta ---------------------------------------------------------------------------------------
    def update(self, noise_matrix: Tensor, posterior: Tensor | None = None, rows: Tensor | None = None) -> None:
        """Set ``theta`` (checked: square, ``K x K``, row-stochastic) and mark the layer started.

        ``posterior`` (``[R, K]``) and ``rows`` (a boolean mask over the pool, ``R`` of it true) are the E-step's
        posteriors; the base layer does not keep them.
        """
        checked = check_transition_matrix(noise_matrix.detach().double().cpu(), self.num_classes, "noise_matrix")
        self.noise_matrix.copy_(checked.to(self.noise_matrix))
        self.started.fill_(True)


class CrossEntropyLayer(NoiseLayer):
    """``method="ce"``: cross-entropy on the given labels (the baseline); ``theta`` is not used by the loss."""


class EMLayer(NoiseLayer):
    """``method="em"``: train on the posteriors of the true labels once EM has set ``theta``.

    Args:
        num_classes: ``K``.
        targets: ``"online"`` (default): ``c ∝ p(y | x; w) theta[:, z]`` recomputed in each step from the current
            network and ``theta`` (detached). Its gradient is that of the given-label log-likelihood
            ``log sum_i p(i | x) theta[i, z]``, so a wrong label pulls the network by at most
            ``log(theta[z, z] / theta[y, z])`` and the network does not memorise its own targets.
            ``"stored"``: the table of the last E-step, ``c[index]`` (the paper's literal M-step); it memorises,
            and ``theta`` drifts toward the identity. The table is kept (and checkpointed) only in this mode.
    """

    estimated_by_em: ClassVar[bool] = True

    def __init__(self, num_classes: int, targets: EMTargets = "online") -> None:
        super().__init__(num_classes)
        self.targets = check_choice("em_targets", targets, ("online", "stored"))
        self.register_buffer("posterior_table", torch.zeros(0, num_classes))

    def loss(self, logits: Tensor, labels: Tensor, index: Tensor) -> Tensor:
        if not self.is_started:
            return F.cross_entropy(logits, labels)
        targets = self.posterior(logits, labels) if self.targets == "online" else self.posterior_table[index]
        # cross_entropy takes class probabilities as targets as well as class indices; float32 whatever the
        # precision of the network, like theta.
        return F.cross_entropy(logits.float(), targets)

    def update(self, noise_matrix: Tensor, posterior: Tensor | None = None, rows: Tensor | None = None) -> None:
        if self.targets == "stored":
            if posterior is None or rows is None:
                raise ValueError("EMLayer(targets='stored') needs the E-step's posterior and rows")
            if self.posterior_table.shape[0] != rows.numel():
                self.posterior_table = torch.zeros(rows.numel(), self.num_classes, device=self.noise_matrix.device)
            # Rows that this round did not score keep the previous round's posteriors.
            self.posterior_table[rows.to(self.posterior_table.device)] = posterior.to(self.posterior_table)
        super().update(noise_matrix)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # The table is sized by the pool at the first round; give it the checkpoint's size before copying.
        saved = state_dict.get(prefix + "posterior_table")
        if saved is not None and saved.shape != self.posterior_table.shape:
            self.posterior_table = torch.zeros_like(saved, device=self.posterior_table.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


METHODS: tuple[str, ...] = ("ce", "em")


def make_noise_layer(method: str, num_classes: int, em_targets: EMTargets = "online") -> NoiseLayer:
    """The noise layer for ``method`` (one of :data:`METHODS`)."""
    check_choice("method", method, METHODS)
    if method == "em":
        return EMLayer(num_classes, em_targets)
    check_choice("em_targets", em_targets, ("online", "stored"))
    return CrossEntropyLayer(num_classes)
