"""Calibration plots render with Agg, honour ``ax=`` and draw the numbers the metrics give."""

import inspect
import io

import matplotlib
import matplotlib.image
import numpy as np
import pytest
from IPython.core.formatters import DisplayFormatter
from matplotlib.collections import PathCollection, PolyCollection
from matplotlib.container import BarContainer
from matplotlib.figure import Figure

from laplace_tf import calibration as cal
from laplace_tf.calibration import plots as plots_module
from laplace_tf.calibration.shift import ShiftTable

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _render(fig: Figure) -> None:
    """Really draw the figure (a pyplot-free Figure has a no-op base canvas until saved)."""
    fig.canvas.draw()
    fig.savefig(io.BytesIO(), format="png")


def _legend_texts(ax) -> list[str]:
    return [text.get_text() for text in ax.get_legend().get_texts()]


def _sampled_classification(n: int, n_classes: int, seed: int):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(n_classes, 0.5), size=n)
    labels = (rng.uniform(size=(n, 1)) > probs.cumsum(axis=1)).sum(axis=1)
    return probs, np.minimum(labels, n_classes - 1)


# Confidences 0.55, 0.56, 0.75, 0.95 (hits 1, 0, 1, 1): with 10 equal-width bins only the bins
# (0.5, 0.6], (0.7, 0.8], (0.9, 1.0] are non-empty, with accuracies 0.5, 1, 1.
THREE_BIN_PROBS = np.array([[0.55, 0.45], [0.56, 0.44], [0.25, 0.75], [0.95, 0.05]])
THREE_BIN_LABELS = np.array([0, 1, 1, 0])


def test_reliability_diagram_draws_one_bar_per_nonempty_bin():
    fig = cal.reliability_diagram(THREE_BIN_PROBS, THREE_BIN_LABELS, n_bins=10, label="MAP")
    _render(fig)
    assert isinstance(fig, Figure) and len(fig.axes) == 2  # diagram + confidence histogram
    ax = fig.axes[0]
    accuracy_bars, gap_bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert len(accuracy_bars.patches) == 3 and len(gap_bars.patches) == 3
    np.testing.assert_allclose([p.get_x() for p in accuracy_bars.patches], [0.5, 0.7, 0.9])
    np.testing.assert_allclose([p.get_height() for p in accuracy_bars.patches], [0.5, 1.0, 1.0])
    # gap bars run from the accuracy to the bin's mean confidence (0.555, 0.75, 0.95)
    np.testing.assert_allclose(
        [p.get_y() + p.get_height() for p in gap_bars.patches], [0.555, 0.75, 0.95]
    )
    ece = cal.ece(THREE_BIN_PROBS, THREE_BIN_LABELS, n_bins=10)
    assert f"MAP (ECE = {ece:.3f})" in _legend_texts(ax)
    assert len(ax.get_lines()) == 1  # the diagonal
    histogram = fig.axes[1]
    # density = fraction / width: 0.5 / 0.1, 0.25 / 0.1, 0.25 / 0.1
    heights = [p.get_height() for p in histogram.containers[0].patches]
    np.testing.assert_allclose(heights, [5.0, 2.5, 2.5])


def test_mass_binned_reliability_diagram_draws_a_bin_of_tied_confidences():
    # 5 of 10 examples tie at the lowest confidence: equal-mass bin [0.6, 0.6] has no width
    probs = np.array([[0.6, 0.4]] * 5 + [[0.9, 0.1]] * 5)
    labels = np.array([0, 0, 0, 1, 1, 0, 0, 0, 0, 1])
    assert cal.calibration_bins(probs, labels, n_bins=4, binning="mass").edges[1] == 0.6
    fig = cal.reliability_diagram(probs, labels, n_bins=4, binning="mass")
    accuracy_bars = [c for c in fig.axes[0].containers if isinstance(c, BarContainer)][0]
    assert accuracy_bars.patches[0].get_x() == pytest.approx(0.6)
    assert accuracy_bars.patches[0].get_width() > 0
    assert accuracy_bars.patches[0].get_height() == pytest.approx(0.6)
    histogram = fig.axes[1].containers[0].patches
    areas = [p.get_height() * p.get_width() for p in histogram]
    np.testing.assert_allclose(areas, [0.5, 0.5])  # each bar's area is its bin's mass


