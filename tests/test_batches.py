"""Data in: arrays, tf.data and dict inputs give the same curvature; bad data is named."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from models import F64, MODELS, targets

from laplace_tf import batches, testing
from laplace_tf.batches import Batches, iterate_inputs
from laplace_tf.curvature import DiagBuilder, FullBuilder, fit_curvature
from laplace_tf.likelihoods import get_likelihood
from laplace_tf.params import LogitModel, WeightSubset

EXACT = {"rtol": 1e-9, "atol": 1e-12}


def _mlp_problem():
    model, x = MODELS["tanh_mlp"](3)
    return LogitModel(model), get_likelihood("classification"), x, targets("classification", 3, len(x))


def _fit(data, builder=DiagBuilder, problem=None, batch_size=None):
    logit_model, likelihood, *_ = problem or _mlp_problem()
    return fit_curvature(builder(logit_model, likelihood, "ggn"),
                         batches.as_batches(data, batch_size, dtype=tf.float64))


@pytest.mark.parametrize(
    "as_dataset",
    [lambda x, y: tf.data.Dataset.from_tensor_slices((x, y)).batch(4),
     lambda x, y: tf.data.Dataset.from_tensor_slices((x, y)).batch(4).filter(lambda *_: True)],
    ids=["known-cardinality", "unknown-cardinality"],
)
def test_arrays_and_datasets_give_identical_curvature(as_dataset):
    _, _, x, y = _mlp_problem()
    from_arrays = _fit((x, y), batch_size=4)
    from_dataset = _fit(as_dataset(x, y))
    np.testing.assert_array_equal(from_dataset.blocks[0].diagonal.numpy(),
                                  from_arrays.blocks[0].diagonal.numpy())
    assert float(from_dataset.nll) == float(from_arrays.nll)
    assert from_dataset.n_data == from_arrays.n_data == len(x)


def _two_input_model(n_outputs: int = 3):
    keras.utils.set_random_seed(0)
    inputs = {"a": keras.Input((3,), dtype=F64, name="a"), "b": keras.Input((2,), dtype=F64, name="b")}
    merged = keras.layers.Concatenate(dtype=F64)([inputs["a"], inputs["b"]])
    hidden = keras.layers.Dense(3, "tanh", dtype=F64)(merged)
    model = keras.Model(inputs, keras.layers.Dense(n_outputs, dtype=F64)(hidden))
    rng = np.random.default_rng(0)
    return model, {"a": rng.normal(size=(6, 3)), "b": rng.normal(size=(6, 2))}


@pytest.mark.parametrize("source", ["arrays", "dataset"])
def test_dict_inputs_of_a_multi_input_model(source):
    model, x = _two_input_model()
    y = targets("classification", 3, 6)
    likelihood, logit_model = get_likelihood("classification"), LogitModel(model)
    data = (x, y) if source == "arrays" else tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    curvature = _fit(data, FullBuilder, (logit_model, likelihood), batch_size=4)
    tensors = {k: tf.constant(v) for k, v in x.items()}
    reference = testing.brute_force_ggn(logit_model, likelihood, tensors,
                                        likelihood.prepare_targets(y, 3, tf.float64))
    np.testing.assert_allclose(curvature.blocks[0].matrix.numpy(), reference, **EXACT)


def _with(x, row, value):
    x = x.copy()
    x.flat[row * x[0].size] = value
    return x


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("form", ["array", "dataset", "dict"])
def test_non_finite_inputs_name_the_batch(form, value):
    _, _, x, y = _mlp_problem()
    bad = _with(x, 4, value)  # row 4 is in batch 2 for batches of 2
    data = {
        "array": (bad, y),
        "dataset": tf.data.Dataset.from_tensor_slices((bad, y)).batch(2),
        "dict": ({"a": x, "b": bad}, y),
    }[form]
    with pytest.raises(ValueError, match="x: batch 2 contains NaN or Inf inputs"):
        list(Batches(data, 2, dtype=tf.float64))


@pytest.mark.parametrize("form", ["arrays", "dataset"])
def test_non_finite_labels_name_the_batch(form):
    x, y = np.zeros((6, 3)), np.array([0.0, 1.0, 1.0, 0.0, np.inf, 1.0])
    data = (x, y) if form == "arrays" else tf.data.Dataset.from_tensor_slices((x, y)).batch(2)
    with pytest.raises(ValueError, match="y: batch 2 contains NaN or Inf labels"):
        list(Batches(data, 2))


def test_iterate_inputs_names_the_batch_and_keeps_dicts():
    x = _with(np.zeros((5, 2)), 3, np.nan)
    with pytest.raises(ValueError, match="x: batch 1 contains NaN or Inf"):
        list(iterate_inputs(x, 2, tf.float64))
    parts = list(iterate_inputs({"a": np.ones((5, 2))}, 2, tf.float32))
    assert [p["a"].shape[0] for p in parts] == [2, 2, 1] and parts[0]["a"].dtype == tf.float32
    dataset = tf.data.Dataset.from_tensor_slices((np.ones((5, 2)), np.zeros(5))).batch(4)
    assert [p.shape[0] for p in iterate_inputs(dataset, 99, tf.float64)] == [4, 1]


@pytest.mark.parametrize(
    ("labels", "match"),
    [(np.array([0, 1, 2, 3, 1, 0]), r"y: class labels must lie in \[0, 3\)"),
     (np.zeros((6, 2, 2)), r"y: expected integer labels \[N\] or one-hot \[N, 3\]"),
     (np.array([0.0, 1.0, 2.0, 0.0, 1.0, np.nan]), "y: batch 1 contains NaN or Inf labels")],
    ids=["out-of-range", "wrong-shape", "nan"],
)
def test_bad_labels_stop_the_fit(labels, match):
    _, _, x, _ = _mlp_problem()
    with pytest.raises(ValueError, match=match):
        _fit((x, labels), batch_size=3)


@pytest.mark.parametrize(
    ("likelihood", "n_outputs", "match"),
    [("classification", 1, "'classification' needs one logit per class"),
     ("binary", 10, "'binary' needs exactly one output logit")],
)
def test_model_output_that_does_not_fit_the_likelihood(likelihood, n_outputs, match):
    model, x = MODELS["tanh_mlp"](n_outputs)
    problem = (LogitModel(model), get_likelihood(likelihood), x, None)
    with pytest.raises(ValueError, match=match):
        _fit((x, np.zeros(len(x))), problem=problem, batch_size=3)


@pytest.mark.parametrize(
    "make_data",
    [lambda: (np.zeros((0, 3)), np.zeros(0)),
     lambda: tf.data.Dataset.from_tensor_slices((np.zeros((0, 3)), np.zeros(0))).batch(2),
     lambda: tf.data.Dataset.from_tensor_slices((np.zeros((4, 3)), np.zeros(4))).batch(2)
     .filter(lambda *_: False)],
    ids=["arrays", "dataset", "dataset-unknown-cardinality"],
)
def test_empty_data(make_data):
    with pytest.raises(ValueError, match="data: the data set is empty"):
        _fit(make_data(), batch_size=2)


@pytest.mark.parametrize(
    ("data", "kwargs", "error", "match"),
    [
        ((np.zeros((4, 3)), np.zeros(3)), {}, ValueError, "data: x has 4 rows but y has 3"),
        ((np.zeros((4, 3)), None), {}, TypeError, "data: got y=None; fitting needs targets"),
        ((np.zeros((4, 3)), np.zeros(4)), {"batch_size": 0}, ValueError, "batch_size: expected a positive integer"),
        ((np.zeros((4, 3)), np.zeros(4)), {"batch_size": 2.5}, TypeError, "batch_size: expected a positive integer"),
        (({"a": np.zeros((4, 3)), "b": np.zeros((3, 2))}, np.zeros(4)), {}, ValueError, "x: the inputs of a dict must have the same length"),
        ({"x": np.zeros((4, 3))}, {}, TypeError, r"data: expected a tf.data.Dataset of \(x, y\) batches"),
        ((np.zeros(2),) * 4, {}, TypeError, "data: expected a tf.data.Dataset"),
        (tf.data.Dataset.from_tensor_slices(np.zeros((4, 3))).batch(2), {}, ValueError, r"must yield \(x, y\) pairs"),
    ],
    ids=["length-mismatch", "no-targets", "zero-batch", "float-batch", "ragged-dict", "dict-data",
         "quadruple", "dataset-without-targets"],
)
def test_bad_data_arguments(data, kwargs, error, match):
    with pytest.raises(error, match=match):
        Batches(data, **kwargs)


def test_non_numeric_inputs_and_labels():
    with pytest.raises(TypeError, match="x: expected numeric inputs; got dtype string"):
        list(Batches((np.array([["a", "b"]] * 3), np.zeros(3)), 2))
    _, _, x, _ = _mlp_problem()
    with pytest.raises(TypeError, match="y: expected numeric labels.*LabelEncoder"):
        _fit((x, np.array(["cat", "dog", "cat", "cat", "dog", "cat"])), batch_size=3)


def test_unbuilt_model_is_refused():
    model = keras.Sequential([keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="model: the model is not built.*keras.Input"):
        WeightSubset(model)
    with pytest.raises(ValueError, match="model: the model is not built"):
        LogitModel(model)


def _dataset(x, y, batch=2):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


def test_an_infinite_dataset_is_refused_unless_steps_bound_it():
    _, _, x, y = _mlp_problem()
    with pytest.raises(ValueError, match=r"data: the dataset is infinite.*pass steps=N"):
        Batches(_dataset(x, y).repeat())
    with pytest.raises(ValueError, match=r"x: the dataset is infinite.*\.take\(N\)"):
        next(iterate_inputs(tf.data.Dataset.from_tensor_slices(x).batch(2).repeat(), 2, tf.float64))


@pytest.mark.parametrize(
    "make_data",
    [lambda x, y: _dataset(x, y).repeat(), lambda x, y: _dataset(x, y),
     lambda x, y: _dataset(x, y).filter(lambda *_: True), lambda x, y: (x, y)],
    ids=["infinite", "known-cardinality", "unknown-cardinality", "arrays"],
)
def test_steps_takes_the_first_batches(make_data):
    _, _, x, y = _mlp_problem()  # 6 examples: 3 batches of 2
    first_steps = Batches(make_data(x, y), 2, dtype=tf.float64, steps=2)
    assert first_steps.n_batches == 2
    first_two = _fit((x[:4], y[:4]), batch_size=2)
    taken = _fit(first_steps)
    assert taken.n_data == 4
    np.testing.assert_array_equal(taken.blocks[0].diagonal.numpy(),
                                  first_two.blocks[0].diagonal.numpy())


def test_more_steps_than_batches():
    _, _, x, y = _mlp_problem()
    with pytest.raises(ValueError, match=r"steps: the data has only 3 batches; got steps=4"):
        Batches(_dataset(x, y), steps=4)
    with pytest.raises(ValueError, match=r"steps: the data has only 3 batches"):
        Batches((x, y), 2, steps=4)
    unknown = Batches(_dataset(x, y).filter(lambda *_: True), dtype=tf.float64, steps=4)
    with pytest.warns(UserWarning, match=r"steps: the data ran out after 3 batches; steps=4"):
        assert len(list(unknown)) == 3


@pytest.mark.parametrize(("steps", "error"), [(0, ValueError), (-1, ValueError), (2.5, TypeError),
                                              (True, TypeError), ("3", TypeError)])
def test_bad_steps(steps, error):
    with pytest.raises(error, match="steps: expected a positive integer"):
        Batches((np.zeros((4, 3)), np.zeros(4)), steps=steps)


@pytest.mark.parametrize(
    ("make_data", "steps", "bar"),
    [(lambda x, y: _dataset(x, y).repeat(), 2, "| 0/2 ["),
     (lambda x, y: _dataset(x, y).filter(lambda *_: True), None, "curvature (size unknown): ")],
    ids=["steps-are-the-total", "unknown-size-said"],
)
def test_progress_bar_total_and_label(make_data, steps, bar, capsys):
    _, _, x, y = _mlp_problem()
    list(Batches(make_data(x, y), dtype=tf.float64, progress=True, description="curvature",
                 steps=steps))
    assert bar in capsys.readouterr().err
