"""noisy-lightning: train classifiers on noisy labels with PyTorch Lightning.

Public API::

    from noisy_lightning import NoisyLabelDataModule, NoisyLabelClassifier, MLP, EMNoiseEstimation
    from noisy_lightning import CoTeachingClassifier, NoiseMatrixEstimation
    from noisy_lightning import find_label_issues
"""

from noisy_lightning import quiet
from noisy_lightning.callbacks import EMNoiseEstimation, NoiseMatrixEstimation, NoisyLabelFigures
from noisy_lightning.contract import NoisyLabelData, NoisyPool
from noisy_lightning.coteaching import CoTeachingClassifier
from noisy_lightning.data import NoisyLabelDataModule
from noisy_lightning.em import EMStart
from noisy_lightning.issues import LabelIssues, find_label_issues
from noisy_lightning.models import CNN, MLP
from noisy_lightning.module import NoisyLabelClassifier
from noisy_lightning.noise import build_transition_matrix, corrupt_labels
from noisy_lightning.writers import ResultsWriter

__all__ = [
    "CNN",
    "MLP",
    "CoTeachingClassifier",
    "EMNoiseEstimation",
    "EMStart",
    "LabelIssues",
    "NoiseMatrixEstimation",
    "NoisyLabelClassifier",
    "NoisyLabelData",
    "NoisyLabelDataModule",
    "NoisyLabelFigures",
    "NoisyPool",
    "ResultsWriter",
    "build_transition_matrix",
    "corrupt_labels",
    "find_label_issues",
]
__version__ = "0.4.0"

quiet.install()
