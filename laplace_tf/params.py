"""Keras weights as one flat vector, and calling a model with given weights.

The flat vector is ``model.trainable_variables`` restricted to a subset of layers, in that
order, each variable raveled row-major (see DESIGN.md). A Dense layer ``(in, out)`` with a
bias therefore occupies the row-major ravel of the ``(in + 1, out)`` matrix whose last row is
the bias.

Example:
    >>> import keras, numpy as np
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> weights = WeightSubset(model)
    >>> weights.n_params                      # 3 * 2 kernel + 2 bias
    8
    >>> flat = weights.flat_values()
    >>> [tuple(t.shape) for t in weights.unflatten(flat)]
    [(3, 2), (2,)]
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

logger = logging.getLogger("laplace_tf")

_PROBABILITY_ACTIVATIONS = {"softmax": "softmax", "sigmoid": "sigmoid"}


@dataclass(frozen=True)
class LayerSlice:
    """One layer's contiguous part of the flat weight vector."""

    layer: keras.layers.Layer
    variables: tuple
    offset: int
    size: int

    @property
    def name(self) -> str:
        return self.layer.name


def leaf_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """All layers of ``model`` that own weights directly (nested models are walked)."""
    return [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if not layer._layers and layer.trainable_variables
    ]


class WeightSubset:
    """The trainable weights of some layers of a Keras model, as one flat vector.

    Args:
        model: a built Keras model (Sequential, Functional or subclassed).
        layers: the layers whose weights to use; ``None`` means all layers with weights.

    Raises:
        ValueError: if the model is not built or a layer has no trainable weights.
    """

    def __init__(self, model: keras.Model, layers: Sequence[keras.layers.Layer] | None = None):
        if not isinstance(model, keras.Model):
            raise TypeError(
                f"model: expected a keras.Model, got {type(model).__name__}. "
                "Wrap your layers in keras.Sequential or keras.Model."
            )
        if not model.built or not model.trainable_variables:
            raise ValueError(
                "model: the model is not built or has no trainable weights; call it once on a "
                "batch of inputs (or give it a keras.Input) before using laplace_tf."
            )
        owner = {id(v): layer for layer in leaf_layers(model) for v in layer.trainable_variables}
        chosen = None if layers is None else {id(layer) for layer in layers}
        if layers is not None:
            for layer in layers:
                if not layer.trainable_variables:
                    raise ValueError(
                        f"layers: layer {layer.name!r} has no trainable weights; choose layers "
                        "that have weights."
                    )
        self.model = model
        slices: list[LayerSlice] = []
        offset = 0
        for variable in model.trainable_variables:
            layer = owner.get(id(variable))
            if layer is None or (chosen is not None and id(layer) not in chosen):
                continue
            size = int(np.prod(variable.shape))
            if slices and slices[-1].layer is layer:
                last = slices[-1]
                slices[-1] = LayerSlice(layer, last.variables + (variable,), last.offset, last.size + size)
            else:
                slices.append(LayerSlice(layer, (variable,), offset, size))
            offset += size
        self.slices: tuple[LayerSlice, ...] = tuple(slices)
        self.variables = [v for s in slices for v in s.variables]
        self.n_params = offset
        self._subset_ids = [id(v) for v in self.variables]

    @property
    def layers(self) -> list[keras.layers.Layer]:
        return [s.layer for s in self.slices]

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [tuple(v.shape) for v in self.variables]

    @property
    def dtype(self) -> tf.DType:
        return tf.as_dtype(self.variables[0].dtype)

    def values(self) -> list[tf.Tensor]:
        """The current values of the subset's variables."""
        return [tf.convert_to_tensor(v.value) for v in self.variables]

    def flat_values(self) -> tf.Tensor:
        """The current weights as one vector ``[P]``."""
        return self.flatten(self.values())

    def flatten(self, tensors: Sequence[tf.Tensor]) -> tf.Tensor:
        """Ravel a list shaped like the variables into one vector ``[P]``."""
        return tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)

    def unflatten(self, flat: tf.Tensor) -> list[tf.Tensor]:
        """Split a vector ``[..., P]`` into tensors ``[..., *variable.shape]``."""
        sizes = [int(np.prod(s)) for s in self.shapes]
        batch_shape = tf.shape(flat)[:-1]
        parts = tf.split(flat, sizes, axis=-1)
        return [
            tf.reshape(p, tf.concat([batch_shape, tf.constant(s, tf.int32)], 0)) if s else
            tf.reshape(p, batch_shape)
            for p, s in zip(parts, self.shapes, strict=True)
        ]

    def all_trainable_values(self, weights: Sequence[tf.Tensor] | None) -> list[tf.Tensor]:
        """The model's full trainable list with this subset's entries replaced by ``weights``."""
        if weights is None:
            return [v.value for v in self.model.trainable_variables]
        replaced = dict(zip(self._subset_ids, weights, strict=True))
        return [replaced.get(id(v), v.value) for v in self.model.trainable_variables]

    def signature(self) -> list[dict]:
        """Layer names, variable paths and shapes: what a saved posterior must match."""
        return [
            {"layer": s.name, "variables": [v.path for v in s.variables],
             "shapes": [list(v.shape) for v in s.variables]}
            for s in self.slices
        ]

    def fingerprint(self) -> str:
        """A SHA-256 of the current weights (float64 bytes), to recognise the MAP."""
        digest = hashlib.sha256()
        for v in self.variables:
            digest.update(np.ascontiguousarray(np.asarray(v.numpy(), np.float64)).tobytes())
        return digest.hexdigest()


