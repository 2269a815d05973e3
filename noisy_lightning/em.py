"""The mathematics of Bekker & Goldberger's EM (ICASSP 2016), as pure functions on tensors.

Model. A network gives ``p(y = i | x; w)`` over the true label ``y``; the observed noisy label ``z`` is drawn
from ``y`` through the noise matrix ``theta`` with ``theta[i, j] = P(z = j | y = i)`` (rows = true class,
the same row-stochastic convention as :mod:`noisy_lightning.noise`).

E-step. For each training sample ``t`` with noisy label ``z_t``

    c[t, i] = p(y = i | x_t; w) * theta[i, z_t] / sum_k p(y = k | x_t; w) * theta[k, z_t],

computed in log space (:func:`posterior`), so that probabilities near 0 give 0, not NaN.

M-step for theta (:func:`estimate_noise_matrix`). With the sufficient statistics
``S[i, j] = sum_t c[t, i] * 1[z_t = j]`` (:func:`noise_statistics`),

    theta[i, j] = S[i, j] / sum_j' S[i, j'].

One round (:func:`em_round`) is an E-step followed, unless the schedule holds theta (:class:`EMSchedule`), by this
M-step. It takes ``p(y | x)`` for the scored samples; under data parallelism the caller first sums per-sample
probabilities across ranks (:class:`ProbabilitySums`), so every rank computes the same round. Nothing here imports
Lightning or ``torch.distributed``.

Initialisation (the paper's): after a warm-up on the noisy labels, ``theta`` is the row-normalised *soft*
confusion matrix between the network's predictions and the noisy labels, i.e. :func:`noise_statistics`
with ``c = p(y | x; w)`` in place of the posteriors. :func:`initial_noise_matrix` also offers the *hard* version
(from class assignments), and :func:`balanced_assignment` a class-balanced assignment to feed it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from noisy_lightning.checks import check_float, check_int


def check_log_probs(values: Tensor, name: str = "log_probs") -> None:
    """Raise ``FloatingPointError`` when ``values`` holds NaN or +Inf (a diverged network, typically).

    ``-inf`` is allowed: it is the log of an exact zero probability.
    """
    invalid = torch.isnan(values) | torch.isposinf(values)
    if invalid.any():
        bad = invalid.any(dim=-1).sum().item() if values.ndim > 1 else "some"
        raise FloatingPointError(
            f"{name} contains NaN or Inf ({bad} rows); the network has diverged. "
            "Lower the learning rate or use gradient clipping (Trainer(gradient_clip_val=...))."
        )


def posterior(log_probs: Tensor, noise_matrix: Tensor, noisy_labels: Tensor) -> Tensor:
    """E-step: the posterior of the true label given the input and the noisy label.

    ``c[t, i] = softmax_i( log p(y = i | x_t) + log theta[i, z_t] )``.

    Args:
        log_probs: ``N x K`` log-probabilities ``log p(y | x)`` (e.g. ``log_softmax(logits)``); ``-inf`` allowed.
        noise_matrix: ``K x K`` row-stochastic ``theta``; zeros are allowed and give zero posterior mass.
        noisy_labels: ``N`` integer noisy labels in ``[0, K)``.

    Returns:
        ``N x K`` float tensor whose rows sum to 1. A row for which every class has zero joint mass (a noisy
        label that ``theta`` says is impossible for every class the network allows) falls back to ``p(y | x)``,
        so that no row is 0/0.

    Raises:
        FloatingPointError: ``log_probs`` holds NaN or +Inf (a diverged network).
    """
    check_log_probs(log_probs)
    log_probs = log_probs.float()
    log_theta = noise_matrix.to(log_probs).clamp_min(0).log()  # log 0 = -inf: exact zero mass
    joint = log_probs + log_theta.t()[noisy_labels.long()]
    impossible = torch.isneginf(joint).all(dim=1, keepdim=True)
    joint = torch.where(impossible, log_probs, joint)
    return torch.softmax(joint, dim=1)


def noise_statistics(class_probs: Tensor, noisy_labels: Tensor, num_classes: int) -> Tensor:
    """Sufficient statistics of the theta M-step: ``S[i, j] = sum_t class_probs[t, i] * 1[z_t = j]``.

    ``class_probs`` is either the E-step posterior ``c`` or, for the initialisation, ``p(y | x)``. Returns a
    float64 ``K x K`` tensor: float32 sums over tens of thousands of samples would lose about 1e-4 relative.
    """
    by_noisy = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=class_probs.device)
    by_noisy.index_add_(0, noisy_labels.long(), class_probs.double())
    return by_noisy.t().contiguous()


def normalise_rows(statistics: Tensor, previous: Tensor | None = None) -> Tensor:
    """Row-normalise ``statistics`` into a row-stochastic matrix.

    A row with no mass (a true class that no sample was assigned to, e.g. an empty class in a small shard)
    keeps its ``previous`` value when one is given, else becomes the identity row: never 0/0.
    """
    num_classes = statistics.shape[0]
    totals = statistics.sum(dim=1, keepdim=True)
    empty = totals <= 0
    normalised = statistics / torch.where(empty, torch.ones_like(totals), totals)
    fallback = previous if previous is not None else torch.eye(num_classes, dtype=statistics.dtype)
    return torch.where(empty, fallback.to(normalised), normalised)


def estimate_noise_matrix(
    class_probs: Tensor, noisy_labels: Tensor, num_classes: int, previous: Tensor | None = None
) -> Tensor:
    """M-step for theta on one process: ``normalise_rows(noise_statistics(class_probs, noisy_labels, K))``."""
    return normalise_rows(noise_statistics(class_probs, noisy_labels, num_classes), previous)


def initial_noise_matrix(class_probs: Tensor, noisy_labels: Tensor, num_classes: int, *, hard: bool = False) -> Tensor:
    """Theta before the first EM round, from a network warmed up on the noisy labels.

    Soft (the paper's): ``theta[i, j] = sum_t p(i | x_t) 1[z_t = j] / sum_t p(i | x_t)``. Hard:
    the same with ``p(i | x_t)`` replaced by ``1[argmax_k p(k | x_t) = i]``.

    Why hard exists: a warmed-up network estimates ``p(z | x)``, not ``p(y | x)``. For a sample of class ``y``
    it spreads ``T[y, :]`` over the classes, so the soft statistic mixes each row with the rows of the classes
    that flip into it: under pair-flip 45% the soft estimate has about 0.25 on *both* neighbours of the
    diagonal, while the hard one is ``T`` itself whenever ``argmax_j T[y, j] = y`` (T diagonally dominant) and
    the network ranks classes correctly. Empty rows become identity rows.
    """
    if hard:
        class_probs = torch.nn.functional.one_hot(class_probs.argmax(dim=1), num_classes)
    return normalise_rows(noise_statistics(class_probs, noisy_labels, num_classes))


def balanced_assignment(
    class_probs: Tensor,
    class_frequencies: Tensor,
    sharpness: float = 4.0,
    max_iterations: int = 1000,
    tolerance: float = 1e-4,
) -> Tensor:
    """Re-weight ``class_probs`` per class so that each class receives its share of the samples (Sinkhorn).

    Returns ``q[t, i] = a_t * b_i * p(i | x_t) ** sharpness`` with the row scalings ``a`` and the class
    scalings ``b`` chosen (Sinkhorn-Knopp) so that every row sums to 1 and every class's total mass is
    ``N * class_frequencies[i]``. Raising to ``sharpness > 1`` first makes ``q`` close to a hard assignment
    (``sharpness`` is the inverse of the entropic regularisation of the optimal-transport problem "give each
    sample one class, give each class its count, maximise sum_t log p(y_t | x_t)").

    Why it is used at the first EM round: a network warmed up on noisy labels estimates ``p(z | x)``, and where a
    class flips into a partner at a rate near 50% (permutation or pair-flip 45%) the two outputs differ by
    only a few hundredths. Its argmax is then close to a coin flip for some classes, and a class whose
    images all lean toward the partner gets no sample at all: EM merges it into the partner and never separates
    them again. The *ranking* of the samples by ``p(i | x) / p(partner | x)`` is learnt much earlier than that
    threshold, and the balanced assignment uses only the ranking: the samples that lean most toward a class get
    it, up to the class's frequency.

    Args:
        class_probs: ``N x K`` probabilities (rows sum to 1; zeros allowed).
        class_frequencies: ``K`` non-negative target frequencies (normalised here), e.g. the noisy-label
            frequencies, which equal the true ones when ``T`` is doubly stochastic and the classes are balanced.
        sharpness: the power applied to ``class_probs`` before balancing (> 0; 1 balances the probabilities
            themselves).
        max_iterations: Sinkhorn iterations at most (>= 1).
        tolerance: stop when every class's mass is within ``tolerance`` (relative, > 0) of its target.

    Returns:
        ``N x K`` float64 tensor whose rows sum to 1. A class with target frequency 0 receives no mass. If the
        masses are still off by more than ``tolerance`` after ``max_iterations``, a ``RuntimeWarning`` says by how
        much and the last iterate is returned (its rows still sum to 1).
    """
    check_float("sharpness", sharpness, 0, open_minimum=True)
    check_int("max_iterations", max_iterations, 1)
    check_float("tolerance", tolerance, 0, open_minimum=True)
    frequencies = class_frequencies.double().to(class_probs.device)
    if frequencies.shape != (class_probs.shape[1],) or (frequencies < 0).any() or not frequencies.sum() > 0:
        raise ValueError(
            f"class_frequencies must be {class_probs.shape[1]} non-negative numbers with a positive sum, "
            f"got shape {tuple(frequencies.shape)}"
        )
    wanted = frequencies > 0
    log_target = (frequencies / frequencies.sum() * class_probs.shape[0]).log()  # log of each class's mass
    # K x N, so that both reductions below run over a contiguous or an outer dimension (several times faster).
    scores = class_probs.double().clamp_min(1e-30).log().t().contiguous() * sharpness
    log_scaling = torch.where(wanted, 0.0, -torch.inf).to(scores).unsqueeze(1)  # log b_i; an empty class gets 0
    for _ in range(max_iterations):
        log_q = scores + log_scaling
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True)  # rows of q (samples) sum to 1
        step = log_target[wanted] - torch.logsumexp(log_q[wanted], dim=1)
        mass_error = (step.exp() - 1).abs().max().item()
        if mass_error <= tolerance:
            break
        log_scaling[wanted] += step.unsqueeze(1)
    else:
        warnings.warn(
            f"balanced_assignment did not converge in max_iterations={max_iterations}: a class's mass is off its "
            f"target by {mass_error:.2e} (relative; tolerance={tolerance:g})",
            RuntimeWarning,
            stacklevel=2,
        )
    return log_q.exp().t().contiguous()


def noise_matrix_error(estimate: Tensor, truth: Tensor) -> float:
    """Relative entrywise L1 error ``||estimate - truth||_1 / ||truth||_1`` (T-Revision's and Dual-T's metric)."""
    truth = truth.double().cpu()
    return ((estimate.double().cpu() - truth).abs().sum() / truth.abs().sum()).item()


def noise_matrix_max_abs_error(estimate: Tensor, truth: Tensor) -> float:
    """``max_ij |estimate[i, j] - truth[i, j]|``."""
    return (estimate.double().cpu() - truth.double().cpu()).abs().max().item()


def label_recovery(class_probs: Tensor, clean_labels: Tensor) -> float:
    """Fraction of samples whose most probable class ``argmax_i c[t, i]`` equals the clean label."""
    return (class_probs.argmax(dim=1).cpu() == clean_labels.cpu()).double().mean().item()


def flip_precision_recall(class_probs: Tensor, noisy_labels: Tensor, clean_labels: Tensor) -> tuple[float, float]:
    """How well the corrections ``argmax_i c[t, i]`` find the wrong labels.

    precision: of the labels that EM would change (``argmax c != z``), the fraction that were really wrong
    (``z != y``); recall: of the wrong labels, the fraction that EM changes. An empty denominator gives 1.0
    for precision (no change, no false alarm) and 1.0 for recall (nothing to find).
    """
    corrected = class_probs.argmax(dim=1).cpu()
    noisy_labels, clean_labels = noisy_labels.cpu(), clean_labels.cpu()
    changed = corrected != noisy_labels
    wrong = noisy_labels != clean_labels
    true_positives = (changed & wrong).sum().item()
    precision = true_positives / changed.sum().item() if changed.any() else 1.0
    recall = true_positives / wrong.sum().item() if wrong.any() else 1.0
    return precision, recall


Initialisation = Literal["hard_confusion", "soft_confusion", "balanced"]
INITIALISATIONS: tuple[str, ...] = ("hard_confusion", "soft_confusion", "balanced")


@dataclass(frozen=True)
class EMSchedule:
    """Which epochs end with an EM round, and which rounds update theta.

    Epochs and rounds count from 0. Rounds run at the end of epochs ``warmup_epochs - 1``,
    ``warmup_epochs - 1 + every_n_epochs``, ... Round ``r`` updates theta (the M-step) unless it is held
    (``r < hold_initial_rounds``: theta stays at its initialisation while the network learns ``p(y | x)``) or frozen
    (``r >= freeze_after``).
    """

    warmup_epochs: int = 6
    every_n_epochs: int = 1
    hold_initial_rounds: int = 3
    freeze_after: int | None = None

    def is_round_epoch(self, epoch: int) -> bool:
        """Whether an EM round runs at the end of ``epoch``."""
        after_warmup = epoch + 1 - self.warmup_epochs
        return after_warmup >= 0 and after_warmup % self.every_n_epochs == 0

    def latest_round_epoch(self, through_epoch: int) -> int | None:
        """The last epoch ``<= through_epoch`` that ends with a round, or ``None``."""
        if through_epoch + 1 < self.warmup_epochs:
            return None
        return through_epoch - (through_epoch + 1 - self.warmup_epochs) % self.every_n_epochs

    def updates_noise_matrix(self, round_index: int) -> bool:
        """Whether round ``round_index`` runs the theta M-step."""
        frozen = self.freeze_after is not None and round_index >= self.freeze_after
        return round_index >= self.hold_initial_rounds and not frozen


@dataclass(frozen=True)
class EMStart:
    """One way to start EM after the shared warm-up: more epochs on the given labels, then an initialisation.

    :class:`~noisy_lightning.callbacks.EMNoiseEstimation` given several starts fits each of them for a trial of
    the same length from the same warm-up state and keeps one by :func:`choose_start`: the first, unless a later
    start agrees with the validation split's given labels significantly more often.

    Args:
        extra_warmup_epochs: epochs on the given labels after the shared warm-up and before the first round (>= 0).
        initialisation: theta's initialisation at the first round (one of :data:`INITIALISATIONS`).
    """

    extra_warmup_epochs: int = 0
    initialisation: Initialisation = "hard_confusion"

    def __post_init__(self) -> None:
        check_int("extra_warmup_epochs", self.extra_warmup_epochs, 0)
        if self.initialisation not in INITIALISATIONS:
            raise ValueError(
                f"initialisation must be one of {', '.join(map(repr, INITIALISATIONS))}; got {self.initialisation!r}"
            )


def choose_start(agreements: Sequence[Tensor], min_z: float) -> tuple[int, list[float]]:
    """Which of several fitted starts to keep, from each one's agreement with held-out given labels.

    ``agreements[s]`` is a boolean vector over the same validation samples: whether start ``s``'s prediction
    ``argmax_i p(i | x)`` equals the given label. Starts are taken in order of preference: start 0 is kept unless a
    later start agrees with the given labels significantly more often than the start kept so far. On paired
    samples, with ``b`` the samples only the later start gets right and ``c`` those only the kept one gets right,
    the McNemar statistic ``z = (b - c) / sqrt(b + c)`` (0 when ``b + c = 0``) must exceed ``min_z``. Differences of a
    few samples, which two good fits show on any draw, leave the preferred start in place; a start that merged
    two classes loses hundreds of samples to one that did not.

    Returns the index of the start kept and, for each start, ``z`` against the start kept before it was considered
    (0 for start 0).
    """
    check_float("min_z", min_z, 0)
    if not agreements:
        raise ValueError("choose_start needs the agreements of at least one start")
    kept, statistics = 0, [0.0]
    for index in range(1, len(agreements)):
        candidate, incumbent = agreements[index].bool(), agreements[kept].bool()
        if candidate.shape != incumbent.shape:
            raise ValueError("every start must be scored on the same validation samples")
        only_candidate = (candidate & ~incumbent).sum().item()
        only_incumbent = (incumbent & ~candidate).sum().item()
        disagreements = only_candidate + only_incumbent
        z = (only_candidate - only_incumbent) / math.sqrt(disagreements) if disagreements else 0.0
        statistics.append(z)
        if z > min_z:
            kept = index
    return kept, statistics


# The starts that EMNoiseEstimation tries by default: the warm-up's end with the hard confusion, and 4 epochs later
# with the balanced assignment, which rescues the draws of near-50% asymmetric noise where the argmax merges two
# classes (benchmarks/results/em_starts.md).
DEFAULT_STARTS: tuple[EMStart, ...] = (EMStart(0, "hard_confusion"), EMStart(4, "balanced"))


def noisy_label_fit(class_probs: Tensor, noise_matrix: Tensor, given_labels: Tensor) -> dict[str, float]:
    """How well ``p(y | x)`` and ``theta`` explain given labels that the network was not trained on.

    ``noisy_accuracy = mean_t 1[argmax_i p(i | x_t) = z_t]`` and ``noisy_nll = -mean_t log sum_i p(i | x_t)
    theta[i, z_t]``. Both use the given labels only. In expectation ``noisy_accuracy`` is ``sum_{y, k} P(y, argmax =
    k) theta[y, k]``: a right prediction earns ``theta[y, y]`` and a wrong one ``theta[y, k]``, so with a diagonally
    dominant ``theta`` it usually, though not always, ranks two networks as their clean accuracy would.
    """
    check_log_probs(class_probs.clamp_min(1e-30).log(), "class_probs")
    labels = given_labels.long()
    accuracy = (class_probs.argmax(dim=1) == labels).double().mean()
    label_probs = (class_probs.double() @ noise_matrix.double().to(class_probs.device))[
        torch.arange(labels.numel(), device=labels.device), labels
    ]
    return {"noisy_accuracy": accuracy.item(), "noisy_nll": -label_probs.clamp_min(1e-30).log().mean().item()}


class ProbabilitySums:
    """Per-sample sums of ``p(y | x)`` and how often each sample was scored, indexed by its row in the pool.

    A sample that a padded distributed sampler serves twice is averaged, not counted twice. :meth:`mean` reduces
    the sums across ranks with the ``reduce_sum`` it is given, so that every rank sees the same probabilities.
    """

    def __init__(self, pool_size: int, num_classes: int, device: torch.device | str = "cpu") -> None:
        self.sums = torch.zeros(pool_size, num_classes, device=device)
        self.counts = torch.zeros(pool_size, device=device)

    def add(self, index: Tensor, probabilities: Tensor) -> None:
        self.sums.index_add_(0, index, probabilities.float())
        self.counts.index_add_(0, index, torch.ones_like(index, dtype=self.counts.dtype))

    def mean(self, reduce_sum: Callable[[Tensor], Tensor] = lambda tensor: tensor) -> tuple[Tensor, Tensor]:
        """``(p(y | x) for the scored rows [R, K], the boolean mask of scored rows [N])``."""
        sums, counts = reduce_sum(self.sums), reduce_sum(self.counts)
        scored = counts > 0
        return sums[scored] / counts[scored].unsqueeze(1), scored

    def merge(self, other: ProbabilitySums) -> ProbabilitySums:
        """Add ``other``'s sums and counts (e.g. another split's pass) to these."""
        self.sums += other.sums.to(self.sums.device)
        self.counts += other.counts.to(self.counts.device)
        return self

    def to(self, device: torch.device | str) -> ProbabilitySums:
        self.sums, self.counts = self.sums.to(device), self.counts.to(device)
        return self


@dataclass(frozen=True)
class RoundResult:
    """What one EM round produced: theta after the round (float64), the E-step posteriors of the scored samples,
    and theta's initialisation when the round was the first."""

    noise_matrix: Tensor
    posterior: Tensor
    initial_noise_matrix: Tensor | None = None
    # With ``judged_by``: whether the M-step's theta was kept (``None`` when no M-step was judged).
    m_step_kept: bool | None = None


def em_round(
    class_probs: Tensor,
    given_labels: Tensor,
    noise_matrix: Tensor | None,
    *,
    update_noise_matrix: bool = True,
    initialisation: Initialisation = "hard_confusion",
    for_noise_matrix: Tensor | None = None,
    judged_by: Tensor | None = None,
) -> RoundResult:
    """One EM round: initialise theta if ``noise_matrix`` is ``None``, E-step, then (optionally) the theta M-step.

    Args:
        class_probs: ``[R, K]`` ``p(y | x)`` of the scored samples.
        given_labels: their ``[R]`` given labels.
        noise_matrix: theta before the round, or ``None`` for the first round, which initialises it from the
            confusion between ``class_probs`` and the given labels (:func:`initial_noise_matrix`, hard or soft;
            ``"balanced"`` first re-weights ``class_probs`` with :func:`balanced_assignment` and uses the result
            in the first E-step too).
        update_noise_matrix: run the M-step (``False``: the round only updates the posteriors).
        for_noise_matrix: boolean mask over the ``R`` samples that feed the initialisation and the M-step
            (default: all), e.g. only the validation split.
        judged_by: boolean mask over the ``R`` samples whose given labels judge the M-step (held-out samples,
            disjoint from ``for_noise_matrix``): the new theta is kept only if it explains them at least as well
            as the theta before the round, ``noisy_nll`` of :func:`noisy_label_fit` with this round's
            ``p(y | x)``; otherwise theta stays as it was. ``None``: the M-step is always kept.
    """
    num_classes = class_probs.shape[1]
    mask = torch.ones_like(given_labels, dtype=torch.bool) if for_noise_matrix is None else for_noise_matrix
    initial = None
    if noise_matrix is None:
        if initialisation == "balanced":
            frequencies = torch.bincount(given_labels[mask], minlength=num_classes)
            class_probs = balanced_assignment(class_probs, frequencies)
        hard = initialisation != "soft_confusion"
        initial = initial_noise_matrix(class_probs[mask], given_labels[mask], num_classes, hard=hard)
        noise_matrix = initial
    noise_matrix = noise_matrix.double()
    # posterior() raises on NaN/Inf before anything is returned, so a diverged network leaves theta to the caller.
    posterior_ = posterior(class_probs.clamp_min(1e-30).log(), noise_matrix, given_labels)
    kept = None
    if update_noise_matrix:
        statistics = noise_statistics(posterior_[mask], given_labels[mask], num_classes)
        proposed = normalise_rows(statistics, noise_matrix)
        if judged_by is not None:
            # A network that memorises wrong labels pulls the training-split M-step toward the identity; labels it
            # never trained on do not follow, so they refuse such a step (and keep every step toward the truth).
            held_probs, held_labels = class_probs[judged_by], given_labels[judged_by]
            before = noisy_label_fit(held_probs, noise_matrix, held_labels)["noisy_nll"]
            after = noisy_label_fit(held_probs, proposed, held_labels)["noisy_nll"]
            kept = after <= before
            proposed = proposed if kept else noise_matrix
        noise_matrix = proposed
    return RoundResult(noise_matrix, posterior_, initial, kept)


def diagnostics(
    noise_matrix: Tensor,
    true_noise_matrix: Tensor,
    class_probs: Tensor,
    given_labels: Tensor,
    clean_labels: Tensor,
) -> dict[str, float]:
    """Ground-truth measures of an EM state (synthetic noise only): theta against ``T``, corrections against truth.

    ``class_probs`` are posteriors (or any class probabilities) of samples with these given and clean labels.
    Keys: ``theta_error`` (:func:`noise_matrix_error`), ``theta_max_abs_error``, ``label_recovery``,
    ``flip_precision`` and ``flip_recall`` (:func:`flip_precision_recall`).
    """
    precision, recall = flip_precision_recall(class_probs, given_labels, clean_labels)
    return {
        "theta_error": noise_matrix_error(noise_matrix, true_noise_matrix),
        "theta_max_abs_error": noise_matrix_max_abs_error(noise_matrix, true_noise_matrix),
        "label_recovery": label_recovery(class_probs, clean_labels),
        "flip_precision": precision,
        "flip_recall": recall,
    }
