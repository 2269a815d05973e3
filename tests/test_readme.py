"""The README's Python snippets run as written, shrunk to a few epochs.

Two things change: every ``Trainer`` runs two epochs with its files under a temporary folder, and every
``EMNoiseEstimation`` built by the snippet warms up for one epoch, so that EM really runs. Everything else (imports,
argument names, the attributes read afterwards) is the README's own text, so a renamed argument or attribute fails
here.
"""

import csv
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
        kwargs.update(max_epochs=2, default_root_dir=str(tmp_path), enable_progress_bar=False, accelerator="cpu")
        trainers.append(real_trainer(**kwargs))
        return trainers[-1]

    def early_callback(**kwargs: Any) -> noisy_lightning.EMNoiseEstimation:
        return real_callback(**{**kwargs, "warmup_epochs": 1})

    monkeypatch.setattr(lightning, "Trainer", small_trainer)
    monkeypatch.setattr(noisy_lightning, "EMNoiseEstimation", early_callback)
    monkeypatch.chdir(tmp_path)
    lightning.seed_everything(0)
    return trainers


def run_snippet(source: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": "readme_snippet"}
    exec(compile(source, str(README), "exec"), namespace)
    return namespace


def read_issues(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_readme_has_the_snippets_this_file_runs() -> None:
    snippets = python_snippets()
    assert len(snippets) == 2
    assert "trainer.test(model, data)" in snippets[0] and "from_tensors" in snippets[1]
    assert len(snippets[1].strip().splitlines()) <= 10, "the own-data path fits in ten lines"


def test_python_api_snippet_runs(shrunk: list[lightning.Trainer], tmp_path: Path) -> None:
    namespace = run_snippet(python_snippets()[0])
    assert len(shrunk) == 2 and shrunk[0].current_epoch == 2 and shrunk[1].current_epoch == 2
    assert shrunk[0].callback_metrics["test/acc"].item() > 0.25  # chance is 0.1 (2 epochs, 1 of them EM)
    noise_matrix = namespace["model"].noise_matrix
    torch.testing.assert_close(noise_matrix.sum(dim=1), torch.ones(10), atol=1e-5, rtol=0)
    assert not torch.allclose(noise_matrix, torch.eye(10)), "after one EM round theta is an estimate"
    rows = read_issues(tmp_path / "label_issues.csv")
    assert len(rows) == 4000 and float(rows[0]["score"]) <= float(rows[-1]["score"])
    # EM + refit: the second fit trains on the training split less the labels that the file flags
    flagged = {int(row["index"]) for row in rows if row["is_issue"] == "1" and row["split"] == "train"}
    assert flagged
    kept = namespace["refit"].pool.train_indices.tolist()
    assert kept == [index for index in namespace["data"].pool.train_indices.tolist() if index not in flagged]


def test_own_data_snippet_runs(shrunk: list[lightning.Trainer], tmp_path: Path) -> None:
    run_snippet(python_snippets()[1])
    assert len(shrunk) == 1 and shrunk[0].current_epoch == 2
    rows = read_issues(tmp_path / "label_issues.csv")
    assert len(rows) == 600 and sorted(int(row["index"]) for row in rows) == list(range(600))
