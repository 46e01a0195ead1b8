"""Inputs that do not fit the model get one clear ValueError, at fit and at predict alike.

Each case reproduces a raw Keras/TensorFlow error (or a misleading message) that users got
before: an unbatched dataset, a wrong feature dimension, a 1-D input, token ids outside an
Embedding's vocabulary, a list given to a model of named inputs.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from models import MODELS, targets

from laplace_tf import testing
from laplace_tf.likelihoods import get_likelihood
from laplace_tf.params import LogitModel
from laplace_tf.predictive import Laplace


def _fitted(model, x, y, **options):
    la = Laplace(model, "classification", progress=False, **options)
    la.fit((x, y))
    return la


def _mlp():
    model, x = MODELS["tanh_mlp"](3)  # Input((3,)), float64
    return model, x, targets("classification", 3, len(x))


def _unbatched(x, y):
    return tf.data.Dataset.from_tensor_slices((x, y))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: (*_mlp()[:1], _unbatched(*_mlp()[1:])),
         r"data: the dataset yields single examples \(element shapes \(\(3,\), \(\)\)\), not "
         r"batches\. Call \.batch\(n\)"),
        (lambda: (MODELS["tanh_mlp"](2)[0], _unbatched(np.zeros((4, 3)), np.zeros((4, 2)))),
         r"data: the dataset yields single examples \(x of shape \(3,\)\); the model takes "
         r"batches of shape \(None, 3\)\. Call \.batch\(n\)"),
        (lambda: (MODELS["subclassed"](2)[0], _unbatched(np.zeros((4, 3)), np.zeros((4, 2)))),
         r"y: batch 0 has 3 inputs but labels of shape \(2,\); .* a dataset of single "
         r"examples needs \.batch\(n\)"),
    ],
    ids=["labels", "regression-targets", "subclassed-regression"],
)
def test_an_unbatched_dataset_says_call_batch(make, match):
    model, data = make()
    likelihood = "classification" if data.element_spec[1].shape.rank == 0 else "regression"
    la = Laplace(model, likelihood, "all", "diag", progress=False)
    with pytest.raises(ValueError, match=match):
        la.fit(data)


@pytest.mark.parametrize("structure", ["full", "diag", "kron"])
def test_a_dataset_of_unequal_input_and_label_batches_is_refused(structure):
    model, x, y = _mlp()
    data = tf.data.Dataset.zip((tf.data.Dataset.from_tensor_slices(x).batch(4),
                                tf.data.Dataset.from_tensor_slices(y).batch(1)))
    la = Laplace(model, "classification", "all", structure, progress=False)
    with pytest.raises(ValueError, match=r"y: batch 0 has 4 inputs but labels of shape \(1,\)"):
        la.fit(data)


def test_data_without_labels_is_refused_by_name():
    model, x, _ = _mlp()
    with pytest.raises(TypeError, match="data: expected a tf.data.Dataset of"):
        Laplace(model, "classification", progress=False).fit((x,))


@pytest.mark.parametrize("form", ["arrays", "dataset"])
def test_a_wrong_feature_dimension_at_fit(form):
    model, _, y = _mlp()
    x = np.zeros((len(y), 5))
    data = (x, y) if form == "arrays" else tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    shape = r"\(6, 5\)" if form == "arrays" else r"\(None, 5\)"
    la = Laplace(model, "classification", "all", "kron", progress=False)
    with pytest.raises(ValueError, match=rf"^x: inputs of shape {shape} do not fit the model, "
                                         r"which expects inputs of shape \(None, 3\)"):
        la.fit(data)


def test_a_one_dimensional_input_at_predict():
    la = _fitted(*_mlp(), subset_of_weights="last_layer", hessian_structure="diag")
    with pytest.raises(ValueError, match=r"^x: expected inputs \[N, 3\] \(a batch of N examples\); "
                                         r"got a 1-D array of shape \(3,\); for one example use "
                                         r"x\[None\]\."):
        la(np.zeros(3))
    with pytest.raises(ValueError, match=r"got a 1-D array of shape \(5,\); add the missing"):
        la(np.zeros(5))


class _EmbeddingInside(keras.Model):
    """A subclassed model: it records no inputs, so its failures are explained after the fact."""

    def __init__(self):
        super().__init__(dtype="float64")
        self.embed = keras.layers.Embedding(10, 2, dtype="float64", name="tokens")
        self.flatten = keras.layers.Flatten(dtype="float64")
        self.head = keras.layers.Dense(3, dtype="float64")

    def call(self, x):
        return self.head(self.flatten(self.embed(x)))


def _token_models():
    keras.utils.set_random_seed(0)
    sequential = keras.Sequential([
        keras.Input((4,), dtype="int32"), keras.layers.Embedding(10, 2, dtype="float64", name="tokens"),
        keras.layers.Flatten(dtype="float64"), keras.layers.Dense(3, dtype="float64"),
    ])
    subclassed = _EmbeddingInside()
    subclassed(np.zeros((1, 4), "int32"))
    return {"sequential": sequential, "subclassed": subclassed}


@pytest.mark.parametrize("kind", ["sequential", "subclassed"])
def test_token_ids_outside_the_vocabulary(kind):
    model = _token_models()[kind]
    ids = np.random.default_rng(0).integers(0, 10, size=(8, 4)).astype("int32")
    labels = np.arange(8) % 3
    bad = ids.copy()
    bad[5, 1] = 12  # in the first batch (of 8), not in its first example
    la = Laplace(model, "classification", "all", "diag", progress=False)
    token = r"^x: token ids must lie in \[0, input_dim\) = \[0, 10\) of Embedding layer 'tokens'"
    with pytest.raises(ValueError, match=token):
        la.fit((bad, labels))
    la.fit((ids, labels))
    with pytest.raises(ValueError, match=token):
        la(bad)
    if kind == "sequential":  # checked up front in every batch, not only the first
        with pytest.raises(ValueError, match=token + r"; batch 1 has ids from 0 to 12"):
            la(bad, batch_size=4)


def _two_inputs():
    keras.utils.set_random_seed(0)
    named = {"b": keras.Input((3,), name="b", dtype="float64"),
             "a": keras.Input((2,), name="a", dtype="float64")}
    merged = keras.layers.Concatenate(dtype="float64")([named["b"], named["a"]])
    model = keras.Model(named, keras.layers.Dense(3, dtype="float64")(merged))
    rng = np.random.default_rng(0)
    return model, {"b": rng.normal(size=(6, 3)), "a": rng.normal(size=(6, 2))}, np.arange(6) % 3


def test_a_list_for_a_model_of_named_inputs_is_refused():
    """Refused rather than guessed: Keras maps a list to the inputs in sorted-name order
    (here a, b), while the model was built with b first."""
    model, x, y = _two_inputs()
    listed = r"^x: the model takes a dict of named inputs \['a', 'b'\]; got a (list|tuple) of 2 inputs"
    la = Laplace(model, "classification", "all", "diag", progress=False)
    with pytest.raises(ValueError, match=listed):
        la.fit(([x["b"], x["a"]], y))
    with pytest.raises(ValueError, match=listed):
        la.fit(tf.data.Dataset.from_tensor_slices(((x["b"], x["a"]), y)).batch(2))
    with pytest.raises(ValueError, match=r"got keys \['b'\], missing \['a'\]"):
        la.fit(({"b": x["b"]}, y))
    la.fit((x, y))
    with pytest.raises(ValueError, match=listed):
        la([x["b"], x["a"]])
    with pytest.raises(ValueError, match=r"^x\['a'\]: inputs of shape \(6, 4\) do not fit"):
        la({"b": x["b"], "a": np.zeros((6, 4))})


def test_what_keras_takes_is_taken():
    """Keras adds or drops a last dimension of 1: ``[N]`` for ``Input((1,))``, ``[N, 3, 1]``
    for ``Input((3,))``; the checks let these through and the fit is the same."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((1,), dtype="float64"), keras.layers.Dense(2, dtype="float64")])
    x, y = np.linspace(-1, 1, 6), np.arange(6) % 2
    flat, column = _fitted(model, x, y), _fitted(model, x[:, None], y)
    np.testing.assert_array_equal(flat(x), column(x[:, None]))
    mlp, x3, y3 = _mlp()
    np.testing.assert_array_equal(_fitted(mlp, x3[..., None], y3)(x3), _fitted(mlp, x3, y3)(x3))


