"""Curvature of a model's summed negative log-likelihood, by weight subset and structure.

:func:`make_builder` picks the :class:`~laplace_tf.curvature.base.CurvatureBuilder` for a
``(subset_of_weights, hessian_structure)`` pair, with laplace-torch's names; :func:`fit_curvature`
sums its blocks over the data.

Example:
    >>> import keras, numpy as np, tensorflow as tf
    >>> from laplace_tf.batches import Batches
    >>> from laplace_tf.likelihoods import get_likelihood
    >>> from laplace_tf.params import LogitModel
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])
    >>> builder = make_builder("all", "diag", LogitModel(model), get_likelihood("classification"))
    >>> type(builder).__name__
    'DiagBuilder'
    >>> data = Batches((np.ones((4, 2)), np.array([0, 1, 2, 0])))
    >>> fit_curvature(builder, data).blocks[0].diagonal.shape
    TensorShape([9])
"""

from __future__ import annotations

import inspect

from laplace_tf.blocks import Block, DenseBlock, DiagBlock, KronBlock
from laplace_tf.curvature.base import (
    CURVATURES,
    STRUCTURES,
    Curvature,
    CurvatureBuilder,
    fit_curvature,
)
from laplace_tf.curvature.diag import DiagBuilder
from laplace_tf.curvature.full import FullBuilder
from laplace_tf.curvature.gp import ContextBuilder
from laplace_tf.curvature.kron import KronBuilder
from laplace_tf.curvature.kron_layers import KronRule, register_kron_rule
from laplace_tf.curvature.last_layer import LastLayerBuilder
from laplace_tf.curvature.lowrank import LowRankBuilder
from laplace_tf.likelihoods import Likelihood
from laplace_tf.params import LogitModel

__all__ = [
    "CURVATURES", "STRUCTURES", "SUBSETS", "Block", "ContextBuilder", "Curvature",
    "CurvatureBuilder", "DenseBlock", "DiagBlock", "DiagBuilder", "FullBuilder", "KronBlock",
    "KronBuilder", "KronRule", "LastLayerBuilder", "LowRankBuilder", "fit_curvature",
    "make_builder", "register_kron_rule",
]

SUBSETS = ("all", "last_layer", "subnetwork")

_ALL_WEIGHTS: dict[str, type[CurvatureBuilder]] = {
    "full": FullBuilder, "diag": DiagBuilder, "kron": KronBuilder, "lowrank": LowRankBuilder,
    "gp": ContextBuilder,
}
_ANY_SUBSET = ("lowrank", "gp")  # builders over whatever weights logit_model has
_POSITIONAL = ("self", "logit_model", "likelihood", "kind", "structure")
_DENSE_ONLY = "memory_limit_bytes"  # sizes the exact Hessian's chunks; other builders ignore it


def make_builder(
    subset_of_weights: str,
    hessian_structure: str,
    logit_model: LogitModel,
    likelihood: Likelihood,
    curvature: str = "ggn",
    **options,
) -> CurvatureBuilder:
    """The curvature builder for a weight subset and a Hessian structure.

    Args:
        subset_of_weights: ``"all"`` (the weights of ``logit_model.subset``),
            ``"last_layer"`` (``logit_model`` must be over the last layer only) or
            ``"subnetwork"`` (over a :class:`~laplace_tf.params.SubnetworkSubset`, ``"full"``
            only: the weights outside it stay fixed).
        hessian_structure: ``"full"``, ``"kron"``, ``"diag"``, ``"lowrank"`` or ``"gp"``.
        logit_model: the model and its weight subset.
        likelihood: the likelihood of the data.
        curvature: ``"ggn"``, ``"ef"`` or ``"hessian"`` (not every structure has every kind).
        **options: builder options: ``memory_limit_bytes`` (the memory budget of the exact
            Hessian's chunks, ``"all"`` + ``"full"``; ignored by the other builders),
            ``stochastic``, ``seed`` and ``kfac_approximation`` (``"all"`` + ``"kron"``),
            ``rank``, ``oversampling``, ``power_iterations`` and ``seed`` (``"lowrank"``,
            either subset), ``n_context`` and ``seed`` (``"gp"``, either subset).

    Returns:
        :class:`FullBuilder`, :class:`DiagBuilder`, :class:`KronBuilder`,
        :class:`LowRankBuilder`, :class:`ContextBuilder` or :class:`LastLayerBuilder`.

    Raises:
        ValueError: an unknown subset or structure, or a curvature kind the structure lacks.
        TypeError: an option the chosen builder does not take.
    """
    if subset_of_weights not in SUBSETS:
        raise ValueError(
            f"subset_of_weights: expected one of {SUBSETS}; got {subset_of_weights!r}."
        )
    if hessian_structure not in STRUCTURES:
        raise ValueError(
            f"hessian_structure: expected one of {STRUCTURES}; got {hessian_structure!r}."
        )
    cls: type[CurvatureBuilder]
    if subset_of_weights == "subnetwork" and hessian_structure != "full":
        raise ValueError(
            f"hessian_structure: subset_of_weights='subnetwork' takes 'full' (the dense "
            f"curvature over the chosen weights); got {hessian_structure!r}."
        )
    if subset_of_weights == "last_layer" and hessian_structure not in _ANY_SUBSET:
        cls, fixed = LastLayerBuilder, {"structure": hessian_structure}
    else:
        cls, fixed = _ALL_WEIGHTS[hessian_structure], {}
    accepted = [name for name in inspect.signature(cls).parameters if name not in _POSITIONAL]
    unknown = sorted(set(options) - set(accepted) - {_DENSE_ONLY})
    if unknown:
        raise TypeError(
            f"options: {', '.join(unknown)} not accepted for subset_of_weights="
            f"{subset_of_weights!r}, hessian_structure={hessian_structure!r} ({cls.__name__}); "
            f"accepted: {', '.join(accepted) or 'none'}."
        )
    kwargs = {name: value for name, value in options.items() if name in accepted}
    return cls(logit_model, likelihood, curvature, **fixed, **kwargs)
