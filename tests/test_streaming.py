"""Streaming: a tf.data pipeline is fitted batch by batch, never held whole.

A generator-backed ``tf.data.Dataset`` (with ``prefetch``) records how many batches it has
produced; a thin wrapper between :class:`~laplace_tf.batches.Batches` and
:func:`~laplace_tf.curvature.fit_curvature` records, each time the fit asks for the next
batch, how many earlier batches are still alive (weak references). For every structure:

* the pipeline is pulled lazily: when batch ``k`` is processed at most ``k + 1 + PREFETCH``
  batches were produced (the prefetch buffer plus the one in flight);
* nothing keeps earlier batches: at most the batches of the current step are alive (one, or
  for dense builders, which join consecutive batches into steps, as many as a step holds);
* the streamed curvature equals the curvature of the same data held in memory.

A dataset of unknown cardinality (a generator) gets a progress bar that counts batches
without a total, and says that the size is unknown.
"""

from __future__ import annotations

import weakref

import keras
import numpy as np
import pytest
import tensorflow as tf
from models import tanh_mlp

import laplace_tf as ltf
from laplace_tf import testing
from laplace_tf.batches import Batches
from laplace_tf.curvature import _per_example, fit_curvature, make_builder
from laplace_tf.curvature.last_layer import find_last_layer
from laplace_tf.likelihoods import get_likelihood
from laplace_tf.params import LogitModel, WeightSubset

N_BATCHES, BATCH, PREFETCH, N_OUTPUTS = 30, 8, 2, 2
EXACT = {"rtol": 1e-12, "atol": 1e-12}


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    n = N_BATCHES * BATCH
    return rng.normal(size=(n, 3)), rng.normal(size=(n, N_OUTPUTS))


def _stream(x: np.ndarray, y: np.ndarray, produced: list[int]) -> tf.data.Dataset:
    """``(x, y)`` in batches made by a Python generator that appends to ``produced``."""

    def generate():
        for i in range(N_BATCHES):
            produced.append(i)
            yield x[i * BATCH : (i + 1) * BATCH], y[i * BATCH : (i + 1) * BATCH]

    signature = (tf.TensorSpec([None, 3], tf.float64), tf.TensorSpec([None, N_OUTPUTS], tf.float64))
    return tf.data.Dataset.from_generator(generate, output_signature=signature).prefetch(PREFETCH)


class _Watched:
    """Batches as ``fit_curvature`` sees them; notes, per batch, the earlier ones still alive."""

    def __init__(self, batches: Batches):
        self.dtype, self.is_weighted = batches.dtype, batches.is_weighted
        self.alive: list[int] = []
        self._batches = batches

    def weighted(self):
        earlier = []
        for x, y, w in self._batches.weighted():
            self.alive.append(sum(ref() is not None for ref in earlier))
            earlier.append(weakref.ref(x))
            yield x, y, w


def _builder(subset_of_weights: str, structure: str, on_batch=None):
    model, _ = tanh_mlp(N_OUTPUTS, seed=4)
    layers = [find_last_layer(model)] if subset_of_weights == "last_layer" else None
    likelihood = get_likelihood("regression", 0.8)
    if on_batch is not None:  # called once per batch, when the fit prepares its targets
        prepare = likelihood.prepare_targets

        def prepare_targets(*args, **kwargs):
            on_batch()
            return prepare(*args, **kwargs)

        likelihood.prepare_targets = prepare_targets
    logit_model = LogitModel(model, WeightSubset(model, layers))
    return make_builder(subset_of_weights, structure, logit_model, likelihood)


