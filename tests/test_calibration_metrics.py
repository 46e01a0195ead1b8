"""Calibration metrics against hand-computed values, closed forms and reference libraries."""

import ast
import pathlib

import numpy as np
import pytest
import tensorflow as tf
from scipy import integrate, stats
from sklearn.metrics import roc_auc_score, roc_curve

from laplace_tf import calibration as cal

# Four examples, three classes, two equal-width bins (0, 0.5] and (0.5, 1]:
#   row                  label  conf  hit  bin
#   [0.4, 0.35, 0.25]    0      0.4   1    0
#   [0.2, 0.45, 0.35]    2      0.45  0    0
#   [0.8, 0.1, 0.1]      0      0.8   1    1
#   [0.1, 0.7, 0.2]      0      0.7   0    1
# bin 0: conf 0.425, acc 0.5, gap 0.075; bin 1: conf 0.75, acc 0.5, gap 0.25.
# ECE = 0.5 * 0.075 + 0.5 * 0.25 = 0.1625;  MCE = 0.25;  accuracy = 0.5.
# Brier per row: 0.6^2+0.35^2+0.25^2 = 0.545; 0.2^2+0.45^2+0.65^2 = 0.665;
#                0.2^2+0.1^2+0.1^2 = 0.06;    0.9^2+0.7^2+0.2^2 = 1.34;  mean 2.61 / 4 = 0.6525.
# NLL = -(log 0.4 + log 0.35 + log 0.8 + log 0.1) / 4.
HAND_PROBS = np.array([[0.4, 0.35, 0.25], [0.2, 0.45, 0.35], [0.8, 0.1, 0.1], [0.1, 0.7, 0.2]])
HAND_LABELS = np.array([0, 2, 0, 0])


def _sampled_classification(n: int, n_classes: int, seed: int):
    """Probabilities from a Dirichlet and labels drawn from them: calibrated by construction."""
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(n_classes, 0.5), size=n)
    labels = (rng.uniform(size=(n, 1)) > probs.cumsum(axis=1)).sum(axis=1)
    return probs, np.minimum(labels, n_classes - 1)


def _gaussian_data(n: int, seed: int, shape_d: int | None = None):
    rng = np.random.default_rng(seed)
    shape = (n,) if shape_d is None else (n, shape_d)
    mean = rng.normal(size=shape)
    var = rng.uniform(0.1, 2.0, size=shape)
    y = mean + np.sqrt(var) * rng.normal(size=shape)
    return mean, var, y


# ---------------------------------------------------------------------------------------------
# Classification: hand cases


