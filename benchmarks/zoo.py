"""All-weights Kronecker fits of the zoo's residual CNN and transformer against one training epoch.

Run with ``python benchmarks/zoo.py``. The models are those of ``tests/zoo.py`` (a residual
CNN with BatchNormalization on 8 x 8 x 3 images; a transformer encoder over 6 tokens with
MultiHeadAttention and LayerNormalization), with ``N`` = 2,048 and 16,384 random inputs and labels, batches of
128, float32. Measured in one run, wall seconds:

* **epoch**: one warmed-up ``model.fit`` epoch (Adam), the median of three;
* **fit cold**: the first ``Laplace(model, "classification", "all", "kron").fit`` of the
  process (tracing included); **fit warm**: the median of three more fits of new ``Laplace``
  objects on the same model;
* the ratios fit / epoch, and the block each layer got (``la.block_kinds()``).

Measured 2026-11-28 on 2 CPUs (one other job running):

| model | N | epoch s | fit cold | fit warm | cold / epoch | warm / epoch | blocks |
|---|---:|---:|---:|---:|---:|---:|---|
| resnet | 2,048 | 0.167 | 2.89 | 0.60 | 17.3 | 3.6 | 4 kron, 3 dense |
| resnet | 16,384 | 0.485 | 2.27 | 1.88 | 4.7 | 3.9 | 4 kron, 3 dense |
| transformer | 2,048 | 0.087 | 0.98 | 0.69 | 11.2 | 7.9 | 9 kron, 2 dense |
| transformer | 16,384 | 0.651 | 1.07 | 1.06 | 1.6 | 1.6 | 9 kron, 2 dense |

A warm fit still traces its step anew (each ``Laplace`` compiles its own): at 2,048 inputs
that fixed cost dominates. The GGN needs one backward pass per output (K = 3) where a
training step takes one: the floor is about ``(1 + 2 K) / 3 = 2.3`` epochs of flops, which
the residual CNN's 3.9 is within 2x of.

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
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)  # warm-up (tracing)
    epoch = statistics.median(
        _seconds(lambda: model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)) for _ in range(REPEATS))

    def fit():
        la = ltf.Laplace(model, "classification", "all", "kron", progress=False)
        la.fit((x, y), batch_size=BATCH)
        return la

    cold = _seconds(fit)
    warm = statistics.median(_seconds(fit) for _ in range(REPEATS))
    kinds = Counter(fit().block_kinds().values())
    return {"model": name, "n": n, "weights": model.count_params(), "epoch": epoch, "cold": cold,
            "warm": warm, "kinds": dict(kinds)}


def main() -> None:
    print(f"batch {BATCH}, float32, all-weights Kronecker GGN fit")
    print(f"{'model':<12}{'N':>7}{'weights':>9}{'epoch s':>9}{'fit cold':>10}{'fit warm':>10}"
          f"{'cold/epoch':>12}{'warm/epoch':>12}  blocks")
    for (name, build), n in itertools.product((("resnet", resnet), ("transformer", transformer)), SIZES):
        r = measure(name, build, n)
        print(f"{r['model']:<12}{r['n']:>7}{r['weights']:>9,}{r['epoch']:>9.3f}{r['cold']:>10.2f}"
              f"{r['warm']:>10.2f}{r['cold'] / r['epoch']:>12.1f}{r['warm'] / r['epoch']:>12.1f}"
              f"  {r['kinds']}")


if __name__ == "__main__":
    main()
