"""K-FAC blocks against brute force: exact identities, explicit factors, fallbacks, Monte Carlo.

K-FAC is exact where every layer has one input row per example: one datum (any number of
outputs) through Dense layers and convolutions with a 1x1 output map, and a deep linear
regression network for any number of data. Weight-shared layers (several locations per
example) are checked factor by factor: ``A`` against patches extracted by explicit loops, ``G``
against per-example pre-activation Jacobians.
"""

from __future__ import annotations

import logging
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from models import F64, MODELS, deep_linear, targets

import laplace_tf as ltf
from laplace_tf import testing
from laplace_tf.batches import Batches
from laplace_tf.blocks import DiagBlock, KronBlock, blocks_to_dense
from laplace_tf.curvature import kron_layers, make_builder
from laplace_tf.curvature.base import fit_curvature
from laplace_tf.curvature.kron import KronBuilder
from laplace_tf.likelihoods import get_likelihood
from laplace_tf.params import LayerSlice

EXACT = {"rtol": 1e-9, "atol": 1e-11}
L = keras.layers


def _head(x, n_outputs):
    """tanh -> flatten -> Dense(n_outputs): the rest of every small test network."""
    h = L.Activation("tanh", dtype=F64)(x)
    return L.Dense(n_outputs, dtype=F64)(L.Flatten(dtype=F64)(h))


def _first_layer_net(input_shape, layer):
    """``layer`` on the input, then :func:`_head`: a builder ``(n_outputs, seed, n)``."""

    def build(n_outputs: int, seed: int = 0, n: int = 3):
        keras.utils.set_random_seed(seed)
        inputs = keras.Input(input_shape, dtype=F64)
        model = keras.Model(inputs, _head(layer()(inputs), n_outputs))
        return model, np.random.default_rng(seed).normal(size=(n, *input_shape))

    return build


def _conv2d(*args, **kw):
    return lambda: L.Conv2D(*args, dtype=F64, **kw)


def _conv1d(*args, **kw):
    return lambda: L.Conv1D(*args, dtype=F64, **kw)


# Convolutions whose output map is a single location: K-FAC is exact for one datum.
SINGLE_LOCATION = {
    "conv2d_kernel_covers_input": _first_layer_net((3, 3, 2), _conv2d(3, 3)),
    "conv2d_dilated_no_bias": _first_layer_net(
        (5, 5, 2), _conv2d(2, 3, dilation_rate=2, use_bias=False)),
    "conv2d_strided_same_uneven_pad": _first_layer_net(
        (2, 2, 2), _conv2d(2, 3, strides=2, padding="same")),
    "conv1d_causal": _first_layer_net((1, 3), _conv1d(2, 3, padding="causal")),
    "conv1d_strided": _first_layer_net((4, 2), _conv1d(2, 2, strides=3)),
}

# Layers used at several locations per example; the first layer is the one under test.
WEIGHT_SHARED = {
    "small_cnn": MODELS["small_cnn"],
    "conv2d_strided_same": _first_layer_net((6, 5, 2), _conv2d(3, 3, strides=2, padding="same")),
    "conv2d_dilated_same_no_bias": _first_layer_net(
        (6, 6, 2), _conv2d(2, 3, dilation_rate=2, padding="same", use_bias=False)),
    "conv2d_uneven_kernel": _first_layer_net(
        (5, 6, 2), _conv2d(2, (2, 3), strides=(1, 2), padding="same")),
    "conv1d_causal_dilated": _first_layer_net(
        (7, 3), _conv1d(2, 3, padding="causal", dilation_rate=2)),
    "conv1d_strided_valid": _first_layer_net((7, 2), _conv1d(3, 2, strides=2)),
    "dense_rank3": _first_layer_net((4, 3), lambda: L.Dense(2, dtype=F64)),
    # A [301, 301] and G [260, 260] are Gram matrices taken in bands (_kron_sums.gram)
    "dense_rank3_wide": _first_layer_net((4, 300), lambda: L.Dense(260, dtype=F64)),
}

