"""The pipeline behind ``laplace-tf shift``: baselines and Laplace variants under dataset shift.

A shift config is a run config (:mod:`laplace_tf.config`: ``data``, ``model``, ``laplace``,
``predictive``, ``seed``, ``out``) plus a ``shift`` section::

    shift:
      ensemble: 5             # deep ensemble of M built-in MLPs trained like the MAP one
                              # (0: none; default 5, none for a model.path network)
      temperature: true       # MAP + temperature scaling fitted on the validation split
                              # (classification; regression baselines use sigma_noise)
      shifts: [rotation, noise, blur, shuffle]   # image shifts; covariate, extrapolation: tabular
      reliability_at: [0, 4]  # severities of the first shift shown as reliability diagrams
      variants:               # Laplace predictors: sections merged over the run config
        - {label: LA last-layer kron, laplace: {hessian_structure: kron}}

:func:`run_shift` trains the MAP network (and the ensemble), fits every variant, evaluates all
predictors with :func:`laplace_tf.calibration.shift.evaluate` and writes ``report.html``,
``shift.json`` (the tidy table) and ``plots/*.png`` into ``out``.

Example:
    :func:`summary` prints one metric of a table, a column per level:

    >>> t = _shift.ShiftTable([{"predictor": "MAP", "shift": "noise", "severity": s,
    ...                         "level": v, "metric": "nll", "value": 0.1 + v}
    ...                        for s, v in enumerate((0.0, 0.5))], {"noise": "std"}, "classification")
    >>> print(summary(t, "noise"))
    noise nll       0     0.5
    MAP         0.100   0.600
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from laplace_tf import config as _config
from laplace_tf import run as _run
from laplace_tf.calibration import Report, plots
from laplace_tf.calibration import shift as _shift
from laplace_tf.calibration.report import _versions
from laplace_tf.console import show_progress
from laplace_tf.likelihoods import get_likelihood
from laplace_tf.models import mlp, train_map
from laplace_tf.params import LogitModel

SHIFT_KEYS = ("ensemble", "temperature", "shifts", "reliability_at", "variants")
VARIANT_KEYS = ("laplace", "predictive", "seed")
"""The sections a ``shift.variants`` entry may set over the base config."""
DEFAULT_ENSEMBLE = 5
"""Members of the deep ensemble when ``shift.ensemble`` is not given (built-in MLP only)."""
CURVE_METRICS = ("nll", f"ece_{_shift.N_BINS}bins", "accuracy", "confidence")
"""Metrics drawn as severity curves, one figure each (classification)."""


@dataclasses.dataclass
class ShiftResult:
    """The table, report, output folder and wall time of a shift run."""

    table: _shift.ShiftTable
    report: Report
    out: Path
    seconds: float


def _shift_section(raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    section = raw.get("shift") or {}
    if not isinstance(section, Mapping):
        raise ValueError(f"{where}: section 'shift' must be a mapping; got {section!r}")
    unknown = sorted(set(section) - set(SHIFT_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key shift.{unknown[0]}; expected one of "
                         f"{', '.join(SHIFT_KEYS)}")
    section = {"ensemble": None, "temperature": True, "shifts": None, "reliability_at": [0],
               "variants": [{"label": "Laplace"}], **section}

    def refuse(key: str, expected: str) -> ValueError:
        return ValueError(f"{where}: shift.{key}: expected {expected}; got {section[key]!r}")

    ensemble = section["ensemble"]
    if ensemble is not None and (
            isinstance(ensemble, bool) or not isinstance(ensemble, int) or ensemble < 0):
        raise refuse("ensemble", "the number of networks, an integer >= 0 (0: no ensemble)")
    if not isinstance(section["temperature"], bool):
        raise refuse("temperature", "true or false")
    for key, kind, example in (("shifts", str, "[rotation, noise]"),
                               ("reliability_at", int, "[0, 2]"), ("variants", dict, None)):
        value = section[key]
        if key == "shifts" and value is None:
            continue
        if not isinstance(value, list) or not all(
                isinstance(v, kind) and not isinstance(v, bool) for v in value):
            raise refuse(key, f"a list, e.g. {example}" if example else
                         "a list of {label: ..., <sections>} mappings")
    labels = [str(v.get("label")) for v in section["variants"]]
    taken = {"MAP", "MAP + temperature",
             f"ensemble of {DEFAULT_ENSEMBLE if ensemble is None else ensemble}"}
    clash = [label for i, label in enumerate(labels) if label in taken or label in labels[:i]]
    if clash:
        raise refuse("variants", f"labels that name one predictor each (not a baseline's: "
                     f"{', '.join(sorted(taken))}); {clash[0]!r} is taken")
    return section


def _variant(base: Mapping[str, Any], variant: Mapping[str, Any], where: str
             ) -> tuple[str, _config.RunConfig]:
    if not isinstance(variant, Mapping) or "label" not in variant:
        raise ValueError(f"{where}: each shift.variants entry needs a label and sections, e.g. "
                         f"{{label: LA, laplace: {{hessian_structure: diag}}}}; got {variant!r}")
    shared = sorted(set(variant) - {"label", *VARIANT_KEYS})
    if shared:
        raise ValueError(f"{where}: shift.variants {variant['label']!r}: {shared[0]!r} is "
                         f"shared by every predictor (one MAP network on one data set); set it "
                         f"in the base config. A variant sets {', '.join(VARIANT_KEYS)}.")
    merged = copy.deepcopy(dict(base))
    for key, value in variant.items():
        if key != "label":
            merged[key] = {**merged.get(key, {}), **value} if isinstance(value, Mapping) else value
    return str(variant["label"]), _config.from_dict(merged, f"{where}: {variant['label']}")


def load_shift_config(path: str | Path) -> tuple[_config.RunConfig, dict[str, Any]]:
    """The base run config and the checked ``shift`` section of a YAML shift config."""
    path = Path(path)
    raw = _config.read_yaml(path) or {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path}: expected a mapping of sections; got {type(raw).__name__}")
    section = _shift_section(raw, str(path))
    base = {key: value for key, value in raw.items() if key != "shift"}
    section["variants"] = [_variant(base, v, str(path)) for v in section["variants"]]
    return _config.from_dict(base, str(path)), section


def _shifts(names: Any, x_train: np.ndarray, seed: int) -> list[_shift.Shift]:
    """The named shifts that fit the inputs: tabular for ``[N, D]``, image for images
    ``[N, H, W]`` and for flat square images ``[N, H*H]`` (digits).

    Without names (None): the tabular shifts of ``[N, D]`` inputs, the image shifts of
    ``[N, H, W]`` inputs; flat inputs get image shifts only when named.
    """
    tabular = {s.name: s for s in _shift.tabular_shifts(x_train)} if x_train.ndim == 2 else {}
    available = dict(tabular)
    try:
        _shift._images(x_train[:1])
        available.update({s.name: s for s in _shift.image_shifts(seed)})
    except ValueError:
        pass  # not images: tabular shifts only
    if names is None:
        names = list(tabular or available)
    names = list(names)
    for i, name in enumerate(names):
        if name not in available:
            raise ValueError(f"shift.shifts: {name!r} does not fit inputs of shape "
                             f"{x_train.shape[1:]}; expected some of {', '.join(available)}")
        if name in names[:i]:
            raise ValueError(f"shift.shifts: {name!r} is named twice; name each shift once.")
    return [available[name] for name in names]


def train_ensemble(config: _config.RunConfig, train: Any, likelihood: str, members: int,
                   progress: bool = False) -> list[Any]:
    """``members`` MLPs like the config's MAP network, seeded ``seed + 1 ... seed + members``."""
    settings, n_outputs = config.model, None
    models = []
    for k in range(1, members + 1):
        seed = config.seed + k
        if n_outputs is None:
            n_outputs = _run._n_outputs(likelihood, train, train)
        model = mlp(train.x.shape[1:], n_outputs, settings.hidden, settings.activation,
                    settings.dtype, seed)
        train_map(model, likelihood, train.x, train.y, epochs=settings.epochs,
                  batch_size=settings.batch_size, seed=seed, verbose=progress,
                  prior_precision=config.laplace.prior_precision,
                  sigma_noise=config.laplace.sigma_noise, learning_rate=settings.learning_rate)
        models.append(model)
    return models


