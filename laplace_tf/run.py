"""The pipeline behind ``laplace-tf demo``, ``fit`` and ``report``.

One run (:func:`execute`): load the data, train the built-in MLP (or load a ``.keras`` model)
as the MAP network, fit the Laplace approximation, tune the prior precision, then evaluate MAP
and Laplace side by side with :func:`laplace_tf.calibration.report`. :func:`write_run` and
:func:`write_reports` write the artefacts::

    OUT/model.keras  posterior.npz  config.yaml  report.html  metrics.json  plots/*.png

:func:`run_config` is ``fit``; :func:`run_demo` runs the two demo configs
(:data:`laplace_tf.config.DEMO_CONFIGS`) into one folder (the regression files start with
``regression_``) with one combined ``report.html`` and ``metrics.json``, the digits run also
under dataset shift (:func:`laplace_tf.shift_run.add_demo_shift`); :func:`report_saved`
reports on new data from a saved posterior.

Example:
    ``laplace_tf.run.run_config(laplace_tf.config.load_config("configs/all_diag.yaml"))``;
    a model file that is not there is named before any work:

    >>> load_model("no/such.keras")
    Traceback (most recent call last):
    ...
    FileNotFoundError: model.path: no such file 'no/such.keras'
"""

from __future__ import annotations

import dataclasses
import html
import time
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import keras
import numpy as np
import yaml
from sklearn.model_selection import train_test_split

import laplace_tf
from laplace_tf import calibration, subnetwork
from laplace_tf import config as _config
from laplace_tf import data as _data
from laplace_tf.calibration import Report
from laplace_tf.console import show_progress
from laplace_tf.inputs import MODEL_ERRORS, InputCheck
from laplace_tf.likelihoods import get_likelihood
from laplace_tf.models import mlp, train_map
from laplace_tf.params import WeightSubset

Log = Callable[[str], None]

TABLE_METRICS = {
    "classification": (("accuracy", "accuracy"), ("nll", "NLL"), ("ece", "ECE"),
                       ("brier", "Brier")),
    "regression": (("nll", "NLL"), ("rmse", "RMSE"), ("coverage_95", "95% coverage")),
}
"""Metrics of the terminal table: likelihood kind -> (metrics key, label)."""
OOD_METRIC = ("auroc_entropy", "OOD AUROC (entropy)")
DEMO_PREFIXES = {"classification": "", "regression": "regression_"}
"""Demo task -> prefix of its files in the output folder."""


@dataclasses.dataclass(frozen=True)
class RunData:
    """The data of one run: train (None when reporting on new data), val, test, OOD inputs."""

    likelihood: str
    train: _data.Split | None
    val: _data.Split | None
    test: _data.Split
    ood: _data.Split | None


@dataclasses.dataclass
class RunResult:
    """What a run produced: the MAP model, the fitted Laplace, its report and timings."""

    name: str
    model: keras.Model
    la: laplace_tf.Laplace
    report: Report
    seconds: float
    config: _config.RunConfig | None = None
    out: Path | None = None

    def table(self) -> str:
        """The MAP-vs-Laplace table of this run (see :func:`summary_table`)."""
        return summary_table({self.name: self})


def _ood(name: str, config: _config.RunConfig) -> _data.Split:
    if name in _data.OOD_SETS:
        source = _data.OOD_OF[name]
        if config.data.dataset != source:
            raise ValueError(f"data.ood: {name!r} is made from the built-in {source!r} data "
                             f"set; use it with data.dataset: {source}, or give a file")
        return _data.load_ood(name, config.seed, config.model.dtype)
    if Path(name).suffix:
        return _data.load_arrays(name, config.data.target_column, "data.ood")
    return _data.load_ood(name)  # neither a file nor a built-in name: lists the names


def load_run_data(config: _config.RunConfig) -> RunData:
    """The run's data from a built-in data set or from files (see :mod:`laplace_tf.data`)."""
    likelihood = _config.likelihood_of(config)
    settings = config.data
    ood = None if settings.ood is None else _ood(settings.ood, config)
    if settings.dataset is not None:
        ds = _data.load(settings.dataset, config.seed, config.model.dtype)
        return RunData(likelihood, ds.train, ds.val, ds.test, ood)
    column = settings.target_column
    assert settings.train is not None  # validate(): exactly one of data.dataset and data.train
    train = _data.load_arrays(settings.train, column, "data.train")
    val = None if settings.val is None else _data.load_arrays(settings.val, column, "data.val")
    if settings.test is not None:
        test = _data.load_arrays(settings.test, column, "data.test")
    else:
        x_train, x_test, y_train, y_test = train_test_split(
            train.x, train.y, test_size=settings.test_fraction, random_state=config.seed)
        train, test = _data.Split(x_train, y_train), _data.Split(x_test, y_test)
    return RunData(likelihood, train, val, test, ood)


