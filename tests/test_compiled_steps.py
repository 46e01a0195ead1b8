"""Compiled steps shared by the posteriors of one model: traced once, never stale.

A second ``Laplace`` of the same model, weight subset and settings, and a refit of the same
one, reuse the compiled fit and predictive steps (their tracing counts do not grow); the
posterior's own state (prior, curvature, mean, the weights at the refit) still reaches them as
inputs: the numbers match dense float64 brute force (:mod:`cases`) at the second posterior's
settings and at the new weights.
"""

from __future__ import annotations

import gc
import weakref

import cases
import keras
import numpy as np
import pytest

import laplace_tf as ltf

CASES = cases.table(("tanh_mlp", "classification", "all", "kron"),
                    ("tanh_mlp", "regression", "last_layer", "diag"))


def _traces(la) -> dict:
    """Tracing counts of the posterior's compiled fit step and predictive steps."""
    steps = {"fit": la._builder()._compiled_step}
    steps.update({key: step for key, step in la._shared_steps().items()
                  if isinstance(key, tuple) and key[0] == "glm"})
    return {key: step.experimental_get_tracing_count() for key, step in steps.items()}


@pytest.mark.parametrize("case", CASES, indirect=True)
def test_second_posterior_and_refit_reuse_the_traces_with_their_own_state(case):
    model, x, y = case.build(n=7)
    first = ltf.Laplace(model, case.likelihood, case.subset, case.structure,
                        prior_precision=0.5, batch_size=4, progress=False)
    first.fit((x, y))
    first(x)
    traces = _traces(first)

    second = ltf.Laplace(model, case.likelihood, case.subset, case.structure,
                         prior_precision=2.0, batch_size=4, progress=False)
    second.fit((x[:5], y[:5]))
    for v in model.trainable_variables:  # new weights: the refit must see them
        v.assign(v * 0.9)
    second.fit((x, y))
    predicted = second(x)

    assert _traces(second) == traces
    precision = cases.reference_precision(case, model, x, y, prior=2.0)
    np.testing.assert_allclose(second.posterior_precision.to_dense(), precision,
                               rtol=1e-9, atol=1e-12)
    expected = cases.reference_glm(case, model, x, precision)
    if case.likelihood != "regression":
        predicted, expected = (predicted,), (expected,)
    for got, want in zip(predicted, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case", CASES, indirect=True)
def test_every_batch_size_and_predictive_share_one_linearisation_trace(case):
    """Batches of 3, 3 and 1 (a short last one) trace each predictive step once, and the
    functional variance after ``la(x)`` reuses the linearisation (the costly trace: the
    per-example Jacobians); both equal dense float64 brute force."""
    model, x, y = case.build(n=7)
    la = ltf.Laplace(model, case.likelihood, case.subset, case.structure, prior_precision=0.5,
                     progress=False)
    la.fit((x, y))
    predicted = la(x, batch_size=3)
    variance = la.functional_variance(x, batch_size=4)

    steps = {key[:3]: step.experimental_get_tracing_count()
             for key, step in la._shared_steps().items()
             if isinstance(key, tuple) and key[0] in ("linearise", "glm")}
    assert sorted(steps.values()) == [1, 1, 1] and len({k[0] for k in steps}) == 2, steps
    precision = cases.reference_precision(case, model, x, y, prior=0.5)
    expected = cases.reference_glm(case, model, x, precision)
    if case.likelihood != "regression":
        predicted, expected = (predicted,), (expected,)
    for got, want in zip(predicted, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(variance, cases.reference_functional_variance(
        case, model, x, precision)[1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case", cases.table(("tanh_mlp", "classification", "all", "kron"),
                                             ("small_cnn", "regression", "all", "diag")),
                         indirect=True)
def test_gridsearch_linearises_each_validation_batch_once(case):
    """The grid's validation NLL equals brute force at every value, and the Jacobians of
    each validation batch are computed once for the whole grid (not once per value); the
    whole grid is one compiled call, traced once for any grid (a second search traces
    nothing), whose evidence is ``la.log_marginal_likelihood`` at each value."""
    grid = np.array([0.3, 3.0, 30.0])
    model, x, y = case.build(n=12)
    train, val = slice(0, 6), slice(6, 12)
    la = ltf.Laplace(model, case.likelihood, case.subset, case.structure, batch_size=4,
                     progress=False)
    la.fit((cases.rows(x, train), y[train]))
    linearised = []
    over_batches = la._over_batches
    la._over_batches = lambda *args: linearised.append(1) or over_batches(*args)
    la.optimize_prior_precision(method="gridsearch", grid=grid, progress=False,
                                val_data=(cases.rows(x, val), y[val]))
    assert len(linearised) == 2  # 6 validation inputs in batches of 4

    expected = []
    for prior in grid:
        precision = cases.reference_precision(case, model, cases.rows(x, train), y[train], prior)
        predicted = cases.reference_glm(case, model, cases.rows(x, val), precision)
        if case.likelihood == "regression":
            mean, var = predicted
            nll = 0.5 * np.sum((y[val] - mean) ** 2 / var + np.log(2 * np.pi * var), axis=1)
        else:
            nll = -np.log(predicted[np.arange(6), y[val]])
        expected.append(np.mean(nll))
    np.testing.assert_allclose(la.tuning_trace["val_nll"], expected, rtol=1e-9)

    la.optimize_prior_precision(method="gridsearch", grid=grid[:2] * 2, progress=False,
                                val_data=(cases.rows(x, val), y[val]))
    compiled = [f for key, f in la._tuners.items() if key[0] == "gridsearch"]
    assert len(compiled) == 1  # one concrete function: calls with other grids trace nothing
    evidence = [float(la.log_marginal_likelihood(prior)) for prior in grid[:2] * 2]
    np.testing.assert_allclose(la.tuning_trace["log_marginal_likelihood"], evidence, rtol=1e-10)


@pytest.mark.parametrize("structure", ["kron", "full"])
def test_a_model_whose_steps_are_shared_is_freed_with_its_last_reference(structure):
    """The shared steps hold the model, so they live with it, not beside it in a global
    cache: once the user drops the model and its posterior, the model is garbage."""

    def fitted_and_used():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        x = np.random.default_rng(0).normal(size=(20, 4)).astype("float32")
        la = ltf.Laplace(model, "classification", "all", structure, progress=False)
        la.fit((x, np.arange(20) % 3))
        la(x)
        la.optimize_prior_precision(method="marglik", progress=False)
        assert la._shared_steps()  # the steps are cached for the model
        return weakref.ref(model)

    model = fitted_and_used()
    gc.collect()
    assert model() is None
