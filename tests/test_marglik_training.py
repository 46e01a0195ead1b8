"""Marginal-likelihood training: the learned prior is the evidence's, and it is the L2 term."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import laplace_tf as ltf

N = 24


def _data(likelihood, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, 3)).astype("float32")
    if likelihood == "regression":
        y = (x @ np.array([[1.0], [-0.5], [0.2]]) + 0.1 * rng.normal(size=(N, 1))).astype("float32")
    else:
        y = (x[:, 0] + 0.3 * x[:, 1] > 0).astype("int32")
    return x, y


def _mlp(likelihood, seed=0, dtype=None):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, "tanh", dtype=dtype),
                             keras.layers.Dense(1 if likelihood == "regression" else 2,
                                                dtype=dtype)])


def _loss(likelihood):
    return (keras.losses.MeanSquaredError() if likelihood == "regression"
            else keras.losses.SparseCategoricalCrossentropy(from_logits=True))


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_refit_learns_what_the_evidence_gives_on_the_same_weights(likelihood):
    x, y = _data(likelihood)
    model, la, trace = ltf.marglik_training(
        _mlp(likelihood), likelihood, (x, y), epochs=2, batch_size=8, seed=0, verbose=0,
        n_epochs_burnin=2, n_hypersteps=30)
    assert trace["epoch"].tolist() == [2]
    independent = ltf.Laplace(model, likelihood, "all", "kron", progress=False)
    independent.fit((x, y))
    independent.optimize_prior_precision(method="marglik", prior_structure="layerwise",
                                         n_steps=30, progress=False)
    np.testing.assert_allclose(trace["prior_precision"][0],
                               np.asarray(independent.prior_precision), rtol=1e-5)
    np.testing.assert_allclose(trace["log_marginal_likelihood"][0],
                               float(independent.log_marginal_likelihood()), rtol=1e-5)
    assert not np.allclose(trace["prior_precision"][0], 1.0)  # it moved from the initial 1
    if likelihood == "regression":
        np.testing.assert_allclose(trace["sigma_noise"][0], float(independent.sigma_noise),
                                   rtol=1e-5)
    assert model.losses == []  # the L2 terms are removed when fit ends


def _manual_step(model, weights, x, y, likelihood, prior, sigma, lr):
    """One SGD step on mean loss + factor * 1/2 sum_l lambda_l ||theta_l||^2 (by hand);
    ``prior``: one per layer, or one per tensor (kernel, bias, kernel, bias)."""
    prior = list(prior) if len(prior) == 4 else [prior[0], prior[0], prior[1], prior[1]]
    variables = [tf.Variable(w) for w in weights]
    x, y = tf.cast(x, variables[0].dtype), tf.cast(y, variables[0].dtype if likelihood ==
                                                   "regression" else y.dtype)
    factor = (2 * sigma**2 if likelihood == "regression" else 1.0) / N
    with tf.GradientTape() as tape:
        h = tf.tanh(x @ variables[0] + variables[1])
        out = h @ variables[2] + variables[3]
        if likelihood == "regression":
            data = tf.reduce_mean(tf.square(out - y))
        else:
            data = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, out))
        l2 = sum(p * tf.reduce_sum(v**2) for p, v in zip(prior, variables, strict=True))
        loss = data + factor * 0.5 * l2
    grads = tape.gradient(loss, variables)
    return [(v - lr * g).numpy() for v, g in zip(variables, grads, strict=True)]


@pytest.mark.parametrize("dtype", [None, "float64"])  # float64 layers, float32 floatx
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_the_learned_prior_is_the_l2_term_of_the_next_step(likelihood, dtype):
    x, y = _data(likelihood, seed=1)
    model = _mlp(likelihood, seed=1, dtype=dtype)
    lr = 0.5
    model.compile(keras.optimizers.SGD(lr), _loss(likelihood))
    callback = ltf.MarginalLikelihoodCallback(likelihood, (x, y), prior_precision=3.0,
                                              n_hypersteps=20)
    start = [w.numpy() for w in model.trainable_variables]
    model.fit(x, y, batch_size=N, epochs=1, verbose=0, callbacks=[callback])
    first = [w.numpy() for w in model.trainable_variables]
    expected = _manual_step(model, start, x, y, likelihood, [3.0, 3.0], 1.0, lr)
    for got, want in zip(first, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    prior, sigma = callback.trace["prior_precision"][0], callback.trace["sigma_noise"][0]
    assert not np.allclose(prior, 3.0)
    model.fit(x, y, batch_size=N, epochs=1, verbose=0, callbacks=[callback])  # learned prior
    expected = _manual_step(model, first, x, y, likelihood, prior,
                            sigma if likelihood == "regression" else 1.0, lr)
    for got, want in zip(model.trainable_variables, expected, strict=True):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def _adam_by_hand(posteriors, log_prior, n_steps, lr, sizes=None):
    """Adam ascent of the evidence in log lambda, ``n_steps`` per posterior, its moments and
    step count carried from one posterior to the next; the log prior after each posterior.
    ``sizes``: the prior is one value per tensor of these sizes (repeated per weight)."""
    log_prior = np.array(log_prior, np.float64)
    m, v, t, points = np.zeros_like(log_prior), np.zeros_like(log_prior), 0, []
    for la in posteriors:
        for _ in range(n_steps):
            variable = tf.Variable(log_prior.astype(np.float32))
            with tf.GradientTape() as tape:
                prior = tf.exp(variable)
                evidence = la.log_marginal_likelihood(
                    prior if sizes is None else tf.repeat(prior, sizes))
            g = tape.gradient(evidence, variable).numpy().astype(np.float64)
            t += 1
            m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
            log_prior = log_prior + lr * (m / (1 - 0.9**t)) / (
                np.sqrt(v / (1 - 0.999**t)) + 1e-8)
        points.append(log_prior)
    return points


def test_one_adam_run_continues_across_refits():
    """As laplace-torch's single hyper-optimizer: the second refit's steps start from the
    Adam moments and step count the first left (a fresh Adam there lands elsewhere)."""
    x, y = _data("classification", seed=2)
    model = _mlp("classification", seed=2)
    model.compile(keras.optimizers.SGD(0.5), _loss("classification"))
    saved = []
    keep = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: saved.append(model.get_weights()))
    callback = ltf.MarginalLikelihoodCallback("classification", (x, y), n_hypersteps=4,
                                              lr_hyp=0.2)
    model.fit(x, y, batch_size=N, epochs=2, verbose=0, callbacks=[callback, keep])
    posteriors = []
    for weights in saved:
        copy = _mlp("classification", seed=2)
        copy.set_weights(weights)
        la = ltf.Laplace(copy, "classification", "all", "kron", progress=False)
        la.fit((x, y))
        posteriors.append(la)
    start = np.zeros(2)
    continued = _adam_by_hand(posteriors, start, 4, 0.2)
    fresh = _adam_by_hand(posteriors[1:], continued[0], 4, 0.2)[0]
    got = np.log(np.array(callback.trace["prior_precision"]))
    np.testing.assert_allclose(got, np.array(continued), rtol=1e-4, atol=1e-5)
    assert np.max(np.abs(fresh - continued[1])) > 1e-2  # the test can tell the two apart


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_tensorwise_prior_is_learned_per_tensor_and_is_the_l2_term(likelihood):
    """One precision per weight tensor (laplace-torch's 'layerwise'): the evidence's optimum
    over the four tensors' precisions, then the L2 term of the next step, tensor by tensor."""
    x, y = _data(likelihood, seed=3)
    model = _mlp(likelihood, seed=3)
    lr = 0.5
    model.compile(keras.optimizers.SGD(lr), _loss(likelihood))
    callback = ltf.MarginalLikelihoodCallback(
        likelihood, (x, y), hessian_structure="full", prior_structure="tensorwise",
        n_hypersteps=15, tune_sigma_noise=False)
    model.fit(x, y, batch_size=N, epochs=1, verbose=0, callbacks=[callback])
    first = [w.numpy() for w in model.trainable_variables]
    sizes = [w.size for w in first]
    la = ltf.Laplace(model, likelihood, "all", "full", progress=False)
    la.fit((x, y))
    want = np.exp(_adam_by_hand([la], np.zeros(4), 15, 0.1, sizes)[0])
    prior = callback.trace["prior_precision"][0]
    assert prior.shape == (4,) and np.ptp(np.log(prior)) > 0.1  # four different values
    np.testing.assert_allclose(prior, want, rtol=1e-4)
    np.testing.assert_allclose(callback.la.prior_precision, np.repeat(want, sizes), rtol=1e-4)
    model.fit(x, y, batch_size=N, epochs=1, verbose=0, callbacks=[callback])
    expected = _manual_step(model, first, x, y, likelihood, prior, 1.0, lr)
    for got, wanted in zip(model.trainable_variables, expected, strict=True):
        np.testing.assert_allclose(got.numpy(), wanted, rtol=1e-5, atol=1e-6)


def test_refits_follow_burnin_and_frequency_and_log_to_keras():
    x, y = _data("classification")
    model = _mlp("classification")
    model.compile("adam", _loss("classification"))
    callback = ltf.MarginalLikelihoodCallback("classification", tf.data.Dataset.from_tensor_slices(
        (x, y)).batch(8), hessian_structure="diag", n_epochs_burnin=2, marglik_frequency=2,
        n_hypersteps=5)
    history = model.fit(x, y, epochs=5, verbose=0, callbacks=[callback])
    assert callback.trace["epoch"] == [2, 4]
    assert len(callback.trace["log_marginal_likelihood"]) == 2
    assert history.history["log_marglik"] == callback.trace["log_marginal_likelihood"]


def test_regression_learns_sigma_noise():
    x, y = _data("regression")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    _, la, trace = ltf.marglik_training(model, "regression", (x, y), epochs=20, batch_size=8,
                                        optimizer=keras.optimizers.Adam(0.1), seed=0,
                                        verbose=0, marglik_frequency=10, n_hypersteps=100,
                                        restore_best_weights=False)  # the last refit
    residual = np.std(model.predict(x, verbose=0) - y)
    assert len(trace["sigma_noise"]) == 2
    assert float(la.sigma_noise) == pytest.approx(trace["sigma_noise"][-1])
    assert 0.5 * residual < trace["sigma_noise"][-1] < 2 * residual < 0.5  # from 1 to ~0.1


def test_marglik_training_is_reproducible_and_returns_the_final_posterior():
    x, y = _data("classification")
    runs = [ltf.marglik_training(_mlp("classification", seed=s), "classification", (x, y),
                                 epochs=3, batch_size=8, seed=3, verbose=0, n_hypersteps=5,
                                 marglik_frequency=2)
            for s in (0, 0)]
    model, la, trace = runs[0]
    assert trace["epoch"].tolist() == [2]  # and the returned posterior is at the returned weights
    flat = np.concatenate([w.numpy().ravel() for w in model.trainable_variables])
    np.testing.assert_allclose(np.asarray(la.mean), flat, rtol=1e-6)
    for a, b in zip(runs[0][0].get_weights(), runs[1][0].get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(runs[0][2]["prior_precision"], runs[1][2]["prior_precision"])


def test_labels_of_shape_n_by_1_are_class_indices():
    """Labels ``[N, 1]``, which ``la.fit`` takes, train as the labels ``[N]`` do."""
    x, y = _data("classification")
    runs = [ltf.marglik_training(_mlp("classification"), "classification", (x, labels),
                                 epochs=2, batch_size=8, seed=3, verbose=0, n_hypersteps=5)
            for labels in (y, y[:, None])]
    for a, b in zip(runs[0][0].get_weights(), runs[1][0].get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(runs[0][2]["prior_precision"], runs[1][2]["prior_precision"])


def test_marglik_training_returns_the_refit_with_the_highest_evidence():
    x, y = _data("regression")
    model, saved = _mlp("regression"), []
    keep = keras.callbacks.LambdaCallback(  # the weights each refit saw
        on_epoch_end=lambda epoch, logs: saved.append(model.get_weights()))
    model, la, trace = ltf.marglik_training(
        model, "regression", (x, y), epochs=6, batch_size=8, verbose=0, seed=0,
        optimizer=keras.optimizers.Adam(0.05), n_hypersteps=5, callbacks=[keep])
    best = int(np.argmax(trace["log_marginal_likelihood"]))
    assert best < 5  # not the last epoch: the weights went back
    for got, want in zip(model.get_weights(), saved[best], strict=True):
        np.testing.assert_array_equal(got, want)
    flat = np.concatenate([w.ravel() for w in saved[best]])
    np.testing.assert_allclose(np.asarray(la.mean), flat, rtol=1e-6)
    np.testing.assert_allclose(la.prior_precision, trace["prior_precision"][best], rtol=1e-6)
    np.testing.assert_allclose(float(la.sigma_noise), trace["sigma_noise"][best], rtol=1e-6)
    np.testing.assert_allclose(float(la.log_marginal_likelihood()),  # refitted there
                               trace["log_marginal_likelihood"][best], rtol=1e-5)


def test_a_fit_that_raises_leaves_no_learned_decay_on_the_model():
    """Keras skips ``on_train_end`` when fit raises; the L2 terms are taken off anyway, and
    the callback can be used again."""
    x, y = _data("classification")
    model = _mlp("classification")

    def fail(epoch, logs):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ltf.marglik_training(model, "classification", (x, y), epochs=2, verbose=0,
                             n_hypersteps=2,
                             callbacks=[keras.callbacks.LambdaCallback(on_epoch_end=fail)])
    assert all(v.regularizer is None for v in model.trainable_variables)
    callback = ltf.MarginalLikelihoodCallback("classification", (x, y), n_hypersteps=2)
    model.compile("sgd", _loss("classification"))
    stop = keras.callbacks.LambdaCallback(on_epoch_end=fail)
    with pytest.raises(KeyboardInterrupt):
        model.fit(x, y, epochs=2, verbose=0, callbacks=[callback, stop])
    assert all(v.regularizer is not None for v in model.trainable_variables)  # Keras skipped it
    model.fit(x, y, epochs=1, verbose=0, callbacks=[callback])  # attached again, then taken off
    assert all(v.regularizer is None for v in model.trainable_variables)


def _restoring(likelihood, n_hypersteps):
    """Data, a compiled model and a callback that restores its best refit."""
    x, y = _data(likelihood)
    model = _mlp(likelihood)
    model.compile(keras.optimizers.Adam(0.05), _loss(likelihood))
    callback = ltf.MarginalLikelihoodCallback(likelihood, (x, y), n_hypersteps=n_hypersteps,
                                              restore_best_weights=True)
    return x, y, model, callback


def test_a_second_fit_with_the_callback_restores_its_own_best_refit():
    x, y, model, callback = _restoring("classification", 2)
    for learning_rate in (0.05, 20.0):  # the second fit's refits are all worse
        model.optimizer.learning_rate.assign(learning_rate)
        model.fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=[callback])
        this_fit = callback.trace["log_marginal_likelihood"][-3:]
        assert callback.best_epoch == int(np.argmax(this_fit)) + 1
        np.testing.assert_allclose(float(callback.la.log_marginal_likelihood()),
                                   np.max(this_fit), rtol=1e-5)
    assert len(callback.trace["epoch"]) == 6  # the trace goes on


def test_restored_best_refit_keeps_its_sigma_for_the_next_fit():
    x, y, model, callback = _restoring("regression", 5)
    model.fit(x, y, epochs=6, batch_size=8, verbose=0, callbacks=[callback])
    best = callback.best_epoch - 1
    assert best < 5  # the weights and hyperparameters went back
    sigma = callback.trace["sigma_noise"][best]
    np.testing.assert_allclose(float(callback.la.sigma_noise), sigma, rtol=1e-6)
    np.testing.assert_allclose(float(tf.exp(callback._log_sigma)), sigma, rtol=1e-6)


class SubclassedMLP(keras.Model):
    def __init__(self, n_outputs):
        super().__init__()
        self.hidden, self.out = keras.layers.Dense(4, "tanh"), keras.layers.Dense(n_outputs)

    def call(self, x):
        return self.out(self.hidden(x))


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_a_subclassed_model_trains_with_the_l2_term_of_its_outputs(likelihood):
    x, y = _data(likelihood)
    keras.utils.set_random_seed(0)
    model = SubclassedMLP(1 if likelihood == "regression" else 2)
    model(x[:1])
    callback = ltf.MarginalLikelihoodCallback(likelihood, (x, y), n_hypersteps=2)
    model.compile("sgd", _loss(likelihood))
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[callback])
    sigma = callback.trace["sigma_noise"][0]  # NaN for classification
    expected = 1.0 / N if likelihood == "classification" else 2 * sigma**2 / 1 / N  # K = 1
    assert float(callback.factor) == pytest.approx(expected, rel=1e-6)


def _compiled(loss=None, optimizer="sgd", regularizer=None, activity=None, **options):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(
        2, kernel_regularizer=regularizer, activity_regularizer=activity)])
    model.compile(optimizer, loss or _loss("classification"), **options)
    return model


