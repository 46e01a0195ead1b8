"""Subprocess entry point: peak memory of a real Laplace fit against the memory model.

    python peak_memory.py OUT.json STRUCTURE SUBSET [--hidden H]

In a fresh process: builds a float64 MLP (``INPUTS -> H tanh -> OUTPUTS``) and classification
data, resets the peak resident set size (``/proc/self/clear_refs``), fits
``laplace_tf.Laplace(model, "classification", subset_of_weights=SUBSET,
hessian_structure=STRUCTURE)`` with batches of :data:`BATCH_SIZE`, makes one GLM prediction
(which builds the posterior covariance), and writes the growth of the peak RSS (``VmHWM``
minus ``VmRSS`` before the fit) and :func:`~laplace_tf.curvature.memory.estimate_memory`'s
estimate to ``OUT.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

INPUTS, OUTPUTS, N_EXAMPLES, BATCH_SIZE = 30, 10, 256, 128


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{field}:\s+(\d+)", status.read(), re.MULTILINE).group(1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("structure")
    parser.add_argument("subset")
    parser.add_argument("--hidden", type=int, default=60)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import keras
    import numpy as np

    import laplace_tf as ltf
    from laplace_tf.curvature.memory import estimate_memory

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((INPUTS,), dtype="float64"),
        keras.layers.Dense(args.hidden, "tanh", dtype="float64"),
        keras.layers.Dense(OUTPUTS, dtype="float64"),
    ])
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(N_EXAMPLES, INPUTS)), rng.integers(0, OUTPUTS, N_EXAMPLES)
    la = ltf.Laplace(model, "classification", subset_of_weights=args.subset,
                     hessian_structure=args.structure, batch_size=BATCH_SIZE, progress=False)
    estimate = estimate_memory(la.subset, args.structure, OUTPUTS, BATCH_SIZE,
                               subset_of_weights=args.subset)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # VmHWM := VmRSS
    before = _status_kib("VmRSS")
    la.fit((x, y))
    la(x[:BATCH_SIZE])
    growth = (_status_kib("VmHWM") - before) * 1024
    with open(args.out, "w") as out:
        json.dump({"growth_bytes": growth, "estimate_bytes": estimate.total_bytes,
                   "n_params": estimate.n_params, "estimate": str(estimate)}, out)


if __name__ == "__main__":
    main()
