"""Recurrent layers (LSTM, GRU, SimpleRNN, Bidirectional) over all weights, in float64.

Their forward pass is a ``while_loop`` (no ``unroll=True``). Curvature (diag, kron, full GGN),
the GLM predictive and the sampling predictive are checked against the brute-force references
of :mod:`laplace_tf.testing`, and TensorFlow must not flood the log while computing them.
"""

from __future__ import annotations

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

from laplace_tf import testing
from laplace_tf.curvature._per_example import _vectorised_rows, output_cotangents
from laplace_tf.curvature.blocks import DiagBlock, KronBlock
from laplace_tf.predictive import Laplace
from tests.models import F64, targets

EXACT = {"rtol": 1e-9, "atol": 1e-12}
N_CLASSES = 3

RECURRENT = {
    "lstm": lambda: keras.layers.LSTM(4, dtype=F64),
    "gru": lambda: keras.layers.GRU(3, dtype=F64),
    "simple_rnn": lambda: keras.layers.SimpleRNN(3, activation="tanh", dtype=F64),
    "bidirectional": lambda: keras.layers.Bidirectional(keras.layers.LSTM(2, dtype=F64), dtype=F64),
}


def _model(name: str, time_steps: int | None = 5, n: int = 4, seed: int = 0):
    """``Input((time_steps, 3)) -> recurrent layer -> Dense(3)`` and ``n`` sequences of 5 steps."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((time_steps, 3), dtype=F64), RECURRENT[name](), keras.layers.Dense(N_CLASSES, dtype=F64),
    ])
    return model, np.random.default_rng(seed).normal(size=(n, 5, 3))


def _fitted(name: str, structure: str, time_steps: int | None = 5, n: int = 4) -> tuple[Laplace, np.ndarray, np.ndarray]:
    model, x = _model(name, time_steps, n)
    y = targets("classification", N_CLASSES, n)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure,
                 batch_size=3, progress=False)   # two batches: sums over batches are checked too
    la.fit((x, y))
    return la, x, y


def _brute_force_ggn(la: Laplace, x, y) -> np.ndarray:
    return testing.brute_force_ggn(la.logit_model, la.likelihood, tf.constant(x),
                                   tf.one_hot(y, N_CLASSES, dtype=tf.float64))


@pytest.mark.parametrize("name", list(RECURRENT))
def test_diag_equals_brute_force_diagonal(name):
    la, x, y = _fitted(name, "diag")
    (block,) = la._curvature.blocks
    np.testing.assert_allclose(block.diagonal, np.diag(_brute_force_ggn(la, x, y)), **EXACT)


@pytest.mark.parametrize("name, time_steps", [("gru", 5), ("lstm", None)])
def test_full_ggn_equals_brute_force(name, time_steps):
    """Also with an unknown number of time steps (no unrolling possible)."""
    la, x, y = _fitted(name, "full", time_steps)
    (block,) = la._curvature.blocks
    np.testing.assert_allclose(block.matrix, _brute_force_ggn(la, x, y), **EXACT)


def test_kron_gives_the_recurrent_layer_its_exact_diagonal_and_warns_once(caplog):
    """The LSTM cell gets the exact GGN diagonal; the Dense head the Kronecker factors of its
    inputs (the LSTM outputs) and of the output Hessians; one warning names the cell."""
    with caplog.at_level(logging.WARNING, logger="laplace_tf"):
        la, x, y = _fitted("lstm", "kron")
    cell_block, dense_block = la._curvature.blocks
    assert isinstance(cell_block, DiagBlock) and isinstance(dense_block, KronBlock)
    cell = la.subset.slices[0]
    exact = _brute_force_ggn(la, x, y)[: cell.size, : cell.size]
    np.testing.assert_allclose(cell_block.diagonal, np.diag(exact), **EXACT)

    features = np.asarray(la.model.layers[0](x))
    a = np.concatenate([features, np.ones((len(x), 1))], axis=1)
    logits = la.logit_model(tf.constant(x))
    lam = testing.brute_force_output_hessians(la.likelihood, logits, tf.one_hot(y, N_CLASSES, dtype=F64))
    np.testing.assert_allclose(dense_block.A, a.T @ a / len(x), **EXACT)
    np.testing.assert_allclose(dense_block.G, lam.sum(0), **EXACT)

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "kron" in r.getMessage()]
    assert len(warnings) == 1 and cell.name in warnings[0].getMessage()


@pytest.mark.parametrize("name, structure", [("lstm", "diag"), ("simple_rnn", "full"),
                                             ("gru", "kron")])
def test_glm_functional_variance_equals_brute_force(name, structure):
    la, x, _ = _fitted(name, structure)
    jacobians = testing.brute_force_jacobians(la.logit_model, tf.constant(x))
    expected = testing.dense_functional_variance(jacobians, la.posterior_covariance.numpy())
    np.testing.assert_allclose(la.functional_variance(x), expected, **EXACT)


def test_nn_predictive_runs_the_network_with_the_sampled_weights():
    la, x, _ = _fitted("lstm", "diag")
    samples = la.predictive_samples(x, n_samples=3, seed=7, pred_type="nn")
    thetas = la.sample(3, seed=7)
    expected = [tf.nn.softmax(la.logit_model(tf.constant(x), la.subset.unflatten(t))) for t in thetas]
    np.testing.assert_allclose(samples, np.stack(expected), **EXACT)


def test_tensorflow_does_not_flood_the_log(capfd, caplog):
    """A failed pfor conversion logs whole graphs (thousands of lines) on stderr."""
    with caplog.at_level(logging.INFO, logger="tensorflow"):
        la, x, _ = _fitted("lstm", "diag", n=2)
        la(x)
    stderr = capfd.readouterr().err
    assert "ERROR:tensorflow" not in stderr and len(stderr.splitlines()) < 20
    assert not [r for r in caplog.records if r.name == "tensorflow" and r.levelno >= logging.ERROR]


@pytest.mark.filterwarnings("ignore:on_indefinite='clip'")
def test_exact_hessian_falls_back_quietly_to_a_loop(capfd):
    """pfor cannot take second derivatives through the loop: a sequential loop, one warning."""
    model, x = _model("simple_rnn", n=2)
    y = targets("classification", N_CLASSES, 2)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="full",
                 curvature="hessian", on_indefinite="clip", progress=False)
    with pytest.warns(RuntimeWarning, match="sequential loop"):
        la.fit((x, y))
    expected = testing.brute_force_hessian(la.logit_model, la.likelihood, tf.constant(x),
                                           tf.one_hot(y, N_CLASSES, dtype=F64))
    np.testing.assert_allclose(la._curvature.blocks[0].matrix, expected, **EXACT)
    assert len(capfd.readouterr().err.splitlines()) < 20


def test_a_failed_vectorisation_is_one_clear_error(capfd):
    """Nested pfor through the loop (what ``graph_loop=False`` asks for) fails: the error names
    the layer and subset_of_weights='last_layer', and the log stays small."""
    la, x, y = _fitted("lstm", "diag", n=2)
    cotangents = output_cotangents(la.likelihood, "ggn", la.logit_model(tf.constant(x)), None)
    rows = tf.function(lambda inputs, c: _vectorised_rows(
        la.logit_model, inputs, c, la.subset.slices[:1], graph_loop=False))
    with pytest.raises(ValueError, match=r"'lstm_cell.*subset_of_weights='last_layer'"):
        rows(tf.constant(x), cotangents)
    assert len(capfd.readouterr().err.splitlines()) < 20
