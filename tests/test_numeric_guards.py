"""Edge cases that gave a wrong number, a NaN or an unclear error: each now gives the right
number (checked against an independent computation) or a clear error naming the argument.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from models import F64, tanh_mlp, targets

import laplace_tf as ltf
from laplace_tf.predictive.links import bridge


def _fitted(likelihood="classification", structure="full", **kwargs):
    model, x = tanh_mlp(1 if likelihood == "binary" else 3, seed=0, n=12)
    y = targets(likelihood, 1 if likelihood == "binary" else 3, 12, seed=0)
    la = ltf.Laplace(model, likelihood, subset_of_weights="all", hessian_structure=structure,
                     progress=False, **kwargs)
    la.fit((x, y))
    return la, x, y


@pytest.mark.parametrize("likelihood, link, message", [
    ("classification", "probitt", "link_approx: expected one of"),
    ("binary", "bridge", "does not fit likelihood='binary'"),
])
def test_gridsearch_checks_its_link_as_the_predictive_does(likelihood, link, message):
    """An unknown link was scored as probit, the bridge of one binary logit as probability 1."""
    la, x, y = _fitted(likelihood)
    with pytest.raises(ValueError, match=message):
        la.optimize_prior_precision(method="gridsearch", val_data=(x, y), link_approx=link)
    with pytest.raises(ValueError, match="pred_type"):
        la.optimize_prior_precision(method="gridsearch", val_data=(x, y), pred_type="mcmc")
    with pytest.raises(ValueError, match="grid: expected"):
        la.optimize_prior_precision(method="gridsearch", val_data=(x, y), grid="abc")
    with pytest.raises(ValueError, match="method='marglik' .* uses none of them"):
        la.optimize_prior_precision(method="marglik", link_approx="mc")


def test_gridsearch_skips_priors_whose_float32_precision_fails_its_cholesky():
    """A float32 full posterior on many examples: prior 1e-4 passes the eigenvalue check but
    not the Cholesky factorisation the predictive needs. The search scores it inf and returns
    the best of the other values, the value a search without it returns."""
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(8, "tanh"),
                              keras.layers.Dense(3)])
    x, y = rng.normal(size=(20000, 2)).astype("float32"), rng.integers(0, 3, 20000)
    la = ltf.Laplace(model, "classification", subset_of_weights="all", hessian_structure="full",
                     progress=False)
    la.fit((x, y))
    val = (rng.normal(size=(50, 2)).astype("float32"), rng.integers(0, 3, 50))
    grid = np.array([1e-4, 1e-2, 1.0, 100.0])
    la.prior_precision = grid[0]
    with pytest.raises(ValueError, match="not numerically positive definite"):
        la(val[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la.optimize_prior_precision(val_data=val, grid=grid)
        assert la.tuning_trace["val_nll"][0] == np.inf
        chosen = float(la.prior_precision)
        la.optimize_prior_precision(val_data=val, grid=grid[1:])
    assert chosen == float(la.prior_precision)


@pytest.mark.parametrize("setting", [{"temperature": 1e-39}, {"sigma_noise": 1e-20}])
def test_a_curvature_scale_that_overflows_the_dtype_is_refused(setting):
    """``1 / (T sigma^2)`` past float32's range made an infinite precision and an evidence of
    -inf; in float64 the same values are fine."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    x = np.random.default_rng(0).normal(size=(5, 2)).astype("float32")
    la = ltf.Laplace(model, "regression", subset_of_weights="all", hessian_structure="diag")
    la.fit((x, x[:, :1]))
    name = next(iter(setting))
    with pytest.raises(ValueError, match="overflows float32"):
        setattr(la, name, setting[name])
    with pytest.raises(ValueError, match="overflows float32"):
        ltf.Laplace(model, "regression", **setting)
    if name == "sigma_noise":  # the evidence at another sigma: -inf before
        with pytest.raises(ValueError, match="overflows float32"):
            la.log_marginal_likelihood(sigma_noise=setting[name])
    model64, x64 = tanh_mlp(1)
    ltf.Laplace(model64, "regression", **setting)  # float64: accepted


