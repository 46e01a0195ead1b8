"""The calibration report: metrics equal the calibration functions applied directly to the
MAP and Laplace predictives; the HTML parses and holds its images and metric tables; JSON,
Markdown and PNG writers; bad input."""

import base64
import dataclasses
import html.parser
import importlib
import json
import math
import re

import keras
import numpy as np
import pytest
from IPython.core.formatters import DisplayFormatter
from matplotlib.collections import PathCollection, PolyCollection
from sklearn.datasets import load_digits

import laplace_tf as ltf
from laplace_tf import calibration as cal

# `calibration.report` is the function; the module of the same name is reached by its path
report_module = importlib.import_module("laplace_tf.calibration.report")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
F64 = "float64"
VOID_ELEMENTS = {"meta", "img", "br", "hr", "link", "input"}


# ---------------------------------------------------------------------- fitted models


def _train(model, x, y, loss, epochs: int, lr: float):
    model.compile(keras.optimizers.Adam(lr), loss)
    model.fit(x, y, epochs=epochs, batch_size=len(x), verbose=0)
    return model


@pytest.fixture(scope="module")
def digits():
    """A small digits classifier with a last-layer Kronecker Laplace, prior tuned by marglik."""
    data = load_digits()
    x, y = data.data / 16.0, data.target
    order = np.random.default_rng(0).permutation(len(y))[:600]
    train, test = order[:400], order[400:]
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((64,), dtype=F64),
        keras.layers.Dense(16, "tanh", dtype=F64),
        keras.layers.Dense(10, dtype=F64),
    ])
    _train(model, x[train], y[train],
           keras.losses.SparseCategoricalCrossentropy(from_logits=True), epochs=40, lr=0.02)
    la = ltf.Laplace(model, "classification", subset_of_weights="last_layer",
                     hessian_structure="kron", progress=False)
    la.fit((x[train], y[train]))
    la.optimize_prior_precision(n_steps=10, progress=False)
    # rotated digits are out of distribution
    x_ood = np.rot90(x[test].reshape(-1, 8, 8), axes=(1, 2)).reshape(-1, 64)
    return la, (x[test], y[test]), x_ood, (x[train][:100], y[train][:100])


@pytest.fixture(scope="module")
def digits_report(digits, tmp_path_factory):
    la, test, x_ood, val = digits
    rep = cal.report(la, test, ood=x_ood, val=val, title="Digits <MAP> & Laplace")
    folder = tmp_path_factory.mktemp("digits_report")
    paths = {
        "html": rep.to_html(folder / "nested" / "report.html"),
        "json": rep.to_json(folder / "metrics.json"),
        "markdown": rep.to_markdown(folder / "md" / "report.md"),
    }
    return rep, paths


@pytest.fixture(scope="module")
def sine():
    """1-D regression with a Kronecker Laplace over all weights (prior and noise tuned)."""
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.uniform(-2.5, -1.0, 60), rng.uniform(1.0, 2.5, 60)])[:, None]
    y = np.sin(2.0 * x) + 0.2 * rng.normal(size=x.shape)
    keras.utils.set_random_seed(1)
    model = keras.Sequential([
        keras.Input((1,), dtype=F64),
        keras.layers.Dense(12, "tanh", dtype=F64),
        keras.layers.Dense(1, dtype=F64),
    ])
    _train(model, x[:80], y[:80], "mse", epochs=80, lr=0.05)
    la = ltf.Laplace(model, "regression", subset_of_weights="all", hessian_structure="kron",
                     sigma_noise=0.5, progress=False)
    la.fit((x[:80], y[:80]))
    la.optimize_prior_precision(n_steps=10, progress=False)
    return la, (x[:80], y[:80]), (x[80:], y[80:])


# ---------------------------------------------------------------------- HTML parsing


