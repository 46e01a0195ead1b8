"""The exported predictive (``la.export``, ``la.to_keras``): a SavedModel loaded by plain
TensorFlow in a fresh Python process that cannot import laplace_tf gives ``la(x)`` and the
functional variance, at batch sizes other than any seen before; what cannot be served is
refused before anything is written."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from laplace_tf import Laplace

N, D = 24, 3
BATCHES = ((0, 1), (1, 8), (8, 24))  # sizes 1, 7 and 16 in the served process
SEED = 5
S = 16  # nn weight samples

# (name, subset_of_weights, hessian_structure, likelihood, pred_type, link_approx, dtype)
CASES = [
    ("ll_kron_probit", "last_layer", "kron", "classification", "glm", "probit", "float32"),
    ("ll_full_bridge", "last_layer", "full", "classification", "glm", "bridge", "float32"),
    ("ll_diag_binary", "last_layer", "diag", "binary", "glm", "probit", "float32"),
    ("ll_kron_regression", "last_layer", "kron", "regression", "glm", "probit", "float32"),
    ("all_kron_probit", "all", "kron", "classification", "glm", "probit", "float32"),
    ("all_full_regression", "all", "full", "regression", "glm", "probit", "float32"),
    ("all_diag_bridge", "all", "diag", "classification", "glm", "bridge", "float32"),
    ("all_kron_binary_f64", "all", "kron", "binary", "glm", "probit", "float64"),
    ("all_kron_nn_regression", "all", "kron", "regression", "nn", "probit", "float32"),
    ("ll_diag_nn", "last_layer", "diag", "classification", "nn", "probit", "float32"),
]

_SERVE = textwrap.dedent("""
    import sys

    class _NoLaplaceTF:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "laplace_tf":
                raise ImportError("laplace_tf is blocked in this process")

    sys.meta_path.insert(0, _NoLaplaceTF())
    try:
        import laplace_tf  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("laplace_tf could be imported")
    import numpy as np
    import tensorflow as tf

    folder, names = sys.argv[1], sys.argv[2:]
    for name in names:
        serve = tf.saved_model.load(folder + "/" + name).signatures["serving_default"]
        x = np.load(folder + "/" + name + "_x.npz")  # the signature's inputs by name
        parts = [serve(**{k: tf.constant(x[k][a:b]) for k in x}) for a, b in __BATCHES__]
        np.savez(folder + "/" + name + ".npz",
                 **{k: np.concatenate([p[k].numpy() for p in parts]) for k in parts[0]})
    assert "laplace_tf" not in sys.modules