# slice index -> locations per example, where one datum is not exact (checked factor by factor)
SEVERAL_LOCATIONS = {"small_cnn": {0: 9}}

EXACT_MODELS = {
    **{name: MODELS[name] for name in
       ("tanh_mlp", "relu_mlp", "small_cnn", "two_branch_functional", "subclassed")},
    "deep_linear": deep_linear,
    **SINGLE_LOCATION,
}


def _problem(build, likelihood_name: str, n: int, n_outputs: int, seed: int = 0, **lik):
    model, x = build(n_outputs, seed=seed, n=n)
    logit_model = testing.subset_of(model)
    likelihood = get_likelihood(likelihood_name, **lik)
    y = likelihood.prepare_targets(targets(likelihood_name, n_outputs, n, seed), n_outputs, tf.float64)
    return logit_model, likelihood, tf.constant(x), y


def _brute_force(kind, logit_model, likelihood, x, y) -> np.ndarray:
    reference = testing.brute_force_ggn if kind == "ggn" else testing.brute_force_ef
    return reference(logit_model, likelihood, x, y)


def _slice(matrix: np.ndarray, layer_slice) -> np.ndarray:
    part = slice(layer_slice.offset, layer_slice.offset + layer_slice.size)
    return matrix[part, part]


@pytest.mark.parametrize("likelihood_name, n_outputs, kind", [
    ("regression", 1, "ggn"), ("classification", 3, "ggn"), ("classification", 3, "ef"),
])
@pytest.mark.parametrize("model_name", list(EXACT_MODELS))
def test_kron_equals_exact_block_for_one_datum(model_name, likelihood_name, n_outputs, kind):
    logit_model, likelihood, x, y = _problem(
        EXACT_MODELS[model_name], likelihood_name, 1, n_outputs, sigma_noise=0.7)
    blocks, _ = KronBuilder(logit_model, likelihood, kind).batch_blocks(x, y)
    exact = _brute_force(kind, logit_model, likelihood, x, y)
    several = SEVERAL_LOCATIONS.get(model_name, {})
    for index, (block, layer_slice) in enumerate(zip(blocks, logit_model.subset.slices, strict=True)):
        assert isinstance(block, KronBlock), layer_slice.name
        assert float(block.n) == several.get(index, 1)
        if index not in several:
            np.testing.assert_allclose(block.to_dense(), _slice(exact, layer_slice), **EXACT)


class DoubledDense(L.Dense):
    """A Dense layer of twice its inputs: a subclass with its own ``call``, no rule of its own."""

    def call(self, inputs):
        return super().call(2.0 * inputs)


class DoubledRule(kron_layers.KronRule):
    def rows(self, layer, inputs):
        return tf.reshape(2.0 * inputs, [-1, layer.kernel.shape[0]])


@pytest.mark.parametrize("likelihood_name, n_outputs", [("regression", 1), ("classification", 3)])
def test_registered_rule_gives_the_exact_kron_block_of_a_custom_layer(likelihood_name, n_outputs):
    build = _first_layer_net((3,), lambda: DoubledDense(4, dtype=F64))
    logit_model, likelihood, x, y = _problem(build, likelihood_name, 1, n_outputs, sigma_noise=0.7)
    blocks, _ = KronBuilder(logit_model, likelihood).batch_blocks(x, y)
    assert isinstance(blocks[0], DiagBlock)  # no rule for the subclass: the diagonal fallback
    ltf.register_kron_rule(DoubledDense, DoubledRule())
    try:
        blocks, _ = KronBuilder(logit_model, likelihood).batch_blocks(x, y)
    finally:
        del kron_layers.KRON_RULES[DoubledDense]
    assert isinstance(blocks[0], KronBlock)
    exact = testing.brute_force_ggn(logit_model, likelihood, x, y)
    np.testing.assert_allclose(blocks[0].to_dense(), _slice(exact, logit_model.subset.slices[0]),
                               **EXACT)


