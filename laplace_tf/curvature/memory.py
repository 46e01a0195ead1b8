"""How many bytes a Laplace approximation needs, before anything is computed.

:func:`estimate_memory` adds up the buffers that fitting a curvature structure and using its
posterior allocate, from the sizes of the weight subset's layers, the number of outputs ``K``,
the batch size ``B`` and the dtype (``s`` bytes a number); :func:`check_memory` refuses an
estimate above a limit. With ``P`` weights and ``R`` rows per example (``K`` for the GGN and
the exact Hessian, 1 for the empirical Fisher), in numbers (times ``s`` for bytes):

=========  ========================================================================
structure  parts
=========  ========================================================================
full       ``curvature`` P² (the summed block, kept); ``fit_workspace`` 6 P² over all
           weights (the per-example sum's start value, loop carry, a chunk's pair
           blocks, their concatenation and the new carry; the new running sum) or
           3 P² over the last layer (a batch's block, its reshape, the new running
           sum); ``per_batch`` (below); ``eigendecomposition`` 2 P² + P (the
           symmetrised copy, eigenvectors, eigenvalues); ``cholesky`` P² (of the
           posterior precision); ``covariance`` 2 P² (the identity it is solved
           from, and the covariance)
kron       per layer with a Kronecker rule, with ``D`` inputs (+1 for the bias), ``O``
           outputs, ``L`` locations (1 for Dense on ``[N, din]``; output pixels for a
           convolution): ``curvature`` D² + O²; ``fit_workspace`` 2 (D² + O²);
           ``per_batch`` B L (D + R O) (input rows and pre-activation gradients);
           ``eigendecomposition`` D² + O² + D + O + D O (eigenvectors and eigenvalues
           of the factors, eigenvalues of the precision). A layer of ``p`` weights
           without a rule (a diagonal block): p, 2 p, B R p (its per-example
           Jacobian), and ``posterior`` 2 p (as diag). Over all weights, for the
           model: ``activations`` B (its inputs + every layer's output + once more
           the outputs of the layers with a rule: the forward pass the R backward
           passes use, and each probed output ``z + probe``; a grouped
           convolution's input and output once more, TensorFlow's group-major
           copies); ``attention`` B (2 + 4 R) H T S per MultiHeadAttention of H
           heads, T queries and S values (scores and probabilities; per row, their
           gradient and the softmax's backward intermediates); ``eigh_workspace``
           3 times the largest factor's D² or O² (one factor at a time: its
           symmetrised copy, and the 2 n² workspace of LAPACK's divide and conquer,
           :func:`~laplace_tf.blocks.base.eigh`). A MultiHeadAttention's
           projections have T (query, output) or S (key, value) locations
diag       ``curvature`` P; ``fit_workspace`` 2 P; ``per_batch`` (below);
           ``posterior`` 2 P (precision and variances)
lowrank    with rank ``k`` and ``m = min(k + 10, P)`` sketch vectors: ``curvature`` P k;
           ``factor`` P k + k²; ``covariance`` P k + P; ``fit_workspace`` 10 P m float64
           numbers (the sketch's start, basis and running sum, a step's sum and loop carry,
           and the Nyström factorisation's copies); ``per_batch`` (below, each example's
           rows and their products with the sketch, ``m`` numbers per row and per factored
           output). Over any weight subset.
gp         with ``n`` context examples, ``r = n K`` rows and ``q = min(r, P)``:
           ``curvature`` q P (the root: the rows, or their QR factor if r > P);
           ``fit_workspace`` 2 r P (the chunks of rows and their concatenation);
           ``per_batch`` one chunk of rows and their intermediates (below, at most
           ``CHUNK_BYTES``); ``factor`` q P + q² (the Gram matrix and the orthonormal
           basis); ``covariance`` q P + P. Over any weight subset.
=========  ========================================================================

``per_batch`` of full and diag over ``"all"`` weights is one chunk of the per-example
intermediates of :mod:`~laplace_tf.curvature._per_example`: a Dense layer with
one location per example is factored (its inputs and pre-activation gradients, never its
rows), every other layer has rows of its size; the intermediates exist twice, in chunks of at
most ``CHUNK_BYTES`` (256 MiB) and at least one example. Over the last layer (one Dense layer:
``D = din + 1``, ``K = dout``, ``P = D K``), ``per_batch`` is B (D + K²): the features and
the output-space Hessians, nothing per weight; kron has the two factors D² and K². Each
block type's own parts (``curvature`` and those of its factor and covariance) come from its
``memory`` (:mod:`laplace_tf.blocks`). Full
(over all weights or the last layer) joins batches into steps of up to ``STEP_EXAMPLES``
(2048) examples within a chunk, so its ``per_batch`` counts such a step.

Not counted: the model's own weights, TensorFlow's runtime and traced graphs (tens to
hundreds of MiB, fixed: ``benchmarks/memory_rules.py``), the activations of the forward and
backward passes of full, diag, lowrank and gp, and the GLM predictive, which works batch by
batch on the order of ``per_batch``. The parts are summed as if all were alive at
once: an upper bound on the peak, since the fit workspace is free before the posterior's
parts are allocated (and the allocator reuses it). Measured (``tests/test_memory.py``): the
peak resident memory of ``Laplace(..., "full").fit`` and one GLM prediction grows by about
0.7 to 0.8 times the full estimate.

Example:
    >>> import keras
    >>> from laplace_tf.params import WeightSubset
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> estimate = estimate_memory(WeightSubset(model), "full", n_outputs=2, batch_size=4)
    >>> estimate.parts["curvature"]              # 8 x 8 float32 numbers
    256
    >>> estimate_memory(WeightSubset(model), "kron", n_outputs=2).parts["curvature"]
    80
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from laplace_tf.arguments import choice, positive_int
from laplace_tf.blocks import DenseBlock, DiagBlock, KronBlock, LowRankBlock
from laplace_tf.curvature import SUBSETS
from laplace_tf.curvature._per_example import (
    _COPIES,
    CHUNK_BYTES,
    STEP_EXAMPLES,
    _example_width,
    _factor_dims,
)
from laplace_tf.curvature.base import CURVATURES, STRUCTURES
from laplace_tf.curvature.full import default_memory_limit
from laplace_tf.curvature.kron_layers import (
    ROW_CHUNKS,
    block_kind,
    fallback_reason,
    is_factored,
    kron_shapes,
    output_size,
)
from laplace_tf.curvature.last_layer import full_example_numbers
from laplace_tf.curvature.lowrank import DEFAULT_OVERSAMPLING, DEFAULT_RANK
from laplace_tf.params import LayerSlice, WeightSubset

_ALL_WEIGHTS_FIT_COPIES = 6  # P x P buffers of a fit besides the curvature (module docstring)
_LAST_LAYER_FIT_COPIES = 3
_LOWRANK_FIT_COPIES = 10  # float64 [P, m] buffers of a low-rank fit (module docstring)
_EIGH_WORKSPACE = 3  # n x n buffers of a factor's eigendecomposition besides its eigenvectors
# a MultiHeadAttention's [H, T, S] tensors an example: the forward pass's scores and
# probabilities; per row of the backward passes, the probabilities' gradient and the three
# intermediates of the softmax's backward (measured: benchmarks/memory_rules.py)
_ATTENTION_FORWARD = 2
_ATTENTION_BACKWARD = 4
# (structure, subset_of_weights) -> what needs less memory
_CHEAPER = {
    ("full", "all"): "hessian_structure='kron' or hessian_structure='diag', or "
                     "subset_of_weights='last_layer'",
    ("kron", "all"): "hessian_structure='diag', or subset_of_weights='last_layer'",
    ("diag", "all"): "subset_of_weights='last_layer'",
    ("full", "last_layer"): "hessian_structure='kron' or hessian_structure='diag'",
    ("kron", "last_layer"): "hessian_structure='diag'",
    ("diag", "last_layer"): "",
    ("lowrank", "all"): "a smaller rank, hessian_structure='diag', or "
                        "subset_of_weights='last_layer'",
    ("lowrank", "last_layer"): "a smaller rank, or hessian_structure='diag'",
    ("gp", "all"): "a smaller n_context, or subset_of_weights='last_layer'",
    ("gp", "last_layer"): "a smaller n_context",
    ("full", "subnetwork"): "fewer subnetwork_indices",
}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a (structure, weight subset) pair needs, part by part (see the module docstring).

    Attributes:
        structure: ``"full"``, ``"kron"``, ``"diag"``, ``"lowrank"`` or ``"gp"``.
        subset_of_weights: ``"all"``, ``"last_layer"`` or ``"subnetwork"``.
        n_params: number of weights ``P``.
        dtype: the dtype's name, e.g. ``"float32"``.
        batch_size: the batch size the per-batch part assumes.
        parts: bytes per part, e.g. ``{"curvature": ..., "per_batch": ...}``.
    """

    structure: str
    subset_of_weights: str
    n_params: int
    dtype: str
    batch_size: int
    parts: dict[str, int]

    @property
    def total_bytes(self) -> int:
        """The sum of all parts."""
        return sum(self.parts.values())

    def __str__(self) -> str:
        lines = [
            f"hessian_structure={self.structure!r}, subset_of_weights="
            f"{self.subset_of_weights!r}: {self.n_params:,} weights ({self.dtype}), batch size "
            f"{self.batch_size}: about {format_bytes(self.total_bytes)}"
        ]
        width = max(len(name) for name in self.parts)
        lines += [f"  {name:<{width}}  {format_bytes(n):>10}" for name, n in self.parts.items()]
        return "\n".join(lines)


