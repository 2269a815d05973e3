"""Lightning callbacks: ``EMNoiseEstimation`` schedules EM rounds; ``NoiseMatrixEstimation`` sets the noise matrix of
the loss-correction methods once; ``NoisyLabelFigures`` draws the figures.

The mathematics lives in :mod:`noisy_lightning.em`, ``theta`` in the model's noise layer
(:mod:`noisy_lightning.noise_layer`), and the data contract in :mod:`noisy_lightning.contract`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torchmetrics import Metric

from noisy_lightning import em, peers
from noisy_lightning.checks import check_bool, check_choice, check_float, check_int, check_optional_int
from noisy_lightning.contract import NoisyLabelData, require_noisy_label_data

EStepSource = Literal["inference", "train_pass"]


class RoundRecord(NamedTuple):
    """One EM round: its place among all rounds of the fit (from 1), the start it belongs to, its place within that
    start (from 1) and theta after it (on the CPU)."""

    index: int
    start: int
    round_in_start: int
    noise_matrix: Tensor


def on_devices_of(saved: dict[str, Any], live: dict[str, Any]) -> dict[str, Any]:
    """``saved`` with each tensor moved to the device of the tensor of the same name in ``live``."""
    return {
        name: value.to(live[name].device) if isinstance(value, Tensor) and isinstance(live.get(name), Tensor) else value
        for name, value in saved.items()
    }


class EMNoiseEstimation(L.Callback):
    """Bekker & Goldberger's EM (ICASSP 2016): re-estimate the noise matrix ``theta`` at the ends of epochs.

    The network trains on the given labels for ``warmup_epochs``. Then, at the end of every ``every_n_epochs``-th
    epoch, an EM round runs over the training split:

    - first round only: ``theta[i, j] ∝ sum_t q[t, i] 1[z_t = j]``, the row-normalised confusion between the
      network's predictions ``q`` (hard: one-hot argmax, by default) and the given labels ``z``;
    - E-step: ``c[t, i] ∝ p(y = i | x_t) theta[i, z_t]``;
    - M-step (skipped for the first ``hold_initial_rounds`` rounds and after ``freeze_noise_matrix_after``):
      ``theta[i, j] ∝ sum_t c[t, i] 1[z_t = j]``.

    Between rounds the model's noise layer trains the network on the posteriors ``c``. ``theta`` lives in that
    layer (``model.noise_matrix``), so it is saved with the model; this callback saves its schedule state.
    Under data parallelism the per-sample ``p(y | x)`` are summed across ranks first, so every rank computes the
    same round as a single process would. ``docs/em.md`` explains the defaults and how they were measured.

    Args:
        warmup_epochs: epochs on the given labels before the first round (>= 1).
        every_n_epochs: epochs between two rounds (>= 1).
        e_step: where ``p(y | x)`` comes from: ``"train_pass"`` (the outputs of the epoch's training steps, with
            dropout and augmentation on and each sample scored by the weights of its own step: free, and the
            network memorises its wrong labels less there, so theta stays near T under heavy noise; each start's
            first round, which initialises theta, still reads an eval-mode pass) or ``"inference"`` (an eval-mode
            pass over the training split at every round's epoch end, the paper's). ``None``: ``"train_pass"``, or
            ``"inference"`` with ``noise_matrix_from="validation"``.
        convergence_tol: stop training once a round that updates theta changes it by less than this (max absolute
            entry); ``None`` never stops early.
        freeze_noise_matrix_after: rounds after which theta stays fixed (``None``: never).
        noise_matrix_from: ``"train"`` or ``"validation"``: the split whose posteriors feed the M-step (the
            validation split is never trained on; needs ``e_step="inference"``, which ``e_step=None`` then picks).
        initialisation: ``"hard_confusion"``, ``"soft_confusion"`` (the paper's) or ``"balanced"``
            (:func:`noisy_lightning.em.balanced_assignment`).
        hold_initial_rounds: rounds (>= 0) that keep theta at its initialisation.
        starts: ways to start EM after the warm-up (:class:`~noisy_lightning.em.EMStart`: extra epochs on the
            given labels, then an initialisation). ``None``: :data:`~noisy_lightning.em.DEFAULT_STARTS`, the first
            with ``initialisation``; ``[EMStart(0, initialisation)]`` is a single start. With several, the fit
            tries each from the same warm-up state for ``trial_epochs`` epochs, restoring the weights, optimiser,
            learning-rate schedule, mixed-precision loss scaler and EM state between trials, and continues the
            trial whose network explains the validation split's *given* labels significantly better (``min_z``; no
            clean label is read). The Trainer's
            ``max_epochs`` grows by ``(len(starts) - 1) * trial_epochs``, so the kept start trains for as many
            epochs as a single-start fit would. Other callbacks see every epoch, the tried ones included.
        trial_epochs: epochs after the warm-up that each start is fitted before the choice (longer than every
            start's ``extra_warmup_epochs``). A fit with fewer epochs than this left after the warm-up runs the first
            start only, and says so.
        min_z: how much better a later start must agree with the validation split's given labels than the start
            kept so far to replace it, as the paired (McNemar) statistic of :func:`noisy_lightning.em.choose_start`
            (>= 0; 0 keeps whichever agrees most often).
        validate_noise_matrix: keep each theta M-step after the first round only if the new theta explains the
            validation split's given labels at least as well as the old one (``judged_by`` of
            :func:`noisy_lightning.em.em_round`); a refused step leaves theta as it was. Costs an inference pass over
            the validation split per M-step; needs a validation split and ``noise_matrix_from="train"``.

    Logged each epoch once EM has started: ``em/round``, ``em/theta_change``, ``em/start`` (with several starts),
    ``em/m_steps_refused`` (with ``validate_noise_matrix``) and, when the data knows the truth,
    ``em/theta_error``, ``em/theta_max_abs_error``, ``em/label_recovery``, ``em/flip_precision`` and
    ``em/flip_recall`` (:func:`noisy_lightning.em.diagnostics`).

    Example::

        trainer = L.Trainer(max_epochs=30, callbacks=[EMNoiseEstimation(warmup_epochs=6)])
        trainer.fit(NoisyLabelClassifier(method="em"), NoisyLabelDataModule(noise_type="pair_flip", noise_rate=0.45))
    """

    def __init__(
        self,
        warmup_epochs: int = 6,
        every_n_epochs: int = 1,
        e_step: EStepSource | None = None,
        convergence_tol: float | None = None,
        freeze_noise_matrix_after: int | None = None,
        noise_matrix_from: Literal["train", "validation"] = "train",
        initialisation: em.Initialisation = "hard_confusion",
        hold_initial_rounds: int = 3,
        starts: Sequence[em.EMStart] | None = None,
        trial_epochs: int = 8,
        min_z: float = 1.0,
        validate_noise_matrix: bool = False,
    ) -> None:
        super().__init__()
        self.schedule = em.EMSchedule(
            check_int("warmup_epochs", warmup_epochs, 1),
            check_int("every_n_epochs", every_n_epochs, 1),
            check_int("hold_initial_rounds", hold_initial_rounds, 0),
            check_optional_int("freeze_noise_matrix_after", freeze_noise_matrix_after, 1),
        )
        if e_step is None:  # the validation split is never trained on, so it has no training pass to read
            e_step = "inference" if noise_matrix_from == "validation" else "train_pass"
        self.e_step = check_choice("e_step", e_step, ("inference", "train_pass"))
        if convergence_tol is not None:
            check_float("convergence_tol", convergence_tol, 0, open_minimum=True)
        self.convergence_tol = convergence_tol
        self.noise_matrix_from = check_choice("noise_matrix_from", noise_matrix_from, ("train", "validation"))
        if noise_matrix_from == "validation" and e_step != "inference":
            raise ValueError("noise_matrix_from='validation' needs e_step='inference' (validation is never trained on)")
        self.initialisation = check_choice("initialisation", initialisation, em.INITIALISATIONS)
        self._starts_given = starts is not None
        if starts is None:
            # The default starts are chosen by the validation split, which an M-step on that split would also read.
            later = em.DEFAULT_STARTS[1:] if noise_matrix_from == "train" else ()
            starts = (em.EMStart(0, initialisation), *later)
        self.starts = tuple(starts) if isinstance(starts, (list, tuple)) else ()
        if not self.starts or not all(isinstance(start, em.EMStart) for start in self.starts):
            raise ValueError(f"starts must be a non-empty list of EMStart, got {starts!r}")
        self.trial_epochs = check_int("trial_epochs", trial_epochs, 1)
        longest = max(start.extra_warmup_epochs for start in self.starts)
        if len(self.starts) > 1 and longest >= trial_epochs:
            raise ValueError(
                f"trial_epochs must be greater than every start's extra_warmup_epochs (so that each trial runs EM), "
                f"got trial_epochs={trial_epochs} and extra_warmup_epochs={longest}"
            )
        self.min_z = check_float("min_z", min_z, 0)
        if len(self.starts) > 1 and noise_matrix_from == "validation":
            raise ValueError(
                "starts with more than one EMStart choose by the validation split, so noise_matrix_from must be "
                "'train' (got 'validation')"
            )
        if check_bool("validate_noise_matrix", validate_noise_matrix) and noise_matrix_from != "train":
            raise ValueError(
                "validate_noise_matrix=True judges the M-step by the validation split, so "
                f"noise_matrix_from must be 'train' (got {noise_matrix_from!r})"
            )
        self.validate_noise_matrix = validate_noise_matrix
        self._max_epochs: int | None = None
        self._fit_loop: Any = None
        self._reset()

    # What a checkpoint saves; theta itself is in the model's noise layer. _EM_STATE is one start's EM progress.
    _EM_STATE = (
        "rounds",
        "last_round_epoch",
        "theta_change",
        "initial_noise_matrix",
        "noise_matrix_history",
        "metrics",
        "m_steps_refused",
    )
    _STATE = (
        *_EM_STATE,
        "rounds_run",
        "trial",
        "kept_start",
        "epoch_offset",
        "trial_scores",
        "trial_agreements",
        "snapshots",
    )

    @property
    def selects(self) -> bool:
        """Whether this callback tries several starts."""
        return len(self.starts) > 1

    @property
    def extra_epochs(self) -> int:
        """Epochs that the trials of the starts that are not kept add to the fit."""
        return (len(self.starts) - 1) * self.trial_epochs

    def _reset(self) -> None:
        self._reset_em()
        self.rounds_run = 0  # rounds of every start, including those of trials that were not kept
        # Trials: -1 before the warm-up ends, i during the trial of starts[i], len(starts) once one is kept.
        self.trial = -1 if self.selects else len(self.starts)
        self.kept_start = 0 if not self.selects else -1
        self.epoch_offset = 0  # trainer epochs spent in trials that were not kept (and, during a trial, before it)
        self.trial_scores: list[dict[str, float]] = []
        self.trial_agreements: list[Tensor] = []  # per trial: which validation samples agree with their given label
        self.snapshots: dict[str, dict[str, Any]] = {}
        # Every round of every start since the fit (or its resume) began, for figures; a trial's end restores the
        # EM state but not these.
        self.round_records: list[RoundRecord] = []
        self._epoch_values: dict[str, float] = {}
        self.active = True  # False for a model without an EM noise layer: the callback then does nothing

    def _reset_em(self) -> None:
        self.rounds = 0
        self.last_round_epoch = -1  # the epoch whose end ran the latest round
        self.theta_change = float("nan")
        self.initial_noise_matrix: Tensor | None = None
        self.noise_matrix_history: list[Tensor] = []  # theta after each round, on the CPU
        self.metrics: dict[str, float] = {}
        self.m_steps_refused = 0  # M-steps that validate_noise_matrix refused
        self._train_pass: em.ProbabilitySums | None = None  # train_pass E-step sums of the current round epoch

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._reset()  # a new fit starts afresh; a resumed one gets its state back from load_state_dict afterwards
        self._max_epochs = trainer.max_epochs  # as the user set it: trials extend the fit loop's copy
        self._fit_loop = trainer.fit_loop  # load_state_dict (no trainer argument) re-extends a resumed fit
        self.active = getattr(getattr(pl_module, "noise_layer", None), "estimated_by_em", False)
        if not self.active:
            # So that one flag (--model.method ce) turns a shipped EM config into its cross-entropy baseline.
            rank_zero_warn(
                f"EMNoiseEstimation is off for this fit: the model's method={getattr(pl_module, 'method', None)!r} "
                "has no noise matrix for EM to estimate (use method='em' for EM)."
            )
            return
        require_noisy_label_data(trainer.datamodule, "EMNoiseEstimation")
        pool = getattr(trainer.datamodule, "pool", None)
        if self.validate_noise_matrix and pool is not None and len(pool.val_indices) == 0:
            raise ValueError(
                "EMNoiseEstimation(validate_noise_matrix=True) judges each M-step by the validation split's given "
                "labels, but the data has no validation split (val_fraction=0)"
            )
        if trainer.max_epochs is not None and 0 <= trainer.max_epochs < self.schedule.warmup_epochs:
            rank_zero_warn(  # not an error: a short fit that a later fit resumes is legitimate
                f"EMNoiseEstimation(warmup_epochs={self.schedule.warmup_epochs}) runs its first EM round at the end "
                f"of epoch {self.schedule.warmup_epochs}, but Trainer(max_epochs={trainer.max_epochs}) stops before "
                "it, so this fit trains on the noisy labels only. Lower warmup_epochs or raise max_epochs."
            )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._give_back_max_epochs(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._give_back_max_epochs(trainer)  # Lightning skips teardown when the fit raises

    def _give_back_max_epochs(self, trainer: L.Trainer) -> None:
        # Trials extend the fit loop's max_epochs; a Trainer used again (or read afterwards) has the user's value.
        if self._fit_loop is trainer.fit_loop and self._max_epochs is not None:
            trainer.fit_loop.max_epochs = self._max_epochs

    # ---- when rounds run ---------------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A checkpoint saved after an epoch's last step but before its end hooks resumes in the next epoch, and
        # Lightning never calls on_train_epoch_end for the saved one: do its work now, with the same weights.
        self._end_of_epoch(trainer, pl_module, through_epoch=trainer.current_epoch - 1)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end_of_epoch(trainer, pl_module, through_epoch=trainer.current_epoch)
        if self._epoch_values:
            # Every rank holds the same values; sync_dist only keeps Lightning from warning (a few scalars an epoch).
            pl_module.log_dict(self._epoch_values, on_step=False, on_epoch=True, sync_dist=True)

    def _em_values(self) -> dict[str, float]:
        """What the epoch logs under ``em/``: the state of the start being fitted, nothing before its first round."""
        if self.rounds == 0:
            return {}
        values = {"em/round": float(self.rounds), "em/theta_change": self.theta_change}
        if self.selects:
            values["em/start"] = float(self.start_index)
        if self.validate_noise_matrix:
            values["em/m_steps_refused"] = float(self.m_steps_refused)
        return values | {f"em/{key}": value for key, value in self.metrics.items()}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.active and 0 <= self.trial < len(self.starts):
            rank_zero_warn(
                f"EMNoiseEstimation: the fit stopped during the trial of EM start {self.trial} (early stopping, a time "
                "limit or an interruption), before a start was chosen: the model is that trial's state. Resume the "
                "fit from its checkpoint to finish the trials."
            )

    def _end_of_epoch(self, trainer: L.Trainer, pl_module: L.LightningModule, through_epoch: int) -> None:
        self._epoch_values = {}
        if not self.active:
            return
        epoch = through_epoch - self.epoch_offset  # counted as if the fit had tried one start only
        warmup_end = self.schedule.warmup_epochs - 1
        if self.trial == -1 and epoch >= warmup_end:
            self._begin_trials(trainer, pl_module, epochs_done=epoch + 1)
        self._run_due_round(trainer, pl_module, epoch)
        # Read before a trial's end restores the snapshot, so the epoch logs the round it ran, not the restored state.
        self._epoch_values = self._em_values()
        if 0 <= self.trial < len(self.starts) and epoch >= warmup_end + self.trial_epochs:
            self._end_trial(trainer, pl_module)

    @property
    def start_index(self) -> int:
        """The start being fitted (during its trial) or kept (after the choice)."""
        return self.kept_start if self.trial >= len(self.starts) else max(self.trial, 0)

    def _schedule(self) -> em.EMSchedule:
        extra = self.starts[self.start_index].extra_warmup_epochs
        return replace(self.schedule, warmup_epochs=self.schedule.warmup_epochs + extra)

    def _run_due_round(self, trainer: L.Trainer, pl_module: L.LightningModule, through_epoch: int) -> None:
        due = self._schedule().latest_round_epoch(through_epoch)
        if due is not None and due > self.last_round_epoch:
            self.em_round(trainer, pl_module, epoch=due)

    # ---- trials of several starts ------------------------------------------------------------------------------
    def _extend_fit(self, fit_loop: Any) -> None:
        if self._max_epochs is not None and self._max_epochs >= 0:
            fit_loop.max_epochs = self._max_epochs + self.extra_epochs

    def _begin_trials(self, trainer: L.Trainer, pl_module: L.LightningModule, epochs_done: int) -> None:
        left = None if self._max_epochs is None or self._max_epochs < 0 else self._max_epochs - epochs_done
        message = ""
        if left is None or left < self.trial_epochs:
            message = (
                f"EMNoiseEstimation: {left} epochs are left after the warm-up, fewer than trial_epochs="
                f"{self.trial_epochs}, so this fit runs the first of its {len(self.starts)} EM starts only. "
                f"Trainer(max_epochs >= {epochs_done + self.trial_epochs}) tries them all."
            )
        if trainer.max_steps is not None and trainer.max_steps > 0:
            # A step budget would be spent on the trials instead of the kept start.
            message = f"EMNoiseEstimation: Trainer(max_steps={trainer.max_steps}) limits the fit by steps, so it runs "
            message += f"the first of its {len(self.starts)} EM starts only."
        if message:
            # The default starts are the library's choice, not the user's: saying so once is enough.
            (rank_zero_warn if self._starts_given else rank_zero_info)(message)
            self.trial, self.kept_start = len(self.starts), 0
            return
        self.snapshots["warmup"] = self._capture(trainer, pl_module)
        self.trial = 0
        self._extend_fit(trainer.fit_loop)

    def _end_trial(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        scores, agreement = self.validation_fit(trainer, pl_module)
        self.trial_scores.append(scores)
        self.trial_agreements.append(agreement.cpu())
        start = self.starts[self.trial]
        rank_zero_info(
            f"EMNoiseEstimation: start {self.trial} ({start.extra_warmup_epochs} extra warm-up epochs, "
            f"{start.initialisation}) ends its trial with validation noisy_accuracy {scores['noisy_accuracy']:.4f}, "
            f"noisy_nll {scores['noisy_nll']:.4f}"
        )
        if self.trial + 1 < len(self.starts):
            self.snapshots[f"trial_{self.trial}"] = self._capture(trainer, pl_module)
            self._restore(trainer, pl_module, self.snapshots["warmup"])
            self.trial += 1
            self.epoch_offset += self.trial_epochs
            # A start without extra warm-up has its first round now, on the restored warm-up weights.
            self._run_due_round(trainer, pl_module, self.schedule.warmup_epochs - 1)
            return
        best, statistics = em.choose_start(self.trial_agreements, self.min_z)
        for score, z in zip(self.trial_scores, statistics, strict=True):
            score["z_against_kept"] = z
        if best != self.trial:
            self._restore(trainer, pl_module, self.snapshots[f"trial_{best}"])
        self.kept_start, self.trial, self.snapshots = best, len(self.starts), {}
        rank_zero_info(
            f"EMNoiseEstimation: keeps start {best} ({self.starts[best]}); paired z of each start against the one "
            f"kept before it: {', '.join(f'{z:.2f}' for z in statistics)} (min_z={self.min_z:g})"
        )

    def validation_fit(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[dict[str, float], Tensor]:
        """:func:`noisy_lightning.em.noisy_label_fit` of the model on the validation split's given labels, and for
        each validation sample (in pool order) whether ``argmax p(y | x)`` equals its given label."""
        pool = trainer.datamodule.pool
        sums = inference_probabilities(trainer, pl_module, indices=pool.val_indices)
        probabilities, scored = sums.mean(lambda tensor: trainer.strategy.reduce(tensor, reduce_op="sum"))
        given = pool.given_labels.to(scored.device)[scored]
        scores = em.noisy_label_fit(probabilities, pl_module.noise_layer.noise_matrix, given)
        return scores, probabilities.argmax(dim=1) == given

    def _capture(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """Everything a trial changes: the weights and theta, optimiser, schedule and loss-scaler states, and EM's
        progress, with every tensor cloned to the CPU (the containers are rebuilt, so nothing aliases the live
        state)."""
        return apply_to_collection(
            {
                "model": pl_module.state_dict(),
                "optimizers": [optimizer.state_dict() for optimizer in trainer.optimizers],
                "schedulers": [config.scheduler.state_dict() for config in trainer.lr_scheduler_configs],
                "precision": trainer.precision_plugin.state_dict(),  # a mixed-precision loss scaler's scale
                "em": {name: getattr(self, name) for name in self._EM_STATE},
            },
            Tensor,
            lambda tensor: tensor.detach().cpu().clone(),
        )

    def _restore(self, trainer: L.Trainer, pl_module: L.LightningModule, state: dict[str, Any]) -> None:
        state = copy.deepcopy(state)  # the optimiser would otherwise update the snapshot's tensors in place
        live = pl_module.state_dict()
        # A metric's persistent state (the running training loss) stays the epoch's own: the module logs it after
        # this hook, and its next epoch resets it anyway.
        metrics = tuple(f"{name}." for name, module in pl_module.named_modules() if name and isinstance(module, Metric))
        saved = {key: live[key] if key.startswith(metrics) else value for key, value in state["model"].items()}
        # load_state_dict copies into parameters and buffers where they are, but it replaces any other persistent
        # tensor by the saved one, which on a GPU would come back on the CPU.
        pl_module.load_state_dict(on_devices_of(saved, live))
        for optimizer, saved in zip(trainer.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        for config, saved in zip(trainer.lr_scheduler_configs, state["schedulers"], strict=True):
            config.scheduler.load_state_dict(saved)
        if state.get("precision"):  # snapshots taken before it was saved have none
            trainer.precision_plugin.load_state_dict(state["precision"])
        for name, value in state["em"].items():
            setattr(self, name, value)
        self._train_pass = None

    # ---- p(y | x) for the E-step -------------------------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.active or self.e_step != "train_pass":
            return
        if not self._schedule().is_round_epoch(trainer.current_epoch - self.epoch_offset):
            return
        if self.rounds == 0:  # a start's first round initialises theta from an inference pass (see em_round)
            return
        if self._train_pass is None:  # sums restored from a mid-epoch checkpoint of this epoch are kept
            pool = trainer.datamodule.pool
            self._train_pass = em.ProbabilitySums(pool.size, pool.num_classes, pl_module.device)
        self._train_pass.to(pl_module.device).add(batch.index, torch.softmax(outputs["logits"].float(), dim=1))

    # ---- one round ---------------------------------------------------------------------------------------------
    def em_round(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> None:
        """One E-step and (unless held or frozen) theta M-step; the first round initialises theta."""
        sums, self._train_pass = self._train_pass, None
        # A start's first round always reads an inference pass: theta's initialisation is the confusion of the
        # network's argmax with the given labels, which dropout and shifts blur while the network is still young.
        # A later start's first round also runs on restored weights, which no training pass has seen.
        if self.rounds == 0:  # sums of a first round epoch restored from an older checkpoint are partial: drop them
            sums = None
        elif self.e_step == "train_pass" and sums is None:
            rank_zero_warn(
                f"EMNoiseEstimation: no training-pass outputs were collected for epoch {epoch}; "
                "this round's E-step uses an inference pass instead"
            )
        pool, layer = trainer.datamodule.pool, pl_module.noise_layer
        update = self.schedule.updates_noise_matrix(self.rounds)
        # The first round initialises theta from the same probabilities: there is no earlier theta to judge against.
        judge = self.validate_noise_matrix and update and self.rounds > 0
        if sums is None:
            with_validation = self.noise_matrix_from == "validation" or judge
            sums = inference_probabilities(trainer, pl_module, with_validation)
        else:
            sums = sums.to(pl_module.device)  # sums restored from a checkpoint come back on the CPU
            if judge:  # a training-pass E-step has no validation outputs: score that split in eval mode
                sums.merge(inference_probabilities(trainer, pl_module, indices=pool.val_indices))
        probabilities, scored = sums.mean(lambda tensor: trainer.strategy.reduce(tensor, reduce_op="sum"))
        given = pool.given_labels.to(scored.device)[scored]
        in_train = _mask(pool.train_indices, scored)
        result = em.em_round(
            probabilities,
            given,
            layer.noise_matrix if self.rounds > 0 else None,
            update_noise_matrix=update,
            initialisation=self.starts[self.start_index].initialisation,
            for_noise_matrix=_mask(pool.val_indices, scored) if self.noise_matrix_from == "validation" else in_train,
            judged_by=_mask(pool.val_indices, scored) if judge else None,
        )
        if result.m_step_kept is False:
            self.m_steps_refused += 1
        if result.initial_noise_matrix is not None:
            self.initial_noise_matrix = result.initial_noise_matrix.cpu()
        self.theta_change = (result.noise_matrix - layer.noise_matrix.double()).abs().max().item()
        layer.update(result.noise_matrix, result.posterior, scored)
        self.noise_matrix_history.append(layer.noise_matrix.detach().cpu().clone())
        if pool.knows_truth:
            clean = pool.clean_labels.to(scored.device)[scored]
            self.metrics = em.diagnostics(
                layer.noise_matrix,
                pool.true_transition_matrix,
                result.posterior[in_train],
                given[in_train],
                clean[in_train],
            )
        elif self.rounds == 0:
            rank_zero_info("EMNoiseEstimation: the data has no clean labels, so the ground-truth em/ metrics are off")
        self.rounds += 1
        self.rounds_run += 1
        self.last_round_epoch = epoch
        self.round_records.append(
            RoundRecord(self.rounds_run, self.start_index, self.rounds, self.noise_matrix_history[-1])
        )
        # Held rounds change theta by 0 by design, and so does a refused M-step: neither means convergence.
        updated = self.rounds - 1 > self.schedule.hold_initial_rounds and result.m_step_kept is not False
        chosen = self.trial >= len(self.starts)  # trials run their full length
        if self.convergence_tol is not None and updated and chosen and self.theta_change < self.convergence_tol:
            trainer.should_stop = True

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = {name: getattr(self, name) for name in self._STATE}
        sums = self._train_pass  # a mid-epoch checkpoint of a train_pass round epoch keeps the partial sums
        return state | {"train_pass_sums": None if sums is None else (sums.sums.cpu(), sums.counts.cpu())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name in self._STATE:
            if name in state_dict:
                setattr(self, name, state_dict[name])
        if "trial" not in state_dict and self.rounds > 0:
            # A checkpoint written before starts existed, after EM began: that fit is its first start.
            self.trial, self.kept_start, self.rounds_run, self.epoch_offset = len(self.starts), 0, self.rounds, 0
        trials_began = bool(self.snapshots or self.trial_scores)  # not when a short fit ran one start only
        if trials_began and self._fit_loop is not None:
            # max_epochs comes from the Trainer, not the checkpoint: a fit resumed after its trials began needs
            # the same extension, before the fit loop decides that it is already done.
            self._extend_fit(self._fit_loop)
        self._train_pass = None
        if state_dict["train_pass_sums"] is not None:
            self._train_pass = em.ProbabilitySums(*state_dict["train_pass_sums"][0].shape)
            self._train_pass.sums, self._train_pass.counts = state_dict["train_pass_sums"]


NoiseMatrixEstimator = Literal["anchor", "confusion", "true"]


class NoiseMatrixEstimation(L.Callback):
    """Set the noise matrix ``theta`` of a loss-correction method once: ``method="forward"``, ``"backward"``,
    ``"nal"`` or ``"nal_complex"`` of :class:`~noisy_lightning.NoisyLabelClassifier`, and the forget rate of
    :class:`~noisy_lightning.coteaching.CoTeachingClassifier`.

    The network trains on the given labels for ``warmup_epochs``; at the end of that epoch ``p(z | x)`` is computed
    over the training split (an eval-mode pass, summed across ranks like EM's E-step) and ``theta`` is set from it:

    - ``"anchor"``: Patrini et al.'s anchor points (:func:`noisy_lightning.peers.anchor_noise_matrix`), the estimate
      that forward and backward correction are published with;
    - ``"confusion"``: the soft confusion matrix between ``p(z | x)`` and the given labels
      (:func:`noisy_lightning.em.initial_noise_matrix`), the noise adaptation layer's initialisation;
    - ``"true"``: the data's true transition matrix, from the first step (an *oracle*: it needs data that knows its
      corruption, and no real data does).

    ``theta`` lives in the model's noise layer, so checkpoints keep it, and a resumed fit does not estimate it again.

    Args:
        estimator: ``"anchor"``, ``"confusion"`` or ``"true"``; ``None`` takes the model's method's own
            (``NoiseLayer.noise_matrix_estimator``).
        warmup_epochs: epochs on the given labels before the estimate (>= 1).
        anchor_percentile: the percentile in ``(0, 100]`` at which anchors are taken (97, the paper's).
    """

    def __init__(
        self,
        estimator: NoiseMatrixEstimator | None = None,
        warmup_epochs: int = 6,
        anchor_percentile: float = 97.0,
    ) -> None:
        super().__init__()
        self.estimator = (
            None if estimator is None else check_choice("estimator", estimator, ("anchor", "confusion", "true"))
        )
        self.warmup_epochs = check_int("warmup_epochs", warmup_epochs, 1)
        self.anchor_percentile = check_float("anchor_percentile", anchor_percentile, 0, 100, open_minimum=True)
        self.active_estimator: str | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        layer = getattr(pl_module, "noise_layer", None)
        own = getattr(layer, "noise_matrix_estimator", None)
        if own is None:
            # A layer without an estimator of its own (cross-entropy, GCE, EM, co-teaching with a given forget rate)
            # does not use a theta set once; setting one would only change its val/nll_noisy and label issues.
            self.active_estimator = None
            rank_zero_warn(
                f"NoiseMatrixEstimation is off for this fit: the model's method={getattr(pl_module, 'method', None)!r} "
                "does not train with a noise matrix set once"
            )
            return
        self.active_estimator = self.estimator or own
        data = require_noisy_label_data(trainer.datamodule, "NoiseMatrixEstimation")
        if self.active_estimator == "true" and not data.pool.knows_truth:
            raise ValueError(
                "NoiseMatrixEstimation(estimator='true') needs data that knows its true transition matrix "
                "(synthetic corruption); use estimator='anchor' for real noisy labels"
            )
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None else -1
        if self.active_estimator != "true" and 0 <= max_epochs <= self.warmup_epochs:
            rank_zero_warn(
                f"NoiseMatrixEstimation(warmup_epochs={self.warmup_epochs}) sets the noise matrix at the end of "
                f"epoch {self.warmup_epochs}, but Trainer(max_epochs={max_epochs}) stops there or before, "
                "so this fit trains on the given labels only. Lower warmup_epochs or raise max_epochs."
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.active_estimator == "true":
            if not pl_module.noise_layer.is_started:
                pl_module.noise_layer.update(trainer.datamodule.pool.true_transition_matrix)
        elif self.active_estimator is not None and trainer.current_epoch >= self.warmup_epochs:
            # Resumed from a checkpoint saved after the warm-up's last step but before its epoch-end hooks.
            self._estimate(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.active_estimator not in (None, "true") and trainer.current_epoch + 1 >= self.warmup_epochs:
            self._estimate(trainer, pl_module)

    def _estimate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        layer = pl_module.noise_layer
        if layer.is_started:
            return
        sums = inference_probabilities(trainer, pl_module, with_validation=False)
        probabilities, scored = sums.mean(lambda tensor: trainer.strategy.reduce(tensor, reduce_op="sum"))
        if self.active_estimator == "anchor":
            noise_matrix = peers.anchor_noise_matrix(probabilities, self.anchor_percentile)
        else:
            pool = trainer.datamodule.pool
            given = pool.given_labels.to(scored.device)[scored]
            em.check_log_probs(probabilities.log(), "the class probabilities")
            # The noise adaptation layer's code counts argmax predictions against the given labels (a hard
            # confusion matrix); the soft one mixes each row with the rows of the classes that flip into it.
            noise_matrix = em.initial_noise_matrix(probabilities.double(), given, pool.num_classes, hard=True)
        layer.update(noise_matrix)
        # A learned theta (the noise adaptation layer) had zero gradients until now, while Adam counted steps: its
        # moments would start with no bias correction and a step several times the learning rate. Start them afresh.
        for optimizer in trainer.optimizers:
            for parameter in layer.parameters():
                optimizer.state.pop(parameter, None)


@torch.no_grad()
def inference_probabilities(
    trainer: L.Trainer, pl_module: L.LightningModule, with_validation: bool = False, indices: Tensor | None = None
) -> em.ProbabilitySums:
    """``p(y | x)`` of the training split (and the validation split), or of the pool rows ``indices``, from an
    eval-mode pass on this rank's share.

    Inputs go through the precision plugin as in a validation step, so EM runs under any Trainer precision.
    """
    data: NoisyLabelData = trainer.datamodule
    pool = data.pool
    sums = em.ProbabilitySums(pool.size, pool.num_classes, pl_module.device)
    if indices is None:
        indices = torch.cat([pool.train_indices, pool.val_indices]) if with_validation else pool.train_indices
    precision = trainer.precision_plugin
    was_training = pl_module.training
    pl_module.eval()
    try:
        for batch in data.pool_dataloader(indices):
            x = precision.convert_input(batch.x.to(pl_module.device, non_blocking=True))
            with precision.forward_context():
                logits = pl_module(x)
            sums.add(batch.index.to(pl_module.device), torch.softmax(logits.float(), dim=1))
    finally:
        pl_module.train(was_training)
    return sums


def _mask(indices: Tensor, scored: Tensor) -> Tensor:
    """Which of the scored pool rows are in ``indices`` (a boolean mask over ``scored``'s true entries)."""
    member = torch.zeros_like(scored)
    member[indices.to(scored.device)] = True
    return member[scored]


class NoisyLabelFigures(L.Callback):
    """Draw the figures of :mod:`noisy_lightning.plots` during ``fit`` and put them where Lightning users look.

    Each figure is saved as a PNG and a PDF under ``<trainer.log_dir>/figures/`` and, with a TensorBoard logger,
    logged to its Images tab (the PNG's pixels, at ``dpi``). After each EM round: the noise matrix (``theta``, and
    the true ``T`` and the difference when the data knows it). At the end of fit: the correction grid, the confusion
    matrices (when the data knows the clean labels) and the training curves. Figures are drawn on global rank 0 only.

    Args:
        grid_size: the correction grid is ``grid_size x grid_size`` images, in ``[1, 30]``.
        grid_selection: ``"first"``, ``"random"``, ``"most_confident"`` or ``"least_confident"`` changes.
        track_test_accuracy: evaluate the test set after every epoch for the curves (synthetic experiments).
        dpi: resolution of the PNG files, in ``[30, 600]`` (the PDFs are vector graphics).
    """

    def __init__(
        self,
        grid_size: int = 10,
        grid_selection: Literal["first", "random", "most_confident", "least_confident"] = "random",
        track_test_accuracy: bool = True,
        dpi: int = 150,
    ) -> None:
        super().__init__()
        self.grid_size = check_int("grid_size", grid_size, 1, 30)
        self.grid_selection = check_choice(
            "grid_selection", grid_selection, ("first", "random", "most_confident", "least_confident")
        )
        self.track_test_accuracy = check_bool("track_test_accuracy", track_test_accuracy)
        self.dpi = check_int("dpi", dpi, 30, 600)
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.em_round_epochs: list[int] = []
        self.saved: list[Path] = []
        self._rounds_seen = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        folder = self._folder(trainer)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"NoisyLabelFigures writes into {folder}, which exists and is not a folder")

    def _folder(self, trainer: L.Trainer) -> Path:
        return Path(trainer.log_dir or trainer.default_root_dir) / "figures"

    def _em_callback(self, trainer: L.Trainer) -> EMNoiseEstimation | None:
        return next((cb for cb in trainer.callbacks if isinstance(cb, EMNoiseEstimation)), None)

    def _emit(self, trainer: L.Trainer, figure: Any, name: str) -> None:
        import numpy as np
        from PIL import Image

        from noisy_lightning.plots import save_figure

        path = save_figure(figure, self._folder(trainer) / f"{name}.png", dpi=self.dpi)
        self.saved.append(path)
        loggers = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
        if loggers:
            # TensorBoard gets the PNG's pixels: drawing the figure once more for it would cost as much as the PNG.
            with Image.open(path) as png:
                pixels = np.asarray(png.convert("RGB"))  # uint8, a quarter of a float RGBA copy
            for logger in loggers:
                logger.experiment.add_image(name, pixels, global_step=trainer.global_step, dataformats="HWC")

    @staticmethod
    def _predict(pl_module: L.LightningModule, images: Tensor) -> Tensor:
        return pl_module.logits_of(images).argmax(dim=1)

    def _record_epoch(self, trainer: L.Trainer, epoch: int) -> None:
        for key, value in trainer.callback_metrics.items():
            if isinstance(value, Tensor) and value.numel() == 1 and key.split("/")[0] in ("train", "val", "em"):
                self.history.setdefault(key, []).append((epoch, value.item()))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Metrics of the previous epoch are complete here, whatever the order of the callbacks' epoch-end hooks.
        if trainer.current_epoch > 0 and trainer.is_global_zero:
            self._record_epoch(trainer, trainer.current_epoch - 1)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        test_images = getattr(trainer.datamodule, "test_images", None)
        if not trainer.is_global_zero or not self.track_test_accuracy or test_images is None:
            return
        predictions = self._predict(pl_module, test_images)
        accuracy = (predictions == trainer.datamodule.test_labels).double().mean().item()
        self.history.setdefault("test/acc", []).append((trainer.current_epoch, accuracy))

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # An EM round that ran at the end of the previous epoch is drawn once, before training goes on.
        if batch_idx == 0:
            self._draw_new_rounds(trainer, pl_module)

    def _draw_new_rounds(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from noisy_lightning.plots import noise_matrix_figure

        em_callback = self._em_callback(trainer)
        # rounds_run counts every round of the fit: with several EM starts, a later start's rounds count from 1 again.
        if em_callback is None or em_callback.rounds_run == self._rounds_seen:
            return
        # Each round's own record: at the end of a trial the model already holds the next start's theta, and the
        # next start may have run its first round in the same epoch end.
        pending = [record for record in em_callback.round_records if record.index > self._rounds_seen]
        if not pending:  # rounds from before a resume: only the current theta is known
            theta = pl_module.noise_matrix.detach().cpu()
            pending = [RoundRecord(em_callback.rounds_run, em_callback.start_index, em_callback.rounds, theta)]
        self._rounds_seen = em_callback.rounds_run
        epoch = trainer.current_epoch - 1
        if not self.em_round_epochs or self.em_round_epochs[-1] != epoch:
            self.em_round_epochs.append(epoch)
        if not trainer.is_global_zero:
            return
        truth = getattr(trainer.datamodule, "true_transition_matrix", None)
        for record in pending:
            start = f" of start {record.start}" if em_callback.selects else ""
            title = f"EM round {record.round_in_start}{start} (after epoch {epoch})"
            self._emit(
                trainer,
                noise_matrix_figure(truth, record.noise_matrix, title),
                f"noise_matrix/round_{record.index:03d}",
            )

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from noisy_lightning import plots
        from noisy_lightning.issues import score_pool

        self._draw_new_rounds(trainer, pl_module)
        if not trainer.is_global_zero:
            return
        self._record_epoch(trainer, trainer.current_epoch - 1)
        if self.history:
            self._emit(trainer, plots.training_curves_figure(self.history, self.em_round_epochs), "training_curves")
        if not isinstance(trainer.datamodule, NoisyLabelData):
            return
        pool = trainer.datamodule.pool
        index = pool.train_indices
        given = pool.given_labels[index]
        clean = None if pool.clean_labels is None else pool.clean_labels[index]
        probabilities, posteriors = score_pool(pl_module, pool)
        corrected = posteriors[index].argmax(dim=1)
        if pool.image_shape is not None and getattr(pl_module.noise_layer, "is_started", False):
            grid = plots.correction_grid_figure(
                pool.images[index],
                given,
                corrected,
                clean,
                self.grid_size,
                self.grid_size,
                self.grid_selection,
                posteriors[index].max(dim=1).values,
                pool.image_shape,
            )
            self._emit(trainer, grid, "correction_grid")
        if clean is None:
            rank_zero_info("NoisyLabelFigures: the data has no clean labels, so the confusion matrices are skipped")
            return
        comparisons = {"train: given": (clean, given)}
        if getattr(pl_module.noise_layer, "is_started", False):
            comparisons["train: corrected"] = (clean, corrected)
        comparisons["train: prediction"] = (clean, probabilities[index].argmax(dim=1))
        test_images = getattr(trainer.datamodule, "test_images", None)
        if test_images is not None:
            comparisons["test: prediction"] = (trainer.datamodule.test_labels, self._predict(pl_module, test_images))
        figure = plots.confusion_matrices_figure(comparisons, pool.num_classes, other_name="label compared")
        self._emit(trainer, figure, "confusion_matrices")
