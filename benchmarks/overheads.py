"""Benchmark of fixed call overheads: every public operation cold and warm, against its arithmetic.

Run with ``python benchmarks/overheads.py`` (a few minutes on 2 cores; ``--quick`` for the
small case only, ``--device /GPU:0`` to run under ``tf.device``). Two float32 problems:

* ``small``: MLP 64-50-10 (ReLU) on scikit-learn's digits, 1,200 training and 597 test
  inputs (the reference case; random weights, the timing does not depend on training);
* ``bench``: the benchmark suite's MLP 64-256-256-10 (``run_all.py``), 4,000 random training
  and 1,000 test inputs.

For every (subset, structure) in :data:`PAIRS` and every operation in :data:`OPERATIONS`:

* ``first``: the operation's first call on a fresh ``Laplace`` when no ``Laplace`` of this
  (subset, structure) has run in the process yet (another pair's has: the process is warm);
* ``cold``: its first call on a second fresh ``Laplace`` of the same pair and model;
* ``warm``: the median of :data:`REPEATS` further calls on that second object;
* ``arith``: the arithmetic, the same work as one compiled ``tf.function`` (warm, median):
  ``la.sample`` and ``la.log_marginal_likelihood`` traced into one graph; for the
  predictives (``glm``, ``mc``, ``nn``) the compiled per-batch steps the call runs, with the
  same inputs, all in one function, plus the weight draws the call takes (``nn``, and ``mc``
  of a last-layer posterior: ``la.sample`` compiled, as above); for ``fit`` the builder's
  batch sums over all batches in one function (written out, so TensorFlow may run two
  batches at once; the fit calls its step batch by batch, in the memory of one), plus laying
  the sums out as blocks (``builder.finish``: the last-layer full structure's dense matrix)
  and the factorisation of the summed curvature that the fit makes (``la._factorize``: the
  Kronecker factors' eigendecompositions, the full structure's Cholesky check of positive
  semi-definiteness);
  for ``marglik`` the compiled Adam loop of the tuner alone; for ``gridsearch`` the grid's
  size times (covariance at a new prior + GLM on the validation inputs + evidence): the
  covariance is formed anew for every value (for the full structure a Cholesky
  factorisation and a triangular inverse of the precision, the grid's floor).

Printed per row: the four times (ms), ``warm - arith`` and ``cold - warm``, against the
targets: warm <= arith + 10 ms, cold <= warm + 250 ms, marglik (scalar prior,
100 steps) <= 20 ms for diag, kron and last-layer structures.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from _device import device_scope  # noqa: E402
from _timing import median_seconds, seconds  # noqa: E402

import laplace_tf as ltf  # noqa: E402

PAIRS = [("last_layer", "diag"), ("last_layer", "kron"), ("last_layer", "full"),
         ("all", "diag"), ("all", "kron")]
OPERATIONS = ("fit", "lml", "sample", "glm", "mc", "nn", "marglik", "gridsearch")
REPEATS, GRID, BATCH = 3, 10, 256
WARM_SLACK, COLD_SLACK, MARGLIK_TARGET = 0.010, 0.250, 0.020


def problem(name: str):
    """(model, (x_train, y_train), (x_test, y_test)) of ``name``."""
    keras.utils.set_random_seed(0)
    if name == "small":
        data = ltf.data.digits()
        train, test = data.train, data.test
        hidden, (x, y), (xt, yt) = (50,), (train.x[:1200], train.y[:1200]), (test.x, test.y)
    else:
        rng = np.random.default_rng(0)
        x = rng.normal(size=(5000, 64)).astype(np.float32)
        y = rng.integers(0, 10, 5000)
        hidden, (x, y), (xt, yt) = (256, 256), (x[:4000], y[:4000]), (x[4000:], y[4000:])
    layers = [keras.Input((64,))] + [keras.layers.Dense(h, "relu") for h in hidden]
    return keras.Sequential([*layers, keras.layers.Dense(10)]), (x, y), (xt, yt)


def calls(la, train, test) -> dict:
    """The public operations, as callables on ``la``."""
    xt, yt = test
    grid = np.logspace(-2, 2, GRID)
    return {
        "fit": lambda: la.fit(train),
        "lml": lambda: la.log_marginal_likelihood().numpy(),
        "sample": lambda: la.sample(100, seed=0).numpy(),
        "glm": lambda: la(xt).numpy(),
        "mc": lambda: la(xt, link_approx="mc", n_samples=100, seed=0).numpy(),
        "nn": lambda: la(xt, pred_type="nn", n_samples=20, seed=0).numpy(),
        "marglik": lambda: la.optimize_prior_precision(method="marglik", progress=False),
        "gridsearch": lambda: la.optimize_prior_precision(
            method="gridsearch", val_data=(xt, yt), grid=grid, progress=False),
    }


def _fit_arithmetic(la, train):
    """The builder's batch sums over all batches in one compiled function."""
    builder = la._builder()
    x, y = train
    likelihood = builder.likelihood
    batches = []
    for i in range(0, len(y), BATCH):
        xb = tf.constant(x[i:i + BATCH])
        yb = likelihood.prepare_targets(y[i:i + BATCH], 10, tf.float32)
        batches.append((xb, yb))

    @tf.function
    def run():
        total = None
        for xb, yb in batches:
            sums, logits = builder.batch_sums(xb, yb, None)
            total = sums if total is None else tf.nest.map_structure(tf.add, total, sums)
        return total

    return run


def _batch_arithmetic(la, call):
    """The per-batch steps a predictive call runs (same compiled steps, same inputs), all in
    one compiled function: what is left of the call without its Python and eager glue."""
    recorded = []
    over_batches = la._over_batches

    def recording(x, batch_size, step):
        def record(xb, index):
            recorded.append((step, xb, index))
            return step(xb, index)
        return over_batches(x, batch_size, record)

    la._over_batches = recording
    try:
        call()
    finally:
        del la._over_batches
    return tf.function(lambda: [step(xb, index) for step, xb, index in recorded])


