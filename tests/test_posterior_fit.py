"""The posterior end to end: ``fit`` on data with the real curvature builders.

Brute-force references from :mod:`laplace_tf.testing` judge the fitted precision; online
updates, ``sigma_noise`` recovery, exact Hessians at a saddle and gridsearch tuning are
checked on tiny float64 models.
"""

from __future__ import annotations

import logging
import re
import warnings

import keras
import numpy as np
import pytest
import scipy.stats
import tensorflow as tf
from models import N_OUTPUTS, tanh_mlp, targets

from laplace_tf import testing
from laplace_tf.blocks import blocks_to_dense
from laplace_tf.posterior import PosteriorLaplace
from laplace_tf.predictive import Laplace

F64 = tf.float64


def _data(likelihood, n, seed=0):
    model, x = tanh_mlp(N_OUTPUTS[likelihood], seed=seed, n=n)
    return model, x, targets(likelihood, N_OUTPUTS[likelihood], n, seed=seed)


@pytest.mark.parametrize(("likelihood", "subset", "structure"), [
    ("classification", "all", "full"), ("regression", "all", "diag"),
    ("binary", "last_layer", "full"), ("classification", "last_layer", "diag"),
])
def test_fitted_precision_is_the_brute_force_ggn_plus_prior(likelihood, subset, structure):
    model, x, y = _data(likelihood, 7)
    la = PosteriorLaplace(model, likelihood, subset, structure, prior_precision=0.3,
                          temperature=2.0, batch_size=3, progress=False)
    la.fit((x, y))
    lik = la.likelihood
    ggn = testing.brute_force_ggn(la.logit_model, lik, tf.constant(x),
                                  lik.prepare_targets(y, N_OUTPUTS[likelihood], F64))
    if structure == "diag":
        ggn = np.diag(np.diag(ggn))
    expected = ggn / 2.0 + 0.3 * np.eye(la.n_params)
    np.testing.assert_allclose(la.posterior_precision.to_dense(), expected, atol=1e-10)
    np.testing.assert_allclose(la.mean, la.subset.flat_values())
    assert la.curvature.n_data == 7


def test_kron_precision_is_the_exact_block_ggn_for_one_datum_and_one_output():
    model, x = tanh_mlp(1, seed=3, n=1)
    y = targets("regression", 1, 1, seed=3)
    la = PosteriorLaplace(model, "regression", "all", "kron", prior_precision=[0.5, 2.0],
                          sigma_noise=0.8, progress=False)
    la.fit((x, y))
    ggn = testing.brute_force_ggn(la.logit_model, la.likelihood, tf.constant(x), tf.constant(y))
    mask = np.zeros_like(ggn)
    prior = []
    for s, lam in zip(la.subset.slices, [0.5, 2.0], strict=True):
        mask[s.offset:s.offset + s.size, s.offset:s.offset + s.size] = 1
        prior += [lam] * s.size
    np.testing.assert_allclose(la.posterior_precision.to_dense(), ggn * mask + np.diag(prior),
                               atol=1e-10)


@pytest.mark.parametrize(("subset", "structure"), [
    ("all", "full"), ("all", "kron"), ("all", "diag"), ("last_layer", "kron"),
])
def test_online_update_over_two_halves_equals_one_fit(subset, structure):
    model, x, y = _data("classification", 8, seed=1)
    one = PosteriorLaplace(model, "classification", subset, structure, batch_size=4,
                           progress=False)
    one.fit((x, y))
    two = PosteriorLaplace(model, "classification", subset, structure, progress=False)
    two.fit((x[:4], y[:4]))
    two.fit((x[4:], y[4:]), override=False)
    assert two.curvature.n_data == 8
    np.testing.assert_allclose(two.curvature.nll, one.curvature.nll, rtol=1e-13)
    np.testing.assert_allclose(blocks_to_dense(two.curvature.blocks),
                               blocks_to_dense(one.curvature.blocks), atol=1e-13)
    np.testing.assert_allclose(two.posterior_covariance, one.posterior_covariance, atol=1e-12)
    two.fit((x[:4], y[:4]))  # override=True starts again
    assert two.curvature.n_data == 4


