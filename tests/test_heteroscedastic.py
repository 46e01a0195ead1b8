"""likelihood="heteroscedastic": the model outputs [mean (K), log-variance (K)].

Every reference is computed here, in float64, from a hand-written Gaussian NLL: the GGN is
``sum_n J_n^T F_n J_n`` with ``J_n`` from plain GradientTape jacobians and ``F_n`` the Fisher
(the expected output Hessian, the mean of the autodiff Hessians at ``y = mu -+ sigma``), the
EF from per-example gradients of that NLL, the exact Hessian by double backprop.
"""

from __future__ import annotations

import functools
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import laplace_tf as ltf
from laplace_tf.calibration import report
from laplace_tf.likelihoods import get_likelihood
from laplace_tf.testing import (
    assert_gaussian_moments,
    brute_force_hessian,
    brute_force_jacobians,
    subset_of,
)

K = 2
N = 5
PRIOR = 3.0
TOL = dict(rtol=1e-8, atol=1e-10)


def _model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((2,), dtype="float64"),
        keras.layers.Dense(3, activation="tanh", dtype="float64"),
        keras.layers.Dense(2 * K, dtype="float64"),
    ])


def _data(n: int = N, seed: int = 1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 2)), rng.normal(size=(n, K))


def _nll(outputs: tf.Tensor, y) -> tf.Tensor:
    """Summed Gaussian NLL with mean ``outputs[:, :K]`` and log-variance ``outputs[:, K:]``."""
    mu, eta = outputs[:, :K], outputs[:, K:]
    return tf.reduce_sum(0.5 * (y - mu) ** 2 / tf.exp(eta) + 0.5 * eta
                         + 0.5 * math.log(2 * math.pi))


class _HandWritten:
    nll = staticmethod(_nll)