class _HTMLChecker(html.parser.HTMLParser):
    """Records images, tables (as lists of rows of (text, classes) cells) and nesting errors."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.errors, self.images, self.tables = [], [], [], []
        self.doctype = self.title = None
        self._cell = None

    def handle_decl(self, decl):
        self.doctype = decl

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ["", attrs.get("class", "")]
        if tag not in VOID_ELEMENTS:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()
        if tag in ("td", "th"):
            self.tables[-1][-1].append((self._cell[0].strip(), self._cell[1]))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[0] += data
        elif self.stack and self.stack[-1] == "title":
            self.title = data


def _parse(text: str) -> _HTMLChecker:
    checker = _HTMLChecker()
    checker.feed(text)
    checker.close()
    assert checker.errors == [] and checker.stack == [], (checker.errors, checker.stack)
    return checker


def _png_bytes(src: str) -> bytes:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    return base64.b64decode(src[len(prefix):], validate=True)


def _comparison_tables(checker: _HTMLChecker) -> list[list[list[tuple[str, str]]]]:
    return [t for t in checker.tables if [c[0] for c in t[0]][:4] == ["metric", "better", "MAP",
                                                                        "Laplace"]]


# ---------------------------------------------------------------------- classification


def test_html_report_parses_and_holds_images_and_metric_tables(digits_report):
    rep, paths = digits_report
    text = paths["html"].read_text(encoding="utf-8")
    checker = _parse(text)
    assert checker.doctype.lower() == "doctype html"
    assert checker.title == "Digits <MAP> & Laplace"  # escaped in the file, text when parsed
    assert "<MAP>" not in text
    # one embedded PNG per figure, nothing linked from outside
    assert set(rep.figures) == {"reliability_comparison", "reliability_diagrams",
                                "ood_histograms", "evidence", "curvature_spectrum"}
    assert len(checker.images) == len(rep.figures)
    assert all(_png_bytes(src).startswith(PNG_SIGNATURE) for src in checker.images)
    # configuration, test, validation, OOD, ECE binning, versions
    assert len(checker.tables) == 6
    test_table, val_table, ood_table = _comparison_tables(checker)
    for table, section in ((test_table, rep.metrics["test"]), (val_table, rep.metrics["val"]),
                           (ood_table, rep.metrics["ood"])):
        assert [row[0][0] for row in table[1:]] == list(section["map"])
    cells = {row[0][0]: row[1][0] for t in checker.tables for row in t if len(row) == 2}
    assert cells["tensorflow"] == rep.metrics["versions"]["tensorflow"]
    assert cells["hessian_structure"] == "kron" and cells["n_data"] == "400"


def test_the_better_value_is_marked(digits_report):
    rep, paths = digits_report
    checker = _parse(paths["html"].read_text(encoding="utf-8"))
    n_marked = 0
    for table, section in zip(_comparison_tables(checker), ("test", "val", "ood"), strict=True):
        for row in table[1:]:
            metric = row[0][0]
            values = rep.metrics[section]
            map_value, la_value = values["map"][metric], values["laplace"][metric]
            goal = "max" if metric.startswith(("accuracy", "auroc")) else "min"
            better = None if map_value == la_value else (
                "MAP" if (map_value > la_value) == (goal == "max") else "Laplace")
            marked = [name for name, cell in zip(("MAP", "Laplace"), row[2:4], strict=True)
                      if cell[1] == "better"]
            assert marked == ([] if better is None else [better]), metric
            assert all(cell[0].endswith("\u2713") == (cell[1] == "better") for cell in row[2:4])
            n_marked += len(marked)
    assert n_marked > 0


def test_json_metrics_equal_calibration_functions_on_the_predictives(digits, digits_report):
    la, (x, y), x_ood, (x_val, y_val) = digits
    rep, paths = digits_report
    metrics = json.loads(paths["json"].read_text(encoding="utf-8"))
    p_map, p_la = la.map_predict(x), la(x)
    predictives = {"map": (p_map, la.map_predict(x_ood), la.map_predict(x_val)),
                   "laplace": (p_la, la(x_ood), la(x_val))}
    for model, (p_test, p_ood, p_val) in predictives.items():
        assert metrics["test"][model] == cal.classification_metrics(p_test, y, n_bins=15)
        assert metrics["val"][model] == cal.classification_metrics(p_val, y_val, n_bins=15)
        assert metrics["ood"][model] == cal.ood_metrics(p_test, p_ood)
        assert metrics["ece"][model] == {
            b: cal.ece_details(p_test, y, 15, b) for b in ("width", "mass")
        }
    assert metrics["test"]["map"] != metrics["test"]["laplace"]
    config = metrics["config"]
    assert config["prior_precision"] == float(la.prior_precision) != 1.0  # tuned
    assert (config["n_params"], config["n_data"], config["n_test"], config["n_ood"]) == (
        170, 400, 200, 200)
    assert (config["likelihood"], config["curvature"], config["link_approx"]) == (
        "classification", "ggn", "probit")
    assert config["sigma_noise"] is None and config["n_samples"] is None
    assert metrics["versions"]["numpy"] == np.__version__
    assert metrics["versions"]["tensorflow_probability"] == importlib.import_module(
        "tensorflow_probability").__version__
    assert list(metrics["versions"]) == ["laplace_tf", "tensorflow", "tensorflow_probability",
                                         "keras", "numpy", "scipy", "matplotlib", "python"]
    assert metrics == json.loads(json.dumps(rep.metrics))  # .metrics holds plain types


def test_markdown_links_png_files_next_to_it(digits_report):
    rep, paths = digits_report
    md = paths["markdown"]
    text = md.read_text(encoding="utf-8")
    for name in rep.figures:
        png = md.parent / "plots" / f"{name}.png"
        assert png.read_bytes().startswith(PNG_SIGNATURE)
        assert f"](plots/{name}.png)" in text
    assert text.startswith("# Digits &lt;MAP&gt; &amp; Laplace\n")  # as text, not HTML
    assert text.count("| metric | better | MAP | Laplace | meaning |") == 3
    nll_row = next(line for line in text.splitlines() if line.startswith("| nll |"))
    assert nll_row.count("**") == 2 and "\u2713" in nll_row


def test_repr_html_is_the_document_body(digits_report):
    rep, paths = digits_report
    fragment = rep._repr_html_()
    assert "<html" not in fragment and "<!DOCTYPE" not in fragment
    assert len(_parse(fragment).images) == len(rep.figures)
    document = paths["html"].read_text(encoding="utf-8")
    body = document[document.index("<h1>"):document.index("\n</div>\n</body>")]

    def without_images(text: str) -> str:  # a re-rendered log-scale plot may shift a pixel
        return re.sub(r'src="data:image/png;base64,[^"]*"', "", text)

    assert without_images(fragment).endswith(without_images(body) + "\n</div>")


def test_save_plots_writes_one_png_per_figure(digits_report, tmp_path):
    rep, _ = digits_report
    paths = rep.save_plots(tmp_path / "plots")
    assert list(paths) == list(rep.figures)
    assert all(p.parent == tmp_path / "plots" and p.read_bytes().startswith(PNG_SIGNATURE)
               for p in paths.values())


def test_figures_show_as_png_in_jupyter(digits_report):
    """IPython's display formatter renders each report figure, side-by-side ones included."""
    rep, _ = digits_report
    formatter = DisplayFormatter()
    assert all(formatter.format(fig)[0]["image/png"].startswith(PNG_SIGNATURE)
               for fig in rep.figures.values())
    assert "reliability_diagrams" in rep.figures  # made by the report itself, not a plot function