def test_hand_case_ece_mce_accuracy():
    bins = cal.calibration_bins(HAND_PROBS, HAND_LABELS, n_bins=2)
    np.testing.assert_allclose(bins.edges, [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(bins.counts, [2, 2])
    np.testing.assert_allclose(bins.confidence, [0.425, 0.75])
    np.testing.assert_allclose(bins.accuracy, [0.5, 0.5])
    assert cal.ece(HAND_PROBS, HAND_LABELS, n_bins=2) == pytest.approx(0.1625, abs=1e-12)
    assert cal.mce(HAND_PROBS, HAND_LABELS, n_bins=2) == pytest.approx(0.25, abs=1e-12)
    assert cal.accuracy(HAND_PROBS, HAND_LABELS) == 0.5


def test_ece_weights_bins_by_their_counts():
    # Ten equal-width bins; confidences 0.55 (hit), 0.56 (miss), 0.75 (hit), 0.95 (hit):
    #   (0.5, 0.6]: conf 0.555, acc 0.5, gap 0.055, weight 2/4
    #   (0.7, 0.8]: conf 0.75,  acc 1,   gap 0.25,  weight 1/4
    #   (0.9, 1.0]: conf 0.95,  acc 1,   gap 0.05,  weight 1/4
    # ECE = 0.0275 + 0.0625 + 0.0125 = 0.1025 (an unweighted mean would give 0.1183); MCE 0.25.
    probs = np.array([[0.55, 0.45], [0.56, 0.44], [0.25, 0.75], [0.95, 0.05]])
    labels = [0, 1, 1, 0]
    assert cal.ece(probs, labels, n_bins=10) == pytest.approx(0.1025, abs=1e-12)
    assert cal.mce(probs, labels, n_bins=10) == pytest.approx(0.25, abs=1e-12)
    np.testing.assert_array_equal(
        cal.calibration_bins(probs, labels, n_bins=10).counts, [0, 0, 0, 0, 0, 2, 0, 1, 0, 1]
    )


def test_bins_are_closed_on_the_right():
    # confidence exactly 0.5 belongs to (0, 0.5], not to (0.5, 1]
    bins = cal.calibration_bins([[0.5, 0.5], [0.9, 0.1]], [0, 0], n_bins=2)
    np.testing.assert_array_equal(bins.counts, [1, 1])


def test_hand_case_brier_and_nll():
    assert cal.brier(HAND_PROBS, HAND_LABELS) == pytest.approx(0.6525, abs=1e-12)
    expected_nll = -(np.log(0.4) + np.log(0.35) + np.log(0.8) + np.log(0.1)) / 4
    assert cal.nll(HAND_PROBS, HAND_LABELS) == pytest.approx(expected_nll, abs=1e-12)


def test_brier_extremes_span_zero_to_two():
    one_hot = np.eye(3)
    assert cal.brier(one_hot, [0, 1, 2]) == 0.0
    assert cal.brier(one_hot, [1, 2, 0]) == pytest.approx(2.0)


def test_nll_floors_a_zero_probability_at_eps():
    probs = np.array([[1.0, 0.0], [0.5, 0.5]])
    # -(log 1e-12 + log 0.5) / 2
    assert cal.nll(probs, [1, 0]) == pytest.approx(-(np.log(1e-12) + np.log(0.5)) / 2)
    assert cal.nll(probs, [1, 0], eps=1e-3) == pytest.approx(-(np.log(1e-3) + np.log(0.5)) / 2)


def test_known_miscalibration_confidence_09_accuracy_06():
    probs = np.tile([0.9, 0.05, 0.05], (100, 1))
    labels = np.r_[np.zeros(60, int), np.ones(40, int)]
    for n_bins in (1, 10, 15):
        for binning in ("width", "mass"):
            assert cal.ece(probs, labels, n_bins, binning) == pytest.approx(0.3, abs=1e-12)
            assert cal.mce(probs, labels, n_bins, binning) == pytest.approx(0.3, abs=1e-12)
    details = cal.ece_details(probs, labels, n_bins=10, binning="mass")
    assert details == {"value": pytest.approx(0.3, abs=1e-12), "n_bins": 10, "binning": "mass"}


def test_equal_mass_binning_hand_case():
    # Confidences 0.6, 0.7, 0.8, 0.9 with hits 0, 0, 1, 1 (labels 1, 1, 0, 0).
    # Equal mass, 2 bins: edge at the median 0.75 -> {0.6, 0.7}: conf 0.65, acc 0 (gap 0.65);
    #   {0.8, 0.9}: conf 0.85, acc 1 (gap 0.15).  ECE = (0.65 + 0.15) / 2 = 0.4, MCE = 0.65.
    # Equal width, 2 bins: all in (0.5, 1]: conf 0.75, acc 0.5 -> ECE = MCE = 0.25.
    probs = np.array([[0.6, 0.4], [0.7, 0.3], [0.8, 0.2], [0.9, 0.1]])
    labels = [1, 1, 0, 0]
    bins = cal.calibration_bins(probs, labels, n_bins=2, binning="mass")
    np.testing.assert_allclose(bins.edges, [0.6, 0.75, 0.9])
    np.testing.assert_array_equal(bins.counts, [2, 2])
    np.testing.assert_allclose(bins.confidence, [0.65, 0.85])
    np.testing.assert_allclose(bins.accuracy, [0.0, 1.0])
    assert bins.ece == pytest.approx(0.4) and bins.mce == pytest.approx(0.65)
    assert cal.ece(probs, labels, 2, "width") == pytest.approx(0.25)
    assert cal.mce(probs, labels, 2, "width") == pytest.approx(0.25)


def test_equal_mass_bins_hold_equal_counts_on_distinct_confidences():
    probs, labels = _sampled_classification(1000, 4, seed=3)
    bins = cal.calibration_bins(probs, labels, n_bins=10, binning="mass")
    np.testing.assert_array_equal(bins.counts, np.full(10, 100))


def test_equal_mass_edges_on_examples_keep_them_in_their_bin():
    """With N - 1 a multiple of n_bins every edge is an example's confidence, which belongs to
    the bin it closes (edges[b] < c <= edges[b + 1]); a quantile rounded 1 ulp low (here
    0.764 at position 5 of 7) would move it up and leave a bin empty."""
    confidence = np.array([0.535, 0.588, 0.607, 0.639, 0.691, 0.764, 0.837, 0.939])
    bins = cal.calibration_bins(np.stack([confidence, 1 - confidence], 1), np.zeros(8, int),
                                n_bins=7, binning="mass")
    np.testing.assert_array_equal(bins.edges, confidence)
    np.testing.assert_array_equal(bins.counts, [2, 1, 1, 1, 1, 1, 1])
    rng = np.random.default_rng(1)
    for _ in range(50):
        confidence = rng.uniform(0.5, 1.0, 76)
        bins = cal.calibration_bins(np.stack([confidence, 1 - confidence], 1), np.zeros(76, int),
                                    n_bins=15, binning="mass")
        np.testing.assert_array_equal(bins.counts, [6] + [5] * 14)


def test_classwise_ece_hand_case():
    # Two bins (0, 0.5], (0.5, 1]. probs [[0.7, 0.2, 0.1], [0.2, 0.7, 0.1]], labels [0, 1].
    # class 0: p 0.2 (event 0) gap 0.2, p 0.7 (event 1) gap 0.3 -> (0.2 + 0.3) / 2 = 0.25
    # class 1: p 0.2 (event 0) gap 0.2, p 0.7 (event 1) gap 0.3 -> 0.25
    # class 2: p 0.1, 0.1 (events 0, 0) one bin, gap 0.1 -> 0.1;   mean = 0.6 / 3 = 0.2.
    # One bin instead: class 0 |0.45 - 0.5| = 0.05, class 1 0.05, class 2 0.1 -> 0.2 / 3.
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1]])
    assert cal.classwise_ece(probs, [0, 1], n_bins=2) == pytest.approx(0.2)
    assert cal.classwise_ece(probs, [0, 1], n_bins=1) == pytest.approx(0.2 / 3)


