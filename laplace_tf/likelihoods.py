"""Likelihoods on logits: negative log-likelihood, output-space Hessian, its square root, link.

Three likelihoods, named as in laplace-torch:

* ``"classification"``: softmax cross-entropy; labels are integers ``[N]`` or one-hot ``[N, C]``.
* ``"binary"``: sigmoid on one logit ``[N, 1]``; labels 0/1 of shape ``[N]`` or ``[N, 1]``.
* ``"regression"``: Gaussian with noise ``sigma_noise`` (a scalar or one per output).

For every likelihood the per-example output-space Hessian of the negative log-likelihood is
``Lambda = L L^T`` (``[N, K, K]``), which is what the GGN ``J^T Lambda J`` needs.

Example:
    >>> import tensorflow as tf
    >>> lik = get_likelihood("classification")
    >>> logits = tf.constant([[0.0, 0.0]], tf.float64)
    >>> lik.output_hessian(logits).numpy()       # diag(p) - p p^T with p = [.5, .5]
    array([[[ 0.25, -0.25],
            [-0.25,  0.25]]])
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

LIKELIHOODS = ("classification", "binary", "regression")


class Likelihood:
    """Base class: every method works on a whole batch of logits ``[N, K]``."""

    name: str

    def validate_outputs(self, n_outputs: int) -> None:
        """Raise if a model with ``n_outputs`` outputs cannot carry this likelihood."""

    def prepare_targets(self, y, n_outputs: int, dtype: tf.DType) -> tf.Tensor:
        """Check targets and return them in the form :meth:`nll_per_example` expects."""
        raise NotImplementedError

    def nll_per_example(self, logits: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """Negative log-likelihood of each example ``[N]`` (with all constants)."""
        raise NotImplementedError

    def nll(self, logits: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """Summed negative log-likelihood of the batch (a scalar)."""
        return tf.reduce_sum(self.nll_per_example(logits, y))

    def output_hessian_sqrt(self, logits: tf.Tensor) -> tf.Tensor:
        """``L`` with ``Lambda = L L^T``, shape ``[N, K, K]``."""
        raise NotImplementedError

    def output_hessian(self, logits: tf.Tensor) -> tf.Tensor:
        """Hessian of the per-example NLL with respect to the logits, ``[N, K, K]``."""
        root = self.output_hessian_sqrt(logits)
        return tf.matmul(root, root, transpose_b=True)

    def output_hessian_diag_lowrank(self, logits: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """``(d [N, K], U [N, K, m])`` with ``Lambda_n = diag(d_n) - U_n U_n^T`` and small ``m``.

        The output-space Hessian without the ``[N, K, K]`` tensor, so that sums over examples
        (e.g. ``sum_n Lambda_n = diag(sum_n d_n) - U^T U``) cost ``O(N K^2 m)`` at most.
        """
        raise NotImplementedError

    def inverse_link(self, logits: tf.Tensor) -> tf.Tensor:
        """Mean prediction from logits (probabilities, or the identity for regression)."""
        raise NotImplementedError


def _no_factors(logits: tf.Tensor) -> tf.Tensor:
    """An empty ``[N, K, 0]`` low-rank part: ``Lambda`` is diagonal."""
    return logits[:, :, None][:, :, :0]


def _numeric_labels(y) -> np.ndarray:
    """``y`` as a numeric numpy array, or a TypeError that says how to get one."""
    y = np.asarray(y)
    if y.dtype.kind not in "biuf":
        raise TypeError(
            f"y: expected numeric labels; got dtype {y.dtype}. Encode class names as integers "
            "0..C-1 first (e.g. with sklearn.preprocessing.LabelEncoder)."
        )
    return y


def _check_finite_labels(y: np.ndarray) -> None:
    if not np.all(np.isfinite(y)):
        raise ValueError("y: labels contain NaN or Inf; clean the labels before fitting.")


class Classification(Likelihood):
    """Categorical likelihood with softmax link."""

    name = "classification"

    def validate_outputs(self, n_outputs: int) -> None:
        if n_outputs < 2:
            raise ValueError(
                f"model: 'classification' needs one logit per class (>= 2 outputs); the model "
                f"has {n_outputs}. For two classes with one output use likelihood='binary'."
            )

    def prepare_targets(self, y, n_outputs: int, dtype: tf.DType) -> tf.Tensor:
        y = _numeric_labels(y)
        if y.dtype.kind == "f":
            _check_finite_labels(y)
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

    def inverse_link(self, logits):
        return tf.nn.softmax(logits, axis=-1)


class Binary(Likelihood):
    """Bernoulli likelihood with sigmoid link on one logit."""

    name = "binary"

    def validate_outputs(self, n_outputs: int) -> None:
        if n_outputs != 1:
            raise ValueError(
                f"model: 'binary' needs exactly one output logit; the model has {n_outputs}. "
                "For several classes use likelihood='classification'."
            )

    def prepare_targets(self, y, n_outputs: int, dtype: tf.DType) -> tf.Tensor:
        y = _numeric_labels(y)
        if y.dtype.kind == "f":
            _check_finite_labels(y)
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
        return p * (1 - p), _no_factors(logits)

    def inverse_link(self, logits):
        return tf.sigmoid(logits)


class Regression(Likelihood):
    """Gaussian likelihood ``y ~ N(f(x), sigma_noise^2)`` per output.

    Args:
        sigma_noise: a positive scalar or one positive value per output.
    """

    name = "regression"

    def __init__(self, sigma_noise=1.0):
        sigma = np.asarray(sigma_noise, dtype=np.float64)
        if sigma.ndim > 1 or not np.all(np.isfinite(sigma)) or np.any(sigma <= 0):
            raise ValueError(
                f"sigma_noise: expected a positive scalar or a vector of positive values, one "
                f"per output; got {sigma_noise!r}."
            )
        self.sigma_noise = sigma

    def validate_outputs(self, n_outputs: int) -> None:
        if self.sigma_noise.ndim == 1 and self.sigma_noise.shape[0] != n_outputs:
            raise ValueError(
                f"sigma_noise: got {self.sigma_noise.shape[0]} values but the model has "
                f"{n_outputs} outputs; give a scalar or one value per output."
            )

    def prepare_targets(self, y, n_outputs: int, dtype: tf.DType) -> tf.Tensor:
        y = _numeric_labels(y).astype(np.float64)
        _check_finite_labels(y)
        if y.ndim == 1 and n_outputs == 1:
            y = y[:, None]
        if y.ndim != 2 or y.shape[1] != n_outputs:
            raise ValueError(
                f"y: expected regression targets [N, {n_outputs}] (or [N] for one output); "
                f"got shape {y.shape}."
            )
        return tf.constant(y, dtype)

    def _sigma(self, dtype):
        return tf.constant(self.sigma_noise, dtype)

    def nll_per_example(self, logits, y):
        sigma = self._sigma(logits.dtype) * tf.ones_like(logits[0])
        z = (y - logits) / sigma
        return tf.reduce_sum(
            0.5 * z**2 + tf.math.log(sigma) + 0.5 * math.log(2 * math.pi), axis=-1
        )

    def output_hessian_sqrt(self, logits):
        return tf.linalg.diag(tf.ones_like(logits) / self._sigma(logits.dtype))

    def output_hessian_diag_lowrank(self, logits):
        precision = tf.ones_like(logits) / self._sigma(logits.dtype) ** 2
        return precision, _no_factors(logits)

    def inverse_link(self, logits):
        return logits


def get_likelihood(name: str, sigma_noise=1.0) -> Likelihood:
    """The likelihood called ``name`` (one of :data:`LIKELIHOODS`)."""
    if name == "classification":
        return Classification()
    if name == "binary":
        return Binary()
    if name == "regression":
        return Regression(sigma_noise)
    raise ValueError(f"likelihood: expected one of {LIKELIHOODS}; got {name!r}.")
