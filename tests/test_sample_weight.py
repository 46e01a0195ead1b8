"""Sample weights are replication counts: fitting with integer weights equals fitting on the
data with every example repeated that many times (weight 0: dropped), for every curvature
builder, structure, curvature kind and likelihood, to float64 round-off."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from models import MODELS, N_OUTPUTS, targets

import laplace_tf as ltf
from laplace_tf.blocks import KronBlock

WEIGHTS = np.array([2, 0, 1, 3, 1, 0, 1])
EXACT = {"rtol": 1e-9, "atol": 1e-11}
LIKELIHOODS = tuple(N_OUTPUTS)

CASES = (
    [("tanh_mlp", "all", "full", kind, lik) for kind in ("ggn", "ef", "hessian")
     for lik in LIKELIHOODS]
    + [("with_batchnorm", "all", s, kind, lik) for s in ("diag", "kron") for kind in ("ggn", "ef")
       for lik in LIKELIHOODS]  # kron: the BatchNorm layer takes the exact-diagonal fallback
    + [("small_cnn", "all", "kron", "ggn", "classification")]  # several locations per example
    + [("tanh_mlp", "last_layer", s, kind, lik) for s in ("full", "kron", "diag")
       for kind in ("ggn", "ef") for lik in LIKELIHOODS]  # "hessian" is the GGN's code there
)


def _laplace(model_name: str, subset: str, structure: str, kind: str, lik: str, **kw):
    model, x = MODELS[model_name](N_OUTPUTS[lik], n=len(WEIGHTS))
    la = ltf.Laplace(model, lik, subset_of_weights=subset, hessian_structure=structure,
                     curvature=kind, prior_precision=100.0 if kind == "hessian" else 0.7,
                     sigma_noise=0.6 if lik == "regression" else 1.0, **kw)
    return la, x, targets(lik, N_OUTPUTS[lik], len(x))


def assert_same_fit(weighted, replicated) -> None:
    """Curvature blocks, NLL, data count, residuals and evidence agree."""
    a, b = weighted.curvature, replicated.curvature
    for block_a, block_b in zip(a.blocks, b.blocks, strict=True):
        assert type(block_a) is type(block_b)
        if isinstance(block_a, KronBlock):  # the factors themselves, not only their product
            for part_a, part_b in zip(block_a, block_b, strict=True):
                np.testing.assert_allclose(part_a, part_b, **EXACT)
        np.testing.assert_allclose(block_a.to_dense(), block_b.to_dense(), **EXACT)
    np.testing.assert_allclose(a.nll, b.nll, **EXACT)
    assert a.n_data == pytest.approx(b.n_data, rel=1e-12)
    if b.residual_ss is not None:
        np.testing.assert_allclose(a.residual_ss, b.residual_ss, **EXACT)
    np.testing.assert_allclose(weighted.log_marginal_likelihood(),
                               replicated.log_marginal_likelihood(), **EXACT)


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_integer_weights_equal_replicated_examples(case):
    weighted, x, y = _laplace(*case)
    weighted.fit((x, y), sample_weight=WEIGHTS, batch_size=3)
    replicated, _, _ = _laplace(*case)
    replicated.fit((np.repeat(x, WEIGHTS, axis=0), np.repeat(y, WEIGHTS, axis=0)), batch_size=4)
    assert_same_fit(weighted, replicated)


def test_weighted_dataset_and_triple_equal_keyword():
    case = ("with_batchnorm", "all", "kron", "ggn", "regression")
    by_keyword, x, y = _laplace(*case)
    by_keyword.fit((x, y), sample_weight=WEIGHTS)
    by_triple, _, _ = _laplace(*case)
    by_triple.fit((x, y, WEIGHTS.astype(np.float32)))
    assert_same_fit(by_triple, by_keyword)
    by_dataset, _, _ = _laplace(*case)
    by_dataset.fit(tf.data.Dataset.from_tensor_slices((x, y, WEIGHTS)).batch(2))
    assert_same_fit(by_dataset, by_keyword)
    as_column, _, _ = _laplace(*case)  # [N, 1] weights, which Keras takes as [N]
    as_column.fit(tf.data.Dataset.from_tensor_slices((x, y, WEIGHTS[:, None])).batch(2))
    assert_same_fit(as_column, by_keyword)


def test_a_triple_with_no_weights_is_the_unweighted_pair():
    case = ("tanh_mlp", "all", "full", "ggn", "classification")
    pair, x, y = _laplace(*case)
    pair.fit((np.repeat(x, WEIGHTS, axis=0), np.repeat(y, WEIGHTS, axis=0)))
    triple, _, _ = _laplace(*case)
    triple.fit((np.repeat(x, WEIGHTS, axis=0), np.repeat(y, WEIGHTS, axis=0), None))
    assert not triple.curvature.n_data - len(np.repeat(y, WEIGHTS, axis=0))
    assert_same_fit(triple, pair)


def test_fractional_weights_scale_like_replication():
    """A uniform weight c multiplies every sum over data by c (n_data = c N, A unchanged)."""
    case = ("tanh_mlp", "last_layer", "kron", "ggn", "regression")
    half, x, y = _laplace(*case)
    half.fit((x, y), sample_weight=np.full(len(x), 0.5))
    plain, _, _ = _laplace(*case)
    plain.fit((x, y))
    assert half.curvature.n_data == pytest.approx(0.5 * len(x), rel=1e-12)
    np.testing.assert_allclose(half.curvature.blocks[0].A, plain.curvature.blocks[0].A, **EXACT)
    np.testing.assert_allclose(half.curvature.blocks[0].G, 0.5 * plain.curvature.blocks[0].G,
                               **EXACT)
    np.testing.assert_allclose(half.curvature.residual_ss, 0.5 * plain.curvature.residual_ss,
                               **EXACT)


def test_evidence_of_fractional_weights_is_exact_in_float64():
    """sum_n w_n log N(y_n | x_n theta, sigma^2) - lambda/2 |theta|^2 + P/2 log lambda
    - 1/2 log det(X^T W X / sigma^2 + lambda), the count sum_n w_n not rounded to float32."""
    import keras
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,), dtype="float64"),
                              keras.layers.Dense(1, dtype="float64")])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(15, 2))
    y = x @ [1.0, -1.0] + rng.normal(size=15)
    w, sigma = rng.uniform(0, 2, 15), 0.7
    la = ltf.Laplace(model, "regression", "all", "full", sigma_noise=sigma, progress=False)
    la.fit((x, y), sample_weight=w)
    theta = np.concatenate([v.numpy().ravel() for v in model.trainable_variables])
    design = np.c_[x, np.ones(15)]
    r = y - design @ theta
    loglik = np.sum(w * (-0.5 * r**2 / sigma**2 - np.log(sigma) - 0.5 * np.log(2 * np.pi)))
    precision = design.T @ (w[:, None] * design) / sigma**2 + np.eye(3)
    expected = loglik - 0.5 * theta @ theta - 0.5 * np.linalg.slogdet(precision)[1]
    assert float(la.log_marginal_likelihood()) == pytest.approx(expected, rel=1e-13)


def test_weighted_fit_survives_save_and_load(tmp_path):
    case = ("tanh_mlp", "last_layer", "kron", "ggn", "regression")
    la, x, y = _laplace(*case)
    la.fit((x, y), sample_weight=np.full(len(x), 0.5))
    la.save(tmp_path / "posterior.npz")
    loaded = ltf.load(tmp_path / "posterior.npz", la.model)
    assert loaded.curvature.n_data == pytest.approx(0.5 * len(x), rel=1e-12)
    np.testing.assert_allclose(loaded.log_marginal_likelihood(), la.log_marginal_likelihood(),
                               **EXACT)


def test_stochastic_kron_weights_scale_sampled_factors():
    """Monte-Carlo K-FAC draws one target per example, so replication changes the draws; with
    the same seed, a uniform integer weight c gives exactly c times the unweighted G."""
    case = ("with_batchnorm", "all", "kron", "ggn", "classification")
    weighted, x, y = _laplace(*case, stochastic=True, seed=3)
    weighted.fit((x, y), sample_weight=np.full(len(x), 3))
    plain, _, _ = _laplace(*case, stochastic=True, seed=3)
    plain.fit((x, y))
    for block_w, block in zip(weighted.curvature.blocks, plain.curvature.blocks, strict=True):
        if isinstance(block, KronBlock):
            np.testing.assert_allclose(block_w.A, block.A, **EXACT)
            np.testing.assert_allclose(block_w.G, 3 * block.G, **EXACT)
        else:  # the BatchNorm layer's dense block
            np.testing.assert_allclose(block_w.to_dense(), 3 * block.to_dense(), **EXACT)


@pytest.mark.parametrize(
    ("weights", "error", "match"),
    [
        (np.array([1, -1, 1, 1, 1, 1, 1]), ValueError, "sample_weight: expected finite, non-negative"),
        (np.array([1, np.nan, 1, 1, 1, 1, 1]), ValueError, "sample_weight: expected finite, non-negative"),
        (np.array([1, np.inf, 1, 1, 1, 1, 1]), ValueError, "sample_weight: expected finite, non-negative"),
        (np.ones(6), ValueError, r"sample_weight: expected one weight per example, shape \(7,\)"),
        (np.ones((7, 2)), ValueError, r"sample_weight: expected one weight per example"),
        (np.array(["a"] * 7), TypeError, "sample_weight: expected numbers"),
        (np.zeros(7), ValueError, "sample_weight: all sample weights are 0"),
    ],
    ids=["negative", "nan", "inf", "short", "matrix", "strings", "all-zero"],
)
def test_bad_weights_are_refused(weights, error, match):
    la, x, y = _laplace("tanh_mlp", "last_layer", "kron", "ggn", "regression")
    with pytest.raises(error, match=match):
        la.fit((x, y), sample_weight=weights)
    assert la.curvature is None


def test_bad_weights_in_a_dataset_name_the_batch():
    la, x, y = _laplace("tanh_mlp", "last_layer", "kron", "ggn", "regression")
    weights = np.array([1.0, 1, 1, -2, 1, 1, 1])
    with pytest.raises(ValueError, match="sample_weight: expected finite.*in batch 1"):
        la.fit(tf.data.Dataset.from_tensor_slices((x, y, weights)).batch(3))


def test_sample_weight_keyword_only_with_a_pair_of_arrays():
    la, x, y = _laplace("tanh_mlp", "last_layer", "kron", "ggn", "regression")
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(3)
    for data in (dataset, (x, y, WEIGHTS)):
        with pytest.raises(ValueError, match="sample_weight: only for data given as a tuple"):
            la.fit(data, sample_weight=WEIGHTS)


def test_weighted_data_are_refused_where_weights_are_not_used():
    la, x, y = _laplace("tanh_mlp", "last_layer", "kron", "ggn", "classification")
    la.fit((x, y))
    with pytest.raises(ValueError, match="sample weights are not used by 'validation'"):
        la.optimize_prior_precision(method="gridsearch", val_data=(x, y, WEIGHTS))
