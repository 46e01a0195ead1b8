"""The Laplace evidence and prior-precision tuning.

The Laplace approximation of the log marginal likelihood at the MAP ``theta*`` (the ``2 pi``
terms of prior and posterior cancel)::

    log p(D) ~ log p(D | theta*) / T
               - 1/2 sum_i lambda_i (theta*_i - mu0_i)^2
               + 1/2 sum_i log lambda_i
               - 1/2 log det(c H + diag(lambda))

with the posterior precision's log-determinant taken block by block from the factors
(Kronecker: ``sum log(c a_i g_j + lambda)`` from the factor eigenvalues). For regression the
data term is recomputed for any ``sigma`` from the summed squared residuals (the likelihood's
``data_nll``), so the evidence
is a differentiable function of ``lambda`` and ``sigma`` that never needs new curvature.

Tuning (:func:`optimize_prior_precision`):

* ``"marglik"``: Adam ascent on ``log lambda`` (and ``log sigma`` for regression) in one
  compiled loop, reusing the factored curvature (the loop itself is reused while the
  curvature is unchanged);
* ``"gridsearch"``: the validation negative log-likelihood of the predictive (``la(x, ...)``,
  which :class:`laplace_tf.Laplace` provides) over a grid of scalar precisions.

Example:
    >>> import keras, numpy as np, laplace_tf as ltf
    >>> model = keras.Sequential([keras.Input((2,), dtype="float64"),
    ...                           keras.layers.Dense(1, dtype="float64")])
    >>> x = np.random.default_rng(0).normal(size=(30, 2))
    >>> la = ltf.Laplace(model, "regression", "all", "full", progress=False)
    >>> la.fit((x, x @ [1.0, -1.0]))
    >>> tuned = la.optimize_prior_precision(tune_sigma_noise=False, n_steps=300)
    >>> grid = [float(la.log_marginal_likelihood(tuned["prior_precision"] * f))
    ...         for f in (0.9, 1.0, 1.1)]       # the tuned prior maximises the evidence
    >>> grid[1] >= max(grid[0], grid[2])
    True
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from laplace_tf.arguments import choice, positive_int
from laplace_tf.batches import Batches
from laplace_tf.console import show_progress
from laplace_tf.posterior.prior import PRIOR_STRUCTURES, reshape_prior

METHODS = ("marglik", "gridsearch")
DEFAULT_GRID = np.logspace(-4, 4, 100)
_ADAM = dict(beta1=0.9, beta2=0.999, eps=1e-8)


def laplace_evidence(log_likelihood, factors, c, block_priors, scatter, log_det_prior) -> tf.Tensor:
    """The Laplace log evidence from its parts.

    Args:
        log_likelihood: ``log p(D | theta*) / T`` (scalar).
        factors: the factored curvature blocks.
        c: the curvature multiplier ``s / T``.
        block_priors: the prior precision of each block (scalar or ``[p]``).
        scatter: ``sum_i lambda_i (theta*_i - mu0_i)^2``.
        log_det_prior: ``sum_i log lambda_i``.
    """
    log_det_posterior = tf.add_n(
        [f.log_det(c, p) for f, p in zip(factors, block_priors, strict=True)]
    )
    return log_likelihood - 0.5 * scatter + 0.5 * log_det_prior - 0.5 * log_det_posterior


def _indefinite_error(detail: str) -> ValueError:
    return ValueError(
        f"optimize_prior_precision: {detail}. The posterior precision is not positive definite "
        "there (the curvature has negative eigenvalues: use curvature='ggn' or "
        "on_indefinite='clip'), or the step size lr is too large. The prior was not changed."
    )


def _adam_loop(body, variables: list[tf.Variable], n, lr):
    """``n`` steps of ``body`` in one ``tf.while_loop``: the objective and variables per step."""
    dtype = variables[0].dtype
    values = tf.TensorArray(dtype, size=n)
    points = [tf.TensorArray(dtype, size=n, element_shape=v.shape) for v in variables]
    loop = tf.while_loop(lambda i, *_: i < n, body, (0, lr, values, points))
    return loop[2].stack(), [p.stack() for p in loop[3]]


# Adam's first and second moments per variable, and its step count
AdamState = tuple[list[tuple[tf.Variable, tf.Variable]], tf.Variable]


class AdamAscent:
    """Maximise ``objective(values)`` over ``variables`` with Adam, in one compiled loop
    (``values``: the variables' current values, the tensors it is differentiated by; so the
    variables may be a ``tf.distribute`` strategy's, whose handles a tape cannot watch outside
    a replica context).

    The steps run inside one ``tf.while_loop`` (in chunks when a progress bar is shown); the
    loop is traced once per instance, so an instance is reused while the objective's captured
    state (the factored curvature) stays the same. ``state`` (from :func:`adam_state`) holds
    Adam's moments and step count: passing the same one to the ascents of successive refits,
    with ``reset=False``, continues one Adam run across them.
    """

    def __init__(self, objective, variables: list[tf.Variable], state: AdamState | None = None):
        self.variables = variables
        self._moments, self._count = adam_state(variables) if state is None else state
        dtype = variables[0].dtype
        b1, b2, eps = (tf.constant(_ADAM[k], dtype) for k in ("beta1", "beta2", "eps"))

        def body(i, lr, values, points):
            current = [v.read_value() for v in variables]
            with tf.GradientTape() as tape:
                tape.watch(current)
                value = objective(current)
            grads = tape.gradient(value, current)
            values = values.write(i, value)
            points = [p.write(i, v) for p, v in zip(points, current, strict=True)]
            self._count.assign_add(1.0)
            for v, g, (m, s) in zip(variables, grads, self._moments, strict=True):
                m.assign(b1 * m + (1 - b1) * g)
                s.assign(b2 * s + (1 - b2) * g * g)
                m_hat, s_hat = m / (1 - b1**self._count), s / (1 - b2**self._count)
                v.assign_add(lr * m_hat / (tf.sqrt(s_hat) + eps))
            return i + 1, lr, values, points

        # A partial, not a closure: TensorFlow counts traces per Python code object and warns
        # of "retracing" when many instances each trace their loop once, as they must.
        self._run = tf.function(functools.partial(_adam_loop, body, variables), autograph=False)

    def __call__(self, n_steps: int, lr: float, progress: bool, reset: bool = True
                 ) -> tuple[list[float], list[list[np.ndarray]]]:
        """``n_steps`` steps from the variables' current values, from a fresh Adam state
        (``reset=False``: from the moments and step count left by the last call).

        Returns the objective and the variables' values at every visited point
        (``n_steps + 1``; the last is the result).
        """
        if reset:
            for m, s in self._moments:
                m.assign(tf.zeros_like(m))
                s.assign(tf.zeros_like(s))
            self._count.assign(0.0)
        lr = tf.constant(lr, self._count.dtype)
        total = n_steps + 1
        chunk = -(-total // 20) if progress else total
        values: list[float] = []
        points: list[list[np.ndarray]] = []
        with tqdm(total=total, desc="prior precision", disable=not progress, leave=False) as bar:
            while len(values) < total:
                size = min(chunk, total - len(values))
                try:
                    chunk_values, chunk_points = self._run(tf.constant(size), lr)
                except tf.errors.InvalidArgumentError as error:
                    raise _indefinite_error(
                        f"a Cholesky factorisation failed ({error.message[:120]})"
                    ) from None
                values += chunk_values.numpy().tolist()
                arrays = [p.numpy() for p in chunk_points]
                points += [[a[k] for a in arrays] for k in range(size)]
                bar.update(size)
                if not np.all(np.isfinite(chunk_values)):
                    bad = len(values) - size + int(np.argmin(np.isfinite(chunk_values)))
                    raise _indefinite_error(
                        f"the log evidence became {values[bad]} at step {bad} (log-parameters "
                        f"{[p.tolist() for p in points[bad]]})"
                    )
        return values, points


def adam_state(variables: list[tf.Variable]) -> AdamState:
    """Adam's first and second moments for ``variables`` and its step count, all zero."""
    moments = [(tf.Variable(tf.zeros_like(v)), tf.Variable(tf.zeros_like(v))) for v in variables]
    return moments, tf.Variable(tf.zeros([], variables[0].dtype))


