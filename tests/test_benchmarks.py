"""Tests of the benchmark scripts: their tables hold what the runs measured, results files name the command that
wrote them (and regenerate from it), and reused or relabelled runs keep every measured value."""

from __future__ import annotations

import csv
import dataclasses
import functools
import importlib.util
import inspect
import json
import math
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import types
from pathlib import Path
from types import ModuleType

import lightning as L
import pytest
import torch

from noisy_lightning import MLP, EMNoiseEstimation, NoisyLabelClassifier, NoisyLabelDataModule
from noisy_lightning import em as em_math
from noisy_lightning.data import image_statistics, normalise

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
RESULTS = BENCHMARKS / "results"


@functools.cache
def _load(script: str) -> ModuleType:
    """``benchmarks/<script>.py`` as a module (benchmarks is not a package; its scripts import ``common``)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"{script}_benchmark", BENCHMARKS / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


quality = functools.partial(_load, "quality")
common = functools.partial(_load, "common")


def run_script(script: str, *arguments: str, timeout: int = 600) -> tuple[list[str], subprocess.CompletedProcess]:
    """Run ``benchmarks/<script> arguments...`` in a fresh interpreter; return its argv and the finished process."""
    argv = [str(BENCHMARKS / script), *arguments]
    completed = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return argv, completed


def run_main(monkeypatch: pytest.MonkeyPatch, *arguments: str) -> None:
    """``python benchmarks/quality.py arguments...`` in this process, which must not train (it would fail)."""

    def no_training(*arguments: object) -> None:
        raise AssertionError(f"this command trains: run_one{arguments}")

    monkeypatch.setattr(quality(), "run_one", no_training)
    monkeypatch.setattr(sys, "argv", ["benchmarks/quality.py", *arguments])
    quality().main()


def metadata(markdown: Path) -> dict[str, str]:
    found = common().METADATA.search(markdown.read_text())
    assert found, f"{markdown} has no metadata line"
    return found.groupdict()


def read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def percent(value: str) -> str:
    return f"{100 * float(value):.2f} ± 0.00"


@pytest.mark.slow
def test_quality_table_holds_what_the_runs_measured(tmp_path: Path) -> None:
    stem = tmp_path / "quality"
    arguments = ["--dataset", "mnist_sample", "--seeds", "0", "--rows", "symmetric 50%"]
    arguments += ["--epochs", "5", "--warmup-epochs", "1", "--out", str(stem)]  # 5 EM rounds: 3 held, 2 M-steps
    argv, completed = run_script("quality.py", *arguments)
    runs = read(stem.with_suffix(".csv"))
    assert [(run["row"], run["recipe"]) for run in runs] == [
        ("clean", "ce"),
        ("symmetric 50%", "ce"),
        ("symmetric 50%", "em"),
    ]
    # Each run printed its test accuracy as it ended: the table holds those runs, in that order.
    printed = re.findall(r"\| (ce|em) \| seed 0 \| test (\d\.\d{4}) \|", completed.stdout)
    assert printed == [(run["recipe"], f"{float(run['test_acc']):.4f}") for run in runs]
    # The flip rate is the data's own: the same seed and noise corrupt the same labels here.
    data = NoisyLabelDataModule(dataset="mnist_sample", noise_type="symmetric", noise_rate=0.5, seed=0)
    data.setup()
    assert [float(run["flip_rate"]) for run in runs] == [0.0, data.corruption.flip_rate, data.corruption.flip_rate]
    recipe = dataclasses.asdict(quality().DEFAULT_EM.but(epochs=5, warmup_epochs=1))
    assert json.loads(runs[2]["recipe_json"]) == recipe
    assert [json.loads(run["recipe_json"]) for run in runs[:2]] == [recipe | {"method": "ce"}] * 2
    ce, em, clean = runs[1], runs[2], runs[0]
    assert 0.0 <= float(em["theta_error"]) < 1.0 and 0.5 < float(em["label_recovery"]) <= 1.0
    assert ce["theta_error"] == ce["label_recovery"] == "nan"
    # Every run records the command that measured it, which is the argv it was given, and the file says so too.
    command = shlex.join(["python", *argv])
    assert {(run["command"], run["source"]) for run in runs} == {(command, "")}
    markdown = stem.with_suffix(".md")
    recorded = metadata(markdown)
    assert recorded["command"] == command
    assert {run["commit"] for run in runs} == {recorded["commit"]} and recorded["commit"] != "unknown"
    assert {run["machine"] for run in runs} == {recorded["machine"]}
    line = (
        f"| symmetric 50% | 1 | {percent(ce['test_acc'])} | {percent(em['test_acc'])} | {percent(clean['test_acc'])} "
        f"| {float(em['theta_error']):.3f} ± 0.000 | {percent(em['label_recovery'])} |"
    )
    assert line in markdown.read_text()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["quality.csv", "quality.md"], "no temporary file left"


@pytest.mark.slow
def test_speed_table_holds_what_the_runs_measured(tmp_path: Path) -> None:
    stem = tmp_path / "speed"
    arguments = ["--dataset", "mnist_sample", "--batch-sizes", "512", "--rounds", "1", "--epochs", "3", "--tiles", "2"]
    argv, _ = run_script(
        "speed.py", *arguments, "--skip", "bare", "torchvision", "ours_em", "ours_em_train_pass", "--out", str(stem)
    )
    data = NoisyLabelDataModule(dataset="mnist_sample")
    data.setup()
    train = len(data.pool.train_indices)
    rows = read(stem.with_suffix(".csv"))
    assert [row["contender"] for row in rows] == ["ours_ce"]  # each contender costs a process: one is enough
    for row in rows:
        epochs = [float(seconds) for seconds in row["all_epochs_s"].split()]
        assert len(epochs) == int(row["epochs_measured"]) == 2, "one round of 3 epochs, the first not measured"
        assert float(row["median_epoch_s"]) == pytest.approx(statistics.median(epochs), abs=5e-4)
        assert float(row["samples_per_s"]) == pytest.approx(train / float(row["median_epoch_s"]))
    markdown = stem.with_suffix(".md")
    assert metadata(markdown)["command"] == shlex.join(["python", *argv])
    text = markdown.read_text()
    assert f"Adam, {train:,} training samples" in text
    assert f"| 2x | {2 * train:,} | ours_em |" in text
    assert sorted(path.name for path in tmp_path.iterdir()) == ["speed.csv", "speed.md"], "no temporary file left"


# ---- tables, reuse and relabelling (no training) -------------------------------------------------------------------
def _run(row: str, seed: int, noisy: float, test: float, warmup: int = 6, method: str = "em") -> dict[str, str]:
    """A run as the quality script records it: the default recipe on permutation 46%, with made-up numbers."""
    recipe = dataclasses.asdict(quality().DEFAULT_EM.but(method=method, warmup_epochs=warmup))
    values = {"test_acc": test, "val_acc_noisy": noisy, "val_acc_clean": test, "theta_error": 0.01}
    values |= {"label_recovery": 0.99, "flip_rate": 0.46, "fit_seconds": 1.0 + seed / 10 + warmup}
    fields = {"dataset": "mnist", "row": row, "noise_type": "permutation", "noise_rate": 0.46, "recipe": method}
    fields |= {"seed": seed, "recipe_json": json.dumps(recipe), **values}
    fields |= {"commit": "0000000", "machine": "a test", "command": "python made-up", "source": ""}
    return {key: str(value) for key, value in fields.items()}


def _write(path: Path, runs: list[dict[str, str]]) -> None:
    common().write_table(path, quality().COLUMNS, runs)


def test_default_recipe_is_the_librarys_default() -> None:
    """``Recipe(starts="two")`` is what the library does when not told; ``Recipe()`` differs only by its one start."""

    def defaults(function: object) -> dict[str, object]:
        return {name: p.default for name, p in inspect.signature(function).parameters.items()}

    library = defaults(NoisyLabelClassifier) | defaults(EMNoiseEstimation) | defaults(MLP)
    library |= {"batch_size": defaults(NoisyLabelDataModule)["batch_size"], "method": "em"}
    library["e_step"] = EMNoiseEstimation().e_step  # None: what the callback resolves it to with the other defaults
    recipe = dataclasses.asdict(quality().DEFAULT_EM.but(starts="two"))
    recipe.pop("epochs")  # the Trainer's, not the library's
    starts = recipe.pop("starts")
    assert recipe == {key: library[key] for key in recipe}
    # "two" runs the library's default starts and trial length; None in the library means exactly those.
    two = quality().TWO_STARTS
    assert starts == "two" and library["starts"] is None
    assert tuple(two["starts"]) == em_math.DEFAULT_STARTS and two["trial_epochs"] == library["trial_epochs"]
    assert EMNoiseEstimation().starts == em_math.DEFAULT_STARTS


def test_variants_are_named_by_what_they_are() -> None:
    variants = quality().VARIANTS
    assert len({variant.name for variant in variants}) == len(variants)
    for variant in variants:
        assert not re.search(r"\b[0-9a-f]{7,40}\b", variant.name), f"{variant.name!r} names a commit"
    # --relabel finds a run's variant by its noise and settings: no two variants may share them.
    keys = [
        (v.noise_type, v.noise_rate, json.dumps(quality().settings(dataclasses.asdict(v.recipe)))) for v in variants
    ]
    assert len(set(keys)) == len(keys)


def test_the_recipe_table_lists_the_runs_of_the_variants_file() -> None:
    """``python benchmarks/quality.py --variants`` runs each variant on its seeds: those are the runs on file."""
    on_file: dict[str, set[int]] = {}
    for run in read(RESULTS / "em_variants.csv"):
        on_file.setdefault(run["row"], set()).add(int(run["seed"]))
    assert on_file == {variant.name: set(variant.seeds) for variant in quality().VARIANTS}


def test_append_row_adds_a_line_and_refuses_a_file_of_other_columns(tmp_path: Path) -> None:
    path, columns = tmp_path / "table.csv", ["name", "value"]
    common().append_row(path, columns, {"name": "a, quoted", "value": 0.1})
    before = path.read_bytes()
    common().append_row(path, columns, {"name": "b", "value": 2})
    assert path.read_bytes() == before + b"b,2\n", "the first line stays as it was; the new one is added after it"
    assert read(path) == [{"name": "a, quoted", "value": "0.1"}, {"name": "b", "value": "2"}]
    with pytest.raises(ValueError, match="lacks the column"):
        common().append_row(path, columns, {"name": "c"})
    with pytest.raises(SystemExit, match="relabel it"):
        common().append_row(path, ["name", "other"], {"name": "c", "other": 1}, hint="relabel it")
    assert path.read_bytes() == before + b"b,2\n"


def test_a_resumed_table_copies_reused_runs_and_skips_measured_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 10-epoch warm-up table reuses the CE runs of the default table: CE has no warm-up. Nothing trains here."""
    default, longer = tmp_path / "default", tmp_path / "longer"
    clean = _run("clean", 0, 0.99, 0.98, method="ce") | {"noise_type": "none", "noise_rate": "0.0"}
    lent = [clean, _run("permutation 46%", 0, 0.51, 0.95, method="ce")]
    _write(default.with_suffix(".csv"), [*lent, _run("permutation 46%", 0, 0.52, 0.97)])
    own = _run("permutation 46%", 0, 0.53, 0.975, warmup=10)  # already measured with the 10-epoch warm-up
    _write(longer.with_suffix(".csv"), [own])
    before = longer.with_suffix(".csv").read_bytes()
    arguments = ["--rows", "permutation", "--seeds", "0", "--warmup-epochs", "10", "--resume"]
    run_main(monkeypatch, *arguments, "--reuse-from", str(default), "--out", str(longer))
    runs = read(longer.with_suffix(".csv"))
    assert longer.with_suffix(".csv").read_bytes().startswith(before), "appended, not rewritten"
    assert runs == [own, *({**run, "source": "default.csv"} for run in lent)]
    text = longer.with_suffix(".md").read_text()
    assert "- 2 copied from `default.csv`, measured at commit 0000000 on a test by `python made-up`" in text
    assert "| permutation 46% | 1 | 95.00 ± 0.00 | 97.50 ± 0.00 | 98.00 ± 0.00 |" in text


