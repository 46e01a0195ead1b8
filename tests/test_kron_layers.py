"""Kronecker rules for Embedding, EinsumDense, LayerNormalization and BatchNormalization.

Against brute force (float64): on one datum at one location the Kronecker block of an
Embedding or EinsumDense equals the exact GGN / EF block of its weights; a scale-and-shift
layer's dense block is the exact block for any data; at several locations the factors equal
explicit one-hot / einsum rows and per-example pre-activation Jacobians. The rows reproduce the
layers' outputs, and models built from these layers fit with Kronecker blocks everywhere.
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
from laplace_tf.blocks import DenseBlock, DiagBlock, KronBlock
from laplace_tf.curvature import kron_layers
from laplace_tf.curvature.kron import KronBuilder
from laplace_tf.likelihoods import get_likelihood
from laplace_tf.params import LayerSlice

EXACT = {"rtol": 1e-9, "atol": 1e-11}
L = keras.layers
VOCABULARY = 5


def _net(input_shape, body, tokens: bool = False, index: int = 0):
    """``Input -> body -> tanh -> Flatten -> Dense``; a builder ``(n_outputs, seed, n)`` and
    the index of the layer under test among the layers with weights."""

    def build(n_outputs: int, seed: int = 0, n: int = 1):
        keras.utils.set_random_seed(seed)
        inputs = keras.Input(input_shape, dtype="int32" if tokens else F64)
        hidden = L.Activation("tanh", dtype=F64)(body(inputs))
        model = keras.Model(inputs, L.Dense(n_outputs, dtype=F64)(L.Flatten(dtype=F64)(hidden)))
        for layer in model.layers:  # non-trivial moving statistics and scale-and-shift weights
            if isinstance(layer, L.BatchNormalization):
                channels = layer.moving_mean.shape[0]
                layer.moving_mean.assign(np.linspace(-0.3, 0.4, channels))
                layer.moving_variance.assign(np.linspace(0.5, 2.0, channels))
            for name in ("gamma", "beta"):
                if getattr(layer, name, None) is not None:
                    size = getattr(layer, name).shape
                    getattr(layer, name).assign(np.random.default_rng(seed).normal(size=size))
        rng = np.random.default_rng(seed)
        x = (rng.integers(0, VOCABULARY, size=(n, *input_shape)) if tokens
             else rng.normal(size=(n, *input_shape)))
        return model, x

    return build, index


def _einsum(equation, output_shape, bias_axes=None):
    return lambda x: L.EinsumDense(equation, output_shape, bias_axes=bias_axes, dtype=F64)(x)


def _then(*layers):
    def body(x):
        for layer in layers:
            x = layer()(x)
        return x
    return body


# one location per example: K-FAC is exact on one datum
ONE_LOCATION = {
    "embedding_one_token": _net((1,), lambda x: L.Embedding(VOCABULARY, 3, dtype=F64)(x), True),
    "einsum_matmul": _net((4,), _einsum("ab,bc->ac", 3, "c")),
    "einsum_two_output_axes": _net((4,), _einsum("ab,bcd->acd", (2, 3), "cd")),
    "einsum_two_contracted_axes_no_bias": _net((2, 3), _einsum("abc,bcd->ad", 4)),
    "attention_query_one_step": _net((1, 4), _einsum("abc,cde->abde", (1, 2, 3), "de")),
    "attention_output_one_step": _net((1, 2, 3), _einsum("abcd,cde->abe", (1, 4), "e")),
    "einsum_summed_input_axis": _net((2, 3), _einsum("abc,cd->ad", 4, "d")),
}

# scale-and-shift layers: the dense block is the exact block for any data and locations
SCALE_AND_SHIFT = {
    "layer_norm": _net((3,), _then(lambda: L.Dense(4, dtype=F64),
                                   lambda: L.LayerNormalization(dtype=F64)), index=1),
    "layer_norm_sequence": _net((3, 2), _then(lambda: L.Dense(4, dtype=F64),
                                              lambda: L.LayerNormalization(dtype=F64)), index=1),
    "layer_norm_two_axes_no_center": _net(
        (3, 4), lambda x: L.LayerNormalization(axis=[1, 2], center=False, dtype=F64)(x)),
    "layer_norm_axes_of_mixed_signs": _net(  # gamma (4, 2), broadcast in the order (2, 4)
        (2, 3, 4), lambda x: L.LayerNormalization(axis=[-1, 1], dtype=F64)(x)),
    "batch_norm_images": _net((4, 4, 2), _then(lambda: L.Conv2D(3, 2, dtype=F64),
                                               lambda: L.BatchNormalization(dtype=F64)), index=1),
    "batch_norm_no_scale": _net((3,), _then(lambda: L.Dense(4, dtype=F64),
                                            lambda: L.BatchNormalization(scale=False, dtype=F64)),
                                index=1),
}


def _problem(build, likelihood_name: str, n: int, n_outputs: int):
    model, x = build(n_outputs, n=n)
    logit_model = testing.subset_of(model)
    likelihood = get_likelihood(likelihood_name, sigma_noise=0.7)
    y = likelihood.prepare_targets(targets(likelihood_name, n_outputs, n), n_outputs, tf.float64)
    return logit_model, likelihood, tf.constant(x), y


def _exact_block(kind, logit_model, likelihood, x, y, layer_slice) -> np.ndarray:
    reference = testing.brute_force_ggn if kind == "ggn" else testing.brute_force_ef
    part = slice(layer_slice.offset, layer_slice.offset + layer_slice.size)
    return reference(logit_model, likelihood, x, y)[part, part]


LIKELIHOODS = [("regression", 1, "ggn"), ("classification", 3, "ggn"), ("classification", 3, "ef")]


@pytest.mark.parametrize("likelihood_name, n_outputs, kind", LIKELIHOODS)
@pytest.mark.parametrize("model_name", list(ONE_LOCATION))
def test_kron_block_equals_the_exact_block_for_one_datum(model_name, likelihood_name, n_outputs,
                                                         kind):
    build, index = ONE_LOCATION[model_name]
    logit_model, likelihood, x, y = _problem(build, likelihood_name, 1, n_outputs)
    blocks, _ = KronBuilder(logit_model, likelihood, kind).batch_blocks(x, y)
    layer_slice = logit_model.subset.slices[index]
    assert isinstance(blocks[index], KronBlock) and float(blocks[index].n) == 1
    exact = _exact_block(kind, logit_model, likelihood, x, y, layer_slice)
    assert np.abs(exact).max() > 1e-3
    np.testing.assert_allclose(blocks[index].to_dense(), exact, **EXACT)


@pytest.mark.parametrize("likelihood_name, n_outputs, kind", LIKELIHOODS)
@pytest.mark.parametrize("model_name", list(SCALE_AND_SHIFT))
def test_scale_and_shift_block_is_the_exact_block(model_name, likelihood_name, n_outputs, kind):
    build, index = SCALE_AND_SHIFT[model_name]
    logit_model, likelihood, x, y = _problem(build, likelihood_name, 3, n_outputs)
    weights = tf.constant([0.5, 2.0, 1.0], tf.float64)
    blocks, _ = KronBuilder(logit_model, likelihood, kind).batch_blocks(x, y, weights)
    layer_slice = logit_model.subset.slices[index]
    assert isinstance(blocks[index], DenseBlock)
    reference = testing.brute_force_ggn if kind == "ggn" else testing.brute_force_ef
    part = slice(layer_slice.offset, layer_slice.offset + layer_slice.size)
    exact = sum(w * reference(logit_model, likelihood, x[i:i + 1], y[i:i + 1])[part, part]
                for i, w in enumerate(weights.numpy()))
    off_diagonal = exact - np.diag(np.diag(exact))
    assert np.abs(off_diagonal).max() > 1e-3  # the channels are coupled
    np.testing.assert_allclose(blocks[index].to_dense(), exact, **EXACT)


def test_large_scale_and_shift_layer_gets_its_exact_diagonal(monkeypatch, caplog):
    build, index = SCALE_AND_SHIFT["layer_norm"]
    logit_model, likelihood, x, y = _problem(build, "classification", 3, 3)
    monkeypatch.setattr(kron_layers, "MAX_DENSE_WEIGHTS", 7)  # the layer has 8 weights
    with caplog.at_level(logging.INFO, logger="laplace_tf"):
        blocks, _ = KronBuilder(logit_model, likelihood).batch_blocks(x, y)
    layer_slice = logit_model.subset.slices[index]
    assert isinstance(blocks[index], DiagBlock)
    exact = _exact_block("ggn", logit_model, likelihood, x, y, layer_slice)
    np.testing.assert_allclose(blocks[index].diagonal, np.diag(exact), **EXACT)
    (message,) = [r.getMessage() for r in caplog.records if "blocks per layer" in r.getMessage()]
    assert f"{layer_slice.name!r} diag (8 weights > MAX_DENSE_WEIGHTS=7)" in message


def test_large_vocabulary_gets_the_exact_diagonal(monkeypatch, caplog):
    (build, _), _, _ = SEVERAL_LOCATIONS["embedding_sequence"]
    logit_model, likelihood, x, y = _problem(build, "classification", 3, 3)
    layer_slice = logit_model.subset.slices[0]
    assert kron_layers.block_kind(layer_slice) == ("kron", None)
    monkeypatch.setattr(kron_layers, "MAX_VOCABULARY", VOCABULARY - 1)
    w = np.array([0.5, 2.0, 1.0])
    with caplog.at_level(logging.INFO, logger="laplace_tf"):
        blocks, _ = KronBuilder(logit_model, likelihood).batch_blocks(x, y, tf.constant(w))
    assert isinstance(blocks[0], DiagBlock)
    exact = sum(w_n * _exact_block("ggn", logit_model, likelihood, x[n:n + 1], y[n:n + 1],
                                   layer_slice) for n, w_n in enumerate(w))
    assert any(np.sum(x[n] == token) > 1 for n in range(3) for token in range(VOCABULARY))
    np.testing.assert_allclose(blocks[0].diagonal, np.diag(exact), **EXACT)
    (message,) = [r.getMessage() for r in caplog.records if "blocks per layer" in r.getMessage()]
    assert f"{layer_slice.name!r} diag (vocabulary of 5 tokens > MAX_VOCABULARY=4)" in message


# several locations per example: A against explicit rows, G against pre-activation Jacobians
def _one_hot_rows(layer, x):
    return np.eye(VOCABULARY)[np.asarray(x).reshape(-1)]


def _einsum_rows(equation):
    def rows(layer, x):
        source, rest = equation.split(",")
        kernel, output = rest.split("->")
        contracted = "".join(a for a in kernel if a in source)
        locations = output[:len(output) - len(kernel) + len(contracted)]
        values = np.einsum(f"{source}->{locations}{contracted}", np.asarray(x))
        values = values.reshape(-1, int(np.prod(layer.kernel.shape[:len(contracted)])))
        return np.concatenate([values, np.ones((len(values), 1))], axis=1)
    return rows


SEVERAL_LOCATIONS = {  # model, explicit rows, dout
    "embedding_sequence": (_net((4,), lambda x: L.Embedding(VOCABULARY, 3, dtype=F64)(x), True),
                           _one_hot_rows, 3),
    "attention_query": (_net((3, 4), _einsum("abc,cde->abde", (3, 2, 3), "de")),
                        _einsum_rows("abc,cde->abde"), 6),
    "attention_output": (_net((3, 2, 3), _einsum("abcd,cde->abe", (3, 4), "e")),
                         _einsum_rows("abcd,cde->abe"), 4),
}


@pytest.mark.parametrize("model_name", list(SEVERAL_LOCATIONS))
def test_weight_shared_factors_equal_explicit_rows_and_jacobians(model_name):
    (build, _), explicit_rows, dout = SEVERAL_LOCATIONS[model_name]
    logit_model, likelihood, x, y = _problem(build, "classification", 3, 3)
    layer = logit_model.subset.slices[0].layer
    w = np.array([0.5, 2.0, 1.0])
    (block, _), _ = KronBuilder(logit_model, likelihood).batch_blocks(x, y, tf.constant(w))
    rows = explicit_rows(layer, x)
    jacobians = testing.brute_force_preactivation_jacobians(logit_model, layer, x)
    jacobians = jacobians.reshape(3, 3, -1, dout)                      # [N, K, locations, dout]
    lam = testing.brute_force_output_hessians(likelihood, logit_model(x), y)
    G = np.einsum("n,nktd,nkl,nlte->de", w, jacobians, lam, jacobians)
    row_weights = np.repeat(w, jacobians.shape[2])
    assert len(rows) == 3 * jacobians.shape[2] > 3
    assert float(block.n) == pytest.approx(row_weights.sum(), rel=1e-12)
    np.testing.assert_allclose(block.A, (rows.T * row_weights) @ rows / row_weights.sum(), **EXACT)
    np.testing.assert_allclose(block.G, G, **EXACT)


def _preactivation(layer, x):
    model = keras.Sequential([keras.Input(x.shape[1:], dtype=x.dtype), layer])
    z = []
    testing.subset_of(model)(tf.constant(x), layers=[layer], hook=lambda _, a, out: z.append(out) or out)
    return z[0].numpy()


@pytest.mark.parametrize("equation, input_shape, output_shape, bias_axes", [
    ("abc,cde->abde", (3, 4), (3, 2, 5), "de"),
    ("abcd,cde->abe", (3, 2, 5), (3, 4), "e"),
    ("abc,cd->abd", (3, 4), (3, 2), None),
    ("...b,bc->...c", (2, 3, 4), 5, "c"),
    ("abc,cd->ad", (3, 4), 2, "d"),
    ("abcd,cde->abe", (2, 3, 4), (2, 5), "e"),
])
def test_einsum_rows_reproduce_the_preactivation(equation, input_shape, output_shape, bias_axes):
    layer = L.EinsumDense(equation, output_shape, bias_axes=bias_axes, dtype=F64)
    x = np.random.default_rng(0).normal(size=(2, *input_shape))
    z = _preactivation(layer, x)
    assert kron_layers.fallback_reason(LayerSlice(layer, tuple(layer.trainable_variables), 0, 0)) \
        is None
    ((din, dout, _),) = kron_layers.kron_shapes(layer)
    din -= layer.bias is not None  # the rows below are without the bias column
    W = tf.reshape(layer.kernel, [din, dout])
    if layer.bias is not None:
        W = tf.concat([W, tf.reshape(layer.bias, [1, dout])], axis=0)
    rows = kron_layers.input_rows(layer, tf.constant(x))
    np.testing.assert_allclose(rows @ W, z.reshape(-1, dout), **EXACT)


def test_embedding_rows_reproduce_the_lookup():
    layer = L.Embedding(VOCABULARY, 3, dtype=F64)
    x = np.random.default_rng(0).integers(0, VOCABULARY, size=(2, 4)).astype("int32")
    z = _preactivation(layer, x)
    rows = kron_layers.input_rows(layer, tf.constant(x))
    np.testing.assert_allclose(rows @ layer.embeddings, z.reshape(-1, 3), **EXACT)


@pytest.mark.parametrize("make", [
    lambda: L.LayerNormalization(epsilon=0.1, dtype=F64),
    lambda: L.LayerNormalization(axis=[1, 2], dtype=F64),
    lambda: L.BatchNormalization(epsilon=0.1, dtype=F64),
    lambda: L.BatchNormalization(axis=1, dtype=F64),
])
def test_normalised_inputs_reproduce_scale_and_shift(make):
    layer = make()
    x = np.random.default_rng(0).normal(size=(2, 3, 4))
    layer.build(x.shape)
    rng = np.random.default_rng(1)
    for v in layer.weights:
        v.assign(rng.uniform(0.5, 1.5, size=v.shape))
    z = _preactivation(layer, x)
    xhat = kron_layers._normalised(layer, tf.constant(x)).numpy()
    axes = [layer.axis] if isinstance(layer.axis, int) else layer.axis
    shape = [x.shape[a] if a in [b % 3 for b in axes] else 1 for a in range(3)]
    gamma, beta = (np.reshape(v.numpy(), shape) for v in (layer.gamma, layer.beta))
    np.testing.assert_allclose(xhat * gamma + beta, z, **EXACT)
    assert np.abs(xhat - x).max() > 1e-2  # the normalisation does something


@pytest.mark.parametrize("layer, input_shape, reason", [
    (L.EinsumDense("abc,bcd->abd", (3, 2)), (None, 3, 4), "also in the input and the output"),
    (L.EinsumDense("ab,cb->ac", 3), (None, 4), "contracted axes followed by its output axes"),
    (L.EinsumDense("abc,cd->adb", (2, 3)), (None, 3, 4), "does not end with the kernel's output"),
    (L.EinsumDense("abc,cde->abde", (3, 2, 5), bias_axes="e"), (None, 3, 4),
     "bias_axes='e' is not over all output axes 'de'"),
    (L.BatchNormalization(), (None, 4), None),
    (L.EinsumDense("abc,cde->abde", (3, 2, 5), bias_axes="de"), (None, 3, 4), None),
])
def test_routing(layer, input_shape, reason):
    layer.build(input_shape)
    found = kron_layers.fallback_reason(LayerSlice(layer, tuple(layer.trainable_variables), 0, 0))
    assert found is None if reason is None else reason in found


def test_einsum_output_must_start_with_the_examples():
    # Keras itself refuses such a layer at build; the rule refuses the equation too
    assert "start with the examples" in kron_layers._einsum_spec("abc,cd->bad")
    assert kron_layers._einsum_spec("...b,bc->...c") == ("...b", "b", "c", "...")


# ------------------------------------------------------------------ whole models
def _transformer(n_outputs: int = 3):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,), dtype="int32")
    h = L.Embedding(7, 4, dtype=F64)(inputs)
    h = L.LayerNormalization(dtype=F64)(h + L.MultiHeadAttention(2, 3, dtype=F64)(h, h))
    h = L.Dense(4, activation="relu", dtype=F64)(L.GlobalAveragePooling1D(dtype=F64)(h))
    model = keras.Model(inputs, L.Dense(n_outputs, dtype=F64)(h))
    return model, np.random.default_rng(0).integers(0, 7, size=(6, 5)).astype("int32")


def _cnn_with_batchnorm(n_outputs: int = 3):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5, 5, 2), dtype=F64)
    h = L.Conv2D(3, 3, dtype=F64)(inputs)
    h = L.Activation("relu", dtype=F64)(L.BatchNormalization(dtype=F64)(h))
    h = L.GlobalAveragePooling2D(dtype=F64)(h)
    model = keras.Model(inputs, L.Dense(n_outputs, dtype=F64)(h))
    model.layers[2].moving_variance.assign(np.full(3, 2.0))
    return model, np.random.default_rng(0).normal(size=(6, 5, 5, 2))


def _with_lstm(n_outputs: int = 3):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,), dtype="int32")
    h = L.LSTM(3, dtype=F64)(L.Embedding(7, 3, dtype=F64)(inputs))
    model = keras.Model(inputs, L.Dense(n_outputs, dtype=F64)(h))
    return model, np.random.default_rng(0).integers(0, 7, size=(6, 4)).astype("int32")


@pytest.mark.parametrize("build, expected", [   # layer type -> kind of block
    (_transformer, {"Embedding": "kron", "EinsumDense": "kron", "LayerNormalization": "dense",
                    "Dense": "kron"}),
    (_cnn_with_batchnorm, {"Conv2D": "kron", "BatchNormalization": "dense", "Dense": "kron"}),
    (_with_lstm, {"Embedding": "kron", "LSTMCell": "diag", "Dense": "kron"}),
])
def test_models_fit_with_kron_blocks_and_a_sound_glm_predictive(build, expected, caplog):
    model, x = build()
    y = np.arange(len(x)) % 3
    la = ltf.Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron",
                     progress=False, prior_precision=0.5)
    with caplog.at_level(logging.INFO, logger="laplace_tf"):
        la.fit((x, y), batch_size=3)
    kinds = la.block_kinds()
    assert list(kinds) == [s.name for s in la.subset.slices]
    assert {type(s.layer).__name__: kinds[s.name] for s in la.subset.slices} == expected
    (message,) = [r.getMessage() for r in caplog.records if "blocks per layer" in r.getMessage()]
    assert all(f"{name!r} {kind}" in message for name, kind in kinds.items())
    probabilities = la(x).numpy()
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-12)
    variance = la.functional_variance(x).numpy()
    jacobians = testing.brute_force_jacobians(la.logit_model, tf.constant(x))
    expected_variance = testing.dense_functional_variance(jacobians, la.posterior_covariance.numpy())
    np.testing.assert_allclose(variance, expected_variance, rtol=1e-8, atol=1e-10)
    assert np.all(np.linalg.eigvalsh(variance) > -1e-10)


@pytest.mark.parametrize("structure", ["full", "diag"])
def test_full_and_diag_fits_equal_brute_force_with_einsum_and_normalisation(structure):
    einsum = lambda: L.EinsumDense("ab,bcd->acd", (2, 3), bias_axes="cd", dtype=F64)  # noqa: E731
    model, x = _net((3,), _then(einsum, lambda: L.LayerNormalization(dtype=F64)))[0](3, n=4)
    y = np.arange(len(x)) % 3
    la = ltf.Laplace(model, "classification", subset_of_weights="all",
                     hessian_structure=structure, progress=False)
    la.fit((x, y))
    exact = testing.brute_force_ggn(la.logit_model, la.likelihood, tf.constant(x),
                                    tf.one_hot(y, 3, dtype=tf.float64))
    (block,) = la.curvature.blocks
    got = block.matrix if structure == "full" else np.diag(block.diagonal)
    expected = exact if structure == "full" else np.diag(np.diag(exact))
    np.testing.assert_allclose(got, expected, **EXACT)


class TokenAndPosition(L.Layer):
    """Token embedding plus a positional embedding of ``arange(T)`` (no batch axis)."""

    def __init__(self, vocabulary, length, width, **kwargs):
        super().__init__(**kwargs)
        self.tokens = L.Embedding(vocabulary, width, dtype=F64)
        self.positions = L.Embedding(length, width, dtype=F64)

    def call(self, x):
        return self.tokens(x) + self.positions(keras.ops.arange(keras.ops.shape(x)[-1]))


@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_positional_embedding_gets_the_exact_diagonal(structure, caplog):
    """A layer on a constant shares its pre-activation between examples: no per-example rows,
    so the exact diagonal, in a Kronecker fit and in a diagonal one (not factored there)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,), dtype="int32")
    h = L.GlobalAveragePooling1D(dtype=F64)(L.Activation("tanh", dtype=F64)(
        TokenAndPosition(VOCABULARY, 4, 3, dtype=F64)(inputs)))
    model = keras.Model(inputs, L.Dense(3, dtype=F64)(h))
    x = np.random.default_rng(0).integers(0, VOCABULARY, size=(4, 4)).astype("int32")
    y = np.arange(4) % 3
    la = ltf.Laplace(model, "classification", subset_of_weights="all",
                     hessian_structure=structure, progress=False)
    with caplog.at_level(logging.INFO, logger="laplace_tf"):
        la.fit((x, y))
    exact = testing.brute_force_ggn(la.logit_model, la.likelihood, tf.constant(x),
                                    tf.one_hot(y, 3, dtype=tf.float64))
    positions = la.subset.slices[1]
    assert type(positions.layer) is L.Embedding and positions.layer.input_dim == 4
    part = slice(positions.offset, positions.offset + positions.size)
    if structure == "kron":
        assert la.block_kinds()[positions.name] == "diag"
        assert la.block_kinds()[la.subset.slices[0].name] == "kron"
        assert any("not one row per example" in r.getMessage() for r in caplog.records)
        diagonal = la.curvature.blocks[1].diagonal
    else:
        diagonal = la.curvature.blocks[0].diagonal[part]
    np.testing.assert_allclose(diagonal, np.diag(exact)[part], **EXACT)
    jacobians = testing.brute_force_jacobians(la.logit_model, tf.constant(x))
    np.testing.assert_allclose(
        la.functional_variance(x),
        testing.dense_functional_variance(jacobians, la.posterior_covariance.numpy()),
        rtol=1e-8, atol=1e-10)


