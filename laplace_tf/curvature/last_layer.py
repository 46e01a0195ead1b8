"""Last-layer curvature in closed form, from one forward pass over the body of the network.

When only the last layer's weights are uncertain and the model output is that layer's
pre-activation ``f_n = W~^T a~_n`` (``a~_n = [phi_n, 1]``: the layer's inputs ``phi_n`` with the
constant 1 appended when the layer has a trainable bias, ``W~`` the ``(din + 1, K)`` matrix
whose last row is the bias), the Jacobian of the logits with respect to the flat weights
(row-major ravel of ``W~``, docs/conventions.md) is ``J_n = a~_n^T ⊗ I_K``. Every curvature then comes
from the features and a per-example output-space matrix ``M_n [K, K]``:

* GGN: ``M_n = Lambda_n`` (the likelihood's Hessian with respect to the logits);
* exact Hessian: the same, since the logits are linear in the last layer's weights;
* empirical Fisher (EF): ``M_n = r_n r_n^T`` with ``r_n = d nll_n / d f_n``;

and ``sum_n J_n^T M_n J_n = sum_n (a~_n a~_n^T) ⊗ M_n`` (full), with diagonal
``sum_n a~_n^2 ⊗ diag(M_n)`` and Kronecker factors ``A = mean_n a~_n a~_n^T``,
``G = sum_n M_n``. No per-example Jacobian and no backward pass through the body is needed.

Example:
    >>> import keras, tensorflow as tf
    >>> from laplace_tf.likelihoods import get_likelihood
    >>> from laplace_tf.params import LogitModel, WeightSubset
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> logit_model = LogitModel(model, WeightSubset(model, [find_last_layer(model)]))
    >>> builder = LastLayerBuilder(logit_model, get_likelihood("regression"), structure="full")
    >>> blocks, _ = builder.batch_blocks(tf.constant([[1.0, 2.0]]), tf.zeros((1, 1)))
    >>> blocks[0].matrix.numpy().tolist()       # a~ a~^T with a~ = [1, 2, 1], sigma = 1
    [[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]
"""

from __future__ import annotations

from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from laplace_tf.blocks import Block, DenseBlock, DiagBlock, KronBlock
from laplace_tf.curvature._kron_sums import upper_triangle
from laplace_tf.curvature._per_example import (
    SHARED_WEIGHTS,
    activations_per_example,
    step_examples,
    unfactorable_layers,
)
from laplace_tf.curvature.base import CurvatureBuilder, weights_or_ones
from laplace_tf.likelihoods import Likelihood
from laplace_tf.outputs import output_layer
from laplace_tf.params import LogitModel, leaf_layers

_CLOSED_FORM_LAYERS = (keras.layers.Dense,)
STRUCTURES = ("full", "kron", "diag")  # closed forms; "lowrank" takes the all-weights builder
_ADVICE = (
    "use subset_of_weights='all' (e.g. with hessian_structure='kron'), which takes any model "
    "that returns logits or ends in a softmax/sigmoid layer"
)


def find_last_layer(model: keras.Model, name: str | None = None) -> keras.layers.Layer:
    """The layer whose weights the last-layer Laplace approximation is over.

    Args:
        model: a built Keras model (nested models are searched too).
        name: the layer's name; ``None`` picks the layer that owns the last entry of
            ``model.trainable_variables``.

    Returns:
        A ``keras.layers.Dense`` layer whose trainable weights are its kernel (and bias).

    Raises:
        ValueError: if no layer with weights is called ``name`` (the message lists the layers
            that have weights), or if the layer has no closed-form last-layer curvature.

    Example:
        >>> import keras
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="hidden"),
        ...                           keras.layers.Dense(2, name="head")])
        >>> find_last_layer(model).name, find_last_layer(model, "hidden").name
        ('head', 'hidden')
    """
    layers = leaf_layers(model)
    names = [layer.name for layer in layers]
    if name is None:
        last = model.trainable_variables[-1] if model.trainable_variables else None
        matches = [layer for layer in layers if any(v is last for v in layer.trainable_variables)]
        if not matches:
            raise ValueError(
                f"model: cannot tell the last layer of {model.name!r}: it is not built, or its "
                f"last trainable weight belongs to no layer. Build the model, or pass "
                f"last_layer_name= (layers with weights: {names})."
            )
    else:
        matches = [layer for layer in layers if layer.name == name]
        if len(matches) != 1:
            what = "no layer" if not matches else f"{len(matches)} layers (in nested models)"
            raise ValueError(
                f"last_layer_name: expected the name of one layer with trainable weights; "
                f"{what} of model {model.name!r} called {name!r}. The layers with weights are "
                f"{names}; pass one of these."
            )
    _check_closed_form(matches[0])
    return matches[0]