@pytest.mark.parametrize("prior_structure", ["scalar", "layerwise", "diag"])
def test_the_l2_term_of_a_subnetwork_covers_its_weights_only(prior_structure):
    """It covered the whole tensors holding a chosen weight (and "diag" failed inside the
    first step): by hand, (1/N) 1/2 sum over the chosen weights of lambda theta^2."""
    x, y = _data("classification")
    model = _mlp("classification")
    model.compile("sgd", _loss("classification"))
    chosen = np.array([0, 1, 2, 7, 17, 20])  # first kernel (12), first bias (4), second kernel
    callback = ltf.MarginalLikelihoodCallback(
        "classification", (x, y), subset_of_weights="subnetwork", subnetwork_indices=chosen,
        hessian_structure="full", prior_structure=prior_structure, prior_precision=50.0)
    callback.set_model(model)
    flat = np.concatenate([v.numpy().ravel() for v in model.trainable_variables])
    expected = 0.5 * 50.0 * np.sum(flat[chosen] ** 2) / N
    np.testing.assert_allclose(float(sum(model.losses)), expected, rtol=1e-6)
    model.fit(x, y, epochs=1, batch_size=N, verbose=0, callbacks=[callback])
    assert model.losses == []


@pytest.mark.parametrize("data, match", [
    (lambda x, y: (x, y + 5), "class labels must lie in"),
    (lambda x, y: tf.data.Dataset.from_tensor_slices((x, y)), r"Call \.batch\(n\)"),
])
def test_bad_data_is_refused_before_training(data, match):
    """Raw Keras errors came from inside model.fit (after some steps, for some faults)."""
    model = _mlp("classification")
    before = [w.numpy() for w in model.trainable_variables]
    with pytest.raises(ValueError, match=match):
        ltf.marglik_training(model, "classification", data(*_data("classification")),
                             epochs=1, verbose=0)
    for weight, start in zip(model.trainable_variables, before, strict=True):
        np.testing.assert_array_equal(weight.numpy(), start)
    assert model.losses == []