def load_model(path: str | Path, argument: str = "model.path") -> keras.Model:
    """A saved Keras model (``.keras`` or ``.h5``), with clear errors for missing files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{argument}: no such file {str(path)!r}")
    if path.suffix not in (".keras", ".h5"):
        raise ValueError(f"{argument}: {path} is not a Keras model file; expected a .keras file "
                         "written by model.save(...)")
    if path.suffix == ".keras" and not zipfile.is_zipfile(path):  # Keras says "File not found"
        raise ValueError(f"{argument}: {path} is not a .keras (zip) archive; expected a file "
                         "written by model.save(...)")
    try:
        return keras.models.load_model(path, compile=False)
    except Exception as err:  # keras raises many types for a corrupt or foreign file
        raise ValueError(f"{argument}: could not load {path} as a Keras model ({err})") from None


def map_network(config: _config.RunConfig, run_data: RunData, progress: bool, log: Log
                ) -> keras.Model:
    """The MAP network: the config's ``.keras`` model, or the built-in MLP trained now."""
    settings = config.model
    if settings.path is not None:
        log(f"loading the MAP network {settings.path}")
        model = load_model(settings.path)
        _check_subnetwork_size(config, model)
        return model
    train = run_data.train
    assert train is not None  # load_run_data always loads training data
    n_outputs = _n_outputs(run_data.likelihood, train, run_data.test)
    log(f"training an MLP {list(settings.hidden)} ({settings.activation}) for "
        f"{settings.epochs} epochs on {len(train)} examples")
    model = mlp(train.x.shape[1:], n_outputs, settings.hidden, settings.activation,
                settings.dtype, config.seed)
    _check_subnetwork_size(config, model)
    train_map(model, run_data.likelihood, train.x, train.y,
              epochs=settings.epochs, batch_size=settings.batch_size, seed=config.seed,
              verbose=progress, prior_precision=config.laplace.prior_precision,
              sigma_noise=config.laplace.sigma_noise, learning_rate=settings.learning_rate)
    return model


def _check_subnetwork_size(config: _config.RunConfig, model: keras.Model) -> None:
    """Refuse ``laplace.subnetwork_size`` above the model's weight count before training."""
    size, n_params = config.laplace.subnetwork_size, WeightSubset(model).n_params
    if config.laplace.subnetwork is not None and size > n_params:
        raise ValueError(f"laplace.subnetwork_size: expected at most the model's {n_params} "
                         f"weights; got {size}.")


def _n_outputs(likelihood: str, train: _data.Split, test: _data.Split) -> int:
    y = np.concatenate([s.y.reshape(len(s.y), -1) for s in (train, test)])
    return get_likelihood(likelihood).n_outputs(y)


def fit_laplace(model: keras.Model, config: _config.RunConfig, run_data: RunData,
                progress: bool, log: Log) -> laplace_tf.Laplace:
    """``ltf.Laplace`` from the config's settings, fitted and with its prior tuned."""
    lap = config.laplace
    train = run_data.train
    assert train is not None  # load_run_data always loads training data
    settings = dict(prior_precision=lap.prior_precision, sigma_noise=lap.sigma_noise,
                    temperature=lap.temperature, batch_size=config.model.batch_size,
                    progress=progress)
    indices = None
    if lap.subnetwork is not None:
        log(f"choosing {lap.subnetwork_size} weights by {lap.subnetwork}")
        if lap.subnetwork == "largest_magnitude":
            indices = subnetwork.largest_magnitude(model, lap.subnetwork_size)
        elif lap.subnetwork == "random":
            indices = subnetwork.random_weights(model, lap.subnetwork_size, seed=config.seed)
        else:
            diagonal = laplace_tf.Laplace(model, run_data.likelihood, "all", "diag", **settings)
            diagonal.fit((train.x, train.y))
            indices = subnetwork.largest_variance(diagonal, lap.subnetwork_size)
    log(f"fitting Laplace: {lap.subset_of_weights} / {lap.hessian_structure} / {lap.curvature}")
    la = laplace_tf.Laplace(
        model, run_data.likelihood, subset_of_weights=lap.subset_of_weights,
        hessian_structure=lap.hessian_structure, curvature=lap.curvature,
        rank=lap.rank, n_context=lap.n_context, subnetwork_indices=indices,
        seed=config.seed if lap.hessian_structure == "gp" else None, **settings)
    la.fit((train.x, train.y))
    if lap.optimize_prior != "none":
        val = run_data.val
        log(f"tuning the prior precision ({lap.optimize_prior}, {lap.prior_structure})")
        by_validation = lap.optimize_prior == "gridsearch"  # scores the run's predictive
        la.optimize_prior_precision(
            method=lap.optimize_prior, prior_structure=lap.prior_structure,
            **(dict(val_data=None if val is None else (val.x, val.y),
                    pred_type=config.predictive.pred_type,
                    link_approx=config.predictive.link_approx, seed=config.seed,
                    n_samples=config.predictive.n_samples) if by_validation else {}))
    return la


