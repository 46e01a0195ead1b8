"""Benchmark of laplace_tf.autodiff: dense ``hessian`` and ``hvp``.

Run with ``python benchmarks/hessian.py``. Test function, for n variables::

    f(x) = sum(tanh(W x)) + x^T A x,        W, A: n x n, float32

Two comparisons, everything compiled with ``tf.function`` and warmed up before timing:

1. ``hessian(f, x)`` (one vectorised Jacobian of the gradient) against the baseline a user
   would write without it: a Python loop over the n rows, each row ``H e_i`` one call of a
   compiled ``hvp``. For large n the loop is timed over a subset of rows and scaled to n
   (marked ``est.``).
2. ``hvp(f, x, v)`` against one gradient of ``f``.

Times are medians over repeats. Targets: ``hessian`` >= 10x faster than the row loop at
n = 500; ``hvp`` <= 5x one gradient.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from laplace_tf.autodiff import hessian, hvp  # noqa: E402

SIZES = (100, 500, 2000)
MAX_LOOP_ROWS = 500  # rows actually timed in the row loop; more are extrapolated
DTYPE = tf.float32


def median_seconds(
    fns: dict[str, Callable[[], object]], repeats: int, number: int = 1
) -> dict[str, float]:
    """Median over ``repeats`` of the mean time of ``number`` calls, for each of ``fns``.

    Each is warmed up first; the functions take turns within every repeat, so that load
    from other processes on the machine affects the compared functions alike.
    """
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(number):
                fn()
            times[name].append((time.perf_counter() - start) / number)
    return {name: statistics.median(t) for name, t in times.items()}


def problem(n: int, seed: int = 0) -> tuple[Callable[[tf.Tensor], tf.Tensor], tf.Tensor]:
    rng = np.random.default_rng(seed)
    w = tf.constant(rng.normal(size=(n, n)) / np.sqrt(n), DTYPE)
    a = tf.constant(rng.normal(size=(n, n)) / np.sqrt(n), DTYPE)

    def f(x: tf.Tensor) -> tf.Tensor:
        return tf.reduce_sum(tf.tanh(tf.linalg.matvec(w, x))) + tf.tensordot(
            x, tf.linalg.matvec(a, x), 1
        )

    return f, tf.constant(rng.normal(size=n), DTYPE)


def bench(n: int) -> dict[str, float | bool]:
    f, x = problem(n)
    spec = [tf.TensorSpec([n], DTYPE)]
    full = tf.function(lambda x: hessian(f, x), input_signature=spec)
    product = tf.function(lambda x, v: hvp(f, x, v), input_signature=spec * 2)
    row = tf.function(
        lambda x, i: hvp(f, x, tf.one_hot(i, n, dtype=DTYPE)),
        input_signature=spec + [tf.TensorSpec([], tf.int32)],
    )

    @tf.function(input_signature=spec)
    def gradient(x: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = f(x)
        return tape.gradient(y, x)

    # correctness check of what is timed: the loop's rows are rows of the Hessian
    rows = min(n, MAX_LOOP_ROWS)
    h = full(x).numpy()
    looped = np.stack([row(x, tf.constant(i)).numpy() for i in range(rows)])
    np.testing.assert_allclose(looped, h[:rows], rtol=1e-4, atol=1e-4)

    dense = median_seconds(
        {
            "hessian": lambda: full(x).numpy(),
            "loop": lambda: [row(x, tf.constant(i)).numpy() for i in range(rows)],
        },
        repeats=3,
    )
    v = tf.ones([n], DTYPE)
    products = median_seconds(
        {"hvp": lambda: product(x, v).numpy(), "grad": lambda: gradient(x).numpy()},
        repeats=9,
        number=30,
    )
    return {
        "hessian": dense["hessian"],
        "loop": dense["loop"] * n / rows,
        "estimated": rows < n,
        **products,
    }


def main() -> None:
    print(
        f"f(x) = sum(tanh(W x)) + x^T A x, {DTYPE.name}, TensorFlow {tf.__version__}, "
        f"{os.cpu_count()} CPU cores (load average {os.getloadavg()[0]:.1f}); "
        "compiled, warmed up, medians"
    )
    header = (
        f"{'n':>5} | {'hessian [s]':>11} | {'row loop [s]':>14} | {'loop/hessian':>12} | "
        f"{'hvp [ms]':>8} | {'grad [ms]':>9} | {'hvp/grad':>8}"
    )
    print(header)
    print("-" * len(header))
    results = {}
    for n in SIZES:
        r = results[n] = bench(n)
        loop = f"{r['loop']:.4f}" + (" est." if r["estimated"] else "     ")
        print(
            f"{n:>5} | {r['hessian']:>11.4f} | {loop:>14} | {r['loop'] / r['hessian']:>11.1f}x | "
            f"{1e3 * r['hvp']:>8.3f} | {1e3 * r['grad']:>9.3f} | {r['hvp'] / r['grad']:>7.2f}x"
        )
    if any(r["estimated"] for r in results.values()):
        print(f"est.: row loop timed over the first {MAX_LOOP_ROWS} rows and scaled to n rows.")
    speedup = results[500]["loop"] / results[500]["hessian"]
    worst_hvp = max(r["hvp"] / r["grad"] for r in results.values())
    print(
        f"target hessian >= 10x faster than the row loop at n=500: {speedup:.1f}x "
        f"({'met' if speedup >= 10 else 'MISSED'})"
    )
    print(
        f"target hvp <= 5x one gradient (worst n): {worst_hvp:.2f}x "
        f"({'met' if worst_hvp <= 5 else 'MISSED'})"
    )


if __name__ == "__main__":
    main()
