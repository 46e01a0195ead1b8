"""Built-in data sets and (x, y) files: exact splits, scaling, OOD transforms, file errors."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import datasets as sk

from laplace_tf import data

SPLITS = ("train", "val", "test")


def _rows(ds: data.DataSet) -> tuple[np.ndarray, np.ndarray]:
    parts = [getattr(ds, s) for s in SPLITS]
    return np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts])


def _sorted_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    table = np.column_stack([x.reshape(len(x), -1), y.reshape(len(y), -1)])
    return table[np.lexsort(table.T[::-1])]


SIZES = {"digits": 1797, "breast_cancer": 569, "sine_1d": 300, "diabetes": 442}


@pytest.mark.parametrize("name", list(data.DATASETS))
def test_splits_are_seeded_and_sized(name):
    first, again, other = data.load(name, seed=0), data.load(name, seed=0), data.load(name, seed=1)
    n = sum(len(getattr(first, s)) for s in SPLITS)
    assert n == SIZES[name]
    assert len(first.test) == pytest.approx(data.TEST_FRACTION * n, abs=1)
    assert len(first.val) == pytest.approx(data.VAL_FRACTION * n, abs=1)
    for split in SPLITS:
        np.testing.assert_array_equal(getattr(first, split).x, getattr(again, split).x)
        np.testing.assert_array_equal(getattr(first, split).y, getattr(again, split).y)
    assert not np.array_equal(first.test.x, other.test.x)
    assert first.likelihood == data.LIKELIHOOD_OF[name]
    assert first.train.x.dtype == np.float32


def test_digits_is_the_sklearn_set_scaled_to_unit_interval():
    ds = data.load("digits", seed=3)
    raw = sk.load_digits()
    x, y = _rows(ds)
    np.testing.assert_array_equal(_sorted_rows(x, y),
                                  _sorted_rows((raw.data / 16.0).astype(np.float32), raw.target))
    # stratified: every class has the same share in each split (within one example)
    for split in SPLITS:
        counts = np.bincount(getattr(ds, split).y, minlength=10)
        expected = np.bincount(raw.target) * len(getattr(ds, split)) / len(raw.target)
        assert np.all(np.abs(counts - expected) <= 1)
    assert (ds.input_shape, ds.n_outputs) == ((64,), 10)


def test_digits_rotated_is_the_test_split_rotated_by_90_degrees():
    test, ood = data.load("digits", seed=2).test, data.load_ood("digits_rotated", seed=2)
    back = np.rot90(ood.x.reshape(-1, 8, 8), k=-1, axes=(1, 2)).reshape(-1, 64)
    np.testing.assert_array_equal(back, test.x)
    np.testing.assert_array_equal(ood.y, test.y)
    assert not np.array_equal(ood.x, test.x)


def test_digits_noisy_adds_clipped_gaussian_noise():
    test, ood = data.load("digits", seed=0).test, data.load_ood("digits_noisy", seed=0)
    noise = data.OOD_NOISE * np.random.default_rng(0).normal(size=test.x.shape)
    np.testing.assert_allclose(ood.x, np.clip(test.x + noise, 0, 1), atol=1e-6)
    inside = (test.x + noise > 0) & (test.x + noise < 1)
    assert np.std((ood.x - test.x)[inside]) > 0.3  # heavy noise where nothing was clipped


@pytest.mark.parametrize("name, standardise_y", [("breast_cancer", False), ("diabetes", True)])
def test_tabular_sets_are_standardised_with_training_statistics(name, standardise_y):
    ds = data.load(name, seed=0, dtype="float64")
    np.testing.assert_allclose(ds.train.x.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(ds.train.x.std(axis=0), 1, atol=1e-12)
    assert np.abs(ds.test.x.mean(axis=0)).max() > 1e-3  # test uses train's statistics
    if standardise_y:
        np.testing.assert_allclose([ds.train.y.mean(), ds.train.y.std()], [0, 1], atol=1e-12)
        assert ds.train.y.shape[1:] == (1,) and ds.n_outputs == 1
    else:
        assert set(np.unique(ds.train.y)) == {0, 1} and ds.n_outputs == 1


def test_sine_1d_lies_in_the_clusters_with_the_stated_noise():
    ds = data.sine_1d(seed=0, n=3000, dtype="float64")
    x, y = _rows(ds)
    in_cluster = np.zeros(len(x), bool)
    for low, high in data.SINE_CLUSTERS:
        in_cluster |= (x[:, 0] >= low) & (x[:, 0] <= high)
    assert in_cluster.all()
    residual = y[:, 0] - np.sin(3 * x[:, 0])
    standard_error = data.SINE_NOISE / np.sqrt(2 * len(x))
    assert abs(residual.std() - data.SINE_NOISE) < 4 * standard_error
    assert abs(residual.mean()) < 4 * data.SINE_NOISE / np.sqrt(len(x))


@pytest.mark.parametrize("loader, name, message", [
    (data.load, "digit", "did you mean 'digits'"),
    (data.load, "mnist", "expected one of digits, breast_cancer, sine_1d, diabetes"),
    (data.load_ood, "digits_rotate", "did you mean 'digits_rotated'"),
])
def test_unknown_names_list_the_valid_ones(loader, name, message):
    with pytest.raises(ValueError, match=message):
        loader(name)


def test_npz_and_csv_files_give_the_same_arrays(tmp_path):
    x, y = np.arange(12.0).reshape(4, 3), np.array([0.0, 1.0, 1.0, 0.0])
    np.savez(tmp_path / "d.npz", x=x, y=y)
    (tmp_path / "head.csv").write_text("a,b,c,y\n" + "\n".join(
        ",".join(map(str, [*row, t])) for row, t in zip(x, y, strict=True)) + "\n")
    (tmp_path / "first.csv").write_text("\n".join(
        ",".join(map(str, [t, *row])) for row, t in zip(x, y, strict=True)))
    for split in (data.load_arrays(tmp_path / "d.npz"), data.load_arrays(tmp_path / "head.csv"),
                  data.load_arrays(tmp_path / "first.csv", target_column=0)):
        np.testing.assert_array_equal(split.x, x)
        np.testing.assert_array_equal(split.y, y)


BAD_FILES = [
    ("missing.npz", None, FileNotFoundError, "data: no such file"),
    ("d.txt", "1,2\n", ValueError, "expected a .npz file"),
    ("ragged.csv", "1,2,3\n4,5\n", ValueError, "rows of different lengths"),
    ("words.csv", "a,b\n1,x\n", ValueError, "non-numeric"),
    ("one.csv", "1\n2\n", ValueError, "target_column: -1 is not a column"),
    ("header.csv", "a,b\n", ValueError, "no data rows"),
    ("nan.csv", "1,0\nnan,1\n", ValueError, "has NaN or infinite inputs"),
    ("broken.npz", "not a zip", ValueError, "not a readable .npz"),
]


@pytest.mark.parametrize("name, content, error, message", BAD_FILES)
def test_bad_files_raise_clear_errors(tmp_path, name, content, error, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(error, match=message):
        data.load_arrays(tmp_path / name)


@pytest.mark.parametrize("arrays, message", [
    ({"inputs": np.zeros((2, 1)), "y": np.zeros(2)}, r"holds arrays \['inputs', 'y'\]"),
    ({"x": np.zeros((3, 1)), "y": np.zeros(2)}, "has 3 inputs but 2 targets"),
    ({"x": np.array([[0.0], [np.inf]]), "y": np.zeros(2)},
     "has NaN or infinite inputs \\(first at row 1\\)"),
    ({"x": np.zeros((2, 1)), "y": np.array([0.0, np.nan])}, "has NaN or infinite targets"),
])
def test_npz_with_wrong_arrays(tmp_path, arrays, message):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        data.load_arrays(tmp_path / "d.npz", argument="data.train")
