"""The GLM functional variance ``J Sigma J^T``, block by block, without a P x P matrix.

For inputs ``x_n`` the linearised network has logits ``f(x_n; theta*) + J_n (theta - theta*)``
with ``J_n [K, P]``; under the posterior ``N(theta*, Sigma)`` their covariance is
``V_n = J_n Sigma J_n^T [K, K]``. ``Sigma`` is block-diagonal over the posterior's
covariance blocks, so ``V_n`` is a sum over blocks.

Per-layer Jacobians factor. For a layer with a Kronecker rule
(:mod:`laplace_tf.curvature.kron_layers`: Dense, Conv1D, Conv2D) with inputs (or patches)
``a_t`` at locations ``t`` (the constant 1 appended for the bias) and output gradients
``g_{t,k} = d f_k / d z_t`` with respect to its pre-activation ``z_t``, the Jacobian of
logit ``k`` with respect to the ``(din, dout)`` weight matrix is
``M_k = sum_t a_t g_{t,k}^T``. The ``g`` of all registered layers come from one forward pass
with zero "probes" added to the pre-activations and one backward pass per logit (vectorised),
exploiting that examples do not interact at inference. Then:

* Kronecker block ``Sigma = (Qa ⊗ Qg) diag(1/eig) (Qa ⊗ Qg)^T``: with ``b = Qa^T a`` and
  ``c_k = Qg^T g_k``, ``V[k, l] = sum_ij (sum_t b_ti c_tkj)(sum_t b_ti c_tlj) / eig_ij``; at
  one location this is ``sum_j c_kj c_lj w_j`` with ``w = (b * b) @ (1/eig)``.
* diagonal block: the same with ``Qa = Qg = I`` and ``1/eig`` the variances.
* dense block: the explicit ``J`` of its weights (``M`` flattened), then ``(J Sigma) J^T``.

Only ``M`` at several locations (convolutions, a layer called twice) is materialised:
``N K din dout`` numbers per batch, so lower ``batch_size`` for wide convolutions.

Weights of other layers (BatchNorm, ...) get their per-example Jacobian by a vectorised
``tape.jacobian``. For a last-layer posterior the layer's pre-activation is the logits, so
``g_k = e_k`` and everything is closed form in the features ``a = [phi(x), 1]``:
``V[k, l] = sum_ij b_i^2 Qg[k, j] Qg[l, j] / eig_ij`` (Kronecker),
``diag(sum_i a_i^2 var[i, :])`` (diagonal), ``sum_ij a_i a_j Sigma[(i, k), (j, l)]`` (dense).

Example:
    >>> import keras, numpy as np, tensorflow as tf
    >>> from laplace_tf.params import LogitModel
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])
    >>> f = LogitModel(model)
    >>> fv = FunctionalVariance(f, [(0, 9)], ["diag"])
    >>> x = tf.constant([[1.0, 2.0]])
    >>> _, var = fv(x, f.subset.flat_values(), (DiagCovariance(tf.ones(9)),), diagonal=True)
    >>> var.numpy()                               # sum_i a_i^2 with a = [1, 2, 1]
    array([[6., 6., 6.]], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from laplace_tf.autodiff import first_line, quiet_pfor_errors
from laplace_tf.curvature.kron_layers import KRON_RULES, fallback_reason, input_rows
from laplace_tf.params import LayerSlice, LogitModel
from laplace_tf.posterior.factors import (
    Covariance,
    DenseCovariance,
    DiagCovariance,
    KronCovariance,
)


@dataclass(frozen=True)
class _Part:
    """One layer inside a covariance block, and how its Jacobian is obtained."""

    slice: LayerSlice
    factored: bool  # a Kronecker rule applies (else: per-example Jacobian by autodiff)
    start: int  # offset of the layer inside the block

    @property
    def shape(self) -> tuple[int, int]:
        """``(din, dout)``: the layer's weights as a row-major matrix, bias row included."""
        dout = int(self.slice.variables[0].shape[-1])
        return self.slice.size // dout, dout


class _Factor(NamedTuple):
    """A registered layer's Jacobian, factored: ``M_k = sum_t a_t g_{t,k}^T``."""

    a: tf.Tensor  # [N, T, din]
    g: tf.Tensor | None  # [N, T, K, dout]; None: the identity (pre-activation = logits)


