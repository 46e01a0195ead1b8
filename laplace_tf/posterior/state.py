"""The two halves of a posterior that a file keeps: its settings and its fitted state.

A :class:`~laplace_tf.posterior.laplace.PosteriorLaplace` is its constructor arguments (the
settings, described one per line by ``PosteriorLaplace.SETTINGS``, a tuple of :class:`Setting`)
plus what ``fit`` computed (a :class:`PosteriorState`). ``io.save`` writes both;
``io.load`` rebuilds ``cls(model, **settings)`` and hands it the state (``la.restore``).

Example:
    >>> setting = Setting("temperature", "metadata")
    >>> setting.when_absent, setting.attribute   # a file without it is corrupt
    (REQUIRED, 'temperature')
    >>> Setting("curvature", "metadata", attribute_name="curvature_kind").attribute
    'curvature_kind'
    >>> Setting("progress", None, when_absent=False).saved is None   # not saved
    True
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import tensorflow as tf

from laplace_tf.curvature.base import Curvature


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()
"""``Setting.when_absent`` of a setting every saved file holds."""


class Setting(NamedTuple):
    """One constructor argument of a posterior, and how a file keeps it.

    ``saved`` is ``"metadata"`` (a JSON value), ``"array"`` (a numeric array of the ``.npz``)
    or ``None`` (not saved); ``when_absent`` is what ``io.load`` passes when the file has no
    entry (:data:`REQUIRED`: the file is refused as corrupt); ``attribute_name`` names the instance
    attribute whose value, passed back as ``name``, rebuilds the same setting (default: the
    attribute called ``name``).
    """

    name: str
    saved: str | None
    when_absent: object = REQUIRED
    attribute_name: str | None = None

    @property
    def attribute(self) -> str:
        return self.attribute_name or self.name


class PosteriorState(NamedTuple):
    """What a fit computed, beyond the settings (``la.state()``, ``la.restore(state)``).

    ``curvature`` was fitted at noise ``fit_sigma`` (None unless regression) on the weights
    ``mean`` whose SHA-256 is ``fingerprint``; ``tuning_trace`` is the last prior tuning's path
    (or None); ``output_curvatures`` are the unit-noise curvatures ``H_k`` of each output of a
    per-output fit over all weights (else None; files do not keep them).
    """

    curvature: Curvature
    mean: tf.Tensor
    fit_sigma: np.ndarray | None
    fingerprint: str
    tuning_trace: dict | None = None
    output_curvatures: list[Curvature] | None = None
