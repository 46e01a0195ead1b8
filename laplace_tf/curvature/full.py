"""Dense curvature over all weights of a subset: exact Hessian, GGN or empirical Fisher.

The curvature is one :class:`DenseBlock` ``[P, P]`` over the subset's flat weights:

* ``"ggn"``: ``sum_n J_n^T Lambda_n J_n = sum_n (L_n^T J_n)^T (L_n^T J_n)`` with
  ``Lambda_n = L_n L_n^T`` (see :mod:`~laplace_tf.curvature._per_example`: Dense layers cost
  ``N p_l p_m`` per block instead of ``N K p_l p_m``, a quarter of that on the diagonal; the
  sums stay compact over batches and are laid out as ``[P, P]`` once, at the end);
* ``"ef"``: ``sum_n g_n g_n^T`` with ``g_n`` the gradient of example ``n``'s NLL;
* ``"hessian"``: the exact Hessian of the summed batch NLL, by nested ``GradientTape``s
  (:func:`laplace_tf.autodiff.hessian`) over chunks of examples.

A dense ``P x P`` matrix grows fast: :class:`~laplace_tf.posterior.PosteriorLaplace` refuses
(before any work) a fit whose :func:`~laplace_tf.curvature.memory.estimate_memory` exceeds
``memory_limit_bytes`` (default :func:`default_memory_limit`, a quarter of the available
memory); here the limit sizes the exact Hessian's chunks.

Example:
    A linear regression model with unit noise has GGN = Hessian = ``sum_n [x_n, 1] [x_n, 1]^T``:

    >>> import keras, numpy as np, tensorflow as tf
    >>> from laplace_tf.batches import Batches
    >>> from laplace_tf.curvature.base import fit_curvature
    >>> from laplace_tf.likelihoods import get_likelihood
    >>> from laplace_tf.params import LogitModel
    >>> model = keras.Sequential([keras.Input((1,), dtype="float64"),
    ...                           keras.layers.Dense(1, dtype="float64")])
    >>> x, y = np.array([[1.0], [2.0]]), np.zeros(2)
    >>> builder = FullBuilder(LogitModel(model), get_likelihood("regression"), "hessian")
    >>> fit_curvature(builder, Batches((x, y), dtype=tf.float64)).blocks[0].matrix.numpy()
    array([[5., 3.],
           [3., 2.]])
"""

from __future__ import annotations

import keras
import tensorflow as tf

from laplace_tf.autodiff import hessian
from laplace_tf.blocks import Block, DenseBlock
from laplace_tf.curvature._per_example import (
    CHUNK_BYTES,
    activations_per_example,
    outer_matrix,
    outer_step_examples,
    slice_layout,
    sum_over_chunks,
    summed_outer_products,
)
from laplace_tf.curvature.base import CurvatureBuilder, weights_or_ones
from laplace_tf.likelihoods import Likelihood
from laplace_tf.params import LogitModel

FALLBACK_MEMORY_BYTES = 4 * 2**30
"""The memory limit when the available memory cannot be read."""

_TANGENTS_PER_ACTIVATION = 6  # a Hessian row's pfor tangents per forward number (measured, MLPs)


