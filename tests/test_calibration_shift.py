"""Shifted test sets, the shift table, temperature scaling and the baseline predictors."""

import json

import numpy as np
import pytest
from scipy import special

from laplace_tf.calibration import metrics, shift, temperature


def test_temperature_is_the_grid_minimum_of_the_nll():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(200, 4)) * 4.0
    cdf = np.cumsum(special.softmax(logits / 3.0, axis=-1), axis=-1)
    labels = (rng.random((200, 1)) < cdf).argmax(axis=-1)  # drawn from softmax(logits / 3)
    fitted = temperature.fit_temperature(logits, labels)
    grid = np.exp(np.linspace(np.log(0.3), np.log(30.0), 4001))
    log_p = special.log_softmax(logits[None] / grid[:, None, None], axis=-1)
    nlls = -log_p[:, np.arange(200), labels].mean(axis=1)
    best = grid[np.argmin(nlls)]
    assert 0.31 < best < 29  # an interior optimum
    assert fitted == pytest.approx(best, rel=2e-3)
    assert temperature.scaled_nll(logits, labels, fitted) <= nlls.min() + 1e-9


def test_binary_temperature_is_a_sigmoid_of_scaled_logits():
    z = np.array([-2.0, 0.5, 3.0])
    p = temperature.scaled_probs(z[:, None], 2.0)
    np.testing.assert_allclose(p[:, 1], 1 / (1 + np.exp(-z / 2.0)), rtol=1e-12)


def test_temperature_refuses_empty_binary_logits_and_non_positive_temperatures():
    for logits in (np.zeros(0), np.zeros((0, 1))):
        with pytest.raises(ValueError, match="N > 0"):
            temperature.fit_temperature(logits, [])
    for t in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature: expected"):
            temperature.scaled_probs([[2.0, 0.0]], t)
        with pytest.raises(ValueError, match="temperature: expected"):
            temperature.scaled_nll([[2.0, 0.0]], [0], t)


def test_rotation_by_zero_is_identity_and_by_90_is_rot90():
    rng = np.random.default_rng(0)
    images = rng.random((3, 8, 8))
    np.testing.assert_array_equal(shift.rotate(images, 0.0), images)
    np.testing.assert_allclose(shift.rotate(images, 90.0), np.rot90(images, k=1, axes=(1, 2)),
                               atol=1e-12)
    flat = images.reshape(3, 64)
    np.testing.assert_allclose(shift.rotate(flat, 90.0),
                               np.rot90(images, k=1, axes=(1, 2)).reshape(3, 64), atol=1e-12)


def _bilinear_rotation(image: np.ndarray, angle: float) -> np.ndarray:
    """Counter-clockwise rotation about the centre, bilinear, the image zero-padded."""
    n = image.shape[0]
    centre, theta = (n - 1) / 2, np.deg2rad(angle)
    padded = np.pad(image, 1)
    out = np.zeros_like(image)
    for r in range(n):
        for c in range(n):
            x, y = c - centre, centre - r  # y up
            xs, ys = np.cos(theta) * x + np.sin(theta) * y, -np.sin(theta) * x + np.cos(theta) * y
            sr, sc = centre - ys + 1, xs + centre + 1  # padded coordinates
            r0, c0 = int(np.floor(sr)), int(np.floor(sc))
            for dr, wr in ((0, 1 - (sr - r0)), (1, sr - r0)):
                for dc, wc in ((0, 1 - (sc - c0)), (1, sc - c0)):
                    if 0 <= r0 + dr < n + 2 and 0 <= c0 + dc < n + 2:
                        out[r, c] += wr * wc * padded[r0 + dr, c0 + dc]
    return out


@pytest.mark.parametrize("angle", [1.0, 15.0, 30.0, 135.0])
def test_rotation_interpolates_the_border_against_zeros_outside(angle):
    images = np.random.default_rng(1).random((2, 8, 8)) + 0.5
    expected = np.stack([_bilinear_rotation(image, angle) for image in images])
    np.testing.assert_allclose(shift.rotate(images, angle), expected, atol=1e-6)


