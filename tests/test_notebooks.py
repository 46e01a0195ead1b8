"""Every notebook runs top to bottom (small sizes: LAPLACE_TF_FAST=1) and is committed clean.

The notebooks check their own results with ``assert`` / ``np.testing`` (e.g. notebook 01's
Hessians 2.0, [[2, 1], [1, 2]] and 0.0), so a wrong number fails the cell and the test.

To save a TensorFlow import per notebook, the notebooks share one ``python3`` kernel, and each
starts with ``%reset -f``: a fresh namespace (a notebook cannot use a name another one defined),
while imported modules stay loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from jupyter_core.utils import run_sync
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_notebook

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
TIMEOUT = 300  # seconds per cell; a whole notebook takes well under a minute on 2 cores


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """One kernel for all notebooks, started in a temp folder with small sizes."""
    workdir = tmp_path_factory.mktemp("notebooks")
    with pytest.MonkeyPatch.context() as env:  # the kernel inherits the environment
        env.setenv("LAPLACE_TF_FAST", "1")
        env.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
        env.setenv("MPLBACKEND", "Agg")
        env.setenv("PYTHONPATH", os.pathsep.join(
            filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        manager = NotebookClient(new_notebook(), kernel_name="python3").create_kernel_manager()
        yield manager, workdir
    if manager.has_kernel:
        run_sync(manager.shutdown_kernel)(now=True)


def test_the_four_notebooks_exist():
    assert [p.stem[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert notebook.metadata.kernelspec.name == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, kernel):
    manager, workdir = kernel
    notebook = nbformat.read(path, as_version=4)
    notebook.cells.insert(0, new_code_cell("%reset -f"))
    client = NotebookClient(notebook, km=manager, kernel_name="python3", timeout=TIMEOUT,
                            resources={"metadata": {"path": str(workdir)}})
    client.execute()  # raises CellExecutionError with the failing cell and its traceback
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors
