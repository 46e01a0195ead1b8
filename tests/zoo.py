"""A zoo of small Keras models built the way practitioners build them (float32, random weights).

``ZOO`` maps a name to ``build(seed) -> (model, x, y)`` with a few inputs and class labels
(``N_CLASSES`` classes). The layers are the point, not the sizes: residual CNN with
BatchNormalization, transformer encoder, Embedding text classifier, LSTM / GRU, a
``keras.applications`` MobileNetV3Small (``weights=None``: no download), and nested
Functional sub-models.
"""

from __future__ import annotations

import keras
import numpy as np

N_CLASSES = 3
N_EXAMPLES = 12


def _labels(rng, n: int = N_EXAMPLES) -> np.ndarray:
    return rng.integers(0, N_CLASSES, n)


def resnet(seed: int = 0, n: int = N_EXAMPLES):
    """Conv -> BN -> ReLU, one residual block (two conv + BN, identity skip), pooling, Dense."""
    keras.utils.set_random_seed(seed)
    L = keras.layers
    inputs = keras.Input((8, 8, 3))
    h = L.ReLU()(L.BatchNormalization()(L.Conv2D(6, 3, padding="same", use_bias=False)(inputs)))
    r = L.ReLU()(L.BatchNormalization()(L.Conv2D(6, 3, padding="same", use_bias=False)(h)))
    r = L.BatchNormalization()(L.Conv2D(6, 3, padding="same", use_bias=False)(r))
    h = L.ReLU()(L.Add()([h, r]))
    outputs = L.Dense(N_CLASSES)(L.GlobalAveragePooling2D()(h))
    rng = np.random.default_rng(seed)
    return keras.Model(inputs, outputs), rng.normal(size=(n, 8, 8, 3)).astype("float32"), _labels(rng, n)


def transformer(seed: int = 0, n: int = N_EXAMPLES, length: int = 6, vocabulary: int = 11,
                width: int = 8):
    """Token + position Embeddings, one post-norm encoder block (MultiHeadAttention, LayerNorm,
    a Dense feed-forward), mean pooling and a Dense head. Positions are a second named input."""
    keras.utils.set_random_seed(seed)
    L = keras.layers
    tokens = keras.Input((length,), dtype="int32", name="tokens")
    positions = keras.Input((length,), dtype="int32", name="positions")
    h = L.Add()([L.Embedding(vocabulary, width)(tokens), L.Embedding(length, width)(positions)])
    attended = L.MultiHeadAttention(num_heads=2, key_dim=4)(h, h)
    h = L.LayerNormalization()(L.Add()([h, attended]))
    fed = L.Dense(width)(L.Dense(2 * width, activation="relu")(h))
    h = L.LayerNormalization()(L.Add()([h, fed]))
    outputs = L.Dense(N_CLASSES)(L.GlobalAveragePooling1D()(h))
    rng = np.random.default_rng(seed)
    x = {"tokens": rng.integers(0, vocabulary, (n, length)).astype("int32"),
         "positions": np.tile(np.arange(length, dtype="int32"), (n, 1))}
    return keras.Model({"tokens": tokens, "positions": positions}, outputs), x, _labels(rng, n)


def text(seed: int = 0, length: int = 7, vocabulary: int = 13):
    """Embedding -> GlobalAveragePooling1D -> Dense."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((length,), dtype="int32"), keras.layers.Embedding(vocabulary, 4),
        keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(N_CLASSES),
    ])
    rng = np.random.default_rng(seed)
    return model, rng.integers(0, vocabulary, (N_EXAMPLES, length)).astype("int32"), _labels(rng)


def _recurrent(layer):
    def build(seed: int = 0):
        keras.utils.set_random_seed(seed)
        model = keras.Sequential([keras.Input((5, 3)), layer(), keras.layers.Dense(N_CLASSES)])
        rng = np.random.default_rng(seed)
        return model, rng.normal(size=(N_EXAMPLES, 5, 3)).astype("float32"), _labels(rng)
    return build


def mobilenet(seed: int = 0):
    """``keras.applications.MobileNetV3Small`` (alpha 0.25, 32 x 32 inputs, no pretrained
    weights) as a feature extractor with a Dense head: Conv2D, DepthwiseConv2D,
    BatchNormalization, squeeze-and-excite, hard-swish."""
    keras.utils.set_random_seed(seed)
    base = keras.applications.MobileNetV3Small(
        input_shape=(32, 32, 3), alpha=0.25, weights=None, include_top=False, pooling="avg",
        include_preprocessing=False,
    )
    model = keras.Sequential([keras.Input((32, 32, 3)), base, keras.layers.Dense(N_CLASSES)])
    rng = np.random.default_rng(seed)
    return model, rng.normal(size=(N_EXAMPLES, 32, 32, 3)).astype("float32"), _labels(rng)


def nested(seed: int = 0):
    """A Functional model whose layers are Functional sub-models (an encoder, a head)."""
    keras.utils.set_random_seed(seed)
    L = keras.layers
    encoder_in = keras.Input((4,))
    encoder = keras.Model(encoder_in, L.Dense(5, activation="tanh")(L.Dense(6, activation="relu")(encoder_in)),
                          name="encoder")
    head_in = keras.Input((5,))
    head = keras.Model(head_in, L.Dense(N_CLASSES)(head_in), name="head")
    inputs = keras.Input((4,))
    rng = np.random.default_rng(seed)
    return keras.Model(inputs, head(encoder(inputs))), rng.normal(size=(N_EXAMPLES, 4)).astype("float32"), _labels(rng)


ZOO = {
    "resnet": resnet,
    "transformer": transformer,
    "text": text,
    "lstm": _recurrent(lambda: keras.layers.LSTM(4)),
    "gru": _recurrent(lambda: keras.layers.GRU(4)),
    "mobilenet": mobilenet,
    "nested": nested,
}

RECURRENT = ("lstm", "gru")
"""Models whose recurrent weights have no Kronecker rule (their diagonal fallback is expected)."""
