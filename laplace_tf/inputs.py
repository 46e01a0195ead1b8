"""Inputs against the model: one clear ValueError for inputs that do not fit it.

Keras' own errors for bad inputs are raw (an ``input_spec`` message, a
"non-rectangular Python sequence", a ``GatherV2`` failure). :class:`InputCheck` reads what a
model records about its inputs (Functional and Sequential models built with ``keras.Input``)
and checks data against it, for the fit and the predictive alike:

* :meth:`InputCheck.data`, before batching: a list given to a model of named (dict) inputs,
  missing names, a dataset of single examples (not batched), a wrong per-example shape;
* :meth:`InputCheck.batch`, per batch: the shape of the first batch (a 1-D array where a
  batch was expected, a wrong feature dimension), and token ids outside ``[0, input_dim)`` of
  an ``Embedding`` layer that reads a model input directly (every batch);
* :meth:`InputCheck.call` / :meth:`InputCheck.explain`, the first batch: a failure is
  explained by running the plain model on the batch (for a subclassed model, which records
  nothing, and an Embedding deeper in the model).

Example:
    >>> import keras, numpy as np
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)])
    >>> InputCheck(model).batch(np.zeros((32, 5)), index=0)
    Traceback (most recent call last):
    ...
    ValueError: x: inputs of shape (32, 5) do not fit the model, which expects inputs of shape (None, 8) (None: any size). Give inputs [N, ...] with the model's per-example shape.
"""

from __future__ import annotations

import re

import keras
import numpy as np
import tensorflow as tf

MODEL_ERRORS = (ValueError, TypeError, KeyError, tf.errors.InvalidArgumentError)
"""What a Keras model raises for inputs that do not fit it."""

_TOKEN_ERROR = re.compile(r"indices\[[\d,]*\] = (-?\d+) is not in \[0, (\d+)\)")


_GROUPED_CONVOLUTION_ERRORS = (
    "Gradients for grouped convolutions are not supported on CPU",
    # the same refusal met first in the filter's gradient under vectorized_map: which of the
    # two ops TensorFlow runs first varies from run to run
    "filter_size does not have enough elements",
)


def explain_grouped_convolution(model: keras.Model, err: Exception) -> None:
    """Raise a clear ValueError when ``err`` is TensorFlow's refusal to differentiate a grouped
    convolution with respect to its inputs on CPU (in float64; float32 has a oneDNN kernel),
    naming the model's grouped convolutions. Returns for any other error."""
    if not any(message in str(err) for message in _GROUPED_CONVOLUTION_ERRORS):
        return
    names = [layer.name for layer in model._flatten_layers(include_self=False, recursive=True)
             if getattr(layer, "groups", 1) > 1]
    if not names:
        return
    raise ValueError(
        f"model: TensorFlow cannot differentiate the grouped convolution(s) {names} on CPU in "
        "float64 as the per-example rows need (with respect to their inputs, which weights "
        "before them need, or to their filters under vectorisation). Compute in float32, fit "
        "on a GPU, use hessian_structure='diag' or 'full' (whose rows are taken one example "
        "at a time), 'kron' with the grouped convolution first (its Kronecker rule needs "
        "neither gradient), or subset_of_weights='last_layer'."
    ) from err


def is_input_list(x) -> bool:
    """Whether ``x`` is a list or tuple of arrays (or of a dataset's ``TensorSpec``s), one per
    input of a model with several positional inputs (as Keras' ``model.fit([xa, xb], y)``); a
    list of numbers or of lists is one array."""
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(
        isinstance(part, (np.ndarray, tf.Tensor, tf.Variable, tf.TensorSpec)) for part in x)


