"""Last-layer curvature in closed form, against brute-force references (float64).

The closed forms (``laplace_tf.curvature.last_layer``) are checked against the last-layer
block of the dense GGN / EF / Hessian over ALL weights from ``laplace_tf.testing``, on every
model of ``tests/models.py`` and every likelihood; the Kronecker factors against features
from a Keras sub-model and per-example logit Hessians by autodiff.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import cases
import keras
import numpy as np
import pytest
import tensorflow as tf
from models import F64, MODELS, targets

from laplace_tf import testing
from laplace_tf.batches import Batches
from laplace_tf.curvature import last_layer
from laplace_tf.curvature.base import fit_curvature
from laplace_tf.curvature.last_layer import (
    LastLayerBuilder,
    find_last_layer,
    last_layer_features,
)
from laplace_tf.likelihoods import get_likelihood

EXACT = {"rtol": 1e-10, "atol": 1e-10}

# name -> (likelihood, sigma_noise, number of outputs)
LIKELIHOODS = {
    "classification": ("classification", 1.0, 3),
    "binary": ("binary", 1.0, 1),
    "regression": ("regression", 0.7, 2),
    "regression_per_output": ("regression", np.array([0.5, 2.0]), 2),
}
BRUTE_FORCE = {
    "ggn": testing.brute_force_ggn,
    "ef": testing.brute_force_ef,
    "hessian": testing.brute_force_hessian,
}


@functools.cache
def _case(model_name: str, likelihood_name: str) -> SimpleNamespace:
    """A model, data, and logit models over the last layer and over all weights."""
    name, sigma, n_outputs = LIKELIHOODS[likelihood_name]
    model, x = MODELS[model_name](n_outputs)
    likelihood = get_likelihood(name, sigma)
    y = likelihood.prepare_targets(targets(name, n_outputs, len(x)), n_outputs, tf.float64)
    everything = testing.subset_of(model)
    last = everything.subset.slices[-1]
    assert last.layer is find_last_layer(model)
    return SimpleNamespace(
        model=model, x=tf.constant(x), y=y, likelihood=likelihood, name=name,
        logit_model=testing.subset_of(model, [last.layer]), everything=everything,
        block=slice(last.offset, last.offset + last.size),
    )


@functools.cache
def _brute_force_block(model_name: str, likelihood_name: str, kind: str) -> np.ndarray:
    """The last layer's block of the brute-force curvature over all weights."""
    case = _case(model_name, likelihood_name)
    dense = BRUTE_FORCE[kind](case.everything, case.likelihood, case.x, case.y)
    return dense[case.block, case.block]


def _block(case: SimpleNamespace, kind: str, structure: str, x=None, y=None):
    builder = LastLayerBuilder(case.logit_model, case.likelihood, kind, structure)
    (block,), _ = builder.batch_blocks(case.x if x is None else x, case.y if y is None else y)
    return block


def _hidden_features(model: keras.Model, x) -> np.ndarray:
    """The last layer's inputs computed by Keras itself (a sub-model, or the subclass's body)."""
    if hasattr(model, "hidden"):
        return model.hidden(x).numpy()
    return keras.Model(model.inputs[0], find_last_layer(model).input)(x).numpy()


def _with_one(features: np.ndarray) -> np.ndarray:
    return np.concatenate([features, np.ones((len(features), 1))], axis=1)


def _logit_gradients(case: SimpleNamespace, logits: np.ndarray) -> np.ndarray:
    """``d nll_n / d f_n`` written out by hand for each likelihood."""
    y = case.y.numpy()
    if case.name == "classification":
        p = np.exp(logits - logits.max(1, keepdims=True))
        return p / p.sum(1, keepdims=True) - y
    if case.name == "binary":
        return 1 / (1 + np.exp(-logits)) - y
    return (logits - y) / case.likelihood.sigma_noise**2


CASES = [(m, lik) for m in MODELS for lik in LIKELIHOODS]


# --- closed forms == brute force -----------------------------------------------------------

@pytest.mark.parametrize("structure", ["full", "diag"])
@pytest.mark.parametrize("kind", ["ggn", "ef", "hessian"])
@pytest.mark.parametrize(("model_name", "likelihood_name"), CASES)
def test_full_and_diag_equal_the_brute_force_block(model_name, likelihood_name, kind, structure):
    expected = _brute_force_block(model_name, likelihood_name, kind)
    if structure == "diag":
        expected = np.diag(np.diag(expected))
    block = _block(_case(model_name, likelihood_name), kind, structure)
    np.testing.assert_allclose(block.to_dense().numpy(), expected, **EXACT)


