"""A per-output regression sigma_noise on last-layer posteriors: evidence, rescaled curvature
and marglik tuning against brute force (dense curvature from explicit Jacobians)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import optimize, stats

import laplace_tf as ltf
from laplace_tf import testing
from laplace_tf.blocks import blocks_to_dense
from laplace_tf.likelihoods import get_likelihood
from laplace_tf.params import LogitModel, WeightSubset

F64 = "float64"
TRUE_SIGMA = np.array([0.1, 0.8])
PRIOR = 0.5


def _problem(n: int = 200, seed: int = 0):
    """A tanh body and a least-squares last layer on data with two noise levels."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((2,), dtype=F64), keras.layers.Dense(5, "tanh", dtype=F64),
                              keras.layers.Dense(2, dtype=F64)])
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2))
    phi = np.c_[model.layers[0](x).numpy(), np.ones(n)]
    y = phi @ rng.normal(size=(6, 2)) + TRUE_SIGMA * rng.normal(size=(n, 2))
    weights = np.linalg.lstsq(phi, y, rcond=None)[0]  # the MAP up to the small prior
    model.layers[1].kernel.assign(weights[:-1])
    model.layers[1].bias.assign(weights[-1])
    return model, x, y


def _at_map(model, x, y, prior: float = 1e-3):
    """Train all weights to the MAP (noise TRUE_SIGMA, a weak prior): the exact Hessian of the
    data term is nearly positive semi-definite there."""
    logit_model = LogitModel(model)
    subset = logit_model.subset

    @tf.function
    def loss_and_gradient(flat):
        with tf.GradientTape() as tape:
            tape.watch(flat)
            residuals = (y - logit_model(x, subset.unflatten(flat))) / TRUE_SIGMA
            value = 0.5 * tf.reduce_sum(residuals**2) + 0.5 * prior * tf.reduce_sum(flat**2)
        return value, tape.gradient(value, flat)

    def loss(flat):
        value, gradient = loss_and_gradient(tf.constant(flat))
        return float(value), gradient.numpy()

    flat = optimize.minimize(loss, subset.flat_values().numpy(), jac=True, method="L-BFGS-B",
                             options={"maxiter": 5000, "gtol": 1e-9}).x
    for variable, value in zip(subset.variables, subset.unflatten(tf.constant(flat)), strict=True):
        variable.assign(value)
    return model


def _laplace(model, structure: str, kind: str, sigma):
    return ltf.Laplace(model, "regression", subset_of_weights="last_layer",
                       hessian_structure=structure, curvature=kind, prior_precision=PRIOR,
                       sigma_noise=sigma, progress=False)


def brute_evidence(model, x, y, sigma, kind: str, diagonal: bool, prior: float = PRIOR) -> float:
    """log p(y | theta*) - |theta*|^2 lambda / 2 + P log(lambda) / 2 - log det(H + lambda) / 2,
    ``H`` from explicit Jacobians at the per-output ``sigma``."""
    logit_model = LogitModel(model, WeightSubset(model, [model.layers[-1]]))
    likelihood = get_likelihood("regression", sigma)
    targets = likelihood.prepare_targets(y, 2, "float64")
    brute = testing.brute_force_ef if kind == "ef" else testing.brute_force_ggn
    curvature = brute(logit_model, likelihood, x, targets)
    if diagonal:
        curvature = np.diag(np.diag(curvature))
    theta = logit_model.subset.flat_values().numpy()
    log_lik = stats.norm.logpdf(y, model(x).numpy(), sigma).sum()
    precision = curvature + prior * np.eye(theta.size)
    return (log_lik - 0.5 * prior * theta @ theta + 0.5 * theta.size * np.log(prior)
            - 0.5 * np.linalg.slogdet(precision)[1])


CASES = [("full", "ggn"), ("kron", "ggn"), ("diag", "ggn"), ("full", "ef"), ("diag", "ef"),
         ("kron", "hessian")]


