"""Second derivatives of any TensorFlow function: ``hessian``, ``hvp`` and ``jacobian``.

All three take a callable ``f`` and a point ``x``. ``x`` is one Tensor or ``tf.Variable``
of any shape (scalar, vector, matrix, ...) or a list of them, and ``f`` is called once,
with exactly what was given:

* one tensor: ``f(x)``;
* a list (or tuple): ``f(xs)`` with a list of the same objects, in the same order.

Because ``f`` receives the very objects that the tapes watch, a function that ignores its
argument and closes over the Variables (``lambda _: loss(model.trainable_variables)``)
works as well. NumPy arrays and Python numbers are converted to Tensors first, and ``f``
receives the converted Tensors; a Keras 3 variable (as in ``model.trainable_variables``) is
replaced by the ``tf.Variable`` it wraps, which the model reads. Shapes must be static (fully
known); the dtype must be floating (float32 or float64, all inputs alike), and results come
back in that dtype.

Shapes of the results follow the inputs:

* ``hessian``: ``x.shape + x.shape``; for a list, the nested list of blocks ``H[i][j]`` of
  shape ``x[i].shape + x[j].shape``; with ``flat=True`` one ``(P, P)`` matrix over the
  vector ``concat([ravel(x[0]), ravel(x[1]), ...])`` (row-major ravel, list order).
* ``hvp``: the structure and shapes of ``x``.
* ``jacobian``: ``f(x).shape + x.shape``; for a list, one such tensor per input.

The Hessian is built by reverse-over-reverse differentiation: an inner ``GradientTape``
gives the gradient ``g`` of ``f``, an outer tape the Jacobian of ``g``, vectorised over its
rows with ``pfor``. Where ``pfor`` cannot vectorise the computation a sequential loop is
used instead, with a warning. Everything works eagerly and inside ``tf.function``;
wrapping the call in ``tf.function`` is much faster for repeated use.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeAlias

import keras
import numpy as np
import tensorflow as tf

__all__ = ["hessian", "hvp", "jacobian"]

TensorLike: TypeAlias = tf.Tensor | tf.Variable | np.ndarray | float
Inputs: TypeAlias = TensorLike | Sequence[TensorLike]
Blocks: TypeAlias = tf.Tensor | list[tf.Tensor] | list[list[tf.Tensor]]

_UNCONNECTED = ("zero", "raise")
_ZERO = tf.UnconnectedGradients.ZERO
_NONE = tf.UnconnectedGradients.NONE


class _Args:
    """The user's ``x`` (or ``v``) seen as a list of tensors.

    One tensor and a list of tensors share one code path: everything inside works on
    ``self.tensors`` and ``pack`` restores the user's structure at the end.
    """

    def __init__(self, x: Inputs, name: str, dtype: tf.DType | None = None):
        items = list(x) if isinstance(x, list | tuple) else [x]
        self.is_list = isinstance(x, list | tuple)
        if not items:
            raise ValueError(
                f"`{name}` is an empty list; pass a Tensor or Variable, or a non-empty list of them."
            )
        self.labels = [f"{name}[{i}]" for i in range(len(items))] if self.is_list else [name]
        self.tensors = [
            _as_tensor(item, label, dtype) for item, label in zip(items, self.labels, strict=True)
        ]
        self.dtype = self.tensors[0].dtype
        for tensor, label in zip(self.tensors, self.labels, strict=True):
            if tensor.dtype != self.dtype:
                raise TypeError(
                    f"`{label}` has dtype {tensor.dtype.name} but `{self.labels[0]}` has "
                    f"{self.dtype.name}; all inputs must share one dtype. Cast them to float32 "
                    "or float64 alike."
                )
        self.shapes = [t.shape for t in self.tensors]
        self.sizes = [s.num_elements() for s in self.shapes]
        self.size = sum(self.sizes)
        if self.size == 0:
            raise ValueError(f"`{name}` has no entries ({self.structure}); pass at least one.")

    @property
    def arg(self) -> tf.Tensor | tf.Variable | list[tf.Tensor | tf.Variable]:
        """What ``f`` is called with: the tensor itself, or a list of the tensors."""
        return list(self.tensors) if self.is_list else self.tensors[0]

    @property
    def structure(self) -> str:
        """Human-readable structure and shapes, for error messages."""
        shapes = [tuple(s.as_list()) for s in self.shapes]
        return f"a list of shapes {shapes}" if self.is_list else f"shape {shapes[0]}"

    def pack(self, items: list[Any]) -> Any:
        """Undo the listing: ``items[0]`` for a single input, the list for a list."""
        return list(items) if self.is_list else items[0]

    def flatten(self, parts: list[tf.Tensor], leading: int | None = None) -> tf.Tensor:
        """Ravel per-input ``parts`` into one vector, or rows ``(leading, P)``.

        ``parts[i]`` has shape ``shapes[i]`` (or ``(leading,) + shapes[i]``).
        """
        head = [] if leading is None else [leading]
        return tf.concat(
            [tf.reshape(p, head + [size]) for p, size in zip(parts, self.sizes, strict=True)], -1
        )

    def unflatten(self, matrix: tf.Tensor) -> Blocks:
        """Cut a ``(P, P)`` matrix into blocks of shape ``shapes[i] + shapes[j]``."""
        rows = tf.split(matrix, self.sizes, axis=0)
        blocks = [
            [
                tf.reshape(b, si + sj)
                for b, sj in zip(tf.split(row, self.sizes, axis=1), self.shapes, strict=True)
            ]
            for row, si in zip(rows, self.shapes, strict=True)
        ]
        return self.pack([self.pack(row) for row in blocks])

    def connected(self, grads: list[tf.Tensor | None], unconnected: str) -> list[tf.Tensor]:
        """Gradients with ``None`` (input not used by ``f``) made zeros, or raise."""
        missing = [label for g, label in zip(grads, self.labels, strict=True) if g is None]
        if missing and unconnected == "raise":
            indices = ", ".join(f"`{label}`" for label in missing)
            raise ValueError(
                f"`f` does not depend on {indices} (unconnected='raise'). Check that `f` uses "
                "its argument (or the Variables you passed), or pass unconnected='zero' to get "
                "zeros for these inputs."
            )
        return [
            tf.zeros(shape, self.dtype) if g is None else tf.convert_to_tensor(g)
            for g, shape in zip(grads, self.shapes, strict=True)
        ]


def _as_tensor(item: TensorLike, label: str, dtype: tf.DType | None) -> tf.Tensor | tf.Variable:
    """Keep Tensors and Variables as they are (``f`` closes over them); convert the rest. A
    Keras 3 variable (``model.trainable_variables``) is not a ``tf.Variable``: the one it
    wraps, which the model reads, is watched (converting it would watch a copy, and give 0)."""
    if isinstance(item, keras.Variable):
        item = item.value
    if isinstance(item, tf.RaggedTensor | tf.SparseTensor):
        raise TypeError(
            f"`{label}` is a {type(item).__name__}; derivatives need a dense Tensor (convert "
            f"it first, e.g. {label}.to_tensor() or tf.sparse.to_dense({label})).")
    if isinstance(item, list | tuple | dict):
        raise TypeError(
            f"`{label}` is a {type(item).__name__}; `x` is one Tensor or Variable, or a flat "
            "list of them. Flatten nested structures first (tf.nest.flatten)."
        )
    tensor = item if isinstance(item, tf.Variable) else tf.convert_to_tensor(item, dtype_hint=dtype)
    if not tensor.dtype.is_floating:
        raise TypeError(
            f"`{label}` has dtype {tensor.dtype.name}, but derivatives need a floating dtype; "
            f"cast it first, e.g. tf.cast({label}, tf.float64) (or tf.float32)."
        )
    if dtype is not None and tensor.dtype != dtype:
        raise TypeError(
            f"`{label}` has dtype {tensor.dtype.name} but `x` has {dtype.name}; cast `{label}` "
            f"to {dtype.name}."
        )
    if not tensor.shape.is_fully_defined():
        raise ValueError(
            f"`{label}` has shape {tensor.shape} with unknown dimensions; a static shape is "
            "needed. Inside tf.function, give an input_signature with full shapes."
        )
    return tensor


def _check_callable(f: Any) -> None:
    if not callable(f):
        raise TypeError(
            f"`f` must be callable (a function of x returning a Tensor), got "
            f"{type(f).__name__}; pass e.g. `lambda x: tf.reduce_sum(x**2)`."
        )


def _check_unconnected(unconnected: str) -> None:
    if unconnected not in _UNCONNECTED:
        raise ValueError(
            f"`unconnected` must be one of {', '.join(map(repr, _UNCONNECTED))}; "
            f"got {unconnected!r}."
        )


def _call(f: Callable[..., tf.Tensor], args: _Args, scalar: bool) -> tf.Tensor:
    """Call ``f`` on the watched inputs and check that its output can be differentiated."""
    y = f(args.arg)
    if isinstance(y, keras.Variable):  # its dtype is a string; the tf.Variable it wraps is not
        y = y.value
    if not tf.is_tensor(y):
        raise TypeError(
            f"`f` must return a tf.Tensor, got {type(y).__name__}; build its output from "
            "TensorFlow ops on its argument so that it can be differentiated."
        )
    if not y.dtype.is_floating:
        raise TypeError(f"`f` must return a floating Tensor, got dtype {y.dtype.name}.")
    if scalar and y.shape.rank != 0:
        raise ValueError(
            f"`f` must return a scalar (shape ()), got shape {y.shape}; reduce it first, "
            "e.g. with tf.reduce_sum."
        )
    return y


def _jacobians(
    tape: tf.GradientTape, targets: list[tf.Tensor], sources: list[tf.Tensor]
) -> list[list[tf.Tensor]]:
    """``tape.jacobian`` of each target: vectorised by pfor, else by a sequential loop."""

    def run(use_pfor: bool) -> list[list[tf.Tensor]]:
        return [
            tape.jacobian(t, sources, unconnected_gradients=_ZERO, experimental_use_pfor=use_pfor)
            for t in targets
        ]

    try:
        with quiet_pfor_errors():
            return run(use_pfor=True)
    except (ValueError, NotImplementedError) as err:
        warnings.warn(
            f"laplace_tf.autodiff: could not vectorise the Jacobian with pfor "
            f"({first_line(err)}); falling back to a sequential loop, which is correct but "
            "slower.",
            RuntimeWarning,
            stacklevel=3,
        )
        return run(use_pfor=False)


@contextlib.contextmanager
def quiet_pfor_errors() -> Iterator[None]:
    """Silence the ``tensorflow`` logger below CRITICAL: a pfor conversion that fails logs
    whole graph definitions (thousands of lines) at ERROR before raising. The exception
    itself still propagates, for the caller to handle.

    Example:
        >>> with quiet_pfor_errors():
        ...     tf.get_logger().error("a graph dump")      # not shown
    """
    tf_logger = tf.get_logger()
    level = tf_logger.level
    tf_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        tf_logger.setLevel(level)


def first_line(error: BaseException, limit: int = 300) -> str:
    """The gist of an error message in one line of at most ``limit`` characters: its first
    non-empty line, or for an error re-raised by autograph (``in user code:``, frames, then
    ``SomeError: message``) that last message. TF errors raised while tracing may carry whole
    graph dumps.

    Example:
        >>> first_line(ValueError("Shape mismatch" + chr(10) + "<graph dump>"))
        'Shape mismatch'
        >>> first_line(TypeError(chr(10).join(["in user code:", "File x.py", "TypeError: bad"])))
        'bad'
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if lines and lines[0] == "in user code:":
        raised = [line for line in lines if re.match(r"\w+(Error|Exception): ", line)]
        lines = [raised[-1].split(": ", 1)[1]] if raised else lines[1:]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def hessian(
    f: Callable[..., tf.Tensor],
    x: Inputs,
    *,
    unconnected: str = "zero",
    chunk_size: int | None = None,
    flat: bool = False,
) -> Blocks:
    """Dense Hessian of a scalar function by nested ``GradientTape``s.

    ``H[i, j] = d^2 f / (dx_i dx_j)``. The inner tape gives the gradient ``g`` (flattened to
    a vector of length ``P``), the outer tape its Jacobian, vectorised over rows by pfor.
    ``f`` must have true second derivatives: ``tf.nn.moments`` (Keras' LayerNormalization
    and GroupNormalization) stops the gradient through the mean, which keeps first
    derivatives exact and makes second derivatives wrong.

    Args:
        f: Function returning a scalar Tensor. Called as ``f(x)`` for one tensor, or
            ``f(xs)`` with a list of the same objects for a list (see the module docstring).
        x: Tensor or ``tf.Variable`` of any static shape, or a list of them; float dtype.
        unconnected: What to do with inputs ``f`` does not depend on: ``"zero"`` gives zero
            blocks, ``"raise"`` raises a ``ValueError`` naming the input.
        chunk_size: If given, compute the Hessian ``chunk_size`` rows at a time, which
            bounds the memory of the vectorised step to about ``chunk_size`` gradients. The
            values equal those without chunking up to rounding in the last bit (matrix
            multiplies of different row counts may sum in a different order).
        flat: Return one ``(P, P)`` matrix over the row-major ravel of the inputs, in order.

    Returns:
        ``x.shape + x.shape`` for one tensor; for a list the nested list of blocks
        ``H[i][j]`` of shape ``x[i].shape + x[j].shape``; with ``flat=True`` a ``(P, P)``
        matrix. Same dtype as ``x``.

    Raises:
        TypeError: ``f`` is not callable, or ``x`` is not floating.
        ValueError: ``f`` does not return a scalar, ``chunk_size`` is not a positive int,
            ``unconnected`` is unknown, or an input is unconnected with ``"raise"``.

    Example:
        ``f(x) = sum(x**3)`` has Hessian ``diag(6 x)``:

        >>> x = tf.constant([1.0, 2.0])
        >>> H = hessian(lambda x: tf.reduce_sum(x**3), x)
        >>> np.allclose(H, np.diag(6.0 * x.numpy()))
        True
    """
    _check_callable(f)
    _check_unconnected(unconnected)
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int | np.integer)
        or chunk_size < 1
    ):
        raise ValueError(f"`chunk_size` must be a positive int or None; got {chunk_size!r}.")
    args = _Args(x, "x")
    step = int(chunk_size) if chunk_size else args.size
    with tf.GradientTape(persistent=True) as outer:
        outer.watch(args.tensors)
        with tf.GradientTape() as inner:
            inner.watch(args.tensors)
            y = _call(f, args, scalar=True)
        grads = args.connected(
            inner.gradient(y, args.tensors, unconnected_gradients=_NONE), unconnected
        )
        g = args.flatten(grads)
        chunks = [g[start : start + step] for start in range(0, args.size, step)]
    rows = _jacobians(outer, chunks, args.tensors)
    matrix = tf.concat(
        [args.flatten(r, leading=c.shape[0]) for r, c in zip(rows, chunks, strict=True)], 0
    )
    return matrix if flat else args.unflatten(matrix)


