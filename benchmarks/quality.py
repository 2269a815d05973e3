"""Quality benchmark: clean test accuracy, theta error and label recovery of EM against the baselines.

    NOISY_LIGHTNING_DATA=../shared/datasets python benchmarks/quality.py                      # MNIST table
    NOISY_LIGHTNING_DATA=/usr/share/datasets python benchmarks/quality.py --dataset fashion_mnist
    NOISY_LIGHTNING_DATA=../shared/datasets python benchmarks/quality.py --variants           # what failed, too
    python benchmarks/quality.py --select benchmarks/results/quality_mnist benchmarks/results/quality_mnist_hard_w10 \
        benchmarks/results/quality_mnist_e50 --out benchmarks/results/quality_mnist_selected  # best noisy-val run

Every number is the **last epoch** of a fixed schedule chosen before looking at the test set (no early stopping on
test, no per-row tuning). Each run appends one line to ``<out>.csv`` as soon as it ends, so an interrupted
benchmark keeps what it measured and ``--resume`` skips the runs already there; ``<out>.md`` is rewritten
(atomically) from the CSV after every run. ``--select`` runs nothing: it picks, for each row and seed, the EM run
with the highest noisy-validation accuracy among tables already measured (:func:`select_by_noisy_validation`),
and picks the CE baselines the same way.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import torch

from noisy_lightning import MLP, EMNoiseEstimation, NoisyLabelClassifier, NoisyLabelDataModule

RESULTS = Path(__file__).parent / "results"

# (row name, noise_type, noise_rate, published figure, target) -- the table of issue 3.
MNIST_ROWS = [
    ("uniform 50%", "uniform", 0.5, "95.71% (original notebook, one EM step)", ">= 98.0%, >= 97% recovered"),
    ("permutation 46%", "permutation", 0.46, "94.98% (noise adaptation layer, 2017)", ">= 97.5%"),
    ("pair-flip 45%", "pair_flip", 0.45, "87.58% (Co-teaching)", ">= 95%"),
    ("symmetric 50%", "symmetric", 0.5, "91.68% (Co-teaching)", ">= 97.5%"),
    ("symmetric 20%", "symmetric", 0.2, "97.71% (Co-teaching)", ">= 98.3%"),
    ("symmetric 80%", "symmetric", 0.8, "-", "reported as measured"),
]
FASHION_ROWS = [
    ("symmetric 50%", "symmetric", 0.5, "-", "reported as measured"),
    ("pair-flip 45%", "pair_flip", 0.45, "-", "reported as measured"),
]


@dataclass(frozen=True)
class Recipe:
    """Everything that defines a run besides the noise and the seed. The defaults are the library's EM recipe."""

    method: str = "em"
    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3
    dropout: float = 0.5
    augment_shift: int = 2
    lr_scheduler: str = "cosine"
    em_targets: str = "online"
    e_step: str = "inference"
    noise_matrix_from: str = "train"
    warmup_epochs: int = 6
    initialisation: str = "hard_confusion"
    hold_initial_rounds: int = 3


DEFAULT_EM = Recipe()
BASELINE_CE = Recipe(method="ce")
NAIVE_EM = Recipe(dropout=0.0, augment_shift=0, lr_scheduler="none", em_targets="stored", epochs=20)

# The levers of issue 3: (noise type, rate, recipe). The first group is measured on uniform 50% (the original
# notebook's noise) around the default of commit eb278d7 (hard init, 6-epoch warm-up), kept as it was measured;
# the second on asymmetric noise, where EM collapsed or merged classes before the hard init, the held rounds, the
# balanced init and the longer warm-up. Rows are named by what they change, and a former default by its commit.
NO_HOLD = {"hold_initial_rounds": 0}
HARD_INIT = {"initialisation": "hard_confusion"}
DEFAULT_AT_EB278D7 = Recipe(warmup_epochs=6, **HARD_INIT)  # the default again (the balanced 10-epoch one was not)
BALANCED_10 = Recipe(warmup_epochs=10, initialisation="balanced")


def _changed(recipe: Recipe, **changes: object) -> Recipe:
    return Recipe(**{**asdict(recipe), **changes})


