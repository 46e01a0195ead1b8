"""The exact diagonal of the GGN or empirical Fisher over all weights of a subset.

``diag(GGN)_p = sum_n sum_k (J_n^T L_n[:, k])_p**2`` and ``diag(EF)_p = sum_n g_{n,p}**2``,
computed from per-example rows without forming any ``P x P`` matrix (for Dense layers without
forming the rows either). Each batch gives one :class:`DiagBlock` ``[P]``.

Example:
    A linear binary classifier at zero logits has ``Lambda = 1/4``, so the GGN diagonal is
    ``sum_n [x_n, 1]**2 / 4``:

    >>> import keras, numpy as np, tensorflow as tf
    >>> from laplace_tf.batches import Batches
    >>> from laplace_tf.curvature.base import fit_curvature
    >>> from laplace_tf.likelihoods import get_likelihood
    >>> from laplace_tf.params import LogitModel
    >>> model = keras.Sequential([keras.Input((1,), dtype="float64"),
    ...     keras.layers.Dense(1, kernel_initializer="zeros", dtype="float64")])
    >>> builder = DiagBuilder(LogitModel(model), get_likelihood("binary"), "ggn")
    >>> data = Batches((np.array([[1.0], [2.0]]), np.array([0, 1])), dtype=tf.float64)
    >>> fit_curvature(builder, data).blocks[0].diagonal.numpy()
    array([1.25, 0.5 ])
"""

from __future__ import annotations

import tensorflow as tf

from laplace_tf.blocks import DiagBlock
from laplace_tf.curvature._per_example import summed_rows
from laplace_tf.curvature.base import CurvatureBuilder


class DiagBuilder(CurvatureBuilder):
    """One diagonal block per batch over the subset's weights (kinds ``"ggn"``, ``"ef"``)."""

    structure = "diag"
    kinds = ("ggn", "ef")

    # traced as written: Keras 3 layers need no autograph (Keras' own steps skip it), and
    # converting this code took seconds of a first fit
    @tf.autograph.experimental.do_not_convert
    def batch_sums(self, x, y, w=None) -> tuple[list[DiagBlock], tf.Tensor]:
        diagonal, logits = summed_rows(self.logit_model, self.likelihood, self.kind, x, y, w)
        return [DiagBlock(diagonal)], logits