def _band_grid(likelihood: str, split: _data.Split) -> np.ndarray | None:
    """1-D regression: a grid one unit beyond the inputs of ``split``, for the band plot."""
    x, y = split.x, split.y
    if not get_likelihood(likelihood).gaussian_predictive or x.ndim != 2 or x.shape[1] != 1:
        return None
    if y.ndim == 2 and y.shape[1] != 1:
        return None
    return np.linspace(x.min() - 1.0, x.max() + 1.0, 300, dtype=x.dtype)[:, None]


def make_report(la: laplace_tf.Laplace, run_data: RunData, predictive: _config.PredictiveConfig,
                seed: int, title: str, run_config: Mapping | None = None) -> Report:
    """MAP vs Laplace on the run's test (and val, OOD) data."""
    train = run_data.train
    grid = _band_grid(run_data.likelihood, run_data.test if train is None else train)
    return calibration.report(
        la, test=(run_data.test.x, run_data.test.y),
        ood=None if run_data.ood is None else run_data.ood.x,
        val=None if run_data.val is None else (run_data.val.x, run_data.val.y),
        pred_type=predictive.pred_type, link_approx=predictive.link_approx,
        n_samples=predictive.n_samples, seed=seed, title=title, x_grid=grid,
        train=None if grid is None or train is None else (train.x, train.y), config=run_config)


def execute(config: _config.RunConfig, progress: bool | None = None, log: Log = print) -> RunResult:
    """One run without writing files: data -> MAP network -> Laplace -> prior -> report."""
    start = time.perf_counter()
    run_data = load_run_data(config)
    progress = show_progress(progress)
    model = map_network(config, run_data, progress, log)
    la = fit_laplace(model, config, run_data, progress, log)
    log("predicting and evaluating")
    rep = make_report(la, run_data, config.predictive, config.seed,
                      title=f"laplace-tf: {config.name}", run_config=_config.to_dict(config))
    return RunResult(config.name, model, la, rep, time.perf_counter() - start, config)


def write_run(result: RunResult, out: Path, prefix: str = "") -> dict[str, Path]:
    """Write the model, posterior, resolved config and plots of a run into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"model": out / f"{prefix}model.keras", "posterior": out / f"{prefix}posterior.npz"}
    result.model.save(files["model"])
    result.la.save(files["posterior"])
    if result.config is not None:
        files["config"] = out / f"{prefix}config.yaml"
        files["config"].write_text(yaml.safe_dump(_config.to_dict(result.config), sort_keys=False))
    files.update(_save_plots(result.report, out / "plots", prefix))
    result.out = out
    return files


def _save_plots(rep: Report, folder: Path, prefix: str) -> dict[str, Path]:
    renamed = dataclasses.replace(rep, figures={
        name if name.startswith(prefix) else prefix + name: figure
        for name, figure in rep.figures.items()})
    return {f"plot:{name}": path for name, path in renamed.save_plots(folder).items()}


def write_reports(reports: Mapping[str, Report], out: Path, title: str = "laplace-tf"
                  ) -> dict[str, Path]:
    """``report.html`` and ``metrics.json``: one report as is, or several combined.

    Several reports give one HTML page with a section per report and a JSON object
    ``{name: metrics}``.
    """
    out.mkdir(parents=True, exist_ok=True)
    files = {"report": out / "report.html", "metrics": out / "metrics.json"}
    if len(reports) == 1:
        (rep,) = reports.values()
        rep.to_html(files["report"])
        rep.to_json(files["metrics"])
        return files
    Report(title, {name: rep.metrics for name, rep in reports.items()}, {}).to_json(
        files["metrics"])
    body = "\n".join(f'<section id="{html.escape(name)}">\n{rep._repr_html_()}\n</section>'
                     for name, rep in reports.items())
    files["report"].write_text(
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n</head>\n<body>\n{body}\n</body>\n</html>\n")
    return files


def run_config(config: _config.RunConfig, progress: bool | None = None, log: Log = print) -> RunResult:
    """``laplace-tf fit``: :func:`execute` then write every artefact into ``config.out``."""
    result = execute(config, progress, log)
    out = Path(config.out)
    write_run(result, out)
    write_reports({config.name: result.report}, out)
    return result


@dataclasses.dataclass
class DemoResult:
    """The demo's runs (task -> result), output folder and wall time."""

    results: dict[str, RunResult]
    out: Path
    seconds: float

    def table(self) -> str:
        return summary_table(self.results)


