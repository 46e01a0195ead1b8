"""The Laplace posterior over (a subset of) a Keras model's weights.

``PosteriorLaplace`` composes a weight subset (``"all"``, ``"last_layer"`` or ``"subnetwork"``)
with a posterior structure (``"full"``, ``"kron"``, ``"diag"``); ``laplace_tf.Laplace`` adds
the predictive.
The curvature blocks, their factors and covariance blocks are :mod:`laplace_tf.blocks`.
"""

from laplace_tf.posterior.laplace import NotFittedError, PosteriorLaplace
from laplace_tf.posterior.prior import PRIOR_STRUCTURES
from laplace_tf.posterior.structures import STRUCTURES

__all__ = ["PRIOR_STRUCTURES", "STRUCTURES", "NotFittedError", "PosteriorLaplace"]
