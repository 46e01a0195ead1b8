"""Serving the Laplace predictive: a TensorFlow SavedModel, or a Keras model.

``la.export(path)`` writes a SavedModel whose ``serving_default`` signature takes the model's
input ``inputs [N, ...]`` (any ``N``; a model with several inputs takes them by name) and
returns the predictive as named outputs:

* classification / binary: ``probs [N, C]``; regression (and heteroscedastic): ``mean [N, K]``
  and ``variance [N, K]`` (observation noise included), as ``la(x)``;
* always ``functional_variance``: the variance of each model output (logit) under the
  posterior, without noise, ``[N, K]`` (all ``2K`` outputs for heteroscedastic): the diagonal
  of ``la.functional_variance(x)``, or for ``pred_type="nn"`` the variance of the sampled
  outputs.

It loads and runs with TensorFlow alone (``tf.saved_model.load(path).signatures[
"serving_default"](inputs=x)``, TF Serving's conventions): the graph is the library's own
predictive code traced once for a batch of unknown size, and what it needs is baked in as
variables: the MAP weights, the model's weights, and for ``pred_type="glm"`` the posterior's
covariance blocks in the form the predictive uses (a last-layer Kronecker posterior keeps its
eigenbases, so ``phi^T Sigma phi`` is the closed form of the features), for
``pred_type="nn"`` a fixed set of ``n_samples`` weight samples ``[S, P]``. Inputs are cast to
the model's dtype inside; outputs come in ``dtype`` (float32 by default).

Served: ``pred_type="glm"`` with ``link_approx="probit"`` or ``"bridge"`` (those the likelihood
accepts) for every structure, and ``pred_type="nn"``. Refused: ``link_approx="mc"``, whose
random logits would depend on the other inputs of a request, and a SavedModel estimated
above ``max_bytes`` (the baked arrays; logged before anything is made or written).

Example:
    >>> import keras, numpy as np, tempfile, tensorflow as tf
    >>> from laplace_tf import Laplace
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])
    >>> x, y = np.random.default_rng(0).normal(size=(20, 2)), np.arange(20) % 3
    >>> la = Laplace(model, "classification", subset_of_weights="last_layer",
    ...              hessian_structure="kron", progress=False)
    >>> la.fit((x, y))
    >>> path = tempfile.mkdtemp()
    >>> info = la.export(path)
    >>> info.outputs
    ('probs', 'functional_variance')
    >>> serve = tf.saved_model.load(path).signatures["serving_default"]
    >>> probs = serve(inputs=tf.constant(x[:4], tf.float32))["probs"]
    >>> bool(np.allclose(probs, la(x[:4]), atol=1e-6))
    True
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from laplace_tf.arguments import choice, positive_int
from laplace_tf.predictive.jacobians import FunctionalVariance
from laplace_tf.predictive.links import PRED_TYPES, needs_full_covariance

logger = logging.getLogger("laplace_tf")

DEFAULT_MAX_BYTES = 2**31
"""The largest SavedModel :func:`export` writes unless given a larger ``max_bytes``."""
INPUT_NAME = "inputs"
SERVED_LINKS = ("probit", "bridge")
DTYPES = ("float32", "float64")


class ExportInfo(NamedTuple):
    """What :func:`export` wrote: the folder, its estimated size and the output names."""

    path: str
    estimated_bytes: int
    outputs: tuple[str, ...]


class _Predictive(tf.Module):
    """The served predictive: ``serve(inputs) -> {name: tensor}``, a ``tf.function`` over a
    batch of unknown size, with everything it reads held as (tracked) variables. Its size is
    logged, and checked against ``max_bytes``, before any of them is made."""

    def __init__(self, la, pred_type: str, link_approx: str, n_samples: int, seed,
                 dtype: str, input_shape, max_bytes: int | None):
        super().__init__(name="laplace_predictive")
        choice(pred_type, "pred_type", PRED_TYPES)
        choice(dtype, "dtype", DTYPES)
        la.likelihood.check_link(link_approx)
        if pred_type == "glm" and link_approx not in SERVED_LINKS:
            raise ValueError(
                f"link_approx: {link_approx!r} draws random logits for each batch, so a served "
                f"prediction would depend on the other inputs of a request; export serves "
                f"{SERVED_LINKS} (those likelihood={la.likelihood.name!r} accepts: "
                f"{tuple(k for k in la.likelihood.links if k in SERVED_LINKS)}), or "
                "pred_type='nn' (a fixed set of weight samples)."
            )
        spec = _input_spec(la.model, dtype, input_shape)
        shapes = [t.shape.as_list()[1:] for t in tf.nest.flatten(spec)]
        if pred_type == "glm" and la.subset_of_weights != "last_layer" and \
                any(None in shape for shape in shapes):
            raise ValueError(
                f"input_shape: the served inputs have a free size ({shapes}); the GLM "
                "predictive over these weights lays out each layer's Jacobian by the size of "
                "its input. Pass input_shape= with fixed sizes (e.g. (64,) for sequences of "
                "64), or export pred_type='nn', or a last-layer posterior.")
        self._la, self._output_dtype, self._input_shape = la, tf.as_dtype(dtype), input_shape
        self.pred_type, self.link_approx = pred_type, link_approx
        noise = la.likelihood.noise_variance(la.subset.dtype)
        arrays = [la.mean, noise, *(v.value for v in la.model.variables)]
        if pred_type == "nn":
            n_samples = positive_int(n_samples, "n_samples")
            what = f"pred_type='nn', {n_samples} weight samples"
            size = _bytes(arrays) + n_samples * la.n_params * la.subset.dtype.size
        else:
            blocks = la.covariance_blocks()
            self._diagonal = not needs_full_covariance(link_approx)
            self._functional = FunctionalVariance(
                la.logit_model, la.block_slices(), [type(b) for b in blocks],
                logits_layer=la.subset_of_weights == "last_layer")
            blocks = self._functional.prepare(blocks, self._diagonal)
            what = f"pred_type='glm', link_approx={link_approx!r}"
            size = _bytes(arrays + tf.nest.flatten(blocks))
        self.estimated_bytes = _checked_size(la, size, what, max_bytes)
        self.mean = tf.Variable(la.mean, trainable=False, name="map_weights")
        self.noise = tf.Variable(noise, trainable=False, name="noise_variance")
        self.model_weights = [v.value for v in la.model.variables]  # tracked: the graph reads them
        if pred_type == "nn":
            self.samples = tf.Variable(la.sample(n_samples, seed=seed), trainable=False,
                                       name="weight_samples")
        else:
            self.blocks = [tf.nest.map_structure(_variable, block) for block in blocks]
        self.serve = tf.function(self._serve, input_signature=[spec])

    def trace(self) -> None:
        """Trace :attr:`serve`; a ValueError naming ``input_shape`` if the model cannot take
        inputs of that shape."""
        try:
            self.serve.get_concrete_function()
        except (ValueError, TypeError, tf.errors.InvalidArgumentError) as err:
            if self._input_shape is None:
                raise
            model_says = str(err).strip().splitlines()[-1]
            raise ValueError(
                f"input_shape: the model cannot take examples of shape {self._input_shape!r}; "
                f"give the shape of one example as the model takes it. The model said: "
                f"{model_says}") from None

    @property
    def outputs(self) -> tuple[str, ...]:
        names = ("mean", "variance") if self._la.likelihood.gaussian_predictive else ("probs",)
        return (*names, "functional_variance")

    def _serve(self, inputs):
        x = tf.nest.map_structure(lambda t: tf.cast(t, self._la.subset.dtype), inputs)
        likelihood = self._la.likelihood
        if self.pred_type == "nn":
            logits = self._la._sampled_logits(x, self.samples)
            variance = tf.math.reduce_variance(logits, axis=0)
            predictive = likelihood.sampled_predictive(logits, self.noise)
        else:
            logits, covariance = self._functional(x, self.mean, self.blocks,
                                                  diagonal=self._diagonal)
            variance = covariance if self._diagonal else tf.linalg.diag_part(covariance)
            predictive = self._la._glm_outputs(logits, covariance, self.noise, None,
                                               mode="predict", link=self.link_approx,
                                               n_samples=1)
        values = (*(predictive if isinstance(predictive, tuple) else (predictive,)), variance)
        return {name: tf.cast(value, self._output_dtype)
                for name, value in zip(self.outputs, values, strict=True)}


def _bytes(arrays) -> int:
    return int(sum(int(np.prod(t.shape)) * t.dtype.size for t in arrays
                   if isinstance(t, (tf.Tensor, tf.Variable))))


def _checked_size(la, size: int, what: str, max_bytes: int | None) -> int:
    """Log the size of the baked arrays; refuse it above ``max_bytes`` (None: no limit)."""
    logger.info("laplace_tf: the served predictive (%s, %s, %s) holds estimated_bytes=%d "
                "(%.1f MB).", la.subset_of_weights, la.hessian_structure, what, size, size / 1e6)
    if max_bytes is not None and size > positive_int(max_bytes, "max_bytes"):
        raise ValueError(
            f"max_bytes: the served predictive ({la.subset_of_weights!r}, "
            f"{la.hessian_structure!r}, {what}) needs about {size:,} bytes, over max_bytes="
            f"{max_bytes:,}. Pass a larger max_bytes, or serve less: "
            "subset_of_weights='last_layer', hessian_structure='kron' or 'diag', or fewer "
            "n_samples with pred_type='nn'."
        )
    return size


def _variable(value):
    return tf.Variable(value, trainable=False) if isinstance(value, tf.Tensor) else value


def _input_spec(model: keras.Model, dtype: str, input_shape):
    """The signature's input: ``[None, *example shape]`` in ``dtype`` (integer model inputs,
    such as token ids, keep their dtype); a dict of them, by input name, for a model with
    several inputs."""
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):  # a subclassed model records no inputs
        inputs = None
    if input_shape is not None:
        if inputs is not None and len(inputs) > 1:
            raise ValueError(
                f"input_shape: for a model of one input; this one has {len(inputs)} inputs, "
                "whose shapes it records: leave input_shape out.")
        if not isinstance(input_shape, (tuple, list)) or not all(
                d is None or isinstance(d, (int, np.integer)) and not isinstance(d, bool)
                for d in input_shape):
            raise TypeError(f"input_shape: expected the shape of one example, a tuple of "
                            f"ints (None for a free size); got {input_shape!r}.")
        if any(d is not None and d < 1 for d in input_shape):
            raise ValueError(f"input_shape: sizes must be positive (None for a free size); "
                             f"got {input_shape!r}.")
        return tf.TensorSpec([None, *input_shape],
                             _served_dtype(inputs[0].dtype if inputs else None, dtype),
                             name=INPUT_NAME)
    if inputs is None:
        raise ValueError(
            "input_shape: the model does not record its input shape (a subclassed model); "
            "pass the shape of one example, e.g. input_shape=(28, 28, 1)."
        )

    def spec(tensor, name):
        return tf.TensorSpec([None, *tensor.shape[1:]], _served_dtype(tensor.dtype, dtype),
                             name=name)

    if len(inputs) == 1:
        return spec(inputs[0], INPUT_NAME)
    return {t.name: spec(t, t.name) for t in inputs}


def _served_dtype(model_input_dtype, dtype: str) -> tf.DType:
    """``dtype``, or the model input's integer dtype (token ids stay integers)."""
    kind = None if model_input_dtype is None else tf.as_dtype(model_input_dtype)
    return kind if kind is not None and kind.is_integer else tf.as_dtype(dtype)


