"""Logits or probabilities? The final softmax/sigmoid of a Keras model, found and checked.

Curvature and predictives work on logits, and laplace_tf applies the softmax/sigmoid itself.
A model that returns probabilities would have it applied twice: a wrong answer with no error.
Two lines of defence:

* **Structure** (:func:`probability_output`): walking back from the output of a Functional or
  Sequential model through layers that return their input unchanged at inference
  (``Dropout`` and its variants, ``GaussianNoise``, ``ActivityRegularization``, ``Identity``;
  the model is always called with ``training=False``), the first other operation is a
  softmax/sigmoid when it is a layer whose activation is one (``Dense(.., "softmax")``,
  ``Activation("sigmoid")``, ...), a ``Softmax`` layer or ``keras.ops.softmax``/``sigmoid``
  over the last axis, or a ``Lambda`` of ``tf.nn.softmax``/``tf.nn.sigmoid`` (and their
  ``keras`` twins) without extra arguments. :class:`~laplace_tf.params.LogitModel` then calls
  the model without it: the logits are exact, not guessed.
* **Values** (:func:`check_outputs`), on the first batch of every fit, for what structure
  cannot see (``tf.nn.softmax`` inside a subclassed model's ``call()``, a ``Lambda`` of a
  custom function, a softmax applied twice). ``"classification"``: every entry in ``[0, 1]``
  AND every row summing to 1 (within 1e-3, which float16 softmaxes meet) is refused. Logits
  of >= 2 classes satisfy both on every row of a batch only by design (a model built to
  output a distribution), not by chance: a false positive is not a practical concern.
  ``"binary"``: one output in ``(0, 1]`` on the whole batch is weaker evidence (a weak model
  on imbalanced data may have every logit in ``(0, 1]``, i.e. probabilities 0.5 to 0.73), so
  it is a warning, and only when no final sigmoid was found structurally. Zero is left out:
  a sigmoid is 0 only below about -88 (float32), while all-zero logits are common (a head
  initialised at zero).
  ``"regression"``: probabilities may be the targets (proportions), so only a structural
  softmax/sigmoid gives a warning, and the output is used as it is.

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
_EXPOSE = (
    "Make the model return logits: end it with a layer that applies the {activation} "
    "(Dense(..., activation='{activation}'), Activation('{activation}'){softmax_layer}, "
    "optionally followed by Dropout), which laplace_tf removes; or, in a subclassed model, "
    "return the last Dense layer's output from call() and apply the {activation} outside the "
    "model. laplace_tf applies the {activation} itself."
)


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


def check_outputs(outputs, likelihood: str, stripped: ProbabilityOutput | None) -> None:
    """Refuse or warn when a batch of what should be logits looks like probabilities.

    Args:
        outputs: the model outputs ``[N, K]`` (after stripping ``stripped``).
        likelihood: ``"classification"``, ``"binary"`` or ``"regression"``.
        stripped: the softmax/sigmoid already removed from the model output, if any.

    Raises:
        ValueError: ``"classification"`` outputs with every entry in ``[0, 1]`` and every row
            summing to 1 (the message says how to expose the logits).

    Warns:
        UserWarning: ``"binary"`` outputs all in ``(0, 1]`` when no sigmoid was stripped.

    Example:
        >>> check_outputs(np.array([[2.0, -1.0, 0.5]]), "classification", None)   # logits
        >>> check_outputs(np.array([[0.7, 0.1, 0.2]]), "classification", None)
        Traceback (most recent call last):
        ...
        ValueError: model: its outputs on the first batch are probabilities, ...
    """
    values = np.asarray(outputs, np.float64)
    in_unit_interval = bool(np.all((values >= -_TOLERANCE) & (values <= 1 + _TOLERANCE)))
    if not in_unit_interval or values.size == 0:
        return
    after = "" if stripped is None else (
        f" even after removing the {stripped.activation} of "
        f"{stripped.operation.name!r} (is it applied twice?)"
    )
    if likelihood == "classification":
        if values.shape[-1] >= 2 and np.all(np.abs(values.sum(axis=-1) - 1) <= _TOLERANCE):
            raise ValueError(
                f"model: its outputs on the first batch are probabilities, not logits (every "
                f"entry is in [0, 1] and every row sums to 1){after}; laplace_tf would apply "
                "softmax to them a second time. "
                + _EXPOSE.format(activation="softmax", softmax_layer=" or Softmax()")
            )
    elif likelihood == "binary" and stripped is None and np.all(values > 0):
        warnings.warn(
            "model: its outputs on the first batch all lie in (0, 1]. If they are "
            "probabilities (e.g. tf.sigmoid inside call()), laplace_tf applies the sigmoid a "
            "second time and its answers are wrong. "
            + _EXPOSE.format(activation="sigmoid", softmax_layer="")
            + " If they are logits, ignore this warning.",
            UserWarning, stacklevel=2,
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
    elif isinstance(operation, keras.layers.Layer):  # e.g. keras.layers.Softmax
        return "softmax" if isinstance(operation, keras.layers.Softmax) and \
            _last_axis(operation.axis, rank) else None
    else:  # keras.ops.softmax / keras.ops.sigmoid in a Functional model
        name = type(operation).__name__
        if name == "Softmax":
            return "softmax" if _last_axis(operation.axis, rank) else None
        return "sigmoid" if name == "Sigmoid" else None
    # By identity, not by name: a custom function called "softmax" may do something else.
    return next((kind for known, kind in _FUNCTIONS.items() if function is known), None)


def _last_axis(axis, rank: int | None) -> bool:
    axes = tuple(axis) if isinstance(axis, (list, tuple)) else (axis,)
    return len(axes) == 1 and (axes[0] == -1 or (rank is not None and axes[0] == rank - 1))
