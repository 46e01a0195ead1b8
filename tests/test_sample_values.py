"""Values drawn from the posterior: the ``nn`` regression predictive with ``sigma_noise != 1``
and float32 weight samples, against references computed here.

* ``la(x, pred_type="nn")`` for regression is the mean and variance (plus ``sigma^2``) of the
  network run with the weight samples ``la.sample(n, seed)``: here each sample is written into
  a clone of the Keras model and the clone is called, one sample at a time.
* A float32 posterior's samples have the mean and covariance of the float64 brute-force
  posterior (:mod:`cases`), within 5 standard errors of 20 000 samples (0.035 standard
  deviations for a mean; float32 round-off, ~1e-7 relative, is far below that).
"""

from __future__ import annotations

import cases
import keras
import numpy as np
import pytest

import laplace_tf as ltf
from laplace_tf import testing


def _weights_of(case, model):
    return model.layers[-1].trainable_variables if case.subset == "last_layer" \
        else model.trainable_variables


def _run_with(case, model, theta, x) -> np.ndarray:
    """The Keras model with the case's weights set to the flat ``theta`` (row-major, in
    ``trainable_variables`` order), called on ``x``."""
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    offset = 0
    for variable in _weights_of(case, clone):
        size = int(np.prod(variable.shape))
        variable.assign(np.reshape(theta[offset:offset + size], variable.shape))
        offset += size
    assert offset == len(theta)
    return np.asarray(clone(x))


@pytest.mark.parametrize("sigma", [0.6, [0.5, 2.0]])
@pytest.mark.parametrize("case", [
    *cases.select(models=("tanh_mlp",), likelihoods=("regression",), subsets=("all",),
                  structures=("kron", "diag")),
    *cases.select(models=("tanh_mlp",), likelihoods=("regression",), subsets=("last_layer",),
                  structures=("full",)),
], indirect=True)
def test_nn_regression_predictive_is_the_sampled_networks_plus_noise(case, sigma):
    model, x, y = case.build(n=6)
    la = ltf.Laplace(model, "regression", case.subset, case.structure, prior_precision=2.0,
                     sigma_noise=sigma, progress=False)
    la.fit((x, y))
    n = 9
    thetas = np.asarray(la.sample(n, seed=4))
    outputs = np.stack([_run_with(case, model, theta, x) for theta in thetas])
    assert np.ptp(outputs, axis=0).min() > 1e-3  # the samples differ
    mean, var = la(x, pred_type="nn", n_samples=n, seed=4, batch_size=4)
    np.testing.assert_allclose(mean, outputs.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(var, outputs.var(0) + np.square(sigma), rtol=1e-10)


def _float32_twin(model):
    twin = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, "tanh"),
                             keras.layers.Dense(model.layers[-1].units)])
    twin.set_weights([w.astype(np.float32) for w in model.get_weights()])
    return twin


@pytest.mark.parametrize("case", [
    *cases.select(models=("tanh_mlp",), likelihoods=("classification",), subsets=("all",)),
    *cases.select(models=("tanh_mlp",), likelihoods=("regression",), subsets=("last_layer",),
                  structures=("kron",)),
], indirect=True)
def test_float32_samples_have_the_brute_force_moments(case):
    model, x, y = case.build(n=8)
    prior = 2.0
    precision = cases.reference_precision(case, model, x, y, prior)
    theta = np.concatenate([np.ravel(w.numpy()) for w in _weights_of(case, model)])
    la = ltf.Laplace(_float32_twin(model), case.likelihood, case.subset, case.structure,
                     prior_precision=prior, progress=False)
    la.fit((x.astype(np.float32), y))
    samples = la.sample(20_000, seed=7)
    assert samples.dtype == np.float32
    testing.assert_gaussian_moments(np.asarray(samples)[:, None, :], theta[None],
                                    np.linalg.inv(precision)[None], k=5)


@pytest.mark.parametrize("case", cases.select(models=("tanh_mlp",), likelihoods=("binary",),
                                              subsets=("all",), structures=("kron", "full")),
                         indirect=True)
def test_samples_are_compiled_once_per_posterior_state(case):
    """``sample`` is one compiled draw of the posterior distribution per fitted state: any
    ``n`` and seed reuse it, a new prior precision builds a new one, and its values are the
    distribution's own (eager TensorFlow Probability, same stateless seed; the compiled draw
    applies the scale to all samples in one product, up to round-off the same numbers)."""
    model, x, y = case.build(n=8)
    la = ltf.Laplace(model, case.likelihood, case.subset, case.structure, progress=False)
    la.fit((x, y))
    for prior in (1.0, 3.0):
        la.prior_precision = prior
        first, second = la.sample(5, seed=3), la.sample(9, seed=4)
        assert la._cache["draw"].experimental_get_tracing_count() == 1
        for drawn, n, seed in ((first, 5, 3), (second, 9, 4)):
            eager = la.posterior.sample(n, seed=ltf.posterior.laplace.stateless_seed(seed))
            np.testing.assert_allclose(drawn, eager, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(np.std(np.asarray(la.sample(4000, seed=1)), axis=0),
                                   np.asarray(la.posterior.stddev()), rtol=0.1)
