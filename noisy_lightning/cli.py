"""The ``noisy-lightning`` command: ``LightningCLI`` over ``NoisyLabelClassifier`` and ``NoisyLabelDataModule``.

    noisy-lightning fit --config configs/quickstart.yaml
    noisy-lightning fit --config configs/quickstart.yaml --model.method ce      # the cross-entropy baseline
    noisy-lightning test --config configs/quickstart.yaml --ckpt_path last
    noisy-lightning predict --config configs/quickstart.yaml --ckpt_path last   # writes label_issues.csv and more

What it adds to ``LightningCLI``:

- ``--ckpt_path last`` means the newest checkpoint of a run of the same configuration (the same ``model`` and
  ``data`` sections) under the logger's folder; ``test``, ``validate`` and ``predict`` never pick up another
  configuration's checkpoint, and write their results into that run's folder instead of a new one.
- ``test``, ``validate`` and ``predict`` need a checkpoint: ``--ckpt_path untrained`` evaluates a new network on
  purpose.
- A bad value is one short message naming the parameter, with no traceback (``NOISY_LIGHTNING_TRACEBACK=1`` shows
  it).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

import torch
import yaml
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.model_summary import ModelSummary as Summary
from torch import nn
from torchmetrics import Metric

from noisy_lightning.data import NoisyLabelDataModule
from noisy_lightning.module import NoisyLabelClassifier, check_checkpoint_file
from noisy_lightning.writers import ResultsWriter

EVALUATIONS = ("validate", "test", "predict")
UNTRAINED = "untrained"


class CLIError(Exception):
    """A mistake in the command line or the config, reported in one message."""


class ShortErrorParser(LightningArgumentParser):
    """A parser whose errors are a few lines naming the parameter, not a page of usage."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        lines = [line for line in str(message).splitlines() if line.strip()]
        shown = "\n  ".join(lines[:6]) + ("\n  ..." if len(lines) > 6 else "")
        raise CLIError(f"{shown}\n(run `noisy-lightning {self.prog.split()[-1]} --help` for the options)")


class NetworkSummary(ModelSummary):
    """Lightning's model summary without the metric objects: the network, the noise layer and their sizes."""

    def _summary(self, trainer: Any, pl_module: Any) -> Summary:
        summary = super()._summary(trainer, pl_module)
        for name in [name for name in summary._layer_summary if isinstance(_module(pl_module, name), Metric)]:
            del summary._layer_summary[name]
        return summary


def _module(root: nn.Module, name: str) -> nn.Module | None:
    return dict(root.named_modules()).get(name)


class SaveFitConfig(SaveConfigCallback):
    """Save ``config.yaml`` for ``fit`` only: an evaluation writes into the run it evaluates and keeps its config."""

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            super().setup(trainer, pl_module, stage)


