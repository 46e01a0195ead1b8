"""Rendering of a calibration report's metrics and figures as HTML, Markdown and plain values.

:class:`laplace_tf.calibration.report.Report` holds the data; this module turns its metrics
(the nested dict documented there) into tables with the better of MAP and Laplace marked, and
writes them as an HTML document or fragment (PNG plots embedded as base64 data URIs) or as
Markdown (plots linked). Only string building and file writing: nothing is evaluated here.

Example:
    ``Report.to_html(path)`` is ``write(path, html_document(title, metrics, figures))``.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

MODELS = {"map": "MAP", "laplace": "Laplace"}
"""The two predictives compared in every table: metrics key -> display name."""

# metric key -> (goal, description). The goal decides which value a table marks as better:
# "max", "min", a target value (closest wins), or None (neither is better, e.g. a width).
_METRICS: dict[str, tuple[str | float | None, str]] = {
    "accuracy": ("max", "fraction of correct top-1 predictions"),
    "nll": ("min", "mean negative log-likelihood (nats)"),
    "brier": ("min", "Brier score, summed over classes (range 0-2)"),
    "ece": ("min", "expected calibration error, top label (bins: see the ECE table)"),
    "mce": ("min", "maximum calibration error, same bins"),
    "classwise_ece": ("min", "class-wise ECE, same bins"),
    "rmse": ("min", "root mean squared error"),
    "mae": ("min", "mean absolute error"),
    "coverage_68": (0.68, "fraction of targets inside the central 68% interval"),
    "width_68": (None, "mean width of the central 68% interval"),
    "coverage_95": (0.95, "fraction of targets inside the central 95% interval"),
    "width_95": (None, "mean width of the central 95% interval"),
    "sharpness": (None, "mean predictive standard deviation"),
    "crps": ("min", "continuous ranked probability score"),
    "miscalibration_area": ("min", "area between the calibration curve and the diagonal"),
    "auroc_confidence": ("max", "AUROC in- vs out-of-distribution, score: confidence"),
    "fpr_at_95_tpr_confidence": ("min", "OOD inputs accepted at 95% TPR, score: confidence"),
    "auroc_entropy": ("max", "AUROC in- vs out-of-distribution, score: -entropy"),
    "fpr_at_95_tpr_entropy": ("min", "OOD inputs accepted at 95% TPR, score: -entropy"),
    "auroc_variance": ("max", "AUROC in- vs out-of-distribution, score: -predictive variance"),
    "fpr_at_95_tpr_variance": ("min", "OOD inputs accepted at 95% TPR, score: -variance"),
}

_CAPTIONS = {
    "reliability_comparison": "Reliability of MAP and Laplace on the test set",
    "reliability_diagrams": "Reliability diagrams with calibration gaps and confidence histograms",
    "ood_histograms": "Confidence and entropy on in- vs out-of-distribution inputs",
    "regression_band": "Predictive mean with 1 and 2 sigma bands",
    "regression_calibration": "Regression calibration curves (expected vs observed coverage)",
    "evidence": "Log marginal likelihood against prior precision (prior tuning)",
    "curvature_spectrum": "Eigenvalues of the fitted curvature",
}

_SPLIT_TITLES = {"test": "Test set", "val": "Validation set"}

_CSS = """
.ltf-report { font-family: system-ui, sans-serif; line-height: 1.4; max-width: 1200px; }
.ltf-report table { border-collapse: collapse; margin: 0.4em 0 1.4em; }
.ltf-report th, .ltf-report td { border: 1px solid #ccc; padding: 3px 9px; text-align: left; }
.ltf-report th { background: #f3f3f3; }
.ltf-report td.better { font-weight: bold; background: #e3f3e3; }
.ltf-report figure { display: inline-block; margin: 0.5em 1em 0.5em 0; vertical-align: top; }
.ltf-report img { max-width: 100%; }
.ltf-report .note { color: #555; font-size: 0.9em; }
"""


@dataclasses.dataclass
class _Table:
    """A table rendered to both HTML and Markdown; ``marked`` cells hold the better value."""

    title: str
    header: list[str]
    rows: list[list[str]]
    marked: set[tuple[int, int]] = dataclasses.field(default_factory=set)
    note: str = ""


# ---------------------------------------------------------------------- documents


def html_document(title: str, metrics: Mapping[str, Any], figures: Mapping[str, Figure]) -> str:
    """A self-contained HTML5 document: title, tables, embedded plots, library versions.

    Example:
        >>> html_document("a & b", {}, {}).splitlines()[5]
        '<title>a &amp; b</title>'
    """
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n"
        f'<body>\n<div class="ltf-report">\n{_html_body(title, metrics, figures)}\n</div>\n'
        "</body>\n</html>\n"
    )


def html_fragment(title: str, metrics: Mapping[str, Any], figures: Mapping[str, Figure]) -> str:
    """The body of :func:`html_document` with its style, for inline display in Jupyter.

    Example:
        >>> html_fragment("demo", {}, {}).startswith('<div class="ltf-report">')
        True
    """
    return (f'<div class="ltf-report">\n<style>{_CSS}</style>\n'
            f"{_html_body(title, metrics, figures)}\n</div>")


def markdown(title: str, metrics: Mapping[str, Any], images: Mapping[str, str]) -> str:
    """The tables as Markdown, with ``images`` (figure name -> relative link) under Plots.

    Example:
        >>> metrics = {"test": {"map": {"nll": 0.5}, "laplace": {"nll": 0.4}}}
        >>> print(markdown("demo", metrics, {}))
        # demo
        <BLANKLINE>
        ## Test set: MAP vs Laplace
        <BLANKLINE>
        Bold with a check mark: the better of MAP and Laplace.
        <BLANKLINE>
        | metric | better | MAP | Laplace | meaning |
        |---|---|---|---|---|
        | nll | lower | 0.5 | **0.4** ✓ | mean negative log-likelihood (nats) |
        <BLANKLINE>
        ## Library versions
        <BLANKLINE>
        | library | version |
        |---|---|
    """
    parts = [f"# {_md_text(title)}", *map(_md_table, _tables(metrics))]
    if images:
        parts.append("## Plots")
        parts += [f"![{_md_text(_caption(name))}]({link})" for name, link in images.items()]
    parts.append(_md_table(_versions_table(metrics)))
    return "\n\n".join(parts) + "\n"


def plain(value: Any, nan_to_none: bool = True) -> Any:
    """``value`` with numpy and tensor values as Python types (NaN -> None if asked).

    Example:
        >>> plain({"a": np.array([1.5, np.nan]), "b": (np.int64(2),), "c": Path("out")})
        {'a': [1.5, None], 'b': [2], 'c': 'out'}
    """
    if isinstance(value, Mapping):
        return {str(k): plain(v, nan_to_none) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v, nan_to_none) for v in value]
    if hasattr(value, "numpy"):  # an eager tensor
        value = value.numpy()
    if isinstance(value, np.ndarray | np.generic):
        return plain(value.tolist(), nan_to_none)
    if nan_to_none and isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def as_path(path: Any, name: str) -> Path:
    """``path`` as a :class:`~pathlib.Path`; a TypeError naming ``name`` for a non-path.

    Example:
        >>> as_path("out/report.html", "path").name
        'report.html'
    """
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"{name}: expected a file system path (str or Path); got "
                        f"{type(path).__name__}")
    return Path(path)


def write(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path``, creating the parent folders; return the path.

    Example:
        ``write(folder / "new" / "report.md", "# demo\\n")`` creates ``new/`` first.
    """
    path = as_path(path, "path")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------- tables


def _tables(metrics: Mapping[str, Any]) -> list[_Table]:
    """Configuration, metric tables (MAP vs Laplace) and the ECE binning table."""
    tables = []
    if metrics.get("config"):
        rows = [[key, _fmt(value)] for key, value in _flatten(metrics["config"]).items()]
        tables.append(_Table("Configuration", ["setting", "value"], rows))
    for split, title in _SPLIT_TITLES.items():
        if metrics.get(split):
            tables.append(_comparison_table(f"{title}: MAP vs Laplace", metrics[split]))
    if metrics.get("ood"):
        tables.append(_comparison_table("Out-of-distribution detection", metrics["ood"]))
    if metrics.get("ece"):
        rows = [
            [MODELS[model], d["binning"], str(d["n_bins"]), _fmt(d["value"])]
            for model, schemes in metrics["ece"].items()
            for d in schemes.values()
        ]
        tables.append(
            _Table("ECE binning (test set)", ["model", "binning", "bins", "ECE"], rows)
        )
    if metrics.get("shift"):
        tables += _shift_tables(metrics["shift"])
    return tables


def _shift_tables(table: Mapping[str, Any]) -> list[_Table]:
    """Per shift: a row per (predictor, metric), a column per level; then the OOD AUROCs."""
    rows = table["rows"]
    tables = []
    for name, parameter in table["parameters"].items():
        mine = [r for r in rows if r["shift"] == name]
        levels = sorted({r["level"] for r in mine})
        cells = {(r["predictor"], r["metric"], r["level"]): r["value"] for r in mine}
        keys = list(dict.fromkeys((r["predictor"], r["metric"]) for r in mine))
        tables.append(_Table(
            f"Shift: {name}", ["predictor", "metric", *(f"{level:g}" for level in levels)],
            [[p, m, *(_fmt(cells.get((p, m, level))) for level in levels)] for p, m in keys],
            note=f"columns: {parameter}; severity 0 is the clean test set"))
    ood = [r for r in rows if r["shift"] == "ood"]
    if ood:
        tables.append(_Table("Shift: out-of-distribution detection", ["predictor", "metric",
                             "value"], [[r["predictor"], r["metric"], _fmt(r["value"])]
                                        for r in ood]))
    return tables


def _versions_table(metrics: Mapping[str, Any]) -> _Table:
    rows = [[name, str(version)] for name, version in metrics.get("versions", {}).items()]
    return _Table("Library versions", ["library", "version"], rows)


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as one level with dotted keys (``run.laplace.prior_precision``)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(map(_fmt, value)) + "]"
    return str(value)


def _better(metric: str, values: dict[str, Any]) -> str | None:
    """The model with the better value of ``metric``; None for a tie or no preference."""
    goal = _METRICS.get(metric, (None, ""))[0]
    finite = all(isinstance(v, int | float) and math.isfinite(v) for v in values.values())
    if goal is None or not finite:
        return None
    if goal == "max":
        loss = {model: -v for model, v in values.items()}
    elif goal == "min":
        loss = dict(values)
    else:
        loss = {model: abs(v - goal) for model, v in values.items()}
    best = min(loss.values())
    winners = [model for model, v in loss.items() if v == best]
    return winners[0] if len(winners) == 1 else None


def _goal_text(goal: str | float | None) -> str:
    if goal is None:
        return ""
    if goal == "max":
        return "higher"
    if goal == "min":
        return "lower"
    return f"closer to {goal}"


def _comparison_table(title: str, by_model: dict[str, dict[str, Any]]) -> _Table:
    """Rows ``metric | better | MAP | Laplace | meaning`` with the better value marked."""
    models = list(by_model)
    table = _Table(title, ["metric", "better", *(MODELS[m] for m in models), "meaning"], [],
                   note="Bold with a check mark: the better of MAP and Laplace.")
    for i, metric in enumerate(by_model[models[0]]):
        goal, meaning = _METRICS.get(metric, (None, ""))
        values = {m: by_model[m][metric] for m in models}
        table.rows.append([metric, _goal_text(goal), *(_fmt(v) for v in values.values()),
                           meaning])
        winner = _better(metric, values)
        if winner is not None:
            table.marked.add((i, 2 + models.index(winner)))
    return table


# ---------------------------------------------------------------------- HTML


def _html_body(title: str, metrics: Mapping[str, Any], figures: Mapping[str, Figure]) -> str:
    parts = [f"<h1>{html.escape(title)}</h1>", *map(_html_table, _tables(metrics))]
    if figures:
        parts.append("<h2>Plots</h2>")
        parts += [_html_figure(name, fig) for name, fig in figures.items()]
    parts.append(_html_table(_versions_table(metrics)))
    return "\n".join(parts)


def _html_table(table: _Table) -> str:
    def cell(i: int, j: int, text: str) -> str:
        if (i, j) in table.marked:
            return f'<td class="better">{html.escape(text)} &#10003;</td>'
        return f"<td>{html.escape(text)}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
    rows = "\n".join(
        "<tr>" + "".join(cell(i, j, text) for j, text in enumerate(row)) + "</tr>"
        for i, row in enumerate(table.rows)
    )
    note = f'<p class="note">{html.escape(table.note)}</p>\n' if table.note else ""
    return (f"<h2>{html.escape(table.title)}</h2>\n{note}<table>\n<thead><tr>{head}</tr></thead>"
            f"\n<tbody>\n{rows}\n</tbody>\n</table>")


def _caption(name: str) -> str:
    return _CAPTIONS.get(name, name.replace("_", " "))


def _html_figure(name: str, fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    caption = html.escape(_caption(name))
    return (f'<figure id="{html.escape(name)}"><img src="data:image/png;base64,{data}" '
            f'alt="{caption}"><figcaption>{caption}</figcaption></figure>')


# ---------------------------------------------------------------------- Markdown


def _md_text(text: str) -> str:
    """Text safe inside a Markdown table cell or heading: HTML characters as entities (a
    Markdown renderer passes raw HTML through), ``|`` and ``\\`` escaped, one line."""
    text = html.escape(text, quote=False)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_table(table: _Table) -> str:
    def cell(i: int, j: int, text: str) -> str:
        return f"**{_md_text(text)}** ✓" if (i, j) in table.marked else _md_text(text)

    lines = [f"## {_md_text(table.title)}", ""]
    if table.note:
        lines += [_md_text(table.note), ""]
    lines.append("| " + " | ".join(map(_md_text, table.header)) + " |")
    lines.append("|" + "---|" * len(table.header))
    lines += [
        "| " + " | ".join(cell(i, j, text) for j, text in enumerate(row)) + " |"
        for i, row in enumerate(table.rows)
    ]
    return "\n".join(lines)
