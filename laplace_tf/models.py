"""Built-in MAP networks for the demo, the configs and the notebooks, trained on the spot.

:func:`mlp` builds a plain Keras MLP that outputs logits; :func:`train_map` finds its MAP
weights under the same objective the Laplace approximation assumes: the summed negative
log-likelihood of :mod:`laplace_tf.likelihoods` (softmax cross-entropy on logits, sigmoid
cross-entropy on a logit, Gaussian with ``sigma_noise``) plus the Gaussian prior
``prior_precision / 2 * ||theta||^2`` on every trainable weight. Keras minimises means over a
batch, so the objective is divided by ``N``: the weight decay is ``prior_precision / (2 N)``.

Example:
    >>> import numpy as np
    >>> x = np.linspace(-1, 1, 32, dtype="float32")[:, None]
    >>> model = mlp((1,), 1, hidden=(8,), seed=0)
    >>> losses = train_map(model, "regression", x, 2 * x, epochs=3, batch_size=16)
    >>> len(losses), model.output_shape
    (3, (None, 1))
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from laplace_tf.console import keras_verbosity
from laplace_tf.likelihoods import get_likelihood
from laplace_tf.outputs import output_activation


def _positive(name: str, value, integer: bool) -> None:
    kind = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
        expected = "integer" if integer else "number"
        raise ValueError(f"{name}: expected a positive {expected}; got {value!r}.")


def mlp(
    input_shape: Sequence[int],
    n_outputs: int,
    hidden: Sequence[int] = (64, 64),
    activation: str = "tanh",
    dtype: str = "float32",
    seed: int = 0,
) -> keras.Sequential:
    """A multilayer perceptron ``input -> hidden Dense layers -> n_outputs logits``.

    Inputs with more than one axis are flattened first. The weights are initialised from
    ``seed``.

    Args:
        input_shape: shape of one input, e.g. ``(64,)`` or ``(8, 8)``.
        n_outputs: number of logits (classes, 1 for binary, target width for regression).
        hidden: width of each hidden layer (may be empty: a linear model).
        activation: the hidden layers' Keras activation name, e.g. ``"tanh"``, ``"relu"``.
        dtype: ``"float32"`` or ``"float64"``.
        seed: initialisation seed.

    Example:
        >>> [layer.units for layer in mlp((8, 8), 10, hidden=(32,)).layers[1:]]
        [32, 10]
    """
    shape = tuple(int(d) for d in input_shape)
    if not shape or min(shape) < 1:
        raise ValueError(f"input_shape: expected positive dimensions like (64,); got {input_shape!r}.")
    for name, value in (("n_outputs", n_outputs), *(("hidden", h) for h in hidden)):
        _positive(name, value, integer=True)
    try:
        keras.activations.get(activation)
    except ValueError:
        raise ValueError(
            f"activation: {activation!r} is not a Keras activation; try 'tanh' or 'relu'."
        ) from None
    keras.utils.set_random_seed(seed)
    layers: list[keras.layers.Layer] = [keras.Input(shape, dtype=dtype)]
    if len(shape) > 1:
        layers.append(keras.layers.Flatten(dtype=dtype))
    layers += [keras.layers.Dense(int(h), activation=activation, dtype=dtype) for h in hidden]
    layers.append(keras.layers.Dense(int(n_outputs), dtype=dtype, name="logits"))
    return keras.Sequential(layers, name="mlp")


def train_map(
    model: keras.Model,
    likelihood: str,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int = 30,
    batch_size: int = 64,
    seed: int = 0,
    verbose: int | str | bool = 0,
    *,
    prior_precision: float = 1.0,
    sigma_noise: float = 1.0,
    learning_rate: float = 1e-3,
) -> list[float]:
    """Train ``model`` (in place) to the MAP of the likelihood plus a Gaussian prior.

    Minimises ``(sum_n nll(f(x_n), y_n) + prior_precision / 2 * ||theta||^2) / N`` with Adam
    over shuffled mini-batches (order fixed by ``seed``).

    Args:
        model: a Keras model that outputs logits (no softmax / sigmoid on the last layer).
        likelihood: a name of :data:`~laplace_tf.likelihoods.LIKELIHOODS` (``"classification"``,
            ``"binary"``, ``"regression"``, ``"heteroscedastic"``).
        x: inputs ``[N, ...]``.
        y: class labels ``[N]``, 0/1 labels, or regression targets ``[N]`` / ``[N, K]``.
        epochs: passes over the data.
        batch_size: examples per step.
        seed: seed of the shuffling (and of anything else random in training).
        verbose: as in Keras: 0 silent, 1 a progress bar over the epochs, 2 one line per
            epoch, ``"auto"`` 1 on a terminal and 2 otherwise (True / False: 1 / 0).
        prior_precision: precision of the Gaussian prior on the weights (weight decay).
        sigma_noise: the Gaussian noise of ``"regression"``.
        learning_rate: Adam's step size.

    Returns:
        The mean of the mini-batch objectives during each epoch (as Keras reports a training
        loss: the batches before their updates, a short last batch counting as a full one).

    Raises:
        ValueError: the model outputs probabilities, the targets do not fit the likelihood,
            or a setting is not positive.
    """
    _positive("epochs", epochs, integer=True)
    level = keras_verbosity(verbose)
    _positive("batch_size", batch_size, integer=True)
    _positive("prior_precision", prior_precision, integer=False)
    _positive("learning_rate", learning_rate, integer=False)
    if output_activation(model):
        raise ValueError(
            f"model: its last layer applies {output_activation(model)}; train_map needs a model "
            "that outputs logits (build the last Dense layer without an activation)."
        )
    lik = get_likelihood(likelihood, sigma_noise)
    n_outputs = int(model.output_shape[-1])
    lik.validate_outputs(n_outputs)
    dtype = tf.as_dtype(model.trainable_variables[0].dtype)
    targets = lik.prepare_targets(y, n_outputs, dtype)
    if len(x) != int(targets.shape[0]):
        raise ValueError(f"x: has {len(x)} rows but y has {int(targets.shape[0])}; give one target per input.")
    keras.utils.set_random_seed(seed)
    x = tf.convert_to_tensor(x, dtype)
    step = _epoch_function(model, lik, keras.optimizers.Adam(learning_rate),
                           decay=prior_precision / (2.0 * len(x)), batch_size=batch_size)
    rng = np.random.default_rng(seed)
    bar = tqdm(total=epochs, desc="training MAP", unit="epoch", leave=False, disable=level != 1)
    losses = []
    with bar:
        for epoch in range(1, epochs + 1):
            losses.append(float(step(x, targets, tf.constant(rng.permutation(len(x)), tf.int32))))
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
            bar.update()
            if level == 2:
                print(f"training MAP: epoch {epoch}/{epochs} - loss {losses[-1]:.4g}")
    return losses


def _epoch_function(model: keras.Model, lik, optimizer: keras.optimizers.Optimizer, decay: float,
                    batch_size: int):
    """One compiled pass over shuffled mini-batches; returns the mean batch objective."""
    variables = model.trainable_variables
    optimizer.build(variables)

    @tf.function
    def epoch(x, targets, order):
        n = tf.shape(order)[0]
        total = tf.constant(0.0, x.dtype)
        for start in tf.range(0, n, batch_size):
            index = order[start:start + batch_size]
            with tf.GradientTape() as tape:
                logits = model(tf.gather(x, index), training=True)
                loss = tf.reduce_mean(lik.nll_per_example(logits, tf.gather(targets, index)))
                loss += decay * tf.add_n([tf.reduce_sum(tf.square(v)) for v in variables])
            optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
            total += loss
        return total / tf.cast((n + batch_size - 1) // batch_size, x.dtype)

    return epoch