def available_memory_bytes() -> int | None:
    """``MemAvailable`` from ``/proc/meminfo`` in bytes, or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def default_memory_limit() -> int:
    """A quarter of the available memory (:data:`FALLBACK_MEMORY_BYTES` if unknown)."""
    available = available_memory_bytes()
    return FALLBACK_MEMORY_BYTES if available is None else available // 4


class FullBuilder(CurvatureBuilder):
    """One dense block per batch over the subset's weights.

    Args:
        logit_model: the model and its weight subset.
        likelihood: the likelihood of the data.
        kind: ``"ggn"``, ``"ef"`` or ``"hessian"``.
        memory_limit_bytes: the memory budget that sizes the exact Hessian's chunks (default:
            :func:`default_memory_limit`). Whether the dense curvature fits at all is checked
            before, from :func:`~laplace_tf.curvature.memory.estimate_memory`.

    Raises:
        ValueError: ``memory_limit_bytes`` is not a positive integer or None.
    """

    structure = "full"
    kinds = ("ggn", "ef", "hessian")

    def __init__(
        self,
        logit_model: LogitModel,
        likelihood: Likelihood,
        kind: str = "ggn",
        memory_limit_bytes: int | None = None,
    ):
        super().__init__(logit_model, likelihood, kind)
        if kind == "hessian":
            _check_second_derivatives(logit_model.model)
        if memory_limit_bytes is None:
            memory_limit_bytes = default_memory_limit()
        elif isinstance(memory_limit_bytes, bool) or not isinstance(memory_limit_bytes, int) or (
            memory_limit_bytes <= 0
        ):
            raise ValueError(
                f"memory_limit_bytes: expected a positive integer number of bytes or None; got "
                f"{memory_limit_bytes!r}."
            )
        self.memory_limit_bytes = memory_limit_bytes

    def batch_sums(self, x, y, w=None) -> tuple[list[tf.Tensor], tf.Tensor]:
        """The batch's compact sums (one ``[P, P]`` matrix for the exact Hessian)."""
        if self.kind == "hessian":
            matrix, logits = self._exact_hessian(x, y, w)
            return [matrix], logits
        self._layout = slice_layout(self.logit_model, x)
        return summed_outer_products(self.logit_model, self.likelihood, self.kind, x, y,
                                     self._layout, w)

    def examples_per_step(self, x) -> int:
        """GGN / EF: every step adds ``P x P``-sized sums, so batches are joined into steps as
        large as the per-example memory budget allows; the exact Hessian keeps its batches."""
        return 0 if self.kind == "hessian" else outer_step_examples(self.logit_model, self.kind, x)

    def finish(self, sums: list[tf.Tensor]) -> list[Block]:
        return [DenseBlock(sums[0] if self.kind == "hessian" else outer_matrix(sums, self._layout))]

    def _exact_hessian(self, x, y, w=None) -> tuple[tf.Tensor, tf.Tensor]:
        """The Hessian of the batch's (sample-weighted) NLL, by nested tapes over chunks of
        examples.

        Its ``P`` rows are vectorised by pfor, each carrying tangents of the chunk's
        intermediate tensors, so a chunk needs about ``P`` times its activations; chunks are
        sized to a quarter of ``memory_limit_bytes`` (at least :data:`CHUNK_BYTES`).
        """
        model, likelihood, subset = self.logit_model, self.likelihood, self.logit_model.subset

        def chunk_hessian(xw_chunk, y_chunk):  # x and w are sliced alike
            x_chunk, w_chunk = xw_chunk

            def nll(flat):
                logits = model(x_chunk, subset.unflatten(flat))
                return tf.reduce_sum(w_chunk * likelihood.nll_per_example(logits, y_chunk))

            return hessian(nll, subset.flat_values()), model(x_chunk)

        per_example = _TANGENTS_PER_ACTIVATION * subset.dtype.size * subset.n_params * (
            activations_per_example(model, x)
        )
        budget = max(CHUNK_BYTES, self.memory_limit_bytes // 4)
        return sum_over_chunks(chunk_hessian, (x, weights_or_ones(w, y)), y, max(1, budget // per_example))


def _check_second_derivatives(model: keras.Model) -> None:
    """Refuse the exact Hessian through a layer whose statistics ``tf.nn.moments`` computes:
    it stops the gradient through the mean inside the variance, which leaves first derivatives
    exact and second derivatives wrong."""
    for layer in model._flatten_layers(include_self=False, recursive=True):
        centred = isinstance(layer, keras.layers.LayerNormalization) and not getattr(
            layer, "rms_scaling", False)
        if centred or isinstance(layer, keras.layers.GroupNormalization):
            raise ValueError(
                f"curvature: the exact Hessian ('hessian') cannot pass through layer "
                f"{layer.name!r} ({type(layer).__name__}): TensorFlow's moments stop the "
                "gradient through the mean, so nested tapes give wrong second derivatives "
                "there. Use curvature='ggn' (or 'ef'), which need first derivatives only."
            )
