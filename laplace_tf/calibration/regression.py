"""Calibration metrics for Gaussian regression predictives.

Conventions shared by every function here:

* ``mean`` and ``var`` are the predictive mean and variance, shape ``[N]`` or ``[N, D]``,
  ``var > 0``. For a Laplace model pass the variance that includes the observation noise
  (what ``mean, var = la(x)`` returns). ``y`` holds the targets in the same shape; ``y`` and
  ``var`` may differ from ``mean`` only by a trailing axis of size 1 (``[N]`` vs ``[N, 1]``).
* Each of the ``N * D`` entries is one univariate Gaussian ``N(mean, var)``, and every metric
  is a mean over all ``N * D`` entries (for ``D = 1``: over examples). The NLL of a whole
  ``D``-dimensional example under the diagonal Gaussian is ``D * gaussian_nll``.
* The central interval at level ``q`` in (0, 1) is ``mean +- z_q sqrt(var)`` with
  ``z_q = Phi^-1((1 + q) / 2)``, e.g. ``z_0.95 = 1.96``.
* Inputs may be numpy arrays, lists or eager TensorFlow tensors; this module does not import
  TensorFlow. Results are Python floats, numpy arrays or small dicts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import integrate, stats

from laplace_tf.calibration import _validation as _v

DEFAULT_LEVELS = np.linspace(0.01, 0.99, 99)
"""Levels of the calibration curve unless given: 0.01, 0.02, ..., 0.99."""


def _z(level: float | np.ndarray) -> float | np.ndarray:
    """Half-width, in standard deviations, of the central interval at ``level``."""
    return stats.norm.ppf((1.0 + np.asarray(level)) / 2.0)


def gaussian_nll(mean: Any, var: Any, y: Any) -> float:
    """Mean Gaussian negative log-likelihood with constants, in nats.

    ``(1 / ND) sum 0.5 * (log(2 pi var) + (y - mean)^2 / var)``.

    Example:
        >>> bool(np.isclose(gaussian_nll([0.0], [1.0], [0.0]), 0.5 * np.log(2 * np.pi)))
        True
    """
    m, t, v = _v.regression(mean, y, var)
    return _gaussian_nll(m, v, t)


def _gaussian_nll(m: np.ndarray, v: np.ndarray, t: np.ndarray) -> float:
    return float(np.mean(0.5 * (np.log(2.0 * np.pi * v) + (t - m) ** 2 / v)))


def rmse(mean: Any, y: Any) -> float:
    """Root mean squared error ``sqrt(mean((y - mean)^2))`` over all entries.

    Example:
        >>> bool(np.isclose(rmse([0.0, 0.0], [3.0, 4.0]), np.sqrt((9 + 16) / 2)))
        True
    """
    m = _v.means(mean)
    t = _v.targets(y, m)
    return _rmse(m, t)


def _rmse(m: np.ndarray, t: np.ndarray) -> float:
    return float(np.sqrt(np.mean((t - m) ** 2)))


def mae(mean: Any, y: Any) -> float:
    """Mean absolute error ``mean(|y - mean|)`` over all entries.

    Example:
        >>> mae([0.0, 0.0], [3.0, -4.0])
        3.5
    """
    m = _v.means(mean)
    t = _v.targets(y, m)
    return _mae(m, t)


def _mae(m: np.ndarray, t: np.ndarray) -> float:
    return float(np.mean(np.abs(t - m)))


def sharpness(var: Any) -> float:
    """Sharpness: the mean predictive standard deviation ``mean(sqrt(var))`` (lower = sharper).

    This is the mean of the standard deviations, in the units of ``y``; some papers use the
    mean variance or ``sqrt(mean(var))`` instead.

    Example:
        >>> sharpness([1.0, 4.0])
        1.5
    """
    return float(np.mean(np.sqrt(_v.variances(var))))


def interval_coverage(mean: Any, var: Any, y: Any, level: float = 0.95) -> float:
    """Prediction-interval coverage probability (PICP) of the central ``level`` interval.

    The fraction of entries with ``|y - mean| <= z_level sqrt(var)``; calibrated
    predictives give about ``level``.

    Example:
        ``z_0.68 = 0.994``: of the standardised residuals 0.5, 1.5, -3 only 0.5 is inside.

        >>> interval_coverage([0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.5, 1.5, -3.0], 0.68) == 1 / 3
        True
    """
    m, t, v = _v.regression(mean, y, var)
    return float(_coverage(_standardised_residuals(m, v, t), _v.level(level))[0])


def interval_width(var: Any, level: float = 0.95) -> float:
    """Mean width ``2 z_level sqrt(var)`` of the central ``level`` prediction interval.

    Example:
        >>> bool(np.isclose(interval_width([4.0], 0.95), 2 * 1.959964 * 2.0))
        True
    """
    return float(2.0 * _z(_v.level(level)) * np.mean(np.sqrt(_v.variances(var))))


def crps_gaussian(mean: Any, var: Any, y: Any) -> float:
    """Mean continuous ranked probability score of the Gaussians, in closed form.

    ``CRPS(N(m, s^2), y) = s * (z (2 Phi(z) - 1) + 2 phi(z) - 1 / sqrt(pi))`` with
    ``z = (y - m) / s`` (Gneiting and Raftery, 2007), which equals
    ``int (F(x) - 1{x >= y})^2 dx``; averaged over all entries. Units of ``y``; lower is better.

    Example:
        At ``y = m``: ``s * (2 / sqrt(2 pi) - 1 / sqrt(pi)) = s (sqrt(2) - 1) / sqrt(pi)``.

        >>> value = crps_gaussian([0.0], [4.0], [0.0])
        >>> bool(np.isclose(value, 2.0 * (np.sqrt(2) - 1) / np.sqrt(np.pi)))
        True
    """
    m, t, v = _v.regression(mean, y, var)
    return _crps_gaussian(m, v, t)


def _crps_gaussian(m: np.ndarray, v: np.ndarray, t: np.ndarray) -> float:
    s = np.sqrt(v)
    z = (t - m) / s
    crps = s * (
        z * (2.0 * stats.norm.cdf(z) - 1.0) + 2.0 * stats.norm.pdf(z) - 1.0 / np.sqrt(np.pi)
    )
    return float(np.mean(crps))


def _standardised_residuals(m: np.ndarray, v: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Sorted ``|y - mean| / sqrt(var)`` over all entries."""
    return np.sort((np.abs(t - m) / np.sqrt(v)).ravel())