@pytest.mark.parametrize("row_block", [1, 2, 3])
@pytest.mark.parametrize("likelihood_name", ["classification", "regression_per_output"])
def test_full_sums_by_blocks_of_input_rows_equal_the_brute_force_block(
        monkeypatch, likelihood_name, row_block):
    # tanh_mlp: 4 features + the bias's 1 = 5 input rows, in blocks of 1, 2 (+ a ragged 1), 3 + 2
    monkeypatch.setattr(last_layer, "_ROW_BLOCK", row_block)
    expected = _brute_force_block("tanh_mlp", likelihood_name, "ggn")
    block = _block(_case("tanh_mlp", likelihood_name), "ggn", "full")
    np.testing.assert_allclose(block.to_dense().numpy(), expected, **EXACT)


@pytest.mark.parametrize("kind", ["ggn", "ef"])
@pytest.mark.parametrize(("model_name", "likelihood_name"), CASES)
def test_kron_on_one_datum_equals_brute_force(model_name, likelihood_name, kind):
    # one datum: A (x) G = (a a^T) (x) M_1 is the exact last-layer curvature, for any K
    # (kind "hessian" runs the GGN code, checked against the brute-force Hessian above)
    case = _case(model_name, likelihood_name)
    x, y = case.x[:1], case.y[:1]
    expected = BRUTE_FORCE[kind](case.logit_model, case.likelihood, x, y)
    np.testing.assert_allclose(_block(case, kind, "kron", x, y).to_dense().numpy(), expected, **EXACT)


@pytest.mark.parametrize("kind", ["ggn", "ef"])
@pytest.mark.parametrize(("model_name", "likelihood_name"), CASES)
def test_kron_factors_equal_hand_computed(model_name, likelihood_name, kind):
    case = _case(model_name, likelihood_name)
    a = _with_one(_hidden_features(case.model, case.x))
    logits = case.model(case.x).numpy()
    if kind == "ggn":
        G = testing.brute_force_output_hessians(case.likelihood, tf.constant(logits), case.y).sum(0)
    else:
        r = _logit_gradients(case, logits)
        G = r.T @ r
    block = _block(case, kind, "kron")
    np.testing.assert_allclose(block.A.numpy(), a.T @ a / len(a), **EXACT)
    np.testing.assert_allclose(block.G.numpy(), G, **EXACT)
    assert float(block.n) == len(a)


@pytest.mark.parametrize("likelihood_name", LIKELIHOODS)
def test_output_hessian_diag_lowrank_equals_the_autodiff_hessian(likelihood_name):
    name, sigma, n_outputs = LIKELIHOODS[likelihood_name]
    likelihood = get_likelihood(name, sigma)
    logits = tf.constant(np.random.default_rng(5).normal(size=(5, n_outputs)))
    y = likelihood.prepare_targets(targets(name, n_outputs, 5), n_outputs, tf.float64)
    d, U = (t.numpy() for t in likelihood.output_hessian_diag_lowrank(logits))
    expected = testing.brute_force_output_hessians(likelihood, logits, y)
    actual = np.stack([np.diag(dn) - Un @ Un.T for dn, Un in zip(d, U, strict=True)])
    np.testing.assert_allclose(actual, expected, **EXACT)


# --- features --------------------------------------------------------------------------------

def _two_input_model(n_outputs: int = 3, seed: int = 0, n: int = 5):
    """:func:`cases.two_input` and its sub-model up to the last layer's input."""
    model, x = cases.two_input(n_outputs, seed, n)
    hidden = keras.Model(model.input, model.layers[-1].input)
    return model, x, hidden


@pytest.mark.parametrize("model_name", MODELS)
def test_features_are_the_hidden_activations(model_name):
    case = _case(model_name, "classification")
    features, logits = last_layer_features(case.logit_model, case.x)
    np.testing.assert_allclose(features.numpy(), _hidden_features(case.model, case.x), **EXACT)
    np.testing.assert_allclose(logits.numpy(), case.model(case.x).numpy(), **EXACT)


def test_features_of_a_multi_input_dict_model():
    model, x, hidden = _two_input_model()
    x = {k: tf.constant(v) for k, v in x.items()}
    features, logits = last_layer_features(testing.subset_of(model, [find_last_layer(model)]), x)
    np.testing.assert_allclose(features.numpy(), hidden(x).numpy(), **EXACT)
    np.testing.assert_allclose(logits.numpy(), model(x).numpy(), **EXACT)


@pytest.mark.parametrize("kind", ["ggn", "hessian", "ef"])
def test_no_backward_pass_through_the_body(kind):
    """GGN/Hessian: no gradient op at all; EF: the same gradient ops for any body."""
    likelihood = get_likelihood("classification")

    def gradient_ops(model_name):
        case = _case(model_name, "classification")
        builder = LastLayerBuilder(case.logit_model, likelihood, kind, "full")
        x_spec = tf.TensorSpec([None, *case.x.shape[1:]], tf.float64)
        y_spec = tf.TensorSpec([None, 3], tf.float64)
        graph = tf.function(builder.batch_blocks).get_concrete_function(x_spec, y_spec).graph
        return sorted(op.type for op in graph.get_operations() if "gradient" in op.name.lower())

    mlp, cnn = gradient_ops("tanh_mlp"), gradient_ops("small_cnn")
    assert mlp == cnn
    assert not {"MatMul", "TanhGrad", "Conv2DBackpropFilter"} & set(cnn)
    if kind != "ef":
        assert cnn == []


