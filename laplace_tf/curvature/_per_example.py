"""Per-example rows ``J_n^T c_{n,r}`` of a model's curvature, summed as outer products, squares
or products with a basis.

The GGN and the empirical Fisher (EF) are both sums of outer products of per-example rows::

    GGN = sum_n sum_r v_nr v_nr^T,  v_nr = J_n^T L_n[:, r]   (Lambda_n = L_n L_n^T, R = K rows)
    EF  = sum_n g_n g_n^T,          g_n  = J_n^T dl_n/df_n   (one row)

where ``J_n [K, P]`` is the Jacobian of example ``n``'s logits with respect to the weights. A row
``J_n^T c`` is the gradient of the scalar ``f_n . c`` with the cotangent ``c`` held fixed, so the
cotangents ``c [N, K, R]`` (:func:`output_cotangents`) are all that depends on the likelihood.
:func:`summed_rows` returns ``sum v**2`` (``[P]``, the exact diagonal) and
:func:`summed_outer_products` ``sum v v^T`` (compact sums that :func:`outer_matrix` lays out as
the ``[P, P]`` matrix), :func:`summed_products` ``sum v (v^T V)`` for a basis ``V [P, m]`` (the
low-rank sketch), layer by layer:

* a layer with a Kronecker rule (:mod:`~laplace_tf.curvature.kron_layers`: Dense, Conv, ...) called
  once, with one location per example (a Dense layer on ``[N, din]`` inputs), is *factored*: its
  row is the outer product ``a_n ⊗ delta_nr`` of the layer's input row (1 appended for the bias)
  and the gradient of ``f_n . c_r`` with respect to its pre-activation. ``delta`` for the whole
  batch comes from one backward pass per row ``r``, vectorised over ``r``. No row is formed:
  the diagonal is ``(a**2)^T sum_r delta_r**2``, and the block of two factored layers ``l, m``
  is ``sum_n (a_l a_m^T) ⊗ (sum_r delta_lr delta_mr^T)`` (:mod:`~laplace_tf.curvature._kron_sums`),
  one matmul over ``n`` that costs ``N p_l p_m`` instead of the ``N R p_l p_m`` of the rows,
  and a quarter of that for a layer's own (symmetric) block;
* every other layer gets its rows ``[N, R, p]`` by ``tf.vectorized_map`` over examples (by
  ``tf.map_fn`` for a forward pass with a ``while_loop``, as in recurrent layers; see
  :func:`vectorised_rows`).

Examples are processed in chunks whose per-example intermediates fit in :data:`CHUNK_BYTES`
(:func:`sum_over_chunks`, also used for the exact Hessian in ``full.py``).

Example:
    >>> import keras, numpy as np, tensorflow as tf
    >>> from laplace_tf.likelihoods import get_likelihood
    >>> from laplace_tf.params import LogitModel
    >>> model = keras.Sequential([keras.Input((2,), dtype="float64"),
    ...                           keras.layers.Dense(1, dtype="float64")])
    >>> x, y = tf.constant([[1.0, 2.0], [3.0, -1.0]], tf.float64), tf.zeros((2, 1), tf.float64)
    >>> diag, _ = summed_rows(LogitModel(model), get_likelihood("regression"), "ggn", x, y)
    >>> diag.numpy().tolist()            # linear model, unit noise: sum_n [x_n, 1]**2
    [10.0, 5.0, 2.0]
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from laplace_tf.autodiff import first_line, quiet_pfor_errors
from laplace_tf.curvature._kron_sums import (
    kron_block,
    kron_sum,
    symmetric_kron_block,
    symmetric_kron_sum,
    symmetric_sum_numbers,
)
from laplace_tf.curvature.base import weights_or_ones
from laplace_tf.curvature.kron_layers import input_rows, is_factored, output_size
from laplace_tf.likelihoods import Likelihood
from laplace_tf.params import LayerSlice, LogitModel, any_batch_size, leaf_layers, model_cache

CHUNK_BYTES = 256 * 2**20
"""Memory budget for the per-example intermediates of one chunk of examples."""

_COPIES = 2  # a chunk's intermediates exist about twice at once (computed, then combined)

STEP_EXAMPLES = 2048
"""Dense builders join batches into steps of at most this many examples: enough for efficient
matmuls over the examples, and a step's ``P x P``-sized add is then a small part of its work."""


class _Outer(NamedTuple):
    """Rows ``inputs[n] ⊗ deltas[r, n]`` of a factored layer, never formed unless asked for."""

    inputs: tf.Tensor  # [n, din (+1 for the bias)]
    deltas: tf.Tensor  # [R, n, dout]


