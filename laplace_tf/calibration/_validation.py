"""Argument checks shared by the calibration metrics and plots.

Every public function of :mod:`laplace_tf.calibration` converts and checks its inputs here, so
one bad input gives one kind of message everywhere: the argument's name, what was expected and
what came, e.g. ``probs: row 3 sums to 0.7; expected rows of probabilities summing to 1
(tolerance 1e-4) (did you pass logits? apply softmax first)``.

Wrong types (``None``, strings, objects) raise ``TypeError``; wrong shapes or values raise
``ValueError``. Arrays come back as float64 numpy arrays (labels as int64). Inputs may be numpy
arrays, lists or eager TensorFlow tensors (converted with ``np.asarray``); TensorFlow is never
imported here.

Example:
    >>> class_probs([[0.2, 0.8]])
    array([[0.2, 0.8]])
    >>> class_probs([[0.2, 0.5]])
    Traceback (most recent call last):
    ...
    ValueError: probs: row 0 sums to 0.7; expected rows of probabilities summing to 1 ...
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

SUM_TOLERANCE = 1e-4
"""Largest accepted ``|sum(row) - 1|`` of a probability row (absolute, i.e. relative to 1)."""

RANGE_TOLERANCE = 1e-6
"""Probabilities this far outside ``[0, 1]`` are round-off and are clipped, not rejected."""

BINNINGS = ("width", "mass")


def _fmt_index(index: tuple[int, ...]) -> str:
    return str(index[0]) if len(index) == 1 else str(tuple(int(i) for i in index))


def _first(mask: np.ndarray) -> tuple[int, ...]:
    """Index of the first True entry of ``mask`` (C order)."""
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(mask)), mask.shape))


def _numeric(x: Any, name: str) -> np.ndarray:
    """``np.asarray(x)`` with a numeric, finite dtype check (no dtype conversion)."""
    if x is None:
        raise TypeError(
            f"{name}: expected a numeric array (numpy array, list or tf.Tensor); got None"
        )
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"{name}: expected a numeric array (numpy array, list or tf.Tensor); "
            f"got {type(x).__name__} that numpy cannot convert ({err})"
        ) from err
    if arr.dtype == bool:
        arr = arr.astype(np.int64)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise TypeError(
            f"{name}: expected a real numeric array; got {type(x).__name__} of dtype {arr.dtype}"
        )
    if np.issubdtype(arr.dtype, np.floating):
        bad = ~np.isfinite(arr)
        if bad.any():
            index = _first(bad)
            kind = "NaN" if np.isnan(arr[index]) else "Inf"
            where = f" at index {_fmt_index(index)}" if arr.ndim else ""
            raise ValueError(f"{name}: contains {kind}{where}; expected finite numbers")
    return arr


def float_array(x: Any, name: str) -> np.ndarray:
    """Finite float64 array."""
    return _numeric(x, name).astype(np.float64)


def _check_unit_interval(p: np.ndarray, name: str, hint: str) -> np.ndarray:
    bad = (p < -RANGE_TOLERANCE) | (p > 1.0 + RANGE_TOLERANCE)
    if bad.any():
        index = _first(bad)
        raise ValueError(
            f"{name}: entry {_fmt_index(index)} is {p[index]:.6g}; expected probabilities in "
            f"[0, 1] ({hint})"
        )
    return np.clip(p, 0.0, 1.0)


def binary_to_two_class(p: np.ndarray) -> np.ndarray:
    """The binary rule: positive-class probabilities ``[..., N]`` -> ``[..., N, 2] = [1 - p, p]``.

    After this, class 1 is the positive class and every multi-class metric applies unchanged.
    """
    return np.stack([1.0 - p, p], axis=-1)


def class_probs(probs: Any, name: str = "probs") -> np.ndarray:
    """Checked class probabilities ``[N, C]`` (``C >= 2``) from any accepted layout.

    Accepted: ``[N, C]`` rows of probabilities; ``[N]`` or ``[N, 1]`` binary probabilities of
    the positive class (converted by :func:`binary_to_two_class`); ``[S, N, C]`` or
    ``[S, N, 1]`` Monte Carlo samples, checked sample by sample and then averaged over ``S``.
    """
    p = float_array(probs, name)
    if p.ndim not in (1, 2, 3) or (p.ndim > 1 and p.shape[-1] == 0):
        raise ValueError(
            f"{name}: expected probabilities of shape [N, C], [N] or [N, 1] (binary), or "
            f"[S, N, C] (Monte Carlo samples); got shape {p.shape}"
        )
    if p.ndim > 1 and p.shape[-1] == 1:
        p = p[..., 0]
        binary = True
    else:
        binary = p.ndim == 1
    if p.size == 0:
        raise ValueError(f"{name}: no examples (shape {p.shape}); expected at least one")
    if binary:
        p = _check_unit_interval(
            p, name, "positive-class probabilities; did you pass logits? apply sigmoid first"
        )
        p = binary_to_two_class(p)
    else:
        p = _check_unit_interval(p, name, "did you pass logits? apply softmax first")
        sums = p.sum(axis=-1)
        bad = np.abs(sums - 1.0) > SUM_TOLERANCE
        if bad.any():
            index = _first(bad)
            raise ValueError(
                f"{name}: row {_fmt_index(index)} sums to {sums[index]:.6g}; expected rows of "
                f"probabilities summing to 1 (tolerance {SUM_TOLERANCE:g}) "
                "(did you pass logits? apply softmax first)"
            )
    return p.mean(axis=0) if p.ndim == 3 else p


def class_labels(
    labels: Any, n: int, n_classes: int, name: str = "labels", probs_name: str = "probs"
) -> np.ndarray:
    """Checked integer class indices ``[N]`` in ``[0, n_classes)`` (``[N, 1]`` is squeezed)."""
    y = _numeric(labels, name)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        hint = " (one-hot? pass labels.argmax(-1))" if y.ndim == 2 else ""
        raise ValueError(
            f"{name}: expected integer class indices of shape [N]; got shape {y.shape}{hint}"
        )
    if len(y) != n:
        raise ValueError(f"{name}: got {len(y)} labels; expected {n}, one per row of {probs_name}")
    if np.issubdtype(y.dtype, np.floating):
        bad = y != np.round(y)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(
                f"{name}: value {y[i]:.6g} at index {i} is not an integer; expected integer "
                f"class indices in [0, {n_classes})"
            )
    bad = (y < 0) | (y >= n_classes)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"{name}: value {y[i]:g} at index {i} is out of range; expected class indices in "
            f"[0, {n_classes}) for {probs_name} with {n_classes} classes"
        )
    return y.astype(np.int64)


def classification(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Checked ``(probs [N, C], labels [N])`` for the classification metrics."""
    p = class_probs(probs)
    return p, class_labels(labels, p.shape[0], p.shape[1])


