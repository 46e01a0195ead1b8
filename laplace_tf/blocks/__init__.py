"""Curvature blocks and their algebra, one module per block type (below curvature: it imports
only TensorFlow, NumPy, SciPy).

See :mod:`laplace_tf.blocks.base` for the interface a block type implements and the registry
:data:`BLOCK_TYPES`; :mod:`~laplace_tf.blocks.dense`, :mod:`~laplace_tf.blocks.kron` and
:mod:`~laplace_tf.blocks.diag` and :mod:`~laplace_tf.blocks.lowrank` implement it.
"""

from laplace_tf.blocks.base import (
    BLOCK_TYPES,
    Block,
    Covariance,
    Factor,
    NotPositiveDefiniteError,
    blocks_to_dense,
)
from laplace_tf.blocks.dense import DenseBlock, DenseCovariance, DenseFactor
from laplace_tf.blocks.diag import DiagBlock, DiagCovariance, DiagFactor
from laplace_tf.blocks.jacobian import LayerJacobian
from laplace_tf.blocks.kron import (
    KronBlock,
    KronCovariance,
    KronFactor,
    PermutedKronBlock,
    PermutedKronCovariance,
    PermutedKronFactor,
)
from laplace_tf.blocks.kron_operator import LinearOperatorKroneckerEigen
from laplace_tf.blocks.lowrank import LowRankBlock, LowRankCovariance, LowRankFactor

__all__ = [
    "BLOCK_TYPES", "Block", "Covariance", "DenseBlock", "DenseCovariance", "DenseFactor",
    "DiagBlock", "DiagCovariance", "DiagFactor", "Factor", "KronBlock", "KronCovariance",
    "KronFactor", "LayerJacobian", "LinearOperatorKroneckerEigen", "LowRankBlock",
    "LowRankCovariance", "LowRankFactor", "NotPositiveDefiniteError", "PermutedKronBlock",
    "PermutedKronCovariance", "PermutedKronFactor", "blocks_to_dense",
]
