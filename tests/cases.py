"""One table of test cases (models x likelihoods x structures) and their brute-force judges.

A :class:`Case` names a tiny float64 model, a likelihood, a weight subset and a Hessian
structure; :func:`select` turns a slice of the table into ``pytest.param`` entries for the
``case`` fixture (``conftest.py``), which builds ``(model, x, y)`` reproducibly from the
case's seed. As curvlinops' ``test/cases.py``: a test names the slice it covers, not the
models.

The references below are independent of the code under test: the NLLs are written here with
plain TensorFlow ops, the GGN comes from :mod:`laplace_tf.testing` (one gradient per example
and output), Kronecker factors from layer inputs and pre-activation Jacobians read one at a
time, and every inverse, log-determinant and predictive from numpy on dense float64 matrices.

Example:
    >>> full = Case("tanh_mlp", "regression", "all", "full")
    >>> model, x, y = full.build(n=5)
    >>> dense = reference_precision(full, model, x, y, prior=2.0)
    >>> diag = reference_precision(Case("tanh_mlp", "regression", "all", "diag"), model, x, y,
    ...                            prior=2.0)
    >>> dense.shape, bool(np.allclose(np.diag(dense), np.diag(diag)))
    ((26, 26), True)
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import keras
import numpy as np
import pytest
import tensorflow as tf
from models import F64
from models import MODELS as _BASE_MODELS

from laplace_tf import testing


def two_input(n_outputs: int, seed: int = 0, n: int = 6):
    """A Functional model with two named inputs ``{"a": [N, 3], "b": [N, 2]}``."""
    keras.utils.set_random_seed(seed)
    a, b = keras.Input((3,), dtype=F64, name="a"), keras.Input((2,), dtype=F64, name="b")
    left = keras.layers.Dense(3, "tanh", dtype=F64)(a)
    merged = keras.layers.Concatenate(dtype=F64)([left, b])
    model = keras.Model({"a": a, "b": b}, keras.layers.Dense(n_outputs, dtype=F64)(merged))
    rng = np.random.default_rng(seed)
    return model, {"a": rng.normal(size=(n, 3)), "b": rng.normal(size=(n, 2))}


def sequence_dense(n_outputs: int, seed: int = 0, n: int = 5):
    """A Dense layer applied at 4 positions of a sequence: several locations per example."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((4, 3), dtype=F64), keras.layers.Dense(2, "tanh", dtype=F64),
        keras.layers.Flatten(dtype=F64), keras.layers.Dense(n_outputs, dtype=F64),
    ])
    return model, np.random.default_rng(seed).normal(size=(n, 4, 3))