def _assert_grid_maximum(la, sigma, prior: float) -> None:
    """Each ``sigma[k]`` maximises the evidence on a +-10% grid of 21 points around it."""
    for k in range(len(sigma)):
        grid = sigma[k] * np.linspace(0.9, 1.1, 21)
        values = []
        for value in grid:
            trial = sigma.copy()
            trial[k] = value
            values.append(float(la.log_marginal_likelihood(prior, trial)))
        assert abs(grid[int(np.argmax(values))] / sigma[k] - 1) <= 0.011


@pytest.mark.parametrize(("structure", "kind"), CASES)
def test_per_output_evidence_and_curvature_match_brute_force(structure, kind):
    model, x, y = _problem(n=30)
    la = _laplace(model, structure, kind, [0.7, 1.3])
    la.fit((x, y))
    sigma = np.array([0.4, 2.0])
    expected = brute_evidence(model, x, y, sigma, kind, diagonal=structure == "diag")
    np.testing.assert_allclose(la.log_marginal_likelihood(sigma_noise=sigma), expected, rtol=1e-10)
    in_graph = tf.function(lambda s: la.log_marginal_likelihood(sigma_noise=s))
    np.testing.assert_allclose(in_graph(tf.constant(sigma)), expected, rtol=1e-10)
    la.sigma_noise = sigma  # the stored curvature is rescaled to the new noise
    np.testing.assert_allclose(la.log_marginal_likelihood(), expected, rtol=1e-10)
    logit_model = LogitModel(model, WeightSubset(model, [model.layers[-1]]))
    likelihood = get_likelihood("regression", sigma)
    brute = testing.brute_force_ggn if kind != "ef" else testing.brute_force_ef
    dense = brute(logit_model, likelihood, x, likelihood.prepare_targets(y, 2, "float64"))
    if structure == "diag":
        dense = np.diag(np.diag(dense))
    np.testing.assert_allclose(blocks_to_dense(la.curvature.blocks), dense, rtol=1e-10,
                               atol=1e-10)
    np.testing.assert_allclose(la.posterior_precision.to_dense(), dense + PRIOR * np.eye(len(dense)),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("structure", ["kron", "full"])
def test_marglik_tunes_one_sigma_per_output(structure):
    model, x, y = _problem()
    la = _laplace(model, structure, "ggn", [1.0, 1.0])
    la.fit((x, y))
    la.optimize_prior_precision(n_steps=400, lr=0.05, progress=False)
    sigma = la.sigma_noise.numpy()
    assert la.tuning_trace["sigma_noise"].shape == (401, 2)
    np.testing.assert_allclose(sigma, TRUE_SIGMA, rtol=0.15)  # the known noise of the data
    prior = float(la.prior_precision)
    _assert_grid_maximum(la, sigma, prior)
    np.testing.assert_allclose(la.log_marginal_likelihood(),
                               brute_evidence(model, x, y, sigma, "ggn", False, prior), rtol=1e-9)


def _all_weights(model, structure: str, kind: str, sigma, prior: float = PRIOR):
    return ltf.Laplace(model, "regression", subset_of_weights="all", hessian_structure=structure,
                       curvature=kind, prior_precision=prior, sigma_noise=sigma, progress=False)


def brute_evidence_all(model, x, y, sigma, prior: float = PRIOR) -> float:
    """The evidence of a full GGN posterior over all weights, from explicit Jacobians."""
    logit_model = LogitModel(model)
    likelihood = get_likelihood("regression", sigma)
    targets = likelihood.prepare_targets(y, 2, "float64")
    curvature = testing.brute_force_ggn(logit_model, likelihood, x, targets)
    theta = logit_model.subset.flat_values().numpy()
    log_lik = stats.norm.logpdf(y, model(x).numpy(), sigma).sum()
    return (log_lik - 0.5 * prior * theta @ theta + 0.5 * theta.size * np.log(prior)
            - 0.5 * np.linalg.slogdet(curvature + prior * np.eye(theta.size))[1])


@pytest.mark.parametrize(("structure", "kind"), [("full", "ggn"), ("kron", "ggn"),
                                                 ("diag", "ggn"), ("full", "hessian")])
def test_per_output_sigma_over_all_weights_matches_a_fresh_fit(structure, kind):
    model, x, y = _problem(n=30)
    la = _all_weights(model, structure, kind, [0.7, 1.3], prior=2.0)
    la.fit((x, y))
    sigma = np.array([0.4, 2.0])
    fresh = _all_weights(model, structure, kind, sigma, prior=2.0)
    fresh.fit((x, y))  # the reference: fitted directly at the new noise
    expected = float(fresh.log_marginal_likelihood())
    np.testing.assert_allclose(la.log_marginal_likelihood(sigma_noise=sigma), expected, rtol=1e-10)
    in_graph = tf.function(lambda s: la.log_marginal_likelihood(sigma_noise=s))
    np.testing.assert_allclose(in_graph(tf.constant(sigma)), expected, rtol=1e-10)
    la.sigma_noise = sigma  # the curvature is rebuilt from the per-output curvatures
    np.testing.assert_allclose(la.log_marginal_likelihood(), expected, rtol=1e-10)
    np.testing.assert_allclose(blocks_to_dense(la.curvature.blocks),
                               blocks_to_dense(fresh.curvature.blocks), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(la.posterior_precision.to_dense(),
                               fresh.posterior_precision.to_dense(), rtol=1e-9, atol=1e-10)
    if (structure, kind) == ("full", "ggn"):
        np.testing.assert_allclose(expected, brute_evidence_all(model, x, y, sigma, 2.0),
                                   rtol=1e-10)


@pytest.mark.filterwarnings("ignore:.*negative eigenvalue")
def test_per_output_evidence_of_a_clipped_exact_hessian_is_clipped():
    """Away from the MAP the exact Hessian is indefinite; with ``on_indefinite="clip"`` the
    evidence at a per-output sigma uses it clipped, as the posterior does: the brute-force
    Hessian's negative eigenvalues set to 0."""
    model, x, y = _problem(n=11, seed=3)
    sigma = np.array([0.6, 1.1])
    la = ltf.Laplace(model, "regression", "all", "full", curvature="hessian",
                     on_indefinite="clip", prior_precision=0.7, sigma_noise=sigma,
                     progress=False)
    la.fit((x, y))
    logit_model = LogitModel(model)
    likelihood = get_likelihood("regression", sigma)
    hessian = testing.brute_force_hessian(logit_model, likelihood, x,
                                          likelihood.prepare_targets(y, 2, "float64"))
    values, vectors = np.linalg.eigh(hessian)
    clipped = (vectors * np.maximum(values, 0)) @ vectors.T
    assert np.linalg.eigvalsh(hessian)[0] < -1e-3  # indefinite: the clip matters
    theta = logit_model.subset.flat_values().numpy()
    expected = (stats.norm.logpdf(y, model(x).numpy(), sigma).sum()
                - 0.35 * theta @ theta + 0.5 * theta.size * np.log(0.7)
                - 0.5 * np.linalg.slogdet(clipped + 0.7 * np.eye(theta.size))[1])
    np.testing.assert_allclose(la.log_marginal_likelihood(), expected, rtol=1e-10)


def test_per_output_sigma_over_all_weights_online_update_adds_the_pieces():
    model, x, y = _problem(n=30)
    la = _all_weights(model, "kron", "ggn", [0.7, 1.3])
    la.fit((x[:12], y[:12]))
    la.fit((x[12:], y[12:]), override=False)
    la.sigma_noise = [0.4, 2.0]
    fresh = _all_weights(model, "kron", "ggn", [0.4, 2.0])
    fresh.fit((x, y))
    np.testing.assert_allclose(la.log_marginal_likelihood(), fresh.log_marginal_likelihood(),
                               rtol=1e-10)


@pytest.mark.parametrize("fitted, moved", [([0.01, 10.0], [10.0, 0.01]), ([1e-3, 1e3], [1.0, 1.0])])
@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_per_output_curvatures_of_a_float32_fit_keep_float32_accuracy(structure, fitted, moved):
    """Fitted at one sigma and moved to another, a float32 posterior equals a float32 fit made
    at the new sigma to float32 accuracy, and so does its evidence (each output's curvature
    taken as a difference of two nearly equal float32 curvatures was 2-3% off at [0.01, 10];
    isolated by other outputs' sigma 1000x larger, 14% off at [1e-3, 1e3], evidence NaN)."""
    model64, x, y = _problem(n=30)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(5, "tanh"), keras.layers.Dense(2)])
    for v32, v64 in zip(model.weights, model64.weights, strict=True):
        v32.assign(tf.cast(v64, "float32"))
    data = (x.astype("float32"), y.astype("float32"))
    la = _all_weights(model, structure, "ggn", fitted, prior=1.0)
    la.fit(data)
    la.sigma_noise = moved
    fresh = _all_weights(model, structure, "ggn", moved, prior=1.0)
    fresh.fit(data)
    expected = fresh.posterior_precision.to_dense().numpy()
    np.testing.assert_allclose(la.posterior_precision.to_dense(), expected,
                               atol=1e-5 * np.abs(expected).max())
    np.testing.assert_allclose(la.log_marginal_likelihood(), fresh.log_marginal_likelihood(),
                               rtol=1e-5)


