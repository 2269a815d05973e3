"""The ``noisy-lightning`` command: ``LightningCLI`` over ``NoisyLabelClassifier`` and ``NoisyLabelDataModule``.

noisy-lightning fit --config configs/quickstart.yaml
noisy-lightning test --config configs/quickstart.yaml --ckpt_path last
noisy-lightning fit --config configs/quickstart.yaml --print_config
noisy-lightning predict --config configs/quickstart.yaml --ckpt_path last   # writes label_issues.csv and more
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from noisy_lightning.data import NoisyLabelDataModule
from noisy_lightning.module import NoisyLabelClassifier
from noisy_lightning.writers import ResultsWriter


def build_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Build (and by default run) the CLI; ``args`` default to ``sys.argv``. Every run saves its config."""
    return LightningCLI(
        NoisyLabelClassifier,
        NoisyLabelDataModule,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        # Appended to the config's callbacks: predict writes predictions, theta and the label issues as CSV files.
        trainer_defaults={"callbacks": [ResultsWriter()]},
        args=args,
        run=run,
    )


def main() -> None:
    """Console-script entry point (returns ``None`` so that ``sys.exit(main())`` exits 0)."""
    build_cli()


if __name__ == "__main__":
    main()
