"""Link approximations on hand-made Gaussians over logits (no model involved)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from laplace_tf.likelihoods import get_likelihood
from laplace_tf.predictive.links import bridge, gaussian_samples
from laplace_tf.testing import assert_gaussian_moments

F64 = tf.float64
MU = np.array([[1.0, -0.5, 0.2], [0.0, 2.0, -1.0]])
ROOT = np.array([[[0.6, 0.0, 0.0], [0.3, 0.5, 0.0], [-0.2, 0.1, 0.7]],
                 [[0.9, 0.0, 0.0], [-0.4, 0.3, 0.0], [0.2, 0.2, 0.4]]])
COV = ROOT @ np.swapaxes(ROOT, 1, 2)  # two SPD covariances [2, 3, 3], variances 0.13 to 0.81
SEED = tf.constant([7, 0], tf.int64)


def test_bridge_on_a_hand_case():
    """The Laplace bridge written out step by step (Hobbhahn et al. 2022; laplace-torch)."""
    mu, V = MU[0], COV[0]
    K = 3
    ones = np.ones(K)
    # 1. remove the component along 1 (softmax is invariant to it)
    mu_c = mu - V @ ones * (ones @ mu) / (ones @ V @ ones)
    V_c = V - np.outer(V @ ones, ones @ V) / (ones @ V @ ones)
    # 2. Dirichlet parameters, 3. the Dirichlet mean
    alpha = np.array([
        (1 - 2 / K + math.exp(mu_c[k]) / K**2 * sum(math.exp(-m) for m in mu_c)) / V_c[k, k]
        for k in range(K)
    ])
    expected = alpha / alpha.sum()
    actual = bridge(tf.constant(MU, F64), tf.constant(COV, F64)).numpy()[0]
    np.testing.assert_allclose(actual, expected, rtol=1e-12)
    from_numpy = bridge(np.asarray(MU, np.float64), np.asarray(COV, np.float64)).numpy()[0]
    np.testing.assert_allclose(from_numpy, expected, rtol=1e-12)  # numpy arrays, as tensors


def test_bridge_with_zero_mean_and_isotropic_variance_is_uniform():
    """mu = 0, V = s I: the corrected variance is s (1 - 1/K), every alpha is 1/s."""
    for K, s in ((2, 0.5), (5, 3.0)):
        probs = bridge(tf.zeros((1, K), F64), s * tf.eye(K, batch_shape=[1], dtype=F64))
        np.testing.assert_allclose(probs, np.full((1, K), 1 / K), rtol=1e-12)


def test_probit_on_a_hand_case():
    """1 + pi/8 var = 4 halves the logit: softmax([2, 0] / 2) and sigmoid(2 / 2)."""
    var = np.array([[24 / math.pi, 0.0]])
    np.testing.assert_allclose(
        get_likelihood("classification").probit(tf.constant([[2.0, 0.0]], F64),
                                                 tf.constant(var, F64)),
        [[math.e / (math.e + 1), 1 / (math.e + 1)]], rtol=1e-12,
    )
    np.testing.assert_allclose(
        get_likelihood("binary").probit(tf.constant([[2.0]], F64),
                                        tf.constant(var[:, :1], F64)),
        [[1 / (1 + math.exp(-1))]], rtol=1e-12,
    )


def test_probit_is_close_to_monte_carlo():
    """Probit vs 200k Monte-Carlo samples of E[sigmoid(f)] and E[softmax(f)], f independent.

    Sigmoid: the probit approximation is accurate to ~2e-3 for variances below 1 and the
    Monte-Carlo standard error is below 0.5 / sqrt(2e5) ~ 1.1e-3, so 5e-3 holds, while doubling
    the variance or dropping it is off by more than 9e-3. Softmax: the probit (mean-field)
    approximation is rougher (~3e-2 here), so the check is loose, plus the property that it is
    closer to the truth than the plain softmax of the mean.
    """
    variance = np.diagonal(COV, axis1=1, axis2=2)
    mu = tf.constant(MU, F64)
    samples = gaussian_samples(mu, tf.linalg.diag(tf.constant(variance, F64)), 200_000, SEED)
    mc_binary = tf.reduce_mean(tf.sigmoid(samples), axis=0)
    np.testing.assert_allclose(get_likelihood("binary").probit(mu, variance), mc_binary, atol=5e-3)
    for wrong in (2 * variance, 0 * variance):
        assert np.max(np.abs(get_likelihood("binary").probit(mu, wrong) - mc_binary)) > 9e-3
    mc = tf.reduce_mean(tf.nn.softmax(samples), axis=0)
    approx = get_likelihood("classification").probit(mu, variance)
    np.testing.assert_allclose(approx, mc, atol=0.03)
    assert np.max(np.abs(approx - mc)) < np.max(np.abs(tf.nn.softmax(mu) - mc))


def test_gaussian_samples_have_the_right_moments():
    n = 100_000
    samples = gaussian_samples(tf.constant(MU, F64), tf.constant(COV, F64), n, SEED).numpy()
    assert_gaussian_moments(samples, MU, COV, k=5)


@pytest.mark.parametrize("cov", [
    np.outer([1.0, -2.0, 0.5], [1.0, -2.0, 0.5]),  # rank one
    np.zeros((3, 3)),  # a point mass (huge prior precision)
])
def test_gaussian_samples_of_a_singular_covariance(cov):
    """The jitter lets Cholesky factor PSD matrices; samples stay on the covariance's range."""
    mu = tf.constant(MU[:1], F64)
    samples = gaussian_samples(mu, tf.constant(cov[None], F64), 1000, SEED).numpy()[:, 0]
    deviation = samples - MU[0]
    _, s, vt = np.linalg.svd(cov)
    null_space = vt[s < 1e-12]
    assert np.all(np.isfinite(samples))
    assert np.max(np.abs(deviation @ null_space.T)) < 1e-6 * max(1.0, np.sqrt(cov.max()))
    if cov.any():
        assert np.std(deviation @ vt[0]) > 0.5 * np.sqrt(s[0])