def test_figures_draw_the_report_numbers(digits, digits_report):
    la, (x, y), _, _ = digits
    rep, _ = digits_report
    labels = [line.get_label() for line in rep.figures["reliability_comparison"].axes[0].lines]
    for model, name in (("map", "MAP"), ("laplace", "Laplace")):
        assert f"{name} (ECE = {rep.metrics['test'][model]['ece']:.3f})" in labels
    # the spectrum of A ⊗ G from the factors' eigenvalues == eigenvalues of the dense kron
    block = la.curvature.blocks[0]
    dense = np.linalg.eigvalsh(np.kron(np.asarray(block.A), np.asarray(block.G)))
    drawn = rep.figures["curvature_spectrum"].axes[0].lines[0].get_ydata()
    expected = np.sort(dense[dense > 1e-9 * dense.max()])[::-1]
    np.testing.assert_allclose(drawn[: expected.size], expected, rtol=1e-8)
    evidence = rep.figures["evidence"].axes[0].lines[0]
    np.testing.assert_array_equal(evidence.get_ydata(), la.tuning_trace["log_marginal_likelihood"])


def test_monte_carlo_link_is_recorded_and_reproducible(digits):
    la, (x, y), _, _ = digits
    rep = cal.report(la, (x, y), link_approx="mc", n_samples=20, seed=3, n_bins=10)
    expected = cal.classification_metrics(la(x, link_approx="mc", n_samples=20, seed=3), y, 10)
    assert rep.metrics["test"]["laplace"] == expected
    config = rep.metrics["config"]
    assert (config["link_approx"], config["n_samples"], config["seed"], config["n_bins"]) == (
        "mc", 20, 3, 10)
    assert rep.metrics["ood"] is None and rep.metrics["val"] is None
    assert "ood_histograms" not in rep.figures


