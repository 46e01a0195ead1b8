"""The subnetwork Laplace (``subset_of_weights="subnetwork"``) and its selection rules.

Brute-force identities (float64): with every index it is the full posterior over all weights;
with some indices its curvature is the dense GGN / EF / Hessian restricted to their rows and
columns, its GLM predictive is ``J_S Sigma_S J_S^T`` from the explicit Jacobian's columns and
its evidence the Laplace evidence over those weights; weight samples leave the other weights
at the MAP.
"""

from __future__ import annotations

import math
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import laplace_tf as ltf
from laplace_tf import subnetwork, testing
from laplace_tf.cli import main
from laplace_tf.config import from_dict
from laplace_tf.models import mlp
from laplace_tf.params import SubnetworkSubset, WeightSubset
from tests import zoo
from tests.cases import ReferenceNLL
from tests.models import small_cnn, tanh_mlp, targets

N = 8
# tanh_mlp with 3 outputs: Dense(3 -> 4) weights 0..15, Dense(4 -> 3) weights 16..30
SOME = np.array([23, 1, 5, 14, 16, 20, 25])  # parts of both layers, unsorted
ONE_WHOLE_LAYER = np.r_[2, 7, 16:31]  # part of the first layer and all of the second


def _setup(likelihood="classification", n_outputs=3, build=tanh_mlp):
    model, x = build(n_outputs, n=N)
    return model, x, targets(likelihood, n_outputs, N)


def _laplace(model, likelihood, indices, **kwargs):
    return ltf.Laplace(model, likelihood, "subnetwork", "full", progress=False,
                       subnetwork_indices=indices, **kwargs)


def _reference_curvature(kind, model, likelihood, x, y, sigma=1.0):
    f, nll = testing.subset_of(model), ReferenceNLL(likelihood, sigma)
    brute = {"ggn": testing.brute_force_ggn, "ef": testing.brute_force_ef,
             "hessian": testing.brute_force_hessian}[kind]
    return brute(f, nll, tf.constant(x), y)


def _all_weights(model) -> np.ndarray:
    return np.concatenate([np.ravel(v.numpy()) for v in model.trainable_variables])