def test_calibrated_by_construction_has_small_ece():
    probs, labels = _sampled_classification(100_000, 4, seed=0)
    assert cal.ece(probs, labels) < 0.01
    assert cal.ece(probs, labels, binning="mass") < 0.01
    assert cal.classwise_ece(probs, labels) < 0.01
    # while a sharpened copy (probabilities squared and renormalised) is clearly overconfident
    sharp = probs**2 / (probs**2).sum(axis=1, keepdims=True)
    assert cal.ece(sharp, labels) > 0.05


def test_classification_metrics_dict_matches_single_functions():
    probs, labels = _sampled_classification(500, 3, seed=1)
    result = cal.classification_metrics(probs, labels, n_bins=7, binning="mass")
    assert result == {
        "accuracy": cal.accuracy(probs, labels),
        "nll": cal.nll(probs, labels),
        "brier": cal.brier(probs, labels),
        "ece": cal.ece(probs, labels, 7, "mass"),
        "mce": cal.mce(probs, labels, 7, "mass"),
        "classwise_ece": cal.classwise_ece(probs, labels, 7, "mass"),
    }


# ---------------------------------------------------------------------------------------------
# Classification: input layouts


def test_monte_carlo_samples_equal_their_mean():
    rng = np.random.default_rng(2)
    samples = rng.dirichlet(np.ones(4), size=(6, 50))  # [S, N, C]
    labels = rng.integers(0, 4, size=50)
    mean = samples.mean(axis=0)
    assert cal.classification_metrics(samples, labels) == cal.classification_metrics(mean, labels)
    np.testing.assert_array_equal(
        cal.ood_scores(samples)["entropy"], cal.ood_scores(mean)["entropy"]
    )
    # averaging sampled probabilities is not the same as the metric of one sample
    assert cal.nll(samples[0], labels) != cal.nll(samples, labels)


