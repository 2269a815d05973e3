"""What the benchmark scripts share: what a results file records about the run that wrote it, and its tables.

Every results file says what was measured, on what hardware and with which command: the ``.md`` files open with
:func:`metadata_line`, whose command is this process's real ``sys.argv`` (never typed), and the commit is read from
git. Tables are CSV written with the :mod:`csv` module, whole files through
:func:`noisy_lightning.files.atomic_write`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import multiprocessing
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Generic, TypeVar

import lightning as L
import torch

from noisy_lightning.data import NoisyLabelDataModule
from noisy_lightning.files import atomic_write
from noisy_lightning.issues import LabelIssues
from noisy_lightning.module import NoisyLabelClassifier

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
J = TypeVar("J")
R = TypeVar("R")

# A benchmark's own lines are its output: no logger, checkpoints, progress bar, model summary or sanity pass.
QUIET_TRAINER: dict[str, object] = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
}

# The first line of every .md under results/ after its title; tests read it back with this pattern.
METADATA = re.compile(r"^Written by `(?P<command>.+)` at commit (?P<commit>\S+) on (?P<machine>.+)\.$", re.MULTILINE)


def accuracy(model: NoisyLabelClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction of ``images`` whose predicted class (the argmax of the clean-label logits) is ``labels``."""
    return (model.logits_of(images).argmax(dim=1) == labels).double().mean().item()


def without_label_issues(issues: LabelIssues, datamodule: NoisyLabelDataModule) -> NoisyLabelDataModule:
    """ "EM + refit"'s data, as a user builds it: ``issues`` written to a ``label_issues.csv`` and ``datamodule``'s
    settings again with ``drop_label_issues`` set to it (the same split, less the flagged training labels)."""
    with tempfile.TemporaryDirectory() as folder:
        path = issues.to_csv(Path(folder) / "label_issues.csv")
        refit_data = NoisyLabelDataModule(**{**datamodule.hparams, "drop_label_issues": str(path)})
        refit_data.setup("fit")  # reads the file, which goes with the folder
    return refit_data


def command_line(argv: Sequence[str] | None = None) -> str:
    """The running command as a shell line: ``python`` followed by ``sys.argv``, quoted where needed."""
    return shlex.join(["python", *(sys.argv if argv is None else argv)])


def commit() -> str:
    """The checked-out commit, with ``-dirty`` when tracked files differ from it.

    ``$NOISY_LIGHTNING_COMMIT``, when set, instead: a copy of a clean checkout sent to another machine says which
    commit it is (its own git history, if any, may be another's). ``unknown`` outside git."""

    if given := os.environ.get("NOISY_LIGHTNING_COMMIT"):  # a copy of a clean checkout, sent without its history
        return given

    def git(*arguments: str) -> subprocess.CompletedProcess[str]:
        # --no-optional-locks: reading must not refresh the index of a checkout someone else may be using.
        command = ["git", "--no-optional-locks", "-C", str(ROOT), *arguments]
        return subprocess.run(command, capture_output=True, text=True, check=False)

    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return "unknown"
        dirty = git("diff", "--quiet", "HEAD", "--").returncode != 0
    except OSError:  # no git on this machine
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty else "")


def machine(accelerator: str = "cpu") -> str:
    """The hardware and software a measurement ran on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):  # no /proc (not Linux), or no model name in it
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    device = f"{torch.cuda.get_device_name(0)}, " if accelerator == "gpu" else ""
    return (
        f"{device}{cpu}, {torch.get_num_threads()} torch threads ({os.cpu_count()} logical CPUs), "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}, torch {torch.__version__}, "
        f"lightning {L.__version__}"
    )


def metadata_line(command: str, at_commit: str, on_machine: str) -> str:
    """The line that says which command wrote a results file, at which commit, on which machine."""
    return f"Written by `{command}` at commit {at_commit} on {on_machine}."


# ---- tables -------------------------------------------------------------------------------------------------------
def read_table(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV as dictionaries; no rows when the file does not exist."""
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _checked(row: Mapping[str, object], columns: Sequence[str]) -> Mapping[str, object]:
    missing = [key for key in columns if key not in row]
    if missing:
        raise ValueError(f"a row lacks the column(s) {', '.join(missing)}")
    return row


