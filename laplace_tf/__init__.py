"""laplace_tf: post-hoc Laplace approximations for trained TensorFlow/Keras models.

Example:
    >>> import laplace_tf as ltf, tensorflow as tf
    >>> float(ltf.hessian(lambda x: x**2 + 2 * x + 1, tf.constant(2.0)))
    2.0

Public names are imported on first use, so ``import laplace_tf`` stays cheap.
"""

from __future__ import annotations

import importlib

from laplace_tf.console import quiet_tensorflow_startup

__version__ = "0.1.0"
quiet_tensorflow_startup()

_PUBLIC = {
    "Laplace": "laplace_tf.predictive",
    "hessian": "laplace_tf.autodiff",
    "hvp": "laplace_tf.autodiff",
    "jacobian": "laplace_tf.autodiff",
    "WeightSubset": "laplace_tf.params",
    "get_likelihood": "laplace_tf.likelihoods",
    "register_kron_rule": "laplace_tf.curvature",
    "MarginalLikelihoodCallback": "laplace_tf.training",
    "marglik_training": "laplace_tf.training",
}
_SUBMODULES = ("calibration", "data", "models", "subnetwork", "testing")

__all__ = sorted([*_PUBLIC, *_SUBMODULES, "load", "__version__"])


def load(path, model):
    """Load a saved posterior for ``model`` (see :meth:`Laplace.save`).

    Example:
        ``la2 = ltf.load("posterior.npz", model)`` gives the same predictions as ``la``.
    """
    from laplace_tf.predictive import Laplace

    return Laplace.load(path, model)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"laplace_tf.{name}")
    raise AttributeError(f"module 'laplace_tf' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