def test_evaluate_with_the_callback_leaves_no_learned_decay_on_the_model():
    x, y = _data("classification")
    model = _compiled()
    callback = ltf.MarginalLikelihoodCallback("classification", (x, y), prior_precision=50.0)
    model.evaluate(x, y, verbose=0, callbacks=[callback])
    model.predict(x, verbose=0, callbacks=[callback])
    assert model.losses == []


@pytest.mark.parametrize("make, match", [
    (lambda d: ltf.MarginalLikelihoodCallback("heteroscedastic", d), "likelihood"),
    (lambda d: ltf.MarginalLikelihoodCallback("classification", d, marglik_frequency=0),
     "marglik_frequency"),
    (lambda d: ltf.MarginalLikelihoodCallback("classification", d, lr_hyp=-1.0), "lr_hyp"),
    (lambda d: ltf.MarginalLikelihoodCallback("classification", d, prior_mean=5.0),
     "prior_mean: marginal-likelihood training learns a prior centred at 0"),
    (lambda d: ltf.MarginalLikelihoodCallback("classification", d, prior_structure="layer"),
     "prior_structure"),
    (lambda d: ltf.MarginalLikelihoodCallback("classification", d, prior_structure="diag")
     .set_model(_compiled()), "prior_structure"),
    (lambda d: ltf.MarginalLikelihoodCallback("classification", d, prior_structure="tensorwise")
     .set_model(_compiled()), "Kronecker"),
    (lambda d: ltf.MarginalLikelihoodCallback("regression", d).set_model(_compiled()),
     "compiled loss"),
    (lambda d: ltf.MarginalLikelihoodCallback("classification", d).set_model(
        _compiled(keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum"))),
     "reduction"),
    (lambda d: ltf.MarginalLikelihoodCallback("classification", d).set_model(
        _compiled(optimizer="adamw")), "weight_decay"),
    (lambda d: ltf.MarginalLikelihoodCallback("classification", d).set_model(
        _compiled("sparse_categorical_crossentropy")), r"takes probabilities \(from_logits"),
    (lambda d: ltf.MarginalLikelihoodCallback("classification", d).set_model(_compiled(
        keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=0))),
     "ignore_class"),
    (lambda d: ltf.MarginalLikelihoodCallback("classification", d).set_model(_compiled(
        keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1))),
     "label_smoothing"),
    (lambda d: ltf.MarginalLikelihoodCallback("classification", d).set_model(
        _compiled(loss_weights=2.0)), "loss_weights"),
    (lambda d: ltf.MarginalLikelihoodCallback("classification", d).set_model(
        _compiled(regularizer="l2")), "regularizer"),
    (lambda d: ltf.MarginalLikelihoodCallback("classification", d).set_model(
        _compiled(activity="l2")), "activity_regularizer"),
    (lambda d: ltf.MarginalLikelihoodCallback("classification", d).set_model(_compiled(
        optimizer=keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(weight_decay=0.3)))),
     "weight_decay"),
    (lambda d: ltf.marglik_training(_mlp("classification"), "classification", d, epochs=1,
                                    verbose=0, callbacks=[keras.callbacks.EarlyStopping(
                                        restore_best_weights=True)]), "restores weights"),
    (lambda d: ltf.MarginalLikelihoodCallback(
        "classification", tf.data.Dataset.from_tensor_slices(d).batch(4).repeat())
     .set_model(_compiled()), "infinite"),
    (lambda d: ltf.marglik_training(_mlp("classification"), "classification", d, epochs=1,
                                    n_epochs_burnin=3, verbose=0), "no refit"),
])
def test_bad_arguments_raise_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make(_data("classification"))