def output_cotangents(likelihood: Likelihood, kind: str, logits: tf.Tensor, y: tf.Tensor,
                      w: tf.Tensor | None = None) -> tf.Tensor:
    """The cotangents ``c [N, K, R]`` whose rows ``J_n^T c_n`` make curvature ``kind``.

    ``"ggn"``: the square root ``L`` of the output Hessian (``R = K``); ``"ef"``: the gradient
    of each example's NLL with respect to its logits (``R = 1``). Each example's are multiplied
    by ``sqrt(w_n)`` (sample weights ``w [N]``, default ones), so its rows' outer products by
    ``w_n``.
    """
    if kind == "ggn":
        cotangents = likelihood.output_hessian_sqrt(logits)
    else:
        with tf.GradientTape() as tape:
            tape.watch(logits)
            nll = likelihood.nll(logits, y)
        cotangents = tape.gradient(nll, logits)[:, :, None]
    if w is not None:
        cotangents = cotangents * tf.sqrt(tf.cast(w, logits.dtype))[:, None, None]
    return tf.stop_gradient(cotangents)


def summed_rows(
    logit_model: LogitModel, likelihood: Likelihood, kind: str, x, y: tf.Tensor,
    w: tf.Tensor | None = None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """``sum_{n,r} v_nr**2`` ``[P]``: the diagonal of the GGN (``kind="ggn"``) or EF (``"ef"``).

    Args:
        logit_model: the model and its weight subset (``P`` weights).
        likelihood: gives the cotangents (see :func:`output_cotangents`).
        kind: ``"ggn"`` or ``"ef"``.
        x: a batch of inputs (tensor or dict of tensors) ``[N, ...]``.
        y: targets prepared by the likelihood ``[N, ...]``.
        w: sample weights ``[N]`` (default ones): row ``v_nr`` counts ``w_n`` times.

    Returns:
        The sum, and the batch's logits ``[N, K]``.
    """
    layout = slice_layout(logit_model, x)

    def chunk_sum(xw_chunk, y_chunk):  # x and w are sliced alike
        x_chunk, w_chunk = xw_chunk
        parts, logits = _rows_by_slice(logit_model, likelihood, kind, x_chunk, y_chunk, layout,
                                       w_chunk)
        return tf.concat([_squared_sum(p) for p in parts], 0), logits

    itemsize = logit_model.subset.dtype.size
    per_example = _COPIES * itemsize * _example_width(layout.dims, _n_rows(layout, kind), outer=False)
    return sum_over_chunks(chunk_sum, (x, weights_or_ones(w, y)), y,
                           max(1, CHUNK_BYTES // per_example))


def summed_outer_products(
    logit_model: LogitModel, likelihood: Likelihood, kind: str, x, y: tf.Tensor,
    layout: Layout, w: tf.Tensor | None = None,
) -> tuple[list[tf.Tensor], tf.Tensor]:
    """``sum_{n,r} v_nr v_nr^T`` as compact sums, one per pair of slices ``l <= m``.

    Arguments as for :func:`summed_rows`; ``layout`` is :func:`slice_layout`'s. Sums of
    several batches add up entry by entry; :func:`outer_matrix` lays them out as ``[P, P]``.

    Returns:
        The sums, and the batch's logits ``[N, K]``.
    """

    def chunk_sum(xw_chunk, y_chunk):  # x and w are sliced alike
        x_chunk, w_chunk = xw_chunk
        parts, logits = _rows_by_slice(logit_model, likelihood, kind, x_chunk, y_chunk, layout,
                                       w_chunk)
        return _outer_sums(parts), logits

    itemsize = logit_model.subset.dtype.size
    per_example = _COPIES * itemsize * _example_width(layout.dims, _n_rows(layout, kind), outer=True)
    return sum_over_chunks(chunk_sum, (x, weights_or_ones(w, y)), y,
                           max(1, CHUNK_BYTES // per_example))


def summed_products(
    logit_model: LogitModel, likelihood: Likelihood, kind: str, x, y: tf.Tensor,
    layout: Layout, basis: tf.Tensor, w: tf.Tensor | None = None,
) -> tuple[tuple[tf.Tensor, tf.Tensor], tf.Tensor]:
    """``sum_{n,r} v_nr (v_nr^T V)`` ``[P, m]`` (the curvature times ``basis`` ``V [P, m]``) and
    the trace ``sum_{n,r} |v_nr|^2``, without any ``P x P`` matrix.

    Arguments as for :func:`summed_outer_products`. A factored slice never forms its rows:
    ``v^T V = delta^T (a^T V)`` and ``sum v s^T = a^T (delta s^T)``, matmuls that cost
    ``N p m`` each.

    Returns:
        ``(products, trace)``, and the batch's logits ``[N, K]``.
    """
    sizes = [_size(d) for d in layout.dims]
    m = int(basis.shape[-1])

    def chunk_sum(xw_chunk, y_chunk):  # x and w are sliced alike
        x_chunk, w_chunk = xw_chunk
        parts, logits = _rows_by_slice(logit_model, likelihood, kind, x_chunk, y_chunk, layout,
                                       w_chunk)
        blocks = tf.split(basis, sizes, axis=0)
        scores = tf.add_n([_times(p, b) for p, b in zip(parts, blocks, strict=True)])  # [n, R, m]
        products = tf.concat([_transposed_times(p, scores) for p in parts], 0)
        trace = tf.add_n([tf.reduce_sum(_squared_sum(p)) for p in parts])
        return (products, trace), logits

    itemsize = logit_model.subset.dtype.size
    per_example = _COPIES * itemsize * product_example_numbers(layout, kind, m)
    return sum_over_chunks(chunk_sum, (x, weights_or_ones(w, y)), y,
                           max(1, CHUNK_BYTES // per_example))


def product_example_numbers(layout: Layout, kind: str, m: int) -> int:
    """Numbers one example holds in :func:`summed_products` with ``m`` basis vectors: its rows
    (factored: inputs and pre-activation gradients) and, per factored slice, ``a^T V`` and
    ``delta s^T`` (``dout m`` each), and its scores (``R m``)."""
    rows = _n_rows(layout, kind)
    factored = sum(d[1] for d in layout.dims if isinstance(d, tuple))
    return _example_width(layout.dims, rows, outer=False) + m * (rows + 2 * factored)


def _times(part: _Outer | tf.Tensor, basis: tf.Tensor) -> tf.Tensor:
    """``v_nr^T V`` ``[n, R, m]`` of a slice's rows and its rows of the basis ``V [p, m]``."""
    if isinstance(part, _Outer):
        din, dout = int(part.inputs.shape[-1]), int(part.deltas.shape[-1])
        projected = tf.reshape(tf.matmul(part.inputs, tf.reshape(basis, [din, -1])),
                               [-1, dout, int(basis.shape[-1])])  # a^T V: [n, dout, m]
        return tf.einsum("rno,nom->nrm", part.deltas, projected)
    return tf.einsum("nrp,pm->nrm", part, basis)


def _transposed_times(part: _Outer | tf.Tensor, scores: tf.Tensor) -> tf.Tensor:
    """``sum_{n,r} v_nr s_nr^T`` ``[p, m]`` of a slice's rows and scores ``s [n, R, m]``."""
    if isinstance(part, _Outer):
        din = int(part.inputs.shape[-1])
        weighted = tf.einsum("rno,nrm->nom", part.deltas, scores)  # [n, dout, m]
        flat = tf.reshape(weighted, [tf.shape(weighted)[0], -1])
        return tf.reshape(tf.matmul(part.inputs, flat, transpose_a=True),
                          [din * int(part.deltas.shape[-1]), -1])
    return tf.einsum("nrp,nrm->pm", part, scores)
def stacked_rows(
    logit_model: LogitModel, likelihood: Likelihood, kind: str, x, y: tf.Tensor,
    w: tf.Tensor | None = None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """The rows ``v_nr`` themselves, stacked ``[N R, P]`` (example ``n``'s ``R`` rows are
    ``n R, ..., n R + R - 1``): ``rows^T rows`` is the curvature :func:`summed_outer_products`
    sums. Arguments as for :func:`summed_rows`; one call, no chunks (see
    :func:`rows_chunk_examples`).

    Returns:
        The rows, and the batch's logits ``[N, K]``.
    """
    layout = slice_layout(logit_model, x)
    parts, logits = _rows_by_slice(logit_model, likelihood, kind, x, y, layout,
                                   weights_or_ones(w, y))
    return tf.concat([_as_rows(p) for p in parts], axis=1), logits


def rows_chunk_examples(logit_model: LogitModel, kind: str, x) -> int:
    """How many examples one call of :func:`stacked_rows` may take: their intermediates and
    rows fit in :data:`CHUNK_BYTES` (at least one)."""
    layout = slice_layout(logit_model, x)
    rows = _n_rows(layout, kind)
    numbers = _COPIES * (_example_width(layout.dims, rows, outer=False)
                         + rows * logit_model.subset.n_params)
    return max(1, CHUNK_BYTES // (numbers * logit_model.subset.dtype.size))


def outer_step_examples(logit_model: LogitModel, kind: str, x) -> int:
    """How many examples one step of :func:`summed_outer_products` may take: their
    intermediates and the activations of their forward and ``R`` backward passes fit in
    :data:`CHUNK_BYTES` (see :func:`step_examples`)."""
    layout = slice_layout(logit_model, x)
    rows = _n_rows(layout, kind)
    numbers = (_COPIES * _example_width(layout.dims, rows, outer=True)
               + rows * activations_per_example(logit_model, x))
    return step_examples(numbers, logit_model.subset.dtype.size)


def step_examples(numbers_per_example: int, itemsize: int) -> int:
    """Examples of ``numbers_per_example`` numbers each that fit in :data:`CHUNK_BYTES`, at least
    one and at most :data:`STEP_EXAMPLES`."""
    return max(1, min(STEP_EXAMPLES, CHUNK_BYTES // (numbers_per_example * itemsize)))


def outer_matrix(sums: Sequence[tf.Tensor], layout: Layout) -> tf.Tensor:
    """The ``[P, P]`` matrix of :func:`summed_outer_products`' sums: upper blocks, mirrored."""
    pairs = iter(sums)
    dims = layout.dims
    grid = [[None] * len(dims) for _ in dims]
    for i, a in enumerate(dims):
        for j in range(i, len(dims)):
            b, compact = dims[j], next(pairs)
            if isinstance(a, tuple) and isinstance(b, tuple):
                compact = (symmetric_kron_block(compact, *a) if j == i
                           else kron_block(compact, a[0], b[0], a[1], b[1]))
            grid[i][j] = compact
            if j > i:
                grid[j][i] = tf.transpose(compact)
    return tf.concat([tf.concat(row, axis=1) for row in grid], axis=0)


class Layout(NamedTuple):
    """How a batch's rows are computed: per slice, ``(din (+1 for the bias), dout)`` if the
    slice is factored, else its number of weights; the number of logits ``K``; whether
    per-example rows must be computed one example at a time (:func:`_one_at_a_time`, see
    :func:`vectorised_rows`); and per slice whether it holds some of the weights of a layer
    that could be factored (a subnetwork): its rows ``a_n ⊗ delta_nr`` are formed at those
    entries only (:func:`_gathered_rows`)."""

    dims: list[tuple[int, int] | int]
    n_outputs: int
    one_at_a_time: bool = False
    gathered: tuple[bool, ...] = ()

    @property
    def factored(self) -> list[bool]:
        return [isinstance(d, tuple) for d in self.dims]

    @property
    def probed(self) -> list[bool]:
        """Slices whose rows come from probes on the pre-activation (factored or gathered)."""
        gathered = self.gathered or (False,) * len(self.dims)
        return [f or g for f, g in zip(self.factored, gathered, strict=True)]


def slice_layout(logit_model: LogitModel, x) -> Layout:
    """The :class:`Layout` of ``logit_model`` on inputs like ``x``, read off a trace of one call.

    A slice is factored if its layer has a Kronecker rule and is called exactly once per
    forward pass with a pre-activation of one location per example (and a batch axis: not a
    layer applied to a constant such as the positions of a positional embedding, whose
    pre-activation all examples share). The trace is a separate graph that is never run.
    """
    slices = logit_model.subset.slices
    candidates = [s.layer for s in slices if is_factored(s)]
    locations: dict[int, list] = {id(layer): [] for layer in candidates}

    def record(layer, inputs, z):  # not one row per example: not factored
        batched = id(layer) not in unfactorable
        locations[id(layer)].append(z.shape[1:].num_elements() // output_size(layer) if batched else 0)
        return z

    unfactorable = unfactorable_layers(logit_model, candidates, x) if candidates else {}
    traced = tf.function(lambda inputs: logit_model(inputs, layers=candidates, hook=record),
                         autograph=False)
    concrete = traced.get_concrete_function(any_batch_size(x))
    n_outputs = int(concrete.structured_outputs.shape[-1])
    once = [locations.get(id(s.layer)) == [1] for s in slices]
    dims = [(_factor_dims(s) if s.columns is None else s.size) if one else s.layer_size
            for s, one in zip(slices, once, strict=True)]
    gathered = tuple(one and s.columns is not None for s, one in zip(slices, once, strict=True))
    return Layout(dims, n_outputs, _one_at_a_time(concrete.graph, logit_model.model), gathered)


@tf.autograph.experimental.do_not_convert  # Python at trace time, also inside tf.functions
def unfactorable_layers(logit_model: LogitModel, layers: Sequence, x) -> dict[int, str]:
    """``id`` of each of ``layers`` whose weight rows are not ``a_n ⊗ delta_n`` of its own call,
    with the reason:

    * its pre-activation has not one row per example: applied to a constant shared by all
      examples (e.g. a positional embedding of ``arange(T)``), or to examples x steps folded
      into the batch axis (``tf.reshape(x, [-1, d])``); the rows of every other pre-activation
      number the trace's :data:`_PROBE_BATCH` examples;
    * its weights reach the output also outside its call (shared, tied weights: an embedding
      table reused as the output projection, a kernel read by another layer or by the model's
      ``call``): in the traced graph, the floating tensors computed from them reach the logits
      or a hooked layer's inputs by a path that does not pass through a hooked
      pre-activation (:func:`_reaches`; no gradient is traced).

    Read off one trace of a call on a batch of :data:`_PROBE_BATCH` examples (a separate graph,
    never run). Once per model, layers and input signature.
    """
    return _probed(logit_model, layers, x)[0]


def masked_layers(logit_model: LogitModel, layers: Sequence, x) -> set[int]:
    """``id`` of each of ``layers`` that sees masked positions: its inputs carry a Keras mask
    (after ``Masking``, ``Embedding(mask_zero=True)``, a masked RNN), or it is an
    ``Embedding(mask_zero=True)``. Its rows at masked positions have zero gradients, but a
    Kronecker input factor would count them. Read off the trace of
    :func:`unfactorable_layers`."""
    return _probed(logit_model, layers, x)[1]


def _probed(logit_model: LogitModel, layers: Sequence, x) -> tuple[dict[int, str], set[int]]:
    cache = model_cache(logit_model.model, ("unfactorable_layers", logit_model.stripped is not None))
    key = (repr(any_batch_size(x)), tuple(id(layer) for layer in layers))
    if key not in cache:
        found: dict[int, str] = {}
        masked: set[int] = set()
        targets: list[tf.Tensor] = []  # the hooked layers' inputs (and the logits)
        barriers: list[tf.Tensor] = []  # the hooked pre-activations

        def record(layer, inputs, z):
            if not z.shape.rank or z.shape[0] != _PROBE_BATCH:
                found[id(layer)] = NOT_PER_EXAMPLE
            if getattr(layer, "mask_zero", False) or any(
                    getattr(t, "_keras_mask", None) is not None for t in tf.nest.flatten(inputs)):
                masked.add(id(layer))
            targets.extend(tf.nest.flatten(inputs))
            barriers.append(z)
            return z

        hooked = {id(layer) for layer in layers}
        owners = [s.layer for s in logit_model.subset.slices for _ in s.variables]

        def traced(inputs, weights):  # the subset's weights as inputs: no variable is read
            logits = logit_model(inputs, weights, layers=layers, hook=record)
            ends = {id(t) for t in [logits, *targets]}
            for layer, weight in zip(owners, weights, strict=True):
                if id(layer) in hooked and id(layer) not in found and \
                        _reaches(weight, ends, {id(t) for t in barriers}):
                    found[id(layer)] = SHARED_WEIGHTS
            return logits

        tf.function(traced, autograph=False).get_concrete_function(
            tf.nest.map_structure(
                lambda t: tf.TensorSpec([_PROBE_BATCH, *t.shape[1:]], t.dtype), x),
            [tf.TensorSpec(v.shape, v.dtype) for v in logit_model.subset.variables])
        cache[key] = found, masked
    return cache[key]


def _reaches(start: tf.Tensor, ends: set[int], barriers: set[int]) -> bool:
    """Whether a graph tensor in ``ends`` (ids) is computed from ``start`` through floating
    tensors, without passing through one in ``barriers``: a search forward over the ops that
    consume them (a differentiable path, up to non-differentiable floating ops)."""
    seen, frontier = {id(start)}, [start]
    while frontier:
        for op in frontier.pop().consumers():
            for out in op.outputs:
                if id(out) in barriers or id(out) in seen or not out.dtype.is_floating:
                    continue
                if id(out) in ends:
                    return True
                seen.add(id(out))
                frontier.append(out)
    return False


NOT_PER_EXAMPLE = ("its output has not one row per example (a layer applied to a constant such "
                   "as positions, or to steps folded into the batch axis)")
SHARED_WEIGHTS = "its weights are also used outside its call (shared or tied weights)"
MASKED = ("it sees masked (padded) positions, which a Kronecker input factor would count as "
          "data")
"""The reasons :func:`unfactorable_layers` gives."""

_PROBE_BATCH = 8191
"""The batch size of the trace that tells examples from other rows (a prime no constant's
length is likely to equal; the trace is never run, so its size costs nothing)."""


@tf.autograph.experimental.do_not_convert
def one_example_at_a_time(logit_model: LogitModel, x) -> bool:
    """Whether per-example rows of ``logit_model`` on inputs like ``x`` must be computed one
    example at a time (:func:`_one_at_a_time`), read off a trace of one call (never run)."""
    traced = tf.function(lambda inputs: logit_model(inputs))
    graph = traced.get_concrete_function(any_batch_size(x)).graph
    return _one_at_a_time(graph, logit_model.model)


_BATCHED_PRODUCTS = ("Einsum", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3")


def _one_at_a_time(graph: tf.Graph, model) -> bool:
    """Whether a forward pass ``graph`` of ``model`` (traced with an open batch dimension) must
    have its per-example rows computed one example at a time instead of by ``vectorized_map``:

    * it runs a ``while_loop`` (in itself or a function it calls: recurrent layers without
      ``unroll=True``), whose gradient a nested pfor cannot convert; or
    * it multiplies two activations in a batched product (``Einsum``/``BatchMatMul`` whose two
      operands both have the batch dimension: attention scores ``q k^T`` and ``softmax(.) v``
      in ``MultiHeadAttention``). Vectorised per-example gradients through such a product
      crash the process inside TensorFlow's oneDNN CPU kernels (a segmentation fault, seen
      with TensorFlow 2.21 on ``MultiHeadAttention``; the same model with
      ``TF_ENABLE_ONEDNN_OPTS=0``, or one example at a time, runs correctly); or
    * ``model`` has a grouped convolution (``groups > 1``): TensorFlow's vectorisation of the
      grouped filter's gradient is wrong in float32 (70-80% off, seen with TensorFlow 2.21 on
      CPU; ``tf.map_fn`` gives the eager tape's values).
    """
    if any(getattr(layer, "groups", 1) > 1 for layer in leaf_layers(model)):
        return True
    definition = graph.as_graph_def()
    nodes = [*definition.node, *(n for f in definition.library.function for n in f.node_def)]
    if any(node.op in ("While", "StatelessWhile") for node in nodes):
        return True
    return any(
        op.type in _BATCHED_PRODUCTS and len(op.inputs) == 2
        and all(t.shape.rank and t.shape[0] is None for t in op.inputs)
        for op in graph.get_operations()
    )


def activations_per_example(logit_model: LogitModel, x) -> int:
    """Floating numbers per example in all tensors of one forward pass (from a trace, not run;
    one trace per model and input signature)."""
    specs = any_batch_size(x)
    counts = model_cache(logit_model.model, ("activations_per_example",
                                             logit_model.stripped is not None))
    if repr(specs) not in counts:
        graph = tf.function(logit_model, autograph=False).get_concrete_function(specs).graph
        counts[repr(specs)] = sum(
            t.shape[1:].num_elements() or 0
            for op in graph.get_operations() for t in op.outputs
            if t.dtype.is_floating and t.shape.rank and t.shape[0] is None
        )
    return counts[repr(specs)]


def _example_width(slice_dims: Sequence[tuple[int, int] | int], n_rows: int, outer: bool) -> int:
    """Numbers held per example by a chunk's intermediates (rows, factors, pair products), for
    :attr:`Layout.dims` ``slice_dims`` and ``n_rows`` rows per example."""
    dims = [d for d in slice_dims if isinstance(d, tuple)]
    rows = [d for d in slice_dims if not isinstance(d, tuple)]
    if not outer:
        return n_rows * (sum(rows) + sum(d[1] for d in dims)) + sum(d[0] for d in dims)
    pairs = sum(a[0] * b[0] + a[1] * b[1] for i, a in enumerate(dims) for b in dims[i + 1:])
    pairs += sum(symmetric_sum_numbers(*d) + d[1] * d[1] for d in dims)  # own blocks
    all_rows = n_rows * sum(_size(d) for d in slice_dims) if rows else 0
    return all_rows + pairs + n_rows * sum(d[1] for d in dims)


def _n_rows(layout: Layout, kind: str) -> int:
    """Rows per example: ``K`` for the GGN, 1 for the EF."""
    return layout.n_outputs if kind == "ggn" else 1


def _size(dims: tuple[int, int] | int) -> int:
    return dims[0] * dims[1] if isinstance(dims, tuple) else dims


def _factor_dims(s: LayerSlice) -> tuple[int, int]:
    """``(din (+1), dout)`` of a factored layer's slice."""
    dout = output_size(s.layer)
    return s.size // dout, dout


def sum_over_chunks(fn, x, y: tf.Tensor, chunk: int):
    """``sum fn(x[i:j], y[i:j])[0]`` over chunks of ``chunk`` examples, one chunk at a time, and
    the concatenated second outputs (the logits ``[N, K]``). The sums may be nested structures
    of tensors; a batch of at most ``chunk`` examples is one call of ``fn``, with no loop.
    ``fn`` is traced once (a nested ``tf.function``, without autograph: see
    :meth:`~laplace_tf.curvature.kron.KronBuilder.batch_sums`) for the first chunk and the loop."""
    fn = tf.function(fn, reduce_retracing=True, autograph=False)
    n = tf.shape(y)[0]
    total, first_logits = fn(tf.nest.map_structure(lambda t: t[:chunk], x), y[:chunk])
    logits = tf.TensorArray(first_logits.dtype, size=0, dynamic_size=True, infer_shape=False)

    def body(index, start, total, logits):
        stop = tf.minimum(start + chunk, n)
        part, chunk_logits = fn(tf.nest.map_structure(lambda t: t[start:stop], x), y[start:stop])
        total = tf.nest.map_structure(tf.add, total, part)
        return index + 1, stop, total, logits.write(index, chunk_logits)

    _, _, total, logits = tf.while_loop(
        lambda index, start, total, logits: start < n, body,
        (tf.constant(1), tf.minimum(chunk, n), total, logits.write(0, first_logits)),
        parallel_iterations=1,
    )
    return total, tf.reshape(logits.concat(), [-1, first_logits.shape[-1]])


def _rows_by_slice(
    logit_model: LogitModel, likelihood: Likelihood, kind: str, x, y: tf.Tensor, layout: Layout,
    w: tf.Tensor,
) -> tuple[list[_Outer | tf.Tensor], tf.Tensor]:
    """Each slice's rows (an :class:`_Outer` if factored, else ``[n, R, p]``), and the logits."""
    slices, probed = logit_model.subset.slices, layout.probed
    layers = [s.layer for s, p in zip(slices, probed, strict=True) if p]
    inputs, probes = {}, {}
    with tf.GradientTape() as tape:

        def hook(layer, a, z):
            probe = tf.zeros_like(z)
            tape.watch(probe)
            inputs[id(layer)], probes[id(layer)] = a, probe
            return z + probe

        logits = logit_model(x, layers=layers, hook=hook)
        cotangents = output_cotangents(likelihood, kind, logits, y, w)
        scores = tf.einsum("nk,nkr->r", logits, cotangents)
    n_rows = int(cotangents.shape[-1])
    parts: dict[int, _Outer | tf.Tensor] = {}
    if layers:
        deltas = tape.jacobian(scores, [probes[id(la)] for la in layers], experimental_use_pfor=True,
                               unconnected_gradients=tf.UnconnectedGradients.ZERO)
        columns = {id(s.layer): s.columns for s in slices}
        for layer, delta in zip(layers, deltas, strict=True):
            delta = tf.reshape(delta, [n_rows, -1, output_size(layer)])
            outer = _Outer(input_rows(layer, inputs[id(layer)]), delta)
            chosen = columns[id(layer)]
            parts[id(layer)] = outer if chosen is None else _gathered_rows(outer, chosen)
    others = [s for s, p in zip(slices, probed, strict=True) if not p]
    if others:
        rows = vectorised_rows(logit_model, x, cotangents, others, layout.one_at_a_time)
        for s, part in zip(others, tf.split(rows, [s.size for s in others], -1), strict=True):
            parts[id(s.layer)] = part
    return [parts[id(s.layer)] for s in slices], logits


def vectorised_rows(
    logit_model: LogitModel, x, cotangents: tf.Tensor, slices: Sequence[LayerSlice],
    one_at_a_time: bool, values: Sequence[tf.Tensor] | None = None,
) -> tf.Tensor:
    """Rows ``[n, R, p]`` over the weights of ``slices``, by ``vectorized_map`` over examples,
    at the subset's current weights or at ``values`` (aligned with its variables).
    With the identity as cotangents (``R = K``) the rows are the per-example Jacobians.

    An example's ``R`` rows are one vectorised ``tape.jacobian`` (pfor inside pfor). When
    that cannot work (``one_at_a_time``, :func:`_one_at_a_time`: a ``while_loop`` in LSTM, GRU,
    SimpleRNN, Bidirectional without ``unroll=True``, whose gradient a nested pfor cannot
    convert; or a product of two activations, as in attention, where it crashes TensorFlow's
    CPU kernels), the rows come from ``tf.map_fn``: one example at a time in a graph loop, its
    rows a graph loop over ``r``.
    This works for any number of time steps, also unknown ones. Measured
    (``benchmarks/recurrent.py``: LSTM(16) -> Dense(10), 256 examples, all/diag fit, 5 and 50
    time steps): ``map_fn`` 1.4 s and 5.2 s; the layers called with ``unroll=True`` for a
    nested pfor 1.8 s and 22 s (the graph grows with the time steps); ``vectorized_map`` over
    examples of the loop over rows 6.8 s and 8.5 s (and it fails at run time for one example).
    Elsewhere, where ``vectorized_map`` fails, ``map_fn`` takes over with a warning
    (TensorFlow's graph dumps of the failed conversion are silenced); if ``map_fn`` fails
    too, a ValueError names ``subset_of_weights='last_layer'``.
    """
    subset = logit_model.subset
    values = subset.values() if values is None else list(values)
    chosen = {id(v) for s in slices for v in s.variables}
    watched = [t for t, v in zip(values, subset.variables, strict=True) if id(v) in chosen]
    n_rows = int(cotangents.shape[-1])
    columns = _columns(slices)

    def one_example(example, use_pfor: bool):
        x_n, c_n = example
        x_n = tf.nest.map_structure(lambda t: t[None], x_n)
        with tf.GradientTape() as tape:
            tape.watch(watched)
            scores = tf.linalg.matvec(c_n, logit_model(x_n, values)[0], transpose_a=True)
        jacobians = tape.jacobian(
            scores, watched, unconnected_gradients=tf.UnconnectedGradients.ZERO,
            experimental_use_pfor=use_pfor,
        )
        rows = tf.concat([tf.reshape(j, [n_rows, -1]) for j in jacobians], -1)
        return rows if columns is None else tf.gather(rows, columns, axis=-1)

    names = [s.name for s in slices]
    if not one_at_a_time:
        try:
            with quiet_pfor_errors():
                return tf.vectorized_map(lambda e: one_example(e, True), (x, cotangents))
        except (ValueError, NotImplementedError, TypeError) as err:
            warnings.warn(
                f"laplace_tf: could not vectorise the per-example gradients of the layers "
                f"{names} over examples ({first_line(err)}); computing them one example at a "
                "time (tf.map_fn), which is correct but slower.", RuntimeWarning, stacklevel=2,
            )
    signature = tf.TensorSpec([n_rows, sum(s.size for s in slices)], subset.dtype)
    try:
        return tf.map_fn(lambda e: one_example(e, False), (x, cotangents),
                         fn_output_signature=signature)
    except (ValueError, NotImplementedError, TypeError) as err:
        raise ValueError(
            f"subset_of_weights='all': could not compute the per-example gradients of the "
            f"layers {names} ({first_line(err)}). Use subset_of_weights='last_layer', or a "
            "subset of weights without these layers."
        ) from None


def _columns(slices: Sequence[LayerSlice]) -> np.ndarray | None:
    """The positions of the slices' weights among all weights of their variables (None: all)."""
    if all(s.columns is None for s in slices):
        return None
    starts = np.cumsum([0] + [s.layer_size for s in slices])
    return np.concatenate([
        start + (np.arange(s.layer_size) if s.columns is None else s.columns)
        for start, s in zip(starts, slices, strict=False)
    ])


def _gathered_rows(part: _Outer, columns: np.ndarray) -> tf.Tensor:
    """Rows ``[n, R, c]`` of a factored layer at the entries ``columns`` of its row-major
    ``(din, dout)`` weight matrix only: ``inputs[n, i] * deltas[r, n, j]``."""
    dout = int(part.deltas.shape[-1])
    return tf.einsum("nc,rnc->nrc", tf.gather(part.inputs, columns // dout, axis=-1),
                     tf.gather(part.deltas, columns % dout, axis=-1))


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


def _outer_sums(parts: Sequence[_Outer | tf.Tensor]) -> list[tf.Tensor]:
    """``sum_{n,r} v_nr v_nr^T`` of each pair of slices ``l <= m``, compact.

    Two factored slices: ``sum_n (a_n b_n^T) ⊗ (sum_r d_nr e_nr^T)``; otherwise the rows'
    matmul ``[p_l, p_m]``.
    """
    rows: dict[int, tf.Tensor] = {}

    def rows_of(i: int) -> tf.Tensor:
        if i not in rows:
            rows[i] = _as_rows(parts[i])
        return rows[i]

    # per-example deltas [n, R, dout], so that sum_r d_nr e_nr^T is one batched matmul
    deltas = {i: tf.transpose(p.deltas, [1, 0, 2]) for i, p in enumerate(parts) if isinstance(p, _Outer)}
    sums = []
    for i, a in enumerate(parts):
        for j in range(i, len(parts)):
            b = parts[j]
            if isinstance(a, _Outer) and isinstance(b, _Outer):
                outputs = tf.matmul(deltas[i], deltas[j], transpose_a=True)
                sums.append(symmetric_kron_sum(a.inputs, outputs) if j == i
                            else kron_sum(a.inputs, b.inputs, outputs))
            else:
                sums.append(tf.matmul(rows_of(i), rows_of(j), transpose_a=True))
    return sums
