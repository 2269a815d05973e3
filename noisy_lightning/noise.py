"""Label-noise models: row-stochastic transition matrices and reproducible corruption.

Convention used throughout noisy-lightning
------------------------------------------
A noise model over ``K`` classes is a ``K x K`` row-stochastic *transition matrix* ``T`` with

    T[i, j] = P(noisy label = j | true label = i),      sum_j T[i, j] = 1.

Rows are indexed by the **true** class, columns by the **observed (noisy)** class. This is the convention of
Bekker & Goldberger (2016), Patrini et al. (2017, "forward correction") and T-Revision. Note that cleanlab's
``noise_matrix`` is the transpose: there ``noise_matrix[j, i] = P(noisy = j | true = i)`` (columns sum to 1).

Everything here is pure torch (no Lightning), works on CPU tensors, and is deterministic for a given seed,
independent of the global RNG state and of the number of processes that call it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

NOISE_TYPES: tuple[str, ...] = ("none", "symmetric", "uniform", "pair_flip", "permutation", "custom")

ROW_SUM_TOLERANCE = 1e-6


def _check_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")


def check_noise_rate(noise_rate: float, name: str = "noise_rate") -> float:
    """Return ``noise_rate`` as a float after checking that it lies in ``[0, 1)``.

    A rate of 1 is refused: with every label flipped the clean class is no longer identifiable.
    """
    try:
        rate = float(noise_rate)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1), got {noise_rate!r}") from None
    if not math.isfinite(rate) or not 0.0 <= rate < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {noise_rate!r}")
    return rate


def check_transition_matrix(
    matrix: Tensor | Sequence[Sequence[float]],
    num_classes: int | None = None,
    name: str = "transition_matrix",
) -> Tensor:
    """Validate a transition matrix and return it as a float64 tensor.

    Checks, each with a ``ValueError`` that names ``name``: the matrix is 2-D and square, matches
    ``num_classes`` when given, has only finite non-negative entries, and every row sums to 1 within
    ``1e-6``.
    """
    try:
        tensor = torch.as_tensor(matrix, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{name} must be a square K x K matrix of numbers, got {matrix!r} ({error})") from None
    if tensor.ndim != 2 or tensor.shape[0] != tensor.shape[1]:
        raise ValueError(f"{name} must be a square K x K matrix, got shape {tuple(tensor.shape)}")
    if tensor.shape[0] < 2:
        raise ValueError(f"{name} must have at least 2 classes, got shape {tuple(tensor.shape)}")
    if num_classes is not None and tensor.shape[0] != num_classes:
        raise ValueError(
            f"{name} has shape {tuple(tensor.shape)} but the data has num_classes={num_classes}; "
            f"expected shape ({num_classes}, {num_classes})"
        )
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} must contain only finite numbers (no NaN or Inf)")
    if (tensor < 0).any():
        row, col = (tensor < 0).nonzero()[0].tolist()
        raise ValueError(f"{name} entries must be >= 0, got {name}[{row}, {col}] = {tensor[row, col].item():g}")
    row_sums = tensor.sum(dim=1)
    bad_rows = ((row_sums - 1.0).abs() > ROW_SUM_TOLERANCE).nonzero().flatten().tolist()
    if bad_rows:
        details = ", ".join(f"row {r} sums to {row_sums[r].item():.8g}" for r in bad_rows[:5])
        raise ValueError(f"{name} rows must sum to 1 within {ROW_SUM_TOLERANCE:g} (row-stochastic): {details}")
    return tensor


def symmetric(num_classes: int, noise_rate: float) -> Tensor:
    """Symmetric noise: ``T = (1 - r) I + r / (K - 1) (1 - I)``.

    A label is flipped with probability ``r``, to one of the *other* ``K - 1`` classes uniformly, so the
    expected fraction of flipped labels is exactly ``r``. (Co-teaching's "symmetric" noise.)
    """
    _check_num_classes(num_classes)
    rate = check_noise_rate(noise_rate)
    matrix = torch.full((num_classes, num_classes), rate / (num_classes - 1), dtype=torch.float64)
    matrix.fill_diagonal_(1.0 - rate)
    return matrix


def uniform(num_classes: int, noise_rate: float) -> Tensor:
    """Uniform-redraw noise: ``T = (1 - r) I + (r / K) 1``.

    With probability ``r`` the label is redrawn uniformly among *all* ``K`` classes, possibly landing on the
    true one, so the expected flip rate is ``r (K - 1) / K`` (45% for ``r = 0.5``, ``K = 10``). This is the
    noise of the original notebook and of Bekker & Goldberger; papers sometimes call it "symmetric" too, so
    check which one a published number uses.
    """
    _check_num_classes(num_classes)
    rate = check_noise_rate(noise_rate)
    matrix = torch.full((num_classes, num_classes), rate / num_classes, dtype=torch.float64)
    matrix += torch.eye(num_classes, dtype=torch.float64) * (1.0 - rate)
    return matrix


def _flip_to_partner(partner: Tensor, noise_rate: float) -> Tensor:
    num_classes = partner.numel()
    matrix = torch.eye(num_classes, dtype=torch.float64) * (1.0 - noise_rate)
    matrix[torch.arange(num_classes), partner] += noise_rate
    return matrix


def pair_flip(num_classes: int, noise_rate: float) -> Tensor:
    """Pair-flip noise: class ``i`` becomes ``(i + 1) mod K`` with probability ``r``, else stays."""
    _check_num_classes(num_classes)
    rate = check_noise_rate(noise_rate)
    return _flip_to_partner(torch.roll(torch.arange(num_classes), -1), rate)


def permutation(num_classes: int, noise_rate: float, seed: int = 0) -> Tensor:
    """Permutation noise: class ``i`` becomes ``pi(i)`` with probability ``r``, for a seeded derangement ``pi``.

    ``pi`` has no fixed point, so every class has exactly one partner and the expected flip rate is ``r``.
    The derangement depends only on ``seed`` (rejection sampling of uniform permutations).
    """
    _check_num_classes(num_classes)
    rate = check_noise_rate(noise_rate)
    generator = torch.Generator().manual_seed(int(seed))
    identity = torch.arange(num_classes)
    while True:
        partner = torch.randperm(num_classes, generator=generator)
        if not (partner == identity).any():
            return _flip_to_partner(partner, rate)


def build_transition_matrix(
    noise_type: str,
    num_classes: int,
    noise_rate: float = 0.0,
    transition_matrix: Tensor | Sequence[Sequence[float]] | None = None,
    seed: int = 0,
) -> Tensor:
    """Build the ``K x K`` transition matrix for a named noise model (see :data:`NOISE_TYPES`).

    ``"custom"`` takes ``transition_matrix`` (a tensor or nested list, e.g. from YAML); every other type
    takes ``noise_rate`` and refuses a ``transition_matrix`` so that a config cannot silently ignore it.
    ``seed`` only matters for ``"permutation"``.
    """
    if noise_type not in NOISE_TYPES:
        raise ValueError(f"noise_type must be one of {', '.join(map(repr, NOISE_TYPES))}; got {noise_type!r}")
    _check_num_classes(num_classes)
    if noise_type == "custom":
        if transition_matrix is None:
            raise ValueError("noise_type='custom' needs transition_matrix (a K x K row-stochastic matrix)")
        return check_transition_matrix(transition_matrix, num_classes)
    if transition_matrix is not None:
        raise ValueError(f"transition_matrix is only used with noise_type='custom', got noise_type={noise_type!r}")
    rate = check_noise_rate(noise_rate)
    if noise_type == "none":
        if rate != 0.0:
            raise ValueError(f"noise_type='none' needs noise_rate=0, got {noise_rate!r}")
        return torch.eye(num_classes, dtype=torch.float64)
    if noise_type == "permutation":
        return permutation(num_classes, rate, seed)
    builders = {"symmetric": symmetric, "uniform": uniform, "pair_flip": pair_flip}
    return builders[noise_type](num_classes, rate)


def confusion_counts(true_labels: Tensor, other_labels: Tensor, num_classes: int) -> Tensor:
    """``C[i, j]`` = number of samples with true label ``i`` and other label ``j`` (int64, ``K x K``)."""
    flat = true_labels.long() * num_classes + other_labels.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


@dataclass(frozen=True)
class Corruption:
    """The outcome of :func:`corrupt_labels`.

    Attributes:
        noisy_labels: int64 tensor of the drawn noisy labels, same shape as the input labels.
        flip_rate: realised fraction of labels that changed.
        confusion: realised ``K x K`` count matrix, ``confusion[i, j]`` = #(true ``i``, noisy ``j``).
    """

    noisy_labels: Tensor
    flip_rate: float
    confusion: Tensor

    @property
    def realised_transition_matrix(self) -> Tensor:
        """Row-normalised :attr:`confusion` (rows of classes with no samples stay 0)."""
        counts = self.confusion.double()
        return counts / counts.sum(dim=1, keepdim=True).clamp_min(1.0)


def check_labels(labels: Tensor, num_classes: int, name: str = "labels") -> Tensor:
    """Return ``labels`` as a 1-D int64 tensor after checking every value is in ``[0, num_classes)``."""
    labels = torch.as_tensor(labels)
    if labels.ndim != 1:
        raise ValueError(f"{name} must be a 1-D tensor of class indices, got shape {tuple(labels.shape)}")
    if labels.is_floating_point() and not torch.equal(labels, labels.round()):
        raise ValueError(f"{name} must hold integer class indices, got non-integer values")
    labels = labels.long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{name} must be in [0, {num_classes}) for num_classes={num_classes}, "
            f"got values in [{labels.min().item()}, {labels.max().item()}]"
        )
    return labels


def corrupt_labels(labels: Tensor, transition_matrix: Tensor, seed: int) -> Corruption:
    """Draw noisy labels ``z_t ~ Categorical(T[y_t, :])`` for every sample ``t``.

    One uniform number is drawn per sample, in sample order, from a private ``torch.Generator`` seeded with
    ``seed``, and mapped through the inverse CDF of row ``T[y_t]``. The result therefore depends only on
    ``(labels, transition_matrix, seed)``: not on the global RNG, the device, the batch size or how many
    processes call it (each process corrupts the whole pool and gets the same answer).

    Args:
        labels: 1-D integer tensor of true labels in ``[0, K)``.
        transition_matrix: ``K x K`` row-stochastic matrix, ``T[i, j] = P(noisy = j | true = i)``.
        seed: any integer.

    Returns:
        A :class:`Corruption` with the noisy labels, the realised flip rate and the realised confusion counts.
    """
    matrix = check_transition_matrix(transition_matrix)
    num_classes = matrix.shape[0]
    labels = check_labels(torch.as_tensor(labels).cpu(), num_classes)
    generator = torch.Generator().manual_seed(int(seed))
    draws = torch.rand(labels.numel(), generator=generator, dtype=torch.float64)
    cumulative = matrix.cumsum(dim=1)
    cumulative[:, -1] = 1.0  # rows sum to 1 within 1e-6; close the CDF exactly so no draw falls off the end
    noisy = torch.searchsorted(cumulative[labels], draws.unsqueeze(1), right=True).squeeze(1)
    # A zero-probability class has a flat CDF step; right=True skips it, and clamp guards the last column.
    noisy = noisy.clamp_max(num_classes - 1)
    flip_rate = (noisy != labels).double().mean().item() if labels.numel() else 0.0
    return Corruption(noisy, flip_rate, confusion_counts(labels, noisy, num_classes))
