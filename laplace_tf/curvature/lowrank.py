"""The top eigenpairs of the GGN or empirical Fisher over all weights, without a ``P x P`` matrix.

A randomized Nyström sketch with subspace iteration (Halko, Martinsson & Tropp 2011; the
stable Nyström of Tropp et al. 2017), with a fixed seed:

1. ``Q`` = an orthonormal basis of a Gaussian ``[P, m]`` matrix, ``m = rank + oversampling``
   (at most ``P``);
2. one pass over the data computes ``Y = H Q = sum_{n,r} v_nr (v_nr^T Q)`` from the
   per-example rows (:func:`~laplace_tf.curvature._per_example.summed_products`; factored
   Dense layers never form their rows) and the trace ``sum |v_nr|^2``; each of the
   ``power_iterations`` extra passes replaces ``Q`` by an orthonormal basis of ``Y`` first;
3. the Nyström approximation ``Y (Q^T Y)^+ Y^T`` of ``H`` (shifted by a round-off ``nu``
   for stability) is eigendecomposed through ``[P, m]`` and ``[m, m]`` factorisations; its
   top ``rank`` eigenpairs are the block, a
   :meth:`~laplace_tf.blocks.lowrank.LowRankBlock.from_eigen`.

With ``m = P`` the sketch is exact (``Q`` spans everything). The memory is ``O(P m)``. The
fraction of the trace the kept eigenvalues capture is logged (``laplace_tf`` logger, INFO) and
kept as :attr:`LowRankBuilder.captured_fraction`.

Example:
    A linear model with 3 weights: rank 3 is the GGN ``sum_n [x_n, 1] [x_n, 1]^T`` exactly.

    >>> import keras, numpy as np, tensorflow as tf
    >>> from laplace_tf.batches import Batches
    >>> from laplace_tf.curvature.base import fit_curvature
    >>> from laplace_tf.likelihoods import get_likelihood
    >>> from laplace_tf.params import LogitModel
    >>> model = keras.Sequential([keras.Input((2,), dtype="float64"),
    ...                           keras.layers.Dense(1, dtype="float64")])
    >>> x = np.random.default_rng(0).normal(size=(8, 2))
    >>> builder = LowRankBuilder(LogitModel(model), get_likelihood("regression"), rank=3)
    >>> block = fit_curvature(builder, Batches((x, x[:, 0]), dtype=tf.float64)).blocks[0]
    >>> X = np.c_[x, np.ones(8)]
    >>> bool(np.allclose(block.to_dense(), X.T @ X))
    True
    >>> round(builder.captured_fraction, 6)
    1.0
"""

from __future__ import annotations

import logging
import numbers

import numpy as np
import tensorflow as tf

from laplace_tf.arguments import non_negative_int, positive_int
from laplace_tf.blocks import Block, LowRankBlock
from laplace_tf.blocks.base import check_finite
from laplace_tf.curvature._per_example import (
    product_example_numbers,
    slice_layout,
    step_examples,
    summed_products,
)
from laplace_tf.curvature.base import CurvatureBuilder
from laplace_tf.likelihoods import Likelihood
from laplace_tf.params import LogitModel

logger = logging.getLogger("laplace_tf")

DEFAULT_RANK = 100
DEFAULT_OVERSAMPLING = 10
DEFAULT_POWER_ITERATIONS = 1