def _coverage(residuals: np.ndarray, levels: float | np.ndarray) -> np.ndarray:
    """Observed coverage of the central intervals at ``levels`` (in [0, 1]) from sorted residuals."""
    z = np.atleast_1d(_z(levels))
    return np.searchsorted(residuals, z, side="right") / residuals.size


def regression_calibration_curve(
    mean: Any, var: Any, y: Any, levels: Sequence[float] | np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Expected vs observed coverage of central prediction intervals.

    Args:
        mean: ``[N]`` or ``[N, D]`` predictive means.
        var: predictive variances, same shape, > 0.
        y: targets, same shape.
        levels: interval levels in (0, 1), sorted and de-duplicated here; default
            :data:`DEFAULT_LEVELS` (0.01, ..., 0.99).

    Returns:
        ``(expected, observed)``: the levels and, for each, the fraction of entries inside the
        central interval of that level. Calibrated predictives lie on the diagonal; a curve
        below it is overconfident (intervals too narrow), above it underconfident.

    Example:
        ``z_0.5 = 0.674``: of the standardised residuals 0.1 and 3 only 0.1 is inside.

        >>> expected, observed = regression_calibration_curve([0.0, 0.0], [1.0, 1.0], [0.1, 3.0], [0.5])
        >>> expected.tolist(), observed.tolist()
        ([0.5], [0.5])
    """
    m, t, v = _v.regression(mean, y, var)
    lv = DEFAULT_LEVELS if levels is None else _v.levels(levels)
    return lv.copy(), _coverage(_standardised_residuals(m, v, t), lv)


def _area_grid(levels: Sequence[float] | np.ndarray | None) -> np.ndarray:
    lv = DEFAULT_LEVELS if levels is None else _v.levels(levels)
    return np.concatenate([[0.0], lv, [1.0]])


def _miscalibration_area(residuals: np.ndarray, grid: np.ndarray) -> float:
    gap = np.abs(_coverage(residuals, grid) - grid)
    return float(integrate.trapezoid(gap, grid))


def miscalibration_area(
    mean: Any, var: Any, y: Any, levels: Sequence[float] | np.ndarray | None = None
) -> float:
    """Area between the regression calibration curve and the diagonal.

    Integration rule: the trapezoidal rule applied to ``|observed(q) - q|`` on the grid
    ``{0} + levels + {1}`` (default levels 0.01, ..., 0.99, i.e. steps of 0.01). At ``q = 0``
    the interval is the single point ``mean`` and at ``q = 1`` the whole line, so the end
    points are evaluated like any other level. Range ``[0, 0.5]``; 0 is perfectly calibrated.

    Example:
        Targets equal to the means fall inside every interval, ``observed(q) = 1``, so the
        area is ``int_0^1 (1 - q) dq = 1/2`` (exact: the gap is linear in ``q``).

        >>> bool(np.isclose(miscalibration_area([0.0, 1.0], [1.0, 1.0], [0.0, 1.0]), 0.5))
        True
    """
    m, t, v = _v.regression(mean, y, var)
    return _miscalibration_area(_standardised_residuals(m, v, t), _area_grid(levels))


def regression_metrics(mean: Any, var: Any, y: Any) -> dict[str, float]:
    """All regression metrics at once (inputs checked once).

    Returns:
        ``{"nll", "rmse", "mae", "coverage_68", "width_68", "coverage_95", "width_95",
        "sharpness", "crps", "miscalibration_area"}``: coverage and mean width of the central
        68% and 95% intervals, sharpness = mean predictive standard deviation, the area with
        the default levels. All are means over the ``N * D`` entries.

    Example:
        >>> metrics = regression_metrics([0.0, 0.0], [1.0, 1.0], [0.5, -3.0])
        >>> metrics["coverage_68"], metrics["coverage_95"], metrics["mae"], metrics["sharpness"]
        (0.5, 0.5, 1.75, 1.0)
    """
    m, t, v = _v.regression(mean, y, var)
    residuals = _standardised_residuals(m, v, t)
    mean_std = float(np.mean(np.sqrt(v)))
    coverage_68, coverage_95 = _coverage(residuals, np.array([0.68, 0.95]))
    return {
        "nll": _gaussian_nll(m, v, t),
        "rmse": _rmse(m, t),
        "mae": _mae(m, t),
        "coverage_68": float(coverage_68),
        "width_68": float(2.0 * _z(0.68) * mean_std),
        "coverage_95": float(coverage_95),
        "width_95": float(2.0 * _z(0.95) * mean_std),
        "sharpness": mean_std,
        "crps": _crps_gaussian(m, v, t),
        "miscalibration_area": _miscalibration_area(residuals, _area_grid(None)),
    }
