"""The Kronecker block ``A ⊗ G`` of one layer (K-FAC).

``A [din, din]`` is over the layer's inputs (the constant 1 for the bias appended last) and
``G [dout, dout]`` over its outputs. ``A`` is the MEAN of ``a a^T`` over the ``n`` rows it was
built from, ``G`` a SUM over data, so data sets combine exactly:
``A = (n1 A1 + n2 A2) / (n1 + n2)``, ``G = G1 + G2``; scalars (temperature, noise) go to ``G``.

The factor eigendecomposes ``A = Qa diag(a) Qa^T`` and ``G = Qg diag(g) Qg^T``; the precision
``c A ⊗ G + lambda`` then has the exact eigenvalues ``c a_i g_j + lambda`` (not a damped-factor
approximation) in the basis ``Qa ⊗ Qg``
(:class:`~laplace_tf.blocks.kron_operator.LinearOperatorKroneckerEigen`). The prior must be
one scalar (a per-weight prior breaks the shared eigenbasis).

Example:
    >>> import tensorflow as tf
    >>> block = KronBlock(tf.eye(2), 3.0 * tf.eye(2), tf.constant(1.0))
    >>> block.to_dense().numpy().diagonal().tolist()
    [3.0, 3.0, 3.0, 3.0]
    >>> factor = block.factorize()
    >>> factor.precision_eigenvalues(tf.constant(1.0), 1.0).numpy().tolist()
    [[4.0, 4.0], [4.0, 4.0]]
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
    register_block,
    symmetric,
    weighted_sum,
)
from laplace_tf.blocks.jacobian import LayerJacobian, factored_variance
from laplace_tf.blocks.kron_operator import LinearOperatorKroneckerEigen

__all__ = ["KronBlock", "KronCovariance", "KronFactor", "PermutedKronBlock", "PermutedKronCovariance",
           "PermutedKronFactor"]


@register_block
class KronBlock(NamedTuple):
    """``H = A ⊗ G``, ``A`` a mean over ``n`` rows (see the module docstring)."""

    A: tf.Tensor
    G: tf.Tensor
    n: tf.Tensor

    @property
    def size(self) -> int:
        return int(self.A.shape[0]) * int(self.G.shape[0])

    def add(self, other: KronBlock) -> KronBlock:
        check_same_type(self, other)
        n = self.n + other.n
        A = (self.n * self.A + other.n * other.A) / n
        return KronBlock(A, self.G + other.G, n)

    def scaled(self, factor) -> KronBlock:
        return KronBlock(self.A, self.G * factor, self.n)

    def from_sum_form(self) -> KronBlock:
        """The block from ``A`` a plain sum over data (the form in which batches add up)."""
        return KronBlock(self.A / self.n, self.G, self.n)

    def to_dense(self) -> tf.Tensor:
        return tf.linalg.LinearOperatorKronecker(
            [tf.linalg.LinearOperatorFullMatrix(self.A), tf.linalg.LinearOperatorFullMatrix(self.G)]
        ).to_dense()

    def rescaled(self, scales: tf.Tensor) -> KronBlock:
        root = tf.sqrt(scales)
        return KronBlock(self.A, root[:, None] * self.G * root[None, :], self.n)

    @classmethod
    def combine(cls, blocks: Sequence[KronBlock], weights) -> KronBlock:
        """The shared ``A``, ``G = sum_i weights_i G_i``."""
        first = blocks[0]
        return KronBlock(first.A, weighted_sum([b.G for b in blocks], weights, first.A.dtype),
                         first.n)

    def log_det_precision(self, c, prior, clip: bool = False) -> tf.Tensor:
        """Differentiable in ``A`` and ``G``: their eigenvalues are recomputed (always clipped
        at 0, whatever ``clip``), so cache nothing here and keep it to small models."""
        a = tf.linalg.eigvalsh(symmetric(self.A))
        g = tf.linalg.eigvalsh(symmetric(self.G))
        return tf.reduce_sum(tf.math.log(c * tf.maximum(a, 0)[:, None] * tf.maximum(g, 0)[None, :]
                                         + prior))

    def spectrum(self, max_order: int) -> np.ndarray:
        """``a_i g_j`` from the factors' eigenvalues (no ``max_order`` applies: the factors are
        no larger than the ones the posterior eigendecomposes anyway)."""
        a, g = (np.linalg.eigvalsh(np.asarray(f, np.float64)) for f in (self.A, self.G))
        return np.outer(a, g).ravel()

    def factorize(self, clip: bool = False) -> KronFactor:
        check_finite(self)
        return KronFactor(self, clip)

    @staticmethod
    def memory(din: int, dout: int) -> dict[str, int]:
        """Numbers a block ``[din, din] ⊗ [dout, dout]`` keeps (``curvature``: the factors) and
        its factor allocates: eigenvectors and eigenvalues of ``A`` and ``G``, eigenvalues of
        the precision."""
        factors = din * din + dout * dout
        return {"curvature": factors, "eigendecomposition": factors + din + dout + din * dout}


class KronCovariance(NamedTuple):
    """``Sigma = (Qa ⊗ Qg) diag(1 / vec(precision_eigenvalues)) (Qa ⊗ Qg)^T``.

    Its contraction needs the one layer's factored Jacobian: ``V[k, l] = sum_ij M_kij M_lij
    / eig_ij`` with ``M`` in the bases ``Qa``, ``Qg``
    (:func:`~laplace_tf.blocks.jacobian.factored_variance`).
    """

    Qa: tf.Tensor
    Qg: tf.Tensor
    precision_eigenvalues: tf.Tensor

    needs_one_factored_layer = True  # type: ignore[misc]  # a class constant in a NamedTuple

    def to_dense(self) -> tf.Tensor:
        return LinearOperatorKroneckerEigen(self.Qa, self.Qg, 1 / self.precision_eigenvalues
                                            ).to_dense()

    def diagonal(self) -> tf.Tensor:
        return LinearOperatorKroneckerEigen(self.Qa, self.Qg, 1 / self.precision_eigenvalues
                                            ).diag_part()

    def for_logits_diagonal(self, shape: tuple[int, int]) -> _ProjectedKron:
        return _ProjectedKron(
            self.Qa, tf.matmul(1.0 / self.precision_eigenvalues, self.Qg**2, transpose_b=True)
        )

    def contract(self, layers: Sequence[LayerJacobian], diagonal: bool) -> tf.Tensor:
        return factored_variance(
            layers[0], self.Qa, self.Qg, 1.0 / self.precision_eigenvalues, diagonal
        )


class _ProjectedKron(NamedTuple):
    """A last-layer Kronecker covariance for the diagonal: ``diag V = (b * b) @ R``,
    ``b = Qa^T a``, ``R[i, k] = sum_j Qg[k, j]^2 / eig[i, j]`` (``[din, K]``), computed once
    instead of ``K^2`` operations per input."""

    Qa: tf.Tensor
    R: tf.Tensor

    def for_logits_diagonal(self, shape: tuple[int, int]) -> _ProjectedKron:
        return self

    def contract(self, layers: Sequence[LayerJacobian], diagonal: bool) -> tf.Tensor:
        assert layers[0].a is not None, "a logits layer is factored"
        b = tf.matmul(layers[0].a[:, 0], self.Qa)
        return tf.matmul(b * b, self.R)


class KronFactor(Factor):
    """A :class:`KronBlock` ``A ⊗ G`` with both factors eigendecomposed (negative eigenvalues of
    ``A`` and ``G`` set to zero when ``clip``).

    Example:
        >>> import tensorflow as tf
        >>> A = tf.constant([[1.0, 0.0], [0.0, 2.0]], tf.float64)
        >>> G = tf.constant([[3.0]], tf.float64)
        >>> factor = KronFactor(KronBlock(A, G, tf.constant(1.0, tf.float64)))
        >>> factor.precision_eigenvalues(tf.constant(1.0, tf.float64), 1.0).numpy().tolist()
        [[4.0], [7.0]]
    """

    def __init__(self, block: KronBlock, clip: bool = False):
        a, self.Qa = eigh(symmetric(tf.convert_to_tensor(block.A)))
        g, self.Qg = eigh(symmetric(tf.convert_to_tensor(block.G)))
        self.size = int(a.shape[0]) * int(g.shape[0])
        self.n_eigenvalues = int(a.shape[0]) + int(g.shape[0])
        (neg_a, low_a), (neg_g, low_g) = negatives(a), negatives(g)
        self.n_negative, self.most_negative = neg_a + neg_g, min(low_a, low_g)
        if clip:
            a, g = tf.maximum(a, 0), tf.maximum(g, 0)
        self.a, self.g = a, g
        self.ag = a[:, None] * g[None, :]  # the eigenvalues of A ⊗ G, [din, dout]
        self.min_curvature_eigenvalue = tf.reduce_min(self.ag)

    def precision_eigenvalues(self, c, prior) -> tf.Tensor:
        """``E [din, dout]`` with ``E[i, j] = c a_i g_j + prior``."""
        if getattr(prior, "shape", tf.TensorShape([])).rank not in (0, None):
            raise ValueError(
                "prior_precision: a Kronecker block takes one prior precision (scalar or one "
                "per layer), not one per weight; use hessian_structure='diag' or 'full'."
            )
        return c * self.ag + prior

    def _operator(self, c, prior) -> LinearOperatorKroneckerEigen:
        return LinearOperatorKroneckerEigen(self.Qa, self.Qg, self.precision_eigenvalues(c, prior))

    def precision(self, c, prior):
        return self._operator(c, prior)

    def log_det(self, c, prior):
        return tf.reduce_sum(tf.math.log(self.precision_eigenvalues(c, prior)))

    def smallest_precision_eigenvalue(self, c, prior):
        return tf.reduce_min(self.precision_eigenvalues(c, prior))

    def covariance(self, c, prior):
        return KronCovariance(self.Qa, self.Qg, self.precision_eigenvalues(c, prior))

    def scale(self, c, prior):
        # the symmetric root (Qa ⊗ Qg) diag(E^-1/2) (Qa ⊗ Qg)^T: same law, same structure
        return self._operator(c, prior).power(-0.5)


@register_block
class PermutedKronBlock(NamedTuple):
    """``H = P^T (A ⊗ G) P``: a :class:`KronBlock` over the layer's weights taken in the order
    ``order`` (``(P theta)[i] = theta[order[i]]``), for a layer whose flat weight order is not
    its Kronecker order (a transposed convolution's kernel ``(k..., cout, cin)``: ``A`` is over
    ``(k..., cin)``). Everything but the layout is the :class:`KronBlock`'s.

    Example:
        >>> import tensorflow as tf
        >>> A, G = tf.constant([[1.0, 0.0], [0.0, 2.0]]), tf.constant([[1.0]])
        >>> block = PermutedKronBlock(A, G, tf.constant(1.0), tf.constant([1, 0]))
        >>> block.to_dense().numpy().tolist()
        [[2.0, 0.0], [0.0, 1.0]]
    """

    A: tf.Tensor
    G: tf.Tensor
    n: tf.Tensor
    order: tf.Tensor  # int32 [size]

    @property
    def kron(self) -> KronBlock:
        return KronBlock(self.A, self.G, self.n)

    @property
    def size(self) -> int:
        return self.kron.size

    def _with(self, block: KronBlock) -> PermutedKronBlock:
        return PermutedKronBlock(block.A, block.G, block.n, self.order)

    def add(self, other: PermutedKronBlock) -> PermutedKronBlock:
        check_same_type(self, other)
        return self._with(self.kron.add(other.kron))

    def scaled(self, factor) -> PermutedKronBlock:
        return self._with(self.kron.scaled(factor))

    def from_sum_form(self) -> PermutedKronBlock:
        return self._with(self.kron.from_sum_form())

    def to_dense(self) -> tf.Tensor:
        inverse = tf.math.invert_permutation(self.order)
        return tf.gather(tf.gather(self.kron.to_dense(), inverse, axis=0), inverse, axis=1)

    def rescaled(self, scales: tf.Tensor) -> PermutedKronBlock:
        """Refused: per-output noise rescales a last layer's block (a Dense layer's, never
        permuted); in the flat order of a permuted block it is no Kronecker product."""
        raise ValueError(
            "sigma_noise: a per-output noise rescales the curvature of a last Dense layer; "
            "a transposed convolution's Kronecker block cannot be rescaled per output. Use a "
            "scalar sigma_noise.")

    @classmethod
    def combine(cls, blocks: Sequence[PermutedKronBlock], weights) -> PermutedKronBlock:
        return blocks[0]._with(KronBlock.combine([b.kron for b in blocks], weights))

    def log_det_precision(self, c, prior, clip: bool = False) -> tf.Tensor:
        return self.kron.log_det_precision(c, prior)

    def spectrum(self, max_order: int) -> np.ndarray:
        return self.kron.spectrum(max_order)

    def factorize(self, clip: bool = False) -> PermutedKronFactor:
        check_finite(self.kron)
        return PermutedKronFactor(self, clip)

    @staticmethod
    def memory(din: int, dout: int) -> dict[str, int]:
        """As :meth:`KronBlock.memory`: the permutation costs no extra numbers."""
        return KronBlock.memory(din, dout)


class PermutedKronCovariance(NamedTuple):
    """A :class:`KronCovariance` over the weights in the order ``order``; it contracts the
    layer's explicit Jacobian (columns in the flat order)."""

    covariance: KronCovariance
    order: tf.Tensor

    needs_one_factored_layer = True  # type: ignore[misc]  # a class constant in a NamedTuple

    def to_dense(self) -> tf.Tensor:
        inverse = tf.math.invert_permutation(self.order)
        return tf.gather(tf.gather(self.covariance.to_dense(), inverse, axis=0), inverse, axis=1)

    def diagonal(self) -> tf.Tensor:
        return tf.gather(self.covariance.diagonal(), tf.math.invert_permutation(self.order))

    def for_logits_diagonal(self, shape: tuple[int, int]) -> PermutedKronCovariance:
        return self  # a layer with a permuted block is never the factored logits layer

    def contract(self, layers: Sequence[LayerJacobian], diagonal: bool) -> tf.Tensor:
        layer = layers[0]
        jacobian = tf.gather(layer.explicit(), self.order, axis=-1)
        return self.covariance.contract([layer._replace(a=None, g=None, jacobian=jacobian)],
                                        diagonal)


class PermutedKronFactor(KronFactor):
    """A :class:`PermutedKronBlock` eigendecomposed: the :class:`KronFactor` of ``A ⊗ G``, its
    operators taken as ``P^T op P``."""

    def __init__(self, block: PermutedKronBlock, clip: bool = False):
        super().__init__(block.kron, clip)
        self.order = block.order

    def _permuted(self, operator: tf.linalg.LinearOperator) -> tf.linalg.LinearOperator:
        P = tf.linalg.LinearOperatorPermutation(self.order, dtype=operator.dtype)
        return tf.linalg.LinearOperatorComposition(
            [P.adjoint(), operator, P], is_self_adjoint=True, is_positive_definite=True,
            is_non_singular=True, is_square=True)

    def precision(self, c, prior):
        return self._permuted(super().precision(c, prior))

    def covariance(self, c, prior):
        return PermutedKronCovariance(super().covariance(c, prior), self.order)

    def scale(self, c, prior):
        return self._permuted(super().scale(c, prior))
