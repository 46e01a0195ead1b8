"""Where an all-weights Kronecker fit of the zoo's residual CNN spends its time, against its floor.

Run with ``python benchmarks/zoo_floor.py`` (about a minute). ``tests/zoo.py``'s residual CNN
(BatchNormalization, skip connection; 8 x 8 x 3 images) on ``N`` = 16,384 random inputs,
batches of 128, float32; wall seconds, in one run, medians of three (warm: traced before):

* **epoch**: one ``model.fit`` epoch (Adam);
* **passes**: the fit's forward pass and its ``K`` = 3 backward passes alone, batch by batch as
  the fit runs them (one compiled step per batch: the forward pass with zero probes on every
  layer's pre-activation, then the vectorised Jacobian of the ``K`` scores with respect to
  the probes), nothing built from them;
* **step**: the fit's compiled step (``KronBuilder.batch_sums``: the same passes, then every
  layer's blocks), traced before, batch by batch;
* **fit**: ``Laplace(model, "classification", "all", "kron").fit`` (a new object each time,
  so its step is traced again, as a user's fit is).

``passes / epoch`` is the floor of ``fit / epoch`` for any way of building the blocks from the
same gradients; ``step - passes`` is the blocks' work (rows, patches, ``A`` and ``G``
products, BatchNorm's dense blocks), ``fit - step`` what a fit adds (tracing its step, the
batch loop, the sums' additions, the eigendecompositions).

Measured 2026-11-28 on 2 CPUs under a load of 8 to 12 (so each figure is noisy to 2x):

| run | epoch | passes | step | fit | passes / epoch | step / epoch | fit / epoch |
|---|---:|---:|---:|---:|---:|---:|---:|
| 1 | 2.099 | 1.756 | 4.566 | 2.565 | 0.84 | 2.17 | 1.22 |
| 2 | 1.509 | 0.993 | 1.965 | 4.057 | 0.66 | 1.30 | 2.69 |

The passes alone are below one epoch: 3x is not below a physical floor. The blocks roughly
double the passes' time and a fit's own work (above all tracing its step again) doubles it
again.
"""

from __future__ import annotations

import sys
from pathlib import Path

import keras
import tensorflow as tf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _timing import median_seconds  # noqa: E402

import laplace_tf as ltf  # noqa: E402
from laplace_tf.curvature._per_example import output_cotangents  # noqa: E402
from laplace_tf.curvature.kron import KronBuilder  # noqa: E402
from laplace_tf.likelihoods import get_likelihood  # noqa: E402
from laplace_tf.params import LogitModel, WeightSubset  # noqa: E402
from tests.zoo import resnet  # noqa: E402

N, BATCH, REPEATS = 16384, 128, 3


def passes_step(model):
    """The fit's forward pass and its K backward passes, one compiled step a batch."""
    logit_model = LogitModel(model, WeightSubset(model))
    likelihood = get_likelihood("classification")
    layers = [s.layer for s in logit_model.subset.slices]

    @tf.function(reduce_retracing=True)
    def step(x, y):
        probes = []
        with tf.GradientTape() as tape:
            def hook(layer, inputs, z):
                probe = tf.zeros_like(z)
                tape.watch(probe)
                probes.append(probe)
                return z + probe

            logits = logit_model(x, layers=layers, hook=hook)
            cotangents = output_cotangents(likelihood, "ggn", logits, y)
            scores = tf.einsum("nk,nkr->r", logits, cotangents)
        return tape.jacobian(scores, probes, experimental_use_pfor=True)

    return step


def main() -> None:
    model, x, y = resnet(n=N)
    model.compile(optimizer="adam",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    epoch = median_seconds(lambda: model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0), REPEATS)

    step = passes_step(model)
    labels = tf.one_hot(y, 3)
    batches = [(tf.constant(x[i:i + BATCH]), labels[i:i + BATCH]) for i in range(0, N, BATCH)]
    step(*batches[0])

    def run_passes():
        for batch in batches:
            step(*batch)

    passes = median_seconds(run_passes, REPEATS)
    builder = KronBuilder(LogitModel(model, WeightSubset(model)), get_likelihood("classification"))
    sums = tf.function(builder.batch_sums, reduce_retracing=True)
    sums(*batches[0])

    def run_steps():
        for batch in batches:
            sums(*batch)

    steps = median_seconds(run_steps, REPEATS)

    def fit():
        ltf.Laplace(model, "classification", "all", "kron", progress=False).fit(
            (x, y), batch_size=BATCH)

    fit()
    fitted = median_seconds(fit, REPEATS)
    print(f"resnet, N = {N:,}, batch {BATCH}, float32; seconds (median of {REPEATS})")
    print(f"{'epoch':>8}{'passes':>8}{'step':>8}{'fit':>8}{'passes/epoch':>14}"
          f"{'step/epoch':>12}{'fit/epoch':>11}")
    print(f"{epoch:>8.3f}{passes:>8.3f}{steps:>8.3f}{fitted:>8.3f}{passes / epoch:>14.2f}"
          f"{steps / epoch:>12.2f}{fitted / epoch:>11.2f}")


if __name__ == "__main__":
    main()