def test_relabel_renames_variants_marks_copies_and_changes_no_measurement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A table of an earlier format: variant names that say when they were the default, a run copied from another
    table without saying so, no provenance columns, and the machine on a line of the .md."""
    q = quality()
    legacy_columns = [*q.RUN_COLUMNS, *q.MEASURED]
    default = q.VARIANT_BY_NAME["permutation 46%: hard init, 3 held rounds, 6-epoch warm-up (single-start recipe)"]
    balanced = q.VARIANT_BY_NAME["permutation 46%: balanced init, 3 held rounds, 10-epoch warm-up"]

    def legacy(name: str, seed: int, recipe: object, test: float) -> dict[str, str]:
        run = _run(name, seed, 0.52, test) | {"recipe_json": json.dumps(dataclasses.asdict(recipe))}
        return {key: run[key] for key in legacy_columns}

    lender = tmp_path / "balanced"
    common().write_table(
        lender.with_suffix(".csv"), legacy_columns, [legacy("permutation 46%", 0, balanced.recipe, 0.9)]
    )
    old = [legacy("permutation 46%: 6-epoch warm-up (default at 0123abc)", 0, default.recipe, 0.98)]
    old += [legacy("permutation 46%: balanced, copied", 0, balanced.recipe, 0.9)]
    variants = tmp_path / "variants"
    common().write_table(variants.with_suffix(".csv"), legacy_columns, old)
    variants.with_suffix(".md").write_text("# EM variants\n\nMachine: x86_64, 2 cores, torch 2.0.\n")
    arguments = ["--variants", "--relabel", "--out", str(variants), "--reuse-from", str(lender)]
    run_main(monkeypatch, *arguments)
    runs = read(variants.with_suffix(".csv"))
    assert [{key: run[key] for key in legacy_columns if key != "row"} for run in runs] == [
        {key: run[key] for key in legacy_columns if key != "row"} for run in old
    ], "no measured value changes"
    assert [(run["row"], run["source"]) for run in runs] == [(default.name, ""), (balanced.name, "balanced.csv")]
    assert {(run["commit"], run["command"], run["machine"]) for run in runs} == {("", "", "x86_64, 2 cores, torch 2.0")}
    markdown = variants.with_suffix(".md")
    assert metadata(markdown)["command"] == shlex.join(["python", "benchmarks/quality.py", *arguments])
    assert f"| {default.name} | permutation 0.46 | 1 | 98.00 ± 0.00 |" in markdown.read_text()
    written = variants.with_suffix(".csv").read_bytes(), markdown.read_bytes()
    run_main(monkeypatch, *arguments)
    assert (variants.with_suffix(".csv").read_bytes(), markdown.read_bytes()) == written, "relabelling is idempotent"


# The tables of quality.py; the other scripts write theirs whole after training (compare.py also with
# --markdown-only), with nothing to relabel.
QUALITY_RESULTS = sorted(
    path.name for path in RESULTS.glob("*.md") if path.name.startswith(("quality_", "em_variants"))
)


@pytest.mark.parametrize("name", QUALITY_RESULTS)
def test_each_quality_results_file_regenerates_from_the_command_it_names(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every table here was last written by ``--relabel`` or ``--select``, which train nothing: run the named
    command again on a copy and get the same files, every number and provenance line included."""
    command = metadata(RESULTS / name)["command"]
    argv = shlex.split(command)
    assert argv[:2] == ["python", "benchmarks/quality.py"] and {"--relabel", "--select"} & set(argv), command
    shutil.copytree(RESULTS, tmp_path / "benchmarks" / "results")
    monkeypatch.chdir(tmp_path)
    run_main(monkeypatch, *argv[2:])
    copy = tmp_path / "benchmarks" / "results" / name
    assert copy.with_suffix(".csv").read_bytes() == (RESULTS / name).with_suffix(".csv").read_bytes()
    body = [line for line in copy.read_text().splitlines() if not line.startswith("Written by ")]
    assert body == [line for line in (RESULTS / name).read_text().splitlines() if not line.startswith("Written by ")]
    assert metadata(copy)["command"] == command