def _ensemble_size(requested: int | None, config: _config.RunConfig) -> int:
    """Members of the deep ensemble: ``shift.ensemble``, by default :data:`DEFAULT_ENSEMBLE`
    for the built-in MLP and none for a network loaded from ``model.path``."""
    if config.model.path is None:
        return DEFAULT_ENSEMBLE if requested is None else requested
    if requested:
        raise ValueError(
            f"shift.ensemble: {requested} members to train like the MAP network, but the MAP "
            f"network is loaded from model.path ({config.model.path}) and how it was trained "
            "is not in the config. Set shift.ensemble: 0, or leave model.path out to train the "
            "built-in MLP and its ensemble.")
    return 0


def network_predictor(models: Sequence[Any], likelihood: str, sigma_noise: float = 1.0) -> Any:
    """The predictive of one network (MAP) or of a deep ensemble, from the networks' logits
    (a final softmax/sigmoid removed): softmax/sigmoid probabilities averaged over the
    members, or the Gaussian moment match ``(mean, variance)`` of the members' means with
    the noise (``sigma_noise**2``; heteroscedastic: the predicted variances' mean).

    Example:
        >>> predict = network_predictor([lambda x: 2 * x, lambda x: x], "regression", 0.5)
        >>> [a.ravel().tolist() for a in predict(np.array([[1.0]]))]
        [[1.5], [0.5]]
    """
    lik = get_likelihood(likelihood, sigma_noise)
    logit_models = [LogitModel(m, likelihood=lik) if isinstance(m, keras.Model) else m
                    for m in models]
    if not lik.gaussian_predictive:
        return _shift.ensemble_predictor(logit_models)

    def gaussian(x: Any) -> tuple[np.ndarray, np.ndarray]:
        logits = tf.stack([tf.cast(f(tf.convert_to_tensor(x)), tf.float64)
                           for f in logit_models])
        mean, variance = lik.sampled_predictive(logits, lik.noise_variance(tf.float64))
        return np.asarray(mean), np.asarray(variance)

    return gaussian


