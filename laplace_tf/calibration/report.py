"""Calibration report: the MAP network and the Laplace predictive side by side.

:func:`report` evaluates a fitted :class:`laplace_tf.Laplace` on test data (and optionally
validation and out-of-distribution data) twice: as the plain network at the MAP
(``la.map_predict``) and as the Laplace predictive (``la(x, pred_type=..., ...)``), and
returns a :class:`Report` holding the metrics (a nested dict), the figures and the
configuration. A report writes itself as

* one self-contained HTML file (:meth:`Report.to_html`): tables with the better of MAP and
  Laplace marked, PNG plots embedded as base64 data URIs, the configuration and the library
  versions; a notebook shows the same body inline (``_repr_html_``);
* JSON (:meth:`Report.to_json`): the metrics only, plain JSON types, NaN written as ``null``;
* Markdown (:meth:`Report.to_markdown`): the same tables; the plots are written as PNG files
  into a ``plots/`` folder next to the Markdown file and linked relatively, so the folder
  renders as is (e.g. on GitHub);
* PNG files (:meth:`Report.save_plots`).

The tables, HTML and Markdown are rendered by :mod:`laplace_tf.calibration._render`. This
module does not import TensorFlow (the fitted ``la`` brings it along).

Example:
    ``rep = calibration.report(la, test=(x_test, y_test), ood=x_ood)`` then
    ``rep.metrics["test"]["laplace"]["ece"]``, ``rep.to_html("report.html")``, or ``rep``
    as the last line of a notebook cell.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

import laplace_tf
from laplace_tf.calibration import _render as _r
from laplace_tf.calibration import _validation as _v
from laplace_tf.calibration._render import MODELS
from laplace_tf.calibration.metrics import (
    auroc,
    classification_metrics,
    ece_details,
    fpr_at_95_tpr,
    ood_metrics,
)
from laplace_tf.calibration.plots import (
    InlineFigure,
    eigenvalue_spectrum,
    evidence_plot,
    ood_histograms,
    regression_band_plot,
    regression_calibration_plot,
    reliability_comparison,
    reliability_diagram,
)
from laplace_tf.calibration.regression import regression_metrics
from laplace_tf.inputs import is_input_list

SPECTRUM_DENSE_LIMIT = 2048
"""Largest dense curvature block whose eigenvalues the report computes (cost ``O(p^3)``)."""

SPECTRUM_MAX_VALUES = 1_000_000
"""Largest number of curvature eigenvalues the report plots."""

_LIBRARIES = {  # key in metrics["versions"] -> distribution name
    "tensorflow": "tensorflow",
    "tensorflow_probability": "tensorflow-probability",
    "keras": "keras",
    "numpy": "numpy",
    "scipy": "scipy",
    "matplotlib": "matplotlib",
}


@dataclasses.dataclass
class Report:
    """Metrics and figures comparing the MAP network with the Laplace predictive.

    Built by :func:`report`. Add or drop entries of :attr:`figures` before writing to change
    which plots are saved.

    Attributes:
        title: the report's title.
        metrics: plain Python values (floats, ints, strings, lists, dicts, None):
            ``"test"``: ``{"map": {...}, "laplace": {...}}`` metric name -> value;
            ``"val"``: the same on the validation data, or None;
            ``"ood"``: ``{"map": {...}, "laplace": {...}}`` OOD-detection metrics, or None;
            ``"ece"``: classification: ``{"map": {"width": d, "mass": d}, "laplace": ...}``
            with ``d = {"value", "n_bins", "binning"}`` on the test set, else None;
            ``"config"``: the Laplace and predictive settings and the data sizes (plus
            ``"run"``: the ``config`` given to :func:`report`, if any);
            ``"versions"``: library name -> version string.
        figures: name -> :class:`matplotlib.figure.Figure`.

    Example:
        >>> rep = Report("demo", {"test": {"map": {"nll": 0.5}, "laplace": {"nll": 0.4}}}, {})
        >>> "<td class=\\"better\\">0.4 &#10003;</td>" in rep._repr_html_()
        True
    """

    title: str
    metrics: dict[str, Any]
    figures: dict[str, Figure]

    def to_html(self, path: str | os.PathLike) -> Path:
        """Write one self-contained HTML5 file (images embedded) and return its path."""
        return _r.write(path, _r.html_document(self.title, self.metrics, self.figures))

    def _repr_html_(self) -> str:
        """The body of :meth:`to_html` as a fragment, for inline display in Jupyter."""
        return _r.html_fragment(self.title, self.metrics, self.figures)

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write :attr:`metrics` as JSON (NaN and infinities as ``null``); return the path."""
        text = json.dumps(_r.plain(self.metrics), indent=2, allow_nan=False)
        return _r.write(path, text + "\n")

    def to_markdown(self, path: str | os.PathLike) -> Path:
        """Write the tables as Markdown and the plots as PNGs into ``plots/`` next to it.

        Returns:
            The Markdown file's path (the PNGs are ``<folder>/plots/<figure name>.png``; no
            ``plots/`` folder without figures).
        """
        path = _r.as_path(path, "path")
        images = self.save_plots(path.parent / "plots") if self.figures else {}
        links = {name: f"plots/{image.name}" for name, image in images.items()}
        return _r.write(path, _r.markdown(self.title, self.metrics, links))

    def save_plots(self, folder: str | os.PathLike) -> dict[str, Path]:
        """Write each figure as ``<folder>/<name>.png`` (folder created); return name -> path."""
        folder = _r.as_path(folder, "folder")
        folder.mkdir(parents=True, exist_ok=True)
        paths = {name: folder / f"{name}.png" for name in self.figures}
        for name, fig in self.figures.items():
            fig.savefig(paths[name], format="png", dpi=100)
        return paths


