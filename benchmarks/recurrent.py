"""Benchmark: per-example curvature of recurrent layers over all weights (``all``/``diag`` GGN).

Run with ``python benchmarks/recurrent.py`` (about 1 minute on 2 cores). float32, random data,
N = 256 sequences of 3 features, batch 256, softmax over 10 classes, ``LSTM(16) -> Dense(10)``.

The LSTM's forward pass is a ``while_loop``; a nested pfor (``vectorized_map`` over examples
of a vectorised Jacobian) cannot convert its gradient. Two ways to get its per-example rows:

* ``map_fn`` (what laplace_tf does): one example at a time in a graph loop;
* ``unroll=True``: the LSTM called unrolled while the curvature is computed (possible only
  with a static number of time steps), so that the nested pfor works; its graph grows with
  the time steps.

(A third way, ``vectorized_map`` over examples of a graph loop over an example's rows, measured
6.8 s and 8.5 s here, and fails at run time for a batch of one example.)

"fit" is the wall time of one ``fit_curvature`` (a fresh ``tf.function``: tracing included),
the median of 3 fits. Measured on 2 shared cores:

| time steps | map_fn (laplace_tf) | unroll=True |
|---|---|---|
| 5 | 1.42 s | 1.81 s |
| 50 | 5.22 s | 21.86 s |
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from laplace_tf.batches import Batches  # noqa: E402
from laplace_tf.curvature import fit_curvature, make_builder  # noqa: E402
from laplace_tf.likelihoods import get_likelihood  # noqa: E402
from laplace_tf.params import LogitModel  # noqa: E402

N, BATCH, CLASSES, REPEATS = 256, 256, 10, 3


@contextlib.contextmanager
def _unrolled(model):
    layers = [la for la in model._flatten_layers() if isinstance(la, keras.layers.RNN)]
    for layer in layers:
        layer.unroll = True
    try:
        yield
    finally:
        for layer in layers:
            layer.unroll = False


def _fit_seconds(model, x, y, context) -> float:
    likelihood = get_likelihood("classification")
    times = []
    for _ in range(REPEATS):
        builder = make_builder("all", "diag", LogitModel(model), likelihood, "ggn")
        start = time.perf_counter()
        with context():
            fit_curvature(builder, Batches((x, y), BATCH, dtype=tf.float32, progress=False))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    rng = np.random.default_rng(0)
    print("| time steps | map_fn (laplace_tf) | unroll=True |")
    print("|---|---|---|")
    for steps in (5, 50):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((steps, 3)), keras.layers.LSTM(16),
                                  keras.layers.Dense(CLASSES)])
        x = rng.normal(size=(N, steps, 3)).astype(np.float32)
        y = rng.integers(0, CLASSES, N)
        row = [_fit_seconds(model, x, y, contextlib.nullcontext),
               _fit_seconds(model, x, y, lambda m=model: _unrolled(m))]
        print(f"| {steps} | " + " | ".join(f"{t:.2f} s" for t in row) + " |")


if __name__ == "__main__":
    main()