def _predict_laplace(la: Any, predictive: _config.PredictiveConfig, seed: int) -> Any:
    options = {"pred_type": predictive.pred_type, "link_approx": predictive.link_approx,
               "n_samples": predictive.n_samples, "seed": seed}
    return _shift.laplace_predictor(la, **options)


def shift_figures(table: _shift.ShiftTable, predictors: Mapping[str, Any], x: np.ndarray,
                  y: np.ndarray, shift: _shift.Shift, severities: list[int],
                  ood: np.ndarray | None, n_bins: int = _shift.N_BINS) -> dict[str, Any]:
    """Severity curves, reliability diagrams of ``shift`` at ``severities``, and confidence
    histograms in- vs out-of-distribution (classification)."""
    figures: dict[str, Any] = {f"shift_{m}": plots.shift_curves(table, m)
                               for m in CURVE_METRICS if m in table.metrics}
    fig = plots.InlineFigure(figsize=(4.5 * len(severities), 4.2), layout="constrained")
    for ax, severity in zip(fig.subplots(1, len(severities), squeeze=False)[0], severities,
                            strict=True):
        level = shift.levels[severity]
        shifted = shift.apply(x, level)
        plots.reliability_comparison({n: p(shifted) for n, p in predictors.items()}, y, n_bins,
                                     ax=ax)
        ax.set_title(f"{shift.name} {level:g} ({shift.parameter})")
    figures[f"shift_reliability_{shift.name}"] = fig
    if ood is not None:
        fig = plots.InlineFigure(figsize=(3.6 * len(predictors), 3.4), layout="constrained")
        for ax, (name, predict) in zip(fig.subplots(1, len(predictors), squeeze=False)[0],
                                       predictors.items(), strict=True):
            plots.ood_histograms(predict(x), predict(ood), "confidence", ax=ax)
            ax.set_title(f"{name}: {ax.get_title()}", fontsize="small")
        figures["shift_ood_confidence"] = fig
    return figures


