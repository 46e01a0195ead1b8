"""Tiny float64 Keras models shared by the tests: one builder per architecture.

``MODELS`` maps a name to ``build(n_outputs, seed) -> (model, x)`` where ``x`` is a small input
batch (float64 numpy) that fits the model.
"""

from __future__ import annotations

import keras
import numpy as np

F64 = "float64"


def _dense(units, activation=None, **kw):
    return keras.layers.Dense(units, activation=activation, dtype=F64, **kw)


def tanh_mlp(n_outputs: int, seed: int = 0, n: int = 6):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((3,), dtype=F64), _dense(4, "tanh"), _dense(n_outputs)])
    return model, np.random.default_rng(seed).normal(size=(n, 3))


def relu_mlp(n_outputs: int, seed: int = 0, n: int = 6):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((3,), dtype=F64), _dense(5, "relu"), _dense(3, "relu"), _dense(n_outputs)]
    )
    return model, np.random.default_rng(seed).normal(size=(n, 3))


def small_cnn(n_outputs: int, seed: int = 0, n: int = 4):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((5, 5, 2), dtype=F64),
        keras.layers.Conv2D(3, 3, strides=1, padding="valid", activation="tanh", dtype=F64),
        keras.layers.Flatten(dtype=F64),
        _dense(n_outputs),
    ])
    return model, np.random.default_rng(seed).normal(size=(n, 5, 5, 2))


def two_branch_functional(n_outputs: int, seed: int = 0, n: int = 6):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((3,), dtype=F64)
    left = _dense(3, "tanh")(inputs)
    right = _dense(2, "sigmoid")(inputs)
    merged = keras.layers.Concatenate(dtype=F64)([left, right])
    outputs = _dense(n_outputs)(merged)
    return keras.Model(inputs, outputs), np.random.default_rng(seed).normal(size=(n, 3))


class _Subclassed(keras.Model):
    def __init__(self, n_outputs):
        super().__init__(dtype=F64)
        self.hidden = _dense(4, "tanh")
        self.head = _dense(n_outputs)

    def call(self, x):
        return self.head(self.hidden(x))


def subclassed(n_outputs: int, seed: int = 0, n: int = 6):
    keras.utils.set_random_seed(seed)
    model = _Subclassed(n_outputs)
    x = np.random.default_rng(seed).normal(size=(n, 3))
    model(x[:1])
    return model, x


def with_batchnorm(n_outputs: int, seed: int = 0, n: int = 6):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((3,), dtype=F64),
        _dense(4),
        keras.layers.BatchNormalization(dtype=F64),
        keras.layers.Activation("tanh", dtype=F64),
        _dense(n_outputs),
    ])
    x = np.random.default_rng(seed).normal(size=(n, 3))
    # give the moving statistics non-trivial values
    model.layers[1].moving_mean.assign(np.full(4, 0.1))
    model.layers[1].moving_variance.assign(np.full(4, 1.5))
    return model, x


def deep_linear(n_outputs: int, seed: int = 0, n: int = 1):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((3,), dtype=F64), _dense(4), _dense(3), _dense(n_outputs)]
    )
    return model, np.random.default_rng(seed).normal(size=(n, 3))


MODELS = {
    "tanh_mlp": tanh_mlp,
    "relu_mlp": relu_mlp,
    "small_cnn": small_cnn,
    "two_branch_functional": two_branch_functional,
    "subclassed": subclassed,
    "with_batchnorm": with_batchnorm,
}


def targets(likelihood: str, n_outputs: int, n: int, seed: int = 0) -> np.ndarray:
    """Random targets that fit ``likelihood``: class labels, 0/1 or real values."""
    rng = np.random.default_rng(seed + 1)
    if likelihood == "classification":
        return rng.integers(0, n_outputs, size=n)
    if likelihood == "binary":
        return rng.integers(0, 2, size=n).astype(np.float64)
    return rng.normal(size=(n, n_outputs))


N_OUTPUTS = {"classification": 3, "binary": 1, "regression": 2}
