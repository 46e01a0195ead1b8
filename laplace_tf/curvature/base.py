"""The curvature of a model's summed negative log-likelihood, accumulated over batches.

A structure module (``full``, ``kron``, ``diag``, ``last_layer``) provides a
:class:`CurvatureBuilder`: pure TensorFlow code that turns one batch into sums over its
examples (curvature blocks, or compact sums it lays out as blocks once, at the end).
:func:`fit_curvature` runs it as one compiled ``tf.function`` for all batch shapes, adds the
sums up in place, and returns a :class:`Curvature`.

Example:
    >>> import keras, numpy as np
    >>> from laplace_tf.curvature.diag import DiagBuilder
    >>> from laplace_tf.likelihoods import get_likelihood
    >>> from laplace_tf.batches import Batches
    >>> from laplace_tf.params import LogitModel
    >>> model = keras.Sequential([keras.Input((2,), dtype="float64"),
    ...                           keras.layers.Dense(1, dtype="float64")])
    >>> x = np.random.default_rng(0).normal(size=(6, 2))
    >>> builder = DiagBuilder(LogitModel(model), get_likelihood("regression"), "ggn")
    >>> data = Batches((x, x.sum(1)), 4, dtype="float64", progress=False)
    >>> curvature = fit_curvature(builder, data)   # two batches, summed
    >>> curvature.n_data
    6
    >>> X = np.c_[x, np.ones(6)]                    # a linear model: diag(X^T X) exactly
    >>> bool(np.allclose(curvature.blocks[0].diagonal, (X**2).sum(0)))
    True
    >>> (curvature + curvature).n_data              # the curvature of the data twice
    12
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from laplace_tf.batches import Batches
from laplace_tf.blocks import Block
from laplace_tf.inputs import InputCheck, explain_grouped_convolution
from laplace_tf.likelihoods import Likelihood
from laplace_tf.outputs import check_output_op, check_output_values
from laplace_tf.params import LogitModel, any_batch_size, compiled_per_shape

CURVATURES = ("ggn", "ef", "hessian")
STRUCTURES = ("full", "kron", "diag", "lowrank", "gp")


@dataclass
class Curvature:
    """The curvature of the summed NLL at the MAP, and what the evidence needs.

    Attributes:
        structure: ``"full"``, ``"kron"``, ``"diag"``, ``"lowrank"`` or ``"gp"``.
        blocks: blocks in parameter order, covering the whole weight subset.
        nll: summed negative log-likelihood over the data (scalar, model dtype).
        n_data: number of examples (with sample weights: their sum, a float).
        residual_ss: the likelihood's data statistics
            (:meth:`~laplace_tf.likelihoods.Likelihood.data_statistics`; regression: the sum
            over data of squared residuals per output ``[K]``), None if it has no noise.

    Sample weights count as replications: every sum over data is weighted by them.
    """

    structure: str
    blocks: list[Block]
    nll: tf.Tensor
    n_data: int | float
    residual_ss: tf.Tensor | None = None

    def __add__(self, other: Curvature) -> Curvature:
        return Curvature(
            self.structure,
            [a.add(b) for a, b in zip(self.blocks, other.blocks, strict=True)],
            self.nll + other.nll,
            self.n_data + other.n_data,
            None if self.residual_ss is None else self.residual_ss + other.residual_ss,
        )

    def scaled(self, factor) -> Curvature:
        """Blocks multiplied by ``factor`` (the data terms are unchanged)."""
        blocks = [b.scaled(factor) for b in self.blocks]
        return Curvature(self.structure, blocks, self.nll, self.n_data, self.residual_ss)


class CurvatureBuilder:
    """One batch -> curvature blocks, for a (weight subset, structure, curvature kind).

    Subclasses implement :meth:`batch_sums` in pure TensorFlow (it is traced once per batch
    shape); they receive logits from ``logit_model`` and targets prepared by the likelihood.
    Those whose sums are not blocks yet also implement :meth:`finish`.
    """

    structure: str = ""
    kinds: tuple[str, ...] = CURVATURES
    passes: int = 1
    """Passes over the data a fit takes; :meth:`start_pass` runs before each."""
    keeps_examples: bool = False
    """Whether :meth:`observe` keeps examples for :meth:`finish` (then the curvature is not a
    sum over batches, and cannot be all-reduced over workers)."""
    _compiled_step: Callable | None = None
    """The compiled batch step, built at the first fit (:func:`_compiled_step`)."""

    def __init__(self, logit_model: LogitModel, likelihood: Likelihood, kind: str = "ggn"):
        if kind not in self.kinds:
            raise ValueError(
                f"curvature: {kind!r} is not available for hessian_structure="
                f"{self.structure!r}; choose one of {self.kinds}."
            )
        self.logit_model = logit_model
        self.likelihood = likelihood
        self.kind = kind

    def batch_blocks(self, x, y, w=None) -> tuple[list[Block], tf.Tensor]:
        """Curvature blocks of one batch, and the batch's logits ``[N, K]``."""
        sums, logits = self.batch_sums(x, y, w)
        return self.finish(sums), logits

    def batch_sums(self, x, y, w=None) -> tuple[list, tf.Tensor]:
        """One batch's sums over examples, which add up over batches entry by entry (blocks,
        Kronecker blocks in sum form, or compact sums), and its logits ``[N, K]``.

        ``w [N]``: sample weights (replication counts), each example's terms are multiplied by
        its weight; ``None`` for ones (:func:`weights_or_ones`)."""
        raise NotImplementedError

    def examples_per_step(self, x) -> int:
        """The most examples one compiled step may take, for batches like ``x``: consecutive
        batches are joined up to this many (a larger batch is a step of its own). By default 0,
        one step a batch; builders whose every step adds a large sum (dense ``P x P``) join
        batches to take fewer steps, within their memory budget."""
        return 0

    def start_pass(self, previous: list | None) -> None:
        """Before each of :attr:`passes` passes: ``previous`` is the last pass's sums (added up
        over all batches and workers), None before the first. By default nothing."""

    def finish(self, sums: list) -> list[Block]:
        """The blocks of :meth:`batch_sums` added up over batches (by default, the sums with
        Kronecker ``A`` turned from a sum into a mean)."""
        return [b.from_sum_form() for b in sums]

    def observe(self, x, y, w) -> None:
        """Called with every step's batch (in Python, before the step): by default nothing. A
        builder whose curvature is not a sum over all examples (the GP's context examples,
        :mod:`~laplace_tf.curvature.gp`) keeps what it needs here for :meth:`finish`."""


