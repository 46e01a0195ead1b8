"""The GLM functional variance ``J Sigma J^T``, block by block, without a P x P matrix.

For inputs ``x_n`` the linearised network has logits ``f(x_n; theta*) + J_n (theta - theta*)``
with ``J_n [K, P]``; under the posterior ``N(theta*, Sigma)`` their covariance is
``V_n = J_n Sigma J_n^T [K, K]``. ``Sigma`` is block-diagonal over the posterior's
covariance blocks, so ``V_n`` is a sum over blocks.

Each covariance block contracts its own layers' Jacobian pieces
(:meth:`laplace_tf.blocks.base.Covariance.contract`); this module computes those pieces
(:class:`~laplace_tf.blocks.jacobian.LayerJacobian`). For a layer with a Kronecker rule
(:mod:`laplace_tf.curvature.kron_layers`) with inputs (or patches) ``a_t`` at locations ``t``,
the output gradients ``g_{t,k} = d f_k / d z_t`` with respect to its pre-activation ``z_t`` come
from one forward pass with zero "probes" added to the pre-activations and one backward pass
per logit (vectorised), exploiting that examples do not interact at inference. Weights of
other layers (BatchNorm, recurrent cells, ...) get their per-example Jacobian example by
example (:func:`~laplace_tf.curvature._per_example.vectorised_rows` with the identity as
cotangents; a Jacobian of the whole batch's logits would take ``N K`` backward passes of the
whole batch: memory and time grow with ``N**2``). For a last-layer posterior the layer's pre-activation is the logits, so
``g_k = e_k`` and no probe is needed (``g = None``): the blocks use closed forms in the
features ``a = [phi(x), 1]``.

Example:
    >>> import keras, numpy as np, tensorflow as tf
    >>> from laplace_tf.params import LogitModel
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])
    >>> f = LogitModel(model)
    >>> fv = FunctionalVariance(f, [(0, 9)], [DiagCovariance])
    >>> x = tf.constant([[1.0, 2.0]])
    >>> _, var = fv(x, f.subset.flat_values(), (DiagCovariance(tf.ones(9)),), diagonal=True)
    >>> var.numpy()                               # sum_i a_i^2 with a = [1, 2, 1]
    array([[6., 6., 6.]], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from laplace_tf.autodiff import first_line, quiet_pfor_errors
from laplace_tf.blocks import Covariance, DiagCovariance, LayerJacobian  # noqa: F401 (doctest)
from laplace_tf.curvature._per_example import (
    one_example_at_a_time,
    unfactorable_layers,
    vectorised_rows,
)
from laplace_tf.curvature.kron_layers import (
    KRON_RULES,
    block_kind,
    input_rows,
    is_factored,
    kron_parts,
    kron_shapes,
    output_size,
)
from laplace_tf.curvature.last_layer import last_layer_features
from laplace_tf.params import LayerSlice, LogitModel


@dataclass(frozen=True)
class _Part:
    """One layer (or one Kronecker block of a layer) inside a covariance block, and how its
    Jacobian is obtained."""

    slice: LayerSlice
    factored: bool  # sum_t a_t g_t^T (is_factored; else: an explicit per-example Jacobian)
    start: int  # offset of the layer (or its piece) inside the block
    kron: bool  # the layer's rule gives it Kronecker blocks (factored or not)
    piece: tuple[int, int] | None = None  # (offset, size) in the layer: one of its blocks

    @property
    def size(self) -> int:
        return self.slice.size if self.piece is None else self.piece[1]

    @property
    def shape(self) -> tuple[int, int]:
        """``(din, dout)``: the weights as a row-major matrix, bias row included (of the
        Kronecker block that starts here, for a layer with a rule)."""
        if self.kron:
            offset, start = 0, 0 if self.piece is None else self.piece[0]
            for din, dout, _ in kron_shapes(self.slice.layer):
                if offset == start:
                    return din, dout
                offset += din * dout
        dout = int(self.slice.variables[0].shape[-1])
        return self.slice.layer_size // dout, dout


class _Factor(NamedTuple):
    """A registered layer's Jacobian, factored: ``M_k = sum_t a_t g_{t,k}^T``."""

    a: tf.Tensor  # [N, T, din]
    g: tf.Tensor | None  # [N, T, K, dout]; None: the identity (pre-activation = logits)


