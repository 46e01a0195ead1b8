"""Gaussian regression: a fixed noise ``sigma_noise`` (``"regression"``) or one the model
predicts (``"heteroscedastic"``)."""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from laplace_tf.likelihoods.base import (
    Likelihood,
    check_finite_labels,
    no_factors,
    numeric_labels,
)

_LOG_2PI = math.log(2 * math.pi)


class _Gaussian(Likelihood):
    """What the Gaussian likelihoods share: real targets and a ``(mean, variance)``
    predictive in closed form."""

    gaussian_predictive = True

    def _link_hint(self) -> str:
        return ("the regression predictive is Gaussian in closed form; leave link_approx at "
                "its default 'probit' (it is not used)")

    def _targets(self, y, n_targets: int, dtype: tf.DType) -> tf.Tensor:
        y = numeric_labels(y).astype(np.float64)
        check_finite_labels(y)
        if y.ndim == 1 and n_targets == 1:
            y = y[:, None]
        if y.ndim != 2 or y.shape[1] != n_targets:
            raise ValueError(
                f"y: expected regression targets [N, {n_targets}] (or [N] for one target); "
                f"got shape {y.shape}."
            )
        return tf.constant(y, dtype)

    def n_outputs(self, y) -> int:
        return 1 if np.ndim(y) == 1 else int(np.shape(y)[1])

    def validation_nll(self, outputs, y) -> float:
        mean, var = (np.asarray(o, np.float64) for o in outputs)
        t = np.asarray(self._targets(y, mean.shape[-1], tf.float64))
        return float(np.sum(0.5 * np.log(2 * np.pi * var) + 0.5 * (t - mean) ** 2 / var))


class Regression(_Gaussian):
    """Gaussian likelihood ``y ~ N(f(x), sigma_noise^2)`` per output.

    Args:
        sigma_noise: a positive scalar or one positive value per output.
    """

    name = "regression"
    has_noise = True

    @classmethod
    def with_noise(cls, sigma_noise) -> Regression:
        return cls(sigma_noise)

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
        return self._targets(y, n_outputs, dtype)

    def _sigma(self, dtype):
        return tf.constant(self.sigma_noise, dtype)

    def nll_per_example(self, logits, y):
        sigma = self._sigma(logits.dtype) * tf.ones_like(logits[0])
        z = (y - logits) / sigma
        return tf.reduce_sum(0.5 * z**2 + tf.math.log(sigma) + 0.5 * _LOG_2PI, axis=-1)

    def output_hessian_sqrt(self, logits):
        return tf.linalg.diag(tf.ones_like(logits) / self._sigma(logits.dtype))

    def output_hessian_diag_lowrank(self, logits):
        precision = tf.ones_like(logits) / self._sigma(logits.dtype) ** 2
        return precision, no_factors(logits)

    def inverse_link(self, logits):
        return logits

    def sample(self, logits, seed):
        noise = tf.random.stateless_normal(tf.shape(logits), seed, dtype=logits.dtype)
        return logits + self._sigma(logits.dtype) * noise

    def noise_variance(self, dtype):
        return tf.square(self._sigma(dtype))

    def glm_predictive(self, logits, variance, noise):
        return logits, variance + noise

    def sampled_predictive(self, logits, noise):
        return tf.reduce_mean(logits, axis=0), tf.math.reduce_variance(logits, axis=0) + noise

    def map_predictive(self, logits, noise):
        return logits, tf.broadcast_to(noise, tf.shape(logits))

    def data_statistics(self, logits, y, w):
        """The ``w``-weighted residual sums of squares per output ``[K]``."""
        return tf.reduce_sum(w[:, None] * tf.square(y - logits), axis=0)

    def data_nll(self, nll, statistics, n_data, sigma):
        """The Gaussian NLL from the residual sums of squares ``[K]`` at ``sigma``.

        Example:
            >>> rss = tf.constant([2.0], tf.float64)      # one output, 2 data points
            >>> lik, sigma = Regression(), tf.constant(1.0, tf.float64)
            >>> float(lik.data_nll(None, rss, 2, sigma))  # 1/2 * 2 + log(2 pi)
            2.8378770664093453
        """
        sigma = sigma * tf.ones_like(statistics)
        # not tf.cast: a Python float becomes a float32 tensor first (fractional sample weights)
        n = tf.cast(n_data, statistics.dtype) if tf.is_tensor(n_data) else \
            tf.constant(n_data, statistics.dtype)
        k = tf.cast(tf.size(statistics), statistics.dtype)
        return (0.5 * tf.reduce_sum(statistics / sigma**2)
                + n * tf.reduce_sum(tf.math.log(sigma)) + 0.5 * n * k * _LOG_2PI)