def _covariance_arithmetic(la) -> float:
    """Seconds to form the covariance blocks at a new scalar prior, compiled, in the form
    the GLM predictive contracts (``FunctionalVariance.prepare``), as a grid search does."""
    fv = la._functional(la.covariance_blocks())
    factors, c = la._require_fit("arithmetic").factors, la._multiplier()

    @tf.function
    def covariance(prior):
        return fv.prepare([f.covariance(c, p) for f, p in zip(
            factors, la._block_priors(prior), strict=True)], True)

    prior = tf.constant(2.0, la.subset.dtype)
    covariance(prior)
    return median_seconds(lambda: covariance(prior), REPEATS)


def arithmetic(la, train, test) -> dict:
    """Compiled stand-ins of the operations (see the module docstring)."""
    xt = test[0]
    fns = {
        "fit": _fit_arithmetic(la, train),
        "lml": tf.function(lambda: la.log_marginal_likelihood()),
        "sample": tf.function(lambda: la.sample(100, seed=0)),
        "glm": _batch_arithmetic(la, lambda: la(xt)),
        "mc": _batch_arithmetic(la, lambda: la(xt, link_approx="mc", n_samples=100, seed=0)),
        "nn": _batch_arithmetic(la, lambda: la(xt, pred_type="nn", n_samples=20, seed=0)),
    }
    out = {}
    for name, fn in fns.items():
        try:
            fn()
            out[name] = median_seconds(fn, REPEATS)
        except Exception as err:  # an operation that cannot be traced whole
            print(f"  ({name}: no compiled stand-in: {type(err).__name__})", file=sys.stderr)
            out[name] = float("nan")
    draws = {n: tf.function(lambda n=n: la.sample(n, seed=0)) for n in (20, 100)}
    for n, fn in draws.items():
        fn()
        draws[n] = median_seconds(fn, REPEATS)
    out["nn"] += draws[20]
    if la.subset_of_weights == "last_layer":
        out["mc"] += draws[100]
    tuners = [t for key, t in la._tuners.items() if key[0] != "gridsearch"]
    if tuners:
        ascent = tuners[0][0]
        lr = tf.constant(0.1, la.subset.dtype)
        out["marglik"] = median_seconds(lambda: ascent._run(tf.constant(101), lr), REPEATS)
    else:
        out["marglik"] = float("nan")
    sums = fns["fit"]()
    out["fit"] += median_seconds(lambda: la._builder().finish(sums), REPEATS)
    out["fit"] += median_seconds(lambda: la._factorize(la.curvature), REPEATS)
    out["gridsearch"] = GRID * (out["glm"] + out["lml"] + _covariance_arithmetic(la))
    return out


def measure(name: str) -> list[dict]:
    model, train, test = problem(name)
    rows = []
    for subset, structure in PAIRS:
        def fresh(subset=subset, structure=structure):
            return ltf.Laplace(model, "classification", subset_of_weights=subset,
                               hessian_structure=structure, batch_size=BATCH, progress=False)

        first_la, la = fresh(), fresh()
        first_calls, cold_calls = calls(first_la, train, test), calls(la, train, test)
        times = {}
        for op in OPERATIONS:
            first = seconds(first_calls[op])
            cold = seconds(cold_calls[op])
            warm = median_seconds(cold_calls[op], REPEATS)
            times[op] = (first, cold, warm)
        la.prior_precision = 1.0
        arith = arithmetic(la, train, test)
        for op in OPERATIONS:
            first, cold, warm = times[op]
            rows.append(dict(problem=name, subset=subset, structure=structure, op=op,
                             first=first, cold=cold, warm=warm, arith=arith[op]))
        print(f"  {name} {subset}/{structure} done", file=sys.stderr, flush=True)
    return rows


def verdict(row: dict) -> str:
    misses = []
    if not row["warm"] - row["arith"] <= WARM_SLACK:
        misses.append("warm")
    if row["cold"] - row["warm"] > COLD_SLACK:
        misses.append("cold")
    if row["op"] == "marglik" and row["warm"] > MARGLIK_TARGET and row["structure"] != "full":
        misses.append("marglik")
    if row["op"] == "marglik" and row["subset"] == "last_layer" and row["warm"] > MARGLIK_TARGET:
        misses.append("marglik")
    return "ok" if not misses else "MISSED " + ",".join(dict.fromkeys(misses))


def table(rows: list[dict]) -> str:
    lines = ["| problem | pair | op | first ms | cold ms | warm ms | arith ms | warm - arith | "
             "cold - warm | targets |", "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        ms = {k: 1000 * r[k] for k in ("first", "cold", "warm", "arith")}
        lines.append(
            f"| {r['problem']} | {r['subset']}/{r['structure']} | {r['op']} | {ms['first']:.1f} | "
            f"{ms['cold']:.1f} | {ms['warm']:.1f} | {ms['arith']:.1f} | "
            f"{ms['warm'] - ms['arith']:.1f} | {ms['cold'] - ms['warm']:.1f} | {verdict(r)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small case only")
    parser.add_argument("--device", default=None, help="e.g. /GPU:0 (default: TensorFlow's)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = []
    with device_scope(args.device):
        for name in ("small",) if args.quick else ("small", "bench"):
            rows += measure(name)
    print(f"laplace_tf {ltf.__file__}, TensorFlow {tf.__version__}, {os.cpu_count()} CPUs, "
          f"device {args.device or 'default'}, {time.perf_counter() - start:.0f} s")
    print(table(rows))


if __name__ == "__main__":
    main()
