"""Link approximations: from a Gaussian over logits to predicted probabilities.

The GLM predictive gives, per input, logits ``f ~ N(mu, V)`` with ``mu [N, K]`` and
``V [N, K, K]``. Pushing that Gaussian through the softmax (or sigmoid) has no closed form;
three approximations, named as in laplace-torch:

* ``"probit"``: ``softmax(mu / sqrt(1 + pi/8 * diag V))`` (MacKay 1992); for one logit
  ``sigmoid(mu / sqrt(1 + pi/8 * V))``. Needs only the diagonal of ``V``; the likelihood
  computes it (``Likelihood.probit``: its inverse link of the scaled mean).
* ``"mc"``: the mean of ``softmax(f_s)`` over samples ``f_s = mu + L eps_s`` with
  ``L L^T = V`` (Cholesky, with a small jitter).
* ``"bridge"``: the Laplace bridge (Hobbhahn, Kristiadi and Hennig, UAI 2022), as in
  laplace-torch: remove the component of ``f`` along the all-ones direction (softmax is blind
  to it), map the Gaussian to a Dirichlet with
  ``alpha_k = (1 - 2/K + exp(mu_k) / K^2 * sum_j exp(-mu_j)) / V_kk`` and return the
  Dirichlet mean ``alpha / sum(alpha)`` (computed in log space; ``softmax(mu)`` where
  ``V = 0``). Classification with K >= 2 only.

Regression needs no link: the predictive is Gaussian in closed form.

Example:
    >>> import tensorflow as tf
    >>> from laplace_tf.likelihoods import get_likelihood
    >>> mu = tf.constant([[1.0, 0.0]], tf.float64)
    >>> var = tf.constant([[8 / 3.141592653589793 * 3, 0.0]], tf.float64)  # 1 + pi/8 var = 4, 1
    >>> get_likelihood("classification").probit(mu, var).numpy().round(4)  # softmax([.5, 0])
    array([[0.6225, 0.3775]])
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

PRED_TYPES = ("glm", "nn")


def needs_full_covariance(link_approx: str) -> bool:
    """Whether the link needs the whole ``V [N, K, K]`` rather than its diagonal."""
    return link_approx in ("mc", "bridge")


def bridge(mu: tf.Tensor | np.ndarray, covariance: tf.Tensor | np.ndarray) -> tf.Tensor:
    """The Laplace bridge: the Dirichlet mean from ``mu [N, K]`` and ``V [N, K, K]``.

    Example:
        >>> import tensorflow as tf                      # mu = 0, V = I: uniform, alpha = 1
        >>> bridge(tf.zeros((1, 4), tf.float64), tf.eye(4, batch_shape=[1], dtype=tf.float64)).numpy()
        array([[0.25, 0.25, 0.25, 0.25]])
    """
    mu = tf.convert_to_tensor(mu)
    covariance = tf.convert_to_tensor(covariance, mu.dtype)
    n_classes = int(mu.shape[-1])
    row = tf.reduce_sum(covariance, axis=-1)  # V 1        [N, K]
    total = tf.reduce_sum(row, axis=-1, keepdims=True)  # 1^T V 1   [N, 1]
    certain = total <= 0  # no variance at all: the predictive is softmax(mu)
    total = tf.where(certain, tf.ones_like(total), total)
    share = row / total  # divided first: row * row or row * sum(mu) overflow float32 first
    centred = mu - share * tf.reduce_sum(mu, axis=-1, keepdims=True)
    variance = tf.maximum(tf.linalg.diag_part(covariance) - row * share,
                          np.finfo(mu.dtype.as_numpy_dtype).tiny)
    # log alpha_k = log(1 - 2/K + exp(mu_k) sum_j exp(-mu_j) / K^2) - log V_kk in log space:
    # exp(mu_k) sum_j exp(-mu_j) overflows once the logits span ~88 (float32)
    spread = centred + tf.reduce_logsumexp(-centred, axis=-1, keepdims=True) \
        - 2.0 * math.log(n_classes)
    if n_classes > 2:  # log(c + exp(spread)), c = 1 - 2/K (0 for K = 2)
        log_c = math.log(1.0 - 2.0 / n_classes)
        spread = tf.maximum(spread, log_c) + tf.math.log1p(tf.exp(-tf.abs(spread - log_c)))
    log_alpha = spread - tf.math.log(variance)
    return tf.where(certain, tf.nn.softmax(mu), tf.nn.softmax(log_alpha))


def gaussian_samples(
    mu: tf.Tensor, covariance: tf.Tensor, n_samples: int, seed: tf.Tensor
) -> tf.Tensor:
    """Samples ``[S, N, K]`` of ``N(mu [N, K], V [N, K, K])``, reproducible from ``seed [2]``.

    ``V`` is factored by Cholesky after adding ``10 K eps`` times its mean diagonal (plus the
    smallest normal number) to the diagonal: the backward error of a Cholesky factorisation
    is of that order, so a positive semi-definite ``V`` (rank-deficient, or zero when the
    prior is very strong) factors without changing the samples beyond rounding.
    """
    n_outputs = int(mu.shape[-1])
    info = np.finfo(mu.dtype.as_numpy_dtype)
    scale = tf.reduce_mean(tf.linalg.diag_part(covariance), axis=-1)[:, None, None]
    jitter = 10.0 * n_outputs * float(info.eps) * scale + float(info.tiny)
    root = tf.linalg.cholesky(covariance + jitter * tf.eye(n_outputs, dtype=mu.dtype))
    eps = tf.random.stateless_normal(
        tf.concat([[n_samples], tf.shape(mu)], axis=0), seed=seed, dtype=mu.dtype
    )
    return mu + tf.einsum("nkl,snl->snk", root, eps)
