"""Marginal-likelihood training: learn the weight decay (and sigma_noise) during ``model.fit``.

Immer et al. (2021), "Scalable marginal likelihood estimation for model selection in deep
learning" (laplace-torch's ``marglik_training``): every ``marglik_frequency`` epochs after
``n_epochs_burnin``, the Laplace posterior is refitted at the current weights on the training
data and its hyperparameters (the prior precision ``lambda``, one per layer by default, and
for regression ``sigma_noise``) are moved by ``n_hypersteps`` Adam steps (on ``log lambda``,
``log sigma``) up the Laplace evidence. As in laplace-torch, one Adam run continues across the
refits (its moments and step count are kept), so the hyperparameters move as under a single
optimizer that takes ``n_hypersteps`` steps after each refit. The learned prior is the L2 term
of the training loss.

Prior structures: ``"scalar"``, ``"layerwise"`` (one per Keras layer, the kernel and bias of a
layer share it), ``"tensorwise"`` (one per weight tensor: kernel and bias apart, laplace-torch's
``"layerwise"``, which has one per ``nn.Parameter``; a per-weight prior of the posterior, so
``hessian_structure`` ``"full"`` or ``"diag"``) and ``"diag"`` (one per weight).

**Loss convention.** Keras losses are means over the batch, so the training objective is
the negative log joint divided by the number of training examples ``N`` (its minimiser is the
MAP of the Laplace posterior, whose losses are sums)::

    classification:  mean CE                + (T / N)             * 1/2 sum_l lambda_l ||theta_l||^2
    binary (1 out):  mean BCE                + (T / N)             * 1/2 sum_l lambda_l ||theta_l||^2
    regression:      mean MSE over outputs   + (2 sigma^2 T/(N K)) * 1/2 sum_l lambda_l ||theta_l||^2

The regression line is the Gaussian NLL with the learned ``sigma`` times ``2 sigma^2 / K``
(the same minimiser; the constant factor leaves Adam's steps unchanged), as in laplace-torch.
The terms are attached to the weights as Keras regularizers that read ``lambda`` and the factor
from ``tf.Variable``s, so a refit changes them without retracing or recompiling the model;
they are removed when ``fit`` ends.

Example:
    >>> import keras, numpy as np, laplace_tf as ltf
    >>> keras.utils.set_random_seed(0)
    >>> x = np.random.default_rng(0).normal(size=(40, 2)).astype("float32")
    >>> y = (x[:, 0] > 0).astype("int32")
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    >>> model, la, trace = ltf.marglik_training(model, "classification", (x, y), epochs=2,
    ...                                         hessian_structure="full", verbose=0)
    >>> len(trace["log_marginal_likelihood"]), trace["prior_precision"].shape
    (2, (2, 1))
"""

from __future__ import annotations

import numbers

import keras
import numpy as np
import tensorflow as tf

from laplace_tf.arguments import choice, flag, non_negative_int, positive_int, positive_number
from laplace_tf.outputs import output_activation
from laplace_tf.posterior.marglik import AdamAscent, adam_state, ascent_trace
from laplace_tf.predictive import Laplace

LIKELIHOODS = ("classification", "binary", "regression")
PRIOR_STRUCTURES = ("scalar", "layerwise", "tensorwise", "diag")
_LOSSES = {  # the mean losses whose scale the L2 term is matched to
    "classification": ("sparse_categorical_crossentropy", "categorical_crossentropy",
                       keras.losses.SparseCategoricalCrossentropy,
                       keras.losses.CategoricalCrossentropy),
    "binary": ("binary_crossentropy", keras.losses.BinaryCrossentropy),
    "regression": ("mse", "mean_squared_error", keras.losses.MeanSquaredError),
}


