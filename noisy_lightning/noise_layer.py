"""Noise layers: the ``nn.Module`` inside :class:`~noisy_lightning.NoisyLabelClassifier` that owns ``theta``.

A noise layer holds the ``K x K`` noise matrix ``theta[i, j] = P(given = j | true = i)`` and everything computed
from it: the posterior of the true label, the likelihood of the given label, and the training loss of its method.
The classifier asks it for the loss; a callback (EM) or the user updates ``theta`` through :meth:`update`.

Methods, keyed by :data:`METHODS`:

- ``"ce"`` (:class:`CrossEntropyLayer`): cross-entropy on the given labels; ``theta`` stays the identity.
- ``"em"`` (:class:`EMLayer`): Bekker & Goldberger's EM. Cross-entropy until ``theta`` is first set, then the
  network trains on the posteriors ``c[t, i] ∝ p(y = i | x_t) theta[i, z_t]``.
- ``"forward"`` (:class:`ForwardCorrectionLayer`) and ``"backward"`` (:class:`BackwardCorrectionLayer`): Patrini
  et al.'s loss corrections with a fixed ``theta`` (an anchor-point estimate, or the true ``T`` as an oracle).
- ``"nal"`` (:class:`NoiseAdaptationLayer`): Goldberger & Ben-Reuven's noise adaptation layer (simple model), a
  learned ``theta = softmax(B)`` trained jointly with the network, initialised from the confusion matrix.
- ``"nal_complex"`` (:class:`ComplexNoiseAdaptationLayer`): the same paper's complex model, in which the noise
  matrix depends on the sample through the network's last hidden layer.
- ``"gce"`` (:class:`GeneralizedCrossEntropyLayer`): Zhang & Sabuncu's robust loss; no ``theta``.

A layer whose :attr:`~NoiseLayer.noise_matrix_estimator` is set gets ``theta`` from the
:class:`~noisy_lightning.callbacks.NoiseMatrixEstimation` callback, and trains with cross-entropy until then. The
per-sample mathematics is in :mod:`noisy_lightning.peers`.

``theta`` and the layer's state are buffers: they move with the module, are saved in checkpoints, and stay
float32 whatever precision the Trainer runs the network in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from noisy_lightning import em, peers
from noisy_lightning.checks import check_choice, check_float, check_int
from noisy_lightning.noise import check_transition_matrix

EMTargets = Literal["online", "stored"]


class NoiseLayer(nn.Module):
    """Base class: owns ``noise_matrix`` (``theta``) and a ``started`` flag; the loss is plain cross-entropy.

    Subclasses override :meth:`loss`. Set :attr:`estimated_by_em` to ``True`` for a layer whose ``theta`` the
    :class:`~noisy_lightning.callbacks.EMNoiseEstimation` callback should estimate, or
    :attr:`noise_matrix_estimator` to the estimator that
    :class:`~noisy_lightning.callbacks.NoiseMatrixEstimation` should set ``theta`` from once.
    """

    estimated_by_em: ClassVar[bool] = False
    noise_matrix_estimator: ClassVar[str | None] = None
    # Whether loss, posterior and noisy_label_nll need the hidden features h(x) (the input of the net's last
    # nn.Linear); the classifier passes them only to a layer that asks.
    needs_features: ClassVar[bool] = False

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
    def posterior(self, logits: Tensor, labels: Tensor, features: Tensor | None = None) -> Tensor:
        """``c[t, i] = p(y = i | x_t) theta[i, z_t] / sum_k p(y = k | x_t) theta[k, z_t]`` (float32, detached).

        Before ``theta`` is set (a cross-entropy model, or EM before its first round) there is no noise model, and
        the posterior is the network's ``p(y | x)``. ``features`` are read only by a layer that
        :attr:`needs_features`.
        """
        log_probs = F.log_softmax(logits.detach().float(), dim=1)
        if not self.is_started:
            return log_probs.exp()
        return em.posterior(log_probs, self.noise_matrix, labels)

    def noisy_label_nll(self, logits: Tensor, labels: Tensor, features: Tensor | None = None) -> Tensor:
        """Per-sample ``-log p(z | x) = -log sum_i p(i | x) theta[i, z]``."""
        log_probs = F.log_softmax(logits.float(), dim=1)
        log_theta = self.noise_matrix.clamp_min(1e-12).log()
        return -(log_probs + log_theta.t()[labels]).logsumexp(dim=1)

    def loss(self, logits: Tensor, labels: Tensor, index: Tensor, features: Tensor | None = None) -> Tensor:
        """The training loss of a batch; ``index`` is each sample's row in the training pool, ``features`` the
        hidden features of a layer that :attr:`needs_features`."""
        return F.cross_entropy(logits, labels)

    def refresh(self) -> None:
        """Called after each optimiser step; a layer whose ``theta`` is learned copies it into ``noise_matrix``."""

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

    def loss(self, logits: Tensor, labels: Tensor, index: Tensor, features: Tensor | None = None) -> Tensor:
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


class _CorrectedLayer(NoiseLayer):
    """Cross-entropy until ``theta`` is set, then :meth:`corrected_loss`."""

    def loss(self, logits: Tensor, labels: Tensor, index: Tensor, features: Tensor | None = None) -> Tensor:
        if not self.is_started:
            return F.cross_entropy(logits, labels)
        return self.corrected_loss(logits, labels).mean()

    def corrected_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        raise NotImplementedError


class ForwardCorrectionLayer(_CorrectedLayer):
    """``method="forward"``: Patrini et al.'s forward correction, ``-log sum_i p(i | x) theta[i, z]`` with ``theta``
    fixed once set (by default the anchor-point estimate at the end of the warm-up)."""

    noise_matrix_estimator: ClassVar[str | None] = "anchor"

    def corrected_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return peers.forward_corrected_nll(logits, self.noise_matrix, labels)


class BackwardCorrectionLayer(_CorrectedLayer):
    """``method="backward"``: Patrini et al.'s backward correction, ``sum_j (theta^-1)[z, j] (-log p(j | x))``.

    ``theta`` must be well conditioned: :meth:`update` refuses one whose condition number exceeds 1e6 (two classes
    with the same anchor, for example), since its inverse would multiply the loss by huge weights.
    """

    noise_matrix_estimator: ClassVar[str | None] = "anchor"
    MAX_CONDITION_NUMBER: ClassVar[float] = 1e6

    def __init__(self, num_classes: int) -> None:
        super().__init__(num_classes)
        # theta^-1, kept rather than inverted every step; not saved (it is recomputed from theta on load).
        self.register_buffer("inverse_noise_matrix", torch.eye(num_classes), persistent=False)

    def corrected_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return peers.backward_corrected_ce(logits, self.noise_matrix, labels, self.inverse_noise_matrix)

    def update(self, noise_matrix: Tensor, posterior: Tensor | None = None, rows: Tensor | None = None) -> None:
        condition = torch.linalg.cond(noise_matrix.detach().double().cpu()).item()
        if not condition < self.MAX_CONDITION_NUMBER:
            raise ValueError(
                f"method='backward' needs an invertible noise matrix, but this estimate has condition number "
                f"{condition:.3g}: its inverse would weight the loss by huge numbers. Use method='forward', which "
                "needs no inverse."
            )
        super().update(noise_matrix)
        self._invert()

    def _invert(self) -> None:
        self.inverse_noise_matrix.copy_(torch.linalg.inv(self.noise_matrix.double()).to(self.inverse_noise_matrix))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._invert()


class NoiseAdaptationLayer(_CorrectedLayer):
    """``method="nal"``: the noise adaptation layer's simple model (Goldberger & Ben-Reuven, ICLR 2017).

    ``theta = softmax(B)`` row by row, with ``B`` a learned ``K x K`` parameter trained jointly with the network on
    ``-log sum_i p(i | x) theta[i, z]``. :meth:`update` sets ``B = log theta`` (the paper initialises it from the
    confusion matrix of the network trained on the given labels); ``noise_matrix`` follows ``softmax(B)`` after
    every optimiser step.
    """

    noise_matrix_estimator: ClassVar[str | None] = "confusion"

    def __init__(self, num_classes: int) -> None:
        super().__init__(num_classes)
        self.transition_logits = nn.Parameter(torch.zeros(num_classes, num_classes))

    def loss(self, logits: Tensor, labels: Tensor, index: Tensor, features: Tensor | None = None) -> Tensor:
        loss = super().loss(logits, labels, index)
        # The layer's parameters take no part in the warm-up's cross-entropy; a zero-weighted term keeps
        # DistributedDataParallel from failing on a parameter without a gradient.
        return loss if self.is_started else loss + 0.0 * sum(parameter.sum() for parameter in self.parameters())

    def corrected_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return peers.forward_corrected_nll(logits, torch.softmax(self.transition_logits.float(), dim=1), labels)

    def refresh(self) -> None:
        if self.is_started:
            with torch.no_grad():
                self.noise_matrix.copy_(torch.softmax(self.transition_logits.float(), dim=1))

    def update(self, noise_matrix: Tensor, posterior: Tensor | None = None, rows: Tensor | None = None) -> None:
        super().update(noise_matrix)
        with torch.no_grad():
            self.transition_logits.copy_(self.noise_matrix.clamp_min(1e-6).log().to(self.transition_logits))


class ComplexNoiseAdaptationLayer(NoiseAdaptationLayer):
    """``method="nal_complex"``: the noise adaptation layer's complex model (Goldberger & Ben-Reuven, ICLR 2017,
    section 3), in which the noise depends on the sample.

    ``theta(x)[i, j] = softmax_j(u_ij . h(x) + b_ij)``, where ``h(x)`` is the network's last hidden layer (the input
    of its last ``nn.Linear``), and network, ``u`` and ``b`` are trained jointly on
    ``-log sum_i p(i | x) theta(x)[i, z]`` (:func:`~noisy_lightning.peers.instance_forward_nll`). :meth:`update`
    sets ``b = log theta`` and ``u = 0``, so training starts from the simple model at that ``theta``, as the paper's
    code starts it from the confusion matrix. ``noise_matrix`` is ``softmax(b)``, the noise at ``h = 0``;
    :func:`~noisy_lightning.peers.implied_noise_matrix` averages ``theta(x)`` over data instead.

    Args:
        num_classes: ``K``.
        feature_size: the width ``D`` of ``h(x)``.
    """

    needs_features: ClassVar[bool] = True

    def __init__(self, num_classes: int, feature_size: int) -> None:
        super().__init__(num_classes)
        check_int("feature_size", feature_size, 1)
        self.feature_size = feature_size
        self.transition_weight = nn.Parameter(torch.zeros(num_classes * num_classes, feature_size))

    def log_noise_matrices(self, features: Tensor | None) -> Tensor:
        """``log theta(x)`` for each sample, ``[B, K, K]``."""
        if features is None:
            raise ValueError(
                "method='nal_complex' needs the hidden features h(x) (the input of the net's last nn.Linear) to "
                "compute its loss and posteriors"
            )
        if features.ndim != 2 or features.shape[1] != self.feature_size:
            raise ValueError(
                f"method='nal_complex' was built for hidden features of width {self.feature_size}, got features of "
                f"shape {tuple(features.shape)}"
            )
        return peers.instance_log_noise_matrices(features, self.transition_weight, self.transition_logits)

    def loss(self, logits: Tensor, labels: Tensor, index: Tensor, features: Tensor | None = None) -> Tensor:
        if not self.is_started:
            return super().loss(logits, labels, index)
        return peers.instance_forward_nll(logits, self.log_noise_matrices(features), labels).mean()

    def posterior(self, logits: Tensor, labels: Tensor, features: Tensor | None = None) -> Tensor:
        if not self.is_started:
            return super().posterior(logits, labels)
        with torch.no_grad():
            return peers.instance_posterior(logits, self.log_noise_matrices(features), labels)

    def noisy_label_nll(self, logits: Tensor, labels: Tensor, features: Tensor | None = None) -> Tensor:
        if not self.is_started:
            return super().noisy_label_nll(logits, labels)
        return peers.instance_forward_nll(logits, self.log_noise_matrices(features), labels)

    def update(self, noise_matrix: Tensor, posterior: Tensor | None = None, rows: Tensor | None = None) -> None:
        super().update(noise_matrix)
        with torch.no_grad():
            self.transition_weight.zero_()

    @torch.no_grad()
    def implied_noise_matrix(self, logits: Tensor, features: Tensor, batch_size: int = 4096) -> Tensor:
        """The one ``K x K`` matrix that ``theta(x)`` implies on these samples
        (:func:`~noisy_lightning.peers.implied_noise_matrix`), float64 on the CPU; e.g. with
        ``layer.implied_noise_matrix(*model.outputs_of(images))``. Computed ``batch_size`` samples at a time, so
        that ``[N, K, K]`` never exists for the whole set."""
        device = self.transition_weight.device
        sums = None
        for logit_chunk, feature_chunk in zip(logits.split(batch_size), features.split(batch_size), strict=True):
            matrices = self.log_noise_matrices(feature_chunk.to(device)).exp()
            chunk = peers.implied_noise_matrix_sums(torch.softmax(logit_chunk.float(), dim=1).to(device), matrices)
            sums = chunk if sums is None else tuple(total + part for total, part in zip(sums, chunk, strict=True))
        return peers.implied_noise_matrix_from_sums(*sums, len(logits)).cpu()


class GeneralizedCrossEntropyLayer(NoiseLayer):
    """``method="gce"``: Zhang & Sabuncu's generalised cross-entropy ``(1 - p(z | x)^q) / q``; no ``theta``."""

    def __init__(self, num_classes: int, q: float = 0.7) -> None:
        super().__init__(num_classes)
        self.q = check_float("gce_q", q, 0, 1, open_minimum=True)

    def loss(self, logits: Tensor, labels: Tensor, index: Tensor, features: Tensor | None = None) -> Tensor:
        return peers.generalized_cross_entropy(logits, labels, self.q).mean()