@dataclasses.dataclass
class _RunConfig:
    name: str = "binary"
    hidden: tuple = ()


def test_binary_report_full_spectrum_and_per_weight_prior(digits, monkeypatch):
    _, (x, digit), _, _ = digits
    y = (digit >= 5).astype(np.int64)  # high vs low digits, logistic regression
    keras.utils.set_random_seed(2)
    model = keras.Sequential([keras.Input((64,), dtype=F64), keras.layers.Dense(1, dtype=F64)])
    _train(model, x, y, keras.losses.BinaryCrossentropy(from_logits=True), epochs=30, lr=0.05)
    la = ltf.Laplace(model, "binary", subset_of_weights="last_layer", hessian_structure="full",
                     progress=False)
    la.fit((x, y))
    la.prior_precision = np.linspace(1.0, 2.0, la.n_params)  # one per weight
    rep = cal.report(la, (x, y), ood=x[:, ::-1], config=_RunConfig())
    p_map, p_la = la.map_predict(x), la(x)
    assert p_map.shape == (200, 1)  # the positive class only
    assert rep.metrics["test"] == {"map": cal.classification_metrics(p_map, y),
                                   "laplace": cal.classification_metrics(p_la, y)}
    assert rep.metrics["ood"]["laplace"] == cal.ood_metrics(p_la, la(x[:, ::-1]))
    config = rep.metrics["config"]
    assert config["prior_precision"] == {"per_weight": 65, "min": 1.0, "mean": 1.5, "max": 2.0}
    assert config["run"] == {"name": "binary", "hidden": []}  # plain JSON types
    assert "evidence" not in rep.figures  # no prior tuning ran
    block = np.asarray(la.curvature.blocks[0].matrix)  # full: one dense block
    eigenvalues = np.linalg.eigvalsh(block)
    drawn = rep.figures["curvature_spectrum"].axes[0].lines[0].get_ydata()
    np.testing.assert_allclose(drawn, np.sort(eigenvalues[eigenvalues > 0])[::-1], rtol=1e-12)
    monkeypatch.setattr(report_module, "SPECTRUM_DENSE_LIMIT", la.n_params - 1)
    assert "curvature_spectrum" not in cal.report(la, (x, y)).figures  # too big: skipped


# ---------------------------------------------------------------------- regression