def test_binary_rule_converts_to_two_classes():
    rng = np.random.default_rng(4)
    p = rng.uniform(size=200)
    labels = (rng.uniform(size=200) < p).astype(int)
    two_class = np.stack([1 - p, p], axis=1)
    expected = cal.classification_metrics(two_class, labels)
    assert cal.classification_metrics(p, labels) == expected
    assert cal.classification_metrics(p[:, None], labels[:, None]) == expected
    # Brier of the two-class form is twice the one-column binary Brier score
    assert cal.brier(p, labels) == pytest.approx(2 * np.mean((p - labels) ** 2))
    # top-label confidence is max(p, 1 - p): p = 0.2 predicts class 0 with confidence 0.8
    bins = cal.calibration_bins([0.2], [0], n_bins=10)
    assert np.nansum(bins.confidence) == pytest.approx(0.8)
    # Monte Carlo binary [S, N, 1] is averaged like any other
    samples = rng.uniform(size=(3, 200, 1))
    assert cal.nll(samples, labels) == pytest.approx(cal.nll(samples.mean(axis=0), labels))


def test_accepts_tensorflow_tensors_and_lists():
    tensor_probs = tf.constant(HAND_PROBS, dtype=tf.float32)
    tensor_labels = tf.constant(HAND_LABELS)
    assert cal.ece(tensor_probs, tensor_labels, n_bins=2) == pytest.approx(0.1625, abs=1e-6)
    assert cal.brier(HAND_PROBS.tolist(), HAND_LABELS.tolist()) == pytest.approx(0.6525)
    mean, var, y = _gaussian_data(50, seed=0)
    assert cal.rmse(tf.constant(mean), tf.constant(y)) == pytest.approx(cal.rmse(mean, y))


def test_float_labels_with_integer_values_are_accepted():
    assert cal.accuracy(HAND_PROBS, HAND_LABELS.astype(np.float32)) == 0.5


# ---------------------------------------------------------------------------------------------
# Out-of-distribution


def test_ood_scores_closed_form():
    scores = cal.ood_scores([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0]])
    np.testing.assert_allclose(scores["confidence"], [0.5, 1.0])
    # -(0.5 log 0.5 + 2 * 0.25 log 0.25) = 1.5 log 2; and 0 log 0 = 0
    np.testing.assert_allclose(scores["entropy"], [1.5 * np.log(2), 0.0], atol=1e-15)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    s_in = rng.integers(0, 6, size=40).astype(float)  # few distinct values: many ties
    s_out = rng.integers(0, 4, size=30).astype(float)
    y_true = np.r_[np.ones(40), np.zeros(30)]
    expected = roc_auc_score(y_true, np.r_[s_in, s_out])
    assert cal.auroc(s_in, s_out) == pytest.approx(expected, abs=1e-12)


def test_auroc_extremes_and_hand_case():
    assert cal.auroc([3, 4], [1, 2]) == 1.0
    assert cal.auroc([1, 2], [3, 4]) == 0.0
    assert cal.auroc([1, 1], [1, 1]) == 0.5
    # pairs: (0.9, 0.3) win, (0.9, 0.9) tie, (0.5, 0.3) win, (0.5, 0.9) loss -> 2.5 / 4
    assert cal.auroc([0.9, 0.5], [0.3, 0.9]) == 0.625