def test_reliability_diagram_honours_ax_and_hist_ax():
    fig, (ax, hist_ax) = plt.subplots(2, 1)
    probs, labels = _sampled_classification(2000, 3, seed=0)
    returned = cal.reliability_diagram(
        probs, labels, n_bins=12, binning="mass", ax=ax, hist_ax=hist_ax
    )
    _render(returned)
    assert returned is fig and len(fig.axes) == 2
    bins = cal.calibration_bins(probs, labels, n_bins=12, binning="mass")
    assert len(ax.containers[0].patches) == bins.nonempty.sum() == 12
    assert len(hist_ax.containers[0].patches) == 12
    assert any("ECE = " in text for text in _legend_texts(ax))


def test_reliability_diagram_into_given_ax_appends_histogram_or_not():
    fig = Figure()
    ax = fig.add_subplot()
    assert cal.reliability_diagram(THREE_BIN_PROBS, THREE_BIN_LABELS, ax=ax) is fig
    assert len(fig.axes) == 2  # histogram axis taken from the bottom of ax
    fig2 = Figure()
    ax2 = fig2.add_subplot()
    cal.reliability_diagram(THREE_BIN_PROBS, THREE_BIN_LABELS, ax=ax2, show_histogram=False)
    _render(fig2)
    assert fig2.axes == [ax2] and ax2.get_xlabel() == "confidence"


def test_reliability_diagram_into_subfigure_returns_root_figure():
    fig = Figure()
    ax = fig.subfigures(1, 2)[1].add_subplot()
    assert cal.reliability_diagram(THREE_BIN_PROBS, THREE_BIN_LABELS, ax=ax) is fig


def test_reliability_comparison_one_line_per_model_with_ece():
    probs, labels = _sampled_classification(3000, 4, seed=1)
    sharp = probs**3 / (probs**3).sum(axis=1, keepdims=True)
    fig = cal.reliability_comparison({"MAP": sharp, "Laplace": probs}, labels, n_bins=10)
    _render(fig)
    ax = fig.axes[0]
    texts = _legend_texts(ax)
    for name, p in (("MAP", sharp), ("Laplace", probs)):
        assert f"{name} (ECE = {cal.ece(p, labels, n_bins=10):.3f})" in texts
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert len(lines) == 3  # diagonal + two models
    bins = cal.calibration_bins(sharp, labels, n_bins=10)
    map_line = next(line for label, line in lines.items() if label.startswith("MAP"))
    np.testing.assert_allclose(map_line.get_xdata(), bins.confidence[bins.nonempty])
    np.testing.assert_allclose(map_line.get_ydata(), bins.accuracy[bins.nonempty])


def test_reliability_comparison_names_the_bad_model():
    with pytest.raises(ValueError, match=r"probs_by_name\['Laplace'\]: row 0 sums to"):
        cal.reliability_comparison(
            {"MAP": THREE_BIN_PROBS, "Laplace": THREE_BIN_PROBS * 0.5}, THREE_BIN_LABELS
        )
    with pytest.raises(TypeError, match="probs_by_name: expected a non-empty dict"):
        cal.reliability_comparison([THREE_BIN_PROBS], THREE_BIN_LABELS)