def write_table(path: Path, columns: Sequence[str], rows: Iterable[Mapping[str, object]]) -> None:
    """Write a whole CSV at once: the header, then ``rows`` (each with every column; other keys are not written)."""
    with atomic_write(path, mode="w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(_checked(row, columns) for row in rows)


def append_row(path: Path, columns: Sequence[str], row: Mapping[str, object], hint: str = "") -> None:
    """Add one row at the end of a CSV without rewriting it; a missing or empty file is started with the header.

    A file whose header is not ``columns`` is refused (SystemExit, with ``hint``): appending would misalign it.
    """
    if not path.exists() or path.stat().st_size == 0:
        write_table(path, columns, [row])
        return
    with path.open(newline="") as handle:
        header = next(csv.reader(handle), [])
    if header != list(columns):
        raise SystemExit(f"{path} does not have the columns this script writes; {hint or 'start a new file'}")
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
        writer.writerow(_checked(row, columns))


def write_text(path: Path, lines: Iterable[str]) -> None:
    """Write a whole text file at once, one line per item."""
    with atomic_write(path, mode="w", newline="") as handle:
        handle.write("\n".join(lines) + "\n")


def provenance(runs: Sequence[Mapping[str, str]]) -> list[str]:
    """One line per command and commit that measured rows of the CSV, with how many."""
    counts: dict[tuple[str, str, str], int] = {}
    for run in runs:
        key = (run["command"], run["commit"], run["machine"])
        counts[key] = counts.get(key, 0) + 1
    lines = ["Runs, by the `command`, `commit` and `machine` columns of the CSV:", ""]
    lines += [f"- {count} by `{command}` at commit {at} on {on};" for (command, at, on), count in counts.items()]
    return [*lines, ""] if counts else []


# ---- running fits side by side --------------------------------------------------------------------------------------
def threads_per_worker(workers: int) -> int:
    """The torch threads of each of ``workers`` processes sharing this machine's logical CPUs."""
    return max(1, (os.cpu_count() or 1) // workers)


def _start_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def run_jobs(
    jobs: Sequence[J], measure: Callable[[J], R], workers: int = 1, threads: int | None = None
) -> Iterator[tuple[J, R]]:
    """``(job, measure(job))`` for every job, in the order they finish.

    With ``workers == 1`` the jobs run one after another in this process. With more, each runs in one of ``workers``
    spawned processes with ``threads`` torch threads (default :func:`threads_per_worker`; a GPU, if the fits use
    one, is shared by all),
    and only this process sees the results: it stays the single writer of the results files, so a run stopped
    halfway leaves whole rows. ``measure`` and the jobs must then be picklable (a module-level function).
    """
    if workers < 1:
        raise ValueError(f"workers={workers}: must be at least 1")
    if workers == 1:
        for job in jobs:
            yield job, measure(job)
        return
    # spawn, not fork: a forked CUDA context is unusable, and fork would copy this process's torch threads.
    context = multiprocessing.get_context("spawn")
    threads = threads or threads_per_worker(workers)
    with context.Pool(workers, initializer=_start_worker, initargs=(threads,)) as pool:
        yield from pool.imap_unordered(_JobRunner(measure), jobs)


class _JobRunner(Generic[J, R]):
    """A picklable ``job -> (job, measure(job))`` for the pool."""

    def __init__(self, measure: Callable[[J], R]) -> None:
        self.measure = measure

    def __call__(self, job: J) -> tuple[J, R]:
        return job, self.measure(job)


def add_fit_arguments(parser: argparse.ArgumentParser) -> None:
    """``--accelerator``, ``--workers`` and ``--threads``, shared by the scripts that fit through :func:`run_jobs`."""
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu", help="where every fit runs")
    parser.add_argument(
        "--workers", type=int, default=1, help="fits at a time, each in its own process (they share a GPU)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of each worker (default: the logical CPUs divided among --workers; lower it when "
        "several scripts share the machine)",
    )


def fit_provenance(args: argparse.Namespace) -> dict[str, str]:
    """The ``commit``, ``machine`` and ``command`` columns of a fit script's rows, from its parsed arguments.

    With several workers this process takes their thread count too, so that the machine column says how the fits
    shared the machine."""
    if args.workers > 1:
        torch.set_num_threads(args.threads or threads_per_worker(args.workers))
    on_machine = machine(args.accelerator) + (f", {args.workers} fits at a time" if args.workers > 1 else "")
    return {"commit": commit(), "machine": on_machine, "command": command_line()}


def check_fit_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, through ``parser``, a worker count under 1 or a GPU that is not there."""
    if args.workers < 1:
        parser.error(f"--workers {args.workers}: must be at least 1")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads {args.threads}: must be at least 1")
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        parser.error("--accelerator gpu: no CUDA device is visible")
