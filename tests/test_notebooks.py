"""Execute the experiment notebooks at their small (digits) size so they never rot, from a folder
outside the repository: they import the installed fffjax and compute no path from the working directory."""

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "experiments" / "notebooks"
NAMES = ["fff_mnist.ipynb", "region_editing.ipynb"]
# What a notebook tied to its place in a checkout would contain.
PATH_HACKS = (r"\bsys\s*\.\s*path\b", r"Path\.cwd", r"os\.getcwd", r"os\.chdir", r"__file__", r"parents\[")


def test_every_notebook_is_tested():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_takes_no_path_from_where_it_runs(name):
    cells = json.loads((NOTEBOOKS / name).read_text())["cells"]
    code = ["".join(cell["source"]) for cell in cells if cell["cell_type"] == "code"]
    found = {hack: i for hack in PATH_HACKS for i, source in enumerate(code) if re.search(hack, source)}
    assert found == {}, f"{name}: code cells that depend on the working directory or the checkout: {found}"


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_small(name, monkeypatch, tmp_path):
    """Runs with the kernel's working directory a fresh temporary folder, outside the repository."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("FFFJAX_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # The kernel is a fresh process: keep it on the CPU with one device, quietly.
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    # A first cell of the test's own reports where the kernel runs.
    notebook.cells.insert(0, nbformat.v4.new_code_cell("import os\nprint('cwd:', os.getcwd())"))
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    outputs = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    assert f"cwd: {tmp_path.resolve()}\n" in outputs
    assert "digits" in outputs
