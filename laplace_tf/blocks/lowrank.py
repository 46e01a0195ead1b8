"""The low-rank block ``H = R^T R`` (root ``R [r, p]``): low-rank and functional (GP) posteriors.

A root ``R`` with few rows ``r << p`` keeps a curvature of rank at most ``r`` in ``r p``
numbers: the top-``k`` eigenpairs of a GGN (``R = sqrt(s) U^T``, :meth:`LowRankBlock.from_eigen`)
or the GGN over a set of context points (``R`` = their rows ``L_n^T J_n``). With a diagonal
prior ``D`` the precision is a low-rank update ``D + c R^T R`` and everything follows from the
small ``[r, r]`` Gram matrix ``R R^T`` (Woodbury), never a ``p x p`` matrix:

* ``log det(D + c R^T R) = log det D + log det(I + c R D^-1 R^T)``;
* ``Sigma = D^-1 - B B^T`` with ``B = D^-1 W chol(I + W^T D^-1 W)^-T``, ``W = sqrt(c) R^T``;
* ``J Sigma J^T = J D^-1 J^T - (J B)(J B)^T``: with ``R`` the context rows this is the GP
  predictive with kernel ``J(x) D^-1 J(x')^T`` (Immer et al. 2021).

Example:
    A rank-one curvature on two weights, ``H = [[1, 2], [2, 4]]``:

    >>> import tensorflow as tf
    >>> block = LowRankBlock(tf.constant([[1.0, 2.0]], tf.float64))
    >>> one = tf.constant(1.0, tf.float64)
    >>> round(float(block.log_det_precision(one, one)), 12)   # det(H + I) = 1 + |R|^2 = 6
    1.791759469228
    >>> cov = block.factorize().covariance(one, one).to_dense().numpy()
    >>> (cov * 6).round(12).tolist()                    # (H + I)^-1
    [[5.0, -2.0], [-2.0, 2.0]]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import scipy.linalg
import tensorflow as tf

from laplace_tf.blocks.base import (
    Factor,
    check_finite,
    check_same_type,
    per_weight,
    register_block,
)
from laplace_tf.blocks.jacobian import LayerJacobian, factored_variance, weighted_gram

__all__ = ["LowRankBlock", "LowRankCovariance", "LowRankFactor"]

_PD = dict(is_self_adjoint=True, is_positive_definite=True, is_non_singular=True, is_square=True)


def compressed_root(root: tf.Tensor) -> tf.Tensor:
    """``root [r, p]``, or for ``r > p`` the triangular ``R' [p, p]`` of its QR decomposition
    (in float64): the same curvature ``R'^T R' = root^T root``, whose factor then costs
    ``O(p^3)`` instead of ``O(r^3)``.

    Example:
        >>> root = tf.constant(np.random.default_rng(0).normal(size=(5, 2)))
        >>> small = compressed_root(root)
        >>> small.shape, bool(np.allclose(tf.transpose(small) @ small, tf.transpose(root) @ root))
        (TensorShape([2, 2]), True)
    """
    if root.shape[0] is None or root.shape[0] <= root.shape[1]:
        return root
    return tf.cast(tf.linalg.qr(tf.cast(root, tf.float64))[1], root.dtype)


@register_block
class LowRankBlock(NamedTuple):
    """``H = root^T root`` with ``root [r, p]``.

    Example:
        >>> import tensorflow as tf
        >>> U = tf.constant([[0.6], [0.8]], tf.float64)          # one unit eigenvector
        >>> block = LowRankBlock.from_eigen(U, tf.constant([25.0], tf.float64))
        >>> block.to_dense().numpy().round(12).tolist()           # 25 U U^T
        [[9.0, 12.0], [12.0, 16.0]]
        >>> block.spectrum(10).round(12).tolist()                 # p eigenvalues, ascending
        [0.0, 25.0]
    """

    root: tf.Tensor

    @classmethod
    def from_eigen(cls, basis: tf.Tensor, eigenvalues: tf.Tensor) -> LowRankBlock:
        """``H = basis diag(eigenvalues) basis^T`` (``basis [p, k]`` orthonormal columns,
        ``eigenvalues [k]`` non-negative)."""
        return cls(tf.sqrt(eigenvalues)[:, None] * tf.transpose(basis))

    @property
    def size(self) -> int:
        return int(self.root.shape[1])

    @property
    def rank(self) -> int:
        """Rows of the root: an upper bound of the rank of ``H``."""
        return int(self.root.shape[0])

    def add(self, other: LowRankBlock) -> LowRankBlock:
        """The union of two data sets: roots stacked (exact; the rank grows), at most ``p``
        rows (:func:`compressed_root`)."""
        check_same_type(self, other)
        return LowRankBlock(compressed_root(tf.concat([self.root, other.root], axis=0)))

    def scaled(self, factor) -> LowRankBlock:
        return LowRankBlock(self.root * tf.sqrt(tf.cast(factor, self.root.dtype)))

    def from_sum_form(self) -> LowRankBlock:
        return self

    def to_dense(self) -> tf.Tensor:
        return tf.matmul(self.root, self.root, transpose_a=True)

    def rescaled(self, scales: tf.Tensor) -> LowRankBlock:
        """``S^1/2 H S^1/2`` with ``S`` the per-output ``scales [K]`` over the weights."""
        return LowRankBlock(self.root * tf.sqrt(per_weight(scales, self.size)))

    @classmethod
    def combine(cls, blocks: Sequence[LowRankBlock], weights) -> LowRankBlock:
        """``sum_i weights_i H_i`` for non-negative weights (roots scaled and stacked)."""
        weights = tf.cast(weights, blocks[0].root.dtype)
        if tf.executing_eagerly() and bool(tf.reduce_any(weights < 0)):
            raise ValueError(
                "sigma_noise: a low-rank curvature H = R^T R cannot be rebuilt for another "
                "per-output sigma_noise (that needs a difference of curvatures); fit with a "
                "scalar sigma_noise, or use hessian_structure='full'."
            )
        return cls(tf.concat([tf.sqrt(w) * b.root for w, b in
                              zip(tf.unstack(weights), blocks, strict=True)], axis=0))

    def log_det_precision(self, c, prior, clip: bool = False) -> tf.Tensor:
        """``log det D + log det(I + c R D^-1 R^T)``, differentiable in ``c`` and ``prior``
        (``H = R^T R`` has no negative eigenvalues to clip)."""
        inverse_prior = 1.0 / prior * tf.ones([self.size], self.root.dtype)
        inner = tf.eye(self.rank, dtype=self.root.dtype) + c * tf.matmul(
            self.root * inverse_prior, self.root, transpose_b=True)
        chol = tf.linalg.cholesky(inner)
        return (2.0 * tf.reduce_sum(tf.math.log(tf.linalg.diag_part(chol)))
                - tf.reduce_sum(tf.math.log(inverse_prior)))

    def spectrum(self, max_order: int) -> np.ndarray:
        """All ``p`` eigenvalues: those of ``R R^T`` and ``p - r`` zeros."""
        eigenvalues = _gram_eigenvalues(self.root)
        return np.concatenate([np.zeros(max(self.size - eigenvalues.size, 0)),
                               eigenvalues[-self.size:]])

    def factorize(self, clip: bool = False) -> LowRankFactor:
        check_finite(self)
        return LowRankFactor(self)

    @staticmethod
    def memory(size: int, rank: int) -> dict[str, int]:
        """Numbers a root of ``rank`` rows over ``size`` weights keeps (``curvature``) and its
        factor (the orthonormal basis) and covariance (variances and the downdate) allocate."""
        return {"curvature": rank * size, "factor": rank * size + rank * rank,
                "covariance": rank * size + size}


def _gram_eigenvalues(root) -> np.ndarray:
    """Ascending eigenvalues of ``R R^T`` (float64), round-off negatives set to zero."""
    root = np.asarray(root, np.float64)
    return np.maximum(scipy.linalg.eigh(root @ root.T, eigvals_only=True), 0.0)


class LowRankCovariance(NamedTuple):
    """``Sigma = diag(variance [p]) - downdate downdate^T`` (``downdate [p, r]``), held in
    float64 whatever the model's dtype: a functional variance is the small difference of two
    terms of about ``|J|^2 / prior`` each, which float32 loses (negative variances on a weak
    prior); :meth:`contract` returns the dtype of the Jacobians it is given."""

    variance: tf.Tensor
    downdate: tf.Tensor

    needs_one_factored_layer = False  # type: ignore[misc]  # a class constant in a NamedTuple

    def to_dense(self) -> tf.Tensor:
        return tf.linalg.diag(self.variance) - tf.matmul(self.downdate, self.downdate,
                                                         transpose_b=True)

    def diagonal(self) -> tf.Tensor:
        return self.variance - tf.reduce_sum(tf.square(self.downdate), axis=-1)

    def for_logits_diagonal(self, shape: tuple[int, int]) -> LowRankCovariance:
        return self

    def contract(self, layers: Sequence[LayerJacobian], diagonal: bool) -> tf.Tensor:
        """``J diag(v) J^T - (J B)(J B)^T``, layer by layer (factored layers stay factored), in
        float64."""
        dtype = next(t.dtype for layer in layers for t in (layer.a, layer.jacobian)
                     if t is not None)
        layers = [layer._replace(**{name: tf.cast(getattr(layer, name), tf.float64)
                                    for name in ("a", "g", "jacobian")
                                    if getattr(layer, name) is not None})
                  for layer in layers]
        prior_parts, projections = [], []
        for layer in layers:
            end = layer.start + layer.size
            variance, downdate = self.variance[layer.start:end], self.downdate[layer.start:end]
            if layer.a is None:
                term = weighted_gram(layer.jacobian, variance, diagonal)
                jb = tf.einsum("nkp,pr->nkr", layer.jacobian, downdate)
            else:
                term = factored_variance(layer, None, None, tf.reshape(variance, layer.shape),
                                         diagonal)
                din, dout = layer.shape
                b = tf.reshape(downdate, [din, dout, -1])
                if layer.g is None:  # pre-activation = logits: J_k = a ⊗ e_k
                    jb = tf.einsum("ni,ikr->nkr", layer.a[:, 0], b)
                else:
                    jb = tf.einsum("nti,ntkj,ijr->nkr", layer.a, layer.g, b)
            prior_parts.append(term)
            projections.append(jb)
        prior_part, projected = tf.add_n(prior_parts), tf.add_n(projections)
        if diagonal:
            return tf.cast(prior_part - tf.reduce_sum(projected * projected, axis=-1), dtype)
        return tf.cast(prior_part - tf.matmul(projected, projected, transpose_b=True), dtype)


class LowRankFactor(Factor):
    """A :class:`LowRankBlock` as ``H = U diag(e) U^T``: the nonzero eigenvalues ``e [r']`` of
    ``R R^T`` and the orthonormal ``U = R^T V e^-1/2 [p, r']``. Eigenvalues below round-off
    (``r eps max e``) are dropped with their directions: ``H`` is positive semi-definite by
    construction, so there is nothing to clip."""

    def __init__(self, block: LowRankBlock):
        root = tf.convert_to_tensor(block.root)
        dtype = root.dtype
        gram = np.asarray(root, np.float64) @ np.asarray(root, np.float64).T
        eigenvalues, vectors = scipy.linalg.eigh(gram)
        keep = eigenvalues > max(gram.shape[0], 1) * np.finfo(np.float64).eps * max(
            float(eigenvalues[-1]) if eigenvalues.size else 0.0, 0.0)
        eigenvalues, vectors = eigenvalues[keep], vectors[:, keep]
        self.dtype = dtype
        # e and U kept in float64, where the covariance is formed (LowRankCovariance)
        self._eigenvalues64 = tf.constant(eigenvalues)
        self._basis64 = tf.constant(np.asarray(root, np.float64).T @ (vectors / np.sqrt(eigenvalues)))
        self.size = block.size
        self.n_eigenvalues = self.size
        self.n_negative, self.most_negative = 0, 0.0
        full_rank = eigenvalues.size == self.size
        self.min_curvature_eigenvalue = (self.eigenvalues[0] if full_rank
                                         else tf.constant(0.0, dtype))

    @property
    def eigenvalues(self) -> tf.Tensor:
        """The nonzero eigenvalues ``e`` of ``H``, in the model's dtype."""
        return tf.cast(self._eigenvalues64, self.dtype)

    @property
    def basis(self) -> tf.Tensor:
        """The orthonormal ``U [p, r']``, in the model's dtype."""
        return tf.cast(self._basis64, self.dtype)

    def _scaled_basis(self, c, prior):
        """``W = U sqrt(c e)`` and the per-weight prior ``d [p]``."""
        d = prior * tf.ones([self.size], self.basis.dtype)
        return self.basis * tf.sqrt(c * self.eigenvalues), d

    def precision(self, c, prior):
        return tf.linalg.LinearOperatorLowRankUpdate(
            tf.linalg.LinearOperatorDiag(prior * tf.ones([self.size], self.basis.dtype), **_PD), self.basis, diag_update=c * self.eigenvalues,
            is_diag_update_positive=True, **_PD,
        )

    def log_det(self, c, prior):
        if prior.shape.rank == 0:
            return (tf.reduce_sum(tf.math.log(c * self.eigenvalues + prior))
                    + (self.size - int(self.eigenvalues.shape[0])) * tf.math.log(prior))
        w, d = self._scaled_basis(c, prior)
        return tf.reduce_sum(tf.math.log(d)) + 2.0 * tf.reduce_sum(tf.math.log(
            tf.linalg.diag_part(tf.linalg.cholesky(self._inner(w, d)))))

    def _inner(self, w, d) -> tf.Tensor:
        """``I + W^T D^-1 W [r', r']``."""
        rank = int(self.eigenvalues.shape[0])
        return tf.eye(rank, dtype=w.dtype) + tf.matmul(w / d[:, None], w, transpose_a=True)

    def smallest_precision_eigenvalue(self, c, prior):
        if prior.shape.rank == 0:
            return c * self.min_curvature_eigenvalue + prior
        # a per-weight prior mixes the directions: the dense matrix (small cases only; a
        # positive prior already bounds this from below, so fits never get here)
        return tf.reduce_min(tf.linalg.eigvalsh(self.precision(c, prior).to_dense()))

    def covariance(self, c, prior):
        c, prior = tf.cast(c, tf.float64), tf.cast(prior, tf.float64)
        d = prior * tf.ones([self.size], tf.float64)
        w = self._basis64 * tf.sqrt(c * self._eigenvalues64)
        chol = tf.linalg.cholesky(self._inner(w, d))
        downdate = tf.transpose(tf.linalg.triangular_solve(chol, tf.transpose(w / d[:, None])))
        return LowRankCovariance(1.0 / d, downdate)

    def scale(self, c, prior):
        """``D^-1/2 (I - Q diag(1 - (1 + s^2)^-1/2) Q^T)`` from the thin SVD ``Q S`` of
        ``D^-1/2 W``: its square is ``D^-1/2 (I + D^-1/2 W W^T D^-1/2)^-1 D^-1/2``."""
        w, d = self._scaled_basis(c, prior)
        if prior.shape.rank == 0:  # D^-1/2 W = U sqrt(c e / prior): already orthogonal
            s, q = tf.sqrt(c * self.eigenvalues / prior), self.basis
        else:
            s, q, _ = tf.linalg.svd(w / tf.sqrt(d)[:, None])
        shrink = tf.linalg.LinearOperatorLowRankUpdate(
            tf.linalg.LinearOperatorIdentity(self.size, dtype=w.dtype), q,
            diag_update=tf.math.rsqrt(1.0 + s * s) - 1.0, is_diag_update_positive=False,
            is_self_adjoint=True, is_non_singular=True, is_square=True,
        )
        return tf.linalg.LinearOperatorComposition(
            [tf.linalg.LinearOperatorDiag(tf.math.rsqrt(d), **_PD), shrink],
            is_non_singular=True, is_square=True,
        )