# ------------------------------------------------------------------ every index = full
def test_every_index_equals_the_full_posterior_over_all_weights():
    model, x, y = _setup()
    n_params = WeightSubset(model).n_params
    prior = [0.5, 2.0]  # per layer
    full = ltf.Laplace(model, "classification", "all", "full", prior_precision=prior,
                       progress=False)
    sub = _laplace(model, "classification", np.arange(n_params)[::-1], prior_precision=prior)
    full.fit((x, y))
    sub.fit((x, y))
    assert sub.n_params == n_params
    np.testing.assert_allclose(sub.posterior_precision.to_dense(),
                               full.posterior_precision.to_dense(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sub.log_marginal_likelihood(), full.log_marginal_likelihood(),
                               rtol=1e-12)
    np.testing.assert_allclose(sub.functional_variance(x), full.functional_variance(x),
                               rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(sub(x), full(x), rtol=1e-12)


# ------------------------------------------------------------------ some indices
@pytest.mark.parametrize("kind", ["ggn", "ef", "hessian"])
@pytest.mark.parametrize("indices", [SOME, ONE_WHOLE_LAYER], ids=["parts", "whole_layer"])
def test_curvature_is_the_dense_one_restricted_to_the_chosen_weights(kind, indices):
    model, x, y = _setup()
    la = _laplace(model, "classification", indices, curvature=kind, on_indefinite="clip")
    with warnings.catch_warnings():  # the exact Hessian may be indefinite: clipped
        warnings.simplefilter("ignore")
        la.fit((x, y))
    chosen = np.sort(indices)
    reference = _reference_curvature(kind, model, "classification", x, y)[np.ix_(chosen, chosen)]
    np.testing.assert_allclose(la.curvature.blocks[0].matrix, reference, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(la.mean, _all_weights(model)[chosen])


def test_conv_and_dense_parts_give_the_restricted_ggn_and_jacobian_columns():
    model, x, y = _setup("regression", 2, small_cnn)
    n_params = WeightSubset(model).n_params
    chosen = np.sort(np.random.default_rng(3).choice(n_params, 12, replace=False))
    la = _laplace(model, "regression", chosen, prior_precision=0.7)
    la.fit((x, y))
    ggn = _reference_curvature("ggn", model, "regression", x, y)[np.ix_(chosen, chosen)]
    np.testing.assert_allclose(la.curvature.blocks[0].matrix, ggn, rtol=1e-10, atol=1e-12)
    jac = testing.brute_force_jacobians(testing.subset_of(model), x)[:, :, chosen]
    sigma = np.linalg.inv(ggn + 0.7 * np.eye(chosen.size))
    np.testing.assert_allclose(la.functional_variance(x),
                               testing.dense_functional_variance(jac, sigma), rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("likelihood, n_outputs", [("classification", 3), ("regression", 2)])
def test_glm_predictive_and_evidence_are_the_full_ones_with_the_other_variances_zero(
        likelihood, n_outputs):
    model, x, y = _setup(likelihood, n_outputs)
    prior, sigma = 1.5, 0.8
    kwargs = {"sigma_noise": sigma} if likelihood == "regression" else {}
    la = _laplace(model, likelihood, SOME, prior_precision=prior, **kwargs)
    la.fit((x, y))
    chosen = np.sort(SOME)
    ggn = _reference_curvature("ggn", model, likelihood, x, y, sigma)
    precision = ggn[np.ix_(chosen, chosen)] + prior * np.eye(chosen.size)
    # the full posterior's covariance with every other weight's variance set to zero
    covariance = np.zeros_like(ggn)
    covariance[np.ix_(chosen, chosen)] = np.linalg.inv(precision)
    f = testing.subset_of(model)
    jac = testing.brute_force_jacobians(f, x)
    variance = testing.dense_functional_variance(jac, covariance)
    np.testing.assert_allclose(la.functional_variance(x), variance, rtol=1e-9, atol=1e-13)
    mu, diag = np.asarray(f(x)), np.diagonal(variance, axis1=1, axis2=2)
    if likelihood == "regression":
        mean, var = la(x)
        np.testing.assert_allclose(mean, mu, rtol=1e-12)
        np.testing.assert_allclose(var, diag + sigma**2, rtol=1e-10)
    else:
        scaled = mu / np.sqrt(1 + math.pi / 8 * diag)
        expected = np.exp(scaled) / np.exp(scaled).sum(-1, keepdims=True)
        np.testing.assert_allclose(la(x), expected, rtol=1e-10)
    theta = _all_weights(model)[chosen]
    nll = float(ReferenceNLL(likelihood, sigma).nll(f(x), y))
    evidence = (-nll - 0.5 * prior * theta @ theta + 0.5 * chosen.size * np.log(prior)
                - 0.5 * np.linalg.slogdet(precision)[1])
    np.testing.assert_allclose(la.log_marginal_likelihood(), evidence, rtol=1e-10)


def test_a_per_output_noise_changes_like_a_fresh_fit_at_the_new_noise():
    model, x, y = _setup("regression", 2)
    la = _laplace(model, "regression", SOME, sigma_noise=[0.7, 1.3], prior_precision=2.0)
    la.fit((x, y))
    sigma = np.array([0.4, 2.0])
    fresh = _laplace(model, "regression", SOME, sigma_noise=sigma, prior_precision=2.0)
    fresh.fit((x, y))
    chosen = np.sort(SOME)
    ggn = _reference_curvature("ggn", model, "regression", x, y, sigma)[np.ix_(chosen, chosen)]
    np.testing.assert_allclose(fresh.curvature.blocks[0].matrix, ggn, rtol=1e-10, atol=1e-12)
    la.sigma_noise = sigma  # rebuilt from the per-output curvatures of the fit, not refitted
    np.testing.assert_allclose(la.curvature.blocks[0].matrix, ggn, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(la.log_marginal_likelihood(), fresh.log_marginal_likelihood(),
                               rtol=1e-10)


@pytest.mark.parametrize("name", ["transformer", "text"])
def test_zoo_models_with_weights_of_every_kind_of_layer(name):
    """Embeddings, attention, LayerNorm, Dense (float32): a few weights of each layer."""
    model, x, y = zoo.ZOO[name](n=6) if name == "transformer" else zoo.ZOO[name]()
    everything = WeightSubset(model)
    chosen = np.sort(np.concatenate([
        s.offset + np.random.default_rng(s.offset).choice(s.size, min(3, s.size), replace=False)
        for s in everything.slices]))
    la = _laplace(model, "classification", chosen, prior_precision=0.5)
    la.fit((x, y), batch_size=4)
    f = testing.subset_of(model)
    ggn = testing.brute_force_ggn(f, ReferenceNLL("classification"), x, y)[np.ix_(chosen, chosen)]
    scale = np.abs(ggn).max()
    np.testing.assert_allclose(la.curvature.blocks[0].matrix, ggn, rtol=1e-4, atol=1e-5 * scale)
    jac = testing.brute_force_jacobians(f, x)[:, :, chosen].astype(np.float64)
    covariance = np.linalg.inv(ggn.astype(np.float64) + 0.5 * np.eye(chosen.size))
    expected = testing.dense_functional_variance(jac, covariance)
    np.testing.assert_allclose(la.functional_variance(x), expected, rtol=1e-3,
                               atol=1e-4 * np.abs(expected).max())


def test_nn_samples_change_only_the_chosen_weights():
    model, x, y = _setup("regression", 2)
    before = _all_weights(model)
    la = _laplace(model, "regression", SOME, prior_precision=2.0)
    la.fit((x, y))
    samples = np.asarray(la.sample(3, seed=4))
    assert samples.shape == (3, SOME.size)
    outputs = la.predictive_samples(x, n_samples=3, seed=4, pred_type="nn")
    everything = WeightSubset(model)
    f = testing.subset_of(model)
    for sample, output in zip(samples, np.asarray(outputs), strict=True):
        theta = before.copy()
        theta[np.sort(SOME)] = sample
        np.testing.assert_allclose(output, f(x, everything.unflatten(tf.constant(theta))),
                                   rtol=1e-12)
    np.testing.assert_array_equal(_all_weights(model), before)  # the model is untouched


def test_unflatten_puts_the_chosen_entries_into_the_map_exactly():
    model, _, _ = _setup()
    subset = SubnetworkSubset(model, SOME)
    flat = tf.constant(np.arange(2 * SOME.size, dtype=np.float64).reshape(2, -1))
    expected = np.tile(_all_weights(model), (2, 1))
    expected[:, np.sort(SOME)] = flat.numpy()
    got = np.concatenate([np.reshape(t, (2, -1)) for t in subset.unflatten(flat)], axis=1)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(subset.flatten(subset.unflatten(flat[0])), flat[0])
    assert [(s.name, s.offset, s.size) for s in subset.slices] == [
        (model.layers[0].name, 0, 3), (model.layers[1].name, 3, 4)]


def test_prior_tuning_by_marglik_and_gridsearch():
    model, x, y = _setup()
    la = _laplace(model, "classification", SOME)
    la.fit((x, y))
    la.optimize_prior_precision("marglik", n_steps=300, lr=0.1)
    tuned = float(la.prior_precision)
    best = float(la.log_marginal_likelihood())
    for factor in (0.9, 1.1):  # a maximum of the evidence over the prior
        assert float(la.log_marginal_likelihood(tuned * factor)) < best
    la.optimize_prior_precision("marglik", prior_structure="layerwise", n_steps=20)
    assert la.prior_precision.shape == (2,)  # the two layers holding chosen weights
    grid = [1e-2, 1.0, 1e2]
    xv, yv = x[:4], y[:4]
    nlls = []
    for prior in grid:
        la.prior_precision = prior
        nlls.append(-np.sum(np.log(np.asarray(la(xv))[np.arange(4), yv])))
    la.optimize_prior_precision("gridsearch", grid=grid, val_data=(xv, yv))
    assert float(la.prior_precision) == grid[int(np.argmin(nlls))]


def test_save_and_load_keep_the_subnetwork(tmp_path):
    model, x, y = _setup()
    la = _laplace(model, "classification", SOME, prior_precision=0.3)
    la.fit((x, y))
    la.save(tmp_path / "posterior.npz")
    loaded = ltf.load(tmp_path / "posterior.npz", model)
    np.testing.assert_array_equal(loaded.subnetwork_indices, np.sort(SOME))
    assert loaded.subset_of_weights == "subnetwork" and loaded.n_params == SOME.size
    np.testing.assert_allclose(loaded(x), la(x), rtol=1e-12)
    np.testing.assert_allclose(loaded.log_marginal_likelihood(), la.log_marginal_likelihood())


def test_memory_estimate_is_of_the_chosen_weights():
    model, _, _ = _setup()
    estimate = _laplace(model, "classification", SOME).memory_estimate()
    assert estimate.n_params == SOME.size
    assert estimate.parts["curvature"] == SOME.size**2 * 8
    with pytest.raises(ValueError, match="fewer subnetwork_indices"):
        _laplace(model, "classification", SOME, memory_limit_bytes=100).fit(
            (np.zeros((2, 3)), np.zeros(2, int)))


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("indices, error, message", [
    ([3, 3, 5], ValueError, r"subnetwork_indices: every index must appear once; repeated: \[3\]"),
    ([0, 31], ValueError, r"subnetwork_indices: indices must be in \[0, 31\).*\[31\]"),
    ([-1], ValueError, r"subnetwork_indices: indices must be in"),
    ([], ValueError, "subnetwork_indices: expected at least one weight index"),
    ([1.0, 2.0], TypeError, "subnetwork_indices: expected integer indices"),
    ([True, False], TypeError, "np.flatnonzero"),
    ([[1, 2]], ValueError, "subnetwork_indices: expected a 1-D array"),
])
def test_bad_indices_are_refused(indices, error, message):
    model, _, _ = _setup()
    with pytest.raises(error, match=message):
        _laplace(model, "classification", indices)


def test_subnetwork_settings_that_do_not_go_together_are_refused():
    model, _, _ = _setup()
    with pytest.raises(ValueError, match="subnetwork_indices: give them with subset_of_weights="
                                         "'subnetwork', and only then"):
        ltf.Laplace(model, "classification", "all", "full", subnetwork_indices=[1])
    with pytest.raises(ValueError, match="subnetwork_indices: give them"):
        ltf.Laplace(model, "classification", "subnetwork", "full")
    with pytest.raises(ValueError, match=r"hessian_structure: subset_of_weights='subnetwork' "
                                         r"takes 'full' \(.*\); got 'diag'"):
        ltf.Laplace(model, "classification", "subnetwork", "diag", subnetwork_indices=[1])


# ------------------------------------------------------------------ selection rules
def test_largest_variance_picks_the_top_variances_of_an_independent_diagonal_posterior():
    model, x, y = _setup()
    la = ltf.Laplace(model, "classification", "all", "diag", prior_precision=0.5, progress=False)
    la.fit((x, y))
    ggn = _reference_curvature("ggn", model, "classification", x, y)
    variance = 1.0 / (np.diag(ggn) + 0.5)
    order = np.argsort(-variance)
    assert variance[order[5]] > variance[order[6]] * (1 + 1e-6)  # no tie at the cut
    np.testing.assert_array_equal(subnetwork.largest_variance(la, 6), np.sort(order[:6]))
    for subset, structure in (("last_layer", "diag"), ("all", "kron")):
        other = ltf.Laplace(model, "classification", subset, structure, progress=False)
        with pytest.raises(ValueError, match=f"la: largest_variance ranks .* got subset_of_"
                                             f"weights='{subset}', hessian_structure="
                                             f"'{structure}'"):
            subnetwork.largest_variance(other, 3)


def test_largest_magnitude_random_and_layer_rules():
    model, _, _ = _setup()
    weights = np.concatenate([np.ravel(w) for w in model.get_weights()])
    chosen = subnetwork.largest_magnitude(model, 5)
    assert chosen.dtype == np.int64
    np.testing.assert_array_equal(chosen, np.sort(np.argsort(-np.abs(weights))[:5]))
    first, again = subnetwork.random_weights(model, 9, seed=7), subnetwork.random_weights(
        model, 9, seed=7)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, subnetwork.random_weights(model, 9, seed=8))
    assert first.dtype == np.int64 and np.all(np.diff(first) > 0)
    assert first[0] >= 0 and first[-1] < weights.size
    head = model.layers[1]
    np.testing.assert_array_equal(subnetwork.layer_weights(model, [head.name]), np.arange(16, 31))
    np.testing.assert_array_equal(subnetwork.layer_weights(model, [head, model.layers[0]]),
                                  np.arange(31))
    with pytest.raises(ValueError, match="layers: 'nope' is not a layer of the model"):
        subnetwork.layer_weights(model, ["nope"])
    with pytest.raises(ValueError, match="n: expected at most the model's 31 weights; got 32"):
        subnetwork.largest_magnitude(model, 32)
    with pytest.raises(TypeError, match="n: expected a positive integer"):
        subnetwork.random_weights(model, 2.5)
    with pytest.raises(ValueError, match="seed: expected an integer >= 0; got -1"):
        subnetwork.random_weights(model, 2, seed=-1)
    for bad in (None, [0]):
        with pytest.raises(TypeError, match="layers: expected layer names or Keras layers"):
            subnetwork.layer_weights(model, bad)
    nan_weights = [w.copy() for w in model.get_weights()]
    nan_weights[0][0, 0] = np.nan
    model.set_weights(nan_weights)
    with pytest.raises(ValueError, match="model: its weights contain NaN or infinite values "
                                         r"\(e.g. index 0\)"):
        subnetwork.largest_magnitude(model, 3)


def test_layer_rule_takes_nested_models_and_refuses_a_name_two_layers_share():
    def block(name):
        return keras.Sequential([keras.layers.Dense(2, name="d")], name=name)
    inputs = keras.Input((3,))
    first, second = block("first"), block("second")
    model = keras.Model(inputs, second(first(inputs)))   # first: 3*2+2 weights, second: 2*2+2
    np.testing.assert_array_equal(subnetwork.layer_weights(model, ["second"]), np.arange(8, 14))
    np.testing.assert_array_equal(subnetwork.layer_weights(model, [first]), np.arange(8))
    np.testing.assert_array_equal(subnetwork.layer_weights(model, [second.layers[0]]),
                                  np.arange(8, 14))
    with pytest.raises(ValueError, match="layers: 2 layers of the model are called 'd'"):
        subnetwork.layer_weights(model, ["d"])


# ------------------------------------------------------------------ config and command line
def test_config_refuses_a_subnetwork_without_its_rule_or_with_another_structure():
    base = {"data": {"dataset": "sine_1d"}}
    with pytest.raises(ValueError, match="laplace.subnetwork: a rule"):
        from_dict({**base, "laplace": {"subset_of_weights": "subnetwork",
                                       "hessian_structure": "full"}})
    with pytest.raises(ValueError, match="laplace.subnetwork: a rule"):
        from_dict({**base, "laplace": {"subnetwork": "random"}})
    with pytest.raises(ValueError, match="laplace.hessian_structure: subset_of_weights "
                                         "'subnetwork' takes 'full'"):
        from_dict({**base, "laplace": {"subset_of_weights": "subnetwork",
                                       "subnetwork": "random"}})


def test_fit_command_refuses_a_subnetwork_larger_than_the_model_before_training(tmp_path):
    from laplace_tf import run

    config = from_dict({"data": {"dataset": "sine_1d"}, "model": {"hidden": [4]},
                        "laplace": {"subset_of_weights": "subnetwork", "hessian_structure": "full",
                                    "subnetwork": "random", "subnetwork_size": 200}})
    model = mlp((1,), 1, [4], "tanh", "float32", 0)   # 13 weights
    with pytest.raises(ValueError, match="laplace.subnetwork_size: expected at most the "
                                         "model's 13 weights; got 200"):
        run._check_subnetwork_size(config, model)


def test_fit_command_with_a_largest_variance_subnetwork_then_report(tmp_path):
    fit_out = tmp_path / "fit"
    assert main(["fit", "--dataset", "sine_1d", "--epochs", "2", "--hidden", "8",
                 "--subset-of-weights", "subnetwork", "--hessian-structure", "full",
                 "--subnetwork", "largest_variance", "--subnetwork-size", "10",
                 "--optimize-prior", "none", "--out", str(fit_out), "--quiet"]) == 0
    model = keras.models.load_model(fit_out / "model.keras")
    la = ltf.load(fit_out / "posterior.npz", model)
    assert la.n_params == 10
    train = ltf.data.load("sine_1d", seed=0).train
    diagonal = ltf.Laplace(model, "regression", "all", "diag", batch_size=64, progress=False)
    diagonal.fit((train.x, train.y))
    np.testing.assert_array_equal(la.subnetwork_indices,
                                  subnetwork.largest_variance(diagonal, 10))
    test = ltf.data.load("sine_1d", seed=0).test
    np.savez(tmp_path / "test.npz", x=test.x, y=test.y)
    assert main(["report", str(fit_out / "posterior.npz"), "--model", str(fit_out / "model.keras"),
                 "--test", str(tmp_path / "test.npz"), "--out", str(tmp_path / "report"),
                 "--quiet"]) == 0
    assert (tmp_path / "report" / "report.html").is_file()
