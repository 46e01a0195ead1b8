"""Checks of user arguments shared by the public entry points: one message shape everywhere.

Each check returns the value in its canonical type or raises, naming the argument, what was
expected and what came: a wrong type raises ``TypeError``, a wrong value ``ValueError``.

Example:
    >>> positive_int(3, "n_samples"), choice("glm", "pred_type", ("glm", "nn"))
    (3, 'glm')
    >>> positive_int(0, "n_samples")
    Traceback (most recent call last):
    ...
    ValueError: n_samples: expected a positive integer (>= 1); got 0.
    >>> positive_int(2.5, "batch_size")
    Traceback (most recent call last):
    ...
    TypeError: batch_size: expected a positive integer; got 2.5.
"""

from __future__ import annotations

import math
import numbers


def choice(value, name: str, valid: tuple[str, ...]) -> str:
    """``value`` if it is one of ``valid``."""
    if value not in valid:
        raise ValueError(f"{name}: expected one of {valid}; got {value!r}.")
    return value


def positive_int(value, name: str) -> int:
    """``value`` as an int if it is an integer >= 1 (bools are refused)."""
    return _int_at_least(value, name, 1, "a positive integer")


def non_negative_int(value, name: str) -> int:
    """``value`` as an int if it is an integer >= 0 (bools are refused)."""
    return _int_at_least(value, name, 0, "an integer >= 0")


def _int_at_least(value, name: str, lowest: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected {what}; got {value!r}.")
    if value < lowest:
        raise ValueError(f"{name}: expected {what}{' (>= 1)' if lowest == 1 else ''}; got {value}.")
    return int(value)


def positive_int_or_none(value, name: str) -> int | None:
    """None, or ``value`` checked by :func:`positive_int`."""
    return None if value is None else positive_int(value, name)


def positive_number(value, name: str) -> float:
    """``value`` as a float if it is a finite real number > 0 (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a positive number; got {value!r}.")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a finite number > 0; got {value!r}.")
    return float(value)


def flag(value, name: str) -> bool:
    """``value`` if it is True or False."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False; got {value!r}.")
    return value