def report(
    la: Any,
    test: tuple[Any, Any],
    ood: Any | None = None,
    val: tuple[Any, Any] | None = None,
    *,
    pred_type: str = "glm",
    link_approx: str = "probit",
    n_samples: int = 100,
    seed: int = 0,
    n_bins: int = 15,
    title: str | None = None,
    x_grid: Any | None = None,
    train: tuple[Any, Any] | None = None,
    config: Mapping[str, Any] | Any | None = None,
) -> Report:
    """Evaluate the MAP network and the Laplace predictive side by side; build a report.

    On each data set, the MAP predictive is ``la.map_predict(x)`` (probabilities, or for
    regression ``(mean, sigma_noise^2)``) and the Laplace predictive ``la(x, pred_type=...,
    link_approx=..., n_samples=..., seed=...)`` (probabilities, or ``(mean, var)`` with the
    noise included). Classification and binary models get the classification metrics;
    regression models the Gaussian regression metrics.

    Figures: classification: ``"reliability_comparison"``, ``"reliability_diagrams"``, and
    with ``ood`` ``"ood_histograms"``; regression: ``"regression_calibration"`` and, for 1-D
    inputs and one output, ``"regression_band"``; both: ``"evidence"`` when
    ``la.tuning_trace`` holds a log marginal likelihood, ``"curvature_spectrum"`` unless a
    dense curvature block is larger than :data:`SPECTRUM_DENSE_LIMIT` or there are more than
    :data:`SPECTRUM_MAX_VALUES` eigenvalues.

    Args:
        la: a fitted :class:`laplace_tf.Laplace`.
        test: ``(x, y)`` test inputs and targets (integer labels, or regression targets).
        ood: out-of-distribution inputs ``x`` (no targets). Classification: AUROC and FPR at
            95% TPR of confidence and entropy (test inputs are in-distribution).
            Regression: the same with the predictive variance as the score (mean over
            outputs; the MAP's constant variance scores 0.5).
        val: optional ``(x, y)`` validation data, evaluated like ``test``.
        pred_type: ``"glm"`` or ``"nn"``, passed to ``la``.
        link_approx: ``"probit"``, ``"mc"`` or ``"bridge"``, passed to ``la``.
        n_samples: samples for ``pred_type="nn"`` and ``link_approx="mc"``.
        seed: seed of those samples.
        n_bins: equal-width bins of the ECE-type metrics and the reliability diagrams; the ECE
            table also gives the ECE with as many equal-mass bins.
        title: the report's title (default: likelihood, subset and structure).
        x_grid: regression with 1-D inputs: a dense grid ``[G]`` or ``[G, 1]`` on which the
            band plot is drawn (default: the sorted test inputs).
        train: regression with 1-D inputs: ``(x, y)`` training data shown in the band plot.
        config: extra settings to record (e.g. a run configuration: a dict or a dataclass);
            stored in ``metrics["config"]["run"]`` and shown in the configuration table.

    Returns:
        The :class:`Report`.

    Raises:
        ValueError, TypeError: an unfitted ``la``, malformed data (e.g. not a pair, or
            inputs and targets of different lengths), ``x_grid``/``train`` without a band
            plot, or a bad argument of ``la``'s predictive.

    Example:
        >>> rep = report(la, test=(x_test, y_test), ood=x_ood)         # doctest: +SKIP
        >>> rep.metrics["test"]["laplace"]["nll"] < rep.metrics["test"]["map"]["nll"]  # doctest: +SKIP
        True
    """
    _check_fitted(la)
    regression = la.likelihood.gaussian_predictive
    n_bins = _v.n_bins(n_bins)
    if title is not None and not isinstance(title, str):
        raise TypeError(f"title: expected a string or None; got {type(title).__name__}")
    run = _run_config(config)
    x_test, y_test = _pair(test, "test")
    val = None if val is None else _pair(val, "val")
    band = regression and _is_1d(x_test) and np.size(y_test) == _n_rows(y_test, "test[1]")
    for name, value in (("x_grid", x_grid), ("train", train)):
        if value is not None and not band:
            raise ValueError(
                f"{name}: only used by the regression band plot, which needs a regression "
                f"model with 1-D inputs and one output; got {la.likelihood.name!r} with test "
                f"inputs of shape {tuple(np.shape(x_test))}. Pass {name}=None."
            )
    grid = None if x_grid is None else _grid(x_grid, x_test)
    train = None if train is None else _pair(train, "train")
    options = {"pred_type": pred_type, "link_approx": link_approx, "n_samples": n_samples,
               "seed": seed}

    def predict(x: Any) -> dict[str, Any]:
        return _predictions(la, x, regression, options)

    test_preds = predict(x_test)
    ood_preds = None if ood is None else predict(ood)
    metrics = {
        "test": _evaluate(test_preds, y_test, regression, n_bins),
        "val": None if val is None else _evaluate(predict(val[0]), val[1], regression, n_bins),
        "ood": None if ood_preds is None else {
            model: _ood(test_preds[model], ood_preds[model], regression) for model in MODELS
        },
        "ece": None if regression else {
            model: {b: ece_details(p, y_test, n_bins, b) for b in ("width", "mass")}
            for model, p in test_preds.items()
        },
        "config": _config(la, regression, options, n_bins, run=run, sizes={
            "n_test": _n_rows(x_test, "test[0]"),
            "n_val": None if val is None else _n_rows(val[0], "val[0]"),
            "n_ood": None if ood is None else _n_rows(ood, "ood"),
        }),
        "versions": _versions(),
    }
    if not regression:
        figures = _classification_figures(test_preds, y_test, ood_preds, n_bins)
    else:
        figures = {"regression_calibration": _regression_calibration_figure(test_preds, y_test)}
        if band:
            figures["regression_band"] = _band_figure(
                x_test if grid is None else grid,
                test_preds if grid is None else predict(grid),
                (x_test, y_test), train,
            )
    trace = getattr(la, "tuning_trace", None)  # None until a prior tuning ran
    if trace and "log_marginal_likelihood" in trace:
        figures["evidence"] = evidence_plot(trace)
    spectra = _curvature_spectra(la)
    if spectra:
        figures["curvature_spectrum"] = eigenvalue_spectrum(spectra)
    if title is None:
        title = (f"Laplace calibration report: {la.likelihood.name}, "
                 f"{la.subset_of_weights} / {la.hessian_structure}")
    return Report(title, _r.plain(metrics, nan_to_none=False), figures)


