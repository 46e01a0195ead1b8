"""Class labels: softmax cross-entropy (``"classification"``) and one sigmoid (``"binary"``).

Example:
    >>> import tensorflow as tf
    >>> logits = tf.constant([[0.0, 0.0]], tf.float64)
    >>> Classification().output_hessian(logits).numpy()   # diag(p) - p p^T, p = [.5, .5]
    array([[[ 0.25, -0.25],
            [-0.25,  0.25]]])
    >>> Binary().output_hessian(tf.constant([[0.0]], tf.float64)).numpy()   # p (1 - p)
    array([[[0.25]]])
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from laplace_tf.likelihoods.base import (
    Likelihood,
    check_finite_labels,
    no_factors,
    numeric_labels,
)


def _categorical_nll(probs: np.ndarray, one_hot: np.ndarray) -> float:
    """``-sum t log p`` with ``p`` floored at the smallest positive float."""
    return float(-np.sum(one_hot * np.log(np.maximum(probs, np.finfo(np.float64).tiny))))


class Classification(Likelihood):
    """Categorical likelihood with softmax link; labels are integers ``[N]`` or one-hot
    ``[N, C]``."""

    name = "classification"
    links = ("probit", "mc", "bridge")
    output_activation = "softmax"

    def validate_outputs(self, n_outputs: int) -> None:
        if n_outputs < 2:
            raise ValueError(
                f"model: 'classification' needs one logit per class (>= 2 outputs); the model "
                f"has {n_outputs}. For two classes with one output use likelihood='binary'."
            )

    def prepare_targets(self, y, n_outputs: int, dtype: tf.DType) -> tf.Tensor:
        y = numeric_labels(y)
        if y.dtype.kind == "f":
            check_finite_labels(y)
        if y.ndim == 2 and y.shape[1] == n_outputs:
            if not np.allclose(y.sum(axis=1), 1.0, atol=1e-4) or np.any(y < 0):
                raise ValueError(
                    "y: one-hot labels must be non-negative rows that sum to 1; give integer "
                    "class labels [N] or one-hot rows [N, C]."
                )
            return tf.constant(y, dtype)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1:
            raise ValueError(
                f"y: expected integer labels [N] or one-hot [N, {n_outputs}] for "
                f"'classification'; got shape {y.shape}."
            )
        if y.dtype.kind == "f" and not np.all(y == np.round(y)):
            raise ValueError("y: class labels must be whole numbers; got fractional values.")
        if y.size and (y.min() < 0 or y.max() >= n_outputs):
            raise ValueError(
                f"y: class labels must lie in [0, {n_outputs}) for a model with {n_outputs} "
                f"outputs; got labels from {y.min()} to {y.max()}."
            )
        one_hot = np.zeros((y.size, n_outputs), tf.as_dtype(dtype).as_numpy_dtype)
        one_hot[np.arange(y.size), y.astype(np.int64)] = 1  # in numpy: cheaper than an eager op
        return tf.constant(one_hot)

    def nll_per_example(self, logits, y):
        return -tf.reduce_sum(y * tf.nn.log_softmax(logits, axis=-1), axis=-1)

    def output_hessian_sqrt(self, logits):
        # diag(p) - p p^T = (diag(s) - p s^T)(diag(s) - s p^T) with s = sqrt(p)
        p = tf.nn.softmax(logits, axis=-1)
        s = tf.sqrt(p)
        return tf.linalg.diag(s) - p[:, :, None] * s[:, None, :]

    def output_hessian(self, logits):
        p = tf.nn.softmax(logits, axis=-1)
        return tf.linalg.diag(p) - p[:, :, None] * p[:, None, :]

    def output_hessian_diag_lowrank(self, logits):
        p = tf.nn.softmax(logits, axis=-1)
        return p, p[:, :, None]

    def n_outputs(self, y) -> int:
        return int(np.max(y)) + 1

    def inverse_link(self, logits):
        return tf.nn.softmax(logits, axis=-1)

    def sample(self, logits, seed):
        labels = tf.random.stateless_categorical(logits, 1, seed)[:, 0]
        return tf.one_hot(labels, tf.shape(logits)[-1], dtype=logits.dtype)

    def validation_nll(self, outputs, y) -> float:
        probs = np.asarray(outputs, np.float64)
        return _categorical_nll(probs, np.asarray(self.prepare_targets(y, probs.shape[-1],
                                                                       tf.float64)))


class Binary(Likelihood):
    """Bernoulli likelihood with sigmoid link on one logit ``[N, 1]``; labels 0/1 of shape
    ``[N]`` or ``[N, 1]``."""

    name = "binary"
    links = ("probit", "mc")
    output_activation = "sigmoid"

    def validate_outputs(self, n_outputs: int) -> None:
        if n_outputs != 1:
            raise ValueError(
                f"model: 'binary' needs exactly one output logit; the model has {n_outputs}. "
                "For several classes use likelihood='classification'."
            )

    def prepare_targets(self, y, n_outputs: int, dtype: tf.DType) -> tf.Tensor:
        y = numeric_labels(y)
        if y.dtype.kind == "f":
            check_finite_labels(y)
        if y.ndim == 1:
            y = y[:, None]
        if y.ndim != 2 or y.shape[1] != 1:
            raise ValueError(f"y: expected 0/1 labels [N] or [N, 1] for 'binary'; got {y.shape}.")
        if not np.all((y == 0) | (y == 1)):
            raise ValueError("y: 'binary' labels must be 0 or 1; got other values.")
        return tf.constant(y, dtype)

    def nll_per_example(self, logits, y):
        return tf.reduce_sum(
            tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=logits), axis=-1
        )

    def output_hessian_sqrt(self, logits):
        p = tf.sigmoid(logits)
        return tf.sqrt(p * (1 - p))[:, :, None]

    def output_hessian_diag_lowrank(self, logits):
        p = tf.sigmoid(logits)
        return p * (1 - p), no_factors(logits)

    def n_outputs(self, y) -> int:
        return 1

    def inverse_link(self, logits):
        return tf.sigmoid(logits)

    def sample(self, logits, seed):
        uniform = tf.random.stateless_uniform(tf.shape(logits), seed, dtype=logits.dtype)
        return tf.cast(uniform < tf.sigmoid(logits), logits.dtype)

    def validation_nll(self, outputs, y) -> float:
        p = np.asarray(outputs, np.float64)
        t = np.asarray(self.prepare_targets(y, 1, tf.float64))
        return _categorical_nll(np.concatenate([1 - p, p], -1), np.concatenate([1 - t, t], -1))
