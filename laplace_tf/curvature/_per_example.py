"""Per-example rows ``J_n^T c_{n,r}`` of a model's curvature, summed as outer products or squares.

The GGN and the empirical Fisher (EF) are both sums of outer products of per-example rows::

    GGN = sum_n sum_r v_nr v_nr^T,  v_nr = J_n^T L_n[:, r]   (Lambda_n = L_n L_n^T, R = K rows)
    EF  = sum_n g_n g_n^T,          g_n  = J_n^T dl_n/df_n   (one row)

where ``J_n [K, P]`` is the Jacobian of example ``n``'s logits with respect to the weights. A row
``J_n^T c`` is the gradient of the scalar ``f_n . c`` with the cotangent ``c`` held fixed, so the
cotangents ``c [N, K, R]`` (:func:`output_cotangents`) are all that depends on the likelihood.
:func:`summed_rows` returns ``sum v v^T`` (``[P, P]``, full) or ``sum v**2`` (``[P]``, the exact
diagonal), layer by layer:

* a layer with a Kronecker rule (:mod:`~laplace_tf.curvature.kron_layers`: Dense, Conv) called
  once, with one location per example (a Dense layer on ``[N, din]`` inputs), is *factored*: its
  row is the outer product ``a_n ⊗ delta_nr`` of the layer's input row (1 appended for the bias)
  and the gradient of ``f_n . c_r`` with respect to its pre-activation. ``delta`` for the whole
  batch comes from one backward pass per row ``r``, vectorised over ``r``. No row is formed:
  the diagonal is ``(a**2)^T sum_r delta_r**2``, and the block of two factored layers ``l, m``
  is ``sum_n (a_l a_m^T) ⊗ (sum_r delta_lr delta_mr^T)``, one matmul over ``n`` that costs
  ``N p_l p_m`` instead of the ``N R p_l p_m`` of the rows;
* every other layer gets its rows ``[N, R, p]`` by ``tf.vectorized_map`` over examples.

Examples are processed in chunks whose per-example intermediates fit in :data:`CHUNK_BYTES`
(:func:`sum_over_chunks`, also used for the exact Hessian in ``full.py``).

Example:
    >>> import keras, numpy as np, tensorflow as tf
    >>> from laplace_tf.likelihoods import get_likelihood
    >>> from laplace_tf.params import LogitModel
    >>> model = keras.Sequential([keras.Input((2,), dtype="float64"),
    ...                           keras.layers.Dense(1, dtype="float64")])
    >>> x, y = tf.constant([[1.0, 2.0], [3.0, -1.0]], tf.float64), tf.zeros((2, 1), tf.float64)
    >>> diag, _ = summed_rows(LogitModel(model), get_likelihood("regression"), "ggn", x, y,
    ...                       outer=False)
    >>> diag.numpy().tolist()            # linear model, unit noise: sum_n [x_n, 1]**2
    [10.0, 5.0, 2.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import tensorflow as tf

from laplace_tf.curvature.base import any_batch_size
from laplace_tf.curvature.kron_layers import fallback_reason, input_rows
from laplace_tf.likelihoods import Likelihood
from laplace_tf.params import LayerSlice, LogitModel

CHUNK_BYTES = 256 * 2**20
"""Memory budget for the per-example intermediates of one chunk of examples."""

_COPIES = 2  # a chunk's intermediates exist about twice at once (computed, then combined)


class _Outer(NamedTuple):
    """Rows ``inputs[n] ⊗ deltas[r, n]`` of a factored layer, never formed unless asked for."""

    inputs: tf.Tensor  # [n, din (+1 for the bias)]
    deltas: tf.Tensor  # [R, n, dout]


def output_cotangents(likelihood: Likelihood, kind: str, logits: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    """The cotangents ``c [N, K, R]`` whose rows ``J_n^T c_n`` make curvature ``kind``.

    ``"ggn"``: the square root ``L`` of the output Hessian (``R = K``); ``"ef"``: the gradient
    of each example's NLL with respect to its logits (``R = 1``).
    """
    if kind == "ggn":
        return tf.stop_gradient(likelihood.output_hessian_sqrt(logits))
    with tf.GradientTape() as tape:
        tape.watch(logits)
        nll = likelihood.nll(logits, y)
    return tf.stop_gradient(tape.gradient(nll, logits))[:, :, None]


def summed_rows(
    logit_model: LogitModel, likelihood: Likelihood, kind: str, x, y: tf.Tensor, *, outer: bool
) -> tuple[tf.Tensor, tf.Tensor]:
    """``sum_{n,r} v_nr v_nr^T`` (``outer=True``, ``[P, P]``) or ``sum_{n,r} v_nr**2`` (``[P]``).

    Args:
        logit_model: the model and its weight subset (``P`` weights).
        likelihood: gives the cotangents (see :func:`output_cotangents`).
        kind: ``"ggn"`` or ``"ef"``.
        x: a batch of inputs (tensor or dict of tensors) ``[N, ...]``.
        y: targets prepared by the likelihood ``[N, ...]``.
        outer: sum outer products (dense matrix) instead of squares (its diagonal).

    Returns:
        The sum, and the batch's logits ``[N, K]``.
    """
    slices = logit_model.subset.slices
    factored, n_outputs = _factored_slices(logit_model, x)
    n_rows = n_outputs if kind == "ggn" else 1
    dtype = logit_model.subset.dtype
    n_params = logit_model.subset.n_params

    def chunk_sum(x_chunk, y_chunk):
        parts, logits = _rows_by_slice(logit_model, likelihood, kind, x_chunk, y_chunk, factored)
        if outer:
            return _outer_sum(parts), logits
        return tf.concat([_squared_sum(p) for p in parts], 0), logits

    per_example = _COPIES * dtype.size * _example_width(slices, factored, n_rows, outer)
    initial = tf.zeros([n_params, n_params] if outer else [n_params], dtype)
    return sum_over_chunks(chunk_sum, initial, x, y, max(1, CHUNK_BYTES // per_example))


def _factored_slices(logit_model: LogitModel, x) -> tuple[list[bool], int]:
    """Which slices are factored, and the number of logits: read off a trace of one call.

    A slice is factored if its layer has a Kronecker rule and is called exactly once per
    forward pass with a pre-activation of one location per example. The trace is a separate
    graph that is never run.
    """
    slices = logit_model.subset.slices
    candidates = [s.layer for s in slices if fallback_reason(s) is None]
    locations: dict[int, list] = {id(layer): [] for layer in candidates}

    def record(layer, inputs, z):
        locations[id(layer)].append(z.shape[1:-1].num_elements())
        return z

    traced = tf.function(lambda inputs: logit_model(inputs, layers=candidates, hook=record))
    n_outputs = int(traced.get_concrete_function(any_batch_size(x)).structured_outputs.shape[-1])
    return [locations.get(id(s.layer)) == [1] for s in slices], n_outputs


def activations_per_example(logit_model: LogitModel, x) -> int:
    """Floating numbers per example in all tensors of one forward pass (from a trace, not run)."""
    graph = tf.function(logit_model).get_concrete_function(any_batch_size(x)).graph
    return sum(
        t.shape[1:].num_elements() or 0
        for op in graph.get_operations() for t in op.outputs
        if t.dtype.is_floating and t.shape.rank and t.shape[0] is None
    )


def _example_width(slices: Sequence[LayerSlice], factored: Sequence[bool], n_rows: int,
                   outer: bool) -> int:
    """Numbers held per example by a chunk's intermediates (rows, factors, pair products)."""
    dims = [_factor_dims(s) for s, f in zip(slices, factored, strict=True) if f]
    rows = [s.size for s, f in zip(slices, factored, strict=True) if not f]
    if not outer:
        return n_rows * (sum(rows) + sum(d[1] for d in dims)) + sum(d[0] for d in dims)
    pairs = sum(a[0] * b[0] + a[1] * b[1] for i, a in enumerate(dims) for b in dims[i:])
    all_rows = n_rows * sum(s.size for s in slices) if rows else 0
    return all_rows + pairs + n_rows * sum(d[1] for d in dims)


