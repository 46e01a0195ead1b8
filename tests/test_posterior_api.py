"""The PosteriorLaplace boundary: bad inputs give clear errors and leave the object usable;
save -> load gives the identical posterior and refuses a different model or a broken file."""

from __future__ import annotations

import inspect
import json
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf
from models import tanh_mlp, targets
from test_posterior_math import make

from laplace_tf.posterior import NotFittedError, PosteriorLaplace
from laplace_tf.posterior.state import Setting
from laplace_tf.predictive import Laplace

# (keyword arguments, error type, message pattern) for the constructor
BAD_ARGUMENTS = [
    (dict(likelihood="regresion"), ValueError, r"likelihood: expected one of \('classification'"),
    (dict(subset_of_weights="head"), ValueError, r"subset_of_weights: expected one of \('all', 'last_layer', 'subnetwork'\)"),
    (dict(hessian_structure="banded"), ValueError, r"hessian_structure: expected one of \('full', 'kron', 'diag'"),
    (dict(curvature="fisher"), ValueError, r"curvature: expected one of \('ggn', 'ef', 'hessian'\)"),
    (dict(curvature="hessian", subset_of_weights="all"), ValueError, "only available with hessian_structure='full'"),
    (dict(prior_precision=0.0), ValueError, "prior_precision: every value must be finite and > 0"),
    (dict(prior_precision=-2.0), ValueError, "prior_precision: every value must be finite and > 0"),
    (dict(prior_precision=np.nan), ValueError, "prior_precision: every value must be finite"),
    (dict(prior_precision=[1.0, 2.0, 3.0], subset_of_weights="all", hessian_structure="diag"), ValueError, r"prior_precision: expected a positive scalar, 2 values \(one per layer: \['dense\w*', 'dense\w*'\]\) or 26 values \(one per weight\); got shape \[3\]"),
    (dict(prior_precision=np.ones(26), subset_of_weights="all"), ValueError, "one value per weight is not available"),
    (dict(prior_precision="big"), TypeError, "prior_precision: expected a number"),
    (dict(prior_mean=np.zeros(5)), ValueError, "prior_mean: expected a scalar or 10 values"),
    (dict(sigma_noise=0.0), ValueError, "sigma_noise: every value must be finite and > 0"),
    (dict(sigma_noise=[1.0, -1.0]), ValueError, "sigma_noise: every value must be finite and > 0"),
    (dict(likelihood="classification", sigma_noise=2.0), ValueError, "sigma_noise: only used with likelihood='regression'"),
    (dict(temperature=0), ValueError, "temperature: expected a finite number > 0"),
    (dict(temperature="hot"), TypeError, "temperature: expected a positive number"),
    (dict(on_indefinite="ignore"), ValueError, r"on_indefinite: expected one of \('raise', 'clip'\)"),
    (dict(last_layer_name="nope"), ValueError, "last_layer_name: .* The layers with weights are"),
    (dict(last_layer_name="dense", subset_of_weights="all"), ValueError, "last_layer_name: only used with subset_of_weights='last_layer'"),
    (dict(stochastic=True, hessian_structure="diag"), ValueError, "stochastic: the Monte-Carlo curvature exists for subset_of_weights='all', hessian_structure='kron'"),
    (dict(stochastic=True, hessian_structure="kron"), ValueError, r"stochastic: .* got 'last_layer' / 'kron' / 'ggn'"),
    (dict(batch_size=0), ValueError, "batch_size: expected a positive integer"),
    (dict(memory_limit_bytes=-5), ValueError, "memory_limit_bytes: expected a positive integer"),
    (dict(progress="yes"), TypeError, "progress: expected True or False"),
    (dict(seed="s"), TypeError, "seed: expected an integer or None"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_ARGUMENTS)
def test_constructor_rejects_bad_arguments(kwargs, error, match):
    model, _ = tanh_mlp(2)
    kwargs = {"likelihood": "regression", **kwargs}
    with pytest.raises(error, match=match):
        PosteriorLaplace(model, kwargs.pop("likelihood"), **kwargs)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_constructor_rejects_half_precision_weights(dtype):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, dtype=dtype)])
    with pytest.raises(ValueError, match=f"model: its weights are {dtype}; .*mixed_float16"):
        PosteriorLaplace(model, "regression")