class InputCheck:
    """What ``model`` expects as inputs, and checks of data against it.

    Args:
        model: a Keras model. Functional and Sequential models built with ``keras.Input``
            record their input shapes (and names, for dict inputs); a subclassed model records
            none, and only :meth:`call` can explain its failures.
    """

    def __init__(self, model: keras.Model):
        self.model = model
        self.expected = _expected_shapes(model)
        self.embeddings = _input_embeddings(model)

    def data(self, x, dataset: bool = False) -> None:
        """Check inputs before batching: ``x`` (arrays, a dict or a list of them), or a
        dataset's ``element_spec`` for x (``dataset=True``; its shapes include the batch)."""
        if isinstance(self.expected, dict):
            self._check_names(x, sorted(self.expected))
        if dataset:
            self._check_shapes(x, dataset=True)

    def batch(self, x, index: int) -> None:
        """Check one batch ``x``: its shapes (first batch) and its token ids (every batch)."""
        if index == 0:
            self._check_shapes(x, dataset=False)
        for key, layer in self.embeddings:
            ids = x if key is None else x[key]
            low, high = float(tf.reduce_min(ids)), float(tf.reduce_max(ids))
            if low < 0 or high >= layer.input_dim:
                raise ValueError(
                    f"x: token ids must lie in [0, input_dim) = [0, {layer.input_dim}) of "
                    f"Embedding layer {layer.name!r}; batch {index} has ids from {low:g} to "
                    f"{high:g}. Map unknown tokens to an id below {layer.input_dim} (an "
                    "out-of-vocabulary id), or use a model with a larger input_dim."
                )

    def call(self, fn, x):
        """``fn(x)``; when it fails, a clear ValueError if ``x`` does not fit the model."""
        try:
            return fn(x)
        except MODEL_ERRORS as err:
            self.explain(x, err)
            raise

    def explain(self, x, err: Exception) -> None:
        """Raise a clear ValueError when ``err``, raised by a computation on the batch ``x``,
        is about the inputs: the plain model refuses ``x`` too (token ids out of range, or a
        shape it does not take). Returns when the inputs are not the cause."""
        try:
            self.model(x, training=False)
        except MODEL_ERRORS as failure:
            match = _TOKEN_ERROR.search(str(failure))
            if match:
                token, size = int(match.group(1)), int(match.group(2))
                names = [layer.name for layer in _embedding_layers(self.model)
                         if layer.input_dim == size]
                raise ValueError(
                    f"x: token ids must lie in [0, input_dim) = [0, {size}) of Embedding layer "
                    f"{names[0] if names else '?'!r}; got id {token}. Map unknown tokens to an "
                    f"id below {size} (an out-of-vocabulary id), or use a model with a larger "
                    "input_dim."
                ) from err
            wanted = "the shape it was built with" if self.expected is None else \
                str(self.expected)
            raise ValueError(
                f"x: inputs of shape {_shapes(x)} do not fit the model, which expects inputs "
                f"of shape {wanted} (None: any size). Give inputs [N, ...] with the model's "
                f"per-example shape (a dataset: call .batch(n) on it). The model said: {failure}"
            ) from err

    def _check_names(self, x, names: list[str]) -> None:
        if isinstance(x, (list, tuple)):
            raise ValueError(
                f"x: the model takes a dict of named inputs {names}; got a {type(x).__name__} "
                f"of {len(x)} inputs. Give {{{', '.join(f'{n!r}: ...' for n in names)}}}: a "
                f"{type(x).__name__} is ambiguous (Keras would match it to the inputs in sorted "
                "name order, not the order the model was built in)."
            )
        if isinstance(x, dict) and set(names) - set(x):
            raise ValueError(
                f"x: the model takes a dict of named inputs {names}; got keys {sorted(x)}, "
                f"missing {sorted(set(names) - set(x))}."
            )

    def _check_shapes(self, x, dataset: bool) -> None:
        if self.expected is None:
            return
        arrays = is_input_list(x)
        if isinstance(self.expected, dict):
            if not isinstance(x, dict):
                return
            pairs = [(f"x[{k!r}]", shape, _shape(x[k])) for k, shape in self.expected.items()]
        elif isinstance(self.expected, list):  # several positional inputs
            if isinstance(x, dict):  # matched to the inputs by name, as Keras does
                return
            if not arrays or len(x) != len(self.expected):
                given = f"a {type(x).__name__} of {len(x)} arrays" if arrays else \
                    f"inputs of shape {_shapes(x)}"
                raise ValueError(
                    f"x: the model takes a list of {len(self.expected)} inputs of shapes "
                    f"{self.expected}; got {given}. Give one array per input, in the model's "
                    "order (a dataset yields ((xa, xb, ...), y) batches, or ((xa, xb, ...),) "
                    "to predict: a bare tuple is read as (x, y))."
                )
            pairs = [(f"x[{i}]", shape, _shape(part))
                     for i, (shape, part) in enumerate(zip(self.expected, x, strict=True))]
        elif arrays and len(x) > 1:
            raise ValueError(
                f"x: the model takes one input of shape {self.expected}; got a "
                f"{type(x).__name__} of {len(x)} arrays of shapes {_shapes(x)}. Give the inputs "
                "alone (a pair (x, y) is for fitting; predictions take x)."
            )
        elif isinstance(x, (dict, list, tuple)):
            return
        else:
            pairs = [("x", self.expected, _shape(x))]
        for name, expected, got in pairs:
            if _fits(expected, got):
                continue
            one_example = _same(expected[1:], got)
            if dataset and one_example:
                raise ValueError(
                    f"data: the dataset yields single examples ({name} of shape {got}); the "
                    f"model takes batches of shape {expected}. Call .batch(n) on the dataset."
                )
            if len(got) == len(expected) - 1:
                hint = "for one example use x[None]" if one_example else \
                    "add the missing dimension"
                raise ValueError(
                    f"{name}: expected inputs [N, {', '.join(map(str, expected[1:]))}] (a batch "
                    f"of N examples); got a {len(got)}-D array of shape {got}; {hint}."
                )
            raise ValueError(
                f"{name}: inputs of shape {got} do not fit the model, which expects inputs of "
                f"shape {expected} (None: any size). Give inputs [N, ...] with the model's "
                "per-example shape."
            )


