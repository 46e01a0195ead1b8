"""Kronecker rules: which layers factor as ``A ⊗ G``, and the input rows ``A`` is built from.

A layer whose pre-activation output at every location ``t`` (an example, a position in a
sequence or a pixel of a feature map) is ``z_t = a_t^T W``, with ``W`` the kernel reshaped to
``[din, dout]`` and the bias as an extra last row matched by a trailing 1 in ``a_t``, has the
weight gradient ``dW = sum_t a_t g_t^T`` for any scalar, with ``g_t`` the gradient with respect
to ``z_t``. K-FAC keeps ``A = mean_t a_t a_t^T`` and ``G = sum_t g_t g_t^T``. A rule gives the
rows ``a_t`` from the inputs the layer was called with; the rows ``g_t`` are the pre-activation
gradients reshaped to ``[-1, dout]`` whatever the layer type. Supporting a new layer type is
one :func:`register_kron_rule` call (rules are looked up by exact type, so that a subclass with
its own ``call`` never gets a rule that does not fit it).

Example:
    The rows of a causal Conv1D reproduce its pre-activation output through the flattened
    ``(kernel, bias)`` matrix:

    >>> import keras, tensorflow as tf
    >>> layer = keras.layers.Conv1D(2, 3, padding="causal", dilation_rate=2)
    >>> x = tf.random.normal((4, 7, 3))
    >>> z = layer(x)
    >>> rows = input_rows(layer, x)                  # [4 * 7, 3 * 3 + 1]
    >>> W = tf.concat([tf.reshape(layer.kernel, [-1, 2]), layer.bias[None]], axis=0)
    >>> bool(tf.reduce_max(tf.abs(rows @ W - tf.reshape(z, [-1, 2]))) < 1e-5)
    True
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from laplace_tf.params import LayerSlice


class KronRule:
    """How one layer type's inputs become the rows ``a_t`` of its Kronecker factor ``A``.

    Subclasses implement :meth:`rows` and, when some configurations of the layer type do not
    factor, :meth:`unsupported`. The layer must have a ``kernel`` variable ``[..., dout]``
    and a ``bias`` (``None`` without bias), as Keras Dense and convolution layers do.
    """

    def unsupported(self, layer: keras.layers.Layer) -> str | None:
        """Why this layer cannot use the rule (None if it can)."""
        return None

    def rows(self, layer: keras.layers.Layer, inputs: tf.Tensor) -> tf.Tensor:
        """The input rows ``[n, din]`` (without the bias column) of one call."""
        raise NotImplementedError


class _DenseRule(KronRule):
    """Dense on inputs of any rank >= 2: every leading position is one more row."""

    def rows(self, layer, inputs):
        return tf.reshape(inputs, [-1, _n_inputs(layer)])


class _ConvRule(KronRule):
    """Conv1D / Conv2D (channels_last, ungrouped): image patches in kernel order.

    ``tf.image.extract_patches`` flattens each patch as ``(kh, kw, cin)`` row-major, which is
    the row-major flatten of the kernel ``(kh, kw, cin, cout)`` over its first three axes. A
    Conv1D is the same on ``[N, 1, L, C]`` images, with 'causal' padding done by hand as
    Keras does (left padding, then 'valid').
    """

    def unsupported(self, layer):
        if layer.groups != 1:
            return f"groups={layer.groups} (grouped convolution)"
        if layer.data_format != "channels_last":
            return f"data_format={layer.data_format!r} (only 'channels_last' has a rule)"
        return None

    def rows(self, layer, inputs):
        images = inputs
        sizes, strides, rates = layer.kernel_size, layer.strides, layer.dilation_rate
        padding = layer.padding
        if layer.rank == 1:
            images = inputs[:, None]
            sizes, strides, rates = (1, *sizes), (1, *strides), (1, *rates)
            if padding == "causal":
                left = (sizes[1] - 1) * rates[1]
                images = tf.pad(images, [[0, 0], [0, 0], [left, 0], [0, 0]])
                padding = "valid"
        patches = tf.image.extract_patches(
            images, sizes=[1, *sizes, 1], strides=[1, *strides, 1], rates=[1, *rates, 1],
            padding=padding.upper(),
        )
        return tf.reshape(patches, [-1, _n_inputs(layer)])


KRON_RULES: dict[type, KronRule] = {
    keras.layers.Dense: _DenseRule(),
    keras.layers.Conv1D: _ConvRule(),
    keras.layers.Conv2D: _ConvRule(),
}


def register_kron_rule(layer_type: type, rule: KronRule) -> None:
    """Give layers of exactly ``layer_type`` (not its subclasses) the Kronecker rule ``rule``
    (replacing any rule it had), for ``hessian_structure="kron"`` and the GLM predictive.

    Args:
        layer_type: a subclass of ``keras.layers.Layer`` with a ``kernel [..., dout]`` and a
            ``bias`` (``None`` without bias), whose pre-activation at every location is
            ``rows @ [kernel reshaped to [din, dout]; bias]``.
        rule: a :class:`KronRule` whose :meth:`KronRule.rows` gives those rows.

    Raises:
        TypeError: ``layer_type`` is not a Keras layer class, or ``rule`` not a KronRule.

    Example:
        A Dense layer that doubles its inputs; its rows are the doubled inputs:

        >>> import keras, tensorflow as tf
        >>> class Doubled(keras.layers.Dense):
        ...     def call(self, inputs):
        ...         return super().call(2.0 * inputs)
        >>> class DoubledRule(KronRule):
        ...     def rows(self, layer, inputs):
        ...         return tf.reshape(2.0 * inputs, [-1, layer.kernel.shape[0]])
        >>> register_kron_rule(Doubled, DoubledRule())
        >>> layer = Doubled(2)
        >>> x = tf.random.normal((4, 3))
        >>> z = layer(x)
        >>> W = tf.concat([layer.kernel, layer.bias[None]], axis=0)
        >>> bool(tf.reduce_max(tf.abs(input_rows(layer, x) @ W - z)) < 1e-5)
        True
    """
    if not (isinstance(layer_type, type) and issubclass(layer_type, keras.layers.Layer)):
        raise TypeError(
            f"layer_type: expected a subclass of keras.layers.Layer; got {layer_type!r}."
        )
    if not isinstance(rule, KronRule):
        raise TypeError(
            f"rule: expected an instance of laplace_tf.curvature.KronRule (a subclass "
            f"implementing rows(layer, inputs)); got {type(rule).__name__}."
        )
    KRON_RULES[layer_type] = rule


def _n_inputs(layer: keras.layers.Layer) -> int:
    return int(np.prod(layer.kernel.shape[:-1]))


def fallback_reason(layer_slice: LayerSlice) -> str | None:
    """Why a layer's weights get a diagonal block instead of ``A ⊗ G`` (None: they don't).

    A layer needs a rule for its exact type, a configuration the rule supports, and trainable
    weights that are exactly its kernel followed by its bias (not LoRA factors, quantised or
    partly frozen weights).
    """
    layer = layer_slice.layer
    rule = KRON_RULES.get(type(layer))
    if rule is None:
        return f"{type(layer).__name__} has no Kronecker rule"
    reason = rule.unsupported(layer)
    if reason is not None:
        return reason
    bias = getattr(layer, "bias", None)
    expected = (getattr(layer, "kernel", None),) + (() if bias is None else (bias,))
    if len(expected) != len(layer_slice.variables) or any(
        a is not b for a, b in zip(expected, layer_slice.variables, strict=True)
    ):
        return "its trainable weights are not exactly (kernel, bias): LoRA, quantised or frozen"
    return None


def input_rows(layer: keras.layers.Layer, inputs: tf.Tensor) -> tf.Tensor:
    """Rows ``a_t`` ``[n, din (+1)]`` of one call, with the constant 1 appended for a bias."""
    rows = KRON_RULES[type(layer)].rows(layer, inputs)
    if getattr(layer, "bias", None) is None:
        return rows
    return tf.concat([rows, tf.ones_like(rows[:, :1])], axis=1)