class _LearnedL2:
    """``factor / 2 * sum lambda w^2``, ``lambda = exp(log_prior[start])`` (one for all, one
    per layer or tensor) or ``exp(log_prior[start:stop])`` (one per weight), read from the
    learned variables at every step; over the ``entries`` of the weight's ravel only (a
    subnetwork's), or all of them (None)."""

    def __init__(self, log_prior: tf.Variable, factor: tf.Variable, start: int,
                 stop: int | None, entries: np.ndarray | None = None):
        self.log_prior, self.factor, self.start, self.stop = log_prior, factor, start, stop
        self.entries = entries

    def __call__(self, weight):
        weight = tf.convert_to_tensor(weight)
        if self.entries is not None:
            weight = tf.gather(tf.reshape(weight, [-1]), self.entries)
        if self.stop is None:
            precision = tf.exp(self.log_prior[self.start])
        else:
            precision = tf.reshape(tf.exp(self.log_prior[self.start:self.stop]), tf.shape(weight))
        penalty = 0.5 * self.factor * tf.reduce_sum(
            tf.cast(precision, weight.dtype) * tf.square(weight))
        return tf.cast(penalty, keras.config.floatx())  # Keras sums its losses in floatx


class MarginalLikelihoodCallback(keras.callbacks.Callback):
    """Learn the prior precision (weight decay) and sigma_noise by the evidence during fit.

    Args:
        likelihood: ``"classification"``, ``"binary"`` or ``"regression"``; the model must be
            compiled with the matching mean loss (sparse/categorical crossentropy, binary
            crossentropy, mean squared error; default reduction) and an optimizer without
            weight decay, its weights without regularizers (the callback supplies the L2 term).
        train_data: the training data, ``(x, y)`` arrays or a finite ``tf.data.Dataset`` of
            ``(x, y)`` or ``(x, y, sample_weight)`` batches (for the refits and ``N``; a
            ``model.fit(..., sample_weight=w)`` needs the same weights here, as a dataset,
            for the refits to weight the data as the training does).
        subset_of_weights, hessian_structure: of the refitted :class:`~laplace_tf.Laplace`
            (the learned L2 term regularises only that subset).
        prior_structure: ``"scalar"``, ``"layerwise"`` (one per Keras layer),
            ``"tensorwise"`` (one per weight tensor, laplace-torch's ``"layerwise"``; needs
            ``hessian_structure`` ``"full"`` or ``"diag"``) or ``"diag"`` (one per weight).
        prior_precision, sigma_noise: initial values (``sigma_noise``: scalar, regression).
        tune_sigma_noise: learn ``sigma_noise`` (regression).
        n_epochs_burnin: epochs before the first refit.
        marglik_frequency: refit after every ``marglik_frequency``-th epoch.
        n_hypersteps, lr_hyp: Adam steps per refit and step size on the log hyperparameters
            (one Adam run across all refits; the defaults, a refit after every epoch from the
            first with 10 steps of size 0.1, are laplace-torch's).
        temperature: the Laplace temperature ``T``.
        restore_best_weights: when fit ends, put back the weights, prior and sigma_noise of
            the refit with the highest evidence and refit ``self.la`` there (as Keras'
            ``EarlyStopping`` and laplace-torch's ``marglik_training``, which returns the
            best-evidence model): the evidence, a training-data criterion, selects the epoch.
        **laplace_kwargs: more :class:`~laplace_tf.Laplace` arguments (``batch_size``, ...).

    After each refit ``logs`` (the progress bar, ``History``) get ``log_marglik`` (and
    ``sigma_noise``); ``self.la`` is the latest fitted Laplace, ``self.trace`` the values,
    ``self.best_epoch`` the refit with the highest evidence in the latest fit (a second
    ``model.fit`` with the callback starts its own search; the Adam run and the trace go on).

    The refits see ``train_data`` only, not ``model.fit``'s other arguments: give sample
    weights as ``(x, y, w)`` batches there instead of a ``class_weight``, and the training
    split itself instead of a ``validation_split``. An ``EarlyStopping`` that restores its
    weights does so after this callback's last refit: refit ``self.la`` then
    (:func:`marglik_training` does).
    """

    def __init__(self, likelihood: str, train_data, subset_of_weights: str = "all",
                 hessian_structure: str = "kron", prior_structure: str = "layerwise",
                 prior_precision: float = 1.0, sigma_noise: float = 1.0,
                 tune_sigma_noise: bool = True, n_epochs_burnin: int = 0,
                 marglik_frequency: int = 1, n_hypersteps: int = 10, lr_hyp: float = 0.1,
                 temperature: float = 1.0, restore_best_weights: bool = False,
                 **laplace_kwargs):
        super().__init__()
        self.likelihood = choice(likelihood, "likelihood", LIKELIHOODS)
        if not (isinstance(train_data, tf.data.Dataset) or (
                isinstance(train_data, (tuple, list)) and len(train_data) == 2)):
            got = (f"a {type(train_data).__name__} of {len(train_data)} items" if isinstance(
                train_data, (tuple, list)) else type(train_data).__name__)
            raise TypeError(
                "train_data: expected a tuple (x, y) of arrays or a tf.data.Dataset of (x, y) "
                f"or (x, y, sample_weight) batches (weighted data: a dataset, e.g. tf.data."
                f"Dataset.from_tensor_slices((x, y, w)).batch(32)); got {got}.")
        self.train_data = train_data
        self.prior_structure = choice(prior_structure, "prior_structure", PRIOR_STRUCTURES)
        self.prior_precision = positive_number(prior_precision, "prior_precision")
        self.sigma_noise = positive_number(sigma_noise, "sigma_noise")
        self.tune_sigma_noise = flag(tune_sigma_noise, "tune_sigma_noise") and \
            self.likelihood == "regression"
        self.n_epochs_burnin = non_negative_int(n_epochs_burnin, "n_epochs_burnin")
        self.marglik_frequency = positive_int(marglik_frequency, "marglik_frequency")
        self.n_hypersteps = positive_int(n_hypersteps, "n_hypersteps")
        self.lr_hyp = positive_number(lr_hyp, "lr_hyp")
        self.temperature = positive_number(temperature, "temperature")
        self.restore_best_weights = flag(restore_best_weights, "restore_best_weights")
        self.best_epoch: int | None = None
        self._best: tuple | None = None  # (evidence, weights, sigma, log prior)
        self._epochs_done = 0
        if laplace_kwargs.get("prior_mean") is not None:
            raise ValueError(
                "prior_mean: marginal-likelihood training learns a prior centred at 0, the "
                f"weight decay of the training loss; got prior_mean={laplace_kwargs['prior_mean']!r}"
                ". Leave it out (fit a Laplace with a prior mean after training instead).")
        self._laplace_args = dict(subset_of_weights=subset_of_weights,
                                  hessian_structure=hessian_structure, **laplace_kwargs)
        self.la: Laplace | None = None
        self.trace: dict[str, list] = {"epoch": [], "log_marginal_likelihood": [],
                                       "prior_precision": [], "sigma_noise": []}
        self._attached: list = []
        self._in_fit = False

    def set_model(self, model):
        super().set_model(model)
        if self.la is None or self.la.model is not model:
            self._n_data = _count(self.train_data)
            la = Laplace(model, self.likelihood, prior_precision=self.prior_precision,
                         sigma_noise=self.sigma_noise, temperature=self.temperature,
                         progress=False, **self._laplace_args)
            per_weight = self.prior_structure in ("tensorwise", "diag")
            if per_weight and "diag" not in la.structure.prior_structures:
                raise ValueError(
                    f"prior_structure: {self.prior_structure!r} is a per-weight prior of the "
                    f"posterior, which hessian_structure={la.hessian_structure!r} does not have "
                    "(a Kronecker block shares one precision per layer); use 'scalar' or "
                    "'layerwise', or hessian_structure='full' or 'diag'.")
            self.la = la
            self._tensor_sizes = [int(np.prod(v.shape)) for v in la.subset.variables]
            if self.prior_structure == "tensorwise" and sum(self._tensor_sizes) != la.n_params:
                raise ValueError(
                    "prior_structure: 'tensorwise' needs whole weight tensors; this weight "
                    "subset takes parts of some (a subnetwork): use 'layerwise' or 'diag'.")
            dtype = la.subset.dtype
            start = tf.constant(np.log(self.prior_precision), dtype)
            self._log_prior = tf.Variable(  # the learned prior: the L2 terms read it
                tf.fill([self._n_hyperparameters(la)], start), name="marglik_log_prior_precision")
            self._log_sigma = tf.Variable(tf.math.log(tf.cast(la.sigma_noise, dtype)))
            self._hyper = [self._log_prior, self._log_sigma] if self.tune_sigma_noise \
                else [self._log_prior]
            self._adam = adam_state(self._hyper)
            self.factor = tf.Variable(tf.constant(0.0, dtype), trainable=False,
                                      name="marglik_l2_factor")
            self._n_outputs = _n_outputs(model, self.train_data)
            self._set_factor(self.sigma_noise)
        self._attach(model)

    def _set_factor(self, sigma: float) -> None:
        outputs = self._n_outputs if self.likelihood != "classification" else 1
        per_example = {"classification": 1.0, "binary": 1.0 / outputs,
                       "regression": 2.0 * sigma**2 / outputs}[self.likelihood]
        self.factor.assign(per_example * self.temperature / self._n_data)

    def _attach(self, model) -> None:
        _check_compiled(model, self.likelihood)
        assert self.la is not None  # made by the caller for this model
        variables = [v for s in self.la.subset.slices for v in s.variables]
        for variable in variables:
            if variable.regularizer is not None and not any(  # by identity: `in` compares
                    variable is mine for mine in self._attached):  # Keras variables' values
                raise ValueError(
                    f"model: the weight {variable.path!r} already has a regularizer; the "
                    "marginal likelihood learns the weight decay: remove the layer's "
                    "kernel_regularizer/bias_regularizer.")
        offset, tensor = 0, 0
        for index, s in enumerate(self.la.subset.slices):
            begins = np.cumsum([0] + [int(np.prod(v.shape)) for v in s.variables])
            for variable, begin, end in zip(s.variables, begins[:-1], begins[1:], strict=True):
                entries = None if s.columns is None else \
                    s.columns[(s.columns >= begin) & (s.columns < end)] - begin  # a subnetwork
                size = end - begin if entries is None else len(entries)
                start, stop = {"scalar": (0, None), "layerwise": (index, None),
                               "tensorwise": (tensor, None),
                               "diag": (offset, offset + size)}[self.prior_structure]
                variable.regularizer = _LearnedL2(self._log_prior, self.factor, start, stop,
                                                  entries)
                offset, tensor = offset + size, tensor + 1
        self._attached = variables
        model.train_function = model.test_function = None  # traced again, with the L2 terms

    def detach(self) -> None:
        """Take the learned L2 terms off the model's weights (done at the end of every fit;
        call it after a fit that raised, when Keras skips ``on_train_end``)."""
        for variable in self._attached:
            variable.regularizer = None
        self._attached = []
        if self.model is not None:
            self.model.train_function = self.model.test_function = None

    def on_train_begin(self, logs=None):
        self.best_epoch, self._best, self._epochs_done = None, None, 0  # this fit's best
        self._in_fit = True

    def on_test_end(self, logs=None):  # model.evaluate(..., callbacks=[this]) attached too
        if not self._in_fit:
            self.detach()

    def on_predict_end(self, logs=None):
        self.on_test_end(logs)

    def on_train_end(self, logs=None):
        self._in_fit = False
        self.detach()
        if self.restore_best_weights and self._best is not None \
                and self.best_epoch != self._epochs_done:
            _, weights, sigma, log_prior = self._best
            self.model.set_weights(weights)
            self._log_prior.assign(log_prior)
            self.la.fit(self.train_data, progress=False)
            self.la.prior_precision = self._posterior_prior(np.exp(log_prior))
            if self.likelihood == "regression":
                self._log_sigma.assign(tf.math.log(tf.cast(sigma, self._log_sigma.dtype)))
                self._set_factor(sigma)
                self.la.sigma_noise = sigma

    def on_epoch_end(self, epoch, logs=None):
        done = self._epochs_done = epoch + 1
        if done % self.marglik_frequency or done < self.n_epochs_burnin:
            return
        la = self.la
        la.fit(self.train_data, progress=False)

        def objective(values):  # [log prior] or [log prior, log sigma] (self._hyper)
            log_sigma = values[1] if self.tune_sigma_noise else self._log_sigma
            return la.log_evidence(self._posterior_prior(tf.exp(values[0])), tf.exp(log_sigma))

        # n_hypersteps - 1 more steps after the first evaluation: n_hypersteps Adam steps
        values, points = AdamAscent(objective, self._hyper, self._adam)(
            self.n_hypersteps - 1, self.lr_hyp, progress=False, reset=False)
        log_prior = self._log_prior.numpy()
        hyper = np.exp(log_prior)
        sigma = float(np.exp(self._log_sigma.numpy())) if self.likelihood == "regression" \
            else float("nan")
        la.update(prior=self._posterior_prior(hyper),
                  sigma=sigma if self.tune_sigma_noise else None)
        la.tuning_trace = ascent_trace(values, points, self.tune_sigma_noise)
        if self.likelihood == "regression":
            self._set_factor(sigma)
        evidence = float(la.log_marginal_likelihood())
        if self._best is None or evidence > self._best[0]:
            self.best_epoch = done
            self._best = (evidence, self.model.get_weights(), sigma, log_prior)
        if self.prior_structure == "scalar":  # the trace has one per layer
            hyper = np.full(len(la.subset.slices), hyper[0])
        for key, value in (("epoch", done), ("log_marginal_likelihood", evidence),
                           ("prior_precision", hyper), ("sigma_noise", sigma)):
            self.trace[key].append(value)
        if logs is not None:
            logs["log_marglik"] = evidence
            if self.likelihood == "regression":
                logs["sigma_noise"] = sigma

    def _posterior_prior(self, hyper):
        """The posterior's prior precision (``[]``, ``[L]`` or ``[P]``) from the learned
        values (one, one per layer, per tensor or per weight)."""
        if self.prior_structure == "scalar":
            return hyper[0]
        if self.prior_structure == "tensorwise":
            return tf.repeat(hyper, self._tensor_sizes)
        return hyper

    def _n_hyperparameters(self, la: Laplace) -> int:
        """The number of learned prior precisions for ``la``'s weights."""
        return {"scalar": 1, "layerwise": len(la.subset.slices),
                "tensorwise": len(self._tensor_sizes), "diag": la.n_params}[self.prior_structure]