def hvp(f: Callable[..., tf.Tensor], x: Inputs, v: Inputs) -> tf.Tensor | list[tf.Tensor]:
    """Hessian-vector product ``H v`` by forward-over-reverse, without forming ``H``.

    A ``tf.autodiff.ForwardAccumulator`` pushes the tangent ``v`` through the gradient
    computed by a ``GradientTape``: the cost is a small multiple of one gradient.

    Args:
        f: Function returning a scalar Tensor, called as in :func:`hessian`.
        x: Tensor or ``tf.Variable`` of any static shape, or a list of them; float dtype.
        v: The vector, with the same structure, shapes and dtype as ``x``.

    Returns:
        ``H v`` in the structure of ``x``: ``sum_j H[i][j] . v[j]`` for input ``i``,
        contracting over all axes of ``v[j]``. Inputs ``f`` does not use give zeros.

    Raises:
        TypeError: ``f`` is not callable, or ``x`` / ``v`` are not floating.
        ValueError: ``f`` does not return a scalar, or ``v`` differs from ``x`` in
            structure or shape.

    Example:
        For ``f(x) = x^T A x / 2`` with symmetric ``A``, ``H v = A v``:

        >>> A = tf.constant([[2.0, 1.0], [1.0, 3.0]])
        >>> f = lambda x: 0.5 * tf.tensordot(x, tf.linalg.matvec(A, x), 1)
        >>> Hv = hvp(f, tf.constant([0.3, -0.2]), tf.constant([1.0, 2.0]))
        >>> np.allclose(Hv, [4.0, 7.0])
        True
    """
    _check_callable(f)
    args = _Args(x, "x")
    tangents = _Args(v, "v", dtype=args.dtype)
    if tangents.is_list != args.is_list or tangents.shapes != args.shapes:
        raise ValueError(
            f"`v` must have the structure and shapes of `x`: `x` has {args.structure}, "
            f"`v` has {tangents.structure}."
        )
    with tf.autodiff.ForwardAccumulator(args.tensors, tangents.tensors) as accumulator:
        with tf.GradientTape() as tape:
            tape.watch(args.tensors)
            y = _call(f, args, scalar=True)
        grads = args.connected(tape.gradient(y, args.tensors, unconnected_gradients=_NONE), "zero")
    # dense: the tangent of a gradient read through tf.gather comes back as IndexedSlices
    return args.pack([tf.convert_to_tensor(t) for t in
                      accumulator.jvp(grads, unconnected_gradients=_ZERO)])