def test_regression_report_metrics_band_plot_and_variance_ood(sine, tmp_path):
    la, train, (x, y) = sine
    x_far = np.linspace(6.0, 8.0, 30)[:, None]
    grid = np.linspace(-4.0, 4.0, 50)
    rep = cal.report(la, (x, y), ood=x_far, x_grid=grid, train=train,
                     config={"name": "sine", "model": {"hidden": [12]}})
    (mean, noise), (la_mean, la_var) = la.map_predict(x), la(x)
    assert rep.metrics["test"] == {
        "map": cal.regression_metrics(mean, noise, y),
        "laplace": cal.regression_metrics(la_mean, la_var, y),
    }
    # the MAP variance is the constant noise: it cannot tell far inputs apart (AUROC 1/2)
    assert rep.metrics["ood"]["map"]["auroc_variance"] == 0.5
    var_far = np.asarray(la(x_far)[1])[:, 0]
    assert rep.metrics["ood"]["laplace"] == {
        "auroc_variance": cal.auroc(-np.asarray(la_var)[:, 0], -var_far),
        "fpr_at_95_tpr_variance": cal.fpr_at_95_tpr(-np.asarray(la_var)[:, 0], -var_far),
    }
    assert rep.metrics["ece"] is None
    config = rep.metrics["config"]
    assert config["sigma_noise"] == float(la.sigma_noise) != 0.5  # tuned with the prior
    assert config["link_approx"] is None and config["n_bins"] is None
    assert config["run"] == {"name": "sine", "model": {"hidden": [12]}}
    assert set(rep.figures) == {"regression_calibration", "regression_band", "evidence",
                                "curvature_spectrum"}
    for ax in rep.figures["regression_band"].axes:
        bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
        assert len(bands) == 2  # +-1 and +-2 sigma, drawn over the grid
        outer = bands[0].get_paths()[0].vertices
        assert (outer[:, 0].min(), outer[:, 0].max()) == (-4.0, 4.0)
        points = [c for c in ax.collections if isinstance(c, PathCollection)]
        assert sorted(len(c.get_offsets()) for c in points) == [40, 80]  # test and train
    area = rep.metrics["test"]["laplace"]["miscalibration_area"]
    labels = [line.get_label() for line in rep.figures["regression_calibration"].axes[1].lines]
    assert f"Laplace (miscalibration area = {area:.3f})" in labels
    spectrum_labels = [
        line.get_label().split(" (")[0]
        for line in rep.figures["curvature_spectrum"].axes[0].lines
    ]
    assert spectrum_labels == [s.name for s in la.subset.slices]  # one Kronecker block a layer
    checker = _parse(rep.to_html(tmp_path / "sine.html").read_text(encoding="utf-8"))
    assert len(checker.images) == 4 and len(_comparison_tables(checker)) == 2
    cells = {row[0][0]: row[1][0] for t in checker.tables for row in t if len(row) == 2}
    assert cells["run.model.hidden"] == "[12]" and cells["run.name"] == "sine"


def test_regression_band_plot_defaults_to_the_test_inputs(sine):
    la, _, (x, y) = sine
    rep = cal.report(la, (x, y))
    outer = rep.figures["regression_band"].axes[1].collections[0].get_paths()[0].vertices
    assert (outer[:, 0].min(), outer[:, 0].max()) == (x.min(), x.max())


# ---------------------------------------------------------------------- rendering rules


