"""Benchmark of curvature fitting: each structure's cost in units of the work it stands on.

Run with ``python benchmarks/curvature.py`` (about 1-2 minutes on 2 cores). Everything is
float32, fitted with ``make_builder`` + ``fit_curvature`` on random data:

1. MLP 784-256-256-10 (269,322 weights), N = 10,000 inputs, batch 256, softmax likelihood.
   * ``all`` diag GGN and ``all`` kron GGN against one training epoch (``model.fit`` for one
     epoch with Adam, warmed up). Target: at most 3x.
   * ``last_layer`` kron and full GGN against one forward pass over the same batches (a
     compiled ``model(x)`` per batch). Target: at most 1.5x. Kron adds ``A = sum a a^T``
     (257 x 257, a quarter of the forward pass's multiply-adds) to the forward pass. Full is a
     dense ``P x P`` block, ``P = 257 * 10``: even its distinct entries alone, each a sum over
     the data, take ``N d (d + 1) / 2 * K (K + 1) / 2`` multiply-adds (``d = 257``), 6.8x those
     of the forward pass, so the target is out of its reach; it is timed to show how close it
     gets.
2. MLP 50-50-20-10 (3,780 weights), N = 2,000, batch 256: ``all`` full GGN against the
   per-example Jacobians alone (``[B, K, P]`` per batch by ``tf.vectorized_map`` of one
   example's ``tape.jacobian``, the plain TensorFlow way). Target: at most 2x. Summing the
   ``P x P`` outer products is work no Jacobian pays for: the direct way, ``R^T R`` over the
   rows ``R [B K, P]`` of every batch (``N K P^2`` multiply-adds), is timed alone on random
   rows, and the table also shows the GGN against "Jacobians + R^T R". The full builders join
   consecutive batches into steps as large as their memory budget allows (here all 2,000
   examples in one step; ``CurvatureBuilder.examples_per_step``), because every step adds a
   ``P x P``-sized sum.

Times. ``fit_curvature`` compiles a fresh ``tf.function`` per call, so a fit includes tracing.
"fit wall" is that user-facing time; "steady" is half the difference between a fit on the data
three times over and a fit on the data (after a throw-away first fit): the compute per data
set, without the tracing and other costs paid once per fit (for the full builders, laying the
packed sums out as the ``P x P`` matrix), comparable with the warmed-up epoch. Medians over repeats, as wall time
and as process CPU time (all threads). The verdicts use the CPU-time ratio, because on a shared
machine other processes stretch wall times at random; on an idle machine the two agree.

Peak memory: before each measurement ``5`` is written to ``/proc/self/clear_refs``, which
resets the kernel's resident-set high-water mark ``VmHWM``; the figure is ``VmHWM`` after the
measurement minus ``VmRSS`` before it (MiB of extra resident memory at the peak; memory that
TensorFlow's allocator kept from an earlier step is not counted again). Where the reset is
refused, it is the growth of ``ru_maxrss`` (0 if an earlier step peaked higher).
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from _peak_memory import reset_peak, status_kib  # noqa: E402

from laplace_tf.batches import Batches  # noqa: E402
from laplace_tf.curvature import fit_curvature, make_builder  # noqa: E402
from laplace_tf.likelihoods import get_likelihood  # noqa: E402
from laplace_tf.params import LogitModel, WeightSubset  # noqa: E402

BATCH = 256
LARGE = {"widths": (784, 256, 256, 10), "n": 10_000}
SMALL = {"widths": (50, 50, 20, 10), "n": 2_000}
TARGETS = {"all diag GGN": 3.0, "all kron GGN": 3.0, "last_layer kron GGN": 1.5,
           "last_layer full GGN": 1.5, "all full GGN": 2.0}


class Timing(NamedTuple):
    wall: float  # seconds
    cpu: float  # process CPU seconds, all threads
    peak: float  # MiB of extra resident memory at the peak


def measure(fn: Callable[[], object], repeats: int) -> Timing:
    """Medians over ``repeats`` calls of wall and CPU time, and the largest memory peak."""
    walls, cpus, peaks = [], [], []
    for _ in range(repeats):
        before = status_kib("VmRSS")
        max_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        reset = reset_peak()
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        if reset and before is not None:
            peaks.append((status_kib("VmHWM") - before) / 1024)
        else:
            peaks.append((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - max_before) / 1024)
    return Timing(statistics.median(walls), statistics.median(cpus), max(peaks))


def mlp(widths: tuple[int, ...], seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    hidden = [keras.layers.Dense(w, "relu") for w in widths[1:-1]]
    return keras.Sequential([keras.Input((widths[0],)), *hidden, keras.layers.Dense(widths[-1])])


def data(widths: tuple[int, ...], n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, widths[0])).astype(np.float32), rng.integers(0, widths[-1], n)


class Row(NamedTuple):
    name: str
    fit: Timing  # a whole fit_curvature call, tracing included
    steady: Timing  # the compute per data set, tracing excluded (see the module docstring)
    unit_name: str = ""
    unit: Timing | None = None
    target: float | None = None


def steady_fit(builder_fn: Callable[[], object], x, y, repeats: int) -> tuple[Timing, Timing]:
    """A fit on all data (with tracing), and the steady compute per data set: a fit on the data
    three times over takes two data sets' compute longer (the fixed costs cancel)."""
    fit_curvature(builder_fn(), Batches((x[:BATCH], y[:BATCH]), BATCH))  # one-time costs
    whole = measure(lambda: fit_curvature(builder_fn(), Batches((x, y), BATCH)), repeats)
    x3, y3 = np.concatenate([x] * 3), np.concatenate([y] * 3)
    triple = measure(lambda: fit_curvature(builder_fn(), Batches((x3, y3), BATCH)), repeats)
    steady = Timing((triple.wall - whole.wall) / 2, (triple.cpu - whole.cpu) / 2, triple.peak)
    return whole, steady