class StepsFolded(keras.Model):
    """A Dense layer on the steps of each example folded into the batch axis."""

    def __init__(self):
        super().__init__()
        self.steps = L.Dense(2, "tanh", dtype=F64)
        self.head = L.Dense(2, dtype=F64)

    def call(self, x):
        rows = self.steps(keras.ops.reshape(x, (-1, x.shape[-1])))  # [N T, 2]
        return self.head(keras.ops.reshape(rows, (-1, x.shape[1] * 2)))


@pytest.mark.parametrize("structure", ["full", "diag", "kron"])
def test_a_layer_on_steps_folded_into_the_batch_is_not_taken_per_row(structure):
    """Its rows are not examples: the exact GGN (full), its diagonal (diag and the Kronecker
    fit's fallback), and the GLM predictive's exact variance."""
    x = np.random.default_rng(0).normal(size=(4, 3, 3))
    y = targets("regression", 2, 4)
    keras.utils.set_random_seed(0)
    model = StepsFolded()
    model(x[:1])
    la = ltf.Laplace(model, "regression", "all", structure, prior_precision=1.0, progress=False)
    la.fit((x, y))
    exact = testing.brute_force_ggn(la.logit_model, la.likelihood, tf.constant(x),
                                    tf.constant(y))
    curvature = la.posterior_precision.to_dense().numpy() - np.eye(la.n_params)
    steps = la.subset.slices[0]
    part = slice(steps.offset, steps.offset + steps.size)
    if structure == "full":
        np.testing.assert_allclose(curvature, exact, **EXACT)
    else:
        np.testing.assert_allclose(np.diag(curvature)[part], np.diag(exact)[part], **EXACT)
    if structure == "kron":
        assert la.block_kinds()[steps.name] == "diag"
    jacobians = testing.brute_force_jacobians(la.logit_model, tf.constant(x))
    covariance = np.linalg.inv(la.posterior_precision.to_dense().numpy())
    expected = np.einsum("nkp,pq,nlq->nkl", jacobians, covariance, jacobians)
    np.testing.assert_allclose(la.functional_variance(x), expected, **EXACT)


