"""``EMNoiseEstimation``: Bekker & Goldberger's EM noise-matrix re-estimation as a Lightning callback.

The mathematics lives in :mod:`noisy_lightning.em`; this module only schedules it and keeps it
distributed-correct. Under DDP each rank scores a shard of the training pool; per-sample probability sums and
counts are ``all_reduce``-summed into one ``N x K`` table indexed by the sample's pool index, so every rank ends
with the same table, a sample that a sampler served twice is averaged rather than counted twice, and theta is
then computed identically (and equal to a single-process run) on every rank.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from noisy_lightning import em

EStepSource = Literal["inference", "train_pass"]
Initialisation = Literal["hard_confusion", "soft_confusion", "balanced"]


class EMNoiseEstimation(L.Callback):
    """Re-estimate the noise matrix ``theta`` and the label posteriors at epoch ends (Bekker & Goldberger, 2016).

    Schedule: the network trains on the noisy labels for ``warmup_epochs``. At the end of the last warm-up epoch
    theta is initialised to the row-normalised confusion between the network's predictions and the noisy labels
    (hard, from the argmax, by default; the paper's soft version is ``initialisation="soft_confusion"``), then an
    EM round runs: the E-step computes the posteriors
    ``c[t, i] ∝ p(y = i | x_t) theta[i, z_t]`` for the training split and the M-step sets
    ``theta[i, j] ∝ sum_t c[t, i] 1[z_t = j]``. The network then trains on the soft targets ``c`` (the M-step for
    the weights) for ``every_n_epochs`` epochs, after which the next round runs, and so on.

    Why the defaults differ from the paper (measured in ``benchmarks/results/em_variants.md``): a network warmed up
    on noisy labels outputs ``p(z | x)``, not ``p(y | x)``, and ``(p(y | x) = p(z | x), theta = I)`` maximises the
    likelihood as well as the truth does. Under asymmetric noise near 50% (pair-flip 45%, permutation 46%) an
    immediate theta M-step slides to that identity solution (theta error 0.90). Held rounds
    (``hold_initial_rounds``, default 3) keep theta at its initialisation and only update the posteriors, so the
    network first learns ``p(y | x)`` against a fixed theta, and the M-steps that follow converge to T (theta
    error 0.01 on pair-flip 45%). The hard initialisation matters for noise whose soft confusion is nearly
    symmetric: for a 2-cycle of a 46% permutation the soft estimate puts 0.503 and 0.497 on the two classes, and
    the network can settle on the swapped labels; the hard one starts from T itself.

    Both need the warm-up network to rank the classes right (``argmax p(z | x) = y``), which under a 45% flip
    means resolving 0.55 against 0.45. After 2 epochs with dropout and shifts it often does not, and a class or
    a chain of classes then settles one place off (78.6% test on a pair-flip seed). The default warm-up is
    therefore 6 epochs: on MNIST it fixed pair-flip 45% on 6 seeds of 6 and permutation 46% on 7 of 9. The two
    permutation failures are a class that the argmax never picks, merged into its partner, and a 2-cycle the
    network cannot rank yet. ``initialisation="balanced"`` (:func:`noisy_lightning.em.balanced_assignment`)
    removes the first, and ``warmup_epochs=10`` with it fixed both (98.26% over 9 permutation seeds), but the
    same recipe broke pair-flip 45% on one Fashion-MNIST seed of three (68.4%; the 10-epoch warm-up did it, with
    either initialisation) and costs the symmetric rows up to 0.2 point, so it is an option, not the default; the
    README has the numbers. The balanced assignment assumes that the true class frequencies are close to the noisy
    ones (exact for doubly stochastic T on balanced classes). No fixed warm-up was right on every draw: 10 epochs
    with the hard initialisation fixed permutation seeds 3 and 5 but broke seed 8 (76.3%). What worked without
    clean labels is model selection: fit ``warmup_epochs=6`` for 30 and for 50 epochs and ``warmup_epochs=10`` for
    30, and keep the fit whose ``val/acc_noisy`` is highest (98.5% over the 9 permutation seeds, worst 98.2%).

    Args:
        warmup_epochs: epochs of plain cross-entropy on the noisy labels before the first EM round (>= 1; see above
            for why the default is 6). The callback warns when max_epochs ends the fit before the first round.
        every_n_epochs: epochs of training on the posteriors between two EM rounds (>= 1).
        e_step: where ``p(y | x)`` for the E-step comes from. ``"inference"`` (default): a dedicated forward pass
            over the training split in eval mode (no dropout or augmentation, the weights at the epoch's end):
            exact, identical on 1 or N processes, costs one forward pass (about a third of a training epoch).
            ``"train_pass"``: the softmax outputs already computed by ``training_step`` during the epoch: free,
            but each sample is scored by the weights of its own step, with dropout and augmentation on.
        convergence_tol: stop training when an EM round changes theta by less than this (max absolute entry).
            ``None`` (default) never stops early.
        freeze_noise_matrix_after: number of EM rounds after which theta is kept fixed and only the posteriors
            are updated (``None``: never freeze).
        noise_matrix_from: ``"train"`` (default) or ``"validation"``: which split's posteriors feed the theta
            M-step (the validation split is never trained on; needs ``e_step="inference"``).
        initialisation: how theta starts. ``"hard_confusion"`` (default): from the argmax predictions.
            ``"balanced"``: the hard confusion of a class-balanced assignment of the predictions
            (:func:`noisy_lightning.em.balanced_assignment`, each class's share being that of the noisy labels),
            which also replaces ``p(y | x)`` in the first E-step. ``"soft_confusion"`` (the paper's): from the
            predicted probabilities. See :func:`noisy_lightning.em.initial_noise_matrix`.
        hold_initial_rounds: number of EM rounds (>= 0) that keep theta at its initialisation; see above.

    Logged each epoch once EM has started: ``em/round``, ``em/theta_change``, and, when the DataModule knows the
    truth (synthetic noise), ``em/theta_error`` (``||theta - T||_1 / ||T||_1``), ``em/theta_max_abs_error``,
    ``em/label_recovery``, ``em/flip_precision`` and ``em/flip_recall``. With real noisy data the ground-truth
    metrics are skipped.
    """

    def __init__(
        self,
        warmup_epochs: int = 6,
        every_n_epochs: int = 1,
        e_step: EStepSource = "inference",
        convergence_tol: float | None = None,
        freeze_noise_matrix_after: int | None = None,
        noise_matrix_from: Literal["train", "validation"] = "train",
        initialisation: Initialisation = "hard_confusion",
        hold_initial_rounds: int = 3,
    ) -> None:
        super().__init__()
        for name, value in (("warmup_epochs", warmup_epochs), ("every_n_epochs", every_n_epochs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if e_step not in ("inference", "train_pass"):
            raise ValueError(f"e_step must be 'inference' or 'train_pass'; got {e_step!r}")
        if convergence_tol is not None and not convergence_tol > 0:
            raise ValueError(f"convergence_tol must be > 0 or None, got {convergence_tol!r}")
        if freeze_noise_matrix_after is not None and freeze_noise_matrix_after < 1:
            raise ValueError(f"freeze_noise_matrix_after must be >= 1 or None, got {freeze_noise_matrix_after!r}")
        self.warmup_epochs = warmup_epochs
        self.every_n_epochs = every_n_epochs
        self.e_step = e_step
        self.convergence_tol = convergence_tol
        self.freeze_noise_matrix_after = freeze_noise_matrix_after
        if noise_matrix_from not in ("train", "validation"):
            raise ValueError(f"noise_matrix_from must be 'train' or 'validation'; got {noise_matrix_from!r}")
        if noise_matrix_from == "validation" and e_step != "inference":
            raise ValueError("noise_matrix_from='validation' needs e_step='inference' (validation is never trained on)")
        self.noise_matrix_from = noise_matrix_from
        if initialisation not in ("hard_confusion", "soft_confusion", "balanced"):
            raise ValueError(
                f"initialisation must be 'hard_confusion', 'soft_confusion' or 'balanced'; got {initialisation!r}"
            )
        if isinstance(hold_initial_rounds, bool) or not isinstance(hold_initial_rounds, int) or hold_initial_rounds < 0:
            raise ValueError(f"hold_initial_rounds must be an integer >= 0, got {hold_initial_rounds!r}")
        self.initialisation = initialisation
        self.hold_initial_rounds = hold_initial_rounds
        self.rounds = 0
        self.theta_change = float("nan")
        self.initial_noise_matrix: Tensor | None = None  # theta's initialisation, before the first M-step
        self.noise_matrix_history: list[Tensor] = []  # theta after each EM round, on the CPU
        self.posteriors: Tensor | None = None  # N x K over the training pool, rows of unscored samples are 0
        self.last_round_epoch = -1  # the epoch whose end ran the latest EM round
        # train_pass E-step: per-sample sums of p(y | x) over the current epoch; saved in mid-epoch checkpoints.
        self._probability_sums: Tensor | None = None
        self._counts: Tensor | None = None
        self._collecting_epoch = -1

    # ---- schedule ----------------------------------------------------------------------------------------------
    def is_em_epoch(self, epoch: int) -> bool:
        """Whether an EM round runs at the end of (0-based) ``epoch``."""
        epochs_after_warmup = epoch + 1 - self.warmup_epochs
        return epochs_after_warmup >= 0 and epochs_after_warmup % self.every_n_epochs == 0

    # ---- set-up ------------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if getattr(pl_module, "method", None) != "em":
            raise ValueError(
                "EMNoiseEstimation needs NoisyLabelClassifier(method='em'); "
                f"the model has method={getattr(pl_module, 'method', None)!r}"
            )
        datamodule = trainer.datamodule
        needed = ("pool_size", "train_noisy_labels", "train_indices", "pool_dataloader")
        if datamodule is None or not all(hasattr(datamodule, name) for name in needed):
            raise ValueError(
                "EMNoiseEstimation needs a NoisyLabelDataModule (or a DataModule with "
                f"{', '.join(needed)}) passed as Trainer.fit(model, datamodule=...)"
            )
        if trainer.max_epochs is not None and 0 <= trainer.max_epochs < self.warmup_epochs:
            # A warning, not an error: a short fit that a later fit resumes from its checkpoint is legitimate.
            rank_zero_warn(
                f"EMNoiseEstimation(warmup_epochs={self.warmup_epochs}) runs its first EM round at the end of epoch "
                f"{self.warmup_epochs}, but Trainer(max_epochs={trainer.max_epochs}) stops before it, so this fit "
                "trains on the noisy labels only. Lower warmup_epochs or raise max_epochs."
            )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        self._noisy_labels = datamodule.train_noisy_labels.to(pl_module.device)
        if self.posteriors is not None:  # restored from a checkpoint
            if self.posteriors.shape != (datamodule.pool_size, pl_module.num_classes):
                raise ValueError(
                    f"the checkpoint's posterior table has shape {tuple(self.posteriors.shape)}, but the data has "
                    f"{datamodule.pool_size} samples and {pl_module.num_classes} classes"
                )
            self.posteriors = self.posteriors.to(pl_module.device)
            pl_module.posteriors = self.posteriors
        if self._probability_sums is not None:  # a train_pass epoch interrupted by a checkpoint
            self._probability_sums = self._probability_sums.to(pl_module.device)
            self._counts = self._counts.to(pl_module.device)

    # ---- collecting p(y | x) -----------------------------------------------------------------------------------
    def _collecting(self, trainer: L.Trainer) -> bool:
        return self.e_step == "train_pass" and self.is_em_epoch(trainer.current_epoch)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._prepare_epoch(trainer, pl_module)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Also here, not only at the epoch start: Lightning skips on_train_epoch_start for the epoch that follows a
        # checkpoint saved after an epoch's last step.
        self._prepare_epoch(trainer, pl_module)

    def _prepare_epoch(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A run resumed from a checkpoint saved after the last step of an EM epoch, but before that epoch's end
        # hooks, never sees on_train_epoch_end for it: run the missed round now, with the same weights.
        due = self._latest_em_epoch_before(trainer.current_epoch)
        if due is not None and due > self.last_round_epoch:
            self.em_round(trainer, pl_module, epoch=due)
        # Sums restored from a mid-epoch checkpoint of this epoch are kept; otherwise a train_pass epoch starts at 0.
        if self._collecting(trainer) and self._collecting_epoch != trainer.current_epoch:
            pool_size = trainer.datamodule.pool_size
            self._probability_sums = torch.zeros(pool_size, pl_module.num_classes, device=pl_module.device)
            self._counts = torch.zeros(pool_size, device=pl_module.device)
            self._collecting_epoch = trainer.current_epoch

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._collecting(trainer) and self._probability_sums is not None:
            index = batch[2]
            self._probability_sums.index_add_(0, index, torch.softmax(outputs["logits"].float(), dim=1))
            self._counts.index_add_(0, index, torch.ones_like(index, dtype=self._counts.dtype))

    @torch.no_grad()
    def _inference_pass(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[Tensor, Tensor]:
        datamodule = trainer.datamodule
        sums = torch.zeros(datamodule.pool_size, pl_module.num_classes, device=pl_module.device)
        counts = torch.zeros(datamodule.pool_size, device=pl_module.device)
        was_training = pl_module.training
        pl_module.eval()
        try:
            indices = datamodule.train_indices
            if self.noise_matrix_from == "validation":
                indices = torch.cat([indices, datamodule.val_indices])
            for x, _, index in datamodule.pool_dataloader(indices):
                x, index = x.to(pl_module.device, non_blocking=True), index.to(pl_module.device, non_blocking=True)
                with trainer.precision_plugin.val_step_context():
                    logits = pl_module(x)
                sums.index_add_(0, index, torch.softmax(logits.float(), dim=1))
                counts.index_add_(0, index, torch.ones_like(index, dtype=counts.dtype))
        finally:
            pl_module.train(was_training)
        return sums, counts

    def _class_probabilities(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[Tensor, Tensor]:
        """``p(y | x)`` for every scored pool sample, identical on all ranks, and the mask of scored samples."""
        if self.e_step == "inference":
            sums, counts = self._inference_pass(trainer, pl_module)
        else:
            sums, counts = self._probability_sums, self._counts
            self._probability_sums = self._counts = None
        sums = trainer.strategy.reduce(sums, reduce_op="sum")
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        scored = counts > 0
        return sums[scored] / counts[scored].unsqueeze(1), scored

    # ---- the EM round ------------------------------------------------------------------------------------------
    def _latest_em_epoch_before(self, epoch: int) -> int | None:
        """The last epoch ``< epoch`` whose end has an EM round, or ``None``."""
        last = epoch - 1
        if last + 1 < self.warmup_epochs:
            return None
        return last - (last + 1 - self.warmup_epochs) % self.every_n_epochs

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.is_em_epoch(trainer.current_epoch) and self.last_round_epoch < trainer.current_epoch:
            self.em_round(trainer, pl_module, epoch=trainer.current_epoch)
        if self.rounds > 0:
            self._log_metrics(trainer, pl_module)

    def em_round(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int | None = None) -> None:
        """One E-step and theta M-step over the training split; initialises theta on the first round.

        ``epoch`` is the epoch whose end the round belongs to (default: the current one).
        """
        probabilities, scored = self._class_probabilities(trainer, pl_module)
        noisy_labels = self._noisy_labels[scored]
        num_classes = pl_module.num_classes
        # Which scored rows feed the theta M-step: the training split, or the never-trained-on validation split.
        estimation_split = trainer.datamodule.val_indices if self.noise_matrix_from == "validation" else None
        for_theta = torch.ones_like(noisy_labels, dtype=torch.bool)
        if estimation_split is not None:
            in_split = torch.zeros_like(scored)
            in_split[estimation_split.to(scored.device)] = True
            for_theta = in_split[scored]
        previous = pl_module.noise_matrix.double()
        if self.rounds == 0:
            if self.initialisation == "balanced":
                # The first E-step uses these balanced probabilities too, so that the first posterior table (the
                # targets under em_targets="stored") does not hand a class the argmax never picks back to its partner.
                frequencies = torch.bincount(noisy_labels[for_theta], minlength=num_classes)
                probabilities = em.balanced_assignment(probabilities, frequencies)
            hard = self.initialisation != "soft_confusion"
            previous = em.initial_noise_matrix(
                probabilities[for_theta], noisy_labels[for_theta], num_classes, hard=hard
            )
            self.initial_noise_matrix = previous.cpu()
        # posterior() raises on NaN/Inf before anything is overwritten, so a diverged network leaves theta intact.
        posterior = em.posterior(probabilities.clamp_min(1e-30).log(), previous, noisy_labels)
        held = self.rounds < self.hold_initial_rounds
        frozen = held or (self.freeze_noise_matrix_after is not None and self.rounds >= self.freeze_noise_matrix_after)
        statistics = em.noise_statistics(posterior[for_theta], noisy_labels[for_theta], num_classes)
        theta = previous if frozen else em.normalise_rows(statistics, previous)

        table = torch.zeros(scored.numel(), num_classes, device=pl_module.device)
        if self.posteriors is not None:
            table.copy_(self.posteriors)
        table[scored] = posterior.to(table.dtype)
        self.theta_change = (theta - pl_module.noise_matrix.double()).abs().max().item()
        pl_module.noise_matrix.copy_(theta.to(pl_module.noise_matrix.dtype))
        self.posteriors = table
        pl_module.posteriors = table
        self.noise_matrix_history.append(pl_module.noise_matrix.detach().cpu().clone())
        self.rounds += 1
        self.last_round_epoch = trainer.current_epoch if epoch is None else epoch
        updated_rounds = self.rounds - self.hold_initial_rounds  # held rounds change theta by 0 by design
        if self.convergence_tol is not None and updated_rounds > 1 and self.theta_change < self.convergence_tol:
            trainer.should_stop = True

    def _log_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        values = {"em/round": float(self.rounds), "em/theta_change": self.theta_change}
        datamodule = trainer.datamodule
        truth = getattr(datamodule, "true_transition_matrix", None)
        clean = getattr(datamodule, "train_clean_labels", None)
        if truth is not None and clean is not None and self.posteriors is not None:
            train_index = datamodule.train_indices.to(self.posteriors.device)
            posteriors = self.posteriors[train_index]
            clean = clean.to(self.posteriors.device)[train_index]
            precision, recall = em.flip_precision_recall(posteriors, self._noisy_labels[train_index], clean)
            values |= {
                "em/theta_error": em.noise_matrix_error(pl_module.noise_matrix, truth),
                "em/theta_max_abs_error": em.noise_matrix_max_abs_error(pl_module.noise_matrix, truth),
                "em/label_recovery": em.label_recovery(posteriors, clean),
                "em/flip_precision": precision,
                "em/flip_recall": recall,
            }
        # Every rank holds the same values, so the mean over ranks changes nothing; sync_dist only keeps Lightning
        # from warning about unsynchronised epoch metrics (a few scalars, once per epoch).
        pl_module.log_dict(values, on_step=False, on_epoch=True, sync_dist=True)

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "theta_change": self.theta_change,
            "posteriors": None if self.posteriors is None else self.posteriors.detach().cpu(),
            "initial_noise_matrix": self.initial_noise_matrix,
            "noise_matrix_history": list(self.noise_matrix_history),
            "last_round_epoch": self.last_round_epoch,
            "collecting_epoch": self._collecting_epoch,
            "probability_sums": None if self._probability_sums is None else self._probability_sums.cpu(),
            "counts": None if self._counts is None else self._counts.cpu(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rounds = int(state_dict["rounds"])
        self.theta_change = float(state_dict["theta_change"])
        self.posteriors = state_dict["posteriors"]
        self.initial_noise_matrix = state_dict.get("initial_noise_matrix")
        self.noise_matrix_history = list(state_dict.get("noise_matrix_history", []))
        # Checkpoints from before this key existed: the epoch of the latest round follows from the schedule.
        scheduled = self.warmup_epochs - 1 + (self.rounds - 1) * self.every_n_epochs if self.rounds else -1
        self.last_round_epoch = int(state_dict.get("last_round_epoch", scheduled))
        self._collecting_epoch = int(state_dict.get("collecting_epoch", -1))
        self._probability_sums = state_dict.get("probability_sums")
        self._counts = state_dict.get("counts")


class NoisyLabelFigures(L.Callback):
    """Draw the figures of :mod:`noisy_lightning.plots` during ``fit`` and put them where Lightning users look.

    Each figure is saved as a PNG under ``<trainer.log_dir>/figures/`` and, with a TensorBoard logger, logged to
    its Images tab. After each EM round: the noise matrix (true ``T``, ``theta`` and their difference). At the end
    of fit: the correction grid, the confusion matrices (true labels against the noisy labels, the EM-corrected
    labels and the predictions, for the training split and the test set) and the training curves. Figures are
    drawn on global rank 0 only.

    Args:
        grid_size: the correction grid is ``grid_size x grid_size`` images.
        grid_selection: ``"first"``, ``"random"``, ``"most_confident"`` or ``"least_confident"`` changes.
        track_test_accuracy: evaluate the test set after every epoch for the curves (synthetic experiments).
        dpi: resolution of the PNG files.
    """

    def __init__(
        self,
        grid_size: int = 10,
        grid_selection: Literal["first", "random", "most_confident", "least_confident"] = "random",
        track_test_accuracy: bool = True,
        dpi: int = 80,
    ) -> None:
        super().__init__()
        if grid_size < 1:
            raise ValueError(f"grid_size must be >= 1, got {grid_size!r}")
        self.grid_size = grid_size
        self.grid_selection = grid_selection
        self.track_test_accuracy = track_test_accuracy
        self.dpi = dpi
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.em_round_epochs: list[int] = []
        self.saved: list[Path] = []
        self._rounds_seen = 0

    def _em_callback(self, trainer: L.Trainer) -> EMNoiseEstimation | None:
        return next((cb for cb in trainer.callbacks if isinstance(cb, EMNoiseEstimation)), None)

    def _emit(self, trainer: L.Trainer, figure: Any, name: str) -> None:
        from noisy_lightning.plots import save_figure

        folder = Path(trainer.log_dir or trainer.default_root_dir) / "figures"
        self.saved.append(save_figure(figure, folder / f"{name}.png", dpi=self.dpi))
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure(name, figure, global_step=trainer.global_step, close=False)

    @torch.no_grad()
    def _predict(self, pl_module: L.LightningModule, images: Tensor) -> Tensor:
        was_training = pl_module.training
        pl_module.eval()
        try:
            batches = [pl_module(chunk.to(pl_module.device)).argmax(dim=1).cpu() for chunk in images.split(4096)]
        finally:
            pl_module.train(was_training)
        return torch.cat(batches)

    def _record_epoch(self, trainer: L.Trainer, epoch: int) -> None:
        for key, value in trainer.callback_metrics.items():
            if isinstance(value, Tensor) and value.numel() == 1 and key.split("/")[0] in ("train", "val", "em"):
                self.history.setdefault(key, []).append((epoch, value.item()))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Metrics of the previous epoch are complete here, whatever the order of the callbacks' epoch-end hooks.
        if trainer.current_epoch > 0 and trainer.is_global_zero:
            self._record_epoch(trainer, trainer.current_epoch - 1)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        datamodule = trainer.datamodule
        if self.track_test_accuracy and hasattr(datamodule, "test_images"):
            predictions = self._predict(pl_module, datamodule.test_images)
            accuracy = (predictions == datamodule.test_labels).double().mean().item()
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
        if em_callback is None or em_callback.rounds == self._rounds_seen:
            return
        self._rounds_seen = em_callback.rounds
        self.em_round_epochs.append(trainer.current_epoch - 1)
        if trainer.is_global_zero:
            truth = getattr(trainer.datamodule, "true_transition_matrix", None)
            title = f"EM round {em_callback.rounds} (after epoch {trainer.current_epoch - 1})"
            self._emit(
                trainer,
                noise_matrix_figure(truth, pl_module.noise_matrix, title),
                f"noise_matrix/round_{em_callback.rounds:03d}",
            )

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from noisy_lightning import plots

        self._draw_new_rounds(trainer, pl_module)
        if not trainer.is_global_zero:
            return
        self._record_epoch(trainer, trainer.current_epoch - 1)
        datamodule = trainer.datamodule
        if self.history:
            self._emit(trainer, plots.training_curves_figure(self.history, self.em_round_epochs), "training_curves")
        if not hasattr(datamodule, "train_indices"):
            return
        index = datamodule.train_indices
        noisy, clean = datamodule.train_noisy_labels[index], datamodule.train_clean_labels[index]
        em_callback = self._em_callback(trainer)
        comparisons = {"train: noisy": (clean, noisy)}
        if em_callback is not None and em_callback.posteriors is not None:
            posteriors = em_callback.posteriors[index.to(em_callback.posteriors.device)].cpu()
            corrected = posteriors.argmax(dim=1)
            comparisons["train: corrected"] = (clean, corrected)
            self._emit(
                trainer,
                plots.correction_grid_figure(
                    datamodule.pool_images[index],
                    noisy,
                    corrected,
                    clean,
                    self.grid_size,
                    self.grid_size,
                    self.grid_selection,
                    posteriors.max(dim=1).values,
                    datamodule.image_shape,
                ),
                "correction_grid",
            )
        comparisons["train: prediction"] = (clean, self._predict(pl_module, datamodule.pool_images[index]))
        if hasattr(datamodule, "test_images"):
            comparisons["test: prediction"] = (datamodule.test_labels, self._predict(pl_module, datamodule.test_images))
        self._emit(trainer, plots.confusion_matrices_figure(comparisons, pl_module.num_classes), "confusion_matrices")