def estimate_memory(
    subset: WeightSubset,
    structure: str,
    n_outputs: int,
    batch_size: int = 128,
    dtype: tf.DType | str | None = None,
    subset_of_weights: str = "all",
    curvature: str = "ggn",
    rank: int = DEFAULT_RANK,
    n_context: int | None = None,
) -> MemoryEstimate:
    """The bytes fitting ``structure`` over ``subset`` and using its posterior need.

    Args:
        subset: the weights (for ``"last_layer"``: the last Dense layer's weights only).
        structure: ``"full"``, ``"kron"``, ``"diag"``, ``"lowrank"`` or ``"gp"``.
        n_outputs: the number of model outputs (logits) ``K``.
        batch_size: the batch size of the fit.
        dtype: the floating dtype of the computation (default: the weights' dtype).
        subset_of_weights: ``"all"``, ``"last_layer"`` or ``"subnetwork"``.
        curvature: ``"ggn"``, ``"ef"`` or ``"hessian"`` (rows per example: 1 for ``"ef"``,
            else ``n_outputs``).
        rank: the rank of ``"lowrank"`` (capped at the number of weights).
        n_context: ``"gp"`` (required there): the number of context examples.

    Returns:
        A :class:`MemoryEstimate`; see the module docstring for every part's formula.

    Raises:
        TypeError: ``subset`` is not a :class:`~laplace_tf.params.WeightSubset`, or
            ``dtype`` is not a dtype.
        ValueError: an unknown structure, subset or curvature, a non-positive ``n_outputs``
            or ``batch_size``, a non-floating dtype, or a last-layer subset that is not one
            Dense layer with ``n_outputs`` outputs.

    Example:
        >>> import keras
        >>> from laplace_tf.params import WeightSubset
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> estimate_memory(WeightSubset(model), "diag", 2, dtype="float64").parts["curvature"]
        64
    """
    if not isinstance(subset, WeightSubset):
        raise TypeError(
            f"subset: expected a laplace_tf.params.WeightSubset; got {type(subset).__name__}. "
            "Use WeightSubset(model) or WeightSubset(model, [last_layer])."
        )
    choice(structure, "structure", STRUCTURES)
    choice(subset_of_weights, "subset_of_weights", SUBSETS)
    choice(curvature, "curvature", CURVATURES)
    n_outputs = positive_int(n_outputs, "n_outputs")
    batch_size = positive_int(batch_size, "batch_size")
    weights_dtype = subset.dtype if dtype is None else _as_dtype(dtype)
    if not weights_dtype.is_floating:
        raise ValueError(f"dtype: expected a floating dtype such as 'float32'; got {weights_dtype.name}.")
    rows = 1 if curvature == "ef" else n_outputs
    if structure == "lowrank":
        rank = min(positive_int(rank, "rank"), subset.n_params)
        counts = _lowrank(subset, rows, rank, batch_size, weights_dtype.size)
    elif structure == "gp":
        if n_context is None:
            raise ValueError(
                "n_context: the memory of hessian_structure='gp' grows with its context; give "
                "the number of context examples (for n_context=None: of training examples)."
            )
        counts = _gp(subset, rows, positive_int(n_context, "n_context"), weights_dtype.size)
    elif subset_of_weights == "last_layer":
        counts = _last_layer(subset, structure, n_outputs, batch_size, weights_dtype.size)
    elif structure == "full":
        per_batch = _per_example(subset, rows, True, batch_size, weights_dtype.size)
        counts = _full(subset.n_params, _ALL_WEIGHTS_FIT_COPIES, per_batch)
    elif structure == "kron":
        counts = _kron(subset, rows, batch_size)
    else:
        counts = _diag(subset.n_params, _per_example(subset, rows, False, batch_size, weights_dtype.size))
    return MemoryEstimate(
        structure, subset_of_weights, subset.n_params, weights_dtype.name, batch_size,
        {name: int(n) * weights_dtype.size for name, n in counts.items()},
    )