def large_mlp() -> list[Row]:
    widths, n = LARGE["widths"], LARGE["n"]
    model, (x, y) = mlp(widths), data(widths, n)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    epoch = measure(lambda: model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0), 5)

    forward_fn = tf.function(lambda xb: model(xb, training=False))
    batches = Batches((x, y), BATCH)
    for xb, _ in batches:
        forward_fn(xb)
    forward = measure(lambda: [forward_fn(xb) for xb, _ in batches], 7)

    likelihood = get_likelihood("classification")
    every = LogitModel(model)
    last = LogitModel(model, WeightSubset(model, [model.layers[-1]]))
    rows = [Row("epoch (model.fit, Adam)", epoch, epoch), Row("forward pass", forward, forward)]
    for name, logit_model, subset, structure, unit_name, unit in [
        ("all diag GGN", every, "all", "diag", "epoch", epoch),
        ("all kron GGN", every, "all", "kron", "epoch", epoch),
        ("last_layer kron GGN", last, "last_layer", "kron", "forward", forward),
        ("last_layer full GGN", last, "last_layer", "full", "forward", forward),
    ]:
        whole, steady = steady_fit(
            lambda lm=logit_model, s=subset, st=structure: make_builder(s, st, lm, likelihood),
            x, y, repeats=5,
        )
        rows.append(Row(name, whole, steady, unit_name, unit, TARGETS[name]))
    return rows


def small_mlp() -> list[Row]:
    widths, n = SMALL["widths"], SMALL["n"]
    model, (x, y) = mlp(widths), data(widths, n)
    logit_model = LogitModel(model)
    subset = logit_model.subset
    n_params, n_outputs = subset.n_params, widths[-1]
    batches = Batches((x, y), BATCH)

    @tf.function(reduce_retracing=True)
    def jacobians(xb):
        weights = subset.values()

        def one(x_n):
            with tf.GradientTape() as tape:
                tape.watch(weights)
                logits = logit_model(x_n[None], weights)[0]
            parts = tape.jacobian(logits, weights, experimental_use_pfor=True)
            return tf.concat([tf.reshape(p, [n_outputs, -1]) for p in parts], -1)

        return tf.vectorized_map(one, xb)

    for xb, _ in batches:
        jacobians(xb)
    jac = measure(lambda: [jacobians(xb) for xb, _ in batches], 5)
    # R^T R of one batch's rows [B K, P], timed once and counted for every batch
    random_rows = tf.random.normal([BATCH * n_outputs, n_params])
    gram = tf.function(lambda r: tf.matmul(r, r, transpose_a=True))
    gram(random_rows)
    one_gram = measure(lambda: gram(random_rows), 2)
    n_batches = batches.n_batches
    matmul = Timing(one_gram.wall * n_batches, one_gram.cpu * n_batches, one_gram.peak)
    both = Timing(jac.wall + matmul.wall, jac.cpu + matmul.cpu, 0.0)
    likelihood = get_likelihood("classification")
    whole, steady = steady_fit(lambda: make_builder("all", "full", logit_model, likelihood),
                               x, y, repeats=5)
    return [
        Row(f"per-example Jacobians (P={n_params})", jac, jac),
        Row("R^T R matmuls (rows approach)", matmul, matmul),
        Row("all full GGN", whole, steady, "Jacobians", jac, TARGETS["all full GGN"]),
        Row("all full GGN", whole, steady, "Jac.+R^T R", both),
    ]


def main() -> None:
    print(
        f"laplace_tf curvature benchmark: float32, batch {BATCH}, TensorFlow {tf.__version__}, "
        f"{os.cpu_count()} CPU cores (load average {os.getloadavg()[0]:.1f} at the start)"
    )
    header = (f"{'measurement':<32} | {'fit wall':>8} | {'steady wall':>11} | {'steady CPU':>10} | "
              f"{'peak MiB':>8} | {'CPU ratio':>9} | {'wall ratio':>10} | {'unit':<10} | target")
    for title, rows in [
        (f"MLP {'-'.join(map(str, LARGE['widths']))}, N = {LARGE['n']}", large_mlp),
        (f"MLP {'-'.join(map(str, SMALL['widths']))}, N = {SMALL['n']}", small_mlp),
    ]:
        print(f"\n{title}\n{header}\n{'-' * len(header)}")
        for r in rows():
            ratios, verdict = f"{'':>9} | {'':>10}", ""
            if r.unit is not None:
                cpu_ratio = r.steady.cpu / r.unit.cpu
                ratios = f"{cpu_ratio:>8.2f}x | {r.steady.wall / r.unit.wall:>9.2f}x"
                if r.target is not None:
                    verdict = f"<= {r.target:g}x {'met' if cpu_ratio <= r.target else 'MISSED'}"
            print(f"{r.name:<32} | {r.fit.wall:>8.3f} | {r.steady.wall:>11.3f} | "
                  f"{r.steady.cpu:>10.3f} | {r.steady.peak:>8.0f} | {ratios} | "
                  f"{r.unit_name:<10} | {verdict}")
    print(
        f"\nload average at the end: {os.getloadavg()[0]:.1f}. Verdicts use the CPU ratio (process "
        "CPU seconds of all threads), which other processes on a shared machine disturb less "
        "than wall time; on an idle machine the two agree."
    )


if __name__ == "__main__":
    main()
