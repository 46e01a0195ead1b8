"""Last-layer GLM samples drawn in weight space have the law N(f(theta*), J Sigma J^T).

``J Sigma J^T`` is the brute-force reference of :mod:`cases` (explicit Jacobians, the numpy
inverse of the brute-force precision), not the posterior under test.
"""

from __future__ import annotations

import cases
import numpy as np
import pytest
from models import tanh_mlp, targets
from scipy import special

import laplace_tf as ltf
from laplace_tf import testing


def _fitted(likelihood: str, structure: str, n_outputs: int):
    """The fitted Laplace, its inputs, and the brute-force ``(f(x), J Sigma J^T)``."""
    model, x = tanh_mlp(n_outputs, n=10)
    y = targets(likelihood, n_outputs, len(x))
    sigma = 0.4 if likelihood == "regression" else 1.0
    la = ltf.Laplace(model, likelihood, subset_of_weights="last_layer",
                     hessian_structure=structure, prior_precision=0.5,
                     sigma_noise=sigma, progress=False)
    la.fit((x, y))
    case = cases.Case("tanh_mlp", likelihood, "last_layer", structure)
    precision = cases.reference_precision(case, model, x, y, 0.5, sigma=sigma)
    return la, x, cases.reference_functional_variance(case, model, x, precision)


@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
def test_samples_have_the_glm_moments(structure):
    la, x, (mean, variance) = _fitted("regression", structure, 3)
    samples = la.predictive_samples(x, n_samples=20000, seed=3, batch_size=4)
    testing.assert_gaussian_moments(samples, mean, variance)


@pytest.mark.parametrize("structure", ["kron", "full"])
def test_mc_link_agrees_with_explicit_gaussian_samples(structure):
    """E[softmax(f)], f ~ N(mu_n, V_n): weight-space samples against numpy draws of each
    input's Gaussian (V_n brute force), within 5 standard errors."""
    la, x, (mu, covariance) = _fitted("classification", structure, 4)
    n = 20000
    got = la(x, link_approx="mc", n_samples=n, seed=5).numpy()
    assert np.allclose(special.softmax(mu, -1), la.map_predict(x).numpy())
    rng = np.random.default_rng(0)
    for i in range(len(x)):
        draws = special.softmax(rng.multivariate_normal(mu[i], covariance[i], size=n), -1)
        se = np.sqrt(2 * draws.var(0) / n)  # both estimates have about this variance
        assert np.all(np.abs(got[i] - draws.mean(0)) < 5 * se + 1e-12), i


def test_mc_draws_are_reproducible_and_independent_of_the_batch_size():
    la, x, _ = _fitted("classification", "kron", 3)
    first = la(x, link_approx="mc", n_samples=50, seed=1, batch_size=3)
    np.testing.assert_allclose(first, la(x, link_approx="mc", n_samples=50, seed=1, batch_size=7),
                               rtol=1e-12)
    assert not np.allclose(first, la(x, link_approx="mc", n_samples=50, seed=2))
