"""Kronecker blocks of transposed convolutions (Conv1D/2D/3DTranspose), against brute force.

Keras stores their kernel as ``(k..., cout, cin)``: the block is ``A ⊗ G`` over the weights in
the order ``(k..., cin, cout)`` then the bias, a :class:`PermutedKronBlock` in the flat order.
Its rows reproduce the layer's output; on one datum of a deep linear network with weight
sharing, expand and reduce equal the exact GGN in their own settings (Eschenhagen et al.
2023) whatever the strides and padding; a fitted posterior's precision, covariance, samples,
GLM variance and saved file follow the flat order.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from models import F64, targets

import laplace_tf as ltf
from laplace_tf import testing
from laplace_tf.blocks import KronBlock, PermutedKronBlock, blocks_to_dense
from laplace_tf.curvature.kron import KronBuilder
from laplace_tf.curvature.kron_layers import KRON_RULES, input_rows
from laplace_tf.curvature.memory import estimate_memory
from laplace_tf.likelihoods import get_likelihood

EXACT = {"rtol": 1e-9, "atol": 1e-11}
L = keras.layers

CASES = {  # layer, input shape without the batch axis
    "2d_strided_same": (lambda: L.Conv2DTranspose(3, 3, strides=2, padding="same", dtype=F64),
                        (3, 2, 2)),
    "2d_strided_valid_output_padding": (lambda: L.Conv2DTranspose(
        2, (2, 3), strides=(2, 3), output_padding=(1, 1), dtype=F64), (2, 3, 3)),
    "1d_valid_no_bias": (lambda: L.Conv1DTranspose(3, 3, strides=3, use_bias=False, dtype=F64),
                         (3, 2)),
    "3d_strided_same": (lambda: L.Conv3DTranspose(2, 2, strides=2, padding="same", dtype=F64),
                        (2, 1, 2, 2)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_rows_reproduce_the_output_in_the_permuted_order(name):
    build, shape = CASES[name]
    layer = build()
    x = tf.constant(np.random.default_rng(0).normal(size=(2, *shape)))
    z = layer(x).numpy()
    rule = KRON_RULES[type(layer)]
    flat = np.concatenate([np.reshape(v.numpy(), [-1]) for v in layer.trainable_variables])
    W = flat[rule.order(layer)].reshape(-1, z.shape[-1])
    np.testing.assert_allclose(input_rows(layer, x).numpy() @ W, z.reshape(-1, z.shape[-1]),
                               **EXACT)


def _deep_linear(name: str, pool: bool, seed: int = 0):
    """A transposed convolution then Dense(2) at every location (the expand setting: every
    location its own outputs, flattened) or average over locations then Dense(2) (reduce)."""
    keras.utils.set_random_seed(seed)
    build, shape = CASES[name]
    inputs = keras.Input(shape, dtype=F64)
    h = build()(inputs)
    if pool:
        h = L.Reshape((-1, h.shape[-1]), dtype=F64)(h)
        return keras.Model(inputs, L.Dense(2, dtype=F64)(L.GlobalAveragePooling1D(dtype=F64)(h)))
    return keras.Model(inputs, L.Flatten(dtype=F64)(L.Dense(2, dtype=F64)(h)))


@pytest.mark.parametrize("setting", ["expand", "reduce"])
@pytest.mark.parametrize("name", list(CASES))
def test_block_equals_the_exact_ggn_for_one_datum_in_its_setting(name, setting):
    model = _deep_linear(name, pool=setting == "reduce")
    n_outputs = model.output_shape[-1]
    x = tf.constant(np.random.default_rng(1).normal(size=(1, *model.input_shape[1:])))
    likelihood = get_likelihood("regression", sigma_noise=0.6)
    y = tf.constant(np.random.default_rng(2).normal(size=(1, n_outputs)))
    logit_model = testing.subset_of(model)
    exact = testing.brute_force_ggn(logit_model, likelihood, x, y)
    builder = KronBuilder(logit_model, likelihood, kfac_approximation=setting)
    blocks = builder.finish(builder.batch_sums(x, y)[0])
    assert isinstance(blocks[0], PermutedKronBlock) and isinstance(blocks[1], KronBlock)
    first = logit_model.subset.slices[0]
    part = slice(first.offset, first.offset + first.size)
    np.testing.assert_allclose(blocks[0].to_dense(), exact[part, part], **EXACT)
    # the other approximation is not exact here: the test can tell the settings apart
    other = "reduce" if setting == "expand" else "expand"
    builder = KronBuilder(logit_model, likelihood, kfac_approximation=other)
    wrong = builder.finish(builder.batch_sums(x, y)[0])[0].to_dense()
    assert np.abs(wrong - exact[part, part]).max() > 1e-3


def _upsampling_classifier(seed: int = 0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((3, 3, 2), dtype=F64)
    h = L.Conv2DTranspose(3, 3, strides=2, padding="same", activation="tanh", dtype=F64)(inputs)
    h = L.Conv2D(2, 3, strides=2, activation="tanh", dtype=F64)(h)
    return keras.Model(inputs, L.Dense(3, dtype=F64)(L.Flatten(dtype=F64)(h)))


def test_posterior_with_a_transposed_convolution_predicts_samples_and_saves(tmp_path):
    model = _upsampling_classifier()
    x = np.random.default_rng(0).normal(size=(6, 3, 3, 2))
    la = ltf.Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron",
                     prior_precision=0.7, progress=False)
    la.fit((x, targets("classification", 3, 6)))
    assert la.block_kinds() == {s.name: "kron" for s in la.subset.slices}
    assert isinstance(la.curvature.blocks[0], PermutedKronBlock)
    precision = la.posterior_precision.to_dense().numpy()
    # the precision operator (a permutation operator) against the block laid out by gathers
    curvature = blocks_to_dense(la.curvature.blocks).numpy()
    np.testing.assert_allclose(precision, curvature + 0.7 * np.eye(len(precision)), rtol=1e-10,
                               atol=1e-12)
    covariance = np.linalg.inv(precision)
    np.testing.assert_allclose(la.posterior_covariance, covariance, rtol=1e-8,
                               atol=1e-12)
    jac = testing.brute_force_jacobians(la.logit_model, tf.constant(x))
    np.testing.assert_allclose(la.functional_variance(x),
                               testing.dense_functional_variance(jac, covariance),
                               rtol=1e-8, atol=1e-12)
    probs = la(x, pred_type="glm", link_approx="probit").numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-12)
    samples = la.sample(4000, seed=0).numpy()
    testing.assert_gaussian_moments(samples[:, None], la.mean.numpy()[None], covariance[None])
    la.save(tmp_path / "posterior.npz")
    loaded = ltf.load(tmp_path / "posterior.npz", model)
    assert loaded.curvature.blocks[0].order.dtype == tf.int32
    np.testing.assert_allclose(loaded.posterior_precision.to_dense(), precision, rtol=1e-12)


def test_memory_estimate_counts_the_transposed_convolution_and_batchnorm_outputs():
    """Per batch: the transposed convolution's rows ``(k, cin) + 1`` and gradients at its
    output pixels; BatchNorm's normalised inputs, ``K`` gradients of its whole output and two
    products of the two, and its ``K`` weight-gradient rows."""
    inputs = keras.Input((3, 3, 2), dtype=F64)
    h = L.Conv2DTranspose(3, 3, strides=2, padding="same", dtype=F64)(inputs)  # 6 x 6 x 3
    h = L.BatchNormalization(dtype=F64)(h)
    model = keras.Model(inputs, L.Dense(3, dtype=F64)(L.Flatten(dtype=F64)(h)))
    k, batch = 3, 5
    estimate = estimate_memory(ltf.WeightSubset(model), "kron", k, batch)
    factors = 19**2 + 3**2 + 6**2 + 109**2 + k**2
    rows = 36 * (19 + k * 3) + ((3 + k) * 108 + k * 6) + (109 + k * k)
    assert estimate.parts["curvature"] == factors * 8
    assert estimate.parts["per_batch"] == batch * rows * 8
