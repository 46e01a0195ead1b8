"""Keras weights as one flat vector, and calling a model with given weights.

The flat vector is ``model.trainable_variables`` restricted to a subset of layers, in that
order, each variable raveled row-major (see docs/conventions.md). A Dense layer ``(in, out)`` with a
bias therefore occupies the row-major ravel of the ``(in + 1, out)`` matrix whose last row is
the bias.

Example:
    >>> import keras, numpy as np
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> weights = WeightSubset(model)
    >>> weights.n_params                      # 3 * 2 kernel + 2 bias
    8
    >>> flat = weights.flat_values()
    >>> [tuple(t.shape) for t in weights.unflatten(flat)]
    [(3, 2), (2,)]
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from laplace_tf.likelihoods import Likelihood, as_likelihood
from laplace_tf.outputs import ProbabilityOutput, final_op_type, probability_output

logger = logging.getLogger("laplace_tf")


@dataclass(frozen=True)
class LayerSlice:
    """One layer's contiguous part of the flat weight vector.

    ``columns``: the positions, in the ravel of ``variables``, of the layer's weights that the
    slice holds (a subnetwork, :class:`SubnetworkSubset`); None: all of them.
    """

    layer: keras.layers.Layer
    variables: tuple
    offset: int
    size: int
    columns: np.ndarray | None = None

    @property
    def name(self) -> str:
        return self.layer.name

    @property
    def layer_size(self) -> int:
        """The number of weights in ``variables`` (``size`` unless ``columns`` picks some)."""
        return sum(int(np.prod(v.shape)) for v in self.variables)


def fingerprint(variables) -> str:
    """A SHA-256 of the values of ``variables`` (float64 bytes), to recognise weights."""
    digest = hashlib.sha256()
    for v in variables:
        digest.update(np.ascontiguousarray(np.asarray(v.numpy(), np.float64)).tobytes())
    return digest.hexdigest()


def leaf_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """All layers of ``model`` that own weights directly (nested models are walked)."""
    return [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if not layer._layers and layer.trainable_variables
    ]


class WeightSubset:
    """The trainable weights of some layers of a Keras model, as one flat vector.

    Args:
        model: a built Keras model (Sequential, Functional or subclassed).
        layers: the layers whose weights to use; ``None`` means all layers with weights.

    Raises:
        ValueError: if the model is not built or a layer has no trainable weights.
    """

    def __init__(self, model: keras.Model, layers: Sequence[keras.layers.Layer] | None = None):
        if not isinstance(model, keras.Model):
            raise TypeError(
                f"model: expected a keras.Model, got {type(model).__name__}. "
                "Wrap your layers in keras.Sequential or keras.Model."
            )
        if not model.built or not model.trainable_variables:
            raise ValueError(
                "model: the model is not built or has no trainable weights; call it once on a "
                "batch of inputs (or give it a keras.Input) before using laplace_tf."
            )
        # a weight tracked by several layers (one holding another's kernel) belongs to the
        # first: the one model.trainable_variables lists it with, so a layer's weights are
        # contiguous in the flat vector
        owner: dict[int, keras.layers.Layer] = {}
        for layer in leaf_layers(model):
            for v in layer.trainable_variables:
                owner.setdefault(id(v), layer)
        chosen = None if layers is None else {id(layer) for layer in layers}
        if layers is not None:
            for layer in layers:
                if not layer.trainable_variables:
                    raise ValueError(
                        f"layers: layer {layer.name!r} has no trainable weights; choose layers "
                        "that have weights."
                    )
        orphans = [v.path for v in model.trainable_variables if id(v) not in owner]
        if orphans:
            raise ValueError(
                f"model: the weights {orphans} belong to a layer (or model) that also has "
                "sublayers; laplace_tf takes the weights of layers without sublayers. Move "
                "them into a layer of their own (a small keras.layers.Layer holding the "
                "weight)."
            )
        self.model = model
        slices: list[LayerSlice] = []
        offset = 0
        for variable in model.trainable_variables:
            layer = owner[id(variable)]
            if chosen is not None and id(layer) not in chosen:
                continue
            size = int(np.prod(variable.shape))
            if slices and slices[-1].layer is layer:
                last = slices[-1]
                slices[-1] = LayerSlice(layer, last.variables + (variable,), last.offset, last.size + size)
            else:
                slices.append(LayerSlice(layer, (variable,), offset, size))
            offset += size
        self.slices: tuple[LayerSlice, ...] = tuple(slices)
        self.variables = [v for s in slices for v in s.variables]
        self.n_params = offset
        self._subset_ids = [id(v) for v in self.variables]

    @property
    def layers(self) -> list[keras.layers.Layer]:
        return [s.layer for s in self.slices]

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [tuple(v.shape) for v in self.variables]

    @property
    def dtype(self) -> tf.DType:
        return tf.as_dtype(self.variables[0].dtype)

    def values(self) -> list[tf.Tensor]:
        """The current values of the subset's variables."""
        return [tf.convert_to_tensor(v.value) for v in self.variables]

    def flat_values(self) -> tf.Tensor:
        """The current weights as one vector ``[P]``."""
        return self.flatten(self.values())

    def flatten(self, tensors: Sequence[tf.Tensor]) -> tf.Tensor:
        """Ravel a list shaped like the variables into one vector ``[P]``."""
        return tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)

    def unflatten(self, flat: tf.Tensor) -> list[tf.Tensor]:
        """Split a vector ``[..., P]`` into tensors ``[..., *variable.shape]``."""
        sizes = [int(np.prod(s)) for s in self.shapes]
        batch_shape = tf.shape(flat)[:-1]
        parts = tf.split(flat, sizes, axis=-1)
        return [
            tf.reshape(p, tf.concat([batch_shape, tf.constant(s, tf.int32)], 0)) if s else
            tf.reshape(p, batch_shape)
            for p, s in zip(parts, self.shapes, strict=True)
        ]

    def all_trainable_values(self, weights: Sequence[tf.Tensor] | None) -> list[tf.Tensor]:
        """The model's full trainable list with this subset's entries replaced by ``weights``."""
        if weights is None:
            return [v.value for v in self.model.trainable_variables]
        replaced = dict(zip(self._subset_ids, weights, strict=True))
        return [replaced.get(id(v), v.value) for v in self.model.trainable_variables]

    def signature(self) -> list[dict]:
        """Layer names, variable paths and shapes: what a saved posterior must match."""
        return [
            {"layer": s.name, "variables": [v.path for v in s.variables],
             "shapes": [list(v.shape) for v in s.variables]}
            for s in self.slices
        ]

    def layout_key(self) -> tuple:
        """What tells this subset's flat vector from another subset's of the same model: its
        type, its variables and (subnetworks) the chosen entries; a key of :func:`model_cache`."""
        chosen = getattr(self, "indices", None)
        return (type(self).__name__, tuple(self._subset_ids),
                None if chosen is None else np.asarray(chosen).tobytes())

    def fingerprint(self) -> str:
        """A SHA-256 of the current weights (float64 bytes), to recognise the MAP."""
        return fingerprint(self.variables)


