"""Models that output probabilities, and mixed-precision models: logits used exactly, or refused.

A model whose output is a softmax/sigmoid must not have it applied a second time: either the
final softmax/sigmoid is found in the model's structure and removed (then ``la.map_predict(x)``
equals ``model(x)`` and the curvature equals that of the same network without it), or the
fit refuses with a message that says how to expose the logits. A mixed-precision model
(float16 computation, float32 variables) is computed in float32 throughout: the same numbers
as the same weights in a float32 model.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import laplace_tf as ltf
from laplace_tf import params
from laplace_tf.outputs import check_output_op, check_output_values, probability_output
from tests.models import targets

F64 = "float64"
SUBSETS = [("all", "full"), ("all", "kron"), ("all", "diag"), ("last_layer", "kron")]
EXACT = {"rtol": 1e-10, "atol": 1e-12}


def _x(n=12, seed=0, dtype=np.float64):
    return np.random.default_rng(seed).normal(size=(n, 3)).astype(dtype)


def _body(n_outputs=3, head_activation=None, dtype=F64):
    return [
        keras.Input((3,), dtype=dtype),
        keras.layers.Dense(4, "tanh", dtype=dtype),
        keras.layers.Dense(n_outputs, head_activation, dtype=dtype, name="head"),
    ]


class _SoftmaxInCall(keras.Model):
    def __init__(self, link=tf.nn.softmax, n_outputs=3):
        super().__init__(dtype=F64)
        self.hidden = keras.layers.Dense(4, "tanh", dtype=F64)
        self.head = keras.layers.Dense(n_outputs, dtype=F64)
        self.link = link

    def call(self, x):
        return self.link(self.head(self.hidden(x)))


def _subclassed():
    model = _SoftmaxInCall()
    model(_x()[:1])
    return model


def _ops_softmax():
    inputs, hidden, head = _body()
    return keras.Model(inputs, keras.ops.softmax(head(hidden(inputs))))


def _lambda_softmax():
    return keras.Sequential([*_body(), keras.layers.Lambda(tf.nn.softmax, dtype=F64)])


def _dense_softmax_then_dropout():
    return keras.Sequential([*_body(head_activation="softmax"), keras.layers.Dropout(0.3, dtype=F64)])


def _activation_then_noise_in_nested_model():
    head = keras.Sequential([keras.layers.Activation("softmax", dtype=F64),
                             keras.layers.GaussianNoise(0.1, dtype=F64)])
    return keras.Sequential([*_body(), keras.layers.Dropout(0.2, dtype=F64), head])


PROBABILITY_MODELS = {
    "subclassed tf.nn.softmax": _subclassed,
    "functional keras.ops.softmax": _ops_softmax,
    "Lambda(tf.nn.softmax)": _lambda_softmax,
    "Dense softmax + Dropout": _dense_softmax_then_dropout,
    "nested Activation softmax + GaussianNoise": _activation_then_noise_in_nested_model,
}


def _logits_twin(model, n_outputs=3):
    """The same network without its final softmax/sigmoid, with the same weights."""
    twin = keras.Sequential(_body(n_outputs))
    twin.set_weights(model.get_weights())
    return twin


def _fit(model, likelihood, subset, structure, x, y):
    la = ltf.Laplace(model, likelihood, subset_of_weights=subset, hessian_structure=structure,
                     progress=False)
    la.fit((x, y))
    return la


# --- item 1: probabilities are never taken for logits ----------------------------------------

@pytest.mark.parametrize(("subset", "structure"), SUBSETS)
@pytest.mark.parametrize("kind", PROBABILITY_MODELS)
def test_probability_outputs_use_the_exact_logits_or_are_refused(kind, subset, structure):
    keras.utils.set_random_seed(0)
    model, x = PROBABILITY_MODELS[kind](), _x()
    y = targets("classification", 3, len(x))
    if kind.startswith("subclassed"):  # nothing in the structure to remove: refused
        with pytest.raises(ValueError, match=r"probabilities, not logits.*return the last "
                                             r"Dense layer's output from call\(\)"):
            _fit(model, "classification", subset, structure, x, y)
        return
    la = _fit(model, "classification", subset, structure, x, y)
    np.testing.assert_allclose(la.map_predict(x).numpy(), model(x).numpy(), **EXACT)
    twin = _fit(_logits_twin(model), "classification", subset, structure, x, y)
    np.testing.assert_allclose(la.posterior_precision.to_dense().numpy(),
                               twin.posterior_precision.to_dense().numpy(), **EXACT)
    np.testing.assert_allclose(la(x).numpy(), twin(x).numpy(), **EXACT)


def test_the_model_is_unchanged_after_fitting_a_stripped_model():
    model, x = _lambda_softmax(), _x()
    before = model(x).numpy()
    la = _fit(model, "classification", "all", "kron", x, targets("classification", 3, len(x)))
    la(x)
    assert all("call" not in vars(layer) for layer in model.layers)
    np.testing.assert_array_equal(model(x).numpy(), before)
    np.testing.assert_allclose(before.sum(axis=1), 1.0, rtol=1e-12)


def test_softmax_applied_twice_is_refused():
    model = keras.Sequential([*_body(head_activation="softmax"), keras.layers.Softmax(dtype=F64)])
    x = _x()
    with pytest.raises(ValueError, match=r"probabilities, not logits.* even after removing "
                                         r"the softmax of '.*' \(is it applied twice\?\)"):
        _fit(model, "classification", "all", "diag", x, targets("classification", 3, len(x)))


def test_a_softmax_written_by_hand_is_refused_by_its_values():
    def softmax(z):
        return tf.exp(z) / tf.reduce_sum(tf.exp(z), axis=-1, keepdims=True)

    model, x = _SoftmaxInCall(softmax), _x()
    model(x[:1])
    with pytest.raises(ValueError, match=r"outputs on the first batch are probabilities, not "
                                         r"logits \(every entry is in \[0, 1\] and every row "
                                         r"sums to 1\).*from call\(\)"):
        _fit(model, "classification", "all", "kron", x, targets("classification", 3, len(x)))


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_a_sigmoid_inside_call_for_binary_is_refused(subset):
    keras.utils.set_random_seed(0)
    model = _SoftmaxInCall(tf.sigmoid, n_outputs=1)
    x = _x()
    model(x[:1])
    message = {  # the last-layer closed form sees that something follows its layer first
        "all": r"computed by a TensorFlow Sigmoid op.*apply the sigmoid outside the model",
        "last_layer": r"a softmax/sigmoid applied in call\(\) is not: return the logits from "
                      r"call\(\) instead",
    }[subset]
    with pytest.raises(ValueError, match=message):
        _fit(model, "binary", subset, "diag", x, targets("binary", 1, len(x)))


def test_a_float64_model_ending_in_a_float32_layer_is_fitted_in_float64():
    keras.utils.set_random_seed(0)
    plain = keras.Sequential(_body(1))
    ending = keras.Sequential([*_body(1), keras.layers.Dropout(0.5)])  # default float32 policy
    ending.set_weights(plain.get_weights())
    x, y = _x(), targets("binary", 1, 12)
    fitted = [_fit(m, "binary", "all", "full", x, y) for m in (plain, ending)]
    assert fitted[1].posterior_precision.dtype == tf.float64
    np.testing.assert_allclose(fitted[1].posterior_precision.to_dense(),
                               fitted[0].posterior_precision.to_dense(), rtol=1e-5, atol=1e-8)


def test_a_clipped_or_rescaled_sigmoid_for_binary_is_refused_and_rescaled_logits_are_not():
    def model(*after, activation="sigmoid"):
        keras.utils.set_random_seed(0)
        return keras.Sequential([*_body(1), keras.layers.Activation(activation, dtype=F64),
                                 *after])
    x, y = _x(), targets("binary", 1, 12)
    clip = keras.layers.Lambda(lambda p: keras.ops.clip(p, 1e-7, 1 - 1e-7), dtype=F64)
    for probabilities in (model(clip), model(keras.layers.Rescaling(1.0, dtype=F64))):
        with pytest.raises(ValueError, match="computed by a TensorFlow Sigmoid op"):
            _fit(probabilities, "binary", "all", "diag", x, y)
    rescaled_logits = model(keras.layers.Rescaling(2.0, dtype=F64), activation="linear")
    _fit(rescaled_logits, "binary", "all", "diag", x, y)


@pytest.mark.parametrize(("subset", "structure"), [("all", "kron"), ("last_layer", "kron")])
def test_a_final_sigmoid_layer_for_binary_uses_the_exact_logits(subset, structure):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([*_body(1), keras.layers.Activation("sigmoid", dtype=F64),
                              keras.layers.Dropout(0.5, dtype=F64)])
    x = _x()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        la = _fit(model, "binary", subset, structure, x, targets("binary", 1, len(x)))
    np.testing.assert_allclose(la.map_predict(x).numpy(), model(x).numpy(), **EXACT)


@pytest.mark.parametrize(("likelihood", "activation", "n_outputs", "advice"), [
    ("classification", "sigmoid", 3, "'binary'"),
    ("binary", "softmax", 1, "'classification'"),
])
def test_a_link_that_does_not_match_the_likelihood_is_refused(likelihood, activation,
                                                              n_outputs, advice):
    model = keras.Sequential(_body(n_outputs, head_activation=activation))
    with pytest.raises(ValueError, match=rf"output is the {activation} of 'head', but "
                                         rf"likelihood='{likelihood}'.*{advice}"):
        ltf.Laplace(model, likelihood, subset_of_weights="all", hessian_structure="diag")


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_regression_on_a_softmax_or_sigmoid_output_warns_and_keeps_the_output(activation):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([*_body(2), keras.layers.Activation(activation, dtype=F64)])
    x = _x()
    la = ltf.Laplace(model, "regression", subset_of_weights="all", hessian_structure="full",
                     progress=False)
    with pytest.warns(UserWarning, match=rf"computed by a {activation.title()} op; with "
                                         r"likelihood='regression' it is used as the mean"):
        la.fit((x, targets("regression", 2, len(x))))
    mean, _ = la.map_predict(x)
    np.testing.assert_allclose(mean.numpy(), model(x).numpy(), **EXACT)


@pytest.mark.parametrize("likelihood", ["classification", "binary", "regression"])
@pytest.mark.parametrize(("subset", "structure"), [("all", "kron"), ("last_layer", "full")])
def test_a_plain_logits_model_fits_without_warnings(likelihood, subset, structure):
    n_outputs = {"classification": 3, "binary": 1, "regression": 2}[likelihood]
    keras.utils.set_random_seed(0)
    model, x = keras.Sequential(_body(n_outputs)), _x()
    assert probability_output(model) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        la = _fit(model, likelihood, subset, structure, x, targets(likelihood, n_outputs, len(x)))
    predicted = la.map_predict(x)
    link = {"classification": tf.nn.softmax, "binary": tf.sigmoid}.get(likelihood)
    if link is None:
        np.testing.assert_allclose(predicted[0].numpy(), model(x).numpy(), **EXACT)
    else:
        np.testing.assert_allclose(predicted.numpy(), link(model(x)).numpy(), **EXACT)


def test_the_value_check_needs_every_row_in_the_unit_interval_and_summing_to_one():
    check_output_values(np.array([[0.2, 0.3, 0.4], [0.1, 0.2, 0.7]]), "classification", None)
    check_output_values(np.array([[0.2, 0.8], [1.5, -0.5]]), "classification", None)  # sum 1
    with pytest.raises(ValueError, match="probabilities, not logits"):  # float16 round-off
        probs = tf.nn.softmax(tf.random.normal((64, 10), dtype=tf.float16) * 4)
        check_output_values(tf.cast(probs, tf.float32), "classification", None)
    with warnings.catch_warnings():  # logits in [0, 1] are common for one output: no check
        warnings.simplefilter("error")
        check_output_values(np.array([[0.5], [0.9]]), "binary", None)
        check_output_values(np.array([[0.5, 0.5], [0.1, 0.9]]), "regression", None)
        for likelihood in ("classification", "binary", "regression"):
            check_output_op("BiasAdd", likelihood, None)


def test_structures_that_are_not_a_final_softmax_are_not_removed():
    def temperature(z):
        return tf.nn.softmax(z / 2)

    inputs, hidden, head = _body()
    features = hidden(inputs)
    cases = {
        "softmax over another axis": keras.Sequential([
            keras.Input((2, 3), dtype=F64), keras.layers.Dense(3, dtype=F64),
            keras.layers.Softmax(axis=1, dtype=F64)]),
        "Lambda of a custom function": keras.Sequential(
            [*_body(), keras.layers.Lambda(temperature, dtype=F64)]),
        "softmax before a Dense layer": keras.Sequential(
            [*_body(head_activation="softmax"), keras.layers.Dense(3, dtype=F64)]),
        "two inputs": keras.Model(inputs, keras.layers.Add(dtype=F64)(
            [keras.layers.Softmax(dtype=F64)(head(features)), features[:, :3]])),
    }
    for name, model in cases.items():
        assert probability_output(model) is None, name


# --- item 2: mixed precision ---------------------------------------------------------------

@pytest.fixture
def mixed_float16():
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _mixed_and_float32_twin():
    """A mixed_float16 classifier ending in a float32 softmax, and the same weights in float32."""
    def build(dtype):
        return keras.Sequential([
            keras.Input((3,)),
            keras.layers.Dense(5, "tanh", dtype=dtype),
            keras.layers.Dense(3, dtype=dtype),
            keras.layers.Dropout(0.1, dtype=dtype),
            keras.layers.Activation("softmax", dtype="float32"),
        ])

    keras.utils.set_random_seed(1)
    mixed, float32 = build(None), build("float32")
    float32.set_weights(mixed.get_weights())
    return mixed, float32


@pytest.mark.parametrize(("subset", "structure"), SUBSETS)
def test_mixed_precision_gives_the_numbers_of_the_float32_model(mixed_float16, subset,
                                                                structure):
    mixed, float32 = _mixed_and_float32_twin()
    policies = [layer.dtype_policy for layer in mixed.layers]
    assert [p.name for p in policies][:2] == ["mixed_float16"] * 2
    x = _x(20, dtype=np.float32)
    y = targets("classification", 3, len(x))
    la, reference = (_fit(m, "classification", subset, structure, x, y) for m in (mixed, float32))
    close = {"rtol": 1e-5, "atol": 1e-6}
    np.testing.assert_allclose(la.posterior_precision.to_dense().numpy(),
                               reference.posterior_precision.to_dense().numpy(), **close)
    np.testing.assert_allclose(la.log_marginal_likelihood().numpy(),
                               reference.log_marginal_likelihood().numpy(), **close)
    np.testing.assert_allclose(la(x).numpy(), reference(x).numpy(), **close)
    np.testing.assert_allclose(la(x, pred_type="nn", n_samples=5, seed=3).numpy(),
                               reference(x, pred_type="nn", n_samples=5, seed=3).numpy(), **close)
    np.testing.assert_allclose(la.map_predict(x).numpy(), float32(x).numpy(), **close)
    assert la(x).dtype == tf.float32 and la.sample(2, seed=0).dtype == tf.float32
    # the model itself still computes in float16, with its own policies
    assert all(layer.dtype_policy is p for layer, p in zip(mixed.layers, policies, strict=True))
    assert mixed.layers[0](x).dtype == tf.float16
    np.testing.assert_allclose(mixed(x).numpy(), float32(x).numpy(), atol=2e-3)


def test_mixed_precision_policies_are_restored_when_a_call_fails(mixed_float16):
    mixed, _ = _mixed_and_float32_twin()
    policies = [layer.dtype_policy for layer in mixed.layers]
    logit_model = params.LogitModel(mixed, likelihood="classification")
    assert tuple(logit_model(tf.ones((2, 3))).shape) == (2, 3)
    with pytest.raises(ValueError):
        logit_model(tf.ones((2, 5)))  # 5 features where the model takes 3
    assert all(layer.dtype_policy is p for layer, p in zip(mixed.layers, policies, strict=True))
    assert mixed.layers[1](tf.ones((2, 5))).dtype == tf.float16
