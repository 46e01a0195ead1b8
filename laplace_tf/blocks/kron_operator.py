"""A symmetric matrix in Kronecker eigenbasis, ``(Qa ⊗ Qg) diag(vec E) (Qa ⊗ Qg)^T``.

The posterior precision of a Kronecker-factored layer ``A ⊗ G / T + lambda`` has eigenvectors
``Qa ⊗ Qg`` (from ``A = Qa diag(a) Qa^T`` and ``G = Qg diag(g) Qg^T``) and eigenvalues
``E[i, j] = a_i g_j / T + lambda``. :class:`LinearOperatorKroneckerEigen` keeps exactly these
three pieces, so the precision, the covariance (``E -> 1 / E``) and a symmetric square root of
the covariance (``E -> E^(-1/2)``) are all ``O(din^2 + dout^2 + din dout)`` numbers and a
product with a vector costs ``O(din dout (din + dout))``; the dense ``P x P`` matrix
(``P = din dout``) is never formed except by an explicit ``to_dense()``.

With ``vec`` the row-major ravel, ``(Qa ⊗ Qg) vec(X) = vec(Qa X Qg^T)`` for
``X [din, dout]``, which is how products are computed.

Example:
    >>> import numpy as np, tensorflow as tf
    >>> Qa = tf.constant([[0.0, 1.0], [1.0, 0.0]], tf.float64)     # orthogonal
    >>> Qg = tf.eye(1, dtype=tf.float64)
    >>> op = LinearOperatorKroneckerEigen(Qa, Qg, tf.constant([[2.0], [5.0]], tf.float64))
    >>> op.to_dense().numpy().tolist()                             # Qa diag(2, 5) Qa^T
    [[5.0, 0.0], [0.0, 2.0]]
    >>> bool(abs(float(op.log_abs_determinant()) - np.log(10.0)) < 1e-12)
    True
    >>> op.inverse().to_dense().numpy().tolist()
    [[0.2, 0.0], [0.0, 0.5]]
"""

from __future__ import annotations

import tensorflow as tf
from tensorflow.python.ops.linalg import linear_operator

__all__ = ["LinearOperatorKroneckerEigen"]