def test_distinct_seeds_give_distinct_draws():
    """A stateless seed is the int in base 2**31 - 1: 0 and 2**31 - 1, 7 and 2**32 + 5 differ
    (they shared their draws when only the remainder was kept); negative seeds, which wrapped
    onto large ones, are refused."""
    la = make("diag", "all")
    for a, b in [(0, 2**31 - 1), (7, 2**32 + 5), (2**31 - 2, 2**62 - 2**32)]:
        assert not np.array_equal(la.sample(2, seed=a), la.sample(2, seed=b)), (a, b)
    np.testing.assert_array_equal(la.sample(2, seed=2**40), la.sample(2, seed=2**40))


def test_constructor_rejects_a_model_that_is_not_keras():
    with pytest.raises(TypeError, match="model: expected a keras.Model"):
        PosteriorLaplace(object(), "regression")


@pytest.mark.parametrize("use", [
    lambda la: la.posterior, lambda la: la.posterior_precision, lambda la: la.mean,
    lambda la: la.posterior_covariance, lambda la: la.sample(3), lambda la: la.block_slices(),
    lambda la: la.covariance_blocks(), lambda la: la.log_marginal_likelihood(),
    lambda la: la.optimize_prior_precision(), lambda la: la.save("unused.npz"),
])
def test_everything_posterior_needs_a_fit_first(use):
    model, _ = tanh_mlp(2)
    la = PosteriorLaplace(model, "regression", progress=False)
    with pytest.raises(NotFittedError, match="not fitted yet; call la.fit"):
        use(la)
    la.prior_precision = 2.0  # still usable: settings work before fit
    assert la.n_params == 10 and la.curvature is None


# (action on a fitted kron regression posterior, error type, message pattern)
BAD_USES = [
    (lambda la: setattr(la, "prior_precision", [1.0, 2.0, 3.0]), ValueError, "prior_precision: expected"),
    (lambda la: setattr(la, "prior_precision", -1.0), ValueError, "prior_precision: every value"),
    (lambda la: setattr(la, "sigma_noise", 0.0), ValueError, "sigma_noise: every value"),
    (lambda la: setattr(la, "sigma_noise", [0.5, 0.6]), ValueError, "only a scalar sigma_noise can change without refitting"),
    (lambda la: setattr(la, "temperature", -1.0), ValueError, "temperature: expected a finite number > 0"),
    (lambda la: setattr(la, "prior_mean", np.zeros(3)), ValueError, "prior_mean: expected a scalar or 26 values"),
    (lambda la: la.sample(0), ValueError, "n_samples: expected a positive integer"),
    (lambda la: la.sample(2, seed=1.5), TypeError, "seed: expected an integer or None"),
    (lambda la: la.sample(2, seed=-1), ValueError, r"seed: expected an integer in \[0, "),
    (lambda la: la.sample(2**31), ValueError, "n_samples: 2147483648 draws of 26 weights need"),
    (lambda la: la.log_marginal_likelihood(prior_precision=0.0), ValueError, "prior_precision: every value"),
    (lambda la: la.log_marginal_likelihood(sigma_noise=-1.0), ValueError, "sigma_noise: every value"),
    (lambda la: la.optimize_prior_precision(method="adam"), ValueError, r"method: expected one of \('marglik', 'gridsearch'\)"),
    (lambda la: la.optimize_prior_precision(prior_structure="diag"), ValueError, r"prior_structure: expected one of \('scalar', 'layerwise'\) for hessian_structure='kron'"),
    (lambda la: la.optimize_prior_precision(n_steps=0), ValueError, "n_steps: expected a positive integer"),
    (lambda la: la.optimize_prior_precision(lr=-0.1), ValueError, "lr: expected a positive step size"),
    (lambda la: la.optimize_prior_precision(lr=1e6, n_steps=5), ValueError, "optimize_prior_precision: the log evidence became"),
    (lambda la: la.optimize_prior_precision(method="gridsearch", tune_sigma_noise=True), ValueError, "gridsearch' tunes the prior precision only"),
    (lambda la: la.optimize_prior_precision(method="marglik", grid=[1.0, 2.0]), ValueError, "val_data, grid, pred_type, link_approx: method='marglik' .* uses none of them"),
    (lambda la: setattr(la, "prior_precision", np.array([True, True])), TypeError, "prior_precision: expected a number or an array of numbers"),
    (lambda la: la.log_marginal_likelihood(sigma_noise=np.array(True)), TypeError, "sigma_noise: expected a number"),
    (lambda la: setattr(la, "prior_precision", None), TypeError, "prior_precision: expected a positive value; got None"),
    (lambda la: setattr(la, "temperature", None), TypeError, "temperature: expected a positive value; got None"),
    (lambda la: la.fit(([[1.0]], [1.0]), override="no"), TypeError, "override: expected True or False"),
    (lambda la: la.fit(_dataset(4).repeat()), ValueError, r"data: the dataset is infinite .*pass steps=N"),
    (lambda la: la.fit(_dataset(4), steps=0), ValueError, "steps: expected a positive integer"),
    (lambda la: (setattr(la, "memory_limit_bytes", 1000), la.posterior_covariance),
     ValueError, "posterior_covariance: a dense 26 x 26 matrix .* la.covariance_blocks"),
]


