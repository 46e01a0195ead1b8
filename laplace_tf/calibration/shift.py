"""Predictors under dataset shift: shifted test sets, a tidy metric table, baselines.

A *predictor* is any callable ``x -> probabilities [N, C]`` (classification; binary ``[N]``
holds the positive class) or ``x -> (mean, variance)`` (regression). :func:`evaluate` runs
named predictors on every severity of every :class:`Shift` of a test set and returns a
:class:`ShiftTable` whose rows are ``{"predictor", "shift", "severity", "level", "metric",
"value"}`` (severity 0 is the unshifted test set; ``level`` is the shift's parameter, e.g.
the angle). Metrics come from :mod:`~laplace_tf.calibration.metrics` /
:mod:`~laplace_tf.calibration.regression`; the ECE's bins are in its name (``ece_15bins``:
15 equal-width bins). With OOD inputs, each predictor also gets ``auroc_confidence`` (score:
max probability) and ``auroc_entropy`` (score: minus predictive entropy) on the ``"ood"``
shift, in-distribution positive.

Shifts (all seeded, inputs as numpy arrays): images ``[N, H, W]`` or flat square ``[N, H*H]``
(8x8 digits): :func:`rotate`, :func:`gaussian_noise`, :func:`blur`, :func:`shuffle_pixels`,
collected with their severities by :func:`image_shifts`; tabular inputs ``[N, D]``:
:func:`covariate_shift` along a direction and :func:`extrapolate` beyond the training range,
collected by :func:`tabular_shifts`. Baselines: :func:`map_predictor`,
:func:`temperature_predictor`, :func:`ensemble_predictor` (regression: :func:`gaussian_predictor`);
Laplace: :func:`laplace_predictor`.

Example:
    >>> x, y = np.eye(4)[[0, 1, 2, 3]], np.array([0, 1, 2, 3])
    >>> table = evaluate({"oracle": lambda x: x}, x, y, [Shift("none", "-", (0.0,), _same)])
    >>> [(r["metric"], r["value"]) for r in table.select(metric="accuracy")]
    [('accuracy', 1.0)]
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from laplace_tf.calibration import metrics as _m
from laplace_tf.calibration import regression as _r
from laplace_tf.calibration import temperature as _t

ROTATION_ANGLES = tuple(float(a) for a in range(0, 181, 15))
"""Angles (degrees) of the rotation shift: severity k rotates by 15 k degrees."""
NOISE_STDS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
"""Gaussian pixel noise standard deviations, severities 0-5 (digits pixels lie in [0, 1])."""
BLUR_SIGMAS = (0.0, 0.5, 0.75, 1.0, 1.25, 1.5)
"""Gaussian blur widths in pixels, severities 0-5."""
SHUFFLE_FRACTIONS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
"""Fractions of pixel positions permuted, severities 0-5."""
COVARIATE_DISTANCES = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0)
"""Covariate shift distances in training standard deviations along the direction."""
EXTRAPOLATION_DISTANCES = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0)
"""Extrapolation distances in training ranges (beyond 0.5 every input leaves the range)."""
N_BINS = 15

Predictor = Callable[[np.ndarray], Any]


@dataclasses.dataclass(frozen=True)
class Shift:
    """A named shift: ``apply(x, level)`` at each level; ``levels[0]`` leaves ``x`` unchanged."""

    name: str
    parameter: str
    levels: tuple[float, ...]
    apply: Callable[[np.ndarray, float], np.ndarray]


def _same(x: np.ndarray, level: float) -> np.ndarray:
    return x


# ---------------------------------------------------------------------- image shifts


def _shifted_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype of shifted inputs: the input's if floating, else a floating one (noisy,
    rotated or moved integers, e.g. uint8 pixels, are not integers: casting back would wrap
    or truncate them)."""
    return dtype if np.issubdtype(dtype, np.floating) else np.result_type(dtype, np.float32)