def test_several_positional_inputs_are_taken_as_keras_takes_them():
    """``keras.Model([a, b], out)`` fed a list ``[xa, xb]`` (arrays) or a dataset of
    ``((xa, xb), y)``: the curvature is the brute-force GGN, the predictions agree."""
    keras.utils.set_random_seed(0)
    a, b = keras.Input((3,), dtype="float64"), keras.Input((2,), dtype="float64")
    merged = keras.layers.Concatenate(dtype="float64")([a, b])
    hidden = keras.layers.Dense(3, "tanh", dtype="float64")(merged)
    model = keras.Model([a, b], keras.layers.Dense(3, dtype="float64")(hidden))
    rng = np.random.default_rng(0)
    x, y = [rng.normal(size=(7, 3)), rng.normal(size=(7, 2))], np.arange(7) % 3
    likelihood = get_likelihood("classification")
    reference = testing.brute_force_ggn(LogitModel(model), likelihood, x,
                                        likelihood.prepare_targets(y, 3, tf.float64))
    dataset = tf.data.Dataset.from_tensor_slices((tuple(x), y)).batch(3)
    for data in [(x, y), dataset]:
        la = Laplace(model, "classification", "all", "full", progress=False)
        la.fit(data)
        precision = la.posterior_precision.to_dense().numpy()
        np.testing.assert_allclose(precision, reference + np.eye(len(reference)),
                                   rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(la(x), la(dataset.map(lambda inputs, _: (inputs,))),
                                   rtol=1e-12, atol=1e-12)


def test_the_wrong_number_of_positional_inputs_is_refused():
    """Keras' stateless call only warns about an extra input and drops it (the curvature was
    that of the first two arrays); a tuple given to a one-input model is read as x, y."""
    a, b = keras.Input((3,), dtype="float64"), keras.Input((2,), dtype="float64")
    merged = keras.layers.Concatenate(dtype="float64")([a, b])
    two_inputs = keras.Model([a, b], keras.layers.Dense(3, dtype="float64")(merged))
    rng = np.random.default_rng(0)
    xa, xb, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 2)), np.arange(6) % 3
    la = Laplace(two_inputs, "classification", progress=False)
    with pytest.raises(ValueError, match=r"x: the model takes a list of 2 inputs .* got a list "
                                         r"of 3 arrays"):
        la.fit(([xa, xb, xb], y))
    la.fit(([xa, xb], y))
    with pytest.raises(ValueError, match=r"got inputs of shape \(None, 3\).* a bare tuple is "
                                         r"read as \(x, y\)"):
        la(tf.data.Dataset.from_tensor_slices((xa, xb)).batch(3))
    with pytest.raises(ValueError, match=r"x\[1\]: inputs of shape \(6, 1\) do not fit"):
        la([xa, xb[:, :1]])
    one_input, x, y = _mlp()
    with pytest.raises(ValueError, match=r"x: the model takes one input of shape \(None, 3\); "
                                         r"got a tuple of 2 arrays"):
        _fitted(one_input, x, y)((x, y))


