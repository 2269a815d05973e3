"""Several EM starts tried from one warm-up: the choice, the restored state, the extended fit, the labels it reads."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers import quiet_trainer

from noisy_lightning import MLP, EMNoiseEstimation, EMStart, NoisyLabelClassifier, NoisyLabelDataModule
from noisy_lightning import em as em_math

TWO_STARTS = [EMStart(0, "hard_confusion"), EMStart(1, "balanced")]


def small_model() -> NoisyLabelClassifier:
    return NoisyLabelClassifier(method="em", net=MLP(hidden_sizes=[64], dropout=0.1))


def datamodule() -> NoisyLabelDataModule:
    return NoisyLabelDataModule(noise_type="pair_flip", noise_rate=0.3, batch_size=512)


def test_noisy_label_fit_against_its_definition() -> None:
    probabilities = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1]], dtype=torch.float64)
    theta = torch.tensor([[0.8, 0.2, 0.0], [0.0, 0.9, 0.1], [0.3, 0.0, 0.7]], dtype=torch.float64)
    given = torch.tensor([0, 1, 1])
    scores = em_math.noisy_label_fit(probabilities, theta, given)
    assert scores["noisy_accuracy"] == pytest.approx(1 / 3)  # only the first argmax agrees with its given label
    by_hand = [0.7 * 0.8 + 0.2 * 0.0 + 0.1 * 0.3, 0.1 * 0.2 + 0.3 * 0.9 + 0.6 * 0.0, 0.5 * 0.2 + 0.4 * 0.9 + 0.1 * 0]
    assert scores["noisy_nll"] == pytest.approx(-torch.tensor(by_hand).log().mean().item())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"starts": []}, "starts must be a non-empty list of EMStart"),
        ({"starts": ["balanced"]}, "starts must be a non-empty list of EMStart"),
        ({"starts": TWO_STARTS, "trial_epochs": 1}, "trial_epochs must be greater than every start's"),
        ({"trial_epochs": 0}, "trial_epochs must be an integer >= 1"),
        ({"min_z": -1.0}, "min_z must be a finite number in \\[0"),
        ({"starts": TWO_STARTS, "noise_matrix_from": "validation"}, "noise_matrix_from must be 'train'"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EMNoiseEstimation(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"extra_warmup_epochs": -1}, "extra_warmup_epochs must be an integer >= 0"),
        ({"initialisation": "anchor"}, "initialisation must be one of"),
    ],
)
def test_bad_starts(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EMStart(**kwargs)


def state_of(module: L.LightningModule, metrics: bool = True) -> dict[str, torch.Tensor]:
    """The module's state_dict; ``metrics=False`` leaves out the running training-loss metric, which a trial's
    restore keeps as the epoch's own (the module logs it after the restore)."""
    return {
        name: value.detach().clone()
        for name, value in module.state_dict().items()
        if metrics or not name.startswith("train_loss.")
    }


