"""The positive-definiteness check of ``H / T + diag(prior)`` with an indefinite exact Hessian.

An untrained network is not at a minimum: its exact Hessian (``curvature="hessian"``) has
negative eigenvalues. Whether the precision is positive definite is decided here by numpy on
the brute-force Hessian (:func:`laplace_tf.testing.brute_force_hessian` of the NLL written in
:mod:`cases`) for scalar, per-layer and per-weight priors; ``fit``, the prior setter and the
evidence must accept exactly the priors numpy accepts, and ``on_indefinite="clip"`` must give
the brute-force matrix with its negative eigenvalues set to zero.
"""

from __future__ import annotations

import cases
import numpy as np
import pytest
import tensorflow as tf

import laplace_tf as ltf
from laplace_tf import testing

T = 1.5
SIGMA = 0.8
CASES = cases.select(models=("tanh_mlp",), likelihoods=("regression", "classification"),
                     subsets=("all",), structures=("full",), seed=4)


def _setting(case):
    """``(model, x, y, sigma, H)``: the untrained model, its data and brute-force Hessian."""
    model, x, y = case.build(n=6)
    sigma = SIGMA if case.likelihood == "regression" else 1.0
    hessian = testing.brute_force_hessian(testing.subset_of(model),
                                          cases.ReferenceNLL(case.likelihood, sigma),
                                          tf.constant(x), y)
    assert np.linalg.eigvalsh(hessian)[0] < -1e-3, "the Hessian should be indefinite"
    return model, x, y, sigma, hessian


def _laplace(case, model, sigma, prior, **options):
    return ltf.Laplace(model, case.likelihood, "all", "full", curvature="hessian",
                       prior_precision=prior, temperature=T, sigma_noise=sigma,
                       progress=False, **options)


def _priors(case, model, hessian):
    """Per-layer and per-weight priors on both sides of positive definiteness, each with the
    smallest eigenvalue of the brute-force precision ``H / T + diag(prior)``."""
    lowest = -np.linalg.eigvalsh(hessian / T)[0]
    n_params = hessian.shape[0]
    weights = np.random.default_rng(0).uniform(0.5, 1.5, n_params)
    candidates = [
        [1e-3, 1e-3], [3 * lowest, 1e-3], [1e-3, 3 * lowest], [3 * lowest, 3 * lowest],
        [3 * lowest, 0.6 * lowest], [0.6 * lowest, 3 * lowest],
        0.3 * lowest * weights, 3 * lowest * weights,
    ]
    out = []
    for prior in candidates:
        diagonal = cases.prior_diagonal(case, model, prior)
        smallest = np.linalg.eigvalsh(hessian / T + np.diag(diagonal))[0]
        assert abs(smallest) > 1e-6 * lowest, "too close to the boundary to judge"
        out.append((np.asarray(prior), diagonal, smallest))
    return out


@pytest.mark.parametrize("case", CASES, indirect=True)
def test_fit_accepts_exactly_the_positive_definite_priors(case):
    model, x, y, sigma, hessian = _setting(case)
    priors = _priors(case, model, hessian)[-4:]  # uneven per layer, and per weight
    assert {smallest > 0 for *_, smallest in priors} == {True, False}
    for prior, diagonal, smallest in priors:
        la = _laplace(case, model, sigma, prior)
        if smallest > 0:
            la.fit((x, y))
            np.testing.assert_allclose(la.posterior_precision.to_dense(),
                                       hessian / T + np.diag(diagonal), rtol=0, atol=1e-10)
        else:
            with pytest.raises(ValueError, match="not positive definite"):
                la.fit((x, y))


@pytest.mark.parametrize("case", CASES, indirect=True)
def test_prior_setter_and_evidence_refuse_exactly_the_indefinite_priors(case):
    model, x, y, sigma, hessian = _setting(case)
    priors = _priors(case, model, hessian)
    safe = max(priors, key=lambda p: p[2])
    la = _laplace(case, model, sigma, safe[0])
    la.fit((x, y))
    for prior, _, smallest in priors:
        if smallest > 0:
            assert np.isfinite(float(la.log_marginal_likelihood(prior_precision=prior)))
            la.prior_precision = prior
            np.testing.assert_allclose(la.prior_precision, prior)
            la.prior_precision = safe[0]
            continue
        with pytest.raises(ValueError, match="not positive definite"):
            la.log_marginal_likelihood(prior_precision=prior)
        with pytest.raises(ValueError, match="not positive definite"):
            la.prior_precision = prior
        np.testing.assert_allclose(la.prior_precision, safe[0])  # unchanged


@pytest.mark.parametrize("case", CASES, indirect=True)
def test_raise_refuses_and_clip_gives_the_clipped_brute_force_matrix(case):
    model, x, y, sigma, hessian = _setting(case)
    prior = 1e-3 * np.random.default_rng(1).uniform(0.5, 1.5, hessian.shape[0])  # per weight
    with pytest.raises(ValueError, match="not positive definite"):
        _laplace(case, model, sigma, prior).fit((x, y))
    la = _laplace(case, model, sigma, prior, on_indefinite="clip")
    with pytest.warns(UserWarning, match="clipped"):
        la.fit((x, y))
    e, Q = np.linalg.eigh(hessian)
    expected = Q @ np.diag(np.maximum(e, 0)) @ Q.T / T + np.diag(prior)
    np.testing.assert_allclose(la.posterior_precision.to_dense(), expected, rtol=0, atol=1e-9)
