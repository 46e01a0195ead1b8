"""The dense block ``H [p, p]``: a full posterior.

The factor is a Cholesky factorisation of the precision ``c H + diag(lambda)`` (never a naive
inverse, never an eigendecomposition to fit, sample or predict); the eigenvalues ``e`` of ``H``
are computed on first use, once, for prior tuning: the log-determinant is
``sum log(c e + lambda)`` for any scalar prior (a Cholesky factorisation for one per layer or
weight), so tuning a scalar prior costs no decomposition a step.

Example:
    >>> import tensorflow as tf
    >>> H = tf.constant([[2.0, 1.0], [1.0, 2.0]], tf.float64)        # eigenvalues 1, 3
    >>> factor = DenseBlock(H).factorize()
    >>> float(factor.log_det(tf.constant(1.0, tf.float64), tf.constant(1.0, tf.float64)))
    ... # log((1 + 1) * (3 + 1))
    2.0794415416798357
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from laplace_tf.blocks.base import (
    Factor,
    NotPositiveDefiniteError,
    check_finite,
    check_same_type,
    eigh,
    negatives,
    per_weight,
    register_block,
    symmetric,
    weighted_sum,
)
from laplace_tf.blocks.jacobian import LayerJacobian

__all__ = ["DenseBlock", "DenseCovariance", "DenseFactor"]


@register_block
class DenseBlock(NamedTuple):
    """``H = matrix [p, p]``."""

    matrix: tf.Tensor

    @property
    def size(self) -> int:
        return int(self.matrix.shape[0])

    def add(self, other: DenseBlock) -> DenseBlock:
        check_same_type(self, other)
        return DenseBlock(self.matrix + other.matrix)

    def scaled(self, factor) -> DenseBlock:
        return DenseBlock(self.matrix * factor)

    def from_sum_form(self) -> DenseBlock:
        return self

    def to_dense(self) -> tf.Tensor:
        return self.matrix

    def rescaled(self, scales: tf.Tensor) -> DenseBlock:
        root = per_weight(tf.sqrt(scales), int(self.matrix.shape[0]))
        return DenseBlock(root[:, None] * self.matrix * root[None, :])

    @classmethod
    def combine(cls, blocks: Sequence[DenseBlock], weights) -> DenseBlock:
        first = blocks[0].matrix
        return DenseBlock(weighted_sum([b.matrix for b in blocks], weights, first.dtype))

    def log_det_precision(self, c, prior, clip: bool = False) -> tf.Tensor:
        size = int(self.matrix.shape[0])
        curvature = self.matrix
        if clip:  # rebuilt from its eigenvalues, the negative ones set to 0
            values, vectors = tf.linalg.eigh(symmetric(curvature))
            curvature = tf.matmul(vectors * tf.maximum(values, 0)[None, :], vectors,
                                  transpose_b=True)
        matrix = c * curvature + tf.linalg.diag(prior * tf.ones([size], self.matrix.dtype))
        return 2.0 * tf.reduce_sum(tf.math.log(tf.linalg.diag_part(tf.linalg.cholesky(matrix))))

    def spectrum(self, max_order: int) -> np.ndarray | None:
        if self.size > max_order:
            return None
        return np.linalg.eigvalsh(np.asarray(self.matrix, np.float64))

    def factorize(self, clip: bool = False) -> DenseFactor:
        check_finite(self)
        return DenseFactor(self, clip)

    @staticmethod
    def memory(size: int) -> dict[str, int]:
        """Numbers a block of ``size`` weights keeps (``curvature``) and its factor and
        covariance allocate: the symmetrised copy, eigenvectors and eigenvalues, the Cholesky
        factor of the precision, the identity it is solved from and the covariance. An upper
        bound: the factor takes eigenvalues (no eigenvectors) only when tuning or an exact
        Hessian's check asks for them, or eigenvectors to clip an indefinite block."""
        square = size * size
        return {"curvature": square, "eigendecomposition": 2 * square + size,
                "cholesky": square, "covariance": 2 * square}


