"""Logits or probabilities? The final softmax/sigmoid of a Keras model, found and checked.

Curvature and predictives work on logits, and laplace_tf applies the softmax/sigmoid itself.
A model that returns probabilities would have it applied twice: a wrong answer with no error.
Three lines of defence, none of which guesses:

* **Keras structure** (:func:`probability_output`): walking back from the output of a
  Functional or Sequential model through layers that return their input unchanged at
  inference (``Dropout`` and its variants, ``GaussianNoise``, ``ActivityRegularization``,
  ``Identity``; the model is always called with ``training=False``), the first other
  operation is a softmax/sigmoid when it is a layer whose activation is one
  (``Dense(.., "softmax")``, ``Activation("sigmoid")``, ...), a ``Softmax`` layer or
  ``keras.ops.softmax``/``sigmoid`` over the last axis, or a ``Lambda`` of
  ``tf.nn.softmax``/``tf.nn.sigmoid`` (and their ``keras`` twins) without extra arguments.
  :class:`~laplace_tf.params.LogitModel` calls the model without it: the logits are exact.
* **TensorFlow graph** (:func:`final_op_type`, :func:`check_output_op`): every traced call
  of a ``LogitModel`` records the type of the op that computes its output; a ``Softmax`` or
  ``Sigmoid`` op there after the fit's step is traced (``tf.nn.softmax`` inside a subclassed
  model's ``call()``, a softmax applied twice) means probabilities that cannot be removed:
  refused (``"classification"``, ``"binary"``) or warned about (``"regression"``, where the
  output is the mean and is used as it is; probabilities may be the targets, e.g.
  proportions). It costs nothing: the step is traced anyway.
* **Values** (:func:`check_output_values`), on the first batch of every fit (computed
  anyway, for the number of outputs), for a softmax written by hand:
  ``"classification"`` outputs with every entry in ``[0, 1]`` AND every row summing to 1
  (within 1e-3, which float16 softmaxes meet) are refused. Logits of >= 2 classes satisfy
  both on every row of a batch only by design (a model built to output a distribution), not
  by chance, so a false positive is not a practical concern. For ``"binary"`` there is no
  check on values: one output in ``[0, 1]`` on a whole batch is what a weak or untrained
  model's logits often look like (this library's own tests hit it with 6 examples), so it
  is no evidence; the graph check covers ``tf.sigmoid``.

Example:
    >>> import keras
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3, "softmax"),
    ...                           keras.layers.Dropout(0.5)])
    >>> found = probability_output(model)
    >>> found.activation, found.operation is model.layers[0]
    ('softmax', True)
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from laplace_tf.likelihoods import Likelihood, as_likelihood

# Layers that return their input unchanged when called with training=False.
_PASS_THROUGH = (
    keras.layers.Dropout,  # and SpatialDropout1D/2D/3D
    keras.layers.GaussianDropout,
    keras.layers.AlphaDropout,
    keras.layers.GaussianNoise,
    keras.layers.ActivityRegularization,
    keras.layers.Identity,
)
_FUNCTIONS = {
    keras.activations.softmax: "softmax", keras.ops.softmax: "softmax", tf.nn.softmax: "softmax",
    keras.activations.sigmoid: "sigmoid", keras.ops.sigmoid: "sigmoid", tf.nn.sigmoid: "sigmoid",
}
_TOLERANCE = 1e-3
_GRAPH_OPS = {"Softmax": "softmax", "Sigmoid": "sigmoid"}
_MOVES_VALUES = ("Identity", "IdentityN", "Reshape", "Squeeze", "ExpandDims")
_WITH_CONSTANTS = ("ClipByValue", "Minimum", "Maximum", "Mul", "AddV2", "Add", "Sub", "RealDiv")
"""Element-wise ops looked through when all their inputs but one are constants (a clipped or
rescaled sigmoid still holds probabilities)."""


class ProbabilityOutput(NamedTuple):
    """The operation whose softmax/sigmoid makes a model's output, and which one it is."""

    operation: keras.Operation
    activation: str

    @property
    def fused(self) -> bool:
        """True for a layer with an ``activation`` attribute (switched off to get logits);
        False for an operation whose whole output is the softmax/sigmoid of its input."""
        return hasattr(self.operation, "activation")