VARIANTS: dict[str, tuple[str, float, Recipe]] = {
    "naive EM (stored posteriors, no regularisation, no held rounds)": (
        "uniform",
        0.5,
        _changed(NAIVE_EM, warmup_epochs=6, **HARD_INIT, **NO_HOLD),
    ),
    "online posteriors, no regularisation": (
        "uniform",
        0.5,
        _changed(DEFAULT_AT_EB278D7, dropout=0.0, augment_shift=0, lr_scheduler="none", epochs=20),
    ),
    "stored posteriors + dropout 0.5 + shift 2": ("uniform", 0.5, _changed(DEFAULT_AT_EB278D7, em_targets="stored")),
    "default at eb278d7: online posteriors + dropout 0.5 + shift 2, hard init, 3 held rounds, 6-epoch warm-up": (
        "uniform",
        0.5,
        DEFAULT_AT_EB278D7,
    ),
    "default at eb278d7 without held rounds (theta M-step from the first round)": (
        "uniform",
        0.5,
        _changed(DEFAULT_AT_EB278D7, **NO_HOLD),
    ),
    "default at eb278d7, theta M-step on the validation split": (
        "uniform",
        0.5,
        _changed(DEFAULT_AT_EB278D7, noise_matrix_from="validation"),
    ),
    "default at eb278d7, E-step from the training pass": (
        "uniform",
        0.5,
        _changed(DEFAULT_AT_EB278D7, e_step="train_pass"),
    ),
    # The learning curve of the default on seed 0 still rose at epoch 30, on the noisy validation labels too.
    "default at eb278d7, 50 epochs (the cosine schedule stretched over 50)": (
        "uniform",
        0.5,
        _changed(DEFAULT_AT_EB278D7, epochs=50),
    ),
    # The EM fields of a CE recipe play no part; they are kept as they were recorded.
    "CE baseline + dropout 0.5 + shift 2": ("uniform", 0.5, _changed(DEFAULT_AT_EB278D7, method="ce")),
    "CE baseline, no regularisation": (
        "uniform",
        0.5,
        _changed(DEFAULT_AT_EB278D7, method="ce", dropout=0.0, augment_shift=0, lr_scheduler="none"),
    ),
    # Asymmetric noise. The failures of the 2- and 6-epoch defaults were diagnosed on the training labels of seeds
    # 0-5; seeds 6-8 check the current default on permutations that played no part in choosing it.
    "pair-flip 45%: the paper's schedule (soft init, no held rounds, 2-epoch warm-up)": (
        "pair_flip",
        0.45,
        Recipe(initialisation="soft_confusion", warmup_epochs=2, **NO_HOLD),
    ),
    "pair-flip 45%: hard init, 3 held rounds, 2-epoch warm-up (default at b15928e)": (
        "pair_flip",
        0.45,
        _changed(DEFAULT_AT_EB278D7, warmup_epochs=2),
    ),
    "pair-flip 45%: hard init, 3 held rounds, 6-epoch warm-up (default at eb278d7)": (
        "pair_flip",
        0.45,
        DEFAULT_AT_EB278D7,
    ),
    "pair-flip 45%: balanced init, 3 held rounds, 10-epoch warm-up": ("pair_flip", 0.45, BALANCED_10),
    "permutation 46%: hard init, 3 held rounds, 2-epoch warm-up (default at b15928e)": (
        "permutation",
        0.46,
        _changed(DEFAULT_AT_EB278D7, warmup_epochs=2),
    ),
    "permutation 46%: hard init, 3 held rounds, 6-epoch warm-up (default at eb278d7)": (
        "permutation",
        0.46,
        DEFAULT_AT_EB278D7,
    ),
    "permutation 46%: balanced init, 6-epoch warm-up": ("permutation", 0.46, _changed(BALANCED_10, warmup_epochs=6)),
    "permutation 46%: hard init, 10-epoch warm-up": ("permutation", 0.46, _changed(BALANCED_10, **HARD_INIT)),
    "permutation 46%: balanced init, 3 held rounds, 10-epoch warm-up": ("permutation", 0.46, BALANCED_10),
    # The 50-epoch stretch that helped every row of quality_mnist_e50.md but symmetric 80%, on all nine seeds.
    "permutation 46%: hard init, 6-epoch warm-up, 50 epochs": (
        "permutation",
        0.46,
        _changed(DEFAULT_AT_EB278D7, epochs=50),
    ),
}

