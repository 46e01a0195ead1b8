"""Benchmark of the predictive: time per structure divided by one forward pass.

Run with ``python benchmarks/predictive.py`` (``--quick`` for a smaller, faster check).
Two float32 networks with random weights (the timing does not depend on training), fitted
on 2 000 random examples (fit time not measured), predicting ``N = 5 000`` inputs:

* ``mlp10``:  MLP 784-256-256-10 (270k weights);
* ``mlp500``: MLP 784-256-256-500 (many classes; its last layer has 128k weights);
* ``mlp1000``: MLP 784-256-256-1000, probit against ``link_approx="mc"`` (100 samples).

``--classes 1000 --inputs 2000`` runs only the 1 000-class cases on 2 000 inputs.

Every predictive runs over the inputs in batches of 256; the reference is the plain network
(``LogitModel``, compiled) over the same batches of the same inputs. Ratios are medians of
repeated, warmed-up timings, interleaved with the reference so that machine load affects
both alike. Targets: last-layer GLM <= 2x (Kronecker and diagonal posteriors), all-
weights Kronecker GLM <= 20x, nn with 100 samples <= 120x.

A dense last-layer covariance is reported without a target: ``diag(J Sigma J^T)`` needs the
``K`` blocks ``Sigma[(., k), (., k)]`` contracted with the features, ``din^2 K`` operations per
input (660k for this network against 270k for its whole forward pass).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from laplace_tf.batches import iterate_inputs  # noqa: E402
from laplace_tf.predictive import Laplace  # noqa: E402

BATCH = 256
TARGETS = {"last_layer glm": 2.0, "all kron glm": 20.0, "nn 100": 120.0}


def mlp(n_classes: int) -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((784,)), keras.layers.Dense(256, "relu"), keras.layers.Dense(256, "relu"),
        keras.layers.Dense(n_classes),
    ])


def fitted(model: keras.Model, subset: str, structure: str, train) -> Laplace:
    la = Laplace(model, "classification", subset_of_weights=subset,
                 hessian_structure=structure, prior_precision=1.0, progress=False)
    la.fit(train, batch_size=BATCH)
    return la


def interleaved(reference: Callable, fn: Callable, repeats: int) -> tuple[float, float]:
    """Best seconds of ``reference`` and ``fn``, timed alternately after one warm-up.

    The minimum is the run least disturbed by other processes (the machine is shared)."""
    reference(), fn()
    ref_times, times = [], []
    for _ in range(repeats):
        for call, out in ((reference, ref_times), (fn, times)):
            start = time.perf_counter()
            call()
            out.append(time.perf_counter() - start)
    return min(ref_times), min(times)


def cases(quick: bool) -> list[tuple[str, int, str, str, dict]]:
    """(label, classes, subset, structure, call kwargs)."""
    glm = {"pred_type": "glm", "link_approx": "probit"}
    rows = [
        ("last_layer glm", 10, "last_layer", "kron", glm),
        ("last_layer glm", 10, "last_layer", "diag", glm),
        ("last_layer full glm", 10, "last_layer", "full", glm),
        ("last_layer glm", 500, "last_layer", "kron", glm),
        ("last_layer glm", 500, "last_layer", "diag", glm),
        ("all kron glm", 10, "all", "kron", glm),
        ("all diag glm", 10, "all", "diag", glm),
        ("nn 100", 10, "all", "kron", {"pred_type": "nn", "n_samples": 100, "seed": 0}),
        ("nn 100", 500, "last_layer", "kron", {"pred_type": "nn", "n_samples": 100, "seed": 0}),
        ("last_layer mc 100", 10, "last_layer", "kron",
         {"link_approx": "mc", "n_samples": 100, "seed": 0}),
        ("last_layer glm", 1000, "last_layer", "kron", glm),
        ("last_layer mc 100", 1000, "last_layer", "kron",
         {"link_approx": "mc", "n_samples": 100, "seed": 0}),
    ]
    return [r for r in rows if r[1] == 10] if quick else rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 classes only, 2 000 inputs")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--classes", type=int, default=None,
                        help="only the cases with this many classes (10, 500 or 1000)")
    parser.add_argument("--inputs", type=int, default=None, help="number of inputs N")
    args = parser.parse_args()
    n_inputs = args.inputs or (2000 if args.quick else 5000)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n_inputs, 784)).astype(np.float32)
    x_train = rng.normal(size=(2000, 784)).astype(np.float32)
    print(
        f"N = {n_inputs} inputs in batches of {BATCH}, float32, TensorFlow {tf.__version__}, "
        f"{os.cpu_count()} CPU cores (load average {os.getloadavg()[0]:.1f}); best of "
        f"{args.repeats}, interleaved with the forward pass"
    )
    header = f"{'case':<20} | {'classes':>7} | {'subset/structure':<17} | {'time [s]':>8} | " \
             f"{'forward [s]':>11} | {'ratio':>7} | target"
    print(header)
    print("-" * len(header))
    models: dict[int, keras.Model] = {}
    worst: dict[str, float] = {}
    for label, n_classes, subset, structure, kwargs in cases(args.quick):
        if args.classes is not None and n_classes != args.classes:
            continue
        model = models.setdefault(n_classes, mlp(n_classes))
        train = (x_train, rng.integers(0, n_classes, size=len(x_train)))
        la = fitted(model, subset, structure, train)
        forward_step = tf.function(la.logit_model, reduce_retracing=True)

        def forward(step=forward_step):
            for xb in iterate_inputs(x, BATCH, tf.float32):
                step(xb).numpy()

        def predict(la=la, kwargs=kwargs):
            la(x, batch_size=BATCH, **kwargs).numpy()

        reference, seconds = interleaved(forward, predict, args.repeats)
        ratio = seconds / reference
        target = TARGETS.get(label)
        if target is not None:
            worst[label] = max(worst.get(label, 0.0), ratio)
        verdict = "" if target is None else f"<= {target:g}x " + ("met" if ratio <= target else
                                                                   "MISSED")
        print(f"{label:<20} | {n_classes:>7} | {subset + '/' + structure:<17} | {seconds:>8.3f} | "
              f"{reference:>11.4f} | {ratio:>6.1f}x | {verdict}")
    for label, ratio in worst.items():
        status = "met" if ratio <= TARGETS[label] else "MISSED"
        print(f"target {label} <= {TARGETS[label]:g}x (worst case): {ratio:.1f}x ({status})")


if __name__ == "__main__":
    main()