# --- heads, names and nesting -----------------------------------------------------------------

def _mlp(head_activation=None, tail=(), n_outputs=3, **head):
    return keras.Sequential([
        keras.Input((3,), dtype=F64),
        keras.layers.Dense(4, "tanh", dtype=F64, name="hidden"),
        keras.layers.Dense(n_outputs, head_activation, dtype=F64, name="head", **head),
        *tail,
    ])


PROBABILITY_HEADS = {
    "dense_softmax": ("classification", 3, lambda: _mlp("softmax")),
    "softmax_layer": ("classification", 3, lambda: _mlp(tail=[keras.layers.Softmax(dtype=F64)])),
    "dropout_then_softmax": (
        "classification", 3,
        lambda: _mlp(tail=[keras.layers.Dropout(0.5, dtype=F64), keras.layers.Softmax(dtype=F64)]),
    ),
    "dense_sigmoid": ("binary", 1, lambda: _mlp("sigmoid", n_outputs=1)),
}


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
@pytest.mark.parametrize("head", PROBABILITY_HEADS)
def test_probability_head_gives_the_curvature_of_its_linear_twin(head, structure):
    name, n_outputs, build = PROBABILITY_HEADS[head]
    keras.utils.set_random_seed(3)
    model, twin = build(), _mlp(n_outputs=n_outputs)
    twin.set_weights(model.get_weights())
    x = tf.constant(np.random.default_rng(3).normal(size=(7, 3)))
    likelihood = get_likelihood(name)
    y = likelihood.prepare_targets(targets(name, n_outputs, 7), n_outputs, tf.float64)
    results = []
    for m in (model, twin):
        builder = LastLayerBuilder(testing.subset_of(m, [find_last_layer(m)]), likelihood,
                                   "ggn", structure)
        (block,), logits = builder.batch_blocks(x, y)
        results.append((block.to_dense().numpy(), logits.numpy()))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(results[0][1], twin(x).numpy(), rtol=1e-12, atol=1e-14)


def test_name_of_the_final_layer_is_the_default():
    model = _mlp()
    assert find_last_layer(model, "head") is find_last_layer(model) is model.layers[-1]


def test_head_inside_a_nested_model_matches_brute_force():
    keras.utils.set_random_seed(4)
    head = keras.Sequential([keras.layers.Dense(2, dtype=F64, name="inner_head")], name="inner")
    model = keras.Sequential(
        [keras.Input((3,), dtype=F64), keras.layers.Dense(4, "tanh", dtype=F64), head]
    )
    assert find_last_layer(model) is find_last_layer(model, "inner_head") is head.layers[0]
    x = tf.constant(np.random.default_rng(4).normal(size=(5, 3)))
    likelihood = get_likelihood("regression", 0.3)
    y = tf.constant(targets("regression", 2, 5))
    everything = testing.subset_of(model)
    block = slice(everything.subset.slices[-1].offset, None)
    expected = testing.brute_force_ggn(everything, likelihood, x, y)[block, block]
    builder = LastLayerBuilder(
        testing.subset_of(model, [head.layers[0]]), likelihood, "ggn", "full"
    )
    (actual,), _ = builder.batch_blocks(x, y)
    np.testing.assert_allclose(actual.matrix.numpy(), expected, **EXACT)


# --- batches ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["ggn", "ef"])
@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_two_batches_equal_one(structure, kind):
    case = _case("two_branch_functional", "classification")
    y = targets("classification", 3, len(case.x))
    builder = LastLayerBuilder(case.logit_model, case.likelihood, kind, structure)
    whole, halves = (
        fit_curvature(builder, Batches((case.x.numpy(), y), size, dtype=tf.float64))
        for size in (6, 3)
    )
    assert (whole.n_data, halves.n_data) == (6, 6)
    np.testing.assert_allclose(
        halves.blocks[0].to_dense().numpy(), whole.blocks[0].to_dense().numpy(), **EXACT
    )
    np.testing.assert_allclose(
        whole.blocks[0].to_dense().numpy(), _block(case, kind, structure).to_dense().numpy(),
        **EXACT,
    )


# --- bad inputs ----------------------------------------------------------------------------

