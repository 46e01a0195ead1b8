"""GLM and sampling predictives against brute-force references, in float64.

The judge is ``J Sigma J^T`` with ``J`` from one gradient per example and output
(``testing.brute_force_jacobians``) and ``Sigma`` the numpy inverse of the brute-force
precision of the structure (``cases.reference_precision``: dense GGN, its diagonal, or
Kronecker factors read layer by layer, plus the prior), never the posterior under test.
"""

from __future__ import annotations

import math

import cases
import keras
import numpy as np
import pytest
import tensorflow as tf

from laplace_tf import testing
from laplace_tf.predictive import Laplace
from laplace_tf.predictive.jacobians import FunctionalVariance

EXACT = 1e-10  # relative, for identities that hold up to float64 round-off


def fit(case, model, x, y, prior=1.0, sigma=1.0) -> Laplace:
    la = Laplace(model, case.likelihood, subset_of_weights=case.subset,
                 hessian_structure=case.structure, prior_precision=prior, sigma_noise=sigma,
                 progress=False)
    la.fit((x, y))
    return la


def fitted(case, prior=1.0, sigma=1.0, n=6):
    """A Laplace fitted on the case's model and random targets, the inputs, and a function
    giving the brute-force ``J Sigma J^T [N, K, K]`` of that posterior."""
    model, x, y = case.build(n)
    la = fit(case, model, x, y, prior, sigma)

    def brute_force_variance() -> np.ndarray:
        precision = cases.reference_precision(case, model, x, y, prior, sigma=sigma)
        return cases.reference_functional_variance(case, model, x, precision)[1]

    return la, x, brute_force_variance


def assert_close(actual, expected, rtol=EXACT):
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = max(np.max(np.abs(expected)), 1e-300)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


# every (subset, structure) pair, and every Jacobian path: Dense, Conv2D (many locations),
# Dense on sequences, a layer called twice, a dense block in a Kronecker posterior (BatchNorm),
# functional, two-input and subclassed models, the closed form.
FV_CASES = cases.table(
    ("tanh_mlp", "classification", "all", "full"),
    ("small_cnn", "classification", "all", "kron"),
    ("with_batchnorm", "regression", "all", "kron"),
    ("two_branch_functional", "binary", "all", "kron"),
    ("two_input", "regression", "all", "kron"),
    ("sequence_dense", "classification", "all", "kron"),
    ("shared_dense", "regression", "all", "kron"),
    ("small_cnn", "classification", "all", "diag"),
    ("with_batchnorm", "binary", "all", "full"),
    ("subclassed", "classification", "all", "diag"),
    ("tanh_mlp", "classification", "last_layer", "full"),
    ("small_cnn", "regression", "last_layer", "kron"),
    ("two_branch_functional", "classification", "last_layer", "kron"),
    ("tanh_mlp", "binary", "last_layer", "diag"),
)


@pytest.mark.parametrize("case", FV_CASES, indirect=True)
def test_functional_variance_equals_explicit_jacobians(case):
    la, x, brute_force_variance = fitted(case)
    assert_close(la.functional_variance(x, batch_size=4), brute_force_variance())


@pytest.mark.parametrize("case", cases.select(
    models=("relu_mlp",), likelihoods=("classification",), subsets=("last_layer",),
), indirect=True)
def test_last_layer_closed_form_equals_generic_path(case):
    la, x, _ = fitted(case)
    closed = la.functional_variance(x)
    assert la._functional(la.covariance_blocks()).logits_layer, "the closed form was not used"
    blocks = la.covariance_blocks()
    generic = FunctionalVariance(la.logit_model, la.block_slices(),
                                 [type(b) for b in blocks], logits_layer=False)
    _, expected = generic(tf.constant(x), la.mean, blocks, diagonal=False)
    assert_close(closed, expected)


@pytest.mark.parametrize("case", cases.table(
    ("tanh_mlp", "classification", "all", "kron"),
    ("tanh_mlp", "classification", "last_layer", "kron"),
    ("tanh_mlp", "classification", "last_layer", "full"),
    ("tanh_mlp", "classification", "all", "diag"),
    ("tanh_mlp", "binary", "last_layer", "full"),
), indirect=True)
def test_probit_is_the_formula_on_the_variance_diagonal(case):
    """The probit path computes only diag(J Sigma J^T) (for the last layer by contracting the
    blocks over the outputs once per call); it must be the probit formula on the diagonal of
    the brute-force J Sigma J^T."""
    la, x, brute_force_variance = fitted(case)
    mu = la.logit_model(tf.constant(x))
    var = np.diagonal(brute_force_variance(), axis1=1, axis2=2)
    scaled = mu / np.sqrt(1 + math.pi / 8 * var)
    expected = tf.sigmoid(scaled) if case.likelihood == "binary" else tf.nn.softmax(scaled)
    assert_close(la(x, link_approx="probit"), expected)