def run_demo(out: Path, fast: bool = False, progress: bool | None = None, log: Log = print
             ) -> DemoResult:
    """``laplace-tf demo``: both demo configs, one folder, one combined report."""
    start = time.perf_counter()
    results = {}
    for task, prefix in DEMO_PREFIXES.items():
        log(f"== {task}")
        config = _config.override(_config.demo_config(task, fast), {"out": str(out)})
        results[task] = execute(config, progress, log)
        if task == "classification":
            from laplace_tf.shift_run import add_demo_shift

            add_demo_shift(results[task], log, fast)
        write_run(results[task], out, prefix)
    write_reports({task: r.report for task, r in results.items()}, out, "laplace-tf demo")
    return DemoResult(results, out, time.perf_counter() - start)


def report_saved(posterior: Path, model: Path, test: Path, *, ood: Path | None, out: Path,
                 predictive: _config.PredictiveConfig, target_column: int = -1,
                 progress: bool | None = None, log: Log = print) -> RunResult:
    """``laplace-tf report``: a saved posterior and model evaluated on new data."""
    start = time.perf_counter()
    if not posterior.is_file():
        raise FileNotFoundError(f"posterior: no such file {str(posterior)!r}")
    network = load_model(model, "--model")
    la = laplace_tf.load(posterior, network)
    la.progress = show_progress(progress)
    test_split = _data.load_arrays(test, target_column, "--test")
    ood_split = None if ood is None else _data.load_arrays(ood, target_column, "--ood")
    for argument, path, split in (("--test", test, test_split), ("--ood", ood, ood_split)):
        if split is not None:
            _check_inputs(network, split.x, argument, path)
    run_data = RunData(la.likelihood.name, None, None, test_split, ood_split)
    log(f"evaluating {posterior.name} on {len(test_split)} test examples")
    rep = make_report(la, run_data, predictive, seed=0,
                      title=f"laplace-tf report: {posterior.name} on {test.name}")
    _save_plots(rep, out / "plots", "")
    write_reports({posterior.stem: rep}, out)
    return RunResult(posterior.stem, network, la, rep, time.perf_counter() - start, out=out)


def _check_inputs(network, x, argument: str, path: Path | None) -> None:
    """A ValueError naming the file when its inputs do not fit ``network`` (tried on one)."""
    try:
        network(x[:1], training=False)
    except MODEL_ERRORS as err:
        try:
            InputCheck(network).explain(x, err)
        except ValueError as clear:
            raise ValueError(f"{argument}: {path}: {str(clear).removeprefix('x: ')}") from None
        raise


def _format(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def summary_table(results: Mapping[str, RunResult]) -> str:
    """A plain-text MAP-vs-Laplace table of the main test metrics of each run.

    Classification and binary: accuracy, NLL, ECE, Brier (and OOD AUROC of the entropy when
    there is OOD data); regression: NLL, RMSE and the coverage of the central 95% interval.
    """
    rows = [("run", "metric", "MAP", "Laplace")]
    for name, result in results.items():
        metrics = result.report.metrics
        gaussian = result.la.likelihood.gaussian_predictive
        kind = "regression" if gaussian else "classification"
        pairs = [(label, metrics["test"], key) for key, label in TABLE_METRICS[kind]]
        if metrics.get("ood") and not gaussian:
            pairs.append((OOD_METRIC[1], metrics["ood"], OOD_METRIC[0]))
        rows += [(name, label, _format(table["map"].get(key)), _format(table["laplace"].get(key)))
                 for label, table, key in pairs]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