def test_fpr_at_95_tpr_hand_case():
    # in-scores 1..20: keeping 95% = 19 of 20 puts the threshold at 2; out-scores >= 2: 2, 3.
    assert cal.fpr_at_95_tpr(np.arange(1, 21), [0, 2, 3]) == pytest.approx(2 / 3)
    # 10 in-scores: ceil(9.5) = 10 must be kept -> threshold is the minimum, 1.
    assert cal.fpr_at_95_tpr(np.arange(1, 11), [0.5, 1.0, 5.0, 20.0]) == 0.75
    # tied in-scores at the threshold all count as accepted
    assert cal.fpr_at_95_tpr([5, 5, 5, 5], [4, 5, 6]) == pytest.approx(2 / 3)


def test_fpr_at_a_tiny_tpr_keeps_the_highest_in_score():
    # tpr * N_in rounds to 0: at least one in-distribution example (the highest) is accepted
    assert cal.fpr_at_95_tpr([1, 2, 3], [0, 1.5, 2.5], tpr=1e-10) == 0.0
    assert cal.fpr_at_95_tpr([1, 2, 3], [0, 1.5, 3.5], tpr=1e-10) == pytest.approx(1 / 3)


def test_nll_refuses_a_floor_outside_zero_one():
    for eps in (-1.0, 1.0):
        with pytest.raises(ValueError, match="eps: expected"):
            cal.nll([[1.0, 0.0]], [1], eps=eps)


@pytest.mark.parametrize("seed", [0, 1])
def test_fpr_at_95_tpr_matches_roc_curve(seed):
    rng = np.random.default_rng(seed)
    s_in = np.round(rng.normal(1.0, 1.0, size=300), 1)
    s_out = np.round(rng.normal(0.0, 1.0, size=200), 1)
    fpr, tpr, _ = roc_curve(np.r_[np.ones(300), np.zeros(200)], np.r_[s_in, s_out])
    expected = fpr[np.argmax(tpr >= 0.95)]
    assert cal.fpr_at_95_tpr(s_in, s_out) == pytest.approx(expected, abs=1e-12)


def test_ood_metrics_conventions():
    rng = np.random.default_rng(5)
    probs_in = rng.dirichlet(np.full(5, 0.2), size=300)  # peaked
    probs_out = rng.dirichlet(np.full(5, 3.0), size=200)  # flat
    result = cal.ood_metrics(probs_in, probs_out)
    s_in, s_out = cal.ood_scores(probs_in), cal.ood_scores(probs_out)
    y_in_positive = np.r_[np.ones(300), np.zeros(200)]
    assert result["auroc_confidence"] == pytest.approx(
        roc_auc_score(y_in_positive, np.r_[s_in["confidence"], s_out["confidence"]])
    )
    # entropy: OOD has higher entropy; in-distribution stays the positive class
    assert result["auroc_entropy"] == pytest.approx(
        roc_auc_score(y_in_positive, -np.r_[s_in["entropy"], s_out["entropy"]])
    )
    assert result["fpr_at_95_tpr_entropy"] == cal.fpr_at_95_tpr(-s_in["entropy"], -s_out["entropy"])
    assert result["auroc_confidence"] > 0.8 and result["fpr_at_95_tpr_confidence"] < 0.8


def test_ood_metrics_perfect_separation():
    result = cal.ood_metrics(np.tile([0.98, 0.01, 0.01], (10, 1)), np.full((10, 3), 1 / 3))
    assert result == {
        "auroc_confidence": 1.0,
        "fpr_at_95_tpr_confidence": 0.0,
        "auroc_entropy": 1.0,
        "fpr_at_95_tpr_entropy": 0.0,
    }


# ---------------------------------------------------------------------------------------------
# Regression


def test_regression_hand_values():
    mean, var, y = [0.0, 1.0], [1.0, 4.0], [3.0, -3.0]
    assert cal.rmse(mean, y) == pytest.approx(np.sqrt((9 + 16) / 2))
    assert cal.mae(mean, y) == pytest.approx(3.5)
    assert cal.sharpness(var) == pytest.approx(1.5)  # (1 + 2) / 2
    expected_nll = -np.mean(stats.norm.logpdf(y, loc=mean, scale=np.sqrt(var)))
    assert cal.gaussian_nll(mean, var, y) == pytest.approx(expected_nll)
    # z_0.95 = 1.96: mean width 2 * 1.96 * (1 + 2) / 2
    assert cal.interval_width(var, 0.95) == pytest.approx(2 * stats.norm.ppf(0.975) * 1.5)