def test_the_bridge_of_a_huge_float32_variance_is_the_float64_one():
    """Logits ~1e13 with variances ~1e25: ``row * sum(mu)`` and ``row**2`` overflowed float32
    (NaN probabilities); the float64 bridge gives [0, 0, 1]."""
    mu = np.array([[4.653088e12, -3.0322592e12, 1.085691e13]])
    cov = np.array([[[7.1666975e25, 2.9521242e25, 2.3811742e25],
                     [2.9521242e25, 7.0671566e25, 2.4807142e25],
                     [2.3811742e25, 2.4807142e25, 7.6381114e25]]])
    expected = bridge(tf.constant(mu, F64), tf.constant(cov, F64)).numpy()
    np.testing.assert_allclose(expected, [[0.0, 0.0, 1.0]], atol=1e-12)
    got = bridge(tf.constant(mu, tf.float32), tf.constant(cov, tf.float32)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_a_lowrank_fit_of_non_finite_weights_is_refused_clearly():
    model, x = tanh_mlp(3)
    kernel = model.layers[0].kernel.numpy()
    kernel[0, 0] = np.nan
    model.layers[0].kernel.assign(kernel)
    la = ltf.Laplace(model, "classification", subset_of_weights="all",
                     hessian_structure="lowrank", rank=2)
    with pytest.raises(ValueError, match="NaN or Inf entries"):
        la.fit((x, targets("classification", 3, len(x))))


def test_the_monte_carlo_curvature_without_a_seed_is_that_of_seed_0():
    """``seed=None`` is documented as 0: two fits repeat the numbers."""
    model, x = tanh_mlp(3, n=20)
    y = targets("classification", 3, 20)
    precisions = []
    for seed in (None, None, 0):
        la = ltf.Laplace(model, "classification", subset_of_weights="all",
                         hessian_structure="kron", stochastic=True, seed=seed)
        la.fit((x, y))
        precisions.append(la.posterior_precision.to_dense().numpy())
    np.testing.assert_array_equal(precisions[0], precisions[1])
    np.testing.assert_array_equal(precisions[0], precisions[2])


def test_the_strategy_argument_is_checked_and_the_default_strategy_is_no_strategy():
    la, x, y = _fitted()
    expected = la.posterior_precision.to_dense().numpy()
    with pytest.raises(TypeError, match="strategy: expected a tf.distribute.Strategy"):
        la.fit((x, y), strategy="mirrored")
    la.fit((x, y), strategy=tf.distribute.get_strategy())
    np.testing.assert_array_equal(la.posterior_precision.to_dense().numpy(), expected)


def test_a_model_with_weights_of_two_dtypes_is_refused():
    model = keras.Sequential([keras.Input((2,), dtype=F64), keras.layers.Dense(3, dtype=F64),
                              keras.layers.Dense(2, dtype="float32")])
    with pytest.raises(ValueError, match="several dtypes"):
        ltf.Laplace(model, "classification", subset_of_weights="all")


def test_a_list_output_model_is_refused_for_the_last_layer_as_for_all_weights():
    inputs = keras.Input((3,), dtype=F64)
    hidden = keras.layers.Dense(4, "tanh", dtype=F64)(inputs)
    model = keras.Model(inputs, [keras.layers.Dense(2, dtype=F64)(hidden),
                                 keras.layers.Dense(3, dtype=F64)(hidden)])
    x = np.random.default_rng(0).normal(size=(6, 3))
    for subset in ("all", "last_layer"):
        la = ltf.Laplace(model, "classification", subset_of_weights=subset)
        with pytest.raises(ValueError, match="one output tensor"):
            la.fit((x, np.zeros(6, int)))


@pytest.mark.parametrize("structure, options", [("lowrank", {"rank": 3}), ("gp", {})])
def test_a_last_layer_low_rank_or_gp_posterior_needs_the_head_to_give_the_output(
        structure, options):
    """Their fits take autodiff rows (right), but the predictive's last-layer closed form
    assumed the head's output is the model's: behind a Rescaling(2) the variance came out 4x
    too small. Refused, as the full, Kronecker and diagonal fits refuse such a model."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,), dtype=F64),
                              keras.layers.Dense(4, "tanh", dtype=F64),
                              keras.layers.Dense(2, dtype=F64),
                              keras.layers.Rescaling(2.0, dtype=F64)])
    x = np.random.default_rng(0).normal(size=(8, 3))
    la = ltf.Laplace(model, "regression", subset_of_weights="last_layer",
                     hessian_structure=structure, **options)
    la.fit((x, np.zeros((8, 2))))
    for predict in (la.functional_variance, la, lambda x: la.predictive_samples(x, 4)):
        with pytest.raises(ValueError, match="not the pre-activation output"):
            predict(x)


def test_a_run_tuning_by_the_evidence_takes_any_predictive_link():
    """The run passed its predictive's link to every tuning method, and the evidence's now
    refuses what it does not use: a config with the bridge link and marglik tuning failed."""
    from laplace_tf import config as cfg
    from laplace_tf.data import Split
    from laplace_tf.run import RunData, fit_laplace

    model, x = tanh_mlp(3, n=10)
    y = targets("classification", 3, 10)
    config = cfg.from_dict({"data": {"train": "a.npz"}, "laplace": {
        "likelihood": "classification", "subset_of_weights": "all",
        "hessian_structure": "diag", "optimize_prior": "marglik"},
        "predictive": {"link_approx": "bridge"}})
    data = RunData("classification", Split(x, y), None, Split(x, y), None)
    la = fit_laplace(model, config, data, progress=False, log=lambda message: None)
    assert la.tuning_trace["prior_precision"].shape == (101,)