def test_regression_band_plot_two_bands_sorted_by_x():
    rng = np.random.default_rng(0)
    x = rng.uniform(-3, 3, size=40)  # unsorted on purpose
    mean, var = np.sin(x), 0.1 + 0.05 * x**2
    y = mean + rng.normal(size=40) * np.sqrt(var)
    fig, ax = plt.subplots()
    returned = cal.regression_band_plot(
        x[:, None], y, mean[:, None], var, x_train=x[:5], y_train=y[:5], ax=ax
    )
    _render(returned)
    assert returned is fig
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 2
    order = np.argsort(x)
    (mean_line,) = ax.get_lines()
    np.testing.assert_allclose(mean_line.get_xdata(), x[order])
    np.testing.assert_allclose(mean_line.get_ydata(), mean[order])
    # the outer band spans mean +- 2 sigma
    outer = bands[0].get_paths()[0].vertices
    np.testing.assert_allclose(outer[:, 1].max(), np.max(mean + 2 * np.sqrt(var)))
    np.testing.assert_allclose(outer[:, 1].min(), np.min(mean - 2 * np.sqrt(var)))
    points = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert sorted(len(c.get_offsets()) for c in points) == [5, 40]


def test_regression_band_plot_on_a_grid_without_targets():
    grid = np.linspace(0, 1, 50)
    fig = cal.regression_band_plot(grid, None, grid, np.full(50, 0.01))
    _render(fig)
    ax = fig.axes[0]
    assert sum(isinstance(c, PolyCollection) for c in ax.collections) == 2
    assert not any(isinstance(c, PathCollection) for c in ax.collections)


def test_regression_band_plot_bad_inputs():
    grid = np.linspace(0, 1, 5)
    with pytest.raises(ValueError, match="y_train: given alone"):
        cal.regression_band_plot(grid, None, grid, np.ones(5), y_train=grid)
    with pytest.raises(ValueError, match=r"mean: expected one output.*\(5, 2\)"):
        cal.regression_band_plot(grid, None, np.ones((5, 2)), np.ones((5, 2)))
    with pytest.raises(ValueError, match="x: has 4 entries; expected 5"):
        cal.regression_band_plot(grid[:4], None, grid, np.ones(5))


def test_regression_calibration_plot_shades_the_area():
    rng = np.random.default_rng(1)
    mean, var = rng.normal(size=500), np.full(500, 0.2)
    y = mean + rng.normal(size=500)  # true variance 1: overconfident
    fig = cal.regression_calibration_plot(mean, var, y, label="MAP")
    _render(fig)
    ax = fig.axes[0]
    area = cal.miscalibration_area(mean, var, y)
    assert f"MAP (miscalibration area = {area:.3f})" in _legend_texts(ax)
    assert sum(isinstance(c, PolyCollection) for c in ax.collections) == 1
    curve = next(line for line in ax.get_lines() if line.get_label().startswith("MAP"))
    expected, observed = cal.regression_calibration_curve(mean, var, y)
    np.testing.assert_allclose(curve.get_xdata(), np.r_[0.0, expected, 1.0])
    np.testing.assert_allclose(curve.get_ydata()[1:-1], observed)
    assert np.all(curve.get_ydata()[1:-1] < expected)  # below the diagonal


@pytest.mark.parametrize("score", ["confidence", "entropy"])
def test_ood_histograms(score):
    rng = np.random.default_rng(2)
    probs_in = rng.dirichlet(np.full(4, 0.3), size=300)
    probs_out = rng.dirichlet(np.full(4, 3.0), size=100)
    fig, ax = plt.subplots()
    assert cal.ood_histograms(probs_in, probs_out, score=score, n_bins=20, ax=ax) is fig
    _render(fig)
    containers = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [len(c.patches) for c in containers] == [20, 20]
    value = cal.ood_metrics(probs_in, probs_out)[f"auroc_{score}"]
    assert ax.get_title() == f"{score}: AUROC = {value:.3f}"
    texts = _legend_texts(ax)
    assert "in-distribution (N=300)" in texts and "out-of-distribution (N=100)" in texts


def test_ood_histograms_rejects_unknown_score():
    with pytest.raises(ValueError, match="score: expected 'confidence' or 'entropy'"):
        cal.ood_histograms(THREE_BIN_PROBS, THREE_BIN_PROBS, score="margin")


