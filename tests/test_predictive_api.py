"""The predictive's interface: batching, seeds, compiled steps, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from laplace_tf.posterior import NotFittedError
from laplace_tf.predictive import Laplace
from tests.models import MODELS, N_OUTPUTS, targets


def _fit(likelihood="classification", name="tanh_mlp", n=30, **options):
    model, x = MODELS[name](N_OUTPUTS[likelihood], n=n)
    la = Laplace(model, likelihood, progress=False, **options)
    la.fit((x, targets(likelihood, N_OUTPUTS[likelihood], n)))
    return la, x


@pytest.fixture(scope="module")
def classifier():
    return _fit("classification", subset_of_weights="all", hessian_structure="kron")


@pytest.fixture(scope="module")
def regressor():
    return _fit("regression", subset_of_weights="last_layer", hessian_structure="full",
                sigma_noise=0.5)


CALLS = {
    "glm probit": lambda la, x, **kw: la(x, **kw),
    "glm mc": lambda la, x, **kw: la(x, link_approx="mc", n_samples=7, seed=1, **kw),
    "glm bridge": lambda la, x, **kw: la(x, link_approx="bridge", **kw),
    "nn": lambda la, x, **kw: la(x, pred_type="nn", n_samples=7, seed=1, **kw),
    "functional_variance": lambda la, x, **kw: la.functional_variance(x, **kw),
    "glm samples": lambda la, x, **kw: la.predictive_samples(x, 3, seed=2, **kw),
    "nn samples": lambda la, x, **kw: la.predictive_samples(x, 3, seed=2, pred_type="nn", **kw),
    "map": lambda la, x, **kw: la.map_predict(x, **kw),
}


@pytest.mark.parametrize("call", ["glm probit", "glm bridge", "nn", "functional_variance",
                                  "nn samples", "map"])
def test_results_do_not_depend_on_the_batching(classifier, call):
    """Deterministic outputs, and nn (one set of weight samples for all inputs), are the same
    for any batch size and for a tf.data.Dataset of input batches."""
    la, x = classifier
    whole = CALLS[call](la, x, batch_size=64)
    axis = 1 if "samples" in call else 0
    assert whole.shape[axis] == len(x)
    np.testing.assert_allclose(CALLS[call](la, x, batch_size=7), whole, rtol=1e-12, atol=1e-15)
    dataset = tf.data.Dataset.from_tensor_slices(x).batch(11)
    np.testing.assert_allclose(CALLS[call](la, dataset), whole, rtol=1e-12, atol=1e-15)


def test_regression_outputs_are_batched_pairs(regressor):
    la, x = regressor
    mean, var = la(x, batch_size=4)
    whole_mean, whole_var = la(x)
    np.testing.assert_allclose(mean, whole_mean, rtol=1e-12)
    np.testing.assert_allclose(var, whole_var, rtol=1e-12)
    assert np.all(var.numpy() > 0.25)  # sigma_noise**2 plus a positive functional variance


@pytest.mark.parametrize("call", ["glm mc", "nn", "glm samples", "nn samples"])
def test_same_seed_same_numbers_other_seed_other_numbers(classifier, call):
    la, x = classifier
    first = CALLS[call](la, x[:5])
    np.testing.assert_array_equal(CALLS[call](la, x[:5]), first)
    if call.endswith("samples"):
        other = la.predictive_samples(x[:5], 3, seed=3, pred_type=call.split()[0])
    else:
        other = la(x[:5], pred_type=call.split()[0], link_approx="mc", n_samples=7, seed=2)
    assert not np.allclose(other, first)
    unseeded = [la.predictive_samples(x[:2], 2, seed=None) for _ in range(2)]
    assert not np.allclose(*unseeded)


def test_batches_reuse_one_compiled_step(classifier):
    """Many batches (and a new prior precision) trace the per-batch step at most twice
    (a full batch, then a relaxed shape for the remainder), never once per batch."""
    la, x = _fit("classification", subset_of_weights="all", hessian_structure="diag", n=30)
    before = la(x, batch_size=4)
    [step] = [s for key, s in la._shared_steps().items() if key[0] == "glm"]
    traces = step.experimental_get_tracing_count()
    assert traces <= 2
    la.prior_precision = 50.0
    after = la(x[:25], batch_size=3)
    assert step.experimental_get_tracing_count() == traces
    map_probs = la.map_predict(x[:25])  # a stronger prior pulls the predictive to the MAP
    assert np.all(np.abs(after - map_probs) <= np.abs(before[:25] - map_probs) + 1e-15)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"pred_type": "laplace"}, ValueError, r"pred_type: expected one of \('glm', 'nn'\)"),
    ({"link_approx": "sigmoid"}, ValueError, r"link_approx: expected one of \('probit'"),
    ({"n_samples": 0}, ValueError, r"n_samples: expected a positive integer \(>= 1\); got 0"),
    ({"n_samples": 2.5}, TypeError, r"n_samples: expected a positive integer; got 2.5"),
    ({"batch_size": 0}, ValueError, r"batch_size: expected a positive integer"),
    ({"seed": "seven"}, TypeError, r"seed: expected an integer or None"),
])
def test_bad_arguments_are_refused(classifier, kwargs, error, message):
    la, x = classifier
    with pytest.raises(error, match=message):
        la(x, **kwargs)


@pytest.mark.parametrize("likelihood, link", [("binary", "bridge"), ("regression", "mc")])
def test_a_link_that_does_not_fit_the_likelihood_is_refused(likelihood, link):
    la, x = _fit(likelihood, n=6, subset_of_weights="last_layer", hessian_structure="diag")
    with pytest.raises(ValueError, match=f"link_approx: '{link}' does not fit likelihood="):
        la(x, link_approx=link)


@pytest.mark.parametrize("name, expected", [
    ("tanh_mlp", r"expects inputs of shape \(None, 3\)"),
    ("subclassed", "the shape it was built with"),
])
def test_inputs_that_do_not_fit_the_model_are_refused(name, expected):
    la, _ = _fit(name=name, n=6, subset_of_weights="last_layer", hessian_structure="kron")
    with pytest.raises(ValueError, match=r"x: inputs of shape \(4, 5\) do not fit .*" + expected):
        la(np.zeros((4, 5)))
    with pytest.raises(ValueError, match="x: inputs of shape"):
        la.predictive_samples(np.zeros((4, 5)), 2, pred_type="nn")


@pytest.mark.parametrize("x, message", [
    (np.zeros((0, 3)), "x: got no inputs"),
    (np.full((3, 3), np.nan), "x: batch 0 contains NaN or Inf"),
    (tf.data.Dataset.from_tensor_slices(np.zeros((4, 3))).batch(2).repeat(),
     r"x: the dataset is infinite .*\.take\(N\)"),
])
def test_empty_or_non_finite_inputs_are_refused(classifier, x, message):
    la, _ = classifier
    with pytest.raises(ValueError, match=message):
        la(x)


@pytest.mark.parametrize("call", sorted(CALLS))
def test_a_call_before_fit_is_refused(call):
    model, x = MODELS["tanh_mlp"](3)
    la = Laplace(model, "classification", progress=False)
    with pytest.raises(NotFittedError, match=r"not fitted yet; call la.fit\(train_data\) first"):
        CALLS[call](la, x)