# ---- selection by noisy-validation accuracy -------------------------------------------------------------------------
def test_selection_keeps_the_best_noisy_validation_accuracy_never_the_test_accuracy() -> None:
    select = quality().select_by_noisy_validation
    short = [_run("p", 0, noisy=0.515, test=0.87), _run("p", 1, noisy=0.530, test=0.985), _run("p", 2, 0.52, 0.99)]
    long = [_run("p", 0, noisy=0.522, test=0.98), _run("p", 1, noisy=0.529, test=0.986), _run("p", 2, 0.52, 0.97)]
    picks = select([short, long])
    # seed 0: the long warm-up agrees better with the noisy labels; seed 1: the short one does, although the long
    # one tests higher; seed 2: a tie goes to the first candidate.
    assert [(run["seed"], run["candidate"], run["test_acc"]) for run in picks] == [
        ("0", "1", "0.98"),
        ("1", "0", "0.985"),
        ("2", "0", "0.99"),
    ]


def test_selection_skips_seeds_that_a_candidate_did_not_measure() -> None:
    select = quality().select_by_noisy_validation
    picks = select([[_run("p", 0, 0.5, 0.9), _run("p", 1, 0.5, 0.9)], [_run("p", 1, 0.6, 0.8), _run("q", 0, 0.6, 0.8)]])
    assert [(run["row"], run["seed"], run["candidate"]) for run in picks] == [("p", "1", "1")]


