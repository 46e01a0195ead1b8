"""Kronecker rules of the convolution family and K-FAC expand/reduce, against brute force.

Conv3D, grouped Conv1D/Conv2D and DepthwiseConv1D/2D: their input rows reproduce the layer's
own output through the flattened weights; their Kronecker block on one datum at one location
equals the exact GGN block where the rule is exact (no output groups), and otherwise equals
its stated definition factor by factor; the GLM predictive contracts their explicit Jacobian.
``kfac_approximation``: expand and reduce agree with the exact GGN at one location, and each
is exact in its own setting on a deep linear network with weight sharing (Eschenhagen et al.
2023), and not in the other one.
"""

from __future__ import annotations

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf
from models import F64, targets

import laplace_tf as ltf
from laplace_tf import testing
from laplace_tf.blocks import KronBlock, blocks_to_dense
from laplace_tf.curvature.kron import KronBuilder
from laplace_tf.curvature.kron_layers import kron_parts, kron_shapes
from laplace_tf.curvature.memory import estimate_memory
from laplace_tf.likelihoods import get_likelihood

EXACT = {"rtol": 1e-9, "atol": 1e-11}
L = keras.layers


def _layer(cls, *args, **kw):
    return lambda: cls(*args, dtype=F64, **kw)


# layer under test, input shape (without the batch axis)
ROW_CASES = {
    "conv3d_same_dilated": (_layer(L.Conv3D, 3, 2, padding="same", dilation_rate=2), (5, 4, 5, 2)),
    "conv3d_strided_grouped": (_layer(L.Conv3D, 4, (2, 1, 3), strides=(1, 2, 1), groups=2),
                               (4, 5, 5, 4)),
    "conv2d_grouped_same": (_layer(L.Conv2D, 6, 3, padding="same", strides=2, groups=3),
                            (6, 5, 6)),
    "conv1d_grouped_causal": (_layer(L.Conv1D, 4, 3, padding="causal", groups=2), (7, 4)),
    "depthwise2d_multiplier": (_layer(L.DepthwiseConv2D, 3, depth_multiplier=2, padding="same"),
                               (5, 5, 3)),
    "depthwise2d_strided_no_bias": (_layer(L.DepthwiseConv2D, (2, 3), strides=2, use_bias=False),
                                    (6, 6, 3)),
    "depthwise1d_dilated": (_layer(L.DepthwiseConv1D, 3, depth_multiplier=3, dilation_rate=2,
                                   padding="same"), (9, 2)),
    "separable2d_strided": (_layer(L.SeparableConv2D, 4, 3, depth_multiplier=2, strides=2,
                                   padding="same"), (5, 6, 3)),
    "separable1d_dilated_no_bias": (_layer(L.SeparableConv1D, 3, 2, dilation_rate=2,
                                           use_bias=False), (7, 2)),
}


def _weight_matrices(layer) -> list[np.ndarray]:
    """Each block's weights as the row-major ``[din (+1), dout]`` matrix of its flat order."""
    flat = np.concatenate([np.reshape(v.numpy(), [-1]) for v in layer.trainable_variables])
    sizes = [din * dout for din, dout, _ in kron_shapes(layer)]
    assert sum(sizes) == flat.size
    pieces = np.split(flat, np.cumsum(sizes)[:-1])
    shapes = kron_shapes(layer)
    return [p.reshape(din, dout) for p, (din, dout, _) in zip(pieces, shapes, strict=True)]


def _grouped_product(rows, W, groups):
    """Row ``(t, j)`` times group ``j``'s columns of ``W``: ``[T, dout]``."""
    rows = rows.reshape(-1, groups, W.shape[0])
    size = W.shape[1] // groups
    return np.concatenate([rows[:, j] @ W[:, j * size:(j + 1) * size] for j in range(groups)], 1)


@pytest.mark.parametrize("name", list(ROW_CASES))
def test_rows_reproduce_the_preactivation(name):
    """Each block's rows times its weights give its pre-activation: the layer's output for
    one block; for a separable convolution, the pointwise rows (the depthwise output) too."""
    build, shape = ROW_CASES[name]
    layer = build()
    x = tf.constant(np.random.default_rng(0).normal(size=(2, *shape)))
    z = layer(x).numpy()
    z = z.reshape(-1, z.shape[-1])
    parts = kron_parts(layer, x, tf.zeros([1, *layer(x).shape], tf.float64))
    matrices = _weight_matrices(layer)
    groups = [q for *_, q in kron_shapes(layer)]
    out = _grouped_product(parts[0].biased_rows().numpy(), matrices[0], groups[0])
    if len(parts) == 2:  # depthwise then pointwise: the first block's output is the rows
        rows = parts[1].biased_rows().numpy()
        np.testing.assert_allclose(rows[:, :out.shape[1]], out, rtol=1e-12, atol=1e-12)
        out = _grouped_product(rows, matrices[1], groups[1])
    assert len(parts[0].rows) == z.shape[0] * groups[0] and groups[0] == EXPECTED_GROUPS[name]
    np.testing.assert_allclose(out, z, rtol=1e-12, atol=1e-12)