def test_inputs_given_as_python_lists_are_not_rounded():
    """A list of Python floats is read as numpy reads it (float64), not as TensorFlow's
    float32 that a float64 model would then see rounded."""
    model, x, y = _mlp()
    from_array, from_list = _fitted(model, x, y, hessian_structure="full"), \
        _fitted(model, x.tolist(), y, hessian_structure="full")
    np.testing.assert_array_equal(from_list.posterior_precision.to_dense(),
                                  from_array.posterior_precision.to_dense())
    np.testing.assert_array_equal(from_array(x.tolist()), from_array(x))


@pytest.mark.parametrize("batch_size", [8, 1])
def test_a_model_of_one_dimensional_outputs_is_refused(batch_size):
    """Outputs ``[N]`` (a final squeeze) are not read as N outputs of one example."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,), dtype="float64")
    model = keras.Model(inputs, keras.ops.squeeze(keras.layers.Dense(1, dtype="float64")(inputs), -1))
    la = Laplace(model, "regression", "all", "full", progress=False)
    with pytest.raises(ValueError, match=r"^model: its output on a batch of \d inputs has shape "
                                         r"\(\d,\); laplace_tf needs outputs \[N, K\]"):
        la.fit((np.zeros((8, 3)), np.zeros(8)), batch_size=batch_size)


class ScaledDense(keras.layers.Layer):
    """A weight of its own (``scale``) beside a Dense sublayer."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.inner = keras.layers.Dense(2, dtype="float64")

    def build(self, shape):
        self.scale = self.add_weight(shape=(2,), initializer="ones", name="scale",
                                     dtype="float64")
        self.inner.build(shape)

    def call(self, x):
        return self.inner(x) * self.scale


def test_weights_of_a_layer_with_sublayers_are_refused_not_left_out():
    model = keras.Sequential([keras.Input((3,), dtype="float64"),
                              keras.layers.Dense(3, "tanh", dtype="float64"),
                              ScaledDense(dtype="float64")])
    with pytest.raises(ValueError, match=r"the weights \['.*scale'\] belong to a layer .* "
                                         r"sublayers"):
        Laplace(model, "regression", "all", "full", progress=False)