def run_shift(config: _config.RunConfig, section: Mapping[str, Any],
              progress: bool | None = None, log: _run.Log = print) -> ShiftResult:
    """Train, fit, evaluate under shift and write report.html, shift.json and plots
    (``progress``: bars; None: on a terminal only)."""
    start = time.perf_counter()
    progress = show_progress(progress)
    run_data = _run.load_run_data(config)
    likelihood = run_data.likelihood
    task = "regression" if get_likelihood(likelihood).gaussian_predictive else "classification"
    assert run_data.train is not None
    members = _ensemble_size(section["ensemble"], config)
    shifts = _shifts(section["shifts"], run_data.train.x, config.seed)
    severities = list(section["reliability_at"])
    n_levels = len(shifts[0].levels) if shifts else 0
    if not shifts or not all(isinstance(k, int) and 0 <= k < n_levels for k in severities):
        raise ValueError(f"shift.reliability_at: expected severities of the first shift "
                         f"(integers 0 to {n_levels - 1}) and at least one shift; got "
                         f"{severities} and shifts {[s.name for s in shifts]}")
    model = _run.map_network(config, run_data, progress, log)
    networks = {"MAP": [model]}
    if members:
        log(f"training a deep ensemble of {members} networks")
        networks[f"ensemble of {members}"] = train_ensemble(config, run_data.train, likelihood,
                                                            members)
    predictors: dict[str, Any] = {}
    for name, nets in networks.items():
        predictors[name] = network_predictor(nets, likelihood, config.laplace.sigma_noise)
        if name == "MAP" and task == "classification" and section["temperature"]:
            if run_data.val is None:
                raise ValueError("shift.temperature: needs validation data (data.val or a "
                                 "built-in data set)")
            predictors["MAP + temperature"] = _shift.temperature_predictor(
                LogitModel(model, likelihood=likelihood), run_data.val.x, run_data.val.y)
    for label, variant in section["variants"]:
        la = _run.fit_laplace(model, variant, run_data, progress, log)
        predictors[label] = _predict_laplace(la, variant.predictive, variant.seed)
    test, ood = run_data.test, None if run_data.ood is None else run_data.ood.x
    log(f"evaluating {len(predictors)} predictors on {len(shifts)} shifts")
    table = _shift.evaluate(predictors, test.x, test.y, shifts, task=task,
                            ood=ood if task == "classification" else None)
    figures = {}
    if task == "classification":
        figures = shift_figures(table, predictors, test.x, test.y, shifts[0], severities, ood)
    else:
        figures = {f"shift_{m}": plots.shift_curves(table, m) for m in ("nll", "rmse")}
    seconds = time.perf_counter() - start
    metrics = {"config": {"run": _config.to_dict(config), "seconds": round(seconds, 1),
                          "predictors": list(predictors)},
               "shift": table.to_dict(), "versions": _versions()}
    rep = Report(f"laplace-tf shift: {config.name}", metrics, figures)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    rep.to_html(out / "report.html")
    (out / "shift.json").write_text(table.to_json() + "\n")
    rep.save_plots(out / "plots")
    return ShiftResult(table, rep, out, seconds)


DEMO_ENSEMBLE: dict[str, Any] = {"members": 5, "hidden": [64], "epochs": 60, "learning_rate": 0.003}
"""The demo's deep ensemble: small MLPs (not the demo's larger network), trained like it."""


def add_demo_shift(result: Any, log: _run.Log = print, fast: bool = False) -> _shift.ShiftTable:
    """The demo's digits run under image shifts: its MAP network, MAP + temperature scaling,
    a :data:`DEMO_ENSEMBLE` and its Laplace predictive; curves and tables added to its report."""
    config = result.config
    run_data = _run.load_run_data(config)
    assert run_data.train is not None and run_data.val is not None
    members = _config.override(config, {
        "model.hidden": DEMO_ENSEMBLE["hidden"], "model.learning_rate":
        DEMO_ENSEMBLE["learning_rate"], "model.epochs": max(1, DEMO_ENSEMBLE["epochs"] // (
            _config.FAST_EPOCH_DIVISOR if fast else 1))}, where="demo ensemble")
    log(f"training a deep ensemble of {DEMO_ENSEMBLE['members']} MLPs {DEMO_ENSEMBLE['hidden']}")
    ensemble = train_ensemble(members, run_data.train, run_data.likelihood,
                              DEMO_ENSEMBLE["members"])
    predictors = {
        "MAP": network_predictor([result.model], run_data.likelihood),
        "MAP + temperature": _shift.temperature_predictor(result.model, run_data.val.x,
                                                          run_data.val.y),
        f"ensemble of {len(ensemble)} (MLP {DEMO_ENSEMBLE['hidden']})":
            network_predictor(ensemble, run_data.likelihood),
        "Laplace": _predict_laplace(result.la, config.predictive, config.seed),
    }
    log("evaluating MAP, temperature scaling, the ensemble and Laplace under shift")
    test = run_data.test
    shifts = _shift.image_shifts(config.seed)
    table = _shift.evaluate(predictors, test.x, test.y, shifts,
                            ood=None if run_data.ood is None else run_data.ood.x)
    figures = shift_figures(table, predictors, test.x, test.y, shifts[0], [0, 2, 6], None)
    result.report.figures.update(figures)
    result.report.metrics["shift"] = table.to_dict()
    return table


def summary(table: _shift.ShiftTable, shift: str, metric: str = "nll") -> str:
    """A plain-text table of one metric: a row per predictor, a column per level."""
    levels = sorted({r["level"] for r in table.select(shift=shift)})
    rows = [[shift + " " + metric, *(f"{v:g}" for v in levels)]]
    for predictor in table.predictors:
        values = dict(zip(*table.curve(predictor, shift, metric), strict=True))
        rows.append([predictor, *(f"{values[v]:.3f}" for v in levels)])
    width = max(len(r[0]) for r in rows)
    return "\n".join(r[0].ljust(width) + "".join(c.rjust(8) for c in r[1:]) for r in rows)
