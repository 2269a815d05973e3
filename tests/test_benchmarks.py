"""Smoke tests of the benchmark scripts on the shipped sample: they run, and write complete, parseable files."""

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, stem: Path, *arguments: str, timeout: int) -> list[dict[str, str]]:
    """Run ``benchmarks/<script> ... --out stem`` in a fresh interpreter and return the rows of ``stem.csv``.

    Fails with the script's stderr if it fails.
    """
    command = [sys.executable, str(ROOT / "benchmarks" / script), *arguments, "--out", str(stem)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert completed.returncode == 0, completed.stderr[-3000:]
    with stem.with_suffix(".csv").open() as handle:
        return list(csv.DictReader(handle))


def test_quality_script_writes_csv_and_markdown(tmp_path: Path) -> None:
    stem = tmp_path / "quality"
    rows = run_benchmark(
        "quality.py",
        stem,
        *("--dataset", "mnist_sample", "--seeds", "0", "--rows", "symmetric 50%"),
        *("--epochs", "8", "--warmup-epochs", "4"),  # 4 EM rounds: 3 held, then one theta M-step
        timeout=300,
    )
    assert [(r["row"], r["recipe"]) for r in rows] == [
        ("clean", "ce"),
        ("symmetric 50%", "ce"),
        ("symmetric 50%", "em"),
    ]
    em_row = rows[-1]
    assert 0.0 <= float(em_row["theta_error"]) < 1.0 and 0.5 < float(em_row["label_recovery"]) <= 1.0
    markdown = stem.with_suffix(".md").read_text()
    assert "| symmetric 50% | 1 |" in markdown
    assert not list(tmp_path.glob(".*")), "no temporary file is left behind"


def test_speed_script_writes_its_tables(tmp_path: Path, mnist_dir: Path) -> None:
    stem = tmp_path / "speed"
    rows = run_benchmark(
        "speed.py",
        stem,
        *("--data-dir", str(mnist_dir), "--batch-sizes", "4096", "--rounds", "1", "--epochs", "2", "--tiles", "2"),
        *("--skip", "torchvision", "ours_em_train_pass"),
        timeout=600,
    )
    assert [row["contender"] for row in rows] == ["bare", "ours_ce", "ours_em"]
    assert all(float(row["median_epoch_s"]) > 0 for row in rows)
    markdown = stem.with_suffix(".md").read_text()
    assert "| 4096 | ours_em |" in markdown
    assert "| 2x | 108,000 | ours_em |" in markdown
    assert "No GPU was lent" in markdown
    assert not list(tmp_path.glob("*.tmp")), "no temporary file is left behind"