def test_gaussian_samples_are_reproducible():
    mu, cov = tf.constant(MU, F64), tf.constant(COV, F64)
    first = gaussian_samples(mu, cov, 5, SEED)
    np.testing.assert_array_equal(first, gaussian_samples(mu, cov, 5, SEED))
    assert not np.allclose(first, gaussian_samples(mu, cov, 5, SEED + 1))


@pytest.mark.parametrize("link, likelihood, message", [
    ("bridge", "binary", "use one of ('probit', 'mc')"),
    ("bridge", "regression", "Gaussian in closed form"),
    ("mc", "regression", "leave link_approx at its default"),
    ("laplace", "classification", "expected one of ('probit', 'mc', 'bridge')"),
])
def test_links_that_do_not_fit_are_refused(link, likelihood, message):
    with pytest.raises(ValueError, match=r"link_approx: .*" + message.replace("(", r"\(")
                       .replace(")", r"\)")):
        get_likelihood(likelihood).check_link(link)


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
def test_bridge_of_widely_spread_logits_is_finite_and_exact(dtype):
    """``exp(mu_k) sum_j exp(-mu_j)`` overflows for logits spanning ~88 (float32) or ~709
    (float64); the Dirichlet mean is the hand formula in log space (numpy, float64)."""
    mu = np.array([[60.0, -60.0, 0.0], [400.0, -400.0, 0.0], [3.0, -2.0, 1.0]])
    if dtype == tf.float32:
        mu[1] /= 4
    V = np.stack([np.eye(3), 0.5 * np.eye(3), COV[0]])
    expected = []
    for m, v in zip(mu, V, strict=True):
        ones = np.ones(3)
        m_c = m - v @ ones * (ones @ m) / (ones @ v @ ones)
        v_c = np.diag(v) - (v @ ones) ** 2 / (ones @ v @ ones)
        log_alpha = np.logaddexp(np.log(1 / 3), m_c + np.logaddexp.reduce(-m_c) - 2 * np.log(3))
        log_alpha -= np.log(v_c)
        expected.append(np.exp(log_alpha - np.logaddexp.reduce(log_alpha)))
    actual = bridge(tf.constant(mu, dtype), tf.constant(V, dtype)).numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-5 if dtype == tf.float32 else 1e-12,
                               atol=1e-30)


def test_bridge_without_variance_is_the_softmax_of_the_mean():
    """``V = 0`` (a prior so strong, or features all 0): no uncertainty, ``softmax(mu)``."""
    mu = np.array([[1.0, -0.5, 0.2], [0.0, 0.0, 0.0]])
    probs = bridge(tf.constant(mu, F64), tf.zeros((2, 3, 3), F64)).numpy()
    np.testing.assert_allclose(probs, tf.nn.softmax(mu).numpy(), rtol=1e-12)
