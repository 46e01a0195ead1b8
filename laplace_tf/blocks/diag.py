"""The diagonal block ``diag(h)``: a diagonal posterior, and the fallback of a layer without a
Kronecker rule inside a Kronecker posterior. Everything is elementwise.

Example:
    >>> import tensorflow as tf
    >>> block = DiagBlock(tf.constant([1.0, 3.0], tf.float64))
    >>> cov = block.factorize().covariance(tf.constant(0.5, tf.float64), tf.constant(1.5, tf.float64))
    >>> cov.variance.numpy().tolist() == [1 / (0.5 * 1 + 1.5), 1 / (0.5 * 3 + 1.5)]
    True
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
    negatives,
    per_weight,
    register_block,
    weighted_sum,
)
from laplace_tf.blocks.jacobian import LayerJacobian, factored_variance, weighted_gram

__all__ = ["DiagBlock", "DiagCovariance", "DiagFactor"]

_PD = dict(is_self_adjoint=True, is_positive_definite=True, is_non_singular=True, is_square=True)


@register_block
class DiagBlock(NamedTuple):
    """``H = diag(diagonal [p])``.

    Example:
        >>> import tensorflow as tf
        >>> block = DiagBlock(tf.constant([1.0, 1.0, 2.0, 2.0], tf.float64))  # 2 inputs, K = 2
        >>> block.rescaled(tf.constant([4.0, 0.25], tf.float64)).diagonal.numpy().tolist()
        [4.0, 0.25, 8.0, 0.5]
    """

    diagonal: tf.Tensor

    @property
    def size(self) -> int:
        return int(self.diagonal.shape[0])

    def add(self, other: DiagBlock) -> DiagBlock:
        check_same_type(self, other)
        return DiagBlock(self.diagonal + other.diagonal)

    def scaled(self, factor) -> DiagBlock:
        return DiagBlock(self.diagonal * factor)

    def from_sum_form(self) -> DiagBlock:
        return self

    def to_dense(self) -> tf.Tensor:
        return tf.linalg.diag(self.diagonal)

    def rescaled(self, scales: tf.Tensor) -> DiagBlock:
        return DiagBlock(self.diagonal * per_weight(scales, int(self.diagonal.shape[0])))

    @classmethod
    def combine(cls, blocks: Sequence[DiagBlock], weights) -> DiagBlock:
        first = blocks[0].diagonal
        return DiagBlock(weighted_sum([b.diagonal for b in blocks], weights, first.dtype))

    def log_det_precision(self, c, prior, clip: bool = False) -> tf.Tensor:
        diagonal = tf.maximum(self.diagonal, 0) if clip else self.diagonal
        return tf.reduce_sum(tf.math.log(c * diagonal + prior))

    def spectrum(self, max_order: int) -> np.ndarray:
        return np.asarray(self.diagonal, np.float64)

    def factorize(self, clip: bool = False) -> DiagFactor:
        check_finite(self)
        return DiagFactor(self, clip)

    @staticmethod
    def memory(size: int) -> dict[str, int]:
        """Numbers a block of ``size`` weights keeps (``curvature``) and its posterior
        allocates (precision and variances)."""
        return {"curvature": size, "posterior": 2 * size}


class DiagCovariance(NamedTuple):
    """``Sigma = diag(variance [p])``."""

    variance: tf.Tensor

    needs_one_factored_layer = False  # type: ignore[misc]  # a class constant in a NamedTuple

    def to_dense(self) -> tf.Tensor:
        return tf.linalg.diag(self.variance)

    def diagonal(self) -> tf.Tensor:
        return self.variance

    def for_logits_diagonal(self, shape: tuple[int, int]) -> DiagCovariance:
        return self

    def contract(self, layers: Sequence[LayerJacobian], diagonal: bool) -> tf.Tensor:
        total = None
        for layer in layers:
            variance = self.variance[layer.start: layer.start + layer.size]
            if layer.a is None:
                term = weighted_gram(layer.jacobian, variance, diagonal)
            else:
                term = factored_variance(
                    layer, None, None, tf.reshape(variance, layer.shape), diagonal
                )
            total = term if total is None else total + term
        return total


class DiagFactor(Factor):
    """A :class:`DiagBlock` with clipping applied.

    Example:
        >>> import tensorflow as tf
        >>> factor = DiagFactor(DiagBlock(tf.constant([-1.0, 4.0], tf.float64)), clip=True)
        >>> factor.n_negative, factor.h.numpy().tolist()
        (1, [0.0, 4.0])
    """

    def __init__(self, block: DiagBlock, clip: bool = False):
        h = tf.convert_to_tensor(block.diagonal)
        self.size = self.n_eigenvalues = int(h.shape[0])
        self.n_negative, self.most_negative = negatives(h)
        self.h = tf.maximum(h, 0) if clip else h
        self.min_curvature_eigenvalue = tf.reduce_min(self.h)

    def precision_diagonal(self, c, prior) -> tf.Tensor:
        """``c h + prior``, ``[p]``."""
        return c * self.h + prior

    def precision(self, c, prior):
        return tf.linalg.LinearOperatorDiag(self.precision_diagonal(c, prior), **_PD)

    def log_det(self, c, prior):
        return tf.reduce_sum(tf.math.log(self.precision_diagonal(c, prior)))

    def smallest_precision_eigenvalue(self, c, prior):
        return tf.reduce_min(self.precision_diagonal(c, prior))

    def covariance(self, c, prior):
        return DiagCovariance(1 / self.precision_diagonal(c, prior))

    def scale(self, c, prior):
        return tf.linalg.LinearOperatorDiag(tf.math.rsqrt(self.precision_diagonal(c, prior)), **_PD)