class _Scaled(keras.Model):
    def __init__(self):
        super().__init__(dtype=F64)
        self.hidden = keras.layers.Dense(4, "tanh", dtype=F64)
        self.head = keras.layers.Dense(2, dtype=F64, name="head")

    def call(self, x):
        return 2.0 * self.head(self.hidden(x))


def _shared_head():
    inputs = keras.Input((3,), dtype=F64)
    head = keras.layers.Dense(3, dtype=F64, name="head")
    return keras.Model(inputs, head(head(inputs)))


def _built(model):
    model(np.zeros((1, 3)))
    return model


def _conv_last():
    return keras.Sequential([
        keras.Input((4, 4, 1), dtype=F64),
        keras.layers.Conv2D(2, 3, dtype=F64, name="conv"),
        keras.layers.GlobalAveragePooling2D(dtype=F64),
    ])


def _features(model, name=None, shape=(3,)):
    """Build a last-layer builder for ``model`` and run it on a batch of two zeros."""
    layer = find_last_layer(model, name)
    builder = LastLayerBuilder(
        testing.subset_of(model, [layer]), get_likelihood("regression"), "ggn", "kron"
    )
    x = tf.zeros((2, *shape), tf.float64)
    return builder.batch_blocks(x, tf.zeros_like(model(x)))


def _full_builder(model=None, sigma_noise=1.0, **options):
    model = _mlp() if model is None else model  # head: (4 + 1) x 3 = 15 weights
    return LastLayerBuilder(testing.subset_of(model, [model.layers[-1]]),
                            get_likelihood("regression", sigma_noise), "ggn", "full", **options)


BAD = {
    "unknown_name": (
        lambda: find_last_layer(_mlp(), "nope"),
        r"last_layer_name: .*'nope'.*\['hidden', 'head'\]",
    ),
    "name_of_a_layer_without_weights": (
        lambda: find_last_layer(_mlp(tail=[keras.layers.Softmax(dtype=F64, name="probs")]), "probs"),
        r"'probs'.*\['hidden', 'head'\]",
    ),
    "conv_last": (
        lambda: find_last_layer(_conv_last()), r"'conv' is a Conv2D.*subset_of_weights='all'",
    ),
    "conv_by_name": (
        lambda: find_last_layer(_conv_last(), "conv"), r"Conv2D.*subset_of_weights='all'",
    ),
    "hidden_name_is_not_the_output": (
        lambda: _features(_mlp(), "hidden"),
        r"'hidden' \(its activation 'tanh' is applied to it\).*last_layer_name=.*"
        r"subset_of_weights='all'",
    ),
    "lambda_after_head": (
        lambda: _features(_mlp(tail=[keras.layers.Lambda(lambda t: 2 * t, name="scale")])),
        r"'head' \(it is followed by 'scale' \(Lambda\)\).*subset_of_weights='all'",
    ),
    "tanh_head": (lambda: _features(_mlp("tanh")), r"its activation 'tanh'"),
    "subclassed_scaling": (
        lambda: _features(_built(_Scaled())),
        r"'head' \(code after it in the model's call changes it\)",
    ),
    "shared_head": (lambda: _features(_shared_head()), r"'head' was called 2 times"),
    "dense_on_sequences": (
        lambda: _features(keras.Sequential(
            [keras.Input((4, 3), dtype=F64), keras.layers.Dense(2, dtype=F64, name="seq")]
        ), shape=(4, 3)),
        r"'seq' receives inputs of shape \(2, 4, 3\).*subset_of_weights='all'",
    ),
    "lora_head": (lambda: find_last_layer(_mlp(lora_rank=1)), r"LoRA.*subset_of_weights='all'"),
    "subset_over_two_layers": (
        lambda: LastLayerBuilder(testing.subset_of(_mlp()), get_likelihood("regression")),
        r"logit_model: .*one layer.*\['hidden', 'head'\]",
    ),
    "unknown_structure": (
        lambda: LastLayerBuilder(testing.subset_of(m := _mlp(), [m.layers[-1]]),
                                 get_likelihood("regression"), structure="lowrank"),
        r"hessian_structure: .*'lowrank'",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_inputs_raise_clear_errors(case):
    action, message = BAD[case]
    with pytest.raises(ValueError, match=message):
        action()


def test_regression_full_block_is_the_kronecker_product():
    """Regression: sum_n (a~ a~^T) (x) diag(1 / sigma^2), by hand."""
    sigma = np.array([0.5, 1.0, 2.0])
    model = _mlp()
    builder = _full_builder(model, sigma)
    x = tf.constant(np.random.default_rng(6).normal(size=(4, 3)))
    (block,), _ = builder.batch_blocks(x, tf.zeros((4, 3), tf.float64))
    a = _with_one(model.layers[0](x).numpy())
    np.testing.assert_allclose(block.matrix.numpy(), np.kron(a.T @ a, np.diag(sigma**-2)), **EXACT)