def weights_or_ones(w, like: tf.Tensor) -> tf.Tensor:
    """Sample weights ``w [N]`` in the dtype of ``like [N, ...]``, or ones for ``w=None``."""
    if w is None:
        return tf.ones(tf.shape(like)[:1], like.dtype)
    return tf.cast(w, like.dtype)


class _Sums(NamedTuple):
    """What :func:`fit_curvature` adds up over batches, entry by entry (blocks in sum form)."""

    blocks: list
    nll: tf.Tensor
    residual_ss: tf.Tensor
    n_data: tf.Tensor


def fit_curvature(
    builder: CurvatureBuilder, batches: Batches, strategy: tf.distribute.Strategy | None = None
) -> Curvature:
    """Sum ``builder``'s blocks over ``batches``; targets are checked batch by batch, and the
    model outputs are checked to be logits, not probabilities: by their values on the first
    batch, and by the op that computes them in the traced step
    (:func:`~laplace_tf.outputs.check_output_values`, :func:`~laplace_tf.outputs.check_output_op`).

    A dense builder joins consecutive batches into steps of up to
    :meth:`CurvatureBuilder.examples_per_step` examples; every other builder takes one step a
    batch. A builder with several :attr:`~CurvatureBuilder.passes` sees the data that many
    times (its :meth:`~CurvatureBuilder.start_pass` takes each pass's sums); the last pass's
    sums are the result.

    With a ``tf.distribute`` strategy (given, or the one whose scope is active), every step is
    split across the local replicas, each replica's curvature is summed locally, and the
    totals are all-reduced once at the end, so workers may hold different numbers of
    batches. Each worker of a multi-worker strategy passes its own shard of the data.
    """
    likelihood = builder.likelihood
    if strategy is not None and not isinstance(strategy, tf.distribute.Strategy):
        raise TypeError(
            f"strategy: expected a tf.distribute.Strategy (e.g. tf.distribute."
            f"MirroredStrategy()) or None; got {type(strategy).__name__}."
        )
    if strategy is None and tf.distribute.has_strategy():
        strategy = tf.distribute.get_strategy()
    elif not tf.distribute.has_strategy() and strategy is tf.distribute.get_strategy():
        strategy = None  # the default strategy (no scope active): no distribution

    step = _compiled_step(builder)
    def prepared():
        n_outputs = None
        for x, y, w in batches.weighted():
            if n_outputs is None:  # the first batch: a failure is explained if x is the cause
                outputs = InputCheck(builder.logit_model.model).call(builder.logit_model, x)
                if outputs.shape.rank != 2:
                    raise ValueError(
                        f"model: its output on a batch of {len(y)} inputs has shape "
                        f"{tuple(outputs.shape)}; laplace_tf needs outputs [N, K], one row of K "
                        "logits (or means) per input. Return [N, 1] for one output (no final "
                        "squeeze), or flatten other shapes with a final Flatten layer."
                    )
                n_outputs = int(outputs.shape[-1])
                likelihood.validate_outputs(n_outputs)
                check_output_values(outputs, likelihood, builder.logit_model.stripped)
            yield x, likelihood.prepare_targets(y, n_outputs, batches.dtype), tf.constant(w)

    multi_worker = strategy is not None and (
        strategy.num_replicas_in_sync > _n_local_replicas(strategy))
    if multi_worker and builder.keeps_examples:
        raise ValueError(
            f"strategy: hessian_structure={builder.structure!r} keeps examples of the data "
            "(not sums), which a multi-worker strategy cannot all-reduce; fit on one worker."
        )
    total, weighted, specs = None, batches.is_weighted, None
    run: Callable = step
    for _ in range(builder.passes):
        builder.start_pass(None if total is None else total.blocks)
        total = None
        for x, targets, w in _joined(prepared(), builder.examples_per_step):
            builder.observe(x, targets, w)
            try:
                if strategy is None:  # called directly: one trace for all batch sizes (a
                    batch_specs = any_batch_size([x, targets, w])  # short last), one a shape
                    if batch_specs != specs:
                        run = step.get_concrete_function(*batch_specs, weighted)
                        specs = batch_specs
                    parts = [run(x, targets, w, weighted)]
                else:
                    parts = _replica_steps(strategy, step, weighted, x, targets, w)
            except tf.errors.InvalidArgumentError as err:
                explain_grouped_convolution(builder.logit_model.model, err)
                raise
            if total is None:  # the step is traced: what op computes the model output?
                check_output_op(builder.logit_model.output_op, likelihood,
                                builder.logit_model.stripped)
            for part in parts:
                total = _add_in_place(total, part)
        if total is None:
            raise ValueError("data: the data set is empty; give at least one example.")
        total = tf.nest.map_structure(tf.convert_to_tensor, total)
        if multi_worker:
            total = _all_reduce(strategy, total)
    assert total is not None  # a builder takes at least one pass
    n_data = float(total.n_data)
    if n_data <= 0:
        raise ValueError(
            "sample_weight: all sample weights are 0, so there are no data; give at least one "
            "positive weight."
        )
    blocks = builder.finish(total.blocks)
    return Curvature(builder.structure, blocks, total.nll,
                     n_data if batches.is_weighted else int(round(n_data)),
                     total.residual_ss if likelihood.has_noise else None)