def _images(x: Any) -> tuple[np.ndarray, tuple[int, ...]]:
    """``x`` as ``[N, H, W]`` images and its original shape."""
    a = np.asarray(x)
    if a.ndim == 3:
        return a, a.shape
    side = math.isqrt(a.shape[-1]) if a.ndim == 2 else 0
    if a.ndim != 2 or side * side != a.shape[-1]:
        raise ValueError(f"x: expected images [N, H, W] or flat square images [N, H*H]; "
                         f"got shape {a.shape}")
    return a.reshape(len(a), side, side), a.shape


def rotate(x: Any, angle: float) -> np.ndarray:
    """Each image rotated counter-clockwise by ``angle`` degrees (bilinear, zeros outside).

    Example:
        >>> img = np.arange(16.0).reshape(1, 4, 4)
        >>> bool(np.allclose(rotate(img, 90.0), np.rot90(img, axes=(1, 2))))
        True
    """
    images, shape = _images(x)
    if not math.isfinite(angle):
        raise ValueError(f"angle: expected a finite number of degrees; got {angle!r}.")
    if angle == 0:
        return np.array(x, copy=True)
    # "grid-constant": bilinear against zeros beyond the image (torchvision's rotate with
    # fill 0); scipy's "constant" would blank every pixel whose source lies beyond the
    # outermost pixel centres, strokes near the border included
    out = ndimage.rotate(images, angle, axes=(2, 1), reshape=False, order=1,
                         mode="grid-constant", cval=0.0)
    return out.reshape(shape).astype(_shifted_dtype(images.dtype))


def gaussian_noise(x: Any, std: float, seed: int = 0) -> np.ndarray:
    """``x`` plus independent Gaussian noise of standard deviation ``std`` (seeded)."""
    a = np.asarray(x)
    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"std: expected a finite noise standard deviation >= 0; got {std!r}.")
    noise = np.random.default_rng(seed).normal(scale=std, size=a.shape)
    return (a + noise).astype(_shifted_dtype(a.dtype))


def blur(x: Any, sigma: float) -> np.ndarray:
    """Each image smoothed by a Gaussian filter of ``sigma`` pixels (zeros outside)."""
    images, shape = _images(x)
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma: expected a finite number of pixels >= 0; got {sigma!r}.")
    if sigma == 0:
        return np.array(x, copy=True)
    out = ndimage.gaussian_filter(images, sigma=(0, sigma, sigma), mode="constant", cval=0.0)
    return out.reshape(shape).astype(_shifted_dtype(images.dtype))


