"""Kronecker-factored (K-FAC) GGN and empirical Fisher, one block per layer.

For a layer with input rows ``a_t`` (bias 1 appended) and pre-activation gradients ``g_t``
(see :mod:`laplace_tf.curvature.kron_layers`), one batch gives the block ``A ⊗ G`` with::

    A = (1/n) sum_t a_t a_t^T                  over the n = N * locations rows
    G = sum_t sum_k g_{t,k} g_{t,k}^T

For a layer applied at several locations per example (a sequence, the pixels of a feature
map, the groups of a grouped convolution), this is K-FAC-expand (Eschenhagen et al. 2023,
"Kronecker-factored approximate curvature for modern neural network architectures"), the
default. ``kfac_approximation="reduce"`` first takes, per example ``x``, the MEAN of its rows
and the SUM of its gradients over the locations::

    A = (1/N) sum_x abar_x abar_x^T,  abar_x = mean_t a_{x,t}      (n = N rows)
    G = sum_x sum_k gsum_{x,k} gsum_{x,k}^T,  gsum_{x,k} = sum_t g_{x,t,k}

Both equal the GGN block on one datum at one location (of a layer without output groups). On
a deep linear network with weight sharing and the squared error, expand is exact when every
location has its own output (the "expand setting": the GGN is ``sum_t a_t a_t^T ⊗ G0`` with
``G0`` the same everywhere), reduce when the locations are pooled before the output (``g_t``
then is the same at every location of an example, and ``J = (sum_t a_t) ⊗ g``). The exact
blocks of scale-and-shift layers and embeddings' exact diagonals do not change.

* GGN: ``g_{t,k} = J_{z,t}^T L[:, k]`` for each column ``k`` of ``L = likelihood.
  output_hessian_sqrt(logits)`` (``Lambda = L L^T``): the ``K`` backward passes are one
  vectorised Jacobian of ``s_k = sum_{n,o} logits[n, o] * stop_gradient(L[n, o, k])``.
* Monte-Carlo GGN (``stochastic=True``): one backward pass of the NLL at targets sampled
  from the model's predictive, whose output gradient ``eps`` has ``E[eps eps^T] = Lambda``.
* EF: ``g_t`` is the gradient of the example's NLL (one column).

Gradients with respect to the pre-activations come from zero probes added by a hook in
:class:`~laplace_tf.params.LogitModel`. A layer's rule builds its block from its inputs and
these gradients (:meth:`~laplace_tf.curvature.kron_layers.KronRule.blocks`: ``A ⊗ G``, one
per kernel of a separable convolution, or the exact dense block of a scale-and-shift layer). Layers without a rule, with an unsupported
configuration, or called more than once in a forward pass get a :class:`DiagBlock` with the
exact diagonal of the GGN / EF of their weights instead (per-example gradients from
:func:`laplace_tf.curvature._per_example.summed_rows`; never an error). The ``laplace_tf``
logger names each layer's block once per fit: a warning naming the fallbacks, if any.

Example:
    One datum through a linear regression layer: ``A = a a^T`` with ``a = [x, 1]`` and
    ``G = 1 / sigma^2``.

    >>> import keras, tensorflow as tf
    >>> from laplace_tf.likelihoods import get_likelihood
    >>> from laplace_tf.params import LogitModel
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> builder = KronBuilder(LogitModel(model), get_likelihood("regression", sigma_noise=0.5))
    >>> (block,), logits = builder.batch_blocks(tf.constant([[1.0, 2.0]]), tf.zeros((1, 1)))
    >>> block.A.numpy().tolist()
    [[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]
    >>> block.G.numpy().tolist()
    [[4.0]]
"""

from __future__ import annotations

import logging
import numbers

import numpy as np
import tensorflow as tf

from laplace_tf.arguments import choice, flag
from laplace_tf.blocks import Block, DiagBlock, KronBlock, PermutedKronBlock
from laplace_tf.curvature._per_example import (
    MASKED,
    masked_layers,
    output_cotangents,
    summed_rows,
    unfactorable_layers,
)
from laplace_tf.curvature.base import CurvatureBuilder, weights_or_ones
from laplace_tf.curvature.kron_layers import KRON_RULES, block_kind, fallback_reason
from laplace_tf.likelihoods import Likelihood
from laplace_tf.params import LogitModel, WeightSubset

logger = logging.getLogger("laplace_tf")

KFAC_APPROXIMATIONS = ("expand", "reduce")