def last_layer_features(logit_model: LogitModel, x) -> tuple[tf.Tensor, tf.Tensor]:
    """The inputs of the last layer and the logits, from one forward pass.

    Args:
        logit_model: a :class:`LogitModel` over the last layer's weights only
            (``WeightSubset(model, [find_last_layer(model)])``).
        x: a batch of model inputs (a tensor, or a dict of them for multi-input models).

    Returns:
        ``(features [N, din], logits [N, K])``; the logits are the last layer's
        pre-activation outputs (a final softmax/sigmoid is stripped by ``logit_model``).

    Raises:
        ValueError: if ``logit_model`` is not over one Dense layer, if that layer sees inputs
            of rank other than 2 or is called more than once, if its weights are also used
            outside its call, or if anything after it changes the model output (then the
            closed form does not hold).

    Example:
        >>> import keras, tensorflow as tf
        >>> from laplace_tf.params import LogitModel, WeightSubset
        >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3, "relu"),
        ...                           keras.layers.Dense(2, "softmax")])
        >>> logit_model = LogitModel(model, WeightSubset(model, [model.layers[-1]]))
        >>> phi, logits = last_layer_features(logit_model, tf.ones((4, 2)))
        >>> hidden = model.layers[0](tf.ones((4, 2)))
        >>> bool(tf.reduce_all(phi == hidden)), tuple(logits.shape)
        (True, (4, 2))
    """
    layer = _subset_layer(logit_model)
    calls = []

    def record(_, inputs, z):
        calls.append((inputs, z))
        return z

    logits = logit_model(x, layers=[layer], hook=record)
    if len(calls) != 1:
        raise ValueError(
            f"last_layer_name: layer {layer.name!r} was called {len(calls)} times in one "
            f"forward pass; the last-layer closed form needs exactly one call. Choose another "
            f"layer with last_layer_name=, or {_ADVICE}."
        )
    if unfactorable_layers(logit_model, [layer], x).get(id(layer)) == SHARED_WEIGHTS:
        raise ValueError(
            f"last_layer_name: the weights of layer {layer.name!r} are also used outside its "
            f"call (shared or tied weights), so the last-layer closed form does not hold: it "
            f"needs the logits to depend on them through that layer's output only. Choose "
            f"another layer with last_layer_name=, or {_ADVICE}."
        )
    inputs, z = calls[0]
    if inputs.shape.rank != 2:
        raise ValueError(
            f"last_layer_name: the Dense layer {layer.name!r} receives inputs of shape "
            f"{tuple(inputs.shape)}; the last-layer closed form needs inputs [N, features]. "
            f"Add a Flatten/pooling layer before it, or {_ADVICE}."
        )
    if logits is not z:
        raise ValueError(
            f"last_layer_name: the model output is not the pre-activation output of layer "
            f"{layer.name!r} ({_what_follows(logit_model, layer)}), so the last-layer closed "
            f"form does not hold: it needs the model to return that output unchanged (a final "
            f"softmax/sigmoid layer is fine; a softmax/sigmoid applied in call() is not: return "
            f"the logits from call() instead). Name the model's final Dense layer with "
            f"last_layer_name=, or {_ADVICE}."
        )
    return tf.cast(inputs, z.dtype), logits