def test_a_rule_registered_after_a_fit_is_used_by_the_next_posterior_of_the_same_model():
    build = _first_layer_net((3,), lambda: DoubledDense(4, dtype=F64))
    logit_model, likelihood, x, y = _problem(build, "regression", 1, 1, sigma_noise=1.0)
    model = logit_model.model

    def fitted():
        la = ltf.Laplace(model, "regression", "all", "kron", prior_precision=1.0, progress=False)
        la.fit((x, y))
        return la

    name = logit_model.subset.slices[0].name
    assert fitted().block_kinds()[name] == "diag"  # traced and cached without a rule
    ltf.register_kron_rule(DoubledDense, DoubledRule())
    try:
        la = fitted()
    finally:
        del kron_layers.KRON_RULES[DoubledDense]
    assert la.block_kinds()[name] == "kron"
    block = _slice(testing.brute_force_ggn(logit_model, likelihood, x, y),
                   logit_model.subset.slices[0])
    size = len(block)
    np.testing.assert_allclose(la.posterior_precision.to_dense()[:size, :size],
                               block + np.eye(size), **EXACT)


class WrongWidthRule(kron_layers.KronRule):
    def rows(self, layer, inputs):
        return tf.reshape(2.0 * inputs, [-1, 1])


class WrongCountRule(kron_layers.KronRule):
    def rows(self, layer, inputs):
        return tf.concat([inputs, inputs], axis=0)


@pytest.mark.parametrize("rule, error, words", [
    (WrongWidthRule(), ValueError, r"the rule of DoubledDense layer '\w+' gave rows of shape "
                                   r"\(None, 1\); expected \[n, 3\]"),
    (WrongCountRule(), tf.errors.InvalidArgumentError,
     "gave a number of rows other than examples x locations"),
])
def test_a_rule_whose_rows_do_not_fit_the_layer_is_refused(rule, error, words):
    build = _first_layer_net((3,), lambda: DoubledDense(4, dtype=F64))
    logit_model, _, x, y = _problem(build, "regression", 2, 1, sigma_noise=1.0)
    ltf.register_kron_rule(DoubledDense, rule)
    try:
        la = ltf.Laplace(logit_model.model, "regression", "all", "kron", progress=False)
        with pytest.raises(error, match=words):
            la.fit((x, y))
    finally:
        del kron_layers.KRON_RULES[DoubledDense]


@pytest.mark.parametrize("layer_type, rule, words", [
    (int, DoubledRule(), "layer_type: expected a subclass of keras.layers.Layer"),
    (DoubledDense, object(), "rule: expected an instance of laplace_tf.curvature.KronRule"),
])
def test_register_kron_rule_refuses_bad_arguments(layer_type, rule, words):
    with pytest.raises(TypeError, match=words):
        ltf.register_kron_rule(layer_type, rule)


@pytest.mark.parametrize("n", [1, 5])
def test_kron_equals_block_diagonal_ggn_of_deep_linear_regression(n):
    logit_model, likelihood, x, y = _problem(deep_linear, "regression", n, 3, sigma_noise=0.6)
    blocks, _ = KronBuilder(logit_model, likelihood).batch_blocks(x, y)
    exact = testing.brute_force_ggn(logit_model, likelihood, x, y)
    block_diagonal = np.zeros_like(exact)
    for s in logit_model.subset.slices:
        part = slice(s.offset, s.offset + s.size)
        block_diagonal[part, part] = exact[part, part]
    assert len(blocks) == 3 and np.abs(exact - block_diagonal).max() > 1e-3
    np.testing.assert_allclose(blocks_to_dense(blocks), block_diagonal, **EXACT)


