"""What a user sees on the console: no TensorFlow start-up noise, no progress bars in log files."""

import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

from laplace_tf import console
from laplace_tf.models import train_map

_FIT = """
import laplace_tf as ltf, numpy as np, keras
model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
la = ltf.Laplace(model, "regression", "all", "diag")
la.fit((np.ones((8, 3), "float32"), np.ones((8, 2), "float32")))
la.optimize_prior_precision(n_steps=5)
inputs = keras.Input((3,))  # a layer without Kronecker factors: Jacobians taken in the graph
h = keras.layers.BatchNormalization()(keras.layers.Dense(4)(inputs))
la = ltf.Laplace(keras.Model(inputs, keras.layers.Dense(2)(h)), "classification", "all", "kron")
la.fit((np.ones((8, 3), "float32"), np.arange(8) % 2))
la(np.ones((2, 3), "float32"))
print("fitted")
"""


def _run(code: str, **env) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**environment, **env}, timeout=300)


def test_a_fit_writes_neither_tensorflow_startup_lines_nor_progress_bars_to_a_log_file():
    run = _run(_FIT)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "fitted"
    assert not re.search(r"^[IWE]\d{4} |absl::InitializeLog|oneDNN", run.stderr, re.M), run.stderr
    assert "curvature" not in run.stderr and "it/s" not in run.stderr, run.stderr
    assert run.stderr.strip() == "", run.stderr  # nor AutoGraph's notices about our functions


def test_asking_for_tensorflow_logs_installs_no_import_hook():
    code = ("import sys, laplace_tf.console as c; "
            "print(any(isinstance(f, c._QuietTensorFlowImport) for f in sys.meta_path))")
    assert _run(code, TF_CPP_MIN_LOG_LEVEL="0").stdout.strip() == "False"
    assert _run(code).stdout.strip() == "True"


def test_startup_noise_filter_keeps_everything_else():
    text = ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
            "I0000 00:00:17.1 10 cudart_stub.cc:31] Could not find cuda drivers on your machine.\n"
            "E0000 00:00:17.2 10 cuda_platform.cc:52] failed call to cuInit: INTERNAL\n"
            "E0000 00:00:17.3 10 kernel.cc:1] a real error\n"
            "Traceback: something else\n")
    assert console.drop_startup_noise(text) == ("E0000 00:00:17.3 10 kernel.cc:1] a real error\n"
                                                "Traceback: something else\n")


@pytest.mark.parametrize("tty, expected", [(True, True), (False, False)])
def test_progress_none_follows_the_terminal(monkeypatch, tty, expected):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty, raising=False)
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    assert console.show_progress(None) is expected
    assert console.keras_verbosity("auto") == (1 if tty else 2)


def test_verbose_follows_keras(capsys):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    x, y = np.ones((8, 3), "float32"), np.ones(8, "float32")
    train_map(model, "regression", x, y, epochs=3, verbose=2)
    out = capsys.readouterr()
    assert out.out.count("training MAP: epoch") == 3 and "epoch 3/3" in out.out
    train_map(model, "regression", x, y, epochs=3, verbose=0)
    assert capsys.readouterr() == ("", "")
    with pytest.raises(ValueError, match="verbose: expected 0"):
        train_map(model, "regression", x, y, epochs=1, verbose=3)