# ---------------------------------------------------------------------- inputs and predictions


def _check_fitted(la: Any) -> None:
    if not (callable(la) and hasattr(la, "map_predict") and hasattr(la, "likelihood")):
        raise TypeError(
            f"la: expected a fitted laplace_tf.Laplace; got {type(la).__name__}. Build one with "
            "ltf.Laplace(model, likelihood, ...) and call la.fit(train) first."
        )
    if la.curvature is None:
        raise ValueError("la: the Laplace posterior is not fitted; call la.fit(train) first.")


def _n_rows(x: Any, name: str) -> int:
    """Number of examples of an array, tensor, or dict or list of them (its first entry)."""
    if isinstance(x, Mapping):
        first = next(iter(x.values()), None)
    elif is_input_list(x):
        first = x[0]  # the inputs of a model with several positional inputs
    else:
        first = x
    shape = () if first is None else tuple(np.shape(first))
    if not shape:
        raise ValueError(
            f"{name}: expected an array with one row per example; got "
            f"{type(x).__name__} of shape {shape}"
        )
    return int(shape[0])


def _pair(data: Any, name: str) -> tuple[Any, Any]:
    """Checked ``(x, y)`` with as many targets as inputs."""
    if not (isinstance(data, tuple | list) and len(data) == 2):
        raise TypeError(
            f"{name}: expected a pair (x, y) of inputs and targets; got {type(data).__name__}"
            + (f" of length {len(data)}" if isinstance(data, tuple | list) else "")
        )
    x, y = data
    n_x, n_y = _n_rows(x, f"{name}[0]"), _n_rows(y, f"{name}[1]")
    if n_x != n_y:
        raise ValueError(
            f"{name}: {n_x} inputs but {n_y} targets; expected one target per input"
        )
    return x, y


