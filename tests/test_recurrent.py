"""Recurrent layers (LSTM, GRU, SimpleRNN, Bidirectional) over all weights, in float64.

Their forward pass is a ``while_loop`` (no ``unroll=True``). Curvature (diag, kron, full GGN),
the GLM predictive and the sampling predictive are checked against the brute-force references
of :mod:`laplace_tf.testing`, and TensorFlow must not flood the log while computing them.
"""

from __future__ import annotations

import functools
import logging
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from laplace_tf import testing
from laplace_tf.blocks import DiagBlock, KronBlock
from laplace_tf.curvature._per_example import output_cotangents, vectorised_rows
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


@functools.cache  # shared by tests that only read the posterior
def _fitted(name: str, structure: str, time_steps: int | None = 5, n: int = 4) -> tuple[Laplace, np.ndarray, np.ndarray]:
    return _fit(name, structure, time_steps, n)


def _fit(name: str, structure: str, time_steps: int | None = 5, n: int = 4) -> tuple[Laplace, np.ndarray, np.ndarray]:
    model, x = _model(name, time_steps, n)
    y = targets("classification", N_CLASSES, n)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure,
                 batch_size=3, progress=False)   # two batches: sums over batches are checked too
    la.fit((x, y))
    return la, x, y


def _brute_force_ggn(la: Laplace, x, y) -> np.ndarray:
    return testing.brute_force_ggn(la.logit_model, la.likelihood, tf.constant(x),
                                   tf.one_hot(y, N_CLASSES, dtype=tf.float64))


def _assert_quiet(capfd, caplog) -> None:
    """Nothing like TF's ERROR graph dumps on stderr or in the log records (under pytest, TF's
    logger has no handler of its own and its records go to the root logger)."""
    stderr = capfd.readouterr().err
    assert "ERROR:tensorflow" not in stderr and len(stderr.splitlines()) < 20
    assert not [r for r in caplog.records if r.name == "tensorflow" and r.levelno >= logging.ERROR]


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
        la, x, y = _fit("lstm", "kron")
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
    with warnings.catch_warnings():  # the loop is seen up front: no failed vectorisation
        warnings.simplefilter("error", RuntimeWarning)
        la, x, _ = _fit("lstm", "diag", n=2)
        la(x)
    _assert_quiet(capfd, caplog)


@pytest.mark.filterwarnings("ignore:on_indefinite='clip'")
def test_exact_hessian_falls_back_quietly_to_a_loop(capfd, caplog):
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
    _assert_quiet(capfd, caplog)


def _forced_nested_pfor_rows(la: Laplace, x):
    """The LSTM cell's per-example rows with ``one_at_a_time=False``: a nested pfor through the
    loop, which pfor cannot convert."""
    cotangents = output_cotangents(la.likelihood, "ggn", la.logit_model(tf.constant(x)), None)
    rows = tf.function(lambda inputs, c: vectorised_rows(
        la.logit_model, inputs, c, la.subset.slices[:1], one_at_a_time=False))
    return rows(tf.constant(x), cotangents), cotangents


def test_a_failed_vectorisation_falls_back_quietly_to_map_fn(capfd, caplog):
    la, x, _ = _fitted("lstm", "diag")
    with pytest.warns(RuntimeWarning, match=r"'lstm_cell'.*one example at a time \(tf.map_fn\)"):
        rows, cotangents = _forced_nested_pfor_rows(la, x)
    size = la.subset.slices[0].size
    jacobians = testing.brute_force_jacobians(la.logit_model, tf.constant(x))[..., :size]
    np.testing.assert_allclose(rows, np.einsum("nkp,nkr->nrp", jacobians, cotangents), **EXACT)
    _assert_quiet(capfd, caplog)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_when_map_fn_fails_too_the_error_names_last_layer(monkeypatch):
    la, x, _ = _fitted("lstm", "diag")

    def failing_map_fn(*args, **kwargs):
        raise NotImplementedError("no gradient")

    monkeypatch.setattr(tf, "map_fn", failing_map_fn)
    with pytest.raises(ValueError, match=r"'lstm_cell'.*no gradient.*subset_of_weights='last_layer'"):
        _forced_nested_pfor_rows(la, x)


def _embedding_lstm(n: int = 3):
    """The usual text model: token ids -> Embedding -> LSTM -> Dense, any sequence length."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((None,), dtype="int32"), keras.layers.Embedding(6, 2, dtype=F64),
        keras.layers.LSTM(2, dtype=F64), keras.layers.Dense(N_CLASSES, dtype=F64),
    ])
    return model, np.random.default_rng(0).integers(0, 6, size=(n, 4)).astype(np.int32)


def test_embedding_before_lstm_equals_brute_force():
    """The Embedding's sparse gradient through the loop, where vectorized_map would fail."""
    model, x = _embedding_lstm()
    y = targets("classification", N_CLASSES, len(x))
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag",
                 progress=False)
    la.fit((x, y))
    np.testing.assert_allclose(la._curvature.blocks[0].diagonal,
                               np.diag(_brute_force_ggn(la, x, y)), **EXACT)
    jacobians = testing.brute_force_jacobians(la.logit_model, tf.constant(x))
    expected = testing.dense_functional_variance(jacobians, la.posterior_covariance.numpy())
    np.testing.assert_allclose(la.functional_variance(x), expected, **EXACT)


def test_glm_refuses_clearly_when_the_jacobian_cannot_be_vectorised(monkeypatch):
    la, x, _ = _fit("simple_rnn", "diag", n=2)

    def failing_jacobian(*args, **kwargs):
        raise ValueError("pfor could not convert the loop")

    monkeypatch.setattr(tf.GradientTape, "jacobian", failing_jacobian)
    with pytest.raises(ValueError, match=r"pred_type='glm'.*convert the loop.*pred_type='nn'"):
        la(x)
