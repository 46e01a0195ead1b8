"""Weights used outside their layer's call (shared, tied weights), against brute force.

A layer with a Kronecker rule called once is factored: its rows are ``a_n ⊗ delta_n`` of its
own call. When its weights also reach the output elsewhere (an embedding table reused as the
output projection, a kernel read in the model's ``call`` or held by another layer), those
rows miss a path: such layers take autodiff rows instead (full, diag, the GLM predictive) or a
diagonal block (kron), and the last-layer closed form is refused. References: dense GGNs and
Jacobians from ``laplace_tf.testing`` (autodiff through the whole model, float64).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from models import F64

import laplace_tf as ltf
from laplace_tf import testing
from laplace_tf.likelihoods import get_likelihood

L = keras.layers
EXACT = {"rtol": 1e-9, "atol": 1e-11}


class AddBias(L.Layer):
    def build(self, shape):
        self.b = self.add_weight(shape=(shape[-1],), initializer="random_normal", name="b")

    def call(self, x):
        return x + self.b


class TiedAutoencoder(keras.Model):
    """A decoder that reuses the encoder's kernel, transposed, in the model's call."""

    def __init__(self):
        super().__init__(dtype=F64)
        self.encoder = L.Dense(2, activation="tanh", dtype=F64)
        self.bias = AddBias(dtype=F64)

    def call(self, x):
        return self.bias(self.encoder(x) @ tf.transpose(self.encoder.kernel))


class TiedLanguageModel(keras.Model):
    """Logits ``h E^T`` with ``E`` the embedding table (weight tying)."""

    def __init__(self):
        super().__init__(dtype=F64)
        self.embedding = L.Embedding(5, 3, dtype=F64)
        self.hidden = L.Dense(3, activation="tanh", dtype=F64)

    def call(self, tokens):
        return self.hidden(self.embedding(tokens)) @ keras.ops.transpose(self.embedding.embeddings)


class TransposedKernel(L.Layer):
    """Holds another layer's kernel as an attribute and applies it transposed."""

    def __init__(self, kernel, **kwargs):
        super().__init__(**kwargs)
        self.kernel = kernel

    def build(self, shape):
        self.b = self.add_weight(shape=(self.kernel.shape[0],), initializer="random_normal",
                                 name="b")

    def call(self, h):
        return h @ keras.ops.transpose(self.kernel) + self.b


class HeadReadInBody(keras.Model):
    """The head's kernel is also applied to the inputs before the body."""

    def __init__(self):
        super().__init__(dtype=F64)
        self.body = L.Dense(2, activation="tanh", dtype=F64)
        self.head = L.Dense(2, dtype=F64)

    def call(self, x):
        if not self.head.built:
            self.head.build((None, 2))
        return self.head(self.body(tf.tanh(x @ self.head.kernel)))


# each case: model, likelihood, x, y, and how many leading weights have diagonal blocks under
# "kron" (the shared layers, and layers without a Kronecker rule)


def _tied_autoencoder():
    keras.utils.set_random_seed(0)
    model = TiedAutoencoder()
    model(np.zeros((1, 3)))
    x = np.random.default_rng(0).normal(size=(4, 3))
    return model, "regression", x, np.random.default_rng(1).normal(size=(4, 3)), 11


def _tied_language_model():
    keras.utils.set_random_seed(0)
    model = TiedLanguageModel()
    model(np.zeros((1,), "int32"))
    return model, "classification", np.array([0, 3, 1, 3], "int32"), np.array([2, 0, 4, 1]), 15


def _kernel_held_by_another_layer():
    keras.utils.set_random_seed(1)
    inputs = keras.Input((3,), dtype=F64)
    encoder = L.Dense(2, activation="tanh", dtype=F64)
    hidden = encoder(inputs)  # builds the kernel
    outputs = TransposedKernel(encoder.kernel, dtype=F64)(hidden)
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(0).normal(size=(3, 3))
    return model, "regression", x, x.copy(), 11


CASES = {"tied_autoencoder": _tied_autoencoder, "tied_language_model": _tied_language_model,
         "kernel_held_by_another_layer": _kernel_held_by_another_layer}


@pytest.mark.parametrize("structure", ["full", "diag", "kron"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_curvature_of_shared_weights_is_the_ggn(case, structure):
    model, likelihood, x, y, diagonal = CASES[case]()
    la = ltf.Laplace(model, likelihood, subset_of_weights="all", hessian_structure=structure,
                     prior_precision=1.0)
    la.fit((x, y))
    logit_model = testing.subset_of(model)
    prepared = get_likelihood(likelihood).prepare_targets(
        y, int(model(x[:1]).shape[-1]), tf.float64)
    ggn = testing.brute_force_ggn(logit_model, get_likelihood(likelihood), tf.constant(x), prepared)
    precision = la.posterior_precision.to_dense().numpy() - np.eye(la.n_params)
    if structure == "full":
        np.testing.assert_allclose(precision, ggn, **EXACT)
        covariance = np.linalg.inv(ggn + np.eye(la.n_params))
        jacobians = testing.brute_force_jacobians(logit_model, tf.constant(x))
        np.testing.assert_allclose(la.functional_variance(x).numpy(),
                                   testing.dense_functional_variance(jacobians, covariance),
                                   **EXACT)
    else:  # shared layers have diagonal blocks: the exact diagonal
        size = la.n_params if structure == "diag" else diagonal
        np.testing.assert_allclose(np.diag(precision)[:size], np.diag(ggn)[:size], **EXACT)


def test_a_head_whose_kernel_is_used_in_the_body_is_refused_as_last_layer():
    keras.utils.set_random_seed(0)
    model = HeadReadInBody()
    model(np.zeros((1, 2)))
    x = np.random.default_rng(0).normal(size=(4, 2))
    la = ltf.Laplace(model, "regression", subset_of_weights="last_layer")
    with pytest.raises(ValueError, match="also used outside its call"):
        la.fit((x, x))