@pytest.mark.parametrize("model_name", list(WEIGHT_SHARED))
def test_weight_shared_layer_factors_equal_patch_and_jacobian_sums(model_name):
    logit_model, likelihood, x, y = _problem(WEIGHT_SHARED[model_name], "classification", 3, 3)
    layer = logit_model.subset.slices[0].layer
    blocks, _ = KronBuilder(logit_model, likelihood).batch_blocks(x, y)
    block = blocks[0]

    rows = (x.numpy().reshape(-1, x.shape[-1]) if isinstance(layer, L.Dense)
            else testing.brute_force_conv_patches(layer, x))
    if layer.use_bias:
        rows = np.concatenate([rows, np.ones((len(rows), 1))], axis=1)
    jacobians = testing.brute_force_preactivation_jacobians(logit_model, layer, x)
    jacobians = jacobians.reshape(3, 3, -1, jacobians.shape[-1])        # [N, K, locations, dout]
    lam = testing.brute_force_output_hessians(likelihood, logit_model(x), y)
    G = np.einsum("nktd,nkl,nlte->de", jacobians, lam, jacobians)

    assert len(rows) > 3 and float(block.n) == len(rows)
    np.testing.assert_allclose(block.A, rows.T @ rows / len(rows), **EXACT)
    np.testing.assert_allclose(block.G, G, **EXACT)


@pytest.mark.parametrize("model_name", [n for n in WEIGHT_SHARED if not n.startswith("dense")])
def test_reference_patches_reproduce_the_convolution(model_name):
    """The explicit patch reference itself: ``patches @ kernel + bias`` is the pre-activation."""
    model, x = WEIGHT_SHARED[model_name](1, n=2)
    logit_model = testing.subset_of(model)
    layer = logit_model.subset.slices[0].layer
    preactivations = []
    logit_model(tf.constant(x), layers=[layer],
                hook=lambda _, inputs, z: preactivations.append(z) or z)
    kernel = layer.kernel.numpy().reshape(-1, layer.filters)
    bias = layer.bias.numpy() if layer.use_bias else 0.0
    np.testing.assert_allclose(
        testing.brute_force_conv_patches(layer, x) @ kernel + bias,
        preactivations[0].numpy().reshape(-1, layer.filters), **EXACT)


class TracedDense(L.Dense):
    """A Dense layer whose rule records the source file of the code that asks for its rows."""


class _RecordingRule(kron_layers.KronRule):
    def __init__(self):
        self.callers = []

    def rows(self, layer, inputs):
        self.callers.append(sys._getframe(1).f_code.co_filename)
        return tf.reshape(inputs, [-1, layer.kernel.shape[0]])


@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_fit_steps_trace_the_builders_without_autograph(structure, monkeypatch):
    """The builders' Python is traced as written, not converted by autograph first (Keras 3
    layers need no autograph; converting laplace_tf's code took seconds of a first fit)."""
    rule = _RecordingRule()
    monkeypatch.setitem(kron_layers.KRON_RULES, TracedDense, rule)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,), dtype=F64), TracedDense(2, dtype=F64)])
    x = np.random.default_rng(0).normal(size=(4, 3))
    builder = make_builder("all", structure, testing.subset_of(model),
                           get_likelihood("classification"))
    fit_curvature(builder, Batches((x, np.array([0, 1, 1, 0])), dtype=tf.float64))
    assert rule.callers and not any("autograph" in name for name in rule.callers), rule.callers


def _shared_dense(n_outputs: int, seed: int = 0, n: int = 4):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((3,), dtype=F64)
    shared = L.Dense(3, "tanh", dtype=F64)
    model = keras.Model(inputs, L.Dense(n_outputs, dtype=F64)(shared(shared(inputs))))
    return model, np.random.default_rng(seed).normal(size=(n, 3))


def _frozen_bias(n_outputs: int, seed: int = 0, n: int = 4):
    model, x = MODELS["tanh_mlp"](n_outputs, seed, n)
    model.layers[0].bias.trainable = False
    return model, x