def check_memory(estimate: MemoryEstimate, limit_bytes: int | None = None,
                 name: str = "limit_bytes") -> None:
    """Refuse (ValueError) when ``estimate`` exceeds ``limit_bytes``.

    The message gives the estimate's total (what ``str(estimate)`` and
    ``Laplace.memory_estimate()`` show) and the limit.

    Args:
        estimate: from :func:`estimate_memory`.
        limit_bytes: the most bytes allowed; default a quarter of the available memory
            (:func:`laplace_tf.curvature.full.default_memory_limit`).
        name: the limit's name in messages (``"memory_limit_bytes"`` for a Laplace).

    Raises:
        ValueError: the estimate is above the limit (the message names the cheaper
            structures), or ``limit_bytes`` is not a positive integer.

    Example:
        >>> import keras
        >>> from laplace_tf.params import WeightSubset
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> check_memory(estimate_memory(WeightSubset(model), "full", 2), limit_bytes=2**20)
    """
    if limit_bytes is None:
        limit_bytes = default_memory_limit()
    limit_bytes = positive_int(limit_bytes, name)
    if estimate.total_bytes <= limit_bytes:
        return
    cheaper = _CHEAPER[estimate.structure, estimate.subset_of_weights]
    advice = [f"use {cheaper}"] if cheaper else []
    # full and low-rank steps take at least STEP_EXAMPLES examples, a GP its context
    by_batch = estimate.structure in ("diag", "kron") or (
        estimate.structure in ("full", "lowrank") and estimate.batch_size > STEP_EXAMPLES)
    if by_batch and estimate.parts.get("per_batch", 0) > estimate.total_bytes / 2:
        advice.append(f"use a smaller batch_size than {estimate.batch_size}")
    advice.append(f"raise {name} if you have the memory")
    text = "; or ".join(advice)
    largest = max(estimate.parts, key=lambda part: estimate.parts[part])
    raise ValueError(
        f"hessian_structure={estimate.structure!r} with subset_of_weights="
        f"{estimate.subset_of_weights!r} over {estimate.n_params:,} weights ({estimate.dtype}) "
        f"needs about {format_bytes(estimate.total_bytes)} (largest part: {largest}, "
        f"{format_bytes(estimate.parts[largest])}), more than the limit of "
        f"{format_bytes(limit_bytes)} ({name}). {text[:1].upper()}{text[1:]}."
    )


