"""Temperature scaling: one scalar ``T`` dividing the logits, fitted by NLL on held-out data.

``softmax(z / T)`` keeps every prediction's class and only sharpens (``T < 1``) or softens
(``T > 1``) it (Guo et al., 2017). The NLL ``mean_n(log sum_c exp(b z_nc) - b z_ny)`` is convex
in ``b = 1 / T`` (a log-sum-exp of functions linear in ``b``), so a bounded 1-D search over ``b``
finds its one minimum. Binary logits ``[N]`` / ``[N, 1]`` are the two-class logits ``[0, z]``
(``sigmoid(z / T)``).

Example:
    Logits that are twice too sharp: the fitted temperature is close to 2.

    >>> rng = np.random.default_rng(0)
    >>> logits = rng.normal(size=(4000, 3)) * 3
    >>> cdf = np.cumsum(special.softmax(logits / 2, axis=-1), axis=-1)
    >>> labels = (rng.random((4000, 1)) < cdf).argmax(axis=-1)
    >>> 1.8 < fit_temperature(logits, labels) < 2.2
    True
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import optimize, special

from laplace_tf.arguments import positive_number
from laplace_tf.calibration import _validation as _v

T_RANGE = (0.01, 100.0)
"""The temperatures :func:`fit_temperature` searches."""


def _logits(logits: Any, name: str = "logits") -> np.ndarray:
    z = _v.float_array(logits, name)
    if z.ndim == 2 and z.shape[1] == 1:
        z = z[:, 0]
    if z.ndim == 1:
        z = np.stack([np.zeros_like(z), z], axis=1)
    if z.ndim != 2 or len(z) == 0:
        raise ValueError(f"{name}: expected logits [N, C] (or binary [N]) with N > 0; "
                         f"got shape {z.shape}")
    return z


def scaled_nll(logits: Any, labels: Any, temperature: float) -> float:
    """Mean NLL of ``softmax(logits / temperature)`` for integer ``labels``.

    Example:
        >>> bool(np.isclose(scaled_nll([[0.0, 0.0]], [1], 3.0), np.log(2)))
        True
    """
    z = _logits(logits)
    y = _v.class_labels(labels, len(z), z.shape[1], probs_name="logits")
    return _nll(1.0 / positive_number(temperature, "temperature"), z, y)


def _nll(beta: float, z: np.ndarray, y: np.ndarray) -> float:
    scaled = beta * z
    return float(np.mean(special.logsumexp(scaled, axis=1) - scaled[np.arange(len(z)), y]))


def fit_temperature(logits: Any, labels: Any) -> float:
    """The temperature in :data:`T_RANGE` minimising the NLL of ``softmax(logits / T)``.

    Args:
        logits: validation logits ``[N, C]`` of the network (binary: ``[N]`` or ``[N, 1]``).
        labels: integer class labels ``[N]``.

    Returns:
        ``T`` as a Python float (divide test logits by it).
    """
    z = _logits(logits)
    y = _v.class_labels(labels, len(z), z.shape[1], probs_name="logits")
    low, high = 1.0 / T_RANGE[1], 1.0 / T_RANGE[0]
    result = optimize.minimize_scalar(_nll, bounds=(low, high), args=(z, y), method="bounded",
                                      options={"xatol": 1e-10})
    return float(1.0 / result.x)


def scaled_probs(logits: Any, temperature: float) -> np.ndarray:
    """Class probabilities ``softmax(logits / temperature)`` ``[N, C]`` (binary: two columns).

    Example:
        >>> scaled_probs([[0.0, np.log(3.0)]], 1.0).round(3).tolist()
        [[0.25, 0.75]]
    """
    return special.softmax(_logits(logits) / positive_number(temperature, "temperature"), axis=1)