def test_ood_histograms_count_uniform_predictions():
    # a uniform row's entropy rounds one ulp above log 5 and its confidence may sit below 1/5:
    # both must still fall in the last (first) bin, each histogram's area staying 1
    uniform, peaked = np.full((2, 5), 0.2), np.array([[0.6, 0.1, 0.1, 0.1, 0.1]] * 2)
    out = np.concatenate([uniform, peaked])
    for score in ("entropy", "confidence"):
        fig = cal.ood_histograms(peaked, out, score=score, n_bins=10)
        bars = [c for c in fig.axes[0].containers if isinstance(c, BarContainer)][1]
        heights = np.array([p.get_height() for p in bars.patches])
        widths = np.array([p.get_width() for p in bars.patches])
        assert np.sum(heights * widths) == pytest.approx(1.0)
        uniform_bin = -1 if score == "entropy" else 0
        assert heights[uniform_bin] * widths[uniform_bin] == pytest.approx(0.5)


def test_evidence_plot_marks_the_best_point_on_log_axis():
    precision = np.logspace(-2, 2, 9)
    log_ml = -((np.log10(precision) - 0.5) ** 2)  # best at precision 10**0.5 on the grid
    sigma = np.linspace(0.1, 0.9, 9)
    fig = cal.evidence_plot(
        {"prior_precision": precision, "log_marginal_likelihood": log_ml, "sigma_noise": sigma}
    )
    _render(fig)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    trace_line, best = ax.get_lines()
    np.testing.assert_allclose(trace_line.get_xdata(), precision)
    best_index = int(np.argmax(log_ml))
    np.testing.assert_allclose(best.get_xdata(), [precision[best_index]])
    np.testing.assert_allclose(best.get_ydata(), [log_ml[best_index]])
    best_text = _legend_texts(ax)[1]
    assert f"prior precision {precision[best_index]:.3g}" in best_text
    assert rf"$\sigma_{{noise}}$ {sigma[best_index]:.3g}" in best_text  # 0.6 at 10**0.5


def test_evidence_plot_per_layer_precisions_use_their_mean():
    precision = np.array([[1.0, 3.0], [2.0, 6.0], [4.0, 12.0]])
    fig, ax = plt.subplots()
    cal.evidence_plot(
        {"prior_precision": precision, "log_marginal_likelihood": [-3.0, -1.0, -2.0]}, ax=ax
    )
    _render(fig)
    np.testing.assert_allclose(ax.get_lines()[0].get_xdata(), [2.0, 4.0, 8.0])
    np.testing.assert_allclose(ax.get_lines()[1].get_xdata(), [4.0])
    assert "k = 2" in ax.get_xlabel()


def test_evidence_plot_takes_a_classification_trace_of_marglik_training():
    """Its sigma_noise is all NaN (no noise): drawn as without one."""
    trace = {"prior_precision": np.array([1.0, 2.0]), "log_marginal_likelihood": [-3.0, -1.0],
             "sigma_noise": np.full(2, np.nan)}
    ax = cal.evidence_plot(trace).axes[0]
    assert "sigma" not in _legend_texts(ax)[1]


def test_evidence_plot_bad_traces():
    with pytest.raises(ValueError, match="trace: missing key.*log_marginal_likelihood"):
        cal.evidence_plot({"prior_precision": [1.0]})
    with pytest.raises(ValueError, match=r"trace\['prior_precision'\]: expected values > 0"):
        cal.evidence_plot({"prior_precision": [1.0, 0.0], "log_marginal_likelihood": [0.0, 1.0]})
    with pytest.raises(ValueError, match=r"trace\['prior_precision'\]: expected shape \[T\]"):
        cal.evidence_plot({"prior_precision": [1.0, 2.0], "log_marginal_likelihood": [0.0]})
    with pytest.raises(TypeError, match="trace: expected a dict"):
        cal.evidence_plot([1.0, 2.0])


def test_eigenvalue_spectrum_sorts_and_drops_non_positive():
    values = np.array([1e-3, 5.0, -1e-9, 1e2, 0.0, 0.5])
    fig = cal.eigenvalue_spectrum({"GGN": np.abs(values) + 1e-6, "Hessian": values})
    _render(fig)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"GGN (6 values)", "Hessian (4 values; 2 non-positive dropped)"}
    hessian = lines["Hessian (4 values; 2 non-positive dropped)"]
    np.testing.assert_allclose(hessian.get_ydata(), [1e2, 5.0, 0.5, 1e-3])
    np.testing.assert_allclose(hessian.get_xdata(), [1, 2, 3, 4])