def test_interval_coverage_hand_case():
    # standardised residuals 0.5, 1.5, 1.0, 3.0; z_0.68 = 0.994, z_0.95 = 1.96
    mean, var = np.zeros(4), np.array([1.0, 1.0, 4.0, 1.0])
    y = np.array([0.5, -1.5, 2.0, 3.0])
    assert cal.interval_coverage(mean, var, y, 0.68) == 0.25
    assert cal.interval_coverage(mean, var, y, 0.95) == 0.75


@pytest.mark.parametrize(("m", "s", "y"), [(0.0, 1.0, 0.0), (1.0, 0.5, -0.3), (-2.0, 3.0, 4.0)])
def test_crps_matches_numerical_integration(m, s, y):
    def squared_gap(x):
        return (stats.norm.cdf(x, m, s) - (x >= y)) ** 2

    below = integrate.quad(squared_gap, -np.inf, y)[0]
    above = integrate.quad(squared_gap, y, np.inf)[0]
    assert cal.crps_gaussian([m], [s**2], [y]) == pytest.approx(below + above, rel=1e-7)


def test_sampled_targets_are_calibrated():
    mean, var, y = _gaussian_data(20_000, seed=0)
    expected, observed = cal.regression_calibration_curve(mean, var, y)
    np.testing.assert_allclose(expected, np.linspace(0.01, 0.99, 99))
    assert np.max(np.abs(observed - expected)) < 0.02
    assert cal.miscalibration_area(mean, var, y) < 0.02
    assert cal.interval_coverage(mean, var, y, 0.95) == pytest.approx(0.95, abs=0.01)


def _analytic_area(scale: float) -> float:
    """Area when the predicted std is ``scale`` times the true one: coverage 2 Phi(scale z) - 1."""

    def gap(q):
        return abs(2 * stats.norm.cdf(scale * stats.norm.ppf((1 + q) / 2)) - 1 - q)

    return integrate.quad(gap, 0, 1, limit=200)[0]


@pytest.mark.parametrize("variance_factor", [0.1, 10.0])
def test_miscalibrated_variances_give_large_area(variance_factor):
    mean, var, y = _gaussian_data(20_000, seed=1)
    area = cal.miscalibration_area(mean, var * variance_factor, y)
    expected_area = _analytic_area(np.sqrt(1 / variance_factor))
    assert area > 0.25
    assert area == pytest.approx(expected_area, abs=0.01)
    _, observed = cal.regression_calibration_curve(mean, var * variance_factor, y, levels=[0.5])
    # overconfident: observed coverage below the level; underconfident: above
    assert (observed[0] < 0.5) == (variance_factor < 1)


def test_miscalibration_area_integration_rule():
    # targets at the means: observed coverage 1 at every level; trapezoid of (1 - q) is exact
    assert cal.miscalibration_area([0.0, 1.0], [1.0, 1.0], [0.0, 1.0]) == pytest.approx(0.5)
    # custom levels are sorted; the grid is {0} + levels + {1}
    assert cal.miscalibration_area([0.0], [1.0], [0.0], levels=[0.9, 0.5]) == pytest.approx(0.5)


def test_multi_output_regression_averages_all_entries():
    mean, var, y = _gaussian_data(300, seed=2, shape_d=2)
    columns = [cal.gaussian_nll(mean[:, d], var[:, d], y[:, d]) for d in range(2)]
    assert cal.gaussian_nll(mean, var, y) == pytest.approx(np.mean(columns))
    crps_columns = [cal.crps_gaussian(mean[:, d], var[:, d], y[:, d]) for d in range(2)]
    assert cal.crps_gaussian(mean, var, y) == pytest.approx(np.mean(crps_columns))


def test_trailing_singleton_axis_is_aligned_not_broadcast():
    mean, var, y = _gaussian_data(100, seed=3)
    reference = cal.regression_metrics(mean, var, y)
    assert cal.regression_metrics(mean[:, None], var, y) == reference
    assert cal.regression_metrics(mean, var[:, None], y[:, None]) == reference


