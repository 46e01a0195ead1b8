"""The curvature of a model's summed negative log-likelihood, accumulated over batches.

A structure module (``full``, ``kron``, ``diag``, ``last_layer``) provides a
:class:`CurvatureBuilder`: pure TensorFlow code that turns one batch into curvature blocks.
:func:`fit_curvature` runs it as one compiled ``tf.function`` per batch shape and sums the
batches into a :class:`Curvature`.
"""

from __future__ import annotations

from dataclasses import dataclass

import tensorflow as tf

from laplace_tf.batches import Batches
from laplace_tf.curvature.blocks import Block, add_blocks, scale_block
from laplace_tf.likelihoods import Likelihood
from laplace_tf.params import LogitModel

CURVATURES = ("ggn", "ef", "hessian")
STRUCTURES = ("full", "kron", "diag")


@dataclass
class Curvature:
    """The curvature of the summed NLL at the MAP, and what the evidence needs.

    Attributes:
        structure: ``"full"``, ``"kron"`` or ``"diag"``.
        blocks: blocks in parameter order, covering the whole weight subset.
        nll: summed negative log-likelihood over the data (scalar, model dtype).
        n_data: number of examples.
        residual_ss: regression only: sum over data of squared residuals per output ``[K]``.
    """

    structure: str
    blocks: list[Block]
    nll: tf.Tensor
    n_data: int
    residual_ss: tf.Tensor | None = None

    def __add__(self, other: Curvature) -> Curvature:
        return Curvature(
            self.structure,
            [add_blocks(a, b) for a, b in zip(self.blocks, other.blocks, strict=True)],
            self.nll + other.nll,
            self.n_data + other.n_data,
            None if self.residual_ss is None else self.residual_ss + other.residual_ss,
        )

    def scaled(self, factor) -> Curvature:
        """Blocks multiplied by ``factor`` (the data terms are unchanged)."""
        blocks = [scale_block(b, factor) for b in self.blocks]
        return Curvature(self.structure, blocks, self.nll, self.n_data, self.residual_ss)


class CurvatureBuilder:
    """One batch -> curvature blocks, for a (weight subset, structure, curvature kind).

    Subclasses implement :meth:`batch_blocks` in pure TensorFlow (it is traced once per batch
    shape); they receive logits from ``logit_model`` and targets prepared by the likelihood.
    """

    structure: str = ""
    kinds: tuple[str, ...] = CURVATURES

    def __init__(self, logit_model: LogitModel, likelihood: Likelihood, kind: str = "ggn"):
        if kind not in self.kinds:
            raise ValueError(
                f"curvature: {kind!r} is not available for hessian_structure="
                f"{self.structure!r}; choose one of {self.kinds}."
            )
        self.logit_model = logit_model
        self.likelihood = likelihood
        self.kind = kind

    def batch_blocks(self, x, y) -> tuple[list[Block], tf.Tensor]:
        """Curvature blocks of one batch, and the batch's logits ``[N, K]``."""
        raise NotImplementedError


def fit_curvature(builder: CurvatureBuilder, batches: Batches) -> Curvature:
    """Sum ``builder``'s blocks over ``batches``; targets are checked batch by batch."""
    likelihood = builder.likelihood
    n_outputs = None

    @tf.function(reduce_retracing=True)
    def step(x, y):
        blocks, logits = builder.batch_blocks(x, y)
        residual_ss = tf.reduce_sum(tf.square(y - logits), axis=0)
        return blocks, likelihood.nll(logits, y), residual_ss

    total = None
    for x, y in batches:
        if n_outputs is None:
            n_outputs = int(builder.logit_model(x).shape[-1])
            likelihood.validate_outputs(n_outputs)
        targets = likelihood.prepare_targets(y, n_outputs, batches.dtype)
        blocks, nll, residual_ss = step(x, targets)
        part = Curvature(
            builder.structure, list(blocks), nll, int(targets.shape[0]),
            residual_ss if likelihood.name == "regression" else None,
        )
        total = part if total is None else total + part
    return total
