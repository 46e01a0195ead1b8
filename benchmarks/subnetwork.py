"""Benchmark of the subnetwork Laplace: fit and GLM predictive against one training epoch.

Run with ``python benchmarks/subnetwork.py`` (about a minute on 2 cores). Float32 MLP
``64 -> 256 -> 256 -> 10`` (ReLU, 85,002 weights) with random weights and random 10-class
data, N = 4,000, batches of 256. Subnetworks of ``n`` weights chosen by
``ltf.subnetwork.largest_variance`` of an all-weights diagonal Laplace (spread over all three
layers, so every layer is only partly chosen: their rows and Jacobian columns are gathered
from the layers' factors), against the all-weights diagonal Laplace itself and one warmed-up
training epoch (``model.fit``, Adam). Wall seconds, medians of 3; tracing is included in the
fits (what a user waits for), the predictive is warmed up.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from _timing import median_seconds  # noqa: E402

import laplace_tf as ltf  # noqa: E402

N, WIDTH = 4000, 256


def main() -> None:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(WIDTH, "relu"),
                              keras.layers.Dense(WIDTH, "relu"), keras.layers.Dense(10)])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 64)).astype("float32")
    y = rng.integers(0, 10, N)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=256, epochs=1, verbose=0)  # warm-up
    epoch = median_seconds(lambda: model.fit(x, y, batch_size=256, epochs=1, verbose=0))
    diagonal = ltf.Laplace(model, "classification", "all", "diag", progress=False)
    rows = [("all / diag", diagonal.n_params, median_seconds(lambda: diagonal.fit((x, y))),
             diagonal)]
    for n in (100, 1000):
        indices = ltf.subnetwork.largest_variance(diagonal, n)
        la = ltf.Laplace(model, "classification", "subnetwork", "full", progress=False,
                         subnetwork_indices=indices)
        rows.append((f"subnetwork {n:,}", n, median_seconds(lambda la=la: la.fit((x, y))), la))
    print(f"one training epoch: {epoch:.2f} s (N = {N:,}, {diagonal.n_params:,} weights)")
    print("| posterior | weights | fit (s) | fit / epoch | GLM predictive (s) |")
    print("|---|---:|---:|---:|---:|")
    for name, n_params, fit, la in rows:
        la(x)  # warm-up
        predict = median_seconds(lambda la=la: la(x))
        print(f"| {name} | {n_params:,} | {fit:.2f} | {fit / epoch:.1f} | {predict:.2f} |")


if __name__ == "__main__":
    main()