def _output_hessian(out: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The Hessian of ``_nll`` of one example with respect to its outputs ``[2K, 2K]``."""
    f = tf.Variable(out[None])
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            loss = _nll(f, y[None])
        g = inner.gradient(loss, f)[0]
    return outer.jacobian(g, f).numpy()[:, 0, :]


def _fisher(out: np.ndarray) -> np.ndarray:
    """``E_y[Hessian]`` under ``y ~ N(mu, exp(eta))``: the Hessian is quadratic in ``y - mu``
    with a zero-mean linear part, so the mean over ``y = mu -+ sigma`` is exact."""
    sigma = np.exp(0.5 * out[K:])
    return 0.5 * (_output_hessian(out, out[:K] + sigma) + _output_hessian(out, out[:K] - sigma))


@functools.cache
def _references(n: int = N, last_layer: bool = False) -> dict[str, np.ndarray]:
    """Dense GGN, EF and exact Hessian of ``_model()`` on ``_data(n)``, over the last layer's
    weights or all weights, and the Jacobians ``[n, 2K, P]``."""
    model = _model()
    x, y = _data(n)
    logit_model = subset_of(model, [model.layers[-1]] if last_layer else None)
    J = brute_force_jacobians(logit_model, tf.constant(x))
    out = model(x).numpy()
    ggn = sum(J[i].T @ _fisher(out[i]) @ J[i] for i in range(n))
    grads = []
    for i in range(n):
        f = tf.Variable(out[i : i + 1])
        with tf.GradientTape() as tape:
            loss = _nll(f, y[i : i + 1])
        grads.append(J[i].T @ tape.gradient(loss, f).numpy()[0])
    ef = sum(np.outer(g, g) for g in grads)
    hessian = brute_force_hessian(logit_model, _HandWritten(), tf.constant(x), tf.constant(y))
    return {"ggn": ggn, "ef": ef, "hessian": hessian, "jacobians": J}


def _fitted(model, x, y, **kwargs) -> ltf.Laplace:
    la = ltf.Laplace(model, "heteroscedastic", prior_precision=PRIOR, progress=False, **kwargs)
    la.fit((x, y))
    return la


def _curvature(la) -> np.ndarray:
    """``H`` from the posterior precision ``H + lambda I`` (temperature 1)."""
    precision = la.posterior_precision.to_dense().numpy()
    return precision - PRIOR * np.eye(precision.shape[0])


def _kron_reference(dense: np.ndarray, sizes: list[int]) -> np.ndarray:
    """The block diagonal of ``dense`` with blocks of ``sizes`` (one per layer)."""
    out = np.zeros_like(dense)
    offset = 0
    for size in sizes:
        out[offset : offset + size, offset : offset + size] = \
            dense[offset : offset + size, offset : offset + size]
        offset += size
    return out


# ---------------------------------------------------------------------- the likelihood


def test_nll_is_the_gaussian_nll_with_the_predicted_variance():
    lik = get_likelihood("heteroscedastic")
    out = np.array([[0.3, -1.0, 0.5, -0.2], [2.0, 0.0, -1.5, 1.0]])
    y = np.array([[1.0, -0.5], [1.5, 0.3]])
    var = np.exp(out[:, K:])
    expected = np.sum(0.5 * np.log(2 * np.pi * var) + 0.5 * (y - out[:, :K]) ** 2 / var, axis=1)
    np.testing.assert_allclose(lik.nll_per_example(tf.constant(out), tf.constant(y)), expected,
                               **TOL)
    fisher = np.array([_fisher(o) for o in out])
    np.testing.assert_allclose(lik.output_hessian(tf.constant(out)), fisher, **TOL)
    np.testing.assert_allclose(fisher[0].diagonal(), [np.exp(-0.5), np.exp(0.2), 0.5, 0.5],
                               **TOL)


@pytest.mark.parametrize("n_outputs", [1, 3])
def test_an_odd_number_of_outputs_is_refused(n_outputs):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(n_outputs)])
    la = ltf.Laplace(model, "heteroscedastic", progress=False)
    with pytest.raises(ValueError, match=r"'heteroscedastic' needs 2K outputs.*"
                                         rf"has {n_outputs}"):
        la.fit((np.zeros((3, 2), np.float32), np.zeros((3, 1), np.float32)))


def test_sigma_noise_must_stay_one():
    with pytest.raises(ValueError, match="sigma_noise: only used with likelihood='regression'"):
        ltf.Laplace(_model(), "heteroscedastic", sigma_noise=0.5)


def test_the_monte_carlo_targets_follow_the_predicted_gaussian():
    lik = get_likelihood("heteroscedastic")
    out = tf.constant(np.tile([[1.0, -2.0, np.log(4.0), np.log(0.25)]], (40000, 1)))
    draws = lik.sample(out, tf.constant([3, 4], tf.int64)).numpy()
    assert draws.shape == (40000, K)
    se = np.array([2.0, 0.5]) / np.sqrt(40000)
    assert np.all(np.abs(draws.mean(0) - [1.0, -2.0]) < 5 * se)
    np.testing.assert_allclose(draws.var(0), [4.0, 0.25], rtol=0.03)


# ---------------------------------------------------------------------- curvature


@pytest.mark.parametrize("kind", ["ggn", "ef", "hessian"])
def test_full_curvature_over_all_weights_equals_the_brute_force_one(kind):
    model = _model()
    x, y = _data()
    la = _fitted(model, x, y, subset_of_weights="all", hessian_structure="full", curvature=kind)
    np.testing.assert_allclose(_curvature(la), _references()[kind], **TOL)


@pytest.mark.parametrize("kind", ["ggn", "ef"])
def test_diag_over_all_weights_is_the_diagonal_of_the_brute_force_one(kind):
    model = _model()
    x, y = _data()
    la = _fitted(model, x, y, subset_of_weights="all", hessian_structure="diag", curvature=kind)
    np.testing.assert_allclose(_curvature(la), np.diag(np.diag(_references()[kind])),
                               **TOL)


@pytest.mark.parametrize("kind", ["ggn", "ef"])
def test_kron_on_one_example_equals_the_brute_force_layer_blocks(kind):
    model = _model()
    x, y = _data(n=1)
    la = _fitted(model, x, y, subset_of_weights="all", hessian_structure="kron", curvature=kind)
    sizes = [s.size for s in la.subset.slices]
    expected = _kron_reference(_references(n=1)[kind], sizes)
    np.testing.assert_allclose(_curvature(la), expected, **TOL)


@pytest.mark.parametrize(("structure", "n"), [("full", N), ("diag", N), ("kron", 1)])
@pytest.mark.parametrize("kind", ["ggn", "ef"])
def test_last_layer_curvature_equals_the_brute_force_one(structure, n, kind):
    model = _model()
    x, y = _data(n=n)
    la = _fitted(model, x, y, subset_of_weights="last_layer", hessian_structure=structure,
                 curvature=kind)
    expected = _references(n, last_layer=True)[kind]
    if structure == "diag":
        expected = np.diag(np.diag(expected))
    np.testing.assert_allclose(_curvature(la), expected, **TOL)


def test_the_last_layer_exact_hessian_is_refused():
    model = _model()
    x, y = _data()
    la = ltf.Laplace(model, "heteroscedastic", curvature="hessian", progress=False)
    with pytest.raises(ValueError, match="curvature: the last-layer 'hessian'.*"
                                         "'heteroscedastic'"):
        la.fit((x, y))


def test_the_monte_carlo_kron_approaches_the_exact_one():
    model = _model()
    x, y = _data(n=1)
    x, y = np.repeat(x, 4000, 0), np.repeat(y, 4000, 0)
    exact = _fitted(model, x, y, subset_of_weights="all", hessian_structure="kron")
    sampled = _fitted(model, x, y, subset_of_weights="all", hessian_structure="kron",
                      stochastic=True, seed=0)
    exact_h, sampled_h = _curvature(exact), _curvature(sampled)
    scale = np.abs(exact_h).max()
    assert np.abs(sampled_h - exact_h).max() < 0.1 * scale
    assert np.abs(sampled_h - exact_h).max() > 1e-6 * scale  # sampled, not exact


# ---------------------------------------------------------------------- predictive


def _glm_reference(model, x, last_layer=False):
    """``(mean, variance, J Sigma J^T)`` of the GLM predictive at the training inputs ``x``
    from the brute-force GGN."""
    refs = _references(len(x), last_layer)
    J = refs["jacobians"]
    sigma = np.linalg.inv(refs["ggn"] + PRIOR * np.eye(J.shape[-1]))
    fv = np.einsum("nkp,pq,nlq->nkl", J, sigma, J)
    out = model(x).numpy()
    variance = np.diagonal(fv, axis1=1, axis2=2)[:, :K] + np.exp(out[:, K:])
    return out[:, :K], variance, fv


@pytest.mark.parametrize(("subset", "structure"), [("all", "full"), ("last_layer", "full")])
def test_glm_predictive_adds_the_predicted_noise_to_the_functional_variance(subset, structure):
    model = _model()
    x, y = _data()
    la = _fitted(model, x, y, subset_of_weights=subset, hessian_structure=structure)
    mean, variance, fv = _glm_reference(model, x, last_layer=subset == "last_layer")
    got_mean, got_variance = la(x)
    np.testing.assert_allclose(got_mean, mean, **TOL)
    np.testing.assert_allclose(got_variance, variance, **TOL)
    np.testing.assert_allclose(la.functional_variance(x), fv, **TOL)
    samples = la.predictive_samples(x, n_samples=4000, seed=5)  # of the mean outputs
    assert_gaussian_moments(samples, mean, fv[:, :K, :K])
    np.testing.assert_allclose(la.predictive_std(x), np.sqrt(variance), **TOL)
    lower, upper = la.predictive_interval(x, level=0.9)
    np.testing.assert_allclose(upper - mean, 1.6448536269514722 * np.sqrt(variance), rtol=1e-8)
    np.testing.assert_allclose(mean - lower, upper - mean, rtol=1e-8)
    map_mean, map_variance = la.map_predict(x)
    out = model(x).numpy()
    np.testing.assert_allclose(map_mean, out[:, :K], **TOL)
    np.testing.assert_allclose(map_variance, np.exp(out[:, K:]), **TOL)


def test_nn_predictive_adds_the_mean_predicted_noise_to_the_spread_of_the_means():
    model = _model()
    x, y = _data()
    la = _fitted(model, x, y, subset_of_weights="all", hessian_structure="diag")
    thetas = la.sample(30, seed=7).numpy()
    outs = []
    for theta in thetas:
        clone = keras.models.clone_model(model)
        sizes = [int(np.prod(v.shape)) for v in model.trainable_variables]
        parts = np.split(theta, np.cumsum(sizes)[:-1])
        clone.set_weights([p.reshape(v.shape) for p, v in
                           zip(parts, model.trainable_variables, strict=True)])
        outs.append(clone(x).numpy())
    outs = np.array(outs)
    mean, variance = la(x, pred_type="nn", n_samples=30, seed=7)
    np.testing.assert_allclose(mean, outs[:, :, :K].mean(0), **TOL)
    np.testing.assert_allclose(variance, outs[:, :, :K].var(0) + np.exp(outs[:, :, K:]).mean(0),
                               **TOL)
    samples = la.predictive_samples(x, n_samples=30, seed=7, pred_type="nn")
    np.testing.assert_allclose(samples, outs[:, :, :K], **TOL)


# ---------------------------------------------------------------------- tuning, files, report


def _gaussian_nll(mean, variance, y) -> np.ndarray:
    return 0.5 * np.log(2 * np.pi * variance) + 0.5 * (y - mean) ** 2 / variance


def test_gridsearch_minimises_the_validation_nll_of_the_gaussian_predictive():
    model = _model()
    x, y = _data()
    x_val, y_val = _data(n=4, seed=2)
    la = _fitted(model, x, y, subset_of_weights="last_layer", hessian_structure="kron")
    grid = np.array([0.01, 1.0, 100.0])
    expected = []
    for value in grid:
        la.prior_precision = value
        mean, variance = (np.asarray(t) for t in la(x_val))
        expected.append(_gaussian_nll(mean, variance, y_val).sum() / len(y_val))
    result = la.optimize_prior_precision(method="gridsearch", val_data=(x_val, y_val),
                                         grid=grid, progress=False)
    np.testing.assert_allclose(la.tuning_trace["val_nll"], expected, rtol=1e-10)
    assert float(result["prior_precision"]) == grid[int(np.argmin(expected))]
    assert "sigma_noise" not in result


def test_the_evidence_equals_the_brute_force_laplace_evidence_and_marglik_tunes_the_prior():
    model = _model()
    x, y = _data()
    la = _fitted(model, x, y, subset_of_weights="all", hessian_structure="full")
    ggn = _references()["ggn"]
    theta = np.concatenate([v.numpy().ravel() for v in model.trainable_variables])
    data_nll = float(_nll(model(x), y))

    def evidence(prior):
        _, log_det = np.linalg.slogdet(ggn + prior * np.eye(theta.size))
        return (-data_nll - 0.5 * prior * theta @ theta + 0.5 * theta.size * np.log(prior)
                - 0.5 * log_det)

    np.testing.assert_allclose(float(la.log_marginal_likelihood()), evidence(PRIOR), rtol=1e-10)
    result = la.optimize_prior_precision(n_steps=200, lr=0.1, progress=False)
    assert "sigma_noise" not in result
    tuned = float(result["prior_precision"])
    for other in (0.9 * tuned, 1.1 * tuned):
        assert evidence(tuned) > evidence(other)
    with pytest.raises(ValueError, match="tune_sigma_noise"):
        la.optimize_prior_precision(tune_sigma_noise=True, progress=False)


def test_save_and_load_keep_the_predictive(tmp_path):
    model = _model()
    x, y = _data()
    la = _fitted(model, x, y, subset_of_weights="all", hessian_structure="kron")
    la.save(tmp_path / "la.npz")
    loaded = ltf.load(tmp_path / "la.npz", model)
    assert loaded.likelihood.name == "heteroscedastic"
    for got, expected in zip(loaded(x), la(x), strict=True):
        np.testing.assert_allclose(got, expected, **TOL)
    np.testing.assert_allclose(float(loaded.log_marginal_likelihood()),
                               float(la.log_marginal_likelihood()), rtol=1e-12)


def test_the_report_scores_the_gaussian_predictive_with_the_predicted_noise():
    model = _model()
    x, y = _data()
    x_test, y_test = _data(n=6, seed=3)
    la = _fitted(model, x, y, subset_of_weights="all", hessian_structure="full")
    rep = report(la, test=(x_test, y_test))
    out = model(x_test).numpy()
    mean, variance = (np.asarray(t) for t in la(x_test))
    laplace, map_ = rep.metrics["test"]["laplace"], rep.metrics["test"]["map"]
    np.testing.assert_allclose(laplace["nll"], _gaussian_nll(mean, variance, y_test).mean(),
                               rtol=1e-10)
    np.testing.assert_allclose(
        map_["nll"], _gaussian_nll(out[:, :K], np.exp(out[:, K:]), y_test).mean(), rtol=1e-10)
    np.testing.assert_allclose(laplace["rmse"], np.sqrt(np.mean((y_test - out[:, :K]) ** 2)),
                               rtol=1e-10)
    assert rep.metrics["config"]["likelihood"] == "heteroscedastic"
    assert rep.metrics["config"]["sigma_noise"] is None
    assert "regression_calibration" in rep.figures


def test_the_command_line_takes_it_for_data_from_files_and_sizes_the_model_by_2k():
    from laplace_tf import config as cfg

    files = {"data": {"train": "a.npz"}, "laplace": {"likelihood": "heteroscedastic"}}
    assert cfg.likelihood_of(cfg.from_dict(files)) == "heteroscedastic"
    lik = get_likelihood("heteroscedastic")
    assert (lik.n_outputs(np.zeros(5)), lik.n_outputs(np.zeros((5, 3)))) == (2, 6)
