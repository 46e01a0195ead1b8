"""Save and load a fitted posterior: one ``.npz`` of numeric arrays plus JSON metadata.

The file is written with ``numpy.savez`` (no pickle) and read with
``numpy.load(allow_pickle=False)``. It holds the MAP weights, the curvature blocks (so the
posterior is rebuilt exactly, for any prior), the prior, ``sigma_noise``, the tuning trace and
a JSON string with the format version, the choices made (the constructor arguments, as
``PosteriorLaplace.SETTINGS`` describes them), the weight subset's signature (layer names, variable paths, shapes) and
a SHA-256 of the MAP weights and one of all the model's weights (the layers outside the
posterior's subset and non-trainable weights such as BatchNorm statistics too: a last-layer
posterior depends on the features below), and a SHA-256 of the whole file's contents. Loading
checks that the file is as saved, and that the model has the same signature and the same
weights, and refuses otherwise. Layer names and variable paths are recorded but may
differ (Keras numbers layers per process, e.g. ``dense`` vs ``dense_3``): the layer count,
the variable shapes and the SHA-256 of the weights must match.

Example:
    >>> import os, tempfile, keras, numpy as np, laplace_tf as ltf
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])
    >>> x, y = np.random.default_rng(0).normal(size=(20, 2)), np.arange(20) % 3
    >>> la = ltf.Laplace(model, "classification", prior_precision=2.0, progress=False)
    >>> la.fit((x, y))
    >>> path = os.path.join(tempfile.mkdtemp(), "posterior.npz")
    >>> la.save(path)
    >>> la2 = ltf.load(path, model)           # the same posterior, to the last bit
    >>> bool(np.array_equal(la2.posterior.stddev(), la.posterior.stddev()))
    True
    >>> model.layers[0].bias.assign([1.0, 0.0, 0.0])  # other weights: refused
    <...>
    >>> ltf.load(path, model)
    Traceback (most recent call last):
    ...
    ValueError: model: its weights differ from the MAP weights ...
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile

import numpy as np
import tensorflow as tf

from laplace_tf.blocks import BLOCK_TYPES as _BLOCKS  # a block's arrays are its fields
from laplace_tf.curvature.base import Curvature
from laplace_tf.params import fingerprint, leaf_layers
from laplace_tf.posterior.state import REQUIRED, PosteriorState

logger = logging.getLogger("laplace_tf")

FORMAT = "laplace_tf.posterior"
FORMAT_VERSION = 2
_TRACE = "trace_"


def save(la, path) -> None:
    """Write fitted ``la`` to ``path`` (exactly this name; written atomically)."""
    state, settings = la.state(), la.settings()
    curvature = state.curvature
    arrays = {"mean": state.mean.numpy(), "curvature_nll": np.asarray(curvature.nll)}
    arrays.update({s.name: np.asarray(settings[s.name]) for s in la.SETTINGS
                   if s.saved == "array" and settings[s.name] is not None})  # None: when_absent
    if state.fit_sigma is not None:
        arrays["fit_sigma"] = state.fit_sigma
    if curvature.residual_ss is not None:
        arrays["curvature_residual_ss"] = np.asarray(curvature.residual_ss)
    for i, block in enumerate(curvature.blocks):
        for field, value in block._asdict().items():
            arrays[f"block_{i}_{field}"] = np.asarray(value)
    for key, value in (state.tuning_trace or {}).items():
        arrays[_TRACE + key] = np.asarray(value)
    small = la.prior_precision.shape.rank == 0 or la.prior_precision.shape[0] < la.n_params
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **{s.name: settings[s.name] for s in la.SETTINGS if s.saved == "metadata"},
        # readable copies (load reads the arrays)
        "prior_precision": la.prior_precision.numpy().tolist() if small else "per weight",
        "sigma_noise": la.sigma_noise.numpy().tolist(),
        "n_data": curvature.n_data,
        "n_params": la.n_params,
        "dtype": la.subset.dtype.name,
        "blocks": [type(b).__name__ for b in curvature.blocks],
        "signature": la.subset.signature(),
        "fingerprint": state.fingerprint,
        "model_fingerprint": fingerprint(la.model.weights),
    }
    metadata[_DIGEST] = _digest(metadata, arrays)
    arrays["metadata"] = np.array(json.dumps(metadata))
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"path: {path!r} is a directory; expected a file name such as "
                         f"{os.path.join(path, 'posterior.npz')!r}.")
    partial = path + ".partial"
    with open(partial, "wb") as handle:
        np.savez(handle, **arrays)
    os.replace(partial, path)


def _read(path, settings: tuple) -> tuple[dict, dict]:
    """The metadata and arrays of a saved posterior (with ``settings``, a class's
    ``SETTINGS``); ValueError for anything unreadable."""
    try:
        if os.path.isfile(path) and not zipfile.is_zipfile(path):  # np.load would try pickle
            raise ValueError("it is not an .npz (zip) archive")
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
        metadata = json.loads(str(arrays.pop("metadata")))
        if not isinstance(metadata, dict):
            raise ValueError("the metadata is not a JSON object")
        if metadata.get("format") == FORMAT and metadata.get("format_version") == FORMAT_VERSION:
            _check_complete(metadata, arrays, settings)
            if metadata[_DIGEST] != _digest(metadata, arrays):
                raise ValueError(
                    "its arrays or metadata differ from those la.save wrote (SHA-256 "
                    "mismatch); the file was altered")
    except FileNotFoundError:
        raise
    except MemoryError:
        raise ValueError(f"path: {os.fspath(path)!r} declares arrays too large to read; it is "
                         "not a posterior la.save wrote.") from None
    except Exception as error:  # noqa: BLE001 - zip, zlib, numpy header, JSON: any damage
        raise ValueError(
            f"path: {os.fspath(path)!r} is not a readable laplace_tf posterior (truncated or "
            f"corrupt file?): {type(error).__name__}: {error}. Save it again with la.save(path)."
        ) from None
    if metadata.get("format") != FORMAT or metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"path: {os.fspath(path)!r} holds format {metadata.get('format')!r} version "
            f"{metadata.get('format_version')!r}; this laplace_tf reads {FORMAT!r} version "
            f"{FORMAT_VERSION}."
        )
    return metadata, arrays


def _digest(metadata: dict, arrays: dict) -> str:
    """SHA-256 of the metadata (but this entry) and of every array's name, dtype, shape and
    bytes: any change to the file after :func:`save` wrote it shows."""
    digest = hashlib.sha256(json.dumps({k: v for k, v in metadata.items() if k != _DIGEST},
                                       sort_keys=True).encode())
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


_DIGEST = "sha256"
_METADATA_KEYS = ("n_data", "blocks", "signature", "fingerprint", "model_fingerprint", _DIGEST)
# besides the settings
_ARRAY_KEYS = ("mean", "curvature_nll")


def _required(settings: tuple, saved: str) -> list[str]:
    return [s.name for s in settings if s.saved == saved and s.when_absent is REQUIRED]


def _check_complete(metadata: dict, arrays: dict, settings: tuple) -> None:
    """Raise KeyError naming the first missing metadata entry or array."""
    for key in _required(settings, "metadata") + list(_METADATA_KEYS):
        if key not in metadata:
            raise KeyError(f"metadata entry {key!r} is missing")
    names = list(_ARRAY_KEYS) + _required(settings, "array")
    for i, name in enumerate(metadata["blocks"]):
        if name not in _BLOCKS:
            raise KeyError(f"unknown block type {name!r}")
        names += [f"block_{i}_{field}" for field in _BLOCKS[name]._fields]
    for name in names:
        if name not in arrays:
            raise KeyError(f"array {name!r} is missing")


def _shapes(signature: list) -> list:
    return [[list(shape) for shape in layer["shapes"]] for layer in signature]


def _first_difference(saved: list, current: list) -> str:
    if len(saved) != len(current):
        return (f"the posterior is over {len(saved)} layers {[s['layer'] for s in saved]}, the "
                f"model gives {len(current)} {[c['layer'] for c in current]}")
    for s, c in zip(saved, current, strict=True):
        if _shapes([s]) != _shapes([c]):
            return f"saved layer {s} but the model has {c}"
    return "no difference"


def _curvature(metadata: dict, arrays: dict, dtype: tf.DType) -> Curvature:
    blocks = []
    for i, name in enumerate(metadata["blocks"]):
        cls = _BLOCKS[name]
        blocks.append(cls(*(_array(arrays[f"block_{i}_{f}"], dtype) for f in cls._fields)))
    residual_ss = arrays.get("curvature_residual_ss")
    return Curvature(
        metadata["hessian_structure"], blocks, tf.constant(arrays["curvature_nll"], dtype),
        metadata["n_data"],  # an int, or the float sum of sample weights
        None if residual_ss is None else tf.constant(residual_ss, dtype),
    )


def _array(values: np.ndarray, dtype: tf.DType) -> tf.Tensor:
    """A saved block array in the model's dtype; integer arrays (a weight order) stay integer."""
    return tf.constant(values, None if np.issubdtype(values.dtype, np.integer) else dtype)