def test_shift_arguments_out_of_range_are_refused():
    images = np.ones((2, 5, 5))
    with pytest.raises(ValueError, match="angle: expected a finite"):
        shift.rotate(images, float("nan"))
    with pytest.raises(ValueError, match="sigma: expected"):
        shift.blur(images, -1.0)
    for fraction in (-0.2, 1.7):
        with pytest.raises(ValueError, match="fraction: expected"):
            shift.shuffle_pixels(images, fraction)
    with pytest.raises(ValueError, match="x: expected"):
        shift.extrapolate(np.ones((3, 1)), np.ones((5, 3)), 1.0)
    for std in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="std: expected a finite noise standard deviation"):
            shift.gaussian_noise(images, std)
    table = np.ones((3, 2))
    with pytest.raises(ValueError, match="distance: expected a finite number"):
        shift.covariate_shift(table, [1.0, 0.0], float("nan"))
    with pytest.raises(ValueError, match="direction: expected a finite, non-zero vector"):
        shift.covariate_shift(table, [float("nan"), 0.0], 1.0)
    with pytest.raises(ValueError, match="distance: expected a finite number of training ranges"):
        shift.extrapolate(table, table, float("inf"))


def test_noise_has_the_stated_std_and_is_seeded():
    x = np.zeros((400, 64))
    noisy = shift.gaussian_noise(x, 0.3, seed=5)
    assert noisy.std() == pytest.approx(0.3, rel=0.02)
    np.testing.assert_array_equal(noisy, shift.gaussian_noise(x, 0.3, seed=5))


def test_shuffling_is_one_fixed_permutation_for_every_image():
    x = np.arange(2 * 64.0).reshape(2, 64)
    shuffled = shift.shuffle_pixels(x, 1.0, seed=3)
    order = shuffled[0].astype(int)  # the first image's pixel values are its positions
    assert sorted(order) == list(range(64))
    assert np.all(order != np.arange(64))  # fraction 1: every pixel moves
    np.testing.assert_array_equal(shuffled[1], x[1][order])


def test_blur_spreads_a_point_by_its_sigma():
    x = np.zeros((1, 9, 9))
    x[0, 4, 4] = 1.0
    out = shift.blur(x, 1.0)[0]
    rows = np.arange(9) - 4
    var = (out.sum(axis=1) * rows**2).sum() / out.sum()
    assert var == pytest.approx(1.0, abs=0.05)
    np.testing.assert_array_equal(shift.blur(x, 0.0), x)


def test_severity_zero_of_every_shift_is_identity():
    rng = np.random.default_rng(0)
    x = rng.random((5, 64))
    for s in shift.image_shifts(seed=0) + shift.tabular_shifts(rng.random((20, 64))):
        np.testing.assert_array_equal(s.apply(x, s.levels[0]), x, err_msg=s.name)


def test_covariate_shift_and_extrapolation_move_inputs_as_stated():
    x = np.array([[0.0, 0.0], [1.0, 2.0]])
    np.testing.assert_allclose(shift.covariate_shift(x, [3.0, 4.0], 5.0), x + [3.0, 4.0])
    out = shift.extrapolate(np.array([[0.1], [0.9]]), np.array([[0.0], [1.0]]), 0.6)
    np.testing.assert_allclose(out.ravel(), [-0.5, 1.5])
    with pytest.raises(ValueError, match="direction"):
        shift.covariate_shift(x, [1.0, 0.0, 0.0], 1.0)


def test_integer_inputs_are_shifted_to_floats_not_cast_back():
    """uint8 pixels with noise would wrap around, moved integer features be truncated."""
    pixels = np.full((200, 64), 100, np.uint8)
    noisy = shift.gaussian_noise(pixels, 5.0, seed=1)
    assert noisy.dtype == np.float32 and (noisy - 100).std() == pytest.approx(5.0, rel=0.05)
    x = np.array([[1, 2], [3, 4]])
    np.testing.assert_allclose(shift.covariate_shift(x, [1, 0], 0.5), [[1.5, 2], [3.5, 4]])
    np.testing.assert_allclose(shift.extrapolate(np.array([[1], [3]]), x[:, :1], 0.25).ravel(),
                               [0.5, 3.5])
    assert shift.rotate(np.eye(4, dtype=np.uint8)[None] * 200, 45.0).dtype == np.float32


