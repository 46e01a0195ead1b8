"""Predictions with uncertainty from a fitted Laplace posterior: GLM and sampling predictives.

* :mod:`~laplace_tf.predictive.laplace`: the public :class:`Laplace` class;
* :mod:`~laplace_tf.predictive.jacobians`: ``J Sigma J^T`` block by block;
* :mod:`~laplace_tf.predictive.links`: probit, Monte Carlo and Laplace-bridge links.
"""

from laplace_tf.predictive.laplace import Laplace

__all__ = ["Laplace"]