EXPECTED_GROUPS = {
    "conv3d_same_dilated": 1, "conv3d_strided_grouped": 2, "conv2d_grouped_same": 3,
    "conv1d_grouped_causal": 2, "depthwise2d_multiplier": 3, "depthwise2d_strided_no_bias": 3,
    "depthwise1d_dilated": 2, "separable2d_strided": 3, "separable1d_dilated_no_bias": 2,
}


def _net(input_shape, layer, pool: bool = False, n_outputs: int = 3):
    """``layer`` on the input, tanh, then flatten (or average over locations) and Dense."""
    inputs = keras.Input(input_shape, dtype=F64)
    h = L.Activation("tanh", dtype=F64)(layer()(inputs))
    h = L.Flatten(dtype=F64)(h) if not pool else L.Reshape((-1, h.shape[-1]), dtype=F64)(h)
    if pool:
        h = L.GlobalAveragePooling1D(dtype=F64)(h)
    return keras.Model(inputs, L.Dense(n_outputs, dtype=F64)(h))


def _problem(model, n, likelihood_name="classification", n_outputs=3, seed=0, **lik):
    x = np.random.default_rng(seed).normal(size=(n, *model.input_shape[1:]))
    likelihood = get_likelihood(likelihood_name, **lik)
    y = likelihood.prepare_targets(targets(likelihood_name, n_outputs, n, seed), n_outputs,
                                   tf.float64)
    return testing.subset_of(model), likelihood, tf.constant(x), y


def _slice(matrix, layer_slice):
    part = slice(layer_slice.offset, layer_slice.offset + layer_slice.size)
    return matrix[part, part]


# the layer's output map is one location and it has no output groups: K-FAC is exact
SINGLE_LOCATION = {
    "conv3d_kernel_covers_input": ((2, 2, 2, 2), _layer(L.Conv3D, 3, 2)),
    "conv3d_dilated_no_bias": ((3, 3, 3, 1), _layer(L.Conv3D, 2, 2, dilation_rate=2,
                                                    use_bias=False)),
    "depthwise2d_one_channel": ((3, 3, 1), _layer(L.DepthwiseConv2D, 3, depth_multiplier=2)),
    "depthwise1d_one_channel": ((3, 1), _layer(L.DepthwiseConv1D, 3, depth_multiplier=3)),
    "separable2d_one_channel": ((3, 3, 1), _layer(L.SeparableConv2D, 2, 3, depth_multiplier=2)),
    "separable1d_one_channel": ((2, 1), _layer(L.SeparableConv1D, 3, 2, depth_multiplier=2,
                                               use_bias=False)),
}


@pytest.mark.parametrize("approximation", ["expand", "reduce"])
@pytest.mark.parametrize("likelihood_name, n_outputs", [("regression", 1), ("classification", 3)])
@pytest.mark.parametrize("name", list(SINGLE_LOCATION))
def test_kron_equals_exact_block_for_one_datum_at_one_location(name, likelihood_name, n_outputs,
                                                                approximation):
    keras.utils.set_random_seed(0)
    model = _net(*SINGLE_LOCATION[name], n_outputs=n_outputs)
    logit_model, likelihood, x, y = _problem(model, 1, likelihood_name, n_outputs, sigma_noise=0.7)
    builder = KronBuilder(logit_model, likelihood, kfac_approximation=approximation)
    blocks, _ = builder.batch_blocks(x, y)
    exact = testing.brute_force_ggn(logit_model, likelihood, x, y)
    first = kron_shapes(logit_model.subset.slices[0].layer)
    assert len(blocks) == len(first) + 1  # the layer's blocks, then the Dense head
    offset = 0
    for block in blocks:
        assert isinstance(block, KronBlock)
        part = slice(offset, offset + block.size)
        np.testing.assert_allclose(block.to_dense(), exact[part, part], **EXACT)
        offset += block.size


GROUPED = {name: ROW_CASES[name] for name in (
    "conv2d_grouped_same", "conv1d_grouped_causal", "depthwise2d_multiplier",
    "depthwise2d_strided_no_bias", "conv3d_strided_grouped",
)}