def _dataset(n: int, batch: int = 2) -> tf.data.Dataset:
    rng = np.random.default_rng(5)
    return tf.data.Dataset.from_tensor_slices(
        (rng.normal(size=(n, 3)), rng.normal(size=(n, 2)))
    ).batch(batch)


def test_fit_with_steps_uses_the_first_batches_of_an_infinite_dataset():
    la, first = make("kron", "all"), make("kron", "all")
    la.fit(_dataset(6).repeat(), steps=2)
    first.fit(_dataset(6).take(2))
    assert la.curvature.n_data == first.curvature.n_data == 4
    np.testing.assert_array_equal(la.posterior_precision.to_dense(),
                                  first.posterior_precision.to_dense())


@pytest.mark.parametrize(("use", "error", "match"), BAD_USES)
def test_bad_uses_raise_and_leave_the_posterior_unchanged(use, error, match):
    la = make("kron", "all", prior_precision=[0.5, 2.0])
    before = (la.log_marginal_likelihood().numpy(), la.posterior_covariance.numpy())
    with pytest.raises(error, match=match):
        use(la)
    la.memory_limit_bytes = None
    np.testing.assert_array_equal(la.log_marginal_likelihood(), before[0])
    np.testing.assert_array_equal(la.posterior_covariance, before[1])
    np.testing.assert_array_equal(la.prior_precision, [0.5, 2.0])


def test_evidence_keyword_arguments_fit_the_likelihood():
    la = make("diag", "all", "classification")
    with pytest.raises(ValueError, match="sigma_noise: only used with likelihood='regression'"):
        la.log_marginal_likelihood(sigma_noise=0.5)
    with pytest.raises(ValueError, match="tune_sigma_noise: only a scalar sigma_noise"):
        la.optimize_prior_precision(tune_sigma_noise=True)


# ---------------------------------------------------------------------------- save / load
@pytest.mark.parametrize(("structure", "subset"), [("full", "all"), ("kron", "all"),
                                                   ("diag", "last_layer")])
def test_save_load_gives_the_identical_posterior(tmp_path, structure, subset):
    la = make(structure, subset, temperature=1.3)
    la.optimize_prior_precision(n_steps=5, progress=False)
    path = tmp_path / "posterior.bin"  # the exact name is kept
    la.save(path)
    loaded = PosteriorLaplace.load(path, la.model)
    theta = la.sample(4, seed=3)
    np.testing.assert_array_equal(loaded.sample(4, seed=3), theta)
    theta = tf.constant(theta.numpy())  # not the sampled tensor: TFP caches its inverse
    np.testing.assert_array_equal(loaded.posterior.log_prob(theta), la.posterior.log_prob(theta))
    np.testing.assert_array_equal(loaded.posterior_covariance, la.posterior_covariance)
    np.testing.assert_array_equal(loaded.log_marginal_likelihood(), la.log_marginal_likelihood())
    for name in ("prior_precision", "sigma_noise", "mean"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(la, name))
    assert loaded.temperature == la.temperature and loaded.hessian_structure == structure
    for key, value in la.tuning_trace.items():
        np.testing.assert_array_equal(loaded.tuning_trace[key], value)
    with np.load(path, allow_pickle=False) as archive:  # readable without pickle
        metadata = json.loads(str(archive["metadata"]))
    assert metadata["fingerprint"] == la.subset.fingerprint()
    assert metadata["signature"] == la.subset.signature()


