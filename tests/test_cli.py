"""The ``laplace-tf`` command: usage and input errors (exit 2, one line), and the pipelines
end to end: ``demo --fast``, ``fit`` from a saved model and .npz data, ``report`` from the
saved posterior."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from laplace_tf import data, models
from laplace_tf.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small digits MLP saved as .keras, and train / test / OOD data saved as .npz."""
    folder = tmp_path_factory.mktemp("saved")
    ds = data.load("digits", seed=0)
    model = models.mlp(ds.input_shape, ds.n_outputs, hidden=(16,), seed=0)
    models.train_map(model, "classification", ds.train.x, ds.train.y, epochs=3)
    model.save(folder / "model.keras")
    for name, split in (("train", ds.train), ("test", ds.test),
                        ("ood", data.load_ood("digits_rotated", seed=0))):
        np.savez(folder / f"{name}.npz", x=split.x, y=split.y)
    return folder


USAGE_ERRORS = [
    ([], "laplace-tf: error: choose a command: demo, fit, report, export or shift"),
    (["demo", "--bogus"], "laplace-tf: error: unrecognized arguments: --bogus"),
    (["report", "p.npz"], "the following arguments are required: --model, --test"),
    (["fit", "--dataset", "digits", "--hessian-structure", "dense"],
     "laplace-tf fit: error: --hessian-structure: expected one of kron, full, diag"),
    (["fit", "--dataset", "digits", "--epochs", "ten"],
     "laplace-tf fit: error: --epochs: expected an integer; got 'ten'"),
    (["fit"], "laplace-tf fit: error: flags: give exactly one of data.dataset"),
    (["fit", "--config", "missing.yaml"], "laplace-tf fit: error: --config: no such file"),
    (["fit", "--train", "missing.npz", "--likelihood", "binary", "--quiet"],
     "laplace-tf fit: error: data.train: no such file 'missing.npz'"),
    (["fit", "--dataset", "digits", "--ood", "digits_rotatd", "--quiet"],
     "data set 'digits_rotatd' (did you mean 'digits_rotated'?)"),
    (["fit", "--dataset", "digits", "--model", "missing.keras", "--quiet"],
     "laplace-tf fit: error: model.path: no such file 'missing.keras'"),
    (["report", "missing.npz", "--model", "m.keras", "--test", "t.npz"],
     "laplace-tf report: error: posterior: no such file 'missing.npz'"),
    (["export", "missing.npz", "--model", "m.keras", "--out", "served"],
     "laplace-tf export: error: posterior: no such file 'missing.npz'"),
    (["export", "p.npz", "--model", "m.keras", "--out", "served", "--seed", "-1"],
     "laplace-tf export: error: --seed: expected an integer in [0, 2**32); got '-1'"),
]


@pytest.mark.parametrize("argv, message", USAGE_ERRORS, ids=lambda v: " ".join(v)[:40]
                         if isinstance(v, list) else None)
def test_bad_usage_exits_2_with_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in _error_line(capsys)


def test_broken_files_exit_2_with_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "garbage.keras").write_text("not a model")
    assert main(["fit", "--dataset", "digits", "--model", "garbage.keras", "--quiet"]) == 2
    assert "model.path: garbage.keras is not a .keras (zip) archive" in _error_line(capsys)
    (tmp_path / "shift.yaml").write_text("shift: {ensemble: [\n")
    assert main(["shift", "--config", "shift.yaml"]) == 2
    assert "shift.yaml: not valid YAML at line 2" in _error_line(capsys)
    (tmp_path / "text.npz").write_text("x,y\n1,2\n")
    assert main(["fit", "--train", "text.npz", "--likelihood", "binary", "--quiet"]) == 2
    assert "data.train: text.npz is not a readable .npz file (not a zip archive)" in \
        _error_line(capsys)
    (tmp_path / "afile").write_text("")  # refused before any training
    assert main(["fit", "--dataset", "digits", "--out", "afile/run", "--quiet"]) == 2
    assert "--out: cannot make the folder 'afile/run'" in _error_line(capsys)


