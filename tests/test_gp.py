"""The functional (GP) Laplace, ``hessian_structure="gp"``, against brute force in float64.

The judge: the dense GGN ``sum_n J_n^T Lambda_n J_n`` over the context examples
(``testing.brute_force_ggn``: explicit Jacobians and output Hessians), the precision
``c GGN + lambda I`` inverted by numpy, and ``J Sigma J^T`` from explicit Jacobians; the
context is the documented rule computed here, not by the code under test. With all the
training data as context the GP is the full GGN Laplace, in predictive and evidence.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy.special import log_softmax

from laplace_tf import Laplace, load, testing
from laplace_tf.likelihoods import get_likelihood

EXACT = 1e-9  # relative, for identities that hold up to float64 round-off
K = {"classification": 3, "regression": 2, "binary": 1}


def mlp(n_outputs: int) -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((3,), dtype="float64"),
        keras.layers.Dense(4, activation="tanh", dtype="float64"),
        keras.layers.Dense(n_outputs, dtype="float64"),
    ])


def data(likelihood: str, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    if likelihood == "regression":
        return x, rng.normal(size=(n, K[likelihood]))
    return x, rng.integers(0, max(K[likelihood], 2), size=n)


def chosen(n: int, n_context: int, seed: int, weights=None) -> np.ndarray:
    """The documented context: the ``n_context`` smallest of ``default_rng(seed).random(n)``
    among examples of positive weight, in data order."""
    priorities = np.random.default_rng(seed).random(n)
    if weights is not None:
        priorities[np.asarray(weights) == 0] = np.inf
    return np.sort(np.argsort(priorities)[:n_context])


def assert_close(actual, expected, rtol=EXACT):
    actual, expected = np.asarray(actual), np.asarray(expected)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * np.max(np.abs(expected)))


def brute_force_variance(la, x_context, y_context, x_test, prior, c) -> np.ndarray:
    """``J Sigma J^T [N, K, K]`` with ``Sigma = (c GGN(context) + prior I)^-1``, dense."""
    likelihood = get_likelihood(la.likelihood_name, np.asarray(la.sigma_noise))
    targets = likelihood.prepare_targets(y_context, K[la.likelihood_name], tf.float64)
    ggn = testing.brute_force_ggn(la.logit_model, likelihood, x_context, targets)
    covariance = np.linalg.inv(c * ggn + prior * np.eye(la.n_params))
    return testing.dense_functional_variance(
        testing.brute_force_jacobians(la.logit_model, x_test), covariance)


def laplace(likelihood, structure, model, **kwargs) -> Laplace:
    return Laplace(model, likelihood, "all", structure, progress=False, **kwargs)


@pytest.mark.parametrize("likelihood, n, settings", [
    ("classification", 14, dict(prior_precision=0.5, temperature=2.0)),  # 42 rows > 31 weights
    ("binary", 10, dict(prior_precision=2.0)),
    ("regression", 10, dict(prior_precision=0.5, sigma_noise=0.7, temperature=0.5)),
])
def test_all_data_as_context_is_the_full_ggn_laplace(likelihood, n, settings):
    model = mlp(K[likelihood])
    x, y = data(likelihood, n)
    x_test = data(likelihood, 4, seed=1)[0]
    gp, full = laplace(likelihood, "gp", model, **settings), laplace(likelihood, "full", model, **settings)
    gp.fit((x, y), batch_size=3)
    full.fit((x, y))
    assert gp.curvature.blocks[0].rank == min(n * K[likelihood], gp.n_params)
    c = 1.0 / settings.get("temperature", 1.0)
    assert_close(gp.functional_variance(x_test),
                 brute_force_variance(gp, x, y, x_test, settings["prior_precision"], c))
    for ours, theirs in zip(tf.nest.flatten(gp(x_test)), tf.nest.flatten(full(x_test)), strict=True):
        assert_close(ours, theirs)
    assert_close(gp.log_marginal_likelihood(), full.log_marginal_likelihood())
    sigma = 0.4 if likelihood == "regression" else None  # a new noise rescales the curvature
    assert_close(gp.log_marginal_likelihood(0.3, sigma), full.log_marginal_likelihood(0.3, sigma))


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_marglik_tuning_matches_the_full_ggn_laplace(likelihood):
    model = mlp(K[likelihood])
    x, y = data(likelihood, 12)
    tuned = []
    for structure in ("gp", "full"):
        la = laplace(likelihood, structure, model)
        la.fit((x, y))
        la.optimize_prior_precision(method="marglik", n_steps=30, progress=False)
        tuned.append((la.prior_precision.numpy(), la.sigma_noise.numpy()))
    assert tuned[0][0] != 1.0
    np.testing.assert_allclose(tuned[0][0], tuned[1][0], rtol=1e-7)
    np.testing.assert_allclose(tuned[0][1], tuned[1][1], rtol=1e-7)


def test_context_subset_is_the_ggn_of_the_chosen_examples_with_all_data_in_the_evidence():
    model = mlp(3)
    x, y = data("classification", 12)
    x_test = data("classification", 4, seed=1)[0]
    gp = laplace("classification", "gp", model, n_context=5, seed=3, temperature=2.0)
    gp.fit((x, y), batch_size=4)
    idx = chosen(12, 5, seed=3)
    assert_close(gp.functional_variance(x_test),
                 brute_force_variance(gp, x[idx], y[idx], x_test, 1.0, 0.5))
    subset = laplace("classification", "full", model, temperature=2.0)
    subset.fit((x[idx], y[idx]))
    log_probs = log_softmax(model(x).numpy(), axis=1)
    nll_all = -log_probs[np.arange(12), y].sum()
    nll_subset = -log_probs[idx, y[idx]].sum()
    assert_close(gp.log_marginal_likelihood(),
                 subset.log_marginal_likelihood() - (nll_all - nll_subset) / 2.0)
    assert gp.curvature.n_data == 12


def test_regression_context_subset_with_noise():
    model = mlp(2)
    x, y = data("regression", 9)
    gp = laplace("regression", "gp", model, n_context=4, seed=0, sigma_noise=0.6)
    gp.fit((x, y), batch_size=2)
    idx = chosen(9, 4, seed=0)
    gp.sigma_noise = 0.9  # the context's GGN rescales as (0.6 / 0.9)^2
    assert_close(gp.functional_variance(x),
                 brute_force_variance(gp, x[idx], y[idx], x, 1.0, 1.0))


def _root_gram(la) -> np.ndarray:
    root = la.curvature.blocks[0].root.numpy()
    return root.T @ root


def test_context_choice_is_seeded_and_independent_of_batching():
    model = mlp(3)
    x, y = data("classification", 15)
    grams = []
    for source in [(x, y), (x, y), tf.data.Dataset.from_tensor_slices((x, y)).batch(4)]:
        la = laplace("classification", "gp", model, n_context=6, seed=7)
        la.fit(source, batch_size=2 + 3 * len(grams))  # batch sizes 2 and 5 for the arrays
        grams.append(_root_gram(la))
    likelihood = get_likelihood("classification")
    idx = chosen(15, 6, seed=7)
    reference = testing.brute_force_ggn(la.logit_model, likelihood, x[idx],
                                        likelihood.prepare_targets(y[idx], 3, tf.float64))
    for gram in grams:
        assert_close(gram, reference)
    other = laplace("classification", "gp", model, n_context=6, seed=8)
    other.fit((x, y))
    assert not np.allclose(_root_gram(other), reference)
    default = laplace("classification", "gp", model, n_context=6)  # seed 0
    default.fit((x, y))
    idx = chosen(15, 6, seed=0)
    assert_close(_root_gram(default), testing.brute_force_ggn(
        la.logit_model, likelihood, x[idx], likelihood.prepare_targets(y[idx], 3, tf.float64)))


def test_examples_of_weight_zero_are_never_context():
    model = mlp(3)
    x, y = data("classification", 10)
    w = np.array([0.0, 2.0, 1.0, 0.0, 0.0, 1.0, 3.0, 0.0, 1.0, 0.5])
    la = laplace("classification", "gp", model, n_context=4, seed=2)
    la.fit((x, y), sample_weight=w, batch_size=3)
    idx = chosen(10, 4, seed=2, weights=w)
    likelihood = get_likelihood("classification")
    targets = likelihood.prepare_targets(y, 3, tf.float64)
    J = testing.brute_force_jacobians(la.logit_model, x)
    hessians = testing.brute_force_output_hessians(likelihood, model(x), targets)
    reference = sum(w[n] * J[n].T @ hessians[n] @ J[n] for n in idx)
    assert_close(_root_gram(la), reference)
    assert la.curvature.blocks[0].rank == 4 * 3


def test_last_layer_gp_is_the_full_last_layer_laplace():
    model = mlp(3)
    x, y = data("classification", 8)
    gp = Laplace(model, "classification", "last_layer", "gp", progress=False)
    full = Laplace(model, "classification", "last_layer", "full", progress=False)
    gp.fit((x, y))
    full.fit((x, y))
    assert_close(gp.functional_variance(x), full.functional_variance(x))
    assert_close(gp.log_marginal_likelihood(), full.log_marginal_likelihood())


def test_save_load_round_trip(tmp_path):
    model = mlp(2)
    x, y = data("regression", 8)
    la = laplace("regression", "gp", model, n_context=5, seed=1, sigma_noise=0.5,
                 prior_precision=2.0)
    la.fit((x, y))
    la.save(tmp_path / "gp.npz")
    loaded = load(tmp_path / "gp.npz", model)
    assert (loaded.hessian_structure, loaded.n_context, loaded.seed) == ("gp", 5, 1)
    assert_close(loaded.functional_variance(x), la.functional_variance(x))
    assert_close(loaded.log_marginal_likelihood(), la.log_marginal_likelihood())


def test_samples_have_the_posterior_moments():
    model = mlp(2)
    x, y = data("regression", 6)
    la = laplace("regression", "gp", model, n_context=3, seed=0, prior_precision=3.0)
    la.fit((x, y))
    idx = chosen(6, 3, seed=0)
    likelihood = get_likelihood("regression")
    ggn = testing.brute_force_ggn(la.logit_model, likelihood, x[idx], tf.constant(y[idx]))
    covariance = np.linalg.inv(ggn + 3.0 * np.eye(la.n_params))
    samples = la.sample(20000, seed=0).numpy()
    np.testing.assert_array_equal(samples, la.sample(20000, seed=0).numpy())
    testing.assert_gaussian_moments(samples[:, None], la.mean.numpy()[None], covariance[None])


def test_memory_estimate_counts_the_context_rows():
    model = mlp(3)
    la = laplace("classification", "gp", model, n_context=7)
    estimate = la.memory_estimate()
    rows, p = 7 * 3, la.n_params
    assert estimate.parts["curvature"] == rows * p * 8
    assert estimate.parts["factor"] == (rows * p + rows * rows) * 8
    x, y = data("classification", 20)
    small = laplace("classification", "gp", model, memory_limit_bytes=rows * p * 8)
    with pytest.raises(ValueError, match="n_context"):
        small.fit((x, y))  # all 20 examples: 60 rows
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)  # size unknown up front
    with pytest.raises(ValueError, match="smaller n_context"):
        small.fit(dataset)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(hessian_structure="full", n_context=5), ValueError, "n_context: only used"),
    (dict(hessian_structure="gp", n_context=0), ValueError, "n_context"),
    (dict(hessian_structure="gp", n_context=2.5), TypeError, "n_context"),
    (dict(hessian_structure="gp", curvature="ef"), ValueError, "curvature='ggn'"),
    (dict(hessian_structure="gp", curvature="hessian"), ValueError, "curvature"),
    (dict(hessian_structure="gp", likelihood="regression", sigma_noise=[1.0, 2.0]), ValueError,
     "scalar sigma_noise"),
])
def test_bad_arguments_are_refused(kwargs, error, match):
    arguments = dict(likelihood="classification", subset_of_weights="all") | kwargs
    with pytest.raises(error, match=match):
        Laplace(mlp(2), progress=False, **arguments)


def test_calibration_report_of_all_data_as_context_is_that_of_the_full_laplace():
    from laplace_tf import calibration

    model = mlp(3)
    x, y = data("classification", 12)
    x_test, y_test = data("classification", 8, seed=1)
    metrics = []
    for structure in ("gp", "full"):
        la = laplace("classification", structure, model, prior_precision=0.2)
        la.fit((x, y))
        metrics.append(calibration.report(la, test=(x_test, y_test)).metrics)
    assert metrics[0]["config"]["hessian_structure"] == "gp"
    assert metrics[0]["test"]["laplace"] == pytest.approx(metrics[1]["test"]["laplace"], rel=1e-9)


def test_online_update_adds_the_new_data_to_the_context():
    model = mlp(3)
    x, y = data("classification", 16)
    gp, full = laplace("classification", "gp", model), laplace("classification", "full", model)
    for la in (gp, full):
        la.fit((x[:6], y[:6]))
        for part in (slice(6, 11), slice(11, 16)):
            la.fit((x[part], y[part]), override=False)
    assert gp.curvature.n_data == 16
    assert gp.curvature.blocks[0].root.shape[0] <= gp.n_params  # stays within P rows
    assert_close(gp.functional_variance(x), full.functional_variance(x))
    assert_close(gp.log_marginal_likelihood(), full.log_marginal_likelihood())
