"""The interface every likelihood implements, and the label checks they share.

A likelihood owns all the math that depends on it: the NLL and its output-space curvature
(for the GGN, EF and exact Hessian), the targets the Monte-Carlo GGN samples, the inverse
link and the predictive built from a Gaussian over the model outputs, its noise parameter
and how a fitted curvature rescales when it changes, and the data statistics the evidence
needs. Code outside ``laplace_tf.likelihoods`` asks these methods and never compares names.

Example:
    >>> from laplace_tf.likelihoods import get_likelihood
    >>> [(lik.name, lik.links, lik.has_noise) for lik in map(get_likelihood, ("binary", "regression"))]
    [('binary', ('probit', 'mc'), False), ('regression', ('probit',), True)]
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

LINKS = ("probit", "mc", "bridge")


class Likelihood:
    """Base class: every method works on a whole batch of model outputs ``[N, K]``.

    Attributes:
        name: the name :func:`~laplace_tf.likelihoods.get_likelihood` knows it by.
        links: the ``link_approx`` values ``la(x)`` accepts.
        output_activation: the softmax/sigmoid a model may end with, which is removed to get
            its logits (None: the model output is used as it is).
        gaussian_predictive: ``la(x)`` returns ``(mean, variance)`` (regression-like).
        has_noise: it has a ``sigma_noise`` that may change after the fit (else it stays 1).
        constant_output_hessian: the Hessian of the NLL with respect to the outputs does not
            depend on the targets, so it equals the GGN's ``Lambda`` (closed forms that take
            the GGN for the exact Hessian rely on it).
    """

    name: str
    links: tuple[str, ...] = ("probit",)
    output_activation: str | None = None
    gaussian_predictive = False
    has_noise = False
    constant_output_hessian = True

    @classmethod
    def with_noise(cls, sigma_noise) -> Likelihood:
        """An instance; ``sigma_noise`` is used by likelihoods that have one (``has_noise``)."""
        return cls()

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
        """``L`` with ``Lambda = L L^T``, shape ``[N, K, K]`` (the GGN's output matrix)."""
        raise NotImplementedError

    def output_hessian(self, logits: tf.Tensor) -> tf.Tensor:
        """The GGN's output matrix ``Lambda [N, K, K]``: the Hessian of the per-example NLL
        with respect to the outputs, or its expectation over the targets (the Fisher) where
        that Hessian depends on them (``constant_output_hessian`` False)."""
        root = self.output_hessian_sqrt(logits)
        return tf.matmul(root, root, transpose_b=True)

    def output_hessian_diag_lowrank(self, logits: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """``(d [N, K], U [N, K, m])`` with ``Lambda_n = diag(d_n) - U_n U_n^T`` and small ``m``.

        The output-space Hessian without the ``[N, K, K]`` tensor, so that sums over examples
        (e.g. ``sum_n Lambda_n = diag(sum_n d_n) - U^T U``) cost ``O(N K^2 m)`` at most.
        """
        raise NotImplementedError

    def n_outputs(self, y: np.ndarray) -> int:
        """The number of model outputs for the targets ``y`` (numpy, ``[N]`` or ``[N, d]``,
        all the labels a data set has), before :meth:`validate_outputs` sees a model."""
        raise NotImplementedError

    def inverse_link(self, logits: tf.Tensor) -> tf.Tensor:
        """The predicted mean from the outputs: probabilities, or the regression mean."""
        raise NotImplementedError

    def sample(self, logits: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        """Targets drawn from the model's distribution at ``logits`` (stateless ``seed [2]``),
        in :meth:`prepare_targets` form: the Monte-Carlo GGN's targets."""
        raise NotImplementedError

    # ------------------------------------------------------------------ predictive
    def check_link(self, link_approx: str) -> None:
        """Raise a ValueError if ``link_approx`` is unknown or does not fit."""
        if link_approx not in LINKS:
            raise ValueError(f"link_approx: expected one of {LINKS}; got {link_approx!r}.")
        if link_approx not in self.links:
            raise ValueError(
                f"link_approx: {link_approx!r} does not fit likelihood={self.name!r}; "
                f"{self._link_hint()}."
            )

    def _link_hint(self) -> str:
        return f"use one of {self.links}"

    def probit(self, mu: tf.Tensor, variance: tf.Tensor) -> tf.Tensor:
        """The probit approximation (MacKay 1992): the inverse link of
        ``mu / sqrt(1 + pi/8 * variance)``, from the mean and diagonal variance ``[N, K]``."""
        return self.inverse_link(mu / tf.sqrt(1.0 + (math.pi / 8.0) * variance))

    def noise_variance(self, dtype: tf.DType) -> tf.Tensor:
        """The fixed observation-noise variance the predictive adds (scalar or ``[K]``)."""
        return tf.zeros([], dtype)

    def glm_predictive(self, logits: tf.Tensor, variance: tf.Tensor, noise: tf.Tensor):
        """The GLM predictive without sampling, from the outputs ``[N, K]``, their diagonal
        functional variance ``[N, K]`` and :meth:`noise_variance`: probit probabilities, or
        ``(mean, variance)`` for a Gaussian predictive."""
        return self.probit(logits, variance)

    def sampled_predictive(self, logits: tf.Tensor, noise: tf.Tensor):
        """The predictive from sampled outputs ``[S, N, K]`` (weights drawn from the
        posterior): mean probabilities, or ``(mean, variance)`` for a Gaussian predictive."""
        return tf.reduce_mean(self.inverse_link(logits), axis=0)

    def map_predictive(self, logits: tf.Tensor, noise: tf.Tensor):
        """The plain network's prediction: probabilities, or ``(mean, noise variance)``."""
        return self.inverse_link(logits)

    def validation_nll(self, outputs, y) -> float:
        """The summed NLL of targets ``y`` (numpy) under a predictive's ``outputs`` (what
        ``la(x)`` returns), for choosing the prior by validation."""
        raise NotImplementedError

    # ------------------------------------------------------------------ noise and evidence
    def curvature_power(self, kind: str) -> int:
        """``p``: a curvature ``kind`` fitted at noise ``s0`` is ``(s0 / s)^p`` times the one
        at ``s`` (GGN and exact Hessian ``1/s^2``: ``p = 2``; EF ``1/s^4``: ``p = 4``)."""
        return 4 if kind == "ef" else 2

    def data_statistics(self, logits: tf.Tensor, y: tf.Tensor, w: tf.Tensor) -> tf.Tensor | None:
        """Sums over the batch (weighted by ``w [N]``) from which :meth:`data_nll` recomputes
        the NLL at another noise; None when the noise cannot change."""
        return None

    def data_nll(self, nll: tf.Tensor, statistics, n_data, sigma: tf.Tensor) -> tf.Tensor:
        """The summed NLL at noise ``sigma`` (differentiable in it), from the NLL at the fit's
        noise and :meth:`data_statistics` summed over ``n_data`` examples."""
        return nll


def no_factors(logits: tf.Tensor) -> tf.Tensor:
    """An empty ``[N, K, 0]`` low-rank part: ``Lambda`` is diagonal."""
    return logits[:, :, None][:, :, :0]


def numeric_labels(y) -> np.ndarray:
    """``y`` as a numeric numpy array, or a TypeError that says how to get one."""
    y = np.asarray(y)
    if y.dtype.kind not in "biuf":
        raise TypeError(
            f"y: expected numeric labels; got dtype {y.dtype}. Encode class names as integers "
            "0..C-1 first (e.g. with sklearn.preprocessing.LabelEncoder)."
        )
    return y


def check_finite_labels(y: np.ndarray) -> None:
    if not np.all(np.isfinite(y)):
        raise ValueError("y: labels contain NaN or Inf; clean the labels before fitting.")