def test_config_with_unknown_key_lists_the_valid_keys(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("data: {dataset: digits}\nlaplace: {prior_precison: 2.0}\n")
    assert main(["fit", "--config", str(path)]) == 2
    line = _error_line(capsys)
    assert f"{path}: unknown key 'laplace.prior_precison'" in line
    assert "did you mean 'laplace.prior_precision'?" in line
    assert "valid keys in 'laplace': likelihood, subset_of_weights, hessian_structure" in line


def test_inputs_that_do_not_fit_the_saved_model(saved, tmp_path, capsys):
    np.savez(tmp_path / "wide.npz", x=np.zeros((4, 65), np.float32), y=np.zeros(4))
    assert main(["fit", "--model", str(saved / "model.keras"), "--train", str(tmp_path / "wide.npz"),
                 "--likelihood", "classification", "--out", str(tmp_path), "--quiet"]) == 2
    assert "laplace-tf fit: error:" in _error_line(capsys)


def test_help_exits_0(capsys):
    assert main(["fit", "--help"]) == 0
    assert "--hessian-structure {kron,full,diag,lowrank,gp}" in capsys.readouterr().out


def test_python_dash_m_reports_errors_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-m", "laplace_tf", "fit", "--config", "nope.yaml"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "laplace-tf fit: error: --config: no such file 'nope.yaml'")


def _metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def test_demo_fast_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--fast", "--quiet"]) == 0
    for name in ("report.html", "metrics.json", "model.keras", "posterior.npz",
                 "regression_model.keras", "regression_posterior.npz", "config.yaml",
                 "plots/reliability_comparison.png", "plots/ood_histograms.png",
                 "plots/regression_band.png", "plots/evidence.png",
                 "plots/regression_evidence.png", "plots/shift_nll.png"):
        assert (out / name).is_file(), name
    metrics = _metrics(out)
    assert set(metrics) == {"classification", "regression"}
    assert metrics["classification"]["ood"]["laplace"]["auroc_entropy"] is not None
    assert {r["predictor"] for r in metrics["classification"]["shift"]["rows"]} >= {
        "MAP", "MAP + temperature", "Laplace"}
    html_text = (out / "report.html").read_text()
    assert html_text.count("<img") >= 5 and "demo_regression" in html_text
    table = capsys.readouterr().out
    for label in ("accuracy", "NLL", "ECE", "Brier", "95% coverage", "MAP", "Laplace"):
        assert label in table
    map_nll = metrics["classification"]["test"]["map"]["nll"]
    assert f"{map_nll:.4f}" in table


def test_fit_from_saved_model_and_npz_then_report_from_the_saved_posterior(saved, tmp_path):
    fit_out, report_out = tmp_path / "fit", tmp_path / "report"
    assert main(["fit", "--model", str(saved / "model.keras"), "--train", str(saved / "train.npz"),
                 "--test", str(saved / "test.npz"), "--ood", str(saved / "ood.npz"),
                 "--likelihood", "classification", "--hessian-structure", "diag",
                 "--out", str(fit_out), "--quiet"]) == 0
    fitted = _metrics(fit_out)
    # the MAP column is the saved network itself
    import keras

    model = keras.models.load_model(saved / "model.keras")
    test = np.load(saved / "test.npz")
    accuracy = np.mean(np.argmax(model.predict(test["x"], verbose=0), axis=1) == test["y"])
    assert fitted["test"]["map"]["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert fitted["config"]["run"]["laplace"]["hessian_structure"] == "diag"

    assert main(["report", str(fit_out / "posterior.npz"), "--model", str(fit_out / "model.keras"),
                 "--test", str(saved / "test.npz"), "--ood", str(saved / "ood.npz"),
                 "--out", str(report_out), "--quiet"]) == 0
    reported = _metrics(report_out)
    # the same posterior on the same data gives the same numbers
    for model_name in ("map", "laplace"):
        for key, value in fitted["test"][model_name].items():
            assert reported["test"][model_name][key] == pytest.approx(value, rel=1e-6, abs=1e-9)
        assert reported["ood"][model_name] == pytest.approx(fitted["ood"][model_name], rel=1e-6)
    assert (report_out / "report.html").is_file()
    assert (report_out / "plots" / "reliability_comparison.png").is_file()


def test_fit_gp_with_a_seeded_context_then_report(saved, tmp_path):
    """The functional Laplace from flags: the saved posterior keeps its context's settings and
    the report of it gives the fit's numbers."""
    import keras

    import laplace_tf

    fit_out, report_out = tmp_path / "fit", tmp_path / "report"
    assert main(["fit", "--model", str(saved / "model.keras"), "--train", str(saved / "train.npz"),
                 "--test", str(saved / "test.npz"), "--likelihood", "classification",
                 "--subset-of-weights", "all", "--hessian-structure", "gp", "--n-context", "40",
                 "--seed", "5", "--out", str(fit_out), "--quiet"]) == 0
    fitted = _metrics(fit_out)
    assert fitted["config"]["run"]["laplace"]["n_context"] == 40
    la = laplace_tf.load(fit_out / "posterior.npz", keras.models.load_model(fit_out / "model.keras"))
    assert (la.hessian_structure, la.n_context, la.seed) == ("gp", 40, 5)
    assert la.curvature.blocks[0].rank == 40 * 10  # the context's rows: examples x classes
    assert main(["report", str(fit_out / "posterior.npz"), "--model", str(fit_out / "model.keras"),
                 "--test", str(saved / "test.npz"), "--out", str(report_out), "--quiet"]) == 0
    assert _metrics(report_out)["test"]["laplace"] == pytest.approx(fitted["test"]["laplace"],
                                                                     rel=1e-6)


def test_report_refuses_a_posterior_of_another_model(saved, tmp_path, capsys):
    other = models.mlp((64,), 10, hidden=(8,), seed=1)
    other.save(tmp_path / "other.keras")
    fit_out = tmp_path / "fit"
    assert main(["fit", "--model", str(saved / "model.keras"), "--train", str(saved / "train.npz"),
                 "--likelihood", "classification", "--optimize-prior", "none",
                 "--out", str(fit_out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["report", str(fit_out / "posterior.npz"), "--model", str(tmp_path / "other.keras"),
                 "--test", str(saved / "test.npz"), "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert "laplace-tf report: error:" in _error_line(capsys)
    np.savez(tmp_path / "narrow.npz", x=np.zeros((7, 3), np.float32), y=np.zeros(7))
    assert main(["report", str(fit_out / "posterior.npz"), "--model", str(saved / "model.keras"),
                 "--test", str(saved / "test.npz"), "--ood", str(tmp_path / "narrow.npz"),
                 "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert f"error: --ood: {tmp_path / 'narrow.npz'}: inputs of shape (7, 3) do not fit" in \
        _error_line(capsys)


def test_regression_fit_then_report_on_the_same_test_data(tmp_path, capsys):
    fit_out, report_out = tmp_path / "fit", tmp_path / "report"
    far = np.linspace(4, 6, 20)[:, None]  # inputs far from the training range
    np.savez(tmp_path / "far.npz", x=far, y=np.sin(far[:, 0]))
    assert main(["fit", "--dataset", "sine_1d", "--epochs", "20", "--hidden", "16",
                 "--hessian-structure", "diag", "--learning-rate", "0.01", "--seed", "3",
                 "--ood", str(tmp_path / "far.npz"), "--out", str(fit_out)]) == 0
    shown = capsys.readouterr()
    # not on a terminal: log lines, no progress bars (see laplace_tf.console)
    assert "training MAP" not in shown.err and "training an MLP [16]" in shown.out
    test = data.load("sine_1d", seed=3).test
    np.savez(tmp_path / "test.npz", x=test.x, y=test.y)
    assert main(["report", str(fit_out / "posterior.npz"), "--model", str(fit_out / "model.keras"),
                 "--test", str(tmp_path / "test.npz"), "--ood", str(tmp_path / "far.npz"),
                 "--out", str(report_out), "--quiet"]) == 0
    quiet = capsys.readouterr()
    assert quiet.err == "" and "evaluating" not in quiet.out  # --quiet: no bars, no log lines
    fitted, reported = _metrics(fit_out), _metrics(report_out)
    # sigma_noise tuned by marglik travels with the posterior: identical predictive numbers
    assert reported["config"]["sigma_noise"] == pytest.approx(fitted["config"]["sigma_noise"])
    for model_name in ("map", "laplace"):
        assert reported["test"][model_name] == pytest.approx(fitted["test"][model_name], rel=1e-6)
    for model_name in ("map", "laplace"):  # far inputs told apart by the predictive variance
        assert reported["ood"][model_name] == pytest.approx(fitted["ood"][model_name], rel=1e-6)
    assert fitted["ood"]["laplace"]["auroc_variance"] > fitted["ood"]["map"]["auroc_variance"]
    assert (report_out / "plots" / "regression_band.png").is_file()


def test_export_a_saved_posterior_as_a_savedmodel(tmp_path, capsys):
    """``export`` loads the posterior into its model and writes the predictive the flags ask
    for: the SavedModel's numbers are the loaded posterior's ``la(x, ...)``."""
    import keras
    import tensorflow as tf

    import laplace_tf

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 3)).astype(np.float32), rng.normal(size=(20, 1))
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, "tanh"),
                              keras.layers.Dense(1)])
    la = laplace_tf.Laplace(model, "regression", hessian_structure="diag", sigma_noise=0.5,
                            progress=False)
    la.fit((x, y))
    model.save(tmp_path / "model.keras")
    la.save(tmp_path / "posterior.npz")
    assert main(["export", str(tmp_path / "posterior.npz"), "--model", str(tmp_path / "model.keras"),
                 "--out", str(tmp_path / "served"), "--pred-type", "nn", "--n-samples", "8",
                 "--seed", "3"]) == 0
    assert "mean, variance, functional_variance" in capsys.readouterr().out
    (tmp_path / "afile").write_text("")
    assert main(["export", str(tmp_path / "posterior.npz"), "--model", str(tmp_path / "model.keras"),
                 "--out", str(tmp_path / "afile" / "served")]) == 2
    assert "--out: cannot make the folder" in _error_line(capsys)
    served = tf.saved_model.load(str(tmp_path / "served")).signatures["serving_default"]
    out = served(inputs=tf.constant(x[:5]))
    for got, want in zip((out["mean"], out["variance"]),
                         la(x[:5], pred_type="nn", n_samples=8, seed=3), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_gridsearch_of_a_random_predictive_uses_the_runs_seed_and_samples(saved, tmp_path,
                                                                          monkeypatch):
    """Two runs of one config tune to the same prior: the grid is scored with the run's seed
    and n_samples, not with fresh draws of the default size."""
    import laplace_tf

    seen = []
    tune = laplace_tf.Laplace.optimize_prior_precision

    def recorded(la, **kwargs):
        seen.append({k: kwargs.get(k) for k in ("method", "seed", "n_samples")})
        return tune(la, **kwargs)

    monkeypatch.setattr(laplace_tf.Laplace, "optimize_prior_precision", recorded)
    assert main(["fit", "--model", str(saved / "model.keras"), "--train", str(saved / "train.npz"),
                 "--val", str(saved / "test.npz"), "--test", str(saved / "test.npz"),
                 "--likelihood", "classification", "--hessian-structure", "diag",
                 "--optimize-prior", "gridsearch", "--link-approx", "mc", "--n-samples", "5",
                 "--seed", "7", "--out", str(tmp_path / "fit"), "--quiet"]) == 0
    assert seen == [{"method": "gridsearch", "seed": 7, "n_samples": 5}]