class _ProjectedKron(NamedTuple):
    """A last-layer Kronecker block for the diagonal: ``diag V = (b * b) @ R``, ``b = Qa^T a``.

    ``R[i, k] = sum_j Qg[k, j]^2 / eig[i, j]`` (``[din, K]``) is computed once per call instead
    of ``K^2`` operations per input.
    """

    Qa: tf.Tensor
    R: tf.Tensor


class _SameOutput(NamedTuple):
    """A last-layer dense block for the diagonal: ``Sigma[(i, k), (j, k)]`` as ``[din, din, K]``."""

    blocks: tf.Tensor


def block_kind(block: Covariance) -> str:
    """``"dense"``, ``"kron"`` or ``"diag"`` for a posterior covariance block."""
    for kind, cls in (("dense", DenseCovariance), ("kron", KronCovariance), ("diag", DiagCovariance)):
        if isinstance(block, cls):
            return kind
    raise TypeError(
        f"covariance block: expected DenseCovariance, KronCovariance or DiagCovariance; got "
        f"{type(block).__name__}."
    )


class FunctionalVariance:
    """``f(x; theta*)`` and ``J Sigma J^T`` for a batch, for one covariance-block layout.

    Args:
        logit_model: the posterior's :class:`LogitModel` (its ``subset`` is the flat vector).
        block_slices: ``(offset, size)`` of every covariance block in the flat vector.
        kinds: the kind of every block (see :func:`block_kind`).
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
        kinds: Sequence[str],
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
            if kind == "kron" and (len(parts) != 1 or not parts[0].factored):
                names = [(p.slice.name, type(p.slice.layer).__name__) for p in parts]
                raise ValueError(
                    f"covariance: a Kronecker block covers {names}; the GLM predictive "
                    f"supports Kronecker blocks of one layer of type "
                    f"{sorted(t.__name__ for t in KRON_RULES)}. Use hessian_structure='diag'."
                )
        parts = [p for parts in self.plan for p in parts]
        self.logits_layer = logits_layer and len(parts) == 1 and parts[0].factored
        self._factored = [p for p in parts if p.factored]
        positions = {id(v): i for i, v in enumerate(logit_model.subset.variables)}
        self._generic = {
            id(p.slice.layer): [positions[id(v)] for v in p.slice.variables]
            for p in parts if not p.factored
        }

    def __call__(self, x, mean: tf.Tensor, blocks: Sequence, diagonal: bool):
        """Logits ``[N, K]`` and their covariance ``[N, K, K]`` (``[N, K]`` if ``diagonal``).

        Args:
            x: a batch of inputs.
            mean: the flat MAP ``[P]``.
            blocks: the covariance blocks, aligned with ``block_slices`` (prepared by
                :meth:`prepare` beforehand to share that work between batches, or not).
            diagonal: return only ``diag(J Sigma J^T)`` (cheaper with many outputs).
        """
        blocks = self.prepare(blocks, diagonal)
        logits, factors, jacobians = self._linearise(x, self.logit_model.subset.unflatten(mean))
        variance = None
        for parts, block in zip(self.plan, blocks, strict=True):
            term = _block_variance(parts, block, factors, jacobians, diagonal)
            variance = term if variance is None else variance + term
        return logits, variance

    def prepare(self, blocks: Sequence[Covariance], diagonal: bool) -> tuple:
        """The blocks in the form :meth:`__call__` takes: work shared by all batches.

        For the diagonal of a last-layer posterior, Kronecker and dense blocks are contracted
        over the output space once here (see :class:`_ProjectedKron`, :class:`_SameOutput`).
        Prepared blocks are returned unchanged.
        """
        if not (diagonal and self.logits_layer):
            return tuple(blocks)
        return tuple(
            _prepare_logits_diagonal(block, parts[0]) for block, parts in zip(blocks, self.plan,
                                                                               strict=True)
        )

    def _linearise(self, x, weights):
        """One forward pass recording layer inputs (and probes), then the Jacobians.

        Returns the logits, a :class:`_Factor` per registered layer and the per-example
        Jacobian ``[N, K, p]`` of every other layer, keyed by ``id(layer)``.
        """
        calls: dict[int, list] = {id(p.slice.layer): [] for p in self._factored}
        watched = {i: weights[i] for indices in self._generic.values() for i in indices}
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(list(watched.values()))

            def hook(layer, inputs, z):
                locations = int(np.prod(z.shape[1:-1]))  # static even when N is not
                if self.logits_layer:  # g is the identity: no probe needed
                    calls[id(layer)].append((inputs, locations, None))
                    return z
                probe = tf.zeros_like(z)
                tape.watch(probe)
                calls[id(layer)].append((inputs, locations, probe))
                return z + probe

            logits = self.logit_model(
                x, weights, layers=[p.slice.layer for p in self._factored], hook=hook
            )
            summed = tf.reduce_sum(logits, axis=0)  # examples do not interact: one pass per k
        probes = [probe for c in calls.values() for *_, probe in c if probe is not None]
        grads = iter(_vectorised_jacobian(tape, summed, probes) if probes else [])
        factors = {}
        for part in self._factored:
            a_calls, g_calls = [], []
            for inputs, locations, probe in calls[id(part.slice.layer)]:
                rows = input_rows(part.slice.layer, inputs)  # [N * T, din], example-major
                a_calls.append(tf.reshape(rows, [-1, locations, rows.shape[-1]]))
                if probe is not None:  # [K, N, ..., dout] -> [N, T, K, dout]
                    g = next(grads)
                    g = tf.reshape(g, [g.shape[0], -1, locations, g.shape[-1]])
                    g_calls.append(tf.transpose(g, [1, 2, 0, 3]))
            factors[id(part.slice.layer)] = _Factor(
                tf.concat(a_calls, axis=1), tf.concat(g_calls, axis=1) if g_calls else None
            )
        jacobians = {}
        if watched:
            flat_shape = tf.concat([tf.shape(logits), [-1]], axis=0)
            per_weight = dict(zip(watched, _vectorised_jacobian(
                tape, logits, list(watched.values())), strict=True))
            for layer_id, indices in self._generic.items():
                jacobians[layer_id] = tf.concat(
                    [tf.reshape(per_weight[i], flat_shape) for i in indices], axis=-1
                )
        return logits, factors, jacobians


def _vectorised_jacobian(tape: tf.GradientTape, target: tf.Tensor, sources: list) -> list:
    """``tape.jacobian`` by pfor (recurrent layers' loops included), or a clear ValueError."""
    try:
        with quiet_pfor_errors():
            return tape.jacobian(target, sources, experimental_use_pfor=True)
    except (ValueError, NotImplementedError) as err:
        raise ValueError(
            f"pred_type='glm': could not vectorise the Jacobian of the logits with respect to "
            f"the weights ({first_line(err)}). Use pred_type='nn' (weight samples), or "
            "subset_of_weights='last_layer'."
        ) from None


def _block_parts(slices: Sequence[LayerSlice], offset: int, size: int) -> tuple[_Part, ...]:
    parts = tuple(
        _Part(s, fallback_reason(s) is None, s.offset - offset)
        for s in slices if offset <= s.offset < offset + size
    )
    if sum(p.slice.size for p in parts) != size or not parts or parts[0].start != 0:
        raise ValueError(
            f"covariance: the block at offset {offset} of size {size} does not cover whole "
            f"layers of the weight subset {[(s.name, s.offset, s.size) for s in slices]}."
        )
    return parts


def _prepare_logits_diagonal(block: Covariance, part: _Part):
    if isinstance(block, KronCovariance):
        return _ProjectedKron(
            block.Qa, tf.matmul(1.0 / block.precision_eigenvalues, block.Qg**2, transpose_b=True)
        )
    if isinstance(block, DenseCovariance):
        din, n_outputs = part.shape
        blocks = tf.reshape(block.matrix, [din, n_outputs, din, n_outputs])
        return _SameOutput(tf.linalg.diag_part(tf.transpose(blocks, [0, 2, 1, 3])))
    return block


def _block_variance(parts, block, factors, jacobians, diagonal):
    """One block's ``J Sigma J^T`` (or its diagonal)."""
    factor = factors.get(id(parts[0].slice.layer))
    if isinstance(block, _ProjectedKron):
        b = tf.matmul(factor.a[:, 0], block.Qa)
        return tf.matmul(b * b, block.R)
    if isinstance(block, _SameOutput):
        a = factor.a[:, 0]
        return tf.einsum("ni,ijk,nj->nk", a, block.blocks, a)
    if isinstance(block, KronCovariance):
        return _factored_variance(
            factor, block.Qa, block.Qg, 1.0 / block.precision_eigenvalues, diagonal
        )
    if isinstance(block, DiagCovariance):
        total = None
        for part in parts:
            variance = block.variance[part.start: part.start + part.slice.size]
            if not part.factored:
                jac = jacobians[id(part.slice.layer)]
                term = _weighted_gram(jac, variance, diagonal)
            else:
                term = _factored_variance(
                    factors[id(part.slice.layer)], None, None,
                    tf.reshape(variance, part.shape), diagonal,
                )
            total = term if total is None else total + term
        return total
    if factor is not None and factor.g is None:  # pre-activation = logits, full V
        a = factor.a[:, 0]
        din = int(a.shape[-1])
        n_outputs = int(block.matrix.shape[0]) // din
        blocks = tf.reshape(block.matrix, [din, n_outputs, din, n_outputs])
        return tf.einsum("nkjl,nj->nkl", tf.einsum("ni,ikjl->nkjl", a, blocks), a)
    jac = tf.concat([_jacobian(p, factors, jacobians) for p in parts], axis=-1)
    left = tf.einsum("nkp,pq->nkq", jac, block.matrix)
    if diagonal:
        return tf.reduce_sum(left * jac, axis=-1)
    return tf.matmul(left, jac, transpose_b=True)


def _jacobian(part: _Part, factors, jacobians) -> tf.Tensor:
    """The explicit per-example Jacobian ``[N, K, p]`` of one layer's weights."""
    if not part.factored:
        return jacobians[id(part.slice.layer)]
    factor = factors[id(part.slice.layer)]
    jac = tf.einsum("nti,ntkj->nkij", factor.a, factor.g)
    shape = tf.shape(jac)
    return tf.reshape(jac, [shape[0], shape[1], -1])


def _weighted_gram(jac: tf.Tensor, weights: tf.Tensor, diagonal: bool) -> tf.Tensor:
    """``J diag(weights) J^T`` (or its diagonal) for ``J [N, K, p]``."""
    if diagonal:
        return tf.einsum("nkp,p->nk", jac * jac, weights)
    return tf.matmul(jac * weights, jac, transpose_b=True)


def _factored_variance(factor: _Factor, Qa, Qg, inverse_eig, diagonal: bool) -> tf.Tensor:
    """``sum_ij M_kij M_lij inverse_eig_ij`` in the rotated bases ``Qa``, ``Qg`` (None = I)."""
    b = factor.a if Qa is None else tf.einsum("nti,ij->ntj", factor.a, Qa)
    if factor.g is None:  # pre-activation = logits: g_k = e_k, one location
        w = tf.matmul(b[:, 0] ** 2, inverse_eig)  # [N, K]
        if Qg is None:
            return w if diagonal else tf.linalg.diag(w)
        return tf.einsum("kj,nj,lj->nkl", Qg, w, Qg)  # the diagonal: see _ProjectedKron
    c = factor.g if Qg is None else tf.einsum("ntkj,jm->ntkm", factor.g, Qg)
    if factor.a.shape[1] == 1:  # one location: M_k = b c_k^T is rank one
        w = tf.matmul(b[:, 0] ** 2, inverse_eig)  # [N, dout]
        c = c[:, 0]  # [N, K, dout]
        if diagonal:
            return tf.einsum("nkj,nj->nk", c * c, w)
        return tf.matmul(c * w[:, None, :], c, transpose_b=True)
    scaled = tf.einsum("nti,ntkj->nkij", b, c) * tf.sqrt(inverse_eig)
    shape = tf.shape(scaled)
    scaled = tf.reshape(scaled, [shape[0], shape[1], -1])
    if diagonal:
        return tf.reduce_sum(scaled * scaled, axis=-1)
    return tf.matmul(scaled, scaled, transpose_b=True)