def _evidence_ascent(la, prior_structure: str, tune_sigma: bool) -> tuple[AdamAscent, tf.Variable]:
    """Adam on ``log lambda`` (and ``log sigma``) of ``la``'s evidence, and the sigma input."""
    prior_shape = {"scalar": [], "layerwise": [len(la.subset.slices)], "diag": [la.n_params]}
    log_prior = tf.Variable(tf.zeros(prior_shape[prior_structure], la.subset.dtype))
    log_sigma = tf.Variable(tf.zeros_like(la.sigma_noise))  # an input even when not tuned

    def objective(values):
        return la.log_evidence(tf.exp(values[0]), tf.exp(values[1] if tune_sigma else log_sigma))

    return AdamAscent(objective, [log_prior, log_sigma] if tune_sigma else [log_prior]), log_sigma


def ascent_trace(values: list[float], points: list[list[np.ndarray]], tune_sigma: bool) -> dict:
    """An evidence ascent's ``tuning_trace``: the prior precision (and sigma_noise) at every
    visited point, from the log values an :class:`AdamAscent` returns, and the evidence."""
    trace = {"prior_precision": np.exp(np.array([p[0] for p in points])),
             "log_marginal_likelihood": np.array(values)}
    if tune_sigma:
        trace["sigma_noise"] = np.exp(np.array([p[1] for p in points]))
    return trace