""").replace("__BATCHES__", repr(BATCHES))


def _model(n_outputs: int, dtype: str) -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((D,), dtype=dtype),
        keras.layers.Dense(4, "tanh", dtype=dtype),
        keras.layers.Dense(n_outputs, dtype=dtype),
    ])


def _data(likelihood: str):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(N, D))
    y = {"classification": rng.integers(0, 3, N), "binary": rng.integers(0, 2, N),
         "regression": rng.normal(size=(N, 2))}[likelihood]
    return x, y


def _two_inputs() -> keras.Model:
    keras.utils.set_random_seed(0)
    a, b = keras.Input((2,), name="a"), keras.Input((1,), name="b")
    hidden = keras.layers.Dense(4, "tanh")(keras.layers.Concatenate()([a, b]))
    return keras.Model([a, b], keras.layers.Dense(2)(hidden))


def _fitted(subset, structure, likelihood, dtype="float32", model=None):
    x, y = _data(likelihood)
    n_outputs = {"classification": 3, "binary": 1, "regression": 2}[likelihood]
    if model is not None:  # two inputs: x splits into a [N, 2] and b [N, 1]
        x = {"a": x[:, :2], "b": x[:, 2:]}
    la = Laplace(model or _model(n_outputs, dtype), likelihood, subset_of_weights=subset,
                 hessian_structure=structure, prior_precision=0.5, progress=False,
                 sigma_noise=0.7 if likelihood == "regression" else 1.0)
    la.fit((x, y))
    return la, x


def _expected(la, x, pred_type, link):
    """``la(x)`` by name, and the variance of each output: the diagonal of ``J Sigma J^T``
    (glm), or of the network's outputs under the same weight samples (nn)."""
    out = la(x, pred_type=pred_type, link_approx=link, n_samples=S, seed=SEED)
    names = ("mean", "variance") if isinstance(out, tuple) else ("probs",)
    expected = dict(zip(names, out if isinstance(out, tuple) else (out,), strict=True))
    if pred_type == "glm":
        expected["functional_variance"] = np.diagonal(la.functional_variance(x), 0, 1, 2)
    else:
        outputs = [la.logit_model(tf.constant(x, la.subset.dtype), la.subset.unflatten(theta))
                   for theta in la.sample(S, seed=SEED)]
        expected["functional_variance"] = np.var(np.stack(outputs), axis=0)
    return {k: np.asarray(v, np.float64) for k, v in expected.items()}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Every case exported (and one ``to_keras()`` model through ``model.export``), all run by
    one plain-TensorFlow process: ``{name: (expected, served outputs)}``."""
    folder = tmp_path_factory.mktemp("served")
    expected = {}

    def add(name, la, x, pred_type="glm", link="probit"):
        expected[name] = _expected(la, x, pred_type, link)
        named = x if isinstance(x, dict) else {"inputs": x}
        np.savez(folder / f"{name}_x.npz", **{k: v.astype(np.float32) for k, v in named.items()})

    for name, subset, structure, likelihood, pred_type, link, dtype in CASES:
        la, x = _fitted(subset, structure, likelihood, dtype)
        info = la.export(folder / name, pred_type=pred_type, link_approx=link, n_samples=S,
                         seed=SEED)
        add(name, la, x, pred_type, link)
        assert info.outputs == tuple(expected[name])
    la, x = _fitted("all", "kron", "regression", model=_two_inputs())
    la.export(folder / "two_inputs")
    add("two_inputs", la, x)
    la, x = _fitted("all", "kron", "regression")
    la.to_keras().export(folder / "keras_export", verbose=False)
    add("keras_export", la, x)
    subprocess.run([sys.executable, "-I", "-c", _SERVE, str(folder), *expected], check=True,
                   cwd=folder, timeout=300)
    return {name: (want, dict(np.load(folder / f"{name}.npz"))) for name, want in expected.items()}


@pytest.mark.parametrize("name", [c[0] for c in CASES] + ["two_inputs", "keras_export"])
def test_served_predictive_equals_la_without_laplace_tf(served, name):
    expected, got = served[name]
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key].dtype == np.float32
        np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


def test_to_keras_predicts_la_in_any_batch_size():
    la, x = _fitted("last_layer", "kron", "classification")
    model = la.to_keras(link_approx="bridge")
    out = model.predict(x.astype(np.float32), batch_size=5, verbose=0)
    np.testing.assert_allclose(out["probs"], la(x, link_approx="bridge"), rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match=r"la.export\(path\)"):
        model.get_layer("laplace_predictive").get_config()


def test_to_keras_in_float64_takes_float64_inputs():
    la, x = _fitted("last_layer", "kron", "classification", dtype="float64")
    model = la.to_keras(dtype="float64")
    out = model(x.astype(np.float64))["probs"]
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, la(x), rtol=1e-12)


@pytest.fixture(scope="module")
def binary():
    return _fitted("last_layer", "diag", "binary")[0]


@pytest.mark.parametrize("options, message", [
    ({"link_approx": "mc"}, r"link_approx: 'mc' draws random logits .* pred_type='nn'"),
    ({"link_approx": "bridge"}, r"link_approx: 'bridge' does not fit likelihood='binary'"),
    ({"max_bytes": 100}, r"max_bytes: .* needs about [\d,]+ bytes, over max_bytes=100"),
    ({"dtype": "float16"}, r"dtype: expected one of"),
])
def test_export_refuses_what_it_cannot_serve(binary, tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        binary.export(tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_file_as_its_folder(binary, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="path: .* is a file"):
        binary.export(tmp_path / "file")
    with pytest.raises(OSError, match="file/served"):  # a folder that cannot be made
        binary.export(tmp_path / "file" / "served")


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(3)

    def call(self, x):
        return self.dense(x)


def test_export_refuses_before_fit_and_without_a_known_input_shape(tmp_path):
    with pytest.raises(ValueError, match="export"):
        Laplace(_model(3, "float32"), "classification").export(tmp_path / "a")
    model = _Subclassed()
    x, y = _data("classification")
    model(x[:1])
    la = Laplace(model, "classification", subset_of_weights="last_layer", progress=False)
    la.fit((x, y))
    with pytest.raises(ValueError, match=r"input_shape: the model does not record"):
        la.export(tmp_path / "b")
    assert not (tmp_path / "b").exists()
    served = la.to_keras(input_shape=(D,))
    np.testing.assert_allclose(served(x.astype(np.float32))["probs"], la(x), rtol=1e-5, atol=1e-6)


def test_estimated_bytes_is_logged_before_writing_and_matches_the_written_arrays(
        tmp_path, caplog):
    la, _ = _fitted("all", "full", "classification")
    with caplog.at_level("INFO", logger="laplace_tf"):
        info = la.export(tmp_path / "out")
    assert f"estimated_bytes={info.estimated_bytes}" in caplog.text
    written = sum(f.stat().st_size for f in (tmp_path / "out" / "variables").iterdir())
    # the variables: the MAP, the model's weights, the P x P covariance and the noise, float32
    p, weights = la.n_params, sum(int(np.prod(v.shape)) for v in la.model.variables)
    assert info.estimated_bytes == 4 * (p + weights + p * p + 1)
    assert info.estimated_bytes <= written <= info.estimated_bytes + 4096


def test_a_free_input_size_is_refused_for_the_glm_over_all_weights_and_fixed_by_input_shape():
    """Token sequences of any length: the export failed inside the layout of the Jacobians
    (a raw TypeError); it now asks for fixed sizes, and serves la(x) with them."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((None,), dtype="int32"), keras.layers.Embedding(7, 4),
                              keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(3)])
    x = np.random.default_rng(0).integers(0, 7, size=(6, 5)).astype("int32")
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag",
                 progress=False)
    la.fit((x, np.arange(6) % 3))
    with pytest.raises(ValueError, match=r"input_shape: the served inputs have a free size"):
        la.to_keras()
    served = la.to_keras(input_shape=(5,))
    assert served.inputs[0].dtype == "int32"  # token ids keep their dtype (were cast to float)
    np.testing.assert_allclose(served(x)["probs"], la(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("input_shape, error, message", [
    ((4,), ValueError, r"input_shape: the model cannot take examples of shape \(4,\)"),
    (3, TypeError, r"input_shape: expected the shape of one example"),
    ((0,), ValueError, r"input_shape: sizes must be positive"),
])
def test_a_wrong_input_shape_is_named_before_anything_is_written(tmp_path, input_shape, error,
                                                                 message):
    la, _ = _fitted("last_layer", "diag", "classification")
    with pytest.raises(error, match=message):
        la.export(tmp_path / "served", input_shape=input_shape)
    assert not (tmp_path / "served").exists()