def output_layer(model: keras.Model) -> keras.Operation | None:
    """The operation that produces the model output, when Keras records it (None if unknown)."""
    return next(_walk_back(model), None)


def probability_output(model: keras.Model) -> ProbabilityOutput | None:
    """The final softmax/sigmoid of a Functional or Sequential model, if it has one.

    Layers that leave values unchanged at inference are walked through; a nested model is
    searched the same way. None when the output is not (recognisably) a softmax/sigmoid,
    e.g. for subclassed models, whose ``call()`` Keras does not record.
    """
    for operation in _walk_back(model):
        if isinstance(operation, _PASS_THROUGH):
            continue
        if isinstance(operation, keras.Model):
            return probability_output(operation)
        activation = _probability_activation(operation, _output_rank(model))
        return ProbabilityOutput(operation, activation) if activation else None
    return None


def output_activation(model: keras.Model) -> str | None:
    """``"softmax"``/``"sigmoid"`` if the model's output is one (see :func:`probability_output`)."""
    found = probability_output(model)
    return found.activation if found else None


def final_op_type(tensor) -> str | None:
    """The type of the TensorFlow op that computes a graph tensor (looking through ops that
    only move values, such as ``Identity`` and ``Reshape``, and element-wise ops with
    constants, such as a clip or a rescaling), e.g. ``"Softmax"``; None when eager.

    Example:
        >>> with tf.Graph().as_default():
        ...     final_op_type(tf.reshape(tf.nn.softmax(tf.ones((2, 3))), [-1]))
        'Softmax'
        >>> with tf.Graph().as_default():
        ...     final_op_type(tf.clip_by_value(tf.sigmoid(tf.ones((2, 1))), 1e-7, 1 - 1e-7))
        'Sigmoid'
    """
    op = getattr(tensor, "op", None) if not tf.executing_eagerly() else None
    while op is not None and op.inputs:
        if op.type in _MOVES_VALUES:
            op = op.inputs[0].op
            continue
        varying = [t for t in op.inputs if not _constant(t)]
        if op.type not in _WITH_CONSTANTS or len(varying) != 1:
            break
        op = varying[0].op
    return None if op is None else op.type


def _constant(tensor) -> bool:
    """Whether a graph tensor is a constant (possibly cast or reshaped)."""
    op = tensor.op
    while op.type in ("Cast", *_MOVES_VALUES) and op.inputs:
        op = op.inputs[0].op
    return op.type == "Const"


def check_output_op(op_type: str | None, likelihood: Likelihood | str,
                    stripped: ProbabilityOutput | None):
    """Refuse (or, for a likelihood that takes the output as it is, such as regression, warn
    about) an output made by a ``Softmax``/``Sigmoid`` op.

    Args:
        op_type: the type of the TensorFlow op that computes the model output
            (:func:`final_op_type`, recorded by :class:`~laplace_tf.params.LogitModel`).
        likelihood: the :class:`~laplace_tf.likelihoods.Likelihood` of the outputs, or its name.
        stripped: the final softmax/sigmoid already removed from the model output, if any.

    Raises:
        ValueError: for a likelihood that applies its own softmax/sigmoid (``output_activation``:
            classification, binary); the message says how to expose the logits.

    Warns:
        UserWarning: for a likelihood without one (the output is used as it is).

    Example:
        >>> check_output_op("BiasAdd", "classification", None)      # a Dense layer's logits
        >>> check_output_op("Sigmoid", "binary", None)
        Traceback (most recent call last):
        ...
        ValueError: model: its output is computed by a TensorFlow Sigmoid op (e.g. ...
    """
    activation = None if op_type is None else _GRAPH_OPS.get(op_type)
    if activation is None:
        return
    likelihood = as_likelihood(likelihood)
    if likelihood.output_activation is None:
        warnings.warn(
            f"model: its output is computed by a {op_type} op; with "
            f"likelihood={likelihood.name!r} it is used as the mean as it is (no logits). For "
            "class labels use likelihood='classification' (softmax) or 'binary' (sigmoid).",
            UserWarning, stacklevel=3,
        )
        return
    raise ValueError(
        f"model: its output is computed by a TensorFlow {op_type} op{_after(stripped)} (e.g. "
        f"tf.nn.{activation} in call()), so it holds probabilities, not logits; laplace_tf "
        f"would apply the {activation} a second time. " + _expose(activation)
    )