_CACHE_ATTRIBUTE = "_laplace_tf_caches"


def model_cache(model: keras.Model, key: tuple) -> dict:
    """A dict kept as long as ``model`` lives, one per ``key``: compiled steps that posteriors
    of the same model, weight subset and settings (``key``) share, so that a second posterior
    does not trace them again.

    Example:
        >>> import keras
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> model_cache(model, ("a",)) is model_cache(model, ("a",))
        True
        >>> model_cache(model, ("a",)) is model_cache(model, ("b",))
        False
    """
    caches = model.__dict__.get(_CACHE_ATTRIBUTE)
    if caches is None or caches["generation"] != _generation[0]:
        caches = {"generation": _generation[0]}  # on the model itself (untracked by Keras), not
        object.__setattr__(model, _CACHE_ATTRIBUTE, caches)  # in a global weak dict: its
    return caches.setdefault(key, {})  # steps hold the model, which must stay collectable


_generation = [0]  # of the shared steps: bumped by forget_shared_steps


def forget_shared_steps() -> None:
    """Drop the steps that every model shares (:func:`model_cache`), for example when a layer
    rule changes: steps traced before would keep computing with the old rule."""
    _generation[0] += 1


class compiled_per_shape:  # noqa: N801 (used like tf.function)
    """``tf.function(fn, reduce_retracing=True)``, one per structure of the arguments' shapes
    but for their first (batch) dimension.

    Across calls with several batch sizes a function traced with ``reduce_retracing`` relaxes
    its input shapes; across other shapes it would relax them further: to an unknown rank (a
    model fitted on ``[N]`` and on ``[N, 1]`` inputs, as Keras allows), which Keras layers
    cannot call, or to unknown lengths (a dataset padded batch by batch to its own sequence
    lengths), which the curvature's static layout cannot take.

    The first ``batched`` positional arguments (nests of tensors) have the batch as their
    first dimension: each function is traced for any batch size at its first call, so a last,
    smaller batch costs no second trace.

    Example:
        >>> import tensorflow as tf
        >>> double = compiled_per_shape(lambda x: 2 * x, batched=1)
        >>> double(tf.ones([2])).shape, double(tf.ones([3, 1])).shape, double(tf.ones([5, 1])).shape
        (TensorShape([2]), TensorShape([3, 1]), TensorShape([5, 1]))
        >>> double.experimental_get_tracing_count()
        2
    """

    def __init__(self, fn, batched: int = 0):
        self._fn = fn
        self._batched = batched
        self._steps: dict[tuple, Any] = {}  # tf.function objects
        self._concrete: dict[tuple, Any] = {}  # by the arguments' specs

    def __call__(self, *args, **kwargs):
        return self._step(args, kwargs)(*args, **kwargs)

    def get_concrete_function(self, *args, **kwargs):
        """The concrete function for these ``tf.TensorSpec``s (of known shapes but for the
        batch size) and Python values, looked up once per distinct arguments (their nesting
        included: a list and a tuple of inputs are traced apart)."""
        key = repr((args, sorted(kwargs.items())))
        if key not in self._concrete:
            self._concrete[key] = self._step(args, kwargs).get_concrete_function(*args, **kwargs)
        return self._concrete[key]

    def _step(self, args, kwargs):
        key = tuple(tuple(t.shape[1:]) for t in tf.nest.flatten((args, kwargs))
                    if hasattr(t, "shape"))
        if key not in self._steps:
            step = tf.function(self._fn, reduce_retracing=True)
            if self._batched:
                open_batch = any_batch_size(args[:self._batched])
                step.get_concrete_function(*open_batch, *args[self._batched:], **kwargs)
            self._steps[key] = step
        return self._steps[key]

    def experimental_get_tracing_count(self) -> int:
        """Traces over all shapes (as ``tf.function``'s method)."""
        return sum(step.experimental_get_tracing_count() for step in self._steps.values())