def predictive_module(la, pred_type: str = "glm", link_approx: str = "probit",
                      n_samples: int = 100, seed: int | None = None, dtype: str = "float32",
                      input_shape=None, max_bytes: int | None = DEFAULT_MAX_BYTES) -> _Predictive:
    """The served predictive of a fitted ``la`` as a ``tf.Module`` (see :func:`export`)."""
    return _Predictive(la, pred_type, link_approx, n_samples, seed, dtype, input_shape,
                       max_bytes)


def export(la, path, **options) -> ExportInfo:
    """Write the predictive of ``la`` as a SavedModel in the folder ``path``.

    Args (keywords, after ``path``):
        pred_type: ``"glm"`` (default) or ``"nn"``.
        link_approx: ``"probit"`` (default) or ``"bridge"`` (``"glm"``, classification).
        n_samples, seed: the weight samples baked in for ``"nn"`` (``seed`` as in ``la(x)``:
            the same seed gives the same samples, so the same numbers as ``la(x, "nn", ...)``).
        dtype: the dtype of the served inputs and outputs, ``"float32"`` (default) or
            ``"float64"``; the computation runs in the model's dtype.
        input_shape: the shape of one example, for a model that does not record it.
        max_bytes: refuse (before writing) above this estimated size; None: no limit.

    Returns:
        :class:`ExportInfo` ``(path, estimated_bytes, outputs)``.

    Raises:
        ValueError: for ``link_approx="mc"``, a link the likelihood does not accept, a
            model that records no input shape without ``input_shape``, or a size over
            ``max_bytes`` (``la.export`` also before ``fit``), or a ``path`` that is a file.
        OSError: a folder ``path`` that cannot be made.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        raise ValueError(f"path: {path!r} is a file; a SavedModel is a folder, give its name.")
    module = predictive_module(la, **options)
    module.trace()  # before any folder is made
    os.makedirs(path, exist_ok=True)  # an OSError naming the path where it cannot be made
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    return ExportInfo(path, module.estimated_bytes, module.outputs)


class _PredictiveLayer(keras.layers.Layer):
    """A Keras layer running a :class:`_Predictive` (inference only, not trainable)."""

    def __init__(self, module: _Predictive, **kwargs):
        # no autocast: the serving signature fixes each input's dtype (Keras would cast float64
        # inputs to its float32 policy)
        super().__init__(trainable=False, autocast=False, **kwargs)
        self.module = module

    def call(self, inputs):
        return self.module.serve(inputs)

    def compute_output_spec(self, inputs):
        spec = self.module.serve.get_concrete_function().structured_outputs
        batch = keras.tree.flatten(inputs)[0].shape[0]
        return {name: keras.KerasTensor((batch, *t.shape[1:]), t.dtype.name)
                for name, t in spec.items()}

    def get_config(self):
        raise TypeError(
            "la.to_keras(): this model is not saved as .keras (it holds a traced TensorFlow "
            "graph); use la.export(path) for a SavedModel, or model.export(path)."
        )


def to_keras(la, **options) -> keras.Model:
    """The predictive of ``la`` as a Keras model: ``model(x)`` / ``model.predict(x)`` return
    the dict of :func:`export`'s outputs (same keyword options). It is inference only;
    ``model.export(path)`` writes a SavedModel of it.
    """
    module = predictive_module(la, **options)
    module.trace()
    inputs = tf.nest.map_structure(
        lambda spec: keras.Input(spec.shape[1:], dtype=spec.dtype.name, name=spec.name),
        module.serve.input_signature[0])
    return keras.Model(inputs, _PredictiveLayer(module, name="laplace_predictive")(inputs),
                       name="laplace_predictive")