def output_layer(model: keras.Model) -> keras.layers.Layer | None:
    """The layer that produces the model output, when Keras records it (None if unknown)."""
    if isinstance(model, keras.Sequential):
        return model.layers[-1] if model.layers else None
    outputs = getattr(model, "outputs", None)
    if outputs and len(outputs) == 1 and hasattr(outputs[0], "_keras_history"):
        return outputs[0]._keras_history.operation
    return None


def output_activation(model: keras.Model) -> str | None:
    """``"softmax"``/``"sigmoid"`` if the model's last layer applies it, else None."""
    layer = output_layer(model)
    if layer is None:
        return None
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    activation = getattr(layer, "activation", None)
    name = getattr(activation, "__name__", None)
    return _PROBABILITY_ACTIVATIONS.get(name)


PreactivationHook = Callable[[keras.layers.Layer, tf.Tensor, tf.Tensor], tf.Tensor]


@contextlib.contextmanager
def _patched_calls(
    layers: Sequence[keras.layers.Layer],
    hook: PreactivationHook | None,
    strip_output_of: keras.layers.Layer | None,
) -> Iterator[None]:
    """Temporarily wrap layer calls to see inputs and pre-activations.

    Each layer in ``layers`` runs with its fused activation switched off; ``hook(layer,
    inputs, z)`` sees its inputs and pre-activation ``z`` and returns the tensor to continue
    with (e.g. ``z`` plus a zero probe); then the activation is applied. ``strip_output_of``
    is the output layer whose softmax/sigmoid is dropped so that the model returns logits.
    """
    patched = list(layers)
    if strip_output_of is not None and all(layer is not strip_output_of for layer in patched):
        patched.append(strip_output_of)
    originals = {}

    def wrap(layer, original):
        def call(inputs, *args, **kwargs):
            if isinstance(layer, keras.layers.Softmax):
                z, activation = inputs, None
            else:
                activation = getattr(layer, "activation", None)
                if activation is not None:
                    layer.activation = keras.activations.linear
                try:
                    z = original(inputs, *args, **kwargs)
                finally:
                    if activation is not None:
                        layer.activation = activation
            if hook is not None and any(layer is hooked for hooked in layers):
                z = hook(layer, inputs, z)
            if layer is strip_output_of or activation is None:
                return z
            return activation(z)

        return call

    try:
        for layer in patched:
            originals[id(layer)] = (layer, layer.call)
            layer.call = wrap(layer, layer.call)
        yield
    finally:
        for layer, _ in originals.values():
            del layer.call


class LogitModel:
    """Calls a Keras model with given subset weights and returns logits.

    A model whose last layer applies softmax or sigmoid is called without it (logged once),
    so that curvature and predictives work on logits.

    Args:
        model: a built Keras model.
        subset: the weights that calls may replace (default: all).

    Example:
        >>> import keras, tensorflow as tf
        >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3, "softmax")])
        >>> f = LogitModel(model)
        >>> logits = f(tf.ones((4, 2)))            # pre-softmax outputs [4, 3]
        >>> bool(tf.reduce_all(tf.abs(tf.nn.softmax(logits) - model(tf.ones((4, 2)))) < 1e-6))
        True
    """

    def __init__(self, model: keras.Model, subset: WeightSubset | None = None):
        self.model = model
        self.subset = subset if subset is not None else WeightSubset(model)
        self.output_activation = output_activation(model)
        self._strip = output_layer(model) if self.output_activation else None
        if self.output_activation:
            logger.info(
                "laplace_tf: the model's last layer %r applies %s; using its pre-activation "
                "outputs (logits).", self._strip.name, self.output_activation,
            )

    def __call__(
        self,
        x,
        weights: Sequence[tf.Tensor] | None = None,
        *,
        layers: Sequence[keras.layers.Layer] = (),
        hook: PreactivationHook | None = None,
    ) -> tf.Tensor:
        """Logits of ``x`` with the subset's weights set to ``weights`` (None: current).

        ``layers``/``hook``: see :func:`_patched_calls`; used to read layer inputs and to add
        probes to pre-activations. The model itself is never modified.
        """
        trainable = self.subset.all_trainable_values(weights)
        non_trainable = [v.value for v in self.model.non_trainable_variables]
        with _patched_calls(layers, hook, self._strip):
            kwargs = {"training": False} if self.model._call_has_training_arg else {}
            outputs, _ = self.model.stateless_call(trainable, non_trainable, x, **kwargs)
        if isinstance(outputs, (list, tuple, dict)):
            raise ValueError(
                "model: laplace_tf needs a model with one output tensor; got "
                f"{type(outputs).__name__}. Wrap the model so that it returns one tensor."
            )
        return outputs