def test_loaded_laplace_predicts_the_same(tmp_path):
    model, x = tanh_mlp(3, n=10)
    y = targets("classification", 3, 10)
    la = Laplace(model, "classification", "last_layer", "kron", prior_precision=2.0,
                 progress=False)
    la.fit((x, y))
    la.save(tmp_path / "p.npz")
    loaded = Laplace.load(tmp_path / "p.npz", model)
    assert type(loaded) is Laplace
    np.testing.assert_array_equal(loaded(x), la(x))
    np.testing.assert_array_equal(loaded(x, pred_type="nn", n_samples=8, seed=1),
                                  la(x, pred_type="nn", n_samples=8, seed=1))


def _saved(tmp_path, subset="all"):
    la = make("diag", subset)
    path = tmp_path / "posterior.npz"
    la.save(path)
    return la, path


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_load_refuses_a_different_model(tmp_path, subset):
    la, path = _saved(tmp_path, subset)
    retrained, _ = tanh_mlp(2, seed=1)  # same architecture, other weights
    other = "|none of its layers holds those MAP weights" if subset == "last_layer" else ""
    with pytest.raises(ValueError, match=f"(weights differ from the MAP{other}).*load_weights"):
        PosteriorLaplace.load(path, retrained)
    keras.utils.set_random_seed(0)
    wider = keras.Sequential([keras.Input((3,), dtype="float64"),
                              keras.layers.Dense(5, "tanh", dtype="float64"),
                              keras.layers.Dense(2, dtype="float64")])
    with pytest.raises(ValueError, match=f"do not match the posterior saved .* saved layer{other}"):
        PosteriorLaplace.load(path, wider)
    renamed, _ = tanh_mlp(2)  # same weights, layers numbered differently by Keras
    assert renamed.layers[-1].name != la.model.layers[-1].name
    loaded = PosteriorLaplace.load(path, renamed)
    np.testing.assert_array_equal(loaded.posterior_covariance, la.posterior_covariance)
    if subset == "last_layer":
        assert loaded.last_layer_name == renamed.layers[-1].name
        renamed_and_retrained, _ = tanh_mlp(2, seed=1)
        with pytest.raises(ValueError, match=r"fitted at the weights of its layer 'dense_\d+'; "
                                             r"the model has no layer of that name and none"):
            PosteriorLaplace.load(path, renamed_and_retrained)


def test_load_refuses_a_model_whose_other_weights_differ(tmp_path):
    """A last-layer or subnetwork posterior depends on the layers below and on non-trainable
    weights (BatchNorm statistics): a model that differs there is refused."""
    def model():
        keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input((3,), dtype="float64"),
                                 keras.layers.Dense(4, "tanh", dtype="float64"),
                                 keras.layers.BatchNormalization(dtype="float64"),
                                 keras.layers.Dense(2, dtype="float64")])
    x = np.random.default_rng(0).normal(size=(6, 3))
    la = PosteriorLaplace(model(), "regression", "last_layer", "diag", progress=False)
    la.fit((x, targets("regression", 2, 6)))
    la.save(tmp_path / "posterior.npz")
    for layer, index in ((0, 0), (1, 2)):  # the first kernel; the BatchNorm moving mean
        other = model()
        weights = other.layers[layer].get_weights()
        weights[index] = weights[index] + 0.5
        other.layers[layer].set_weights(weights)
        with pytest.raises(ValueError, match="other weights of the model differ from those it "
                                             "was saved with"):
            PosteriorLaplace.load(tmp_path / "posterior.npz", other)
    loaded = PosteriorLaplace.load(tmp_path / "posterior.npz", model())
    np.testing.assert_array_equal(loaded.posterior_covariance, la.posterior_covariance)


def test_save_takes_a_numpy_seed_and_refuses_a_directory(tmp_path):
    model, _ = tanh_mlp(2)
    la = PosteriorLaplace(model, "regression", "all", "diag", seed=np.int64(3), progress=False)
    la.fit((np.random.default_rng(0).normal(size=(6, 3)), targets("regression", 2, 6)))
    with pytest.raises(ValueError, match="path: .* is a directory; expected a file name"):
        la.save(tmp_path)
    assert list(tmp_path.iterdir()) == []
    la.save(tmp_path / "posterior.npz")
    assert PosteriorLaplace.load(tmp_path / "posterior.npz", la.model).seed == 3


