"""Benchmark of prior tuning: 100 marglik steps against the curvature fit they reuse.

Run with ``python benchmarks/posterior.py``. Problem: an MLP 64 -> 300 -> 256 -> 10 (tanh,
99,126 weights, float32) on 5,000 random inputs with random class labels. For every
(subset, structure) the benchmark times, on a fresh ``PosteriorLaplace``:

* ``fit``: ``la.fit(data)`` (curvature over the data + factorisation), as a user runs it;
* ``marglik``: ``la.optimize_prior_precision(method="marglik", n_steps=100)`` (Adam on the
  log prior precision in one compiled step, tracing included, no curvature recomputed);

and prints ``marglik / fit``; then ``again``: the same 100 steps once more (the compiled loop
is reused while the curvature is unchanged, so this is the cost without tracing). Target: at most 1x for "kron" and "diag" (tuning must cost
less than the curvature it reuses). Full is run on the last layer (2,570 weights): a dense
posterior over 99k weights would need 39 GB. Times are medians over ``REPEATS`` runs.
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from laplace_tf.posterior import PosteriorLaplace  # noqa: E402

N_DATA, N_INPUTS, HIDDEN, N_CLASSES = 5000, 64, (300, 256), 10
N_STEPS, REPEATS, BATCH_SIZE = 100, 3, 500
CASES = [("all", "kron"), ("all", "diag"), ("last_layer", "full"), ("last_layer", "kron"),
         ("last_layer", "diag")]


def problem(seed: int = 0):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((N_INPUTS,))]
    layers += [keras.layers.Dense(width, "tanh") for width in HIDDEN]
    layers += [keras.layers.Dense(N_CLASSES)]
    model = keras.Sequential(layers)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N_DATA, N_INPUTS)).astype(np.float32)
    y = rng.integers(0, N_CLASSES, N_DATA)
    return model, (x, y)


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_case(model, data, subset: str, structure: str) -> tuple[int, float, float, float]:
    """Median fit, first and repeated 100-step marglik times of fresh posteriors."""
    fits, tunes, agains = [], [], []
    for _ in range(REPEATS):
        la = PosteriorLaplace(model, "classification", subset, structure,
                              batch_size=BATCH_SIZE, progress=False)
        fits.append(seconds(lambda la=la: la.fit(data)))
        for times in (tunes, agains):
            times.append(seconds(lambda la=la: la.optimize_prior_precision(
                method="marglik", n_steps=N_STEPS, progress=False)))
    return la.n_params, *(statistics.median(t) for t in (fits, tunes, agains))


def main() -> None:
    model, data = problem()
    print(f"MLP {N_INPUTS}-{'-'.join(map(str, HIDDEN))}-{N_CLASSES}: {model.count_params():,} "
          f"weights, {N_DATA:,} inputs, {N_STEPS} marglik steps, median of {REPEATS}")
    print(f"{'subset':<11}{'structure':<10}{'P':>8}{'fit s':>9}{'marglik s':>11}{'ratio':>8}"
          f"{'again s':>10}")
    for subset, structure in CASES:
        n_params, fit, tune, again = run_case(model, data, subset, structure)
        print(f"{subset:<11}{structure:<10}{n_params:>8,}{fit:>9.3f}{tune:>11.3f}"
              f"{tune / fit:>7.2f}x{again:>10.3f}")


if __name__ == "__main__":
    main()