def test_table_metrics_equal_direct_calls_and_auroc_matches_a_hand_example():
    rng = np.random.default_rng(2)
    probs = special.softmax(rng.normal(size=(30, 3)) * 2, axis=-1)
    labels = rng.integers(0, 3, size=30)
    lookup = {0.0: probs, 1.0: probs[::-1]}

    def predictor(x):
        return lookup[float(x[0, 0])] if len(x) == 30 else np.array([[0.5, 0.5, 0.0]] * 2)

    fake = shift.Shift("fake", "level", (0.0, 1.0), lambda x, s: np.full_like(x, s))
    table = shift.evaluate({"p": predictor}, np.zeros((30, 1)), labels, [fake],
                           ood=np.zeros((2, 1)), n_bins=10)
    for severity, p in enumerate((probs, probs[::-1])):
        got = {r["metric"]: r["value"] for r in table.select(shift="fake", severity=severity)}
        assert got == {"accuracy": metrics.accuracy(p, labels), "nll": metrics.nll(p, labels),
                       "ece_10bins": metrics.ece(p, labels, n_bins=10),
                       "brier": metrics.brier(p, labels),
                       "confidence": pytest.approx(p.max(axis=1).mean(), abs=1e-15)}
    # OOD confidence 0.5 on both; in-distribution confidences all exceed 0.5 or not:
    expected = np.mean(probs.max(axis=1) > 0.5) + 0.5 * np.mean(probs.max(axis=1) == 0.5)
    (row,) = table.select(shift="ood", metric="auroc_confidence")
    assert row["value"] == pytest.approx(expected)
    loaded = json.loads(table.to_json())
    assert len(loaded["rows"]) == 2 * 5 + 2 and loaded["parameters"] == {"fake": "level"}


def test_auroc_by_hand():
    p_in = np.array([[0.9, 0.1], [0.6, 0.4]])
    p_out = np.array([[0.7, 0.3], [0.5, 0.5]])
    rows = {r["metric"]: r["value"] for r in shift._ood_rows("p", p_in, p_out)}
    # in-confidences 0.9, 0.6 vs out 0.7, 0.5: 0.9 beats both, 0.6 beats 0.5 only -> 3/4
    assert rows["auroc_confidence"] == 0.75
    assert rows["auroc_entropy"] == 0.75


def test_baseline_predictors_average_and_scale_probabilities():
    a = np.array([[2.0, 0.0], [0.0, 1.0]])
    b = np.array([[0.0, 0.0], [3.0, 1.0]])
    ensemble = shift.ensemble_predictor([lambda x: a, lambda x: b])
    np.testing.assert_allclose(ensemble(None), (special.softmax(a, -1) + special.softmax(b, -1)) / 2)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 3)) * 5
    labels = rng.integers(0, 3, size=50)
    scaled = shift.temperature_predictor(lambda x: logits, None, labels)
    assert scaled.temperature == temperature.fit_temperature(logits, labels)
    np.testing.assert_allclose(scaled(None), special.softmax(logits / scaled.temperature, -1))