def test_train_data_must_be_arrays_or_a_dataset():
    with pytest.raises(TypeError, match="train_data"):
        ltf.MarginalLikelihoodCallback("classification", np.zeros((4, 3)))
    x, y = _data("classification")
    with pytest.raises(TypeError, match=r"weighted data: a dataset, .*got a tuple of 3 items"):
        ltf.MarginalLikelihoodCallback("classification", (x, y, np.ones(len(x))))


def test_the_returned_laplace_is_centred_on_weights_an_early_stopping_put_back():
    """EarlyStopping restores its best weights after the callback's last refit (at the last
    epoch, so no refit followed): the Laplace stayed at the final epoch's weights."""
    x, y = _data("classification")
    model, la, trace = ltf.marglik_training(
        _mlp("classification"), "classification", (x, y), epochs=4, restore_best_weights=False,
        verbose=0, seed=0, optimizer=keras.optimizers.SGD(0.5),
        callbacks=[keras.callbacks.EarlyStopping("loss", patience=10, mode="max",
                                                 restore_best_weights=True)])
    assert trace["epoch"][-1] == 4  # the last refit saw the last epoch's weights, not these
    weights = np.concatenate([w.numpy().ravel() for w in model.trainable_variables])
    np.testing.assert_array_equal(la.mean, weights)