def _factor_dims(s: LayerSlice) -> tuple[int, int]:
    """``(din (+1), dout)`` of a factored layer's slice."""
    kernel = s.variables[0].shape
    return s.size // kernel[-1], kernel[-1]


def sum_over_chunks(fn, initial: tf.Tensor, x, y: tf.Tensor, chunk: int):
    """``initial + sum fn(x[i:j], y[i:j])[0]`` over chunks of ``chunk`` examples, one chunk at a
    time, and the concatenated second outputs (the logits ``[N, K]``)."""
    n = tf.shape(y)[0]
    logits = tf.TensorArray(initial.dtype, size=0, dynamic_size=True, infer_shape=False)
    n_outputs = []

    def body(index, start, total, logits):
        stop = tf.minimum(start + chunk, n)
        part, chunk_logits = fn(tf.nest.map_structure(lambda t: t[start:stop], x), y[start:stop])
        n_outputs.append(chunk_logits.shape[-1])
        return index + 1, stop, total + part, logits.write(index, chunk_logits)

    _, _, total, logits = tf.while_loop(
        lambda index, start, total, logits: start < n, body,
        (tf.constant(0), tf.constant(0), initial, logits), parallel_iterations=1,
    )
    return total, tf.reshape(logits.concat(), [-1, n_outputs[0]])


