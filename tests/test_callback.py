import dataclasses
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import FrozenClassifier, quiet_trainer
from torch import nn

from noisy_lightning import (
    MLP,
    EMNoiseEstimation,
    EMStart,
    NoisyLabelClassifier,
    NoisyLabelDataModule,
    find_label_issues,
)
from noisy_lightning import em as em_math


def test_schedule() -> None:
    callback = EMNoiseEstimation(warmup_epochs=3, every_n_epochs=2)
    assert [epoch for epoch in range(10) if callback.schedule.is_round_epoch(epoch)] == [2, 4, 6, 8]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"warmup_epochs": 0}, "warmup_epochs must be an integer >= 1"),
        ({"warmup_epochs": 2.0}, "warmup_epochs must be an integer >= 1, got 2.0"),
        ({"every_n_epochs": 0}, "every_n_epochs must be an integer >= 1"),
        ({"e_step": "both"}, "e_step must be one of 'inference', 'train_pass'; got 'both'"),
        ({"convergence_tol": 0.0}, r"convergence_tol must be a finite number in \(0, inf\)"),
        ({"convergence_tol": "0.1"}, r"convergence_tol must be a finite number in \(0, inf\), got '0.1'"),
        ({"freeze_noise_matrix_after": "2"}, "freeze_noise_matrix_after must be an integer >= 1, got '2'"),
        ({"noise_matrix_from": "test"}, "noise_matrix_from must be one of 'train', 'validation'"),
        ({"noise_matrix_from": "validation", "e_step": "train_pass"}, "needs e_step='inference'"),
        ({"initialisation": "uniform"}, "initialisation must be one of 'hard_confusion', 'soft_confusion'"),
        ({"hold_initial_rounds": -1}, "hold_initial_rounds must be an integer >= 0"),
        ({"hold_initial_rounds": True}, "hold_initial_rounds must be an integer >= 0, got True"),
        ({"validate_noise_matrix": "yes"}, "validate_noise_matrix must be True or False, got 'yes'"),
        (
            {"validate_noise_matrix": True, "noise_matrix_from": "validation", "starts": [EMStart()]},
            "noise_matrix_from must be 'train'",
        ),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EMNoiseEstimation(**kwargs)


def test_callback_is_off_for_the_ce_method_and_says_so() -> None:
    """One flag (method='ce') turns an EM setup into its baseline: the callback warns and does nothing."""
    callback = EMNoiseEstimation(warmup_epochs=1)
    model = NoisyLabelClassifier(method="ce")
    with pytest.warns(UserWarning, match="EMNoiseEstimation is off for this fit: the model's method='ce'"):
        quiet_trainer(max_epochs=2, callbacks=[callback]).fit(model, NoisyLabelDataModule())
    assert callback.rounds == 0 and torch.equal(model.noise_matrix, torch.eye(10))


def test_first_round_with_frozen_weights_matches_the_pure_functions() -> None:
    """The callback's first round equals the paper's init + E-step + M-step computed by hand from the same net."""
    L.seed_everything(0)
    datamodule = NoisyLabelDataModule(noise_type="uniform", noise_rate=0.5, batch_size=512)
    model = FrozenClassifier(method="em", em_targets="stored")
    callback = EMNoiseEstimation(warmup_epochs=1, hold_initial_rounds=0, initialisation="soft_confusion")
    quiet_trainer(callbacks=[callback]).fit(model, datamodule)

    index = datamodule.pool.train_indices
    with torch.no_grad():
        model.eval()
        probabilities = torch.softmax(model(datamodule.pool.images[index]), dim=1)
    noisy = datamodule.pool.given_labels[index]
    initial = em_math.estimate_noise_matrix(probabilities, noisy, 10)
    posterior = em_math.posterior(probabilities.log(), initial, noisy)
    theta = em_math.estimate_noise_matrix(posterior, noisy, 10)
    assert torch.allclose(callback.initial_noise_matrix, initial, atol=1e-6)
    assert torch.allclose(model.noise_matrix.double(), theta, atol=1e-5)
    table = model.noise_layer.posterior_table
    assert torch.allclose(table[index], posterior, atol=1e-5)
    assert table[datamodule.pool.val_indices].abs().sum() == 0  # validation is never a target