def _last_layer_name(model, name: str, map_fingerprint: str, path) -> str:
    """``name`` if that layer of ``model`` holds the MAP weights, else (Keras numbers layers
    per process, so a rebuilt model's names differ) the layer that holds them; ``name`` if
    none does (the weight check then says so)."""
    layers = leaf_layers(model)
    named = [layer for layer in layers if layer.name == name]
    if named and (not named[0].trainable_variables
                  or fingerprint(named[0].trainable_variables) == map_fingerprint):
        return name
    for layer in reversed(layers):
        if layer.trainable_variables and fingerprint(layer.trainable_variables) == map_fingerprint:
            logger.info("laplace_tf: loading a last-layer posterior saved for layer %r into "
                        "layer %r (the same weights; Keras named it differently).",
                        name, layer.name)
            return layer.name
    if named:
        return name
    raise ValueError(
        f"model: the posterior in {os.fspath(path)!r} was fitted at the weights of its layer "
        f"{name!r}; the model has no layer of that name and none of its layers holds those "
        "MAP weights. Load the trained weights into the model first "
        "(model.load_weights(...)), then load the posterior."
    )


def load(cls, path, model):
    """A ``cls`` instance rebuilt from ``path`` for ``model``; refuses a model that differs.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: for a truncated, corrupt or foreign file, or a model whose layers,
            shapes or weights differ from the saved ones.
    """
    metadata, arrays = _read(path, cls.SETTINGS)
    stored = {"metadata": metadata, "array": arrays, None: {}}
    settings = {s.name: stored[s.saved].get(s.name, s.when_absent) for s in cls.SETTINGS}
    if settings.get("last_layer_name") is not None:
        settings["last_layer_name"] = _last_layer_name(model, settings["last_layer_name"],
                                                       metadata["fingerprint"], path)
    try:
        la = cls(model, **settings)
    except (ValueError, TypeError, KeyError) as error:
        raise ValueError(
            f"model: it does not fit the posterior saved in {os.fspath(path)!r}: {error}"
        ) from None
    signature = la.subset.signature()
    if _shapes(signature) != _shapes(metadata["signature"]):
        raise ValueError(
            f"model: its weights do not match the posterior saved in {os.fspath(path)!r}: "
            f"{_first_difference(metadata['signature'], signature)}. Load it into the same "
            "architecture it was fitted on."
        )
    if signature != metadata["signature"]:
        logger.info("laplace_tf: loading a posterior saved for layers %s into layers %s (same "
                    "shapes; Keras named them differently).",
                    [s["layer"] for s in metadata["signature"]], [s["layer"] for s in signature])
    if la.subset.fingerprint() != metadata["fingerprint"]:
        raise ValueError(
            f"model: its weights differ from the MAP weights the posterior in "
            f"{os.fspath(path)!r} was fitted at (SHA-256 mismatch). Load the trained weights "
            "into the model first (model.load_weights(...)), then load the posterior."
        )
    if fingerprint(model.weights) != metadata["model_fingerprint"]:
        raise ValueError(
            f"model: the posterior's own weights match {os.fspath(path)!r}, but other weights "
            "of the model differ from those it was saved with (layers outside the posterior, "
            "or non-trainable weights such as BatchNorm statistics; SHA-256 mismatch): its "
            "curvature depends on them. Load all the trained weights into the model first "
            "(model.load_weights(...)), then load the posterior; or fit a new one."
        )
    mean, weights = np.asarray(arrays["mean"]), la.subset.flat_values().numpy()
    if mean.shape != weights.shape or not np.array_equal(mean.astype(weights.dtype), weights):
        raise ValueError(
            f"path: the array 'mean' in {os.fspath(path)!r} is not the MAP weights the file "
            f"records (shape {mean.shape}, the weights {weights.shape}); the file was altered. "
            "Save the posterior again with la.save(path)."
        )
    dtype = la.subset.dtype
    fit_sigma = arrays.get("fit_sigma")
    trace = {k[len(_TRACE):]: v for k, v in arrays.items() if k.startswith(_TRACE)}
    la.restore(PosteriorState(
        _curvature(metadata, arrays, dtype), tf.constant(arrays["mean"], dtype),
        None if fit_sigma is None else np.asarray(fit_sigma, np.float64),
        metadata["fingerprint"], trace or None,
    ))
    return la
