"""The low-rank posterior (``hessian_structure="lowrank"``) against dense brute-force references.

With ``rank = P`` it is the full GGN posterior; with ``rank < P`` its curvature is the top
``rank`` eigenpairs of the dense GGN (or EF) of :mod:`laplace_tf.testing`.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import scipy.stats
import tensorflow as tf
from cases import (
    Case,
    ReferenceNLL,
    logit_model,
    reference_glm,
    reference_log_evidence,
    reference_precision,
    table,
)
from models import tanh_mlp

import laplace_tf as ltf
from laplace_tf import testing
from laplace_tf.batches import Batches
from laplace_tf.curvature import make_builder
from laplace_tf.curvature.base import fit_curvature
from laplace_tf.likelihoods import get_likelihood

FULL_RANK = 10**6  # capped at P


def _fit(case: Case, model, x, y, **kwargs) -> ltf.Laplace:
    la = ltf.Laplace(model, case.likelihood, case.subset, "lowrank", progress=False, **kwargs)
    la.fit((x, y))
    return la


def _top(matrix: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Descending top-``k`` eigenvalues and eigenvectors of a symmetric matrix."""
    values, vectors = np.linalg.eigh(matrix)
    return values[::-1][:k], vectors[:, ::-1][:, :k]


@pytest.mark.parametrize("case", table(
    ("tanh_mlp", "classification", "all", "full"),
    ("tanh_mlp", "regression", "all", "full"),
    ("small_cnn", "binary", "all", "full"),
    ("two_input", "classification", "last_layer", "full"),
))
def test_full_rank_equals_the_dense_ggn_posterior(case):
    model, x, y = case.build(n=8)
    prior = 0.7
    la = _fit(case, model, x, y, rank=FULL_RANK, prior_precision=prior)
    precision = reference_precision(case, model, x, y, prior=prior)
    assert la.curvature.blocks[0].root.shape[0] == precision.shape[0]
    np.testing.assert_allclose(la.posterior_precision.to_dense(), precision, atol=1e-10)
    np.testing.assert_allclose(float(la.log_marginal_likelihood()),
                               reference_log_evidence(case, model, x, y, precision, prior=prior),
                               rtol=1e-10)
    expected = reference_glm(case, model, x, precision)
    got = la(x, pred_type="glm", link_approx="probit")
    for g, e in zip(got if isinstance(got, tuple) else [got],
                    expected if isinstance(expected, tuple) else [expected], strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-9, atol=1e-12)


def test_full_rank_matches_full_for_layerwise_and_per_weight_priors_and_tuning():
    case = Case("tanh_mlp", "regression", "all", "full")
    model, x, y = case.build(n=8)
    full = ltf.Laplace(model, "regression", "all", "full", progress=False)
    full.fit((x, y))
    la = _fit(case, model, x, y, rank=FULL_RANK)
    for prior in ([0.3, 2.0], np.linspace(0.5, 3.0, la.n_params)):
        precision = reference_precision(case, model, x, y, prior=prior)
        la.prior_precision = prior
        np.testing.assert_allclose(la.posterior_precision.to_dense(), precision, atol=1e-10)
        np.testing.assert_allclose(
            float(la.log_marginal_likelihood()),
            reference_log_evidence(case, model, x, y, precision, prior=prior), rtol=1e-10)
    la.prior_precision = full.prior_precision = 1.0
    for method in ("marglik",):
        tuned_full = full.optimize_prior_precision(method, progress=False, n_steps=30)
        tuned = la.optimize_prior_precision(method, progress=False, n_steps=30)
        np.testing.assert_allclose(la.prior_precision, full.prior_precision, rtol=1e-8)
        np.testing.assert_allclose(la.sigma_noise, full.sigma_noise, rtol=1e-8)
        assert tuned.keys() == tuned_full.keys()


@pytest.mark.parametrize("kind", ["ggn", "ef"])
def test_rank_k_eigenpairs_are_the_dense_top_k(kind):
    """A full-rank curvature (N K > P) with a gap after the 4th eigenvalue: the sketch with
    power iterations finds the top 4 eigenvalues and their subspace."""
    case = Case("tanh_mlp", "classification", "all", "full")
    model, x, y = case.build(n=40)
    f = logit_model(case, model)
    likelihood = get_likelihood("classification")
    brute_force = testing.brute_force_ggn if kind == "ggn" else testing.brute_force_ef
    reference = brute_force(f, ReferenceNLL("classification"), x, y)
    values, vectors = _top(reference, 4)
    builder = make_builder("all", "lowrank", f, likelihood, kind, rank=4, oversampling=6,
                           power_iterations=4, seed=3)
    block = fit_curvature(builder, Batches((x, y), 16, dtype=tf.float64, progress=False)).blocks[0]
    factor = block.factorize()
    np.testing.assert_allclose(factor.eigenvalues.numpy()[::-1], values, rtol=1e-10)
    basis = factor.basis.numpy()
    np.testing.assert_allclose(basis @ basis.T, vectors @ vectors.T, atol=1e-7)
    np.testing.assert_allclose(builder.captured_fraction, values.sum() / np.trace(reference),
                               rtol=1e-10)
    one_pass = make_builder("all", "lowrank", f, likelihood, kind, rank=4, oversampling=6,
                            power_iterations=0, seed=3)
    fit_curvature(one_pass, Batches((x, y), 16, dtype=tf.float64, progress=False))
    assert one_pass.passes == 1 and builder.passes == 5  # the extra passes are what converge


