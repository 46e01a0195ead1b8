"""Where a warm ``fit`` spends its time on the ``bench`` problem of ``overheads.py``, piece by piece.

Run with ``python benchmarks/fit_glue.py`` (about a minute). Per (subset, structure), warm
medians in ms: ``la.fit``; ``fit_curvature`` alone; the data iteration (``Batches.weighted``
with target preparation); the 16 calls of the compiled step's concrete function; the running
sums; the structure's factorisation in ``_install``; and two compiled stand-ins of the batch
sums: all batches unrolled in one graph (``overheads.py``'s ``arith``) and a ``tf.while_loop``
over 15 stacked full batches (what a compiled batch loop could reach).
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
from overheads import BATCH, _fit_arithmetic, problem  # noqa: E402

import laplace_tf as ltf  # noqa: E402
from laplace_tf.batches import Batches  # noqa: E402
from laplace_tf.curvature.base import _add_in_place, _compiled_step, any_batch_size, fit_curvature  # noqa: E402
from laplace_tf.inputs import InputCheck  # noqa: E402


def ms(fn, n=5) -> float:
    fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[n // 2]


def main() -> None:
    model, train, _ = problem("bench")
    print("| pair | la.fit | fit_curvature | data | step calls | sums | factorize | unrolled "
          "| while_loop |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for subset, structure in [("last_layer", "diag"), ("all", "diag"), ("all", "kron"),
                              ("last_layer", "full")]:
        figures = _row(model, train, subset, structure)
        print(f"| {subset}/{structure} | " + " | ".join(f"{f:.1f}" for f in figures) + " |",
              flush=True)


def _row(model, train, subset: str, structure: str) -> list[float]:
    """The table's figures (ms) for one (subset, structure)."""
    x, y = train
    la = ltf.Laplace(model, "classification", subset_of_weights=subset,
                     hessian_structure=structure, batch_size=BATCH, progress=False)
    la.fit(train)
    builder, lik = la._builder(), la._builder().likelihood

    def batches():
        return Batches(train, BATCH, dtype=la._dtype, check=InputCheck(model))

    items = [(xb, lik.prepare_targets(yb, 10, la._dtype), tf.constant(w))
             for xb, yb, w in batches().weighted()]
    run = _compiled_step(builder).get_concrete_function(*any_batch_size(list(items[0])))
    parts = [run(*item) for item in items]

    def sums():
        total = None
        for part in parts:
            total = _add_in_place(total, part)

    n = (len(y) // BATCH) * BATCH
    xs = tf.constant(x[:n].reshape(-1, BATCH, x.shape[1]))
    ys = tf.stack([lik.prepare_targets(y[i:i + BATCH], 10, la._dtype)
                   for i in range(0, n, BATCH)])

    @tf.function
    def loop(xs, ys):
        first, _ = builder.batch_sums(xs[0], ys[0], None)

        def body(i, total):
            part, _ = builder.batch_sums(xs[i], ys[i], None)
            return i + 1, tf.nest.map_structure(tf.add, total, part)

        return tf.while_loop(lambda i, _: i < tf.shape(xs)[0], body, (1, first))[1]

    return [
        ms(lambda: la.fit(train)),
        ms(lambda: fit_curvature(builder, batches())),
        ms(lambda: [(lik.prepare_targets(yb, 10, la._dtype), tf.constant(w))
                    for _, yb, w in batches().weighted()]),
        ms(lambda: [run(*item) for item in items]),
        ms(sums),
        ms(lambda: la._factorize(la._curvature)),
        ms(_fit_arithmetic(la, train)),
        ms(lambda: loop(xs, ys)),
    ]


if __name__ == "__main__":
    main()
