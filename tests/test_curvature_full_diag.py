"""Full and diagonal curvature over all weights against brute force (float64, tiny models).

Every fit runs through ``fit_curvature`` on 6 examples in batches of 3, so each comparison
with the brute-force reference over all 6 examples also checks that batches add up. The
factored path (Dense layers, one input row per example) and the per-example ``vectorized_map``
path (convolutions, BatchNorm, weight-shared or sequence Dense layers) are both covered.
"""

from __future__ import annotations

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf
from models import F64, MODELS, N_OUTPUTS, targets
from scipy import special, stats

from laplace_tf import testing
from laplace_tf.batches import Batches
from laplace_tf.curvature import (
    DiagBuilder,
    FullBuilder,
    KronBuilder,
    LastLayerBuilder,
    _per_example,
    base,
    fit_curvature,
    full,
    make_builder,
)
from laplace_tf.likelihoods import get_likelihood
from laplace_tf.params import LogitModel, WeightSubset

EXACT = {"rtol": 1e-9, "atol": 1e-12}
SIGMA = 0.7
BATCH = 3
L = keras.layers


def _shared_dense(n_outputs: int, seed: int = 0, n: int = 6):
    """One Dense layer called twice: its rows are not one outer product per example."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((3,), dtype=F64)
    shared = L.Dense(3, "tanh", dtype=F64)
    outputs = L.Dense(n_outputs, dtype=F64)(shared(shared(inputs)))
    return keras.Model(inputs, outputs), np.random.default_rng(seed).normal(size=(n, 3))


def _sequence_dense(n_outputs: int, seed: int = 0, n: int = 6):
    """A Dense layer on ``[N, 2, 3]`` inputs: two locations per example."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((2, 3), dtype=F64), L.Dense(2, "tanh", dtype=F64), L.Flatten(dtype=F64),
        L.Dense(n_outputs, dtype=F64),
    ])
    return model, np.random.default_rng(seed).normal(size=(n, 2, 3))


ALL_MODELS = {**MODELS, "shared_dense": _shared_dense, "sequence_dense": _sequence_dense}


def _likelihood(name: str):
    return get_likelihood(name, SIGMA) if name == "regression" else get_likelihood(name)


@functools.cache
def _problem(model_name: str, likelihood_name: str):
    """Model, logit model, likelihood, raw data and prepared targets (built once)."""
    n_outputs = N_OUTPUTS[likelihood_name]
    model, x = ALL_MODELS[model_name](n_outputs)
    y = targets(likelihood_name, n_outputs, len(x))
    likelihood = _likelihood(likelihood_name)
    logit_model = LogitModel(model)
    prepared = likelihood.prepare_targets(y, n_outputs, tf.float64)
    return model, logit_model, likelihood, x, y, prepared


@functools.cache
def _reference(model_name: str, likelihood_name: str, kind: str) -> np.ndarray:
    _, logit_model, likelihood, x, _, prepared = _problem(model_name, likelihood_name)
    brute = {"ggn": testing.brute_force_ggn, "ef": testing.brute_force_ef,
             "hessian": testing.brute_force_hessian}[kind]
    return brute(logit_model, likelihood, tf.constant(x), prepared)


def _fit(builder, x, y, batch_size: int = BATCH):
    return fit_curvature(builder, Batches((x, y), batch_size, dtype=tf.float64))


def _hand_nll(likelihood_name: str, logits: np.ndarray, y: np.ndarray) -> float:
    """The summed NLL from scipy, independently of laplace_tf.likelihoods."""
    if likelihood_name == "classification":
        return -special.log_softmax(logits, axis=1)[np.arange(len(y)), y].sum()
    if likelihood_name == "binary":
        f = logits[:, 0]
        return -(y * special.log_expit(f) + (1 - y) * special.log_expit(-f)).sum()
    return -stats.norm.logpdf(y, loc=logits, scale=SIGMA).sum()


# Every model with every kind; every likelihood on an MLP (factored rows only) and on the
# BatchNorm model (vectorized_map rows for BatchNorm's scale and offset, factored Dense rows).
CASES = sorted(
    {(m, "classification") for m in ALL_MODELS}
    | {(m, lik) for m in ("tanh_mlp", "with_batchnorm") for lik in N_OUTPUTS}
)


