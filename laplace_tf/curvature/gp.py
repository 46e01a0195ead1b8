"""The GGN over context examples as a low-rank root: the functional (GP) Laplace.

The GGN of a set of context examples is ``H_c = R^T R`` with the root rows
``R = stack_n L_n^T J_n`` ``[n_context K, P]`` (``Lambda_n = L_n L_n^T``, the likelihood's
output Hessian; :mod:`~laplace_tf.curvature._per_example`), so the posterior
``N(theta*, (c R^T R + diag(lambda))^-1)`` is one :class:`~laplace_tf.blocks.LowRankBlock`.
Its GLM predictive, in Woodbury form (:mod:`laplace_tf.blocks.lowrank`), is the GP with kernel
``J(x) diag(lambda)^-1 J(x')^T`` conditioned on the context points with noise from the output
Hessians (Immer et al. 2021): every cost beyond the Jacobians is that of
``min(n_context K, P)^2`` matrices. A context with more rows than weights (``n_context K > P``)
keeps instead of its rows the triangular ``[P, P]`` factor of their QR decomposition: the same
curvature ``R^T R``, factored in ``O(P^3)`` instead of ``O((n_context K)^3)`` (its QR costs
more than the full structure's sum of outer products: the GP pays off with fewer rows than
weights; ``benchmarks/gp.py``).

The context (:class:`ContextBuilder`): all training examples (``n_context=None``), or the
``n_context`` examples whose priorities are smallest, example ``i`` of the data (in data
order, counting examples, not batches) having the ``i``-th draw of
``numpy.random.default_rng(seed).random()`` (seed 0 by default): a uniform choice without
replacement, reproducible, independent of the batch size, and taken while streaming.
Examples of sample weight 0 are never chosen. The evidence's data terms (NLL, number of
examples) are still sums over all the data (:func:`~laplace_tf.curvature.base.fit_curvature`).

Example:
    The context of a linear regression model is its design matrix ``[x, 1]``:

    >>> import keras, numpy as np
    >>> from laplace_tf.batches import Batches
    >>> from laplace_tf.curvature.base import fit_curvature
    >>> from laplace_tf.likelihoods import get_likelihood
    >>> from laplace_tf.params import LogitModel
    >>> model = keras.Sequential([keras.Input((4,), dtype="float64"),
    ...                           keras.layers.Dense(1, dtype="float64")])
    >>> x = np.random.default_rng(0).normal(size=(6, 4))
    >>> builder = ContextBuilder(LogitModel(model), get_likelihood("regression"), n_context=4,
    ...                          seed=1)
    >>> curvature = fit_curvature(builder, Batches((x, x.sum(1)), 4, dtype="float64"))
    >>> chosen = np.sort(np.argsort(np.random.default_rng(1).random(6))[:4])
    >>> bool(np.allclose(curvature.blocks[0].root, np.c_[x, np.ones(6)][chosen]))
    True
    >>> curvature.n_data                     # the evidence's data terms: all six examples
    6
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from laplace_tf.arguments import positive_int_or_none
from laplace_tf.blocks import Block, LowRankBlock
from laplace_tf.blocks.lowrank import compressed_root
from laplace_tf.curvature._per_example import rows_chunk_examples, stacked_rows
from laplace_tf.curvature.base import CurvatureBuilder
from laplace_tf.curvature.full import default_memory_limit
from laplace_tf.likelihoods import Likelihood
from laplace_tf.params import LogitModel, any_batch_size


class ContextBuilder(CurvatureBuilder):
    """One :class:`~laplace_tf.blocks.LowRankBlock` whose root is the context's GGN rows.

    Args:
        logit_model: the model and its weight subset (any: all weights or the last layer).
        likelihood: the likelihood of the data.
        kind: ``"ggn"`` only (the GP's kernel and noise are the GGN's).
        n_context: the number of context examples (None: all examples).
        seed: the seed of the context's choice (None: 0, as laplace-torch's default).
        memory_limit_bytes: the most the root and its factor may take (checked once the
            context is known, before its rows are computed; default
            :func:`~laplace_tf.curvature.full.default_memory_limit`).

    Raises:
        ValueError, TypeError: a bad ``n_context`` or ``memory_limit_bytes``.
    """

    structure = "gp"
    kinds = ("ggn",)
    keeps_examples = True

    def __init__(self, logit_model: LogitModel, likelihood: Likelihood, kind: str = "ggn",
                 n_context: int | None = None, seed: int | None = None,
                 memory_limit_bytes: int | None = None):
        super().__init__(logit_model, likelihood, kind)
        self.n_context = positive_int_or_none(n_context, "n_context")
        self.memory_limit_bytes = positive_int_or_none(memory_limit_bytes, "memory_limit_bytes")
        self._context = _Context(self.n_context, seed)

    def batch_sums(self, x, y, w=None) -> tuple[list, tf.Tensor]:
        """Nothing to add up (the context is kept by :meth:`observe`); the logits."""
        return [], self.logit_model(x)

    def observe(self, x, y, w) -> None:
        self._context.add(x, y, w)

    def finish(self, sums: list) -> list[Block]:
        """The context's rows ``[n_context K, P]``, in chunks, as one low-rank block."""
        x, y, w = self._context.examples()
        self._check_memory(int(y.shape[0]) * int(self.logit_model(
            tf.nest.map_structure(lambda t: t[:1], x)).shape[-1]))
        chunk = rows_chunk_examples(self.logit_model, self.kind, x)
        rows = tf.function(
            lambda x, y, w: stacked_rows(self.logit_model, self.likelihood, self.kind, x, y, w)[0]
        ).get_concrete_function(*any_batch_size([x, y, w]))
        n = int(y.shape[0])
        parts = [rows(tf.nest.map_structure(lambda t: t[i:i + chunk], x), y[i:i + chunk],  # noqa: B023
                      w[i:i + chunk]) for i in range(0, n, chunk)]
        return [LowRankBlock(compressed_root(tf.concat(parts, axis=0)))]

    def _check_memory(self, n_rows: int) -> None:
        """Refuse ``n_rows`` rows whose chunks, root and factor exceed the memory limit (as
        :func:`~laplace_tf.curvature.memory.estimate_memory` counts them)."""
        p, itemsize = self.logit_model.subset.n_params, self.logit_model.subset.dtype.size
        kept = LowRankBlock.memory(p, min(n_rows, p))
        n_bytes = (2 * n_rows * p + sum(kept.values())) * itemsize
        limit = self.memory_limit_bytes or default_memory_limit()
        if n_bytes > limit:
            from laplace_tf.curvature.memory import format_bytes  # memory.py imports this module

            raise ValueError(
                f"n_context: {n_rows} context rows (examples times outputs) over {p:,} weights "
                f"need about {format_bytes(n_bytes)}, more than the limit of "
                f"{format_bytes(limit)} (memory_limit_bytes). Give a smaller n_context, or "
                "raise memory_limit_bytes if you have the memory."
            )


