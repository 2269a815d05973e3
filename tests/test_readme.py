"""The README's Python snippets run as written, shrunk to the shipped sample and a few epochs.

Only three things change: ``dataset="mnist"`` becomes ``"mnist_sample"`` (no download), every ``Trainer`` runs two
epochs with its logs under a temporary folder, and every ``EMNoiseEstimation`` warms up for one epoch, so that EM
really runs. Everything else (imports, argument names, the attributes read afterwards) is the README's own text, so
a renamed argument or attribute fails here.
"""

import re
from pathlib import Path
from typing import Any

import lightning
import pytest
import torch

import noisy_lightning

README = Path(__file__).resolve().parents[1] / "README.md"


def python_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


@pytest.fixture
def shrunk(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[lightning.Trainer]:
    """Patch Trainer and EMNoiseEstimation where the snippets import them from; returns the trainers built."""
    real_trainer, real_callback = lightning.Trainer, noisy_lightning.EMNoiseEstimation
    trainers: list[lightning.Trainer] = []

    def small_trainer(**kwargs: Any) -> lightning.Trainer:
        kwargs.update(max_epochs=2, default_root_dir=str(tmp_path), enable_progress_bar=False)
        trainers.append(real_trainer(**kwargs))
        return trainers[-1]

    def early_callback(**kwargs: Any) -> noisy_lightning.EMNoiseEstimation:
        return real_callback(**{**kwargs, "warmup_epochs": 1})

    monkeypatch.setattr(lightning, "Trainer", small_trainer)
    monkeypatch.setattr(noisy_lightning, "EMNoiseEstimation", early_callback)
    monkeypatch.chdir(tmp_path)
    return trainers


def run_snippet(source: str) -> dict[str, Any]:
    assert 'dataset="mnist"' in source, "the snippet no longer reads MNIST; update this test"
    namespace: dict[str, Any] = {"__name__": "readme_snippet"}
    exec(compile(source.replace('dataset="mnist"', 'dataset="mnist_sample"'), str(README), "exec"), namespace)
    return namespace


def assert_row_stochastic(matrix: torch.Tensor) -> None:
    assert matrix.shape == (10, 10)
    torch.testing.assert_close(matrix.sum(dim=1), torch.ones(10), atol=1e-5, rtol=0)


def test_readme_has_the_snippets_this_file_runs() -> None:
    snippets = python_snippets()
    assert len(snippets) == 2
    assert "trainer.test(model, data)" in snippets[0] and "def fit_em" in snippets[1]


def test_python_api_snippet_runs(shrunk: list[lightning.Trainer], tmp_path: Path) -> None:
    namespace = run_snippet(python_snippets()[0])
    assert len(shrunk) == 1 and shrunk[0].current_epoch == 2
    assert 0.0 <= shrunk[0].callback_metrics["test/acc"].item() <= 1.0
    # After one EM round theta is an estimate, not the initial identity.
    noise_matrix = namespace["model"].noise_matrix
    assert_row_stochastic(noise_matrix)
    assert not torch.allclose(noise_matrix, torch.eye(10))
    assert list(tmp_path.rglob("*.png")), "NoisyLabelFigures wrote its figures"


def test_recipe_selection_snippet_keeps_the_fit_with_the_best_noisy_validation_accuracy(
    shrunk: list[lightning.Trainer],
) -> None:
    namespace = run_snippet(python_snippets()[1])
    fits = namespace["fits"]
    assert len(fits) == len(shrunk) == 3
    accuracies = [accuracy for accuracy, _ in fits]
    assert namespace["noisy_accuracy"] == max(accuracies)
    assert namespace["model"] is fits[accuracies.index(max(accuracies))][1]
    assert_row_stochastic(namespace["model"].noise_matrix)
