"""Calibration metrics for classifiers and for out-of-distribution (OOD) detection.

Conventions shared by every function here:

* ``probs`` are predicted class probabilities ``[N, C]``: entries in ``[0, 1]`` and rows
  summing to 1 within ``1e-4`` (absolute, which is relative to the sum 1). Entries less than
  ``1e-6`` outside ``[0, 1]`` are round-off and are clipped. Logits are rejected with a hint.
* Monte Carlo predictives ``[S, N, C]`` (``S`` samples, e.g. from ``pred_type="nn"``) are
  averaged over ``S`` first: the predictive is the mean of the sampled probabilities, so
  passing ``[S, N, C]`` gives exactly the same numbers as passing its mean over axis 0.
* Binary rule: ``[N]`` or ``[N, 1]`` (``[S, N, 1]`` for Monte Carlo) holds the probability of
  the positive class, with labels 0/1. It is converted to two classes ``[1 - p, p]`` (class 1 is
  the positive class) and every multi-class metric then applies unchanged; e.g. the binary
  top-label confidence is ``max(p, 1 - p)`` and the Brier score counts both classes.
* ``labels`` are integer class indices ``[N]`` (or ``[N, 1]``) in ``[0, C)``; bools and floats
  holding integers are accepted.
* Inputs may be numpy arrays, lists or eager TensorFlow tensors (``np.asarray`` converts them);
  this module does not import TensorFlow. Results are Python floats or small dicts.

Bad inputs raise ``ValueError`` or ``TypeError`` naming the argument, what was expected and
what came.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from scipy import special, stats

from laplace_tf.calibration import _validation as _v

NLL_EPS = 1e-12
"""Default floor of the probability of the true class in :func:`nll` (a term is <= 27.6)."""


@dataclasses.dataclass(frozen=True)
class CalibrationBins:
    """Per-bin statistics of a reliability diagram; the single binning behind ECE, MCE, plots.

    Examples fall into bin ``b`` when ``edges[b] < confidence <= edges[b + 1]``; a confidence
    at or below ``edges[0]`` goes into the first bin.

    Attributes:
        edges: ``[n_bins + 1]`` bin edges: ``0, 1/n_bins, ..., 1`` for ``"width"``; the
            confidence quantiles ``min, ..., max`` for ``"mass"``.
        confidence: ``[n_bins]`` mean confidence in each bin (NaN for an empty bin).
        accuracy: ``[n_bins]`` observed frequency of the event in each bin, i.e. the fraction
            correct for top-label binning (NaN for an empty bin).
        counts: ``[n_bins]`` number of examples in each bin.
        binning: ``"width"`` (equal-width bins) or ``"mass"`` (equal-mass bins).
        n_bins: number of bins.
    """

    edges: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    counts: np.ndarray
    binning: str
    n_bins: int

    @property
    def nonempty(self) -> np.ndarray:
        """``[n_bins]`` boolean mask of the bins holding at least one example."""
        return self.counts > 0

    @property
    def gaps(self) -> np.ndarray:
        """``[n_bins]`` signed gap ``accuracy - confidence`` (< 0: overconfident; NaN if empty)."""
        return self.accuracy - self.confidence

    @property
    def ece(self) -> float:
        """Expected calibration error ``sum_b (n_b / N) |accuracy_b - confidence_b|``."""
        keep = self.nonempty
        weights = self.counts[keep] / self.counts.sum()
        return float(np.sum(weights * np.abs(self.gaps[keep])))

    @property
    def mce(self) -> float:
        """Maximum calibration error ``max_b |accuracy_b - confidence_b|`` over non-empty bins."""
        return float(np.max(np.abs(self.gaps[self.nonempty])))


def _quantile_edges(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """The ``b / n_bins`` quantiles of ``confidence`` (``b = 0 .. n_bins``) by numpy's linear
    interpolation, at positions computed in integers: an edge that falls on an example is that
    example's value exactly (``np.quantile`` can return it 1 ulp low, which moves the example
    into the next bin)."""
    ordered = np.sort(confidence)
    position = np.arange(n_bins + 1) * (len(ordered) - 1)
    low, fraction = position // n_bins, (position % n_bins) / n_bins
    high = np.minimum(low + 1, len(ordered) - 1)
    return ordered[low] + fraction * (ordered[high] - ordered[low])


def _bin(confidence: np.ndarray, hits: np.ndarray, n_bins: int, binning: str) -> CalibrationBins:
    """Bins ``(confidence, hit)`` pairs; ``hits`` is 1.0 where the predicted event happened."""
    edges = np.linspace(0.0, 1.0, n_bins + 1) if binning == "width" else \
        _quantile_edges(confidence, n_bins)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    counts = np.bincount(index, minlength=n_bins)
    nonempty = counts > 0

    def _mean(values: np.ndarray) -> np.ndarray:
        sums = np.bincount(index, weights=values, minlength=n_bins)
        return np.divide(sums, counts, out=np.full(n_bins, np.nan), where=nonempty)

    return CalibrationBins(
        edges=edges,
        confidence=_mean(confidence),
        accuracy=_mean(hits),
        counts=counts,
        binning=binning,
        n_bins=n_bins,
    )


def _top_label_bins(p: np.ndarray, y: np.ndarray, n_bins: int, binning: str) -> CalibrationBins:
    hits = (p.argmax(axis=-1) == y).astype(np.float64)
    return _bin(p.max(axis=-1), hits, n_bins, binning)


def calibration_bins(
    probs: Any, labels: Any, n_bins: int = 15, binning: str = "width"
) -> CalibrationBins:
    """Top-label reliability bins: confidence ``max_c p_c``, hit ``argmax_c p_c == label``.

    Args:
        probs: ``[N, C]`` probabilities (or ``[S, N, C]``, or binary ``[N]``; module docstring).
        labels: ``[N]`` integer labels in ``[0, C)``.
        n_bins: number of bins.
        binning: ``"width"``: ``n_bins`` equal-width bins on ``[0, 1]``. ``"mass"``: equal-mass
            bins whose edges are the empirical quantiles of the confidences (numpy's linear
            interpolation, from the minimum to the maximum), so each bin holds about
            ``N / n_bins`` examples; equal confidences always share a bin, so with many ties a
            bin can hold more or be empty.

    Returns:
        The :class:`CalibrationBins` (``.ece`` and ``.mce`` give the summary errors).

    Example:
        >>> probs = np.array([[0.8, 0.2], [0.3, 0.7], [0.1, 0.9], [0.4, 0.6]])
        >>> bins = calibration_bins(probs, [0, 0, 1, 1], n_bins=2, binning="mass")
        >>> bins.counts.tolist(), bins.confidence.round(2).tolist(), bins.accuracy.tolist()
        ([2, 2], [0.65, 0.85], [0.5, 1.0])
    """
    p, y = _v.classification(probs, labels)
    return _top_label_bins(p, y, _v.n_bins(n_bins), _v.binning(binning))


def accuracy(probs: Any, labels: Any) -> float:
    """Fraction of examples whose most probable class (first one on ties) is the label.

    Example:
        >>> accuracy(np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]]), [0, 1, 1]) == 2 / 3
        True
    """
    p, y = _v.classification(probs, labels)
    return _accuracy(p, y)


def _accuracy(p: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(p.argmax(axis=-1) == y))


def nll(probs: Any, labels: Any, eps: float = NLL_EPS) -> float:
    """Mean negative log-likelihood ``-(1/N) sum_n log max(p_n[y_n], eps)`` in nats.

    The probability of the true class is floored at ``eps`` (default ``1e-12``) so that a
    probability that underflowed to 0 costs ``-log(eps)`` (about 27.6) instead of infinity.

    Example:
        >>> value = nll(np.array([[0.8, 0.2], [0.4, 0.6]]), [0, 0])
        >>> bool(np.isclose(value, -(np.log(0.8) + np.log(0.4)) / 2))
        True
    """
    p, y = _v.classification(probs, labels)
    if not 0 <= eps < 1:
        raise ValueError(f"eps: expected the floor of the true class's probability in [0, 1); "
                         f"got {eps!r}.")
    return _nll(p, y, eps)


def _nll(p: np.ndarray, y: np.ndarray, eps: float = NLL_EPS) -> float:
    true_class = p[np.arange(len(y)), y]
    return float(-np.mean(np.log(np.maximum(true_class, eps))))


def brier(probs: Any, labels: Any) -> float:
    """Brier score: mean over examples of the sum over classes of ``(p_c - 1{c = y})^2``.

    This is the multi-class (sum over classes) form, with range ``[0, 2]``: 0 for a confident
    correct prediction, 2 for a confident wrong one. By the binary rule a binary ``p`` scores
    ``2 (p - y)^2``, twice the one-column binary Brier score.

    Example:
        >>> value = brier(np.array([[0.8, 0.2], [0.4, 0.6]]), [0, 0])
        >>> bool(np.isclose(value, ((0.2**2 + 0.2**2) + (0.6**2 + 0.6**2)) / 2))
        True
    """
    p, y = _v.classification(probs, labels)
    return _brier(p, y)


def _brier(p: np.ndarray, y: np.ndarray) -> float:
    error = p.copy()
    error[np.arange(len(y)), y] -= 1.0
    return float(np.mean(np.sum(error**2, axis=-1)))


def ece(probs: Any, labels: Any, n_bins: int = 15, binning: str = "width") -> float:
    """Top-label expected calibration error ``sum_b (n_b / N) |acc_b - conf_b|``.

    The value depends on the bins: it refers to ``n_bins`` bins of the named ``binning``
    scheme (see :func:`calibration_bins`); report both with it (:func:`ece_details`).

    Example:
        All confidences 0.9, but only 60% correct: ECE = |0.6 - 0.9| = 0.3.

        >>> probs = np.tile([0.9, 0.1], (10, 1))
        >>> labels = np.array([0] * 6 + [1] * 4)
        >>> bool(np.isclose(ece(probs, labels), 0.3))
        True
    """
    return calibration_bins(probs, labels, n_bins, binning).ece


def mce(probs: Any, labels: Any, n_bins: int = 15, binning: str = "width") -> float:
    """Top-label maximum calibration error ``max_b |acc_b - conf_b|`` over non-empty bins.

    Uses the same bins as :func:`ece` (see :func:`calibration_bins`).

    Example:
        Bin (0, 0.5]: confidence 0.4, accuracy 1 (gap 0.6). Bin (0.5, 1]: confidence 0.9,
        accuracy 0.5 (gap 0.4). MCE = 0.6 while ECE = (0.6 + 0.4) / 2 = 0.5.

        >>> probs = np.array([[0.4, 0.3, 0.3]] * 2 + [[0.9, 0.05, 0.05]] * 2)
        >>> bool(np.isclose(mce(probs, [0, 0, 0, 1], n_bins=2), 0.6))
        True
    """
    return calibration_bins(probs, labels, n_bins, binning).mce


def ece_details(
    probs: Any, labels: Any, n_bins: int = 15, binning: str = "width"
) -> dict[str, float | int | str]:
    """ECE together with the binning it refers to: ``{"value", "n_bins", "binning"}``.

    Example:
        >>> probs = np.tile([0.9, 0.1], (10, 1))
        >>> details = ece_details(probs, [0] * 6 + [1] * 4, n_bins=10, binning="mass")
        >>> round(details["value"], 6), details["n_bins"], details["binning"]
        (0.3, 10, 'mass')
    """
    bins = calibration_bins(probs, labels, n_bins, binning)
    return {"value": bins.ece, "n_bins": bins.n_bins, "binning": bins.binning}


def classwise_ece(probs: Any, labels: Any, n_bins: int = 15, binning: str = "width") -> float:
    """Class-wise ECE (Kull et al., 2019): the mean over classes ``c`` of the ECE of ``p_c``.

    For each class ``c``, the probabilities ``p[:, c]`` are binned (same schemes as
    :func:`calibration_bins`) against the event ``label == c``; the per-class errors
    ``sum_b (n_b / N) |freq_b - conf_b|`` are then averaged over the ``C`` classes.

    Example:
        One bin per class, so each error is ``|mean p_c - frequency of c|``: class 0
        ``|0.45 - 1| = 0.55``, class 1 ``|0.45 - 0| = 0.45``, class 2 ``|0.1 - 0| = 0.1``.

        >>> probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1]])
        >>> bool(np.isclose(classwise_ece(probs, [0, 0], n_bins=1), (0.55 + 0.45 + 0.1) / 3))
        True
    """
    p, y = _v.classification(probs, labels)
    return _classwise_ece(p, y, _v.n_bins(n_bins), _v.binning(binning))


def _classwise_ece(p: np.ndarray, y: np.ndarray, n_bins: int, binning: str) -> float:
    per_class = [
        _bin(p[:, c], (y == c).astype(np.float64), n_bins, binning).ece for c in range(p.shape[1])
    ]
    return float(np.mean(per_class))


def classification_metrics(
    probs: Any, labels: Any, n_bins: int = 15, binning: str = "width"
) -> dict[str, float]:
    """All classification metrics at once (inputs checked once).

    Returns:
        ``{"accuracy", "nll", "brier", "ece", "mce", "classwise_ece"}``; the ECE-type values
        refer to ``n_bins`` bins of the ``binning`` scheme.

    Example:
        >>> metrics = classification_metrics(np.tile([0.9, 0.1], (10, 1)), [0] * 6 + [1] * 4)
        >>> round(metrics["accuracy"], 6), round(metrics["ece"], 6), round(metrics["mce"], 6)
        (0.6, 0.3, 0.3)
    """
    p, y = _v.classification(probs, labels)
    n_bins, binning = _v.n_bins(n_bins), _v.binning(binning)
    bins = _top_label_bins(p, y, n_bins, binning)
    return {
        "accuracy": _accuracy(p, y),
        "nll": _nll(p, y),
        "brier": _brier(p, y),
        "ece": bins.ece,
        "mce": bins.mce,
        "classwise_ece": _classwise_ece(p, y, n_bins, binning),
    }


def ood_scores(probs: Any) -> dict[str, np.ndarray]:
    """Per-example OOD scores: confidence ``max_c p_c`` and predictive entropy in nats.

    The entropy ``-sum_c p_c log p_c`` uses ``0 log 0 = 0`` and lies in ``[0, log C]``.
    In-distribution inputs are expected to score high confidence and low entropy.

    Returns:
        ``{"confidence": [N], "entropy": [N]}``.

    Example:
        >>> scores = ood_scores(np.array([[1.0, 0.0], [0.5, 0.5]]))
        >>> scores["confidence"].tolist(), bool(np.allclose(scores["entropy"], [0, np.log(2)]))
        ([1.0, 0.5], True)
    """
    p = _v.class_probs(probs)
    return _ood_scores(p)


def _ood_scores(p: np.ndarray) -> dict[str, np.ndarray]:
    return {"confidence": p.max(axis=-1), "entropy": special.entr(p).sum(axis=-1)}


def auroc(in_scores: Any, out_scores: Any) -> float:
    """Area under the ROC curve for telling in-distribution from OOD examples.

    Convention: in-distribution is the positive class and a higher score means "more
    in-distribution" (e.g. confidence; pass ``-entropy`` for entropy). The value is the
    Mann-Whitney probability ``P(s_in > s_out) + P(s_in = s_out) / 2``, computed from the ranks
    of the pooled scores with ties given their average rank: 1 separates perfectly, 0.5 is
    chance.

    Example:
        Pairs (in, out): 0.9 beats 0.3 and ties 0.9 (1/2); 0.5 beats 0.3, loses to 0.9:

        >>> auroc([0.9, 0.5], [0.3, 0.9]) == (1 + 0.5 + 1 + 0) / 4
        True
    """
    s_in, s_out = _v.scores(in_scores, "in_scores"), _v.scores(out_scores, "out_scores")
    return _auroc(s_in, s_out)


def _auroc(s_in: np.ndarray, s_out: np.ndarray) -> float:
    n_in, n_out = len(s_in), len(s_out)
    ranks = stats.rankdata(np.concatenate([s_in, s_out]))
    u_statistic = ranks[:n_in].sum() - n_in * (n_in + 1) / 2
    return float(u_statistic / (n_in * n_out))


def fpr_at_95_tpr(in_scores: Any, out_scores: Any, *, tpr: float = 0.95) -> float:
    """False-positive rate at 95% true-positive rate (lower is better).

    Same convention as :func:`auroc`: in-distribution is positive, higher scores mean "more
    in-distribution", and an example is accepted as in-distribution when ``score >= t``. The
    threshold ``t`` is the largest one accepting at least ``tpr`` of the in-distribution
    examples (the ``ceil(tpr * N_in)``-th largest in-score); the result is the fraction of OOD
    examples accepted at ``t``, i.e. the lowest FPR reachable with TPR >= ``tpr``.

    Args:
        in_scores: ``[N_in]`` scores of in-distribution examples.
        out_scores: ``[N_out]`` scores of OOD examples.
        tpr: target true-positive rate in (0, 1); 0.95 gives the usual FPR@95TPR.

    Example:
        In-scores 1..20: t is the 19th largest, 2. Out-scores 0, 2, 3: two of three are >= 2.

        >>> fpr_at_95_tpr(np.arange(1, 21), [0, 2, 3]) == 2 / 3
        True
    """
    s_in, s_out = _v.scores(in_scores, "in_scores"), _v.scores(out_scores, "out_scores")
    return _fpr_at_tpr(s_in, s_out, _v.level(tpr, "tpr"))


def _fpr_at_tpr(s_in: np.ndarray, s_out: np.ndarray, tpr: float = 0.95) -> float:
    k = max(1, int(np.ceil(round(tpr * len(s_in), 9))))
    threshold = np.sort(s_in)[::-1][k - 1]
    return float(np.mean(s_out >= threshold))


def ood_metrics(probs_in: Any, probs_out: Any) -> dict[str, float]:
    """AUROC and FPR@95TPR of confidence and of entropy for in- vs out-of-distribution inputs.

    One convention for both scores (see :func:`auroc`): in-distribution is the positive class.
    Confidence is used as is (in-distribution = higher confidence); entropy is negated, since
    OOD inputs are expected to have higher entropy. So every AUROC is "higher is better" and
    every FPR@95TPR is the fraction of OOD inputs still accepted when 95% of the
    in-distribution inputs are.

    Args:
        probs_in: ``[N_in, C]`` probabilities on in-distribution inputs (any layout of the
            module docstring, e.g. ``[S, N_in, C]``).
        probs_out: ``[N_out, C]`` probabilities on OOD inputs, same number of classes.

    Returns:
        ``{"auroc_confidence", "fpr_at_95_tpr_confidence", "auroc_entropy",
        "fpr_at_95_tpr_entropy"}``.

    Example:
        >>> metrics = ood_metrics([[0.9, 0.1], [0.2, 0.8]], [[0.5, 0.5], [0.6, 0.4]])
        >>> metrics["auroc_confidence"], metrics["auroc_entropy"]
        (1.0, 1.0)
    """
    p_in, p_out = _v.class_probs(probs_in, "probs_in"), _v.class_probs(probs_out, "probs_out")
    if p_in.shape[1] != p_out.shape[1]:
        raise ValueError(
            f"probs_out: has {p_out.shape[1]} classes; expected {p_in.shape[1]} like probs_in"
        )
    scores_in, scores_out = _ood_scores(p_in), _ood_scores(p_out)
    conf_in, conf_out = scores_in["confidence"], scores_out["confidence"]
    neg_ent_in, neg_ent_out = -scores_in["entropy"], -scores_out["entropy"]
    return {
        "auroc_confidence": _auroc(conf_in, conf_out),
        "fpr_at_95_tpr_confidence": _fpr_at_tpr(conf_in, conf_out),
        "auroc_entropy": _auroc(neg_ent_in, neg_ent_out),
        "fpr_at_95_tpr_entropy": _fpr_at_tpr(neg_ent_in, neg_ent_out),
    }