def shared_dense(n_outputs: int, seed: int = 0, n: int = 5):
    """One Dense layer called twice in a forward pass."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((3,), dtype=F64)
    shared = keras.layers.Dense(3, "tanh", dtype=F64)
    outputs = keras.layers.Dense(n_outputs, dtype=F64)(shared(shared(inputs)))
    return keras.Model(inputs, outputs), np.random.default_rng(seed).normal(size=(n, 3))


MODELS = {**_BASE_MODELS, "two_input": two_input, "sequence_dense": sequence_dense,
          "shared_dense": shared_dense}
"""``build(n_outputs, seed, n) -> (model, x)``: the builders of ``models.py`` and these."""
CORE_MODELS = ("tanh_mlp", "small_cnn", "two_input", "subclassed")
"""The default model axis of :func:`select`: an MLP, a CNN, a two-input Functional model and
a subclassed model."""
N_OUTPUTS = {"classification": 3, "binary": 1, "regression": 2}
LIKELIHOODS = tuple(N_OUTPUTS)
SUBSETS = ("all", "last_layer")
STRUCTURES = ("full", "kron", "diag")


@dataclass(frozen=True)
class Case:
    """A named (model, likelihood, subset, structure) with a seed for weights and data."""

    model: str
    likelihood: str
    subset: str
    structure: str
    seed: int = 0

    @property
    def id(self) -> str:
        return f"{self.model}-{self.likelihood}-{self.subset}-{self.structure}"

    @property
    def n_outputs(self) -> int:
        return N_OUTPUTS[self.likelihood]

    def build(self, n: int = 6):
        """``(model, x, y)``: the model with seeded weights, ``n`` inputs and fitting targets."""
        model, x = MODELS[self.model](self.n_outputs, seed=self.seed, n=n)
        rng = np.random.default_rng(self.seed + 1)
        if self.likelihood == "classification":
            y = rng.integers(0, self.n_outputs, size=n)
        elif self.likelihood == "binary":
            y = rng.integers(0, 2, size=n).astype(np.float64)
        else:
            y = rng.normal(size=(n, self.n_outputs))
        return model, x, y


def select(models=CORE_MODELS, likelihoods=LIKELIHOODS, subsets=SUBSETS,
           structures=STRUCTURES, seed: int = 0) -> list:
    """The product of the given axes as ``pytest.param`` entries with readable ids."""
    return [
        pytest.param(Case(*axes, seed=seed), id=Case(*axes).id)
        for axes in itertools.product(models, likelihoods, subsets, structures)
    ]


def table(*rows: tuple) -> list:
    """Hand-picked cases ``(model, likelihood, subset, structure)`` as ``pytest.param`` entries."""
    return [pytest.param(Case(*row), id=Case(*row).id) for row in rows]


def rows(x, index):
    """Rows ``index`` (a slice or an index array) of an input array or dict of arrays."""
    return {k: v[index] for k, v in x.items()} if isinstance(x, dict) else x[index]


# ---------------------------------------------------------------------- independent references
class ReferenceNLL:
    """The summed negative log-likelihood, written out here (not laplace_tf's likelihoods).

    ``y``: class labels ``[N]`` (classification), 0/1 ``[N]`` (binary) or ``[N, K]``
    (regression, Gaussian with noise ``sigma``, scalar or ``[K]``).
    """

    def __init__(self, likelihood: str, sigma=1.0):
        self.likelihood, self.sigma = likelihood, np.asarray(sigma, np.float64)

    def nll(self, logits, y) -> tf.Tensor:
        if self.likelihood == "classification":
            return tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
                tf.constant(np.asarray(y, np.int64)), logits))
        if self.likelihood == "binary":
            t = tf.constant(np.asarray(y, np.float64).reshape(-1, 1))
            return tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(t, logits))
        residual = tf.constant(np.asarray(y, np.float64)) - logits
        sigma = tf.constant(self.sigma * np.ones(logits.shape[-1]))
        return tf.reduce_sum(0.5 * (residual / sigma) ** 2 + tf.math.log(sigma)
                             + 0.5 * math.log(2 * math.pi))


def logit_model(case: Case, model):
    """The model over the case's weights: all of them, or the last layer's."""
    return testing.subset_of(model, [model.layers[-1]] if case.subset == "last_layer" else None)


def _layer_input_rows(f, layer, x) -> tuple[np.ndarray, int]:
    """The rows ``a_t`` a layer multiplies (bias 1 appended), and how often it is called."""
    seen = []

    def record(hooked, inputs, z):
        seen.append(np.asarray(inputs))
        return z

    f(x, layers=[layer], hook=record)
    inputs = seen[0]
    if isinstance(layer, keras.layers.Conv2D):
        a = testing.brute_force_conv_patches(layer, inputs)
    else:
        a = inputs.reshape(-1, inputs.shape[-1])
    if layer.use_bias:
        a = np.concatenate([a, np.ones((len(a), 1))], axis=1)
    return a, len(seen)


def reference_curvature(case: Case, model, x, y, sigma=1.0) -> np.ndarray:
    """The dense ``[P, P]`` curvature (GGN) of the case's structure, by brute force.

    full: ``sum_n J_n^T Lambda_n J_n``; diag: its diagonal; kron: per layer
    ``A ⊗ G`` with ``A = (1/n) sum_t a_t a_t^T`` over the ``n`` input rows (locations) and
    ``G = sum_n sum_t J_{z,n,t}^T Lambda_n J_{z,n,t}``; scale-and-shift layers (BatchNorm,
    LayerNorm) the exact GGN block; layers without a Kronecker rule (not Dense/Conv2D) or
    called more than once get the GGN's diagonal.
    """
    f, lik = logit_model(case, model), ReferenceNLL(case.likelihood, sigma)
    if case.structure == "full":
        return testing.brute_force_ggn(f, lik, x, y)
    if case.structure == "diag":
        return np.diag(np.diag(testing.brute_force_ggn(f, lik, x, y)))
    n_params = sum(s.size for s in f.subset.slices)
    out = np.zeros((n_params, n_params))
    lam = testing.brute_force_output_hessians(lik, f(x), y)
    for s in f.subset.slices:
        block = slice(s.offset, s.offset + s.size)
        layer = s.layer
        if isinstance(layer, (keras.layers.BatchNormalization, keras.layers.LayerNormalization)):
            out[block, block] = testing.brute_force_ggn(f, lik, x, y)[block, block]
            continue
        kron_rule = isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D))
        a, calls = _layer_input_rows(f, layer, x) if kron_rule else (None, 0)
        if calls != 1:
            ggn = testing.brute_force_ggn(f, lik, x, y)
            out[block, block] = np.diag(np.diag(ggn[block, block]))
            continue
        jz = testing.brute_force_preactivation_jacobians(f, layer, x)  # [N, K, *z]
        jz = jz.reshape(jz.shape[0], jz.shape[1], -1, jz.shape[-1])   # [N, K, T, out]
        G = np.einsum("nktp,nkl,nltq->pq", jz, lam, jz)
        out[block, block] = np.kron(a.T @ a / len(a), G)
    return out


def prior_diagonal(case: Case, model, prior) -> np.ndarray:
    """``prior_precision`` (scalar, one per layer or one per weight) as a ``[P]`` vector."""
    slices = logit_model(case, model).subset.slices
    n_params = sum(s.size for s in slices)
    prior = np.asarray(prior, np.float64)
    if prior.ndim == 0 or prior.size == n_params:
        return prior * np.ones(n_params)
    return np.concatenate([np.full(s.size, p) for s, p in zip(slices, prior, strict=True)])


def reference_precision(case: Case, model, x, y, prior=1.0, temperature=1.0,
                        sigma=1.0) -> np.ndarray:
    """``H / T + diag(prior)`` with ``H`` from :func:`reference_curvature`."""
    curvature = reference_curvature(case, model, x, y, sigma)
    return curvature / temperature + np.diag(prior_diagonal(case, model, prior))


def reference_log_evidence(case: Case, model, x, y, precision, prior=1.0, temperature=1.0,
                           sigma=1.0) -> float:
    """``-NLL / T - 1/2 sum lambda theta^2 + 1/2 log det diag(lambda) - 1/2 log det P``."""
    f = logit_model(case, model)
    theta = np.asarray(f.subset.flat_values())
    lam = prior_diagonal(case, model, prior)
    nll = float(ReferenceNLL(case.likelihood, sigma).nll(f(x), y))
    return (-nll / temperature - 0.5 * np.sum(lam * theta**2) + 0.5 * np.sum(np.log(lam))
            - 0.5 * np.linalg.slogdet(precision)[1])


def reference_functional_variance(case: Case, model, x, precision) -> tuple[np.ndarray, np.ndarray]:
    """``(f(x) [N, K], J inv(precision) J^T [N, K, K])`` from explicit Jacobians, with numpy."""
    f = logit_model(case, model)
    jac = testing.brute_force_jacobians(f, x)
    return np.asarray(f(x)), testing.dense_functional_variance(jac, np.linalg.inv(precision))


def reference_glm(case: Case, model, x, precision, sigma=1.0):
    """The GLM predictive from :func:`reference_functional_variance`: the probit-link
    probabilities, or ``(mean, variance + sigma^2)`` for regression."""
    mu, var = reference_functional_variance(case, model, x, precision)
    diag = np.diagonal(var, axis1=1, axis2=2)
    if case.likelihood == "regression":
        return mu, diag + np.square(sigma)
    scaled = mu / np.sqrt(1 + math.pi / 8 * diag)
    if case.likelihood == "binary":
        return 1 / (1 + np.exp(-scaled))
    e = np.exp(scaled - scaled.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)
