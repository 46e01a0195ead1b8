"""Likelihoods against autodiff and scipy: output Hessians, their factors, NLL, links, checks."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from models import F64
from scipy import special, stats

from laplace_tf import likelihoods, testing
from laplace_tf.likelihoods import get_likelihood
from laplace_tf.params import LogitModel

EXACT = {"rtol": 1e-12, "atol": 1e-14}
N = 5
SIGMAS = {"scalar": 0.7, "per-output": np.array([0.5, 2.0, 1.3])}


def _case(name: str, sigma=1.0, seed: int = 0):
    """A likelihood, random logits ``[N, K]`` (float64), raw labels and prepared targets."""
    rng = np.random.default_rng(seed)
    n_outputs = {"classification": 4, "binary": 1, "regression": 3}[name]
    logits = rng.normal(scale=2.0, size=(N, n_outputs))
    if name == "classification":
        y = rng.integers(0, n_outputs, N)
    elif name == "binary":
        y = rng.integers(0, 2, N).astype(np.float64)
    else:
        y = rng.normal(size=(N, n_outputs))
    likelihood = get_likelihood(name, sigma)
    return likelihood, tf.constant(logits), y, likelihood.prepare_targets(y, n_outputs, tf.float64)


LIKELIHOOD_CASES = [
    ("classification", 1.0), ("binary", 1.0),
    ("regression", SIGMAS["scalar"]), ("regression", SIGMAS["per-output"]),
]
CASE_IDS = ["classification", "binary", "regression-scalar-sigma", "regression-vector-sigma"]


@pytest.mark.parametrize(("name", "sigma"), LIKELIHOOD_CASES, ids=CASE_IDS)
def test_output_hessian_and_its_factors_equal_autodiff(name, sigma):
    likelihood, logits, _, targets = _case(name, sigma)
    reference = testing.brute_force_output_hessians(likelihood, logits, targets)
    root = likelihood.output_hessian_sqrt(logits)
    d, u = likelihood.output_hessian_diag_lowrank(logits)
    low_rank = tf.linalg.diag(d) - tf.matmul(u, u, transpose_b=True)
    for matrix in (likelihood.output_hessian(logits), tf.matmul(root, root, transpose_b=True), low_rank):
        np.testing.assert_allclose(matrix.numpy(), reference, **EXACT)


@pytest.mark.parametrize(("name", "sigma"), LIKELIHOOD_CASES, ids=CASE_IDS)
def test_nll_and_link_match_scipy(name, sigma):
    likelihood, logits, y, targets = _case(name, sigma)
    f = logits.numpy()
    if name == "classification":
        expected = -special.log_softmax(f, axis=1)[np.arange(N), y]
        mean = special.softmax(f, axis=1)
    elif name == "binary":
        expected = -(y * special.log_expit(f[:, 0]) + (1 - y) * special.log_expit(-f[:, 0]))
        mean = special.expit(f)
    else:
        expected = -stats.norm.logpdf(y, loc=f, scale=sigma).sum(axis=1)
        mean = f
    np.testing.assert_allclose(likelihood.nll_per_example(logits, targets).numpy(), expected, **EXACT)
    np.testing.assert_allclose(float(likelihood.nll(logits, targets)), expected.sum(), **EXACT)
    np.testing.assert_allclose(likelihood.inverse_link(logits).numpy(), mean, **EXACT)


def test_classification_nll_by_hand():
    """Two classes, logits (0, log 3): p = (1/4, 3/4)."""
    likelihood = get_likelihood("classification")
    logits = tf.constant([[0.0, np.log(3.0)], [0.0, np.log(3.0)]], tf.float64)
    targets = likelihood.prepare_targets(np.array([0, 1]), 2, tf.float64)
    np.testing.assert_allclose(likelihood.nll_per_example(logits, targets).numpy(),
                               [np.log(4.0), np.log(4.0 / 3.0)], **EXACT)


@pytest.mark.parametrize(
    ("labels", "n_outputs"),
    [(np.array([2, 0, 1]), 3), (np.array([[2], [0], [1]]), 3), (np.array([2.0, 0.0, 1.0]), 3),
     (np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]]), 3)],
    ids=["int", "int-column", "whole-floats", "one-hot"],
)
def test_classification_label_forms_agree(labels, n_outputs):
    targets = get_likelihood("classification").prepare_targets(labels, n_outputs, tf.float64)
    np.testing.assert_array_equal(targets.numpy(), np.eye(3)[[2, 0, 1]])


@pytest.mark.parametrize(
    ("name", "y", "n_outputs", "match"),
    [
        ("classification", np.array([0, 3]), 3, r"y: class labels must lie in \[0, 3\).*from 0 to 3"),
        ("classification", np.array([-1, 1]), 3, r"y: class labels must lie in \[0, 3\)"),
        ("classification", np.array([0.5, 1.0]), 3, "y: class labels must be whole numbers"),
        ("classification", np.zeros((2, 2, 2)), 3, r"y: expected integer labels \[N\] or one-hot"),
        ("classification", np.array([[0.5, 0.2, 0.2]]), 3, "y: one-hot labels must be"),
        ("classification", np.array([np.nan, 1.0]), 3, "y: labels contain NaN or Inf"),
        ("binary", np.array([0.0, 2.0]), 1, "y: 'binary' labels must be 0 or 1"),
        ("binary", np.zeros((2, 2)), 1, r"y: expected 0/1 labels \[N\] or \[N, 1\]"),
        ("binary", np.array([np.inf, 1.0]), 1, "y: labels contain NaN or Inf"),
        ("regression", np.zeros((2, 3)), 2, r"y: expected regression targets \[N, 2\]"),
        ("regression", np.array([1.0, np.nan]), 1, "y: labels contain NaN or Inf"),
    ],
)
def test_bad_targets_are_named(name, y, n_outputs, match):
    with pytest.raises(ValueError, match=match):
        get_likelihood(name).prepare_targets(y, n_outputs, tf.float64)


@pytest.mark.parametrize("name", likelihoods.LIKELIHOODS)
def test_non_numeric_labels(name):
    with pytest.raises(TypeError, match="y: expected numeric labels; got dtype <U3"):
        get_likelihood(name).prepare_targets(np.array(["cat", "dog"]), 1, tf.float64)


@pytest.mark.parametrize(
    ("name", "n_outputs", "match"),
    [("classification", 1, "'classification' needs one logit per class.*likelihood='binary'"),
     ("binary", 3, "'binary' needs exactly one output logit.*likelihood='classification'")],
)
def test_model_outputs_that_do_not_fit(name, n_outputs, match):
    with pytest.raises(ValueError, match=match):
        get_likelihood(name).validate_outputs(n_outputs)


@pytest.mark.parametrize("sigma", [0.0, -1.0, np.nan, [[1.0]], [1.0, -2.0]])
def test_bad_sigma_noise(sigma):
    with pytest.raises(ValueError, match="sigma_noise: expected a positive scalar"):
        get_likelihood("regression", sigma)


def test_sigma_noise_per_output_must_match_outputs():
    with pytest.raises(ValueError, match="sigma_noise: got 2 values but the model has 3 outputs"):
        get_likelihood("regression", [1.0, 2.0]).validate_outputs(3)


def test_unknown_likelihood():
    with pytest.raises(ValueError, match=r"likelihood: expected one of \('classification'"):
        get_likelihood("poisson")


def _twins(head, n_outputs: int):
    """A model ending in softmax/sigmoid and its linear-output twin with the same weights."""
    keras.utils.set_random_seed(0)

    def body():
        return [keras.Input((3,), dtype=F64), keras.layers.Dense(4, "tanh", dtype=F64)]

    probabilistic = keras.Sequential(body() + head())
    linear = keras.Sequential(body() + [keras.layers.Dense(n_outputs, dtype=F64)])
    linear.set_weights(probabilistic.get_weights())
    return probabilistic, linear


def _softmax(f):
    return special.softmax(f, axis=1)


@pytest.mark.parametrize(
    ("head", "n_outputs", "link"),
    [(lambda: [keras.layers.Dense(3, "softmax", dtype=F64)], 3, _softmax),
     (lambda: [keras.layers.Dense(3, dtype=F64), keras.layers.Softmax(dtype=F64)], 3, _softmax),
     (lambda: [keras.layers.Dense(1, "sigmoid", dtype=F64)], 1, special.expit)],
    ids=["dense-softmax", "softmax-layer", "dense-sigmoid"],
)
def test_probability_outputs_give_the_linear_twins_logits(head, n_outputs, link):
    probabilistic, linear = _twins(head, n_outputs)
    x = tf.constant(np.random.default_rng(1).normal(size=(5, 3)))
    logits = LogitModel(probabilistic)(x).numpy()
    np.testing.assert_allclose(logits, linear(x).numpy(), **EXACT)
    np.testing.assert_allclose(link(logits), probabilistic(x).numpy(), rtol=1e-12)


def test_the_monte_carlo_kron_refuses_a_likelihood_without_a_sampler():
    from laplace_tf.curvature.kron import KronBuilder

    class Unsampled(likelihoods.Regression):
        name = "unsampled"
        sample = likelihoods.Likelihood.sample

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="stochastic: the likelihood 'unsampled' has no sampler"):
        KronBuilder(LogitModel(model), Unsampled(), stochastic=True)