def test_per_output_curvatures_of_a_shuffled_dataset_read_the_same_steps():
    """``fit(dataset, steps=2)`` on a reshuffled, repeated dataset reads the same 2 batches for
    every output's curvature: a tiny change of sigma leaves the posterior where it was, and
    the evidence equals that of a fit on those 6 examples (passes of different examples gave
    a NaN evidence and a 64% jump)."""
    model, x, y = _problem(n=30)
    sigma = np.array([0.7, 1.3])
    la = _all_weights(model, "full", "ggn", sigma)
    read = []
    def record(index):
        read.append(int(index))
        return index
    indices = tf.data.Dataset.range(30).shuffle(30, seed=0).repeat().map(
        lambda i: tf.ensure_shape(tf.py_function(record, [i], tf.int64), []))
    dataset = indices.map(lambda i: (tf.gather(x, i), tf.gather(y, i))).batch(3)
    la.fit(dataset, steps=2)
    used = np.array(read[:6])
    assert la.curvature.n_data == 6
    before = la.posterior_precision.to_dense().numpy()
    la.sigma_noise = sigma * (1 + 1e-9)
    np.testing.assert_allclose(la.posterior_precision.to_dense(), before, rtol=1e-6)
    fresh = _all_weights(model, "full", "ggn", sigma * (1 + 1e-9))
    fresh.fit((x[used], y[used]))
    np.testing.assert_allclose(la.log_marginal_likelihood(), fresh.log_marginal_likelihood(),
                               rtol=1e-9)