@pytest.mark.parametrize("kind", ["ggn", "ef", "hessian"])
@pytest.mark.parametrize(("model_name", "likelihood_name"), CASES)
def test_full_equals_brute_force(model_name, likelihood_name, kind):
    model, logit_model, likelihood, x, y, _ = _problem(model_name, likelihood_name)
    curvature = _fit(FullBuilder(logit_model, likelihood, kind), x, y)
    (block,) = curvature.blocks
    np.testing.assert_allclose(block.matrix.numpy(), _reference(model_name, likelihood_name, kind),
                               **EXACT)
    logits = LogitModel(model)(tf.constant(x)).numpy()
    np.testing.assert_allclose(float(curvature.nll), _hand_nll(likelihood_name, logits, y), rtol=1e-12)
    assert curvature.n_data == len(x) and curvature.structure == "full"


@pytest.mark.parametrize("kind", ["ggn", "ef"])
@pytest.mark.parametrize(("model_name", "likelihood_name"), CASES)
def test_diag_equals_brute_force_diagonal(model_name, likelihood_name, kind):
    _, logit_model, likelihood, x, y, _ = _problem(model_name, likelihood_name)
    curvature = _fit(DiagBuilder(logit_model, likelihood, kind), x, y)
    (block,) = curvature.blocks
    reference = np.diag(_reference(model_name, likelihood_name, kind))
    np.testing.assert_allclose(block.diagonal.numpy(), reference, **EXACT)
    assert curvature.structure == "diag"


@pytest.mark.parametrize(
    ("builder", "kind"), [(FullBuilder, "ggn"), (FullBuilder, "hessian"), (DiagBuilder, "ef")],
    ids=["full-ggn", "full-hessian", "diag-ef"],
)
def test_uneven_batches_and_chunks_add_up(builder, kind, monkeypatch):
    """Batches 4 + 2 (a short last batch) and chunks of one example (the while loop)."""
    model, logit_model, likelihood, x, y, _ = _problem("small_cnn", "regression")
    one_batch = _fit(builder(logit_model, likelihood, kind), x, y, batch_size=len(x))
    uneven = _fit(builder(logit_model, likelihood, kind), x, y, batch_size=4)
    for module in (_per_example, full):
        monkeypatch.setattr(module, "CHUNK_BYTES", 1)
    small = {"memory_limit_bytes": 5 * 8 * logit_model.subset.n_params**2 + 1}
    options = small if builder is FullBuilder else {}
    chunked = _fit(builder(logit_model, likelihood, kind, **options), x, y, batch_size=len(x))
    for other in (uneven, chunked):
        np.testing.assert_allclose(other.blocks[0][0].numpy(), one_batch.blocks[0][0].numpy(), **EXACT)
        np.testing.assert_allclose(float(other.nll), float(one_batch.nll), rtol=1e-12)
        np.testing.assert_allclose(other.residual_ss.numpy(), one_batch.residual_ss.numpy(),
                                   rtol=1e-12)
    logits = LogitModel(model)(tf.constant(x)).numpy()
    np.testing.assert_allclose(one_batch.residual_ss.numpy(), ((y - logits) ** 2).sum(0), rtol=1e-12)


@pytest.mark.parametrize(
    ("model_name", "layer_indices"),
    [("with_batchnorm", (1, 3)), ("two_branch_functional", (2, 4))],
    ids=["batchnorm+head", "right-branch+head"],
)
@pytest.mark.parametrize(("builder", "kind"), [(FullBuilder, "ggn"), (DiagBuilder, "ef")])
def test_layer_subset_is_the_matching_block(model_name, layer_indices, builder, kind):
    model, _, likelihood, x, y, _ = _problem(model_name, "classification")
    layers = [model.layers[i] for i in layer_indices]
    subset = WeightSubset(model, layers)
    index = np.concatenate([
        np.arange(s.offset, s.offset + s.size)
        for s in WeightSubset(model).slices if any(s.layer is layer for layer in layers)
    ])
    reference = _reference(model_name, "classification", kind)[np.ix_(index, index)]
    (block,) = _fit(builder(LogitModel(model, subset), likelihood, kind), x, y).blocks
    if builder is DiagBuilder:
        np.testing.assert_allclose(block.diagonal.numpy(), np.diag(reference), **EXACT)
    else:
        np.testing.assert_allclose(block.matrix.numpy(), reference, **EXACT)