def frozen_probabilities(model: NoisyLabelClassifier, datamodule: NoisyLabelDataModule, index: torch.Tensor):
    """``p(y | x)`` of the pool rows ``index``, from the model in eval mode (what an inference E-step sees)."""
    with torch.no_grad():
        model.eval()
        return torch.softmax(model(datamodule.pool.images[index]), dim=1)


def test_logged_em_metrics_match_their_definitions_computed_by_hand() -> None:
    """Every em/ metric of a round, recomputed from theta, the true T and the stored posteriors with the definitions
    written out here (none of the library's metric functions)."""
    L.seed_everything(0)
    datamodule = NoisyLabelDataModule(noise_type="pair_flip", noise_rate=0.3, batch_size=512)
    model = FrozenClassifier(net=MLP(hidden_sizes=[32], dropout=0.0), method="em", em_targets="stored")
    callback = EMNoiseEstimation(warmup_epochs=1, hold_initial_rounds=0)
    trainer = quiet_trainer(callbacks=[callback])
    trainer.fit(model, datamodule)

    theta, truth = model.noise_matrix.double(), datamodule.true_transition_matrix.double()
    index = datamodule.pool.train_indices
    corrected = model.noise_layer.posterior_table[index].argmax(dim=1)
    given, clean = datamodule.pool.given_labels[index], datamodule.pool.clean_labels[index]
    changed, wrong = corrected != given, given != clean
    assert changed.any() and wrong.any()  # both ratios below have a denominator
    expected = {
        "em/round": 1.0,
        "em/theta_change": (theta - torch.eye(10, dtype=torch.float64)).abs().max().item(),  # theta was I before
        "em/theta_error": ((theta - truth).abs().sum() / truth.abs().sum()).item(),
        "em/theta_max_abs_error": (theta - truth).abs().max().item(),
        "em/label_recovery": (corrected == clean).double().mean().item(),
        "em/flip_precision": ((changed & wrong).sum() / changed.sum()).item(),
        "em/flip_recall": ((changed & wrong).sum() / wrong.sum()).item(),
    }
    logged = {key: trainer.callback_metrics[key].item() for key in expected}
    assert logged == pytest.approx(expected, abs=1e-6)


