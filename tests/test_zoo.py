"""The model zoo (tests/zoo.py) fitted the three common ways, predictions checked for sense.

Each model is fitted with all-weights Kronecker, all-weights diagonal and last-layer Kronecker
Laplace; under all-weights Kronecker no layer but a recurrent cell gets the diagonal fallback
(``la.block_kinds()``); the GLM predictive must give probabilities (in [0, 1], rows summing to 1), positive
semi-definite functional variances, and the MAP network's softmax once the prior precision is
so large that the posterior is a point mass.
"""

from __future__ import annotations

import functools

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
