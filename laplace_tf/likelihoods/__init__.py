"""Likelihoods on model outputs: NLL, output-space curvature, sampling, link, predictive.

Four likelihoods, the first three named as in laplace-torch:

* ``"classification"``: softmax cross-entropy; labels are integers ``[N]`` or one-hot ``[N, C]``.
* ``"binary"``: sigmoid on one logit ``[N, 1]``; labels 0/1 of shape ``[N]`` or ``[N, 1]``.
* ``"regression"``: Gaussian with noise ``sigma_noise`` (a scalar or one per output).
* ``"heteroscedastic"``: Gaussian whose model outputs ``[mean (K), log-variance (K)]``.

For every likelihood the GGN's per-example output matrix is ``Lambda = L L^T``
(``[N, K, K]``): the Hessian of the NLL with respect to the outputs, or its expectation over
the targets where that depends on them. The interface is :class:`Likelihood`
(``base.py``); a new likelihood is one subclass plus one entry in ``_REGISTRY``.

Example:
    >>> import tensorflow as tf
    >>> lik = get_likelihood("classification")
    >>> logits = tf.constant([[0.0, 0.0]], tf.float64)
    >>> lik.output_hessian(logits).numpy()       # diag(p) - p p^T with p = [.5, .5]
    array([[[ 0.25, -0.25],
            [-0.25,  0.25]]])
"""

from __future__ import annotations

from laplace_tf.likelihoods.base import LINKS, Likelihood
from laplace_tf.likelihoods.categorical import Binary, Classification
from laplace_tf.likelihoods.gaussian import Heteroscedastic, Regression

_REGISTRY: dict[str, type[Likelihood]] = {
    cls.name: cls for cls in (Classification, Binary, Regression, Heteroscedastic)
}
LIKELIHOODS = tuple(_REGISTRY)


def get_likelihood(name: str, sigma_noise=1.0) -> Likelihood:
    """The likelihood called ``name`` (one of :data:`LIKELIHOODS`); ``sigma_noise`` for those
    with a noise parameter (``has_noise``)."""
    if name not in _REGISTRY:
        raise ValueError(f"likelihood: expected one of {LIKELIHOODS}; got {name!r}.")
    return _REGISTRY[name].with_noise(sigma_noise)


def as_likelihood(likelihood: str | Likelihood) -> Likelihood:
    """``likelihood`` itself, or the one of that name (with ``sigma_noise`` 1)."""
    return get_likelihood(likelihood) if isinstance(likelihood, str) else likelihood


__all__ = ["LIKELIHOODS", "LINKS", "Binary", "Classification", "Heteroscedastic", "Likelihood",
           "Regression", "as_likelihood", "get_likelihood"]