# What em_variants.csv holds: every variant on seed 0; the asymmetric rows of the 2- and 6-epoch hard defaults
# and of the balanced 10-epoch recipe on seeds 0-5; the last two on permutation 46% also on the fresh seeds 6-8;
# the two halves of the balanced 10-epoch recipe on seeds 0, 3 and 5 (the balanced 6-epoch one on 0-5), the hard
# 10-epoch one then on all nine seeds; the uniform default and its 50-epoch stretch on seeds 0-2; the 50-epoch
# stretch of the permutation default on all nine seeds. The balanced 10-epoch rows for seeds 0-2 are the runs of
# quality_mnist_balanced_w10.csv (same recipe), copied in.
VARIANT_COMMANDS = (
    "python benchmarks/quality.py --variants --seeds 0 --resume",
    "python benchmarks/quality.py --variants --seeds 1 2 3 4 5 --resume --rows "
    '"pair-flip 45%: hard" "pair-flip 45%: balanced" "permutation 46%: hard init, 3" '
    '"permutation 46%: balanced init, 3"',
    "python benchmarks/quality.py --variants --seeds 6 7 8 --resume --rows "
    '"permutation 46%: hard init, 3 held rounds, 6" "permutation 46%: balanced init, 3"',
    "python benchmarks/quality.py --variants --seeds 3 5 --resume --rows "
    '"permutation 46%: balanced init, 6" "permutation 46%: hard init, 10"',
    'python benchmarks/quality.py --variants --seeds 1 2 4 --resume --rows "permutation 46%: balanced init, 6"',
    'python benchmarks/quality.py --variants --seeds 1 2 4 6 7 8 --resume --rows "permutation 46%: hard init, 10"',
    "python benchmarks/quality.py --variants --seeds 0 1 2 --resume --rows "
    '"default at eb278d7: online" "default at eb278d7, 50"',
    'python benchmarks/quality.py --variants --seeds 0 1 2 3 4 5 6 7 8 --resume --rows "permutation 46%: hard init, 6"',
)

# Rows of the variants table that are not runs: for each seed, the run of one of the named variants with the highest
# noisy-validation accuracy (what a user without clean labels can do with two fits).
VARIANT_SELECTIONS: dict[str, tuple[str, ...]] = {
    "uniform 50%: 30 or 50 epochs (default at eb278d7), picked per seed by noisy-validation accuracy": (
        "default at eb278d7: online posteriors + dropout 0.5 + shift 2, hard init, 3 held rounds, 6-epoch warm-up",
        "default at eb278d7, 50 epochs (the cosine schedule stretched over 50)",
    ),
    "permutation 46%: 6- or 10-epoch warm-up (hard init), picked per seed by noisy-validation accuracy": (
        "permutation 46%: hard init, 3 held rounds, 6-epoch warm-up (default at eb278d7)",
        "permutation 46%: hard init, 10-epoch warm-up",
    ),
    "permutation 46%: 6-epoch warm-up and 30 or 50 epochs, or 10-epoch warm-up and 30, picked per seed by "
    "noisy-validation accuracy": (
        "permutation 46%: hard init, 3 held rounds, 6-epoch warm-up (default at eb278d7)",
        "permutation 46%: hard init, 10-epoch warm-up",
        "permutation 46%: hard init, 6-epoch warm-up, 50 epochs",
    ),
}


def run_one(dataset: str, noise_type: str, noise_rate: float, seed: int, recipe: Recipe) -> dict[str, float]:
    """Train one model with ``Trainer.fit`` and return its last-epoch metrics."""
    L.seed_everything(seed, verbose=False)
    datamodule = NoisyLabelDataModule(
        dataset=dataset, noise_type=noise_type, noise_rate=noise_rate, seed=seed, batch_size=recipe.batch_size
    )
    model = NoisyLabelClassifier(
        net=MLP(hidden_sizes=[500, 300], dropout=recipe.dropout),
        method=recipe.method,
        lr=recipe.lr,
        lr_scheduler=recipe.lr_scheduler,
        augment_shift=recipe.augment_shift,
        em_targets=recipe.em_targets,
    )
    callbacks = []
    if recipe.method == "em":
        callbacks.append(
            EMNoiseEstimation(
                warmup_epochs=recipe.warmup_epochs,
                e_step=recipe.e_step,
                noise_matrix_from=recipe.noise_matrix_from,
                initialisation=recipe.initialisation,
                hold_initial_rounds=recipe.hold_initial_rounds,
            )
        )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=recipe.epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    started = time.perf_counter()
    trainer.fit(model, datamodule)
    seconds = time.perf_counter() - started
    # trainer.test() replaces callback_metrics, so read the fit's last-epoch metrics first.
    metrics = {key: value.item() for key, value in trainer.callback_metrics.items() if value.numel() == 1}
    test_accuracy = trainer.test(model, datamodule, verbose=False)[0]["test/acc"]
    return {
        "test_acc": test_accuracy,
        "val_acc_noisy": metrics["val/acc_noisy"],
        "val_acc_clean": metrics["val/acc_clean"],
        "theta_error": metrics.get("em/theta_error", float("nan")),
        "label_recovery": metrics.get("em/label_recovery", float("nan")),
        "flip_rate": datamodule.corruption.flip_rate,
        "fit_seconds": seconds,
    }