def test_block_kinds_tells_layers_of_the_same_name_apart():
    """Two Dense layers named "proj" in two nested models, one called once (Kronecker) and one
    called twice (shared: the diagonal fallback), are two entries, in the weight order."""
    keras.utils.set_random_seed(0)
    L = keras.layers
    once_in, twice_in = keras.Input((3,), dtype=F64), keras.Input((3,), dtype=F64)
    once = keras.Model(once_in, L.Dense(3, "tanh", name="proj", dtype=F64)(once_in))
    shared = L.Dense(3, "tanh", name="proj", dtype=F64)
    twice = keras.Model(twice_in, shared(shared(twice_in)))
    inputs = keras.Input((3,), dtype=F64)
    joined = L.Concatenate(dtype=F64)([once(inputs), twice(inputs)])
    model = keras.Model(inputs, L.Dense(2, name="head", dtype=F64)(joined))
    la = ltf.Laplace(model, "regression", "all", "kron", progress=False)
    la.fit((np.ones((4, 3)), np.zeros((4, 2))))
    assert la.block_kinds() == {"proj": "kron", "proj#2": "diag", "head": "kron"}


@pytest.mark.parametrize("masking", ["masking_layer", "embedding_mask_zero"])
def test_masked_positions_do_not_count_as_data(masking):
    """The same sequences padded to 5 or to 8 steps give the same Kronecker posterior: a
    layer that sees masked positions takes the exact GGN diagonal (a Kronecker input factor
    would count the padding as data)."""
    rng = np.random.default_rng(0)
    lengths = [2, 5, 3, 4]
    if masking == "masking_layer":
        steps = [rng.normal(size=(n, 3)) + 0.5 for n in lengths]
        first = [keras.Input((None, 3), dtype=F64), keras.layers.Masking(0.0, dtype=F64)]
    else:
        steps = [rng.integers(1, 6, size=(n, 1)).astype(np.float64) for n in lengths]
        first = [keras.Input((None,), dtype="int32"),
                 keras.layers.Embedding(6, 3, mask_zero=True, dtype=F64)]

    def padded(t):
        x = np.zeros((len(steps), t, steps[0].shape[1]))
        for i, s in enumerate(steps):
            x[i, :len(s)] = s
        return x[..., 0].astype("int32") if masking != "masking_layer" else x

    keras.utils.set_random_seed(0)
    model = keras.Sequential([*first, keras.layers.Dense(4, "tanh", dtype=F64),
                              keras.layers.GlobalAveragePooling1D(dtype=F64),
                              keras.layers.Dense(3, dtype=F64)])
    y = np.array([0, 1, 2, 1])
    results = []
    for t in (5, 8):
        la = ltf.Laplace(model, "classification", "all", "kron", progress=False)
        la.fit((padded(t), y))
        results.append((float(la.log_marginal_likelihood()), np.asarray(la(padded(t)))))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-10)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-9)