class LastLayerBuilder(CurvatureBuilder):
    """Closed-form curvature over the last layer's weights: one block per batch.

    Kinds ``"ggn"``, ``"hessian"`` (for a linear last layer on the logits the exact Hessian
    equals the GGN, so it is computed as the GGN) and ``"ef"``. Structures:

    * ``"full"``: :class:`DenseBlock` ``sum_n (a~_n a~_n^T) ⊗ M_n``, ``[P, P]`` with
      ``P = (din + 1) K``: ``P^2`` numbers, e.g. 2.6e9 (10 GB in float32) for 512 features
      and 100 classes, and a fit holds a few such matrices
      (:func:`~laplace_tf.curvature.memory.estimate_memory`; ``PosteriorLaplace.fit`` refuses
      what exceeds its ``memory_limit_bytes``).
    * ``"kron"``: :class:`KronBlock` ``A = mean_n a~_n a~_n^T``, ``G = sum_n M_n``, ``n = N``.
    * ``"diag"``: :class:`DiagBlock` ``sum_n a~_n^2 ⊗ diag(M_n)``.

    The work per batch is one forward pass (no backward pass through the body) plus
    ``O(N (din^2 + K^2))`` (kron), ``O(N din K)`` (diag) or ``O(N din^2 K^2)`` (full); only
    ``"full"`` forms the per-example ``[N, K, K]`` output-space matrices, so kron and diag stay
    fast with hundreds of classes.

    Args:
        logit_model: a :class:`LogitModel` over the last layer's weights only.
        likelihood: the likelihood of the data.
        kind: ``"ggn"``, ``"ef"`` or ``"hessian"``.
        structure: ``"full"``, ``"kron"`` or ``"diag"``.

    Raises:
        ValueError: for an unknown structure or kind, ``"hessian"`` for a likelihood whose
            output Hessian depends on the targets (heteroscedastic), or a ``logit_model``
            that is not over one Dense layer.

    Example:
        >>> import keras, numpy as np, tensorflow as tf
        >>> from laplace_tf.likelihoods import get_likelihood
        >>> from laplace_tf.params import LogitModel, WeightSubset
        >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])
        >>> logit_model = LogitModel(model, WeightSubset(model, [model.layers[-1]]))
        >>> lik = get_likelihood("regression", sigma_noise=0.5)
        >>> x = tf.constant([[1.0, 2.0], [3.0, 4.0]])
        >>> (block,), _ = LastLayerBuilder(logit_model, lik).batch_blocks(x, tf.zeros((2, 3)))
        >>> block.G.numpy().diagonal().tolist()      # sum_n 1 / sigma^2
        [8.0, 8.0, 8.0]
        >>> np.allclose(block.A, [[5, 7, 2], [7, 10, 3], [2, 3, 1]])   # mean a~ a~^T
        True
    """

    def __init__(
        self,
        logit_model: LogitModel,
        likelihood: Likelihood,
        kind: str = "ggn",
        structure: str = "kron",
    ):
        if structure not in STRUCTURES:
            raise ValueError(
                f"hessian_structure: expected one of {STRUCTURES} for the last layer; got "
                f"{structure!r}."
            )
        self.structure = structure
        super().__init__(logit_model, likelihood, kind)
        if kind == "hessian" and not likelihood.constant_output_hessian:
            raise ValueError(
                f"curvature: the last-layer 'hessian' is computed as the GGN, which is exact only "
                f"when the output Hessian of the NLL does not depend on the targets; for "
                f"likelihood={likelihood.name!r} it does. Use curvature='ggn' or 'ef', or "
                "subset_of_weights='all' with hessian_structure='full' for the exact Hessian."
            )
        self.layer = _subset_layer(logit_model)
        self._has_bias = len(self.layer.trainable_variables) == 2

    def batch_sums(self, x, y, w=None) -> tuple[list[Block | tf.Tensor], tf.Tensor]:
        """The batch's one block over the last layer's weights (``"full"``: its packed sums,
        :func:`_full_sums`), and its logits ``[N, K]``.

        Sample weights ``w [N]`` multiply each ``M_n`` (and weight ``A``'s mean)."""
        features, logits = last_layer_features(self.logit_model, x)
        if self._has_bias:
            features = tf.concat([features, tf.ones_like(features[:, :1])], axis=1)
        w = weights_or_ones(w, logits)
        if self.kind == "ef":
            residuals = _logit_gradients(self.likelihood, logits, y)
            outputs = _OutputMatrices(tf.zeros_like(residuals), residuals[:, :, None], 1.0)
        else:
            outputs = _OutputMatrices(*self.likelihood.output_hessian_diag_lowrank(logits), -1.0)
        outputs = outputs.weighted(w)
        if self.structure == "full":
            return _full_sums(features, outputs), logits
        if self.structure == "kron":
            return [_kron_block(features, outputs, w)], logits
        return [_diag_block(features, outputs)], logits

    def examples_per_step(self, x) -> int:
        """``"full"``: every step adds a ``P x P``-sized sum, so batches are joined into steps
        whose activations and intermediates fit in the chunk budget; else one step a batch."""
        if self.structure != "full":
            return 0
        d, k = self._dims()
        numbers = activations_per_example(self.logit_model, x) + full_example_numbers(d, k)
        return step_examples(numbers, self.logit_model.subset.dtype.size)

    def finish(self, sums: list[Block | tf.Tensor]) -> list[Block]:
        if self.structure != "full":
            return super().finish(sums)
        return [DenseBlock(_full_matrix(sums, *self._dims()))]

    def _dims(self) -> tuple[int, int]:
        """``(din (+1 for the bias), K)`` of the last layer."""
        n_outputs = int(self.logit_model.subset.slices[0].variables[0].shape[-1])
        return self.logit_model.subset.n_params // n_outputs, n_outputs