# ---- bookkeeping --------------------------------------------------------------------------------------------------
COLUMNS = [
    "dataset",
    "row",
    "noise_type",
    "noise_rate",
    "recipe",
    "seed",
    "recipe_json",
    "test_acc",
    "val_acc_noisy",
    "val_acc_clean",
    "theta_error",
    "label_recovery",
    "flip_rate",
    "fit_seconds",
]


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary neighbour and a rename: never a half-written file."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w", newline="") as stream:
            stream.write(text)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def append_row(path: Path, row: dict[str, object]) -> None:
    rows = [*read_rows(path), {key: str(row[key]) for key in COLUMNS}]
    lines = [",".join(COLUMNS)]
    lines += [",".join(_csv_field(existing[key]) for key in COLUMNS) for existing in rows]
    atomic_write(path, "\n".join(lines) + "\n")


def _csv_field(value: str) -> str:
    return '"' + value.replace('"', '""') + '"' if any(c in value for c in ',"\n') else value


def mean_std(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    values = [v for v in values if v == v]  # drop NaN (no ground truth for the baselines)
    if not values:
        return "-"
    mean = statistics.fmean(values) * scale
    spread = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def write_markdown(csv_path: Path, md_path: Path, title: str, rows: list[tuple], command: str) -> None:
    results = read_rows(csv_path)

    def select(row_name: str, recipe: str) -> list[dict[str, str]]:
        return [r for r in results if r["row"] == row_name and r["recipe"] == recipe]

    def column(records: list[dict[str, str]], key: str, scale: float = 100.0, digits: int = 2) -> str:
        return mean_std([float(r[key]) for r in records], scale, digits)

    lines = [
        f"# {title}",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine()}.",
        "",
        "Clean test accuracy (%) at the last epoch, mean ± std over seeds; theta error = ||theta - T||_1 / ||T||_1; "
        "recovery = share of training labels whose EM posterior argmax is the true label. The clean baseline is "
        "the same network and recipe as the CE column, trained on uncorrupted labels.",
        "",
        "| noise | seeds | CE on noisy labels | EM (ours) | clean labels | theta error | recovered (%) | published | "
        "target |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    clean = select("clean", "ce")
    for name, _, _, published, target in rows:
        em_runs, ce_runs = select(name, "em"), select(name, "ce")
        seeds = len(em_runs)
        lines.append(
            f"| {name} | {seeds} | {column(ce_runs, 'test_acc')} | {column(em_runs, 'test_acc')} | "
            f"{column(clean, 'test_acc')} | {column(em_runs, 'theta_error', 1.0, 3)} | "
            f"{column(em_runs, 'label_recovery')} | {published} | {target} |"
        )
    em_results = [r for r in results if r["recipe"] == "em"]
    recipe = json.loads(em_results[0]["recipe_json"]) if em_results else asdict(DEFAULT_EM)
    lines += ["", f"EM recipe: `{json.dumps(recipe)}`. CE rows use the same recipe with `method: ce`.", ""]
    atomic_write(md_path, "\n".join(lines))


# ---- selection by noisy-validation accuracy ---------------------------------------------------------------------
def select_by_noisy_validation(candidates: Sequence[Sequence[dict[str, str]]]) -> list[dict[str, str]]:
    """For each (row, seed), the candidate run with the highest last-epoch noisy-validation accuracy.

    ``candidates[k]`` holds the runs of candidate ``k`` (rows of a results CSV; only their ``row``, ``seed`` and
    ``val_acc_noisy`` are read). This is model selection as a user without clean labels can do it: train each
    candidate, keep the one whose predictions agree best with the noisy validation labels. Under class-conditional
    noise whose diagonal dominates its column, ``P(z = f(x))`` grows with the clean accuracy of ``f``, so the noisy
    accuracy ranks fits the same way the clean one does, up to sampling noise (6,000 validation images on MNIST).
    The clean labels and the test set play no part.

    Only (row, seed) pairs that every candidate measured are selected, so that a pick never compares a partial set.
    Ties go to the earlier candidate (put the default first). Each returned run is a copy with ``candidate`` set to
    the index of the candidate it came from, in the order of the first candidate's runs.
    """
    indexed = [{(run["row"], run["seed"]): run for run in runs} for runs in candidates]
    selected = []
    for key in indexed[0] if indexed else {}:
        if not all(key in runs for runs in indexed):
            continue
        best = max(range(len(indexed)), key=lambda k: (float(indexed[k][key]["val_acc_noisy"]), -k))
        selected.append({**indexed[best][key], "candidate": str(best)})
    return selected


def describe_recipe(run: dict[str, str]) -> str:
    """A short name for the EM recipe of a run: its initialisation, warm-up and length."""
    recipe = json.loads(run["recipe_json"])
    initialisation = recipe["initialisation"].replace("_confusion", "")
    return f"{initialisation} init, {recipe['warmup_epochs']}-epoch warm-up, {recipe['epochs']} epochs"


def write_selection(stems: Sequence[Path], out: Path, title: str, rows: list[tuple], command: str) -> None:
    """Write ``out.csv`` (the selected runs) and ``out.md`` (each candidate's EM column, then the selected one).

    The baselines are picked the same way as EM, among the candidates' CE runs, so that both methods get the same
    model selection: a table whose candidates differ in length gives CE the longer fit too when its noisy
    validation accuracy says so.
    """
    tables = [read_rows(stem.with_suffix(".csv")) for stem in stems]
    for stem, runs in zip(stems, tables, strict=True):
        if not runs:
            raise SystemExit(f"--select: {stem.with_suffix('.csv')} is missing or empty")
        lacking = [key for key in COLUMNS if key not in runs[0]]
        if lacking:
            raise SystemExit(
                f"--select: {stem.with_suffix('.csv')} lacks the column(s) {', '.join(lacking)}; "
                "select among tables that this script wrote"
            )

    def runs_of(method: str) -> list[list[dict[str, str]]]:
        return [[run for run in runs if run["recipe"] == method] for runs in tables]

    candidates = runs_of("em")
    if any(not runs for runs in candidates):
        raise SystemExit("--select: every candidate table needs EM runs")
    selected = select_by_noisy_validation(candidates)
    baselines = select_by_noisy_validation([runs for runs in runs_of("ce") if runs])
    names = [describe_recipe(runs[0]) for runs in candidates]

    def column(records: list[dict[str, str]], key: str, scale: float = 100.0, digits: int = 2) -> str:
        return mean_std([float(r[key]) for r in records], scale, digits)

    def of_row(records: list[dict[str, str]], name: str, recipe: str = "em") -> list[dict[str, str]]:
        return [r for r in records if r["row"] == name and r["recipe"] == recipe]

    candidate_columns = " | ".join(f"EM, {name}" for name in names)
    lines = [
        f"# {title}",
        "",
        f"Command: `{command}` (runs nothing: it reads the candidates' tables).",
        "",
        "Candidates: "
        + "; ".join(f"`{stem.with_suffix('.csv').name}` ({name})" for stem, name in zip(stems, names, strict=True))
        + ". For each row and seed, the EM run with the highest noisy-validation accuracy at the last epoch is "
        "kept (ties go to the first candidate); the test set and the clean labels play no part. Costs one fit per "
        "candidate. The CE and clean-label columns are picked the same way among the candidates' CE runs (the "
        "warm-up does not change CE, so they differ only in length). Clean test accuracy (%), mean ± std over the "
        "seeds that every candidate measured; theta error and recovery are those of the selected runs.",
        "",
        f"| noise | seeds | CE on noisy labels, selected | {candidate_columns} | EM, selected | worst seed, selected | "
        "picked (runs per candidate) | clean labels, selected | theta error | recovered (%) | target |",
        "|---|---|---|" + "---|" * len(names) + "---|---|---|---|---|---|---|",
    ]
    clean = of_row(baselines, "clean", "ce")
    for name, _, _, _, target in rows:
        picks = [run for run in selected if run["row"] == name]
        if not picks:
            continue
        seeds = {run["seed"] for run in picks}
        per_candidate = [[r for r in of_row(runs, name) if r["seed"] in seeds] for runs in candidates]
        counts = "/".join(str(sum(run["candidate"] == str(k) for run in picks)) for k in range(len(names)))
        lines.append(
            f"| {name} | {len(picks)} | {column(of_row(baselines, name, 'ce'), 'test_acc')} | "
            + " | ".join(column(runs, "test_acc") for runs in per_candidate)
            + f" | {column(picks, 'test_acc')} | {100 * min(float(r['test_acc']) for r in picks):.2f} | {counts} | "
            f"{column(clean, 'test_acc')} | {column(picks, 'theta_error', 1.0, 3)} | "
            f"{column(picks, 'label_recovery')} | {target} |"
        )
    header = [*COLUMNS, "candidate"]
    text = [",".join(header)]
    text += [",".join(_csv_field(str(run[key])) for key in header) for run in [*baselines, *selected]]
    atomic_write(out.with_suffix(".csv"), "\n".join(text) + "\n")
    atomic_write(out.with_suffix(".md"), "\n".join(lines) + "\n")


def variant_line(name: str, noise: str, runs: list[dict[str, str]], fit_seconds: list[float]) -> str:
    """One row of the variants table: a variant's runs, or the runs that a selection among variants kept."""

    def column(key: str, scale: float = 100.0, digits: int = 2) -> str:
        return mean_std([float(run[key]) for run in runs], scale, digits)

    return (
        f"| {name} | {noise} | {len(runs)} | {column('test_acc')} | "
        f"{100 * min(float(run['test_acc']) for run in runs):.2f} | {column('theta_error', 1.0, 3)} | "
        f"{column('label_recovery')} | {column('val_acc_noisy')} | {mean_std(fit_seconds, 1.0, 0)} |"
    )


def write_variants_markdown(csv_path: Path, md_path: Path) -> None:
    results = read_rows(csv_path)
    lines = [
        "# EM variants on MNIST: uniform redraw 50% (effective flip 45%), pair-flip 45% and permutation 46%",
        "",
        "Commands (all append to the same CSV; `--resume` skips the runs already in it). The balanced 10-epoch "
        "rows for seeds 0-2 are the runs of `quality_mnist_balanced_w10.csv` (the same recipe), copied in:",
        "",
        "```bash",
        *VARIANT_COMMANDS,
        "```",
        "",
        f"Machine: {machine()}.",
        "",
        "Last-epoch numbers, mean ± std over seeds. These are the levers of issue 3, "
        "measured rather than assumed; the failing ones are kept on purpose. Fit times come from whichever run "
        "wrote the row, on a shared machine: compare them loosely.",
        "",
        "| variant | noise | seeds | test acc (%) | worst seed (%) | theta error | recovered (%) | noisy val acc (%) "
        "| fit time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (noise_type, rate, _) in VARIANTS.items():
        runs = [r for r in results if r["row"] == name]
        if not runs:
            continue
        lines.append(variant_line(name, f"{noise_type} {rate:g}", runs, [float(r["fit_seconds"]) for r in runs]))
    for name, variant_names in VARIANT_SELECTIONS.items():
        # Selection pairs runs by (row, seed); the variants differ in their row names, so give them the same one.
        candidates = [[{**r, "row": name} for r in results if r["row"] == variant] for variant in variant_names]
        picks = select_by_noisy_validation(candidates)
        if not picks:
            continue
        noise_type, rate, _ = VARIANTS[variant_names[0]]
        seeds = {run["seed"] for run in picks}
        # The fit time of a selection is that of all its candidates' fits.
        seconds = [sum(float(r["fit_seconds"]) for runs in candidates for r in runs if r["seed"] == s) for s in seeds]
        lines.append(variant_line(name, f"{noise_type} {rate:g}", picks, seconds))
    atomic_write(md_path, "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="mnist", choices=["mnist", "fashion_mnist", "kmnist", "mnist_sample"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--rows",
        nargs="*",
        help="names, or starts of names, of the rows (with --variants: variants) to run (default: all)",
    )
    parser.add_argument("--variants", action="store_true", help="run the EM variants instead of the table")
    parser.add_argument("--epochs", type=int, default=None, help="override every recipe's epochs")
    parser.add_argument("--warmup-epochs", type=int, default=None, help="override every recipe's EM warm-up")
    parser.add_argument(
        "--initialisation",
        choices=["hard_confusion", "soft_confusion", "balanced"],
        default=None,
        help="override every recipe's theta initialisation",
    )
    parser.add_argument(
        "--select",
        type=Path,
        nargs="+",
        default=None,
        metavar="STEM",
        help="run nothing; from these tables' CSVs (the default recipe first), keep per row and seed the EM run "
        "(and the CE run) with the highest noisy-validation accuracy, and write --out (required)",
    )
    parser.add_argument("--out", type=Path, default=None, help="output stem (default benchmarks/results/...)")
    parser.add_argument("--resume", action="store_true", help="skip runs already in the CSV")
    args = parser.parse_args()
    if args.select is not None:
        if args.out is None or len(args.select) < 2:
            parser.error("--select needs at least two tables and --out")
        command = f"python benchmarks/quality.py --dataset {args.dataset} --select " + " ".join(
            map(str, [*args.select, "--out", args.out])
        )
        table = FASHION_ROWS if args.dataset == "fashion_mnist" else MNIST_ROWS
        title = f"Quality on {args.dataset}: EM with the recipe picked per seed by noisy-validation accuracy"
        write_selection(args.select, args.out, title, table, command)
        print(f"wrote {args.out.with_suffix('.csv')} and {args.out.with_suffix('.md')}")
        return
    torch.set_float32_matmul_precision("high")

    def recipe_for(recipe: Recipe) -> Recipe:
        overrides = {"epochs": args.epochs, "warmup_epochs": args.warmup_epochs, "initialisation": args.initialisation}
        return _changed(recipe, **{key: value for key, value in overrides.items() if value is not None})

    stem = args.out or RESULTS / ("em_variants" if args.variants else f"quality_{args.dataset}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = stem.with_suffix(".csv"), stem.with_suffix(".md")
    if not args.resume and csv_path.exists():
        csv_path.unlink()
    done = {(r["row"], r["recipe"], r["seed"]) for r in read_rows(csv_path)}
    command = "python benchmarks/quality.py " + " ".join(
        part
        for part in (
            f"--dataset {args.dataset}",
            "--variants" if args.variants else "",
            f"--seeds {' '.join(map(str, args.seeds))}",
            "--rows " + " ".join(f'"{prefix}"' for prefix in args.rows) if args.rows and not args.variants else "",
            f"--epochs {args.epochs}" if args.epochs is not None else "",
            f"--warmup-epochs {args.warmup_epochs}" if args.warmup_epochs is not None else "",
            f"--initialisation {args.initialisation}" if args.initialisation else "",
            f"--out {args.out}" if args.out else "",
        )
        if part
    )

    if args.variants:
        jobs = [
            (name, noise_type, rate, recipe_for(recipe))
            for name, (noise_type, rate, recipe) in VARIANTS.items()
            if not args.rows or any(name.startswith(prefix) for prefix in args.rows)
        ]
    else:
        table = FASHION_ROWS if args.dataset == "fashion_mnist" else MNIST_ROWS
        chosen = [row for row in table if not args.rows or any(row[0].startswith(prefix) for prefix in args.rows)]
        jobs = [("clean", "none", 0.0, recipe_for(BASELINE_CE))]
        for name, noise_type, rate, *_ in chosen:
            jobs += [
                (name, noise_type, rate, recipe_for(BASELINE_CE)),
                (name, noise_type, rate, recipe_for(DEFAULT_EM)),
            ]

    for seed in args.seeds:
        for name, noise_type, rate, recipe in jobs:
            key = (name, recipe.method, str(seed))
            if key in done:
                continue
            result = run_one(args.dataset, noise_type, rate, seed, recipe)
            row = {
                "dataset": args.dataset,
                "row": name,
                "noise_type": noise_type,
                "noise_rate": rate,
                "recipe": recipe.method,
                "seed": seed,
                "recipe_json": json.dumps(asdict(recipe)),
                **result,
            }
            append_row(csv_path, row)
            print(
                f"{name:>45} | {recipe.method} | seed {seed} | test {result['test_acc']:.4f} | "
                f"theta err {result['theta_error']:.3f} | recovery {result['label_recovery']:.4f} | "
                f"{result['fit_seconds']:.0f} s",
                flush=True,
            )
            if args.variants:
                write_variants_markdown(csv_path, md_path)
            else:
                title = f"Quality on {args.dataset}: EM against cross-entropy on noisy labels"
                write_markdown(csv_path, md_path, title, chosen, command)
    print(f"wrote {csv_path} and {md_path}")


if __name__ == "__main__":
    main()