def any_batch_size(tensors):
    """``TensorSpec``s of (nested) ``tensors`` with the batch (first) dimension left open;
    leaves without a first dimension (None, scalars) stay as they are."""
    def spec(t):
        shape = getattr(t, "shape", None)
        if shape is None or not hasattr(t, "dtype") or not tf.TensorShape(shape).rank:
            return t  # None, a scalar
        return tf.TensorSpec([None, *t.shape[1:]], t.dtype)
    return tf.nest.map_structure(spec, tensors)


class SubnetworkSubset(WeightSubset):
    """Some weights of a Keras model, chosen by their flat indices: a subnetwork.

    The flat vector holds the entries ``indices`` (sorted) of :class:`WeightSubset(model)
    <WeightSubset>`'s vector. Its variables are those of the layers holding a chosen weight;
    :meth:`unflatten` puts a vector ``[..., P_sub]`` into their current values (the other
    weights stay as they are: at the MAP), :meth:`flatten` gathers the chosen entries. Each
    such layer is one slice, with the offsets in the subnetwork vector and the ``columns`` it
    holds of the layer's own weights (None when it holds all of them).

    Args:
        model: a built Keras model.
        indices: flat indices into ``WeightSubset(model).flat_values()``, integers, unique,
            in range (any order; sorted here).

    Raises:
        TypeError, ValueError: ``indices`` are not integers, not 1-D, empty, out of range or
            repeated (named ``subnetwork_indices``).

    Example:
        >>> import keras, numpy as np
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2),
        ...                           keras.layers.Dense(1)])
        >>> weights = SubnetworkSubset(model, [9, 0, 7])     # 2 of the first layer, 1 of the second
        >>> weights.n_params, [(s.name, s.offset, s.size) for s in weights.slices][1][1:]
        (3, (2, 1))
        >>> bool(np.array_equal(weights.flat_values(),
        ...                     np.take(WeightSubset(model).flat_values(), [0, 7, 9])))
        True
    """

    def __init__(self, model: keras.Model, indices):
        everything = WeightSubset(model)
        self.indices = checked_indices(indices, everything.n_params, "subnetwork_indices")
        chosen = []  # per layer: (whole-model slice, its chosen columns)
        for s in everything.slices:
            inside = self.indices[(self.indices >= s.offset) & (self.indices < s.offset + s.size)]
            if inside.size:
                chosen.append((s, inside - s.offset))
        super().__init__(model, [s.layer for s, _ in chosen])
        slices, positions, offset, start = [], [], 0, 0  # start: the layer in the layers' vector
        for s, columns in chosen:
            slices.append(LayerSlice(s.layer, s.variables, offset, columns.size,
                                     None if columns.size == s.size else columns))
            positions.append(start + columns)
            offset, start = offset + columns.size, start + s.size
        self.slices = tuple(slices)
        self.n_params = offset
        self._positions = np.concatenate(positions)  # the chosen entries of the layers' vector
        source = np.arange(start)  # the layers' vector from [its values, the subnetwork vector]
        source[self._positions] = start + np.arange(offset)
        self._source = source

    def flatten(self, tensors: Sequence[tf.Tensor]) -> tf.Tensor:
        """The chosen entries ``[P_sub]`` of a list shaped like the variables."""
        return tf.gather(super().flatten(tensors), self._positions)

    def unflatten(self, flat: tf.Tensor) -> list[tf.Tensor]:
        """The variables' current values with the chosen entries set to ``flat [..., P_sub]``."""
        flat = tf.convert_to_tensor(flat)
        current = super().flatten(self.values())
        current = tf.broadcast_to(current, tf.concat([tf.shape(flat)[:-1], tf.shape(current)], 0))
        return super().unflatten(tf.gather(tf.concat([current, flat], -1), self._source, axis=-1))