def _n_outputs(model, data) -> int:
    """``K``, the model's outputs (a subclassed model has no ``output_shape``: its first
    batch's outputs)."""
    try:
        shape = tuple(model.output_shape)
    except (AttributeError, ValueError):
        first = next(iter(data)) if isinstance(data, tf.data.Dataset) else data
        x = first[0][:1] if not isinstance(first[0], dict) else \
            {k: v[:1] for k, v in first[0].items()}
        shape = tuple(model(x).shape)
    return int(shape[-1]) if len(shape) > 1 and shape[-1] is not None else 1


def _count(data) -> int:
    """The number of training examples ``N``."""
    if isinstance(data, tf.data.Dataset):
        if int(data.cardinality()) == tf.data.INFINITE_CARDINALITY:
            raise ValueError(
                "train_data: the dataset is infinite (.repeat() without a count), so the refits "
                "would never end; give the training data once (without .repeat()), or as "
                "(x, y) arrays."
            )
        n = 0
        for batch in data:
            n += int(tf.shape(tf.nest.flatten(batch[0])[0])[0])
        if n == 0:
            raise ValueError("train_data: the dataset is empty.")
        return n
    n = len(data[1])
    if n == 0:
        raise ValueError("train_data: expected at least one example; got an empty y.")
    return n