@pytest.mark.parametrize("approximation", ["expand", "reduce"])
@pytest.mark.parametrize("name", list(GROUPED))
def test_grouped_block_equals_its_definition(name, approximation):
    """Rows ``(t, j)`` are more locations whose gradient is ``g_t`` masked to group ``j``:
    expand: ``A`` the mean of the rows, ``G`` the block-diagonal part of ``sum g g^T``;
    reduce: per example the mean of its rows and the sum of ``g_t`` over locations."""
    build, shape = GROUPED[name]
    keras.utils.set_random_seed(0)
    model = _net(shape, build)
    logit_model, likelihood, x, y = _problem(model, 2)
    layer = logit_model.subset.slices[0].layer
    block = KronBuilder(logit_model, likelihood, kfac_approximation=approximation
                        ).batch_blocks(x, y)[0][0]

    ((din, dout, groups),) = kron_shapes(layer)
    probe = tf.zeros([1, *layer(x).shape], tf.float64)
    rows = kron_parts(layer, x, probe)[0].biased_rows().numpy()  # with the 1 for a bias; checked above
    rows = rows.reshape(2, -1, din)  # [N, locations * groups, din]
    jac = testing.brute_force_preactivation_jacobians(logit_model, layer, x)
    jac = jac.reshape(2, 3, -1, dout)  # [N, K, locations, dout]
    lam = testing.brute_force_output_hessians(likelihood, logit_model(x), y)
    if approximation == "expand":
        A = np.einsum("nti,ntj->ij", rows, rows) / (rows.shape[0] * rows.shape[1])
        mask = np.kron(np.eye(groups), np.ones((dout // groups, dout // groups)))
        G = np.einsum("nktd,nkl,nlte->de", jac, lam, jac) * mask
        n = rows.shape[0] * rows.shape[1]
    else:
        mean = rows.mean(axis=1)
        A, n = mean.T @ mean / 2, 2
        summed = jac.sum(axis=2)
        G = np.einsum("nkd,nkl,nle->de", summed, lam, summed)
    assert float(block.n) == n and groups > 1
    np.testing.assert_allclose(block.A, A, **EXACT)
    np.testing.assert_allclose(block.G, G, **EXACT)


def _deep_linear_shared(pool: bool, seed: int = 0):
    """A deep linear network on ``[N, 4, 3]`` sequences: Dense(4) -> Dense(2) at every position
    (the expand setting: every position its own outputs, flattened) or Dense(4) -> average
    over positions -> Dense(2) (the reduce setting)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4, 3), dtype=F64)
    h = L.Dense(4, dtype=F64)(inputs)
    if pool:
        return keras.Model(inputs, L.Dense(2, dtype=F64)(L.GlobalAveragePooling1D(dtype=F64)(h)))
    return keras.Model(inputs, L.Flatten(dtype=F64)(L.Dense(2, dtype=F64)(h)))


@pytest.mark.parametrize("setting", ["expand", "reduce"])
def test_expand_and_reduce_are_exact_in_their_own_setting(setting):
    model = _deep_linear_shared(pool=setting == "reduce")
    n_outputs = model.output_shape[-1]
    logit_model, likelihood, x, y = _problem(model, 3, "regression", n_outputs, sigma_noise=0.6)
    exact = testing.brute_force_ggn(logit_model, likelihood, x, y)
    block_diagonal = np.zeros_like(exact)
    for s in logit_model.subset.slices:
        block_diagonal[s.offset:s.offset + s.size, s.offset:s.offset + s.size] = _slice(exact, s)
    dense = {
        approximation: blocks_to_dense(KronBuilder(
            logit_model, likelihood, kfac_approximation=approximation).batch_blocks(x, y)[0])
        for approximation in ("expand", "reduce")
    }
    other = "reduce" if setting == "expand" else "expand"
    np.testing.assert_allclose(dense[setting], block_diagonal, **EXACT)
    first = logit_model.subset.slices[0]  # the weight-shared layer: the other one is not exact
    assert np.abs(_slice(dense[other], first) - _slice(block_diagonal, first)).max() > 1e-3


def _mobilenet_like(seed: int = 0):
    """Grouped Conv2D -> DepthwiseConv2D -> pointwise Conv2D -> SeparableConv2D -> pooling
    -> Dense.

    The grouped convolution comes first: TensorFlow cannot vectorise the input gradient of a
    grouped convolution on CPU ("Gradients for grouped convolutions are not supported on
    CPU"), whatever the curvature structure."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 6, 2), dtype=F64)
    h = L.Conv2D(4, 3, strides=2, padding="same", groups=2, activation="relu", dtype=F64)(inputs)
    h = L.DepthwiseConv2D(3, padding="same", activation="relu", dtype=F64)(h)
    h = L.Conv2D(4, 1, activation="tanh", dtype=F64)(h)
    h = L.SeparableConv2D(3, 2, depth_multiplier=2, activation="tanh", dtype=F64)(h)
    h = L.GlobalAveragePooling2D(dtype=F64)(h)
    return keras.Model(inputs, L.Dense(3, dtype=F64)(h))


@pytest.mark.parametrize("approximation", ["expand", "reduce"])
def test_mobilenet_like_model_fits_kron_without_fallback(approximation, caplog):
    model = _mobilenet_like()
    x = np.random.default_rng(0).normal(size=(5, 6, 6, 2))
    y = targets("classification", 3, 5)
    la = ltf.Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron",
                     prior_precision=0.5, progress=False, kfac_approximation=approximation)
    with caplog.at_level(logging.WARNING, logger="laplace_tf"):
        la.fit((x, y))
    assert not [r for r in caplog.records if "diagonal" in r.getMessage()]
    assert all(isinstance(b, KronBlock) for b in la.curvature.blocks)
    assert len(la.curvature.blocks) == len(la.subset.slices) + 1  # two for the separable conv

    probs = la(x, pred_type="glm", link_approx="probit").numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-12)
    # the GLM variance J Sigma J^T against explicit Jacobians and the dense posterior covariance
    covariance = np.linalg.inv(la.posterior_precision.to_dense().numpy())
    jac = testing.brute_force_jacobians(la.logit_model, tf.constant(x))
    expected = testing.dense_functional_variance(jac, covariance)
    actual = la.functional_variance(x)
    np.testing.assert_allclose(actual, expected, rtol=1e-9, atol=1e-12)