def _full(p: int, fit_copies: int, per_batch: int) -> dict[str, int]:
    block = DenseBlock.memory(p)
    return {"curvature": block["curvature"], "fit_workspace": fit_copies * p * p,
            "per_batch": per_batch, **block}


def _kron(subset: WeightSubset, rows: int, batch_size: int) -> dict[str, int]:
    counts = dict.fromkeys(("curvature", "fit_workspace", "per_batch", "eigendecomposition"), 0)
    projections = _projection_outputs(subset.model)
    hooked = 0  # output numbers of the layers whose outputs the fit probes
    for layer_slice in subset.slices:
        kind, _ = block_kind(layer_slice)
        if fallback_reason(layer_slice) is None:
            hooked += _output_numbers(layer_slice.layer, projections)
        if kind == "kron":  # every block: its q input rows a location and its gradients
            layers = [_kron_layer(d, o, batch_size * _locations(layer_slice, projections)
                                  * (_row_numbers(layer_slice.layer, q * d) + rows * o))
                      for d, o, q in kron_shapes(layer_slice.layer)]
        elif kind == "dense":  # a scale-and-shift layer's exact block
            layers = [_full(layer_slice.size, 2, _exact_rule_block(layer_slice, rows, batch_size, projections))]
        elif fallback_reason(layer_slice) is None:  # a rule's exact diagonal
            layers = [_diag(layer_slice.size, _exact_rule_block(layer_slice, rows, batch_size, projections))]
        else:
            layers = [_diag(layer_slice.size, batch_size * rows * layer_slice.size)]
        for layer in layers:
            for name, n in layer.items():
                counts[name] = counts.get(name, 0) + n
    counts["activations"] = batch_size * (_forward_numbers(subset.model, projections) + hooked)
    counts["attention"] = batch_size * (_ATTENTION_FORWARD + _ATTENTION_BACKWARD * rows) * sum(
        _attention_scores(layer) for layer in _layers(subset.model)
        if isinstance(layer, keras.layers.MultiHeadAttention))
    counts["eigh_workspace"] = _EIGH_WORKSPACE * max(
        (max(d, o) ** 2 for s in subset.slices if block_kind(s)[0] == "kron"
         for d, o, _ in kron_shapes(s.layer)), default=0)
    return counts