def _compiled_step(builder: CurvatureBuilder):
    """The builder's step (one batch -> :class:`_Sums`) as a ``tf.function``, built once per
    builder: fits with the same builder reuse its traces (any batch size, one trace)."""
    step = builder._compiled_step
    if step is None:
        likelihood = builder.likelihood

        @compiled_per_shape
        def step(x, y, w, weighted=True):  # weighted=False: all w are 1 (not read)
            sums, logits = builder.batch_sums(x, y, w if weighted else None)
            w = tf.cast(w, logits.dtype)
            residual_ss = likelihood.data_statistics(logits, y, w)
            if residual_ss is None:
                residual_ss = tf.zeros([1], logits.dtype)
            nll = tf.reduce_sum(w * likelihood.nll_per_example(logits, y))
            return _Sums(list(sums), nll, residual_ss, tf.reduce_sum(tf.cast(w, tf.float64)))

        builder._compiled_step = step
    return step


def _joined(batches: Iterator[tuple], examples_per_step) -> Iterator[tuple]:
    """``(x, targets)`` batches, consecutive ones joined into steps of at most
    ``examples_per_step(x)`` examples (read from the first batch); a larger batch stays alone,
    and only batches of the same shapes but for their size join (a dataset's
    ``padded_batch`` pads each batch to its own length)."""
    pending: list[tuple] = []
    held, limit, shapes = 0, None, None
    for batch in batches:
        if limit is None:
            limit = examples_per_step(batch[0])
        rows = int(batch[1].shape[0])
        batch_shapes = [t.shape[1:] for t in tf.nest.flatten(batch)]
        if pending and (held + rows > limit or batch_shapes != shapes):
            yield _join(pending)
            pending, held = [], 0
        shapes = batch_shapes
        pending.append(batch)
        held += rows
        if held >= limit:
            yield _join(pending)
            pending, held = [], 0
    if pending:
        yield _join(pending)


