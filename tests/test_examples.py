"""The notebooks in examples/ run top to bottom (nbclient, a real kernel), on the tiny models they build."""

from __future__ import annotations

from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient", reason="nbclient is in the dev extra")
nbformat = pytest.importorskip("nbformat")

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.ipynb"))


def test_the_examples_folder_holds_the_subclassing_notebook():
    assert "subclassing.ipynb" in [path.name for path in EXAMPLES]


@pytest.mark.slow  # a Jupyter kernel runs the whole notebook; its snippets' API is run by tests/test_docs.py
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_notebook_runs_top_to_bottom(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    assert not any(cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "stored with outputs"
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, when a cell fails
    printed = "".join(
        output.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    )
    assert "reloaded student gives the same logits: True" in printed
    assert (tmp_path / "student" / "model.safetensors").is_file()