def _is_1d(x: Any) -> bool:
    """Whether ``x`` is an array of scalar inputs, ``[N]`` or ``[N, 1]``."""
    return not isinstance(x, Mapping) and tuple(np.shape(x))[1:] in ((), (1,)) and np.ndim(x) > 0


def _grid(x_grid: Any, x_test: Any) -> np.ndarray:
    """``x_grid`` as 1-D inputs shaped like the test inputs (``[G]`` or ``[G, 1]``)."""
    grid = _v.float_array(x_grid, "x_grid")
    if not _is_1d(grid) or grid.size == 0:
        raise ValueError(
            f"x_grid: expected a non-empty grid of 1-D inputs, shape [G] or [G, 1]; got shape "
            f"{grid.shape}"
        )
    return grid.reshape((-1, *tuple(np.shape(x_test))[1:]))


def _predictions(la: Any, x: Any, regression: bool, options: dict[str, Any]) -> dict[str, Any]:
    """``{"map": p, "laplace": p}``: numpy probabilities, or ``(mean, var)`` pairs."""
    if regression:
        mean, var = la.map_predict(x)
        mean = np.asarray(mean)
        la_mean, la_var = la(x, **options)
        return {
            "map": (mean, np.broadcast_to(np.asarray(var), mean.shape)),
            "laplace": (np.asarray(la_mean), np.asarray(la_var)),
        }
    return {"map": np.asarray(la.map_predict(x)), "laplace": np.asarray(la(x, **options))}


def _evaluate(
    preds: dict[str, Any], y: Any, regression: bool, n_bins: int
) -> dict[str, dict[str, float]]:
    """Metrics of each predictive on targets ``y``."""
    if regression:
        return {model: regression_metrics(mean, var, y) for model, (mean, var) in preds.items()}
    return {model: classification_metrics(p, y, n_bins) for model, p in preds.items()}


def _ood(pred_in: Any, pred_out: Any, regression: bool) -> dict[str, float]:
    """OOD metrics; regression scores inputs by minus the mean predictive variance."""
    if not regression:
        return ood_metrics(pred_in, pred_out)
    s_in, s_out = (-p[1].reshape(len(p[1]), -1).mean(axis=1) for p in (pred_in, pred_out))
    return {
        "auroc_variance": auroc(s_in, s_out),
        "fpr_at_95_tpr_variance": fpr_at_95_tpr(s_in, s_out),
    }


# ---------------------------------------------------------------------- figures


def _side_by_side(draw: Any, rows: int = 1, **subplots: Any) -> Figure:
    """A Figure with MAP and Laplace columns; ``draw(model, axes)`` fills each column."""
    fig = InlineFigure(figsize=(10.0, 4.5 if rows == 1 else 6.0), layout="constrained")
    axes = np.asarray(fig.subplots(rows, 2, squeeze=False, **subplots))
    for column, model in enumerate(MODELS):
        draw(model, axes[0, column] if rows == 1 else axes[:, column])
    return fig


def _classification_figures(
    preds: dict[str, np.ndarray], y: Any, ood_preds: dict[str, np.ndarray] | None, n_bins: int
) -> dict[str, Figure]:
    def reliability(model: str, axes: np.ndarray) -> None:
        reliability_diagram(preds[model], y, n_bins, ax=axes[0], hist_ax=axes[1],
                            label=MODELS[model])

    figures = {
        "reliability_comparison": reliability_comparison(
            {MODELS[model]: p for model, p in preds.items()}, y, n_bins
        ),
        "reliability_diagrams": _side_by_side(reliability, rows=2, height_ratios=[3, 1]),
    }
    if ood_preds is not None:
        def ood_scores(model: str, axes: np.ndarray) -> None:
            for ax, score in zip(axes, ("confidence", "entropy"), strict=True):
                ood_histograms(preds[model], ood_preds[model], score, ax=ax)
                ax.set_title(f"{MODELS[model]}: {ax.get_title()}")

        figures["ood_histograms"] = _side_by_side(ood_scores, rows=2)
    return figures