class KronBuilder(CurvatureBuilder):
    """One batch -> the Kronecker (or exact dense or diagonal) blocks of every layer of the subset.

    Args:
        logit_model: the model and its weight subset; blocks follow ``subset.slices``.
        likelihood: the likelihood of the data.
        kind: ``"ggn"`` or ``"ef"``.
        stochastic: replace the GGN's ``K`` backward passes per example by one pass at a
            target sampled from the predictive (Monte-Carlo GGN; ``kind="ggn"`` only; the
            dense blocks of scale-and-shift layers are Monte-Carlo estimates too). Layers
            with a diagonal fallback block keep the exact diagonal.
        seed: an integer seed for ``stochastic``; batch ``i`` of this builder draws with the
            stateless seed ``(seed, i)``, so a new builder with the same seed repeats the
            numbers. ``None``: 0.
        kfac_approximation: ``"expand"`` (K-FAC-expand) or ``"reduce"`` (K-FAC-reduce) for
            layers with several locations per example (see the module docstring).

    Raises:
        ValueError: for a ``kind`` other than "ggn"/"ef" (the exact Hessian has no Kronecker
            factorisation), ``stochastic`` with ``kind="ef"`` or a likelihood without
            a sampler, or an unknown ``kfac_approximation``.
        TypeError: for a ``stochastic`` that is not a bool or a ``seed`` that is not an int.
    """

    structure = "kron"
    kinds = ("ggn", "ef")

    def __init__(
        self,
        logit_model: LogitModel,
        likelihood: Likelihood,
        kind: str = "ggn",
        stochastic: bool = False,
        seed: int | None = None,
        kfac_approximation: str = "expand",
    ):
        super().__init__(logit_model, likelihood, kind)
        flag(stochastic, "stochastic")
        self.kfac_approximation = choice(kfac_approximation, "kfac_approximation",
                                         KFAC_APPROXIMATIONS)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise TypeError(f"seed: expected an integer or None; got {seed!r}.")
        if stochastic and kind != "ggn":
            raise ValueError(
                f"stochastic: the Monte-Carlo estimate samples the GGN's output Hessian and has "
                f"no meaning for curvature={kind!r}; use curvature='ggn' or stochastic=False."
            )
        if stochastic and type(likelihood).sample is Likelihood.sample:
            raise ValueError(
                f"stochastic: the likelihood {likelihood.name!r} has no sampler for the "
                "Monte-Carlo targets (Likelihood.sample); implement it or use stochastic=False."
            )
        self.stochastic = stochastic
        self.seed = 0 if seed is None else int(seed)
        self._draws = tf.Variable(0, dtype=tf.int64, trainable=False) if stochastic else None
        slices = logit_model.subset.slices
        self._fallbacks = {
            i: reason for i, s in enumerate(slices) if (reason := fallback_reason(s)) is not None
        }
        self._diagonal_models: dict[tuple[int, ...], LogitModel] = {}
        self._logged = False
        self._orders: dict[int, np.ndarray] = {}  # block position -> its weights' order

    # traced as written: Keras 3 layers need no autograph (Keras' own steps skip it), and
    # converting this code took seconds of a first fit
    @tf.autograph.experimental.do_not_convert
    def batch_sums(self, x, y, w=None) -> tuple[list[Block], tf.Tensor]:
        """The blocks of every ``subset.slices`` entry in order (in sum form; one per kernel of
        the layer's rule, e.g. two for a separable convolution), and the logits.

        Sample weights ``w [N]`` weight each example's rows: ``A`` becomes the ``w``-weighted
        mean of its rows (``n = sum w * locations``), ``G`` the ``w``-weighted sum."""
        slices = self.logit_model.subset.slices
        hooked = [s.layer for i, s in enumerate(slices) if i not in self._fallbacks]
        calls: dict[int, list[tuple]] = {id(layer): [] for layer in hooked}
        with tf.GradientTape() as tape:

            def hook(layer, inputs, z):
                probe = tf.zeros_like(z)
                tape.watch(probe)
                calls[id(layer)].append((inputs, probe))
                return z + probe

            logits = self.logit_model(x, layers=hooked, hook=hook)
            weights = weights_or_ones(w, logits)
            scores = tf.einsum("nk,nkr->r", logits, self._cotangents(logits, y, weights))

        unfactorable = unfactorable_layers(self.logit_model, hooked, x) if hooked else {}
        masked = masked_layers(self.logit_model, hooked, x) if hooked else set()
        fallbacks = dict(self._fallbacks)
        for i, s in enumerate(slices):
            if i not in fallbacks and len(calls[id(s.layer)]) != 1:
                fallbacks[i] = f"called {len(calls[id(s.layer)])} times in one forward pass"
            elif i not in fallbacks and id(s.layer) in unfactorable:
                fallbacks[i] = unfactorable[id(s.layer)]
            elif i not in fallbacks and id(s.layer) in masked:
                fallbacks[i] = MASKED

        kron = [i for i in range(len(slices)) if i not in fallbacks]
        probes = [calls[id(slices[i].layer)][0][1] for i in kron]
        gradients = tape.jacobian(scores, probes, experimental_use_pfor=True,
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO) if kron else []
        reduce = self.kfac_approximation == "reduce"
        row_weights = None if w is None else weights  # None: all 1, the rows are not scaled
        blocks: dict[int, list[Block]] = {
            i: KRON_RULES[type(slices[i].layer)].blocks(
                slices[i].layer, calls[id(slices[i].layer)][0][0], grad, row_weights, reduce)
            for i, grad in zip(kron, gradients, strict=True)
        }
        if fallbacks:
            diagonal = self._diagonal_blocks(sorted(fallbacks), x, y, w)
            blocks.update((i, [block]) for i, block in zip(sorted(fallbacks), diagonal, strict=True))
        self._log_blocks(fallbacks)
        listed = [(i, block) for i in range(len(slices)) for block in blocks[i]]
        orders = [KRON_RULES[type(slices[i].layer)].order(slices[i].layer) if i in kron else None
                  for i, _ in listed]
        self._orders = {j: order for j, order in enumerate(orders) if order is not None}
        return [block for _, block in listed], logits

    def finish(self, sums: list) -> list[Block]:
        """The blocks added up; a layer whose Kronecker order is not its flat order (a
        transposed convolution) gets its block as a :class:`PermutedKronBlock`."""
        blocks = super().finish(sums)
        for j, order in self._orders.items():
            block = blocks[j]
            assert isinstance(block, KronBlock)
            blocks[j] = PermutedKronBlock(block.A, block.G, block.n, tf.constant(order, tf.int32))
        return blocks

    def _cotangents(self, logits: tf.Tensor, y: tf.Tensor, w: tf.Tensor) -> tf.Tensor:
        """``c [N, K, R]``: the pre-activation gradients of ``logits . c_r`` are the ``g``
        (each example's times ``sqrt(w_n)``).

        Monte Carlo: the NLL gradient at targets sampled from the predictive (``R = 1``).
        """
        if not self.stochastic:
            return output_cotangents(self.likelihood, self.kind, logits, y, w)
        assert self._draws is not None  # a stochastic builder counts its draws
        seed = tf.stack([tf.constant(self.seed, tf.int64), self._draws.assign_add(1) - 1])
        sampled = self.likelihood.sample(tf.stop_gradient(logits), seed)
        return output_cotangents(self.likelihood, "ef", logits, tf.stop_gradient(sampled), w)

    def _diagonal_blocks(self, indices: list[int], x, y, w) -> list[DiagBlock]:
        """Exact GGN / EF diagonals of the layers ``subset.slices[indices]``."""
        key = tuple(indices)
        if key not in self._diagonal_models:
            model = self.logit_model.model
            layers = [self.logit_model.subset.slices[i].layer for i in indices]
            self._diagonal_models[key] = self.logit_model.with_subset(WeightSubset(model, layers))
        diagonal, _ = summed_rows(self._diagonal_models[key], self.likelihood, self.kind, x, y, w)
        sizes = [self.logit_model.subset.slices[i].size for i in indices]
        return [DiagBlock(part) for part in tf.split(diagonal, sizes)]

    def _log_blocks(self, fallbacks: dict[int, str]) -> None:
        """Name each layer's block once per builder: at WARNING level if some layers fall back
        to the exact diagonal (naming them and why), else at INFO level."""
        if self._logged:
            return
        self._logged = True
        slices = self.logit_model.subset.slices
        kinds = [("diag", fallbacks[i]) if i in fallbacks else block_kind(s)
                 for i, s in enumerate(slices)]
        listing = ", ".join(f"{s.name!r} {kind}" + (f" ({why})" if why and i not in fallbacks else "")
                            for i, (s, (kind, why)) in enumerate(zip(slices, kinds, strict=True)))
        if not fallbacks:
            logger.info("laplace_tf: hessian_structure='kron' blocks per layer: %s.", listing)
            return
        logger.warning(
            "laplace_tf: hessian_structure='kron' uses the exact %s diagonal for %d layer(s): %s; "
            "blocks per layer: %s.",
            self.kind.upper(), len(fallbacks),
            "; ".join(f"{slices[i].name!r} ({reason})" for i, reason in sorted(fallbacks.items())),
            listing,
        )
