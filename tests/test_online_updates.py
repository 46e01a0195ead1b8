"""Online updates ``fit(part); fit(rest, override=False)`` against one fit and brute force.

The parts have unequal sizes (Kronecker ``A`` is a mean over the rows, so equal halves would
hide a wrong weighting), the temperature is not 1 and changes between the parts, and for
regression ``sigma_noise`` changes between the parts too: the update must give the posterior
of one fit on the union at the final settings. The judge is dense float64 brute force
(:mod:`cases`): precision, log evidence and the GLM predictive.
"""

from __future__ import annotations

import cases
import numpy as np
import pytest

import laplace_tf as ltf

N, SPLIT = 7, 2  # parts of 2 and 5 examples
PRIOR = 0.7
T_FIRST, T_FINAL = 1.5, 2.0
SIGMA_FIRST, SIGMA_FINAL = 1.0, 0.6

CASES = [
    *cases.select(models=("tanh_mlp",), likelihoods=("classification", "regression")),
    *cases.select(models=("small_cnn",), likelihoods=("regression",), subsets=("all",),
                  structures=("kron",)),
    *cases.select(models=("two_input",), likelihoods=("binary",), subsets=("all",),
                  structures=("kron", "diag")),
]


def _laplace(case, model, sigma, temperature):
    return ltf.Laplace(model, case.likelihood, case.subset, case.structure,
                       prior_precision=PRIOR, temperature=temperature, batch_size=3,
                       sigma_noise=sigma, progress=False)


def _close(actual, expected, rtol=1e-9):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    np.testing.assert_allclose(actual, expected, rtol=0,
                               atol=rtol * max(np.max(np.abs(expected)), 1e-300))


@pytest.mark.parametrize("case", CASES, indirect=True)
def test_online_update_of_unequal_parts_is_one_fit_on_the_union(case):
    model, x, y = case.build(n=N)
    regression = case.likelihood == "regression"
    first_sigma, sigma = (SIGMA_FIRST, SIGMA_FINAL) if regression else (1.0, 1.0)
    la = _laplace(case, model, first_sigma, T_FIRST)
    la.fit((cases.rows(x, slice(None, SPLIT)), y[:SPLIT]))
    if regression:
        la.sigma_noise = sigma
    la.temperature = T_FINAL
    la.fit((cases.rows(x, slice(SPLIT, None)), y[SPLIT:]), override=False)

    once = _laplace(case, model, sigma, T_FINAL)
    once.fit((x, y))
    precision = cases.reference_precision(case, model, x, y, PRIOR, T_FINAL, sigma)

    _close(la.posterior_precision.to_dense(), precision)
    _close(once.posterior_precision.to_dense(), precision)
    evidence = cases.reference_log_evidence(case, model, x, y, precision, PRIOR, T_FINAL, sigma)
    _close(la.log_marginal_likelihood(), evidence)
    _close(once.log_marginal_likelihood(), evidence)
    expected = cases.reference_glm(case, model, x, precision, sigma)
    for fitted in (la, once):
        predicted = fitted(x)
        if regression:
            _close(predicted[0], expected[0])
            _close(predicted[1], expected[1])
        else:
            _close(predicted, expected)