def _regression_calibration_figure(preds: dict[str, tuple[np.ndarray, np.ndarray]],
                                   y: Any) -> Figure:
    return _side_by_side(
        lambda model, ax: regression_calibration_plot(*preds[model], y, ax=ax,
                                                      label=MODELS[model])
    )


def _band_figure(
    x: Any, preds: dict[str, tuple[np.ndarray, np.ndarray]], test: tuple[Any, Any],
    train: tuple[Any, Any] | None,
) -> Figure:
    x_train, y_train = (None, None) if train is None else train

    def draw(model: str, ax: Any) -> None:
        regression_band_plot(x, None, *preds[model], x_train, y_train, ax=ax)
        ax.scatter(np.ravel(test[0]), np.ravel(test[1]), s=10, color="black", label="test data")
        ax.set_title(MODELS[model])
        ax.legend(loc="best")

    return _side_by_side(draw, sharey=True)


def _curvature_spectra(la: Any) -> dict[str, np.ndarray]:
    """Eigenvalues of each curvature block (``{}`` when too expensive), from each block's
    ``spectrum`` (Kronecker blocks ``A ⊗ G``: the factors' eigenvalues ``a_i g_j``)."""
    blocks = la.curvature.blocks
    if sum(b.size for b in blocks) > SPECTRUM_MAX_VALUES:
        return {}
    all_values = [b.spectrum(SPECTRUM_DENSE_LIMIT) for b in blocks]
    if any(values is None for values in all_values):
        return {}
    if len(blocks) == 1:
        names = [f"{la.curvature_kind} ({la.hessian_structure})"]
    else:
        names = [s.name for s in la.subset.slices]
    spectra = {}
    for name, values in zip(names, all_values, strict=True):
        if np.any(values > 0):  # the plot is on a log scale
            spectra[name] = values
    return spectra


# ---------------------------------------------------------------------- configuration


def _config(
    la: Any, regression: bool, options: dict[str, Any], n_bins: int, *,
    sizes: dict[str, int | None], run: dict[str, Any] | None,
) -> dict[str, Any]:
    """The settings of ``la`` and of the predictive, the data sizes and the ``run`` config."""
    glm_link = not regression and options["pred_type"] == "glm"
    sampled = options["pred_type"] == "nn" or (glm_link and options["link_approx"] == "mc")
    prior = np.asarray(la.prior_precision, np.float64)
    summary: np.ndarray | dict[str, Any] = prior
    if prior.size > 1 and prior.size == la.n_params:  # one per weight: summarise
        summary = {"per_weight": prior.size, "min": prior.min(), "mean": prior.mean(),
                 "max": prior.max()}
    config = {
        "likelihood": la.likelihood.name,
        "subset_of_weights": la.subset_of_weights,
        "hessian_structure": la.hessian_structure,
        "curvature": la.curvature_kind,
        "prior_precision": summary,
        "sigma_noise": np.asarray(la.sigma_noise, np.float64) if la.likelihood.has_noise else None,
        "temperature": la.temperature,
        "n_params": la.n_params,
        "n_data": la.curvature.n_data,
        "pred_type": options["pred_type"],
        "link_approx": options["link_approx"] if glm_link else None,
        "n_samples": options["n_samples"] if sampled else None,
        "seed": options["seed"] if sampled else None,
        "n_bins": None if regression else n_bins,
        **sizes,
    }
    if run is not None:
        config["run"] = run
    return config


def _run_config(config: Any) -> dict[str, Any] | None:
    """The ``config`` argument of :func:`report` as a dict (a dataclass is converted)."""
    if config is None:
        return None
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    if not isinstance(config, Mapping):
        raise TypeError(
            f"config: expected a dict or a dataclass instance of settings; got "
            f"{type(config).__name__}"
        )
    for key, value in config.items():
        try:
            json.dumps(_r.plain(value))
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"config: the value of {key!r} cannot be written to JSON ({err}); give numbers, "
                "strings, booleans, None, or lists and dicts of them."
            ) from None
    return dict(config)


def _versions() -> dict[str, str]:
    versions = {"laplace_tf": laplace_tf.__version__}
    for key, distribution in _LIBRARIES.items():
        try:
            versions[key] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            versions[key] = "not installed"
    versions["python"] = platform.python_version()
    return versions
