"""Regression predictive standard deviations and central intervals, against la(x)'s moments."""

from __future__ import annotations

import numpy as np
import pytest
from models import tanh_mlp, targets
from scipy import stats

import laplace_tf as ltf
from laplace_tf.posterior.laplace import NotFittedError


def _fitted(likelihood: str = "regression", n_outputs: int = 2):
    model, x = tanh_mlp(n_outputs, n=12)
    la = ltf.Laplace(model, likelihood, hessian_structure="kron", prior_precision=2.0,
                     sigma_noise=[0.3, 0.7] if likelihood == "regression" else 1.0,
                     progress=False)
    la.fit((x, targets(likelihood, n_outputs, len(x))))
    return la, x


def test_std_and_interval_follow_the_gaussian_predictive():
    la, x = _fitted()
    mean, var = (v.numpy() for v in la(x, batch_size=5))
    std = la.predictive_std(x).numpy()
    np.testing.assert_allclose(std, np.sqrt(var), rtol=1e-14)
    assert np.all(std > np.array([0.3, 0.7]))  # the noise, and the weights' share on top
    for level in (0.5, 0.95, 0.999):
        lower, upper = (v.numpy() for v in la.predictive_interval(x, level=level, batch_size=5))
        np.testing.assert_allclose(0.5 * (lower + upper), mean, rtol=1e-12, atol=1e-14)
        mass = stats.norm.cdf(upper, mean, std) - stats.norm.cdf(lower, mean, std)
        np.testing.assert_allclose(mass, level, rtol=1e-10)
    nn_var = la(x, pred_type="nn", n_samples=20, seed=1)[1].numpy()
    np.testing.assert_allclose(la.predictive_std(x, pred_type="nn", n_samples=20, seed=1),
                               np.sqrt(nn_var), rtol=1e-14)


@pytest.mark.parametrize("likelihood", ["classification", "binary"])
def test_classification_is_refused(likelihood):
    la, x = _fitted(likelihood, 3 if likelihood == "classification" else 1)
    for method in (la.predictive_std, la.predictive_interval):
        with pytest.raises(ValueError, match="only for likelihood='regression'"):
            method(x)


@pytest.mark.parametrize("level", [0.0, 1.0, 95, -0.5, True, "0.95", float("nan")])
def test_bad_levels_are_refused(level):
    la, x = _fitted()
    with pytest.raises(ValueError, match="level: expected the interval's probability"):
        la.predictive_interval(x, level=level)


def test_needs_a_fit():
    model, x = tanh_mlp(2, n=4)
    la = ltf.Laplace(model, "regression", progress=False)
    with pytest.raises(NotFittedError, match="predictive_interval: the posterior is not fitted"):
        la.predictive_interval(x)