class LowRankBuilder(CurvatureBuilder):
    """The top ``rank`` eigenpairs of the GGN or EF over the subset's weights, as one block.

    Args:
        logit_model: the model and its weight subset (``P`` weights).
        likelihood: the likelihood of the data.
        kind: ``"ggn"`` or ``"ef"``.
        rank: eigenpairs kept, at most ``P`` (a larger one is capped).
        oversampling: extra sketch vectors (``m = min(rank + oversampling, P)``).
        power_iterations: extra passes over the data, each refining the subspace.
        seed: the seed of the random start (the same seed gives the same result).

    Attributes:
        passes: ``power_iterations + 1`` passes over the data (:func:`fit_curvature`).
        captured_fraction: after a fit, the kept eigenvalues' share of the curvature's trace.
    """

    structure = "lowrank"
    kinds = ("ggn", "ef")

    def __init__(
        self,
        logit_model: LogitModel,
        likelihood: Likelihood,
        kind: str = "ggn",
        rank: int = DEFAULT_RANK,
        oversampling: int = DEFAULT_OVERSAMPLING,
        power_iterations: int = DEFAULT_POWER_ITERATIONS,
        seed: int | None = None,
    ):
        super().__init__(logit_model, likelihood, kind)
        n_params = logit_model.subset.n_params
        self.rank = min(positive_int(rank, "rank"), n_params)
        oversampling = non_negative_int(oversampling, "oversampling")
        self.passes = non_negative_int(power_iterations, "power_iterations") + 1
        self.captured_fraction: float | None = None
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise TypeError(f"seed: expected an integer or None; got {seed!r}.")
        seed = 0 if seed is None else int(seed) % (2**31 - 1)
        start = tf.random.stateless_normal(
            [n_params, min(self.rank + oversampling, n_params)], [seed, 1], dtype=tf.float64)
        self._start = _orthonormal(start)
        self._basis = tf.Variable(tf.cast(self._start, logit_model.subset.dtype), trainable=False)

    def start_pass(self, previous: list | None) -> None:
        """Before each pass: the random start, or an orthonormal basis of the last ``H Q``."""
        if previous is not None:
            check_finite(previous)  # before a QR or eigh fails on it
        basis = self._start if previous is None else _orthonormal(previous[0])
        self._basis.assign(tf.cast(basis, self._basis.dtype))

    def batch_sums(self, x, y, w=None) -> tuple[list[tf.Tensor], tf.Tensor]:
        """The batch's ``H Q`` ``[P, m]`` and trace of ``H``."""
        layout = slice_layout(self.logit_model, x)
        (products, trace), logits = summed_products(
            self.logit_model, self.likelihood, self.kind, x, y, layout, self._basis, w)
        return [products, trace], logits

    def examples_per_step(self, x) -> int:
        """Batches are joined into steps whose intermediates fit a chunk: every step adds a
        ``[P, m]`` sum."""
        numbers = product_example_numbers(slice_layout(self.logit_model, x), self.kind,
                                          int(self._basis.shape[-1]))
        return step_examples(numbers, self.logit_model.subset.dtype.size)

    def finish(self, sums: list) -> list[Block]:
        check_finite(sums)
        products, trace = (tf.cast(s, tf.float64) for s in sums)
        dtype = self.logit_model.subset.dtype
        eigenvalues, vectors = nystrom_eigenpairs(tf.cast(self._basis, tf.float64), products,
                                                  float(np.finfo(dtype.as_numpy_dtype).eps))
        eigenvalues, vectors = eigenvalues[: self.rank], vectors[:, : self.rank]
        trace = float(trace)
        self.captured_fraction = float(tf.reduce_sum(eigenvalues)) / trace if trace > 0 else 1.0
        logger.info("laplace_tf: the rank-%d curvature captures %.4g of its trace %.4g.",
                    self.rank, self.captured_fraction, trace)
        return [LowRankBlock.from_eigen(tf.cast(vectors, dtype), tf.cast(eigenvalues, dtype))]


def nystrom_eigenpairs(basis: tf.Tensor, products: tf.Tensor,
                       eps: float = float(np.finfo(np.float64).eps)) -> tuple[tf.Tensor, tf.Tensor]:
    """Eigenpairs of the Nyström approximation ``Y (Q^T Y)^+ Y^T`` of a PSD ``H`` from an
    orthonormal ``Q [P, m]`` and ``Y = H Q`` (float64, ``Y`` computed with round-off ``eps``):
    eigenvalues ``[m']`` (descending, >= 0; ``m' <= m`` once directions ``H`` maps to zero
    are dropped) and orthonormal eigenvectors ``[P, m']``.

    Stable form (Tropp et al. 2017): ``Y_nu = Y + nu Q`` with a round-off shift ``nu``,
    ``F = Y_nu (Q^T Y_nu)^-1/2``, ``F = U S W^T``, eigenvalues ``S^2 - nu``, those below ``nu``
    (round-off) set to zero. With ``m = P`` it is ``H`` itself. Each eigenvector's entry of
    largest magnitude is positive, so that the result does not depend on round-off signs.

    Example:
        >>> H = tf.constant([[4.0, 1.0, 0.0], [1.0, 3.0, 0.0], [0.0, 0.0, 0.5]], tf.float64)
        >>> values, _ = nystrom_eigenpairs(tf.eye(3, dtype=tf.float64), H)
        >>> np.round(values.numpy(), 6).tolist() == np.round(np.linalg.eigvalsh(H)[::-1], 6).tolist()
        True
    """
    n_params = int(basis.shape[0])
    shift = np.sqrt(n_params) * eps * float(tf.norm(products))
    shifted = products + shift * basis
    core = tf.matmul(basis, shifted, transpose_a=True)
    values, vectors = tf.linalg.eigh(0.5 * (core + tf.transpose(core)))
    keep = values > shift * 1e-3  # zero directions of Q^T H Q (beyond H's rank) add nothing
    if not bool(tf.reduce_any(keep)):  # H = 0
        return tf.zeros([1], basis.dtype), basis[:, :1]
    root = tf.boolean_mask(vectors, keep, axis=1) * tf.math.rsqrt(tf.boolean_mask(values, keep))
    factor = tf.matmul(shifted, root)  # F F^T = Y_nu (Q^T Y_nu)^+ Y_nu^T
    q, r = tf.linalg.qr(factor)
    singular, left, _ = tf.linalg.svd(r)
    eigenvalues = tf.square(singular) - shift
    eigenvalues = tf.where(eigenvalues > shift, eigenvalues, 0.0)
    vectors = tf.matmul(q, left)
    largest = tf.gather(vectors, tf.argmax(tf.abs(vectors), axis=0), axis=0, batch_dims=0)
    return eigenvalues, vectors * tf.sign(tf.linalg.diag_part(largest))


def _orthonormal(matrix: tf.Tensor) -> tf.Tensor:
    """An orthonormal basis ``[P, m]`` of the columns of ``matrix`` (float64)."""
    return tf.linalg.qr(tf.cast(matrix, tf.float64))[0]