class FunctionalVariance:
    """``f(x; theta*)`` and ``J Sigma J^T`` for a batch, for one covariance-block layout.

    Args:
        logit_model: the posterior's :class:`LogitModel` (its ``subset`` is the flat vector).
        block_slices: ``(offset, size)`` of every covariance block in the flat vector.
        kinds: the covariance type of every block (``type(block)``); a type whose
            ``needs_one_factored_layer`` must cover one layer with a Kronecker rule.
        logits_layer: the subset is one Dense/Conv layer whose pre-activation IS the logits
            (a last-layer posterior): use the closed forms in its features.

    Raises:
        ValueError: if a block does not cover whole layers, or a Kronecker block's layer has
            no Jacobian rule.
    """

    def __init__(
        self,
        logit_model: LogitModel,
        block_slices: Sequence[tuple[int, int]],
        kinds: Sequence[type[Covariance]],
        *,
        logits_layer: bool = False,
    ):
        self.logit_model = logit_model
        self.kinds = tuple(kinds)
        self.plan = tuple(
            _block_parts(logit_model.subset.slices, offset, size)
            for offset, size in block_slices
        )
        for kind, parts in zip(self.kinds, self.plan, strict=True):
            if kind.needs_one_factored_layer and (len(parts) != 1 or not parts[0].kron):
                names = [(p.slice.name, type(p.slice.layer).__name__) for p in parts]
                raise ValueError(
                    f"covariance: a {kind.__name__} block covers {names}; the GLM predictive "
                    f"supports such blocks over one layer of type "
                    f"{sorted(t.__name__ for t in KRON_RULES)}. Use hessian_structure='diag'."
                )
        layers = [p for block_parts in self.plan for p in block_parts]
        self.logits_layer = logits_layer and len(layers) == 1 and layers[0].factored
        # layers whose Jacobian comes from their inputs and pre-activation gradients
        self._hooked = list({id(p.slice.layer): p for p in layers if p.kron}.values())
        # layers whose Jacobian comes from autodiff, example by example
        self._generic = {id(p.slice.layer) for p in layers if not p.kron}
        self._unfactorable: dict[int, str] | None = None  # hooked layers, at the first call
        self._one_at_a_time = False  # the forward pass needs per-example rows one at a time

    def __call__(self, x, mean: tf.Tensor, blocks: Sequence, diagonal: bool):
        """Logits ``[N, K]`` and their covariance ``[N, K, K]`` (``[N, K]`` if ``diagonal``).

        Args:
            x: a batch of inputs.
            mean: the flat MAP ``[P]``.
            blocks: the covariance blocks, aligned with ``block_slices`` (prepared by
                :meth:`prepare` beforehand to share that work between batches, or not).
            diagonal: return only ``diag(J Sigma J^T)`` (cheaper with many outputs).
        """
        return self.contract(self.linearise(x, mean), blocks, diagonal)

    def linearise(self, x, mean: tf.Tensor) -> tuple:
        """The batch's logits and Jacobian pieces, which :meth:`contract` turns into the
        variance under any covariance of this layout (the pieces do not depend on the prior:
        a grid search over it linearises each batch once)."""
        if self._unfactorable is None:  # at the first call
            if self.logits_layer:  # the closed form's condition (low-rank and GP fits skip it)
                last_layer_features(self.logit_model, x)
            self._unfactorable = unfactorable_layers(  # their Jacobian is taken explicitly
                self.logit_model, [p.slice.layer for p in self._hooked], x
            ) if self._hooked else {}
            for p in self._hooked:
                if id(p.slice.layer) in self._unfactorable:
                    self._generic.add(id(p.slice.layer))
            self._hooked = [p for p in self._hooked if id(p.slice.layer) not in self._unfactorable]
            if self._generic:
                self._one_at_a_time = one_example_at_a_time(self.logit_model, x)
        return self._linearise(x, self.logit_model.subset.unflatten(mean))

    def contract(self, pieces: tuple, blocks: Sequence, diagonal: bool):
        """Logits and their covariance (as :meth:`__call__`) from :meth:`linearise`'s pieces."""
        logits, factors, jacobians = pieces
        blocks = self.prepare(blocks, diagonal)
        variance = None
        for parts, block in zip(self.plan, blocks, strict=True):
            layers = [_layer_jacobian(p, factors, jacobians) for p in parts]
            term = block.contract(layers, diagonal)
            variance = term if variance is None else variance + term
        return logits, variance

    def prepare(self, blocks: Sequence[Covariance], diagonal: bool) -> tuple:
        """The blocks in the form :meth:`__call__` takes: work shared by all batches.

        For the diagonal of a last-layer posterior, each block prepares itself
        (``for_logits_diagonal``: Kronecker and dense blocks are contracted over the output
        space once here). Prepared blocks are returned unchanged.
        """
        if not (diagonal and self.logits_layer):
            return tuple(blocks)
        return tuple(
            block.for_logits_diagonal(parts[0].shape)
            for block, parts in zip(blocks, self.plan, strict=True)
        )

    def _linearise(self, x, weights):
        """One forward pass recording layer inputs (and probes), then the Jacobians.

        Returns the logits, a :class:`_Factor` per factored layer and the per-example
        Jacobian ``[N, K, p]`` of every other layer, keyed by ``id(layer)``: from the rule's
        parts for the other layers with Kronecker blocks (output groups, several kernels:
        TensorFlow cannot vectorise a grouped convolution's weight gradient on CPU), by
        autodiff for the rest.
        """
        calls: dict[int, list] = {id(p.slice.layer): [] for p in self._hooked}
        with tf.GradientTape() as tape:

            def hook(layer, inputs, z):
                locations = int(np.prod(z.shape[1:])) // output_size(layer)  # static
                if self.logits_layer:  # g is the identity: no probe needed
                    calls[id(layer)].append((inputs, locations, None))
                    return z
                probe = tf.zeros_like(z)
                tape.watch(probe)
                calls[id(layer)].append((inputs, locations, probe))
                return z + probe

            logits = self.logit_model(
                x, weights, layers=[p.slice.layer for p in self._hooked], hook=hook
            )
            summed = tf.reduce_sum(logits, axis=0)  # examples do not interact: one pass per k
        probes = [probe for c in calls.values() for *_, probe in c if probe is not None]
        grads = iter(_vectorised_jacobian(tape, summed, probes) if probes else [])
        factors, jacobians = {}, {}
        for part in self._hooked:
            layer = part.slice.layer
            if not part.factored:
                jacobians[id(layer)] = tf.add_n([_explicit_jacobian(layer, inputs, next(grads))
                                                 for inputs, _, _ in calls[id(layer)]])
                continue
            a_calls, g_calls = [], []
            for inputs, locations, probe in calls[id(part.slice.layer)]:
                rows = input_rows(part.slice.layer, inputs)  # [N * T, din], example-major
                a_calls.append(tf.reshape(rows, [-1, locations, rows.shape[-1]]))
                if probe is not None:  # [K, N, ..., dout] -> [N, T, K, dout]
                    g = next(grads)
                    g = tf.reshape(g, [g.shape[0], -1, locations, part.shape[1]])
                    g_calls.append(tf.transpose(g, [1, 2, 0, 3]))
            factors[id(part.slice.layer)] = _Factor(
                tf.concat(a_calls, axis=1), tf.concat(g_calls, axis=1) if g_calls else None
            )
        if self._generic:  # per example (a Jacobian of all logits would cost N times more)
            slices = [replace(s, columns=None, size=s.layer_size)  # whole layers: see below
                      for s in self.logit_model.subset.slices if id(s.layer) in self._generic]
            identity = tf.broadcast_to(tf.eye(logits.shape[-1], dtype=logits.dtype),
                                       tf.concat([tf.shape(logits), logits.shape[-1:]], 0))
            rows = vectorised_rows(self.logit_model, x, identity, slices, self._one_at_a_time,
                                   weights)  # [N, K, p]: row k is the Jacobian of logit k
            for s, jacobian in zip(slices, tf.split(rows, [s.layer_size for s in slices], -1),
                                   strict=True):
                jacobians[id(s.layer)] = jacobian
        return logits, factors, jacobians


