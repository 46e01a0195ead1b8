"""The dense block ``H [p, p]``: a full posterior.

The factor keeps the eigenvalues ``e`` of ``H`` (and its eigenvectors when clipping); the
precision and covariance go through a Cholesky factorisation (never a naive inverse), the
log-determinant is ``sum log(c e + lambda)`` for a scalar prior (a Cholesky factorisation for
one per weight), so prior tuning with a scalar prior costs no new decomposition.

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

    def log_det_precision(self, c, prior) -> tf.Tensor:
        size = int(self.matrix.shape[0])
        matrix = c * self.matrix + tf.linalg.diag(prior * tf.ones([size], self.matrix.dtype))
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
        factor of the precision, the identity it is solved from and the covariance."""
        square = size * size
        return {"curvature": square, "eigendecomposition": 2 * square + size,
                "cholesky": square, "covariance": 2 * square}


class DenseCovariance(NamedTuple):
    """``Sigma = matrix [p, p]``."""

    matrix: tf.Tensor

    needs_one_factored_layer = False  # type: ignore[misc]  # a class constant in a NamedTuple

    def to_dense(self) -> tf.Tensor:
        return self.matrix

    def for_logits_diagonal(self, shape: tuple[int, int]) -> _SameOutput:
        din, n_outputs = shape
        blocks = tf.reshape(self.matrix, [din, n_outputs, din, n_outputs])
        return _SameOutput(tf.linalg.diag_part(tf.transpose(blocks, [0, 2, 1, 3])))

    def contract(self, layers: Sequence[LayerJacobian], diagonal: bool) -> tf.Tensor:
        first = layers[0]
        if first.a is not None and first.g is None:  # pre-activation = logits, full V
            a = first.a[:, 0]
            din = int(a.shape[-1])
            n_outputs = int(self.matrix.shape[0]) // din
            blocks = tf.reshape(self.matrix, [din, n_outputs, din, n_outputs])
            return tf.einsum("nkjl,nj->nkl", tf.einsum("ni,ikjl->nkjl", a, blocks), a)
        jac = tf.concat([layer.explicit() for layer in layers], axis=-1)
        left = tf.einsum("nkp,pq->nkq", jac, self.matrix)
        if diagonal:
            return tf.reduce_sum(left * jac, axis=-1)
        return tf.matmul(left, jac, transpose_b=True)


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
    """A :class:`DenseBlock` and its eigenvalues (eigenvectors too when clipping).

    Negative eigenvalues of ``H`` (an exact Hessian away from a minimum) are set to zero when
    ``clip``, by rebuilding ``H`` from its eigendecomposition.
    """

    def __init__(self, block: DenseBlock, clip: bool = False):
        matrix = symmetric(tf.convert_to_tensor(block.matrix))
        if clip:
            eigenvalues, eigenvectors = eigh(matrix)
        else:  # eigenvalues only: a few times cheaper than with eigenvectors
            eigenvalues = eigh(matrix, vectors=False)
        self.size = int(matrix.shape[0])
        self.n_eigenvalues = self.size
        self.n_negative, self.most_negative = negatives(eigenvalues)
        if clip:
            eigenvalues = tf.maximum(eigenvalues, 0)
            matrix = symmetric(tf.matmul(eigenvectors * eigenvalues, eigenvectors, transpose_b=True))
        self.matrix = matrix
        self.eigenvalues = eigenvalues
        self.min_curvature_eigenvalue = tf.reduce_min(eigenvalues)

    def precision_matrix(self, c, prior) -> tf.Tensor:
        """The dense precision block ``c H + diag(prior)``."""
        return c * self.matrix + tf.linalg.diag(prior * tf.ones([self.size], self.matrix.dtype))

    def _cholesky(self, c, prior) -> tf.Tensor:
        return tf.linalg.cholesky(self.precision_matrix(c, prior))

    def precision(self, c, prior):
        return tf.linalg.LinearOperatorFullMatrix(self.precision_matrix(c, prior), **_PD)

    def log_det(self, c, prior):
        if prior.shape.rank == 0:
            return tf.reduce_sum(tf.math.log(c * self.eigenvalues + prior))
        return 2.0 * tf.reduce_sum(tf.math.log(tf.linalg.diag_part(self._cholesky(c, prior))))

    def smallest_precision_eigenvalue(self, c, prior):
        if prior.shape.rank == 0:
            return c * self.min_curvature_eigenvalue + prior
        return tf.reduce_min(tf.linalg.eigvalsh(self.precision_matrix(c, prior)))

    def covariance(self, c, prior):
        chol = self._cholesky(c, prior)
        identity = tf.eye(self.size, dtype=chol.dtype)
        return DenseCovariance(symmetric(tf.linalg.cholesky_solve(chol, identity)))

    def scale(self, c, prior):
        return tf.linalg.LinearOperatorLowerTriangular(
            tf.linalg.cholesky(self.covariance(c, prior).matrix), is_non_singular=True,
            is_square=True,
        )
