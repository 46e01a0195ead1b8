"""The Laplace posterior over (a subset of) a Keras model's weights.

``PosteriorLaplace`` composes a weight subset (``"all"`` or ``"last_layer"``) with a posterior
structure (``"full"``, ``"kron"``, ``"diag"``); ``laplace_tf.Laplace`` adds the predictive.
Covariance blocks for the predictive are :class:`DenseCovariance`, :class:`KronCovariance`
and :class:`DiagCovariance`.
"""

from laplace_tf.posterior.factors import DenseCovariance, DiagCovariance, KronCovariance
from laplace_tf.posterior.kron import LinearOperatorKroneckerEigen
from laplace_tf.posterior.laplace import NotFittedError, PosteriorLaplace
from laplace_tf.posterior.prior import PRIOR_STRUCTURES
from laplace_tf.posterior.structures import STRUCTURES, dense_covariance

__all__ = [
    "PRIOR_STRUCTURES", "STRUCTURES", "DenseCovariance", "DiagCovariance", "KronCovariance",
    "LinearOperatorKroneckerEigen", "NotFittedError", "PosteriorLaplace", "dense_covariance",
]
