"""Benchmark of the functional (GP) Laplace: its GLM predictive against the full structure's.

Run with ``python benchmarks/gp.py`` (``--quick`` for a smaller, faster check). Float32 MLPs
``32 - h - 10`` (tanh; ``P = 43 h + 10`` weights, ``K = 10`` classes) with random weights (the
timing does not depend on training), fitted on 2 000 random examples; the GP's context is
``n_context = 1 000`` of them (``10 000`` root rows). Timed: the GLM predictive (probit) of
1 000 inputs in batches of 256, best of ``--repeats`` after a warm-up, and each fit once.

* At ``P ~ 3.5k`` (``h = 81``) the GP against ``hessian_structure="full"`` (target:
  predictive <= 10x the full structure's). Here ``n_context K > P``: the GP keeps the
  ``P x P`` QR factor of its rows, so its predictive works with ``P`` directions, as the full
  one.
* The dependence on ``P``: the GP at two widths with a context of fewer rows than weights
  (``--dual-context``, default 100 examples = 1 000 rows), where the GP is in its dual form and
  every cost beyond the Jacobians is that of ``1 000 x 1 000`` matrices; the full structure's
  predictive and fit at the same widths for comparison (its ``P x P`` covariance grows as
  ``P^2``).

Measured (2 CPU cores shared with other jobs, load average 4 to 6; float32):

====================  ======  ======  =======  ===========
case                  P       rank    fit [s]  predict [s]
====================  ======  ======  =======  ===========
full                  3,493   -       57.9     3.02
gp n_context=1000     3,493   3,493   175.9    2.42 (0.80x full: target <= 10x met)
gp n_context=100      3,493   1,000   9.9      0.56
full                  3,493   -       35.5     3.11
gp n_context=100      13,942  1,000   17.3     2.51
====================  ======  ======  =======  ===========

P grows 4.0x: the GP predictive 4.5x (the Jacobians, linear in P). The fit of the context of
10 000 rows over 3 493 weights is the rows' QR factor (78 s alone, float64) and the factor's
eigendecomposition of a ``P x P`` Gram matrix (85 s, as the full structure's): for a context of
more rows than weights the full structure fits faster; the GP pays off with fewer rows.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from laplace_tf.predictive import Laplace  # noqa: E402

BATCH = 256
TARGET = 10.0  # GP predictive / full predictive at P ~ 3.5k


def mlp(hidden: int) -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((32,)), keras.layers.Dense(hidden, "tanh"),
                             keras.layers.Dense(10)])


def fitted(model, structure: str, train, n_context: int | None = None) -> tuple[Laplace, float]:
    options = {"n_context": n_context, "seed": 0} if structure == "gp" else {}
    la = Laplace(model, "classification", "all", structure, progress=False, **options)
    start = time.perf_counter()
    la.fit(train, batch_size=BATCH)
    return la, time.perf_counter() - start


def predict_seconds(la: Laplace, x, repeats: int) -> float:
    """Best seconds of the GLM predictive over ``x`` (after one warm-up call)."""
    la(x, batch_size=BATCH).numpy()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        la(x, batch_size=BATCH).numpy()
        times.append(time.perf_counter() - start)
    return min(times)


def row(label: str, la: Laplace, fit: float, predict: float, ratio: str = "") -> None:
    print(f"{label:<28} | {la.n_params:>7,} | {_rank(la):>6} | "
          f"{fit:>8.1f} | {predict:>11.3f} | {ratio}")


def _rank(la: Laplace) -> str:
    rank = getattr(la.curvature.blocks[0], "rank", None)
    return "-" if rank is None else str(rank)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n_context 200, widths 40 and 160")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dual-context", type=int, default=100,
                        help="context examples of the P-dependence runs")
    args = parser.parse_args()
    n_context, widths = (200, (20, 80)) if args.quick else (1000, (81, 324))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1000, 32)).astype(np.float32)
    train = (rng.normal(size=(2000, 32)).astype(np.float32), rng.integers(0, 10, size=2000))
    print(f"GLM predictive of {len(x)} inputs (batches of {BATCH}), float32, TensorFlow "
          f"{tf.__version__}, {os.cpu_count()} CPU cores (load average "
          f"{os.getloadavg()[0]:.1f}); fits on {len(train[1])} examples, best of {args.repeats}")
    header = (f"{'case':<28} | {'P':>7} | {'rank':>6} | {'fit [s]':>8} | {'predict [s]':>11} | "
              "ratio")
    print(header)
    print("-" * len(header))

    model = mlp(widths[0])
    full, full_fit = fitted(model, "full", train)
    full_predict = predict_seconds(full, x, args.repeats)
    row("full", full, full_fit, full_predict)
    gp, gp_fit = fitted(model, "gp", train, n_context)
    gp_predict = predict_seconds(gp, x, args.repeats)
    ratio = gp_predict / full_predict
    row(f"gp n_context={n_context}", gp, gp_fit, gp_predict,
        f"{ratio:.2f}x full (target <= {TARGET:g}x: {'met' if ratio <= TARGET else 'MISSED'})")

    print(f"dependence on P: context of {args.dual_context} examples "
          f"({args.dual_context * 10} rows)")
    times = {}
    for hidden in widths:
        model = mlp(hidden)
        gp, gp_fit = fitted(model, "gp", train, args.dual_context)
        times["gp", hidden] = predict_seconds(gp, x, args.repeats)
        row(f"gp n_context={args.dual_context}", gp, gp_fit, times["gp", hidden])
        if hidden == widths[-1] and not args.quick:
            continue  # the full structure's P x P eigendecomposition: minutes at P ~ 14k
        full, full_fit = fitted(model, "full", train)
        times["full", hidden] = predict_seconds(full, x, args.repeats)
        row("full", full, full_fit, times["full", hidden])
    small, large = widths
    growth = 43 * large + 10, 43 * small + 10
    print(f"P grows {growth[0] / growth[1]:.1f}x: the GP predictive "
          f"{times['gp', large] / times['gp', small]:.1f}x"
          + (f", the full one {times['full', large] / times['full', small]:.1f}x"
             if ("full", large) in times else ""))


if __name__ == "__main__":
    main()