METHODS: tuple[str, ...] = ("ce", "em", "forward", "backward", "nal", "nal_complex", "gce")


LAYERS: dict[str, type[NoiseLayer]] = {
    "ce": CrossEntropyLayer,
    "em": EMLayer,
    "forward": ForwardCorrectionLayer,
    "backward": BackwardCorrectionLayer,
    "nal": NoiseAdaptationLayer,
    "nal_complex": ComplexNoiseAdaptationLayer,
    "gce": GeneralizedCrossEntropyLayer,
}


def layer_class(method: str) -> type[NoiseLayer]:
    """The noise-layer class of ``method`` (one of :data:`METHODS`), e.g. to ask whether it
    :attr:`~NoiseLayer.needs_features` before building it."""
    return LAYERS[check_choice("method", method, METHODS)]


def make_noise_layer(
    method: str,
    num_classes: int,
    em_targets: EMTargets = "online",
    gce_q: float = 0.7,
    feature_size: int | None = None,
) -> NoiseLayer:
    """The noise layer for ``method`` (one of :data:`METHODS`); ``feature_size`` is the width of ``h(x)`` that a
    layer which :attr:`~NoiseLayer.needs_features` takes."""
    layer = layer_class(method)
    check_choice("em_targets", em_targets, ("online", "stored"))
    check_float("gce_q", gce_q, 0, 1, open_minimum=True)
    if layer is EMLayer:
        return EMLayer(num_classes, em_targets)
    if layer is GeneralizedCrossEntropyLayer:
        return GeneralizedCrossEntropyLayer(num_classes, gce_q)
    if layer.needs_features:
        if feature_size is None:
            raise ValueError(f"method={method!r} needs feature_size, the width of the net's last hidden layer")
        return layer(num_classes, feature_size)
    return layer(num_classes)