def assert_same_state(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(actual[name], value), name


@pytest.mark.parametrize("kept", [0, 1])
def test_trials_restore_the_warmup_then_continue_the_kept_start(monkeypatch: pytest.MonkeyPatch, kept: int) -> None:
    """Start 1 begins from the warm-up's weights, optimiser and schedule; the fit continues from the kept trial's
    end; the kept start's EM history is the one left; max_epochs grows by the trial that was not kept."""
    L.seed_everything(0)
    callback = EMNoiseEstimation(warmup_epochs=1, hold_initial_rounds=0, starts=TWO_STARTS, trial_epochs=2)

    # Rig the validation agreements so that the test chooses which start is kept: the kept one agrees everywhere.
    def rigged(trainer: L.Trainer, module: L.LightningModule) -> tuple[dict[str, float], torch.Tensor]:
        agrees = callback.trial == kept
        return {"noisy_accuracy": float(agrees), "noisy_nll": 1.0}, torch.full((400,), agrees)

    monkeypatch.setattr(callback, "validation_fit", rigged)
    seen: dict[str, Any] = {}
    original_capture, original_end_trial = callback._capture, callback._end_trial

    def capture(trainer: L.Trainer, module: L.LightningModule) -> dict[str, Any]:
        state = original_capture(trainer, module)
        seen[f"captured_{len(seen)}"] = (
            state_of(module, metrics=False),
            trainer.lr_scheduler_configs[0].scheduler.last_epoch,
            [group["lr"] for group in trainer.optimizers[0].param_groups],
            len(callback.noise_matrix_history),
        )
        return state

    def end_trial(trainer: L.Trainer, module: L.LightningModule) -> None:
        trial = callback.trial
        original_end_trial(trainer, module)
        seen[f"after_trial_{trial}"] = (
            state_of(module, metrics=False),
            trainer.lr_scheduler_configs[0].scheduler.last_epoch,
            [group["lr"] for group in trainer.optimizers[0].param_groups],
            len(callback.noise_matrix_history),
        )

    monkeypatch.setattr(callback, "_capture", capture)
    monkeypatch.setattr(callback, "_end_trial", end_trial)
    model = small_model()
    trainer = quiet_trainer(max_epochs=4, callbacks=[callback])
    trainer.fit(model, datamodule())

    warmup, trial_0_end = seen["captured_0"], seen["captured_1"]  # captured at the warm-up's and trial 0's ends
    after_switch, after_choice = seen["after_trial_0"], seen["after_trial_1"]
    assert warmup[3] == 0 and trial_0_end[3] == 3  # no round before the warm-up snapshot; 3 rounds in trial 0
    # Trial 1 starts from the warm-up state (its first round only reads the network, it does not train it).
    # theta too: start 1 waits an extra epoch, so no round has run on the restored state yet.
    assert_same_state(after_switch[0], warmup[0])
    assert after_switch[1:3] == warmup[1:3]
    assert after_switch[3] == 0  # start 1 has 1 extra warm-up epoch: no round yet
    if kept == 0:
        assert_same_state(after_choice[0], trial_0_end[0])
        assert after_choice[1:] == trial_0_end[1:]
    assert callback.kept_start == kept and callback.trial == 2 and callback.snapshots == {}
    assert [score["noisy_accuracy"] for score in callback.trial_scores] == [float(kept == 0), float(kept == 1)]
    assert callback.trial_scores[1]["z_against_kept"] == pytest.approx(20.0 if kept == 1 else -20.0)
    # 4 epochs as asked, plus the 2 of the trial that was not kept; the kept start ran all its rounds.
    assert trainer.current_epoch == 6
    assert trainer.max_epochs == 4  # the extension ends with the fit: the Trainer shows what the user asked for
    assert callback.rounds == (4 if kept == 0 else 3) == len(callback.noise_matrix_history)
    assert callback.epoch_offset == 2


def test_the_start_kept_is_the_one_choose_start_picks_and_is_logged() -> None:
    L.seed_everything(0)
    callback = EMNoiseEstimation(warmup_epochs=1, starts=TWO_STARTS, trial_epochs=2, min_z=0.0)
    trainer = quiet_trainer(max_epochs=3, callbacks=[callback])
    trainer.fit(small_model(), datamodule())
    assert len(callback.trial_agreements) == 2 and callback.trial_agreements[0].shape == (400,)
    assert callback.kept_start == em_math.choose_start(callback.trial_agreements, 0.0)[0]
    assert trainer.callback_metrics["em/start"].item() == callback.kept_start


def test_choose_start_prefers_the_first_unless_a_later_one_is_significantly_better() -> None:
    first = torch.tensor([True] * 90 + [False] * 10)
    # 4 samples only the second gets right, 1 only the first: z = 3 / sqrt(5) = 1.34
    second = first.clone()
    second[90:94] = True
    second[0] = False
    assert em_math.choose_start([first, second], 1.0) == (1, [0.0, pytest.approx(3 / 5**0.5)])
    assert em_math.choose_start([first, second], 1.5)[0] == 0
    # The third is compared with the start kept so far (the second), not with the first.
    third = second.clone()
    third[94:96] = True
    assert em_math.choose_start([first, second, third], 1.0) == (
        2,
        [0.0, pytest.approx(3 / 5**0.5), pytest.approx(2**0.5)],
    )
    assert em_math.choose_start([first, first.clone()], 0.0) == (0, [0.0, 0.0])  # identical: no evidence
    with pytest.raises(ValueError, match="same validation samples"):
        em_math.choose_start([first, first[:50]], 1.0)
    with pytest.raises(ValueError, match="min_z must be"):
        em_math.choose_start([first], -0.5)


def test_validation_scores_read_given_labels_only() -> None:
    """Scrambling the clean labels changes nothing; changing the validation split's given labels does."""
    L.seed_everything(0)
    callback = EMNoiseEstimation(warmup_epochs=1)
    data = datamodule()
    model = small_model()
    trainer = quiet_trainer(max_epochs=1, callbacks=[callback])
    trainer.fit(model, data)
    before, agreement = callback.validation_fit(trainer, model)
    pool = data.pool
    pool.clean_labels.copy_(pool.clean_labels[torch.randperm(pool.size)])
    after, agreement_after = callback.validation_fit(trainer, model)
    assert after == before and torch.equal(agreement_after, agreement)
    val = pool.val_indices
    pool.given_labels[val] = (pool.given_labels[val] + 1) % 10
    changed, agreement_changed = callback.validation_fit(trainer, model)
    assert changed["noisy_accuracy"] != before["noisy_accuracy"] and not torch.equal(agreement_changed, agreement)


def test_one_start_is_a_plain_fit() -> None:
    """A single start neither snapshots nor extends the fit."""
    L.seed_everything(0)
    callback = EMNoiseEstimation(warmup_epochs=1, starts=[EMStart()])
    trainer = quiet_trainer(max_epochs=3, callbacks=[callback])
    trainer.fit(small_model(), datamodule())
    assert not callback.selects and callback.snapshots == {} and callback.trial_scores == []
    assert trainer.current_epoch == 3 and callback.rounds == 3


@pytest.mark.slow
@pytest.mark.parametrize("stop_after", [2, 4])
def test_a_fit_resumed_during_or_after_the_trials_ends_where_an_unbroken_one_does(
    tmp_path: Path, stop_after: int
) -> None:
    """Stopped inside trial 1 (epoch 2 of 0..5) or after the choice, and resumed: the same weights, theta and EM state
    as a fit that ran through."""

    def fit(max_epochs: int, ckpt_path: Path | None = None) -> tuple[L.Trainer, EMNoiseEstimation]:
        L.seed_everything(0)
        callback = EMNoiseEstimation(warmup_epochs=1, hold_initial_rounds=0, starts=TWO_STARTS, trial_epochs=2)
        trainer = quiet_trainer(max_epochs=max_epochs, callbacks=[callback], default_root_dir=tmp_path)
        trainer.fit(small_model(), datamodule(), ckpt_path=ckpt_path)
        return trainer, callback

    unbroken, unbroken_callback = fit(3)
    # Stopped by a callback, not by max_epochs: a fit extends max_epochs itself once its trials begin.
    fit_stopping(tmp_path, stop_after)
    resumed, resumed_callback = fit(3, ckpt_path=tmp_path / "stopped.ckpt")
    assert resumed.current_epoch == unbroken.current_epoch == 5
    assert_same_state(state_of(resumed.lightning_module), state_of(unbroken.lightning_module))
    assert resumed_callback.kept_start == unbroken_callback.kept_start
    assert resumed_callback.trial_scores == unbroken_callback.trial_scores
    assert resumed_callback.rounds == unbroken_callback.rounds


class StopAt(L.Callback):
    def __init__(self, epoch: int, path: Path) -> None:
        self.epoch, self.path = epoch, path

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.save_checkpoint(self.path)


def fit_stopping(tmp_path: Path, stop_after: int) -> None:
    L.seed_everything(0)
    callback = EMNoiseEstimation(warmup_epochs=1, hold_initial_rounds=0, starts=TWO_STARTS, trial_epochs=2)
    stop = StopAt(stop_after, tmp_path / "stopped.ckpt")
    quiet_trainer(max_epochs=3, callbacks=[callback, stop], default_root_dir=tmp_path).fit(small_model(), datamodule())


@pytest.mark.slow
def test_figures_draw_every_round_of_every_start(tmp_path: Path) -> None:
    """A later start's rounds count from 1 again; the figures still draw each round once, under its own file."""
    from noisy_lightning import NoisyLabelFigures

    L.seed_everything(0)
    callback = EMNoiseEstimation(warmup_epochs=1, starts=TWO_STARTS, trial_epochs=2)
    figures = NoisyLabelFigures(grid_size=2, track_test_accuracy=False, dpi=30)
    trainer = quiet_trainer(max_epochs=3, callbacks=[callback, figures], default_root_dir=tmp_path)
    trainer.fit(small_model(), datamodule())
    # Trial 0: rounds after epochs 0, 1 and 2; trial 1 (1 extra warm-up epoch, its epoch 1 is the fit's epoch 3):
    # after epochs 3 and 4, which is where the 3 + 2 epochs end.
    assert callback.rounds_run == 5
    assert figures.em_round_epochs == [0, 1, 2, 3, 4]
    drawn = sorted(path.name for path in (tmp_path / "figures" / "noise_matrix").glob("*.png"))
    assert drawn == [f"round_{index:03d}.png" for index in range(1, 6)]


def test_the_epoch_that_ends_a_trial_shows_that_trial_not_the_restored_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the end of trial 0 the model goes back to the warm-up snapshot: the figure of the trial's last round and
    the em/ values logged for that epoch must still be the trial's."""
    from matplotlib.figure import Figure

    from noisy_lightning import NoisyLabelFigures, plots

    drawn: list[tuple[str, torch.Tensor]] = []

    def record(truth: Any, noise_matrix: torch.Tensor, title: str) -> Any:
        drawn.append((title, noise_matrix.clone()))
        return Figure()

    monkeypatch.setattr(plots, "noise_matrix_figure", record)

    class Logged(L.Callback):
        def __init__(self) -> None:
            self.values: dict[int, dict[str, float]] = {}
            self.losses: dict[int, torch.Tensor] = {}  # the running training loss the module logs next

        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.values[trainer.current_epoch] = dict(callback._epoch_values)
            self.losses[trainer.current_epoch] = pl_module.train_loss.mean_value.clone()

    L.seed_everything(0)
    callback = EMNoiseEstimation(warmup_epochs=1, starts=TWO_STARTS, trial_epochs=2)
    figures = NoisyLabelFigures(grid_size=2, track_test_accuracy=False, dpi=30)
    logged = Logged()
    before_restore: list[torch.Tensor] = []
    losses_before_restore: list[torch.Tensor] = []
    restore = callback._restore

    def spy(trainer: L.Trainer, pl_module: L.LightningModule, state: dict[str, Any]) -> None:
        before_restore.append(pl_module.noise_matrix.detach().cpu().clone())
        losses_before_restore.append(pl_module.train_loss.mean_value.clone())
        restore(trainer, pl_module, state)

    monkeypatch.setattr(callback, "_restore", spy)
    trainer = quiet_trainer(max_epochs=3, callbacks=[callback, logged, figures], default_root_dir=tmp_path)
    trainer.fit(small_model(), datamodule())
    trial_0_theta = before_restore[0]  # theta when trial 0 ended, before the warm-up snapshot came back
    title, theta = drawn[2]  # the third round: trial 0's last, after epoch 2
    assert title.startswith("EM round 3 of start 0")
    torch.testing.assert_close(theta, trial_0_theta)
    assert not torch.equal(theta, drawn[3][1])  # trial 1 draws its own theta next
    assert logged.values[2]["em/start"] == 0 and logged.values[2]["em/round"] == 3
    assert logged.values[3]["em/start"] == 1 and logged.values[3]["em/round"] == 1
    torch.testing.assert_close(logged.losses[2], losses_before_restore[0])  # train/loss of epoch 2 is epoch 2's


@pytest.mark.slow
def test_two_rounds_in_one_epoch_end_are_both_drawn(tmp_path: Path) -> None:
    """A next start without extra warm-up runs its first round in the epoch end that closed the trial before it."""
    from noisy_lightning import NoisyLabelFigures

    L.seed_everything(0)
    starts = [EMStart(0, "hard_confusion"), EMStart(0, "balanced")]
    callback = EMNoiseEstimation(warmup_epochs=1, starts=starts, trial_epochs=2)
    figures = NoisyLabelFigures(grid_size=2, track_test_accuracy=False, dpi=30)
    trainer = quiet_trainer(max_epochs=3, callbacks=[callback, figures], default_root_dir=tmp_path)
    trainer.fit(small_model(), datamodule())
    drawn = sorted(path.name for path in (tmp_path / "figures" / "noise_matrix").glob("*.png"))
    assert callback.rounds_run == 6  # trial 0 after epochs 0-2; trial 1 after epoch 2 (restored), 3 and 4
    assert drawn == [f"round_{index:03d}.png" for index in range(1, 7)]
    assert [(record.start, record.round_in_start) for record in callback.round_records] == [
        (0, 1),
        (0, 2),
        (0, 3),
        (1, 1),
        (1, 2),
        (1, 3),
    ]
    assert figures.em_round_epochs == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(("max_epochs", "tried"), [(3, True), (2, False)])
def test_a_fit_too_short_for_the_trials_runs_the_first_start_only(max_epochs: int, tried: bool) -> None:
    """trial_epochs=2 after a 1-epoch warm-up: a 3-epoch fit tries both starts (and runs 5 epochs); a 2-epoch fit has
    1 epoch left, so it runs start 0 alone, for 2 epochs, and warns."""
    L.seed_everything(0)
    callback = EMNoiseEstimation(warmup_epochs=1, starts=TWO_STARTS, trial_epochs=2)
    trainer = quiet_trainer(max_epochs=max_epochs, callbacks=[callback])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(small_model(), datamodule())
    too_short = [w for w in caught if "so this fit runs the first of its 2 EM starts only" in str(w.message)]
    assert trainer.current_epoch == (5 if tried else 2)
    assert len(callback.trial_scores) == (2 if tried else 0) and bool(too_short) is not tried
    assert callback.kept_start in (0, 1) if tried else callback.kept_start == 0


def test_a_checkpoint_from_before_starts_existed_resumes_as_its_one_start() -> None:
    """Trial state absent and EM begun: the fit was a single start, and resuming must not start trials mid-EM."""
    callback = EMNoiseEstimation(warmup_epochs=1)
    state = {name: getattr(callback, name) for name in callback._EM_STATE} | {"rounds": 4, "last_round_epoch": 4}
    callback.load_state_dict(state | {"train_pass_sums": None})
    assert (callback.trial, callback.kept_start, callback.rounds_run) == (2, 0, 4)
    assert callback.start_index == 0 and callback.snapshots == {}


def test_a_fit_stopped_during_the_trials_says_so() -> None:
    L.seed_everything(0)
    callback = EMNoiseEstimation(warmup_epochs=1, starts=TWO_STARTS, trial_epochs=2)

    class Stop(L.Callback):
        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if trainer.current_epoch == 3:  # in the second start's trial
                trainer.should_stop = True

    trainer = quiet_trainer(max_epochs=3, callbacks=[callback, Stop()])
    with pytest.warns(UserWarning, match="stopped during the trial of EM start 1"):
        trainer.fit(small_model(), datamodule())
    assert callback.trial == 1 and callback.kept_start == -1


def test_a_restored_snapshot_goes_back_to_the_devices_of_the_live_state() -> None:
    """A metric's persistent state is replaced, not copied into, by ``load_state_dict``: the snapshot's CPU copies
    must first go where the live tensors are (on a GPU, the accelerator), or the next ``update`` mixes devices."""
    from noisy_lightning.callbacks import on_devices_of

    saved = {"net.weight": torch.ones(2), "train_loss.mean_value": torch.tensor(3.0), "extra": 5}
    live = {"net.weight": torch.empty(2, device="meta"), "train_loss.mean_value": torch.empty((), device="meta")}
    moved = on_devices_of(saved, live)
    assert moved["net.weight"].device.type == "meta" and moved["train_loss.mean_value"].device.type == "meta"
    assert moved["extra"] == 5 and saved["net.weight"].device.type == "cpu"


def test_a_restored_snapshot_brings_back_the_loss_scaler() -> None:
    """Under 16-bit mixed precision a trial moves the loss scaler's scale; the next start must begin from the one the
    warm-up ended with, like the weights and the optimiser."""

    class Scaler:
        def __init__(self) -> None:
            self.scale = 1024.0

        def state_dict(self) -> dict[str, Any]:
            return {"scale": torch.tensor(self.scale)}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            self.scale = float(state["scale"])

    trainer = type("Trainer", (), {"optimizers": [], "lr_scheduler_configs": [], "precision_plugin": Scaler()})()
    callback, model = EMNoiseEstimation(), small_model()
    snapshot = callback._capture(trainer, model)
    trainer.precision_plugin.scale = 8.0  # what a trial's overflows did to it
    callback._restore(trainer, model, snapshot)
    assert trainer.precision_plugin.scale == 1024.0
