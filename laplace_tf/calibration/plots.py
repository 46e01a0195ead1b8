"""Calibration plots with matplotlib's object-oriented API.

Every function draws into ``ax`` when given and otherwise creates a new :class:`InlineFigure`
(a :class:`matplotlib.figure.Figure`). New figures are not registered with pyplot, so nothing
pops up, nothing accumulates in a loop, and any backend (Agg included) works; a notebook shows a
returned figure as a PNG, ``fig.savefig(path)`` writes one. To show plots with ``plt.show()``,
create the axes with ``fig, ax = plt.subplots()`` and pass ``ax=ax``. Every function returns the
(root) Figure it drew into and never calls ``plt.show``.

Data arguments follow :mod:`laplace_tf.calibration.metrics` (classification) and
:mod:`laplace_tf.calibration.regression` (regression) and are checked the same way.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from mpl_toolkits.axes_grid1 import make_axes_locatable

from laplace_tf.calibration import _validation as _v
from laplace_tf.calibration.metrics import CalibrationBins, _auroc, _ood_scores, _top_label_bins
from laplace_tf.calibration.regression import (
    _area_grid,
    _coverage,
    _miscalibration_area,
    _standardised_residuals,
)

_SCHEME_NAMES = {"width": "equal-width", "mass": "equal-mass"}
_OOD_SCORES = ("confidence", "entropy")


class InlineFigure(Figure):
    """A :class:`matplotlib.figure.Figure` that Jupyter shows as a PNG image, with any backend.

    IPython renders a plain Figure only through a formatter that the inline backend registers
    when pyplot first creates a figure; a Figure created without pyplot is otherwise shown as
    its text repr, ``<Figure size 500x500 with 1 Axes>``. ``_repr_png_`` draws it instead
    (tight bounding box, at the figure's dpi). Build multi-panel figures for the plotting
    functions' ``ax=`` with it, e.g. ``InlineFigure(figsize=(10, 4)).subplots(1, 2)``.

    Example:
        >>> fig = InlineFigure(figsize=(2.0, 1.0))
        >>> ax = fig.add_subplot()
        >>> fig._repr_png_()[:8]
        b'\\x89PNG\\r\\n\\x1a\\n'
    """

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.savefig(buffer, format="png", bbox_inches="tight")
        return buffer.getvalue()


def _figure_and_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    """``(figure, ax)``: a new single-axes Figure, or the root Figure of the given ``ax``."""
    if ax is None:
        fig = InlineFigure(figsize=figsize, layout="constrained")
        return fig, fig.add_subplot()
    if not isinstance(ax, Axes):
        raise TypeError(
            f"ax: expected one matplotlib Axes (e.g. from plt.subplots()); got {type(ax).__name__}"
        )
    return ax.figure.figure, ax


def _bins_title(bins: CalibrationBins) -> str:
    return f"Reliability diagram ({bins.n_bins} {_SCHEME_NAMES[bins.binning]} bins)"


def _diagonal(ax: Axes, label: str = "perfect calibration") -> None:
    ax.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", color="0.4", linewidth=1, label=label)


def reliability_diagram(
    probs: Any,
    labels: Any,
    n_bins: int = 15,
    binning: str = "width",
    ax: Axes | None = None,
    label: str | None = None,
    show_histogram: bool = True,
    hist_ax: Axes | None = None,
) -> Figure:
    """Top-label reliability diagram with calibration gaps and a confidence histogram.

    One blue bar per non-empty bin shows its accuracy; a red hatched bar from the accuracy to
    the bin's mean confidence shows the gap (reaching above the accuracy: overconfident). The
    dashed diagonal is perfect calibration; the legend gives the ECE of these bins. The bins
    are those of :func:`~laplace_tf.calibration.metrics.calibration_bins`, so the drawn gaps
    are exactly the ones :func:`~laplace_tf.calibration.metrics.ece` averages.

    Args:
        probs: ``[N, C]`` probabilities (or ``[S, N, C]`` Monte Carlo, or binary ``[N]``).
        labels: ``[N]`` integer labels.
        n_bins: number of bins.
        binning: ``"width"`` (equal-width) or ``"mass"`` (equal-mass) bins.
        ax: axes for the diagram; a new figure if None.
        label: model name shown in the legend, e.g. ``"Laplace"``.
        show_histogram: also draw the density of the confidences over the same bins
            (fraction of examples / bin width) on a small axis below, with the mean confidence
            and the accuracy marked. With a given ``ax`` and no ``hist_ax``, that axis is
            taken from the bottom of ``ax`` (outside any layout engine; pass ``hist_ax`` in
            a constrained-layout figure).
        hist_ax: axes for the histogram, together with ``ax`` (implies ``show_histogram``).

    Returns:
        The Figure drawn into.

    Example:
        Confidences 0.9 and 0.8 fall into the bin (0.5, 1], where one of two is right:

        >>> fig = reliability_diagram(np.array([[0.9, 0.1], [0.2, 0.8]]), [0, 0], n_bins=2)
        >>> [float(bar.get_height()) for bar in fig.axes[0].containers[0]]
        [0.5]
        >>> fig.axes[0].containers[0].get_label()  # ECE = |0.5 - 0.85|
        'accuracy (ECE = 0.350)'
    """
    bins = _checked_bins(probs, labels, n_bins, binning)
    if hist_ax is not None and ax is None:
        raise ValueError("hist_ax: given without ax; expected both axes, or ax alone, or neither")
    if ax is None and show_histogram:
        two_rows = InlineFigure(figsize=(5.0, 5.5), layout="constrained")
        ax, hist_ax = two_rows.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    fig, ax = _figure_and_axes(ax, (5.0, 5.0))
    keep = bins.nonempty
    left, width = bins.edges[:-1][keep], np.diff(bins.edges)[keep]
    # equal-mass bins of tied confidences have no width: drawn 0.005 wide (their histogram bar
    # keeps the area of their mass)
    width = np.maximum(width, 0.005)
    acc, conf = bins.accuracy[keep], bins.confidence[keep]
    name = label or "accuracy"
    ax.bar(
        left,
        acc,
        width,
        align="edge",
        color="C0",
        edgecolor="black",
        linewidth=0.6,
        label=f"{name} (ECE = {bins.ece:.3f})",
    )
    ax.bar(
        left,
        conf - acc,
        width,
        bottom=acc,
        align="edge",
        color="C3",
        alpha=0.3,
        edgecolor="C3",
        hatch="//",
        linewidth=0.6,
        label="gap to confidence",
    )
    _diagonal(ax)
    ax.set(xlim=(0.0, 1.0), ylim=(0.0, 1.0), ylabel="accuracy", title=_bins_title(bins))
    ax.legend(loc="upper left")
    if hist_ax is None and not show_histogram:
        ax.set_xlabel("confidence")
        return fig
    if hist_ax is None:
        hist_ax = make_axes_locatable(ax).append_axes("bottom", size="28%", pad=0.1, sharex=ax)
    elif not isinstance(hist_ax, Axes):
        raise TypeError(f"hist_ax: expected a matplotlib Axes; got {type(hist_ax).__name__}")
    density = bins.counts[keep] / bins.counts.sum() / width
    hist_ax.bar(left, density, width, align="edge", color="0.6", edgecolor="black", linewidth=0.6)
    mean_confidence = float(np.sum(bins.counts[keep] * conf) / bins.counts.sum())
    mean_accuracy = float(np.sum(bins.counts[keep] * acc) / bins.counts.sum())
    hist_ax.axvline(mean_confidence, color="C3", label=f"mean confidence {mean_confidence:.3f}")
    hist_ax.axvline(
        mean_accuracy, color="C0", linestyle="--", label=f"accuracy {mean_accuracy:.3f}"
    )
    hist_ax.set(xlim=(0.0, 1.0), xlabel="confidence", ylabel="density")
    hist_ax.legend(loc="upper left", fontsize="small")
    ax.tick_params(labelbottom=False)
    return fig


def _checked_bins(
    probs: Any, labels: Any, n_bins: int, binning: str, probs_name: str = "probs"
) -> CalibrationBins:
    """Top-label bins with errors naming ``probs_name`` (e.g. ``probs_by_name['MAP']``)."""
    p = _v.class_probs(probs, probs_name)
    y = _v.class_labels(labels, p.shape[0], p.shape[1], probs_name=probs_name)
    return _top_label_bins(p, y, _v.n_bins(n_bins), _v.binning(binning))


def reliability_comparison(
    probs_by_name: Mapping[str, Any],
    labels: Any,
    n_bins: int = 15,
    binning: str = "width",
    ax: Axes | None = None,
) -> Figure:
    """Several models on one reliability diagram, e.g. ``{"MAP": p_map, "Laplace": p_la}``.

    Each model is a line through its non-empty bins at (mean confidence, accuracy), labelled
    with its ECE for these bins; all models use the same ``labels``.

    Args:
        probs_by_name: model name -> probabilities (any layout accepted by the metrics).
        labels: ``[N]`` integer labels shared by all models.
        n_bins: number of bins.
        binning: ``"width"`` or ``"mass"``.
        ax: axes to draw into; a new figure if None.

    Returns:
        The Figure drawn into.

    Example:
        MAP: confidences 0.9, 0.8, both right (ECE |1 - 0.85|); Laplace: 0.6, 0.6, one right.

        >>> probs = np.array([[0.9, 0.1], [0.2, 0.8]])
        >>> fig = reliability_comparison({"MAP": probs, "Laplace": [[0.6, 0.4], [0.6, 0.4]]},
        ...                              [0, 1], n_bins=2)
        >>> [line.get_label() for line in fig.axes[0].get_lines()[1:]]
        ['MAP (ECE = 0.150)', 'Laplace (ECE = 0.100)']
    """
    if not isinstance(probs_by_name, Mapping) or not probs_by_name:
        raise TypeError(
            "probs_by_name: expected a non-empty dict of model name -> probabilities; got "
            f"{type(probs_by_name).__name__}"
        )
    all_bins = {
        name: _checked_bins(probs, labels, n_bins, binning, f"probs_by_name[{name!r}]")
        for name, probs in probs_by_name.items()
    }
    fig, ax = _figure_and_axes(ax, (5.0, 5.0))
    _diagonal(ax)
    for name, bins in all_bins.items():
        keep = bins.nonempty
        ax.plot(
            bins.confidence[keep],
            bins.accuracy[keep],
            marker="o",
            markersize=4,
            label=f"{name} (ECE = {bins.ece:.3f})",
        )
    ax.set(
        xlim=(0.0, 1.0),
        ylim=(0.0, 1.0),
        xlabel="confidence",
        ylabel="accuracy",
        title=_bins_title(next(iter(all_bins.values()))),
    )
    ax.legend(loc="upper left")
    return fig


def _one_output(a: np.ndarray, name: str) -> np.ndarray:
    if a.ndim == 2 and a.shape[1] != 1:
        raise ValueError(
            f"{name}: expected one output, shape [N] or [N, 1]; got shape {a.shape} "
            "(plot one output column at a time)"
        )
    return a.reshape(-1)


def _inputs_1d(x: Any, name: str, n: int | None = None, n_name: str = "") -> np.ndarray:
    """Checked 1-D values ``[N]`` (``[N, 1]`` is flattened), ``N = n`` if given."""
    a = _v.float_array(x, name)
    if not (a.ndim == 1 or (a.ndim == 2 and a.shape[1] == 1)):
        raise ValueError(f"{name}: expected 1-D values of shape [N] or [N, 1]; got shape {a.shape}")
    a = a.reshape(-1)
    if n is not None and a.size != n:
        raise ValueError(f"{name}: has {a.size} entries; expected {n}, one per entry of {n_name}")
    return a


def regression_band_plot(
    x: Any,
    y: Any | None,
    mean: Any,
    var: Any,
    x_train: Any | None = None,
    y_train: Any | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Predictive mean with +-1 sigma and +-2 sigma bands over a 1-D input.

    Points are sorted by ``x`` before drawing the mean line and the two shaded bands
    (``mean +- sqrt(var)``, ``mean +- 2 sqrt(var)``).

    Args:
        x: ``[N]`` or ``[N, 1]`` inputs where the predictive is evaluated.
        y: ``[N]`` targets at ``x`` drawn as points, or None (e.g. ``x`` is a dense grid).
        mean: ``[N]`` or ``[N, 1]`` predictive means.
        var: predictive variances, same shape, > 0 (with noise: bands cover the data).
        x_train: optional training inputs ``[M]`` drawn as crosses, with ``y_train``.
        y_train: optional training targets ``[M]``.
        ax: axes to draw into; a new figure if None.

    Returns:
        The Figure drawn into.

    Example:
        The outer band reaches ``mean + 2 sqrt(var) = 0 + 2 * 2``:

        >>> fig = regression_band_plot([0.0, 1.0], None, [0.0, 0.0], [1.0, 4.0])
        >>> float(fig.axes[0].collections[0].get_paths()[0].vertices[:, 1].max())
        4.0
    """
    m = _v.means(mean)
    t = None if y is None else _v.targets(y, m)
    v = _v.variances_like(var, m)
    m, v = _one_output(m, "mean"), _one_output(v, "var")
    xs = _inputs_1d(x, "x", m.size, "mean")
    if (x_train is None) != (y_train is None):
        given = "x_train" if y_train is None else "y_train"
        raise ValueError(f"{given}: given alone; expected both x_train and y_train, or neither")
    if x_train is not None:
        x_tr = _inputs_1d(x_train, "x_train")
        y_tr = _inputs_1d(y_train, "y_train", x_tr.size, "x_train")
    fig, ax = _figure_and_axes(ax, (6.0, 4.0))
    order = np.argsort(xs, kind="stable")
    xs, m, s = xs[order], m[order], np.sqrt(v[order])
    ax.fill_between(
        xs, m - 2 * s, m + 2 * s, color="C0", alpha=0.15, linewidth=0, label=r"$\pm 2\sigma$"
    )
    ax.fill_between(xs, m - s, m + s, color="C0", alpha=0.3, linewidth=0, label=r"$\pm 1\sigma$")
    ax.plot(xs, m, color="C0", label="predictive mean")
    if t is not None:
        ax.scatter(xs, _one_output(t, "y")[order], s=10, color="black", label="data")
    if x_train is not None:
        ax.scatter(x_tr, y_tr, s=20, marker="x", color="C1", label="training data")
    ax.set(xlabel="x", ylabel="y")
    ax.legend(loc="best")
    return fig


def regression_calibration_plot(
    mean: Any,
    var: Any,
    y: Any,
    ax: Axes | None = None,
    levels: Any | None = None,
    label: str | None = None,
) -> Figure:
    """Regression calibration curve (observed vs expected coverage) with the area shaded.

    The curve is evaluated on the grid ``{0} + levels + {1}`` of
    :func:`~laplace_tf.calibration.regression.miscalibration_area`; the shaded region
    between it and the diagonal is the area reported in the legend. Below the diagonal:
    overconfident (intervals too narrow).

    Args:
        mean: ``[N]`` or ``[N, D]`` predictive means.
        var: predictive variances, same shape, > 0.
        y: targets, same shape.
        ax: axes to draw into; a new figure if None.
        levels: interval levels in (0, 1); default 0.01, ..., 0.99.
        label: model name shown in the legend.

    Returns:
        The Figure drawn into.

    Example:
        Targets at the means are inside every interval: area ``int_0^1 (1 - q) dq = 0.5``.

        >>> fig = regression_calibration_plot([0.0, 1.0], [1.0, 1.0], [0.0, 1.0])
        >>> fig.axes[0].get_lines()[1].get_label()
        'model (miscalibration area = 0.500)'
    """
    m, t, v = _v.regression(mean, y, var)
    residuals = _standardised_residuals(m, v, t)
    grid = _area_grid(levels)
    observed = _coverage(residuals, grid)
    area = _miscalibration_area(residuals, grid)
    fig, ax = _figure_and_axes(ax, (5.0, 5.0))
    _diagonal(ax)
    ax.fill_between(
        grid, grid, observed, color="C3", alpha=0.25, linewidth=0, label="miscalibration area"
    )
    ax.plot(
        grid, observed, color="C0", label=f"{label or 'model'} (miscalibration area = {area:.3f})"
    )
    ax.set(
        xlim=(0.0, 1.0),
        ylim=(0.0, 1.0),
        xlabel="expected coverage (interval level)",
        ylabel="observed coverage",
        title="Regression calibration",
    )
    ax.legend(loc="upper left")
    return fig


def ood_histograms(
    probs_in: Any,
    probs_out: Any,
    score: str = "confidence",
    n_bins: int = 30,
    ax: Axes | None = None,
) -> Figure:
    """Histograms (densities) of an OOD score on in- vs out-of-distribution inputs.

    The title gives the AUROC with the convention of
    :func:`~laplace_tf.calibration.metrics.ood_metrics` (in-distribution positive; entropy
    negated).

    Args:
        probs_in: ``[N_in, C]`` probabilities on in-distribution inputs.
        probs_out: ``[N_out, C]`` probabilities on OOD inputs.
        score: ``"confidence"`` (max probability, range ``[1/C, 1]``) or ``"entropy"``
            (predictive entropy in nats, range ``[0, log C]``).
        n_bins: number of histogram bins over that range.
        ax: axes to draw into; a new figure if None.

    Returns:
        The Figure drawn into.

    Example:
        >>> fig = ood_histograms([[0.9, 0.1], [0.1, 0.9]], [[0.5, 0.5], [0.6, 0.4]])
        >>> fig.axes[0].get_title()
        'confidence: AUROC = 1.000'
    """
    p_in, p_out = _v.class_probs(probs_in, "probs_in"), _v.class_probs(probs_out, "probs_out")
    if p_in.shape[1] != p_out.shape[1]:
        raise ValueError(
            f"probs_out: has {p_out.shape[1]} classes; expected {p_in.shape[1]} like probs_in"
        )
    if score not in _OOD_SCORES:
        raise ValueError(f"score: expected 'confidence' or 'entropy'; got {score!r}")
    n_classes = p_in.shape[1]
    s_in, s_out = _ood_scores(p_in)[score], _ood_scores(p_out)[score]
    if score == "confidence":
        edges = np.linspace(1.0 / n_classes, 1.0, _v.n_bins(n_bins) + 1)
        value = _auroc(s_in, s_out)
        xlabel = "confidence (max probability)"
    else:
        edges = np.linspace(0.0, np.log(n_classes), _v.n_bins(n_bins) + 1)
        value = _auroc(-s_in, -s_out)
        xlabel = "predictive entropy (nats)"
    # a uniform row's entropy can round one ulp above log C (a confidence below 1/C): keep
    # every example inside the range, or the densities of the others grow to fill it
    s_in, s_out = (np.clip(s, edges[0], edges[-1]) for s in (s_in, s_out))
    fig, ax = _figure_and_axes(ax, (5.0, 4.0))
    # matplotlib's stubs type bins as Sequence[float]; Axes.hist takes any array of edges
    ax.hist(
        s_in, edges, density=True, alpha=0.5, color="C0",  # type: ignore[arg-type]
        label=f"in-distribution (N={s_in.size})",
    )
    ax.hist(
        s_out,
        edges,  # type: ignore[arg-type]
        density=True,
        alpha=0.5,
        color="C3",
        label=f"out-of-distribution (N={s_out.size})",
    )
    ax.set(xlabel=xlabel, ylabel="density", title=f"{score}: AUROC = {value:.3f}")
    ax.legend(loc="best")
    return fig


def _trace_entry(trace: Mapping[str, Any], key: str) -> np.ndarray:
    return _v.float_array(trace[key], f"trace[{key!r}]")


def evidence_plot(trace: Mapping[str, Any], ax: Axes | None = None) -> Figure:
    """Log marginal likelihood (evidence) against prior precision, from a prior-tuning trace.

    Trace format: a dict (any Mapping) with, for ``T`` evaluated points in the order visited,

    * ``"prior_precision"``: ``[T]``, or ``[T, k]`` for ``k`` precisions per point (one per
      layer or parameter), plotted against their arithmetic mean; values > 0;
    * ``"log_marginal_likelihood"``: ``[T]``;
    * ``"sigma_noise"`` (optional): ``[T]`` or ``[T, D]`` observation noise (regression),
      reported (mean over ``D``) at the best point.

    Lists, numpy arrays and eager tensors are accepted. The points are joined in trace order
    (an optimisation path shows as a path, a grid search as a curve) on a log x-axis, and the
    point of highest evidence is marked with a star and its values in the legend.

    Args:
        trace: the prior-tuning trace described above.
        ax: axes to draw into; a new figure if None.

    Returns:
        The Figure drawn into.

    Example:
        >>> trace = {"prior_precision": [0.1, 1.0, 10.0], "log_marginal_likelihood": [-5, -2, -4]}
        >>> best = evidence_plot(trace).axes[0].get_lines()[1]
        >>> float(best.get_xdata()[0]), float(best.get_ydata()[0])
        (1.0, -2.0)
    """
    required = ("prior_precision", "log_marginal_likelihood")
    if not isinstance(trace, Mapping):
        raise TypeError(
            f"trace: expected a dict with keys {required} (optionally 'sigma_noise'); "
            f"got {type(trace).__name__}"
        )
    missing = [key for key in required if key not in trace]
    if missing:
        raise ValueError(
            f"trace: missing key(s) {missing}; expected a dict with keys {required} "
            f"(optionally 'sigma_noise'); got keys {sorted(trace)}"
        )
    log_ml = _trace_entry(trace, "log_marginal_likelihood")
    if log_ml.ndim != 1 or log_ml.size == 0:
        raise ValueError(
            f"trace['log_marginal_likelihood']: expected a non-empty array of shape [T]; got "
            f"shape {log_ml.shape}"
        )
    columns = {"prior_precision": _trace_entry(trace, "prior_precision")}
    if "sigma_noise" in trace and not np.all(np.isnan(np.asarray(trace["sigma_noise"], float))):
        columns["sigma_noise"] = _trace_entry(trace, "sigma_noise")  # all NaN: no noise
    for key, value in columns.items():
        if value.ndim not in (1, 2) or value.shape[0] != log_ml.size:
            raise ValueError(
                f"trace[{key!r}]: expected shape [T] or [T, k] with T = {log_ml.size} (the "
                f"length of trace['log_marginal_likelihood']); got shape {value.shape}"
            )
        if np.any(value <= 0):
            raise ValueError(f"trace[{key!r}]: expected values > 0; got min {value.min():.6g}")
    precision = columns["prior_precision"]
    x = precision if precision.ndim == 1 else precision.mean(axis=1)
    best = int(np.argmax(log_ml))
    best_label = f"best: prior precision {x[best]:.3g}"
    if "sigma_noise" in columns:
        sigma = columns["sigma_noise"]
        best_sigma = sigma[best] if sigma.ndim == 1 else sigma[best].mean()
        best_label += rf", $\sigma_{{noise}}$ {best_sigma:.3g}"
    best_label += f", log evidence {log_ml[best]:.4g}"
    fig, ax = _figure_and_axes(ax, (5.5, 4.0))
    ax.plot(x, log_ml, marker="o", markersize=3, color="C0", label="log evidence")
    ax.plot(
        [x[best]],
        [log_ml[best]],
        marker="*",
        markersize=14,
        linestyle="none",
        color="C3",
        label=best_label,
    )
    ax.set_xscale("log")
    xlabel = (
        "prior precision"
        if precision.ndim == 1
        else f"mean prior precision (k = {precision.shape[1]})"
    )
    ax.set(xlabel=xlabel, ylabel="log marginal likelihood", title="Evidence")
    ax.legend(loc="best")
    return fig


def eigenvalue_spectrum(eigenvalues: Any | Mapping[str, Any], ax: Axes | None = None) -> Figure:
    """Curvature eigenvalues sorted in descending order on a log y-scale.

    Non-positive eigenvalues (round-off, or an indefinite exact Hessian) cannot be drawn on a
    log scale: they are dropped and their number is noted in the legend. An array of any
    shape is flattened (e.g. the ``[n, m]`` outer product of two Kronecker factors'
    eigenvalues).

    Args:
        eigenvalues: one array, or a dict name -> array to compare several curvatures.
        ax: axes to draw into; a new figure if None.

    Returns:
        The Figure drawn into.

    Example:
        >>> line = eigenvalue_spectrum([3.0, -1.0, 2.0]).axes[0].get_lines()[0]
        >>> line.get_ydata().tolist(), line.get_label()
        ([3.0, 2.0], 'eigenvalues (2 values; 1 non-positive dropped)')
    """
    if isinstance(eigenvalues, Mapping):
        if not eigenvalues:
            raise ValueError("eigenvalues: got an empty dict; expected name -> array")
        named = {str(k): (v, f"eigenvalues[{k!r}]") for k, v in eigenvalues.items()}
    else:
        named = {"eigenvalues": (eigenvalues, "eigenvalues")}
    spectra = {}
    for name, (values, arg_name) in named.items():
        flat = _v.float_array(values, arg_name).ravel()
        positive = np.sort(flat[flat > 0])[::-1]
        if positive.size == 0:
            raise ValueError(
                f"{arg_name}: no positive values to draw on a log scale; got {flat.size} "
                "values, all <= 0"
            )
        dropped = flat.size - positive.size
        note = f"; {dropped} non-positive dropped" if dropped else ""
        spectra[f"{name} ({positive.size} values{note})"] = positive
    fig, ax = _figure_and_axes(ax, (5.5, 4.0))
    for label, positive in spectra.items():
        ax.plot(np.arange(1, positive.size + 1), positive, label=label)
    ax.set_yscale("log")
    ax.set(xlabel="index (descending order)", ylabel="eigenvalue", title="Curvature spectrum")
    ax.legend(loc="best")
    return fig


def shift_curves(table: Any, metric: str) -> Figure:
    """One metric against the shift severity, a panel per shift, a line per predictor.

    Args:
        table: a :class:`~laplace_tf.calibration.shift.ShiftTable`.
        metric: one of its metrics, e.g. ``"nll"``, ``"ece_15bins"``, ``"accuracy"``.

    Example:
        >>> from laplace_tf.calibration import shift
        >>> t = shift.ShiftTable([{"predictor": "MAP", "shift": "rotation", "severity": 0,
        ...                        "level": 0.0, "metric": "nll", "value": 0.1}],
        ...                      {"rotation": "angle (degrees)"}, "classification")
        >>> shift_curves(t, "nll").axes[0].get_xlabel()
        'angle (degrees)'
    """
    if metric not in table.metrics:
        raise ValueError(f"metric: expected one of {', '.join(table.metrics)}; got {metric!r}")
    shifts = [name for name in table.parameters if table.select(shift=name, metric=metric)]
    if not shifts:
        raise ValueError(f"metric: {metric!r} has no severity levels (it is measured once, e.g. "
                         "against the out-of-distribution set); give a metric of the shifts")
    fig = InlineFigure(figsize=(4.0 * len(shifts), 3.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(shifts), squeeze=False)[0])
    for ax, name in zip(axes, shifts, strict=True):
        for predictor in table.predictors:
            levels, values = table.curve(predictor, name, metric)
            ax.plot(levels, values, marker="o", markersize=3, label=predictor)
        ax.set(xlabel=table.parameters[name], ylabel=metric, title=f"{metric}: {name}")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best", fontsize="small")
    return fig
