"""``optimize_prior_precision(method="gridsearch")`` for ``"binary"``, against an independent
validation NLL: the probit GLM predictive from the brute-force precision at every grid value
(:mod:`cases`), scored by the Bernoulli NLL written out here.
"""

from __future__ import annotations

import cases
import numpy as np
import pytest

import laplace_tf as ltf

GRID = np.logspace(-2, 2, 5)
TRAIN, VAL = slice(0, 8), slice(8, 16)


def _overconfident_binary(case):
    """The case's model with its last kernel scaled by 3 (overconfident) and labels that
    follow its sign with a quarter flipped: a prior between the grid's ends predicts best for
    the all-weights case (the validation NLL is not monotone in the prior there)."""
    model, x, _ = case.build(n=16)
    model.layers[-1].kernel.assign(model.layers[-1].kernel * 3.0)
    logits = np.asarray(model(x))[:, 0]
    flips = np.random.default_rng(case.seed).uniform(size=16) < 0.25
    return model, x, ((logits > 0) ^ flips).astype(np.float64)


def _reference_val_nll(case, model, x, y, prior) -> float:
    precision = cases.reference_precision(case, model, cases.rows(x, TRAIN), y[TRAIN], prior)
    p = cases.reference_glm(case, model, cases.rows(x, VAL), precision)[:, 0]
    t = y[VAL]
    return float(-np.mean(t * np.log(p) + (1 - t) * np.log1p(-p)))


@pytest.mark.parametrize("case", [
    *cases.select(models=("tanh_mlp",), likelihoods=("binary",), subsets=("all",),
                  structures=("full",)),
    *cases.select(models=("tanh_mlp",), likelihoods=("binary",), subsets=("last_layer",),
                  structures=("kron",)),
], indirect=True)
def test_binary_gridsearch_picks_the_argmin_of_the_validation_nll(case):
    model, x, y = _overconfident_binary(case)
    expected = np.array([_reference_val_nll(case, model, x, y, lam) for lam in GRID])
    best = int(np.argmin(expected))
    assert np.partition(expected, 1)[1] - expected[best] > 1e-3  # a clear winner
    if case.subset == "all":
        assert 0 < best < len(GRID) - 1  # neither end of the grid

    la = ltf.Laplace(model, "binary", case.subset, case.structure, prior_precision=7.0,
                     progress=False)
    la.fit((cases.rows(x, TRAIN), y[TRAIN]))
    result = la.optimize_prior_precision(method="gridsearch", grid=GRID, progress=False,
                                         val_data=(cases.rows(x, VAL), y[VAL]))
    assert float(result["prior_precision"]) == float(la.prior_precision) == GRID[best]
    np.testing.assert_allclose(la.tuning_trace["val_nll"], expected, rtol=1e-10)