def test_kfac_approximation_is_checked_and_saved(tmp_path):
    model = _mobilenet_like()
    with pytest.raises(ValueError, match="kfac_approximation: expected one of"):
        ltf.Laplace(model, "classification", subset_of_weights="all", kfac_approximation="mean")
    for subset, structure in [("all", "diag"), ("last_layer", "kron"), ("all", "full")]:
        with pytest.raises(ValueError, match="kfac_approximation: 'reduce' exists for"):
            ltf.Laplace(model, "classification", subset_of_weights=subset,
                        hessian_structure=structure, kfac_approximation="reduce")
    x = np.random.default_rng(0).normal(size=(3, 6, 6, 2))
    la = ltf.Laplace(model, "classification", subset_of_weights="all", progress=False,
                     kfac_approximation="reduce")
    la.fit((x, targets("classification", 3, 3)))
    la.save(tmp_path / "posterior.npz")
    loaded = ltf.load(tmp_path / "posterior.npz", model)
    assert loaded.kfac_approximation == "reduce"
    np.testing.assert_allclose(loaded.posterior_precision.to_dense(),
                               la.posterior_precision.to_dense(), rtol=1e-12)


def test_memory_estimate_counts_every_block_and_its_rows():
    """Factors of every block; per batch, each block's rows (``q`` a location) and gradients."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 4, 2), dtype=F64)
    h = L.DepthwiseConv2D(3, padding="same", depth_multiplier=2, dtype=F64)(inputs)  # 16 loc.
    h = L.SeparableConv2D(3, 2, dtype=F64)(h)  # 9 locations: depthwise 4 x 4, pointwise 5 x 3
    model = keras.Model(inputs, L.Dense(3, dtype=F64)(L.Flatten(dtype=F64)(h)))
    k, batch = 3, 5
    estimate = estimate_memory(ltf.WeightSubset(model), "kron", k, batch)
    factors = 10**2 + 4**2 + 4**2 + 4**2 + 5**2 + 3**2 + 28**2 + k**2
    rows = 16 * (2 * 10 + k * 4) + 9 * (4 * 4 + k * 4) + 9 * (5 + k * 3) + (28 + k * k)
    assert estimate.parts["curvature"] == factors * 8
    assert estimate.parts["per_batch"] == batch * rows * 8


def test_grouped_convolution_behind_weights_is_a_clear_error():
    """TensorFlow cannot differentiate a grouped convolution with respect to its inputs on CPU
    in float64 under vectorisation, as the Kronecker rows of the layers before it need: a
    ValueError naming the layer, not TensorFlow's InvalidArgumentError ('diag' and 'full'
    take their rows one example at a time and work)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5, 5, 2), dtype=F64)
    h = L.Conv2D(4, 3, padding="same", activation="relu", dtype=F64)(inputs)
    h = L.Conv2D(4, 3, padding="same", groups=2, name="grouped", dtype=F64)(h)
    model = keras.Model(inputs, L.Dense(3, dtype=F64)(L.GlobalAveragePooling2D(dtype=F64)(h)))
    la = ltf.Laplace(model, "classification", subset_of_weights="all",
                     hessian_structure="kron", progress=False)
    x = np.random.default_rng(0).normal(size=(3, 5, 5, 2))
    with pytest.raises(ValueError, match=r"grouped convolution\(s\) \['grouped'\].*'diag' or "
                                         r"'full'.*first"):
        la.fit((x, targets("classification", 3, 3)))


