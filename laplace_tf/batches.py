"""Data in: ``tf.data`` datasets or ``(x, y)`` arrays, as checked batches with a progress bar.

Example:
    >>> import numpy as np, tensorflow as tf
    >>> batches = as_batches((np.zeros((10, 3)), np.zeros(10)), batch_size=4, dtype=tf.float64)
    >>> [int(x.shape[0]) for x, _ in batches]
    [4, 4, 2]
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterator

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from laplace_tf.arguments import positive_int_or_none
from laplace_tf.inputs import InputCheck, is_input_list

DEFAULT_BATCH_SIZE = 128


def _n_rows(x) -> int:
    if isinstance(x, dict) or is_input_list(x):
        sizes = {k: len(v) for k, v in (x.items() if isinstance(x, dict) else enumerate(x))}
        if len(set(sizes.values())) != 1:
            raise ValueError(
                f"x: the inputs of a {type(x).__name__} must have the same length; got {sizes}."
            )
        return next(iter(sizes.values()))
    return len(x)


def _rows(x, start: int, stop: int):
    """Rows ``[start, stop)`` of ``x``: an array, a dict or a list of arrays."""
    if isinstance(x, dict):
        return {k: v[start:stop] for k, v in x.items()}
    if is_input_list(x):
        return type(x)(v[start:stop] for v in x)
    return x[start:stop]


def _as_float(x, dtype: tf.DType):
    """``x`` as tensors, floating inputs in ``dtype`` (integer ones, e.g. token ids, kept).
    Python numbers are read as numpy does (float64), so nothing is rounded on the way."""
    if isinstance(x, dict):
        return {k: _as_float(v, dtype) for k, v in x.items()}
    if is_input_list(x):
        return type(x)(_as_float(v, dtype) for v in x)
    x = tf.convert_to_tensor(x if tf.is_tensor(x) else np.asarray(x))
    if x.dtype.is_floating or x.dtype.is_integer:
        return tf.cast(x, dtype) if x.dtype.is_floating else x
    raise TypeError(f"x: expected numeric inputs; got dtype {x.dtype.name}.")


def _check_finite(x, index: int) -> None:
    for part in tf.nest.flatten(x):
        if part.dtype.is_floating and not bool(tf.reduce_all(tf.math.is_finite(part))):
            raise ValueError(
                f"x: batch {index} contains NaN or Inf inputs in {part.dtype.name} (the "
                "model's dtype: larger finite values overflow to Inf); clean, impute or rescale "
                "the data first."
            )


def _checked_weights(w, n_rows: int, index: int) -> np.ndarray:
    """Sample weights of one batch as float64 ``[n_rows]``: finite and non-negative (``[n_rows,
    1]`` is taken as ``[n_rows]``, as Keras takes it)."""
    w = np.asarray(w)
    where = "" if index < 0 else f" in batch {index}"
    if w.dtype.kind not in "biuf":
        raise TypeError(f"sample_weight: expected numbers; got dtype {w.dtype}{where}.")
    if w.shape == (n_rows, 1):
        w = w[:, 0]
    if w.shape != (n_rows,):
        raise ValueError(
            f"sample_weight: expected one weight per example, shape ({n_rows},){where}; got "
            f"shape {w.shape}. Give a 1-D array as long as x."
        )
    w = w.astype(np.float64)
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(
            f"sample_weight: expected finite, non-negative weights (a weight is a replication "
            f"count: 2 counts an example twice, 0 drops it); got {w[~(np.isfinite(w) & (w >= 0))][:3]}"
            f"{where}."
        )
    return w


class Batches:
    """Re-iterable ``(x, y)`` batches: ``x`` converted to ``dtype``, ``y`` as numpy.

    Weighted data (``(x, y, w)``) are read with :meth:`weighted`; iterating them as ``(x, y)``
    raises, so that no caller drops the weights silently.

    Args:
        data: a ``tf.data.Dataset`` of ``(x, y)`` or ``(x, y, w)`` batches, or a tuple
            ``(x, y)`` or ``(x, y, w)`` of arrays (``x`` may be a dict or a list of arrays for
            multi-input models; ``w`` holds non-negative sample weights, one per example).
        batch_size: the batch size for arrays (ignored for datasets, which come batched).
        dtype: the floating dtype of the model.
        progress: show a tqdm progress bar while iterating.
        description: the progress bar's label.
        steps: take only the first ``steps`` batches (as Keras' ``steps_per_epoch``); needed
            for an infinite dataset (``.repeat()`` without a count).
        check: an :class:`~laplace_tf.inputs.InputCheck` of the model: the inputs are
            checked against it (before batching, and batch by batch).
        argument: the name of ``data`` in the caller, for error messages.

    Raises:
        ValueError: an infinite dataset without ``steps``, fewer batches than ``steps``, empty
            data, or a bad argument.
    """

    def __init__(self, data, batch_size: int | None = None, *, dtype: tf.DType = tf.float32,
                 progress: bool = False, description: str = "batches",
                 steps: int | None = None, check: InputCheck | None = None,
                 argument: str = "data"):
        self.dtype = tf.as_dtype(dtype)
        self.argument = argument
        self.check = check
        self.progress = progress
        self.description = description
        self.steps = positive_int_or_none(steps, "steps")
        positive_int_or_none(batch_size, "batch_size")
        # exactly one of the two is set: a dataset, or the arrays (x, y) or (x, y, w)
        self._dataset: tf.data.Dataset | None
        self._arrays: tuple | None
        if isinstance(data, tf.data.Dataset):
            spec = data.element_spec
            if not isinstance(spec, tuple) or len(spec) not in (2, 3):
                raise ValueError(
                    f"{argument}: a tf.data.Dataset must yield (x, y) pairs (or (x, y, sample_weight) "
                    f"triples) of batches; got elements {spec}. Use "
                    "dataset.map(lambda *e: (e[0], e[1])) and .batch(n)."
                )
            if any(part.shape.rank == 0 for part in tf.nest.flatten(spec)):
                raise ValueError(
                    f"{argument}: the dataset yields single examples (element shapes "
                    f"{tf.nest.map_structure(lambda t: tuple(t.shape), spec)}), not batches. "
                    "Call .batch(n) on the dataset."
                )
            if check is not None:
                check.data(spec[0], dataset=True)
            self._dataset, self._arrays = data, None
            self.is_weighted = len(spec) == 3
            n = int(data.cardinality())
            if n == tf.data.INFINITE_CARDINALITY and self.steps is None:
                raise ValueError(
                    f"{argument}: the dataset is infinite (.repeat() without a count), so "
                    "reading it would never end; "
                    + ("pass steps=N to take its first N batches, or " if argument == "data"
                       else "") + "make it finite with .take(N) or .repeat(count)."
                )
            self.n_batches = n if n >= 0 else None
        elif isinstance(data, (tuple, list)) and len(data) in (2, 3):
            if len(data) == 3 and data[2] is None:  # (x, y, None): unweighted, as in Keras
                data = data[:2]
            x, y = data[:2]
            if y is None:
                raise TypeError(
                    f"{argument}: got y=None; fitting needs targets. Give a tuple (x, y) with one "
                    "label or target per input."
                )
            if check is not None:
                check.data(x)
            n = _n_rows(x)
            if len(y) != n:
                raise ValueError(
                    f"{argument}: x has {n} rows but y has {len(y)}; give one target per input."
                )
            weights = () if len(data) == 2 else (_checked_weights(data[2], n, -1),)
            self._dataset, self._arrays = None, (x, np.asarray(y), *weights)
            self.is_weighted = bool(weights)
            self.batch_size = batch_size or DEFAULT_BATCH_SIZE
            self.n_batches = -(-n // self.batch_size)
        else:
            raise TypeError(
                f"{argument}: expected a tf.data.Dataset of (x, y) batches or a tuple (x, y) (or "
                f"(x, y, sample_weight)) of arrays; got {type(data).__name__}."
            )
        if self.n_batches == 0:
            raise ValueError(f"{argument}: the data set is empty; give at least one example.")
        if self.steps is not None:
            if self.n_batches is not None and 0 < self.n_batches < self.steps:
                raise ValueError(
                    f"steps: the data has only {self.n_batches} batches; got steps="
                    f"{self.steps}. Give steps <= {self.n_batches}, or leave steps=None to "
                    "use all the data."
                )
            self.n_batches = self.steps
        elif self.n_batches is None:
            self.description = f"{description} (size unknown)"

    def _raw(self) -> Iterator[tuple]:
        if self.steps is not None:
            yield from itertools.islice(self._all(), self.steps)
            return
        yield from self._all()

    def _all(self) -> Iterator[tuple]:
        if self._dataset is not None:
            yield from self._dataset
            return
        assert self._arrays is not None
        x, y, *w = self._arrays
        for start in range(0, len(y), self.batch_size):
            stop = start + self.batch_size
            yield _rows(x, start, stop), y[start:stop], *(v[start:stop] for v in w)

    def __iter__(self) -> Iterator[tuple]:
        if self.is_weighted:
            raise ValueError(
                f"{self.argument}: sample weights are not used by {self.description!r}; give (x, y) "
                "without weights here."
            )
        for x, y, _ in self.weighted():
            yield x, y

    def weighted(self) -> Iterator[tuple]:
        """``(x, y, w)`` batches, ``w`` float64 ``[N]`` sample weights (ones if none given)."""
        raw = tqdm(self._raw(), total=self.n_batches, desc=self.description,
                   disable=not self.progress, leave=False)
        seen = 0
        for index, (x, y, *w) in enumerate(raw):
            x, y = _as_float(x, self.dtype), np.asarray(y)
            _check_finite(x, index)
            if self.check is not None:
                self.check.batch(x, index)
            if y.ndim == 0 or _n_rows(x) != len(y):
                raise ValueError(
                    f"y: batch {index} has {_n_rows(x)} inputs but labels of shape {y.shape}; "
                    "give one label row per input (a zipped dataset's x and y batched alike; "
                    "a dataset of single examples needs .batch(n))."
                )
            w = _checked_weights(w[0], len(y), index) if w else np.ones(len(y))
            if y.dtype.kind == "f" and not np.all(np.isfinite(y)):
                raise ValueError(
                    f"y: batch {index} contains NaN or Inf labels; clean the labels first."
                )
            seen += 1
            yield x, y, w
        if seen == 0:
            raise ValueError(f"{self.argument}: the data set is empty; give at least one example.")
        if self.steps is not None and seen < self.steps:
            warnings.warn(
                f"steps: the data ran out after {seen} batches; steps={self.steps} asked for "
                f"more. Used the {seen} batches.", stacklevel=2,
            )




def as_batches(data, batch_size: int | None = None, **kwargs) -> Batches:
    """:class:`Batches` of ``data`` (returned unchanged if it already is one)."""
    return data if isinstance(data, Batches) else Batches(data, batch_size, **kwargs)


def iterate_inputs(x, batch_size: int, dtype: tf.DType,
                   check: InputCheck | None = None) -> Iterator:
    """Inputs only (arrays, dicts or a dataset of x batches), in batches of ``batch_size``,
    checked against the model by ``check`` (see :class:`Batches`).

    Raises:
        ValueError: an infinite dataset (it would never end), NaN/Inf inputs, or inputs that
            ``check`` refuses.
    """
    for index, xb in enumerate(_input_batches(x, batch_size, dtype, check)):
        _check_finite(xb, index)
        if check is not None:
            check.batch(xb, index)
        yield xb


def _input_batches(x, batch_size: int, dtype: tf.DType, check: InputCheck | None) -> Iterator:
    if isinstance(x, tf.data.Dataset):
        if int(x.cardinality()) == tf.data.INFINITE_CARDINALITY:
            raise ValueError(
                "x: the dataset is infinite (.repeat() without a count), so predicting would "
                "never end; make it finite with .take(N)."
            )
        spec = x.element_spec
        if check is not None:
            check.data(spec[0] if isinstance(spec, tuple) else spec, dataset=True)
        for xb in x:
            yield _as_float(xb[0] if isinstance(xb, tuple) else xb, dtype)
        return
    if check is not None:
        check.data(x)
    n = _n_rows(x)
    for start in range(0, n, batch_size):
        stop = start + batch_size
        yield _as_float(_rows(x, start, stop), dtype)