@pytest.mark.parametrize(("structure", "kind"), [("full", "ggn"), ("kron", "ggn"),
                                                 ("diag", "ggn"), ("full", "hessian")])
def test_marglik_tunes_one_sigma_per_output_over_all_weights(structure, kind):
    model, x, y = _problem(n=100)
    # the exact Hessian is positive definite near the MAP's noise only: start closer there
    start = [1.0, 1.0] if kind == "ggn" else [0.13, 0.6]
    la = _all_weights(_at_map(model, x, y), structure, kind, start)
    la.fit((x, y))
    la.optimize_prior_precision(n_steps=400, lr=0.05, progress=False)
    sigma = la.sigma_noise.numpy()
    np.testing.assert_allclose(sigma, TRUE_SIGMA, rtol=0.15)  # the known noise of the data
    _assert_grid_maximum(la, sigma, float(la.prior_precision))


def test_per_output_sigma_over_all_weights_is_refused_for_the_ef_and_a_scalar_fit():
    model, x, y = _problem(n=20)
    la = _all_weights(model, "kron", "ef", [1.0, 1.0])
    la.fit((x, y))
    with pytest.raises(ValueError, match="empirical Fisher .*cross terms"):
        la.sigma_noise = [0.5, 1.0]
    with pytest.raises(ValueError, match="empirical Fisher is not a sum of per-output"):
        la.optimize_prior_precision(tune_sigma_noise=True, progress=False)
    la.optimize_prior_precision(n_steps=5, progress=False)  # default: sigma stays at its fit
    np.testing.assert_array_equal(la.sigma_noise, [1.0, 1.0])
    scalar = _all_weights(model, "kron", "ggn", 1.0)
    scalar.fit((x, y))
    with pytest.raises(ValueError, match="stored only by a non-stochastic fit with a per-output sigma_noise"):
        scalar.sigma_noise = [0.5, 1.0]