def checked_indices(indices, n_params: int, name: str) -> np.ndarray:
    """``indices`` into a vector of ``n_params`` as sorted int64 ``[n]``, or a clear error
    naming ``name``: integers (not booleans), 1-D, at least one, in range, no repeats."""
    if isinstance(indices, (tf.Tensor, tf.Variable)):
        indices = indices.numpy()
    array = np.asarray(indices)
    if array.size == 0:
        raise ValueError(f"{name}: expected at least one weight index; got none. Choose some "
                         "with laplace_tf.subnetwork (e.g. largest_variance).")
    if array.dtype == bool or not np.issubdtype(array.dtype, np.integer):
        raise TypeError(
            f"{name}: expected integer indices into the flat weight vector; got dtype "
            f"{array.dtype}. For a boolean mask pass np.flatnonzero(mask)."
        )
    if array.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of indices; got shape {array.shape}. "
                         "Pass np.ravel(indices).")
    bad = array[(array < 0) | (array >= n_params)]
    if bad.size:
        raise ValueError(
            f"{name}: indices must be in [0, {n_params}) (the model has {n_params} trainable "
            f"weights); got {bad[:5].tolist()}. They count the weights of "
            "model.trainable_variables in order (WeightSubset(model).flat_values())."
        )
    unique, counts = np.unique(array, return_counts=True)
    if unique.size != array.size:
        raise ValueError(
            f"{name}: every index must appear once; repeated: {unique[counts > 1][:5].tolist()}. "
            "Pass np.unique(indices)."
        )
    return unique.astype(np.int64)


