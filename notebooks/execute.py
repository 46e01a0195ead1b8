"""Re-run the notebooks in place, so that their stored outputs are a reader's run.

Usage, from the repository root::

    python notebooks/execute.py                       # all notebooks
    python notebooks/execute.py notebooks/02_*.ipynb  # some

Each notebook runs top to bottom at full size in a fresh ``python3`` kernel started in a
temporary folder, with this checkout's ``laplace_tf`` first on the path. A failing cell stops
the script with its traceback and leaves that notebook unchanged. Nothing volatile is stored:
no execution timing; the notebook metadata is kept as it was; each cell's stdout (and stderr)
is one output however it was flushed; what TensorFlow's C++ runtime writes straight to the
process's stderr, with timestamps, goes to this terminal, not into the notebook. A re-run thus
changes only outputs that changed (and object addresses in TensorFlow's retracing warnings).
``tests/test_notebooks.py`` checks the stored outputs and runs every notebook again at small
sizes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 600  # seconds per cell


def execute(path: Path) -> None:
    """Run the notebook at ``path`` top to bottom and write it back with its outputs."""
    notebook = nbformat.read(path, as_version=4)
    metadata = notebook.metadata.copy()
    with tempfile.TemporaryDirectory() as workdir:
        NotebookClient(notebook, kernel_name="python3", timeout=TIMEOUT, record_timing=False,
                       coalesce_streams=True,
                       extra_arguments=["--IPKernelApp.capture_fd_output=False"],
                       resources={"metadata": {"path": workdir}}).execute()
    notebook.metadata = metadata  # drop the kernel's language_info (Python version, ...)
    nbformat.validate(notebook)
    nbformat.write(notebook, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path,
                        help="notebooks to run (default: notebooks/*.ipynb)")
    paths = parser.parse_args(argv).notebooks or sorted((ROOT / "notebooks").glob("*.ipynb"))
    os.environ.pop("LAPLACE_TF_FAST", None)  # full sizes; the kernel inherits the environment
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    for path in paths:
        start = time.perf_counter()
        execute(path)
        print(f"{path.name}: {time.perf_counter() - start:.0f} s, "
              f"{path.stat().st_size / 1024:.0f} KiB", file=sys.stderr)


if __name__ == "__main__":
    main()
