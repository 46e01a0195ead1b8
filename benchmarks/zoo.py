"""All-weights Kronecker fits of the zoo's residual CNN and transformer against one training epoch.

Run with ``python benchmarks/zoo.py``. The models are those of ``tests/zoo.py`` (a residual
CNN with BatchNormalization on 8 x 8 x 3 images; a transformer encoder over 6 tokens with
MultiHeadAttention and LayerNormalization), with ``N`` = 2,048 and 16,384 random inputs and labels, batches of
128, float32. Measured in one run, wall seconds:

* **epoch**: one warmed-up ``model.fit`` epoch (Adam), the median of three; **1st epoch**:
  the model's first ``model.fit`` epoch (Keras' tracing included);
* **fit cold**: the first ``Laplace(model, "classification", "all", "kron").fit`` of the
  process (tracing included); **fit warm**: the median of three more fits of new ``Laplace``
  objects on the same model (they share the compiled step: nothing is traced);
* the ratios fit / epoch (cold fit against the first epoch too: both pay their tracing), and
  the block each layer got (``la.block_kinds()``).

Measured 2026-11-29 on 2 quiet CPUs (after the Kronecker blocks stopped copying their rows):

| model | N | epoch s | 1st epoch s | fit cold | fit warm | cold / epoch | warm / epoch | cold / 1st epoch | blocks |
|---|---:|---:|---:|---:|---:|---:|---:|---:|---|
| resnet | 2,048 | 0.086 | 0.76 | 1.38 | 0.11 | 16.1 | 1.3 | 1.8 | 4 kron, 3 dense |
| resnet | 16,384 | 0.648 | 1.09 | 1.01 | 0.70 | 1.6 | 1.1 | 0.9 | 4 kron, 3 dense |
| transformer | 2,048 | 0.079 | 1.12 | 0.63 | 0.06 | 7.9 | 0.8 | 0.6 | 9 kron, 2 dense |
| transformer | 16,384 | 0.254 | 1.28 | 1.23 | 0.31 | 4.9 | 1.2 | 1.0 | 9 kron, 2 dense |

(The resnet's warmed-up epoch at 16,384 inputs took 0.424 s in the run before, where the
warm fit took 0.85 s: warm fit / epoch 2.0.)

The GGN needs one backward pass per output (K = 3) where a training step takes one;
``benchmarks/zoo_floor.py`` times the forward pass and the K backward passes alone at
0.66-0.84 of an epoch for the residual CNN. Below a few thousand inputs the first fit's
tracing dominates, as the first epoch's does.

Where the transformer's cold fit goes (cProfile of the first fit on 128 inputs, after a
throwaway fit of a one-layer model; 1.64 s under the profiler, 2026-11-29): tracing the step
1.17 s, of which the per-example Jacobian ``tape.jacobian`` 0.67 (its ``vectorized_map``/pfor
conversion 0.42, the backward pass it converts 0.19), the per-layer block builders 0.20,
automatic control dependencies 0.16 (2,139 graph nodes, 741 of them constants); the first
call of the traced step (Grappler and the run) 0.31 s; the model's own forward pass under
0.15 s. Not reduced yet.
"""

from __future__ import annotations

import itertools
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import keras

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import laplace_tf as ltf  # noqa: E402
from tests.zoo import resnet, transformer  # noqa: E402

SIZES, BATCH, REPEATS = (2048, 16384), 128, 3


def _seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def measure(name: str, build, n: int) -> dict:
    model, x, y = build(n=n)
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    first_epoch = _seconds(lambda: model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0))
    epoch = statistics.median(
        _seconds(lambda: model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)) for _ in range(REPEATS))

    def fit():
        la = ltf.Laplace(model, "classification", "all", "kron", progress=False)
        la.fit((x, y), batch_size=BATCH)
        return la

    cold = _seconds(fit)
    warm = statistics.median(_seconds(fit) for _ in range(REPEATS))
    kinds = Counter(fit().block_kinds().values())
    return {"model": name, "n": n, "weights": model.count_params(), "epoch": epoch,
            "first_epoch": first_epoch, "cold": cold, "warm": warm, "kinds": dict(kinds)}


def main() -> None:
    print(f"batch {BATCH}, float32, all-weights Kronecker GGN fit")
    print(f"{'model':<12}{'N':>7}{'weights':>9}{'epoch s':>9}{'1st epoch':>10}{'fit cold':>10}"
          f"{'fit warm':>10}{'cold/epoch':>12}{'warm/epoch':>12}{'cold/1st':>10}  blocks")
    for (name, build), n in itertools.product((("resnet", resnet), ("transformer", transformer)), SIZES):
        r = measure(name, build, n)
        print(f"{r['model']:<12}{r['n']:>7}{r['weights']:>9,}{r['epoch']:>9.3f}"
              f"{r['first_epoch']:>10.2f}{r['cold']:>10.2f}{r['warm']:>10.2f}"
              f"{r['cold'] / r['epoch']:>12.1f}{r['warm'] / r['epoch']:>12.1f}"
              f"{r['cold'] / r['first_epoch']:>10.1f}  {r['kinds']}")


if __name__ == "__main__":
    main()
