"""Benchmark: all-weights Kronecker fits of models built from Embedding, MultiHeadAttention
(EinsumDense), LayerNormalization and BatchNormalization, against one training epoch.

Run with ``python benchmarks/kron_layers.py [N]`` (under a minute on 2 cores). float32, random
data, N = 512 examples (or the N given), batch 64, softmax over 10 classes:

* transformer: tokens [16] from 1,000 -> Embedding(32) -> MultiHeadAttention(2 heads, key 16)
  + residual -> LayerNormalization -> GlobalAveragePooling1D -> Dense(10);
* cnn: 16x16x3 images -> Conv2D(16, 3) -> BatchNormalization -> relu -> Conv2D(16, 3, stride 2)
  -> BatchNormalization -> relu -> GlobalAveragePooling2D -> Dense(10).

"epoch" is the wall time of the second epoch of ``model.fit`` (compiled in the first),
"first fit" that of the first ``Laplace(..., "all", "kron").fit`` in the process (tracing and
TensorFlow's first-use costs included), "fit" that of a second one (a new trace of the step,
about 1.4 s of the transformer's), "ratio" fit / epoch. Every layer gets a Kronecker block, the
normalisation layers an exact dense block. Measured on 2 cores shared with other jobs:

| model | N | epoch | first fit | fit | ratio |
|---|---|---|---|---|---|
| transformer | 512 | 0.09 s | 6.83 s | 1.31 s | 14.8 |
| cnn | 512 | 0.09 s | 0.77 s | 0.35 s | 3.9 |
| transformer | 4096 | 0.16 s | 2.54 s | 0.83 s | 5.3 |
| cnn | 4096 | 0.21 s | 1.37 s | 0.92 s | 4.4 |

The fit's fixed costs (tracing the step: pfor over the logits through the attention, the
factors' eigendecompositions, the Embedding's ``A`` over 1,000 tokens) dominate at these sizes.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import laplace_tf as ltf  # noqa: E402

N, BATCH, CLASSES = 512, 64, 10
L = keras.layers


def transformer():
    inputs = keras.Input((16,), dtype="int32")
    h = L.Embedding(1000, 32)(inputs)
    h = L.LayerNormalization()(h + L.MultiHeadAttention(2, 16)(h, h))
    model = keras.Model(inputs, L.Dense(CLASSES)(L.GlobalAveragePooling1D()(h)))
    return model, np.random.default_rng(0).integers(0, 1000, size=(N, 16))


def cnn():
    inputs = keras.Input((16, 16, 3))
    h = L.Activation("relu")(L.BatchNormalization()(L.Conv2D(16, 3)(inputs)))
    h = L.Activation("relu")(L.BatchNormalization()(L.Conv2D(16, 3, strides=2)(h)))
    model = keras.Model(inputs, L.Dense(CLASSES)(L.GlobalAveragePooling2D()(h)))
    return model, np.random.default_rng(0).normal(size=(N, 16, 16, 3)).astype("float32")


def measure(build) -> tuple[float, float, dict]:
    keras.utils.set_random_seed(0)
    model, x = build()
    y = np.arange(N) % CLASSES
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    start = time.perf_counter()
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    epoch = time.perf_counter() - start
    la = ltf.Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron",
                     progress=False)
    fits = []
    for _ in range(2):
        start = time.perf_counter()
        la.fit((x, y), batch_size=BATCH)
        fits.append(time.perf_counter() - start)
    return epoch, fits, la.block_kinds()


if __name__ == "__main__":
    N = int(sys.argv[1]) if len(sys.argv) > 1 else N
    for name, build in (("transformer", transformer), ("cnn", cnn)):
        epoch, (first, fit), kinds = measure(build)
        print(f"| {name} | {N} | {epoch:.2f} s | {first:.2f} s | {fit:.2f} s | {fit / epoch:.1f} |")
        print(kinds)