def test_noise_matrix_from_validation_uses_the_validation_rows_only() -> None:
    """noise_matrix_from="validation": the initialisation and the M-step read only the validation split (the E-step
    scores both splits), so theta equals the paper's round computed by hand from the validation rows."""
    L.seed_everything(0)
    datamodule = NoisyLabelDataModule(noise_type="pair_flip", noise_rate=0.3, batch_size=512)
    model = FrozenClassifier(net=MLP(hidden_sizes=[32], dropout=0.0), method="em", em_targets="stored")
    callback = EMNoiseEstimation(
        warmup_epochs=1, hold_initial_rounds=0, noise_matrix_from="validation", initialisation="soft_confusion"
    )
    quiet_trainer(callbacks=[callback]).fit(model, datamodule)

    def by_hand(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        probabilities = frozen_probabilities(model, datamodule, index)
        noisy = datamodule.pool.given_labels[index]
        initial = em_math.estimate_noise_matrix(probabilities, noisy, 10)  # soft confusion, row-normalised
        posterior = em_math.posterior(probabilities.log(), initial, noisy)
        return initial, posterior, em_math.estimate_noise_matrix(posterior, noisy, 10, previous=initial)

    val_initial, val_posterior, val_theta = by_hand(datamodule.pool.val_indices)
    torch.testing.assert_close(callback.initial_noise_matrix, val_initial, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.noise_matrix.double(), val_theta, rtol=0, atol=1e-5)
    # The validation rows were scored, so they have posteriors too.
    table = model.noise_layer.posterior_table
    torch.testing.assert_close(table[datamodule.pool.val_indices], val_posterior, rtol=0, atol=1e-5)
    # The test tells the splits apart: from the training rows theta would be far from this one.
    _, _, train_theta = by_hand(datamodule.pool.train_indices)
    assert (train_theta - val_theta).abs().max() > 0.01


class RoundEpochs(L.Callback):
    """The epochs whose end brought the EM callback a new round: its count is read at the next epoch's start and at
    the end of training, so the order in which the callbacks' epoch-end hooks run does not matter."""

    def __init__(self, em_callback: EMNoiseEstimation) -> None:
        self.em_callback = em_callback
        self.rounds_after_epoch: list[tuple[int, int]] = []
        self._rounds = 0

    def _read(self, epoch: int) -> None:
        if self.em_callback.rounds != self._rounds:
            self._rounds = self.em_callback.rounds
            self.rounds_after_epoch.append((epoch, self._rounds))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._read(trainer.current_epoch - 1)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._read(trainer.current_epoch - 1)


def count_pool_reads(
    monkeypatch: pytest.MonkeyPatch, datamodule: NoisyLabelDataModule, trainer: L.Trainer
) -> list[int]:
    """The epochs at which the pool is read (each inference pass over it), filled in as ``trainer`` fits."""
    reads: list[int] = []
    read_pool = datamodule.pool_dataloader

    def counting_pool_dataloader(indices: torch.Tensor | None = None) -> object:
        reads.append(trainer.current_epoch)
        return read_pool(indices)

    monkeypatch.setattr(datamodule, "pool_dataloader", counting_pool_dataloader)
    return reads


@pytest.mark.parametrize("e_step", ["inference", "train_pass"])
def test_rounds_every_n_epochs_land_on_the_scheduled_epochs(monkeypatch: pytest.MonkeyPatch, e_step: str) -> None:
    """warmup_epochs=2, every_n_epochs=3 over 9 epochs (0..8): rounds at the end of epochs 1, 4 and 7, one each.
    An inference E-step reads the pool once per round; a train_pass E-step reads it for the first round only (theta's
    initialisation) and collects the later round epochs' training passes (a round epoch it missed would fall back to
    an inference pass)."""
    L.seed_everything(0)
    callback = EMNoiseEstimation(warmup_epochs=2, every_n_epochs=3, hold_initial_rounds=0, e_step=e_step)
    recorder = RoundEpochs(callback)
    trainer = quiet_trainer(max_epochs=9, callbacks=[callback, recorder], limit_val_batches=0)
    datamodule = NoisyLabelDataModule(noise_type="pair_flip", noise_rate=0.3, batch_size=512)
    pool_reads = count_pool_reads(monkeypatch, datamodule, trainer)
    trainer.fit(FrozenClassifier(net=MLP(hidden_sizes=[32], dropout=0.0), method="em"), datamodule)
    assert trainer.current_epoch == 9
    assert recorder.rounds_after_epoch == [(1, 1), (4, 2), (7, 3)]
    assert callback.rounds == 3 and callback.last_round_epoch == 7 and len(callback.noise_matrix_history) == 3
    assert pool_reads == ([1, 4, 7] if e_step == "inference" else [1])


@pytest.mark.slow
@pytest.mark.parametrize("em_targets", ["stored", "online"])
def test_em_on_the_sample_improves_theta_over_its_initialisation(em_targets: str) -> None:
    L.seed_everything(0)
    datamodule = NoisyLabelDataModule(noise_type="uniform", noise_rate=0.5, batch_size=128, seed=1)
    model = NoisyLabelClassifier(method="em", net=MLP(dropout=0.5), augment_shift=2, em_targets=em_targets)
    # Stored targets are the paper's literal EM: test them with the paper's soft initialisation. (From a sharper
    # hard initialisation they memorise their way back to a worse theta; benchmarks/results/ reports that variant.)
    # Online targets run with the default initialisation.
    initialisation = {"initialisation": "soft_confusion"} if em_targets == "stored" else {}
    callback = EMNoiseEstimation(warmup_epochs=3, **initialisation)
    trainer = quiet_trainer(max_epochs=8, callbacks=[callback])
    trainer.fit(model, datamodule)
    truth = datamodule.true_transition_matrix
    initial_error = em_math.noise_matrix_error(callback.initial_noise_matrix, truth)
    final_error = em_math.noise_matrix_error(model.noise_matrix, truth)
    assert final_error < initial_error
    assert callback.rounds == 6 and len(callback.noise_matrix_history) == 6
    metrics = trainer.callback_metrics
    # The logged error, against its definition written out here (relative entrywise L1), not the library's function.
    theta, truth = model.noise_matrix.double(), truth.double()
    hand_error = ((theta - truth).abs().sum() / truth.abs().sum()).item()
    assert metrics["em/theta_error"].item() == pytest.approx(hand_error, abs=1e-6)
    if em_targets == "online":
        # The noisy labels alone are 55% right. (Stored targets are the naive variant that memorises itself back
        # toward the noisy labels: benchmarks/results/ reports it; here only its theta improvement is asserted.)
        # The logged recovery reads the last E-step, which the default takes from the training pass (dropout and
        # shifts on); the corrected labels that find_label_issues writes come from an eval-mode pass.
        assert metrics["em/label_recovery"] > 0.7
        issues = find_label_issues(model, datamodule)
        train = ~issues.in_validation
        truth = datamodule.pool.clean_labels[issues.index[train]]
        assert (issues.corrected_label[train] == truth).double().mean() > 0.8
    assert {"em/flip_precision", "em/flip_recall", "em/theta_max_abs_error", "em/round"} <= set(metrics)


def test_train_pass_e_step_runs_and_uses_every_training_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    L.seed_everything(0)
    datamodule = NoisyLabelDataModule(noise_type="symmetric", noise_rate=0.3, batch_size=256)
    # The first round initialises theta from an inference pass over the pool. A later round without training-pass
    # sums would fall back to one too, which would make this test pass without the training pass: counting the
    # pool's reads fails it instead.
    trainer = quiet_trainer(max_epochs=3, callbacks=[callback := EMNoiseEstimation(warmup_epochs=1)])
    pool_reads = count_pool_reads(monkeypatch, datamodule, trainer)
    model = NoisyLabelClassifier(method="em", em_targets="stored")
    trainer.fit(model, datamodule)
    assert callback.e_step == "train_pass"  # the default
    assert callback.rounds == 3 and pool_reads == [0]
    rows = model.noise_layer.posterior_table[datamodule.pool.train_indices]
    assert torch.allclose(rows.sum(dim=1), torch.ones(len(rows)), atol=1e-5)  # every training row was scored


@pytest.mark.parametrize("hold", [0, 2])
def test_convergence_stop(hold: int) -> None:
    L.seed_everything(0)
    # Any change is below 1, so the second round that updates theta stops the run; held rounds do not count.
    callback = EMNoiseEstimation(warmup_epochs=1, convergence_tol=1.0, hold_initial_rounds=hold, starts=[EMStart()])
    trainer = quiet_trainer(max_epochs=10, callbacks=[callback])
    trainer.fit(FrozenClassifier(method="em"), NoisyLabelDataModule(noise_type="symmetric", noise_rate=0.3))
    assert callback.rounds == hold + 2 and trainer.current_epoch == hold + 2


def test_held_rounds_keep_the_initialisation_then_the_m_step_starts() -> None:
    """Rounds 1..hold use the initial theta for the posteriors and leave it unchanged; round hold+1 updates it."""
    L.seed_everything(0)
    datamodule = NoisyLabelDataModule(noise_type="pair_flip", noise_rate=0.3, batch_size=512)
    model = FrozenClassifier(method="em")
    callback = EMNoiseEstimation(warmup_epochs=1, hold_initial_rounds=2)
    quiet_trainer(max_epochs=4, callbacks=[callback]).fit(model, datamodule)

    initial = callback.initial_noise_matrix.float()
    assert len(callback.noise_matrix_history) == 4
    assert torch.equal(callback.noise_matrix_history[0], initial)
    assert torch.equal(callback.noise_matrix_history[1], initial)
    index = datamodule.pool.train_indices
    with torch.no_grad():
        model.eval()
        probabilities = torch.softmax(model(datamodule.pool.images[index]), dim=1)
    noisy = datamodule.pool.given_labels[index]
    expected = em_math.estimate_noise_matrix(em_math.posterior(probabilities.log(), initial, noisy), noisy, 10)
    torch.testing.assert_close(callback.noise_matrix_history[2].double(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("initialisation", ["soft_confusion", "hard_confusion", "balanced"])
def test_initialisation_choice_reaches_the_callback(initialisation: str) -> None:
    L.seed_everything(0)
    datamodule = NoisyLabelDataModule(noise_type="uniform", noise_rate=0.5, batch_size=512)
    model = FrozenClassifier(method="em")
    callback = EMNoiseEstimation(warmup_epochs=1, initialisation=initialisation)
    quiet_trainer(callbacks=[callback]).fit(model, datamodule)
    index = datamodule.pool.train_indices
    with torch.no_grad():
        model.eval()
        probabilities = torch.softmax(model(datamodule.pool.images[index]), dim=1)
    noisy = datamodule.pool.given_labels[index]
    if initialisation == "balanced":
        probabilities = em_math.balanced_assignment(probabilities, torch.bincount(noisy, minlength=10))
    expected = em_math.initial_noise_matrix(probabilities, noisy, 10, hard=initialisation != "soft_confusion")
    torch.testing.assert_close(callback.initial_noise_matrix, expected, rtol=0, atol=1e-6)


def test_frozen_noise_matrix_stays_fixed() -> None:
    """No held rounds: rounds 1 and 2 run the M-step (theta moves), round 3 comes after the freeze (it does not)."""
    L.seed_everything(0)
    callback = EMNoiseEstimation(warmup_epochs=1, freeze_noise_matrix_after=2, hold_initial_rounds=0)
    model = NoisyLabelClassifier(method="em")
    quiet_trainer(max_epochs=3, callbacks=[callback]).fit(
        model, NoisyLabelDataModule(noise_type="symmetric", noise_rate=0.3)
    )
    history = callback.noise_matrix_history
    assert not torch.equal(history[0], callback.initial_noise_matrix.float())
    assert not torch.equal(history[1], history[0])
    assert torch.equal(history[2], history[1])


@pytest.mark.parametrize("e_step", ["inference", "train_pass"])
def test_a_refused_m_step_leaves_theta_as_it_was(monkeypatch: pytest.MonkeyPatch, e_step: str) -> None:
    """validate_noise_matrix: every M-step judged worse on the validation split is refused and counted; the judge
    sees the validation split's given labels and the round's p(y | x) of the same rows."""
    judged: list[int] = []

    def every_step_is_worse(class_probs: torch.Tensor, noise_matrix: torch.Tensor, labels: torch.Tensor) -> dict:
        judged.append(labels.numel())
        return {"noisy_accuracy": 0.0, "noisy_nll": float(len(judged) % 2 == 0)}  # before 0.0, after 1.0

    monkeypatch.setattr(em_math, "noisy_label_fit", every_step_is_worse)
    L.seed_everything(0)
    callback = EMNoiseEstimation(
        warmup_epochs=1,
        hold_initial_rounds=1,
        e_step=e_step,
        starts=[EMStart()],
        validate_noise_matrix=True,
        convergence_tol=1.0,  # a refused step changes theta by 0, which must not read as convergence
    )
    datamodule = NoisyLabelDataModule(noise_type="symmetric", noise_rate=0.3)
    trainer = quiet_trainer(max_epochs=4, callbacks=[callback])
    trainer.fit(NoisyLabelClassifier(method="em"), datamodule)
    history = callback.noise_matrix_history
    assert len(history) == 4 and callback.m_steps_refused == 3  # round 0 is held; rounds 1-3 are judged
    assert all(torch.equal(theta, callback.initial_noise_matrix.float()) for theta in history)
    assert judged == [len(datamodule.pool.val_indices)] * 6
    assert trainer.callback_metrics["em/m_steps_refused"].item() == 3
    resumed = EMNoiseEstimation(starts=[EMStart()], validate_noise_matrix=True)
    resumed.load_state_dict(callback.state_dict())
    assert resumed.m_steps_refused == 3  # saved with the EM state, so a resumed fit keeps counting


def test_validated_m_steps_are_the_plain_ones_when_the_validation_labels_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the judge on, a fit whose M-steps are all kept has the same theta as a fit without it."""
    judge = em_math.noisy_label_fit
    judged: list[int] = []

    def counted(*arguments: torch.Tensor) -> dict:
        judged.append(arguments[2].numel())
        return judge(*arguments)

    monkeypatch.setattr(em_math, "noisy_label_fit", counted)
    thetas = []
    for validate in (False, True):
        L.seed_everything(0)
        callback = EMNoiseEstimation(
            warmup_epochs=1, hold_initial_rounds=0, starts=[EMStart()], validate_noise_matrix=validate
        )
        quiet_trainer(max_epochs=3, callbacks=[callback]).fit(
            NoisyLabelClassifier(method="em"), NoisyLabelDataModule(noise_type="pair_flip", noise_rate=0.3)
        )
        thetas.append(torch.stack(callback.noise_matrix_history))
    assert callback.m_steps_refused == 0 and len(judged) == 4  # rounds 1 and 2 were judged, before and after each
    torch.testing.assert_close(thetas[1], thetas[0], rtol=0, atol=0)


class NoValidationSplit(NoisyLabelDataModule):
    """A data module whose pool holds out nothing (as a user's own NoisyLabelData may)."""

    def setup(self, stage: str) -> None:
        super().setup(stage)
        pool = self._pool
        everything = torch.cat([pool.train_indices, pool.val_indices]).sort().values
        self._pool = dataclasses.replace(pool, train_indices=everything, val_indices=everything[:0])


def test_validate_noise_matrix_needs_a_validation_split() -> None:
    callback = EMNoiseEstimation(warmup_epochs=1, starts=[EMStart()], validate_noise_matrix=True)
    with pytest.raises(ValueError, match=r"validate_noise_matrix=True\) judges .* but the data has no validation"):
        quiet_trainer(max_epochs=1, callbacks=[callback]).fit(NoisyLabelClassifier(method="em"), NoValidationSplit())


class NaNAfterWarmup(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = MLP()
        self.poisoned = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        return logits * float("nan") if self.poisoned else logits


def test_nan_network_is_caught_at_the_e_step_and_theta_is_kept() -> None:
    L.seed_everything(0)
    net = NaNAfterWarmup()
    model = NoisyLabelClassifier(method="em", net=net)
    # Poisoned at an epoch's end, the net's training-pass outputs of that epoch are still finite: read an eval pass.
    callback = EMNoiseEstimation(warmup_epochs=1, e_step="inference")

    class Poison(L.Callback):
        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            net.poisoned = trainer.current_epoch == 1

    datamodule = NoisyLabelDataModule(noise_type="symmetric", noise_rate=0.3)
    # Poison runs before the EM callback's epoch-end hook, so round 2 sees NaN logits.
    trainer = quiet_trainer(max_epochs=3, callbacks=[Poison(), callback])
    with pytest.raises(FloatingPointError, match="network has diverged"):
        trainer.fit(model, datamodule)
    assert callback.rounds == 1
    assert torch.isfinite(model.noise_matrix).all()
    assert torch.allclose(model.noise_matrix.double(), callback.noise_matrix_history[0].double())


def test_checkpoint_round_trip_keeps_theta_and_posteriors(tmp_path: Path) -> None:
    L.seed_everything(0)
    datamodule = NoisyLabelDataModule(noise_type="pair_flip", noise_rate=0.3)
    model = NoisyLabelClassifier(method="em", net=MLP(hidden_sizes=[64], dropout=0.1), em_targets="stored")
    callback = EMNoiseEstimation(warmup_epochs=1, hold_initial_rounds=0)
    trainer = quiet_trainer(max_epochs=2, callbacks=[callback], default_root_dir=tmp_path)
    trainer.fit(model, datamodule)
    path = tmp_path / "em.ckpt"
    trainer.save_checkpoint(path)

    # No arguments: the net (a 64-unit MLP, not the default), theta and the posterior table all come back.
    restored_model = NoisyLabelClassifier.load_from_checkpoint(path)
    assert not torch.equal(model.noise_matrix, torch.eye(10))
    assert torch.equal(restored_model.noise_matrix, model.noise_matrix)
    assert torch.equal(restored_model.noise_layer.posterior_table, model.noise_layer.posterior_table)
    for name, weight in model.state_dict().items():
        assert torch.equal(restored_model.state_dict()[name], weight), name
    restored_callback = EMNoiseEstimation(warmup_epochs=1)
    checkpoint = torch.load(path, weights_only=False)
    restored_callback.load_state_dict(checkpoint["callbacks"]["EMNoiseEstimation"])
    assert restored_callback.rounds == 2
    assert torch.equal(restored_callback.noise_matrix_history[1], callback.noise_matrix_history[1])

    # Resuming training continues from the saved EM state (and the module sees the restored posteriors).
    resumed_callback = EMNoiseEstimation(warmup_epochs=1, hold_initial_rounds=0)
    resumed_model = NoisyLabelClassifier(method="em", net=MLP(hidden_sizes=[64], dropout=0.1), em_targets="stored")
    resumed = quiet_trainer(max_epochs=3, callbacks=[resumed_callback], default_root_dir=tmp_path)
    resumed.fit(resumed_model, NoisyLabelDataModule(noise_type="pair_flip", noise_rate=0.3), ckpt_path=path)
    assert resumed_callback.rounds == 3
    assert len(resumed_callback.noise_matrix_history) == 3
    assert torch.equal(resumed_callback.noise_matrix_history[1], callback.noise_matrix_history[1])


def test_resuming_with_another_noise_configuration_fails_loudly(tmp_path: Path) -> None:
    L.seed_everything(0)
    trainer = quiet_trainer(max_epochs=1, default_root_dir=tmp_path)
    trainer.fit(NoisyLabelClassifier(), NoisyLabelDataModule(noise_type="symmetric", noise_rate=0.3))
    path = tmp_path / "ce.ckpt"
    trainer.save_checkpoint(path)
    other = NoisyLabelDataModule(noise_type="symmetric", noise_rate=0.4)
    with pytest.raises(ValueError, match="another data configuration: noise model"):
        quiet_trainer(max_epochs=2, default_root_dir=tmp_path).fit(NoisyLabelClassifier(), other, ckpt_path=path)
    other_seed = NoisyLabelDataModule(noise_type="symmetric", noise_rate=0.3, seed=5)
    with pytest.raises(ValueError, match="another data configuration: seed"):
        quiet_trainer(max_epochs=2, default_root_dir=tmp_path).fit(NoisyLabelClassifier(), other_seed, ckpt_path=path)


@pytest.mark.parametrize(("max_epochs", "warns"), [(1, True), (2, False)])
def test_warns_when_the_fit_ends_before_the_first_round(max_epochs: int, warns: bool) -> None:
    trainer = quiet_trainer(max_epochs=max_epochs, callbacks=[EMNoiseEstimation(warmup_epochs=2)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(NoisyLabelClassifier(method="em"), NoisyLabelDataModule())
    messages = [str(warning.message) for warning in caught if "stops before it" in str(warning.message)]
    assert bool(messages) == warns
    if warns:
        assert "warmup_epochs=2" in messages[0] and "max_epochs=1" in messages[0]


def test_reusing_the_callback_object_in_a_second_fit_runs_em_again() -> None:
    """A second fit with the same callback object starts its EM state afresh (it used to run no EM at all)."""
    callback = EMNoiseEstimation(warmup_epochs=1, hold_initial_rounds=0)
    thetas = []
    for seed in (0, 1):
        L.seed_everything(seed)
        model = NoisyLabelClassifier(method="em", net=MLP(hidden_sizes=[32]))
        quiet_trainer(max_epochs=2, callbacks=[callback]).fit(
            model, NoisyLabelDataModule(noise_type="pair_flip", noise_rate=0.3, seed=seed)
        )
        assert callback.rounds == 2 and len(callback.noise_matrix_history) == 2
        assert not torch.equal(model.noise_matrix, torch.eye(10))
        thetas.append(model.noise_matrix.clone())
    assert not torch.equal(thetas[0], thetas[1])


def test_defaults_are_the_measured_recipe() -> None:
    """The shortest code gets the recipe of the results table; a default drifting back to the plain recipe fails."""
    net = MLP()
    assert net.init_args == {
        "in_features": 784,
        "hidden_sizes": [500, 300],
        "num_classes": 10,
        "activation": "relu",
        "dropout": 0.5,
        "batch_norm": False,
    }
    model = NoisyLabelClassifier(method="em")
    assert model.hparams.net == {"class_path": "noisy_lightning.models.MLP", "init_args": net.init_args}
    expected = {"lr": 1e-3, "optimizer": "adam", "lr_scheduler": "cosine", "augment_shift": 2, "em_targets": "online"}
    assert {key: model.hparams[key] for key in expected} == expected
    callback = EMNoiseEstimation()
    assert callback.schedule == em_math.EMSchedule(warmup_epochs=6, every_n_epochs=1, hold_initial_rounds=3)
    # The E-step reads the training pass (benchmarks/results/quality_mnist_defaults.md); an M-step on the
    # validation split has no training pass to read, so it gets the eval-mode E-step.
    assert (callback.e_step, callback.initialisation) == ("train_pass", "hard_confusion")
    assert EMNoiseEstimation(noise_matrix_from="validation").e_step == "inference"
    # Two starts from one warm-up, one kept by the noisy validation labels (benchmarks/results/em_starts.md).
    assert callback.starts == (EMStart(0, "hard_confusion"), EMStart(4, "balanced")) == em_math.DEFAULT_STARTS
    assert (callback.trial_epochs, callback.min_z) == (8, 1.0)