def _join(batches: list[tuple]) -> tuple:
    """One ``(x, targets)`` of several, concatenated along the examples."""
    if len(batches) == 1:
        return batches[0]
    return tf.nest.map_structure(lambda *parts: tf.concat(parts, axis=0), *batches)


def _add_in_place(total: _Sums | None, part: _Sums) -> _Sums:
    """``total + part``. On the CPU as numpy arrays, added in place: no allocation per step,
    and a few microseconds for small sums, where an eager TensorFlow op costs about 0.1 ms a
    tensor. Sums computed on another device (a GPU) stay there, added by TensorFlow: no copy
    to the host per batch."""
    if total is None:
        if "CPU" not in part.nll.device.upper():
            return part
        return tf.nest.map_structure(lambda t: np.array(t), part)
    if isinstance(total.nll, np.ndarray):
        return tf.nest.map_structure(lambda t, p: np.add(t, p, out=t), total, part)
    return tf.nest.map_structure(tf.add, total, part)


def _shard(tensor, index: int, n_shards: int):
    """Rows ``[index n / n_shards, (index + 1) n / n_shards)``: sizes differ by at most one."""
    n = tf.shape(tensor)[0]
    return tensor[index * n // n_shards : (index + 1) * n // n_shards]


def _n_local_replicas(strategy) -> int:
    return len(strategy.extended.worker_devices)


def _replica_steps(strategy, step, weighted: bool, *batch) -> list:
    """Run ``step`` on each local replica's share of one batch; the local results.

    A batch with fewer examples than local replicas runs on one device instead: an empty
    shard would reach the builders as a batch of zero examples, which not all of them accept
    (the exact Hessian's vectorised Jacobian fails on it).
    """
    n_replicas = _n_local_replicas(strategy)
    if int(tf.shape(batch[1])[0]) < n_replicas:
        return [step(*batch, weighted)]

    def values(context):
        index = context.replica_id_in_sync_group % n_replicas
        return tf.nest.map_structure(lambda t: _shard(t, index, n_replicas), batch)

    shards = strategy.experimental_distribute_values_from_function(values)
    per_replica = strategy.run(lambda parts: step(*parts, weighted), args=(shards,))
    return list(strategy.experimental_local_results(per_replica))


def _all_reduce(strategy, total: _Sums) -> _Sums:
    """Sum a worker's sums over all workers (one collective call)."""

    def first_replica_only(context):
        keep = context.replica_id_in_sync_group % _n_local_replicas(strategy) == 0
        return tf.nest.map_structure(lambda t: t if keep else tf.zeros_like(t), total)

    values = strategy.experimental_distribute_values_from_function(first_replica_only)
    reduced = strategy.run(
        lambda v: tf.distribute.get_replica_context().all_reduce("sum", v), args=(values,)
    )
    return strategy.experimental_local_results(reduced)[0]
