"""The notebooks are committed with their outputs, and every notebook still runs top to bottom.

Committed (refreshed at full size by ``python notebooks/execute.py``): every code cell ran once,
in order, in a fresh kernel, with no error; no execution timing is stored; every cell that draws
a plot shows it as a PNG, so the notebooks read on a code host. Then each notebook runs again
in a copy with small sizes (LAPLACE_TF_FAST=1; the committed file is never rewritten), and its
fresh outputs pass the same checks. The notebooks check their own results with ``assert`` /
``np.testing`` (e.g. notebook 01's Hessians 2.0, [[2, 1], [1, 2]] and 0.0), so a wrong number
fails the cell and the test.

To save a TensorFlow import per notebook, the notebooks share one ``python3`` kernel, and each
starts with ``%reset -f``: a fresh namespace (a notebook cannot use a name another one defined),
while imported modules stay loaded.
"""

from __future__ import annotations

import inspect
import os
import re
from pathlib import Path

import nbformat
import pytest
from jupyter_core.utils import run_sync
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_notebook

from laplace_tf.calibration import plots

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
TIMEOUT = 300  # seconds per cell; a whole notebook takes well under a minute on 2 cores
MAX_BYTES = 1_000_000

# A cell draws a plot when it calls a plotting function or InlineFigure, or takes a report figure.
_PLOTTERS = sorted(name for name, obj in vars(plots).items()
                   if not name.startswith("_") and inspect.getmodule(obj) is plots)
_DRAWS = re.compile(rf"\b({'|'.join(_PLOTTERS)})\(|\.figures\[")


def _code_cells(notebook) -> list:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def _check_outputs(notebook) -> None:
    """No error output, and a PNG in each cell that draws a plot."""
    for cell in _code_cells(notebook):
        kinds = [o.output_type for o in cell.outputs]
        assert "error" not in kinds, cell.source
        if _DRAWS.search(cell.source):
            assert any("image/png" in o.get("data", {}) for o in cell.outputs), (
                f"no image/png output from the plotting cell:\n{cell.source}")


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """One kernel for all notebooks, started in a temp folder with small sizes."""
    workdir = tmp_path_factory.mktemp("notebooks")
    with pytest.MonkeyPatch.context() as env:  # the kernel inherits the environment
        env.setenv("LAPLACE_TF_FAST", "1")
        env.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
        env.setenv("MPLBACKEND", "Agg")  # figures must show without the inline backend's help
        env.setenv("PYTHONPATH", os.pathsep.join(
            filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        manager = NotebookClient(new_notebook(), kernel_name="python3").create_kernel_manager()
        yield manager, workdir
    if manager.has_kernel:
        run_sync(manager.shutdown_kernel)(now=True)


def test_the_five_notebooks_exist():
    assert [p.stem[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05"]


def test_plotting_cells_are_recognised():
    """The PNG check is not vacuous: notebooks 02-04 each have cells that draw plots."""
    assert {"InlineFigure", "reliability_diagram", "evidence_plot"} <= set(_PLOTTERS)
    drawing = {p.stem[:2]: sum(bool(_DRAWS.search(c.source))
                               for c in _code_cells(nbformat.read(p, as_version=4)))
               for p in NOTEBOOKS}
    assert drawing["01"] == 0 and all(drawing[n] > 0 for n in ("02", "03", "04")), drawing


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_executed_with_outputs(path):
    assert path.stat().st_size < MAX_BYTES
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata.kernelspec.name == "python3"
    assert "version" not in notebook.metadata.get("language_info", {})  # no kernel details
    code = _code_cells(notebook)
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    assert all("execution" not in c.metadata for c in code)  # no timing
    _check_outputs(notebook)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, kernel):
    manager, workdir = kernel
    notebook = nbformat.read(path, as_version=4)  # an in-memory copy
    for cell in _code_cells(notebook):
        cell.outputs, cell.execution_count = [], None
    notebook.cells.insert(0, new_code_cell("%reset -f"))
    client = NotebookClient(notebook, km=manager, kernel_name="python3", timeout=TIMEOUT,
                            resources={"metadata": {"path": str(workdir)}})
    client.execute()  # raises CellExecutionError with the failing cell and its traceback
    assert all(c.execution_count is not None for c in _code_cells(notebook))
    _check_outputs(notebook)
