"""Subprocess entry point: a Laplace fit of a self-attention classifier, checked by brute force.

    python attention_fit.py STRUCTURE CURVATURE DTYPE

In a fresh process (a native crash inside TensorFlow must fail one test, not end the test
run): builds ``Input((T, D)) -> MultiHeadAttention(2 heads)(x, x) -> GlobalAveragePooling1D ->
Dense(3)``, fits ``laplace_tf.Laplace(model, "classification", subset_of_weights="all",
hessian_structure=STRUCTURE, curvature=CURVATURE)`` in two batches and predicts with the GLM
predictive. It prints one JSON line: the largest relative error of the curvature against the
brute-force GGN / EF of :mod:`laplace_tf.testing` (its diagonal for ``"diag"``; ``null`` for
``"kron"``, whose blocks are not the GGN) and the sum of the predicted probabilities.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

N_EXAMPLES, TIME_STEPS, FEATURES, N_CLASSES = 64, 12, 16, 3  # the sizes of a crash seen in the wild


def main(structure: str, curvature: str, dtype: str) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import keras
    import numpy as np
    import tensorflow as tf

    from laplace_tf import Laplace, testing

    keras.utils.set_random_seed(0)
    inputs = keras.Input((TIME_STEPS, FEATURES), dtype=dtype)
    hidden = keras.layers.MultiHeadAttention(num_heads=2, key_dim=8, dtype=dtype)(inputs, inputs)
    hidden = keras.layers.GlobalAveragePooling1D(dtype=dtype)(hidden)
    model = keras.Model(inputs, keras.layers.Dense(N_CLASSES, dtype=dtype)(hidden))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N_EXAMPLES, TIME_STEPS, FEATURES)).astype(dtype)
    y = np.arange(N_EXAMPLES) % N_CLASSES
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure,
                 curvature=curvature, batch_size=32, progress=False)
    la.fit((x, y))
    probabilities = la(x)
    error = None
    if structure != "kron":
        reference = (testing.brute_force_ggn if curvature == "ggn" else testing.brute_force_ef)(
            la.logit_model, la.likelihood, tf.constant(x), tf.one_hot(y, N_CLASSES, dtype=dtype))
        (block,) = la.curvature.blocks
        got = block.diagonal.numpy() if structure == "diag" else block.matrix.numpy()
        expected = np.diag(reference) if structure == "diag" else reference
        error = float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))
    print(json.dumps({"error": error, "probability_sum": float(np.sum(probabilities))}))


if __name__ == "__main__":
    main(*sys.argv[1:])