@pytest.mark.parametrize(
    ("subset_of_weights", "structure"),
    [("all", "full"), ("all", "kron"), ("all", "diag"), ("last_layer", "kron"),
     ("last_layer", "full")],
)
def test_a_stream_is_consumed_batch_by_batch_and_equals_the_in_memory_fit(
    subset_of_weights, structure, monkeypatch
):
    monkeypatch.setattr(_per_example, "CHUNK_BYTES", 2**16)  # dense steps of a few batches
    x, y = _data()
    produced: list[int] = []
    produced_when_processed: list[int] = []
    builder = _builder(subset_of_weights, structure,
                       lambda: produced_when_processed.append(len(produced)))
    batches_per_step = max(1, builder.examples_per_step(tf.constant(x[:BATCH])) // BATCH)
    assert (batches_per_step > 1) == (structure == "full")
    watched = _Watched(Batches(_stream(x, y, produced), dtype=tf.float64))
    streamed = fit_curvature(builder, watched)

    assert len(produced_when_processed) == N_BATCHES
    ahead = [n - (k + 1) for k, n in enumerate(produced_when_processed)]
    assert max(ahead) <= PREFETCH + 1, ahead
    assert max(watched.alive) <= batches_per_step < N_BATCHES, watched.alive

    in_memory = fit_curvature(_builder(subset_of_weights, structure),
                              Batches((x, y), BATCH, dtype=tf.float64))
    assert streamed.n_data == in_memory.n_data == len(x)
    np.testing.assert_allclose(streamed.nll, in_memory.nll, **EXACT)
    np.testing.assert_allclose(streamed.residual_ss, in_memory.residual_ss, **EXACT)
    for got, expected in zip(streamed.blocks, in_memory.blocks, strict=True):
        assert type(got) is type(expected)
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_allclose(a, b, **EXACT)


@pytest.mark.parametrize(
    ("make", "bar"),
    [
        (lambda x, y: _stream(x, y, []), "curvature (size unknown): 0it ["),
        (lambda x, y: tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH),
         f"| 0/{N_BATCHES} ["),
    ],
    ids=["unknown_cardinality", "known_cardinality"],
)
def test_progress_bar_counts_batches_with_a_total_only_when_known(make, bar, capsys):
    """tqdm's first display: ``0it`` without a total, ``0/30`` with one."""
    x, y = _data()
    dataset = make(x, y)
    batches = Batches(dataset, dtype=tf.float64, progress=True, description="curvature")
    expected_total = None if "it [" in bar else N_BATCHES
    assert batches.n_batches == expected_total
    assert sum(int(xb.shape[0]) for xb, _ in batches) == len(x)
    assert bar in capsys.readouterr().err


@pytest.mark.parametrize("structure", ["full", "diag"])
def test_batches_padded_to_their_own_lengths_are_fitted_and_predicted(structure):
    """``padded_batch`` pads each batch to its longest sequence, so consecutive batches differ
    in shape: they are never joined, and each length gets a step of its own static shape. The
    curvature equals the brute-force GGN summed over the batches."""
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((None,), dtype="int32"),
                              keras.layers.Embedding(9, 3, dtype="float64"),
                              keras.layers.GlobalAveragePooling1D(dtype="float64"),
                              keras.layers.Dense(2, dtype="float64")])
    rng = np.random.default_rng(5)
    sequences = [rng.integers(1, 9, size) for size in (2, 5, 3, 3, 6, 2, 4, 4)]
    labels = np.arange(len(sequences)) % 2
    data = tf.data.Dataset.from_generator(
        lambda: zip(sequences, labels, strict=True),
        output_signature=(tf.TensorSpec([None], tf.int32), tf.TensorSpec([], tf.int64)),
    ).padded_batch(2)
    likelihood, logit_model = get_likelihood("classification"), LogitModel(model)
    builder = make_builder("all", structure, logit_model, likelihood)
    (block,) = fit_curvature(builder, Batches(data, dtype=tf.float64)).blocks

    reference = sum(testing.brute_force_ggn(logit_model, likelihood, x,
                                            likelihood.prepare_targets(y, 2, tf.float64))
                    for x, y in data)
    got = block.matrix.numpy() if structure == "full" else block.diagonal.numpy()
    np.testing.assert_allclose(got, reference if structure == "full" else np.diag(reference),
                               **EXACT)
    la = ltf.Laplace(model, "classification", "all", structure, progress=False)
    la.fit(data)
    inputs = data.map(lambda x, y: x)
    np.testing.assert_allclose(la(inputs), np.concatenate([la(x) for x in inputs]), **EXACT)
