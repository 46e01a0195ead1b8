"""The memory estimate of all-weights Kronecker fits against their measured peak, per model.

Run with ``python benchmarks/memory_rules.py`` (a few minutes). Each model is measured in a
fresh process: a throwaway fit of a one-layer model first (TensorFlow's runtime warms up; not
of the model itself, whose buffers the allocator would keep and reuse), then the peak resident set size is reset (``/proc/self/clear_refs``) and a new
``Laplace(model, "classification", "all", "kron").fit`` on ``2 B`` inputs in batches of ``B``
runs; **measured** is the growth of the peak over the resident size before that fit,
**estimate** ``la.memory_estimate().total_bytes`` (:mod:`laplace_tf.curvature.memory`).

The models are the zoo's (``tests/zoo.py``) at sizes where the fit's buffers, not
TensorFlow's traced graphs (tens of MiB, not in the estimate), are most of the growth:
a residual CNN with BatchNormalization (Conv2D, dense scale-and-shift blocks), a transformer
encoder (Embedding, EinsumDense inside MultiHeadAttention, LayerNormalization), an Embedding
text classifier, ``keras.applications.MobileNetV3Small`` (DepthwiseConv2D, BatchNorm), and a
convolution stack with a grouped Conv2D, DepthwiseConv2D, SeparableConv2D, Conv3D and
Conv2DTranspose.

Measured 2026-11-28 on 2 CPUs shared with other jobs (batch 128; MiB):

| model | weights | estimate | measured | measured / estimate |
|---|---:|---:|---:|---:|
| resnet (48 channels, 24 x 24) | 43,834 | 1109.4 | 1269.1 | 1.14 |
| transformer (48 tokens, width 64) | 47,835 | 44.5 | 99.1 | 2.23 |
| text (2,000 tokens, 64 a text) | 8,015 | 61.5 | 100.4 | 1.63 |
| mobilenet (MobileNetV3Small) | 100,883 | 122.3 | 314.4 | 2.57 |
| convs (grouped, depthwise, separable, 3D, transposed) | 31,842 | 616.8 | 860.8 | 1.40 |

Before the fix of 2026-11-28 the resnet's estimate was 664 MiB (ratio 1.8): a scale-and-shift
layer's exact block was counted as ``B R p`` numbers per batch, but the fit holds the
gradients of its whole output ``[R, B, locations, C]`` (and its normalised inputs), as large
as a convolution's; and an Embedding's rows were counted one-hot (``V`` numbers a token),
which only K-FAC-reduce forms. The rest of the gap of the small models is fixed: TensorFlow's
traced graphs of the fit (not in the estimate). Between batches of 32 and 256 the growth of the
measured peak over that of the estimate is 1.53 for the transformer (the attention's backward
intermediates, ``R`` times a training step's, are not counted) and 0.74 for the mobilenet;
the fixed part is about 40 MiB (transformer) and 220 MiB (mobilenet).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("resnet", "transformer", "text", "mobilenet", "convs")
N_CLASSES = 10


def _resnet(keras, width=48, size=24):
    """tests/zoo.py's residual CNN, wider and on larger images."""
    L = keras.layers
    inputs = keras.Input((size, size, 3))
    h = L.ReLU()(L.BatchNormalization()(L.Conv2D(width, 3, padding="same", use_bias=False)(inputs)))
    r = L.ReLU()(L.BatchNormalization()(L.Conv2D(width, 3, padding="same", use_bias=False)(h)))
    r = L.BatchNormalization()(L.Conv2D(width, 3, padding="same", use_bias=False)(r))
    h = L.ReLU()(L.Add()([h, r]))
    return keras.Model(inputs, L.Dense(N_CLASSES)(L.GlobalAveragePooling2D()(h)))


def _convs(keras, size=16):
    L = keras.layers
    inputs = keras.Input((size, size, 8))
    h = L.Conv2D(32, 3, padding="same", groups=4, activation="relu")(inputs)
    h = L.DepthwiseConv2D(3, padding="same", depth_multiplier=2, activation="relu")(h)
    h = L.SeparableConv2D(32, 3, padding="same", activation="relu")(h)
    h = L.Reshape((4, size, size // 4, 32))(h)
    h = L.Conv3D(16, 3, padding="same", activation="relu")(h)
    h = L.Reshape((size // 2, size // 2, 64))(h)
    h = L.Conv2DTranspose(24, 3, strides=2, padding="same", activation="relu")(h)
    return keras.Model(inputs, L.Dense(N_CLASSES)(L.GlobalAveragePooling2D()(h)))


def _problem(name: str, batch: int):
    """``(model, x, y)`` with ``2 batch`` inputs."""
    import keras
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from tests import zoo

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    n = 2 * batch
    if name == "transformer":
        model, x, _ = zoo.transformer(n=n, length=48, vocabulary=400, width=64)
    elif name == "text":
        model, _, _ = zoo.text(length=64, vocabulary=2000)
        x = rng.integers(0, 2000, (n, 64)).astype("int32")
    elif name == "mobilenet":
        model, _, _ = zoo.mobilenet()
        x = rng.normal(size=(n, 32, 32, 3)).astype("float32")
    else:
        model = _resnet(keras) if name == "resnet" else _convs(keras)
        x = rng.normal(size=(n, *model.input_shape[1:])).astype("float32")
    k = model.output_shape[-1]
    return model, x, rng.integers(0, k, n)


def _kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def measure(name: str, batch: int) -> dict:
    """In this process: the estimate and the measured growth of the peak (bytes)."""
    import gc

    import keras
    import numpy as np

    import laplace_tf as ltf

    small = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])  # warms TensorFlow up
    ltf.Laplace(small, "classification", "all", "kron", progress=False).fit(
        (np.ones((4, 3), "float32"), np.zeros(4, "int32")))
    model, x, y = _problem(name, batch)
    gc.collect()
    la = ltf.Laplace(model, "classification", "all", "kron", batch_size=batch, progress=False)
    estimate = la.memory_estimate()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    before = _kib("VmRSS")
    la.fit((x, y))
    la.posterior_precision  # noqa: B018  (the factors: eigendecompositions)
    growth = (_kib("VmHWM") - before) * 1024
    return {"model": name, "weights": model.count_params(), "batch": batch,
            "estimate": estimate.total_bytes, "measured": growth,
            "parts": {k: v for k, v in estimate.parts.items() if v}}


def main() -> None:
    batch = int(os.environ.get("BATCH", "128"))
    print(f"all-weights Kronecker GGN fit, float32, 2 batches of {batch}; MiB")
    print(f"{'model':<12}{'weights':>9}{'estimate':>10}{'measured':>10}{'measured/est':>14}"
          "  largest parts of the estimate")
    for name in MODELS:
        done = subprocess.run([sys.executable, __file__, name, str(batch)], capture_output=True,
                              text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        if done.returncode != 0:
            print(f"{name:<12} failed: {done.stderr.strip().splitlines()[-1]}")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        mib = 2.0**20
        parts = sorted(r["parts"].items(), key=lambda kv: -kv[1])[:3]
        print(f"{name:<12}{r['weights']:>9,}{r['estimate'] / mib:>10.1f}{r['measured'] / mib:>10.1f}"
              f"{r['measured'] / r['estimate']:>14.2f}  "
              + ", ".join(f"{k} {v / mib:.1f}" for k, v in parts))


if __name__ == "__main__":
    if len(sys.argv) == 3:
        sys.path.insert(0, str(ROOT))
        print(json.dumps(measure(sys.argv[1], int(sys.argv[2]))))
    else:
        main()
