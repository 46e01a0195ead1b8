"""A per-output regression noise ``sigma [K]``: the curvature at a new ``sigma``.

With a Gaussian likelihood the output Hessian is ``Lambda = diag(1 / sigma_k^2)``. Over the
last layer's weights (``J_n = a~_n^T ⊗ I_K``, outputs fastest in the flat order) the GGN (= the
exact Hessian) is ``sum_n a~_n a~_n^T ⊗ Lambda`` and the EF ``sum_n a~_n a~_n^T ⊗ r_n r_n^T``
with ``r_nk = res_nk / sigma_k^2``. A new ``sigma`` therefore scales output ``k``'s rows and
columns by ``sqrt(s_k)``, ``s_k = (sigma_fit_k / sigma_k)^p`` (``p = 2``, EF: ``p = 4``)::

    H(sigma) = S^1/2 H(sigma_fit) S^1/2,    S = I ⊗ diag(s)

exactly, for every structure (each block's ``rescaled``; Kronecker:
``G -> diag(s)^1/2 G diag(s)^1/2``; diagonal: ``d -> s ⊙ d``). Over all weights ``J_n`` mixes the outputs and no such rescaling exists, but
the GGN (and the exact Hessian) is still a sum over outputs, ``H(sigma) = sum_k H_k / sigma_k^2``
with ``H_k`` output ``k``'s curvature at unit noise: given the ``H_k``, :func:`from_pieces`
rebuilds it (Kronecker blocks share ``A``; only ``G`` combines). The EF
``sum_n J_n^T r_n r_n^T J_n`` has cross terms ``k != l`` and is no such sum.

Example:
    >>> import tensorflow as tf
    >>> from laplace_tf.blocks import DiagBlock
    >>> from laplace_tf.curvature.base import Curvature
    >>> block = DiagBlock(tf.constant([1.0, 1.0, 2.0, 2.0], tf.float64))   # 2 inputs, K = 2
    >>> curvature = Curvature("diag", [block], 0.0, 1, tf.zeros(2, tf.float64))
    >>> scales = tf.constant([4.0, 0.25], tf.float64)
    >>> rescaled(curvature, scales).blocks[0].diagonal.numpy().tolist()
    [4.0, 0.25, 8.0, 0.5]
"""

from __future__ import annotations

import tensorflow as tf

from laplace_tf.blocks import Block
from laplace_tf.curvature.base import Curvature


def output_scales(fit_sigma, sigma, power: int) -> tf.Tensor:
    """``s_k = (sigma_fit_k / sigma_k)^p`` ``[K]`` (``p`` from the likelihood's
    ``curvature_power``: 4 for the EF, else 2)."""
    ratio = tf.cast(fit_sigma, sigma.dtype) / sigma
    return ratio**power


def rescaled(curvature: Curvature, scales: tf.Tensor) -> Curvature:
    """The last-layer curvature at a new noise (``scales`` from :func:`output_scales`)."""
    blocks = [b.rescaled(scales) for b in curvature.blocks]
    return Curvature(curvature.structure, blocks, curvature.nll, curvature.n_data,
                     curvature.residual_ss)


def combined_block(blocks: list[Block], weights) -> Block:
    """``sum_i weights_i blocks_i`` of blocks fitted on the same data (Kronecker: the shared
    ``A``, ``G = sum_i weights_i G_i``); differentiable in ``weights``."""
    return type(blocks[0]).combine(blocks, weights)


def from_pieces(pieces: list[Curvature], sigma: tf.Tensor, like: Curvature) -> Curvature:
    """``H(sigma) = sum_k H_k / sigma_k^2`` from the unit-noise per-output curvatures ``H_k``
    (the data terms are ``like``'s)."""
    weights = 1.0 / tf.square(sigma * tf.ones([len(pieces)], sigma.dtype))
    blocks = [combined_block(list(parts), weights)
              for parts in zip(*(p.blocks for p in pieces), strict=True)]
    return Curvature(like.structure, blocks, like.nll, like.n_data, like.residual_ss)
