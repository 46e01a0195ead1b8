"""Posterior structures: how factored curvature blocks become one distribution over weights.

A structure (``"full"``, ``"kron"``, ``"diag"``, ``"lowrank"``, ``"gp"``) says which curvature
blocks it accepts, which prior shapes it supports, and which TensorFlow Probability
distribution represents the posterior ``N(mean, (c H + diag(lambda))^-1)``:

* full -> ``tfd.MultivariateNormalTriL``, ``scale_tril`` a lower-triangular root of the
  covariance from one Cholesky factorisation of the precision and a triangular solve
  (:class:`~laplace_tf.blocks.dense.DenseFactor`; never a naive inverse);
* kron -> :class:`StructuredNormal` (a ``tfd.MultivariateNormalLinearOperator`` whose
  variances come from the blocks) whose scale is block-diagonal over layers, each block
  :class:`~laplace_tf.blocks.kron_operator.LinearOperatorKroneckerEigen` (or diagonal for
  layers without a Kronecker rule, or a small dense block for a scale-and-shift layer): no
  dense ``P x P`` matrix;
* diag -> ``tfd.MultivariateNormalDiag``;
* lowrank, gp -> :class:`StructuredNormal` whose scale is the low-rank
  factor's (:meth:`~laplace_tf.blocks.lowrank.LowRankFactor.scale`: a diagonal times a
  low-rank update of the identity), over the top eigenpairs of the GGN (lowrank) or the GGN
  of the context examples (gp): no dense ``P x P`` matrix.

The precision operator is block-diagonal over curvature blocks in every case. The block
types and their algebra are :mod:`laplace_tf.blocks`; a structure only names the block types
it accepts (:attr:`Structure.blocks`).

Example:
    >>> import tensorflow as tf
    >>> from laplace_tf.blocks import DiagBlock
    >>> factors = [DiagBlock(tf.constant([3.0, 8.0], tf.float64)).factorize()]
    >>> one = tf.constant(1.0, tf.float64)
    >>> dist = STRUCTURES["diag"].distribution(tf.zeros(2, tf.float64), factors, one, [one])
    >>> dist.stddev().numpy().tolist()          # 1 / sqrt(h + 1)
    [0.5, 0.3333333333333333]
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf
import tensorflow_probability as tfp

from laplace_tf.blocks import (
    DenseBlock,
    DiagBlock,
    Factor,
    KronBlock,
    LowRankBlock,
    PermutedKronBlock,
)
from laplace_tf.curvature.base import Curvature
from laplace_tf.posterior.prior import PRIOR_STRUCTURES

tfd = tfp.distributions

_PD = dict(is_self_adjoint=True, is_positive_definite=True, is_non_singular=True, is_square=True)


def block_diagonal(operators: Sequence[tf.linalg.LinearOperator], **hints) -> tf.linalg.LinearOperator:
    """One operator, or the block-diagonal operator of several."""
    if len(operators) == 1:
        return operators[0]
    return tf.linalg.LinearOperatorBlockDiag(list(operators), **hints)


def precision_operator(factors: Sequence[Factor], c, priors) -> tf.linalg.LinearOperator:
    """The posterior precision ``c H + diag(lambda)``, block-diagonal over curvature blocks."""
    return block_diagonal([f.precision(c, p) for f, p in zip(factors, priors, strict=True)], **_PD)


class StructuredNormal(tfd.MultivariateNormalLinearOperator):  # type: ignore[name-defined]
    """``tfd.MultivariateNormalLinearOperator`` whose ``variance()`` and ``stddev()`` come from
    the covariance blocks' diagonals (TFP's would form ``scale @ scale^T``: a dense ``P x P``).

    Args:
        loc: the mean ``[P]``.
        scale: an operator ``S`` with ``S S^T`` the covariance.
        marginal_variance: ``diag(S S^T)`` ``[P]``.

    Example:
        >>> import tensorflow as tf
        >>> scale = tf.linalg.LinearOperatorDiag(tf.constant([2.0, 3.0], tf.float64))
        >>> StructuredNormal(tf.zeros(2, tf.float64), scale,
        ...                  tf.constant([4.0, 9.0], tf.float64)).stddev().numpy().tolist()
        [2.0, 3.0]
    """

    def __init__(self, loc, scale, marginal_variance, validate_args=False,
                 allow_nan_stats=True, name="StructuredNormal"):
        parameters = dict(locals())
        super().__init__(loc=loc, scale=scale, validate_args=validate_args,
                         allow_nan_stats=allow_nan_stats, name=name)
        self._parameters = parameters
        self._marginal_variance = tf.convert_to_tensor(marginal_variance, dtype=self.dtype)

    @classmethod
    def _parameter_properties(cls, dtype, num_classes=None):
        return dict(super()._parameter_properties(dtype, num_classes),
                    marginal_variance=tfp.util.ParameterProperties(event_ndims=1))

    def _variance(self):
        return self._marginal_variance + tf.zeros_like(self.loc)

    def _stddev(self):
        return tf.sqrt(self._variance())


def _structured_normal(mean, factors, c, priors) -> StructuredNormal:
    """The posterior over ``factors`` with their scales, and variances from their covariances."""
    pairs = list(zip(factors, priors, strict=True))
    scales = [f.scale(c, p) for f, p in pairs]
    # a dense block's scale is its covariance's Cholesky factor, not self-adjoint
    hints = _PD if all(s.is_self_adjoint for s in scales) else \
        dict(is_non_singular=True, is_square=True)
    variance = tf.concat([tf.cast(f.covariance(c, p).diagonal(), mean.dtype) for f, p in pairs], 0)
    return StructuredNormal(mean, block_diagonal(scales, **hints), variance)


class Structure:
    """A posterior structure: accepted blocks, prior shapes, and the distribution it builds."""

    name: str = ""
    blocks: tuple[type, ...] = ()
    prior_structures: tuple[str, ...] = PRIOR_STRUCTURES
    per_output_noise: bool = True
    """Whether a per-output ``sigma_noise`` ``[K]`` is possible (else a scalar only)."""

    def check(self, curvature: Curvature) -> None:
        """Raise unless every block of ``curvature`` fits this structure."""
        bad = [type(b).__name__ for b in curvature.blocks if type(b) not in self.blocks]
        if bad:
            raise ValueError(
                f"curvature: hessian_structure={self.name!r} takes "
                f"{[b.__name__ for b in self.blocks]} blocks; got {bad}. Fit the curvature "
                "with the same hessian_structure."
            )

    def distribution(self, mean: tf.Tensor, factors: Sequence[Factor], c, priors):
        """The posterior ``N(mean, (c H + diag(prior))^-1)`` as a TFP distribution."""
        raise NotImplementedError


class FullStructure(Structure):
    name = "full"
    blocks = (DenseBlock,)

    def distribution(self, mean, factors, c, priors):
        trils = [f.scale(c, p) for f, p in zip(factors, priors, strict=True)]
        return tfd.MultivariateNormalTriL(loc=mean, scale_tril=block_diagonal(trils).to_dense())


class KronStructure(Structure):
    name = "kron"
    blocks = (KronBlock, PermutedKronBlock, DenseBlock, DiagBlock)  # dense: scale-and-shift
    prior_structures = ("scalar", "layerwise")

    def distribution(self, mean, factors, c, priors):
        return _structured_normal(mean, factors, c, priors)


class DiagStructure(Structure):
    name = "diag"
    blocks = (DiagBlock,)

    def distribution(self, mean, factors, c, priors):
        precision = [f.precision(c, p).diag_part() for f, p in zip(factors, priors, strict=True)]
        return tfd.MultivariateNormalDiag(loc=mean, scale_diag=tf.math.rsqrt(tf.concat(precision, 0)))


class LowRankStructure(Structure):
    """A low-rank curvature ``H = R^T R`` (the top eigenpairs of the GGN)."""

    name = "lowrank"
    blocks = (LowRankBlock,)
    per_output_noise = False  # H = R^T R cannot be split into per-output curvatures

    def distribution(self, mean, factors, c, priors):
        return _structured_normal(mean, factors, c, priors)


class GPStructure(LowRankStructure):
    """The functional (GP) Laplace: the GGN over context examples, ``H = R^T R``."""

    name = "gp"


STRUCTURES: dict[str, Structure] = {s.name: s for s in (
    FullStructure(), KronStructure(), DiagStructure(), LowRankStructure(), GPStructure())}