def _loss_name(loss) -> str:
    return loss if isinstance(loss, str) else type(loss).__name__


def _check_compiled(model, likelihood: str) -> None:
    """The compiled loss and optimizer fit the L2 convention (see the module docstring)."""
    if not getattr(model, "compiled", False) or model.optimizer is None:
        raise ValueError("model: compile the model first (model.compile(optimizer, loss)).")
    loss, allowed = model.loss, _LOSSES[likelihood]
    names = [a if isinstance(a, str) else a.__name__ for a in allowed]
    known = loss in allowed if isinstance(loss, str) else isinstance(
        loss, tuple(a for a in allowed if not isinstance(a, str)))
    if not known:
        raise ValueError(
            f"model: the compiled loss must be one of {names} for likelihood={likelihood!r} "
            f"(the L2 term is scaled to its mean); got {_loss_name(loss)!r}.")
    if not isinstance(loss, str) and loss.reduction != "sum_over_batch_size":
        raise ValueError(
            f"model: the compiled loss must average over the batch (reduction="
            f"'sum_over_batch_size'); got reduction={loss.reduction!r}.")
    options = {} if isinstance(loss, str) else loss.get_config()
    logits = output_activation(model) is None
    if likelihood != "regression" and options.get("from_logits", False) != logits:
        raise ValueError(
            f"model: the compiled loss takes {'logits' if not logits else 'probabilities'} "
            f"(from_logits={options.get('from_logits', False)}), but the model outputs "
            f"{'logits' if logits else 'probabilities'}; compile with "
            f"{_loss_name(loss) if not isinstance(loss, str) else 'the loss class'}"
            f"(from_logits={logits}).")
    if options.get("label_smoothing") or options.get("ignore_class") is not None:
        raise ValueError(
            "model: the compiled loss smooths labels or ignores a class, so it is not the "
            "likelihood whose evidence is maximised; compile without label_smoothing and "
            "ignore_class.")
    weights = (model.get_compile_config() or {}).get("loss_weights")
    if weights is not None and not np.all(np.asarray(
            list(weights.values()) if isinstance(weights, dict) else weights) == 1):
        raise ValueError(
            f"model: loss_weights={weights} scales the loss against the learned L2 term; "
            "compile without loss_weights.")
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if getattr(layer, "activity_regularizer", None) is not None:
            raise ValueError(
                f"model: layer {layer.name!r} has an activity_regularizer, a term of the "
                "training loss that is not the likelihood whose evidence is maximised; remove "
                "it.")
    optimizer = model.optimizer
    while hasattr(optimizer, "inner_optimizer"):  # a LossScaleOptimizer's
        optimizer = optimizer.inner_optimizer
    decay = getattr(optimizer, "weight_decay", None)
    if decay:
        raise ValueError(
            f"model: the optimizer has weight_decay={decay}; the marginal likelihood learns "
            "the weight decay: use an optimizer without it (e.g. Adam instead of AdamW).")