def _like(x: Any, name: str, ref: np.ndarray, ref_name: str) -> np.ndarray:
    """Float array with the shape of ``ref``; only a trailing axis of size 1 may differ."""
    arr = float_array(x, name)
    if arr.shape != ref.shape:
        if arr.size == ref.size and (
            arr.shape + (1,) == ref.shape or arr.shape == ref.shape + (1,)
        ):
            return arr.reshape(ref.shape)
        raise ValueError(
            f"{name}: shape {arr.shape} does not match {ref_name} shape {ref.shape}; expected "
            f"the same shape"
        )
    return arr


def regression(mean: Any, y: Any, var: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Checked ``(mean, y, var)`` of one shape ``[N]`` or ``[N, D]``, ``var > 0``.

    ``y`` and ``var`` may differ from ``mean`` by a trailing axis of size 1 (``[N]`` vs
    ``[N, 1]``); they are reshaped to ``mean``'s shape. Any other mismatch raises instead of
    broadcasting ``[N]`` against ``[N, 1]`` into ``[N, N]``.
    """
    m = means(mean)
    return m, targets(y, m), variances_like(var, m)


def means(mean: Any) -> np.ndarray:
    """Checked predictive means, a non-empty array of shape ``[N]`` or ``[N, D]``."""
    m = float_array(mean, "mean")
    if m.ndim not in (1, 2) or m.size == 0:
        raise ValueError(
            f"mean: expected a non-empty array of shape [N] or [N, D]; got shape {m.shape}"
        )
    return m


def targets(y: Any, m: np.ndarray) -> np.ndarray:
    """Checked regression targets ``y`` in the shape of the checked means ``m``."""
    return _like(y, "y", m, "mean")


def variances_like(var: Any, m: np.ndarray) -> np.ndarray:
    """Checked predictive variances ``> 0`` in the shape of the checked means ``m``."""
    v = _like(var, "var", m, "mean")
    bad = v <= 0
    if bad.any():
        index = _first(bad)
        hint = " (a log-variance? apply exp first)" if v[index] < 0 else ""
        raise ValueError(
            f"var: entry {_fmt_index(index)} is {v[index]:.6g}; expected predictive variances "
            f"> 0{hint}"
        )
    return v


def variances(var: Any, name: str = "var") -> np.ndarray:
    """Checked non-empty array of variances ``> 0``."""
    v = float_array(var, name)
    if v.size == 0:
        raise ValueError(f"{name}: no entries; expected at least one variance")
    bad = v <= 0
    if bad.any():
        index = _first(bad)
        raise ValueError(
            f"{name}: entry {_fmt_index(index)} is {v[index]:.6g}; expected variances > 0"
        )
    return v


def scores(x: Any, name: str) -> np.ndarray:
    """Checked non-empty 1-D score vector (``[N, 1]`` is squeezed)."""
    s = float_array(x, name)
    if s.ndim == 2 and s.shape[1] == 1:
        s = s[:, 0]
    if s.ndim != 1 or s.size == 0:
        raise ValueError(
            f"{name}: expected a non-empty score vector of shape [N]; got shape {s.shape}"
        )
    return s


def n_bins(value: Any) -> int:
    """Checked number of bins (a positive int)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"n_bins: expected a positive int; got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"n_bins: expected a positive int; got {value}")
    return int(value)


def binning(value: Any) -> str:
    """Checked binning scheme name."""
    if value not in BINNINGS:
        raise ValueError(f"binning: expected 'width' or 'mass'; got {value!r}")
    return value


def level(value: Any, name: str = "level") -> float:
    """Checked probability level strictly inside ``(0, 1)``."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"{name}: expected a number in (0, 1); got {type(value).__name__}")
    if not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name}: expected a level in (0, 1), e.g. 0.95; got {value}")
    return float(value)


def levels(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Checked, sorted, de-duplicated 1-D levels strictly inside ``(0, 1)``."""
    lv = float_array(values, "levels")
    if lv.ndim != 1 or lv.size == 0:
        raise ValueError(f"levels: expected a non-empty 1-D array; got shape {lv.shape}")
    bad = (lv <= 0) | (lv >= 1)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"levels: value {lv[i]:g} at index {i}; expected levels in (0, 1)")
    return np.unique(lv)
