"""Calibration metrics and plots for classification, regression and OOD detection.

Depends on numpy, scipy and matplotlib only (not TensorFlow): pass numpy arrays, lists or
eager tensors. See :mod:`~laplace_tf.calibration.metrics` (classification and OOD),
:mod:`~laplace_tf.calibration.regression` (Gaussian regression) and
:mod:`~laplace_tf.calibration.plots` for the input conventions;
:mod:`~laplace_tf.calibration.shift` evaluates predictors on shifted test sets and
:mod:`~laplace_tf.calibration.temperature` fits temperature scaling.
"""

from laplace_tf.calibration.metrics import (
    CalibrationBins,
    accuracy,
    auroc,
    brier,
    calibration_bins,
    classification_metrics,
    classwise_ece,
    ece,
    ece_details,
    fpr_at_95_tpr,
    mce,
    nll,
    ood_metrics,
    ood_scores,
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
    shift_curves,
)
from laplace_tf.calibration.regression import (
    crps_gaussian,
    gaussian_nll,
    interval_coverage,
    interval_width,
    mae,
    miscalibration_area,
    regression_calibration_curve,
    regression_metrics,
    rmse,
    sharpness,
)
from laplace_tf.calibration.report import Report, report

__all__ = [
    "CalibrationBins",
    "InlineFigure",
    "Report",
    "accuracy",
    "auroc",
    "brier",
    "calibration_bins",
    "classification_metrics",
    "classwise_ece",
    "crps_gaussian",
    "ece",
    "ece_details",
    "eigenvalue_spectrum",
    "evidence_plot",
    "fpr_at_95_tpr",
    "gaussian_nll",
    "interval_coverage",
    "interval_width",
    "mae",
    "mce",
    "miscalibration_area",
    "nll",
    "ood_histograms",
    "ood_metrics",
    "ood_scores",
    "regression_band_plot",
    "regression_calibration_curve",
    "regression_calibration_plot",
    "regression_metrics",
    "reliability_comparison",
    "reliability_diagram",
    "report",
    "rmse",
    "sharpness",
    "shift_curves",
]