def _with_prelu(n_outputs: int, seed: int = 0, n: int = 6):
    """Dense -> PReLU (weights without a Kronecker rule) -> Dense."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((3,), dtype=F64), L.Dense(4, dtype=F64),
                              L.PReLU(alpha_initializer="ones", dtype=F64),
                              L.Dense(n_outputs, dtype=F64)])
    model.layers[1].alpha.assign(np.linspace(-0.5, 0.5, 4))
    return model, np.random.default_rng(seed).normal(size=(n, 3))


FALLBACKS = {   # model -> (index of the layer with a diagonal block, words of the logged reason)
    "with_prelu": (_with_prelu, 1, "PReLU has no Kronecker rule"),
    "shared_dense": (_shared_dense, 0, "called 2 times"),
    "frozen_bias": (_frozen_bias, 0, "not exactly (kernel, bias)"),
}


@pytest.mark.parametrize("kind", ["ggn", "ef"])
@pytest.mark.parametrize("model_name", list(FALLBACKS))
def test_fallback_layers_get_the_exact_diagonal(model_name, kind, caplog):
    build, index, reason = FALLBACKS[model_name]
    logit_model, likelihood, x, y = _problem(build, "classification", 4, 3)
    with caplog.at_level(logging.INFO, logger="laplace_tf"):
        blocks, _ = KronBuilder(logit_model, likelihood, kind).batch_blocks(x, y)
    exact = _brute_force(kind, logit_model, likelihood, x, y)
    layer_slice = logit_model.subset.slices[index]
    kinds = [type(b) for b in blocks]
    assert kinds == [DiagBlock if i == index else KronBlock for i in range(len(blocks))]
    np.testing.assert_allclose(blocks[index].diagonal, np.diag(_slice(exact, layer_slice)), **EXACT)
    messages = [r.getMessage() for r in caplog.records if "kron" in r.getMessage()]
    assert len(messages) == 1 and layer_slice.name in messages[0] and reason in messages[0]


def test_fallbacks_are_one_warning_per_builder(caplog):
    """A builder serves one fit: its fallback layers are named once, at WARNING level."""
    logit_model, likelihood, x, y = _problem(_with_prelu, "classification", 2, 3)
    builder = KronBuilder(logit_model, likelihood)
    with caplog.at_level(logging.WARNING, logger="laplace_tf"):
        builder.batch_blocks(x, y)
        builder.batch_blocks(x[:1], y[:1])
    records = [r for r in caplog.records if "kron" in r.getMessage()]
    assert [r.levelno for r in records] == [logging.WARNING]
    assert logit_model.subset.slices[1].name in records[0].getMessage()


@pytest.mark.parametrize("layer, input_shape, reason", [
    (L.Dense(3), (None, 4), None),
    (L.Conv1D(2, 3, padding="causal"), (None, 6, 4), None),
    (L.Conv2D(4, 2), (None, 6, 6, 4), None),
    (L.Conv2D(4, 2, groups=2), (None, 6, 6, 4), None),
    (L.Conv2D(4, 2, data_format="channels_first"), (None, 4, 6, 6), "data_format="),
    (L.Conv3D(4, 2), (None, 6, 6, 6, 4), None),
    (L.Conv2DTranspose(4, 2), (None, 6, 6, 4), None),
    (L.Conv2DTranspose(4, 2, data_format="channels_first"), (None, 4, 6, 6), "data_format="),
    (L.SimpleRNN(3), (None, 5, 4), "SimpleRNN has no Kronecker rule"),
    (L.LayerNormalization(rms_scaling=True), (None, 4), "rms_scaling=True"),
])
def test_layer_routing(layer, input_shape, reason):
    layer.build(input_shape)
    variables = tuple(layer.trainable_variables)
    found = kron_layers.fallback_reason(LayerSlice(layer, variables, 0, 0))
    assert found is None if reason is None else reason in found


@pytest.mark.parametrize("model_name", ["with_batchnorm", "small_cnn"])
def test_two_batches_equal_one_batch(model_name):
    build = MODELS[model_name]
    logit_model, likelihood, x, _ = _problem(build, "classification", 6, 3)
    y = targets("classification", 3, 6)

    def fit(batch_size):
        batches = Batches((x.numpy(), y), batch_size, dtype=tf.float64)
        return fit_curvature(KronBuilder(logit_model, likelihood), batches)

    whole, halves = fit(6), fit(3)
    assert halves.n_data == whole.n_data == 6
    for a, b in zip(whole.blocks, halves.blocks, strict=True):
        assert type(a) is type(b)
        for left, right in zip(a, b, strict=True):
            np.testing.assert_allclose(left, right, **EXACT)


def _relative_error(estimate, exact) -> float:
    return float(np.linalg.norm(estimate - exact) / np.linalg.norm(exact))


@pytest.mark.parametrize("likelihood_name, n_outputs", [
    ("classification", 3), ("binary", 1), ("regression", 2),
])
def test_monte_carlo_ggn_converges_to_the_exact_kron(likelihood_name, n_outputs):
    logit_model, likelihood, x, y = _problem(
        MODELS["tanh_mlp"], likelihood_name, 4, n_outputs, sigma_noise=0.5)
    exact, _ = KronBuilder(logit_model, likelihood).batch_blocks(x, y)
    errors = []
    for repeats in (4, 64, 1024):            # the batch repeated: independent draws per row
        tiled_x, tiled_y = tf.tile(x, [repeats, 1]), tf.tile(y, [repeats, 1])
        builder = KronBuilder(logit_model, likelihood, stochastic=True, seed=3)
        sampled, _ = builder.batch_blocks(tiled_x, tiled_y)
        for mc, ex in zip(sampled, exact, strict=True):
            np.testing.assert_allclose(mc.A, ex.A, **EXACT)
        errors.append(max(_relative_error(mc.G / repeats, ex.G)
                          for mc, ex in zip(sampled, exact, strict=True)))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.1, errors


def test_monte_carlo_same_seed_same_numbers_and_fresh_draws_per_batch():
    logit_model, likelihood, x, y_prepared = _problem(_with_prelu, "classification", 6, 3)
    y = targets("classification", 3, 6)

    def fit(seed, n_batches):           # compiled: fit_curvature runs batch_blocks in tf.function
        data = (np.tile(x.numpy(), (n_batches, 1)), np.tile(y, n_batches))
        builder = KronBuilder(logit_model, likelihood, stochastic=True, seed=seed)
        return fit_curvature(builder, Batches(data, 6, dtype=tf.float64)).blocks

    once, twice, again, other = fit(7, 1), fit(7, 2), fit(7, 2), fit(8, 2)
    for a, b in zip(twice, again, strict=True):
        for left, right in zip(a, b, strict=True):
            np.testing.assert_array_equal(left, right)
    assert not np.allclose(twice[0].G, 2 * once[0].G)         # the second batch draws anew
    assert not np.allclose(twice[0].G, other[0].G)            # another seed, other numbers
    exact, _ = KronBuilder(logit_model, likelihood).batch_blocks(x, y_prepared)
    np.testing.assert_allclose(once[1].diagonal, exact[1].diagonal, **EXACT)   # PReLU


@pytest.mark.parametrize("kwargs, error, words", [
    ({"kind": "hessian"}, ValueError, "'hessian' is not available"),
    ({"kind": "ef", "stochastic": True}, ValueError, "stochastic"),
    ({"stochastic": "yes"}, TypeError, "stochastic: expected True or False"),
    ({"stochastic": True, "seed": 1.5}, TypeError, "seed: expected an integer"),
    ({"stochastic": True, "seed": True}, TypeError, "seed: expected an integer"),
])
def test_bad_arguments_raise(kwargs, error, words):
    logit_model, likelihood, _, _ = _problem(MODELS["tanh_mlp"], "classification", 2, 3)
    with pytest.raises(error, match=words):
        KronBuilder(logit_model, likelihood, **kwargs)