def test_quality_select_writes_the_selected_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stems = [tmp_path / "w6", tmp_path / "w10"]
    for stem, warmup, noisy in ((stems[0], 6, (0.515, 0.53)), (stems[1], 10, (0.522, 0.52))):
        runs = [
            _run("permutation 46%", seed, noisy[seed], 0.87 if noisy[seed] == 0.515 else 0.98, warmup)
            for seed in (0, 1)
        ]
        # The baselines: on seed 0 the second table's CE run agrees better with the noisy labels.
        for seed in (0, 1):
            better = stem == stems[1] and seed == 0
            runs.append(_run("permutation 46%", seed, 0.51 if better else 0.50, 0.96 if better else 0.95, method="ce"))
            runs.append(_run("clean", seed, 0.99, 0.988 if seed else 0.986, method="ce"))
        _write(stem.with_suffix(".csv"), runs)
    out = tmp_path / "selected"
    run_main(monkeypatch, "--select", *map(str, stems), "--out", str(out))
    markdown = out.with_suffix(".md").read_text()
    columns = "EM, hard init, 6-epoch warm-up, 30 epochs | EM, hard init, 10-epoch warm-up, 30 epochs | EM, selected"
    assert columns in markdown
    # EM: seed 0 picks the 10-epoch run (0.98), seed 1 the 6-epoch run (0.98): 98.00 ± 0.00, one pick each. CE is
    # picked the same way: 0.96 from the second table on seed 0, the tie on seed 1 goes to the first (0.95).
    expected = "| permutation 46% | 2 | 95.50 ± 0.71 | 92.50 ± 7.78 | 98.00 ± 0.00 | 98.00 ± 0.00 | 98.00 | 1/1 |"
    assert expected + " 98.70 ± 0.14 |" in markdown
    picks = [
        (run["row"], run["recipe"], run["seed"], run["candidate"], run["source"])
        for run in read(out.with_suffix(".csv"))
    ]
    assert sorted(picks) == [
        ("clean", "ce", "0", "0", "w6.csv"),
        ("clean", "ce", "1", "0", "w6.csv"),
        ("permutation 46%", "ce", "0", "1", "w10.csv"),
        ("permutation 46%", "ce", "1", "0", "w6.csv"),
        ("permutation 46%", "em", "0", "1", "w10.csv"),
        ("permutation 46%", "em", "1", "0", "w6.csv"),
    ]
    with pytest.raises(SystemExit) as refused:
        run_main(monkeypatch, "--select", str(stems[0]), "--out", str(out))
    assert refused.value.code == 2 and "--select needs at least two tables and --out" in capsys.readouterr().err
    missing = tmp_path / "never_measured"
    with pytest.raises(SystemExit, match=f"--select: {missing}.csv is missing or empty"):
        run_main(monkeypatch, "--select", str(stems[0]), str(missing), "--out", str(tmp_path / "other"))
    assert not (tmp_path / "other.md").exists(), "nothing is written when a candidate table is missing"
    # A hand-edited table without the noisy-validation column is refused by name, not with a KeyError.
    edited = tmp_path / "edited"
    rows = read(stems[1].with_suffix(".csv"))
    common().write_table(edited.with_suffix(".csv"), [key for key in rows[0] if key != "val_acc_noisy"], rows)
    with pytest.raises(SystemExit, match=f"--select: {edited}.csv lacks the column\\(s\\) val_acc_noisy"):
        run_main(monkeypatch, "--select", str(stems[0]), str(edited), "--out", str(tmp_path / "other"))
    assert not (tmp_path / "other.md").exists(), "nothing is written when a candidate table lacks a column"