def test_rank_k_through_laplace_is_the_truncated_ggn():
    """N K = 6 < rank + oversampling: the sketch spans the GGN's range, so rank 4 is exactly
    the top-4 truncation ``U_4 diag(s_4) U_4^T`` of the dense GGN."""
    case = Case("tanh_mlp", "classification", "all", "full")
    model, x, y = case.build(n=2)
    ggn = testing.brute_force_ggn(logit_model(case, model), ReferenceNLL("classification"), x, y)
    values, vectors = _top(ggn, 4)
    la = _fit(case, model, x, y, rank=4, prior_precision=0.5)
    precision = vectors @ np.diag(values) @ vectors.T + 0.5 * np.eye(la.n_params)
    np.testing.assert_allclose(la.posterior_precision.to_dense(), precision, atol=1e-10)
    np.testing.assert_allclose(
        float(la.log_marginal_likelihood()),
        reference_log_evidence(case, model, x, y, precision, prior=0.5), rtol=1e-10)
    points = la.mean.numpy() + np.random.default_rng(0).normal(size=(3, la.n_params))
    np.testing.assert_allclose(
        la.posterior.log_prob(points),
        scipy.stats.multivariate_normal(la.mean.numpy(), np.linalg.inv(precision)).logpdf(points),
        rtol=1e-10)
    np.testing.assert_allclose(la.posterior.stddev(), np.sqrt(np.diag(np.linalg.inv(precision))),
                               rtol=1e-10)
    samples = la.sample(20000, seed=1).numpy()
    testing.assert_gaussian_moments(samples[:, None, :4], la.mean.numpy()[None, :4],
                                    np.linalg.inv(precision)[None, :4, :4])


def test_the_seed_fixes_the_sketch():
    case = Case("tanh_mlp", "regression", "all", "full")
    model, x, y = case.build(n=20)
    roots = [_fit(case, model, x, y, rank=3, seed=seed).curvature.blocks[0].root.numpy()
             for seed in (5, 5, 6)]
    np.testing.assert_array_equal(roots[0], roots[1])
    assert np.abs(np.abs(roots[0]) - np.abs(roots[2])).max() > 1e-9  # another start


def test_save_and_load_keep_the_posterior_and_the_rank(tmp_path):
    case = Case("tanh_mlp", "classification", "all", "full")
    model, x, y = case.build(n=12)
    la = _fit(case, model, x, y, rank=5, prior_precision=[0.5, 2.0])
    path = tmp_path / "lowrank.npz"
    la.save(path)
    loaded = ltf.load(path, model)
    assert loaded.hessian_structure == "lowrank" and loaded.rank == 5
    np.testing.assert_array_equal(loaded.posterior_precision.to_dense(),
                                  la.posterior_precision.to_dense())
    np.testing.assert_array_equal(loaded(x), la(x))


def test_memory_estimate_is_order_p_k_and_refuses_above_the_limit():
    case = Case("tanh_mlp", "classification", "all", "full")
    model, x, y = case.build(n=4)
    small = ltf.Laplace(model, "classification", "all", "lowrank", rank=2, progress=False)
    large = ltf.Laplace(model, "classification", "all", "lowrank", rank=4, progress=False)
    p, itemsize = small.n_params, 8
    for la, k in ((small, 2), (large, 4)):
        parts = la.memory_estimate().parts
        assert parts["curvature"] == p * k * itemsize
        assert parts["factor"] == (p * k + k * k) * itemsize
    tight = ltf.Laplace(model, "classification", "all", "lowrank", rank=2, progress=False,
                        memory_limit_bytes=1000)
    with pytest.raises(ValueError, match="lowrank.*memory_limit_bytes"):
        tight.fit((x, y))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(hessian_structure="lowrank", rank=0), ValueError, "rank"),
    (dict(hessian_structure="lowrank", rank=2.5), TypeError, "rank"),
    (dict(hessian_structure="kron", rank=3), ValueError, "rank: only used with"),
    (dict(hessian_structure="lowrank", curvature="hessian"), ValueError, "lowrank"),
    (dict(hessian_structure="lowrank", likelihood="regression", sigma_noise=[1.0, 2.0]),
     ValueError, "sigma_noise: hessian_structure='lowrank' takes a scalar"),
])
def test_bad_arguments_are_refused(kwargs, error, match):
    model, _ = tanh_mlp(2)
    kwargs = {"likelihood": "classification", "subset_of_weights": "all", **kwargs}
    with pytest.raises(error, match=match):
        ltf.Laplace(model, progress=False, **kwargs)