def check_output_values(outputs, likelihood: Likelihood | str,
                        stripped: ProbabilityOutput | None) -> None:
    """Refuse outputs that are probabilities for a softmax likelihood (classification): every
    entry in ``[0, 1]`` and every row summing to 1 (within 1e-3). Other likelihoods are not
    checked by value.

    Args:
        outputs: the model outputs on a batch ``[N, K]`` (after removing ``stripped``).
        likelihood: the :class:`~laplace_tf.likelihoods.Likelihood` of the outputs, or its name.
        stripped: the final softmax/sigmoid already removed from the model output, if any.

    Example:
        >>> check_output_values(np.array([[2.0, -1.0, 0.5]]), "classification", None)
        >>> check_output_values(np.array([[0.7, 0.1, 0.2]]), "classification", None)
        Traceback (most recent call last):
        ...
        ValueError: model: its outputs on the first batch are probabilities, ...
    """
    if as_likelihood(likelihood).output_activation != "softmax":
        return
    values = np.asarray(outputs, np.float64)
    if (
        values.size and values.shape[-1] >= 2
        and np.all((values >= -_TOLERANCE) & (values <= 1 + _TOLERANCE))
        and np.all(np.abs(values.sum(axis=-1) - 1) <= _TOLERANCE)
    ):
        raise ValueError(
            f"model: its outputs on the first batch are probabilities, not logits (every "
            f"entry is in [0, 1] and every row sums to 1){_after(stripped)}; laplace_tf would "
            "apply softmax to them a second time. " + _expose("softmax")
        )


def _after(stripped: ProbabilityOutput | None) -> str:
    if stripped is None:
        return ""
    return (f" even after removing the {stripped.activation} of {stripped.operation.name!r} "
            "(is it applied twice?)")


def _expose(activation: str) -> str:
    """How to make a model return logits, for error messages."""
    softmax_layer = " or Softmax()" if activation == "softmax" else ""
    return (
        f"Make the model return logits: end it with a layer that applies the {activation} "
        f"(Dense(..., activation='{activation}'), Activation('{activation}'){softmax_layer}, "
        "optionally followed by Dropout), which laplace_tf removes; or, in a subclassed "
        "model, return the last Dense layer's output from call() and apply the "
        f"{activation} outside the model. laplace_tf applies the {activation} itself."
    )


def _walk_back(model: keras.Model) -> Iterator[keras.Operation]:
    """The operations that lead to the model output, last first, while each has one input."""
    if isinstance(model, keras.Sequential):
        yield from reversed(model.layers)
        return
    outputs = getattr(model, "outputs", None)
    if not outputs or len(outputs) != 1:
        return
    tensor = outputs[0]
    while hasattr(tensor, "_keras_history"):
        operation, node_index, _ = tensor._keras_history
        yield operation
        inputs = operation._inbound_nodes[node_index].input_tensors
        if len(inputs) != 1:
            return
        tensor = inputs[0]


def _output_rank(model: keras.Model) -> int | None:
    outputs = getattr(model, "outputs", None)
    return len(outputs[0].shape) if outputs and len(outputs) == 1 else None


def _probability_activation(operation: keras.Operation, rank: int | None) -> str | None:
    """``"softmax"``/``"sigmoid"`` if ``operation`` outputs that of its (pre-activation) input."""
    if isinstance(operation, keras.layers.Lambda):
        function = None if operation.arguments else operation.function
    elif hasattr(operation, "activation"):  # Dense, Conv*, Activation, ...
        function = operation.activation
    elif isinstance(operation, keras.layers.Layer) and \
            not isinstance(operation, keras.layers.Softmax):
        return None
    else:  # a Softmax layer, or keras.ops.softmax / keras.ops.sigmoid in a Functional model
        name = type(operation).__name__
        if name == "Softmax":
            return "softmax" if _last_axis(operation.axis, rank) else None
        return "sigmoid" if name == "Sigmoid" else None
    # By identity, not by name: a custom function called "softmax" may do something else.
    return next((kind for known, kind in _FUNCTIONS.items() if function is known), None)


def _last_axis(axis, rank: int | None) -> bool:
    axes = tuple(axis) if isinstance(axis, (list, tuple)) else (axis,)
    return len(axes) == 1 and (axes[0] == -1 or (rank is not None and axes[0] == rank - 1))