@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_scalar_fit_noise_to_per_output_and_back(structure):
    model, x, y = _problem(n=30)
    la = _laplace(model, structure, "ggn", 0.9)
    la.fit((x, y))
    diagonal = structure == "diag"
    for sigma in (np.array([0.4, 2.0]), 0.5):
        expected = brute_evidence(model, x, y, sigma * np.ones(2), "ggn", diagonal)
        np.testing.assert_allclose(la.log_marginal_likelihood(sigma_noise=sigma), expected,
                                   rtol=1e-10)
        la.sigma_noise = sigma
        np.testing.assert_allclose(la.log_marginal_likelihood(), expected, rtol=1e-10)


def test_a_loaded_all_weights_posterior_has_no_per_output_curvatures(tmp_path):
    model, x, y = _problem(n=20)
    la = _all_weights(model, "diag", "ggn", [0.7, 1.3])
    la.fit((x, y))
    la.save(tmp_path / "la.npz")
    loaded = ltf.Laplace.load(tmp_path / "la.npz", model)
    np.testing.assert_allclose(loaded.log_marginal_likelihood(), la.log_marginal_likelihood(),
                               rtol=1e-12)
    with pytest.raises(ValueError, match="not by a scalar fit or a loaded file"):
        loaded.sigma_noise = [0.5, 1.0]
    with pytest.raises(ValueError, match="override=False.*loaded from a file.*Refit with "
                                         "override=True"):
        loaded.fit((x, y), override=False)
    with pytest.warns(UserWarning, match="sigma_noise is kept at its value .* loaded from a "
                                         "file"):
        loaded.optimize_prior_precision(method="marglik")
    np.testing.assert_array_equal(loaded.sigma_noise, [0.7, 1.3])


def test_a_restored_state_keeps_the_per_output_curvatures():
    model, x, y = _problem(n=30)
    la = _all_weights(model, "kron", "ggn", [0.7, 1.3])
    la.fit((x, y))
    copy = ltf.Laplace(model, **la.settings())
    assert not copy.stores_output_curvatures
    copy.restore(la.state())
    assert copy.stores_output_curvatures
    copy.sigma_noise = [0.4, 2.0]  # rebuilt from the restored H_k
    fresh = _all_weights(model, "kron", "ggn", [0.4, 2.0])
    fresh.fit((x, y))
    np.testing.assert_allclose(copy.log_marginal_likelihood(), fresh.log_marginal_likelihood(),
                               rtol=1e-10)
    np.testing.assert_allclose(copy.posterior_precision.to_dense(),
                               fresh.posterior_precision.to_dense(), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("subset", ["last_layer", "all"])
def test_a_state_fitted_at_another_per_output_sigma_is_not_restored(subset):
    """The restored curvature was used at the state's sigma while the posterior kept its own
    (the precision of [0.5, 2] against an evidence at [1, 3]): refused, nothing changed."""
    model, x, y = _problem(n=30)
    la = ltf.Laplace(model, "regression", subset_of_weights=subset, hessian_structure="full",
                     sigma_noise=[0.5, 2.0], progress=False)
    la.fit((x, y))
    snapshot = la.state()
    la.sigma_noise = [1.0, 3.0]
    before = la.posterior_precision.to_dense().numpy()
    with pytest.raises(ValueError, match=r"state: fitted at sigma_noise \[0.5, 2.0\]"):
        la.restore(snapshot)
    np.testing.assert_array_equal(la.posterior_precision.to_dense().numpy(), before)
    scalar = ltf.Laplace(model, "regression", subset_of_weights=subset,
                         hessian_structure="full", sigma_noise=0.5, progress=False)
    scalar.fit((x, y))
    with pytest.raises(ValueError, match="state: fitted at sigma_noise 0.5"):
        la.restore(scalar.state())
    classifier = ltf.Laplace(model, "classification", subset_of_weights=subset,
                             hessian_structure="full", progress=False)
    classifier.fit((x, np.arange(30) % 2))
    with pytest.raises(ValueError, match="fitted for a likelihood without sigma_noise"):
        la.restore(classifier.state())
