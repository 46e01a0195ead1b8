"""Choosing the weights of a subnetwork Laplace (``subset_of_weights="subnetwork"``).

Each rule returns sorted, unique ``int64`` indices into the flat vector of all trainable
weights (``WeightSubset(model).flat_values()``, ``model.trainable_variables`` order), to pass
as ``subnetwork_indices``:

* :func:`largest_variance`: the ``n`` weights with the largest marginal posterior variance
  of a fitted all-weights Laplace, usually ``hessian_structure="diag"`` (Daxberger et al.
  2021, "Bayesian deep learning via subnetwork inference": the diagonal posterior is cheap
  and ranks the weights whose uncertainty matters most);
* :func:`largest_magnitude`: the ``n`` weights largest in absolute value;
* :func:`random_weights`: ``n`` weights drawn uniformly without replacement (seeded);
* :func:`layer_weights`: every weight of the named layers.

Ties are broken by the lower index.

Example:
    >>> import keras, numpy as np, laplace_tf as ltf
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3, name="hidden"),
    ...                           keras.layers.Dense(1, name="out")])
    >>> layer_weights(model, ["out"]).tolist()              # 2 * 3 + 3 weights come first
    [9, 10, 11, 12]
    >>> indices = random_weights(model, 4, seed=0)
    >>> bool(np.array_equal(indices, random_weights(model, 4, seed=0)))
    True
    >>> la = ltf.Laplace(model, "regression", "subnetwork", "full", progress=False,
    ...                  subnetwork_indices=indices)
    >>> la.n_params
    4
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np

from laplace_tf.arguments import positive_int
from laplace_tf.params import WeightSubset

__all__ = ["largest_variance", "largest_magnitude", "random_weights", "layer_weights"]


def largest_variance(la, n: int) -> np.ndarray:
    """The ``n`` weights with the largest marginal posterior variance under ``la``.

    Args:
        la: a fitted ``ltf.Laplace`` with ``subset_of_weights="all"`` and
            ``hessian_structure="diag"`` (the cheap choice:
            ``ltf.Laplace(model, lik, "all", "diag").fit(data)``) or ``"full"``.
        n: how many weights, at most ``la.n_params``.

    Raises:
        ValueError: ``la`` is not over all weights, is Kronecker-factored (TFP would form
            its dense covariance for the variances), or is not fitted; ``n`` out of range.
    """
    subset = getattr(la, "subset_of_weights", type(la).__name__)
    structure = getattr(la, "hessian_structure", None)
    if subset != "all" or structure not in ("diag", "full"):
        raise ValueError(
            "la: largest_variance ranks the weights by the marginal variances of a diagonal "
            f"(or full) Laplace over all weights; got subset_of_weights={subset!r}, "
            f"hessian_structure={structure!r}. Fit ltf.Laplace(model, likelihood, 'all', "
            "'diag') first."
        )
    variance = np.asarray(la.posterior.variance(), np.float64)
    return _top(variance, n, la.n_params, "la: its marginal variances")


def largest_magnitude(model: keras.Model, n: int) -> np.ndarray:
    """The ``n`` weights of ``model`` largest in absolute value."""
    weights = np.asarray(WeightSubset(model).flat_values(), np.float64)
    return _top(np.abs(weights), n, weights.size, "model: its weights")


def random_weights(model: keras.Model, n: int, seed: int = 0) -> np.ndarray:
    """``n`` weights of ``model`` drawn uniformly without replacement; the same ``seed``
    gives the same weights."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed: expected an integer; got {seed!r}.")
    if seed < 0:
        raise ValueError(f"seed: expected an integer >= 0; got {seed}.")
    n_params = WeightSubset(model).n_params
    n = _count(n, n_params)
    chosen = np.random.default_rng(int(seed)).choice(n_params, size=n, replace=False)
    return np.sort(chosen).astype(np.int64)


def layer_weights(model: keras.Model, layers: Sequence[str | keras.layers.Layer]) -> np.ndarray:
    """Every weight of ``layers``: names or objects of layers with trainable weights, or of
    nested models (all their layers' weights)."""
    if isinstance(layers, (str, keras.layers.Layer)):
        layers = [layers]
    if not isinstance(layers, Sequence) or not all(
            isinstance(layer, (str, keras.layers.Layer)) for layer in layers):
        raise TypeError(f"layers: expected layer names or Keras layers (a list of them); got "
                        f"{layers!r}.")
    everything = WeightSubset(model)
    known = model._flatten_layers(include_self=False, recursive=True)
    chosen = []
    for layer in layers:
        matches = [x for x in known if x.name == layer] if isinstance(layer, str) else \
            [x for x in known if x is layer]
        if len(matches) > 1:
            raise ValueError(f"layers: {len(matches)} layers of the model are called "
                             f"{layer!r} (in nested models); pass the layer object instead.")
        inside = {id(x) for x in matches[0]._flatten_layers(include_self=True, recursive=True)
                  } if matches else set()
        found = [s for s in everything.slices if id(s.layer) in inside]
        if not found:
            names = sorted({s.name for s in everything.slices})
            raise ValueError(
                f"layers: {layer if isinstance(layer, str) else layer.name!r} is not a layer "
                f"of the model with trainable weights; those are {names}."
            )
        chosen += [np.arange(s.offset, s.offset + s.size) for s in found]
    if not chosen:
        raise ValueError("layers: expected at least one layer name; got none.")
    return np.unique(np.concatenate(chosen)).astype(np.int64)


def _count(n: int, n_params: int) -> int:
    n = positive_int(n, "n")
    if n > n_params:
        raise ValueError(f"n: expected at most the model's {n_params} weights; got {n}.")
    return n


def _top(scores: np.ndarray, n: int, n_params: int, what: str) -> np.ndarray:
    """The indices of the ``n`` largest ``scores`` (``what``, for errors), sorted (ties: the
    lower index)."""
    n = _count(n, n_params)
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{what} contain NaN or infinite values (e.g. index "
                         f"{int(np.argwhere(~np.isfinite(scores))[0][0])}); they cannot be "
                         "ranked. Check the model's weights (and the fit).")
    order = np.argsort(-scores, kind="stable")
    return np.sort(order[:n]).astype(np.int64)