class _OutputMatrices(NamedTuple):
    """Per-example output-space matrices ``M_n = diag(d_n) + sign U_n U_n^T`` (``U [N, K, m]``).

    Kept in this form so that the Kronecker and diagonal blocks cost ``O(N K m)`` to
    ``O(N K^2 m)`` instead of building ``[N, K, K]`` (m = 1 for softmax and the EF, 0 else).
    """

    diagonal: tf.Tensor
    factors: tf.Tensor
    sign: float

    def weighted(self, w: tf.Tensor) -> _OutputMatrices:
        """``w_n M_n`` for sample weights ``w [N]``."""
        return _OutputMatrices(self.diagonal * w[:, None],
                               self.factors * tf.sqrt(w)[:, None, None], self.sign)

    def dense(self) -> tf.Tensor:
        """``M_n`` for every example, ``[N, K, K]``."""
        low_rank = tf.matmul(self.factors, self.factors, transpose_b=True)
        return tf.linalg.diag(self.diagonal) + self.sign * low_rank

    def diagonals(self) -> tf.Tensor:
        """``diag(M_n)`` for every example, ``[N, K]``."""
        return self.diagonal + self.sign * tf.reduce_sum(tf.square(self.factors), axis=-1)

    def total(self) -> tf.Tensor:
        """``sum_n M_n``, ``[K, K]``."""
        low_rank = tf.einsum("nkm,nlm->kl", self.factors, self.factors)
        return tf.linalg.diag(tf.reduce_sum(self.diagonal, axis=0)) + self.sign * low_rank


def full_example_numbers(d: int, k: int) -> int:
    """Numbers per example of a ``"full"`` step besides the body's activations, for ``d``
    inputs (with the bias's 1) and ``k`` outputs: features, ``M_n``, its packed upper triangle
    and the largest block of input pairs (:func:`_full_sums`)."""
    return d + k * k + k * (k + 1) // 2 + min(d, _ROW_BLOCK) * d


_ROW_BLOCK = 128
"""Input rows ``i`` a product block of :func:`_full_sums` covers. Measured (float32, 2 shared
cores, d = 513, K = 20, 2,048 examples): 1.7 s against 3.7 s for the sums packed over all input
pairs at once (:func:`~laplace_tf.curvature._kron_sums.symmetric_kron_sum`, whose gather of
the ``d (d + 1) / 2`` pairs of every example is mostly memory traffic) and 1.1 s for one
matmul doing the packed sums' multiply-adds."""


def _row_blocks(d: int) -> list[tuple[int, int]]:
    return [(start, min(d, start + _ROW_BLOCK)) for start in range(0, d, _ROW_BLOCK)]


def _full_sums(a: tf.Tensor, outputs: _OutputMatrices) -> list[tf.Tensor]:
    """``sum_n (a~_n a~_n^T) ⊗ M_n`` by blocks of input rows: for rows ``[i0, i1)``, the
    entries of the input pairs ``(i, j)``, ``i0 <= i < i1``, ``j >= i0`` and the output pairs
    ``k <= l``, ``[(i1 - i0) (d - i0), K (K + 1) / 2]``, one matmul over the examples each
    (:func:`_full_matrix` lays them out). The pairs ``j < i0`` are the transposes of earlier
    blocks' and are skipped: with blocks of :data:`_ROW_BLOCK` rows, about ``1 + 128 / d``
    times the multiply-adds of the distinct pairs, and no gather of the pairs."""
    packed = tf.transpose(upper_triangle(tf.transpose(outputs.dense(), [1, 2, 0])))  # [N, K']
    n = tf.shape(a)[0]
    return [tf.matmul(tf.reshape(a[:, i0:i1, None] * a[:, None, i0:], [n, -1]), packed,
                      transpose_a=True) for i0, i1 in _row_blocks(int(a.shape[-1]))]


