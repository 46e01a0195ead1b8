"""What laplace_tf shows on the console: TensorFlow's start-up noise hidden, progress bars on terminals.

TensorFlow's native start-up lines (oneDNN notices, CUDA probing on machines without a GPU,
CPU feature hints, absl's "log messages before absl::InitializeLog()") are written straight to
file descriptor 2 by C++ code, and no longer obey ``TF_CPP_MIN_LOG_LEVEL``. After
``import laplace_tf``, the first import of TensorFlow (by laplace_tf or by the user) runs with
descriptor 2 captured; lines of those known kinds are dropped, anything else is written back.
Set ``TF_CPP_MIN_LOG_LEVEL=0`` to see everything. If TensorFlow was imported before
laplace_tf, nothing is changed.

Progress bars: ``progress=None`` means "on a terminal or in a notebook"; a log file never gets
hundreds of bar updates. ``verbose`` follows Keras: 0 silent, 1 progress bar, 2 one line per
epoch, ``"auto"`` 1 on a terminal and 2 otherwise.

Example:
    >>> show_progress(False), show_progress(True)
    (False, True)
    >>> keras_verbosity(0), keras_verbosity(2)
    (0, 2)
    >>> drop_startup_noise("I0000 00:00:1.2 1 port.cc:153] oneDNN custom operations are on.\\nreal\\n")
    'real\\n'
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile

_NOISE = re.compile(
    r"^(?:[IW]\d{4} .*"                                   # absl INFO / WARNING lines
    r"|E\d{4} .*(?:cuInit|cuda_|CUDA|cudart).*"            # failed GPU probing without a GPU
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called.*"
    r"|To enable the following instructions:.*"            # continuation of a CPU feature hint
    r"|\s*)$"
)


def drop_startup_noise(text: str) -> str:
    """``text`` without TensorFlow's known start-up lines (and blank lines); keeps the rest."""
    return "".join(line for line in text.splitlines(keepends=True) if not _NOISE.match(line.rstrip("\n")))


def show_progress(progress: bool | None) -> bool:
    """Resolve a ``progress`` argument: ``None`` is True on a terminal or in a Jupyter kernel."""
    if progress is not None:
        return bool(progress)
    stream = sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)()) or "ipykernel" in sys.modules


def keras_verbosity(verbose) -> int:
    """Resolve a Keras-style ``verbose`` (0, 1, 2, ``"auto"``, or a bool) to 0, 1 or 2."""
    if verbose == "auto":
        return 1 if show_progress(None) else 2
    if isinstance(verbose, bool):
        return int(verbose)
    if verbose in (0, 1, 2) and not isinstance(verbose, float):
        return int(verbose)
    raise ValueError(f"verbose: expected 0 (silent), 1 (progress bar), 2 (one line per epoch) or "
                     f"'auto', got {verbose!r}.")


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Import hook: the first ``import tensorflow`` runs with descriptor 2 captured, then leaves."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)   # the other finders, as without the hook
        if spec is None or spec.loader is None:
            return spec
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        with _captured_stderr():
            self._loader.exec_module(module)
            module.config.list_physical_devices()   # device probing logs its lines now, too


class _captured_stderr:
    """Descriptor 2 goes to a temporary file; on exit its non-noise lines are written back."""

    def __enter__(self):
        sys.stderr.flush()
        self._file = tempfile.TemporaryFile(mode="w+b")
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)

    def __exit__(self, *exc):
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        text = self._file.read().decode(errors="replace")
        self._file.close()
        kept = text if exc[0] is not None else drop_startup_noise(text)
        if kept:
            sys.stderr.write(kept)
            sys.stderr.flush()
        return False


def quiet_tensorflow_startup() -> None:
    """Install the import hook, unless TensorFlow is already imported or the user asked for logs."""
    if "tensorflow" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        return
    if not any(isinstance(finder, _QuietTensorFlowImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowImport())