@pytest.mark.parametrize("subset, structure, sigma", [
    ("all", "kron", 0.7), ("last_layer", "full", [0.5, 2.0]), ("all", "diag", 1.3),
])
def test_regression_variance_is_functional_variance_plus_noise(subset, structure, sigma):
    case = cases.Case("relu_mlp", "regression", subset, structure)
    la, x, brute_force_variance = fitted(case, sigma=sigma)
    mean, var = la(x)
    functional = np.diagonal(brute_force_variance(), axis1=1, axis2=2)
    assert_close(mean, la.logit_model(tf.constant(x)))
    assert_close(var, functional + np.square(sigma))
    map_mean, map_var = la.map_predict(x)
    assert_close(map_mean, mean)
    assert_close(map_var, np.broadcast_to(np.square(sigma), var.shape))


@pytest.mark.parametrize("case", cases.table(
    ("tanh_mlp", "classification", "all", "kron"), ("tanh_mlp", "binary", "last_layer", "full"),
    ("tanh_mlp", "regression", "all", "diag"),
), indirect=True)
def test_huge_prior_precision_gives_the_map_prediction(case):
    """With lambda = 1e12 the posterior is a point mass: every predictive is the MAP's.

    Weight deviations are ~1e-6, so outputs move by ~1e-6 times the Jacobian (O(1) here).
    """
    la, x, _ = fitted(case, prior=1e12)
    expected = la.map_predict(x)
    if case.likelihood == "regression":
        for pred_type in ("glm", "nn"):
            mean, var = la(x, pred_type=pred_type, n_samples=20, seed=0)
            np.testing.assert_allclose(mean, expected[0], atol=1e-5)
            np.testing.assert_allclose(var, expected[1], atol=1e-9)
        return
    for pred_type, link in (("glm", "probit"), ("glm", "mc"), ("nn", "probit")):
        np.testing.assert_allclose(
            la(x, pred_type=pred_type, link_approx=link, n_samples=20, seed=0), expected,
            atol=1e-5,
        )


@pytest.mark.parametrize("likelihood, n_samples", [
    ("classification", 13), ("binary", 7), ("regression", 12),
])
def test_nn_predictive_averages_the_network_over_posterior_samples(likelihood, n_samples):
    """Chunked, vectorised sampling == one plain model call per weight sample."""
    la, x, _ = fitted(cases.Case("relu_mlp", likelihood, "all", "kron"), prior=3.0)
    thetas = la.sample(n_samples, seed=5)
    outputs = np.stack([
        la.likelihood.inverse_link(la.logit_model(tf.constant(x), la.subset.unflatten(t)))
        for t in thetas
    ])
    assert_close(la.predictive_samples(x, n_samples, seed=5, pred_type="nn", batch_size=4),
                 outputs)
    result = la(x, pred_type="nn", n_samples=n_samples, seed=5, batch_size=4)
    if likelihood == "regression":
        assert_close(result[0], outputs.mean(0))
        assert_close(result[1], outputs.var(0) + 1.0)
    else:
        assert_close(result, outputs.mean(0))


def test_glm_predictive_samples_have_the_glm_moments():
    """Regression GLM samples: mean f(x), covariance J Sigma J^T, within 5 standard errors."""
    la, x, brute_force_variance = fitted(cases.Case("tanh_mlp", "regression", "all", "full"),
                                         prior=0.5)
    n = 40_000
    samples = la.predictive_samples(x, n_samples=n, seed=3).numpy()
    mu = la.logit_model(tf.constant(x)).numpy()
    testing.assert_gaussian_moments(samples, mu, brute_force_variance(), k=5)


def test_float32_matches_float64():
    """The same network in float32: predictions agree with float64 to float32 accuracy."""
    case = cases.Case("small_cnn", "classification", "all", "kron")
    model64, x, y = case.build(n=4)
    keras.utils.set_random_seed(0)
    model32 = keras.Sequential([
        keras.Input((5, 5, 2)), keras.layers.Conv2D(3, 3, activation="tanh"),
        keras.layers.Flatten(), keras.layers.Dense(3),
    ])
    model32.set_weights([w.astype(np.float32) for w in model64.get_weights()])
    la64 = fit(case, model64, x, y)
    la32 = fit(case, model32, x.astype(np.float32), y)
    probs32 = la32(x.astype(np.float32))
    assert probs32.dtype == tf.float32
    np.testing.assert_allclose(probs32, la64(x), atol=1e-4)
    np.testing.assert_allclose(la32.functional_variance(x), la64.functional_variance(x),
                               rtol=1e-3, atol=1e-5)