def pixel_permutation(n_pixels: int, fraction: float, seed: int = 0) -> np.ndarray:
    """The permutation :func:`shuffle_pixels` applies: a cycle through ``fraction`` of pixels.

    Example:
        >>> perm = pixel_permutation(64, 0.5, seed=0)
        >>> int((perm != np.arange(64)).sum()), sorted(perm.tolist()) == list(range(64))
        (32, True)
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction: expected a fraction of the pixels in [0, 1]; got {fraction!r}.")
    chosen = np.random.default_rng(seed).permutation(n_pixels)[:round(fraction * n_pixels)]
    perm = np.arange(n_pixels)
    perm[chosen] = np.roll(chosen, 1)
    return perm


def shuffle_pixels(x: Any, fraction: float, seed: int = 0) -> np.ndarray:
    """Every image with the same fixed :func:`pixel_permutation` of its pixel positions."""
    images, shape = _images(x)
    flat = images.reshape(len(images), -1)
    return flat[:, pixel_permutation(flat.shape[1], fraction, seed)].reshape(shape)


def image_shifts(seed: int = 0) -> list[Shift]:
    """Rotation (13 angles), Gaussian noise, blur and pixel shuffling (5 severities each)."""
    return [
        Shift("rotation", "angle (degrees)", ROTATION_ANGLES, rotate),
        Shift("noise", "noise std", NOISE_STDS, lambda x, s: gaussian_noise(x, s, seed)),
        Shift("blur", "blur sigma (pixels)", BLUR_SIGMAS, blur),
        Shift("shuffle", "fraction of pixels permuted", SHUFFLE_FRACTIONS,
              lambda x, f: shuffle_pixels(x, f, seed)),
    ]


# ---------------------------------------------------------------------- tabular shifts


def covariate_shift(x: Any, direction: Any, distance: float) -> np.ndarray:
    """Every input moved by ``distance`` along the unit vector of ``direction`` ``[D]``."""
    a = np.asarray(x)
    d = np.asarray(direction, dtype=np.float64).reshape(-1)
    if d.shape[0] != a.shape[-1] or not np.any(d) or not np.all(np.isfinite(d)):
        raise ValueError(f"direction: expected a finite, non-zero vector of {a.shape[-1]} "
                         f"entries (one per input feature); got {d.tolist()}")
    if not math.isfinite(distance):
        raise ValueError(f"distance: expected a finite number; got {distance!r}.")
    return (a + distance * d / np.linalg.norm(d)).astype(_shifted_dtype(a.dtype))


def extrapolate(x: Any, x_train: Any, distance: float) -> np.ndarray:
    """Inputs pushed away from the centre of the training box by ``distance`` training ranges.

    Per feature: ``x + distance * range * sign(x - centre)`` with the training ``min``/``max``
    giving ``centre`` and ``range``; with ``distance > 0.5`` no shifted input lies inside.

    Example:
        >>> extrapolate([[0.0], [0.75]], [[0.0], [1.0]], 1.0).ravel().tolist()
        [-1.0, 1.75]
    """
    a, t = np.asarray(x), np.asarray(x_train)
    if a.ndim != 2 or t.ndim != 2 or a.shape[1] != t.shape[1]:
        raise ValueError(f"x: expected [N, D] inputs with the D = {t.shape[1:]} features of "
                         f"x_train [N_train, D]; got x {a.shape}, x_train {t.shape}.")
    if not math.isfinite(distance):
        raise ValueError(f"distance: expected a finite number of training ranges; got "
                         f"{distance!r}.")
    low, high = t.min(axis=0), t.max(axis=0)
    side = np.where(a < (low + high) / 2, -1.0, 1.0)
    return (a + distance * (high - low) * side).astype(_shifted_dtype(a.dtype))


def tabular_shifts(x_train: Any, direction: Any = None) -> list[Shift]:
    """Covariate shift (default direction: the training data's first principal axis, in
    training standard deviations along it) and extrapolation beyond the training range."""
    t = np.asarray(x_train, dtype=np.float64)
    if direction is None:
        direction = np.linalg.svd(t - t.mean(axis=0), full_matrices=False)[2][0]
    d = np.asarray(direction, dtype=np.float64).reshape(-1)
    scale = float(np.std(t @ (d / np.linalg.norm(d)))) if np.any(d) else 1.0
    return [
        Shift("covariate", "distance (training std)", COVARIATE_DISTANCES,
              lambda x, s: covariate_shift(x, d, s * scale)),
        Shift("extrapolation", "distance (training ranges)", EXTRAPOLATION_DISTANCES,
              lambda x, s: extrapolate(x, t, s)),
    ]


# ---------------------------------------------------------------------- the table


@dataclasses.dataclass
class ShiftTable:
    """Tidy rows ``{"predictor", "shift", "severity", "level", "metric", "value"}``.

    ``parameters`` maps each shift to the name of its level (e.g. ``"angle (degrees)"``).
    """

    rows: list[dict[str, Any]]
    parameters: dict[str, str]
    task: str

    def select(self, **where: Any) -> list[dict[str, Any]]:
        """The rows whose fields equal every ``where`` item, e.g. ``select(metric="nll")``."""
        return [r for r in self.rows if all(r[k] == v for k, v in where.items())]

    def curve(self, predictor: str, shift: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """``(levels, values)`` of one metric of one predictor over a shift's severities."""
        rows = sorted(self.select(predictor=predictor, shift=shift, metric=metric),
                      key=lambda r: r["severity"])
        return (np.array([r["level"] for r in rows]), np.array([r["value"] for r in rows]))

    @property
    def predictors(self) -> list[str]:
        return list(dict.fromkeys(r["predictor"] for r in self.rows))

    @property
    def metrics(self) -> list[str]:
        return list(dict.fromkeys(r["metric"] for r in self.rows))

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "parameters": self.parameters, "rows": self.rows}

    def to_json(self) -> str:
        """The table as JSON (NaN as ``null``)."""
        rows = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in r.items()} for r in self.rows]
        return json.dumps({**self.to_dict(), "rows": rows}, indent=1, allow_nan=False)


