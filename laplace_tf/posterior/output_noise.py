"""A per-output regression noise ``sigma [K]``: the curvature at a new ``sigma``.

With a Gaussian likelihood the output Hessian is ``Lambda = diag(1 / sigma_k^2)``. Over the
last layer's weights (``J_n = a~_n^T ⊗ I_K``, outputs fastest in the flat order) the GGN (= the
exact Hessian) is ``sum_n a~_n a~_n^T ⊗ Lambda`` and the EF ``sum_n a~_n a~_n^T ⊗ r_n r_n^T``
with ``r_nk = res_nk / sigma_k^2``. A new ``sigma`` therefore scales output ``k``'s rows and
columns by ``sqrt(s_k)``, ``s_k = (sigma_fit_k / sigma_k)^p`` (``p = 2``, EF: ``p = 4``)::

    H(sigma) = S^1/2 H(sigma_fit) S^1/2,    S = I ⊗ diag(s)

exactly, for every structure (Kronecker: ``G -> diag(s)^1/2 G diag(s)^1/2``; diagonal:
``d -> s ⊙ d``). Over all weights ``J_n`` mixes the outputs and no such rescaling exists, but
the GGN (and the exact Hessian) is still a sum over outputs, ``H(sigma) = sum_k H_k / sigma_k^2``
with ``H_k`` output ``k``'s curvature at unit noise: given the ``H_k``, :func:`from_pieces`
rebuilds it (Kronecker blocks share ``A``; only ``G`` combines). The EF
``sum_n J_n^T r_n r_n^T J_n`` has cross terms ``k != l`` and is no such sum.

Example:
    >>> import tensorflow as tf
    >>> from laplace_tf.curvature.blocks import DiagBlock
    >>> block = DiagBlock(tf.constant([1.0, 1.0, 2.0, 2.0], tf.float64))   # 2 inputs, K = 2
    >>> rescaled_block(block, tf.constant([4.0, 0.25], tf.float64)).diagonal.numpy().tolist()
    [4.0, 0.25, 8.0, 0.5]
"""

from __future__ import annotations

import tensorflow as tf

from laplace_tf.curvature.base import Curvature
from laplace_tf.curvature.blocks import Block, DenseBlock, KronBlock


def output_scales(fit_sigma, sigma, power: int) -> tf.Tensor:
    """``s_k = (sigma_fit_k / sigma_k)^p`` ``[K]`` (``p`` from the likelihood's
    ``curvature_power``: 4 for the EF, else 2)."""
    ratio = tf.cast(fit_sigma, sigma.dtype) / sigma
    return ratio**power


def _per_weight(scales: tf.Tensor, size: int) -> tf.Tensor:
    """``s`` over a block's flat weights (outputs fastest): ``[size]``."""
    return tf.tile(scales, [size // int(scales.shape[0])])


def rescaled_block(block: Block, scales: tf.Tensor) -> Block:
    """``S^1/2 block S^1/2`` for output scales ``scales [K]`` (differentiable in them)."""
    root = tf.sqrt(scales)
    if isinstance(block, KronBlock):
        return KronBlock(block.A, root[:, None] * block.G * root[None, :], block.n)
    if isinstance(block, DenseBlock):
        root = _per_weight(root, int(block.matrix.shape[0]))
        return DenseBlock(root[:, None] * block.matrix * root[None, :])
    return type(block)(block.diagonal * _per_weight(scales, int(block.diagonal.shape[0])))


def rescaled(curvature: Curvature, scales: tf.Tensor) -> Curvature:
    """The last-layer curvature at a new noise (``scales`` from :func:`output_scales`)."""
    blocks = [rescaled_block(b, scales) for b in curvature.blocks]
    return Curvature(curvature.structure, blocks, curvature.nll, curvature.n_data,
                     curvature.residual_ss)


def combined_block(blocks: list[Block], weights) -> Block:
    """``sum_i weights_i blocks_i`` of blocks fitted on the same data (Kronecker: the shared
    ``A``, ``G = sum_i weights_i G_i``); differentiable in ``weights``."""
    first = blocks[0]
    parts = [(b.G if isinstance(first, KronBlock) else b[0]) for b in blocks]
    total = tf.add_n([w * tf.cast(part, first[0].dtype) for w, part in
                      zip(tf.unstack(tf.cast(weights, first[0].dtype)), parts, strict=True)])
    return KronBlock(first.A, total, first.n) if isinstance(first, KronBlock) else \
        type(first)(total)


def from_pieces(pieces: list[Curvature], sigma: tf.Tensor, like: Curvature) -> Curvature:
    """``H(sigma) = sum_k H_k / sigma_k^2`` from the unit-noise per-output curvatures ``H_k``
    (the data terms are ``like``'s)."""
    weights = 1.0 / tf.square(sigma * tf.ones([len(pieces)], sigma.dtype))
    blocks = [combined_block(list(parts), weights)
              for parts in zip(*(p.blocks for p in pieces), strict=True)]
    return Curvature(like.structure, blocks, like.nll, like.n_data, like.residual_ss)


def log_det_precision(block: Block, c, prior) -> tf.Tensor:
    """``log det(c block + diag(prior))``, differentiable in the block (a Kronecker block takes
    a scalar prior; its ``A`` eigenvalues are recomputed, so cache nothing here and keep it to
    small models)."""
    if isinstance(block, KronBlock):
        a = tf.linalg.eigvalsh(0.5 * (block.A + tf.transpose(block.A)))
        g = tf.linalg.eigvalsh(0.5 * (block.G + tf.transpose(block.G)))
        return tf.reduce_sum(tf.math.log(c * tf.maximum(a, 0)[:, None] * tf.maximum(g, 0)[None, :]
                                         + prior))
    if isinstance(block, DenseBlock):
        size = int(block.matrix.shape[0])
        matrix = c * block.matrix + tf.linalg.diag(prior * tf.ones([size], block.matrix.dtype))
        return 2.0 * tf.reduce_sum(tf.math.log(tf.linalg.diag_part(tf.linalg.cholesky(matrix))))
    return tf.reduce_sum(tf.math.log(c * block.diagonal + prior))
