"""The Gaussian prior ``N(prior_mean, diag(1 / lambda))`` over the flat weight vector.

``lambda`` (the prior precision) comes in three shapes, named as in laplace-torch's
``prior_structure``:

* ``"scalar"``: one value ``[]`` for all weights;
* ``"layerwise"``: one value per layer of the weight subset ``[L]`` (``subset.slices``);
* ``"diag"``: one value per weight ``[P]`` (not for Kronecker blocks).

Everything here is plain TensorFlow and differentiable in ``lambda`` (prior tuning takes
gradients through :func:`expand` and :func:`per_block`).

Example:
    >>> import tensorflow as tf
    >>> prior = tf.constant([1.0, 10.0])                  # two layers of 2 and 3 weights
    >>> expand(prior, [2, 3]).numpy().tolist()
    [1.0, 1.0, 10.0, 10.0, 10.0]
    >>> structure_of(prior, n_layers=2)
    'layerwise'
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

PRIOR_STRUCTURES = ("scalar", "layerwise", "diag")

Range = tuple[int, int]  # (offset, size) in the flat weight vector


def as_float_tensor(value, name: str, dtype: tf.DType) -> tf.Tensor:
    """``value`` as a float tensor of ``dtype`` (gradients flow through tensors/variables)."""
    if isinstance(value, (str, bytes, bool, np.bool_)) or value is None or (
            isinstance(value, np.ndarray) and value.dtype.kind == "b"):
        raise TypeError(f"{name}: expected a number or an array of numbers; got {value!r}.")
    try:
        tensor = tf.convert_to_tensor(value, dtype_hint=dtype)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"{name}: expected a number or an array of numbers; got {type(value).__name__} "
            f"({error})."
        ) from None
    if not (tensor.dtype.is_floating or tensor.dtype.is_integer):
        raise TypeError(f"{name}: expected numbers; got dtype {tensor.dtype.name}.")
    return tf.cast(tensor, dtype)


def check_positive(tensor: tf.Tensor, name: str, hint: str) -> None:
    """Raise ValueError unless every entry is finite and > 0 (eager tensors only)."""
    if not tf.executing_eagerly():
        return
    values = np.asarray(tensor)
    if values.size == 0 or not np.all(np.isfinite(values)) or np.any(values <= 0):
        bad = values if values.size <= 6 else f"{values.size} values with min {values.min()}"
        raise ValueError(f"{name}: every value must be finite and > 0; got {bad}. {hint}")


def prior_precision_tensor(
    value, layer_names: Sequence[str], n_params: int, allowed: Sequence[str], dtype: tf.DType,
    name: str = "prior_precision",
) -> tf.Tensor:
    """Check a prior precision and return it as a tensor ``[]``, ``[L]`` or ``[P]``.

    Args:
        value: a positive number, one per layer, or one per weight.
        layer_names: the layers of the weight subset (their count is ``L``).
        n_params: ``P``.
        allowed: the prior structures the posterior structure supports.
        dtype: the model dtype.
        name: the argument name for error messages.

    Raises:
        TypeError: for non-numeric values.
        ValueError: for a wrong length, a structure not in ``allowed``, or values <= 0.
    """
    tensor = as_float_tensor(value, name, dtype)
    n_layers = len(layer_names)
    expected = (
        f"a positive scalar, {n_layers} value{'s' * (n_layers != 1)} (one per layer: "
        f"{list(layer_names)})"
        + (f" or {n_params} values (one per weight)" if "diag" in allowed else "")
    )
    if tensor.shape.rank not in (0, 1) or (
        tensor.shape.rank == 1 and tensor.shape[0] not in (n_layers, n_params)
    ):
        raise ValueError(f"{name}: expected {expected}; got shape {tensor.shape.as_list()}.")
    structure = structure_of(tensor, n_layers)
    if structure not in allowed:
        raise ValueError(
            f"{name}: one value per weight is not available for this posterior structure "
            f"(Kronecker blocks share one precision per layer); expected {expected}. Use "
            "hessian_structure='diag' or 'full' for a per-weight prior."
        )
    check_positive(tensor, name, f"Give {expected}.")
    return tensor


def prior_mean_tensor(value, n_params: int, dtype: tf.DType) -> tf.Tensor:
    """Check a prior mean (a finite scalar or ``[P]``) and return it as a tensor."""
    tensor = as_float_tensor(value, "prior_mean", dtype)
    if tensor.shape.rank == 1 and tensor.shape[0] == n_params or tensor.shape.rank == 0:
        if tf.executing_eagerly() and not np.all(np.isfinite(np.asarray(tensor))):
            raise ValueError("prior_mean: expected finite values; got NaN or Inf.")
        return tensor
    raise ValueError(
        f"prior_mean: expected a scalar or {n_params} values (one per weight); got shape "
        f"{tensor.shape.as_list()}."
    )


def structure_of(prior: tf.Tensor, n_layers: int) -> str:
    """``"scalar"``, ``"layerwise"`` or ``"diag"`` from the shape of a checked prior."""
    if prior.shape.rank == 0:
        return "scalar"
    return "layerwise" if prior.shape[0] == n_layers else "diag"


def expand(prior: tf.Tensor, layer_sizes: Sequence[int]) -> tf.Tensor:
    """The prior precision of every weight, ``[P]``."""
    n_params = int(sum(layer_sizes))
    structure = structure_of(prior, len(layer_sizes))
    if structure == "scalar":
        return tf.fill([n_params], prior)
    if structure == "layerwise":
        return tf.repeat(prior, layer_sizes)
    return prior


def prior_terms(prior: tf.Tensor, layer_sizes: Sequence[int], squares: tf.Tensor,
                layer_squares: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """``(sum_i lambda_i d_i^2, sum_i log lambda_i)`` over all weights, without expanding a
    scalar or layerwise prior to ``[P]``.

    Args:
        prior: the prior precision ``[]``, ``[L]`` or ``[P]``.
        layer_sizes: weights per layer.
        squares: ``d^2 [P]`` (``d = theta* - mu0``).
        layer_squares: ``d^2`` summed per layer ``[L]``.

    Example:
        >>> import tensorflow as tf
        >>> sq = tf.constant([1.0, 2.0, 3.0])             # layers of 1 and 2 weights
        >>> scatter, log_det = prior_terms(tf.constant([2.0, 4.0]), [1, 2], sq,
        ...                                tf.constant([1.0, 5.0]))
        >>> float(scatter), round(float(log_det), 5)        # 2*1 + 4*5, log 2 + 2 log 4
        (22.0, 3.46574)
    """
    structure = structure_of(prior, len(layer_sizes))
    if structure == "diag":
        return tf.reduce_sum(prior * squares), tf.reduce_sum(tf.math.log(prior))
    sizes = tf.constant(layer_sizes, prior.dtype)
    if structure == "scalar":
        return prior * tf.reduce_sum(layer_squares), tf.reduce_sum(sizes) * tf.math.log(prior)
    return tf.reduce_sum(prior * layer_squares), tf.reduce_sum(sizes * tf.math.log(prior))


def per_block(
    prior: tf.Tensor, layer_ranges: Sequence[Range], block_ranges: Sequence[Range]
) -> list[tf.Tensor]:
    """The prior of each curvature block: a scalar where it is uniform there, else ``[p]``.

    A layerwise prior gives a scalar for a block inside one layer (Kronecker blocks: one per
    layer, or one per kernel of a layer) and a vector for a block over several layers (full
    and diagonal over all weights).
    """
    structure = structure_of(prior, len(layer_ranges))
    if structure == "scalar":
        return [prior] * len(block_ranges)
    if structure == "layerwise":
        layer_of = [next((i for i, (start, size) in enumerate(layer_ranges)
                          if start <= offset and offset + length <= start + size), None)
                    for offset, length in block_ranges]
        if None not in layer_of:
            return [prior[i] for i in layer_of]
        prior = expand(prior, [size for _, size in layer_ranges])
    return [prior[offset : offset + size] for offset, size in block_ranges]


def reshape_prior(prior: tf.Tensor, layer_sizes: Sequence[int], structure: str) -> tf.Tensor:
    """``prior`` in another structure: geometric means over the weights it covers.

    Example:
        >>> import tensorflow as tf
        >>> round(float(reshape_prior(tf.constant([1.0, 100.0], tf.float64), [1, 1], "scalar")), 9)
        10.0
    """
    log_full = tf.math.log(expand(prior, layer_sizes))
    if structure == "scalar":
        return tf.exp(tf.reduce_mean(log_full))
    if structure == "layerwise":
        layer_ids = tf.repeat(tf.range(len(layer_sizes)), layer_sizes)
        return tf.exp(tf.math.segment_mean(log_full, layer_ids))
    return tf.exp(log_full)