def test_reduce_averages_an_embeddings_one_hot_rows():
    """K-FAC-reduce on an Embedding: ``A`` from each sequence's mean one-hot row (no longer
    diagonal), ``G`` from its gradients summed over the positions."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,), dtype="int32")
    h = L.GlobalAveragePooling1D(dtype=F64)(L.Embedding(5, 3, dtype=F64)(inputs))
    model = keras.Model(inputs, L.Dense(2, dtype=F64)(h))
    tokens = np.array([[0, 1, 1, 4], [2, 2, 3, 0], [4, 4, 4, 1]])
    logit_model = testing.subset_of(model)
    likelihood = get_likelihood("regression", sigma_noise=0.8)
    x, y = tf.constant(tokens), tf.constant(np.random.default_rng(1).normal(size=(3, 2)))
    block = KronBuilder(logit_model, likelihood, kfac_approximation="reduce"
                        ).batch_blocks(x, y)[0][0]
    mean = np.eye(5)[tokens].mean(axis=1)  # [N, V]
    layer = logit_model.subset.slices[0].layer
    jac = testing.brute_force_preactivation_jacobians(logit_model, layer, x).reshape(3, 2, 4, 3)
    summed = jac.sum(axis=2)  # [N, K, dout]
    lam = testing.brute_force_output_hessians(likelihood, logit_model(x), y)
    assert float(block.n) == 3
    np.testing.assert_allclose(block.A, mean.T @ mean / 3, **EXACT)
    np.testing.assert_allclose(block.G, np.einsum("nkd,nkl,nle->de", summed, lam, summed),
                               **EXACT)


@pytest.mark.parametrize("dtype", ["float32", F64])
@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("structure", ["full", "diag"])
def test_grouped_convolution_gets_the_ggn_of_finite_differences(structure, first, dtype):
    """The full and diagonal GGN of a model with a grouped convolution equal
    ``sum_n J_n^T J_n`` with Jacobians by central finite differences of a float64 copy
    (TensorFlow's vectorised filter gradient of a grouped convolution is 70-80% off in float32
    and fails in float64: its rows are taken one example at a time)."""
    def build(dtype):
        keras.utils.set_random_seed(2)
        before = [] if first else [L.Conv1D(4, 1, activation="tanh", dtype=dtype)]
        return keras.Sequential([keras.Input((5, 4), dtype=dtype), *before,
                                 L.Conv1D(4, 2, groups=2, activation="tanh", dtype=dtype),
                                 L.Flatten(dtype=dtype), L.Dense(2, dtype=dtype)])
    model, exact = build(dtype), build(F64)
    for v64, v32 in zip(exact.weights, model.weights, strict=True):
        v64.assign(tf.cast(v32, F64))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(3, 5, 4)), rng.normal(size=(3, 2))
    logit_model = testing.subset_of(exact)
    theta = logit_model.subset.flat_values().numpy()

    logits = tf.function(lambda flat: logit_model(x, logit_model.subset.unflatten(flat)))
    steps = 1e-6 * np.eye(theta.size)
    jac = np.stack([(logits(theta + e) - logits(theta - e)).numpy() / 2e-6 for e in steps], -1)
    ggn = np.einsum("nkp,nkq->pq", jac, jac)  # regression, sigma 1

    la = ltf.Laplace(model, "regression", "all", structure, prior_precision=1.0, progress=False)
    la.fit((x.astype(dtype), y.astype(dtype)))
    got = la.posterior_precision.to_dense().numpy().astype(np.float64) - np.eye(theta.size)
    expected = ggn if structure == "full" else np.diag(np.diag(ggn))
    tolerance = 2e-5 if dtype == "float32" else 1e-8  # float64: the differences' own error
    np.testing.assert_allclose(got, expected, atol=tolerance * np.abs(ggn).max())