def _full_matrix(parts: list[tf.Tensor], d: int, k: int) -> tf.Tensor:
    """The ``[d k, d k]`` matrix of :func:`_full_sums`' blocks: each laid out as its rows right
    of the diagonal (the square diagonal block halved), plus the transpose of it all."""
    upper, lower = np.triu_indices(k)
    position = np.zeros((k, k), np.int64)
    position[upper, lower] = position[lower, upper] = np.arange(len(upper))
    rows = []
    for (i0, i1), part in zip(_row_blocks(d), parts, strict=True):
        block = tf.reshape(tf.gather(part, position.reshape(-1), axis=1), [i1 - i0, d - i0, k, k])
        block = tf.reshape(tf.transpose(block, [0, 2, 1, 3]), [(i1 - i0) * k, (d - i0) * k])
        square = (i1 - i0) * k
        rows.append(tf.concat([tf.zeros([square, i0 * k], block.dtype), 0.5 * block[:, :square],
                               block[:, square:]], axis=1))
    upper_half = tf.concat(rows, axis=0)
    return upper_half + tf.transpose(upper_half)


def _kron_block(a: tf.Tensor, outputs: _OutputMatrices, w: tf.Tensor) -> KronBlock:
    """In sum form (``A = sum_n w_n a~_n a~_n^T``, ``n = sum_n w_n``; ``outputs`` weighted)."""
    return KronBlock(tf.matmul(a * w[:, None], a, transpose_a=True), outputs.total(),
                     tf.reduce_sum(w))


def _diag_block(a: tf.Tensor, outputs: _OutputMatrices) -> DiagBlock:
    diagonal = tf.einsum("ni,nk->ik", tf.square(a), outputs.diagonals())
    return DiagBlock(tf.reshape(diagonal, [-1]))


def _logit_gradients(likelihood: Likelihood, logits: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    """``d nll_n / d f_n`` for every example ``[N, K]`` (the tape sees the likelihood only)."""
    with tf.GradientTape() as tape:
        tape.watch(logits)
        nll = likelihood.nll(logits, y)
    return tape.gradient(nll, logits)


def _check_closed_form(layer: keras.layers.Layer) -> None:
    """Raise unless ``layer`` is a Dense layer whose trainable weights are its kernel (+ bias)."""
    if not isinstance(layer, _CLOSED_FORM_LAYERS):
        raise ValueError(
            f"last_layer_name: layer {layer.name!r} is a {type(layer).__name__}; the last-layer "
            f"curvature has a closed form only for "
            f"{', '.join(c.__name__ for c in _CLOSED_FORM_LAYERS)} layers. Name a Dense layer with last_layer_name=, or {_ADVICE}."
        )
    kernel = getattr(layer, "kernel", None)
    trainable = [id(v) for v in layer.trainable_variables]
    if trainable not in ([id(kernel)], [id(kernel), id(layer.bias)]):
        raise ValueError(
            f"last_layer_name: the trainable weights of Dense layer {layer.name!r} are "
            f"{[v.path for v in layer.trainable_variables]}; the closed form needs its kernel (and bias) only "
            f"(no LoRA, no quantization). Use a plain Dense layer, or {_ADVICE}."
        )


def _subset_layer(logit_model: LogitModel) -> keras.layers.Layer:
    """The one closed-form layer ``logit_model``'s weight subset is over."""
    slices = logit_model.subset.slices
    if len(slices) != 1:
        raise ValueError(
            "logit_model: the last-layer curvature needs a LogitModel over one layer's weights, "
            f"LogitModel(model, WeightSubset(model, [last_layer])); got layers "
            f"{[s.name for s in slices]}."
        )
    _check_closed_form(slices[0].layer)
    return slices[0].layer


def _what_follows(logit_model: LogitModel, layer: keras.layers.Layer) -> str:
    """A description of what comes after ``layer`` in the model, for error messages."""
    model = logit_model.model
    activation = getattr(layer.activation, "__name__", "linear")
    stripped = logit_model.stripped is not None and logit_model.stripped.operation is layer
    if activation != "linear" and not stripped:
        return f"its activation {activation!r} is applied to it"
    after = []
    if isinstance(model, keras.Sequential) and any(layer is other for other in model.layers):
        index = next(i for i, other in enumerate(model.layers) if other is layer)
        after = model.layers[index + 1 :]
    elif output_layer(model) not in (None, layer):
        after = [output_layer(model)]
    if not after:
        return "code after it in the model's call changes it"
    return "it is followed by " + ", ".join(f"{o.name!r} ({type(o).__name__})" for o in after)