class DenseCovariance(NamedTuple):
    """``Sigma = root root^T``, ``root [p, p]`` lower triangular (:meth:`DenseFactor.scale`):
    the variances ``J Sigma J^T = (J root)(J root)^T`` need no ``Sigma``, and the same-output
    blocks of a last layer cost ``p^3 / K`` from the root, where ``Sigma`` costs ``p^3``."""

    root: tf.Tensor

    needs_one_factored_layer = False  # type: ignore[misc]  # a class constant in a NamedTuple

    def to_dense(self) -> tf.Tensor:
        return symmetric(tf.matmul(self.root, self.root, transpose_b=True))

    def diagonal(self) -> tf.Tensor:
        return tf.reduce_sum(tf.square(self.root), axis=-1)

    def for_logits_diagonal(self, shape: tuple[int, int]) -> _SameOutput:
        din, n_outputs = shape
        rows = tf.transpose(tf.reshape(self.root, [din, n_outputs, -1]), [1, 0, 2])  # [K, din, p]
        blocks = tf.matmul(rows, rows, transpose_b=True)  # [K, din, din]
        return _SameOutput(tf.transpose(blocks, [1, 2, 0]))

    def contract(self, layers: Sequence[LayerJacobian], diagonal: bool) -> tf.Tensor:
        first = layers[0]
        if first.a is not None and first.g is None:  # pre-activation = logits: J = a^T ⊗ I
            a = first.a[:, 0]
            din = int(a.shape[-1])
            left = tf.einsum("ni,ikq->nkq", a, tf.reshape(self.root, [din, -1, self.root.shape[-1]]))
        else:
            left = tf.einsum("nkp,pq->nkq", tf.concat([layer.explicit() for layer in layers], -1),
                             self.root)
        if diagonal:
            return tf.reduce_sum(tf.square(left), axis=-1)
        return tf.matmul(left, left, transpose_b=True)


class _SameOutput(NamedTuple):
    """A last-layer dense covariance for the diagonal of ``J Sigma J^T``:
    ``Sigma[(i, k), (j, k)]`` as ``[din, din, K]``, so that ``V[k, k] = a^T blocks[..., k] a``."""

    blocks: tf.Tensor

    def for_logits_diagonal(self, shape: tuple[int, int]) -> _SameOutput:
        return self

    def contract(self, layers: Sequence[LayerJacobian], diagonal: bool) -> tf.Tensor:
        assert layers[0].a is not None, "a logits layer is factored"
        a = layers[0].a[:, 0]
        return tf.einsum("ni,ijk,nj->nk", a, self.blocks, a)


_PD = dict(is_self_adjoint=True, is_positive_definite=True, is_non_singular=True, is_square=True)


