"""noisy-lightning: train classifiers on noisy labels with PyTorch Lightning.

Public API::

    from noisy_lightning import NoisyLabelDataModule, NoisyLabelClassifier, MLP, EMNoiseEstimation
"""

from noisy_lightning.callbacks import EMNoiseEstimation, NoisyLabelFigures
from noisy_lightning.data import NoisyLabelDataModule
from noisy_lightning.models import MLP
from noisy_lightning.module import NoisyLabelClassifier
from noisy_lightning.noise import build_transition_matrix, corrupt_labels

__all__ = [
    "MLP",
    "EMNoiseEstimation",
    "NoisyLabelClassifier",
    "NoisyLabelDataModule",
    "NoisyLabelFigures",
    "build_transition_matrix",
    "corrupt_labels",
]
__version__ = "0.1.0"