def marglik_training(model: keras.Model, likelihood: str, train_data, epochs: int = 100,
                     optimizer="adam", batch_size: int = 32, seed: int | None = None,
                     verbose="auto", callbacks=None, **options):
    """Train ``model`` with the weight decay (and sigma_noise) learned by the evidence.

    Compiles ``model`` with ``optimizer`` and the mean loss of ``likelihood`` (crossentropy
    on logits, or on probabilities when the model ends in a softmax/sigmoid; mean squared
    error for regression), runs ``model.fit`` for ``epochs`` with a
    :class:`MarginalLikelihoodCallback` and returns what it learned. Its Laplace is fitted
    on the first batch before training, so outputs, data or first-batch labels it cannot
    take are refused (``ValueError``) before any step (a bad label in a later batch at the
    first refit).

    Args:
        model: a Keras model (weights without regularizers).
        likelihood: ``"classification"``, ``"binary"`` or ``"regression"``.
        train_data: ``(x, y)`` arrays (shuffled in batches of ``batch_size``) or a
            ``tf.data.Dataset`` of ``(x, y)`` or ``(x, y, sample_weight)`` batches.
        epochs, optimizer, batch_size, verbose, callbacks: as in ``model.fit``/``compile``.
        seed: seeds Keras (shuffling, dropout, ...) first: the same seed, the same result.
        **options: :class:`MarginalLikelihoodCallback` arguments (``hessian_structure``,
            ``prior_structure``, ``marglik_frequency``, ``n_hypersteps``, ...);
            ``restore_best_weights`` defaults to ``True`` here (laplace-torch's choice).

    Returns:
        ``(model, la, trace)``: the model with the weights of the refit with the highest
        evidence (``restore_best_weights=False``: the final weights), the Laplace fitted at
        those weights with that refit's prior precision and sigma_noise, and ``trace``, a dict of
        arrays with one entry per refit: ``epoch``, ``log_marginal_likelihood``,
        ``prior_precision`` (``[R, L]``; ``"tensorwise"``: ``[R, tensors]``, ``"diag"``:
        ``[R, P]``) and ``sigma_noise`` (NaN unless regression).
    """
    likelihood = choice(likelihood, "likelihood", LIKELIHOODS)
    epochs = positive_int(epochs, "epochs")
    batch_size = positive_int(batch_size, "batch_size")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed: expected an int or None; got {seed!r}.")
        keras.utils.set_random_seed(int(seed))
    options.setdefault("restore_best_weights", True)
    callback = MarginalLikelihoodCallback(likelihood, train_data, **options)
    if callback.restore_best_weights and any(
            getattr(c, "restore_best_weights", False) for c in callbacks or []):
        raise ValueError(
            "callbacks: a callback that restores weights (EarlyStopping(restore_best_weights="
            "True)) would undo the best-evidence weights marglik_training returns with its "
            "Laplace; pass restore_best_weights=False to one of them.")
    from_logits = output_activation(model) is None
    if likelihood == "regression":
        loss = keras.losses.MeanSquaredError()
    elif likelihood == "binary":
        loss = keras.losses.BinaryCrossentropy(from_logits=from_logits)
    elif _one_hot_labels(train_data):
        loss = keras.losses.CategoricalCrossentropy(from_logits=from_logits)
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)
    model.compile(optimizer=optimizer, loss=loss)
    try:
        callback.set_model(model)  # its Laplace, fitted on one batch: bad labels, outputs or
        assert callback.la is not None  # data refused before training
        callback.la.fit(_first_batch(train_data, batch_size))
        if isinstance(train_data, tf.data.Dataset):
            model.fit(train_data, epochs=epochs, verbose=verbose,
                      callbacks=[callback, *(callbacks or [])])
        else:
            model.fit(*train_data, epochs=epochs, batch_size=batch_size, verbose=verbose,
                      callbacks=[callback, *(callbacks or [])])
    finally:  # Keras skips on_train_end when fit raises: no learned L2 left on the model
        callback.detach()
    if not callback.trace["epoch"]:
        raise ValueError(
            f"epochs: no refit happened in {epochs} epochs (n_epochs_burnin="
            f"{callback.n_epochs_burnin}, marglik_frequency={callback.marglik_frequency}); "
            "train longer or refit more often.")
    assert callback.la is not None  # a refit happened
    la = callback.la
    if not callback.restore_best_weights and not np.array_equal(la.mean, la.subset.flat_values()):
        la.fit(train_data, progress=False)  # the posterior at the returned weights (after a
        # last epoch without a refit, or weights an EarlyStopping put back after the callback)
    trace = {key: np.asarray(value) for key, value in callback.trace.items()}
    return model, callback.la, trace


def _first_batch(data, batch_size: int):
    """The first batch of ``data``: ``(x, y)`` arrays or a dataset of batches."""
    if isinstance(data, tf.data.Dataset):
        return data.take(1)
    x, y = data
    rows = slice(0, batch_size)
    return ({k: v[rows] for k, v in x.items()} if isinstance(x, dict) else x[rows]), y[rows]


def _one_hot_labels(data) -> bool:
    """Whether the labels are one-hot rows ``[N, C]`` (not class indices ``[N]`` or ``[N, 1]``)."""
    if isinstance(data, tf.data.Dataset):
        shape = tuple(tf.nest.flatten(data.element_spec[1])[0].shape)
    else:
        shape = np.shape(data[1])
    return len(shape) >= 2 and shape[-1] != 1