class NoisyLabelCLI(LightningCLI):
    """``LightningCLI`` with per-configuration checkpoint resolution and explicit evaluation of untrained models."""

    def _run_subcommand(self, subcommand: str) -> None:
        config = self.config_init[subcommand]
        requested = config.get("ckpt_path")
        if subcommand in EVALUATIONS and requested is None:
            raise CLIError(
                f"{subcommand} needs a checkpoint: --ckpt_path last (the newest run of this config), a path, or "
                f"--ckpt_path {UNTRAINED} to evaluate a network that was never trained"
            )
        if requested == UNTRAINED:
            config["ckpt_path"] = None
        elif requested == "last":
            config["ckpt_path"] = self._latest_checkpoint(subcommand)
        elif requested is not None:
            check_checkpoint_file(requested)
            if subcommand in EVALUATIONS:
                self._log_into_run_of(Path(requested))
        if subcommand == "fit" or (self.trainer.loggers and getattr(self.trainer.loggers[0], "_version", None) is None):
            self._share_version()
        super()._run_subcommand(subcommand)

    def _share_version(self) -> None:
        """Give every logger the first one's version, so a TensorBoard and a CSV logger share one run folder."""
        loggers = [logger for logger in self.trainer.loggers if hasattr(logger, "_version")]
        if len(loggers) > 1:
            version = loggers[0].version
            for logger in loggers[1:]:
                logger._version = version

    def _runs_folder(self) -> Path:
        logger = self.trainer.logger
        if logger is None:
            return Path(self.trainer.default_root_dir) / "lightning_logs"
        return Path(logger.save_dir) / (logger.name or "")

    def _settings(self, subcommand: str) -> dict[str, Any]:
        """The model and data sections of this run's config, as plain data (what a checkpoint must match)."""
        # The same dump as the saved config.yaml, so that the two compare equal for the same settings.
        sections = yaml.safe_load(self._parser(subcommand).dump(self.config[subcommand], skip_none=False))
        return {key: sections.get(key) for key in ("model", "data")}

    def _latest_checkpoint(self, subcommand: str) -> str | None:
        folder = self._runs_folder()
        current = self._settings(subcommand)
        candidates = sorted(folder.glob("version_*/checkpoints/last*.ckpt"), key=lambda path: path.stat().st_mtime)
        mismatch = None
        for path in reversed(candidates):
            saved = path.parent.parent / "config.yaml"
            if not saved.exists():
                continue
            settings = yaml.safe_load(saved.read_text())
            saved_sections = {key: settings.get(key) for key in ("model", "data")}
            if _same_settings(saved_sections, current):
                if subcommand in EVALUATIONS:
                    self._log_into_run_of(path)
                return str(path)
            mismatch = mismatch or (path, _first_difference(saved_sections, current))
        if subcommand != "fit":
            where = f"under {folder}" if candidates else f"in {folder} (no runs yet)"
            detail = ""
            if mismatch is not None:
                path, (key, saved_value, value) = mismatch
                detail = f"; the newest, {path}, was trained with {key}={saved_value!r} (now {value!r})"
            raise CLIError(f"--ckpt_path last: no checkpoint of this configuration {where}{detail}")
        return None  # fit: nothing to resume, so Lightning starts afresh (and says so)

    def _log_into_run_of(self, checkpoint: Path) -> None:
        """Point the loggers at the run folder that holds ``checkpoint`` (``.../version_N/checkpoints/x.ckpt``)."""
        run = checkpoint.resolve().parent.parent
        if not run.name.startswith("version_"):
            return
        for logger in self.trainer.loggers:
            if hasattr(logger, "_version"):
                logger._version = int(run.name.removeprefix("version_"))


def _same_settings(saved: Any, current: Any) -> bool:
    """Equal settings, where a key missing on one side counts as ``None``: a run saved before an option existed
    matches a run that leaves the option at its ``None`` default."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return all(_same_settings(saved.get(key), current.get(key)) for key in set(saved) | set(current))
    return saved == current


def _first_difference(saved: Any, current: Any, prefix: str = "") -> tuple[str, Any, Any]:
    if isinstance(saved, dict) and isinstance(current, dict):
        for key in sorted(set(saved) | set(current), key=str):
            if not _same_settings(saved.get(key), current.get(key)):
                return _first_difference(saved.get(key), current.get(key), f"{prefix}{key}.")
    return prefix.rstrip("."), saved, current


def build_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Build (and by default run) the CLI; ``args`` default to ``sys.argv``."""
    # The shipped configs put a TensorBoard and a CSV logger in one run folder on purpose.
    warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
    return NoisyLabelCLI(
        NoisyLabelClassifier,
        NoisyLabelDataModule,
        # Any subclass, e.g. --model noisy_lightning.CoTeachingClassifier; a config without a class_path gets
        # NoisyLabelClassifier.
        subclass_mode_model=True,
        seed_everything_default=0,
        parser_class=ShortErrorParser,
        save_config_callback=SaveFitConfig,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,  # the model's own optimizer/lr_scheduler arguments are the only ones
        # Appended to the config's callbacks: predict writes predictions, theta and the label issues as CSV files.
        trainer_defaults={"callbacks": [ResultsWriter(), NetworkSummary()]},
        args=args,
        run=run,
    )


def close_process_group() -> None:
    """Destroy the default process group that a multi-process run leaves open, if there is one.

    Lightning's DDP strategy does not destroy it. Left to the interpreter's shutdown, gloo's worker threads can
    then abort a finished, successful process with SIGABRT ("terminate called without an active exception").
    Call this once, after the last ``Trainer`` call of a script that ran with ``strategy="ddp"``.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main() -> None:
    """Console-script entry point: errors in the arguments or the data are one message and exit status 2."""
    try:
        build_cli()
        # Only after success: destroying the group while another rank is still in a collective could hang.
        close_process_group()
    except (CLIError, ValueError, TypeError, FileNotFoundError, FloatingPointError) as error:
        if os.environ.get("NOISY_LIGHTNING_TRACEBACK"):
            raise
        sources = [arg for position, arg in enumerate(sys.argv) if sys.argv[position - 1] in ("-c", "--config")]
        origin = f" (config: {', '.join(sources)}, and the command line)" if sources else ""
        print(f"noisy-lightning: error: {error}{origin}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