class DenseFactor(Factor):
    """A :class:`DenseBlock` for the posterior ``c H + diag(prior)``, by Cholesky factorisation.

    Covariance, sampling scale and (for a per-layer or per-weight prior) log-determinant come
    from one Cholesky factorisation of the precision (``P^3 / 3`` multiply-adds), taken in
    reversed order, ``R (c H + diag(prior)) R = L L^T`` with ``R`` the order-reversing
    permutation, so that ``S = R L^-T R`` is *lower* triangular with ``S S^T`` the covariance:
    the sampling scale (``theta = mean + S z``) and the covariance ``S S^T`` need one
    triangular solve more, no second factorisation. The factorisation of the current
    ``(c, prior)`` is kept (eager calls only).

    The eigenvalues of ``H`` are computed on first use only, once: by prior tuning (the
    log-determinant for any scalar prior is ``sum log(c e + prior)``, no factorisation a
    step) or by the positive-definiteness check of a curvature that is not clipped (an exact
    Hessian). ``clip`` sets negative eigenvalues of ``H`` to zero by rebuilding ``H`` from its
    eigendecomposition, but only when there are any clearly below zero: a Cholesky
    factorisation of ``H + n eps |H| I`` at construction tells (a GGN or EF is positive
    semi-definite by construction, its negative eigenvalues are round-off and it is used as it
    is; should that round-off still break the Cholesky factorisation of the precision at a
    tiny prior, it is clipped then).
    """

    def __init__(self, block: DenseBlock, clip: bool = False):
        self.matrix = symmetric(tf.convert_to_tensor(block.matrix))
        self.size = self.n_eigenvalues = int(self.matrix.shape[0])
        self._clip = clip
        self._eigen: tuple[tf.Tensor, int, float] | None = None  # values as used, n_negative, most_negative
        self._factor: tuple[bytes, tf.Tensor, list] | None = None  # (c, prior) key, L, [S] once computed
        self._psd = False  # positive semi-definite up to round-off, found without eigenvalues
        self._clipped = False
        if clip:  # eigendecomposed (and clipped) only if H has eigenvalues clearly below zero
            tol = self.size * np.finfo(self.matrix.dtype.as_numpy_dtype).eps * float(
                tf.reduce_max(tf.reduce_sum(tf.abs(self.matrix), axis=1)))  # >= n eps max|e|
            shifted = tf.linalg.cholesky(self.matrix + tol * tf.eye(self.size, dtype=self.matrix.dtype))
            self._psd = _finite_diagonal(shifted)
            if not self._psd:
                self._clip_negative()

    # ------------------------------------------------------------------ eigenvalues, on demand
    def _eigendecomposition(self) -> tuple[tf.Tensor, int, float]:
        if self._eigen is None:
            with tf.init_scope():  # computed eagerly once, even when first asked in a trace
                values = eigh(self.matrix, vectors=False)
                self._eigen = (tf.maximum(values, 0) if self._clip else values, *negatives(values))
        return self._eigen

    def _clip_negative(self) -> None:
        """Rebuild ``H`` from its eigendecomposition with negative eigenvalues set to zero."""
        with tf.init_scope():
            values, vectors = eigh(self.matrix)
            n_negative, most_negative = negatives(values)
            values = tf.maximum(values, 0)
            self.matrix = symmetric(tf.matmul(vectors * values, vectors, transpose_b=True))
            self._eigen, self._factor, self._clipped = (values, n_negative, most_negative), None, True

    @property
    def eigenvalues(self) -> tf.Tensor:
        """The eigenvalues of ``H`` as used (clipped at 0 if ``clip``), computed on first use."""
        return self._eigendecomposition()[0]

    @property
    def n_negative(self) -> int:  # type: ignore[override]
        return 0 if self._psd else self._eigendecomposition()[1]

    @property
    def most_negative(self) -> float:  # type: ignore[override]
        return 0.0 if self._psd else self._eigendecomposition()[2]

    @property
    def min_curvature_eigenvalue(self) -> tf.Tensor:
        """The smallest eigenvalue of ``H`` as used; for a block to clip found positive
        semi-definite up to round-off, 0, a lower bound without a decomposition (its clipped
        eigenvalues are >= 0; should the round-off break a Cholesky factorisation of the
        precision, it is clipped then)."""
        if self._psd and not self._clipped:
            return tf.zeros([], self.matrix.dtype)
        return tf.reduce_min(self.eigenvalues)

    # ------------------------------------------------------------------ the Cholesky factor
    def precision_matrix(self, c, prior) -> tf.Tensor:
        """The dense precision block ``c H + diag(prior)``."""
        return c * self.matrix + tf.linalg.diag(prior * tf.ones([self.size], self.matrix.dtype))

    def _reversed_cholesky(self, c, prior) -> tf.Tensor:
        """``L`` with ``R (c H + diag(prior)) R = L L^T``; kept for the last eager ``(c, prior)``.

        A precision that is not numerically positive definite gives NaN (TensorFlow's Cholesky
        does not raise): a block to be clipped is then eigendecomposed, clipped and factored
        again; else, or if that fails too, a ValueError says what to do.
        """
        if not tf.executing_eagerly():
            return tf.linalg.cholesky(tf.reverse(self.precision_matrix(c, prior), [0, 1]))
        key = np.asarray(c).tobytes() + np.asarray(prior).tobytes()
        if self._factor is None or self._factor[0] != key:
            chol = tf.linalg.cholesky(tf.reverse(self.precision_matrix(c, prior), [0, 1]))
            if self._clip and not self._clipped and not _finite_diagonal(chol):
                self._clip_negative()  # negative round-off above the prior: clip it
                chol = tf.linalg.cholesky(tf.reverse(self.precision_matrix(c, prior), [0, 1]))
            if not _finite_diagonal(chol):
                raise NotPositiveDefiniteError(
                    "The posterior precision H / temperature + prior_precision is not "
                    "numerically positive definite (its Cholesky factorisation failed): the "
                    "prior precision is too small against the round-off of the curvature. "
                    "Raise prior_precision, or fit in float64."
                )
            self._factor = (key, chol, [])
        return self._factor[1]

    def _scale_matrix(self, c, prior) -> tf.Tensor:
        """``S = R L^-T R``, lower triangular, ``S S^T`` = the covariance block."""
        chol = self._reversed_cholesky(c, prior)
        cached = self._factor[2] if tf.executing_eagerly() and self._factor is not None else []
        if not cached:
            inverse = tf.linalg.triangular_solve(chol, tf.eye(self.size, dtype=chol.dtype))
            cached.append(tf.reverse(tf.transpose(inverse), [0, 1]))
        return cached[0]

    def precision(self, c, prior):
        return tf.linalg.LinearOperatorFullMatrix(self.precision_matrix(c, prior), **_PD)

    def log_det(self, c, prior):
        if prior.shape.rank == 0:
            return tf.reduce_sum(tf.math.log(c * self.eigenvalues + prior))
        chol = tf.linalg.cholesky(self.precision_matrix(c, prior))  # differentiable: not kept
        return 2.0 * tf.reduce_sum(tf.math.log(tf.linalg.diag_part(chol)))

    def smallest_precision_eigenvalue(self, c, prior):
        if prior.shape.rank == 0:
            return c * tf.reduce_min(self.eigenvalues) + prior
        return tf.reduce_min(tf.linalg.eigvalsh(self.precision_matrix(c, prior)))

    def covariance(self, c, prior):
        return DenseCovariance(self._scale_matrix(c, prior))

    def scale(self, c, prior):
        return tf.linalg.LinearOperatorLowerTriangular(
            self._scale_matrix(c, prior), is_non_singular=True, is_square=True)


def _finite_diagonal(chol: tf.Tensor) -> bool:
    return bool(tf.reduce_all(tf.math.is_finite(tf.linalg.diag_part(chol))))
