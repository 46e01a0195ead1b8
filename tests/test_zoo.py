"""The model zoo (tests/zoo.py) fitted the three common ways, predictions checked for sense.

Each model is fitted with all-weights Kronecker, all-weights diagonal and last-layer Kronecker
Laplace; under all-weights Kronecker no layer but a recurrent cell gets the diagonal fallback
(``la.block_kinds()``); the GLM predictive must give probabilities (in [0, 1], rows summing to 1), positive
semi-definite functional variances, and the MAP network's softmax once the prior precision is
so large that the posterior is a point mass.
"""

from __future__ import annotations

import functools
import subprocess
import sys

import keras
import numpy as np
import pytest

import laplace_tf as ltf
from laplace_tf.params import leaf_layers
from tests.zoo import N_CLASSES, RECURRENT, ZOO

STRUCTURES = [("all", "kron"), ("all", "diag"), ("last_layer", "kron")]


@functools.cache
def _built(name: str):
    return ZOO[name]()


@pytest.mark.parametrize("subset,structure", STRUCTURES)
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_gives_sensible_predictions(name, subset, structure):
    model, x, y = _built(name)
    la = ltf.Laplace(model, "classification", subset, structure, progress=False)
    la.fit((x, y), batch_size=8)
    if (subset, structure) == ("all", "kron"):  # only a recurrent cell falls back to diag
        kinds = la.block_kinds()
        fallback = [type(layer).__name__ for layer in leaf_layers(model)
                    if kinds.get(layer.name) == "diag"]
        assert fallback == ([f"{name.upper()}Cell"] if name in RECURRENT else [])
    probs = np.asarray(la(x))
    assert probs.shape == (len(y), N_CLASSES)
    assert np.all(probs >= 0) and np.all(probs <= 1)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    variance = np.asarray(la.functional_variance(x), np.float64)
    assert variance.shape == (len(y), N_CLASSES, N_CLASSES)
    scale = np.abs(variance).max()
    assert scale > 0  # the posterior does reach the logits
    assert np.linalg.eigvalsh(variance).min() >= -1e-5 * scale

    la.prior_precision = 1e8  # a point mass at the MAP: the network's own softmax
    map_probs = keras.ops.convert_to_numpy(keras.ops.softmax(model(x), axis=-1))
    np.testing.assert_allclose(la(x), map_probs, atol=1e-4)



_GLM_PEAK = """
import resource
import keras, numpy as np
import laplace_tf as ltf
L = keras.layers
keras.utils.set_random_seed(0)
inputs = keras.Input((8, 8, 1))
h = L.ReLU()(L.BatchNormalization()(L.Conv2D(16, 3, padding="same", use_bias=False)(inputs)))
model = keras.Model(inputs, L.Dense(10)(L.GlobalAveragePooling2D()(h)))
x = np.random.default_rng(0).normal(size=(128, 8, 8, 1)).astype("float32")
la = ltf.Laplace(model, "classification", "all", "kron", progress=False)
la.fit((x[:16], np.arange(16) % 10))
la(x[:2])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
la(x)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_glm_predictive_memory_grows_with_the_batch_not_its_square():
    """The Jacobian of BatchNorm weights (no Kronecker factors) is taken example by example.
    As a Jacobian of all the batch's logits (N K backward passes of the whole batch) the peak
    grew by 355 MiB for 64 inputs and 1,379 MiB for 128 (a digits CNN: 13 GiB for 200);
    example by example it grows by about 25 MiB for either."""
    run = subprocess.run([sys.executable, "-c", _GLM_PEAK], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert int(run.stdout.split()[-1]) < 300, run.stdout  # MiB of peak growth