def test_load_finds_the_last_layer_by_its_weights_when_another_layer_took_its_name(tmp_path):
    def mlp(hidden_name, last_name):
        return keras.Sequential([keras.Input((3,), dtype="float64"),
                                 keras.layers.Dense(4, "tanh", dtype="float64", name=hidden_name),
                                 keras.layers.Dense(2, dtype="float64", name=last_name)])

    model = mlp("hidden", "out")
    x = np.random.default_rng(0).normal(size=(6, 3))
    la = PosteriorLaplace(model, "regression", "last_layer", "full", progress=False)
    la.fit((x, targets("regression", 2, 6)))
    la.save(tmp_path / "posterior.npz")
    rebuilt = mlp("out", "final")  # the saved layer's name now belongs to the hidden layer
    rebuilt.set_weights(model.get_weights())
    loaded = PosteriorLaplace.load(tmp_path / "posterior.npz", rebuilt)
    assert loaded.last_layer_name == "final"
    np.testing.assert_array_equal(loaded.posterior_covariance, la.posterior_covariance)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _garbage(path):
    path.write_bytes(b"not a posterior at all" * 10)


def _drop_metadata(path):
    with np.load(path) as archive:
        arrays = {k: archive[k] for k in archive.files if k != "mean"}
    np.savez(path, **arrays)


def _other_format(path):
    with np.load(path) as archive:
        arrays = {k: archive[k] for k in archive.files}
    arrays["metadata"] = np.array(json.dumps({"format": "something else"}))
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def _altered(change, digest=False):
    """A damage that rewrites the file's arrays and metadata with ``change`` applied (and,
    with ``digest``, their SHA-256 recomputed, as a deliberate forgery would)."""
    def damage(path):
        from laplace_tf.posterior import io

        with np.load(path) as archive:
            arrays = {k: archive[k] for k in archive.files}
        metadata = json.loads(str(arrays.pop("metadata")))
        change(arrays, metadata)
        if digest:
            metadata["sha256"] = io._digest(metadata, arrays)
        arrays["metadata"] = np.array(json.dumps(metadata))
        with open(path, "wb") as handle:
            np.savez(handle, **arrays)
    return damage


def _shift_mean(arrays, metadata):
    arrays["mean"] = arrays["mean"] + 1.0


def _drop_digest(arrays, metadata):
    del metadata["sha256"]
    arrays["block_0_diagonal"] = 10 * arrays["block_0_diagonal"]


def _version_1(arrays, metadata):
    metadata["format_version"] = 1


def _huge_header(path):
    header = b"{'descr': '<f8', 'fortran_order': False, 'shape': (100000000000,), }"
    header += b" " * (117 - len(header)) + b"\n"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("mean.npy", b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little")
                         + header + b"\0" * 64)
        archive.writestr("metadata.npy", b"")


def _negate(arrays, metadata):
    arrays["block_0_diagonal"] = -arrays["block_0_diagonal"]


def _as_integers(arrays, metadata):
    arrays["block_0_diagonal"] = arrays["block_0_diagonal"].astype(np.int64)


def _n_data_text(arrays, metadata):
    metadata["n_data"] = "abc"


def _flip_bytes(path):
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        offset = archive.getinfo("block_0_diagonal.npy").header_offset
    name_length, extra_length = np.frombuffer(bytes(data[offset + 26:offset + 30]), "<u2")
    start = offset + 30 + int(name_length) + int(extra_length) + 140  # inside the numbers
    data[start:start + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("damage", "match"), [
    (_truncate, "is not a readable laplace_tf posterior"),
    (_garbage, "is not a readable laplace_tf posterior .*it is not an .npz \\(zip\\) archive"),
    (_drop_metadata, "array 'mean' is missing"),
    (_other_format, "holds format 'something else'"),
    (_flip_bytes, "is not a readable laplace_tf posterior"),
    (_altered(_shift_mean), "differ from those la.save wrote .* the file was altered"),
    (_altered(_shift_mean, digest=True),
     "the array 'mean' in .* is not the MAP weights the file records"),
    (_altered(_drop_digest), "metadata entry 'sha256' is missing"),
    (_altered(_version_1), "holds format 'laplace_tf.posterior' version 1; this laplace_tf "
                           "reads 'laplace_tf.posterior' version 2"),
    (_huge_header, "is not a readable laplace_tf posterior|declares arrays too large"),
    (_altered(_negate), "differ from those la.save wrote .* the file was altered"),
    (_altered(_as_integers), "differ from those la.save wrote .* the file was altered"),
    (_altered(_n_data_text), "differ from those la.save wrote .* the file was altered"),
])
def test_load_refuses_a_broken_file(tmp_path, damage, match):
    la, path = _saved(tmp_path)
    damage(path)
    with pytest.raises(ValueError, match=match):
        PosteriorLaplace.load(path, la.model)


