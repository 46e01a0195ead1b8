"""Slow, obviously correct references that the tests compare laplace_tf against.

Everything here loops over examples, outputs and weights one at a time, in float64, with
plain ``tf.GradientTape`` calls and no vectorisation, so that it is easy to trust.

Example:
    >>> import numpy as np
    >>> H = finite_difference_hessian(lambda x: x[0] ** 2 * x[1], np.array([1.0, 2.0]))
    >>> np.round(H, 6).tolist()
    [[4.0, 2.0], [2.0, 0.0]]
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tensorflow as tf

from laplace_tf.likelihoods import Likelihood
from laplace_tf.params import LogitModel, WeightSubset


def finite_difference_hessian(
    f: Callable[[np.ndarray], float], x0: np.ndarray, eps: float = 1e-4
) -> np.ndarray:
    """Central finite-difference Hessian of a scalar numpy function of a vector ``x0``."""
    x0 = np.asarray(x0, dtype=np.float64)
    n = x0.size

    def shifted(i, j, di, dj):
        x = x0.copy().ravel()
        x[i] += di
        x[j] += dj
        return f(x.reshape(x0.shape))

    H = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            H[i, j] = (
                shifted(i, j, eps, eps) - shifted(i, j, eps, -eps)
                - shifted(i, j, -eps, eps) + shifted(i, j, -eps, -eps)
            ) / (4 * eps * eps)
    return H


def finite_difference_gradient(f: Callable, x0: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central finite-difference gradient of a scalar numpy function."""
    x0 = np.asarray(x0, dtype=np.float64)
    grad = np.zeros(x0.size)
    for i in range(x0.size):
        step = np.zeros(x0.size)
        step[i] = eps
        grad[i] = (f((x0.ravel() + step).reshape(x0.shape)) - f((x0.ravel() - step).reshape(x0.shape))) / (2 * eps)
    return grad.reshape(x0.shape)


def _logits_of_flat(model: LogitModel, flat: tf.Tensor, x) -> tf.Tensor:
    return model(x, model.subset.unflatten(flat))


def brute_force_hessian(model: LogitModel, likelihood: Likelihood, x, y) -> np.ndarray:
    """Dense Hessian of the summed NLL over the flat weights: one gradient per row."""
    flat = tf.Variable(model.subset.flat_values())
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            loss = likelihood.nll(_logits_of_flat(model, flat, x), y)
        grad = inner.gradient(loss, flat)
        rows = [grad[i] for i in range(grad.shape[0])]
    H = np.stack([outer.gradient(r, flat, unconnected_gradients="zero").numpy() for r in rows])
    return H


def brute_force_jacobians(model: LogitModel, x) -> np.ndarray:
    """Per-example Jacobians of the logits ``[N, K, P]``: one gradient per example and output."""
    flat = tf.Variable(model.subset.flat_values())
    with tf.GradientTape(persistent=True) as tape:
        logits = _logits_of_flat(model, flat, x)
        entries = [[logits[n, k] for k in range(logits.shape[1])] for n in range(logits.shape[0])]
    return np.array(
        [[tape.gradient(e, flat, unconnected_gradients="zero").numpy() for e in row] for row in entries]
    )


def brute_force_output_hessians(likelihood: Likelihood, logits, y) -> np.ndarray:
    """Per-example Hessians of the NLL with respect to the logits ``[N, K, K]``, by autodiff."""
    out = []
    for n in range(logits.shape[0]):
        f = tf.Variable(logits[n : n + 1])
        with tf.GradientTape(persistent=True) as outer:
            with tf.GradientTape() as inner:
                loss = likelihood.nll(f, y[n : n + 1])
            g = inner.gradient(loss, f)[0]
            entries = [g[k] for k in range(g.shape[0])]
        out.append(np.stack([outer.gradient(e, f).numpy()[0] for e in entries]))
    return np.array(out)


def brute_force_ggn(model: LogitModel, likelihood: Likelihood, x, y) -> np.ndarray:
    """Dense GGN ``sum_n J_n^T Lambda_n J_n`` from explicit Jacobians and logit Hessians."""
    J = brute_force_jacobians(model, x)
    Lam = brute_force_output_hessians(likelihood, model(x), y)
    return sum(J[n].T @ Lam[n] @ J[n] for n in range(J.shape[0]))


def brute_force_ef(model: LogitModel, likelihood: Likelihood, x, y) -> np.ndarray:
    """Dense empirical Fisher ``sum_n g_n g_n^T`` from per-example gradients, one at a time."""
    flat = tf.Variable(model.subset.flat_values())
    P = int(flat.shape[0])
    EF = np.zeros((P, P))
    n_rows = int(y.shape[0])
    for n in range(n_rows):
        xn = {k: v[n : n + 1] for k, v in x.items()} if isinstance(x, dict) else x[n : n + 1]
        with tf.GradientTape() as tape:
            loss = likelihood.nll(_logits_of_flat(model, flat, xn), y[n : n + 1])
        g = tape.gradient(loss, flat, unconnected_gradients="zero").numpy()
        EF += np.outer(g, g)
    return EF