def test_online_update_rescales_to_a_new_sigma_noise():
    model, x, y = _data("regression", 8, seed=2)
    one = PosteriorLaplace(model, "regression", "all", "diag", sigma_noise=0.5, batch_size=4,
                           progress=False)
    one.fit((x, y))
    two = PosteriorLaplace(model, "regression", "all", "diag", sigma_noise=1.0, progress=False)
    two.fit((x[:4], y[:4]))
    two.sigma_noise = 0.5
    two.fit((x[4:], y[4:]), override=False)
    np.testing.assert_allclose(two.curvature.blocks[0].diagonal, one.curvature.blocks[0].diagonal,
                               rtol=1e-12)
    np.testing.assert_allclose(two.log_marginal_likelihood(), one.log_marginal_likelihood(),
                               rtol=1e-12)


def _sine_regression(n=300, noise=0.3, seed=0):
    """A tanh network trained (full batch Adam, seeded) on ``sin(2x) + noise``."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2, 2, (n, 1))
    y = np.sin(2 * x) + noise * rng.normal(size=(n, 1))
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((1,), dtype="float64"),
                              keras.layers.Dense(16, "tanh", dtype="float64"),
                              keras.layers.Dense(1, dtype="float64")])
    optimizer = keras.optimizers.Adam(0.03)
    xt, yt = tf.constant(x), tf.constant(y)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(xt) - yt) ** 2)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))

    for _ in range(300):
        step()
    return model, x, y


@pytest.fixture(scope="module")
def sine():
    return _sine_regression()


@pytest.mark.parametrize(("subset", "structure"), [("all", "kron"), ("last_layer", "full")])
def test_marglik_recovers_the_noise_of_synthetic_regression(sine, subset, structure):
    model, x, y = sine
    la = PosteriorLaplace(model, "regression", subset, structure, progress=False)
    la.fit((x, y))
    result = la.optimize_prior_precision(n_steps=200, lr=0.1, progress=False)
    assert abs(float(result["sigma_noise"]) - 0.3) < 0.03
    assert la.tuning_trace["sigma_noise"][-1] == pytest.approx(float(la.sigma_noise))


def test_exact_hessian_at_a_saddle_raises_or_clips():
    model, x, y = _data("regression", 6, seed=4)  # untrained: the Hessian is indefinite
    raising = PosteriorLaplace(model, "regression", "all", "full", curvature="hessian",
                               prior_precision=1e-3, progress=False)
    with pytest.raises(ValueError, match="curvature='hessian' at a saddle point"):
        raising.fit((x, y))
    with pytest.raises(ValueError, match="not fitted"):
        raising.sample(1)
    clipping = PosteriorLaplace(model, "regression", "all", "full", curvature="hessian",
                                prior_precision=1e-3, on_indefinite="clip", progress=False)
    with pytest.warns(UserWarning, match="clipped"):
        clipping.fit((x, y))
    hessian = testing.brute_force_hessian(clipping.logit_model, clipping.likelihood,
                                          tf.constant(x), tf.constant(y))
    e, Q = np.linalg.eigh(hessian)
    assert np.sum(e < 0) > 0
    np.testing.assert_allclose(clipping.posterior_precision.to_dense(),
                               Q @ np.diag(np.maximum(e, 0)) @ Q.T + 1e-3 * np.eye(len(e)),
                               atol=1e-9)


def _validation_nll_by_hand(likelihood, out, y):
    if likelihood == "regression":
        mean, var = (o.numpy() for o in out)
        return -np.mean(np.sum(scipy.stats.norm.logpdf(y, mean, np.sqrt(var)), axis=1))
    return -np.mean(np.log(out.numpy()[np.arange(len(y)), y]))


@pytest.mark.parametrize(("likelihood", "structure"), [("classification", "kron"),
                                                       ("regression", "diag")])
def test_gridsearch_picks_the_lowest_validation_nll(likelihood, structure):
    model, x, y = _data(likelihood, 12, seed=5)
    la = Laplace(model, likelihood, "last_layer", structure, progress=False)
    la.fit((x[:8], y[:8]))
    grid = np.logspace(-2, 2, 3)
    nll, evidence = [], []
    for value in grid:  # the validation NLL by hand, from the predictive's outputs
        la.prior_precision = value
        nll.append(_validation_nll_by_hand(likelihood, la(x[8:]), y[8:]))
        evidence.append(float(la.log_marginal_likelihood()))
    la.prior_precision = 5.0
    result = la.optimize_prior_precision(method="gridsearch", val_data=(x[8:], y[8:]),
                                         grid=grid, progress=False)
    assert float(result["prior_precision"]) == float(la.prior_precision) == grid[np.argmin(nll)]
    np.testing.assert_allclose(la.tuning_trace["val_nll"], nll, rtol=1e-10)
    np.testing.assert_allclose(la.tuning_trace["log_marginal_likelihood"], evidence, rtol=1e-12)
    np.testing.assert_array_equal(la.tuning_trace["prior_precision"], grid)


@pytest.mark.filterwarnings("ignore:.*of the grid:UserWarning")
@pytest.mark.parametrize("options", [{"pred_type": "nn"}, {"link_approx": "mc"}])
def test_gridsearch_of_a_random_predictive_scores_every_value_with_the_seeds_draws(options):
    model, x, y = _data("classification", 12, seed=5)
    la = Laplace(model, "classification", "last_layer", "kron", progress=False)
    la.fit((x[:8], y[:8]))
    grid = np.logspace(-2, 2, 3)
    nll = []
    for value in grid:
        la.prior_precision = value
        nll.append(_validation_nll_by_hand(
            "classification", la(x[8:], seed=3, n_samples=7, **options), y[8:]))
    for _ in range(2):  # reproducible
        la.optimize_prior_precision(method="gridsearch", val_data=(x[8:], y[8:]), grid=grid,
                                    progress=False, seed=3, n_samples=7, **options)
        np.testing.assert_allclose(la.tuning_trace["val_nll"], nll, rtol=1e-12)


def test_gridsearch_warns_when_the_best_prior_is_an_edge_of_the_grid():
    model, x, y = _data("regression", 12, seed=1)
    la = Laplace(model, "regression", "last_layer", "diag", progress=False)
    la.fit((x[:8], y[:8]))
    wide = np.logspace(-3, 3, 13)

    def search(grid):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            la.optimize_prior_precision(method="gridsearch", val_data=(x[8:], y[8:]),
                                        grid=grid, progress=False)
        return [str(w.message) for w in caught if w.category is UserWarning], caught

    messages, _ = search(wide)
    best = int(np.argmin(la.tuning_trace["val_nll"]))
    assert 0 < best < len(wide) - 1 and messages == []  # interior optimum: no warning
    assert search(wide[best - 1:best + 2])[0] == []
    messages, caught = search(wide[:best + 1])  # the optimum is the largest value
    assert len(messages) == 1 and caught[0].filename == __file__
    assert f"lowest at the largest value of the grid, prior_precision={wide[best]:.3g}" in messages[0]
    assert "grid=np.logspace(-1, 5, 61)" in messages[0]
    messages, _ = search(wide[best:])  # ... the smallest
    assert len(messages) == 1
    assert f"lowest at the smallest value of the grid, prior_precision={wide[best]:.3g}" in messages[0]
    assert "grid=np.logspace(-4, 2, 61)" in messages[0]
    np.testing.assert_allclose(la.prior_precision, wide[best])


def test_validation_data_makes_gridsearch_the_default_method():
    model, x, y = _data("classification", 12, seed=5)
    grid = np.logspace(-2, 2, 5)
    searched, default, evidence = (Laplace(model, "classification", "last_layer", "kron",
                                           progress=False) for _ in range(3))
    for la in (searched, default, evidence):
        la.fit((x[:8], y[:8]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the optimum may be an edge of the grid
        searched.optimize_prior_precision(method="gridsearch", val_data=(x[8:], y[8:]),
                                          grid=grid, progress=False)
        default.optimize_prior_precision(val_data=(x[8:], y[8:]), grid=grid, progress=False)
    np.testing.assert_array_equal(default.tuning_trace["val_nll"],
                                  searched.tuning_trace["val_nll"])
    assert float(default.prior_precision) == float(searched.prior_precision)
    evidence.optimize_prior_precision(n_steps=5, progress=False)  # no validation data: marglik
    assert "val_nll" not in evidence.tuning_trace
    assert len(evidence.tuning_trace["log_marginal_likelihood"]) == 6


def test_gridsearch_needs_the_predictive_and_validation_data():
    model, x, y = _data("classification", 6)
    la = PosteriorLaplace(model, "classification", "last_layer", "diag", progress=False)
    la.fit((x, y))
    with pytest.raises(TypeError, match="use laplace_tf.Laplace"):
        la.optimize_prior_precision(method="gridsearch", val_data=(x, y))
    full = Laplace(model, "classification", "last_layer", "diag", progress=False)
    full.fit((x, y))
    with pytest.raises(ValueError, match="val_data: method='gridsearch' needs validation"):
        full.optimize_prior_precision(method="gridsearch")
    with pytest.raises(ValueError, match=r"^val_data: the dataset is infinite .*reading it "
                                         r"would never end; make it finite with \.take"):
        full.optimize_prior_precision(
            val_data=tf.data.Dataset.from_tensor_slices((x, y)).batch(2).repeat())
    with pytest.raises(ValueError, match=r"^val_data: x has 6 rows but y has 5"):
        full.optimize_prior_precision(val_data=(x, y[:5]))
    for grid in ([1.0, -1.0], ["1", "2"], [True, True], [None, 1.0]):  # no string or bool read
        with pytest.raises(ValueError, match=r"grid: expected a non-empty 1-D array.* got " +
                           re.escape(repr(grid))):
            full.optimize_prior_precision(method="gridsearch", val_data=(x, y), grid=grid)
    with pytest.raises(ValueError, match="gridsearch' searches one scalar"):
        full.optimize_prior_precision(method="gridsearch", val_data=(x, y),
                                      prior_structure="layerwise")
    np.testing.assert_allclose(full.prior_precision, 1.0)


def test_failed_fit_keeps_the_previous_posterior():
    model, x, y = _data("classification", 6)
    la = PosteriorLaplace(model, "classification", "all", "diag", progress=False)
    la.fit((x, y))
    before = la.posterior_covariance.numpy()
    bad_x = x.copy()
    bad_x[2, 1] = np.nan
    for data, error in [((bad_x, y), "NaN"), ((x, y + 7), "class labels must lie"),
                        ((x[:3], y), "x has 3 rows but y has 6")]:
        with pytest.raises(ValueError, match=error):
            la.fit(data, override=False)
    np.testing.assert_array_equal(la.posterior_covariance, before)
    assert la.curvature.n_data == 6


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_non_finite_weights_are_refused_by_name(structure):
    model, x, y = _data("classification", 6)
    weights = model.get_weights()
    weights[0][0, 0] = np.nan
    model.set_weights(weights)
    la = PosteriorLaplace(model, "classification", "all", structure, progress=False)
    with pytest.raises(ValueError, match="curvature: the fitted curvature has NaN or Inf"):
        la.fit((x, y))


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_float32_posterior_is_close_to_float64(structure):
    model64, x, y = _data("classification", 8, seed=6)
    model32 = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, "tanh"),
                                keras.layers.Dense(3)])
    model32.set_weights(model64.get_weights())
    results = []
    for model in (model64, model32):
        la = PosteriorLaplace(model, "classification", "all", structure, prior_precision=0.5,
                              progress=False)
        la.fit((x, y))
        la.optimize_prior_precision(n_steps=20, progress=False)
        results.append((la.posterior_covariance.numpy(), la.log_marginal_likelihood().numpy(),
                        la.sample(3, seed=0).numpy()))
    (cov64, z64, s64), (cov32, z32, s32) = results
    assert cov32.dtype == z32.dtype == s32.dtype == np.float32
    np.testing.assert_allclose(cov32, cov64, rtol=2e-3, atol=2e-4)
    np.testing.assert_allclose(z32, z64, rtol=1e-4)
    assert s32.shape == s64.shape  # random streams differ between dtypes


def test_tuning_many_posteriors_in_a_row_logs_no_retracing_warning():
    class Records(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages: list[str] = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    model, x, y = _data("classification", 8, seed=2)
    records = Records()
    tf.get_logger().addHandler(records)
    try:
        for _ in range(7):  # TensorFlow warns when 5 of its last 10 calls of one code traced
            la = Laplace(model, "classification", "last_layer", "diag", progress=False)
            la.fit((x, y))
            la.optimize_prior_precision(method="marglik", n_steps=3, progress=False)
    finally:
        tf.get_logger().removeHandler(records)
    assert not [m for m in records.messages if "retracing" in m]