def test_any_damage_to_a_compressed_file_is_a_value_error(tmp_path):
    la, path = _saved(tmp_path)
    with np.load(path) as archive:
        arrays = {k: archive[k] for k in archive.files}
    np.savez_compressed(path, **arrays)
    PosteriorLaplace.load(path, la.model)  # intact: loads
    raw, damaged, refused = path.read_bytes(), tmp_path / "damaged.npz", 0
    for i in range(0, len(raw), 5):  # zlib errors, bad headers, CRC mismatches, ...
        data = bytearray(raw)
        data[i] ^= 0x5A
        damaged.write_bytes(bytes(data))
        try:
            PosteriorLaplace.load(damaged, la.model)
        except ValueError:
            refused += 1
    assert refused > len(raw) // 10


def test_load_of_a_missing_file():
    model, _ = tanh_mlp(2)
    with pytest.raises(FileNotFoundError):
        PosteriorLaplace.load("/nonexistent/posterior.npz", model)


def test_settings_name_every_constructor_argument_and_rebuild_it():
    names = list(inspect.signature(PosteriorLaplace.__init__).parameters)[2:]  # after model
    assert [s.name for s in PosteriorLaplace.SETTINGS] == names
    model, _ = tanh_mlp(2)
    options = dict(likelihood="regression", subset_of_weights="last_layer",
                   hessian_structure="diag", curvature="ef", prior_precision=np.arange(1.0, 11.0),
                   prior_mean=0.25, sigma_noise=[0.5, 2.0], temperature=0.5,
                   last_layer_name=model.layers[-1].name, stochastic=False, seed=7,
                   on_indefinite="clip", batch_size=3, progress=False, memory_limit_bytes=10**8,
                   rank=None, n_context=None, subnetwork_indices=None,
                   kfac_approximation="expand")
    assert set(options) == set(names)
    settings = PosteriorLaplace(model, **options).settings()
    assert set(settings) == set(names)
    copy = PosteriorLaplace(model, **settings).settings()
    for name, value in options.items():
        np.testing.assert_array_equal(settings[name], value, err_msg=name)
        np.testing.assert_array_equal(copy[name], value, err_msg=name)


class _WithOffset(PosteriorLaplace):
    """A posterior with one more constructor argument: one more line in SETTINGS."""

    SETTINGS = (*PosteriorLaplace.SETTINGS, Setting("offset", "metadata", 0.0))

    def __init__(self, model, likelihood, offset=0.0, **options):
        super().__init__(model, likelihood, **options)
        self.offset = offset


def test_a_new_constructor_argument_is_saved_from_its_setting_alone(tmp_path):
    la = make("diag", "all")
    shifted = _WithOffset(la.model, "regression", offset=2.5, subset_of_weights="all",
                          hessian_structure="diag", sigma_noise=0.7, progress=False)
    shifted.restore(la.state())
    shifted.save(tmp_path / "shifted.npz")
    loaded = _WithOffset.load(tmp_path / "shifted.npz", la.model)
    assert type(loaded) is _WithOffset and loaded.offset == 2.5
    np.testing.assert_array_equal(loaded.posterior_covariance, la.posterior_covariance)
    la.save(tmp_path / "plain.npz")  # written without the new setting: its when_absent
    assert _WithOffset.load(tmp_path / "plain.npz", la.model).offset == 0.0


def test_save_writes_atomically_and_overwrites(tmp_path):
    la, path = _saved(tmp_path)
    la.prior_precision = 4.0
    la.save(path)
    assert float(PosteriorLaplace.load(path, la.model).prior_precision) == 4.0
    assert [p.name for p in tmp_path.iterdir()] == ["posterior.npz"]


def test_tf_function_can_take_the_kron_posterior():
    la = make("kron", "all")

    @tf.function
    def draw(distribution):
        return distribution.sample(2, seed=tf.constant([1, 2]))

    np.testing.assert_allclose(draw(la.posterior), la.posterior.sample(2, seed=tf.constant([1, 2])))