def dense_functional_variance(jacobians: np.ndarray, covariance: np.ndarray) -> np.ndarray:
    """``J_n Sigma J_n^T`` for every example: ``[N, K, K]`` from ``[N, K, P]`` and ``[P, P]``."""
    return np.array([J @ covariance @ J.T for J in jacobians])


def subset_of(model, layers=None) -> LogitModel:
    """A :class:`LogitModel` over the weights of ``layers`` (all layers when None)."""
    return LogitModel(model, WeightSubset(model, layers))


def brute_force_preactivation_jacobians(model: LogitModel, layer, x) -> np.ndarray:
    """Per-example Jacobians of the logits w.r.t. one layer's pre-activation output ``z``.

    Returns ``[N, K, *z.shape[1:]]``, one gradient per example and output, taken with respect
    to a zero probe added to ``z`` (``layer`` must be called once per forward pass).
    """
    probes = []

    def add_probe(hooked, inputs, z):
        probe = tf.zeros_like(z)
        tape.watch(probe)
        probes.append(probe)
        return z + probe

    with tf.GradientTape(persistent=True) as tape:
        logits = model(x, layers=[layer], hook=add_probe)
        entries = [[logits[n, k] for k in range(logits.shape[1])] for n in range(logits.shape[0])]
    (probe,) = probes
    return np.array(
        [[tape.gradient(e, probe).numpy()[n] for e in row] for n, row in enumerate(entries)]
    )


def brute_force_conv_patches(layer, inputs) -> np.ndarray:
    """The input patches of a channels_last Conv1D/Conv2D call, one output position at a time.

    Returns ``[N * locations, kh * kw * cin]``, each patch flattened in ``(kh, kw, cin)`` order
    (a Conv1D is a Conv2D with ``kh = 1``), so that ``patches @ kernel.reshape(-1, cout)`` is
    the convolution without bias. Padding is computed here from its definition: 'valid' none,
    'causal' ``(k - 1) * dilation`` on the left, 'same' the TensorFlow split with the extra
    row or column at the end.
    """
    x = np.asarray(inputs, np.float64)
    if layer.rank == 1:
        x = x[:, None]
    lead = (1,) * (2 - layer.rank)
    kernel, strides = lead + tuple(layer.kernel_size), lead + tuple(layer.strides)
    dilation = lead + tuple(layer.dilation_rate)
    pads = []
    for axis in range(2):
        size, span = x.shape[1 + axis], (kernel[axis] - 1) * dilation[axis] + 1
        if layer.padding == "same":
            total = max((-(-size // strides[axis]) - 1) * strides[axis] + span - size, 0)
            pads.append((total // 2, total - total // 2))
        elif layer.padding == "causal":
            pads.append((span - 1, 0))
        else:
            pads.append((0, 0))
    padded = np.pad(x, [(0, 0), pads[0], pads[1], (0, 0)])
    n_rows, n_cols = (
        (padded.shape[1 + a] - (kernel[a] - 1) * dilation[a] - 1) // strides[a] + 1 for a in range(2)
    )
    rows = []
    for n in range(x.shape[0]):
        for i in range(n_rows):
            for j in range(n_cols):
                rows.append(np.concatenate([
                    padded[n, i * strides[0] + p * dilation[0], j * strides[1] + q * dilation[1]]
                    for p in range(kernel[0]) for q in range(kernel[1])
                ]))
    return np.array(rows)


def assert_gaussian_moments(samples, mean, covariance, k: float = 5.0) -> None:
    """Assert that ``samples [S, N, K]`` have mean ``[N, K]`` and covariance ``[N, K, K]``.

    Each sample mean must lie within ``k`` standard errors ``sd / sqrt(S)``; each sample
    covariance entry within ``k`` standard errors ``sqrt((s_i^2 s_j^2 + C_ij^2) / S)`` (the
    Gaussian variance of the estimator).
    """
    samples, mean, covariance = (np.asarray(a, np.float64) for a in (samples, mean, covariance))
    n = samples.shape[0]
    sd = np.sqrt(np.diagonal(covariance, axis1=1, axis2=2))
    assert np.all(np.abs(samples.mean(0) - mean) < k * sd / np.sqrt(n))
    centred = samples - mean
    sample_cov = np.einsum("snk,snl->nkl", centred, centred) / n
    se = np.sqrt((sd[:, :, None] ** 2 * sd[:, None, :] ** 2 + covariance**2) / n)
    assert np.all(np.abs(sample_cov - covariance) < k * se)