def test_baselines_of_a_keras_model_ending_in_softmax_read_its_logits():
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, "softmax")])
    rng = np.random.default_rng(1)
    model.set_weights([rng.normal(size=(4, 3)) * 2, rng.normal(size=3)])
    x = rng.normal(size=(40, 4)).astype("float32")
    labels = rng.integers(0, 3, size=40)
    probs = model.predict(x, verbose=0).astype(np.float64)
    np.testing.assert_allclose(shift.map_predictor(model)(x), probs, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(shift.ensemble_predictor([model, model])(x), probs, rtol=1e-5,
                               atol=1e-7)
    scaled = shift.temperature_predictor(model, x, labels)
    # log-probabilities are the logits up to a constant per row, which softmax ignores
    expected = temperature.fit_temperature(np.log(probs), labels)
    np.testing.assert_allclose(scaled.temperature, expected, rtol=1e-4)
    np.testing.assert_allclose(scaled(x), special.softmax(np.log(probs) / expected, -1),
                               rtol=1e-3, atol=1e-6)


def test_heteroscedastic_baselines_are_gaussian_from_mean_and_log_variance():
    from laplace_tf.shift_run import network_predictor

    x = np.array([[0.5], [-1.0]])
    nets = [lambda x: np.concatenate([2 * x, x], axis=1),          # mean 2x, log-variance x
            lambda x: np.concatenate([x, 0 * x - 1], axis=1)]       # mean x, log-variance -1
    mean, variance = network_predictor(nets[:1], "heteroscedastic")(x)
    np.testing.assert_allclose(mean, 2 * x)
    np.testing.assert_allclose(variance, np.exp(x))
    mean, variance = network_predictor(nets, "heteroscedastic")(x)
    np.testing.assert_allclose(mean, 1.5 * x)
    np.testing.assert_allclose(variance, (0.5 * x) ** 2 + (np.exp(x) + np.exp(-1.0)) / 2)
    mean, variance = network_predictor([lambda x: 2 * x, lambda x: x], "regression", 0.5)(x)
    np.testing.assert_allclose(mean, 1.5 * x)
    np.testing.assert_allclose(variance, (0.5 * x) ** 2 + 0.25)


def test_tabular_inputs_get_tabular_shifts_unless_image_shifts_are_named():
    from laplace_tf.shift_run import _shifts

    table = np.random.default_rng(0).normal(size=(20, 4))   # 4 features, not 2 x 2 images
    assert [s.name for s in _shifts(None, table, 0)] == ["covariate", "extrapolation"]
    assert [s.name for s in _shifts(["rotation"], table, 0)] == ["rotation"]
    images = np.zeros((20, 8, 8))
    assert [s.name for s in _shifts(None, images, 0)] == ["rotation", "noise", "blur", "shuffle"]
    with pytest.raises(ValueError, match="shift.shifts: 'noise' is named twice"):
        _shifts(["noise", "noise"], table, 0)


def test_cli_shift_end_to_end_on_a_tiny_config(tmp_path, capsys):
    from laplace_tf.cli import main

    config = tmp_path / "tiny.yaml"
    config.write_text(
        "name: tiny\nseed: 0\ndata: {dataset: digits, ood: digits_noisy}\n"
        "model: {hidden: [8], epochs: 2, batch_size: 128}\n"
        "laplace: {optimize_prior: none, prior_precision: 1.0}\n"
        "shift:\n  ensemble: 2\n  shifts: [rotation, shuffle]\n  reliability_at: [6]\n"
        "  variants:\n    - {label: LA, laplace: {subset_of_weights: last_layer, "
        "hessian_structure: diag}}\n")
    assert main(["shift", "--config", str(config), "--out", str(tmp_path / "out"),
                 "--quiet"]) == 0
    table = json.loads((tmp_path / "out" / "shift.json").read_text())
    predictors = ["MAP", "MAP + temperature", "ensemble of 2", "LA"]
    assert list(dict.fromkeys(r["predictor"] for r in table["rows"])) == predictors
    rows = {(r["predictor"], r["shift"], r["severity"], r["metric"]): r["value"]
            for r in table["rows"]}
    for p in predictors:  # severity 0 of both shifts is the same clean test set
        assert rows[(p, "rotation", 0, "nll")] == rows[(p, "shuffle", 0, "nll")]
        assert (p, "ood", 0, "auroc_entropy") in rows
    assert max(r["level"] for r in table["rows"] if r["shift"] == "rotation") == 180.0
    page = (tmp_path / "out" / "report.html").read_text()
    assert "Shift: rotation" in page and "Shift: out-of-distribution detection" in page
    assert (tmp_path / "out" / "plots" / "shift_nll.png").is_file()
    assert "rotation nll" in capsys.readouterr().out


def test_shift_curves_draw_each_predictor_against_the_levels():
    from laplace_tf.calibration import plots

    rows = [{"predictor": p, "shift": s, "severity": k, "level": level, "metric": "nll",
             "value": 10 * i + k} for i, p in enumerate(("MAP", "LA"))
            for s, levels in (("noise", (0.0, 0.3)), ("blur", (0.0, 1.0, 2.0)))
            for k, level in enumerate(levels)]
    fig = plots.shift_curves(shift.ShiftTable(rows, {"noise": "std", "blur": "sigma"}, ""), "nll")
    blur_lines = fig.axes[1].get_lines()
    assert [line.get_label() for line in blur_lines] == ["MAP", "LA"]
    np.testing.assert_array_equal(blur_lines[1].get_xdata(), [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(blur_lines[1].get_ydata(), [10, 11, 12])
    assert fig.axes[1].get_xlabel() == "sigma"
    with pytest.raises(ValueError, match="metric"):
        plots.shift_curves(shift.ShiftTable(rows, {"noise": "std"}, ""), "ece")
    ood = [{"predictor": "MAP", "shift": "ood", "severity": 0, "level": 0.0,
            "metric": "auroc_entropy", "value": 0.7}]
    with pytest.raises(ValueError, match="metric: 'auroc_entropy' has no severity levels"):
        plots.shift_curves(shift.ShiftTable(rows + ood, {"noise": "std"}, ""), "auroc_entropy")


def test_cli_shift_rejects_a_severity_the_first_shift_lacks_before_training(tmp_path, capsys):
    from laplace_tf.cli import main

    config = tmp_path / "bad.yaml"
    config.write_text("data: {dataset: digits}\nshift:\n  shifts: [noise]\n"
                      "  reliability_at: [6]\n")
    assert main(["shift", "--config", str(config), "--quiet"]) == 2
    assert "shift.reliability_at: expected severities of the first shift (integers 0 to 5)" in (
        capsys.readouterr().err)
