"""Small builders shared by the tests: a quiet CPU Trainer and models that keep their weights fixed."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from noisy_lightning import MLP, NoisyLabelClassifier

# Wall-clock limit for a test's subprocess or notebook cell that trains for real. Such a step takes about a minute on
# an idle 2-core machine; a CI runner that shares its cores with other jobs can be several times slower, and a
# timeout there would be a failure that says nothing about the code. A hang still ends the test.
SUBPROCESS_TIMEOUT_S = 900


def quiet_trainer(**kwargs: Any) -> L.Trainer:
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "logger": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
    }
    defaults.update(kwargs)
    return L.Trainer(**defaults)


class FrozenClassifier(NoisyLabelClassifier):
    """A classifier whose optimiser has learning rate 0: the weights stay at their seeded initialisation, so runs
    on 1 and N processes (or interrupted and not) can be compared sample for sample. No dropout and no shifts, so
    that training-pass outputs do not depend on how the random draws are spread over ranks."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("net", MLP(dropout=0.0))
        kwargs.setdefault("augment_shift", 0)
        super().__init__(**kwargs)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)
