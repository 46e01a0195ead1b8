"""The interface every curvature block type implements, and the registry of block types.

A curvature over ``P`` weights is a list of blocks covering consecutive slices of the flat
weight vector (block-diagonal across blocks). A block type is one module of this package
(:mod:`~laplace_tf.blocks.dense`, :mod:`~laplace_tf.blocks.kron`,
:mod:`~laplace_tf.blocks.diag`, :mod:`~laplace_tf.blocks.lowrank`) that owns three things:

* the block: a NamedTuple of curvature arrays (so it passes through ``tf.function`` and
  ``tf.nest``; its fields are also the arrays a saved posterior stores) with the methods of
  :class:`Block`: size, union of data sets, scaling, per-output noise rescaling, weighted
  sums, the log-determinant of ``c H + diag(prior)``, its spectrum, and :meth:`Block.factorize`;
* the :class:`Factor`: the block eigendecomposed once, giving the posterior precision,
  log-determinant, smallest eigenvalue, covariance and sampling scale for any ``c`` and prior;
* the covariance: a NamedTuple with the methods of :class:`Covariance`, its dense form and
  the functional-variance contraction ``J Sigma J^T`` of the Jacobian pieces
  (:mod:`laplace_tf.blocks.jacobian`) the predictive computes.

:data:`BLOCK_TYPES` maps a block class's name to the class (saved files name their blocks).

Example:
    >>> import tensorflow as tf
    >>> import laplace_tf.blocks as blocks
    >>> sorted(blocks.BLOCK_TYPES)
    ['DenseBlock', 'DiagBlock', 'KronBlock', 'LowRankBlock', 'PermutedKronBlock']
    >>> blocks.DiagBlock(tf.constant([1.0, 2.0])).scaled(3.0).diagonal.numpy().tolist()
    [3.0, 6.0]
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol, TypeVar

import numpy as np
import scipy.linalg
import tensorflow as tf
from threadpoolctl import ThreadpoolController

__all__ = ["BLOCK_TYPES", "Block", "Covariance", "Factor", "NotPositiveDefiniteError",
           "blocks_to_dense", "register_block"]

BLOCK_TYPES: dict[str, Any] = {}
"""Block class name -> block class (a NamedTuple class with the :class:`Block` methods, its
``_fields`` and ``memory``), for every registered block type."""

_BlockType = TypeVar("_BlockType", bound=type)


def register_block(cls: _BlockType) -> _BlockType:
    """Class decorator: add a block type to :data:`BLOCK_TYPES` under its class name."""
    BLOCK_TYPES[cls.__name__] = cls
    return cls


class Block(Protocol):
    """A curvature block ``H`` over ``size`` consecutive weights (``c``, ``prior``: tf scalars,
    ``prior`` also ``[size]`` where the block type allows).

    ``_fields``: the names of its arrays (a NamedTuple's), which are also its constructor's
    arguments and what a saved posterior stores. ``memory(*sizes)`` (a static method): the
    numbers (not bytes) a block of these sizes keeps (``"curvature"``) and its factor and
    covariance allocate, by part (:mod:`laplace_tf.curvature.memory`)."""

    @property
    def size(self) -> int:
        """Number of weights the block covers."""

    def add(self, other: Any) -> Any:
        """The block of the union of two data sets (``other`` of the same type)."""

    def scaled(self, factor) -> Any:
        """The block multiplied by a scalar."""

    def from_sum_form(self) -> Any:
        """The block from the form in which batches and workers add up (plain sums)."""

    def to_dense(self) -> tf.Tensor:
        """The block as a dense ``[size, size]`` matrix. For tests and small cases only."""

    def rescaled(self, scales: tf.Tensor) -> Any:
        """``S^1/2 H S^1/2``, ``S = I ⊗ diag(scales)`` for per-output scales ``[K]`` (outputs
        fastest in the flat order); differentiable in ``scales``."""

    @classmethod
    def combine(cls, blocks: Sequence[Any], weights) -> Any:
        """``sum_i weights_i blocks_i`` of blocks fitted on the same data."""

    def log_det_precision(self, c, prior, clip: bool = False) -> tf.Tensor:
        """``log det(c H + diag(prior))``, differentiable in the block, ``c`` and ``prior``;
        ``clip``: with the negative eigenvalues of ``H`` set to 0, as :meth:`factorize`."""

    def spectrum(self, max_order: int) -> np.ndarray | None:
        """The eigenvalues of ``H`` (float64), or None if that needs the eigendecomposition
        of a dense matrix of order above ``max_order``."""

    def factorize(self, clip: bool = False) -> Factor:
        """The posterior :class:`Factor` (negative eigenvalues clipped at 0 if ``clip``)."""


class NotPositiveDefiniteError(ValueError):
    """The posterior precision is not (numerically) positive definite at the settings asked
    for: a covariance or sample cannot be formed there."""


class Factor:
    """A curvature block factored once for the posterior ``c H + diag(prior)``.

    Attributes:
        size: number of weights the block covers.
        n_negative: curvature eigenvalues clearly below zero (before any clipping).
        n_eigenvalues: how many eigenvalues :attr:`n_negative` counts among.
        most_negative: the smallest curvature eigenvalue (before clipping), or 0.
        min_curvature_eigenvalue: the smallest eigenvalue of the block as used (after clipping).
    """

    size: int
    n_negative: int
    n_eigenvalues: int
    most_negative: float
    min_curvature_eigenvalue: tf.Tensor

    def precision(self, c, prior) -> tf.linalg.LinearOperator:
        """The precision block ``c H + diag(prior)``."""
        raise NotImplementedError

    def log_det(self, c, prior) -> tf.Tensor:
        """``log det(c H + diag(prior))``, differentiable in ``c`` and ``prior``."""
        raise NotImplementedError

    def smallest_precision_eigenvalue(self, c, prior) -> tf.Tensor:
        """The exact smallest eigenvalue of the precision block."""
        raise NotImplementedError

    def covariance(self, c, prior) -> Covariance:
        """The covariance block (inverse of the precision block)."""
        raise NotImplementedError

    def scale(self, c, prior) -> tf.linalg.LinearOperator:
        """An operator ``S`` with ``S S^T`` = the covariance block, structure kept."""
        raise NotImplementedError


class Covariance(Protocol):
    """A posterior covariance block ``Sigma``, for the predictive.

    ``needs_one_factored_layer``: the block's contraction needs the factored Jacobian of one
    layer with a Kronecker rule (a Kronecker block); else explicit Jacobians serve too."""

    needs_one_factored_layer: ClassVar[bool]

    def to_dense(self) -> tf.Tensor:
        """``Sigma`` as a dense ``[p, p]`` matrix (small cases only)."""

    def diagonal(self) -> tf.Tensor:
        """The marginal variances ``diag(Sigma)`` ``[p]``, without forming ``Sigma``."""

    def for_logits_diagonal(self, shape: tuple[int, int]) -> Any:
        """The block prepared for ``diag(J Sigma J^T)`` of a last-layer posterior whose one
        layer's (``shape = (din, K)``) pre-activation is the logits: work shared by all
        batches; its :meth:`contract` takes that layer's Jacobian only. A prepared block
        returns itself."""

    def contract(self, layers: Sequence[Any], diagonal: bool) -> tf.Tensor:
        """``J Sigma J^T`` ``[N, K, K]`` (``[N, K]`` if ``diagonal``) for the Jacobian pieces
        (:class:`~laplace_tf.blocks.jacobian.LayerJacobian`) of the block's layers."""


def blocks_to_dense(blocks: Sequence[Block]) -> tf.Tensor:
    """Block-diagonal dense matrix of a list of blocks. For tests and small cases only."""
    return tf.linalg.LinearOperatorBlockDiag(
        [tf.linalg.LinearOperatorFullMatrix(b.to_dense()) for b in blocks]
    ).to_dense()


def check_same_type(first, second) -> None:
    """Refuse to add blocks of two different types."""
    if type(first) is not type(second):
        raise ValueError(
            f"cannot add a {type(second).__name__} to a {type(first).__name__}; fit both with "
            "the same hessian_structure."
        )


def check_finite(block) -> None:
    """Refuse a block with NaN or Inf entries (no posterior exists then)."""
    if not all(bool(tf.reduce_all(tf.math.is_finite(part))) for part in block):
        raise ValueError(
            "curvature: the fitted curvature has NaN or Inf entries, so there is no posterior. "
            "The model's weights or its outputs on the data are not finite (a diverged "
            "training run?); check np.isfinite on model.get_weights() and on its predictions."
        )


def symmetric(matrix: tf.Tensor) -> tf.Tensor:
    """``(M + M^T) / 2``."""
    return 0.5 * (matrix + tf.linalg.matrix_transpose(matrix))


def eigh(matrix: tf.Tensor, vectors: bool = True):
    """Ascending eigenvalues (and eigenvectors if ``vectors``) of a symmetric matrix.

    LAPACK's divide and conquer (scipy, ``driver="evd"``) on ONE OpenBLAS thread. Measured on 2
    shared cores (load 3-5), float32, P = 3,500, seconds of 3 runs: eigenvalues only, one
    thread 1.8-2.1, two threads 4.7-5.3, ``tf.linalg.eigvalsh`` 3.4-4.2; with eigenvectors, one
    thread 4.4-8.3, two threads 17-30, ``driver="evr"`` one thread 28-32, ``tf.linalg.eigh``
    10-27 (a Cholesky factorisation: 0.3-0.6). OpenBLAS's threads wait for each other by
    spinning, which collapses when the cores are shared: hence the erratic 2-35 s of the
    default threading, and one thread is both faster and steady there.

    Eigenvalues only (what tuning needs) is the same work for every driver (``sytrd`` to
    tridiagonal form, 4/3 P^3 flops, half of it matrix-vector bound, then ``sterf``): their
    times differ by noise. Two threads win on an idle machine but took 19-23 s once TensorFlow
    had run ops in the process (P = 3,466, float32; benchmarks/README.md), so one thread stays.
    """
    with _blas_threads().limit(limits=1, user_api="blas"):
        result = scipy.linalg.eigh(matrix.numpy(), eigvals_only=not vectors, driver="evd",
                                   check_finite=False)
    return tuple(map(tf.constant, result)) if vectors else tf.constant(result)


@functools.cache
def _blas_threads() -> ThreadpoolController:
    """The BLAS thread pools, found once (a search costs milliseconds, a limit 0.1 ms)."""
    return ThreadpoolController()


def negatives(eigenvalues: tf.Tensor) -> tuple[int, float]:
    """How many eigenvalues are below round-off (``-n eps max|e|``), and the smallest one."""
    values = eigenvalues.numpy()
    eps = np.finfo(values.dtype).eps
    tol = values.size * eps * float(np.max(np.abs(values), initial=0.0))
    return int(np.sum(values < -tol)), float(np.min(values, initial=0.0))


def per_weight(scales: tf.Tensor, size: int) -> tf.Tensor:
    """Per-output ``scales [K]`` over a block's flat weights (outputs fastest): ``[size]``."""
    return tf.tile(scales, [size // int(scales.shape[0])])


def weighted_sum(parts: Sequence[tf.Tensor], weights, dtype: tf.DType) -> tf.Tensor:
    """``sum_i weights_i parts_i`` in ``dtype``, differentiable in ``weights``."""
    return tf.add_n([w * tf.cast(part, dtype) for w, part in
                     zip(tf.unstack(tf.cast(weights, dtype)), parts, strict=True)])
