"""Every number the README and the docs quote comes from a results file that the same section names.

A section is the text between two headings. Its measurements (``x ± y``, ``x.y%``) must each appear verbatim in one
of the files under ``benchmarks/results/`` that the section names, so a table re-measured without updating the text,
or a number typed by hand, fails here.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MEASUREMENT = re.compile(r"\d+\.\d+ ± \d+\.\d+|(?<![\w.])\d+\.\d+%")
NAMED_FILE = re.compile(
    r"\b(quality_\w+|compare_\w+|noise_suite_\w+|reproduce_\w+|em_variants|em_starts|quickstart|speed|speed_gpu|method_cost\w*|volume_prior)\.md\b"
)


def sections(text: str) -> list[tuple[str, str]]:
    parts = re.split(r"^(#+ .*)$", text, flags=re.MULTILINE)
    return [(parts[i], parts[i + 1]) for i in range(1, len(parts) - 1, 2)]


@pytest.mark.parametrize("page", PAGES, ids=lambda path: path.name)
def test_quoted_measurements_come_from_the_results_files_the_section_names(page: Path) -> None:
    checked = 0
    for heading, body in sections(page.read_text()):
        numbers = set(MEASUREMENT.findall(body))
        if not numbers:
            continue
        files = {RESULTS / f"{name}.md" for name in NAMED_FILE.findall(body)}
        assert files, f"{page.name}, {heading!r} quotes {sorted(numbers)} but names no results file"
        missing = [path for path in files if not path.exists()]
        assert not missing, f"{page.name}, {heading!r} names missing files {missing}"
        sources = "\n".join(path.read_text() for path in files)
        unsourced = sorted(number for number in numbers if number not in sources)
        assert not unsourced, f"{page.name}, {heading!r}: {unsourced} appear in none of {sorted(map(str, files))}"
        checked += len(numbers)
    if page.name in ("README.md", "results.md"):
        assert checked >= 20, "the results tables are checked"


def test_the_check_catches_a_hand_typed_number() -> None:
    text = "## Results\n\n`benchmarks/results/quality_mnist.md` says 97.85 ± 0.01 and 97.86 ± 0.01.\n"
    ((_heading, body),) = sections(text)
    sources = (RESULTS / "quality_mnist.md").read_text()
    assert [number for number in MEASUREMENT.findall(body) if number not in sources] == ["97.86 ± 0.01"]