def _layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Every layer of ``model`` (nested models and a MultiHeadAttention's sub-layers walked)."""
    return list(model._flatten_layers(include_self=False, recursive=True))


def _forward_numbers(model: keras.Model, projections: dict) -> int:
    """Numbers of one example's forward pass kept for the backward passes: the model's inputs
    and the output of every layer that has no sub-layers (a MultiHeadAttention's projections
    through :func:`_output_numbers`), and the group-major copies of a grouped convolution's
    input and output that TensorFlow's CPU kernel makes. A subclassed model records neither
    its inputs nor its layers' outputs: 0 for them."""
    inputs = sum(_numbers(x) for x in getattr(model, "inputs", None) or [])
    layers = [layer for layer in _layers(model)
              if not layer._layers and not isinstance(layer, keras.layers.InputLayer)]
    return inputs + sum(_output_numbers(layer, projections) + _grouped_copies(layer)
                        for layer in layers)


def _numbers(x) -> int:
    """Numbers in one example of a symbolic tensor (unknown axes count as 1)."""
    return int(np.prod([n or 1 for n in x.shape[1:]]))


def _grouped_copies(layer: keras.layers.Layer) -> int:
    """A grouped convolution's input and output numbers (TensorFlow's CPU kernel copies both
    group-major); 0 for other layers and for layers without a recorded input and output."""
    if getattr(layer, "groups", 1) == 1:
        return 0
    try:
        return _numbers(layer.input) + _numbers(layer.output)
    except (AttributeError, ValueError):
        return 0


def _attention_scores(layer: keras.layers.MultiHeadAttention) -> int:
    """``H T S``: one example's attention scores (as many probabilities), from the layer's
    heads and the query and value shapes it was built with (0 if it was not built). ``T``:
    the query's positions (with any axes not attended over), ``S``: the attended values'."""
    shapes = getattr(layer, "_build_shapes_dict", None) or {}
    query, value = shapes.get("query_shape"), shapes.get("value_shape")
    if query is None or value is None:
        return 0
    axes = layer._attention_axes or tuple(range(1, len(query) - 1))
    return layer.num_heads * int(np.prod([n or 1 for n in query[1:-1]])) * int(
        np.prod([value[a] or 1 for a in axes]))


def _row_numbers(layer: keras.layers.Layer, width: int) -> int:
    """Numbers of a location's input rows: an Embedding's are its token (K-FAC-expand counts
    tokens; only K-FAC-reduce forms one-hot rows), every other layer's their width."""
    return 1 if type(layer) is keras.layers.Embedding else width


def _exact_rule_block(layer_slice: LayerSlice, rows: int, batch_size: int,
                      projections: dict) -> int:
    """``per_batch`` of a rule's exact block (a scale-and-shift layer's, a large embedding's
    diagonal): the gradients of the layer's whole output ``[R, B, ...]``, its normalised
    inputs (or tokens) and two products of them with a chunk of the gradients' rows
    (:data:`~laplace_tf.curvature.kron_layers.ROW_CHUNKS`), then ``R`` gradient rows of the
    weights per example."""
    chunk = -(-rows // min(rows, ROW_CHUNKS))
    return batch_size * ((1 + 2 * chunk + rows) * _output_numbers(layer_slice.layer, projections)
                         + rows * layer_slice.size)


def _kron_layer(d: int, o: int, per_batch: int) -> dict[str, int]:
    block = KronBlock.memory(d, o)
    return {"curvature": block["curvature"], "fit_workspace": 2 * block["curvature"],
            "per_batch": per_batch, **block}


def _diag(p: int, per_batch: int) -> dict[str, int]:
    block = DiagBlock.memory(p)
    return {"curvature": block["curvature"], "fit_workspace": 2 * p, "per_batch": per_batch,
            **block}


def _lowrank(subset: WeightSubset, rows: int, rank: int, batch_size: int,
             itemsize: int) -> dict[str, int]:
    p = subset.n_params
    m = min(rank + DEFAULT_OVERSAMPLING, p)
    block = _in_float64(LowRankBlock.memory(p, rank), itemsize)
    dims = _slice_dims(subset)
    factored = sum(d[1] for d in dims if isinstance(d, tuple))
    per_example = _COPIES * (_example_width(dims, rows, False) + m * (rows + 2 * factored))
    step = min(max(batch_size, STEP_EXAMPLES), max(1, CHUNK_BYTES // (per_example * itemsize)))
    return {"curvature": block["curvature"],
            "fit_workspace": _LOWRANK_FIT_COPIES * p * m * 8 // itemsize,
            "per_batch": step * per_example, **block}


def _in_float64(block: dict[str, int], itemsize: int) -> dict[str, int]:
    """A low-rank block's counts in numbers of the model's dtype: its factor and covariance
    are kept in float64 (:class:`~laplace_tf.blocks.lowrank.LowRankCovariance`)."""
    return {**block, "factor": block["factor"] * 8 // itemsize,
            "covariance": block["covariance"] * 8 // itemsize}


def _gp(subset: WeightSubset, rows: int, n_context: int, itemsize: int) -> dict[str, int]:
    p = subset.n_params
    block = _in_float64(LowRankBlock.memory(p, min(n_context * rows, p)), itemsize)
    dims = _slice_dims(subset)
    per_example = _COPIES * (_example_width(dims, rows, False) + rows * p)
    chunk = min(n_context, max(1, CHUNK_BYTES // (per_example * itemsize)))
    return {"curvature": block["curvature"], "fit_workspace": 2 * n_context * rows * p,
            "per_batch": chunk * per_example, **block}


def _last_layer(
    subset: WeightSubset, structure: str, n_outputs: int, batch_size: int, itemsize: int
) -> dict[str, int]:
    """Counts over one Dense layer whose outputs are the logits (closed forms, no rows)."""
    slices = subset.slices
    if len(slices) != 1 or not isinstance(slices[0].layer, keras.layers.Dense):
        raise ValueError(
            "subset: subset_of_weights='last_layer' needs the weights of one Dense layer, "
            f"WeightSubset(model, [last_layer]); got layers {[s.name for s in slices]}."
        )
    d, k = _factor_sizes(slices[0])
    if k != n_outputs:
        raise ValueError(
            f"n_outputs: the last layer {slices[0].name!r} has {k} outputs, but the model "
            f"{n_outputs}; the last-layer closed form needs the model output to be one Dense "
            "layer's whole output (a model ending in Concatenate of several heads has none). "
            "Use subset_of_weights='all', or 'subnetwork' with "
            "subnetwork_indices=ltf.subnetwork.layer_weights(model, [heads]); or, if the model "
            "ends in one Dense layer, name it with last_layer_name= (memory_estimate: give the "
            "model's n_outputs)."
        )
    per_batch = batch_size * (d + k * k)  # features and output-space Hessians
    if structure == "full":  # batches joined into steps of up to STEP_EXAMPLES, within a chunk
        step = max(batch_size, STEP_EXAMPLES) * full_example_numbers(d, k)
        return _full(subset.n_params, _LAST_LAYER_FIT_COPIES, min(step, CHUNK_BYTES // itemsize))
    if structure == "kron":
        return _kron_layer(d, k, per_batch)
    return _diag(subset.n_params, per_batch)


def _factor_sizes(layer_slice: LayerSlice) -> tuple[int, int]:
    """``(D, O)``: the inputs (with the 1 for a bias) and outputs of a kernel ``[..., O]``."""
    o = int(layer_slice.variables[0].shape[-1])
    return layer_slice.size // o, o


def _locations(layer_slice: LayerSlice, projections: dict) -> int:
    """Output positions per example of a layer with a Kronecker rule (1 for Dense on
    ``[N, din]``), from the layer's output.

    A layer without a recorded output shape (a subclassed model) counts as one location.
    """
    return max(1, _output_numbers(layer_slice.layer, projections)
               // output_size(layer_slice.layer))


def _output_numbers(layer: keras.layers.Layer, projections: dict) -> int:
    """Numbers in one example's output of the layer (0 without a recorded output shape; a
    MultiHeadAttention's projections from ``projections``, :func:`_projection_outputs`)."""
    try:
        return _numbers(layer.output)
    except (AttributeError, ValueError):
        return projections.get(layer, 0)


def _projection_outputs(model: keras.Model) -> dict:
    """Each MultiHeadAttention projection of ``model`` (an EinsumDense called inside the
    attention layer, which records no output) -> its output numbers an example: ``T H
    key_dim`` (query), ``S H key_dim`` (key), ``S H value_dim`` (value), ``T width`` (output)."""
    projections = {}
    for layer in _layers(model):
        shapes = getattr(layer, "_build_shapes_dict", None) or {}
        if not isinstance(layer, keras.layers.MultiHeadAttention) or "query_shape" not in shapes:
            continue
        query, value = shapes["query_shape"], shapes["value_shape"]
        key = shapes.get("key_shape") or value
        t, s_key, s_value = (int(np.prod([n or 1 for n in x[1:-1]])) for x in (query, key, value))
        width = layer._output_shape or query[-1]
        width = int(np.prod(width)) if isinstance(width, tuple | list) else int(width)
        heads = layer.num_heads
        for sub, n in ((layer._query_dense, t * heads * layer.key_dim),
                       (layer._key_dense, s_key * heads * layer.key_dim),
                       (layer._value_dense, s_value * heads * layer.value_dim),
                       (layer._output_dense, t * width)):
            projections[sub] = n
    return projections


def _per_example(
    subset: WeightSubset, rows: int, outer: bool, batch_size: int, itemsize: int
) -> int:
    """Numbers alive for one chunk of per-example intermediates of full / diag.

    Mirrors :mod:`laplace_tf.curvature._per_example`: a layer with a Kronecker
    rule and one location per example is factored (taken here from its output shape), the
    intermediates exist ``_COPIES`` times, and examples come in chunks that fit in
    ``CHUNK_BYTES`` (full joins batches into steps of up to a chunk).
    """
    dims = _slice_dims(subset)
    per_example = _COPIES * _example_width(dims, rows, outer)
    chunk = max(1, CHUNK_BYTES // (per_example * itemsize))
    step = max(batch_size, STEP_EXAMPLES) if outer else batch_size  # full joins batches
    return min(step, chunk) * per_example


def _slice_dims(subset: WeightSubset) -> list[tuple[int, int] | int]:
    """Each slice's ``(din (+1), dout)`` if :mod:`~laplace_tf.curvature._per_example` factors
    it (a layer with a Kronecker rule and one location per example), else its size (some of
    such a layer's weights: its rows are formed at those only; of another layer: its rows
    are formed whole, then gathered)."""
    projections = _projection_outputs(subset.model)
    once = [is_factored(s) and _locations(s, projections) == 1 for s in subset.slices]
    return [(_factor_dims(s) if s.columns is None else s.size) if one else s.layer_size
            for s, one in zip(subset.slices, once, strict=True)]


def _as_dtype(dtype) -> tf.DType:
    try:
        return tf.as_dtype(dtype)
    except TypeError:
        raise TypeError(
            f"dtype: expected a TensorFlow dtype or its name, e.g. 'float32'; got {dtype!r}."
        ) from None


def format_bytes(n: int) -> str:
    """``n`` bytes in B, KiB, MiB, GiB or TiB, as the memory messages give them.

    Example:
        >>> format_bytes(1536), format_bytes(3 * 2**30)
        ('1.5 KiB', '3.0 GiB')
    """
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