class Heteroscedastic(_Gaussian):
    """Gaussian likelihood whose variance the model predicts: its last axis is
    ``[mean (K), log-variance (K)]`` (``2K`` outputs), ``y_k ~ N(mu_k, exp(eta_k))``.

    The GGN's output matrix is the Fisher with respect to ``(mu, eta)``,
    ``diag(exp(-eta), 1/2)`` per target (positive semi-definite); the exact Hessian of the
    NLL depends on the targets (``constant_output_hessian`` False). There is no
    ``sigma_noise``: the noise is the model's. The predictive ``(mean, variance)`` adds the
    predicted ``exp(eta)`` to the spread of the mean.

    Example:
        >>> import tensorflow as tf
        >>> lik = Heteroscedastic()
        >>> outputs = tf.constant([[1.0, 0.0]], tf.float64)     # mu = 1, sigma^2 = exp(0) = 1
        >>> lik.output_hessian(outputs).numpy()
        array([[[1. , 0. ],
                [0. , 0.5]]])
        >>> [t.numpy().tolist() for t in lik.map_predictive(outputs, None)]
        [[[1.0]], [[1.0]]]
    """

    name = "heteroscedastic"
    constant_output_hessian = False

    def validate_outputs(self, n_outputs: int) -> None:
        if n_outputs < 2 or n_outputs % 2:
            raise ValueError(
                f"model: 'heteroscedastic' needs 2K outputs, [mean (K), log-variance (K)] on "
                f"the last axis; the model has {n_outputs}. Give the model one mean and one "
                "log-variance output per target, or use likelihood='regression'."
            )

    def prepare_targets(self, y, n_outputs: int, dtype: tf.DType) -> tf.Tensor:
        return self._targets(y, n_outputs // 2, dtype)

    def n_outputs(self, y) -> int:
        return 2 * super().n_outputs(y)

    @staticmethod
    def _split(outputs):
        """``(mu, eta)``, the two halves of the last axis."""
        return tf.split(outputs, 2, axis=-1)

    def nll_per_example(self, logits, y):
        mu, eta = self._split(logits)
        return tf.reduce_sum(
            0.5 * tf.square(y - mu) * tf.exp(-eta) + 0.5 * eta + 0.5 * _LOG_2PI, axis=-1
        )

    def output_hessian_sqrt(self, logits):
        _, eta = self._split(logits)
        return tf.linalg.diag(tf.concat([tf.exp(-0.5 * eta),
                                         tf.ones_like(eta) * math.sqrt(0.5)], axis=-1))

    def output_hessian_diag_lowrank(self, logits):
        _, eta = self._split(logits)
        return tf.concat([tf.exp(-eta), 0.5 * tf.ones_like(eta)], axis=-1), no_factors(logits)

    def inverse_link(self, logits):
        return self._split(logits)[0]

    def sample(self, logits, seed):
        mu, eta = self._split(logits)
        return mu + tf.exp(0.5 * eta) * tf.random.stateless_normal(tf.shape(mu), seed,
                                                                   dtype=mu.dtype)

    def glm_predictive(self, logits, variance, noise):
        mu, eta = self._split(logits)
        return mu, self._split(variance)[0] + tf.exp(eta)

    def sampled_predictive(self, logits, noise):
        mu, eta = self._split(logits)
        return (tf.reduce_mean(mu, axis=0),
                tf.math.reduce_variance(mu, axis=0) + tf.reduce_mean(tf.exp(eta), axis=0))

    def map_predictive(self, logits, noise):
        mu, eta = self._split(logits)
        return mu, tf.exp(eta)
