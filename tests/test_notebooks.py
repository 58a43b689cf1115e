"""Execute the experiment notebooks at their small (digits) size so they never rot."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "experiments" / "notebooks"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fff_mnist.ipynb", "region_editing.ipynb"])
def test_notebook_runs_small(name, monkeypatch, tmp_path):
    """Runs in a folder outside the repository: the notebooks import the installed fffjax."""
    monkeypatch.setenv("FFFJAX_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # The kernel is a fresh process: keep it on the CPU with one device, quietly.
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    assert "digits" in outputs
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
