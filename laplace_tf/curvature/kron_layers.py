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

A rule decides the curvature blocks its layer gets (:meth:`KronRule.blocks`): ``A ⊗ G`` for the
rules above; a scale-and-shift layer (``LayerNormalization``, ``BatchNormalization`` at
inference: ``z_t = xhat_t * gamma + beta`` channel by channel), whose weight gradient is not an
outer product, gets the exact GGN / EF block over its ``gamma`` and ``beta`` from the same
pre-activation gradients (kfac-jax's scale-and-shift blocks): a :class:`DenseBlock` up to
:data:`MAX_DENSE_WEIGHTS` weights, its exact diagonal above. An Embedding's ``A`` is diagonal
(token counts); above :data:`MAX_VOCABULARY` tokens it gets its exact diagonal.

Grouped convolutions (``groups = q > 1``) and depthwise convolutions (``q`` = input channels)
have ``q`` rows per location: row ``(t, j)`` holds the patch of group ``j``'s input channels
and acts on group ``j``'s ``dout / q`` outputs only, ``z_t[group j] = a_{t,j}^T W[:, group j]``.
So ``dW = sum_{t,j} a_{t,j} (g_t * m_j)^T`` exactly, with ``m_j`` the mask of group ``j``'s
outputs: K-FAC treats the groups as more shared locations (:attr:`KronShape.groups`). Its ``A``
is one mean over groups and locations and its ``G`` is block-diagonal over the groups: a
stated approximation that is exact for ``q = 1`` (a grouped layer's exact GGN also couples the
groups, and each group has its own inputs). A layer with several kernels (SeparableConv1D/2D)
gets one block per kernel (:meth:`KronRule.parts`). ``reduce=True`` (K-FAC-reduce, see
:mod:`~laplace_tf.curvature.kron`) averages each example's rows and sums its gradients over
its locations and groups before the outer products.

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

from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from laplace_tf.blocks import Block, DenseBlock, DiagBlock, KronBlock
from laplace_tf.curvature._kron_sums import gram
from laplace_tf.params import LayerSlice, forget_shared_steps

MAX_DENSE_WEIGHTS = 1024
"""Scale-and-shift layers with at most this many weights get a dense block, larger ones the
exact diagonal (a dense block costs the square of the weights, its factor their cube)."""

ROW_CHUNKS = 10
"""A scale-and-shift block multiplies its normalised inputs with the output gradients in at
most this many chunks of the ``R`` rows (one row at a time for 10 classes): one product of
all rows would be as large as the gradients themselves."""

MAX_VOCABULARY = 2048
"""Embeddings with a larger vocabulary get the exact diagonal of their block instead of
``A ⊗ G`` (whose factor ``A`` over the vocabulary is ``V x V``, eigendecomposed)."""


class KronShape(NamedTuple):
    """One Kronecker block of a layer: its weights as a row-major ``[din, dout]`` matrix (the
    row of a bias included), ``A`` ``[din, din]``, ``G`` ``[dout, dout]``, and ``groups``
    output groups (see the module docstring)."""

    din: int
    dout: int
    groups: int = 1


class KronPart(NamedTuple):
    """One Kronecker block's rows and gradients from one call of its layer."""

    rows: tf.Tensor  # [n, din - bias]: example-major, the same number per example
    grads: tf.Tensor  # [R, N, locations..., dout]: gradients of the block's pre-activation
    bias: bool  # the block's last input is a bias: a constant 1 after each row
    columns: np.ndarray | None = None  # the kernel input of each column of rows (None: in order)

    def biased_rows(self) -> tf.Tensor:
        """``rows`` in the kernel's order, with the constant 1 of a bias appended (copies:
        the fit forms neither)."""
        rows = self.rows if self.columns is None else tf.gather(
            self.rows, np.argsort(self.columns), axis=1)
        return _ones_appended(rows) if self.bias else rows


class KronRule:
    """How one layer type's weights get their curvature blocks from one forward pass.

    For the Kronecker rules (``outer_product = True``) subclasses implement :meth:`rows` and,
    when some configurations of the layer type do not factor, :meth:`unsupported`. The layer
    must have a ``kernel`` variable ``[..., dout]`` and a ``bias`` (``None`` without bias), as
    Keras Dense and convolution layers do; rules for other weights override :meth:`variables`
    and :meth:`shapes`; a layer with several kernels (a separable convolution) gets one block
    per kernel: its rule overrides :meth:`shapes` and :meth:`parts` too; a layer whose block
    takes its weights in another order than the flat one (a transposed convolution's kernel
    ``(k..., cout, cin)``) overrides :meth:`order`. A rule whose weight
    gradient is not a sum of outer products sets ``outer_product = False`` and overrides
    :meth:`blocks` (full and diagonal posteriors then take its per-example gradients by
    autodiff).
    """

    outer_product = True

    def unsupported(self, layer: keras.layers.Layer) -> str | None:
        """Why this layer cannot use the rule (None if it can)."""
        return None

    def variables(self, layer: keras.layers.Layer) -> tuple:
        """The weights the rule covers, in the order of the flat vector: kernel, bias."""
        bias = getattr(layer, "bias", None)
        return (getattr(layer, "kernel", None),) + (() if bias is None else (bias,))

    def shapes(self, layer: keras.layers.Layer) -> list[KronShape]:
        """The :class:`KronShape` of each block, in weight order: by default one,
        ``(prod(kernel.shape[:-1]) (+1 for a bias), kernel.shape[-1])``. The last block's
        ``dout`` is the width of the layer's pre-activation (:func:`output_size`)."""
        return [KronShape(_n_inputs(layer) + _has_bias(layer), int(layer.kernel.shape[-1]))]

    def kind(self, layer: keras.layers.Layer) -> tuple[str, str | None]:
        """The kind of block :meth:`blocks` gives (``"kron"``, ``"dense"``, ``"diag"``) and,
        for a diagonal one, why."""
        return "kron", None

    def order(self, layer: keras.layers.Layer) -> np.ndarray | None:
        """The layer's weights in the order of its one block, when it is not the flat order:
        position ``i`` of the block's row-major ``[din, dout]`` matrix holds the layer's weight
        ``order[i]`` (kernel then bias, as flattened). None: the same order (every rule but
        the transposed convolutions')."""
        return None

    def rows(self, layer: keras.layers.Layer, inputs: tf.Tensor) -> tf.Tensor:
        """The input rows ``[n, din]`` (without the bias column) of one call: example-major,
        the same number per example (``groups`` rows per location, group-minor)."""
        raise NotImplementedError

    def parts(self, layer: keras.layers.Layer, inputs: tf.Tensor,
              gradients: tf.Tensor) -> list[KronPart]:
        """Each block's :class:`KronPart` from one call's ``inputs`` and the gradients
        ``[R, N, locations..., dout]`` of the layer's pre-activation output."""
        rows = _checked_rows(layer, self.rows(layer, inputs))
        (shape,) = self.shapes(layer)
        per_example = tf.reduce_prod(tf.shape(gradients)[2:]) // shape.dout * shape.groups
        tf.debugging.assert_equal(  # groups rows for every dout outputs of an example
            tf.shape(rows)[0], tf.shape(gradients)[1] * per_example, message=(
                f"register_kron_rule: the rule of {type(layer).__name__} layer {layer.name!r} "
                "gave a number of rows other than examples x locations of its output (x groups)"))
        return [KronPart(rows, gradients, bool(_has_bias(layer)))]

    def blocks(self, layer: keras.layers.Layer, inputs: tf.Tensor, gradients: tf.Tensor,
               w: tf.Tensor | None, reduce: bool = False) -> list[Block]:
        """The blocks of one call in sum form, one per :meth:`shapes` entry: ``A`` the
        ``w``-weighted sum of ``a a^T`` over each part's rows (``w [N]``; None: all 1), ``G``
        the sum of ``g g^T`` over its gradients (already weighted), block-diagonal over its
        output groups; ``reduce``: K-FAC-reduce (see the module docstring)."""
        return [_kron_block(part, shape, w, reduce) for part, shape in
                zip(self.parts(layer, inputs, gradients), self.shapes(layer), strict=True)]


def _row_weights(w: tf.Tensor | None, n_rows, dtype) -> tf.Tensor:
    """Each example's weight repeated over its rows (example-major); ones for ``w=None``."""
    if w is None:
        return tf.ones([n_rows], dtype)
    return tf.repeat(w, n_rows // tf.maximum(tf.shape(w)[0], 1))


def _kron_block(part: KronPart, shape: KronShape, w: tf.Tensor | None,
                reduce: bool) -> KronBlock:
    """The block of one part in sum form. With ``shape.groups`` output groups the gradient of
    row ``(t, j)`` is ``g_t`` on group ``j``'s outputs, zero elsewhere (``G`` block-diagonal
    over the groups). ``reduce``: each example's rows are first averaged and its gradients summed over its
    locations (and groups: the masked gradients of the groups sum to ``g_t``)."""
    a_rows, gradients, bias, columns = part
    dout, groups = shape.dout, shape.groups
    if reduce:
        sizes = tf.shape(gradients)
        a_rows = tf.reduce_mean(tf.reshape(a_rows, [sizes[1], -1, a_rows.shape[-1]]), axis=1)
        gradients = tf.reduce_sum(tf.reshape(gradients, [sizes[0], sizes[1], -1, dout]), axis=2)
    row_weights = None if w is None else _row_weights(w, tf.shape(a_rows)[0], a_rows.dtype)
    n = (tf.cast(tf.shape(a_rows)[0], a_rows.dtype) if row_weights is None
         else tf.reduce_sum(row_weights))
    block = _outer_block(_input_factor(a_rows, row_weights, bias, columns), n, gradients, dout)
    if groups == 1 or reduce:
        return block
    size = dout // groups
    mask = np.kron(np.eye(groups), np.ones((size, size))).astype(block.G.dtype.as_numpy_dtype)
    return KronBlock(block.A, block.G * mask, block.n)


def _input_factor(rows: tf.Tensor, row_weights: tf.Tensor | None, bias: bool,
                  columns: np.ndarray | None) -> tf.Tensor:
    """``A = sum_t w_t a_t a_t^T`` (sum form) with ``a_t = [rows_t, 1]`` for a bias, in the
    kernel's order, without copying the rows (they are the largest buffer of a convolution's
    block): the bias row and column are the weighted sums of the rows, the rows are scaled by
    ``sqrt(w)`` (weights are >= 0) only for ``row_weights`` given (None: all 1), and rows whose
    ``columns`` are not in the kernel's order get ``A`` permuted instead."""
    A = gram(rows if row_weights is None else rows * tf.sqrt(row_weights)[:, None])
    if bias:
        if row_weights is None:
            column = tf.reduce_sum(rows, axis=0)[:, None]
            corner = tf.cast(tf.shape(rows)[0], rows.dtype)[None, None]
        else:
            column = tf.linalg.matvec(rows, row_weights, transpose_a=True)[:, None]
            corner = tf.reduce_sum(row_weights)[None, None]
        A = tf.concat([tf.concat([A, column], axis=1),
                       tf.concat([tf.transpose(column), corner], axis=1)], axis=0)
    if columns is None:
        return A
    order = np.concatenate([np.argsort(columns), np.arange(len(columns), len(columns) + bias)])
    return tf.gather(tf.gather(A, order), order, axis=1)


def _outer_block(A: tf.Tensor, n: tf.Tensor, gradients: tf.Tensor, dout: int) -> KronBlock:
    """``A`` (sum form) and ``G``, the sum of ``g g^T`` over all ``gradients`` rows."""
    return KronBlock(A, gram(tf.reshape(gradients, [-1, dout])), n)


class _DenseRule(KronRule):
    """Dense on inputs of any rank >= 2: every leading position is one more row."""

    def rows(self, layer, inputs):
        return tf.reshape(inputs, [-1, _n_inputs(layer)])


class _ConvRule(KronRule):
    """Conv1D / Conv2D / Conv3D (channels_last, any ``groups``): patches in kernel order.

    A patch flattened as ``(k..., cin)`` row-major is the row-major flatten of the kernel
    ``(k..., cin, cout)`` over all but its last axis. With ``groups = q``, the kernel is
    ``(k..., cin / q, cout)`` and each location has ``q`` rows, one per group's channels.
    """

    def unsupported(self, layer):
        if layer.data_format != "channels_last":
            return f"data_format={layer.data_format!r} (only 'channels_last' has a rule)"
        return None

    def shapes(self, layer):
        (shape,) = super().shapes(layer)
        return [shape._replace(groups=layer.groups)]

    def parts(self, layer, inputs, gradients):
        """A grouped Conv1D / Conv2D's rows from :func:`_channel_patches` (a depthwise
        convolution: a grouped one is two transposed copies in TensorFlow), channel-major
        within a group: column ``c k + i`` is kernel input ``i cin / q + c``."""
        if layer.groups == 1 or layer.rank == 3:
            return super().parts(layer, inputs, gradients)
        window, per_group = int(np.prod(layer.kernel_size)), int(inputs.shape[-1]) // layer.groups
        rows = tf.reshape(_channel_patches(layer, inputs), [-1, window * per_group])
        columns = np.arange(window * per_group).reshape(window, per_group).T.ravel()
        return [KronPart(rows, gradients, bool(_has_bias(layer)), columns)]

    def rows(self, layer, inputs):
        if layer.rank == 3:
            return tf.reshape(_identity_convolution(layer, inputs), [-1, _n_inputs(layer)])
        if layer.groups == 1:
            return tf.reshape(_patches(layer, inputs), [-1, _n_inputs(layer)])
        part = self.parts(layer, inputs, None)[0]
        return tf.gather(part.rows, np.argsort(part.columns), axis=1)


class _DepthwiseRule(KronRule):
    """DepthwiseConv1D / DepthwiseConv2D: a convolution with one group per input channel.

    The kernel ``(k..., cin, m)`` flattens as the matrix ``[prod(k), cin * m]`` whose column
    ``c * m + i`` is output channel ``c * m + i`` (Keras's order): ``q = cin`` groups of ``m``
    outputs, and the rows of location ``t`` are the patches of each input channel.
    """

    def unsupported(self, layer):
        return _ConvRule().unsupported(layer)

    def shapes(self, layer):
        *window, cin, multiplier = layer.kernel.shape
        return [KronShape(int(np.prod(window)) + _has_bias(layer), int(cin * multiplier),
                          int(cin))]

    def rows(self, layer, inputs):
        return _depthwise_rows(layer, inputs)


class _SeparableRule(KronRule):
    """SeparableConv1D / SeparableConv2D: a depthwise convolution (kernel ``D``, no bias), then
    a pointwise 1x1 convolution (kernel ``P``, the bias): two blocks.

    The depthwise block is :class:`_DepthwiseRule`'s, with the gradients of its output ``u``,
    ``g_u = g P^T`` (``P`` as ``[cin m, cout]``); the pointwise block has the rows
    ``[u_t, 1]`` and the layer's gradients ``g``.
    """

    def unsupported(self, layer):
        return _ConvRule().unsupported(layer)

    def variables(self, layer):
        bias = () if layer.bias is None else (layer.bias,)
        return (layer.depthwise_kernel, layer.pointwise_kernel, *bias)

    def shapes(self, layer):
        *window, cin, multiplier = layer.depthwise_kernel.shape
        middle = int(cin * multiplier)
        return [KronShape(int(np.prod(window)), middle, int(cin)),
                KronShape(middle + _has_bias(layer), int(layer.pointwise_kernel.shape[-1]))]

    def parts(self, layer, inputs, gradients):
        *_, cin, multiplier = layer.depthwise_kernel.shape
        rows = _depthwise_rows(layer, inputs)  # [N * T * cin, window]
        u = keras.ops.depthwise_conv(  # the layer's own depthwise output: no copy of the rows
            inputs, layer.depthwise_kernel, strides=layer.strides, padding=layer.padding,
            data_format=layer.data_format, dilation_rate=layer.dilation_rate)
        u = tf.reshape(u, [-1, cin * multiplier])
        pointwise = tf.reshape(layer.pointwise_kernel, [cin * multiplier, -1])
        middle = tf.einsum("...o,po->...p", gradients, pointwise)
        return [KronPart(rows, middle, False), KronPart(u, gradients, bool(_has_bias(layer)))]


class _TransposeConvRule(KronRule):
    """Conv1DTranspose / Conv2DTranspose / Conv3DTranspose (channels_last): a convolution of
    the input spread out by the strides, so the output at every location ``s`` is
    ``z_s = a_s^T W`` with ``a_s [k..., cin]`` the inputs each kernel tap ``k`` brings to
    ``s`` (zero where none), and ``W [(k..., cin), cout]`` the kernel.

    Keras stores the kernel as ``(k..., cout, cin)``: the block ``A ⊗ G`` is over the weights
    in the order ``(k..., cin, cout)`` then the bias (:meth:`KronRule.order`). The rows are the
    layer's own ``conv_transpose`` with the identity kernel ``[k..., prod(k) cin, cin]``
    (exact: each output channel copies the input one tap brings).
    """

    def unsupported(self, layer):
        return _ConvRule().unsupported(layer)

    def shapes(self, layer):
        *window, cout, cin = layer.kernel.shape
        return [KronShape(int(np.prod(window)) * int(cin) + _has_bias(layer), int(cout))]

    def order(self, layer):
        *window, cout, cin = (int(d) for d in layer.kernel.shape)
        taps = int(np.prod(window))
        kernel = np.arange(taps * cout * cin).reshape(taps, cout, cin).transpose(0, 2, 1)
        return np.concatenate([kernel.ravel(), taps * cout * cin + np.arange(cout * _has_bias(layer))])

    def rows(self, layer, inputs):
        *window, _, cin = layer.kernel.shape
        width = int(np.prod(window)) * int(cin)
        identity = tf.transpose(tf.reshape(tf.eye(width, dtype=inputs.dtype), [*window, cin, width]),
                                [*range(len(window)), len(window) + 1, len(window)])
        rows = keras.ops.conv_transpose(
            inputs, identity, strides=list(layer.strides), padding=layer.padding,
            output_padding=layer.output_padding, dilation_rate=layer.dilation_rate,
            data_format=layer.data_format)
        return tf.reshape(rows, [-1, width])


def _depthwise_rows(layer: keras.layers.Layer, inputs: tf.Tensor) -> tf.Tensor:
    """``[N * T * cin, prod(k)]``: the patch of every input channel at every location."""
    return tf.reshape(_channel_patches(layer, inputs), [-1, int(np.prod(layer.kernel_size))])


def _channel_patches(layer: keras.layers.Layer, inputs: tf.Tensor) -> tf.Tensor:
    """``[N, locations..., cin prod(k)]``: the patch of each input channel at every location
    of a 1-D or 2-D convolution, channel-major, by a depthwise convolution with the layer's
    padding, strides and dilation and the identity kernel ``[k..., cin, prod(k)]`` (output
    channel ``c prod(k) + i`` copies channel ``c`` at tap ``i``; ``prod(k)^2 cin``
    multiply-adds a location)."""
    window, rank = int(np.prod(layer.kernel_size)), len(layer.kernel_size)
    identity = tf.reshape(tf.eye(window, dtype=inputs.dtype), [*layer.kernel_size, 1, window])
    identity = tf.tile(identity, [1] * rank + [int(inputs.shape[-1]), 1])
    inputs, padding = _causal_padded(layer, inputs)
    return keras.ops.depthwise_conv(
        inputs, identity, strides=layer.strides, padding=padding,
        data_format=layer.data_format, dilation_rate=layer.dilation_rate)


def _causal_padded(layer: keras.layers.Layer, inputs: tf.Tensor) -> tuple[tf.Tensor, str]:
    """The inputs and padding of a convolution, a 'causal' one's as Keras' Conv1D does it:
    left padding, then 'valid'."""
    if layer.padding != "causal":
        return inputs, layer.padding
    left = (layer.kernel_size[0] - 1) * layer.dilation_rate[0]
    return tf.pad(inputs, [[0, 0], [left, 0], [0, 0]]), "valid"


def _identity_convolution(layer: keras.layers.Layer, inputs: tf.Tensor) -> tf.Tensor:
    """The rows of a Conv3D ``[N, locations..., q prod(k) cin / q]`` (group-major, then kernel
    order), by the layer's own convolution with the identity kernel
    ``[k..., cin / q, q prod(k) cin / q]`` (exact: each output channel copies one input; there
    is no dilated patch op in 3-D). It costs ``prod(k)^2 cin^2 / q`` multiply-adds a location."""
    window, rank = int(np.prod(layer.kernel_size)), len(layer.kernel_size)
    per_group = int(inputs.shape[-1]) // layer.groups
    identity = tf.reshape(tf.eye(window * per_group, dtype=inputs.dtype),
                          [*layer.kernel_size, per_group, window * per_group])
    return keras.ops.conv(
        inputs, tf.tile(identity, [1] * (rank + 1) + [layer.groups]),
        strides=list(layer.strides), padding=layer.padding, dilation_rate=layer.dilation_rate,
        data_format=layer.data_format)


def _patches(layer: keras.layers.Layer, inputs: tf.Tensor) -> tf.Tensor:
    """The patches of a channels_last Conv1D or Conv2D ``[N, locations..., prod(k) cin]``, in
    the kernel's order and the layer's own padding, strides and dilation, by
    ``tf.image.extract_patches`` (a Conv1D's on ``[N, 1, L, C]`` images)."""
    sizes, strides, rates = layer.kernel_size, layer.strides, layer.dilation_rate
    images, padding = _causal_padded(layer, inputs)
    if layer.rank == 1:
        images = images[:, None]
        sizes, strides, rates = (1, *sizes), (1, *strides), (1, *rates)
    return tf.image.extract_patches(
        images, sizes=[1, *sizes, 1], strides=[1, *strides, 1], rates=[1, *rates, 1],
        padding=padding.upper(),
    )


class _EmbeddingRule(KronRule):
    """Embedding: the rows are one-hot tokens, so ``A`` is diagonal (the tokens' weighted
    counts), computed as such; ``G`` is full. Above :data:`MAX_VOCABULARY` tokens the block is
    the exact diagonal instead, from the tokens that occur (no ``V x V`` matrix)."""

    def variables(self, layer):
        return (layer.embeddings,)

    def shapes(self, layer):
        return [KronShape(int(layer.input_dim), int(layer.output_dim))]

    def kind(self, layer):
        if layer.input_dim > MAX_VOCABULARY:
            return "diag", f"vocabulary of {layer.input_dim} tokens > MAX_VOCABULARY={MAX_VOCABULARY}"
        return "kron", None

    def rows(self, layer, inputs):
        tokens = tf.reshape(tf.cast(inputs, tf.int32), [-1])
        return tf.one_hot(tokens, layer.input_dim, dtype=layer.embeddings.dtype)

    def blocks(self, layer, inputs, gradients, w, reduce=False):
        """K-FAC-reduce averages each example's one-hot rows: ``A`` is not diagonal then."""
        tokens = tf.reshape(tf.cast(inputs, tf.int32), [-1])
        if layer.input_dim > MAX_VOCABULARY:
            return [DiagBlock(_token_diagonal(tokens, gradients, layer.input_dim,
                                              layer.output_dim))]
        if reduce:
            return super().blocks(layer, inputs, gradients, w, reduce)
        row_weights = _row_weights(w, tf.shape(tokens)[0], layer.embeddings.dtype)
        counts = tf.math.unsorted_segment_sum(row_weights, tokens, layer.input_dim)
        return [_outer_block(tf.linalg.diag(counts), tf.reduce_sum(row_weights), gradients,
                             layer.output_dim)]


def _token_diagonal(tokens: tf.Tensor, gradients: tf.Tensor, vocabulary: int,
                    dout: int) -> tf.Tensor:
    """The exact diagonal ``[V * dout]`` of an embedding's GGN / EF block: for token ``v``,
    ``sum_{r,n} (sum_t [token_nt = v] g_rnt)**2``, summed over the (example, token) pairs that
    occur (``tokens [N * T]`` example-major, ``gradients [R, N, T, dout]``)."""
    g = tf.reshape(gradients, [tf.shape(gradients)[0], -1, dout])  # [R, N T, dout]
    examples = tf.repeat(tf.range(tf.shape(gradients)[1]),
                         tf.shape(tokens)[0] // tf.shape(gradients)[1])
    pairs, index = tf.unique(tf.cast(examples, tf.int64) * vocabulary + tf.cast(tokens, tf.int64))
    sums = tf.math.unsorted_segment_sum(tf.transpose(g, [1, 0, 2]), index, tf.size(pairs))
    squares = tf.reduce_sum(tf.square(sums), axis=1)  # [pairs, dout]
    diagonal = tf.math.unsorted_segment_sum(squares, tf.cast(pairs % vocabulary, tf.int32),
                                            vocabulary)
    return tf.reshape(diagonal, [-1])


class _EinsumDenseRule(KronRule):
    """EinsumDense whose equation is a matmul over some axes: ``z = rows @ W`` with ``W`` the
    kernel as ``[contracted axes, output axes]``.

    The kernel's axes must be its contracted axes (in the input, not the output) followed by
    its output axes (in the output, not the input), the output must end with those output
    axes in the kernel's order and start with the examples, and a bias must span exactly
    those output axes. Example: the projections of ``MultiHeadAttention``,
    ``"abc,cde->abde"`` (bias ``"de"``) and ``"abcd,cde->abe"`` (bias ``"e"``). Input axes in
    neither the kernel nor the output are summed in the rows.
    """

    def unsupported(self, layer):
        spec = _einsum_spec(layer.equation)
        if isinstance(spec, str):
            return spec
        _, contracted, outputs, _ = spec
        if layer.bias is not None and set(layer.bias_axes or "") != set(outputs):
            return (f"bias_axes={layer.bias_axes!r} is not over all output axes {outputs!r} "
                    "of the kernel")
        return None

    def shapes(self, layer):
        _, contracted, _, _ = _einsum_spec(layer.equation)
        din = int(np.prod(layer.kernel.shape[:len(contracted)]))
        return [KronShape(din + _has_bias(layer), int(np.prod(layer.kernel.shape)) // din)]

    def rows(self, layer, inputs):
        source, contracted, _, locations = _einsum_spec(layer.equation)
        rows = tf.einsum(f"{source}->{locations}{contracted}", inputs)
        return tf.reshape(rows, [-1, int(np.prod(layer.kernel.shape[:len(contracted)]))])


def _einsum_spec(equation: str) -> tuple[str, str, str, str] | str:
    """``(input, contracted, outputs, locations)`` of an EinsumDense equation that is a matmul
    over some axes (``locations``: the output without the kernel's output axes), or the
    reason it is not."""
    source, rest = equation.replace(" ", "").split(",")
    kernel, output = rest.split("->")
    for axis in kernel:
        if axis in source and axis in output:
            return (f"equation {equation!r}: kernel axis {axis!r} is also in the input and the "
                    "output (a batched product, not a matmul)")
        if axis not in source and axis not in output:
            return f"equation {equation!r}: kernel axis {axis!r} is summed over"
    contracted = "".join(a for a in kernel if a in source)
    outputs = "".join(a for a in kernel if a in output)
    if not outputs or kernel != contracted + outputs:
        return (f"equation {equation!r}: the kernel is not its contracted axes followed by "
                "its output axes")
    if not output.endswith(outputs):
        return (f"equation {equation!r}: the output does not end with the kernel's output axes "
                f"{outputs!r}")
    locations = output[:-len(outputs)]
    if not locations or locations[0] != source[0] or (locations[0] == "." and
                                                      not source.startswith("...")):
        return f"equation {equation!r}: the output does not start with the examples' axis"
    return source, contracted, outputs, locations


class _ScaleAndShiftRule(KronRule):
    """LayerNormalization and BatchNormalization (inference: moving statistics):
    ``z = xhat * gamma + beta`` over the layer's axes, with ``xhat`` the normalised input.

    One example's gradient is ``(sum_t xhat_t * g_t, sum_t g_t)`` (sums over the other axes),
    so the exact GGN / EF block over ``(gamma, beta)`` is the sum of these gradients' outer
    products over examples and rows ``r`` of the output Hessian's root: a :class:`DenseBlock`
    (all channels coupled), or its exact diagonal above :data:`MAX_DENSE_WEIGHTS` weights.
    """

    outer_product = False

    def unsupported(self, layer):
        if getattr(layer, "rms_scaling", False):
            return "rms_scaling=True (beta is not used)"
        return None

    def variables(self, layer):
        return tuple(v for v in (layer.gamma, layer.beta) if v is not None)

    def shapes(self, layer):  # the weights as one row
        return [KronShape(1, sum(int(np.prod(v.shape)) for v in self.variables(layer)))]

    def blocks(self, layer, inputs, gradients, w, reduce=False):
        """The exact block: K-FAC-reduce does not change it."""
        xhat = _normalised(layer, inputs)
        rank = xhat.shape.rank
        # sorted: the weights broadcast by a reshape in increasing axis order, whatever the
        # order of `axis` (Keras keeps [-1, 1] as given, a gamma of shape (d3, d1))
        axes = sorted(a % rank for a in ([layer.axis] if isinstance(layer.axis, int) else layer.axis))
        others = [a for a in range(1, rank) if a not in axes]
        channels = int(np.prod([xhat.shape[a] for a in axes]))
        xhat = tf.reshape(tf.transpose(xhat, [0, *others, *axes]), [tf.shape(xhat)[0], -1, channels])
        g = tf.transpose(gradients, [0, 1, *(a + 1 for a in others), *(a + 1 for a in axes)])
        g = tf.reshape(g, [tf.shape(g)[0], tf.shape(g)[1], -1, channels])  # [R, N, T, C]
        parts = []
        if layer.gamma is not None:  # by chunks of g's rows: an einsum would copy all of g
            chunks = tf.split(g, _chunk_sizes(g.shape[0]))
            parts.append(tf.concat([tf.reduce_sum(xhat * c, axis=2) for c in chunks], axis=0))
        if layer.beta is not None:
            parts.append(tf.reduce_sum(g, axis=2))
        rows = tf.reshape(tf.concat(parts, axis=-1), [-1, len(parts) * channels])
        if self.shapes(layer)[0].dout > MAX_DENSE_WEIGHTS:
            return [DiagBlock(tf.reduce_sum(tf.square(rows), axis=0))]
        return [DenseBlock(tf.matmul(rows, rows, transpose_a=True))]

    def kind(self, layer) -> tuple[str, str | None]:
        size = self.shapes(layer)[0].dout
        if size > MAX_DENSE_WEIGHTS:
            return "diag", f"{size} weights > MAX_DENSE_WEIGHTS={MAX_DENSE_WEIGHTS}"
        return "dense", None


def _chunk_sizes(n: int) -> list[int]:
    """``n`` split into at most :data:`ROW_CHUNKS` near-equal sizes."""
    return np.diff(np.linspace(0, n, min(n, ROW_CHUNKS) + 1).astype(int)).tolist()


def _normalised(layer: keras.layers.Layer, inputs: tf.Tensor) -> tf.Tensor:
    """``xhat``: the layer's output with ``gamma = 1`` and ``beta = 0``, by Keras' own op."""
    if isinstance(layer, keras.layers.BatchNormalization):
        return keras.ops.batch_normalization(
            inputs, tf.cast(layer.moving_mean, inputs.dtype),
            tf.cast(layer.moving_variance, inputs.dtype), axis=layer.axis, epsilon=layer.epsilon)
    return keras.ops.layer_normalization(inputs, axis=layer.axis, epsilon=layer.epsilon)


KRON_RULES: dict[type, KronRule] = {
    keras.layers.Dense: _DenseRule(),
    keras.layers.Conv1D: _ConvRule(),
    keras.layers.Conv2D: _ConvRule(),
    keras.layers.Conv3D: _ConvRule(),
    keras.layers.DepthwiseConv1D: _DepthwiseRule(),
    keras.layers.DepthwiseConv2D: _DepthwiseRule(),
    keras.layers.SeparableConv1D: _SeparableRule(),
    keras.layers.SeparableConv2D: _SeparableRule(),
    keras.layers.Conv1DTranspose: _TransposeConvRule(),
    keras.layers.Conv2DTranspose: _TransposeConvRule(),
    keras.layers.Conv3DTranspose: _TransposeConvRule(),
    keras.layers.Embedding: _EmbeddingRule(),
    keras.layers.EinsumDense: _EinsumDenseRule(),
    keras.layers.LayerNormalization: _ScaleAndShiftRule(),
    keras.layers.BatchNormalization: _ScaleAndShiftRule(),
}


def register_kron_rule(layer_type: type, rule: KronRule) -> None:
    """Give layers of exactly ``layer_type`` (not its subclasses) the Kronecker rule ``rule``
    (replacing any rule it had), for ``hessian_structure="kron"`` and the GLM predictive.

    Args:
        layer_type: a subclass of ``keras.layers.Layer`` with a ``kernel [..., dout]`` and a
            ``bias`` (``None`` without bias), whose pre-activation at every location is
            ``rows @ [kernel reshaped to [din, dout]; bias]`` (other weights: the rule
            overrides :meth:`KronRule.variables`, :meth:`KronRule.shapes`, for several blocks
            :meth:`KronRule.parts` and, for a block other than ``A ⊗ G``,
            :meth:`KronRule.blocks`).
        rule: a :class:`KronRule` whose :meth:`KronRule.rows` gives those rows.

    Fits and predictives after the call, of any posterior on any model, use ``rule`` (the
    compiled steps are traced again); a curvature fitted before keeps the numbers of the rule
    it was fitted with, while its predictive takes the layer's Jacobian from the new rule
    (the same Jacobian if both rules are right).

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
    forget_shared_steps()  # traced with the old rule


def _n_inputs(layer: keras.layers.Layer) -> int:
    return int(np.prod(layer.kernel.shape[:-1]))


def _has_bias(layer: keras.layers.Layer) -> int:
    return int(getattr(layer, "bias", None) is not None)


def _ones_appended(rows: tf.Tensor) -> tf.Tensor:
    """``rows`` with a constant 1 column appended (a bias's input)."""
    return tf.concat([rows, tf.ones_like(rows[:, :1])], axis=1)


def fallback_reason(layer_slice: LayerSlice) -> str | None:
    """Why a layer's weights get the diagonal fallback instead of its rule's block (None: they
    don't).

    A layer needs a rule for its exact type, a configuration the rule supports, and trainable
    weights that are exactly the rule's (kernel then bias, or gamma then beta; not LoRA
    factors, quantised or partly frozen weights).
    """
    layer = layer_slice.layer
    rule = KRON_RULES.get(type(layer))
    if rule is None:
        return f"{type(layer).__name__} has no Kronecker rule"
    reason = rule.unsupported(layer)
    if reason is not None:
        return reason
    expected = rule.variables(layer)
    if len(expected) != len(layer_slice.variables) or any(
        a is not b for a, b in zip(expected, layer_slice.variables, strict=True)
    ):
        names = ", ".join(getattr(v, "name", "?").split("/")[-1] for v in expected)
        return f"its trainable weights are not exactly ({names}): LoRA, quantised or frozen"
    return None


def is_factored(layer_slice: LayerSlice) -> bool:
    """Whether the layer's weight Jacobian is ``sum_t a_t g_t^T`` (a supported Kronecker rule
    of one block without output groups, in the flat order): its rows are :func:`input_rows`, its pre-activation
    gradients have :func:`output_size` columns (the form
    :mod:`~laplace_tf.curvature._per_example` and the GLM predictive factor)."""
    if fallback_reason(layer_slice) is not None:
        return False
    rule = KRON_RULES[type(layer_slice.layer)]
    shapes = rule.shapes(layer_slice.layer)
    return (rule.outer_product and len(shapes) == 1 and shapes[0].groups == 1
            and rule.order(layer_slice.layer) is None)


def output_size(layer: keras.layers.Layer) -> int:
    """``dout``: the width of the layer's pre-activation (its last block's ``dout``)."""
    return KRON_RULES[type(layer)].shapes(layer)[-1].dout


def kron_shapes(layer: keras.layers.Layer) -> list[KronShape]:
    """The blocks of a layer with a rule (:meth:`KronRule.shapes`), in weight order."""
    return KRON_RULES[type(layer)].shapes(layer)


def kron_parts(layer: keras.layers.Layer, inputs: tf.Tensor,
               gradients: tf.Tensor) -> list[KronPart]:
    """Each block's rows and gradients from one call (:meth:`KronRule.parts`)."""
    return KRON_RULES[type(layer)].parts(layer, inputs, gradients)


def block_kind(layer_slice: LayerSlice) -> tuple[str, str | None]:
    """The block a layer gets in a Kronecker fit (``"kron"``, ``"dense"``, ``"diag"``), and
    why, for a diagonal one. The Kronecker builder may still fall back for layers called
    several times in one forward pass."""
    reason = fallback_reason(layer_slice)
    if reason is not None:
        return "diag", reason
    return KRON_RULES[type(layer_slice.layer)].kind(layer_slice.layer)


def input_rows(layer: keras.layers.Layer, inputs: tf.Tensor) -> tf.Tensor:
    """Rows ``a_t`` ``[n, din (+1)]`` of one call, with the constant 1 appended for a bias."""
    rows = _checked_rows(layer, KRON_RULES[type(layer)].rows(layer, inputs))
    return _ones_appended(rows) if _has_bias(layer) else rows


def _checked_rows(layer: keras.layers.Layer, rows: tf.Tensor) -> tf.Tensor:
    """``rows`` of a rule, refused unless ``[n, din]`` (``din`` without the bias)."""
    din = kron_shapes(layer)[0].din - _has_bias(layer)
    if rows.shape.rank != 2 or rows.shape[-1] != din:
        raise ValueError(
            f"register_kron_rule: the rule of {type(layer).__name__} layer {layer.name!r} gave "
            f"rows of shape {tuple(rows.shape)}; expected [n, {din}]: one row of the layer's "
            f"{din} inputs (without the bias) per example and location (see KronRule.rows)."
        )
    return rows
