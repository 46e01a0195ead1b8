"""Curvature blocks: the pieces a curvature is made of, in parameter order.

A curvature over ``P`` weights is a list of blocks covering consecutive slices of the flat
weight vector (block-diagonal across blocks). Three kinds:

* :class:`DenseBlock` ``matrix [p, p]``;
* :class:`KronBlock` ``A ⊗ G`` with ``A [din, din]`` over a layer's inputs (the constant 1 for
  the bias appended last) and ``G [dout, dout]`` over its outputs. ``A`` is the MEAN of
  ``a a^T`` over the ``n`` rows it was built from, ``G`` a SUM over data, so batches combine
  exactly: ``A = (n1 A1 + n2 A2) / (n1 + n2)``, ``G = G1 + G2``;
* :class:`DiagBlock` ``diagonal [p]``.

Blocks are NamedTuples so that they pass through ``tf.function`` and ``tf.nest``.

Example:
    >>> import tensorflow as tf
    >>> block = KronBlock(tf.eye(2), 3.0 * tf.eye(2), tf.constant(1.0))
    >>> to_dense(block).numpy().diagonal().tolist()
    [3.0, 3.0, 3.0, 3.0]
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf


class DenseBlock(NamedTuple):
    matrix: tf.Tensor


class KronBlock(NamedTuple):
    A: tf.Tensor
    G: tf.Tensor
    n: tf.Tensor


class DiagBlock(NamedTuple):
    diagonal: tf.Tensor


Block = DenseBlock | KronBlock | DiagBlock


def block_size(block: Block) -> int:
    """Number of weights the block covers."""
    if isinstance(block, DenseBlock):
        return int(block.matrix.shape[0])
    if isinstance(block, KronBlock):
        return int(block.A.shape[0]) * int(block.G.shape[0])
    return int(block.diagonal.shape[0])


def add_blocks(first: Block, second: Block) -> Block:
    """The curvature of the union of two data sets, block by block."""
    if type(first) is not type(second):
        raise ValueError(
            f"cannot add a {type(second).__name__} to a {type(first).__name__}; fit both with "
            "the same hessian_structure."
        )
    if isinstance(first, KronBlock):
        n = first.n + second.n
        A = (first.n * first.A + second.n * second.A) / n
        return KronBlock(A, first.G + second.G, n)
    return type(first)(*(a + b for a, b in zip(first, second, strict=True)))


def scale_block(block: Block, factor) -> Block:
    """The block multiplied by a scalar (Kronecker: ``G`` carries the factor)."""
    if isinstance(block, KronBlock):
        return KronBlock(block.A, block.G * factor, block.n)
    return type(block)(block[0] * factor)


def from_sum_form(block: Block) -> Block:
    """The block with Kronecker ``A`` a mean, from ``A`` a plain sum over data (the form in which
    batches and workers add up)."""
    return KronBlock(block.A / block.n, block.G, block.n) if isinstance(block, KronBlock) else block


def to_dense(block: Block) -> tf.Tensor:
    """The block as a dense ``[p, p]`` matrix. For tests and small cases only."""
    if isinstance(block, DenseBlock):
        return block.matrix
    if isinstance(block, KronBlock):
        return tf.linalg.LinearOperatorKronecker(
            [tf.linalg.LinearOperatorFullMatrix(block.A), tf.linalg.LinearOperatorFullMatrix(block.G)]
        ).to_dense()
    return tf.linalg.diag(block.diagonal)


def blocks_to_dense(blocks: list[Block]) -> tf.Tensor:
    """Block-diagonal dense matrix of a list of blocks. For tests and small cases only."""
    return tf.linalg.LinearOperatorBlockDiag(
        [tf.linalg.LinearOperatorFullMatrix(to_dense(b)) for b in blocks]
    ).to_dense()