def _explicit_jacobian(layer, inputs: tf.Tensor, grads: tf.Tensor) -> tf.Tensor:
    """The Jacobian ``[N, K, p]`` of the logits with respect to a layer's weights, from one
    call's inputs and pre-activation gradients ``[K, N, ..., dout]``, block by block
    (:func:`~laplace_tf.curvature.kron_layers.kron_parts`), in the flat order of its weights
    (:meth:`~laplace_tf.curvature.kron_layers.KronRule.order`). In a block with ``q`` output
    groups, row ``(t, j)`` acts on group ``j``'s outputs only:
    ``M_k[:, group j] = sum_t a_{t,j} g_{t,k,group j}^T`` (no masked outer product is formed).
    """
    pieces = []
    for part, (din, dout, q) in zip(kron_parts(layer, inputs, grads), kron_shapes(layer),
                                    strict=True):
        shape = tf.shape(part.grads)  # [K, N, ...]
        a = tf.reshape(part.biased_rows(), [shape[1], -1, q, din])
        g = tf.reshape(part.grads, [shape[0], shape[1], -1, q, dout // q])
        jac = tf.einsum("ntji,kntjm->nkijm", a, g)
        pieces.append(tf.reshape(jac, [shape[1], shape[0], din * dout]))
    order = KRON_RULES[type(layer)].order(layer)  # columns in the flat order
    jacobian = tf.concat(pieces, axis=-1)
    return jacobian if order is None else tf.gather(jacobian, np.argsort(order), axis=-1)


def _vectorised_jacobian(tape: tf.GradientTape, target: tf.Tensor, sources: list) -> list:
    """``tape.jacobian`` by pfor (recurrent layers' loops included), or a clear ValueError."""
    try:
        with quiet_pfor_errors():
            return tape.jacobian(target, sources, experimental_use_pfor=True,
                                 unconnected_gradients=tf.UnconnectedGradients.ZERO)
    except (ValueError, NotImplementedError) as err:
        raise ValueError(
            f"pred_type='glm': could not vectorise the Jacobian of the logits with respect to "
            f"the weights ({first_line(err)}). Use pred_type='nn' (weight samples), or "
            "subset_of_weights='last_layer'."
        ) from None


def _block_parts(slices: Sequence[LayerSlice], offset: int, size: int) -> tuple[_Part, ...]:
    """The layers a block covers, or the one layer it is a Kronecker block of."""
    parts = tuple(
        _Part(s, is_factored(s), s.offset - offset, _has_kron_blocks(s))
        for s in slices if offset <= s.offset < offset + size
    )
    inside = [s for s in slices
              if s.offset <= offset and offset + size <= s.offset + s.size and s.size != size]
    if inside and _has_kron_blocks(inside[0]):
        parts = (_Part(inside[0], False, 0, True, (offset - inside[0].offset, size)),)
    if sum(p.size for p in parts) != size or not parts or parts[0].start != 0:
        raise ValueError(
            f"covariance: the block at offset {offset} of size {size} does not cover whole "
            f"layers (or one Kronecker block of a layer) of the weight subset "
            f"{[(s.name, s.offset, s.size) for s in slices]}."
        )
    return parts


def _has_kron_blocks(layer_slice: LayerSlice) -> bool:
    """Whether the layer's rule gives it Kronecker blocks of outer products."""
    return (block_kind(layer_slice)[0] == "kron"
            and KRON_RULES[type(layer_slice.layer)].outer_product)


def _layer_jacobian(part: _Part, factors, jacobians) -> LayerJacobian:
    """The Jacobian pieces of one layer of a block, for its covariance to contract; for some
    of the layer's weights (a subnetwork, or one of its Kronecker blocks), their columns of
    its explicit Jacobian."""
    factor = factors.get(id(part.slice.layer))
    a, g = (None, None) if factor is None else factor
    layer = LayerJacobian(part.start, part.slice.layer_size, part.shape, a, g,
                          jacobians.get(id(part.slice.layer)))
    if part.piece is not None:
        start, size = part.piece
        return layer._replace(size=size, jacobian=layer.explicit()[..., start:start + size])
    columns = part.slice.columns
    if columns is None:
        return layer
    if a is None or g is None:
        jacobian = tf.gather(layer.explicit(), columns, axis=-1)
    else:  # entry (i, j) of the (din, dout) matrix: sum_t a_ti g_tkj, for the chosen ones only
        rows, outputs = columns // part.shape[1], columns % part.shape[1]
        jacobian = tf.einsum("ntc,ntkc->nkc", tf.gather(a, rows, axis=-1),
                             tf.gather(g, outputs, axis=-1))
    return LayerJacobian(part.start, part.slice.size, part.shape, None, None, jacobian)