def test_regression_metrics_dict_matches_single_functions():
    mean, var, y = _gaussian_data(400, seed=4)
    assert cal.regression_metrics(mean, var, y) == {
        "nll": cal.gaussian_nll(mean, var, y),
        "rmse": cal.rmse(mean, y),
        "mae": cal.mae(mean, y),
        "coverage_68": cal.interval_coverage(mean, var, y, 0.68),
        "width_68": pytest.approx(cal.interval_width(var, 0.68)),
        "coverage_95": cal.interval_coverage(mean, var, y, 0.95),
        "width_95": pytest.approx(cal.interval_width(var, 0.95)),
        "sharpness": cal.sharpness(var),
        "crps": cal.crps_gaussian(mean, var, y),
        "miscalibration_area": cal.miscalibration_area(mean, var, y),
    }


# ---------------------------------------------------------------------------------------------
# Bad input: the message names the argument, what was expected and what came

P3 = np.full((4, 3), 1 / 3)
GOOD = (np.zeros(3), np.ones(3), np.zeros(3))
BAD_INPUTS = {
    "row sum": (
        cal.ece,
        (np.array([[0.5, 0.5], [0.3, 0.3], [0.5, 0.5], [0.2, 0.5]]), [0] * 4),
        ValueError,
        ["probs: row 1 sums to 0.6", "summing to 1", "softmax"],
    ),
    "logits": (
        cal.nll,
        (np.array([[2.0, -1.5], [0.1, 0.9]]), [0, 1]),
        ValueError,
        ["probs: entry (0, 0) is 2", "[0, 1]", "logits"],
    ),
    "binary logits": (
        cal.brier,
        (np.array([0.2, 3.0]), [0, 1]),
        ValueError,
        ["probs: entry 1 is 3", "sigmoid"],
    ),
    "nan probs": (
        cal.accuracy,
        (np.array([[0.5, np.nan]] * 2), [0, 1]),
        ValueError,
        ["probs: contains NaN at index (0, 1)", "finite"],
    ),
    "probs 4-D": (
        cal.ece,
        (np.ones((1, 1, 2, 2)) / 2, [0]),
        ValueError,
        ["probs: expected", "got shape (1, 1, 2, 2)"],
    ),
    "probs None": (cal.ece, (None, [0]), TypeError, ["probs: expected a numeric array", "None"]),
    "probs strings": (
        cal.ece,
        ([["a", "b"]], [0]),
        TypeError,
        ["probs: expected a real numeric array"],
    ),
    "label float": (
        cal.ece,
        (P3, [0, 0.5, 1, 2]),
        ValueError,
        ["labels: value 0.5 at index 1 is not an integer"],
    ),
    "label range": (
        cal.mce,
        (P3, [0, 1, 3, 2]),
        ValueError,
        ["labels: value 3 at index 2 is out of range", "[0, 3)", "3 classes"],
    ),
    "label negative": (cal.brier, (P3, [0, -1, 1, 2]), ValueError, ["labels: value -1 at index 1"]),
    "label length": (cal.nll, (P3, [0, 1, 2]), ValueError, ["labels: got 3 labels; expected 4"]),
    "one-hot labels": (
        cal.accuracy,
        (P3, np.eye(3)[[0, 1, 2, 0]]),
        ValueError,
        ["labels: expected integer class indices of shape [N]", "one-hot"],
    ),
    "label nan": (
        cal.accuracy,
        (P3, [0, np.nan, 1, 2]),
        ValueError,
        ["labels: contains NaN at index 1"],
    ),
    "n_bins zero": (
        cal.ece,
        (P3, [0, 1, 2, 0], 0),
        ValueError,
        ["n_bins: expected a positive int; got 0"],
    ),
    "n_bins float": (
        cal.ece,
        (P3, [0, 1, 2, 0], 2.5),
        TypeError,
        ["n_bins: expected a positive int"],
    ),
    "binning": (
        cal.classwise_ece,
        (P3, [0, 1, 2, 0], 15, "quantile"),
        ValueError,
        ["binning: expected 'width' or 'mass'; got 'quantile'"],
    ),
    "var zero": (
        cal.gaussian_nll,
        (np.zeros(3), np.array([1.0, 0.0, 1.0]), np.zeros(3)),
        ValueError,
        ["var: entry 1 is 0", "> 0"],
    ),
    "var negative": (
        cal.crps_gaussian,
        (np.zeros(3), np.array([1.0, 1.0, -2.0]), np.zeros(3)),
        ValueError,
        ["var: entry 2 is -2", "log-variance"],
    ),
    "var inf": (
        cal.regression_metrics,
        (np.zeros(3), np.array([1.0, np.inf, 1.0]), np.zeros(3)),
        ValueError,
        ["var: contains Inf at index 1"],
    ),
    "y nan": (
        cal.rmse,
        (np.zeros(3), np.array([0.0, np.nan, 1.0])),
        ValueError,
        ["y: contains NaN at index 1"],
    ),
    "y length": (
        cal.mae,
        (np.zeros(3), np.zeros(4)),
        ValueError,
        ["y: shape (4,) does not match mean shape (3,)"],
    ),
    "y broadcast": (
        cal.rmse,
        (np.zeros((3, 2)), np.zeros((3, 1))),
        ValueError,
        ["y: shape (3, 1) does not match mean shape (3, 2)"],
    ),
    "mean 3-D": (
        cal.regression_metrics,
        (np.zeros((2, 2, 2)), np.ones((2, 2, 2)), np.zeros((2, 2, 2))),
        ValueError,
        ["mean: expected", "[N] or [N, D]", "(2, 2, 2)"],
    ),
    "level": (
        cal.interval_coverage,
        (*GOOD, 95),
        ValueError,
        ["level: expected a level in (0, 1)", "95"],
    ),
    "levels": (
        cal.regression_calibration_curve,
        (*GOOD, [0.5, 1.0]),
        ValueError,
        ["levels: value 1 at index 1", "(0, 1)"],
    ),
    "sharpness var": (cal.sharpness, ([1.0, -1.0],), ValueError, ["var: entry 1 is -1"]),
    "in_scores empty": (
        cal.auroc,
        ([], [1.0]),
        ValueError,
        ["in_scores: expected a non-empty score vector"],
    ),
    "out_scores 2-D": (
        cal.fpr_at_95_tpr,
        ([1.0], np.ones((2, 2))),
        ValueError,
        ["out_scores: expected", "(2, 2)"],
    ),
    "probs_out classes": (
        cal.ood_metrics,
        (P3, np.full((2, 2), 0.5)),
        ValueError,
        ["probs_out: has 2 classes; expected 3 like probs_in"],
    ),
    "probs_in sum": (
        cal.ood_metrics,
        (np.full((2, 2), 0.7), P3),
        ValueError,
        ["probs_in: row 0 sums to 1.4"],
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_message_names_argument(case):
    function, args, error, fragments = case
    with pytest.raises(error) as info:
        function(*args)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_fpr_target_rate_is_checked():
    with pytest.raises(ValueError, match="tpr: expected a level in"):
        cal.fpr_at_95_tpr([1.0], [0.0], tpr=1.0)


def test_tolerances_accept_round_off():
    # float32 softmax rows off by 1e-6 and an entry 1e-8 above 1 are probabilities
    probs = np.array([[0.5, 0.500001], [1.0 + 1e-8, 0.0]])
    assert cal.accuracy(probs, [1, 0]) == 1.0


# ---------------------------------------------------------------------------------------------
# Docstring examples and the dependency rule


def test_calibration_modules_do_not_import_tensorflow():
    package = pathlib.Path(cal.__file__).parent
    for name in ("__init__.py", "_validation.py", "metrics.py", "regression.py", "plots.py"):
        tree = ast.parse((package / name).read_text())
        imported = [
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        ] + [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
        assert not [
            m for m in imported if m.split(".")[0] in ("tensorflow", "tensorflow_probability")
        ], name