class _Context:
    """The examples (of positive weight) with the ``size`` smallest priorities so far, or all
    of them for ``size=None``; priorities are draws of ``default_rng(seed).random()``, one per
    example in data order."""

    def __init__(self, size: int | None, seed: int | None):
        self.size = size
        self._rng = np.random.default_rng(0 if seed is None else int(seed) % (2**31 - 1))
        self._kept: list[tuple] = []  # (priorities, positions, x, y, w) per batch, then merged
        self._seen = 0

    def add(self, x, y, w) -> None:
        n = int(w.shape[0])
        priorities = self._rng.random(n)
        positions = np.arange(self._seen, self._seen + n)
        self._seen += n
        keep = np.asarray(w) > 0
        if self.size is not None and self._kept and len(self._kept[0][0]) == self.size:
            keep &= priorities < self._kept[0][0].max()
        if keep.any():
            index = np.flatnonzero(keep)
            self._kept.append((priorities[index], positions[index], *_gathered((x, y, w), index)))
        if self.size is not None and sum(len(k[0]) for k in self._kept) > self.size:
            priorities = np.concatenate([k[0] for k in self._kept])
            self._kept = [self._merged(np.argsort(priorities)[:self.size])]

    def _merged(self, index: np.ndarray) -> tuple:
        """One entry of the kept examples ``index`` (into their concatenation)."""
        joined = self._kept[0] if len(self._kept) == 1 else tf.nest.map_structure(
            lambda *parts: tf.concat(parts, 0), *self._kept)
        priorities, positions, *data = joined
        return (np.asarray(priorities)[index], np.asarray(positions)[index],
                *_gathered(tuple(data), index))

    def examples(self) -> tuple:
        """``(x, y, w)`` of the context, in data order."""
        positions = np.concatenate([k[1] for k in self._kept])
        _, _, *data = self._merged(np.argsort(positions))
        return tuple(data)


def _gathered(structure, index: np.ndarray):
    """Rows ``index`` of every tensor in a (nested) structure."""
    return tf.nest.map_structure(lambda t: tf.gather(t, index), structure)