def test_eigenvalue_spectrum_single_array_into_ax():
    fig, ax = plt.subplots()
    assert cal.eigenvalue_spectrum(np.array([[4.0, 2.0], [1.0, 3.0]]), ax=ax) is fig
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), [4.0, 3.0, 2.0, 1.0])
    with pytest.raises(ValueError, match="eigenvalues: no positive values"):
        cal.eigenvalue_spectrum(np.array([-1.0, 0.0]))


def test_new_figures_stay_out_of_pyplot():
    before = plt.get_fignums()
    cal.reliability_diagram(THREE_BIN_PROBS, THREE_BIN_LABELS)
    cal.eigenvalue_spectrum([1.0, 2.0])
    assert plt.get_fignums() == before


# Every plotting function drawing a new figure, with a small valid input.
NEW_FIGURES = {
    "reliability_diagram": lambda: cal.reliability_diagram(THREE_BIN_PROBS, THREE_BIN_LABELS),
    "reliability_comparison": lambda: cal.reliability_comparison(
        {"MAP": THREE_BIN_PROBS}, THREE_BIN_LABELS
    ),
    "regression_band_plot": lambda: cal.regression_band_plot(
        [0.0, 1.0], None, [0.0, 0.0], [1.0, 4.0]
    ),
    "regression_calibration_plot": lambda: cal.regression_calibration_plot(
        [0.0, 1.0], [1.0, 1.0], [0.0, 1.0]
    ),
    "ood_histograms": lambda: cal.ood_histograms(THREE_BIN_PROBS, THREE_BIN_PROBS[::-1]),
    "evidence_plot": lambda: cal.evidence_plot(
        {"prior_precision": [0.1, 1.0], "log_marginal_likelihood": [-2.0, -1.0]}
    ),
    "eigenvalue_spectrum": lambda: cal.eigenvalue_spectrum([3.0, 2.0]),
    "shift_curves": lambda: cal.shift_curves(ShiftTable(
        [{"predictor": "MAP", "shift": "noise", "severity": 0, "level": 0.0, "metric": "nll",
          "value": 0.5}], {"noise": "std"}, "classification"), "nll"),
}


def test_new_figures_cover_every_plotting_function():
    public = {
        name
        for name, obj in inspect.getmembers(plots_module, inspect.isfunction)
        if not name.startswith("_") and obj.__module__ == plots_module.__name__
    }
    assert set(NEW_FIGURES) == public


@pytest.mark.parametrize("name", sorted(NEW_FIGURES))
def test_new_figures_show_as_png_in_jupyter(name):
    """IPython's display formatter (as in a kernel without the inline backend) gives a PNG.

    For a plain Figure made without pyplot it gives only the text ``<Figure size ...>``.
    """
    fig = NEW_FIGURES[name]()
    data, _ = DisplayFormatter().format(fig)
    image = matplotlib.image.imread(io.BytesIO(data["image/png"]), format="png")
    height, width = image.shape[:2]
    size = fig.get_size_inches() * fig.dpi  # tight bounding box: close to the figure size
    np.testing.assert_allclose([width, height], size, rtol=0.15)
    assert image[..., :3].min() < 0.5 < image[..., :3].max()  # dark lines on white


def test_ax_must_be_one_axes():
    _, axes = plt.subplots(1, 2)
    with pytest.raises(TypeError, match="ax: expected one matplotlib Axes"):
        cal.reliability_diagram(THREE_BIN_PROBS, THREE_BIN_LABELS, ax=axes)


def test_hist_ax_needs_ax():
    _, hist_ax = plt.subplots()
    with pytest.raises(ValueError, match="hist_ax: given without ax"):
        cal.reliability_diagram(THREE_BIN_PROBS, THREE_BIN_LABELS, hist_ax=hist_ax)
