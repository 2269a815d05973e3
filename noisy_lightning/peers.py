"""The mathematics of the other standard methods for noisy labels, as pure functions on tensors.

Conventions as in :mod:`noisy_lightning.em`: ``T[i, j] = P(z = j | y = i)`` (rows = true class ``y``, columns =
given label ``z``), ``p(y | x)`` is the network's softmax.

Losses (per sample; the layers of :mod:`noisy_lightning.noise_layer` average them):

- forward correction (Patrini et al., CVPR 2017, eq. 6): ``-log sum_i p(i | x) T[i, z]``, the cross-entropy of the
  given label under the network's prediction pushed through ``T`` (:func:`forward_corrected_nll`). With a learned
  ``T = softmax(B)`` this is also the loss of the noise adaptation layer's *simple* model (Goldberger &
  Ben-Reuven, ICLR 2017).
- backward correction (Patrini et al., eq. 5): ``sum_j (T^-1)[z, j] * (-log p(j | x))``, an unbiased estimate of the
  clean cross-entropy (:func:`backward_corrected_ce`); it can be negative, and is unstable when ``T`` is near
  singular.
- the noise adaptation layer's *complex* model (Goldberger & Ben-Reuven, section 3): the noise depends on ``x``
  through the network's last hidden layer ``h(x)``, ``T(x)[i, j] = softmax_j(u_ij . h(x) + b_ij)``
  (:func:`instance_log_noise_matrices`), and the loss is ``-log sum_i p(i | x) T(x)[i, z]``
  (:func:`instance_forward_nll`). :func:`implied_noise_matrix` averages ``T(x)`` into one matrix.
- generalised cross-entropy (Zhang & Sabuncu, NeurIPS 2018, eq. 6): ``(1 - p(z | x)^q) / q``, between the
  cross-entropy (``q -> 0``) and the mean absolute error (``q = 1``) (:func:`generalized_cross_entropy`).

Estimators of ``T`` from ``p(z | x)`` of a network trained on the given labels:

- anchor points (Patrini et al., Algorithm 1 with the robust high-percentile choice of their experiments):
  for each class ``i`` the anchor ``x^i`` is the sample whose ``p(i | x)`` is at the ``percentile``-th percentile of
  the column, and ``T[i, :] = p(. | x^i)`` (:func:`anchor_noise_matrix`).
- the confusion matrix (the noise adaptation layer's initialisation) is :func:`noisy_lightning.em.initial_noise_matrix`.

Co-teaching (Han et al., NeurIPS 2018, Algorithm 1): each of two networks keeps the share of the batch with the
smallest loss under it, and the *other* network learns from those samples; the share dropped ramps linearly from 0
to ``forget_rate`` over the first ``T_k = 10`` epochs (:func:`coteaching_forget_rate`, :func:`small_loss_mask`).
When the noise rate is unknown it is estimated as the share of wrong labels under an estimated ``T``
(:func:`noise_rate_of`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from noisy_lightning.checks import check_float, check_int

CLIP = 1e-7  # the probability clip of the backward-corrected loss (Patrini et al.'s code)


def forward_corrected_nll(logits: Tensor, noise_matrix: Tensor, labels: Tensor) -> Tensor:
    """Per-sample ``-log sum_i p(i | x) T[i, z]``, in log space (float32 or wider).

    Args:
        logits: ``[B, K]`` network outputs.
        noise_matrix: ``[K, K]`` row-stochastic ``T`` (it may carry gradients, as the noise adaptation layer's does).
        labels: ``[B]`` given labels ``z``.
    """
    log_probs = F.log_softmax(logits.float(), dim=1)
    log_noise = noise_matrix.float().clamp_min(1e-12).log()
    return -(log_probs + log_noise.t()[labels]).logsumexp(dim=1)


def instance_log_noise_matrices(features: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``log T(x)`` for each sample: ``[B, K, K]`` with ``log T(x_t)[i, j] = log_softmax_j(weight[i K + j] . h_t +
    bias[i, j])``.

    Args:
        features: ``[B, D]`` hidden features ``h(x)`` (the input of the network's last linear layer).
        weight: ``[K * K, D]``; row ``i K + j`` is ``u_ij``. All zero, every sample gets ``softmax(bias)``.
        bias: ``[K, K]`` ``b``, the log of the initial noise matrix.
    """
    num_classes = bias.shape[0]
    # float32 under autocast too (bf16-mixed / 16-mixed), like theta everywhere else
    with torch.autocast(features.device.type, enabled=False):
        scores = features.float() @ weight.float().t()
    scores = scores.view(-1, num_classes, num_classes) + bias.float()
    return F.log_softmax(scores, dim=2)


def _joint_log_given(logits: Tensor, log_noise_matrices: Tensor, labels: Tensor) -> Tensor:
    """``log p(i | x_t) + log T(x_t)[i, z_t]``, ``[B, K]``."""
    log_probs = F.log_softmax(logits.float(), dim=1)
    log_given = log_noise_matrices.gather(2, labels.view(-1, 1, 1).expand(-1, log_noise_matrices.shape[1], 1))
    return log_probs + log_given.squeeze(2)


def instance_forward_nll(logits: Tensor, log_noise_matrices: Tensor, labels: Tensor) -> Tensor:
    """Per-sample ``-log sum_i p(i | x_t) T(x_t)[i, z_t]`` for per-sample ``log T(x_t)`` (``[B, K, K]``)."""
    return -_joint_log_given(logits, log_noise_matrices, labels).logsumexp(dim=1)


def instance_posterior(logits: Tensor, log_noise_matrices: Tensor, labels: Tensor) -> Tensor:
    """``c[t, i] = p(i | x_t) T(x_t)[i, z_t] / sum_k p(k | x_t) T(x_t)[k, z_t]``, the posterior of the true label
    under the complex model (float32)."""
    return torch.softmax(_joint_log_given(logits, log_noise_matrices, labels), dim=1)


def implied_noise_matrix_sums(class_probs: Tensor, noise_matrices: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The sums behind :func:`implied_noise_matrix`, which add up over chunks of samples: ``sum_t p(i | x_t)
    T(x_t)[i, :]`` (``[K, K]``), ``sum_t p(i | x_t)`` (``[K, 1]``) and ``sum_t T(x_t)`` (``[K, K]``), float64."""
    weights, matrices = class_probs.double(), noise_matrices.double()
    return torch.einsum("ni,nij->ij", weights, matrices), weights.sum(dim=0).unsqueeze(1), matrices.sum(dim=0)


def implied_noise_matrix_from_sums(weighted: Tensor, mass: Tensor, total: Tensor, count: int) -> Tensor:
    """:func:`implied_noise_matrix` from :func:`implied_noise_matrix_sums` over ``count`` samples."""
    return torch.where(mass > 0, weighted / mass.clamp_min(1e-300), total / max(count, 1))


def implied_noise_matrix(class_probs: Tensor, noise_matrices: Tensor) -> Tensor:
    """The one matrix that per-sample ``T(x)`` imply: ``T[i, :] = sum_t p(i | x_t) T(x_t)[i, :] / sum_t p(i | x_t)``,
    the noise of the samples that the network puts in class ``i``, weighted by how surely it does.

    Args:
        class_probs: ``[N, K]`` ``p(y | x)``.
        noise_matrices: ``[N, K, K]`` ``T(x)``, each row-stochastic.

    Returns:
        ``[K, K]`` float64, row-stochastic (a class that no sample is put in gets its average over all samples).
    """
    return implied_noise_matrix_from_sums(*implied_noise_matrix_sums(class_probs, noise_matrices), len(class_probs))


def backward_corrected_ce(
    logits: Tensor, noise_matrix: Tensor, labels: Tensor, inverse_noise_matrix: Tensor | None = None
) -> Tensor:
    """Per-sample ``sum_j (T^-1)[z, j] * (-log p(j | x))``.

    ``E_z[loss | y] = -log p(y | x)`` for ``z ~ T[y, :]``: the expected corrected loss is the clean loss. ``T`` must be
    invertible; its inverse has negative entries, so single losses can be negative. As in the paper's code, ``p`` is
    clipped to ``[1e-7, 1 - 1e-7]``: without a floor, a negative weight would pay the network to drive ``p(j | x)`` to
    0 and the loss to minus infinity.

    Args:
        inverse_noise_matrix: ``T^-1`` when the caller keeps it (it is computed from ``noise_matrix`` otherwise).
    """
    inverse = torch.linalg.inv(noise_matrix.double()).float() if inverse_noise_matrix is None else inverse_noise_matrix
    log_probs = F.log_softmax(logits.float(), dim=1).clamp(math.log(CLIP), math.log1p(-CLIP))
    return (inverse.float()[labels] * -log_probs).sum(dim=1)


def generalized_cross_entropy(logits: Tensor, labels: Tensor, q: float = 0.7) -> Tensor:
    """Per-sample ``(1 - p(z | x)^q) / q`` for ``q`` in ``(0, 1]`` (the paper's experiments use ``q = 0.7``)."""
    log_given = F.log_softmax(logits.float(), dim=1).gather(1, labels.unsqueeze(1)).squeeze(1)
    return (1.0 - torch.exp(q * log_given)) / q


def anchor_noise_matrix(class_probs: Tensor, percentile: float = 97.0) -> Tensor:
    """Patrini et al.'s anchor-point estimate of ``T`` from ``p(z | x)`` of a network trained on the given labels.

    For each class ``i``: among the samples, take the one whose ``p(z = i | x)`` is the largest below the
    ``percentile``-th percentile of that column (``percentile=100``: the plain argmax, the paper's Theorem 3;
    below 100 it ignores the most over-confident outliers, as the paper's experiments do with 97), and set
    ``T[i, :] = p(z = . | x^i)``. At an anchor of class ``i`` (``p(y = i | x) = 1``) this row is exactly
    ``T[i, :]``. Rows are renormalised to sum to 1.

    Args:
        class_probs: ``[N, K]`` rows of ``p(z | x)``, each summing to 1.
        percentile: in ``(0, 100]``.

    Returns:
        ``[K, K]`` float64 row-stochastic matrix.
    """
    check_float("percentile", percentile, 0, 100, open_minimum=True)
    probs = class_probs.double()
    if not torch.isfinite(probs).all():
        raise FloatingPointError(
            "the class probabilities contain NaN or Inf: the network has diverged. "
            "Lower the learning rate or use gradient clipping (Trainer(gradient_clip_val=...))."
        )
    num_classes = probs.shape[1]
    # torch.quantile(interpolation="higher") without its 16M-element limit: the ceil(q (n - 1))-th smallest (0-based).
    rank = math.ceil(percentile / 100.0 * (probs.shape[0] - 1)) + 1
    rows = []
    for i in range(num_classes):
        column = probs[:, i]
        if percentile < 100:
            threshold = torch.kthvalue(column, rank).values
            # The paper's filter: drop the samples at or above the percentile, then take the largest left.
            below = column < threshold
            column = torch.where(below, column, torch.full_like(column, -1.0)) if below.any() else column
        rows.append(probs[column.argmax()])
    matrix = torch.stack(rows)
    return matrix / matrix.sum(dim=1, keepdim=True)


def noise_rate_of(noise_matrix: Tensor, noisy_label_frequencies: Tensor) -> float:
    """The share of wrong labels implied by ``T`` and the frequencies of the given labels.

    The true class prior solves ``P(z) = P(y)^T T``; it is solved by least squares, clipped at 0 and renormalised,
    and the rate is ``sum_i P(y = i) (1 - T[i, i])``.
    """
    matrix = noise_matrix.double()
    given = noisy_label_frequencies.double() / noisy_label_frequencies.double().sum()
    prior = torch.linalg.lstsq(matrix.t(), given.unsqueeze(1)).solution.squeeze(1).clamp_min(0)
    prior = prior / prior.sum() if prior.sum() > 0 else torch.full_like(given, 1.0 / len(given))
    return float((prior * (1 - matrix.diagonal())).sum().clamp(0, 1))


def coteaching_forget_rate(epoch: int, forget_rate: float, num_gradual: int = 10, exponent: float = 1.0) -> float:
    """The share of each batch dropped in the 0-based ``epoch``: ``tau^c * epoch / (T_k - 1)`` for the first
    ``T_k = num_gradual`` epochs, then ``tau = forget_rate``.

    The paper keeps ``R(T) = 1 - min(T^c tau / T_k, tau)`` of the batch in (1-based) epoch ``T``, with ``T_k = 10``
    and ``c = 1``; its code ramps the dropped share linearly from 0 in the first epoch to ``tau^c`` in epoch ``T_k``
    (``linspace(0, tau^c, T_k)``), which is this schedule.
    """
    check_int("num_gradual", num_gradual, 1)
    if epoch >= num_gradual:
        return forget_rate
    return 0.0 if num_gradual == 1 else forget_rate**exponent * epoch / (num_gradual - 1)


def small_loss_mask(losses: Tensor, forget_rate: float, all_losses: Tensor | None = None) -> tuple[Tensor, int]:
    """Which samples are among the ``floor((1 - forget_rate) * N)`` (at least one) with the smallest loss.

    ``all_losses`` are the losses of the whole global batch when it is split over processes (every rank's
    ``losses``, gathered); the selection is then made over the global batch, as one process would make it.
    Returns the mask over ``losses`` and the number kept over the global batch. Ties at the threshold are all kept.
    """
    pooled = (losses if all_losses is None else all_losses).detach().flatten()
    # floor, as the paper's code counts, with a tolerance so that (1 - 0.9) * 20 keeps 2, not 1
    keep = max(1, math.floor((1.0 - forget_rate) * pooled.numel() + 1e-9))
    threshold = torch.kthvalue(pooled.float(), keep).values
    return losses.detach() <= threshold, keep


def coteaching_losses(
    logits_first: Tensor,
    logits_second: Tensor,
    labels: Tensor,
    forget_rate: float,
    gather: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Co-teaching's exchange: each network's mean cross-entropy on the small-loss samples of the *other* one.

    ``gather`` (under data parallelism) returns the per-sample losses of all ``W`` ranks, ``[W, B]``; each rank's
    loss is then scaled so that the average of the ranks' gradients, as DDP takes it, is the gradient of the
    mean over the samples kept from the global batch.
    """
    loss_first = F.cross_entropy(logits_first.float(), labels, reduction="none")
    loss_second = F.cross_entropy(logits_second.float(), labels, reduction="none")
    all_first = all_second = None
    world_size = 1
    if gather is not None:
        all_first, all_second = gather(loss_first.detach()), gather(loss_second.detach())
        world_size = all_first.shape[0] if all_first.ndim > 1 else 1
    kept_by_first, keep_first = small_loss_mask(loss_first, forget_rate, all_first)
    kept_by_second, keep_second = small_loss_mask(loss_second, forget_rate, all_second)
    first = (loss_first * kept_by_second).sum() * world_size / keep_second
    second = (loss_second * kept_by_first).sum() * world_size / keep_first
    return first, second