def test_a_scalar_sigma_noise_rescales_and_a_per_output_one_is_refused():
    case = Case("tanh_mlp", "regression", "all", "full")
    model, x, y = case.build(n=6)
    la = _fit(case, model, x, y, rank=FULL_RANK)
    with pytest.raises(ValueError, match="scalar sigma_noise"):
        la.sigma_noise = [1.0, 2.0]
    la.sigma_noise = 2.0
    np.testing.assert_allclose(la.posterior_precision.to_dense(),
                               reference_precision(case, model, x, y, sigma=2.0), atol=1e-10)


def test_a_run_config_with_lowrank_and_rank_builds_that_posterior():
    from laplace_tf import config as cfg
    from laplace_tf.data import Split
    from laplace_tf.run import RunData, fit_laplace

    case = Case("tanh_mlp", "classification", "all", "full")
    model, x, y = case.build(n=10)
    config = cfg.from_dict({"data": {"train": "a.npz"}, "laplace": {
        "likelihood": "classification", "subset_of_weights": "all",
        "hessian_structure": "lowrank", "rank": 3, "optimize_prior": "none"}})
    data = RunData("classification", Split(x, y), None, Split(x, y), None)
    la = fit_laplace(model, config, data, progress=False, log=lambda message: None)
    assert (la.hessian_structure, la.rank, la.curvature.blocks[0].root.shape[0]) == ("lowrank", 3, 3)


def test_sample_weights_count_as_copies():
    case = Case("small_cnn", "classification", "all", "full")
    model, x, y = case.build(n=5)
    weights = np.array([2.0, 0.0, 1.0, 3.0, 1.0])
    copies = np.repeat(np.arange(5), weights.astype(int))
    la = ltf.Laplace(model, "classification", "all", "lowrank", rank=FULL_RANK, progress=False)
    la.fit((x, y), sample_weight=weights)
    precision = reference_precision(case, model, x[copies], y[copies])
    np.testing.assert_allclose(la.posterior_precision.to_dense(), precision, atol=1e-10)


@pytest.mark.parametrize("options, error, match", [
    (dict(oversampling=-1), ValueError, "oversampling: expected an integer >= 0"),
    (dict(power_iterations="2"), TypeError, "power_iterations: expected an integer >= 0"),
    (dict(seed=1.5), TypeError, "seed: expected an integer or None"),
    (dict(rank=0), ValueError, "rank: expected a positive integer"),
])
def test_bad_builder_options_are_refused(options, error, match):
    model, _ = tanh_mlp(2)
    with pytest.raises(error, match=match):
        make_builder("all", "lowrank", logit_model(Case("tanh_mlp", "regression", "all", "full"),
                                                   model), get_likelihood("regression"), **options)


@pytest.mark.parametrize(("subset", "structure", "options"), [
    ("all", "gp", {"n_context": 100}), ("last_layer", "lowrank", {"rank": 20}),
])
def test_float32_functional_variance_on_a_weak_prior_matches_float64(subset, structure, options):
    """With a weak prior the functional variance is the small difference of two terms of
    about ``|J|^2 / prior``: float32 arithmetic there gave negative variances. The float32
    posterior agrees with a float64 copy of the same weights."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(800, 4))
    y = np.sin(x[:, :2]) + 0.1 * rng.normal(size=(800, 2))
    variances: list = []
    weights: list = []
    for dtype in ("float32", "float64"):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(10, "tanh", dtype=dtype),
                                  keras.layers.Dense(2, dtype=dtype)])
        weights = weights or model.get_weights()
        model.set_weights([w.astype(dtype) for w in weights])  # the float32 weights, exactly
        la = ltf.Laplace(model, "regression", subset, structure, prior_precision=1e-3,
                         sigma_noise=0.1, progress=False, **options)
        la.fit((x.astype(dtype), y), batch_size=400)
        variances.append(np.einsum("nkk->nk", np.asarray(la.functional_variance(x[:100]),
                                                          np.float64)))
    single, double = variances
    assert double.min() > 0
    np.testing.assert_allclose(single, double, rtol=2e-3)