def test_variants_table_selects_between_variants_by_noisy_validation_accuracy(tmp_path: Path) -> None:
    name, (short, long) = next(
        (name, variants) for name, variants in quality().VARIANT_SELECTIONS.items() if name.startswith("permutation")
    )
    csv_path = tmp_path / "variants.csv"
    runs = [_run(short.name, 0, 0.515, 0.87), _run(long.name, 0, 0.522, 0.98), _run(short.name, 1, 0.53, 0.985)]
    _write(csv_path, [*runs, _run(long.name, 1, 0.529, 0.99)])
    quality().write_variants_markdown(csv_path, tmp_path / "variants.md", "Written by a test.")
    lines = (tmp_path / "variants.md").read_text().splitlines()
    # The variants have different row names; the selection still pairs their runs by seed: 0.98 and 0.985.
    selected = next(line for line in lines if line.startswith(f"| {name} |"))
    assert selected.startswith(f"| {name} | permutation 0.46 | 2 | 98.25 ± 0.35 | 98.00 |")
    # A selection's fit time counts every candidate's fit: seed 0 took 7.0 + 7.0 s, seed 1 7.1 + 7.1 s.
    assert selected.endswith("| 14 ± 0 |")


def test_run_jobs_in_worker_processes_returns_every_result_once() -> None:
    _load("compare")  # puts benchmarks/ on sys.path, where the worker processes import common from
    import common as shared

    assert sorted(shared.run_jobs([9.0, 1.0, 4.0], math.sqrt, workers=2)) == [(1.0, 1.0), (4.0, 2.0), (9.0, 3.0)]
    assert list(shared.run_jobs([4.0], math.sqrt)) == [(4.0, 2.0)]
    with pytest.raises(ValueError, match="workers=0"):
        list(shared.run_jobs([4.0], math.sqrt, workers=0))


# ---- compare.py and method_cost.py ------------------------------------------------------------------------------
class _FakeData:
    """Stands in for a DataModule in compare.main: a flip rate, and nothing to load."""

    def __init__(self, **kwargs: object) -> None:
        self.corruption = type("Corruption", (), {"flip_rate": 0.5})()

    def setup(self, stage: str) -> None:
        pass


def test_compare_resumes_and_tabulates_what_the_runs_measured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    compare = _load("compare")
    calls: list[str] = []

    def fake_run(method: str, datamodule: object) -> dict[str, float]:
        calls.append(method)
        seed = len([call for call in calls if call == method]) - 1
        return {
            "test_acc": {"ce": 0.90, "em": 0.97, "gce": 0.95}[method] + 0.01 * seed,
            "val_acc_noisy": 0.5,
            "theta_error": 0.02 if method == "em" else float("nan"),
            "issue_precision": float("nan"),
            "issue_recall": float("nan"),
            "fits": 1,
            "fit_seconds": {"ce": 10.0, "em": 15.0, "gce": 12.0}[method],
        }

    monkeypatch.setattr(compare, "NoisyLabelDataModule", _FakeData)
    out = tmp_path / "compare_test"
    argv = ["compare.py", "--rows", "pair-flip 45%", "--seeds", "0", "1", "--table-seeds", "0", "1"]
    argv += ["--methods", "ce", "em", "gce"]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(out)])
    compare.main(run=fake_run)
    assert len(calls) == 6
    compare.main(run=fake_run)  # everything is in the CSV already: nothing runs again
    assert len(calls) == 6
    runs = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert [(run["method"], run["seed"]) for run in runs] == [
        ("ce", "0"),
        ("em", "0"),
        ("gce", "0"),
        ("ce", "1"),
        ("em", "1"),
        ("gce", "1"),
    ]
    table = out.with_suffix(".md").read_text()
    assert "| pair-flip 45% | 2 | 90.50 ± 0.71 (worst 90.00) | 97.50 ± 0.71 (worst 97.00) |" in table
    assert "| pair-flip 45% | 1.00 | 1.50 | 1.20 |" in table  # wall time against CE
    assert "| pair-flip 45% | 0.020 |" in table  # theta error, only for the methods that estimate it
    # --refit replaces the chosen fits: em of seed 0 runs again (the fake now says 0.99) and its row moves to the end
    refit = ["compare.py", "--rows", "pair-flip 45%", "--seeds", "0", "--methods", "em", "--refit"]
    monkeypatch.setattr(sys, "argv", [*refit, "--out", str(out)])
    compare.main(run=fake_run)
    assert len(calls) == 7
    again = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert len(again) == 6 and (again[-1]["method"], again[-1]["seed"]) == ("em", "0")
    # a table of seed 0 only leaves seed 1's fits out of every cell
    compare.write_markdown(out.with_suffix(".csv"), tmp_path / "seed0.md", "mnist", "metadata", seeds=[0])
    assert "| pair-flip 45% | 1 | 90.00 ± 0.00 | 99.00 ± 0.00 |" in (tmp_path / "seed0.md").read_text()
    # a method that has fewer of the row's seeds than the others says which it has
    one_seed = [run for run in again if not (run["method"] == "gce" and run["seed"] == "1")]
    compare.write_table(tmp_path / "partial.csv", compare.COLUMNS, one_seed)
    compare.write_markdown(tmp_path / "partial.csv", tmp_path / "partial.md", "mnist", "metadata", seeds=[0, 1])
    assert "| 95.00 ± 0.00 (seed 0 only) |" in (tmp_path / "partial.md").read_text()


