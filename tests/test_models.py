"""Built-in MAP networks: the training objective is the Laplace one (checked against ridge
regression in closed form), training is seeded, and bad settings are refused."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from laplace_tf import models


def _weights(model: keras.Model) -> np.ndarray:
    return np.concatenate([v.numpy().ravel() for v in model.trainable_variables])


@pytest.mark.parametrize("prior_precision, sigma_noise", [(5.0, 0.5), (0.1, 2.0)])
def test_linear_regression_map_is_the_ridge_solution(prior_precision, sigma_noise):
    # argmin sum (y - X w)^2 / (2 sigma^2) + lambda / 2 ||w||^2 (bias included in w and prior)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    y = x @ [1.0, -2.0, 0.5] + 0.3 + 0.1 * rng.normal(size=40)
    model = models.mlp((3,), 1, hidden=(), dtype="float64")
    models.train_map(model, "regression", x, y, epochs=400, batch_size=40, learning_rate=0.1,
                     prior_precision=prior_precision, sigma_noise=sigma_noise)
    design = np.column_stack([x, np.ones(len(x))])
    ridge = np.linalg.solve(design.T @ design / sigma_noise**2 + prior_precision * np.eye(4),
                            design.T @ y / sigma_noise**2)
    np.testing.assert_allclose(_weights(model), ridge, atol=1e-7)


def test_training_is_seeded():
    x = np.random.default_rng(1).normal(size=(50, 4)).astype("float32")
    y = (x[:, 0] > 0).astype(int)

    def train(seed):
        model = models.mlp((4,), 2, hidden=(8,), seed=0)
        losses = models.train_map(model, "classification", x, y, epochs=3, batch_size=16,
                                  seed=seed)
        return _weights(model), losses

    (w0, l0), (w1, l1), (w2, _) = train(0), train(0), train(1)
    np.testing.assert_array_equal(w0, w1)
    assert l0 == l1 and len(l0) == 3
    assert not np.array_equal(w0, w2)  # another shuffling order


def test_mlp_layout():
    model = models.mlp((8, 8), 10, hidden=(32, 16), activation="relu")
    assert [type(layer).__name__ for layer in model.layers] == ["Flatten", "Dense", "Dense",
                                                                "Dense"]
    assert model.output_shape == (None, 10) and model.layers[-1].activation.__name__ == "linear"


@pytest.mark.parametrize("kwargs, message", [
    ({"epochs": 0}, "epochs: expected a positive integer"),
    ({"batch_size": 2.5}, "batch_size: expected a positive integer"),
    ({"prior_precision": -1.0}, "prior_precision: expected a positive"),
    ({"y": np.zeros(5, int)}, "x: has 6 rows but y has 5"),
    ({"y": np.full(6, 3)}, r"y: class labels must lie in \[0, 2\)"),
])
def test_bad_training_settings(kwargs, message):
    model = models.mlp((2,), 2, hidden=(3,))
    arguments = {"x": np.zeros((6, 2), "float32"), "y": np.zeros(6, int), **kwargs}
    with pytest.raises(ValueError, match=message):
        models.train_map(model, "classification", **arguments)


def test_probability_outputs_are_refused():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3, activation="softmax")])
    with pytest.raises(ValueError, match="applies softmax; train_map needs a model that outputs"):
        models.train_map(model, "classification", np.zeros((4, 2)), np.zeros(4, int))


@pytest.mark.parametrize("kwargs, message", [
    ({"input_shape": ()}, "input_shape: expected positive dimensions"),
    ({"hidden": (4, 0)}, "hidden: expected a positive integer; got 0"),
    ({"activation": "tanhh"}, "activation: 'tanhh' is not a Keras activation"),
])
def test_bad_architectures(kwargs, message):
    with pytest.raises(ValueError, match=message):
        models.mlp(**{"input_shape": (2,), "n_outputs": 2, **kwargs})