def _tune_marglik(la, prior_structure: str, n_steps: int, lr: float, tune_sigma: bool,
                  progress: bool) -> dict:
    ascent, log_sigma = la.tuner((prior_structure, tune_sigma),
                                 lambda: _evidence_ascent(la, prior_structure, tune_sigma))
    sizes = [s.size for s in la.subset.slices]
    ascent.variables[0].assign(tf.math.log(reshape_prior(la.prior_precision, sizes, prior_structure)))
    log_sigma.assign(tf.math.log(la.sigma_noise))
    values, points = ascent(n_steps, lr, progress)
    trace = ascent_trace(values, points, tune_sigma)
    la.update(prior=trace["prior_precision"][-1],
              sigma=trace["sigma_noise"][-1] if tune_sigma else None)
    la.tuning_trace = trace
    return _result(la)


def _tune_gridsearch(la, val_data, grid, pred_type: str, link_approx: str, progress: bool,
                     seed: int | None, n_samples: int) -> dict:
    if not hasattr(la, "validation_scorer"):
        raise TypeError(
            "method='gridsearch' scores the predictive la(x, ...); use laplace_tf.Laplace (a "
            "PosteriorLaplace has no predictive) or method='marglik'."
        )
    if val_data is None:
        raise ValueError(
            "val_data: method='gridsearch' needs validation data, a tuple (x, y) or a "
            "tf.data.Dataset of (x, y) batches; got None."
        )
    given = grid
    try:
        grid = DEFAULT_GRID if grid is None else np.asarray(grid)
    except (TypeError, ValueError):
        grid = np.array([], object)
    if grid.dtype.kind not in "iuf" or grid.ndim != 1 or grid.size == 0 or \
            not np.all(np.isfinite(grid)) or np.any(grid <= 0):
        raise ValueError(
            f"grid: expected a non-empty 1-D array of positive prior precisions, e.g. "
            f"np.logspace(-4, 4, 100); got {given!r}."
        )
    grid = grid.astype(np.float64)
    from laplace_tf.predictive.links import PRED_TYPES  # the predictive's (imports this module)

    choice(pred_type, "pred_type", PRED_TYPES)
    la.likelihood.check_link(link_approx)  # as la(x) checks them
    batches = Batches(val_data, la.batch_size, dtype=la.subset.dtype, description="validation",
                      argument="val_data")
    kwargs: dict = {"pred_type": pred_type}
    if not la.likelihood.gaussian_predictive:
        kwargs["link_approx"] = link_approx
    if pred_type == "nn" or kwargs.get("link_approx") == "mc":  # the same draws for every value
        kwargs["seed"] = int(np.random.default_rng().integers(2**31 - 1)) if seed is None else seed
        kwargs["n_samples"] = n_samples
    original = la.prior_precision
    nll, evidence = np.full(grid.size, np.inf), np.full(grid.size, np.nan)
    try:
        la.prior_precision = grid.max()  # the scorer lays out a covariance: at the safest value
        scores = la.validation_scorer(batches, kwargs)  # mean validation NLL, evidence at priors
        accepted = []
        for index, value in enumerate(grid):
            try:
                la.prior_precision = value  # checks that the precision is positive definite
                accepted.append(index)
            except ValueError:  # not positive definite at this value: left at inf
                continue
        chunk = -(-len(accepted) // 20) if progress else max(len(accepted), 1)
        with tqdm(total=grid.size, desc="prior grid", disable=not progress, leave=False) as bar:
            bar.update(grid.size - len(accepted))
            for start in range(0, len(accepted), chunk):
                chosen = accepted[start:start + chunk]
                nll[chosen], evidence[chosen] = scores(grid[chosen])
                bar.update(len(chosen))
        finite = np.isfinite(nll)
        if not finite.any():
            raise ValueError(
                "grid: the validation NLL is not finite for any prior precision in the grid; "
                "give larger values."
            )
    except BaseException:
        la.prior_precision = original
        raise
    best = int(np.argmin(np.where(finite, nll, np.inf)))
    la.prior_precision = grid[best]
    _warn_at_edge(grid, best)
    la.tuning_trace = {
        "prior_precision": grid.copy(),
        "log_marginal_likelihood": evidence,
        "val_nll": nll,
    }
    return _result(la)


def _warn_at_edge(grid: np.ndarray, best: int) -> None:
    """Warn when the validation NLL is lowest at the smallest or largest value of ``grid``:
    the optimum may lie beyond it, so name the edge and a grid that extends past it."""
    low, high = float(grid.min()), float(grid.max())
    value = float(grid[best])
    if grid.size < 2 or low < value < high:
        return
    edge = math.log10(value)
    if value == high:
        where, start, stop = "largest", math.floor(edge) - 1, math.ceil(edge) + 4
        hint = " (a very large prior precision makes the predictive that of the MAP network)"
    else:
        where, start, stop = "smallest", math.floor(edge) - 4, math.ceil(edge) + 1
        hint = ""
    warnings.warn(
        f"optimize_prior_precision: the validation NLL is lowest at the {where} value of the "
        f"grid, prior_precision={value:.3g} (grid {low:.3g} .. {high:.3g}); the optimum may lie "
        f"beyond it{hint}. Extend the grid past it, e.g. "
        f"grid=np.logspace({start}, {stop}, {10 * (stop - start) + 1}).",
        UserWarning, stacklevel=5,
    )


def _result(la) -> dict:
    result = {"prior_precision": la.prior_precision}
    if la.likelihood.has_noise:
        result["sigma_noise"] = la.sigma_noise
    return result


def optimize_prior_precision(
    la, method: str | None = None, prior_structure: str = "scalar", n_steps: int = 100,
    lr: float = 0.1, val_data=None, grid=None, pred_type: str = "glm",
    link_approx: str = "probit", tune_sigma_noise: bool | None = None, progress: bool | None = None,
    seed: int | None = None, n_samples: int = 100,
) -> dict:
    """Tune ``la.prior_precision`` (and ``la.sigma_noise`` for regression) in place.

    Args:
        la: a fitted :class:`~laplace_tf.posterior.laplace.PosteriorLaplace`.
        method: ``"marglik"`` (maximise the evidence) or ``"gridsearch"`` (minimise the
            validation NLL of the predictive over ``grid``; scalar prior only). Default:
            ``"gridsearch"`` when ``val_data`` is given, else ``"marglik"`` (on digits the
            evidence-tuned prior costs 2-7x the network's in-distribution NLL, the validation
            one none; see the README's "Calibration under shift").
        prior_structure: ``"scalar"``, ``"layerwise"`` or ``"diag"`` (one per weight; not
            for ``"kron"``). Tuning starts from the current prior (geometric means when the
            structure changes).
        n_steps, lr: Adam steps and step size on ``log lambda`` (``"marglik"``).
        val_data, grid, pred_type, link_approx: for ``"gridsearch"``; ``grid`` defaults to
            ``np.logspace(-4, 4, 100)``. A ``UserWarning`` says so when the best value is the
            grid's smallest or largest, and names a grid that extends past it.
        tune_sigma_noise: tune the regression ``sigma_noise`` jointly (``"marglik"``): a
            scalar, or one per output (``sigma_noise`` of shape ``[K]``: last-layer posteriors,
            or posteriors over all weights fitted with a ``[K]`` sigma_noise and the GGN or
            exact Hessian, which store each output's curvature). Default True for regression
            where it can be tuned.
        progress: show a progress bar (None: on a terminal or in a notebook).
        seed: the seed of a random predictive (``pred_type="nn"``, ``link_approx="mc"``) in
            ``"gridsearch"``: every grid value is scored with the same draws (None: drawn once
            per call).
        n_samples: the draws of that random predictive (as ``la(x, n_samples=...)``).

    Returns:
        ``{"prior_precision": ..., "sigma_noise": ...}`` (``sigma_noise`` for regression), the
        values now stored in ``la``. ``la.tuning_trace`` holds the path: ``prior_precision``
        ``[T]`` or ``[T, k]``, ``log_marginal_likelihood`` ``[T]``, and ``sigma_noise`` ``[T]``
        (marglik, regression) or ``val_nll`` ``[T]`` (gridsearch).

    Raises:
        ValueError: for invalid arguments, or if the evidence becomes non-finite (the prior is
            then left unchanged).
    """
    if method is None:
        method = "marglik" if val_data is None else "gridsearch"
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}; got {method!r}.")
    allowed = la.structure.prior_structures
    if prior_structure not in allowed:
        raise ValueError(
            f"prior_structure: expected one of {allowed} for hessian_structure="
            f"{la.hessian_structure!r} (all: {PRIOR_STRUCTURES}); got {prior_structure!r}."
        )
    asked_for_sigma = tune_sigma_noise is True
    tunable = la.likelihood.has_noise and (
        la.sigma_noise.shape.rank == 0 or la.subset_of_weights == "last_layer"
        or la.stores_output_curvatures)
    if tune_sigma_noise is None:
        tune_sigma_noise = tunable
        if la.likelihood.has_noise and not tunable:
            warnings.warn(
                "optimize_prior_precision: sigma_noise is kept at its value (one per output, "
                "over all weights, without per-output curvatures: a posterior loaded from a "
                "file, or fitted with a scalar sigma_noise or curvature 'ef'); only the prior "
                "is tuned. Refit with the per-output sigma_noise to tune it, or pass "
                "tune_sigma_noise=False to silence this.", UserWarning, stacklevel=3)
    elif not isinstance(tune_sigma_noise, bool):
        raise TypeError(f"tune_sigma_noise: expected True, False or None; got {tune_sigma_noise!r}.")
    elif tune_sigma_noise and not tunable:
        raise ValueError(
            "tune_sigma_noise: only a scalar sigma_noise of a 'regression' likelihood can be "
            "tuned, or one per output with subset_of_weights='last_layer' or over all weights "
            "after a fit with a per-output sigma_noise and curvature 'ggn'/'hessian' (the "
            "empirical Fisher is not a sum of per-output curvatures); this posterior has "
            f"likelihood={la.likelihood_name!r}, curvature={la.curvature_kind!r}, "
            "fitted with per-output curvatures: "
            f"{la.stores_output_curvatures}, subset_of_weights={la.subset_of_weights!r} and "
            f"sigma_noise of shape {la.sigma_noise.shape.as_list()}. Pass "
            "tune_sigma_noise=False, a scalar sigma_noise, or refit with the new per-output "
            "noise."
        )
    progress = show_progress(progress)
    if method == "gridsearch":
        if asked_for_sigma:
            raise ValueError(
                "tune_sigma_noise: method='gridsearch' tunes the prior precision only; use "
                "method='marglik' to tune sigma_noise, or leave tune_sigma_noise unset."
            )
        if prior_structure != "scalar":
            raise ValueError(
                f"prior_structure: method='gridsearch' searches one scalar precision; got "
                f"{prior_structure!r}. Use method='marglik' for per-layer or per-weight priors."
            )
        return _tune_gridsearch(la, val_data, grid, pred_type, link_approx, progress, seed,
                                positive_int(n_samples, "n_samples"))
    if val_data is not None or grid is not None or pred_type != "glm" or link_approx != "probit":
        raise ValueError(
            "val_data, grid, pred_type, link_approx: method='marglik' maximises the evidence "
            "of the training data and uses none of them; use method='gridsearch' (the default "
            "when val_data is given), or leave them out."
        )
    n_steps = positive_int(n_steps, "n_steps")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
        raise ValueError(f"lr: expected a positive step size such as 0.1; got {lr!r}.")
    return _tune_marglik(la, prior_structure, n_steps, float(lr), tune_sigma_noise, progress)