def test_the_label_issue_table_pairs_em_with_cleanlab_on_the_seeds_both_have(tmp_path: Path) -> None:
    compare = _load("compare")

    def run(method: str, seed: int, accuracy: float, precision: float) -> dict[str, object]:
        values = {"test_acc": accuracy, "theta_error": 0.01 * (seed + 1), "issue_precision": precision}
        values |= {"issue_recall": precision / 2, "fit_seconds": 10.0}
        return {column: values.get(column, "") for column in compare.COLUMNS} | {
            "row": "symmetric 50%",
            "method": method,
            "seed": str(seed),
            "machine": "m",
        }

    runs = [run("ce", seed, 0.9, float("nan")) for seed in (0, 1, 2)]
    # EM has three seeds; cleanlab only seeds 0 and 2, so EM's seed 1 (an outlier here) must stay out of the pair
    runs += [run("em", 0, 0.97, 0.90), run("em", 1, 0.50, 0.10), run("em", 2, 0.99, 0.94)]
    runs += [run("cleanlearning", 0, 0.96, 0.80), run("cleanlearning", 2, 0.98, 0.84)]
    compare.write_table(tmp_path / "issues.csv", compare.COLUMNS, runs)
    compare.write_markdown(tmp_path / "issues.csv", tmp_path / "issues.md", "mnist", "metadata", seeds=[0, 1, 2])
    table = (tmp_path / "issues.md").read_text()
    assert "| symmetric 50% | 0, 2 | 0.9200 | 0.4600 | 0.8200 | 0.4100 | 0.020 | 0.020 | 98.00 | 97.00 |" in table
    assert "(seeds 0, 2 only)" in table  # the accuracy table says that cleanlab has fewer seeds


def test_em_prune_flags_in_the_rankings_order_and_drops_the_validation_split() -> None:
    compare = _load("compare")
    # A ranking of a pool of six: samples 3 and 5 flagged; 5 is in the validation split, so not in the result.
    issues = types.SimpleNamespace(
        index=torch.tensor([3, 0, 5, 1, 2, 4]), is_issue=torch.tensor([True, False, True, False, False, False])
    )
    assert compare.flagged_training_labels(issues, torch.tensor([4, 0, 3, 1])).tolist() == [False, False, True, False]


@pytest.mark.slow
def test_em_prune_refits_on_the_training_labels_that_em_does_not_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    compare = _load("compare")
    monkeypatch.setitem(compare.RECIPE, "epochs", 1)
    seen: dict[str, list[object]] = {"issues": [], "fitted_on": []}
    find_label_issues, fit = compare.find_label_issues, compare.fit

    def watch_issues(model: NoisyLabelClassifier, datamodule: NoisyLabelDataModule) -> object:
        seen["issues"].append(find_label_issues(model, datamodule))
        return seen["issues"][-1]

    def watch_fit(model: L.LightningModule, datamodule: NoisyLabelDataModule, callbacks: list[L.Callback]) -> float:
        seen["fitted_on"].append(datamodule)
        return fit(model, datamodule, callbacks)

    monkeypatch.setattr(compare, "find_label_issues", watch_issues)
    monkeypatch.setattr(compare, "fit", watch_fit)
    L.seed_everything(0)
    data = NoisyLabelDataModule(noise_type="symmetric", noise_rate=0.5, batch_size=128)
    data.setup("fit")
    result = compare.run_method("em_prune", data)
    pool, (issues,) = data.pool, seen["issues"]
    flagged_pool = set(issues.index[issues.is_issue].tolist())
    kept = [index for index in pool.train_indices.tolist() if index not in flagged_pool]
    assert 0 < len(kept) < len(pool.train_indices)
    first, refit = seen["fitted_on"]
    assert first is data
    # The refit's data is the same pool and split, less the flagged training samples; validation is untouched.
    assert refit.pool.train_indices.tolist() == kept
    assert torch.equal(refit.pool.val_indices, pool.val_indices)
    assert torch.equal(refit.pool.given_labels, pool.given_labels)
    assert result["fits"] == 2 and 0.0 <= result["test_acc"] <= 1.0
    flipped = set((pool.given_labels != pool.clean_labels).nonzero().squeeze(1).tolist())
    flagged_train = flagged_pool & set(pool.train_indices.tolist())
    assert result["issue_precision"] == pytest.approx(len(flagged_train & flipped) / len(flagged_train))
    flipped_train = flipped & set(pool.train_indices.tolist())
    assert result["issue_recall"] == pytest.approx(len(flagged_train & flipped) / len(flipped_train))
    assert 0.0 <= result["theta_error"] < 2.0


def test_compare_runs_each_method_with_the_library_defaults() -> None:
    compare = _load("compare")
    default = NoisyLabelClassifier(method="em").hparams
    for method in ("ce", "em", "forward", "backward", "nal", "nal_complex", "gce"):
        model, callbacks = compare.make_model(method)
        assert callbacks == []  # the method adds its own estimator, with its defaults
        for key in ("lr", "lr_scheduler", "augment_shift", "em_targets", "optimizer", "weight_decay"):
            assert model.hparams[key] == default[key], (method, key)
        assert model.net.init_args == MLP().init_args
    _, (estimation,) = compare.make_model("forward_oracle")
    assert estimation.estimator == "true"