def test_rendering_marks_by_goal_escapes_text_and_writes_nan_as_null(tmp_path):
    metrics = {
        "test": {
            "map": {"nll": 1.0, "coverage_95": 0.90, "accuracy": 0.5, "width_95": 1.0,
                    "ece": float("nan")},
            "laplace": {"nll": 1.0, "coverage_95": 0.97, "accuracy": 0.6, "width_95": 2.0,
                        "ece": 0.1},
        },
        "config": {"model | name": "<b>x</b>", "prior_precision": [1.0, 2.5]},
    }
    rep = cal.Report("a | <title>", metrics, {})
    checker = _parse(rep._repr_html_())
    table = _comparison_tables(checker)[0]
    marked = {row[0][0]: [c[1] == "better" for c in row[2:4]] for row in table[1:]}
    # tie; closer to 0.95 wins; higher accuracy wins; a width has no better; NaN is no winner
    assert marked == {"nll": [False, False], "coverage_95": [False, True],
                      "accuracy": [False, True], "width_95": [False, False],
                      "ece": [False, False]}
    assert table[-1][2][0] == "n/a"
    config_cells = {row[0][0]: row[1][0] for row in checker.tables[0][1:]}
    assert config_cells == {"model | name": "<b>x</b>", "prior_precision": "[1, 2.5]"}
    assert "<b>x</b>" not in rep._repr_html_()
    loaded = json.loads(rep.to_json(tmp_path / "m.json").read_text(encoding="utf-8"))
    assert loaded["test"]["map"]["ece"] is None and math.isnan(rep.metrics["test"]["map"]["ece"])
    md = rep.to_markdown(tmp_path / "r.md").read_text(encoding="utf-8")
    assert md.startswith("# a \\| &lt;title&gt;\n")  # raw HTML would run in a renderer
    assert "| model \\| name | &lt;b&gt;x&lt;/b&gt; |" in md and "<b>" not in md
    assert "## Plots" not in md and not (tmp_path / "plots").exists()  # no figures, no folder


# ---------------------------------------------------------------------- bad input


def _unfitted(digits):
    return ltf.Laplace(digits[0].model, "classification", progress=False)


BAD_INPUTS = [
    # (kwargs given the fitted digits fixture, exception, message)
    (lambda d: {"la": "model"}, TypeError, r"la: expected a fitted laplace_tf.Laplace; got str"),
    (lambda d: {"la": _unfitted(d)}, ValueError, r"la: the Laplace posterior is not fitted"),
    (lambda d: {"test": d[1][0]}, TypeError, r"test: expected a pair \(x, y\)"),
    (lambda d: {"test": (d[1][0], d[1][1][:-1])}, ValueError,
     r"test: 200 inputs but 199 targets; expected one target per input"),
    (lambda d: {"val": (d[3][0], d[3][1], d[3][1])}, TypeError, r"val: .* of length 3"),
    (lambda d: {"x_grid": np.linspace(0, 1, 5)}, ValueError,
     r"x_grid: only used by the regression band plot"),
    (lambda d: {"train": d[3]}, ValueError, r"train: only used by the regression band plot"),
    (lambda d: {"n_bins": 0}, ValueError, r"n_bins: expected a positive int; got 0"),
    (lambda d: {"title": 3}, TypeError, r"title: expected a string or None; got int"),
    (lambda d: {"config": ["a"]}, TypeError, r"config: expected a dict or a dataclass"),
    (lambda d: {"config": {"tags": {"a"}}}, TypeError,
     r"config: the value of 'tags' cannot be written to JSON"),
    (lambda d: {"pred_type": "laplace"}, ValueError, r"pred_type: expected one of"),
    (lambda d: {"ood": np.zeros((3, 5))}, ValueError, r"x: inputs of shape"),
]


@pytest.mark.parametrize("make, error, message", BAD_INPUTS)
def test_bad_input_is_named(digits, make, error, message):
    la, test, _, _ = digits
    kwargs = {"la": la, "test": test, **make(digits)}
    with pytest.raises(error, match=message):
        cal.report(**kwargs)


def test_bad_regression_grid_and_paths(sine, tmp_path):
    la, _, (x, y) = sine
    with pytest.raises(ValueError, match=r"x_grid: expected a non-empty grid of 1-D inputs"):
        cal.report(la, (x, y), x_grid=np.zeros((4, 2)))
    rep = cal.Report("t", {}, {})
    with pytest.raises(TypeError, match="path: expected a file system path"):
        rep.to_html(3)
    with pytest.raises(TypeError, match="folder: expected a file system path"):
        rep.save_plots(None)
