"""Self-attention over all weights: per-example gradients that do not crash the process.

Vectorised per-example gradients through ``MultiHeadAttention`` (a product of two activations,
``q k^T``) crashed the Python process inside TensorFlow's float32 oneDNN kernels (a segmentation
fault or a heap-corruption abort). Such models are now routed to one example at a time
(:func:`laplace_tf.curvature._per_example._one_at_a_time`). The fits run in a subprocess
(``tests/_workers/attention_fit.py``), so that a native crash fails one test instead of ending
the test run, and their curvature is checked there against the brute-force references.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import keras
import pytest
import tensorflow as tf

from laplace_tf.curvature._per_example import _one_at_a_time

WORKER = Path(__file__).parent / "_workers" / "attention_fit.py"
TOLERANCE = {"float32": 1e-4, "float64": 1e-10}


@pytest.mark.parametrize("structure, curvature, dtype", [
    ("diag", "ggn", "float32"), ("kron", "ggn", "float32"), ("full", "ef", "float32"),
    ("diag", "ggn", "float64"),
])
def test_attention_fit_runs_and_matches_brute_force(structure, curvature, dtype):
    done = subprocess.run([sys.executable, str(WORKER), structure, curvature, dtype],
                          capture_output=True, text=True, timeout=600)
    if done.returncode < 0:
        pytest.fail(f"the fit killed its process with {signal.Signals(-done.returncode).name}")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if structure != "kron":
        assert result["error"] < TOLERANCE[dtype]
    assert result["probability_sum"] == pytest.approx(64.0, rel=1e-5)  # 64 rows of probabilities


def _forward_graph(model):
    spec = tf.TensorSpec([None, *model.input_shape[1:]], tf.float32)
    return tf.function(lambda x: model(x, training=False)).get_concrete_function(spec).graph


def _sequence_model(layer_of):
    inputs = keras.Input((6, 4))
    hidden = keras.layers.GlobalAveragePooling1D()(layer_of(inputs))
    return keras.Model(inputs, keras.layers.Dense(2)(hidden))


@pytest.mark.parametrize("name, layer_of, expected", [
    ("attention", lambda x: keras.layers.MultiHeadAttention(num_heads=2, key_dim=3)(x, x), True),
    ("lstm", lambda x: keras.layers.LSTM(3, return_sequences=True)(x), True),
    ("dense on sequences", lambda x: keras.layers.Dense(3)(x), False),
    ("einsum dense", lambda x: keras.layers.EinsumDense("abc,cd->abd", (None, 3))(x), False),
    ("conv1d", lambda x: keras.layers.Conv1D(3, 2)(x), False),
    ("grouped conv1d", lambda x: keras.layers.Conv1D(4, 2, groups=2)(x), True),
])
def test_one_at_a_time_only_for_loops_products_of_activations_and_grouped_convolutions(
        name, layer_of, expected):
    model = _sequence_model(layer_of)
    assert _one_at_a_time(_forward_graph(model), model) is expected