def classification_scores(probs: Any, labels: Any, n_bins: int = N_BINS) -> dict[str, float]:
    """Accuracy, NLL, ECE (``n_bins`` equal-width bins), Brier and mean confidence."""
    p = np.asarray(probs)
    return {"accuracy": _m.accuracy(p, labels), "nll": _m.nll(p, labels),
            f"ece_{n_bins}bins": _m.ece(p, labels, n_bins=n_bins), "brier": _m.brier(p, labels),
            "confidence": float(np.mean(_m.ood_scores(p)["confidence"]))}


def regression_scores(prediction: Any, y: Any) -> dict[str, float]:
    """Gaussian NLL, RMSE, 95% interval coverage and mean predictive std of ``(mean, var)``."""
    mean, var = prediction
    return {"nll": _r.gaussian_nll(mean, var, y), "rmse": _r.rmse(mean, y),
            "coverage_95": _r.interval_coverage(mean, var, y, 0.95),
            "sharpness": _r.sharpness(var)}


def _ood_rows(name: str, p_in: Any, p_out: Any) -> list[dict[str, Any]]:
    scores = _m.ood_metrics(p_in, p_out)
    return [{"predictor": name, "shift": "ood", "severity": 0, "level": 0.0, "metric": key,
             "value": scores[key]} for key in ("auroc_confidence", "auroc_entropy")]


def evaluate(predictors: Mapping[str, Predictor], x: Any, y: Any, shifts: Sequence[Shift], *,
             task: str = "classification", ood: Any = None, n_bins: int = N_BINS) -> ShiftTable:
    """Every predictor on every severity of every shift of the test set ``(x, y)``.

    Args:
        predictors: name -> callable (see the module docstring).
        x, y: the clean test set (labels ``[N]``, or regression targets).
        shifts: e.g. :func:`image_shifts` or :func:`tabular_shifts`.
        task: ``"classification"`` (also binary) or ``"regression"``.
        ood: out-of-distribution inputs for the AUROC rows (classification only), or None.
        n_bins: equal-width bins of the ECE.
    """
    if task not in ("classification", "regression"):
        raise ValueError(f"task: expected 'classification' or 'regression'; got {task!r}")
    if not predictors:
        raise ValueError("predictors: expected at least one name -> predictor")
    if ood is not None and task != "classification":
        raise ValueError("ood: OOD AUROC rows are for classification; pass ood=None")
    x = np.asarray(x)
    rows: list[dict[str, Any]] = []
    clean = {}
    for shift in shifts:
        for severity, level in enumerate(shift.levels):
            shifted = shift.apply(x, level)
            for name, predict in predictors.items():
                out = predict(shifted)
                if severity == 0:
                    clean[name] = out
                scores = (classification_scores(out, y, n_bins) if task == "classification"
                          else regression_scores(out, y))
                rows += [{"predictor": name, "shift": shift.name, "severity": severity,
                          "level": float(level), "metric": key, "value": value}
                         for key, value in scores.items()]
    if ood is not None:
        for name, predict in predictors.items():
            p_in = clean[name] if name in clean else predict(x)
            rows += _ood_rows(name, p_in, predict(np.asarray(ood)))
    return ShiftTable(rows, {s.name: s.parameter for s in shifts}, task)