PreactivationHook = Callable[[keras.layers.Layer, tf.Tensor, tf.Tensor], tf.Tensor]


@contextlib.contextmanager
def _patched_calls(
    layers: Sequence[keras.layers.Layer],
    hook: PreactivationHook | None,
    strip: ProbabilityOutput | None,
) -> Iterator[None]:
    """Temporarily wrap layer calls to see inputs and pre-activations.

    Each layer in ``layers`` runs with its fused activation switched off; ``hook(layer,
    inputs, z)`` sees its inputs and pre-activation ``z`` and returns the tensor to continue
    with (e.g. ``z`` plus a zero probe); then the activation is applied. ``strip`` is the
    model's final softmax/sigmoid, dropped so that the model returns logits: a layer's fused
    activation is switched off, any other operation (``Softmax``, ``Lambda``,
    ``keras.ops.softmax``) returns its input.
    """
    patched = list(layers)
    if strip is not None and all(layer is not strip.operation for layer in patched):
        patched.append(strip.operation)
    originals = {}

    def wrap(layer, original):
        stripped = strip is not None and layer is strip.operation

        def call(inputs, *args, **kwargs):
            if stripped and not strip.fused:
                return inputs
            activation = getattr(layer, "activation", None)
            if activation is not None:
                layer.activation = keras.activations.linear
            try:
                z = original(inputs, *args, **kwargs)
            finally:
                if activation is not None:
                    layer.activation = activation
            if hook is not None and any(layer is hooked for hooked in layers):
                z = hook(layer, inputs, z)
            if stripped or activation is None:
                return z
            return activation(z)

        return call

    try:
        for layer in patched:
            originals[id(layer)] = (layer, layer.call)
            layer.call = wrap(layer, layer.call)
        yield
    finally:
        for layer, _ in originals.values():
            del layer.call


@contextlib.contextmanager
def _in_variable_dtype(model: keras.Model) -> Iterator[None]:
    """Temporarily run every mixed-precision layer of ``model`` in its variables' dtype.

    Under ``keras.mixed_precision`` (e.g. ``"mixed_float16"``: float32 variables, float16
    computation) a layer casts its inputs and its variables to the compute dtype of its
    ``dtype_policy``, which ``Layer.__call__`` reads at every call. Setting the policy to the
    variables' dtype makes the whole computation happen in that dtype (the dtype of the
    weights, of the curvature and of the posterior); the original policies are put back on
    exit. Quantized layers and policy maps are left alone.
    """
    changed = []
    try:
        for layer in model._flatten_layers(include_self=True, recursive=True):
            policy = layer.dtype_policy
            if (
                policy.compute_dtype != policy.variable_dtype
                and policy.quantization_mode is None
                and not isinstance(policy, keras.dtype_policies.DTypePolicyMap)
            ):
                changed.append((layer, policy))
                layer.dtype_policy = policy.variable_dtype
        yield
    finally:
        for layer, policy in changed:
            layer.dtype_policy = policy