@linear_operator.make_composite_tensor
class LinearOperatorKroneckerEigen(tf.linalg.LinearOperator):
    """Self-adjoint ``(Qa ⊗ Qg) diag(vec E) (Qa ⊗ Qg)^T`` with orthogonal ``Qa``, ``Qg``.

    Positive definite when every entry of ``E`` is positive (the only way laplace_tf builds
    it). ``inverse()`` and ``power(p)`` stay in this form (``E -> E^p``); ``solve``,
    ``log_abs_determinant``, ``diag_part`` and ``eigvals`` use ``E`` directly.

    Args:
        eigenvectors_in: ``Qa [din, din]``, orthogonal.
        eigenvectors_out: ``Qg [dout, dout]``, orthogonal.
        eigenvalues: ``E [din, dout]``, the eigenvalue of ``Qa[:, i] ⊗ Qg[:, j]`` at ``[i, j]``.
        name: the operator's name.

    Example:
        >>> import tensorflow as tf
        >>> eye = tf.eye(2, dtype=tf.float64)
        >>> op = LinearOperatorKroneckerEigen(eye, eye, tf.constant([[1.0, 4.0], [9.0, 16.0]],
        ...                                   tf.float64))
        >>> op.power(-0.5).diag_part().numpy().tolist()
        [1.0, 0.5, 0.3333333333333333, 0.25]
    """

    def __init__(
        self,
        eigenvectors_in,
        eigenvectors_out,
        eigenvalues,
        is_non_singular: bool | None = True,
        is_self_adjoint: bool | None = True,
        is_positive_definite: bool | None = True,
        is_square: bool | None = True,
        name: str = "LinearOperatorKroneckerEigen",
    ):
        parameters = dict(
            eigenvectors_in=eigenvectors_in, eigenvectors_out=eigenvectors_out,
            eigenvalues=eigenvalues, is_non_singular=is_non_singular,
            is_self_adjoint=is_self_adjoint, is_positive_definite=is_positive_definite,
            is_square=is_square, name=name,
        )
        self._eigenvalues = tf.convert_to_tensor(eigenvalues, name="eigenvalues")
        dtype = self._eigenvalues.dtype
        self._qa = tf.convert_to_tensor(eigenvectors_in, dtype=dtype, name="eigenvectors_in")
        self._qg = tf.convert_to_tensor(eigenvectors_out, dtype=dtype, name="eigenvectors_out")
        if self._eigenvalues.shape.rank != 2 or self._eigenvalues.shape != (
            self._qa.shape[-1], self._qg.shape[-1]
        ):
            raise ValueError(
                f"eigenvalues: expected shape [din, dout] = [{self._qa.shape[-1]}, "
                f"{self._qg.shape[-1]}] to match the eigenvector matrices; got "
                f"{self._eigenvalues.shape}."
            )
        super().__init__(
            dtype=dtype, is_non_singular=is_non_singular, is_self_adjoint=is_self_adjoint,
            is_positive_definite=is_positive_definite, is_square=is_square,
            parameters=parameters, name=name,
        )

    @property
    def eigenvectors_in(self) -> tf.Tensor:
        return self._qa

    @property
    def eigenvectors_out(self) -> tf.Tensor:
        return self._qg

    @property
    def eigenvalues(self) -> tf.Tensor:
        """``E [din, dout]``."""
        return self._eigenvalues

    def power(self, exponent: float) -> LinearOperatorKroneckerEigen:
        """The same eigenvectors with eigenvalues ``E ** exponent`` (e.g. -1/2: a square root)."""
        return LinearOperatorKroneckerEigen(self._qa, self._qg, self._eigenvalues**exponent)

    @property
    def _composite_tensor_fields(self):
        return ("eigenvectors_in", "eigenvectors_out", "eigenvalues")

    def _shape(self):
        size = self._qa.shape[-1] * self._qg.shape[-1]
        return tf.TensorShape([size, size])

    def _shape_tensor(self):
        size = tf.shape(self._qa)[-1] * tf.shape(self._qg)[-1]
        return tf.stack([size, size])

    def _apply(self, x: tf.Tensor, eigenvalues: tf.Tensor) -> tf.Tensor:
        """``(Qa ⊗ Qg) diag(vec eigenvalues) (Qa ⊗ Qg)^T x`` for ``x [..., P, m]``."""
        din, dout = self._eigenvalues.shape
        shape = tf.shape(x)
        X = tf.reshape(x, tf.concat([shape[:-2], [din, dout, shape[-1]]], axis=0))
        Y = tf.einsum("ik,...ijm->...kjm", self._qa, X)
        Y = tf.einsum("jl,...kjm->...klm", self._qg, Y) * eigenvalues[:, :, None]
        Y = tf.einsum("ik,...klm->...ilm", self._qa, Y)
        Y = tf.einsum("jl,...ilm->...ijm", self._qg, Y)
        return tf.reshape(Y, shape)

    def _matmul(self, x, adjoint=False, adjoint_arg=False):
        return self._apply(tf.linalg.adjoint(x) if adjoint_arg else x, self._eigenvalues)

    def _solve(self, rhs, adjoint=False, adjoint_arg=False):
        return self._apply(tf.linalg.adjoint(rhs) if adjoint_arg else rhs, 1 / self._eigenvalues)

    def _log_abs_determinant(self):
        return tf.reduce_sum(tf.math.log(tf.abs(self._eigenvalues)))

    def _determinant(self):
        return tf.reduce_prod(self._eigenvalues)

    def _diag_part(self):
        # diag[i*dout + j] = sum_kl Qa[i,k]^2 Qg[j,l]^2 E[k,l]
        return tf.reshape(
            tf.square(self._qa) @ self._eigenvalues @ tf.transpose(tf.square(self._qg)), [-1]
        )

    def _trace(self):
        return tf.reduce_sum(self._eigenvalues)

    def _eigvals(self):
        return tf.sort(tf.reshape(self._eigenvalues, [-1]))

    def _to_dense(self):
        q = tf.linalg.LinearOperatorKronecker(
            [tf.linalg.LinearOperatorFullMatrix(self._qa),
             tf.linalg.LinearOperatorFullMatrix(self._qg)]
        ).to_dense()
        return tf.matmul(q * tf.reshape(self._eigenvalues, [1, -1]), q, transpose_b=True)

    def _linop_inverse(self):
        return self.power(-1.0)

    def _linop_adjoint(self):
        return self