# ---------------------------------------------------------------------- predictors


def _softmax(logits: Any) -> np.ndarray:
    return _t.scaled_probs(np.asarray(logits), 1.0)


def _logits(model: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``model`` as a function of its logits: a Keras model's final softmax/sigmoid removed.

    (The calibration modules load TensorFlow only when given a Keras model.)
    """
    keras = sys.modules.get("keras")
    if keras is None or not isinstance(model, keras.Model):
        return model
    from laplace_tf.params import LogitModel

    return LogitModel(model)


def map_predictor(model: Callable[[Any], Any]) -> Predictor:
    """The network's own probabilities: softmax (sigmoid: two columns) of ``model(x)``'s logits
    (a Keras model ending in softmax/sigmoid is read before it, as ``ltf.Laplace`` does)."""
    model = _logits(model)
    return lambda x: _softmax(model(x))


def temperature_predictor(model: Callable[[Any], Any], x_val: Any, y_val: Any) -> Predictor:
    """MAP with its logits divided by the temperature fitted by NLL on ``(x_val, y_val)``
    (logits as in :func:`map_predictor`).

    The fitted value is the predictor's attribute ``temperature``.
    """
    model = _logits(model)
    temperature = _t.fit_temperature(np.asarray(model(x_val)), y_val)

    def predict(x: Any) -> np.ndarray:
        return _t.scaled_probs(np.asarray(model(x)), temperature)

    predict.temperature = temperature  # type: ignore[attr-defined]
    return predict


def ensemble_predictor(models: Sequence[Callable[[Any], Any]]) -> Predictor:
    """A deep ensemble: the mean of the members' softmax probabilities (logits as in
    :func:`map_predictor`)."""
    if not models:
        raise ValueError("models: expected at least one network for the ensemble")
    logits = [_logits(m) for m in models]
    return lambda x: np.mean([_softmax(f(x)) for f in logits], axis=0)


def gaussian_predictor(models: Sequence[Callable[[Any], Any]], noise_var: float) -> Predictor:
    """Regression baseline: MAP (one model) or an ensemble's Gaussian moment match.

    ``mean = mean_m f_m(x)``, ``variance = noise_var + var_m f_m(x)`` (population variance).

    Example:
        >>> predict = gaussian_predictor([lambda x: x, lambda x: x + 2.0], noise_var=0.5)
        >>> [a.tolist() for a in predict(np.array([[0.0]]))]
        [[[1.0]], [[1.5]]]
    """
    if not models:
        raise ValueError("models: expected at least one network")

    def predict(x: Any) -> tuple[np.ndarray, np.ndarray]:
        means = np.stack([np.asarray(m(x), dtype=np.float64) for m in models])
        return means.mean(axis=0), noise_var + means.var(axis=0)

    return predict


def laplace_predictor(la: Any, **options: Any) -> Predictor:
    """``la(x, **options)`` as numpy: probabilities, or ``(mean, variance)`` for regression.

    Example: ``laplace_predictor(la, pred_type="glm", link_approx="probit")``.
    """
    def predict(x: Any) -> Any:
        out = la(x, **options)
        if isinstance(out, tuple):
            return tuple(np.asarray(o) for o in out)
        p = np.asarray(out)
        return p[:, 0] if p.ndim == 2 and p.shape[1] == 1 else p

    return predict


__all__ = ["Shift", "ShiftTable", "blur", "classification_scores", "covariate_shift",
           "ensemble_predictor", "evaluate", "extrapolate", "gaussian_noise", "gaussian_predictor",
           "image_shifts",
           "laplace_predictor", "map_predictor", "pixel_permutation", "regression_scores",
           "rotate", "shuffle_pixels", "tabular_shifts", "temperature_predictor"]