def _expected_shapes(model) -> tuple | list | dict | None:
    """The model's input shape, a list of them for several positional inputs, or ``{name:
    shape}`` for dict inputs; None when unrecorded (a subclassed model)."""
    inputs = getattr(model, "inputs", None)
    if not inputs:
        return None
    struct = getattr(model, "_inputs_struct", None)
    if isinstance(struct, dict) and all(hasattr(t, "shape") for t in struct.values()):
        return {name: tuple(t.shape) for name, t in struct.items()}
    if isinstance(struct, (list, tuple)) and len(struct) == len(inputs) > 1:
        return [tuple(t.shape) for t in inputs]
    return tuple(inputs[0].shape) if len(inputs) == 1 else None


def _embedding_layers(model) -> list:
    return [layer for layer in model._flatten_layers(include_self=False, recursive=True)
            if isinstance(layer, keras.layers.Embedding)]


def _input_embeddings(model) -> list[tuple[str | None, keras.layers.Embedding]]:
    """``(input key, layer)`` for Embedding layers that read a model input directly (key None
    for a single input)."""
    inputs = getattr(model, "inputs", None)
    if not inputs:
        return []
    struct = getattr(model, "_inputs_struct", None)
    keys = {id(t): name for name, t in struct.items()} if isinstance(struct, dict) else \
        {id(inputs[0]): None} if len(inputs) == 1 else {}
    found = []
    for layer in _embedding_layers(model):
        try:
            source = layer.input
        except (AttributeError, ValueError):
            continue  # shared or never called within the model
        if id(source) in keys:
            found.append((keys[id(source)], layer))
    return found


def _shape(t) -> tuple:
    return tuple(t.shape) if hasattr(t, "shape") else tuple(np.shape(t))


def _shapes(x):
    return tf.nest.map_structure(_shape, x)


def _same(expected: tuple, got: tuple) -> bool:
    """Same rank, and every size known in both equal."""
    return len(got) == len(expected) and all(
        e is None or g is None or e == g for e, g in zip(expected, got, strict=True)
    )


def _fits(expected: tuple, got: tuple) -> bool:
    """A batch ``got`` fits ``expected``: same sizes after the batch dimension, up to a last
    dimension of 1 that Keras adds or drops (``[N]`` fits ``(None, 1)``)."""
    if len(got) == len(expected) + 1 and got[-1] == 1:
        got = got[:-1]
    elif len(got) == len(expected) - 1 and expected[-1] == 1:
        expected = expected[:-1]
    return len(got) == len(expected) and _same(expected[1:], got[1:])