def jacobian(
    f: Callable[..., tf.Tensor], x: Inputs, *, unconnected: str = "zero"
) -> tf.Tensor | list[tf.Tensor]:
    """Jacobian of a tensor-valued function, vectorised by pfor (loop fallback).

    Args:
        f: Function returning a Tensor of any static shape, called as in :func:`hessian`.
        x: Tensor or ``tf.Variable`` of any static shape, or a list of them; float dtype.
        unconnected: ``"zero"`` gives zeros for inputs ``f`` does not depend on,
            ``"raise"`` raises a ``ValueError`` naming them.

    Returns:
        ``J[a..., b...] = d f(x)[a...] / d x[b...]`` of shape ``f(x).shape + x.shape``; for a
        list, a list with one such tensor per input. Same dtype as ``x``.

    Raises:
        TypeError: ``f`` is not callable, or ``x`` is not floating.
        ValueError: ``unconnected`` is unknown, or an input is unconnected with ``"raise"``.

    Example:
        ``f(x) = W x`` has Jacobian ``W``:

        >>> W = tf.constant([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
        >>> J = jacobian(lambda x: tf.linalg.matvec(W, x), tf.constant([1.0, -1.0]))
        >>> np.allclose(J, W)
        True
    """
    _check_callable(f)
    _check_unconnected(unconnected)
    args = _Args(x, "x")
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(args.tensors)
        y = _call(f, args, scalar=False)
    if unconnected == "raise":
        args.connected(tape.gradient(y, args.tensors, unconnected_gradients=_NONE), unconnected)
    (jac,) = _jacobians(tape, [y], args.tensors)
    return args.pack(jac)
