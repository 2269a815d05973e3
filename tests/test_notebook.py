"""The notebook runs top to bottom with its default (small) parameters, as CI's test of it."""

from pathlib import Path

import nbformat
import pytest
from helpers import SUBPROCESS_TIMEOUT_S
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "noisy_labels_mnist.ipynb"


@pytest.mark.slow
def test_notebook_executes(tmp_path: Path) -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "commit it stripped"
    # timeout is per cell: the training cell gets the same margin for a loaded CI machine as a training subprocess.
    NotebookClient(
        notebook, timeout=SUBPROCESS_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    summary = "".join(output.get("text", "") for output in notebook.cells[-1].outputs)
    assert "noisy labels, EM" in summary
    images = [o for cell in notebook.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 5, "the figures are displayed"
    assert list((tmp_path / "lightning_logs").rglob("correction_grid.png"))