@pytest.mark.slow
def test_method_cost_writes_a_ratio_to_cross_entropy(tmp_path: Path) -> None:
    out = tmp_path / "cost"
    command = [sys.executable, str(BENCHMARKS / "method_cost.py"), "--dataset", "mnist_sample", "--epochs", "1"]
    command += ["--rounds", "1", "--methods", "ce", "em_refit", "--out", str(out)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert [row["method"] for row in rows] == ["ce", "em_refit"]
    assert float(rows[0]["ratio_to_ce"]) == 1.0
    em_refit = rows[1]
    ratio = float(em_refit["median_fit_seconds"]) / float(rows[0]["median_fit_seconds"])
    assert float(em_refit["ratio_to_ce"]) == pytest.approx(ratio)
    assert ratio > 1  # two fits and a pass for the label issues: never cheaper than the one cross-entropy fit


def test_noise_suite_matrices_are_what_their_families_say() -> None:
    noise_suite = _load("noise_suite")
    families = [family for family in noise_suite.FAMILIES if family != "column_dominant"]
    mnist = noise_suite.suite("mnist", families)
    assert len(mnist) == 20 and len(noise_suite.suite("fashion_mnist", families)) == 9
    for entry in mnist:
        assert entry.matrix.shape == (10, 10) and (entry.matrix >= 0).all()
        assert abs(entry.matrix.sum(axis=1) - 1).max() < 1e-12, entry.name
    dense = [entry for entry in mnist if entry.family == "dense"]
    diagonals = [float(entry.matrix.diagonal().mean()) for entry in dense]
    assert diagonals[0] == pytest.approx(0.55) and diagonals[-1] == pytest.approx(0.8)
    assert all((entry.matrix > 0).all() for entry in dense)  # dense: every entry is used
    for entry in (entry for entry in mnist if entry.family == "sparse"):
        noisy_rows = [row for row in range(10) if entry.matrix[row, row] < 1]
        assert 2 <= len(noisy_rows) <= 5
        assert all(0.30 - 1e-9 <= 1 - entry.matrix[row, row] <= 0.45 + 1e-9 for row in noisy_rows)
        assert all((entry.matrix[row] > 0).sum() == 2 for row in noisy_rows)
    # drawn from fixed seeds: the same suite every time
    again = noise_suite.suite("mnist", families)
    assert all((first.matrix == second.matrix).all() for first, second in zip(mnist, again, strict=True))


def test_noise_suite_column_dominant_matrices_keep_the_given_label_the_most_likely() -> None:
    pytest.importorskip("cleanlab", reason="the column_dominant family is drawn by cleanlab (the bench extra)")
    noise_suite = _load("noise_suite")
    entries = noise_suite.suite("mnist", ["column_dominant"])
    assert len(entries) == 4
    for entry in entries:
        assert not entry.diagonally_dominant  # some row's diagonal is under an off-diagonal entry
        joint = entry.matrix / 10  # uniform prior: P(true = i, given = j)
        assert (joint.argmax(axis=0) == range(10)).all()  # P(true = j | given = j) is the largest


def test_noise_suite_resumes_and_reports_the_misses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    noise_suite = _load("noise_suite")
    calls: list[tuple[str, str]] = []

    def fake_fit(dataset: str, entry: object, method: str, seed: int) -> dict[str, object]:
        calls.append((entry.name, method))
        accuracy = {"ce": 0.97, "em": 0.96 if "d=0.550" in entry.name else 0.98}[method]
        return {
            "test_acc": accuracy,
            "val_acc_noisy": 0.5,
            "fit_seconds": 1.0,
            "flip_rate": 0.4,
            "theta_error": 0.01 if method == "em" else float("nan"),
            "label_recovery": 0.99 if method == "em" else float("nan"),
        }

    out = tmp_path / "suite"
    monkeypatch.setattr(sys, "argv", ["noise_suite.py", "--families", "dense", "--out", str(out)])
    noise_suite.main(fit=fake_fit)
    noise_suite.main(fit=fake_fit)
    assert len(calls) == 16  # 8 dense matrices x 2 methods, none twice
    table = out.with_suffix(".md").read_text()
    assert "| dense | dense d=0.550 #0 | 0.550 | yes | 40.0 | 97.00 | 96.00 | -1.00 | 0.010 | 99.00 |" in table
    assert "above 0.05: dense d=0.550 #0." in table
    assert "Matrices where EM is under cross-entropy: dense d=0.550 #0." in table
    assert "Median theta error over the 8 matrices with an EM fit: 0.010" in table


TABLE_OF = {"ce": "quality_mnist", "em": "quality_mnist_defaults"}


def test_compare_reproduces_the_quality_tables_cross_entropy_and_em_runs() -> None:
    compared = RESULTS / "compare_mnist.csv"
    if not compared.exists():
        pytest.skip("benchmarks/results/compare_mnist.csv has not been written")
    # The cross-entropy runs of the table, and EM with its default starts.
    tables = {method: list(csv.DictReader((RESULTS / f"{stem}.csv").open())) for method, stem in TABLE_OF.items()}
    checked = 0
    for run in csv.DictReader(compared.open()):
        if run["method"] not in tables:
            continue
        same = [
            other
            for other in tables[run["method"]]
            if (other["row"], other["recipe"], other["seed"]) == (run["row"], run["method"], run["seed"])
            and other["source"] == ""
        ]
        # GPU fits are not bit-reproducible (atomic additions in the backward pass and the E-step's sums)
        if not same or "NVIDIA" in run["machine"] or "NVIDIA" in same[0]["machine"]:
            continue
        # the same fit on the same kind of machine: the same test accuracy (float32, printed with 4 or more digits)
        assert float(run["test_acc"]) == pytest.approx(float(same[0]["test_acc"]), abs=1e-6), run["row"]
        checked += 1
    assert checked >= 6


def test_reproduce_corrupts_with_the_papers_permutation() -> None:
    reproduce = _load("reproduce")
    matrix = torch.tensor(reproduce.transition_matrix(), dtype=torch.float64)
    torch.testing.assert_close(matrix.sum(dim=1), torch.ones(10, dtype=torch.float64))
    assert torch.all(matrix.diagonal() == 0.54)
    for true_class, noisy_class in enumerate((7, 9, 0, 4, 2, 1, 3, 5, 6, 8)):
        assert noisy_class != true_class and matrix[true_class, noisy_class] == 0.46


def test_reproduce_prepares_the_papers_labels_and_inputs() -> None:
    """round(46%) of each class moved by the permutation (the paper code's stratified choice), and a network input
    of pixels / 255 out of the DataModule's standardised images."""
    reproduce = _load("reproduce")
    labels = torch.arange(10).repeat_interleave(torch.arange(100, 110))  # class c has 100 + c images
    given = reproduce.papers_labels(labels, seed=0)
    for true_class, noisy_class in enumerate(reproduce.PERMUTATION):
        mine, count = given[labels == true_class], 100 + true_class
        assert (mine == noisy_class).sum() == round(0.46 * count)
        assert (mine == true_class).sum() == count - round(0.46 * count)
    assert not torch.equal(given, reproduce.papers_labels(labels, seed=1))
    pixels = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    mean, std = image_statistics(pixels)
    standardised = normalise(pixels, mean, std, flatten=True)
    torch.testing.assert_close(reproduce.DividedBy255(mean, std)(standardised), pixels.reshape(5, -1).float() / 255)


@pytest.mark.parametrize("script", ["compare", "quality", "noise_suite"])
@pytest.mark.parametrize("option", [["--workers", "0"], ["--threads", "0"]])
def test_fit_scripts_refuse_fewer_than_one_worker_or_thread(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], script: str, option: list[str]
) -> None:
    module = _load(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *option])
    with pytest.raises(SystemExit):
        module.parse_arguments()
    assert f"{option[0]} 0: must be at least 1" in capsys.readouterr().err