def _rows_by_slice(
    logit_model: LogitModel, likelihood: Likelihood, kind: str, x, y: tf.Tensor,
    factored: Sequence[bool],
) -> tuple[list[_Outer | tf.Tensor], tf.Tensor]:
    """Each slice's rows (an :class:`_Outer` if factored, else ``[n, R, p]``), and the logits."""
    slices = logit_model.subset.slices
    layers = [s.layer for s, f in zip(slices, factored, strict=True) if f]
    inputs, probes = {}, {}
    with tf.GradientTape() as tape:

        def hook(layer, a, z):
            probe = tf.zeros_like(z)
            tape.watch(probe)
            inputs[id(layer)], probes[id(layer)] = a, probe
            return z + probe

        logits = logit_model(x, layers=layers, hook=hook)
        cotangents = output_cotangents(likelihood, kind, logits, y)
        scores = tf.einsum("nk,nkr->r", logits, cotangents)
    n_rows = int(cotangents.shape[-1])
    parts: dict[int, _Outer | tf.Tensor] = {}
    if layers:
        deltas = tape.jacobian(scores, [probes[id(la)] for la in layers], experimental_use_pfor=True)
        for layer, delta in zip(layers, deltas, strict=True):
            delta = tf.reshape(delta, [n_rows, -1, delta.shape[-1]])
            parts[id(layer)] = _Outer(input_rows(layer, inputs[id(layer)]), delta)
    others = [s for s, f in zip(slices, factored, strict=True) if not f]
    if others:
        rows = _vectorised_rows(logit_model, x, cotangents, others)
        for s, part in zip(others, tf.split(rows, [s.size for s in others], -1), strict=True):
            parts[id(s.layer)] = part
    return [parts[id(s.layer)] for s in slices], logits


def _vectorised_rows(
    logit_model: LogitModel, x, cotangents: tf.Tensor, slices: Sequence[LayerSlice]
) -> tf.Tensor:
    """Rows ``[n, R, p]`` over the weights of ``slices``, by ``vectorized_map`` over examples."""
    subset = logit_model.subset
    values = subset.values()
    chosen = {id(v) for s in slices for v in s.variables}
    watched = [t for t, v in zip(values, subset.variables, strict=True) if id(v) in chosen]
    n_rows = int(cotangents.shape[-1])

    def one_example(example):
        x_n, c_n = example
        x_n = tf.nest.map_structure(lambda t: t[None], x_n)
        with tf.GradientTape() as tape:
            tape.watch(watched)
            scores = tf.linalg.matvec(c_n, logit_model(x_n, values)[0], transpose_a=True)
        jacobians = tape.jacobian(
            scores, watched, unconnected_gradients=tf.UnconnectedGradients.ZERO,
            experimental_use_pfor=True,
        )
        return tf.concat([tf.reshape(j, [n_rows, -1]) for j in jacobians], -1)

    return tf.vectorized_map(one_example, (x, cotangents))


def _as_rows(part: _Outer | tf.Tensor) -> tf.Tensor:
    """A slice's rows ``[n * R, p]`` (factored: ``a ⊗ delta``, kernel-then-bias order)."""
    if isinstance(part, _Outer):
        part = tf.einsum("ni,rno->nrio", part.inputs, part.deltas)
    return tf.reshape(part, [-1, part.shape[2:].num_elements()])


def _squared_sum(part: _Outer | tf.Tensor) -> tf.Tensor:
    """``sum_{n,r} v_nr**2`` of a slice's rows ``[p]``."""
    if isinstance(part, _Outer):
        squares = tf.reduce_sum(tf.square(part.deltas), axis=0)
        return tf.reshape(tf.matmul(tf.square(part.inputs), squares, transpose_a=True), [-1])
    return tf.reduce_sum(tf.square(part), axis=[0, 1])


def _outer_sum(parts: Sequence[_Outer | tf.Tensor]) -> tf.Tensor:
    """``sum_{n,r} v_nr v_nr^T`` ``[P, P]``: the upper blocks slice pair by pair, mirrored."""
    rows: dict[int, tf.Tensor] = {}

    def rows_of(i: int) -> tf.Tensor:
        if i not in rows:
            rows[i] = _as_rows(parts[i])
        return rows[i]

    grid = [[None] * len(parts) for _ in parts]
    for i, a in enumerate(parts):
        for j in range(i, len(parts)):
            b = parts[j]
            if isinstance(a, _Outer) and isinstance(b, _Outer):
                grid[i][j] = _factored_pair(a, b)
            else:
                grid[i][j] = tf.matmul(rows_of(i), rows_of(j), transpose_a=True)
            if j > i:
                grid[j][i] = tf.transpose(grid[i][j])
    return tf.concat([tf.concat(row, axis=1) for row in grid], axis=0)


def _factored_pair(a: _Outer, b: _Outer) -> tf.Tensor:
    """``sum_{n,r} (a_n ⊗ d_nr)(b_n ⊗ e_nr)^T = sum_n (a_n b_n^T) ⊗ (sum_r d_nr e_nr^T)``."""
    (di, do), (dj, dp) = (a.inputs.shape[-1], a.deltas.shape[-1]), (b.inputs.shape[-1], b.deltas.shape[-1])
    inputs = tf.reshape(a.inputs[:, :, None] * b.inputs[:, None, :], [-1, di * dj])
    grads = tf.reshape(tf.einsum("rno,rnp->nop", a.deltas, b.deltas), [-1, do * dp])
    block = tf.reshape(tf.matmul(inputs, grads, transpose_a=True), [di, dj, do, dp])
    return tf.reshape(tf.transpose(block, [0, 2, 1, 3]), [di * do, dj * dp])