def test_float32_close_to_float64():
    model64, x = MODELS["tanh_mlp"](3)
    model32 = keras.Sequential([keras.Input((3,)), L.Dense(4, "tanh"), L.Dense(3)])
    model32.set_weights([w.astype(np.float32) for w in model64.get_weights()])
    y = targets("classification", 3, len(x))
    likelihood = get_likelihood("classification")
    for builder in (FullBuilder, DiagBuilder):
        results = [
            fit_curvature(builder(LogitModel(m), likelihood, "ggn"), Batches((x, y), BATCH, dtype=d))
            for m, d in ((model64, tf.float64), (model32, tf.float32))
        ]
        assert results[1].blocks[0][0].dtype == tf.float32
        np.testing.assert_allclose(results[1].blocks[0][0].numpy(), results[0].blocks[0][0].numpy(),
                                   rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("limit", [0, -5, 1.5, True, "1GB"])
def test_full_rejects_a_bad_memory_limit(limit):
    _, logit_model, likelihood, *_ = _problem("tanh_mlp", "classification")
    with pytest.raises(ValueError, match="memory_limit_bytes: expected a positive integer"):
        FullBuilder(logit_model, likelihood, memory_limit_bytes=limit)


def test_memory_helpers(monkeypatch):
    available = full.available_memory_bytes()
    assert available is None or available > 0
    monkeypatch.setattr(full, "available_memory_bytes", lambda: 8 * 2**30)
    assert full.default_memory_limit() == 2 * 2**30
    monkeypatch.setattr(full, "available_memory_bytes", lambda: None)
    assert full.default_memory_limit() == full.FALLBACK_MEMORY_BYTES


def test_diag_has_no_exact_hessian():
    _, logit_model, likelihood, *_ = _problem("tanh_mlp", "classification")
    with pytest.raises(ValueError, match=r"'hessian' is not available.*\('ggn', 'ef'\)"):
        DiagBuilder(logit_model, likelihood, "hessian")


@pytest.mark.parametrize(
    ("subset", "structure", "expected"),
    [("all", "full", FullBuilder), ("all", "diag", DiagBuilder), ("all", "kron", KronBuilder),
     ("last_layer", "full", LastLayerBuilder), ("last_layer", "kron", LastLayerBuilder),
     ("last_layer", "diag", LastLayerBuilder)],
)
def test_make_builder_picks_the_builder(subset, structure, expected):
    model, _, likelihood, *_ = _problem("tanh_mlp", "classification")
    layers = [model.layers[-1]] if subset == "last_layer" else None
    logit_model = LogitModel(model, WeightSubset(model, layers))
    builder = make_builder(subset, structure, logit_model, likelihood, "ef", memory_limit_bytes=None)
    assert type(builder) is expected
    assert (builder.structure, builder.kind, builder.logit_model) == (structure, "ef", logit_model)


def test_make_builder_passes_options():
    _, logit_model, likelihood, *_ = _problem("tanh_mlp", "classification")
    kron = make_builder("all", "kron", logit_model, likelihood, stochastic=True, seed=3,
                        memory_limit_bytes=2**30)
    assert (kron.stochastic, kron.seed) == (True, 3)
    full_builder = make_builder("all", "full", logit_model, likelihood, memory_limit_bytes=10)
    assert full_builder.memory_limit_bytes == 10


@pytest.mark.parametrize(
    ("args", "options", "error", "match"),
    [
        (("some", "full"), {}, ValueError, r"subset_of_weights: expected one of \('all', 'last_layer', 'subnetwork'\)"),
        (("all", "dense"), {}, ValueError, r"hessian_structure: expected one of \('full', 'kron', 'diag'"),
        (("all", "diag", "hessian"), {}, ValueError, r"'hessian' is not available"),
        (("all", "full", "fisher"), {}, ValueError, r"'fisher' is not available"),
        (("all", "full"), {"stochastic": True}, TypeError, "options: stochastic not accepted.*accepted: memory_limit_bytes"),
        (("all", "diag"), {"seed": 1}, TypeError, "options: seed not accepted.*DiagBuilder"),
    ],
)
def test_make_builder_rejects_bad_names(args, options, error, match):
    _, logit_model, likelihood, *_ = _problem("tanh_mlp", "classification")
    subset, structure, *kind = args
    with pytest.raises(error, match=match):
        make_builder(subset, structure, logit_model, likelihood, *kind, **options)


def test_full_ggn_of_wide_layers_equals_brute_force():
    """Hidden layers of 20 units pack their input pairs (``packs_inputs``), the head does not."""
    keras.utils.set_random_seed(4)
    model = keras.Sequential([keras.Input((3,), dtype=F64), L.Dense(20, "tanh", dtype=F64),
                              L.Dense(20, "tanh", dtype=F64), L.Dense(2, dtype=F64)])
    x = np.random.default_rng(4).normal(size=(6, 3))
    y = targets("classification", 2, len(x))
    likelihood, logit_model = get_likelihood("classification"), LogitModel(model)
    (block,) = _fit(FullBuilder(logit_model, likelihood), x, y).blocks
    prepared = likelihood.prepare_targets(y, 2, tf.float64)
    reference = testing.brute_force_ggn(logit_model, likelihood, tf.constant(x), prepared)
    np.testing.assert_allclose(block.matrix.numpy(), reference, **EXACT)


@pytest.mark.parametrize(("limit", "sizes"), [(4, [4, 5, 3]), (0, [2, 2, 5, 1, 1, 1]), (100, [12])])
def test_batches_are_joined_into_steps_of_at_most_the_limit(limit, sizes):
    """Consecutive batches join while they fit; a batch above the limit is a step alone."""
    rows = [2, 2, 5, 1, 1, 1]
    values = np.arange(sum(rows), dtype=float)
    starts = np.cumsum([0, *rows])
    batches = [({"a": tf.constant(values[s:e, None]), "b": tf.constant(-values[s:e, None])},
                tf.constant(values[s:e])) for s, e in zip(starts[:-1], starts[1:], strict=True)]
    steps = list(base._joined(iter(batches), lambda x: limit))
    assert [int(t.shape[0]) for _, t in steps] == sizes
    joined_x = np.concatenate([x["b"].numpy()[:, 0] for x, _ in steps])
    np.testing.assert_array_equal(joined_x, -values)
    np.testing.assert_array_equal(np.concatenate([t.numpy() for _, t in steps]), values)


class _UnusedHead(keras.Model):
    """A subclassed model that computes a head it does not return."""

    def __init__(self):
        super().__init__()
        self.body = keras.layers.Dense(3, "tanh", dtype=F64)
        self.unused = keras.layers.Dense(2, dtype=F64)
        self.head = keras.layers.Dense(2, dtype=F64)

    def call(self, x):
        h = self.body(x)
        self.unused(h)
        return self.head(h)


@pytest.mark.parametrize("structure", ["full", "diag", "kron"])
def test_a_layer_whose_output_is_unused_has_zero_curvature(structure):
    x = np.random.default_rng(0).normal(size=(4, 3))
    y = targets("regression", 2, 4)
    keras.utils.set_random_seed(0)
    model = _UnusedHead()
    model(x[:1])
    expected = testing.brute_force_ggn(LogitModel(model), get_likelihood("regression"), x, y)
    assert np.all(expected[12:20, 12:20] == 0)  # the unused head's kernel and bias
    from laplace_tf.predictive import Laplace
    la = Laplace(model, "regression", "all", structure, prior_precision=1.0, progress=False)
    la.fit((x, y))
    curvature = la.posterior_precision.to_dense().numpy() - np.eye(la.n_params)
    if structure == "full":
        np.testing.assert_allclose(curvature, expected, atol=1e-12)
    elif structure == "diag":
        np.testing.assert_allclose(np.diag(curvature), np.diag(expected), atol=1e-12)
    np.testing.assert_allclose(curvature[12:20, 12:20], 0.0, atol=1e-12)


@pytest.mark.parametrize("norm", [keras.layers.LayerNormalization,
                                  lambda **kw: keras.layers.GroupNormalization(groups=2, **kw)])
def test_the_exact_hessian_through_moments_is_refused(norm):
    """tf.nn.moments stops the gradient through the mean: nested tapes give a Hessian that
    differs from finite differences of the (exact) gradient, so it is refused."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,), dtype=F64), keras.layers.Dense(4, dtype=F64),
                              norm(dtype=F64), keras.layers.Dense(2, dtype=F64)])
    x = np.random.default_rng(0).normal(size=(5, 3))
    y = targets("regression", 2, 5)
    logit_model, likelihood = LogitModel(model), get_likelihood("regression")
    taped = testing.brute_force_hessian(logit_model, likelihood, x, y)
    flat0 = logit_model.subset.flat_values().numpy()

    def gradient(flat):
        with tf.GradientTape() as tape:
            values = tf.constant(flat)
            tape.watch(values)
            loss = likelihood.nll(logit_model(x, logit_model.subset.unflatten(values)), y)
        return tape.gradient(loss, values).numpy()

    step = 1e-6
    numeric = np.stack([(gradient(flat0 + step * e) - gradient(flat0 - step * e)) / (2 * step)
                        for e in np.eye(flat0.size)])
    assert np.max(np.abs(taped - numeric)) > 1e-3  # the tapes' second derivatives are off
    with pytest.raises(ValueError, match="exact Hessian .* cannot pass through layer"):
        make_builder("all", "full", logit_model, likelihood, "hessian")
