"""The Jacobian pieces a covariance block contracts into ``J Sigma J^T``.

For inputs ``x_n`` the linearised network's logits have covariance ``V_n = J_n Sigma J_n^T``
``[K, K]`` under the posterior ``N(theta*, Sigma)``; ``Sigma`` is block-diagonal, so ``V_n`` is
a sum over covariance blocks, each contracting the Jacobian of the logits with respect to its
own layers' weights (:meth:`laplace_tf.blocks.base.Covariance.contract`). The predictive
(:mod:`laplace_tf.predictive.jacobians`) computes those per layer as a :class:`LayerJacobian`:

* a layer with a Kronecker rule, factored: with inputs (or patches) ``a_t`` at locations ``t``
  (the constant 1 appended for the bias) and output gradients ``g_{t,k} = d f_k / d z_t`` of its
  pre-activation ``z_t``, the Jacobian of logit ``k`` with respect to the ``(din, dout)`` weight
  matrix is ``M_k = sum_t a_t g_{t,k}^T`` (``g`` is the identity when ``z`` is the logits);
* any other layer: its explicit per-example Jacobian ``[N, K, p]``.

:func:`factored_variance` is ``sum_ij M_kij M_lij w_ij`` in rotated bases, the contraction the
Kronecker and diagonal blocks share: with ``b = Qa^T a`` and ``c_k = Qg^T g_k``,
``V[k, l] = sum_ij (sum_t b_ti c_tkj)(sum_t b_ti c_tlj) w_ij``; at one location this is
``sum_j c_kj c_lj v_j`` with ``v = (b * b) @ w``. Only ``M`` at several locations
(convolutions, a layer called twice) is materialised: ``N K din dout`` numbers per batch.

Example:
    >>> import tensorflow as tf
    >>> a = tf.constant([[[1.0, 2.0]]])                      # N = 1, T = 1, din = 2
    >>> g = tf.constant([[[[1.0], [3.0]]]])                  # K = 2, dout = 1
    >>> layer = LayerJacobian(0, 2, (2, 1), a, g, None)
    >>> layer.explicit().numpy().tolist()                    # [N, K, p]: J[k] = a ⊗ g_k
    [[[1.0, 2.0], [3.0, 6.0]]]
    >>> factored_variance(layer, None, None, tf.ones([2, 1]), diagonal=True).numpy().tolist()
    [[5.0, 45.0]]
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf

__all__ = ["LayerJacobian", "factored_variance", "weighted_gram"]


class LayerJacobian(NamedTuple):
    """One layer's Jacobian of the logits, inside a covariance block.

    Attributes:
        start: offset of the layer's weights inside the block.
        size: number of the layer's weights.
        shape: ``(din, dout)``, the weights as a row-major matrix, bias row included.
        a: ``[N, T, din]`` inputs at ``T`` locations (None: not factored).
        g: ``[N, T, K, dout]`` pre-activation gradients (None: the identity, or not factored).
        jacobian: ``[N, K, size]`` the explicit Jacobian of a layer that is not factored.
    """

    start: int
    size: int
    shape: tuple[int, int]
    a: tf.Tensor | None
    g: tf.Tensor | None
    jacobian: tf.Tensor | None

    def explicit(self) -> tf.Tensor:
        """The explicit per-example Jacobian ``[N, K, size]``."""
        if self.a is None:
            return self.jacobian
        g = self.g
        if g is None:  # the identity: the pre-activation is the logits
            shape = tf.shape(self.a)
            g = tf.broadcast_to(tf.eye(self.shape[1], dtype=self.a.dtype),
                                [shape[0], shape[1], self.shape[1], self.shape[1]])
        jac = tf.einsum("nti,ntkj->nkij", self.a, g)
        shape = tf.shape(jac)
        return tf.reshape(jac, [shape[0], shape[1], -1])


def weighted_gram(jac: tf.Tensor, weights: tf.Tensor, diagonal: bool) -> tf.Tensor:
    """``J diag(weights) J^T`` (or its diagonal) for ``J [N, K, p]``."""
    if diagonal:
        return tf.einsum("nkp,p->nk", jac * jac, weights)
    return tf.matmul(jac * weights, jac, transpose_b=True)


def factored_variance(layer: LayerJacobian, Qa, Qg, inverse_eig, diagonal: bool) -> tf.Tensor:
    """``sum_ij M_kij M_lij inverse_eig_ij`` in the rotated bases ``Qa``, ``Qg`` (None = I).

    ``M`` comes from the factored pieces, or from the explicit Jacobian ``[N, K, din dout]``
    (a layer with output groups: its rows do not act on all outputs)."""
    if layer.a is None:
        shape = tf.shape(layer.jacobian)
        M = tf.reshape(layer.jacobian, [shape[0], shape[1], *layer.shape])
        M = M if Qa is None else tf.einsum("nkij,ia->nkaj", M, Qa)
        return _rotated_variance(M if Qg is None else tf.einsum("nkaj,jb->nkab", M, Qg),
                                 inverse_eig, diagonal)
    b = layer.a if Qa is None else tf.einsum("nti,ij->ntj", layer.a, Qa)
    if layer.g is None:  # pre-activation = logits: g_k = e_k, one location
        w = tf.matmul(b[:, 0] ** 2, inverse_eig)  # [N, K]
        if Qg is None:
            return w if diagonal else tf.linalg.diag(w)
        return tf.einsum("kj,nj,lj->nkl", Qg, w, Qg)  # the diagonal: see KronCovariance
    c = layer.g if Qg is None else tf.einsum("ntkj,jm->ntkm", layer.g, Qg)
    if layer.a.shape[1] == 1:  # one location: M_k = b c_k^T is rank one
        w = tf.matmul(b[:, 0] ** 2, inverse_eig)  # [N, dout]
        c = c[:, 0]  # [N, K, dout]
        if diagonal:
            return tf.einsum("nkj,nj->nk", c * c, w)
        return tf.matmul(c * w[:, None, :], c, transpose_b=True)
    return _rotated_variance(tf.einsum("nti,ntkj->nkij", b, c), inverse_eig, diagonal)


def _rotated_variance(M: tf.Tensor, inverse_eig: tf.Tensor, diagonal: bool) -> tf.Tensor:
    """``sum_ij M_kij M_lij inverse_eig_ij`` for ``M [N, K, din, dout]`` already rotated."""
    scaled = M * tf.sqrt(inverse_eig)
    shape = tf.shape(scaled)
    scaled = tf.reshape(scaled, [shape[0], shape[1], -1])
    if diagonal:
        return tf.reduce_sum(scaled * scaled, axis=-1)
    return tf.matmul(scaled, scaled, transpose_b=True)