class LogitModel:
    """Calls a Keras model with given subset weights and returns logits.

    A model whose output is a softmax/sigmoid (:func:`~laplace_tf.outputs.probability_output`:
    a final layer with that activation, a ``Softmax`` layer, ``keras.ops.softmax``, ... possibly
    followed by ``Dropout``) is called without it (logged once), so that curvature and
    predictives work on logits. With a likelihood that has no output activation
    (``"regression"``, ``"heteroscedastic"``) the output is used as it is (:func:`~laplace_tf.outputs.check_output_op` warns about a softmax/sigmoid
    there when fitting). Every layer computes in its variables' dtype, so a mixed-precision
    model (float16 computation, float32 variables) is computed in float32; the model itself
    is left as it was.

    Args:
        model: a built Keras model.
        subset: the weights that calls may replace (default: all).
        likelihood: what the outputs are for, a :class:`~laplace_tf.likelihoods.Likelihood`
            or its name; None strips any final softmax/sigmoid and checks nothing.

    Raises:
        ValueError: a final sigmoid with ``likelihood="classification"`` or a final softmax
            with ``likelihood="binary"`` (the model and the likelihood disagree).

    Example:
        >>> import keras, tensorflow as tf
        >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3, "softmax")])
        >>> f = LogitModel(model)
        >>> logits = f(tf.ones((4, 2)))            # pre-softmax outputs [4, 3]
        >>> bool(tf.reduce_all(tf.abs(tf.nn.softmax(logits) - model(tf.ones((4, 2)))) < 1e-6))
        True
    """

    def __init__(
        self, model: keras.Model, subset: WeightSubset | None = None,
        likelihood: str | Likelihood | None = None,
    ):
        self.model = model
        self.subset = subset if subset is not None else WeightSubset(model)
        if likelihood is not None:
            likelihood = as_likelihood(likelihood)
        self.likelihood = likelihood
        # a likelihood without an output activation (regression) takes the output as it is,
        # whatever it is (fit warns about a softmax)
        keep = likelihood is not None and likelihood.output_activation is None
        found = None if keep else probability_output(model)
        if found is not None:
            _check_link(found, likelihood)
            logger.info(
                "laplace_tf: the model output is the %s of %r; using its input (logits).",
                found.activation, found.operation.name,
            )
        self.stripped: ProbabilityOutput | None = found
        self.output_activation = found.activation if found else None
        self.output_op: str | None = None

    def with_subset(self, subset: WeightSubset) -> LogitModel:
        """The same model calls (same stripping) over another weight subset."""
        twin = copy.copy(self)
        twin.subset = subset
        return twin

    def __call__(
        self,
        x,
        weights: Sequence[tf.Tensor] | None = None,
        *,
        layers: Sequence[keras.layers.Layer] = (),
        hook: PreactivationHook | None = None,
    ) -> tf.Tensor:
        """Logits of ``x`` with the subset's weights set to ``weights`` (None: current).

        ``layers``/``hook``: see :func:`_patched_calls`; used to read layer inputs and to add
        probes to pre-activations. The model itself is never modified. A traced call records
        in ``output_op`` the type of the TF op that computes the output (e.g. ``"Softmax"``
        for ``tf.nn.softmax`` in a subclassed ``call()``), for
        :func:`~laplace_tf.outputs.check_output_op`.
        """
        trainable = self.subset.all_trainable_values(weights)
        non_trainable = [v.value for v in self.model.non_trainable_variables]
        with _patched_calls(layers, hook, self.stripped), _in_variable_dtype(self.model):
            kwargs = {"training": False} if self.model._call_has_training_arg else {}
            outputs, _ = self.model.stateless_call(trainable, non_trainable, x, **kwargs)
        if isinstance(outputs, (list, tuple, dict)):
            raise ValueError(
                "model: laplace_tf needs a model with one output tensor; got "
                f"{type(outputs).__name__}. Wrap the model so that it returns one tensor."
            )
        if not tf.executing_eagerly():
            self.output_op = final_op_type(outputs)
        if outputs.dtype.is_floating and outputs.dtype != self.subset.dtype:
            # a weightless last layer of another dtype (a float32 Dropout in a float64 model)
            outputs = tf.cast(outputs, self.subset.dtype)
        return outputs


def _check_link(found: ProbabilityOutput, likelihood: Likelihood | None) -> None:
    """Refuse a final sigmoid for ``"classification"`` and a final softmax for ``"binary"``:
    a final activation other than the likelihood's ``output_activation``."""
    expected = None if likelihood is None else likelihood.output_activation
    if expected is None or found.activation == expected:
        return
    assert likelihood is not None  # it gave `expected`
    raise ValueError(
        f"model: its output is the {found.activation} of {found.operation.name!r}, but "
        f"likelihood={likelihood.name!r} applies {expected} to logits, which would give other "
        f"probabilities than the model's. Use likelihood="
        f"{'binary' if expected == 'softmax' else 'classification'!r} for a {found.activation} "
        f"output, or end the model with {expected} (or with no activation)."
    )