def test_run_jobs_gives_each_worker_the_threads_asked_for() -> None:
    _load("compare")
    import common as shared

    # 3 is not what 2 workers get by default on a machine of 2, 4 or 8 logical CPUs
    assert sorted(shared.run_jobs([1, 2], _torch_threads, workers=2, threads=3)) == [(1, 3), (2, 3)]


def _torch_threads(_: int) -> int:
    return torch.get_num_threads()


def test_a_results_file_names_the_commit_it_is_told(monkeypatch: pytest.MonkeyPatch) -> None:
    _load("compare")
    import common as shared

    monkeypatch.setenv("NOISY_LIGHTNING_COMMIT", "0123abc")
    assert shared.commit() == "0123abc"
    monkeypatch.delenv("NOISY_LIGHTNING_COMMIT")
    assert shared.commit() != "0123abc"


def test_volume_prior_is_the_plain_m_step_at_zero_and_raises_its_objective_otherwise() -> None:
    volume_prior = _load("volume_prior")
    truth = volume_prior.build_transition_matrix("pair_flip", 10, 0.45)
    exact = volume_prior.population_statistics(truth)
    drifted = volume_prior.drifted_statistics(exact, 0.3)
    assert torch.allclose(drifted.sum(), exact.sum()) and torch.allclose(drifted.sum(dim=0), exact.sum(dim=0))
    assert torch.equal(volume_prior.volume_penalised_m_step(exact, 0.0), em_math.normalise_rows(exact))
    assert em_math.noise_matrix_error(em_math.normalise_rows(exact), truth) < 1e-12

    def objective(theta: torch.Tensor, penalty: float) -> float:
        likelihood = torch.xlogy(drifted, theta).sum()
        return float(likelihood - penalty * drifted.sum() * torch.linalg.slogdet(theta)[1])

    plain = em_math.normalise_rows(drifted)
    penalised = volume_prior.volume_penalised_m_step(drifted, 0.01)
    assert torch.allclose(penalised.sum(dim=1), torch.ones(10, dtype=torch.float64))
    assert objective(penalised, 0.01) > objective(plain, 0.01) + 1e-3
    # The prior pulls the drifted estimate away from the identity: a smaller determinant than the plain M-step's.
    assert torch.linalg.det(penalised).abs() < torch.linalg.det(plain).abs()


def test_the_coteaching_reproduction_follows_the_official_schedule(tmp_path: Path) -> None:
    reproduce = _load("reproduce_coteaching")
    schedule = reproduce.learning_rate_and_beta1
    # Trainer epoch e is the code's epoch e + 1; the code decays from its epoch 80 to lr / 120 in its epoch 199.
    assert schedule(0) == (1e-3, 0.9) and schedule(78) == (1e-3, 0.9)
    assert schedule(79) == (pytest.approx(1e-3), 0.1)
    assert schedule(198) == (pytest.approx(1e-3 / 120), 0.1)
    model = reproduce.OfficialCoTeaching(net=reproduce.CoTeachingCNN(), forget_rate=0.5)
    assert model.current_forget_rate() == pytest.approx(0.5 / 9)  # the code's linspace(0, 0.5, 10)[1]
    assert model.net(torch.rand(3, 784)).shape == (3, 10)
    # The summary compares with the published figure only once all 199 epochs ran.
    row = {"row": "symmetric50", "seed": "1", "flip_rate": "0.5", "precision": "32-true", "seconds": "1"}
    epochs = [{**row, "epoch": str(e), "test_acc_first": "0.9", "test_acc_second": "0.9"} for e in range(1, 200)]
    assert "| 90.00 | 90.00 | 91.68 | -1.68 |" in reproduce.summary_line("symmetric50", "1", epochs)
    assert "run incomplete" in reproduce.summary_line("symmetric50", "1", epochs[:92])
